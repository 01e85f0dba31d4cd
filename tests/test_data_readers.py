"""read_rows: every supported input format, and a DataError (file, line/row) for every bad input."""

import json
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

from asset_paths import HH_SAMPLE
from quartet.data import DataError, Row, read_rows

RECORDS = [
    {"prompt": "Hi there", "completion": "Hello!"},
    {"prompt": "2+2?", "completion": "4"},
    {"prompt": "Name a colour", "completion": "Blue"},
]


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def error_of(path, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        read_rows(path, **kwargs)
    return info.value


# ----------------------------------------------------------------------------- formats


def test_jsonl_rows_carry_source_and_line_numbers(tmp_path):
    path = write(tmp_path / "data.jsonl", jsonl(RECORDS))
    rows = read_rows(path)
    assert [r.data for r in rows] == RECORDS
    assert [r.index for r in rows] == [1, 2, 3]
    assert all(isinstance(r, Row) and r.source == str(path) for r in rows)


def test_jsonl_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    text = "\n" + json.dumps(RECORDS[0]) + "\n   \n\n" + json.dumps(RECORDS[1]) + "\r\n" + json.dumps(RECORDS[2])
    rows = read_rows(write(tmp_path / "gaps.jsonl", text))
    assert [r.data for r in rows] == RECORDS
    assert [r.index for r in rows] == [2, 5, 6]


def test_json_list_of_objects(tmp_path):
    rows = read_rows(write(tmp_path / "data.json", json.dumps(RECORDS, indent=2)))
    assert [r.data for r in rows] == RECORDS
    assert [r.index for r in rows] == [1, 2, 3]


def test_json_object_with_one_list_value(tmp_path):
    rows = read_rows(write(tmp_path / "data.json", json.dumps({"version": 2, "data": RECORDS})))
    assert [r.data for r in rows] == RECORDS


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    rows = read_rows(write(tmp_path / "lines.json", jsonl(RECORDS)))
    assert [r.data for r in rows] == RECORDS


def test_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pd.DataFrame(RECORDS).to_parquet(path)
    rows = read_rows(path)
    assert [r.data for r in rows] == RECORDS
    assert rows[0].unit == "row" and rows[2].index == 3


def test_parquet_with_message_lists(tmp_path):
    path = tmp_path / "chat.parquet"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    pd.DataFrame([{"messages": msgs}]).to_parquet(path)
    assert read_rows(path)[0].data == {"messages": msgs}


def test_csv_with_quoting_and_empty_cells(tmp_path):
    text = 'prompt,completion,margin\n"Hi, there","Line one\nline two",0.5\nAsk,Answer,\n'
    rows = read_rows(write(tmp_path / "data.csv", text))
    assert rows[0].data == {"prompt": "Hi, there", "completion": "Line one\nline two", "margin": "0.5"}
    assert rows[1].data == {"prompt": "Ask", "completion": "Answer", "margin": None}
    assert [r.index for r in rows] == [1, 2]


def test_save_to_disk_dataset(tmp_path):
    Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    rows = read_rows(tmp_path / "ds")
    assert [r.data for r in rows] == RECORDS


def test_save_to_disk_datasetdict_takes_train_or_the_named_split(tmp_path):
    DatasetDict({"train": Dataset.from_list(RECORDS), "test": Dataset.from_list(RECORDS[:1])}).save_to_disk(
        str(tmp_path / "dd"))
    assert [r.data for r in read_rows(tmp_path / "dd")] == RECORDS
    assert [r.data for r in read_rows(tmp_path / "dd", split="test")] == RECORDS[:1]


def test_datasetdict_without_the_split_lists_its_splits(tmp_path):
    DatasetDict({"validation": Dataset.from_list(RECORDS), "test": Dataset.from_list(RECORDS)}).save_to_disk(
        str(tmp_path / "dd"))
    err = error_of(tmp_path / "dd")
    assert "'train'" in str(err) and "'test'" in str(err) and "'validation'" in str(err)
    assert "dd" in str(err)


def test_real_hh_sample_reads_2000_rows():
    rows = read_rows(HH_SAMPLE)
    assert len(rows) == 2000
    assert set(rows[0].data) == {"prompt", "chosen", "rejected"}
    assert rows[-1].index == 2000


# ----------------------------------------------------------------------------- bad inputs


def test_missing_path(tmp_path):
    err = error_of(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(err) and "no such file" in str(err)
    assert isinstance(err, ValueError) and err.path.endswith("nope.jsonl") and err.row is None


def test_unknown_extension_lists_supported_ones(tmp_path):
    err = error_of(write(tmp_path / "data.txt", "hello"))
    msg = str(err)
    assert "data.txt" in msg and "'.txt'" in msg
    for ext in (".jsonl", ".json", ".parquet", ".csv", "save_to_disk"):
        assert ext in msg


def test_malformed_json_line_names_line_and_json_error(tmp_path):
    text = jsonl(RECORDS[:2]) + '{"prompt": "x", "completion": \n' + jsonl(RECORDS[2:])
    err = error_of(write(tmp_path / "bad.jsonl", text))
    assert str(err).startswith(f"{tmp_path / 'bad.jsonl'}, line 3: malformed JSON")
    assert "Expecting value" in str(err)
    assert err.row == 3


def test_json_line_that_is_not_an_object(tmp_path):
    err = error_of(write(tmp_path / "list.jsonl", jsonl(RECORDS[:1]) + "[1, 2]\n"))
    assert "list.jsonl, line 2" in str(err) and "a list" in str(err) and "object" in str(err)


def test_non_utf8_bytes_name_the_line(tmp_path):
    raw = jsonl(RECORDS[:2]).encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n'
    err = error_of(write(tmp_path / "latin1.jsonl", raw))
    assert "latin1.jsonl, line 3" in str(err) and "UTF-8" in str(err)


def test_non_utf8_csv(tmp_path):
    err = error_of(write(tmp_path / "latin1.csv", b"prompt,completion\ncaf\xe9,x\n"))
    assert "latin1.csv, line 2" in str(err) and "UTF-8" in str(err)


@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n"), ("empty.json", ""),
                                       ("empty.csv", "")])
