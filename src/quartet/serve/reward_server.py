"""An HTTP reward server: a reward-model directory behind `POST /get_reward` and `GET /health`.

The contract is OpenRLHF's: the request is `{"query": [texts], "prompts": [...], "labels": [...]}`
(each query is a whole prompt + response; prompts and labels are accepted and not needed by a
reward model) and the answer `{"rewards": [...], "scores": [...]}`, one number per query, in order.

Concurrent requests are batched: each request's texts go onto one asyncio queue and a single
scoring worker takes up to `batch_size` texts at a time (from as many requests as fit), scores
them with the reward model in a worker thread (the event loop keeps answering) and hands every
request its own scores. Every request is checked before anything is scored: a bad token (401), a
body that is not the contract's JSON (400/422) or too many or too long texts (413) are refused
with a message saying why.
"""

import asyncio
import hmac
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ScoreTexts = Callable[[list[str]], list[float]]


@dataclass
class ServerLimits:
    """What one request may hold; larger requests are refused with 413 before anything is scored."""

    max_texts: int = 1024  # queries per request
    max_text_chars: int = 100_000  # characters per query
    max_body_bytes: int = 32 * 2**20  # the request body


@dataclass
class _Pending:
    texts: list[str]
    done: asyncio.Future
    scores: list[float] = field(default_factory=list)


