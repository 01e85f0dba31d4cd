"""The worlds `quartet arena` compares algorithms in, each with ground truth no algorithm sees.

- `town`: the demo's restaurant town. Online RL optimises a learned reward model (the proxy); the
  hidden gold judge measures what happened, so reward over-optimisation shows.
- `arith`: arithmetic with exact answers; the reward is a verifier, and the ground truth is accuracy.
- `reasoning_gym:NAME`: any task of the `reasoning-gym` package (an optional extra), its own
  `score_answer` as verifier.

A world prepares what every algorithm starts from in one seed's directory (the SFT model, prompts,
held-out prompts, preference pairs for DPO, the reward model in the town), builds each algorithm's
config, and judges a trained actor on the held-out prompts. Every world is rebuilt from its
directory alone, so each algorithm can run in a process of its own.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from quartet.arena import arith, calculator, guess
from quartet.config import DPOConfig, RLConfig, SamplingConfig, SFTConfig, build_config
from quartet.demo import world
from quartet.demo.run import QUICK as QUICK_TOWN
from quartet.demo.run import (
    DemoSettings,
    TownStart,
    gold_metric,
    judge_actors,
    prepare_town,
    render_prompt,
    town_dpo_config,
    town_rl_config,
)


@dataclass(frozen=True)
class ArenaSettings:
    """Sizes of an arena's worlds: `--quick` for a first look, the default for the arena table in docs/arena.md, `TEST` for
    the tests. Every online algorithm may generate as many response tokens as DPO's pairs cost (two SFT
    samples per prompt), so the pairs' prompt count sets the budget."""

    town: DemoSettings  # the demo's town sizes (its reward model's pairs are DPO's)
    pair_prompts: int  # verifiable worlds: prompts DPO's pairs are sampled for


# the default: the demo's --quick town (2,000 pairs) and 3,000 arithmetic pair prompts, about 7 minutes a seed on
# 2 cores; --quick: about half of each; the full demo's town (3,000 pairs, twice the SFT) would triple the town's time
FULL = ArenaSettings(town=QUICK_TOWN, pair_prompts=3000)
QUICK = ArenaSettings(town=replace(QUICK_TOWN, n_sft=1000, n_rm_prompts=1000, n_rm_eval_prompts=100), pair_prompts=1500)
TEST = ArenaSettings(town=QUICK_TOWN, pair_prompts=600)

ONLINE = ("ppo", "grpo", "rloo", "reinforce++", "reinforce++-baseline")
ALGORITHMS = (*ONLINE, "dpo")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


# answers sampled per held-out prompt for the final judgement: one answer's ground truth is noisy (in the
# town one sample's mean gold over 200 requests moved by +-0.07 between seeds), the mean of four less so
JUDGE_SAMPLES = 4


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


@dataclass(frozen=True)
class Judgement:
    """A trained actor on the held-out prompts: the ground truth (gold or accuracy), the proxy where
    there is one, and a few answers to show."""

    ground_truth: float
    proxy: float | None
    answers: list[dict[str, Any]]
    details: dict[str, float] = field(default_factory=dict)  # episodes: e.g. the tool-call rate, turns used


# ----------------------------------------------------------------------------- the town