def test_empty_file(tmp_path, name, text):
    err = error_of(write(tmp_path / name, text))
    assert name in str(err) and "empty" in str(err)


def test_json_empty_list_and_header_only_csv_have_no_rows(tmp_path):
    assert "no rows" in str(error_of(write(tmp_path / "e.json", "[]")))
    assert "no rows" in str(error_of(write(tmp_path / "h.csv", "prompt,completion\n")))


def test_malformed_json_document_names_its_line(tmp_path):
    err = error_of(write(tmp_path / "broken.json", '[\n  {"prompt": "a"},\n  {"prompt": }\n]'))
    assert "broken.json, line 3" in str(err) and "malformed JSON" in str(err)


def test_json_record_that_is_not_an_object(tmp_path):
    err = error_of(write(tmp_path / "mixed.json", json.dumps([RECORDS[0], "oops"])))
    assert "mixed.json, record 2" in str(err) and "text" in str(err)


def test_json_object_without_a_single_list(tmp_path):
    err = error_of(write(tmp_path / "two.json", json.dumps({"a": RECORDS, "b": RECORDS})))
    assert "two.json" in str(err) and "'a'" in str(err) and "'b'" in str(err)
    assert "list" in str(error_of(write(tmp_path / "num.json", "3")))


def test_csv_row_with_too_many_cells(tmp_path):
    err = error_of(write(tmp_path / "wide.csv", "prompt,completion\na,b\nc,d,e\n"))
    assert "wide.csv, row 2" in str(err) and "3 cells" in str(err)


def test_corrupt_parquet(tmp_path):
    err = error_of(write(tmp_path / "bad.parquet", b"this is not parquet"))
    assert "bad.parquet" in str(err) and "Parquet" in str(err)


def test_plain_directory_is_not_a_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    err = error_of(tmp_path / "plain")
    assert "plain" in str(err) and "save_to_disk" in str(err)


def test_split_on_a_file_is_an_error(tmp_path):
    err = error_of(write(tmp_path / "d.jsonl", jsonl(RECORDS)), split="test")
    assert "d.jsonl" in str(err) and "split" in str(err)
