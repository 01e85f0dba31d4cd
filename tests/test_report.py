"""The HTML report: self-contained, escaped, with plots, token tables, and demo numbers."""

import html
import json
import re
from pathlib import Path

from quartet.report import plot_curves, render_report, write_pngs
from quartet.report.plots import moving_average, series

SECTIONS = ["Summary", "PPO training curves", "Token by token", "Configuration"]
DANGEROUS = 'Try <script>alert("x")</script> & "Lotus"'


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _metrics(n: int = 20, gold: bool = False) -> list[dict]:
    rows = []
    for step in range(1, n + 1):
        row = {"step": step, "score/mean": 0.1 * step, "score/std": 0.2, "reward/total": 0.08 * step,
               "kl/ref": 0.01 * step, "kl/beta": 0.1, "response/length": 10 + step % 3, "loss/policy": -0.01,
               "loss/value": 1.0 / step, "policy/entropy": 2.0 - 0.01 * step, "policy/clipfrac": 0.02,
               "value/explained_variance": 0.3, "time/step": 0.5, "time/generation": 0.3}
        if gold:
            row["gold/mean"] = 0.05 * step - 0.002 * step ** 2
        rows.append(row)
    rows[4]["kl/ref"] = "nan"
    rows[6]["loss/value"] = "inf"
    del rows[7]["score/mean"]
    return rows


def _sample(step: int, response: str, tokens: list[str], score: float) -> dict:
    n = len(tokens)
    kl = [-0.1 * (i % 3 - 1) for i in range(n)]
    reward = kl[:-1] + [kl[-1] + score]
    value = [0.1 * i for i in range(n)]
    adv = [r - v for r, v in zip(reward, value)]
    return {"step": step, "prompt": "Where should I eat? <cheap> & quick", "response": response, "score": score,
            "tokens": tokens, "actor_logprob": [-1.0 - 0.1 * i for i in range(n)],
            "ref_logprob": [-1.2] * n, "kl_penalty": kl, "value": value, "reward": reward, "advantage": adv,
            "return": [a + v for a, v in zip(adv, value)]}


def _ppo_run(root: Path, gold: bool = False) -> Path:
    _write_jsonl(root / "metrics.jsonl", _metrics(gold=gold))
    tokens = ["Try", " <script>", "alert", '("x")', "</script>", " &", ' "Lotus"']
    samples = [_sample(1, "Try Lotus", ["Try", " Lotus"], 0.2),
               _sample(20, DANGEROUS, tokens, 0.9), _sample(20, "Go to Pho Bay", ["Go", " to", " Pho", " Bay"], 0.5)]
    _write_jsonl(root / "samples.jsonl", samples)
    (root / "config.yaml").write_text("ppo:\n  steps: 20\n  beta: 0.1\n", encoding="utf-8")
    return root


def test_helpers(tmp_path):
    assert moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    xs, ys = series([{"step": 1, "a": 1}, {"step": 2, "a": "nan"}, {"step": 3}, {"step": 4, "a": 2}], "a")
    assert xs == [1, 4] and ys == [1, 2]
    assert plot_curves([{"step": 1}], ["missing"], tmp_path / "x.png", "nothing") is None
    path = plot_curves(_metrics(), ["score/mean", "kl/ref"], tmp_path / "p.png", "curves")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ppo_run_report(tmp_path):
    run = _ppo_run(tmp_path / "run")
    out = render_report(run)
    assert out == run / "report.html" and out.is_file()
    page = out.read_text(encoding="utf-8")
    for heading in SECTIONS:
        assert heading in page
    # self-contained: every image is an inlined PNG, nothing loads from a file or the network
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "http" not in page
    # data is escaped
    assert html.escape(DANGEROUS) in page
    # every token of the chosen (last-step) sample is in its table
    for token in ["Try", " <script>", "alert", '("x")', "</script>", " &", ' "Lotus"']:
        assert f"<code>{html.escape(token)}</code>" in page
    assert "<code>Try</code>" in page and "<code> Lotus</code>" in page  # first-step sample too
    assert "rgba(220,38,38" in page and "rgba(5,150,105" in page  # diverging cell colours
    assert "<details>" in page and "beta: 0.1" in page
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert {"reward.png", "kl.png", "losses.png", "entropy.png"} <= set(pngs)
    assert "critic.png" not in pngs  # value/mean and return/mean were never logged
    assert set(write_pngs(run)) == {p[:-4] for p in pngs}


def test_report_custom_output_and_empty_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = render_report(empty, tmp_path / "elsewhere" / "r.html")
    page = out.read_text(encoding="utf-8")
    assert out.is_file() and "No PPO metrics" in page and "No samples.jsonl" in page


def test_demo_report(tmp_path):
    demo = tmp_path / "demo"
    _ppo_run(demo / "ppo", gold=True)
    _write_jsonl(demo / "sft" / "metrics.jsonl", [{"step": s, "train/loss": 3.0 / s} for s in range(1, 11)]
                 + [{"step": 10, "eval/loss": 0.4}])
    _write_jsonl(demo / "reward" / "metrics.jsonl",
                 [{"step": s, "train/loss": 0.7 - 0.02 * s, "train/accuracy": 0.5 + 0.02 * s} for s in range(1, 11)])
    summary = {"gold_sft": 0.1234, "gold_ppo": 0.4567, "proxy_sft": -0.25, "proxy_ppo": 1.75,
               "rm_accuracy_gold": 0.8125, "kl_final": 2.3456,
               "seconds": {"sft": 10.0, "reward": 5.0, "ppo": 30.0, "total": 45.0}}
    (demo / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    rows = [{"prompt": "cheap noodles?", "sft_response": "Try Lotus.", "sft_gold": 0.1, "sft_proxy": 0.2,
             "ppo_response": "Lotus Garden & <b>Pho</b>", "ppo_gold": 0.7, "ppo_proxy": 1.9}]
    _write_jsonl(demo / "comparison.jsonl", rows)

    page = render_report(demo).read_text(encoding="utf-8")
    for text in ["0.123 → 0.457", "-0.250 → 1.750", "81.2%", "2.346", "45 s", "sft 10s", "ppo 30s"]:
        assert text in page, text
    for heading in SECTIONS + ["Before PPO", "Sample answers before and after PPO"]:
        assert heading in page
    assert "cheap noodles?" in page and "Try Lotus." in page and html.escape("Lotus Garden & <b>Pho</b>") in page
    assert "gold 0.700" in page and "proxy 1.900" in page
    names = {p.name for p in (demo / "plots").glob("*.png")}
    assert {"reward.png", "sft_loss.png", "rm_accuracy.png", "rm_loss.png"} <= names
