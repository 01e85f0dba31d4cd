"""`quartet demo`: the whole pipeline on the restaurant town, judged by the hidden gold judge.

1. SFT on well-formed but quality-blind answers (a tokenizer and a tiny model from scratch);
2. preference pairs: two SFT answers per request, labelled by a simulated, noisy diner;
3. reward model on those pairs (its accuracy against gold labels is measured on held-out pairs);
4. PPO against the reward model, with the gold judge watching every step;
5. DPO (with RPO's NLL term on the chosen answer) on the same preference pairs (no reward model);
6. SFT, PPO and DPO actors compared on held-out requests, gold and proxy; report.html.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from quartet.config import DPOConfig, RewardConfig, RLConfig, SamplingConfig, SFTConfig, build_config
from quartet.demo import world
from quartet.models.loading import load_causal_lm, load_scalar_model
from quartet.models.tokenizer import load_tokenizer
from quartet.rollout.generate import generate_texts
from quartet.runs.progress import progress_bar

PROMPT_TEMPLATE = "Diner: {request}\nGuide:"
_PROMPT_RE = re.compile(r"Diner: (.*?)\nGuide:", re.S)
MIN_NEW_TOKENS = 3


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; `QUICK` is for tests and a first look, `FULL` the README's default."""

    n_restaurants: int = 16
    preset: str = "tiny"
    n_sft: int = 3000
    sft_epochs: float = 6.0
    sft_lr: float = 2e-3
    n_rm_prompts: int = 3000
    rm_epochs: float = 3.0
    n_rm_eval_prompts: int = 300
    ppo_steps: int = 150
    rollout_batch_size: int = 32
    mini_batch_size: int = 16
    ppo_epochs: int = 2
    actor_lr: float = 2e-5
    critic_lr: float = 1e-4
    beta: float = 0.05
    # DPO on the reward model's preference pairs (lr 3e-4, beta 0.1, 3 epochs), with RPO's NLL term on the
    # chosen answer: plain DPO pushed the chosen answers' log-probs down by 4 nats, and its gold gain over SFT
    # on the quick town swung with the CPU's kernels (seed 0: +0.52 AVX-512, -0.21 AVX2) and the seed; with
    # the NLL term it gained +0.37 to +0.59 on all five of those runs
    dpo_epochs: float = 3.0
    dpo_lr: float = 3e-4
    dpo_beta: float = 0.1
    dpo_rpo_alpha: float | None = 1.0
    n_eval_prompts: int = 500
    max_new_tokens: int = 24


FULL = DemoSettings()
QUICK = DemoSettings(n_sft=1500, n_rm_prompts=2000, rm_epochs=3.0, n_rm_eval_prompts=200,
                     ppo_steps=50, n_eval_prompts=200)


def render_prompt(request: world.Request) -> str:
    return PROMPT_TEMPLATE.format(request=request.text)


def request_text(prompt: str) -> str:
    """The diner's words inside a rendered (or decoded) prompt."""
    match = _PROMPT_RE.search(prompt)
    return match.group(1) if match else prompt


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def gold_metric(town: world.Town):
    """A PPO metric function: the hidden gold judge's mean over a step's rollouts."""

    def measure(prompts: list[str], responses: list[str]) -> dict[str, float]:
        golds = [world.gold_score(world.parse_request(request_text(p), town), r.strip(), town)
                 for p, r in zip(prompts, responses)]
        return {"gold/mean": sum(golds) / len(golds)}

    return measure


def _sampling(settings: DemoSettings) -> SamplingConfig:
    # at least a few tokens: an empty answer is not a recommendation (and not a valid preference row)
    return SamplingConfig(max_new_tokens=settings.max_new_tokens, min_new_tokens=MIN_NEW_TOKENS, temperature=1.0)


def _answers(model_dir: Path, prompts: list[str], settings: DemoSettings, seed: int,
             progress: Callable[[int], Any] | None = None) -> list[str]:
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).eval()
    return [r.strip() for r in generate_texts(model, tokenizer, prompts, _sampling(settings), seed=seed,
                                              progress=progress)]


def _preference_triples(sft_dir: Path, requests: list[world.Request], settings: DemoSettings, seed: int,
                        desc: str = "preference pairs"):
    """Two SFT answers to each request (seeds `seed` and `seed + 1`), with a progress bar over both."""
    prompts = [render_prompt(r) for r in requests]
    with progress_bar(2 * len(prompts), desc=desc) as bar:
        first = _answers(sft_dir, prompts, settings, seed, progress=bar.update)
        second = _answers(sft_dir, prompts, settings, seed + 1, progress=bar.update)
    return list(zip(requests, first, second))


