"""The arena's report and console table from a small made-up arena result: the table's values are the
runs' final judgements, one seed shows no spread (several show the sample sd), and the text says which
measurement the curves are and which the table is."""

import html as html_text
import json
import math
import re

import pytest

from quartet.arena import runner
from quartet.arena.report import render_arena_report
from quartet.arena.worlds import JUDGE_SAMPLES


def _run(algorithm: str, seed: int, ground_truth: float, curve_end: float, seconds: float) -> dict:
    """A run record as run_one writes it; its curve (the trainer's evaluation) ends elsewhere than its judgement."""
    return {"world": "arith", "seed": seed, "algorithm": algorithm, "ground_truth": ground_truth, "proxy": None,
            "kl": 0.5 + seed, "steps": 10, "seconds": seconds, "seconds_per_step": seconds / 10,
            "generated_tokens": 1000, "budget": 1000, "peak_rss_mib": 300.0,
            "curve": [{"tokens": 0, "seconds": 0.0, "ground_truth": 0.3, "proxy": None, "kl": 0.0},
                      {"tokens": 1000, "seconds": seconds, "ground_truth": curve_end, "proxy": None, "kl": 0.4}],
            "answers": [{"prompt": "Q: 1+2", "answer": "\\boxed{3}", "ground_truth": 1.0}]}


def _summary(seeds: int) -> dict:
    runs = [_run(a, s, gt + 0.1 * s, gt - 0.2, 30.0 + s) for s in range(seeds)
            for a, gt in (("grpo", 0.625), ("rloo", 0.5))]
    starts = [{"world": "arith", "seed": s, "preference_tokens": 1000, "sft_ground_truth": 0.45 + 0.02 * s,
               "sft_proxy": None, "sft_answers": []} for s in range(seeds)]
    return {"worlds": ["arith"], "algorithms": ["grpo", "rloo"], "seeds": seeds, "quick": False, "jobs": 1,
            "threads": 1, "budgets": {"arith": [1000] * seeds}, "runs": runs, "starts": starts,
            "table": runner._table(runs), "seconds": 100.0}


def _report(tmp_path, summary: dict) -> str:
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return html_text.unescape(render_arena_report(tmp_path).read_text())


def _sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_one_seed_shows_no_spread_and_the_table_is_the_final_judgement(tmp_path, capsys):
    summary = _summary(seeds=1)
    html = _report(tmp_path, summary)
    table = html[html.index("<table>"):html.index("</table>")]
    assert "±" not in table and "one seed" in table and "mean ± sd" not in table
    cells = dict(re.findall(r"<tr><td>(\w+)</td><td class=\"num\"><b>([^<]*)</b>", table))
    assert cells == {"grpo": "0.625", "rloo": "0.500"}  # the runs' judgements, not their curves' ends (0.425, 0.300)
    assert "<td>SFT (the start)</td><td class=\"num\">0.450</td>" in table
    assert f"answers every held-out prompt {JUDGE_SAMPLES} times" in html and "trainer's own held-out evaluation" in html
    assert "seconds of training" in table and "stars: the final judgement of the table" in html
    runner.print_table(summary, tmp_path / "report.html")
    printed = capsys.readouterr().out
    assert "±" not in printed and "one seed" in printed
    lines = {line.split()[0]: line for line in printed.splitlines() if line.startswith("  ")}
    assert "ground truth +0.625  training 30 s" in lines["grpo"] and "ground truth +0.450" in lines["SFT"]


def test_several_seeds_show_mean_and_sample_sd(tmp_path, capsys):
    summary = _summary(seeds=3)
    html = _report(tmp_path, summary)
    table = html[html.index("<table>"):html.index("</table>")]
    grpo = [0.625 + 0.1 * s for s in range(3)]
    assert "mean ± sd over 3 seeds" in table
    assert f"<td>grpo</td><td class=\"num\"><b>{sum(grpo) / 3:.3f} ± {_sd(grpo):.3f}</b>" in table
    runner.print_table(summary, tmp_path / "report.html")
    printed = capsys.readouterr().out
    assert f"ground truth {sum(grpo) / 3:+.3f} ± {_sd(grpo):.3f}" in printed and "over 3 seeds" in printed


@pytest.mark.parametrize("algorithm", ["grpo", None])
def test_a_finished_task_s_line_names_its_training_seconds_beside_its_wall_time(tmp_path, algorithm):
    task = {"spec": "arith", "seed": 0, "directory": str(tmp_path), "algorithm": algorithm}
    record = runner._record(task)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(_run("grpo", 0, 0.625, 0.4, 31.6) if algorithm else {"sft_ground_truth": 0.45}))
    expected = " (training 32 s): ground truth +0.625" if algorithm else ": SFT ground truth +0.450"
    assert runner._result_line(task) == expected
