"""Typed examples and the parsers that turn rows into them, accepting TRL's field conventions.

SFT rows (:func:`parse_sft_row`), first match wins:

- ``messages``: a list of ``{"role", "content"}``; the last message must be the assistant's.
  prompt = the chat template over ``messages[:-1]`` with the generation prompt, completion =
  the rest of the template over all of ``messages``. A conversation with several assistant turns
  (a multi-turn chat, a game, an agent's trace with ``tool`` messages) is trained on every
  assistant turn, end-of-turn token included, and on nothing else: prompt = the messages before
  the first assistant turn.
- ``prompt`` + ``completion`` (or ``response``): both text, or both message lists (TRL's
  conversational prompt-completion, rendered the same way as ``messages``); a text
  completion after a message-list prompt is taken as the assistant's reply.
- ``text``: plain language-model text, no prompt (``SFTExample(prompt=None, completion=text)``).
- ``completion_field='chosen'`` (for instance) reads the completion from that field instead,
  so a preference file can be used for SFT on its preferred answers. Without a ``prompt``
  the field holds the whole example (text, or a full conversation).

Preference rows (:func:`parse_preference_row`): ``chosen`` and ``rejected`` (text or message
lists), an optional ``prompt`` and an optional numeric ``margin``.

- With a message-list ``prompt``, ``chosen``/``rejected`` may be the assistant turn(s) only,
  full conversations that start with the prompt, or plain text (the assistant's reply).
- Without ``prompt`` (TRL's implicit prompt), the prompt is what chosen and rejected share:
  for message lists the common leading messages; for text, the common leading text up to
  its last whitespace character (so "...Assistant: Sure" / "...Assistant: No" split as
  "...Assistant:" + " Sure" / " No", the HH-RLHF layout).

Prompt rows (:func:`parse_prompt_row`): ``prompt`` (text, or a message list rendered with the
generation prompt), or ``messages`` (a final assistant message, if any, is dropped so SFT
conversation files can serve as prompt files).

Bad-row policy. Preference rows whose chosen and rejected are identical (as given, or once
rendered) carry no preference signal: they are skipped and counted in the ``skipped`` dict
that :func:`load_preference_examples` returns (key ``"chosen == rejected"``); the parser
returns None for them. Everything else malformed -- a missing field, a wrong type (a number
where text is expected...), empty or whitespace-only text, a message without role/content,
a conversation not ending with the assistant, a margin on some rows but not others --
raises :class:`DataError` at the first bad row, naming file, row and field. Text is never
stripped or otherwise altered.

Rendering message lists needs a tokenizer with a chat template (pass ``tokenizer``); plain
text rows need none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quartet.data.errors import DataError, describe_type
from quartet.data.readers import Row, read_rows

SFT_HINT = "an SFT row needs 'prompt'+'completion' (or 'response'), 'messages', or 'text'"
PREFERENCE_HINT = ("a preference row needs 'chosen' and 'rejected' (text or message lists), with an optional "
                   "'prompt' and an optional numeric 'margin'")
PROMPT_HINT = "a prompt row needs 'prompt' (text or a message list) or 'messages'"
SKIP_IDENTICAL = "chosen == rejected"

Messages = list[dict[str, Any]]


@dataclass
class SFTExample:
    """A supervised example: the model learns `completion` given `prompt` (None for plain text).

    An agent's trace (a conversation with `tool` turns) also has `segments`: the completion in
    pieces, each with whether it is trained (the assistant turns, their end-of-turn token included)
    or context (tool results, user turns, the chat template's role markers).
    """

    prompt: str | None
    completion: str
    segments: list[tuple[str, bool]] | None = None


@dataclass
class PreferenceExample:
    """A preference pair: `chosen` is preferred to `rejected` after `prompt` (by `margin`, if given)."""

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None


@dataclass
class PromptExample:
    """A prompt to generate from (online RL), already rendered to text, and the row's other fields
    (e.g. a verifiable task's `answer`), which reward functions receive as keyword columns."""

    prompt: str
    columns: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- field checks


def _present(row: Row, name: str) -> bool:
    return row.data.get(name) is not None


def _missing(row: Row, name: str, hint: str) -> DataError:
    return row.error(f"field '{name}' is missing ({hint})", name)


def _check_text(row: Row, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise row.error(f"field '{name}' must be text, found {describe_type(value)}", name)
    if not value.strip():
        raise row.error(f"field '{name}' is empty or only whitespace (fill it in or remove the row)", name)
    return value


def _text(row: Row, name: str, hint: str) -> str:
    if not _present(row, name):
        raise _missing(row, name, hint)
    return _check_text(row, name, row.data[name])


def _check_messages(row: Row, name: str, value: list) -> Messages:
    if not value:
        raise row.error(f"field '{name}' is an empty list of messages (it needs at least one "
                        f"{{'role': ..., 'content': ...}})", name)
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise row.error(f"field '{where}' must be a message object {{'role': ..., 'content': ...}}, "
                            f"found {describe_type(msg)}", name)
        for key in ("role", "content"):
            if msg.get(key) is None:
                raise row.error(f"field '{where}' has no '{key}' (each message needs 'role' and 'content' text)",
                                name)
            if not isinstance(msg[key], str):
                raise row.error(f"field '{where}' has a '{key}' that is {describe_type(msg[key])}; it must be text",
                                name)
            if not msg[key].strip():
                raise row.error(f"field '{where}' has an empty '{key}' (fill it in or remove the row)", name)
    return value


def _text_or_messages(row: Row, name: str, hint: str) -> str | Messages:
    if not _present(row, name):
        raise _missing(row, name, hint)
    value = row.data[name]
    if isinstance(value, (list, tuple)):
        return _check_messages(row, name, list(value))
    if not isinstance(value, str):
        raise row.error(f"field '{name}' must be text or a list of messages, found {describe_type(value)}", name)
    return _check_text(row, name, value)


def _margin(row: Row) -> float | None:
    value = row.data.get("margin")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # CSV cells are text
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None:
        raise row.error(f"field 'margin' must be a number, found {describe_type(value)} ({value!r:.40})", "margin")
    if not math.isfinite(number):
        raise row.error(f"field 'margin' must be a finite number, found {value!r}", "margin")
    return number


# ----------------------------------------------------------------------------- chat rendering


def _render(row: Row, tokenizer: Any, messages: Messages, add_generation_prompt: bool, name: str,
            tools: list[dict] | None = None) -> str:
    if tokenizer is None:
        raise row.error(f"field '{name}' holds messages, which need a tokenizer's chat template to render: pass "
                        f"the tokenizer to the parser/loader", name)
    if not getattr(tokenizer, "chat_template", None):
        raise row.error(f"field '{name}' holds messages but the tokenizer has no chat template (give it one, e.g. "
                        f"quartet.models.tokenizer.ensure_chat_template(tokenizer))", name)
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors: the template rejected these messages
        raise row.error(f"field '{name}': the chat template cannot render these messages "
                        f"({type(e).__name__}: {e})", name) from None
    if not isinstance(text, str):
        raise row.error(f"field '{name}': apply_chat_template returned {describe_type(text)}, not text", name)
    return text


def _require_assistant_last(row: Row, name: str, messages: Messages) -> None:
    role = messages[-1]["role"]
    if role != "assistant":
        raise row.error(f"field '{name}': the last message must be the assistant's (role 'assistant'), found "
                        f"role '{role}' (the model learns to produce the final assistant turn)", name)


def _render_split(row: Row, tokenizer: Any, prompt: Messages, completion: Messages, name: str) -> tuple[str, str]:
    """(prompt text with the generation prompt, the rest of the full conversation's text)."""
    _require_assistant_last(row, name, completion)
    prompt_text = _render(row, tokenizer, prompt, True, name)
    full = _render(row, tokenizer, prompt + completion, False, name)
    if not full.startswith(prompt_text):
        raise row.error(f"field '{name}': the chat template renders the conversation so that it does not start "
                        f"with the rendered prompt, so the completion cannot be separated (use a template where "
                        f"rendering more messages only appends text)", name)
    completion_text = full[len(prompt_text):]
    if not completion_text.strip():
        raise row.error(f"field '{name}': the assistant's reply renders to empty text", name)
    return prompt_text, completion_text


def _as_turns(row: Row, name: str, value: str | Messages, prompt: Messages) -> Messages:
    """The reply turns in `value`: text is the assistant's reply; a full conversation loses its prompt prefix."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if len(value) > len(prompt) and value[: len(prompt)] == prompt:
        return value[len(prompt):]
    return value


# ----------------------------------------------------------------------------- SFT


def _sft_from_messages(row: Row, tokenizer: Any, messages: Messages, name: str) -> SFTExample:
    _require_assistant_last(row, name, messages)
    if sum(m["role"] == "assistant" for m in messages) > 1 or any(m["role"] == "tool" for m in messages):
        return _agent_trace(row, tokenizer, messages, name)
    prompt, completion = _render_split(row, tokenizer, messages[:-1], messages[-1:], name)
    return SFTExample(prompt=prompt, completion=completion)


def _agent_trace(row: Row, tokenizer: Any, messages: Messages, name: str) -> SFTExample:
    """A multi-turn conversation (an agent's trace, a game, a chat): everything from its first assistant turn on
    is the completion, in segments; the assistant turns (up to and including the end-of-turn token) are
    trained, the user, tool and template tokens between them are context."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if first == 0:
        raise row.error(f"field '{name}': the conversation starts with the assistant: there is no prompt", name)
    prompt = _render(row, tokenizer, messages[:first], True, name)
    eos = getattr(tokenizer, "eos_token", None) or ""
    segments, done = [], prompt
    for i in range(first, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        opened = _render(row, tokenizer, messages[:i], True, name)
        closed = _render(row, tokenizer, messages[:i + 1], False, name)
        if not (opened.startswith(done) and closed.startswith(opened)):
            raise row.error(f"field '{name}': the chat template does not render this conversation by appending "
                            f"turns (message {i}), so its assistant turns cannot be separated", name)
        turn = closed[len(opened):]  # the assistant's text and what the template closes its turn with
        cut = turn.find(eos) + len(eos) if eos and eos in turn else len(turn)
        segments += [(opened[len(done):], False), (turn[:cut], True), (turn[cut:], False)]
        done = closed
    segments = [(text, trained) for text, trained in segments if text]
    return SFTExample(prompt=prompt, completion="".join(text for text, _ in segments), segments=segments)


def _sft_prompt_completion(row: Row, tokenizer: Any, prompt: str | Messages, completion: str | Messages,
                           completion_name: str) -> SFTExample:
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise row.error(f"field '{completion_name}' is a message list but 'prompt' is text: give both as text "
                            f"or both as message lists", completion_name)
        return SFTExample(prompt=prompt, completion=completion)
    turns = _as_turns(row, completion_name, completion, prompt)
    p, c = _render_split(row, tokenizer, prompt, turns, completion_name)
    return SFTExample(prompt=p, completion=c)


def parse_sft_row(row: Row, tokenizer: Any = None, completion_field: str | None = None) -> SFTExample:
    """An SFTExample from `row` (conventions in the module docstring); raises DataError if malformed."""
    if completion_field:
        hint = f"completion_field='{completion_field}' reads each row's completion from '{completion_field}'"
        value = _text_or_messages(row, completion_field, hint)
        if _present(row, "prompt"):
            prompt = _text_or_messages(row, "prompt", SFT_HINT)
            return _sft_prompt_completion(row, tokenizer, prompt, value, completion_field)
        if isinstance(value, str):
            return SFTExample(prompt=None, completion=value)
        return _sft_from_messages(row, tokenizer, value, completion_field)

    if _present(row, "messages"):
        value = row.data["messages"]
        if not isinstance(value, (list, tuple)):
            raise row.error(f"field 'messages' must be a list of {{'role', 'content'}} objects, found "
                            f"{describe_type(value)}", "messages")
        return _sft_from_messages(row, tokenizer, _check_messages(row, "messages", list(value)), "messages")
    completion_name = next((n for n in ("completion", "response") if _present(row, n)), None)
    if _present(row, "prompt") or completion_name:
        if not _present(row, "prompt"):
            raise _missing(row, "prompt", SFT_HINT + "; rows without a prompt use 'text'")
        if completion_name is None:
            extra = ("; this looks like a preference row: completion_field='chosen' trains on the preferred answers"
                     if _present(row, "chosen") else "")
            raise _missing(row, "completion", SFT_HINT + extra)
        prompt = _text_or_messages(row, "prompt", SFT_HINT)
        completion = _text_or_messages(row, completion_name, SFT_HINT)
        return _sft_prompt_completion(row, tokenizer, prompt, completion, completion_name)
    if _present(row, "text"):
        return SFTExample(prompt=None, completion=_text(row, "text", SFT_HINT))
    raise row.error(f"no SFT fields found; the row has {_fields(row)} ({SFT_HINT}; for a preference file use "
                    f"completion_field='chosen')")


def preference_to_sft(example: PreferenceExample) -> SFTExample:
    """SFT on the preferred answer: prompt -> chosen."""
    return SFTExample(prompt=example.prompt or None, completion=example.chosen)


# ----------------------------------------------------------------------------- preferences


def _shared_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    shared = chosen[:n]
    cut = max((i for i, ch in enumerate(shared) if ch.isspace()), default=0)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def parse_preference_row(row: Row, tokenizer: Any = None) -> PreferenceExample | None:
    """A PreferenceExample from `row`, or None when chosen == rejected (skipped by policy); DataError if malformed."""
    chosen = _text_or_messages(row, "chosen", PREFERENCE_HINT)
    rejected = _text_or_messages(row, "rejected", PREFERENCE_HINT)
    margin = _margin(row)
    if chosen == rejected:
        return None
    if _present(row, "prompt"):
        prompt = _text_or_messages(row, "prompt", PREFERENCE_HINT)
        if isinstance(prompt, str):
            for name, value in (("chosen", chosen), ("rejected", rejected)):
                if not isinstance(value, str):
                    raise row.error(f"field '{name}' is a message list but 'prompt' is text: give all three as "
                                    f"text or all as message lists", name)
            p, c, r = prompt, chosen, rejected
        else:
            p, c = _render_split(row, tokenizer, prompt, _as_turns(row, "chosen", chosen, prompt), "chosen")
            _, r = _render_split(row, tokenizer, prompt, _as_turns(row, "rejected", rejected, prompt), "rejected")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        p, c, r = _shared_text_prompt(chosen, rejected)
        for name, value in (("chosen", c), ("rejected", r)):
            if not value.strip():
                raise row.error(f"field '{name}' is empty once the text it shares with the other answer is taken "
                                f"as the prompt; add an explicit 'prompt' field", name)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise row.error("fields 'chosen' and 'rejected' share no leading messages, so the prompt cannot be "
                            "inferred; add a 'prompt' field", "prompt")
        prompt = chosen[:n]
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if len(value) == n:
                raise row.error(f"field '{name}' has no turns after the messages it shares with the other answer "
                                f"(the inferred prompt); add an explicit 'prompt' field", name)
        p, c = _render_split(row, tokenizer, prompt, chosen[n:], "chosen")
        _, r = _render_split(row, tokenizer, prompt, rejected[n:], "rejected")
    else:
        raise row.error("fields 'chosen' and 'rejected' must both be text or both be message lists", "chosen")
    if c == r:
        return None
    return PreferenceExample(prompt=p, chosen=c, rejected=r, margin=margin)


# ----------------------------------------------------------------------------- prompts


def parse_prompt_row(row: Row, tokenizer: Any = None, tools: list[dict] | None = None) -> PromptExample:
    """A PromptExample from `row` (text as-is; messages rendered with the generation prompt and, for an
    agent with tools, the tools' schemas)."""
    columns = {k: v for k, v in row.data.items() if k not in ("prompt", "messages")}
    if _present(row, "prompt"):
        value = _text_or_messages(row, "prompt", PROMPT_HINT)
        if isinstance(value, str):
            return PromptExample(prompt=value, columns=columns)
        return PromptExample(prompt=_render(row, tokenizer, value, True, "prompt", tools), columns=columns)
    if _present(row, "messages"):
        value = row.data["messages"]
        if not isinstance(value, (list, tuple)):
            raise row.error(f"field 'messages' must be a list of {{'role', 'content'}} objects, found "
                            f"{describe_type(value)}", "messages")
        messages = _check_messages(row, "messages", list(value))
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise row.error("field 'messages' holds only an assistant reply, so there is no prompt to generate from",
                            "messages")
        return PromptExample(prompt=_render(row, tokenizer, messages, True, "messages", tools), columns=columns)
    raise _missing(row, "prompt", f"{PROMPT_HINT}; the row has {_fields(row)}")


# ----------------------------------------------------------------------------- loaders


def _fields(row: Row) -> str:
    names = [k for k, v in row.data.items() if v is not None]
    return f"fields {names}" if names else "no fields"


def load_sft_examples(path: str | Path, tokenizer: Any = None, completion_field: str | None = None,
                      split: str | None = None) -> list[SFTExample]:
    """Read and parse every SFT row of `path` (see parse_sft_row); raises DataError at the first bad row."""
    return [parse_sft_row(row, tokenizer, completion_field) for row in read_rows(path, split=split)]


def load_preference_examples(path: str | Path, tokenizer: Any = None,
                             split: str | None = None) -> tuple[list[PreferenceExample], dict[str, int]]:
    """(pairs, skipped counts by reason) from `path`; rows with chosen == rejected are skipped, not errors."""
    examples: list[PreferenceExample] = []
    skipped = {SKIP_IDENTICAL: 0}
    first_with: Row | None = None
    first_without: Row | None = None
    for row in read_rows(path, split=split):
        example = parse_preference_row(row, tokenizer)
        if example is None:
            skipped[SKIP_IDENTICAL] += 1
            continue
        if example.margin is None:
            first_without = first_without or row
        else:
            first_with = first_with or row
        examples.append(example)
    if first_with is not None and first_without is not None:
        raise first_without.error(f"field 'margin' is missing here but present on other rows (first at "
                                  f"{first_with.unit} {first_with.index}); give every row a margin, or none",
                                  "margin")
    return examples, skipped


def load_prompts(path: str | Path, tokenizer: Any = None, split: str | None = None,
                 tools: list[dict] | None = None) -> list[PromptExample]:
    """Read and parse every prompt row of `path` (see parse_prompt_row); raises DataError at the first bad row."""
    return [parse_prompt_row(row, tokenizer, tools) for row in read_rows(path, split=split)]
