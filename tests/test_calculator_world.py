"""The calculator world: a safe calculator tool, questions a tiny model cannot answer in its head, a
careless teacher's traces in the tool-call format, a held-out split disjoint by construction; and end to
end, SFT then GRPO raising held-out exact-match accuracy and the tool-call rate."""

import json
from fractions import Fraction

import pytest

from quartet.arena import calculator as calc
from quartet.envs import ToolBox, parse_tool_calls, tool_schema
from quartet.scoring.verifiers import final_number_answer


@pytest.mark.parametrize("expression, value", [
    ("347 * 28", 9716), ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("7 / 2", Fraction(7, 2)), ("-4 - -6", 2),
    ("+5", 5), ("2.5 * 4", 10), ("10 / 4 * 2", 5), (" 12 ", 12),
])
def test_safe_evaluate_matches_plain_arithmetic(expression, value):
    assert calc.safe_evaluate(expression) == value


def test_calculate_formats_integers_and_decimals():
    assert calc.calculate("347 * 28") == "9716"
    assert calc.calculate("1 / 3") == "0.333333"
    assert calc.calculate("7 / 2") == "3.5"
    assert calc.calculate("-1 / 3") == "-0.333333"


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')", "x + 1", "2 ** 10", "abs(-1)", "[1, 2]", "1 if 1 else 2", "'a' * 3",
    "1 < 2", "(1).real", "True + 1", "2 // 3", "7 % 2", "", "1 +",
])
def test_anything_but_numbers_and_the_four_operations_is_refused(expression):
    with pytest.raises(calc.CalculatorError):
        calc.safe_evaluate(expression)


def test_sizes_are_bounded():
    with pytest.raises(calc.CalculatorError, match="characters"):
        calc.safe_evaluate("1+" * 150 + "1")
    with pytest.raises(calc.CalculatorError, match="parts"):
        calc.safe_evaluate("+".join(["1"] * 40))
    with pytest.raises(calc.CalculatorError, match="larger"):
        calc.safe_evaluate("99999999999 * 99999999999 * 99999999999")
    with pytest.raises(ZeroDivisionError):
        calc.safe_evaluate("1 / (2 - 2)")


def test_the_tool_runs_in_a_toolbox_and_its_errors_reach_the_model():
    import asyncio

    schema = tool_schema(calc.calculate)
    assert schema["function"]["name"] == "calculate"
    assert schema["function"]["parameters"]["properties"]["expression"]["type"] == "string"
    box = ToolBox([calc.calculate], tool_timeout=5.0)
    calls = parse_tool_calls('<tool_call>{"name": "calculate", "arguments": {"expression": "12 * 3"}}</tool_call>'
                             '<tool_call>{"name": "calculate", "arguments": {"expression": "x"}}</tool_call>',
                             box.tools)
    answers = asyncio.run(box.run_all(calls))
    assert answers[0] == "36" and answers[1].startswith("error: calculate raised CalculatorError")
    assert box.stats.calls == {"calculate": 2} and box.stats.errors == {"calculate": 1}


def test_questions_are_deterministic_and_their_answers_right():
    a, b = calc.questions(50, 1), calc.questions(50, 1)
    assert a == b and a != calc.questions(50, 2)
    for q in a:
        assert 100 <= q.a <= 999 and 10 <= q.b <= 99
        assert q.answer == q.a * q.b and str(q.a) in q.text and str(q.b) in q.text
        assert calc.calculate(q.expression) == str(q.answer)


def test_held_out_operand_pairs_are_disjoint_from_training_ones():
    train = {(q.a, q.b) for seed in (calc.SEED_SFT, calc.SEED_RL) for q in calc.questions(3000, seed)}
    held = {(q.a, q.b) for q in calc.questions(500, calc.SEED_EVAL, held_out=True)}
    assert held and not train & held
    assert all(calc.is_held_out(a, b) for a, b in held) and not any(calc.is_held_out(a, b) for a, b in train)
    share = sum(calc.is_held_out(a, b) for a in range(100, 1000) for b in range(10, 100)) / (900 * 90)
    assert 0.17 < share < 0.23


