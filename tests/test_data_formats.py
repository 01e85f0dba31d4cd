"""Row parsing: TRL's SFT / preference / prompt conventions, DataError messages, bad-row policy."""

import json
from pathlib import Path

import pytest

from asset_paths import HH_SAMPLE
from quartet.data import (
    DataError,
    PreferenceExample,
    PromptExample,
    Row,
    SFTExample,
    load_preference_examples,
    load_prompts,
    load_sft_examples,
    parse_preference_row,
    parse_prompt_row,
    parse_sft_row,
    preference_to_sft,
)
from quartet.models.tokenizer import train_bpe_tokenizer

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(["Hello there, how are you? I am fine, thanks.", "What is two plus two? Four."] * 5,
                               vocab_size=300)


def row(data: dict, index: int = 1, source: str = "data.jsonl") -> Row:
    return Row(source=source, index=index, data=data)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def sft_error(data, tokenizer=None, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        parse_sft_row(row(data, index=7), tokenizer, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- SFT conventions


def test_sft_prompt_completion_and_response():
    assert parse_sft_row(row({"prompt": "Q: hi", "completion": " A: yo"})) == SFTExample("Q: hi", " A: yo")
    assert parse_sft_row(row({"prompt": "Q", "response": "R"})) == SFTExample("Q", "R")


def test_sft_text_has_no_prompt():
    assert parse_sft_row(row({"text": "Once upon a time"})) == SFTExample(None, "Once upon a time")


def test_sft_messages_render_with_the_chat_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!")]
    ex = parse_sft_row(row({"messages": msgs}), tok)
    assert ex.prompt == f"<|system|>Be brief.{EOS}<|user|>Hi{EOS}<|assistant|>"
    assert ex.completion == f"Hello!{EOS}"


def test_sft_conversational_prompt_completion_trains_the_completion_and_messages_every_assistant_turn(tok):
    msgs = [user("Hi"), assistant("Hello"), user("Bye"), assistant("See you")]
    as_pair = parse_sft_row(row({"prompt": msgs[:-1], "completion": msgs[-1:]}), tok)
    text_reply = parse_sft_row(row({"prompt": msgs[:-1], "completion": "See you"}), tok)
    assert as_pair == text_reply and as_pair.segments is None
    assert as_pair.prompt == f"<|user|>Hi{EOS}<|assistant|>Hello{EOS}<|user|>Bye{EOS}<|assistant|>"
    assert as_pair.completion == f"See you{EOS}"
    # the same conversation as `messages`: every assistant turn is trained, the user's turn between is context
    as_messages = parse_sft_row(row({"messages": msgs}), tok)
    assert as_messages.prompt == f"<|user|>Hi{EOS}<|assistant|>"
    assert as_messages.segments == [(f"Hello{EOS}", True), (f"<|user|>Bye{EOS}<|assistant|>", False),
                                    (f"See you{EOS}", True)]
    assert as_messages.prompt + as_messages.completion == as_pair.prompt + as_pair.completion


def test_sft_completion_field_reads_chosen():
    data = {"prompt": "P", "chosen": " good", "rejected": " bad"}
    assert parse_sft_row(row(data), completion_field="chosen") == SFTExample("P", " good")


def test_sft_completion_field_without_prompt_is_the_whole_example(tok):
    assert parse_sft_row(row({"chosen": "all of it"}), completion_field="chosen") == SFTExample(None, "all of it")
    ex = parse_sft_row(row({"chosen": [user("Hi"), assistant("Yo")]}), tok, completion_field="chosen")
    assert ex == SFTExample(f"<|user|>Hi{EOS}<|assistant|>", f"Yo{EOS}")


# ----------------------------------------------------------------------------- SFT errors


def test_sft_missing_completion_message_names_file_line_field_and_fix():
    msg = sft_error({"prompt": "Q"})
    assert msg.startswith("data.jsonl, line 7: field 'completion' is missing")
    assert "'messages'" in msg and "'text'" in msg and "'response'" in msg


def test_sft_error_attributes():
    with pytest.raises(DataError) as info:
        parse_sft_row(row({"prompt": "Q"}, index=4, source="x.jsonl"))
    assert (info.value.path, info.value.row, info.value.field) == ("x.jsonl", 4, "completion")


def test_sft_missing_prompt():
    msg = sft_error({"completion": "A"})
    assert "line 7" in msg and "field 'prompt' is missing" in msg


def test_sft_number_where_text_is_expected_names_the_type():
    msg = sft_error({"prompt": "Q", "completion": 42})
    assert "field 'completion'" in msg and "a number (int)" in msg
    assert "null" not in msg


@pytest.mark.parametrize("value", ["", "   \n\t"])
def test_sft_empty_or_whitespace_text(value):
    msg = sft_error({"prompt": "Q", "completion": value})
    assert "line 7" in msg and "'completion'" in msg and "empty" in msg


def test_sft_messages_without_content(tok):
    msg = sft_error({"messages": [user("Hi"), {"role": "assistant", "text": "oops"}]}, tok)
    assert "line 7" in msg and "messages[1]" in msg and "'content'" in msg


def test_sft_messages_without_role(tok):
    msg = sft_error({"messages": [{"content": "Hi"}, assistant("Yo")]}, tok)
    assert "messages[0]" in msg and "'role'" in msg


def test_sft_messages_must_end_with_the_assistant(tok):
    msg = sft_error({"messages": [assistant("Hi"), user("Yo")]}, tok)
    assert "line 7" in msg and "'messages'" in msg and "assistant" in msg and "'user'" in msg


def test_sft_messages_need_a_tokenizer():
    msg = sft_error({"messages": [user("Hi"), assistant("Yo")]})
    assert "tokenizer" in msg and "'messages'" in msg


def test_sft_messages_that_are_not_a_list(tok):
    assert "a list" in sft_error({"messages": "Hi"}, tok)


def test_sft_text_prompt_with_message_completion(tok):
    msg = sft_error({"prompt": "Q", "completion": [assistant("A")]}, tok)
    assert "'completion'" in msg and "both" in msg


def test_sft_row_without_known_fields_lists_its_fields():
    msg = sft_error({"question": "Q", "answer": "A"})
    assert "'question'" in msg and "'answer'" in msg and "'text'" in msg


def test_sft_completion_field_missing():
    msg = sft_error({"prompt": "P", "rejected": "r"}, completion_field="chosen")
    assert "field 'chosen' is missing" in msg


def test_load_sft_reports_the_true_line_of_a_bad_row(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"text": "fine"}\n\n{"prompt": "Q", "completion": 3.5}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_sft_examples(path)
    assert str(info.value).startswith(f"{path}, line 3: field 'completion'")
    assert "a number (float)" in str(info.value)


# ----------------------------------------------------------------------------- preferences


def test_preference_strings_and_margin():
    ex = parse_preference_row(row({"prompt": "P", "chosen": "good", "rejected": "bad", "margin": 2}))
    assert ex == PreferenceExample("P", "good", "bad", 2.0)
    assert parse_preference_row(row({"prompt": "P", "chosen": "a", "rejected": "b"})).margin is None
    assert parse_preference_row(row({"prompt": "P", "chosen": "a", "rejected": "b", "margin": "0.25"})).margin == 0.25


def test_preference_messages_assistant_turns_or_full_conversations_agree(tok):
    prompt = [user("Hi")]
    short = parse_preference_row(row({"prompt": prompt, "chosen": [assistant("Hello")],
                                      "rejected": [assistant("Go away")]}), tok)
    full = parse_preference_row(row({"prompt": prompt, "chosen": prompt + [assistant("Hello")],
                                     "rejected": prompt + [assistant("Go away")]}), tok)
    text = parse_preference_row(row({"prompt": prompt, "chosen": "Hello", "rejected": "Go away"}), tok)
    assert short == full == text == PreferenceExample(f"<|user|>Hi{EOS}<|assistant|>", f"Hello{EOS}",
                                                      f"Go away{EOS}", None)


def test_preference_implicit_prompt_from_shared_messages(tok):
    shared = [user("Hi"), assistant("Hello"), user("Joke?")]
    ex = parse_preference_row(row({"chosen": shared + [assistant("Knock knock")],
                                   "rejected": shared + [assistant("No")]}), tok)
    assert ex.prompt == f"<|user|>Hi{EOS}<|assistant|>Hello{EOS}<|user|>Joke?{EOS}<|assistant|>"
    assert (ex.chosen, ex.rejected) == (f"Knock knock{EOS}", f"No{EOS}")


def test_preference_implicit_prompt_from_shared_text():
    ex = parse_preference_row(row({"chosen": "\n\nHuman: hi\n\nAssistant: Sure thing",
                                   "rejected": "\n\nHuman: hi\n\nAssistant: Sorry"}))
    assert ex == PreferenceExample("\n\nHuman: hi\n\nAssistant:", " Sure thing", " Sorry", None)


def test_preference_identical_answers_are_skipped_not_errors(tmp_path, tok):
    assert parse_preference_row(row({"prompt": "P", "chosen": "same", "rejected": "same"})) is None
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "P1", "chosen": "a", "rejected": "b"},
        {"prompt": "P2", "chosen": "same", "rejected": "same"},
        {"chosen": [user("x"), assistant("y")], "rejected": [user("x"), assistant("y")]},
        {"prompt": "P4", "chosen": "c", "rejected": "d"},
    ])
    examples, skipped = load_preference_examples(path, tok)
    assert [e.prompt for e in examples] == ["P1", "P4"]
    assert skipped == {"chosen == rejected": 2}