class TownWorld:
    """The restaurant town: the reward model is the proxy, the gold judge the ground truth."""

    name = "town"
    ground_truth_name = "gold (hidden judge)"
    eval_ground_truth = "eval/gold/mean"
    eval_proxy = "eval/score/mean"

    def __init__(self, directory: Path, seed: int, sizes: ArenaSettings):
        self.dir, self.seed = directory, seed
        self.settings: DemoSettings = sizes.town
        self.start: TownStart | None = None
        if (directory / "start.json").exists():
            saved = _read_json(directory / "start.json")
            self.start = TownStart(town=world.Town.from_dict(_read_json(directory / "town.json")),
                                   **{k: Path(v) if k in ("sft_dir", "preferences", "reward_dir", "prompts") else v
                                      for k, v in saved.items()})

    @property
    def sft_dir(self) -> Path:
        return self.start.sft_dir

    def prepare(self, resume: bool) -> dict[str, float]:
        seconds: dict[str, float] = {}
        self.start = prepare_town(self.dir, self.settings, self.seed, resume, seconds)
        held_out = world.prompts(self.start.town, self.settings.n_eval_prompts, world.SEED_EVAL + self.seed)
        _write_jsonl(self.dir / "data" / "held_out.jsonl", [{"prompt": render_prompt(r)} for r in held_out])
        fields = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.start).items() if k != "town"}
        (self.dir / "start.json").write_text(json.dumps(fields, indent=1), encoding="utf-8")
        return {**seconds, "preference_tokens": self.preference_tokens()}

    def preference_tokens(self) -> int:
        """Response tokens the SFT model generated for DPO's (and the reward model's) pairs."""
        from quartet.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.start.sft_dir)
        rows = [json.loads(line) for line in self.start.preferences.read_text(encoding="utf-8").splitlines()]
        return sum(len(tokenizer(r[k], add_special_tokens=False)["input_ids"]) + 1 for r in rows
                   for k in ("chosen", "rejected"))

    def rl_config(self, algorithm: str, output_dir: Path, budget: int) -> RLConfig:
        # critic-free: half PPO's updates per step (one epoch), so a higher rate; 5e-5 was the best of 3e-5, 5e-5
        # and 1e-4 for RLOO and REINFORCE++ on the quick town (seed 0); GRPO was no better at any of them
        extra = {} if algorithm == "ppo" else {"optim": {"actor_lr": 5e-5}}
        return town_rl_config(self.start, output_dir, self.settings, self.seed, algorithm,
                              data={"eval": str(self.dir / "data" / "held_out.jsonl")},
                              train={"steps": 10**6, "max_generated_tokens": budget, "eval_every": 10,
                                     "save_every": 10}, **extra)

    def metric_fns(self) -> list:
        return [gold_metric(self.start.town)]

    def reward_fn(self):
        return None  # the reward model of the config

    def dpo_config(self, output_dir: Path) -> DPOConfig:
        return town_dpo_config(self.start, output_dir, self.settings, self.seed)

    def judge(self, actor_dir: Path, n_answers: int = 3) -> Judgement:
        golds, proxies, answers = [], [], []
        for k in range(JUDGE_SAMPLES):
            held_out, judged = judge_actors(self.start, {"actor": actor_dir}, self.settings, self.seed + 1000 * k)
            j = judged["actor"]
            golds += j["gold"]
            proxies += j["proxy"]
            answers = answers or [{"prompt": r.text, "answer": a, "ground_truth": g, "proxy": p}
                                  for r, a, g, p in zip(held_out[:n_answers], j["answers"], j["gold"], j["proxy"])]
        return Judgement(_mean(golds), _mean(proxies), answers)


# ----------------------------------------------------------------------------- verifiable tasks


@dataclass(frozen=True)
class TaskRows:
    """A verifiable task's data: SFT demonstrations, RL questions and held-out ones, all with answers."""

    sft: list[dict]
    questions: list[dict]
    held_out: list[dict]


