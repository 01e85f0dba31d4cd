"""A calculator tool and questions a tiny model cannot answer in its head: a world for RL on tool use.

Questions multiply a 3-digit number by a 2-digit one::

    What is 347 * 28?          Compute 347 * 28.          347 * 28 = ?

A tiny model cannot multiply; it can copy the operands into a call of the `calculate` tool and
copy the tool's result into its answer. An episode, as chat messages (the Hermes tool-call format
of `quartet.envs.parse`)::

    user       What is 347 * 28?
    assistant  <tool_call>{"name": "calculate", "arguments": {"expression": "347 * 28"}}</tool_call>
    tool       9716
    assistant  9716

The SFT start comes from a careless teacher (`teacher_trace`): it sometimes skips the tool and
guesses a number of the right size, and sometimes miscopies an operand digit into its call (then
answers with the tool's result for the wrong product). The answer is judged by
`quartet.scoring.verifiers.final_number_answer` against the row's `answer`.

Held-out questions are disjoint from training ones by construction: each operand pair (a, b) falls
in the held-out split or the training split by a stable hash (`is_held_out`), so no product asked
in evaluation was ever asked, in any wording, in SFT or RL. Everything is pure Python and
deterministic given the seeds.
"""

from __future__ import annotations

import ast
import random
import zlib
from dataclasses import dataclass
from fractions import Fraction

from quartet.envs.parse import render_tool_call

FRAMES = ("What is {a} * {b}?", "Compute {a} * {b}.", "{a} * {b} = ?", "Calculate {a} * {b}.")
HELD_OUT_PERCENT = 20  # share of operand pairs reserved for evaluation
SEED_SFT, SEED_RL, SEED_EVAL = 5115, 6116, 7117
TOOL_NAME = "calculate"

# the tool's bounds: what a calculator call may hold, so no call can stall or flood a run
MAX_EXPRESSION_CHARS = 200
MAX_NODES = 64  # numbers, operators and parentheses' contents, counted in the parsed tree
MAX_MAGNITUDE = 10**30  # every number and intermediate result


# ---------------------------------------------------------------- the tool

_OPERATORS = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
              ast.Div: lambda x, y: x / y}


class CalculatorError(ValueError):
    """An expression the calculator does not evaluate; the message says what it accepts."""


def safe_evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression of numbers, + - * / and parentheses.

    The expression is parsed with `ast` and its tree walked; nothing is ever `eval`ed. Names,
    calls, powers, attributes and every other construct are refused, as are expressions longer
    than MAX_EXPRESSION_CHARS, with more than MAX_NODES parts, or with a number or intermediate
    result beyond MAX_MAGNITUDE. Division by zero raises ZeroDivisionError.
    """
    if not isinstance(expression, str):
        raise CalculatorError(f"the expression must be text, not {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression is {len(expression)} characters long; at most "
                              f"{MAX_EXPRESSION_CHARS} are evaluated")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError(f"cannot read {expression!r}: write numbers with + - * / and parentheses") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"the expression has more than {MAX_NODES} parts")
    return _value(tree.body)


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = Fraction(node.value)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        inner = _value(node.operand)
        value = -inner if isinstance(node.op, ast.USub) else inner
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        value = _OPERATORS[type(node.op)](_value(node.left), _value(node.right))
    else:
        raise CalculatorError(f"{ast.unparse(node)!r} is not allowed: only numbers, + - * / and parentheses")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError(f"a number or result is larger than {MAX_MAGNITUDE:.0e}")
    return value


def format_number(value: Fraction) -> str:
    """An integer as digits ('9716'); any other value as a decimal of at most 6 places ('0.333333')."""
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers with + - * / and parentheses, e.g. "347 * 28".
    """
    return format_number(safe_evaluate(expression))


# ---------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    a: int  # three digits
    b: int  # two digits
    text: str

    @property
    def answer(self) -> int:
        return self.a * self.b

    @property
    def expression(self) -> str:
        return f"{self.a} * {self.b}"


def is_held_out(a: int, b: int) -> bool:
    """Whether the operand pair belongs to the evaluation split (a stable hash, about 20% of pairs)."""
    return zlib.crc32(f"{a}*{b}".encode()) % 100 < HELD_OUT_PERCENT


