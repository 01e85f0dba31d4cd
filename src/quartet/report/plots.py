"""PNG plots of a run's metrics: raw points with a moving-average line, one figure per topic.

`write_pngs(run_dir)` writes every plot it has data for into run_dir/plots/ and returns their paths.
The `PlotSpec` lists below also carry the plain-words captions the HTML report shows under each plot.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2"]


@dataclass(frozen=True)
class PlotSpec:
    """One figure: which metric keys to draw (with legend labels) and what it teaches."""

    name: str
    title: str
    keys: tuple[str, ...]
    labels: tuple[str, ...]
    caption: str
    ylabel: str = ""


PPO_PLOTS: list[PlotSpec] = [
    PlotSpec("reward", "Reward: proxy vs gold", ("score/mean", "gold/mean"),
             ("proxy (reward model)", "gold (hidden judge)"),
             "Proxy = the reward model's score, the number PPO maximises; gold = the hidden true judge, which PPO "
             "never sees. Both rising means real improvement; when proxy rises while gold falls, the policy is "
             "gaming the reward model (reward hacking).", "mean score"),
    PlotSpec("kl", "KL to the reference model", ("kl/ref",), ("KL(actor ‖ reference)",),
             "How far the actor has drifted from the frozen SFT copy, in nats per response. The KL penalty keeps "
             "this small; a steep climb usually comes with odd, over-optimised text.", "nats"),
    PlotSpec("total_reward", "What PPO actually maximises", ("reward/total", "score/mean"),
             ("total reward = score − β·KL", "score"),
             "The sum of per-token rewards: the reward model's score minus the KL penalty. The gap between the "
             "two lines is the price paid for drifting from the reference.", "per response"),
    PlotSpec("beta", "KL coefficient β", ("kl/beta",), ("β",),
             "The weight of the KL penalty. An adaptive controller raises β when KL overshoots its target and "
             "lowers it when KL is below; a fixed β stays flat.", "β"),
    PlotSpec("length", "Response length", ("response/length",), ("tokens",),
             "Mean tokens per response. Sudden growth or collapse is a classic sign the policy found a "
             "shortcut in the reward model (e.g. longer always scores higher).", "tokens"),
    PlotSpec("losses", "Losses", ("loss/policy", "loss/value"), ("policy (clipped surrogate)", "value (critic)"),
             "The policy loss is the negated clipped PPO objective, so it hovers near zero and is not a progress "
             "meter; the value loss should fall as the critic learns to predict returns.", "loss"),
    PlotSpec("entropy", "Policy entropy", ("policy/entropy",), ("entropy",),
             "How spread out the actor's next-token distribution is. It usually drifts down as the policy "
             "becomes confident; a crash to ~0 means it stopped exploring.", "nats / token"),
    PlotSpec("clipping", "Clipping and step size", ("policy/clipfrac", "value/clipfrac", "policy/approx_kl"),
             ("policy clip fraction", "value clip fraction", "approx KL (old → new)"),
             "The fraction of tokens where the PPO ratio (or the value change) hit the clip range, and the KL "
             "between the policy before and after an update. Large values mean updates are too aggressive.", ""),
    PlotSpec("critic", "Critic: values vs returns", ("value/mean", "return/mean"), ("value V_t", "return"),
             "The critic's predictions next to the returns it is trained to predict (mean over tokens).", ""),
    PlotSpec("explained_variance", "Critic fit (explained variance)", ("value/explained_variance",),
             ("explained variance",),
             "1 = the critic predicts returns perfectly, 0 = no better than a constant, negative = worse. "
             "Advantages are only as good as this fit.", ""),
    PlotSpec("grad_norm", "Gradient norms", ("grad_norm/actor", "grad_norm/critic"), ("actor", "critic"),
             "Size of the gradients before clipping. Spikes point at unstable steps.", "norm"),
    PlotSpec("groups", "Groups without a learning signal", ("groups/no_signal",), ("share of groups",),
             "Group algorithms (GRPO, RLOO, REINFORCE++-baseline) learn from the differences between the samples of "
             "one prompt. A group whose samples all scored the same teaches nothing; when most groups are like "
             "that (all right or all wrong), learning stalls. DAPO's dynamic sampling replaces them.", "share"),
    PlotSpec("kl_loss", "KL loss term", ("loss/kl",), ("KL estimate (in the loss)",),
             "With the KL penalty as a loss term (GRPO's k3), the aggregated KL estimate that beta multiplies.", ""),
    PlotSpec("time", "Time per step", ("time/generation", "time/scoring", "time/training"),
             ("generation", "scoring (reward + reference + critic)", "training"),
             "Where each step's seconds go. Generation is sequential token by token, so it often dominates.",
             "seconds"),
]

SFT_PLOTS: list[PlotSpec] = [
    PlotSpec("sft_loss", "SFT loss", ("train/loss", "eval/loss"), ("train", "eval"),
             "Supervised fine-tuning teaches the format of an answer by next-token cross-entropy on "
             "demonstrations; eval loss rising while train falls means overfitting.", "loss"),
]

REWARD_PLOTS: list[PlotSpec] = [
    PlotSpec("rm_accuracy", "Reward model accuracy", ("train/accuracy", "eval/accuracy"), ("train", "eval"),
             "How often the reward model scores the labeller's chosen answer above the rejected one. 0.5 is "
             "chance; the labels are noisy, so 1.0 is not reachable on held-out pairs.", "accuracy"),
    PlotSpec("rm_loss", "Reward model loss", ("train/loss", "eval/loss"), ("train", "eval"),
             "Pairwise (Bradley–Terry) loss: −log σ(r_chosen − r_rejected).", "loss"),
]

DPO_PLOTS: list[PlotSpec] = [
    PlotSpec("dpo_margins", "Reward margin", ("train/rewards/margins", "eval/rewards/margins"), ("train", "eval"),
             "The implicit reward of an answer is β·(log π − log π_ref): how much more likely the policy makes it "
             "than the frozen reference does. The margin is chosen minus rejected, per pair; DPO pushes it up. It "
             "starts at 0, where the policy is the reference.", "margin"),
    PlotSpec("dpo_accuracies", "Preference accuracy", ("train/rewards/accuracies", "eval/rewards/accuracies"),
             ("train", "eval"),
             "The share of pairs whose chosen answer has the larger implicit reward, a tie counting as half. At step 0 "
             "every pair is a tie (0.5, chance); the held-out curve is the one that says whether the preference generalises.",
             "accuracy"),
    PlotSpec("dpo_loss", "DPO loss", ("train/loss", "eval/loss"), ("train", "eval"),
             "−log σ(margin) for the sigmoid loss (log 2 ≈ 0.693 at the start); the other loss types "
             "(IPO, hinge, robust) have their own scale.", "loss"),
    PlotSpec("dpo_rewards", "Implicit rewards of chosen and rejected answers",
             ("train/rewards/chosen", "train/rewards/rejected", "eval/rewards/chosen", "eval/rewards/rejected"),
             ("train chosen", "train rejected", "eval chosen", "eval rejected"),
             "Both can fall: DPO only asks the chosen answer to gain on the rejected one. A chosen reward that "
             "sinks far below 0 means the policy is making even the preferred answers less likely.", "reward"),
    PlotSpec("dpo_logps", "Log-probabilities of the answers", ("train/logps/chosen", "train/logps/rejected"),
             ("chosen", "rejected"),
             "The policy's summed log-probability of each answer (answer tokens only), mean over pairs.", "log-prob"),
]


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; missing file -> [], unreadable lines (e.g. a torn last line) skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def to_float(value: Any) -> float:
    """A finite float, or NaN for anything else ("nan", "inf", None, text, bool)."""
    if isinstance(value, bool):
        return math.nan
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def series(records: Sequence[dict[str, Any]], key: str, x_key: str = "step") -> tuple[list[float], list[float]]:
    """(steps, values) of the records where `key` is a finite number (x defaults to the record index)."""
    xs, ys = [], []
    for i, record in enumerate(records):
        y = to_float(record.get(key))
        if not math.isnan(y):
            x = to_float(record.get(x_key, i))
            xs.append(i if math.isnan(x) else x)
            ys.append(y)
    return xs, ys


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (shorter window at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(records: Sequence[dict[str, Any]], keys: Sequence[str], path: str | Path, title: str,
                labels: Sequence[str] | None = None, ylabel: str = "") -> Path | None:
    """Plot each key over steps (faint raw points + moving average) to a PNG; None if no key has data."""
    labels = list(labels or keys)
    drawn = [(k, lab, *series(records, k)) for k, lab in zip(keys, labels)]
    drawn = [d for d in drawn if d[2]]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.3), dpi=100)
    for i, (_, label, xs, ys) in enumerate(drawn):
        color = COLORS[i % len(COLORS)]
        if len(ys) >= 8:
            ax.plot(xs, ys, "o", color=color, alpha=0.25, markersize=3, linewidth=0)
            ax.plot(xs, moving_average(ys, max(2, len(ys) // 10)), color=color, linewidth=2, label=label)
        else:
            ax.plot(xs, ys, "o-", color=color, linewidth=1.8, markersize=4, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return finish_figure(fig, ax, path, title, "step", ylabel)


def finish_figure(fig, ax, path: str | Path, title: str, xlabel: str, ylabel: str | None) -> Path:
    """The reports' one figure style (title, labels, light grid, no top/right spines, legend), saved as PNG."""
    ax.set_title(title, fontsize=11, loc="left", fontweight="bold")
    ax.set_xlabel(xlabel, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.25)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def plot_specs(records: Sequence[dict[str, Any]], specs: Sequence[PlotSpec], out_dir: Path) -> dict[str, Path]:
    """Draw every spec that has data; returns name -> PNG path."""
    paths = {}
    for spec in specs:
        path = plot_curves(records, spec.keys, out_dir / f"{spec.name}.png", spec.title, spec.labels, spec.ylabel)
        if path is not None:
            paths[spec.name] = path
    return paths