class VerifiableWorld:
    """A task with exact answers: a verifier is the reward, and its accuracy the ground truth."""

    ground_truth_name = "held-out accuracy"
    eval_proxy = None
    settings = arith.CARELESS_TEACHER
    reward_spec = "quartet.scoring.verifiers:exact_answer"  # the verifier, as the run's config names it
    max_prompt_length, max_length = 32, 64  # tokens: a question; a question and its answer

    def __init__(self, directory: Path, seed: int, sizes: ArenaSettings):
        self.dir, self.seed, self.pair_prompts = directory, seed, sizes.pair_prompts
        self.sft_dir = directory / "sft" / "final"

    @property
    def n_questions(self) -> int:
        """RL's questions; DPO's pairs are sampled for the first `pair_prompts` of them."""
        return max(2000, self.pair_prompts)

    # what a task supplies
    def rows(self) -> TaskRows:
        raise NotImplementedError

    def reward_fn(self):
        raise NotImplementedError

    @property
    def eval_ground_truth(self) -> str:
        return f"eval/accuracy/{self.reward_fn().__name__}"

    def prepare(self, resume: bool) -> dict[str, float]:
        import time

        from quartet.stages.sft import run_sft

        rows, seconds = self.rows(), {}
        data = self.dir / "data"
        _write_jsonl(data / "sft.jsonl", rows.sft)
        _write_jsonl(data / "questions.jsonl", rows.questions)
        _write_jsonl(data / "held_out.jsonl", rows.held_out)
        t = time.perf_counter()
        if not (resume and (self.dir / "sft" / "summary.json").exists()):
            overrides = arith.sft_overrides(self.settings, str(data / "sft.jsonl"), str(self.dir / "sft"), self.seed)
            overrides["data"].update(max_prompt_length=self.max_prompt_length, max_length=self.max_length)
            run_sft(build_config(SFTConfig, overrides), resume=resume)
        seconds["sft"] = time.perf_counter() - t
        t = time.perf_counter()
        seconds["preference_tokens"] = self._write_preferences(rows.questions, self.pair_prompts)
        seconds["preferences"] = time.perf_counter() - t
        return seconds

    def _write_preferences(self, questions: list[dict], n_prompts: int) -> int:
        """DPO's pairs: two SFT answers per question, the right one chosen where exactly one is right;
        returns the response tokens generated for them."""
        samples = self._samples([q["prompt"] for q in questions[:n_prompts]], seeds=(self.seed + 1, self.seed + 2))
        reward, pairs, tokens = self.reward_fn(), [], 0
        for q, (a, b, n_tokens) in zip(questions, samples):
            tokens += n_tokens
            if not a.strip() or not b.strip():  # an answer that stopped at once is no preference row
                continue
            ra, rb = reward([q["prompt"]] * 2, [a, b], **{k: [v] * 2 for k, v in q.items() if k != "prompt"})
            if ra is not None and rb is not None and ra != rb:
                pairs.append({"prompt": q["prompt"], "chosen": a if ra > rb else b, "rejected": b if ra > rb else a})
        _write_jsonl(self.dir / "data" / "preferences.jsonl", pairs)
        return tokens

    def _samples(self, prompts: list[str], seeds: tuple[int, ...]) -> list[tuple]:
        from quartet.models.loading import load_causal_lm
        from quartet.models.tokenizer import load_tokenizer
        from quartet.rollout.generate import generate_texts

        tokenizer, model = load_tokenizer(self.sft_dir), load_causal_lm(self.sft_dir).eval()
        sampling = SamplingConfig(max_new_tokens=self.settings.max_new_tokens, temperature=1.0)
        runs = [generate_texts(model, tokenizer, prompts, sampling, seed=s) for s in seeds]
        tokens = [sum(len(tokenizer(r[i], add_special_tokens=False)["input_ids"]) + 1 for r in runs)
                  for i in range(len(prompts))]
        return [(*(r[i] for r in runs), tokens[i]) for i in range(len(prompts))]

    def rl_config(self, algorithm: str, output_dir: Path, budget: int) -> RLConfig:
        data = self.dir / "data"
        critic = {"critic_init": "actor"} if algorithm == "ppo" else {}
        return build_config(RLConfig, {
            "run": {"output_dir": str(output_dir), "seed": self.seed},
            "models": {"actor": str(self.sft_dir), "reward_fn": self.reward_spec, **critic},
            "data": {"train": str(data / "questions.jsonl"), "eval": str(data / "held_out.jsonl"),
                     "max_prompt_length": self.max_prompt_length},
            "algorithm": {"name": algorithm},
            "rollout": {"max_new_tokens": self.settings.max_new_tokens, "temperature": 1.0},
            "batch": {"rollout_batch_size": 64, "mini_batch_size": 32},
            "optim": {"actor_lr": 3e-4, "critic_lr": 1e-3},
            "train": {"steps": 10**6, "max_generated_tokens": budget, "eval_every": 25, "save_every": 25,
                      "n_samples": 2, "sample_every": 50},
        })

    def metric_fns(self) -> list:
        return []

    def dpo_config(self, output_dir: Path) -> DPOConfig:
        return build_config(DPOConfig, {
            "run": {"output_dir": str(output_dir), "seed": self.seed},
            "model": {"path": str(self.sft_dir)},
            "data": {"train": str(self.dir / "data" / "preferences.jsonl"), "eval_fraction": 0.1,
                     "max_length": self.max_length, "max_prompt_length": self.max_prompt_length},
            # RPO's NLL term on the chosen answer: without it DPO pushed the right answers' log-probs down too
            # and lowered accuracy (seed 0, 931 pairs: 0.53 -> 0.445; with it 0.58, and at lr 1e-3 0.625)
            "train": {"lr": 1e-3, "epochs": 2.0, "batch_size": 32, "eval_every": 50, "log_every": 10, "save_every": 50},
            "dpo": {"beta": 0.1, "rpo_alpha": 1.0},
        })

    def judge(self, actor_dir: Path, n_answers: int = 3) -> Judgement:
        rows = [json.loads(line) for line in (self.dir / "data" / "held_out.jsonl").read_text().splitlines()]
        from quartet.models.loading import load_causal_lm
        from quartet.models.tokenizer import load_tokenizer
        from quartet.rollout.generate import generate_texts

        tokenizer, model = load_tokenizer(actor_dir), load_causal_lm(actor_dir).eval()
        sampling = SamplingConfig(max_new_tokens=self.settings.max_new_tokens, temperature=1.0)
        columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
        judged, shown = [], []
        for k in range(JUDGE_SAMPLES):
            answers = generate_texts(model, tokenizer, [r["prompt"] for r in rows], sampling, seed=self.seed + 11 + 1000 * k)
            scores = self.reward_fn()([r["prompt"] for r in rows], answers, **columns)
            judged += [s for s in scores if s is not None]
            shown = shown or [{"prompt": r["prompt"], "answer": a, "ground_truth": s}
                              for r, a, s in zip(rows[:n_answers], answers, scores)]
        return Judgement(_mean(judged), None, shown)


