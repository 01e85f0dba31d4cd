"""`quartet serve reward` and the remote reward source, against real servers on loopback."""

import asyncio
import json
import math
import threading
import time
import types

import httpx
import pytest
import torch

from http_servers import serving
from quartet.cli import main
from quartet.config import RLConfig, build_config
from quartet.models.loading import load_scalar_model
from quartet.runs.faults import RewardServerDown
from quartet.scoring import RewardSource
from quartet.scoring.remote import RemoteRewards, checked_rewards
from quartet.serve.reward_server import ServerLimits, build_app, reward_model_scorer

PROMPTS = ["Question: what is two plus two?", "Human: how do I bake bread?", "Try Lotus Garden", "Once upon a time"]
RESPONSES = [" Answer: four.", " Assistant: mix flour, water, salt and yeast.", " near the station", " there was a robot"]


def _rollout(n):
    return types.SimpleNamespace(prompt_ids=torch.zeros(n, 1, dtype=torch.long))


def length_score(texts):
    """A deterministic stand-in for a reward model: a different number for every text."""
    return [len(t) / 10 + sum(map(ord, t)) % 7 for t in texts]


def test_served_scores_equal_the_in_process_reward_model(scalar_dir, tokenizer):
    model = load_scalar_model(scalar_dir, pad_token_id=tokenizer.pad_token_id, require_trained_head=True)
    in_process = RewardSource(model=model, tokenizer=tokenizer, same_tokenizer=False)
    expected, _ = in_process(_rollout(4), PROMPTS, RESPONSES)
    with serving(build_app(reward_model_scorer(scalar_dir), batch_size=3)) as server:
        remote = RewardSource(remote=RemoteRewards([server.url], request_size=2))
        assert remote.reads_text
        served, parts = remote(_rollout(4), PROMPTS, RESPONSES)
        # OpenRLHF's shape: query (prompt + response), prompts, labels; rewards and scores back
        answer = httpx.post(server.url + "/get_reward", json={"query": [p + r for p, r in zip(PROMPTS, RESPONSES)],
                                                              "prompts": PROMPTS, "labels": ["a", "b", "c", "d"]})
        health = httpx.get(server.url + "/health").json()
    assert parts == {} and served.shape == (4,)
    assert len(set(expected.tolist())) == 4  # the texts score differently: the order is checked too
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-5)
    body = answer.json()
    assert answer.status_code == 200 and body["rewards"] == body["scores"]
    torch.testing.assert_close(torch.tensor(body["rewards"]), expected, atol=1e-5, rtol=1e-5)
    assert health["status"] == "ok" and health["texts_scored"] == 8


def test_concurrent_clients_get_their_own_scores_in_order_from_shared_batches():
    batch_sizes = []

    def slow_score(texts):
        batch_sizes.append(len(texts))
        time.sleep(0.02)  # requests arriving meanwhile queue up and share the next batch
        return length_score(texts)

    clients, requests_each = 4, 5
    results, errors = {}, []
    with serving(build_app(slow_score, batch_size=8)) as server:
        def client(c):
            try:
                with httpx.Client(timeout=30) as http:
                    for m in range(requests_each):
                        texts = [f"client {c} request {m} text {i} " + "x" * (c + m + i) for i in range(1 + (c + m) % 4)]
                        results[c, m] = (texts, http.post(server.url + "/get_reward", json={"query": texts}).json())
            except Exception as err:  # noqa: BLE001 - reported by the assertion below
                errors.append(err)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors and len(results) == clients * requests_each
    for texts, body in results.values():
        assert body["rewards"] == pytest.approx(length_score(texts))
    assert max(batch_sizes) <= 8 and sum(batch_sizes) == sum(len(t) for t, _ in results.values())
    assert len(batch_sizes) < clients * requests_each  # requests were batched together


def test_a_request_larger_than_the_batch_is_split_and_comes_back_whole():
    with serving(build_app(length_score, batch_size=3)) as server:
        texts = [f"text number {i}" for i in range(10)]
        body = httpx.post(server.url + "/get_reward", json={"query": texts}).json()
        assert body["rewards"] == pytest.approx(length_score(texts))
        assert httpx.get(server.url + "/health").json()["batches"] == 4