def test_the_careless_teacher_calls_the_tool_skips_it_and_miscopies_at_its_rates():
    rows = calc.teacher_rows(2000, 3, p_skip=0.3, p_miscopy=0.2)
    qs = calc.questions(2000, 3)
    skipped = miscopied = right = 0
    for row, q in zip(rows, qs):
        m = row["messages"]
        assert m[0] == {"role": "user", "content": q.text} and m[-1]["role"] == "assistant"
        answer_right = final_number_answer([""], [m[-1]["content"]], answer=[str(q.answer)])[0] == 1.0
        right += answer_right
        if len(m) == 2:  # a guess, of the answer's size, never right
            skipped += 1
            assert not answer_right and len(m[1]["content"]) == len(str(q.answer))
            continue
        assert [x["role"] for x in m] == ["user", "assistant", "tool", "assistant"]
        (call,) = parse_tool_calls(m[1]["content"], ["calculate"])
        expression = call.arguments["expression"]
        assert m[2]["content"] == calc.calculate(expression) == m[3]["content"]  # the answer copies the result
        a, b = (int(x) for x in expression.split(" * "))
        if (a, b) != (q.a, q.b):
            miscopied += 1
            assert (a == q.a) != (b == q.b) and not answer_right  # one operand, one digit off
            wrong = str(a) if a != q.a else str(b)
            want = str(q.a) if a != q.a else str(q.b)
            assert len(wrong) == len(want) and sum(x != y for x, y in zip(wrong, want)) == 1
        else:
            assert answer_right
    assert abs(skipped / 2000 - 0.3) < 0.04 and abs(miscopied / (2000 - skipped) - 0.2) < 0.04
    assert right == 2000 - skipped - miscopied


def test_question_rows_carry_the_answer_for_the_verifier():
    rows = calc.question_rows(5, 9, held_out=True)
    for row, q in zip(rows, calc.questions(5, 9, held_out=True)):
        assert row == {"prompt": [{"role": "user", "content": q.text}], "answer": str(q.answer)}
    json.dumps(rows)  # they go to a JSONL file
    assert calc.used_tool([{"role": "assistant", "content": "1"}, {"role": "tool", "content": "2"}])
    assert not calc.used_tool([{"role": "assistant", "content": "1"}])



# ---------------------------------------------------------------- end to end

# The test's start: the nano preset, 600 SFT steps. Measured (seed 0, 64 held-out questions x 4 episodes at
# temperature 1): the start answers 0.375 right and calls the tool 0.64 of the time; GRPO on 25,000 model tokens
# (12 steps) raised them to 0.64 and 0.93 (the world's tiny start of 700 steps: 0.45 / 0.68 -> 0.75 / 0.96).
E2E = calc.CalculatorSettings(preset="nano", sft_steps=600, sft_lr=5e-3, n_eval=64)
BUDGET = 25_000


def test_grpo_raises_held_out_accuracy_and_the_tool_call_rate(tmp_path):
    from quartet.arena.runner import TEST
    from quartet.arena.worlds import CalculatorWorld
    from quartet.runs.metrics import read_metrics
    from quartet.stages.rl import run_rl

    world = CalculatorWorld(tmp_path, 0, TEST)
    world.settings = E2E
    world.prepare(resume=False)
    start = world.judge(world.sft_dir)
    summary = run_rl(world.rl_config("grpo", tmp_path / "grpo", BUDGET), reward_fn=world.reward_fn())
    end = world.judge(tmp_path / "grpo" / "final")
    assert BUDGET <= summary["generated_tokens"] < BUDGET + 64 * 2 * E2E.max_new_tokens  # model tokens only
    assert end.ground_truth >= start.ground_truth + 0.12, (start, end)
    assert end.details["tool_call_rate"] >= start.details["tool_call_rate"] + 0.12, (start, end)
    # the trainer's own held-out evaluation runs episodes with the tool and counts that evaluation's calls
    evals = [r for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if "eval/tools/calculate/calls" in r]
    assert 0 < evals[0]["eval/tools/calculate/calls"] < evals[-1]["eval/tools/calculate/calls"] <= E2E.n_eval * 2
    assert evals[-1]["eval/accuracy/final_number_answer"] > evals[0]["eval/accuracy/final_number_answer"]
