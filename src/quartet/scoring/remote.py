"""Rewards from reward servers over HTTP (OpenRLHF's `POST /get_reward` contract).

`RemoteRewards` sends each row's prompt + response as a query (and its prompt; the rows' `label`
column as labels when they have one), in requests of at most `request_size` texts, spread over
the servers round-robin, at most `max_concurrency` in flight. A request that fails (no
connection, a timeout, HTTP 5xx or 429, an answer that is not JSON, holds the wrong number of
rewards or a non-finite one) is retried on the next server after 1, 2, 4... seconds (at most 30);
a 4xx such as 401 is not retried (it will not change). When any request still fails, the whole
call raises `RewardServerDown` naming the URL and the error: no step ever uses a partial or
invalid set of rewards.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import numbers
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from quartet.runs.faults import RewardServerDown

RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_SECONDS = 30.0
T = TypeVar("T")


class RequestFailed(Exception):
    """One request's failure: its URL, what went wrong, and whether another try may help."""

    def __init__(self, url: str, error: str, retryable: bool = True):
        super().__init__(error)
        self.url, self.error, self.retryable = url, error, retryable


def checked_rewards(data: Any, n: int) -> list[float]:
    """The `rewards` of a server's answer, checked: a list of `n` finite numbers (ValueError otherwise)."""
    if not isinstance(data, dict) or "rewards" not in data:
        raise ValueError('the answer has no "rewards" list')
    rewards = data["rewards"]
    if not isinstance(rewards, list):
        raise ValueError(f'"rewards" is {type(rewards).__name__}, not a list')
    if len(rewards) != n:
        raise ValueError(f"{len(rewards)} rewards for {n} queries")
    for i, r in enumerate(rewards):
        if isinstance(r, bool) or not isinstance(r, numbers.Real):
            raise ValueError(f"reward {i} is {r!r}, not a number")
        if not math.isfinite(r):
            raise ValueError(f"reward {i} is {r}, not a finite number")
    return [float(r) for r in rewards]


class RemoteRewards:
    """Scores prompt + response texts with reward servers; see the module docstring."""

    def __init__(self, urls: Sequence[str], timeout: float = 60.0, retries: int = 3, max_concurrency: int = 4,
                 request_size: int = 32, token: str | None = None, backoff: float = 1.0):
        if not urls:
            raise ValueError("no reward server URL given")
        self.urls = [self._endpoint(u) for u in urls]
        self.timeout, self.retries, self.max_concurrency = timeout, retries, max_concurrency
        self.request_size, self.token, self.backoff = request_size, token, backoff
        self._next_url = itertools.count()
        self.requests = self.retried = 0  # counts, for metrics and tests

    @staticmethod
    def _endpoint(url: str) -> str:
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"models.reward_url {url!r} is not an http:// or https:// URL")
        return url if url.endswith("/get_reward") else url + "/get_reward"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], labels: Sequence[Any] | None = None) -> list[float]:
        """One reward per (prompt, response), in order; raises RewardServerDown when a request fails past its retries."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        if not responses:
            return []
        return asyncio.run(self.score(list(prompts), list(responses), None if labels is None else list(labels)))

    async def score(self, prompts: list[str], responses: list[str], labels: list[Any] | None = None) -> list[float]:
        import httpx

        semaphore = asyncio.Semaphore(self.max_concurrency)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        starts = range(0, len(responses), self.request_size)
        async with httpx.AsyncClient(timeout=self.timeout, headers=headers) as client:
            tasks = [asyncio.create_task(self._request(client, semaphore, prompts[s : s + self.request_size],
                                                       responses[s : s + self.request_size],
                                                       None if labels is None else labels[s : s + self.request_size]))
                     for s in starts]
            try:
                parts = await asyncio.gather(*tasks)
            except RequestFailed as failed:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                hint = "; models.reward_token_file holds the token it asks for" if " 401" in failed.error[:9] else ""
                raise RewardServerDown(failed.url, failed.error + hint) from None
        return [r for part in parts for r in part]

    async def _request(self, client, semaphore: asyncio.Semaphore, prompts: list[str], responses: list[str],
                       labels: list[Any] | None) -> list[float]:
        body: dict[str, Any] = {"query": [p + r for p, r in zip(prompts, responses)], "prompts": prompts}
        if labels is not None:
            body["labels"] = labels

        def next_url() -> str:
            self.requests += 1
            return self.urls[next(self._next_url) % len(self.urls)]

        def on_retry() -> None:
            self.retried += 1
        return await post_with_retries(client, semaphore, next_url, body, partial(checked_rewards, n=len(responses)),
                                       self.retries, self.backoff, self.timeout, on_retry)


async def post_with_retries(client, semaphore: asyncio.Semaphore, next_url: Callable[[], str], body: dict[str, Any],
                            check: Callable[[Any], T], retries: int, backoff: float, timeout: float,
                            on_retry: Callable[[], None] = lambda: None) -> T:
    """POST `body` as JSON and return `check(answer's JSON)`; a failed try (see the module docstring) is
    retried on `next_url()` after 1, 2, 4... x `backoff` seconds; raises `RequestFailed` past `retries`."""
    last: RequestFailed | None = None
    for attempt in range(retries + 1):
        if attempt:
            on_retry()
            await asyncio.sleep(min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS))
        url = next_url()
        async with semaphore:
            try:
                return await _post(client, url, body, check, timeout)
            except RequestFailed as failed:
                last = failed
        if not last.retryable:
            break
    tries = f" (tried {attempt + 1} times)" if attempt else ""
    raise RequestFailed(last.url, last.error + tries)


async def _post(client, url: str, body: dict[str, Any], check: Callable[[Any], T], timeout: float) -> T:
    import httpx

    try:
        answer = await client.post(url, json=body)
    except httpx.TimeoutException:
        raise RequestFailed(url, f"no answer within {timeout:g} s") from None
    except httpx.HTTPError as err:
        raise RequestFailed(url, f"{type(err).__name__}: {err or 'connection failed'}") from None
    if answer.status_code != 200:
        detail = answer.text[:200].strip()
        raise RequestFailed(url, f"HTTP {answer.status_code}" + (f": {detail}" if detail else ""),
                      retryable=answer.status_code in RETRYABLE_STATUS or answer.status_code >= 500)
    try:
        return check(json.loads(answer.content))
    except json.JSONDecodeError:
        raise RequestFailed(url, f"the answer is not JSON: {answer.text[:80]!r}") from None
    except ValueError as err:
        raise RequestFailed(url, f"invalid answer: {err}") from None


def remote_rewards_from_config(models) -> RemoteRewards:
    """The `RemoteRewards` an RL config's `models.reward_url` and its settings describe."""
    token = None
    if models.reward_token_file:
        token = Path(models.reward_token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"models.reward_token_file {models.reward_token_file} is empty")
    return RemoteRewards(models.reward_urls, timeout=models.reward_timeout, retries=models.reward_retries,
                         max_concurrency=models.reward_max_concurrency, request_size=models.reward_request_size,
                         token=token)
