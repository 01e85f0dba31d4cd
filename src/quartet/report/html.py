"""A self-contained HTML report of a PPO run, a DPO run or a demo directory, written as a teaching view of RLHF.

Layouts: (A) an online-RL run directory (metrics.jsonl, samples.jsonl, summary.json, config.yaml);
(B) a demo directory with ppo/ laid out as (A), plus summary.json, comparison.jsonl, sft/ and reward/;
(C) a DPO run directory (summary.json with stage "dpo", metrics.jsonl, dpo_samples.jsonl, config.yaml).
Images are inlined as base64 data URIs and the CSS is inline: the file opens offline, with no JavaScript.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

from quartet.report.plots import (
    DPO_PLOTS,
    PPO_PLOTS,
    REWARD_PLOTS,
    SFT_PLOTS,
    PlotSpec,
    load_jsonl,
    reward_function_specs,
    run_stage,
    to_float,
    write_pngs,
)

TOKEN_COLUMNS = [("actor_logprob", "actor logprob"), ("ref_logprob", "ref logprob"), ("kl_penalty", "KL penalty"),
                 ("value", "value"), ("reward", "reward"), ("advantage", "advantage"), ("return", "return")]
MAX_COMPARISON_ROWS = 12
MAX_TOKENS = 200

CSS = """
body{margin:0;background:#f6f7f9;color:#1f2937;font:15px/1.55 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:32px 24px 64px}
h1{font-size:28px;margin:0 0 4px}h2{font-size:21px;margin:40px 0 8px;padding-bottom:6px;border-bottom:2px solid #e5e7eb}
h3{font-size:16px;margin:20px 0 6px}.sub{color:#6b7280;margin:0 0 20px}.note{color:#6b7280;font-style:italic}
.intro{background:#fff;border-left:4px solid #2563eb;padding:12px 16px;border-radius:6px}
.cards{display:flex;flex-wrap:wrap;gap:14px;margin:18px 0}
.card{flex:1 1 190px;background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
.card .label{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#6b7280}
.card .value{font-size:24px;font-weight:650;margin:4px 0}.card .hint{font-size:12.5px;color:#6b7280}
.up{color:#059669}.down{color:#dc2626}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(480px,100%),1fr));gap:18px}
figure{margin:0;background:#fff;border-radius:10px;padding:12px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
figure img{width:100%;height:auto;display:block}figcaption{font-size:13.5px;color:#4b5563;margin-top:6px}
table{border-collapse:collapse;background:#fff;font-size:13.5px;width:100%;box-shadow:0 1px 3px rgba(0,0,0,.08)}
th,td{padding:5px 9px;border-bottom:1px solid #eef0f3;text-align:left;vertical-align:top}
th{background:#f3f4f6;font-weight:600;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,Menlo,Consolas,monospace}
td.tok code{white-space:pre;background:#eef2ff;border-radius:3px;padding:0 3px}
tr.last td{border-top:2px solid #111827;font-weight:600}
.resp{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
.badge{display:inline-block;font-size:12px;padding:1px 7px;border-radius:9px;background:#e5e7eb;margin-right:4px}
.sample{background:#fff;border-radius:10px;padding:12px 16px;margin:16px 0;box-shadow:0 1px 3px rgba(0,0,0,.08)}
.scroll{max-height:560px;overflow:auto}dl.legend dt{font-weight:600;float:left;width:130px;clear:left}
dl.legend dd{margin:0 0 4px 140px;color:#374151}details{margin-top:12px}
pre.config{background:#111827;color:#e5e7eb;padding:14px;border-radius:8px;overflow:auto;font-size:12.5px}
"""

INTRO = ("RLHF with PPO juggles four models. The <b>actor</b> is the policy being trained (it starts as the SFT "
         "model). The <b>critic</b> predicts how much reward is still to come from each token. The frozen "
         "<b>reward model</b> scores finished answers; it was learned from human-style preferences, so it is only "
         "a <i>proxy</i> for what we want. The frozen <b>reference</b> is a copy of the SFT model: a KL penalty "
         "keeps the actor close to it, so the actor cannot wander off into text the reward model misjudges.")

LEGEND = [
    ("token", "one piece of text the actor generated, at position t."),
    ("actor logprob", "log π(a_t | s_t): how likely the actor (at rollout time) found this token. Always ≤ 0; "
                      "deeper red = less likely."),
    ("ref logprob", "log π_ref(a_t | s_t): the same under the frozen reference (SFT) model."),
    ("KL penalty", "−β·(log π − log π_ref): negative where the actor likes a token more than "
                   "the reference did."),
    ("value", "V_t: the critic's guess of the reward still to come from here."),
    ("reward", "r_t = −β·(log π − log π_ref), plus the reward model's score at the last token."),
    ("advantage", "A_t by GAE: δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t + γλ·A_{t+1}. Positive = this token did "
                  "better than the critic expected, so PPO makes it more likely."),
    ("return", "A_t + V_t (before any advantage whitening): the critic's training target."),
]

INTRO_CRITIC_FREE = ("This run trains the <b>actor</b> without a critic: it samples several answers per prompt "
                     "(a group) or whitens returns over the batch, and uses the other answers' scores as the baseline "
                     "an answer is compared with. The <b>score</b> comes from reward functions or a frozen reward "
                     "model; a frozen <b>reference</b> (the SFT model), when a KL term is set, keeps the actor close.")
ADVANTAGE_LEGEND = ("advantage", "A_t: how much better this answer did than its baseline (GRPO: the group's mean, "
                                 "divided by its std; RLOO: the other samples' mean; REINFORCE++: whitened returns). "
                                 "Positive = the update makes these tokens more likely.")


INTRO_DPO = ("DPO trains the <b>policy</b> on preference pairs directly, with no reward model and no sampling. "
             "A frozen <b>reference</b> (the SFT model it started from) sets the zero point: the <i>implicit "
             "reward</i> of an answer is β·(log π(answer) − log π_ref(answer)), summed over the answer's tokens. "
             "The loss raises the chosen answer's implicit reward above the rejected one's; β sets how far the "
             "policy may drift from the reference to do so.")
MAX_DPO_PAIRS = 8


def esc(value: Any) -> str:
    """HTML-escape any value (quotes included)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for display; '–' for missing or non-finite values."""
    x = to_float(value)
    if math.isnan(x):
        return "–"
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"


def cell_color(value: Any, max_abs: float) -> str:
    """Diverging background: red for negative, green for positive, alpha by |value| / column max."""
    x = to_float(value)
    if math.isnan(x) or max_abs <= 0 or x == 0:
        return ""
    alpha = 0.08 + 0.62 * min(abs(x) / max_abs, 1.0)
    rgb = "220,38,38" if x < 0 else "5,150,105"
    return f' style="background:rgba({rgb},{alpha:.2f})"'


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def card(label: str, value: str, hint: str = "", cls: str = "") -> str:
    return (f'<div class="card"><div class="label">{esc(label)}</div><div class="value {cls}">{esc(value)}</div>'
            f'<div class="hint">{esc(hint)}</div></div>')


def change_card(label: str, before: Any, after: Any, hint: str) -> str:
    a, b = to_float(before), to_float(after)
    if math.isnan(a) and math.isnan(b):
        return card(label, "–", hint)
    cls = "" if math.isnan(a) or math.isnan(b) or a == b else ("up" if b > a else "down")
    return card(label, f"{fmt(a)} → {fmt(b)}", hint, cls)


def figures(specs: Sequence[PlotSpec], pngs: dict[str, Path]) -> str:
    items = [f'<figure><img alt="{esc(s.title)}" src="{data_uri(pngs[s.name])}"><figcaption>{esc(s.caption)}'
             f'</figcaption></figure>' for s in specs if s.name in pngs]
    return f'<div class="grid">{"".join(items)}</div>' if items else ""


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def last_value(records: Sequence[dict[str, Any]], key: str) -> float:
    for record in reversed(records):
        x = to_float(record.get(key))
        if not math.isnan(x):
            return x
    return math.nan


def first_value(records: Sequence[dict[str, Any]], key: str) -> float:
    return last_value(list(reversed(records)), key)


def summary_cards(demo: bool, summary: dict[str, Any], metrics: list[dict[str, Any]]) -> str:
    if demo:
        seconds = summary.get("seconds") if isinstance(summary.get("seconds"), dict) else {}
        total = seconds.get("total", sum(to_float(v) for v in seconds.values()) if seconds else None)
        stages = ", ".join(f"{k} {fmt(v, 0)}s" for k, v in seconds.items() if k != "total")
        kl = summary.get("kl_final", last_value(metrics, "kl/ref"))
        acc = to_float(summary.get("rm_accuracy_gold"))
        cards = [
            change_card("Gold (hidden judge)", summary.get("gold_sft"), summary.get("gold_ppo"),
                        "SFT → PPO, mean on held-out requests"),
            change_card("Proxy (reward model)", summary.get("proxy_sft"), summary.get("proxy_ppo"),
                        "SFT → PPO, what PPO optimised"),
            *([change_card("Gold, DPO", summary.get("gold_sft"), summary.get("gold_dpo"),
                           "SFT → DPO on the same pairs, no reward model")] if "gold_dpo" in summary else []),
            card("Reward model vs gold", "–" if math.isnan(acc) else f"{100 * acc:.1f}%",
                 "pairs where the RM agrees with the gold judge"),
            card("Final KL", fmt(kl), "nats per response, actor ‖ reference"),
            card("Time", f"{fmt(total, 0)} s", stages),
        ]
    else:
        steps = summary.get("steps", metrics[-1].get("step") if metrics else None)
        seconds = summary.get("seconds")
        if seconds is None and metrics:
            seconds = sum(to_float(r.get("time/step")) for r in metrics if not math.isnan(to_float(r.get("time/step"))))
        cards = [
            change_card("Score (reward model)", summary.get("first/score/mean", first_value(metrics, "score/mean")),
                        summary.get("last/score/mean", last_value(metrics, "score/mean")), "first → last steps"),
            card("Final KL", fmt(summary.get("last/kl/ref", last_value(metrics, "kl/ref"))),
                 "nats per response, actor ‖ reference"),
            card("Steps", "–" if steps is None else str(steps), "RL steps"),
            card("Time", f"{fmt(seconds, 0)} s", "RL training"),
        ]
        if not math.isnan(last_value(metrics, "gold/mean")):
            cards.insert(1, change_card("Gold (hidden judge)", first_value(metrics, "gold/mean"),
                                        last_value(metrics, "gold/mean"), "first → last logged steps"))
    return f'<div class="cards">{"".join(cards)}</div>'


def comparison_table(rows: list[dict[str, Any]]) -> str:
    shown = rows[:MAX_COMPARISON_ROWS]
    actors = [(name, label) for name, label in (("sft", "SFT answer (before)"), ("ppo", "PPO answer (after)"),
                                                ("dpo", "DPO answer (same pairs)")) if shown and f"{name}_response" in shown[0]]

    def cell(r: dict[str, Any], name: str) -> str:
        return (f'<td><div class="resp">{esc(r.get(f"{name}_response", ""))}</div><span class="badge">gold '
                f'{fmt(r.get(f"{name}_gold"))}</span><span class="badge">proxy {fmt(r.get(f"{name}_proxy"))}</span></td>')

    body = "".join(f'<tr><td class="resp">{esc(r.get("prompt", ""))}</td>{"".join(cell(r, n) for n, _ in actors)}</tr>'
                   for r in shown)
    more = f"Showing {len(shown)} of {len(rows)} held-out requests." if len(rows) > len(shown) else ""
    head = "".join(f"<th>{esc(label)}</th>" for _, label in actors)
    return (f'<p>The same held-out requests answered by the SFT model (before PPO), the PPO actor (after) and, where '
            f'present, the DPO actor trained on the reward model\'s pairs. Gold is the hidden judge, proxy the reward '
            f'model. {esc(more)}</p><table><tr><th style="width:22%">request</th>{head}</tr>{body}</table>')


def pick_samples(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record from the first step present, then up to three from the last."""
    usable = [s for s in samples if isinstance(s.get("tokens"), list) and s["tokens"]]
    steps = sorted({s.get("step", 0) for s in usable}, key=to_float)
    if not steps:
        return []
    first = [s for s in usable if s.get("step", 0) == steps[0]][:1] if steps[0] != steps[-1] else []
    return first + [s for s in usable if s.get("step", 0) == steps[-1]][:3]


def token_table(sample: dict[str, Any]) -> str:
    """The per-token quantities of one sample (the columns it has: no value or return without a critic)."""
    tokens = sample["tokens"][:MAX_TOKENS]
    columns = [(k, label) for k, label in TOKEN_COLUMNS if k in sample]
    cols = {k: list(sample.get(k) or []) for k, _ in columns}
    max_abs = {k: max([abs(to_float(v)) for v in vals if not math.isnan(to_float(v))] or [0.0])
               for k, vals in cols.items()}
    action = sample.get("action")  # an episode: 1 on the policy's tokens, 0 on the environment's
    chosen = [i for i, a in enumerate(action) if a] if action else []
    last_chosen = chosen[-1] if chosen else len(sample["tokens"]) - 1
    rows = []
    for t, tok in enumerate(tokens):
        observed = bool(action) and not action[t]
        cells = "".join(
            '<td class="num"></td>' if observed else f'<td class="num"{cell_color(v, max_abs[k])}>{fmt(v)}</td>'
            for k, _ in columns for v in [cols[k][t] if t < len(cols[k]) else None])
        last = t == last_chosen
        mark = ' <span class="badge">+ score</span>' if last else ""
        shown = tok.replace("\n", "↵") if isinstance(tok, str) else str(tok)
        style = ' style="background:#eef2f7;color:#6b7280"' if observed else ""
        rows.append(f'<tr{" class=last" if last else ""}{style}><td class="num">{t}</td>'
                    f'<td class="tok"><code>{esc(shown)}</code>{mark}</td>{cells}</tr>')
    cut = note(f"Showing the first {MAX_TOKENS} of {len(sample['tokens'])} tokens.") \
        if len(sample["tokens"]) > MAX_TOKENS else ""
    if action:
        cut += note("Shaded rows are the environment's tokens (observations and the chat template's markers between "
                    "turns): the policy did not choose them, so they carry no log-prob, KL, reward or advantage.")
    head = "".join(f"<th>{esc(label)}</th>" for _, label in columns)
    return (f'<div class="sample"><h3>Step {esc(sample.get("step", "?"))} · score {fmt(sample.get("score"))}</h3>'
            f'<div class="resp" style="color:#6b7280">{esc(sample.get("prompt", ""))}</div>'
            f'<div class="resp"><b>{esc(sample.get("response", ""))}</b></div>{cut}'
            f'<div class="scroll"><table><tr><th>t</th><th>token</th>{head}</tr>{"".join(rows)}</table></div></div>')


def config_block(path: Path) -> str:
    if not path.is_file():
        return ""
    return (f'<details><summary>Configuration ({esc(path.name)})</summary>'
            f'<pre class="config">{esc(path.read_text(encoding="utf-8"))}</pre></details>')


def summary_block(summary: dict[str, Any]) -> str:
    plain = {k: v for k, v in summary.items() if k != "history"}
    if not plain:
        return ""
    return (f'<details><summary>Raw summary (summary.json)</summary>'
            f'<pre class="config">{esc(json.dumps(plain, indent=2, default=str))}</pre></details>')


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def dpo_cards(summary: dict[str, Any], metrics: list[dict[str, Any]]) -> str:
    def before_after(key: str) -> tuple[Any, Any]:
        return (summary.get(f"initial_eval/{key}", first_value(metrics, f"eval/{key}")),
                summary.get(f"eval/{key}", last_value(metrics, f"eval/{key}")))

    steps = summary.get("steps", metrics[-1].get("step") if metrics else None)
    cards = [change_card("Held-out accuracy", *before_after("rewards/accuracies"), "chosen reward > rejected (a tie: half), start → end"),
             change_card("Held-out margin", *before_after("rewards/margins"), "chosen − rejected implicit reward"),
             change_card("Held-out loss", *before_after("loss"), f"{summary.get('loss_type', 'sigmoid')} loss"),
             card("Steps", "–" if steps is None else str(steps), f"β = {fmt(summary.get('beta'))}"),
             card("Time", f"{fmt(summary.get('seconds'), 0)} s", "DPO training")]
    return f'<div class="cards">{"".join(cards)}</div>'


def dpo_pairs_table(rows: list[dict[str, Any]]) -> str:
    shown = rows[:MAX_DPO_PAIRS]
    body = "".join(
        f'<tr><td class="resp">{esc(r.get("prompt", ""))}</td>'
        f'<td><div class="resp">{esc(r.get("chosen", ""))}</div><span class="badge">reward '
        f'{fmt(r.get("chosen_reward"))}</span></td>'
        f'<td><div class="resp">{esc(r.get("rejected", ""))}</div><span class="badge">reward '
        f'{fmt(r.get("rejected_reward"))}</span></td>'
        f'<td class="num"{cell_color(r.get("margin"), max(abs(to_float(x.get("margin"))) for x in shown) or 1.0)}>'
        f'{fmt(r.get("margin"))}</td></tr>' for r in shown)
    return ('<p>Held-out pairs with the implicit rewards the trained policy gives their answers (β·log π/π_ref). '
            'A positive margin (green) means the policy now prefers the chosen answer, relative to the reference.</p>'
            '<table><tr><th style="width:26%">prompt</th><th>chosen</th><th>rejected</th><th>margin</th></tr>'
            f'{body}</table>')


def dpo_page(run_dir: Path, summary: dict[str, Any], pngs: dict[str, Path]) -> list[str]:
    """The parts of a DPO run's report."""
    metrics = load_jsonl(run_dir / "metrics.jsonl")
    parts = ["<h1>Quartet report · DPO run</h1>", f'<p class="sub">{esc(run_dir.resolve())}</p>',
             f'<p class="intro">{INTRO_DPO}</p>', "<h2>1. Summary</h2>", dpo_cards(summary, metrics)]
    if summary.get("reference"):
        parts.append(f"<p>Reference: {esc(summary['reference'])}.</p>")
    parts.append("<h2>2. Training curves</h2>")
    curves = figures(DPO_PLOTS, pngs)
    parts.append(("<p>Train values are the logged steps' batches; eval values the held-out pairs, at step 0 and "
                  "every eval_every steps.</p>" + curves) if curves else note("No DPO metrics (metrics.jsonl) found."))
    parts.append("<h2>3. Held-out pairs</h2>")
    rows = load_jsonl(run_dir / "dpo_samples.jsonl")
    parts.append(dpo_pairs_table(rows) if rows else note("No dpo_samples.jsonl found (a run without held-out pairs)."))
    parts.append("<h2>4. Configuration</h2>")
    parts.append((config_block(run_dir / "config.yaml") + summary_block(summary)) or note("No config.yaml found."))
    return parts


def render_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write a self-contained report.html (default: inside run_dir) and PNGs in run_dir/plots/.

    Returns the HTML path.
    """
    run_dir = Path(run_dir)
    if run_stage(run_dir) == "dpo":
        return _write_page(run_dir, dpo_page(run_dir, read_json(run_dir / "summary.json"), write_pngs(run_dir)), output)
    demo = (run_dir / "ppo" / "metrics.jsonl").is_file()
    ppo_dir = run_dir / "ppo" if demo else run_dir
    metrics = load_jsonl(ppo_dir / "metrics.jsonl")
    samples = load_jsonl(ppo_dir / "samples.jsonl")
    summary = read_json(run_dir / "summary.json")
    pngs = write_pngs(run_dir)
    algorithm = str(summary.get("stage", "ppo")) if not demo else "ppo"
    critic = any("value/mean" in r for r in metrics) or not metrics

    parts = [f"<h1>Quartet report · {'RLHF demo' if demo else esc(algorithm.upper()) + ' run'}</h1>",
             f'<p class="sub">{esc(run_dir.resolve())}</p>', f'<p class="intro">{INTRO if critic else INTRO_CRITIC_FREE}</p>',
             "<h2>1. Summary</h2>", summary_cards(demo, summary, metrics)]
    if not summary:
        parts.append(note("No summary.json found; numbers above come from metrics.jsonl where possible."))

    parts.append(f"<h2>2. {esc(algorithm.upper())} training curves</h2>")
    curves = figures(PPO_PLOTS + reward_function_specs(metrics), pngs)
    parts.append(("<p>Faint dots are the logged values at each step; the solid line is a moving average.</p>"
                  + curves) if curves else note("No PPO metrics (metrics.jsonl) found."))

    if demo:
        parts.append("<h2>3. Before PPO: SFT and the reward model</h2>")
        earlier = figures(SFT_PLOTS + REWARD_PLOTS, pngs)
        acc = to_float(summary.get("rm_accuracy_gold"))
        if not math.isnan(acc):
            parts.append(f"<p>On held-out pairs the reward model agrees with the hidden gold judge "
                         f"<b>{100 * acc:.1f}%</b> of the time. Every disagreement is a loophole PPO may find.</p>")
        parts.append(earlier or note("No SFT or reward-model metrics found."))

        parts.append("<h2>4. Sample answers before and after PPO</h2>")
        rows = load_jsonl(run_dir / "comparison.jsonl")
        parts.append(comparison_table(rows) if rows else note("No comparison.jsonl found."))

    n = 5 if demo else 3
    parts.append(f"<h2>{n}. Token by token: where the credit went</h2>")
    picked = pick_samples(samples)
    if picked:
        present = {label for key, label in TOKEN_COLUMNS if any(key in s for s in picked)}
        entries = [e if critic or e[0] != "advantage" else ADVANTAGE_LEGEND for e in LEGEND]
        legend = "".join(f"<dt>{esc(a)}</dt><dd>{esc(b)}</dd>" for a, b in entries if a == "token" or a in present)
        parts.append("<p>A few rollouts, one per table (the first from the earliest sampled step, the rest from the "
                     "last). Cells are red when negative and green when positive, stronger by magnitude relative to "
                     "the column. The reward of the <b>last token</b> (bold row) includes the reward model's score, "
                     "so that is where most credit enters; GAE then carries it back to earlier tokens through the "
                     f"advantages.</p><dl class=\"legend\">{legend}</dl>")
        parts.extend(token_table(s) for s in picked)
    else:
        parts.append(note("No samples.jsonl with per-token records found."))

    parts.append(f"<h2>{n + 1}. Configuration</h2>")
    config = config_block(ppo_dir / "config.yaml") or config_block(run_dir / "config.yaml")
    parts.append((config + summary_block(summary)) or note("No config.yaml found."))

    return _write_page(run_dir, parts, output)


def _write_page(run_dir: Path, parts: list[str], output: str | Path | None) -> Path:
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>Quartet report · {esc(run_dir.name)}</title>'
            f'<style>{CSS}</style></head><body><main>{"".join(parts)}</main></body></html>\n')
    out = Path(output) if output is not None else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