def _preference_rows(labelled: list[dict]) -> list[dict]:
    """The labeller's rows in the prompt/completion layout the models were trained on."""
    return [{"prompt": PROMPT_TEMPLATE.format(request=row["prompt"]), "chosen": " " + row["chosen"],
             "rejected": " " + row["rejected"]} for row in labelled]


@dataclass
class TownStart:
    """What every algorithm in the town starts from: the SFT model, the preference pairs, the reward model."""

    town: world.Town
    sft_dir: Path
    preferences: Path
    reward_dir: Path
    prompts: Path  # online RL's prompt file
    rm_accuracy_gold: float
    rm_eval_pairs: int


def prepare_town(out: Path, settings: DemoSettings, seed: int, resume: bool, seconds: dict[str, float]) -> TownStart:
    """Generate the town, then SFT, preference pairs and the reward model (stages already finished in
    `out` are kept with `resume`); the reward model's agreement with the gold judge on held-out pairs."""
    from quartet.stages.reward import run_reward, score_texts
    from quartet.stages.sft import run_sft

    def finished(stage: str) -> bool:  # a stage writes summary.json last, after final/
        return resume and (out / stage / "summary.json").exists()
    torch.manual_seed(seed)
    town = world.Town.generate(seed, settings.n_restaurants)
    (out / "town.json").write_text(json.dumps(town.to_dict(), indent=1), encoding="utf-8")

    # 1. SFT: format, not taste
    t = time.perf_counter()
    sft_rows = [{"prompt": PROMPT_TEMPLATE.format(request=row["prompt"]), "completion": " " + row["completion"]}
                for row in world.sft_examples(town, settings.n_sft, world.SEED_SFT + seed)]
    sft_file = _write_jsonl(out / "data" / "sft.jsonl", sft_rows)
    sft_cfg = build_config(SFTConfig, {
        "run": {"output_dir": str(out / "sft"), "seed": seed},
        "model": {"preset": settings.preset, "vocab_size": 1024},
        "data": {"train": str(sft_file), "eval_fraction": 0.05, "max_length": 64, "max_prompt_length": 40},
        "train": {"lr": settings.sft_lr, "epochs": settings.sft_epochs, "batch_size": 32, "eval_every": 100, "log_every": 10,
                  "warmup_ratio": 0.05, "save_every": 100},
    })
    if not finished("sft"):
        run_sft(sft_cfg, resume=resume)
    sft_dir = out / "sft" / "final"
    seconds["sft"] = time.perf_counter() - t

    # 2. preferences from SFT answers, labelled by a noisy simulated diner
    t = time.perf_counter()
    rm_requests = world.prompts(town, settings.n_rm_prompts, world.SEED_RM + seed)
    labelled = world.label_pairs(_preference_triples(sft_dir, rm_requests, settings, seed), town, seed)
    pref_file = _write_jsonl(out / "data" / "preferences.jsonl", _preference_rows(labelled))
    seconds["preferences"] = time.perf_counter() - t

    # 3. reward model, initialised from the SFT model
    t = time.perf_counter()
    reward_cfg = build_config(RewardConfig, {
        "run": {"output_dir": str(out / "reward"), "seed": seed},
        "model": {"path": str(sft_dir)},
        "data": {"train": str(pref_file), "eval_fraction": 0.1, "max_length": 64, "max_prompt_length": 40},
        "train": {"lr": 3e-4, "epochs": settings.rm_epochs, "batch_size": 32, "eval_every": 50, "log_every": 10,
                  "save_every": 50},
    })
    if not finished("reward"):
        run_reward(reward_cfg, resume=resume)
    reward_dir = out / "reward" / "final"
    rm_tokenizer, rm_model = load_reward_model(reward_dir)
    eval_requests = world.prompts(town, settings.n_rm_eval_prompts, world.SEED_EVAL + 17 + seed)
    agree = total = 0
    for request, a, b in _preference_triples(sft_dir, eval_requests, settings, seed + 7, desc="reward model check"):
        gold_a, gold_b = world.gold_score(request, a, town), world.gold_score(request, b, town)
        if a.strip() == b.strip() or gold_a == gold_b:
            continue
        prompt = render_prompt(request)
        score_a, score_b = score_texts(rm_model, rm_tokenizer, [prompt + " " + a, prompt + " " + b])
        agree += (score_a > score_b) == (gold_a > gold_b)
        total += 1
    seconds["reward"] = time.perf_counter() - t
    ppo_requests = world.prompts(town, 2000, world.SEED_PPO + seed)
    prompt_file = _write_jsonl(out / "data" / "prompts.jsonl", [{"prompt": render_prompt(r)} for r in ppo_requests])
    return TownStart(town, sft_dir, pref_file, reward_dir, prompt_file, agree / max(total, 1), total)