class BatchingScorer:
    """One scoring worker fed by a queue: requests that arrive together are scored in shared batches
    of at most `batch_size` texts; each request gets its own scores back, in its own order."""

    def __init__(self, score_texts: ScoreTexts, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        self.score_texts, self.batch_size = score_texts, batch_size
        self.queue: asyncio.Queue[_Pending] | None = None
        self.worker: asyncio.Task | None = None
        self.batches = 0  # scoring calls made (the health endpoint reports them)
        self.texts_scored = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass

    async def score(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        pending = _Pending(texts, asyncio.get_running_loop().create_future())
        await self.queue.put(pending)
        return await pending.done

    async def _work(self) -> None:
        carried: list[tuple[_Pending, int]] = []  # (request, index of its first unscored text)
        while True:
            if not carried:
                carried.append((await self.queue.get(), 0))
            batch: list[tuple[_Pending, int, int]] = []  # (request, start, end) slices of requests
            room = self.batch_size
            while room:
                if not carried:
                    if self.queue.empty():
                        break
                    carried.append((self.queue.get_nowait(), 0))
                request, start = carried[0]
                end = min(len(request.texts), start + room)
                batch.append((request, start, end))
                room -= end - start
                if end == len(request.texts):
                    carried.pop(0)
                else:
                    carried[0] = (request, end)
            texts = [t for request, start, end in batch for t in request.texts[start:end]]
            try:
                scores = await asyncio.to_thread(self.score_texts, texts)
            except Exception as err:  # noqa: BLE001 - the requests in this batch get the error, the server goes on
                for request, _, _ in batch:
                    if not request.done.done():
                        request.done.set_exception(err)
                carried = [(r, s) for r, s in carried if not r.done.done()]
                continue
            self.batches += 1
            self.texts_scored += len(texts)
            offset = 0
            for request, start, end in batch:
                request.scores.extend(scores[offset : offset + end - start])
                offset += end - start
                if end == len(request.texts) and not request.done.done():
                    request.done.set_result(request.scores)


class RequestError(ValueError):
    """A request the server refuses: the HTTP status and what is wrong with it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_reward_request(body: bytes, limits: ServerLimits) -> list[str]:
    """The texts of a `/get_reward` body, checked against the contract and `limits`."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"request body of {len(body)} bytes exceeds the server's limit of {limits.max_body_bytes}")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"request body is not JSON: {err}") from None
    if not isinstance(data, dict) or "query" not in data:
        raise RequestError(422, 'request must be a JSON object with "query": a list of texts (prompt + response)')
    queries = data["query"]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise RequestError(422, '"query" must be a list of strings')
    if len(queries) > limits.max_texts:
        raise RequestError(413, f"{len(queries)} queries in one request; the server takes at most {limits.max_texts}")
    for name in ("prompts", "labels"):  # OpenRLHF sends them; a reward model does not read them
        value = data.get(name)
        if value is not None and (not isinstance(value, list) or len(value) != len(queries)):
            raise RequestError(422, f'"{name}" must be a list with one entry per query ({len(queries)})')
    for i, q in enumerate(queries):
        if len(q) > limits.max_text_chars:
            raise RequestError(413, f"query {i} has {len(q)} characters; the server takes at most {limits.max_text_chars}")
    return queries


def read_token(token_file: str | Path) -> str:
    """The bearer token in `token_file` (surrounding whitespace dropped); it must not be empty."""
    token = Path(token_file).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"token file {token_file} is empty: put the bearer token clients must send in it")
    return token


def build_app(score_texts: ScoreTexts, batch_size: int = 32, token: str | None = None,
              limits: ServerLimits | None = None, model_name: str = "reward model"):
    """The FastAPI application serving `score_texts` (texts -> one score each)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    limits = limits or ServerLimits()
    scorer = BatchingScorer(score_texts, batch_size)

    @asynccontextmanager
    async def lifespan(app):
        scorer.start()
        yield
        await scorer.stop()

    app = FastAPI(title="Quartet reward server", lifespan=lifespan)
    app.state.scorer = scorer

    def refused(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        return bool(given) and hmac.compare_digest(given.encode(), token.encode())

    @app.get("/health")
    async def health(request: Request):
        if not authorised(request):
            return refused(401, "missing or wrong bearer token")
        return {"status": "ok", "model": model_name, "batch_size": batch_size,
                "batches": scorer.batches, "texts_scored": scorer.texts_scored}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        if not authorised(request):
            return refused(401, "missing or wrong bearer token: send 'Authorization: Bearer TOKEN'")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            return refused(413, f"request body of {declared} bytes exceeds the server's limit of {limits.max_body_bytes}")
        try:
            texts = parse_reward_request(await request.body(), limits)
        except RequestError as err:
            return refused(err.status, str(err))
        try:
            scores = await scorer.score(texts)
        except Exception as err:  # noqa: BLE001 - reported to the client; the server keeps serving
            return refused(500, f"scoring failed: {type(err).__name__}: {err}")
        scores = [float(s) if math.isfinite(s) else None for s in scores]  # JSON has no NaN
        return {"rewards": scores, "scores": scores}

    return app


def reward_model_scorer(model_dir: str | Path, max_length: int = 1024, trust_remote_code: bool = False,
                        allow_pickle: bool = False) -> ScoreTexts:
    """Scores of whole texts by the reward model in `model_dir`, as `quartet score` computes them."""
    import torch

    from quartet.models.loading import load_scalar_model
    from quartet.models.tokenizer import load_tokenizer
    from quartet.stages.reward import score_texts

    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = load_scalar_model(model_dir, trust_remote_code, allow_pickle, pad_token_id=tokenizer.pad_token_id,
                              require_trained_head=True)
    if torch.cuda.is_available():
        model = model.cuda()

    def score(texts: Sequence[str]) -> list[float]:
        with torch.no_grad():
            return score_texts(model, tokenizer, list(texts), batch_size=len(texts), max_length=max_length)
    return score


def serve_reward(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, batch_size: int = 32,
                 token_file: str | Path | None = None, max_length: int = 1024, limits: ServerLimits | None = None,
                 trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
    """Load the reward model and serve it until stopped (Ctrl-C)."""
    import uvicorn

    token = read_token(token_file) if token_file else None
    score = reward_model_scorer(model_dir, max_length, trust_remote_code, allow_pickle)
    app = build_app(score, batch_size, token, limits, model_name=str(model_dir))
    auth = "bearer token required" if token else "no token (anyone who can reach the port may score)"
    print(f"[serve] reward model {model_dir} on http://{host}:{port}/get_reward (batches of {batch_size}; {auth})",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")

