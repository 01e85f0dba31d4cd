"""Built-in verifiers for RL with verifiable rewards (RLVR): find a response's final answer, compare it with the reference.

Reward functions here follow the scoring contract

    fn(prompts: list[str], responses: list[str], **columns) -> list[float | None]

where `columns` are the batch's other dataset columns as lists aligned with the rows (`answer=[...]`). A function
returns None for a row it does not judge (here: a row whose reference answer is None or NaN) and ignores columns it
does not use.

The pieces, each usable alone:

- `extract_answer`: the final answer a response states (`\\boxed{}`, then "answer is" / "Answer:" / "####").
- `last_number`: the last number in a text, for tasks that accept a bare final number.
- `normalize_number`: a number written in any common way -> an exact `Fraction` (or None).
- `answers_match`: numeric equality when both sides are numbers, else a normalised string comparison.
- `answer_reward(column, allow_bare_number)`: builds a 0/1 reward; `exact_answer` and `final_number_answer` are two.
- `format_reward`: 1.0 when the response states a final answer in the asked format.

Numbers are exact rationals (`fractions.Fraction`), so "2.50" == "2.5" == "5/2" == "\\frac{5}{2}" with no rounding and
"0.333" != "1/3". Only a Python float reference, which is already rounded, is compared with a relative tolerance of
1e-9 (`FLOAT_REL_TOL`). A percent sign is dropped and the number kept as written: "50%" equals "50", not "0.5".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

__all__ = [
    "FLOAT_REL_TOL",
    "RewardFn",
    "answer_reward",
    "answers_match",
    "exact_answer",
    "extract_answer",
    "final_number_answer",
    "format_reward",
    "last_number",
    "normalize_number",
]

RewardFn = Callable[..., list[float | None]]  # fn(prompts, responses, **columns) -> one score (or None) per row

FLOAT_REL_TOL = Fraction(1, 10**9)  # relative tolerance, used only when the reference is a Python float
MAX_EXPONENT = 1000  # "1e999999999" is not treated as a number: building it would stall the batch

# --- extracting the final answer ------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "the answer is 42", "Answer: 42", "**Final answer:** 42", "#### 42" (GSM8K); case-insensitive, anywhere in a line
_MARKER = re.compile(r"answer(?:\s+is\b|\s*[*_]*\s*:)|####", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
# an "Answer:" line: at the start of a line (after markdown bullets/emphasis), with something after the colon
_ANSWER_LINE = re.compile(r"^[ \t>*_#-]*(?:final\s+)?answer\s*[*_]*\s*:[ \t*_]*[^\s*_]", re.IGNORECASE | re.MULTILINE)


def _braced(text: str, start: int) -> str | None:
    """The content between the '{' just before `start` and its matching '}', or None when it is never closed."""
    depth = 1
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":  # an escaped character such as \{ or \} does not count
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _last_boxed(text: str) -> str | None:
    """The stripped content of the last complete, non-empty \\boxed{...} or \\fbox{...} in `text`."""
    for m in reversed(list(_BOXED.finditer(text))):
        content = _braced(text, m.end())
        if content is not None and content.strip():
            return content.strip()
    return None


def _after_marker(text: str) -> str | None:
    """The text after the last answer marker that has something after it, up to the end of its line or sentence."""
    for m in reversed(list(_MARKER.finditer(text))):
        line_end = text.find("\n", m.end())
        rest = text[m.end():line_end if line_end >= 0 else len(text)].lstrip(" \t:*_")
        end = _SENTENCE_END.search(rest)
        if end is not None:
            rest = rest[:end.start()]
        rest = rest.strip(" \t*_")
        if rest:
            return rest
    return None


def extract_answer(text: str) -> str | None:
    """The final answer a response states, or None when it states none.

    Looked for in this order, the first that is found wins:
    1. the content of the LAST complete `\\boxed{...}` or `\\fbox{...}` (braces balanced, nesting allowed; an
       unclosed or empty box, e.g. in a truncated response, is skipped);
    2. the text after the last "answer is", "Answer:" (also "Final answer:", "**Answer:**") or "####" marker, up to the
       end of its line or sentence (a '.', '!' or '?' followed by a space or the end; "3.5" stays whole). Markers are
       case-insensitive; one with nothing after it on its line is skipped for the one before it. A markdown heading
       "####" counts as a marker too: prefer boxed answers where headings are likely.

    >>> extract_answer(r"so $x = \\boxed{\\frac{1}{2}}$")
    '\\\\frac{1}{2}'
    >>> extract_answer("Adding them up, the answer is 42.")
    '42'
    >>> extract_answer("... 1,000 + 234\\n#### 1,234")
    '1,234'
    >>> extract_answer("I am not sure.") is None
    True
    """
    boxed = _last_boxed(text)
    return boxed if boxed is not None else _after_marker(text)


_NUMBER_IN_TEXT = re.compile(r"""
    (?<![\w.])                                  # not the tail of a word ("x2") or of a dotted version ("1.2.3")
    (?:[-+\u2212](?:\\?\$)?|(?:\\?\$)[-+\u2212]?)?  # a sign and/or a dollar: "-", "$", "-$", "$-"
    (?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?  # 1,234 or 1234, optional decimals
    (?:[eE][-+]?\d+)?                           # optional exponent: 1e3
    (?:\\?%)?                                   # optional percent: 5% or 5\\%
    |(?<![\w.])[-+\u2212]?\.\d+(?:\\?%)?          # .5
""", re.VERBOSE | re.ASCII)  # ASCII: \d is 0-9, not every script's digits


def last_number(text: str) -> str | None:
    """The last number in `text`, as written (with its sign, $, thousands commas or %), or None when there is none.

    A '-' counts as a sign only when it does not follow a word or number ("5-3" ends in "3", "= -3" in "-3").

    >>> last_number("It costs $1,234.50 in total.")
    '$1,234.50'
    >>> last_number("The temperature fell to -7.5 degrees")
    '-7.5'
    >>> last_number("no digits here") is None
    True
    """
    last = None
    for last in _NUMBER_IN_TEXT.finditer(text):
        pass
    return last.group(0) if last is not None else None


# --- parsing numbers ----------------------------------------------------------------------------------------------

_PLAIN = re.compile(r"""
    (?P<sign>[-+]?)\s*
    (?P<int>\d{1,3}(?:,\d{3})+|\d{1,3}(?:\ \d{3})+|\d*)  # 1,234 or 1 234 (groups of three) or 1234
    (?:\.(?P<frac>\d*))?
    (?:[eE](?P<exp>[-+]?\d+))?
""", re.VERBOSE | re.ASCII)
_FRAC = re.compile(r"\\[dt]?frac\s*(?:\{(?P<a>[^{}]*)\}\s*\{(?P<b>[^{}]*)\}|(?P<a1>\d)(?P<b1>\d))", re.ASCII)
_DECORATION = re.compile(r"""
    (?P<sign1>[-+]?)\s*(?P<dollar>(?:\\?\$)?)\s*(?P<sign2>[-+]?)\s*   # sign and currency, either order
    (?P<body>.*?)
    \s*(?P<pct>(?:\\?%)?)
""", re.VERBOSE | re.DOTALL)


def _plain(text: str) -> Fraction | None:
    """A plain decimal number ("-1,234.50", "1e3", ".5"), exactly; None when `text` is anything else."""
    m = _PLAIN.fullmatch(text.strip())
    if m is None or not (m["int"] or m["frac"]):
        return None
    if m["exp"] is not None and abs(int(m["exp"])) > MAX_EXPONENT:
        return None
    frac = m["frac"] or ""
    try:
        digits = int(m["int"].replace(",", "").replace(" ", "") + frac or "0")
    except ValueError:  # more digits than Python will convert
        return None
    scale = len(frac) - int(m["exp"] or 0)  # value = digits / 10**scale
    value = Fraction(digits, 10**scale) if scale > 0 else Fraction(digits * 10**-scale)
    return -value if m["sign"] == "-" else value


def _ratio(a: str, b: str) -> Fraction | None:
    num, den = _plain(a), _plain(b)
    if num is None or den is None or den == 0:
        return None
    return num / den


def _strip_math_delimiters(s: str) -> str:
    """'$x$' -> 'x', '\\(x\\)' -> 'x', '\\[x\\]' -> 'x' (one layer, repeated while one wraps the whole text)."""
    while True:
        s = s.strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$" and not s.endswith("\\$"):
            s = s[1:-1]
        elif s[:2] in ("\\(", "\\[") and s[-2:] == {"\\(": "\\)", "\\[": "\\]"}[s[:2]]:
            s = s[2:-2]
        else:
            return s


def normalize_number(text: str) -> Fraction | None:
    """Parse a number written in any common way into an exact `Fraction`; None when `text` is not one number.

    Accepted: surrounding spaces and math delimiters ($..$, \\(..\\)); a sign ("+3", "-3", unicode minus); a currency
    "$" or "\\$" before or after the sign; thousands separators in groups of three ("1,234", "1 234", "1{,}234",
    "1\\,234"); decimals with any trailing zeros ("2.50" == "2.5"); a trailing sentence period ("42."); exponents
    ("1e3", "2.5E-2"); a trailing "%" or "\\%", dropped with the number kept as written ("3%" -> 3); fractions
    "3/4", "\\frac{3}{4}", "\\dfrac", "\\tfrac" and "\\frac34". A comma that is not a thousands separator ("1,5") makes
    it not a number, as does a zero denominator, an exponent beyond +-1000, or any other text.

    >>> normalize_number("$1,234.50")
    Fraction(2469, 2)
    >>> normalize_number(r"-\\frac{3}{4}") == normalize_number("-0.75") == normalize_number("-3/4")
    True
    >>> normalize_number("about 5") is None
    True
    """
    s = text.replace("\u2212", "-").replace("{,}", ",").replace("\\,", " ").replace("\\!", "")
    s = _strip_math_delimiters(s)
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1]
    m = _DECORATION.fullmatch(s)
    if m is None or (m["sign1"] and m["sign2"]):
        return None
    sign, body = m["sign1"] or m["sign2"], m["body"]
    frac = _FRAC.fullmatch(body)
    if frac is not None:
        value = _ratio(frac["a"], frac["b"]) if frac["a"] is not None else _ratio(frac["a1"], frac["b1"])
    elif body.count("/") == 1:
        value = _ratio(*body.split("/"))
    else:
        value = _plain(body) if body[:1] not in "+-" else None  # a second sign ("--3") is not a number
    if value is None:
        return None
    return -value if sign == "-" else value


# --- comparing answers ----------------------------------------------------------------------------------------------

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_SPACES = re.compile(r"\s+")


def _normalize_text(s: str) -> str:
    """Strip, unwrap \\text{..}, drop surrounding $ and math delimiters and trailing periods, collapse spaces, lowercase."""
    while True:
        unwrapped = _TEXT_WRAPPER.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    previous = None
    while s != previous:
        previous = s
        s = _strip_math_delimiters(s).strip("$").rstrip(".").strip()
    return _SPACES.sub(" ", s).lower()


def _as_number(s: str) -> Fraction | None:
    value = normalize_number(s)
    return value if value is not None else normalize_number(_normalize_text(s))


def answers_match(predicted: str | None, reference: str | int | float) -> bool:
    """Whether a predicted answer equals the reference.

    When both parse as numbers (`normalize_number`) they must be equal exactly, except that a Python float reference
    is compared with a relative tolerance of `FLOAT_REL_TOL` (1e-9). Otherwise the two texts are compared after
    normalisation: surrounding space, $ and trailing periods stripped, `\\text{..}` unwrapped, whitespace collapsed,
    case ignored. No prediction (None) and a NaN or infinite reference never match.

    >>> answers_match("2.50", "2.5"), answers_match(r"\\frac{1}{2}", 0.5), answers_match("1,000", 1000)
    (True, True, True)
    >>> answers_match(r"\\text{ Paris }.", "paris"), answers_match("0.333", "1/3")
    (True, False)
    """
    if predicted is None:
        return False
    if isinstance(reference, float):
        if not math.isfinite(reference):
            return False
        value, target = _as_number(predicted), Fraction(reference)
        return value is not None and abs(value - target) <= FLOAT_REL_TOL * max(abs(value), abs(target))
    target = Fraction(reference) if isinstance(reference, int) else _as_number(str(reference))
    value = _as_number(predicted) if target is not None else None
    if value is not None:
        return value == target
    return _normalize_text(predicted) == _normalize_text(str(reference))


# --- reward functions ----------------------------------------------------------------------------------------------

def _check_rows(name: str, prompts: Sequence[Any], responses: Sequence[Any], **others: Sequence[Any]) -> None:
    """Raise ValueError unless `prompts`, `responses` and every other list have one entry per row."""
    if len(prompts) != len(responses):
        raise ValueError(f"{name}: got {len(prompts)} prompts but {len(responses)} responses; "
                         f"pass one response per prompt")
    for column, values in others.items():
        if len(values) != len(responses):
            raise ValueError(f"{name}: got {len(responses)} responses but {len(values)} values in column "
                             f"'{column}'; every dataset column must have one entry per row")


def _not_judged(reference: object) -> bool:
    return reference is None or (isinstance(reference, float) and math.isnan(reference))


def answer_reward(column: str = "answer", allow_bare_number: bool = False) -> RewardFn:
    """Build a 0/1 reward: 1.0 when a response's final answer matches the row's reference in dataset column `column`.

    The final answer is `extract_answer(response)`; with `allow_bare_number=True`, a response that states none in
    the asked format is judged by its `last_number` instead (the default is strict: the format is part of the task).
    Answers are compared with `answers_match`. A row whose reference is None (or a float NaN, as pandas writes
    missing values) is not judged: its score is None. Unknown columns are ignored; lists of different lengths
    raise ValueError.

    >>> reward = answer_reward(column="solution")
    >>> responses = ["\\\\boxed{2}", "Answer: 5", "6"]
    >>> reward(["1+1?", "2+2?", "3+3?"], responses, solution=["2", 4, None], source=["a"] * 3)
    [1.0, 0.0, None]
    >>> answer_reward(allow_bare_number=True)(["2+2?"], ["2 plus 2 makes 4"], answer=["4"])
    [1.0]
    """
    name = ("final_number_" if allow_bare_number else "exact_") + column
    if column == "answer":
        name = "final_number_answer" if allow_bare_number else "exact_answer"

    def reward(prompts: list[str], responses: list[str], **columns: list[Any]) -> list[float | None]:
        if column not in columns:
            raise ValueError(f"{name}: needs the dataset column '{column}' with the reference answers, but the batch "
                             f"has columns {sorted(columns)}; add it to the dataset or pass answer_reward(column=...)")
        references = columns[column]
        _check_rows(name, prompts, responses, **{column: references})
        scores: list[float | None] = []
        for response, reference in zip(responses, references):
            if _not_judged(reference):
                scores.append(None)
                continue
            predicted = extract_answer(response)
            if predicted is None and allow_bare_number:
                predicted = last_number(response)
            scores.append(1.0 if answers_match(predicted, reference) else 0.0)
        return scores

    reward.__name__ = reward.__qualname__ = name
    reward.verifies = True  # 1.0 means correct: online RL logs the judged rows' mean as accuracy/<name>
    found_by = "extract_answer, else last_number" if allow_bare_number else "extract_answer"
    reward.__doc__ = (f"1.0 when a response's final answer ({found_by}) matches column '{column}', 0.0 when not, "
                      f"None where the reference is None. See answer_reward.")
    return reward


exact_answer = answer_reward()
exact_answer.__doc__ = """1.0 when the response's `extract_answer` matches the row's `answer`, 0.0 if not, None for a None answer.

    >>> exact_answer(["2+2?", "2+2?"], ["The answer is 4.", "It is 4"], answer=["4", "4"])
    [1.0, 0.0]
    """

final_number_answer = answer_reward(allow_bare_number=True)
final_number_answer.__doc__ = """Like `exact_answer`, but a response with no marked answer is judged by its last number.

    >>> final_number_answer(["2+2?", "2+2?"], ["The answer is 4.", "It is 4"], answer=["4", "4"])
    [1.0, 1.0]
    """


def format_reward(prompts: list[str], responses: list[str], **columns: list[Any]) -> list[float]:
    """1.0 when a response states its final answer in the asked format, else 0.0; it does not check the answer.

    The asked format is a complete, non-empty `\\boxed{...}` (or `\\fbox{...}`) anywhere, or an "Answer:" line: a line
    starting with "Answer:" or "Final answer:" (markdown bullets and bold allowed) with something after the colon.
    Looser phrasings that `extract_answer` still reads ("the answer is 4", "#### 4") do not count. Columns are ignored.

    >>> format_reward(["q"] * 4, ["\\\\boxed{7}", "Work...\\nAnswer: 7", "**Final answer:** 7", "It is 7"])
    [1.0, 1.0, 1.0, 0.0]
    """
    _check_rows("format_reward", prompts, responses)
    return [1.0 if _last_boxed(r) is not None or _ANSWER_LINE.search(r) else 0.0 for r in responses]
