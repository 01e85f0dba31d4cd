"""`quartet arena` at test size: two algorithms in the arithmetic world from one start, the same token
budget, each in its own process, judged on held-out questions; the report and summary hold it all,
and an interrupted arena resumes without redoing finished runs."""

import json

import pytest

from quartet.arena.runner import TEST, run_arena
from quartet.arena.worlds import make_world


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    out = tmp_path_factory.mktemp("arena") / "arena"
    return out, run_arena(out, ["arith"], ["grpo", "dpo"], seeds=1, settings=TEST, jobs=2)


def test_every_algorithm_is_judged_from_one_start_on_one_budget(arena):
    out, summary = arena
    runs = {r["algorithm"]: r for r in summary["runs"]}
    budget = summary["starts"][0]["preference_tokens"]  # the SFT answers DPO's pairs were made of
    assert set(runs) == {"grpo", "dpo"} and summary["budgets"] == {"arith": [budget]} and budget > 2 * TEST.pair_prompts
    grpo, dpo = runs["grpo"], runs["dpo"]
    assert grpo["generated_tokens"] >= budget > grpo["generated_tokens"] - 64 * 16  # stopped on the same budget
    assert dpo["generated_tokens"] == budget
    for r in (grpo, dpo):
        assert 0.0 <= r["ground_truth"] <= 1.0 and r["peak_rss_mib"] > 50 and r["seconds"] > 0
        assert r["kl"] > 0  # every trained actor moved away from the SFT model, measured the same way for both
        assert r["answers"] and all("\\boxed" in a["answer"] or a["ground_truth"] == 0.0 for a in r["answers"])
        assert (out / "arith" / "seed-0" / r["algorithm"] / "final" / "model.safetensors").exists()
    curve = grpo["curve"]
    assert curve[0]["tokens"] == 0 and curve[-1]["tokens"] == grpo["generated_tokens"]  # before training, and the end
    start = summary["starts"][0]
    assert 0.3 < start["sft_ground_truth"] < 0.7  # the careless teacher's start
    table = {r["algorithm"]: r for r in summary["table"]}
    assert table["grpo"]["ground_truth"] == grpo["ground_truth"] and table["grpo"]["seeds"] == 1


def test_the_report_shows_the_table_the_curves_and_answers(arena):
    out, _ = arena
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 2 and "ground truth" in html and "SFT (the start)" in html
    assert "held-out answers" in html and "grpo" in html and "dpo" in html
    assert (out / "plots" / "arith" / "tokens.png").exists()


def test_a_finished_arena_is_kept_and_an_interrupted_one_resumes_the_rest(arena, tmp_path):
    out, summary = arena
    with pytest.raises(FileExistsError, match="already holds a finished arena"):
        run_arena(out, ["arith"], ["grpo", "dpo"], settings=TEST)
    # an arena stopped after its first run: the finished run is kept (not re-run), the rest are done
    import shutil

    copy = tmp_path / "arena"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("summary.json", "report.html", "dpo"))
    kept = (copy / "arith" / "seed-0" / "grpo" / "arena_run.json").read_text()
    with pytest.raises(FileExistsError, match="--resume"):
        run_arena(copy, ["arith"], ["grpo", "dpo"], settings=TEST)
    again = run_arena(copy, ["arith"], ["grpo", "dpo"], settings=TEST, resume=True, jobs=1)
    assert (copy / "arith" / "seed-0" / "grpo" / "arena_run.json").read_text() == kept
    a = {r["algorithm"]: r["ground_truth"] for r in summary["runs"]}
    b = {r["algorithm"]: r["ground_truth"] for r in again["runs"]}
    assert a == b  # same seed, same numbers (the DPO run redone from scratch, alone instead of beside GRPO)
    assert (copy / "arith" / "seed-0" / "dpo.log").read_text().count("[dpo]") >= 2  # its output in its own log


def test_bad_worlds_and_algorithms_are_named_before_anything_is_written(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown world 'moon'; choose town, arith, calculator, guess or reasoning_gym:NAME"):
        run_arena(tmp_path / "a", ["moon"], ["grpo"], settings=TEST)
    with pytest.raises(ValueError, match=r"unknown algorithm\(s\) \['ppoo'\]"):
        run_arena(tmp_path / "b", ["arith"], ["ppoo"], settings=TEST)
    import sys

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # as if the optional extra were not installed
    with pytest.raises(ValueError, match=r"pip install 'quartet-rlhf\[tasks\]'"):
        make_world("reasoning_gym:chain_sum", tmp_path / "c", 0, TEST)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_reasoning_gym_task_scores_with_its_own_verifier(tmp_path):
    from quartet.arena.worlds import reasoning_gym_score

    world = make_world("reasoning_gym:chain_sum", tmp_path, 0, TEST)
    rows = world.rows()
    question = rows.questions[0]
    entry = json.loads(question["entry"])
    right, wrong = f"It is \\boxed{{{entry['answer']}}}", "It is \\boxed{none}"
    assert reasoning_gym_score([question["prompt"]] * 2, [right, wrong], [question["entry"]] * 2) == [1.0, 0.0]
    assert rows.sft[0]["completion"].startswith(" \\boxed{") and question["prompt"].startswith("Q: ")