class ArithWorld(VerifiableWorld):
    """Sums and differences of 0..5, SFT-warmed by a careless teacher (quartet.arena.arith)."""

    name = "arith"

    def rows(self) -> TaskRows:
        s = self.settings
        held = arith.eval_questions(s.n_eval, s.level, s.max_operand)
        return TaskRows(arith.sft_rows(s.n_sft, arith.SEED_SFT + self.seed, s.level, s.max_operand, s.p_wrong),
                        arith.rl_rows(self.n_questions, arith.SEED_RL + self.seed, s.level, s.max_operand),
                        [{"prompt": arith.render_prompt(q), "answer": str(q.answer)} for q in held])

    def reward_fn(self):
        from quartet.scoring.verifiers import exact_answer

        return exact_answer


class ReasoningGymWorld(VerifiableWorld):
    """A reasoning-gym task (`reasoning_gym:NAME`), its dataset's `score_answer` as the verifier."""

    reward_spec = "quartet.arena.worlds:reasoning_gym_score"
    max_prompt_length, max_length = 96, 128  # its questions are sentences

    def __init__(self, directory: Path, seed: int, sizes: ArenaSettings, task: str,
                 options: dict[str, Any] | None = None):
        super().__init__(directory, seed, sizes)
        self.task, self.options, self.name = task, options or {}, f"reasoning_gym:{task}"

    def rows(self) -> TaskRows:
        rg = require_reasoning_gym()
        s = self.settings
        entries = list(rg.create_dataset(self.task, size=s.n_sft + self.n_questions + s.n_eval, seed=self.seed, **self.options))
        rng = random.Random(self.seed)
        sft = []
        for e in entries[: s.n_sft]:  # the careless teacher: some answers are another question's
            answer = rng.choice(entries)["answer"] if rng.random() < s.p_wrong else e["answer"]
            sft.append({"prompt": _rg_prompt(e), "completion": f" \\boxed{{{answer}}}"})
        as_rows = [{"prompt": _rg_prompt(e), "entry": json.dumps(e, default=str)} for e in entries[s.n_sft:]]
        return TaskRows(sft, as_rows[: self.n_questions], as_rows[self.n_questions :])

    def reward_fn(self):
        return reasoning_gym_score


# ----------------------------------------------------------------------------- agents