def load_reward_model(reward_dir: Path):
    """The reward model's tokenizer and model, for scoring texts."""
    tokenizer = load_tokenizer(reward_dir)
    return tokenizer, load_scalar_model(reward_dir, pad_token_id=tokenizer.pad_token_id)


def town_rl_config(start: TownStart, output_dir: Path, settings: DemoSettings, seed: int, algorithm: str = "ppo",
                   **sections: dict[str, Any]) -> RLConfig:
    """The demo's online RL against the reward model: PPO with the demo's constants, or another
    algorithm with its preset's; `sections` add to it (held-out prompts, a budget...)."""
    data: dict[str, dict[str, Any]] = {
        "run": {"output_dir": str(output_dir), "seed": seed},
        "models": {"actor": str(start.sft_dir), "reward": str(start.reward_dir)},
        "data": {"train": str(start.prompts), "max_prompt_length": 40},
        "algorithm": {"name": algorithm},
        "rollout": {"max_new_tokens": settings.max_new_tokens, "min_new_tokens": MIN_NEW_TOKENS, "temperature": 1.0},
        "batch": {"rollout_batch_size": settings.rollout_batch_size, "mini_batch_size": settings.mini_batch_size},
        "optim": {"actor_lr": settings.actor_lr},
        "train": {"steps": settings.ppo_steps, "sample_every": max(1, settings.ppo_steps // 5), "n_samples": 3,
                  "save_every": 10},
    }
    if algorithm == "ppo":
        data["algorithm"]["beta"] = settings.beta
        data["batch"]["ppo_epochs"] = settings.ppo_epochs
        data["optim"]["critic_lr"] = settings.critic_lr
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return build_config(RLConfig, data)


def town_dpo_config(start: TownStart, output_dir: Path, settings: DemoSettings, seed: int) -> DPOConfig:
    """DPO, with RPO's NLL term, from the SFT model on the pairs the reward model learnt from."""
    return build_config(DPOConfig, {
        "run": {"output_dir": str(output_dir), "seed": seed},
        "model": {"path": str(start.sft_dir)},
        "data": {"train": str(start.preferences), "eval_fraction": 0.1, "max_length": 64, "max_prompt_length": 40},
        "train": {"lr": settings.dpo_lr, "epochs": settings.dpo_epochs, "batch_size": 32, "eval_every": 50,
                  "log_every": 10, "save_every": 50},
        "dpo": {"beta": settings.dpo_beta, "rpo_alpha": settings.dpo_rpo_alpha},
    })


def judge_actors(start: TownStart, actors: dict[str, Path], settings: DemoSettings, seed: int
                 ) -> tuple[list[world.Request], dict[str, dict[str, list]]]:
    """Each actor's answers to the held-out requests (the same sampling draws), their gold and proxy scores."""
    from quartet.stages.reward import score_texts

    held_out = world.prompts(start.town, settings.n_eval_prompts, world.SEED_EVAL + seed)
    prompts = [render_prompt(r) for r in held_out]
    rm_tokenizer, rm_model = load_reward_model(start.reward_dir)
    judged = {}
    with progress_bar(len(actors) * len(prompts), desc="held-out answers") as bar:
        for name, actor_dir in actors.items():
            answers = _answers(actor_dir, prompts, settings, seed + 11, progress=bar.update)
            judged[name] = {"answers": answers,
                            "gold": [world.gold_score(r, a, start.town) for r, a in zip(held_out, answers)],
                            "proxy": score_texts(rm_model, rm_tokenizer, [p + " " + a for p, a in zip(prompts, answers)])}
    return held_out, judged


def run_demo(output: str | Path = "runs/demo", quick: bool = False, seed: int = 0,
             overrides: dict[str, Any] | None = None, resume: bool = False) -> dict[str, Any]:
    """Run the demo end to end into `output`; returns (and writes) summary.json.

    With `resume`, stages that finished (their final/ exists) are kept and the interrupted one
    continues from its latest checkpoint; the result is the same as an uninterrupted run.
    """
    from quartet.report import render_report
    from quartet.stages.dpo import run_dpo
    from quartet.stages.rl import run_rl

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("quartet demo runs on one process (it writes its own data and report); "
                         "launch quartet sft | reward | ppo | pipeline under torchrun instead")
    settings = replace(QUICK if quick else FULL, **(overrides or {}))
    out = Path(output)
    if (out / "summary.json").exists():
        raise FileExistsError(f"{out} already holds a finished demo; choose another --output or delete it")
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out} holds an unfinished demo; continue it with --resume, or choose another --output")

    def finished(stage: str) -> bool:  # a stage writes summary.json last, after final/
        return resume and (out / stage / "summary.json").exists()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = prepare_town(out, settings, seed, resume, seconds)

    # 4. PPO against the reward model; the gold judge watches
    t = time.perf_counter()
    if finished("ppo"):
        ppo_summary = json.loads((out / "ppo" / "summary.json").read_text(encoding="utf-8"))
    else:
        ppo_summary = run_rl(town_rl_config(start, out / "ppo", settings, seed), resume=resume,
                             metric_fns=[gold_metric(start.town)])
    seconds["ppo"] = time.perf_counter() - t

    # 5. DPO on the same preference pairs, no reward model
    t = time.perf_counter()
    if finished("dpo"):
        dpo_summary = json.loads((out / "dpo" / "summary.json").read_text(encoding="utf-8"))
    else:
        dpo_summary = run_dpo(town_dpo_config(start, out / "dpo", settings, seed), resume=resume)
    seconds["dpo"] = time.perf_counter() - t

    # 6. held-out comparison of the SFT, PPO and DPO actors
    t = time.perf_counter()
    held_out, judged = judge_actors(start, {"sft": start.sft_dir, "ppo": out / "ppo" / "final",
                                            "dpo": out / "dpo" / "final"}, settings, seed)
    oracle = [world.oracle_gold(r, start.town) for r in held_out]
    comparison = [{"prompt": r.text, **{f"{name}_{field}": judged[name][key][i] for name in judged
                                        for field, key in (("response", "answers"), ("gold", "gold"), ("proxy", "proxy"))}}
                  for i, r in enumerate(held_out)]
    _write_jsonl(out / "comparison.jsonl", comparison)
    seconds["evaluation"] = time.perf_counter() - t

    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    summary = {
        "gold_sft": mean(judged["sft"]["gold"]), "gold_ppo": mean(judged["ppo"]["gold"]),
        "gold_dpo": mean(judged["dpo"]["gold"]), "gold_oracle": mean(oracle),
        "proxy_sft": mean(judged["sft"]["proxy"]), "proxy_ppo": mean(judged["ppo"]["proxy"]),
        "proxy_dpo": mean(judged["dpo"]["proxy"]),
        "rm_accuracy_gold": start.rm_accuracy_gold, "rm_eval_pairs": start.rm_eval_pairs,
        "kl_final": ppo_summary.get("last/kl/ref"), "ppo_steps": ppo_summary["steps"], "dpo_steps": dpo_summary["steps"],
        "seconds": {**seconds, "total": sum(seconds.values())},
        "settings": {**asdict(settings), "quick": quick, "seed": seed},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    report = render_report(out)
    print_summary(summary, report)
    return summary


def print_summary(summary: dict[str, Any], report: Path) -> None:
    s = summary
    print("\n== Quartet demo: the restaurant town ==")
    print(f"gold (hidden judge), held-out requests: SFT {s['gold_sft']:+.3f} -> PPO {s['gold_ppo']:+.3f} "
          f"(best possible {s['gold_oracle']:+.3f})")
    print(f"proxy (reward model):                   SFT {s['proxy_sft']:+.3f} -> PPO {s['proxy_ppo']:+.3f}")
    print(f"DPO on the same pairs (no reward model): gold {s['gold_dpo']:+.3f}, proxy {s['proxy_dpo']:+.3f}")
    print(f"reward model accuracy vs gold labels:   {s['rm_accuracy_gold']:.3f} on {s['rm_eval_pairs']} held-out pairs")
    if s["kl_final"] is not None:
        print(f"KL(actor || reference) at the end:      {s['kl_final']:.3f} nats per response")
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in s["seconds"].items()))
    print(f"report: {report}")
