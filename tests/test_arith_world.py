"""Tests for the arithmetic world (quartet.arena.arith): exact questions, worked answers, the verifier."""

import pytest

from quartet.arena.arith import (
    FULL,
    SEED_EVAL,
    SEED_RL,
    SEED_SFT,
    TEST,
    Question,
    accuracy,
    boxed_answer,
    eval_questions,
    evaluate,
    format_rate,
    is_held_out,
    overlap,
    pass_at_k,
    question_text,
    questions,
    render_prompt,
    rl_rows,
    score,
    sft_overrides,
    sft_rows,
    worked_answer,
)

LEVELS = [1, 2]


@pytest.mark.parametrize("level", LEVELS)
def test_determinism(level):
    assert questions(100, 3, level) == questions(100, 3, level)
    assert questions(100, 3, level) != questions(100, 4, level)
    assert sft_rows(50, 3, level, p_wrong=0.3) == sft_rows(50, 3, level, p_wrong=0.3)
    assert rl_rows(50, 3, level) == rl_rows(50, 3, level)
    assert eval_questions(50, level) == questions(50, SEED_EVAL, level, held_out=True)


@pytest.mark.parametrize("level", LEVELS)
def test_answers_are_right(level):
    lo, hi = {1: (2, 2), 2: (3, 4)}[level]
    for q in questions(500, 1, level, max_operand=20):
        assert q.level == level and lo <= len(q.numbers) <= hi and len(q.ops) == len(q.numbers) - 1
        assert all(0 <= b <= 20 for b in q.numbers)
        value = q.numbers[0]
        for op, b in zip(q.ops, q.numbers[1:]):
            value = value + b if op == "+" else value - b
            assert value >= 0  # no negative intermediate results
        assert q.answer == value == evaluate(q.numbers, q.ops)
        assert q.expression in q.text or q.expression.replace("+", "plus").replace("-", "minus") in q.text


def test_small_operands():
    assert all(max(q.numbers) <= 5 for q in questions(300, 2, max_operand=5))
    with pytest.raises(ValueError, match="level"):
        questions(1, 0, level=3)


def test_wording_variety():
    qs = questions(400, 5)
    frames = {q.text.replace(q.expression, "{e}") for q in qs}
    assert {"What is {e}?", "Compute {e}.", "{e} = ?"} <= frames
    assert any("plus" in q.text or "minus" in q.text for q in qs)
    assert len({q.text for q in qs}) > 300
    assert {op for q in qs for op in q.ops} == {"+", "-"}


@pytest.mark.parametrize("level", LEVELS)
def test_held_out_is_disjoint(level):
    sft = sft_rows(3000, SEED_SFT, level)
    rl = rl_rows(3000, SEED_RL, level)
    held_out = [render_prompt(q) for q in eval_questions(500, level)]
    assert not overlap(held_out, [r["prompt"] for r in sft])
    assert not overlap(held_out, [r["prompt"] for r in rl])
    assert all(is_held_out(question_text(p)) for p in held_out)
    assert not any(is_held_out(question_text(r["prompt"])) for r in sft + rl)
    # overlap does find shared questions, rendered or not
    shared = sft[0]["prompt"]
    assert overlap([shared], [question_text(shared)]) == {question_text(shared)}


def test_held_out_share():
    texts = {q.text for q in questions(3000, 9)} | {q.text for q in questions(800, 9, held_out=True)}
    assert 0.1 < sum(is_held_out(t) for t in texts) / len(texts) < 0.3


def test_prompt_and_worked_answer():
    q = Question(text="What is 7 + 5?", answer=12, numbers=(7, 5), ops=("+",))
    assert render_prompt(q) == "Q: What is 7 + 5?\nA:"
    assert worked_answer(q) == " 7 + 5 = \\boxed{12}"
    chain = Question(text="What is 3 + 9 - 4?", answer=8, numbers=(3, 9, 4), ops=("+", "-"))
    assert worked_answer(chain) == " 3 + 9 = 12, 12 - 4 = \\boxed{8}"
    assert worked_answer(chain, final=9) == " 3 + 9 = 12, 12 - 4 = \\boxed{9}"