@pytest.mark.parametrize("data,needle", [
    ({"prompt": "P", "chosen": "a"}, "field 'rejected' is missing"),
    ({"prompt": "P", "chosen": 1, "rejected": "b"}, "a number (int)"),
    ({"prompt": "P", "chosen": "a", "rejected": "  "}, "'rejected' is empty"),
    ({"prompt": "P", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin' must be a number"),
    ({"prompt": "P", "chosen": "a", "rejected": "b", "margin": True}, "a boolean"),
    ({"prompt": "P", "chosen": [assistant("a")], "rejected": [assistant("b")]}, "'prompt' is text"),
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("d")]}, "share no leading"),
    ({"prompt": [user("Hi")], "chosen": [user("a")], "rejected": [assistant("b")]}, "assistant"),
    ({"chosen": "a", "rejected": [assistant("b")]}, "both"),
])
def test_preference_errors(tok, data, needle):
    with pytest.raises(DataError) as info:
        parse_preference_row(row(data, index=12, source="prefs.jsonl"), tok)
    assert str(info.value).startswith("prefs.jsonl, line 12: ")
    assert needle in str(info.value)


def test_margin_on_some_rows_only_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "P", "chosen": "a", "rejected": "b", "margin": 1.0},
        {"prompt": "P", "chosen": "a", "rejected": "c"},
    ])
    with pytest.raises(DataError) as info:
        load_preference_examples(path)
    assert "m.jsonl, line 2" in str(info.value) and "'margin'" in str(info.value) and "line 1" in str(info.value)