def test_bad_requests_get_a_clear_4xx_and_nothing_is_scored():
    scored = []

    def score(texts):
        scored.extend(texts)
        return length_score(texts)

    app = build_app(score, batch_size=4, token="s3cret", limits=ServerLimits(max_texts=3, max_text_chars=50, max_body_bytes=4000))
    ok = {"Authorization": "Bearer s3cret"}
    with serving(app) as server, httpx.Client(base_url=server.url) as http:
        url = "/get_reward"
        assert http.post(url, json={"query": ["a"]}).status_code == 401
        assert http.post(url, json={"query": ["a"]}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/health").status_code == 401
        cases = [(http.post(url, content=b"{not json", headers=ok), 400, "not JSON"),
                 (http.post(url, json=["a"], headers=ok), 422, '"query"'),
                 (http.post(url, json={"query": "one text"}, headers=ok), 422, "list of strings"),
                 (http.post(url, json={"query": ["a", 3]}, headers=ok), 422, "list of strings"),
                 (http.post(url, json={"query": ["a", "b"], "prompts": ["a"]}, headers=ok), 422, "one entry per query"),
                 (http.post(url, json={"query": ["a"] * 4}, headers=ok), 413, "at most 3"),
                 (http.post(url, json={"query": ["y" * 51]}, headers=ok), 413, "at most 50"),
                 (http.post(url, content=b" " * 5000, headers=ok), 413, "limit of 4000")]
        for answer, status, words in cases:
            assert answer.status_code == status and words in answer.json()["error"], answer.text
        assert scored == []  # nothing of a refused request was scored
        good = http.post(url, json={"query": ["fine", "also fine"]}, headers=ok)  # and the server still serves
        assert good.status_code == 200 and good.json()["rewards"] == pytest.approx(length_score(["fine", "also fine"]))
        assert http.post(url, json={"query": []}, headers=ok).json() == {"rewards": [], "scores": []}


def test_the_serve_command_refuses_an_empty_token_file_before_loading_anything(tmp_path, capsys):
    (tmp_path / "token").write_text("  \n")
    assert main(["serve", "reward", "--model", str(tmp_path / "rm"), "--token-file", str(tmp_path / "token")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_a_scoring_error_is_a_500_for_its_request_and_the_server_goes_on():
    def score(texts):
        if "boom" in texts:
            raise RuntimeError("out of memory")
        return length_score(texts)

    with serving(build_app(score, batch_size=2)) as server:
        bad = httpx.post(server.url + "/get_reward", json={"query": ["boom"]})
        good = httpx.post(server.url + "/get_reward", json={"query": ["fine"]})
    assert bad.status_code == 500 and "out of memory" in bad.json()["error"]
    assert good.json()["rewards"] == pytest.approx(length_score(["fine"]))


# ----------------------------------------------------------------------------- the client's faults


def misbehaving_app(behaviour, calls):
    """A /get_reward server that answers the `calls`-th request (counted from 0) as `behaviour(n, body)` says."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    app = FastAPI()

    @app.post("/get_reward")
    async def get_reward(request: Request):
        body = await request.json()
        n = len(calls)
        calls.append(body)
        how = behaviour(n, body)
        good = length_score(body["query"])
        if how == "ok":
            return {"rewards": good, "scores": good}
        if how == "slow":
            await asyncio.sleep(1.5)
            return {"rewards": good, "scores": good}
        if how == "short":
            return {"rewards": good[:-1], "scores": good[:-1]}
        if how == "nan":
            return Response(json.dumps({"rewards": [math.nan] * len(good)}), media_type="application/json")
        if how == "string":
            return {"rewards": ["1.0"] * len(good)}
        if how == "html":
            return Response("<html>proxy error</html>", media_type="text/html")
        if how == "500":
            return JSONResponse({"error": "scoring failed"}, status_code=500)
        if how == "401":
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        raise AssertionError(how)

    return app


TEXTS = [f"row {i} " + "z" * i for i in range(5)]


@pytest.mark.parametrize("fault, words", [("slow", "no answer within 0.5 s"), ("short", "4 rewards for 5 queries"),
                                          ("nan", "reward 0 is nan, not a finite number"), ("string", "not a number"),
                                          ("html", "not JSON"), ("500", "HTTP 500")])
def test_a_bad_answer_is_retried_and_a_lasting_one_stops_with_the_url_and_the_error(fault, words):
    calls = []
    with serving(misbehaving_app(lambda n, body: fault if n == 0 else "ok", calls)) as server:
        client = RemoteRewards([server.url], timeout=0.5, retries=2, backoff=0.01)
        assert client(TEXTS, [""] * 5) == pytest.approx(length_score(TEXTS))  # the retry got a good answer
        assert client.retried == 1
        lasting = RemoteRewards([server.url], timeout=0.5, retries=2, backoff=0.01)
        calls.clear()
        with serving(misbehaving_app(lambda n, body: fault, calls)) as down:
            lasting.urls = [down.url + "/get_reward"]
            with pytest.raises(RewardServerDown) as err:
                lasting(TEXTS, [""] * 5)
    assert err.value.url == down.url + "/get_reward" and words in str(err.value) and "(tried 3 times)" in str(err.value)
    assert len(calls) == 3


def test_a_wrong_token_is_not_retried_and_names_the_server():
    calls = []
    with serving(misbehaving_app(lambda n, body: "401", calls)) as server:
        with pytest.raises(RewardServerDown, match=r"reward server http://127\.0\.0\.1:\d+/get_reward failed: HTTP 401.*models.reward_token_file"):
            RemoteRewards([server.url], retries=3, backoff=0.01)(TEXTS, [""] * 5)
    assert len(calls) == 1


def test_requests_are_split_spread_over_the_servers_and_bounded_in_flight():
    in_flight, most = [0], [0]
    calls_a, calls_b = [], []

    def app(calls):
        from fastapi import FastAPI, Request

        server = FastAPI()

        @server.post("/get_reward")
        async def get_reward(request: Request):
            body = await request.json()
            calls.append(body)
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            await asyncio.sleep(0.05)
            in_flight[0] -= 1
            return {"rewards": length_score(body["query"])}
        return server

    prompts = [f"prompt {i}:" for i in range(23)]
    responses = [f" answer {i}" for i in range(23)]
    with serving(app(calls_a)) as a, serving(app(calls_b)) as b:
        client = RemoteRewards([a.url, b.url + "/"], max_concurrency=2, request_size=4)
        scores = client(prompts, responses, labels=list(range(23)))
    assert scores == pytest.approx(length_score([p + r for p, r in zip(prompts, responses)]))
    assert len(calls_a) == 3 and len(calls_b) == 3  # 6 requests of at most 4, alternating
    assert all(len(c["query"]) <= 4 and c["prompts"] == [q.split(" answer")[0] for q in c["query"]]
               for c in calls_a + calls_b)
    assert sorted(x for c in calls_a + calls_b for x in c["labels"]) == list(range(23))
    assert most[0] <= 2  # the two servers share one event loop here: at most 2 requests in flight at once


def test_checked_rewards_refuses_what_is_not_one_finite_number_per_query():
    assert checked_rewards({"rewards": [1, 2.5]}, 2) == [1.0, 2.5]
    for bad in ({"rewards": [1.0]}, {"rewards": [True, 1.0]}, {"rewards": [None, 1.0]}, {"rewards": [math.inf, 1.0]},
                {"scores": [1.0, 2.0]}, [1.0, 2.0], {"rewards": "1, 2"}):
        with pytest.raises(ValueError):
            checked_rewards(bad, 2)


def test_the_rl_config_takes_reward_urls_instead_of_a_reward_model(lm_dir):
    cfg = build_config(RLConfig, {"models": {"actor": str(lm_dir), "reward_url": "http://a:1, http://b:2/"},
                                  "data": {"train": "x.jsonl"}})
    assert cfg.models.reward_urls == ["http://a:1", "http://b:2/"]
    assert cfg.models.critic_init == "actor"  # no reward model to start the critic from
    with pytest.raises(ValueError, match="not reward and reward_url"):
        build_config(RLConfig, {"models": {"actor": str(lm_dir), "reward": "rm", "reward_url": "http://a:1"}})
    with pytest.raises(ValueError, match="models.reward_url"):
        build_config(RLConfig, {"models": {"actor": str(lm_dir)}})


def test_the_benchmark_serves_from_its_own_process_and_counts_every_text():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reward_server.py"
    spec = importlib.util.spec_from_file_location("reward_server_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    result = bench.main(["--clients", "2", "--requests", "3", "--texts", "2", "--words", "6", "--batch-size", "4"])
    assert result["texts_scored"] == 2 * 3 * 2 + 2 * 2  # the measured requests and the warm-up's
    assert result["texts_per_second"] > 0 and 0 < result["latency_p50_ms"] <= result["latency_p99_ms"]
    assert result["server_batches"] <= result["texts_scored"]


def test_the_client_sends_the_token_file_s_token_and_without_it_is_refused_by_name(tmp_path, lm_dir):
    from quartet.scoring.sources import build_reward_source

    (tmp_path / "token").write_text("s3cret\n")
    with serving(build_app(length_score, batch_size=4, token="s3cret")) as server:
        models = {"actor": str(lm_dir), "reward_url": server.url, "reward_retries": 0}
        cfg = build_config(RLConfig, {"models": {**models, "reward_token_file": str(tmp_path / "token")},
                                      "data": {"train": "x.jsonl"}})
        source, stats = build_reward_source(cfg.models, None, None)
        scores, _ = source(_rollout(2), ["a", "b"], ["c", "dd"])
        assert stats is None and scores.tolist() == pytest.approx(length_score(["ac", "bdd"]))
        cfg = build_config(RLConfig, {"models": models, "data": {"train": "x.jsonl"}})
        with pytest.raises(RewardServerDown, match="HTTP 401.*models.reward_token_file"):
            build_reward_source(cfg.models, None, None)[0](_rollout(2), ["a", "b"], ["c", "dd"])