@pytest.mark.parametrize("level", LEVELS)
def test_worked_answers_verify(level):
    qs = questions(300, 11, level)
    assert accuracy([worked_answer(q) for q in qs], [q.answer for q in qs]) == 1.0
    for q, row in zip(qs, sft_rows(300, 11, level)):  # same seed, same questions
        assert row == {"prompt": render_prompt(q), "completion": worked_answer(q)}
    for q, row in zip(qs, rl_rows(300, 11, level)):
        assert row == {"prompt": render_prompt(q), "answer": str(q.answer)}
        assert score(worked_answer(q), row["answer"]) == 1.0


def test_wrong_demonstrations():
    qs, rows = questions(2000, 4), sft_rows(2000, 4, p_wrong=0.3)
    assert [render_prompt(q) for q in qs] == [r["prompt"] for r in rows]
    got = [boxed_answer(r["completion"]) for r in rows]
    wrong = [g != q.answer for g, q in zip(got, qs)]
    assert 0.25 < sum(wrong) / len(wrong) < 0.35
    assert all(abs(g - q.answer) == 1 and g >= 0 for g, q, w in zip(got, qs, wrong) if w)
    assert format_rate([r["completion"] for r in rows]) == 1.0


def test_verifier():
    assert score(" 7 + 5 = \\boxed{12}", 12) == 1.0
    assert score(" 7 + 5 = \\boxed{12}", "12") == 1.0
    assert score(" 7 + 5 = \\boxed{13}", 12) == 0.0  # wrong
    assert score(" 7 + 5 = 12", 12) == 0.0  # no box
    assert score("", 12) == 0.0
    assert score(" 7 + 5 = \\boxed{12", 12) == 0.0  # cut off
    assert score("\\boxed{12} no, \\boxed{13}", 13) == 1.0  # the last box counts
    assert score("\\boxed{12} no, \\boxed{13}", 12) == 0.0
    assert score("= \\boxed{ 12 }", " 12 ") == 1.0  # spaces
    assert score("= \\boxed {12}", 12) == 1.0
    assert score("= \\boxed{-3}", -3) == 1.0 and score("= \\boxed{- 3}", -3) == 1.0
    assert score("= \\boxed{012}", 12) == 1.0  # as integers
    assert score("= \\boxed{twelve}", 12) == 0.0 and score("= \\boxed{12.5}", 12) == 0.0
    assert score("= \\boxed{1 2}", 12) == 0.0
    assert boxed_answer("no answer") is None and boxed_answer("\\boxed{}") is None


def test_rates():
    responses = ["\\boxed{1}", "\\boxed{2}", "2", "\\boxed{x}"]
    assert accuracy(responses, [1, 1, 2, 0]) == 0.25
    assert format_rate(responses) == 0.5
    groups = [["\\boxed{1}", "\\boxed{2}"], ["\\boxed{3}", "\\boxed{3}"], ["", "\\boxed{0}"]]
    assert pass_at_k(groups, [2, 4, "0"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy(responses, [1])


def test_settings():
    assert TEST.sft_steps <= FULL.sft_steps
    cfg = sft_overrides(FULL, "train.jsonl", "out/sft", seed=3)
    assert cfg["model"] == {"preset": FULL.preset, "vocab_size": FULL.vocab_size}
    assert cfg["train"]["max_steps"] == FULL.sft_steps and cfg["run"]["seed"] == 3


@pytest.mark.parametrize("name", ["TEST", "FULL", "CHAINS", "CARELESS_TEACHER"])
def test_worked_answers_fit_the_generation_and_length_limits_of_the_preset_tokenizer(name, tmp_path):
    """With the tokenizer the SFT warm-up trains (one token per digit), every demonstrated answer and its
    EOS fit in max_new_tokens, and prompt + answer in the warm-up's max_length: RL never cuts an answer short."""
    import json

    from quartet.arena import arith
    from quartet.config import SFTConfig, build_config
    from quartet.stages.common import resolve_tokenizer

    s = getattr(arith, name)
    rows = sft_rows(s.n_sft, SEED_SFT, s.level, s.max_operand, s.p_wrong)
    train = tmp_path / "sft.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config(SFTConfig, sft_overrides(s, str(train), str(tmp_path / "sft")))
    tokenizer = resolve_tokenizer(cfg.model, [train])  # the warm-up's own tokenizer
    assert len(tokenizer("407", add_special_tokens=False)["input_ids"]) == 3
    answers = [len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]  # + EOS
    prompts = [len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert max(answers) <= s.max_new_tokens
    assert max(p + a for p, a in zip(prompts, answers)) <= cfg.data.max_length
    assert max(prompts) <= cfg.data.max_prompt_length