def questions(n: int, seed: int, held_out: bool = False) -> list[Question]:
    """n questions (3-digit times 2-digit) whose operand pairs lie in the held-out or the training split."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        frame = rng.choice(FRAMES)
        if is_held_out(a, b) == held_out:
            out.append(Question(a, b, frame.format(a=a, b=b)))
    return out


# ---------------------------------------------------------------- the careless teacher


def _miscopy(number: int, rng: random.Random) -> int:
    """`number` with one digit changed (the first digit never to 0)."""
    digits = list(str(number))
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")]
    digits[i] = rng.choice(choices)
    return int("".join(digits))


def _guess(answer: int, rng: random.Random) -> int:
    """A number of the answer's size that is not the answer: the teacher answering in its head."""
    digits = len(str(answer))
    while (guess := rng.randint(10 ** (digits - 1), 10**digits - 1)) == answer:
        pass
    return guess


def teacher_trace(q: Question, rng: random.Random, p_skip: float, p_miscopy: float) -> list[dict[str, str]]:
    """One episode of the careless teacher as chat messages (user, assistant[, tool, assistant]).

    With probability `p_skip` it answers at once with a guess; otherwise it calls the calculator,
    with probability `p_miscopy` on an operand with one digit miscopied, and answers with the result.
    """
    messages = [{"role": "user", "content": q.text}]
    if rng.random() < p_skip:
        return messages + [{"role": "assistant", "content": str(_guess(q.answer, rng))}]
    a, b = q.a, q.b
    if rng.random() < p_miscopy:
        if rng.random() < 0.5:
            a = _miscopy(a, rng)
        else:
            b = _miscopy(b, rng)
    expression = f"{a} * {b}"
    result = calculate(expression)
    return messages + [{"role": "assistant", "content": render_tool_call(TOOL_NAME, {"expression": expression})},
                       {"role": "tool", "name": TOOL_NAME, "content": result},
                       {"role": "assistant", "content": result}]


def teacher_rows(n: int, seed: int, p_skip: float, p_miscopy: float) -> list[dict]:
    """`messages` rows of n teacher episodes on training questions."""
    rng = random.Random(seed + 1)  # the teacher's slips: a stream of their own
    return [{"messages": teacher_trace(q, rng, p_skip, p_miscopy)} for q in questions(n, seed)]


def question_rows(n: int, seed: int, held_out: bool = False) -> list[dict]:
    """RL and evaluation rows: the question as a chat prompt, and its answer for the verifier."""
    return [{"prompt": [{"role": "user", "content": q.text}], "answer": str(q.answer)}
            for q in questions(n, seed, held_out)]


def used_tool(messages: list[dict[str, str]]) -> bool:
    """Whether an episode called the calculator (a tool message answered a call)."""
    return any(m["role"] == "tool" for m in messages)


@dataclass(frozen=True)
class CalculatorSettings:
    """The careless teacher and the sizes of the world's SFT start.

    Measured (seed 0, 128 held-out questions, 4 episodes each at temperature 1; a shared, loaded machine):
    the careless teacher's 2,000 traces and 700 SFT steps of the tiny preset give a start that answers
    right 0.45 of the time and calls the tool 0.68 of the time (greedy: 0.84 right); GRPO on 60,000
    model tokens (25 steps of 64 episodes) raises them to 0.75 and 0.96, PPO on as many to 0.75 and 0.98.
    From the nano preset's start of 600 steps (0.375, 0.64), 25,000 tokens: GRPO 0.645 / 0.93, PPO 0.66 / 0.89.
    """

    p_skip: float = 0.3  # share of teacher episodes answered by a guess, without the tool
    p_miscopy: float = 0.2  # share of the teacher's calls with one operand digit miscopied
    n_sft: int = 2000
    preset: str = "tiny"
    vocab_size: int = 320
    sft_steps: int = 700  # copying digits at temperature 1 takes this many (300 steps at 2e-3 started at 0.07)
    sft_lr: float = 3e-3
    batch_size: int = 32
    max_new_tokens: int = 40  # per turn: a call is about 25 tokens
    max_turns: int = 3
    n_eval: int = 128
