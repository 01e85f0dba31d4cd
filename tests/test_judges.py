"""Generative judges: the score read from a judge's reply, a local causal LM and an OpenAI-compatible
server on loopback as the judge, beside other reward functions with weights."""

import math
import types

import pytest
import torch

from http_servers import serving
from quartet.runs.faults import RewardServerDown
from quartet.scoring import RewardFunctions, RewardSource
from quartet.scoring.judges import Judge, judge, local_replies, make_judge, parse_score


@pytest.mark.parametrize("reply, score", [("Score: 7", 7.0), (" score = 8.5/10", 8.5), ("I'd say 3 out of 10", 3.0),
                                          ("SCORE:10 because 2 reasons", 10.0), ("Score: 11", None), ("Score: -1", None),
                                          ("no number here", None), ("", None)])
def test_the_score_is_read_after_the_word_score_else_the_first_number(reply, score):
    assert parse_score(reply, max_score=10) == score


def fake_openai_app(seen, fail_first=0):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append((body, request.headers.get("authorization")))
        if len(seen) <= fail_first:
            return JSONResponse({"error": "overloaded"}, status_code=503)
        text = body["messages"][0]["content"]
        reply = "Score: 9" if "four" in text else "I think 3/10" if "bread" in text else "hard to say"
        return {"choices": [{"message": {"role": "assistant", "content": reply}}]}
    return app


PROMPTS = ["What is two plus two?", "How do I bake bread?", "Name a fruit."]
RESPONSES = [" four", " mix flour and water", " a chair"]


def test_an_openai_compatible_judge_scores_parses_and_counts_what_it_cannot_read(capsys):
    seen = []
    with serving(fake_openai_app(seen, fail_first=1)) as server:
        judge_fn = make_judge(url=server.url + "/v1", api_model="grader", token="tok", unparseable=-1.0,
                              template="Q: {prompt}\nA: {response}\nGold: {answer}\nScore:", retries=2)
        scores = judge_fn(PROMPTS, RESPONSES, answer=["4", "bread", "apple"])
    assert scores == [0.9, 0.3, -1.0]  # the third reply has no score: the configured -1
    assert judge_fn.unparseable == 1 and judge_fn.judged == 3
    assert "1 of 3 replies had no score" in capsys.readouterr().err
    bodies = [b for b, _ in seen]
    assert len(bodies) == 4  # one per text, and one retry of the first that was refused
    assert all(auth == "Bearer tok" for _, auth in seen)
    assert {b["model"] for b in bodies} == {"grader"} and all(b["temperature"] == 0.0 for b in bodies)
    assert sorted(b["messages"][0]["content"] for b in bodies[1:]) == sorted(
        f"Q: {p}\nA: {r}\nGold: {a}\nScore:" for p, r, a in zip(PROMPTS, RESPONSES, ["4", "bread", "apple"]))


def test_an_endpoint_down_past_its_retries_stops_like_a_reward_server():
    seen = []
    with serving(fake_openai_app(seen, fail_first=100)) as server:
        judge_fn = make_judge(url=server.url + "/v1", retries=1)
        with pytest.raises(RewardServerDown, match=r"/v1/chat/completions failed: HTTP 503.*tried 2 times"):
            judge_fn(PROMPTS[:1], RESPONSES[:1])


def test_a_template_naming_a_missing_column_says_so():
    with pytest.raises(ValueError, match=r"names \{answer\}"):
        Judge(lambda texts: ["Score: 1"] * len(texts), template="{prompt} {answer}")(["p"], ["r"])


def test_a_local_judge_scores_beside_a_rule_reward_with_weights(lm_dir, monkeypatch):
    texts_seen = []
    replies = local_replies(lm_dir, max_new_tokens=6)

    def recording(texts):
        texts_seen.extend(texts)
        return replies(texts)

    local = Judge(recording, template="{prompt}{response} Score:", unparseable=0.25)

    def length_rule(prompts, responses):
        return [len(r) / 10 for r in responses]

    source = RewardSource(fn=RewardFunctions([local, length_rule], [0.5, 2.0]))
    rollout = types.SimpleNamespace(prompt_ids=torch.zeros(3, 1, dtype=torch.long))
    totals, parts = source(rollout, PROMPTS, RESPONSES)
    assert texts_seen == [f"{p}{r} Score:" for p, r in zip(PROMPTS, RESPONSES)]
    again = replies(texts_seen)  # greedy: the same replies again, read the same way
    expected_judge = [0.25 if parse_score(x, 10) is None else parse_score(x, 10) / 10 for x in again]
    assert parts["judge"].tolist() == pytest.approx(expected_judge)
    assert totals.tolist() == pytest.approx([0.5 * j + 2.0 * len(r) / 10 for j, r in zip(expected_judge, RESPONSES)])
    assert all(isinstance(x, str) for x in again) and local.judged == 3

    # the configured judge (environment variables), its rows left out when its replies carry no score
    monkeypatch.setenv("QUARTET_JUDGE_MODEL", str(lm_dir))
    monkeypatch.setenv("QUARTET_JUDGE_MAX_NEW_TOKENS", "6")
    monkeypatch.setenv("QUARTET_JUDGE_UNPARSEABLE", "skip")
    from_env = judge(PROMPTS, RESPONSES)
    default_replies = local_replies(lm_dir, max_new_tokens=6)(
        [f"Rate how well the answer responds to the question, from 0 (useless) to 10 (perfect).\n"
         f"Question: {p}\nAnswer: {r}\nReply with 'Score: N'.\nScore:" for p, r in zip(PROMPTS, RESPONSES)])
    assert from_env == [None if parse_score(x, 10) is None else parse_score(x, 10) / 10 for x in default_replies]
    assert judge(PROMPTS, RESPONSES) == from_env  # loaded once, the same judge again
    scored = RewardFunctions([judge])(PROMPTS, RESPONSES, {})[1]["judge"]
    assert [math.isnan(v) for v in scored] == [v is None for v in from_env]


def test_a_judge_needs_exactly_one_of_a_model_and_a_url():
    with pytest.raises(ValueError, match="QUARTET_JUDGE_MODEL"):
        make_judge()
