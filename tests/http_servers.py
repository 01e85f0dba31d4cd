"""Real HTTP servers on loopback for the reward-server tests: an app served by uvicorn in a thread,
on a free port of 127.0.0.1, always shut down (and restartable on the same port)."""

import asyncio
import contextlib
import socket
import threading
import time


class LoopbackServer:
    """Serves `app` with uvicorn in a daemon thread; `stop()` ends it, `start()` serves again on the same port."""

    def __init__(self, app, port: int = 0):
        self.app, self.port = app, port
        self.server = self.thread = None

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        return sock

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LoopbackServer":
        import uvicorn

        sock = self._socket()
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error", lifespan="on"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[sock])), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout=20)
            self.server = None


@contextlib.contextmanager
def serving(app):
    server = LoopbackServer(app).start()
    try:
        yield server
    finally:
        server.stop()
