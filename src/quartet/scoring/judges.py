"""Generative judges: a causal LM grades each response, and the score is read from its reply.

A judge is a reward function (`judge(prompts, responses, **columns)`), so it sits in
`models.reward_fn` beside rule rewards and verifiers, with `models.reward_weights`:

    --models.reward_fn '[quartet.scoring.judges:judge, my_rewards:format_ok]' --models.reward_weights '[1.0, 0.5]'

`quartet.scoring.judges:judge` is configured by environment variables, read at its first call:

- QUARTET_JUDGE_MODEL: a local causal-LM directory, loaded once, replying greedily; or
  QUARTET_JUDGE_URL: an OpenAI-compatible server (`.../v1`; POST /chat/completions), with
  QUARTET_JUDGE_API_MODEL (the `model` field it expects) and QUARTET_JUDGE_TOKEN_FILE (a bearer token);
- QUARTET_JUDGE_TEMPLATE: a file holding the prompt template, with `{prompt}`, `{response}` and any
  dataset column (e.g. `{answer}`); the default asks for "Score: N" from 0 to 10;
- QUARTET_JUDGE_MAX_SCORE (default 10): the reward is the score divided by it, in [0, 1];
- QUARTET_JUDGE_UNPARSEABLE (default 0): the reward of a reply with no score in range; `skip` leaves
  the row out of the judge's share (the other functions still score it);
- QUARTET_JUDGE_MAX_NEW_TOKENS (default 32), QUARTET_JUDGE_TIMEOUT (seconds, default 60),
  QUARTET_JUDGE_RETRIES (default 3), QUARTET_JUDGE_MAX_CONCURRENCY (default 4).

A score is read as the number after "score" (e.g. "Score: 7", "score = 7/10"), else the first number
of the reply. Replies with none, or one outside 0..max score, are counted (`Judge.unparseable`, and a
warning after each call that had any) and scored as configured: a judge that rambles never stops a
run. An endpoint that stays down past its retries stops the run like a reward server does
(`RewardServerDown`: a checkpoint, exit status 3).

`make_judge(...)` builds the same judge from Python arguments.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_TEMPLATE = ("Rate how well the answer responds to the question, from 0 (useless) to 10 (perfect).\n"
                    "Question: {prompt}\nAnswer: {response}\nReply with 'Score: N'.\nScore:")

_SCORE_AFTER_WORD = re.compile(r"score\s*[:=]?\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(reply: str, max_score: float) -> float | None:
    """The score in a judge's reply, or None when it has none in 0..`max_score`."""
    match = _SCORE_AFTER_WORD.search(reply) or _NUMBER.search(reply)
    if match is None:
        return None
    value = float(match.group(1) if match.re is _SCORE_AFTER_WORD else match.group(0))
    return value if math.isfinite(value) and 0 <= value <= max_score else None


class _SafeColumns(dict):
    def __missing__(self, key: str) -> str:
        raise ValueError(f"the judge's template names {{{key}}}, which is neither prompt, response nor a dataset column")


class Judge:
    """A reward function that asks `reply(texts) -> replies` to grade each response (see the module docstring)."""

    verifies = False

    def __init__(self, reply: Callable[[list[str]], list[str]], template: str = DEFAULT_TEMPLATE, max_score: float = 10.0,
                 unparseable: float | None = 0.0, name: str = "judge"):
        if max_score <= 0:
            raise ValueError(f"the judge's max score must be positive, not {max_score}")
        self.reply, self.template, self.max_score, self.unparseable_score = reply, template, max_score, unparseable
        self.__name__ = name
        self.judged = self.unparseable = 0  # replies read, and those without a score in range

    def __call__(self, prompts: list[str], responses: list[str], **columns: list[Any]) -> list[float | None]:
        texts = [self.template.format_map(_SafeColumns({**{k: v[i] for k, v in columns.items()},
                                                        "prompt": p, "response": r}))
                 for i, (p, r) in enumerate(zip(prompts, responses))]
        replies = self.reply(texts) if texts else []
        if len(replies) != len(texts):
            raise ValueError(f"judge {self.__name__}: {len(replies)} replies for {len(texts)} texts")
        scores: list[float | None] = []
        missed = 0
        for reply in replies:
            score = parse_score(reply, self.max_score)
            if score is None:
                missed += 1
                scores.append(self.unparseable_score)
            else:
                scores.append(score / self.max_score)
        self.judged += len(replies)
        self.unparseable += missed
        if missed:
            example = replies[next(i for i, r in enumerate(replies) if parse_score(r, self.max_score) is None)]
            print(f"warning: judge {self.__name__}: {missed} of {len(replies)} replies had no score in 0..{self.max_score:g} "
                  f"({self.unparseable} of {self.judged} so far), scored {self.unparseable_score}; e.g. {example[:80]!r}",
                  file=sys.stderr)
        return scores


