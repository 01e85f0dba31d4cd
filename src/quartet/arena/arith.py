"""Arithmetic with exact answers: a generated world for verifiable-reward RL (GRPO, RLOO, REINFORCE++).

The restaurant town (``world.py``) hides its ground truth in a gold judge; here the ground
truth is plain arithmetic, so a reward is a *check*, not a model.  Questions come in a few
wordings::

    What is 7 + 5?          Compute 12 - 4.          3 + 9 - 4 = ?        How much is 7 plus 5?

and the model answers in one short worked line that ends in the answer in ``\\boxed{}``::

    Q: What is 3 + 9 - 4?
    A: 3 + 9 = 12, 12 - 4 = \\boxed{8}

Level 1 is one sum or difference of two operands in 0..``max_operand``; level 2 chains 3-4
operands.  Every intermediate result is >= 0.  ``score`` is the verifier: 1.0 when the last
``\\boxed{...}`` in a response holds the right integer, else 0.0.

SFT warms the model up to the *format* (``sft_rows``, optionally with some final answers off by
one so accuracy is imperfect); RL then learns to be right from ``rl_rows`` (prompt, answer).

Held-out questions are disjoint from training ones by construction: every question text
(wording and numbers) falls in the held-out split or the training split by a stable hash
(``is_held_out``).  ``questions(..., held_out=True)`` draws only from the first, ``sft_rows`` and
``rl_rows`` only from the second; ``overlap`` checks any two sets of prompts.  The *expressions*
are shared on purpose ("Compute 7 + 5." may be trained, "7 + 5 = ?" held out): a tiny model
learns the facts it sees and does much worse on sums it never saw (see ``ArithSettings``).
Seeds follow ``world.py``: each stage draws with its own (``SEED_SFT``, ``SEED_RL``) and
evaluation uses ``SEED_EVAL``.  Everything is pure Python and deterministic given the seeds.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

OPS = ("+", "-")
OP_WORDS = {"+": "plus", "-": "minus"}
# {e} is the expression in symbols ("7 + 5"), {w} in words ("7 plus 5").
FRAMES = ("What is {e}?", "Compute {e}.", "{e} = ?", "Calculate {e}.", "What does {e} equal?",
          "Work out {e}.", "What is {w}?", "How much is {w}?")
PROMPT_TEMPLATE = "Q: {question}\nA:"
OPERANDS = {1: (2, 2), 2: (3, 4)}  # level -> (fewest, most) operands
HELD_OUT_PERCENT = 20  # share of question texts reserved for evaluation
SEED_SFT, SEED_RL, SEED_EVAL = 5005, 6006, 7007


@dataclass(frozen=True)
class Question:
    text: str
    answer: int
    numbers: tuple[int, ...]  # operands, left to right
    ops: tuple[str, ...]  # len(numbers) - 1 of "+" / "-", applied left to right

    @property
    def expression(self) -> str:
        """'3 + 9 - 4'."""
        return render_expression(self.numbers, self.ops)

    @property
    def level(self) -> int:
        return 1 if len(self.numbers) == 2 else 2


def render_expression(numbers: Sequence[int], ops: Sequence[str], words: bool = False) -> str:
    parts = [str(numbers[0])]
    for op, b in zip(ops, numbers[1:]):
        parts += [OP_WORDS[op] if words else op, str(b)]
    return " ".join(parts)


def evaluate(numbers: Sequence[int], ops: Sequence[str]) -> int:
    """Left-to-right value of the expression."""
    value = numbers[0]
    for op, b in zip(ops, numbers[1:]):
        value = value + b if op == "+" else value - b
    return value


def is_held_out(text: str) -> bool:
    """Whether a question text ('What is 7 + 5?') belongs to the evaluation split (a stable hash, about 20%)."""
    return zlib.crc32(text.encode()) % 100 < HELD_OUT_PERCENT


def _draw_expression(rng: random.Random, level: int, max_operand: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    lo, hi = OPERANDS[level]
    numbers, ops = [rng.randint(0, max_operand)], []
    value = numbers[0]
    for _ in range(rng.randint(lo, hi) - 1):
        op = rng.choice(OPS)
        b = rng.randint(0, max_operand) if op == "+" else rng.randint(0, min(value, max_operand))  # never below 0
        value = value + b if op == "+" else value - b
        numbers.append(b)
        ops.append(op)
    return tuple(numbers), tuple(ops)


def questions(n: int, seed: int, level: int = 1, max_operand: int = 20, held_out: bool = False) -> list[Question]:
    """n questions of `level` (1: two operands, 2: three or four) from the training or the held-out split.

    Expressions repeat (level 1 has only a few hundred); their wording varies over ``FRAMES``.
    """
    if level not in OPERANDS:
        raise ValueError(f"level must be one of {sorted(OPERANDS)}, got {level}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        numbers, ops = _draw_expression(rng, level, max_operand)
        text = rng.choice(FRAMES).format(e=render_expression(numbers, ops),
                                         w=render_expression(numbers, ops, words=True))
        if is_held_out(text) == held_out:
            out.append(Question(text=text, answer=evaluate(numbers, ops), numbers=numbers, ops=ops))
    return out


def eval_questions(n: int, level: int = 1, max_operand: int = 20, seed: int = SEED_EVAL) -> list[Question]:
    """Held-out questions: none of their texts appears in any ``sft_rows`` / ``rl_rows``."""
    return questions(n, seed, level, max_operand, held_out=True)


# ---------------------------------------------------------------- text


def render_prompt(q: Question) -> str:
    """'Q: What is 7 + 5?\\nA:'."""
    return PROMPT_TEMPLATE.format(question=q.text)


def worked_answer(q: Question, final: int | None = None) -> str:
    """The SFT completion, with a leading space: ' 7 + 5 = \\boxed{12}' or ' 3 + 9 = 12, 12 - 4 = \\boxed{8}'.

    ``final`` replaces the boxed answer (for deliberately wrong demonstrations); steps stay right.
    """
    steps, value = [], q.numbers[0]
    for op, b in zip(q.ops, q.numbers[1:]):
        new = value + b if op == "+" else value - b
        steps.append((f"{value} {op} {b}", new))
        value = new
    shown = [f"{lhs} = {rhs}" for lhs, rhs in steps[:-1]]
    shown.append(f"{steps[-1][0]} = \\boxed{{{q.answer if final is None else final}}}")
    return " " + ", ".join(shown)


_PROMPT = re.compile(r"Q: (.*?)\nA:", re.S)


def question_text(prompt: str) -> str:
    """The question inside a rendered prompt ('Q: What is 7 + 5?\\nA:' -> 'What is 7 + 5?'); other text as is."""
    match = _PROMPT.search(prompt)
    return match.group(1) if match else prompt


def overlap(prompts_a: Iterable[str], prompts_b: Iterable[str]) -> set[str]:
    """Question texts found in both sets of questions or prompts; empty when they are disjoint."""
    return {question_text(p) for p in prompts_a} & {question_text(p) for p in prompts_b}


# ---------------------------------------------------------------- data


def _off_by_one(answer: int, rng: random.Random) -> int:
    return answer + 1 if answer == 0 else answer + rng.choice((-1, 1))


def sft_rows(n: int, seed: int, level: int = 1, max_operand: int = 20, p_wrong: float = 0.0) -> list[dict]:
    """dict(prompt, completion) demonstrations of the answer format, from the training split.

    With ``p_wrong`` a share of the boxed answers are off by one (format learnt, accuracy imperfect).
    The questions are ``questions(n, seed, level, max_operand)``, whatever ``p_wrong`` is.
    """
    rng = random.Random(seed + 1)  # the wrong answers' own stream
    rows = []
    for q in questions(n, seed, level, max_operand):
        final = _off_by_one(q.answer, rng) if rng.random() < p_wrong else None
        rows.append({"prompt": render_prompt(q), "completion": worked_answer(q, final)})
    return rows


def rl_rows(n: int, seed: int, level: int = 1, max_operand: int = 20) -> list[dict]:
    """dict(prompt, answer) for RL with a verifier, from the training split; the answer is a string."""
    return [{"prompt": render_prompt(q), "answer": str(q.answer)} for q in questions(n, seed, level, max_operand)]


# ---------------------------------------------------------------- the verifier

_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_INTEGER = re.compile(r"([+-]?)\s*(\d+)")


def boxed_answer(response: str) -> int | None:
    """The integer in the last ``\\boxed{...}`` of `response`; None when there is none or it is no integer."""
    found = _BOXED.findall(response or "")
    if not found:
        return None
    match = _INTEGER.fullmatch(found[-1].strip())
    return None if match is None else int(match[1] + match[2])


def score(response: str, answer: int | str) -> float:
    """1.0 when the last ``\\boxed{}`` in `response` equals `answer` as an integer, else 0.0."""
    got = boxed_answer(response)
    return float(got is not None and got == int(str(answer).strip()))


def accuracy(responses: Sequence[str], answers: Sequence[int | str]) -> float:
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    return sum(score(r, a) for r, a in zip(responses, answers)) / max(1, len(responses))


def format_rate(responses: Sequence[str]) -> float:
    """Share of responses with a boxed integer answer (right or wrong)."""
    return sum(boxed_answer(r) is not None for r in responses) / max(1, len(responses))


def pass_at_k(groups: Sequence[Sequence[str]], answers: Sequence[int | str]) -> float:
    """Share of questions where at least one response of its group is right (k = the group size)."""
    if len(groups) != len(answers):
        raise ValueError(f"{len(groups)} groups but {len(answers)} answers")
    return sum(any(score(r, a) for r in g) for g, a in zip(groups, answers)) / max(1, len(groups))


# ---------------------------------------------------------------- calibrated sizes


@dataclass(frozen=True)
class ArithSettings:
    """The SFT warm-up, calibrated on 2 idle CPU cores (seed 0; held-out = ``eval_questions(200)``).

    The aim is a start where RL has room and signal: the format learnt, accuracy middling at
    temperature 1, and a group of 8 samples often holding both a right and a wrong answer.

    ============  =====  ======  ======  ======  =====================  =====
    settings      steps  format  greedy  pass@1  pass@8 (mixed groups)  SFT s
    ============  =====  ======  ======  ======  =====================  =====
    ``TEST``        300   0.96    0.50    0.24    0.80 (0.79)             10
    ``FULL``        400   0.98    0.65    0.29    0.88 (0.88)             13
    ``CHAINS``      600   0.97    0.47    0.23    0.76 (0.74)            32*
    ============  =====  ======  ======  ======  =====================  =====

    format: share of samples with a boxed integer; greedy: greedy accuracy; pass@1: mean accuracy
    of 8 samples at temperature 1; pass@8: share of questions with a right sample among 8.  Run
    seeds 1 and 2 of ``FULL`` gave pass@1 0.26 / 0.28 and pass@8 0.80 / 0.88.  Accuracy on
    expressions the SFT data never showed is far lower (``FULL``: 0.34 greedy), hence the split by
    question text.  SFT seconds are for idle cores (* at load 2.3; about 25 idle); a contended
    machine can be many times slower.  The table was measured with a tokenizer that merged digits
    into multi-digit tokens; the preset's tokenizer now gives every digit a token of its own
    (``model.split_digits``), so worked answers are at most 15 tokens with EOS at level 1 and 39
    at level 2 (10 and 27 before), hence ``max_new_tokens`` 16 and 40.
    """

    level: int = 1
    max_operand: int = 20
    p_wrong: float = 0.0  # share of SFT answers off by one (0: the warm-up alone leaves room enough)
    preset: str = "tiny"
    vocab_size: int = 384
    n_sft: int = 2000
    sft_steps: int = 400
    sft_lr: float = 2e-3
    batch_size: int = 32
    max_new_tokens: int = 16
    n_eval: int = 200


FULL = ArithSettings()
TEST = ArithSettings(sft_steps=300)
CHAINS = ArithSettings(level=2, sft_steps=600, max_new_tokens=40)
# The start online RL is measured from (tests, docs, `quartet arena`): a careless teacher. Operands
# 0..5 (57 expressions, so RL meets each one many times) and 40% of the SFT answers off by one: the
# model learns the format and mostly the right answers, but samples a wrong one about half the time
# (held-out accuracy about 0.53 at temperature 1); a verifier's reward then tells right from wrong.
# Measured (tests/test_verifiable_rl.py: 150 steps of 64 samples, lr 3e-4, each algorithm's preset):
# held-out accuracy 0.53 -> GRPO 0.69, RLOO 0.68, REINFORCE++ 0.84, each in about 30 s after a 15 s SFT.
CARELESS_TEACHER = ArithSettings(max_operand=5, p_wrong=0.4, sft_steps=300)


def sft_overrides(settings: ArithSettings, train_file: str, output_dir: str, seed: int = 0) -> dict[str, Any]:
    """The `build_config(SFTConfig, ...)` values for the warm-up on `train_file` (from ``sft_rows``)."""
    return {
        "run": {"output_dir": output_dir, "seed": seed},
        "model": {"preset": settings.preset, "vocab_size": settings.vocab_size},
        "data": {"train": train_file, "eval_fraction": 0.05, "max_length": 64, "max_prompt_length": 32},
        "train": {"lr": settings.sft_lr, "max_steps": settings.sft_steps, "batch_size": settings.batch_size,
                  "warmup_ratio": 0.05, "eval_every": 10_000, "log_every": 10, "save_every": 10_000},
    }
