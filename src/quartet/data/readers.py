"""Read a local data file (or a `datasets.save_to_disk` directory) into rows of plain dicts.

Supported inputs:

- ``.jsonl`` / ``.ndjson``: one JSON object per line; blank lines are skipped. Rows are
  located by their 1-based line number in the file.
- ``.json``: a list of objects, or an object with exactly one list value (e.g.
  ``{"data": [...]}``). A ``.json`` file that holds one object per line is read as JSONL.
  Rows are located as ``record N`` (1-based).
- ``.parquet``: rows located as ``row N`` (1-based).
- ``.csv``: a header line then one row per record; every cell is text (an empty cell reads
  as missing). Rows are located as ``row N`` (1-based, the header not counted).
- a directory written by ``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
  (split ``train`` unless ``split=`` names another). Rows are located as ``row N``.

Every problem (missing path, unknown extension, malformed JSON, a line that is not an
object, bytes that are not UTF-8, an empty file...) raises :class:`DataError` naming the
file and the line or row; nothing here lets a bare parser traceback through.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quartet.data.errors import DataError, describe_type

JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUPPORTED = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", "a datasets.save_to_disk directory")


@dataclass
class Row:
    """One row of a data file: where it came from (``source``, 1-based ``index`` in ``unit``s) and its fields."""

    source: str
    index: int
    data: dict[str, Any]
    unit: str = "line"  # what `index` counts: "line" (JSONL), "record" (.json), "row" (others)

    def error(self, problem: str, field: str | None = None) -> DataError:
        """A DataError located at this row (raise it)."""
        return DataError(problem, path=self.source, row=self.index, field=field, unit=self.unit)

    @property
    def where(self) -> str:
        return f"{self.source}, {self.unit} {self.index}"


def read_rows(path: str | Path, split: str | None = None) -> list[Row]:
    """All rows of `path` (see the module docstring for the formats); raises DataError on any problem."""
    p = Path(path)
    source = str(path)
    if not p.exists():
        raise DataError("no such file or directory (check the path; data is read from local files only)", path=source)
    if p.is_dir():
        rows = _read_saved_dataset(p, source, split)
    else:
        if split is not None:
            raise DataError(f"split='{split}' only applies to a datasets.save_to_disk directory, not to a file",
                            path=source)
        suffix = p.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            rows = _read_jsonl(_read_text(p, source), source)
        elif suffix == ".json":
            rows = _read_json(_read_text(p, source), source)
        elif suffix == ".csv":
            rows = _read_csv(_read_text(p, source), source)
        elif suffix == ".parquet":
            rows = _read_parquet(p, source)
        else:
            raise DataError(f"unknown file type '{p.suffix or '(no extension)'}'; supported: {', '.join(SUPPORTED)} "
                            f"(rename the file or convert it)", path=source)
    if not rows:
        raise DataError("contains no rows (the file is empty; check you passed the right file)", path=source)
    return rows


def _read_text(p: Path, source: str) -> str:
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot be read ({e.strerror or e})", path=source) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"byte {raw[e.start:e.start + 1]!r} at byte offset {e.start} is not valid UTF-8 "
                        f"(re-save the file as UTF-8)", path=source, row=line, unit="line") from None
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark, as some editors write
        text = text[1:]
    if not text.strip():
        raise DataError("is empty (no data in it; check you passed the right file)", path=source)
    return text


def _json_problem(e: json.JSONDecodeError) -> str:
    return f"{e.msg} (column {e.colno})"


def _read_jsonl(text: str, source: str) -> list[Row]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {_json_problem(e)}; each line must be one complete JSON object",
                            path=source, row=lineno) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object {{...}} on each line, found {describe_type(obj)}",
                            path=source, row=lineno)
        rows.append(Row(source, lineno, obj, "line"))
    return rows


def _read_json(text: str, source: str) -> list[Row]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        first = next(line for line in text.split("\n") if line.strip())
        try:
            first_obj = json.loads(first)
        except json.JSONDecodeError:
            first_obj = None
        if isinstance(first_obj, dict) and e.msg == "Extra data":  # JSON Lines content in a .json file
            return _read_jsonl(text, source)
        raise DataError(f"malformed JSON: {e.msg} (column {e.colno}); fix the file or check it with "
                        f"`python -m json.tool`", path=source, row=e.lineno) from None
    if isinstance(obj, dict):
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) != 1:
            found = f"keys with list values: {lists}" if lists else f"keys {list(obj)[:10]} and no list value"
            raise DataError(f"a .json file must hold a list of row objects, or an object with exactly one list "
                            f"of rows; found an object with {found}", path=source)
        obj = obj[lists[0]]
    if not isinstance(obj, list):
        raise DataError(f"a .json file must hold a list of row objects, found {describe_type(obj)}", path=source)
    rows = []
    for i, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            raise DataError(f"expected a JSON object {{...}} for each record, found {describe_type(item)}",
                            path=source, row=i, unit="record")
        rows.append(Row(source, i, item, "record"))
    return rows


def _read_csv(text: str, source: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        records = list(reader)
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e} (check quoting)", path=source, row=reader.line_num) from None
    if any(not h.strip() for h in header):
        raise DataError(f"the CSV header has an empty column name ({header}); the first line must name "
                        f"every column", path=source, row=1)
    rows = []
    n = 0
    for cells in records:
        if not any(c.strip() for c in cells):
            continue
        n += 1
        if len(cells) > len(header):
            raise DataError(f"has {len(cells)} cells but the header names {len(header)} columns (check for an "
                            f"unquoted comma)", path=source, row=n, unit="row")
        data = {h: (c if c != "" else None) for h, c in zip(header, cells)}
        for h in header[len(cells):]:
            data[h] = None
        rows.append(Row(source, n, data, "row"))
    return rows


def _read_parquet(p: Path, source: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged or non-Parquet file
        raise DataError(f"cannot be read as Parquet ({type(e).__name__}: {e}); check the file is a valid "
                        f"Parquet file", path=source) from None
    return [Row(source, i, rec, "row") for i, rec in enumerate(records, start=1)]


def _read_saved_dataset(p: Path, source: str, split: str | None) -> list[Row]:
    is_dict = (p / "dataset_dict.json").is_file()
    is_dataset = (p / "state.json").is_file() and (p / "dataset_info.json").is_file()
    if not (is_dict or is_dataset):
        raise DataError("is a directory but not one written by datasets' save_to_disk (no dataset_dict.json or "
                        f"state.json in it); pass a data file ({', '.join(SUPPORTED[:-1])}) or such a directory",
                        path=source)
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as e:  # damaged directory
        raise DataError(f"cannot be loaded with datasets.load_from_disk ({type(e).__name__}: {e})",
                        path=source) from None
    if isinstance(ds, DatasetDict):
        name = split or "train"
        if name not in ds:
            raise DataError(f"has no split '{name}'; its splits are {sorted(ds)} (choose one with split=...)",
                            path=source)
        ds = ds[name]
        source = f"{source} [{name}]"
    elif split is not None and split != "train":
        raise DataError(f"holds a single Dataset, not a DatasetDict, so split='{split}' does not apply",
                        path=source)
    assert isinstance(ds, Dataset)
    return [Row(source, i, rec, "row") for i, rec in enumerate(ds.to_list(), start=1)]