def local_replies(model_dir: str | Path, max_new_tokens: int = 32, trust_remote_code: bool = False
                  ) -> Callable[[list[str]], list[str]]:
    """Greedy replies of the causal LM in `model_dir` (loaded once), with Quartet's own sampler."""
    import torch

    from quartet.config import SamplingConfig
    from quartet.data import collate_prompts
    from quartet.models.loading import load_causal_lm
    from quartet.models.tokenizer import load_tokenizer
    from quartet.rollout.backend import make_rollout_backend
    from quartet.rollout.texts import decode_texts

    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model = load_causal_lm(model_dir, trust_remote_code).eval()
    backend = make_rollout_backend("hf", tokenizer.eos_token_id, tokenizer.pad_token_id)
    backend.load_weights(model)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)

    @torch.no_grad()
    def reply(texts: list[str]) -> list[str]:
        batch = collate_prompts([{"input_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts],
                                tokenizer.pad_token_id)
        rollout = backend.generate(batch["input_ids"], batch["attention_mask"], sampling)
        return decode_texts(tokenizer, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                            rollout.response_mask)[1]
    return reply


def chat_replies(url: str, model: str = "judge", token: str | None = None, max_new_tokens: int = 32,
                 timeout: float = 60.0, retries: int = 3, max_concurrency: int = 4, backoff: float = 1.0
                 ) -> Callable[[list[str]], list[str]]:
    """Replies of an OpenAI-compatible server (`url` is its base, e.g. http://host:8000/v1), one chat
    request per text, at most `max_concurrency` at once, each retried like a reward server's."""
    from quartet.runs.faults import RewardServerDown
    from quartet.scoring.remote import RequestFailed, post_with_retries

    endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions")

    def content(answer: Any) -> str:
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError("no choices[0].message.content in the answer") from None
        if not isinstance(text, str):
            raise ValueError(f"choices[0].message.content is {type(text).__name__}, not text")
        return text

    async def all_replies(texts: list[str]) -> list[str]:
        import httpx

        semaphore = asyncio.Semaphore(max_concurrency)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as client:
            bodies = [{"model": model, "messages": [{"role": "user", "content": t}], "max_tokens": max_new_tokens,
                       "temperature": 0.0} for t in texts]
            tasks = [asyncio.create_task(post_with_retries(client, semaphore, lambda: endpoint, b, content, retries,
                                                           backoff, timeout)) for b in bodies]
            try:
                return list(await asyncio.gather(*tasks))
            except RequestFailed as failed:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise RewardServerDown(failed.url, failed.error) from None

    def reply(texts: list[str]) -> list[str]:
        return asyncio.run(all_replies(texts))
    return reply


def make_judge(model_dir: str | Path | None = None, url: str | None = None, api_model: str = "judge",
               token: str | None = None, template: str = DEFAULT_TEMPLATE, max_score: float = 10.0,
               unparseable: float | None = 0.0, max_new_tokens: int = 32, timeout: float = 60.0, retries: int = 3,
               max_concurrency: int = 4) -> Judge:
    """A judge asking a local causal LM (`model_dir`) or an OpenAI-compatible server (`url`)."""
    if (model_dir is None) == (url is None):
        raise ValueError("a judge needs one of a local model directory (QUARTET_JUDGE_MODEL) or an OpenAI-compatible "
                         "server URL (QUARTET_JUDGE_URL)")
    if model_dir is not None:
        reply = local_replies(model_dir, max_new_tokens)
    else:
        reply = chat_replies(url, api_model, token, max_new_tokens, timeout, retries, max_concurrency)
    return Judge(reply, template, max_score, unparseable)


def _env_number(name: str, default: float, kind: Callable[[str], float] = float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def judge_from_env(environ: dict[str, str] | None = None) -> Judge:
    """The judge the QUARTET_JUDGE_* environment variables describe (see the module docstring)."""
    env = os.environ if environ is None else environ
    template = DEFAULT_TEMPLATE
    if env.get("QUARTET_JUDGE_TEMPLATE"):
        template = Path(env["QUARTET_JUDGE_TEMPLATE"]).read_text(encoding="utf-8")
    token = None
    if env.get("QUARTET_JUDGE_TOKEN_FILE"):
        token = Path(env["QUARTET_JUDGE_TOKEN_FILE"]).read_text(encoding="utf-8").strip()
    raw_unparseable = env.get("QUARTET_JUDGE_UNPARSEABLE", "0").strip().lower()
    unparseable = None if raw_unparseable == "skip" else _env_number("QUARTET_JUDGE_UNPARSEABLE", 0.0)
    return make_judge(model_dir=env.get("QUARTET_JUDGE_MODEL") or None, url=env.get("QUARTET_JUDGE_URL") or None,
                      api_model=env.get("QUARTET_JUDGE_API_MODEL", "judge"), token=token, template=template,
                      max_score=_env_number("QUARTET_JUDGE_MAX_SCORE", 10.0), unparseable=unparseable,
                      max_new_tokens=int(_env_number("QUARTET_JUDGE_MAX_NEW_TOKENS", 32, int)),
                      timeout=_env_number("QUARTET_JUDGE_TIMEOUT", 60.0),
                      retries=int(_env_number("QUARTET_JUDGE_RETRIES", 3, int)),
                      max_concurrency=int(_env_number("QUARTET_JUDGE_MAX_CONCURRENCY", 4, int)))


_judges: dict[tuple[tuple[str, str], ...], Judge] = {}  # one judge (one loaded model) per configuration


def judge(prompts: Sequence[str], responses: Sequence[str], **columns: list[Any]) -> list[float | None]:
    """The configured judge's rewards: `models.reward_fn: quartet.scoring.judges:judge` (see the module docstring)."""
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("QUARTET_JUDGE_")))
    if key not in _judges:
        _judges[key] = judge_from_env()
    return _judges[key](list(prompts), list(responses), **columns)