class AgentWorld(VerifiableWorld):
    """A world of multi-turn episodes (a tool or a game): SFT on a careless teacher's traces, then online RL
    on episodes, judged by running episodes on held-out rows through the trainer's own `AgentRollout`.

    DPO takes no part: its pairs are single answers, not episodes. The online algorithms share a budget of
    generated *model* tokens (the episodes' action tokens; observations are not counted), `budget_tokens`."""

    algorithms = ONLINE
    max_prompt_length, max_length = 32, 96
    budget_tokens = 60_000
    judge_step = 888_888  # the episode seeds of the judgement (+ k for its k-th sample): none a training step's

    def rollout_section(self) -> dict[str, Any]:
        """The config's `rollout` keys of the world's episodes (env or tools, turns)."""
        raise NotImplementedError

    def judge_episodes(self, rows: list[dict], records: list) -> tuple[list[float], dict[str, list[float]]]:
        """Per episode: its ground truth, and named per-episode details (e.g. a tool-call rate)."""
        raise NotImplementedError

    def reward_fn(self):
        return None

    def prepare(self, resume: bool) -> dict[str, float]:
        import time

        from quartet.stages.sft import run_sft

        rows, data = self.rows(), self.dir / "data"
        _write_jsonl(data / "sft.jsonl", rows.sft)
        _write_jsonl(data / "questions.jsonl", rows.questions)
        _write_jsonl(data / "held_out.jsonl", rows.held_out)
        t = time.perf_counter()
        if not (resume and (self.dir / "sft" / "summary.json").exists()):
            run_sft(build_config(SFTConfig, self.sft_section(str(data / "sft.jsonl"))), resume=resume)
        return {"sft": time.perf_counter() - t, "preference_tokens": self.budget_tokens}

    def sft_section(self, train_file: str) -> dict[str, Any]:
        s = self.settings
        return {
            "run": {"output_dir": str(self.dir / "sft"), "seed": self.seed},
            "model": {"preset": s.preset, "vocab_size": s.vocab_size},
            "data": {"train": train_file, "eval_fraction": 0.05, "max_length": self.max_length,
                     "max_prompt_length": self.max_length - 8},
            "train": {"lr": s.sft_lr, "max_steps": s.sft_steps, "batch_size": s.batch_size, "warmup_ratio": 0.05,
                      "eval_every": 10_000, "log_every": 10, "save_every": 10_000},
        }

    def rl_config(self, algorithm: str, output_dir: Path, budget: int, **sections: Any) -> RLConfig:
        data = self.dir / "data"
        critic = {"critic_init": "actor"} if algorithm == "ppo" else {}
        reward = {"reward_fn": self.reward_spec} if self.reward_spec else {}
        n = 1 if algorithm in ("ppo", "reinforce++") else 8
        return build_config(RLConfig, _merged({
            "run": {"output_dir": str(output_dir), "seed": self.seed},
            "models": {"actor": str(self.sft_dir), **reward, **critic},
            "data": {"train": str(data / "questions.jsonl"), "eval": str(data / "held_out.jsonl"),
                     "max_prompt_length": self.max_prompt_length},
            "algorithm": {"name": algorithm},
            "rollout": {"temperature": 1.0, "n": n, **self.rollout_section()},
            "batch": {"rollout_batch_size": 64, "mini_batch_size": 32},
            "optim": {"actor_lr": 3e-4, "critic_lr": 1e-3},
            "train": {"steps": 10**6, "max_generated_tokens": budget, "eval_every": 10, "save_every": 10**6,
                      "n_samples": 2, "sample_every": 50},
        }, sections))

    def dpo_config(self, output_dir: Path) -> DPOConfig:
        raise ValueError(f"the {self.name} world runs episodes, which DPO's single-answer pairs do not hold; "
                         f"choose from {', '.join(self.algorithms)}")

    def judge(self, actor_dir: Path, n_answers: int = 3) -> Judgement:
        """Episodes on every held-out row (JUDGE_SAMPLES draws), run by the trainer's `AgentRollout`."""
        from quartet.data import load_prompts, tokenize_prompt_examples
        from quartet.models.loading import load_causal_lm
        from quartet.models.tokenizer import load_tokenizer
        from quartet.rollout.agent import AgentRollout

        held_out = self.dir / "data" / "held_out.jsonl"
        rows = [json.loads(line) for line in held_out.read_text().splitlines()]
        tokenizer, model = load_tokenizer(actor_dir), load_causal_lm(actor_dir).eval()
        cfg = self.rl_config("grpo", self.dir / "judge", self.budget_tokens)  # its rollout section only
        kept, _ = tokenize_prompt_examples(load_prompts(held_out, tokenizer), tokenizer, self.max_prompt_length)
        prompt_rows = [(ids, example.columns) for ids, example in kept]
        agent = AgentRollout(cfg.rollout, tokenizer, self.seed, self.max_prompt_length)
        truths, details, shown = [], {}, []
        try:
            for k in range(JUDGE_SAMPLES):
                generator = torch.Generator().manual_seed(self.seed + 11 + 1000 * k)
                _, records = agent.generate(model, prompt_rows, self.judge_step + k, 0, 1, generator, 0,
                                            len(prompt_rows), torch.device("cpu"))
                truth, detail = self.judge_episodes(rows, records)
                truths += truth
                for key, values in detail.items():
                    details.setdefault(key, []).extend(values)
                shown = shown or [{"prompt": json.dumps(r["prompt"]), "answer": json.dumps(rec.messages),
                                   "ground_truth": g} for r, rec, g in zip(rows[:n_answers], records, truth)]
        finally:
            agent.close()
        return Judgement(_mean(truths), None, shown, {key: _mean(v) for key, v in details.items()})


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra`'s sections merged in, key by key."""
    return {**base, **{k: {**base.get(k, {}), **v} for k, v in extra.items()}}


class CalculatorWorld(AgentWorld):
    """3-digit by 2-digit products, answered with a calculator tool (quartet.arena.calculator)."""

    name = "calculator"
    ground_truth_name = "held-out exact-match accuracy"
    reward_spec = "quartet.scoring.verifiers:final_number_answer"
    settings = calculator.CalculatorSettings()

    @property
    def eval_ground_truth(self) -> str:
        return "eval/accuracy/final_number_answer"

    def rows(self) -> TaskRows:
        s = self.settings
        traces = calculator.teacher_rows(s.n_sft, calculator.SEED_SFT + self.seed, s.p_skip, s.p_miscopy)
        return TaskRows(traces,
                        calculator.question_rows(self.n_questions, calculator.SEED_RL + self.seed),
                        calculator.question_rows(s.n_eval, calculator.SEED_EVAL, held_out=True))

    def rollout_section(self) -> dict[str, Any]:
        s = self.settings
        return {"tools": f"quartet.arena.calculator:{calculator.TOOL_NAME}", "max_new_tokens": s.max_new_tokens,
                "max_turns": s.max_turns, "max_observation_tokens": 16, "tool_timeout": 5.0}

    def reward_fn(self):
        from quartet.scoring.verifiers import final_number_answer

        return final_number_answer

    def judge_episodes(self, rows: list[dict], records: list) -> tuple[list[float], dict[str, list[float]]]:
        from quartet.scoring.verifiers import final_number_answer

        answers = [next((m["content"] for m in reversed(r.messages) if m["role"] == "assistant"), "") for r in records]
        truth = final_number_answer([""] * len(rows), answers, answer=[r["answer"] for r in rows])
        return [float(t) for t in truth], {"tool_call_rate": [float(calculator.used_tool(r.messages)) for r in records],
                                           "turns": [float(r.turns) for r in records]}


class GuessWorld(AgentWorld):
    """Guess the number from 1 to 7 in 4 tries with "higher"/"lower" feedback (quartet.arena.guess)."""

    name = "guess"
    max_prompt_length, max_length = 48, 128  # the rules; a whole game
    ground_truth_name = "held-out success rate"
    reward_spec = "quartet.arena.guess:turn_cost"  # the environment's win reward plus a cost per guess
    eval_ground_truth = "eval/env/reward"  # the win reward alone: the share of games won
    settings = guess.GuessSettings()

    def rows(self) -> TaskRows:
        s = self.settings
        return TaskRows(guess.teacher_rows(s.n_sft, guess.SEED_SFT + self.seed, s.p_edge),
                        guess.game_rows(self.n_questions), guess.game_rows(s.n_eval))

    def rollout_section(self) -> dict[str, Any]:
        return {"env": "quartet.arena.guess:GuessNumber", "max_new_tokens": self.settings.max_new_tokens,
                "max_turns": guess.TRIES, "max_observation_tokens": 24}

    def reward_fn(self):
        return guess.turn_cost

    def judge_episodes(self, rows: list[dict], records: list) -> tuple[list[float], dict[str, list[float]]]:
        return [float(guess.won(r.turn_rewards)) for r in records], {"turns": [float(r.turns) for r in records]}


def _rg_prompt(entry: dict) -> str:
    return f"Q: {entry['question']}\nA:"


@torch.no_grad()
def held_out_kl(actor_dir: Path, reference_dir: Path, prompts: list[str | list[dict]], max_new_tokens: int, seed: int,
                batch_size: int = 50) -> float:
    """KL(actor || reference) in nats per response on held-out prompts: responses sampled from the actor at
    temperature 1, each one's summed k1 (log pi_actor - log pi_ref over its tokens), averaged. One measure for
    every algorithm, DPO's included, which has no rollouts to log it on. A prompt given as chat messages is
    rendered with the chat template; in a world of episodes this measures the first turn."""
    from quartet.data.collate import collate_prompts
    from quartet.models.loading import load_causal_lm
    from quartet.models.policy import response_logprobs
    from quartet.models.tokenizer import load_tokenizer
    from quartet.rl.kl import sequence_kl
    from quartet.rollout.generate import sample_responses

    tokenizer = load_tokenizer(actor_dir)
    actor, reference = load_causal_lm(actor_dir).eval(), load_causal_lm(reference_dir).eval()
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for start in range(0, len(prompts), batch_size):
        texts = [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[start : start + batch_size]]
        batch = collate_prompts([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
                                tokenizer.pad_token_id)
        rollout = sample_responses(actor, batch["input_ids"], batch["attention_mask"], sampling,
                                   tokenizer.eos_token_id, tokenizer.pad_token_id, generator=generator)
        sequences = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
        mask = torch.cat([rollout.prompt_mask, rollout.response_mask], 1)
        ref_logp = response_logprobs(reference, sequences, mask, rollout.response_ids, temperature=1.0)
        total += float(sequence_kl(rollout.logprobs, ref_logp, rollout.response_mask).sum())
    return total / max(len(prompts), 1)


def require_reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise ValueError("--world reasoning_gym:NAME needs the reasoning-gym package: "
                         "pip install 'quartet-rlhf[tasks]' (or pip install reasoning-gym)") from None
    return reasoning_gym


_RG_SCORERS: dict[str, Any] = {}


def reasoning_gym_score(prompts: list[str], responses: list[str], entry: list[str]) -> list[float]:
    """1.0 when reasoning-gym's own verifier accepts a response's final answer (its last `\\boxed{}`, or
    its last number), for the task named in each row's `entry` (the dataset entry, as JSON)."""
    from quartet.scoring.verifiers import extract_answer, last_number

    rg = require_reasoning_gym()
    scores = []
    for response, raw in zip(responses, entry):
        item = json.loads(raw)
        task = item["metadata"]["source_dataset"]
        if task not in _RG_SCORERS:
            _RG_SCORERS[task] = rg.create_dataset(task, size=1, seed=0)
        answer = extract_answer(response) or last_number(response) or ""
        scores.append(float(_RG_SCORERS[task].score_answer(answer=answer, entry=item)))
    return scores


reasoning_gym_score.verifies = True


def world_directory(spec: str) -> str:
    """A world's directory name: `reasoning_gym:chain_sum?max_terms=2` -> `reasoning_gym-chain_sum-max_terms-2`."""
    return re.sub(r"[^A-Za-z0-9_.+]+", "-", spec).strip("-")


def make_world(spec: str, directory: Path, seed: int, sizes: ArenaSettings):
    """The world named by `spec` (town, arith, calculator, guess or reasoning_gym:NAME) in one seed's directory."""
    if spec == "town":
        return TownWorld(directory, seed, sizes)
    if spec == "arith":
        return ArithWorld(directory, seed, sizes)
    if spec == "calculator":
        return CalculatorWorld(directory, seed, sizes)
    if spec == "guess":
        return GuessWorld(directory, seed, sizes)
    if spec.startswith("reasoning_gym:") and spec.split(":", 1)[1]:
        task, options = parse_task(spec.split(":", 1)[1])
        names = sorted(require_reasoning_gym().factory.DATASETS)
        if task not in names:
            raise ValueError(f"reasoning-gym has no dataset {task!r}; it has {len(names)}, e.g. {', '.join(names[:8])}")
        return ReasoningGymWorld(directory, seed, sizes, task, options)
    raise ValueError(f"unknown world {spec!r}; choose town, arith, calculator, guess or reasoning_gym:NAME "
                     "(a reasoning-gym dataset)")



def parse_task(text: str) -> tuple[str, dict[str, Any]]:
    """`chain_sum?max_terms=2&max_digits=1` -> ("chain_sum", {"max_terms": 2, "max_digits": 1}): a dataset
    name and the options of its config (values read as JSON where they parse, else as text)."""
    name, _, query = text.partition("?")
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"bad reasoning-gym option {item!r} in {text!r}; write NAME?key=value&key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options