def test_real_hh_sample_as_preferences(tok):
    examples, skipped = load_preference_examples(HH_SAMPLE, tok)
    assert len(examples) == 2000 and skipped == {"chosen == rejected": 0}
    raw = [json.loads(line) for line in HH_SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert all(e.prompt == r["prompt"] and e.chosen == r["chosen"] and e.rejected == r["rejected"]
               for e, r in zip(examples, raw))
    assert all(e.margin is None for e in examples)


def test_real_hh_sample_as_sft_on_chosen(tok):
    examples = load_sft_examples(HH_SAMPLE, tok, completion_field="chosen")
    assert len(examples) == 2000
    raw = [json.loads(line) for line in HH_SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert all(e == SFTExample(r["prompt"], r["chosen"]) for e, r in zip(examples, raw))
    prefs, _ = load_preference_examples(HH_SAMPLE, tok)
    assert [preference_to_sft(p) for p in prefs] == examples


def test_hh_sample_without_completion_field_is_a_clear_error():
    with pytest.raises(DataError) as info:
        load_sft_examples(HH_SAMPLE)
    assert "line 1" in str(info.value) and "completion_field='chosen'" in str(info.value)


# ----------------------------------------------------------------------------- prompts


def test_prompt_text_messages_and_conversations(tok):
    assert parse_prompt_row(row({"prompt": "Tell me a joke"})) == PromptExample("Tell me a joke")
    expected = PromptExample(f"<|user|>Hi{EOS}<|assistant|>")
    assert parse_prompt_row(row({"prompt": [user("Hi")]}), tok) == expected
    assert parse_prompt_row(row({"messages": [user("Hi")]}), tok) == expected
    assert parse_prompt_row(row({"messages": [user("Hi"), assistant("Yo")]}), tok) == expected


def test_prompt_errors(tok):
    with pytest.raises(DataError) as info:
        parse_prompt_row(row({"question": "Q"}, index=3))
    assert "line 3" in str(info.value) and "field 'prompt' is missing" in str(info.value)
    with pytest.raises(DataError) as info:
        parse_prompt_row(row({"prompt": ["not a message"]}), tok)
    assert "prompt[0]" in str(info.value)


def test_load_prompts_from_the_hh_sample(tok):
    prompts = load_prompts(HH_SAMPLE, tok)
    assert len(prompts) == 2000
    assert all(p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:") for p in prompts)
