"""DataError: a problem with a data file, said in terms a user can act on.

Every message names the file, the row when known (``line N`` for JSONL, whose lines a user
can jump to in an editor; ``row N`` / ``record N`` 1-based otherwise) and the field when
known, then says what is wrong and what to do, e.g.::

    data.jsonl, line 7: field 'completion' is missing (an SFT row needs 'prompt'+'completion'
    (or 'response'), 'messages', or 'text')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file (or one of its rows) cannot be used; the message says where and what to do.

    Attributes: ``path`` (str or None), ``row`` (1-based line/row number or None),
    ``field`` (field name or None), ``problem`` (the message without the location prefix).
    """

    def __init__(self, problem: str, path: str | Path | None = None, row: int | None = None,
                 field: str | None = None, unit: str = "line"):
        self.path = None if path is None else str(path)
        self.row = row
        self.field = field
        self.unit = unit
        if field is not None and field not in problem:
            problem = f"field '{field}': {problem}"
        self.problem = problem
        super().__init__(f"{self.location()}: {problem}" if self.location() else problem)

    def location(self) -> str:
        """``path, line N`` (or the parts of it that are known)."""
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if self.row is not None:
            parts.append(f"{self.unit} {self.row}")
        return ", ".join(parts)


def describe_type(value: Any) -> str:
    """What a user would call the type of `value`, with Python's name: 'a number (int)', 'null'."""
    if value is None:
        return "null (None)"
    kinds = {str: "text", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    kind = kinds.get(type(value))
    return f"{kind} ({type(value).__name__})" if kind else f"a {type(value).__name__}"
