"""Calling the user's code (tools, environments) under a time limit, from an asyncio loop.

A coroutine function is awaited as a task. A plain function runs on a fresh daemon thread. At the
time limit the caller gets `CallTimedOut` right away, and nobody waits for the work any
more. Python cannot kill a thread, so a timed-out plain function goes on running in the background
until it returns. Its thread is a daemon, so it never holds up the run or the end of the process.
A task that ignores its cancellation is left alone in the same way. An `async def` function that
blocks (e.g. `time.sleep` rather than `await asyncio.sleep`) stalls the whole loop, which no time
limit can stop: blocking work belongs in a plain function.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any


class CallTimedOut(asyncio.TimeoutError):
    """The call ran past its time limit (told apart from a TimeoutError the user's code raised)."""


def is_async_callable(fn: Callable) -> bool:
    """`async def` functions, partials of them, and objects whose `__call__` is one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


async def call_with_timeout(fn: Callable, timeout: float | None, /, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, sync or async, or `CallTimedOut` after `timeout` seconds (None: no
    limit). The exceptions `fn` raises come through as they are. (`fn` and `timeout` are
    positional, so a tool may have parameters of those names.)"""
    if is_async_callable(fn):
        work = asyncio.ensure_future(fn(*args, **kwargs))
    else:
        work = _on_daemon_thread(fn, args, kwargs)
    try:
        done, _ = await asyncio.wait({work}, timeout=timeout)
    except asyncio.CancelledError:
        work.cancel()
        raise
    if not done:
        work.cancel()  # a thread runs on regardless; we only stop waiting for it
        raise CallTimedOut
    result = work.result()
    if inspect.isawaitable(result):  # a plain function that returned a coroutine
        return await call_with_timeout(_awaited, timeout, result)
    return result


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _on_daemon_thread(fn: Callable, args: tuple, kwargs: dict) -> asyncio.Future:
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():  # it was cancelled at the time limit
            future.set_result(value) if ok else future.set_exception(value)

    def work() -> None:
        try:
            outcome = (True, fn(*args, **kwargs))
        except Exception as err:
            outcome = (False, err)
        except BaseException as err:  # e.g. sys.exit() in a tool: report it, never let it end the thread silently
            outcome = (False, RuntimeError(f"{type(err).__name__}: {err}"))
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: nobody waits for this result any more
            pass

    threading.Thread(target=work, name=f"quartet-user-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return future