def reward_function_specs(records: Sequence[dict[str, Any]]) -> list[PlotSpec]:
    """One plot of every reward function's mean score and one of every verifier's accuracy, when logged."""
    keys = sorted({k for r in records for k in r})
    means = tuple(k for k in keys if k.startswith("reward/") and k.endswith("/mean"))
    accuracies = tuple(k for k in keys if k.startswith("accuracy/"))
    specs = []
    if means:
        specs.append(PlotSpec("reward_functions", "Reward functions", means, tuple(k.split("/")[1] for k in means),
                              "Each reward function's mean over the rows it judged; the score is their weighted sum.",
                              "mean"))
    if accuracies:
        specs.append(PlotSpec("accuracy", "Accuracy (verifiers)", accuracies, tuple(k.split("/")[1] for k in accuracies),
                              "The share of sampled answers a verifier says are correct, on the training prompts.",
                              "accuracy"))
    return specs


def run_stage(run_dir: str | Path) -> str | None:
    """The stage named in a run directory's summary.json ('dpo', 'ppo', ...), None without one."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary.get("stage") if isinstance(summary, dict) else None


def write_pngs(run_dir: str | Path) -> dict[str, Path]:
    """Write all plots of a PPO run, DPO run or demo directory into run_dir/plots/; returns name -> PNG path."""
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    if run_stage(run_dir) == "dpo":
        return plot_specs(load_jsonl(run_dir / "metrics.jsonl"), DPO_PLOTS, out)
    demo = (run_dir / "ppo" / "metrics.jsonl").is_file()
    ppo_dir = run_dir / "ppo" if demo else run_dir
    records = load_jsonl(ppo_dir / "metrics.jsonl")
    paths = plot_specs(records, PPO_PLOTS + reward_function_specs(records), out)
    if demo:
        paths.update(plot_specs(load_jsonl(run_dir / "sft" / "metrics.jsonl"), SFT_PLOTS, out))
        paths.update(plot_specs(load_jsonl(run_dir / "reward" / "metrics.jsonl"), REWARD_PLOTS, out))
    return paths
