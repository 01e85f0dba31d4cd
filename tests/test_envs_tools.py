"""Tools: schemas from signatures and docstrings, loading by spec, and running calls under limits."""

import asyncio
import sys
import textwrap
import threading
import time
from typing import Literal, Optional

import pytest

from quartet.envs import ToolBox, ToolCall, ToolSchemaError, load_tools, parse_tool_calls, tool_schema


def calculate(expression: str, precision: int = 6) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: The expression, e.g. "2 * (3 + 4)".
        precision: Digits after the decimal point,
            at most 12.
    """
    return str(round(eval(expression, {"__builtins__": {}}), precision))


def search(query: str, tags: list[int], limit: Optional[int] = None, mode: Literal["fast", "exact"] = "fast",
           filters: dict[str, float] | None = None, verbose: bool = False, weight: float = 1.0) -> list:
    """Search the index.

    Args:
        query: What to look for.
        tags (list[int]): Tag ids to match.
        limit: How many results at most.
        mode: How to match.
        filters: Minimum score per field.
        verbose: Whether to explain each match.
        weight: The query's weight.

    Returns:
        The matches.
    """
    return []


def test_schema_of_a_simple_tool():
    assert tool_schema(calculate) == {"type": "function", "function": {
        "name": "calculate", "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": 'The expression, e.g. "2 * (3 + 4)".'},
            "precision": {"type": "integer", "description": "Digits after the decimal point, at most 12."}},
            "required": ["expression"]}}}


def test_schema_maps_optional_lists_literals_dicts_and_leaves_defaults_out_of_required():
    params = tool_schema(search)["function"]["parameters"]
    props = params["properties"]
    assert params["required"] == ["query", "tags"]
    assert props["tags"] == {"type": "array", "items": {"type": "integer"}, "description": "Tag ids to match."}
    assert props["limit"] == {"type": "integer", "nullable": True, "description": "How many results at most."}
    assert props["mode"] == {"type": "string", "enum": ["fast", "exact"], "description": "How to match."}
    assert props["filters"] == {"type": "object", "additionalProperties": {"type": "number"}, "nullable": True,
                                "description": "Minimum score per field."}
    assert props["verbose"]["type"] == "boolean" and props["weight"]["type"] == "number"
    assert tool_schema(search)["function"]["description"] == "Search the index."


def test_schema_matches_transformers_get_json_schema():
    from transformers.utils import get_json_schema

    async def fetch(url: str, retries: int | str = 3, headers: Optional[list[str]] = None) -> str:
        """Fetch a page.

        Args:
            url: The address.
            retries: How often to retry.
            headers: Extra headers.
        """

    for fn in (calculate, search, fetch):
        theirs = get_json_schema(fn)
        theirs["function"].pop("return", None)  # chat templates ignore it; we leave it out
        assert tool_schema(fn) == theirs, fn.__name__


def test_schema_errors_name_the_function_and_parameter():
    def no_hint(a: int, b) -> int:
        """Add.

        Args:
            a: One.
            b: Two.
        """

    def no_doc(a: int) -> int:
        return a

    def stale_doc(a: int) -> int:
        """Add.

        Args:
            a: One.
            b: Gone.
        """

    def star(*values: int) -> int:
        """Sum."""

    with pytest.raises(ToolSchemaError, match="tool no_hint: parameter 'b' has no type hint"):
        tool_schema(no_hint)
    with pytest.raises(ToolSchemaError, match="tool no_doc has no docstring"):
        tool_schema(no_doc)
    with pytest.raises(ToolSchemaError, match="tool stale_doc: .*describe b"):
        tool_schema(stale_doc)
    with pytest.raises(ToolSchemaError, match="tool star: parameter 'values'"):
        tool_schema(star)


@pytest.fixture
def tool_module(tmp_path, monkeypatch):
    (tmp_path / "mytools_q.py").write_text(textwrap.dedent('''
        VERSION = "1"

        def shout(text: str) -> str:
            """Upper-case the text.

            Args:
                text: What to shout.
            """
            return text.upper()

        def whisper(text: str) -> str:
            """Lower-case the text.

            Args:
                text: What to whisper.
            """
            return text.lower()
    '''))
    (tmp_path / "broken_q.py").write_text("import math\nraise RuntimeError('no config file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mytools_q"
    for name in ("mytools_q", "broken_q"):
        sys.modules.pop(name, None)


def test_tools_load_from_a_comma_separated_spec(tool_module):
    tools = load_tools("mytools_q:shout, mytools_q:whisper")
    assert [fn("Hi") for fn in tools] == ["HI", "hi"]
    assert [fn.__name__ for fn in load_tools(["mytools_q.shout"])] == ["shout"]


@pytest.mark.parametrize("spec, message", [
    ("nosuchpkg_q.tools:shout", r"rollout.tools 'nosuchpkg_q.tools:shout' cannot be imported: No module named 'nosuchpkg_q'"),
    ("mytools_q:yell", r"module 'mytools_q' has no attribute 'yell'"),
    ("mytools_q:VERSION", r"'mytools_q:VERSION' is not callable: mytools_q.VERSION is a str"),
    ("broken_q:fn", r"importing broken_q raised RuntimeError: no config file"),
    ("shout", r"should look like 'package.module:function'"),
])
def test_bad_tool_specs_say_what_is_wrong(tool_module, spec, message):
    with pytest.raises(ValueError, match=message):
        load_tools(spec)


def test_reward_functions_load_through_the_same_loader(tool_module):
    from quartet.scoring import load_callable

    assert load_callable("mytools_q:shout")("a") == "A"
    with pytest.raises(ValueError, match="models.reward_fn 'mytools_q:yell' cannot be imported"):
        load_callable("mytools_q:yell")


def run(coroutine):
    return asyncio.run(coroutine)


def test_results_exceptions_and_bad_calls_become_messages_and_are_counted():
    def divide(a: float, b: float) -> float:
        """Divide.

        Args:
            a: Numerator.
            b: Denominator.
        """
        return a / b

    box = ToolBox([calculate, divide])
    text = ('<tool_call>{"name": "divide", "arguments": {"a": 1, "b": 4}}</tool_call>'
            '<tool_call>{"name": "divide", "arguments": {"a": 1, "b": 0}}</tool_call>'
            '<tool_call>{"name": "divide", "arguments": {"a": 1}}</tool_call>'
            '<tool_call>{"name": "divide", "arguments": {"a": 1, "b": 2, "c": 3}}</tool_call>'
            '<tool_call>{"name": "calculate", "arguments": {"expression": "2 + 3"}}</tool_call>'
            '<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    answers = run(box.run_all(parse_tool_calls(text, box.tools)))
    assert answers[0] == "0.25"
    assert answers[1] == "error: divide raised ZeroDivisionError: division by zero"
    assert answers[2] == "error: divide was called with bad arguments: missing a required argument: 'b'"
    assert answers[3].startswith("error: divide was called with bad arguments: ") and "'c'" in answers[3]
    assert answers[4] == "5"
    assert answers[5].startswith("error: there is no tool named 'nope'")
    assert box.stats.calls == {"divide": 4, "calculate": 1}
    assert box.stats.errors == {"divide": 3}
    assert box.stats.malformed == 1 and box.stats.timeouts == {}
    metrics = box.stats.metrics()
    assert metrics["tools/divide/calls"] == 4.0 and metrics["tools/divide/errors"] == 3.0
    assert metrics["tools/calculate/timeouts"] == 0.0 and metrics["tools/malformed"] == 1.0


def test_a_sync_tool_past_its_time_limit_is_answered_quickly_and_counted():
    def slow(seconds: float) -> str:
        """Sleep.

        Args:
            seconds: How long.
        """
        time.sleep(seconds)
        return "woke"

    box = ToolBox([slow], tool_timeout=0.2)
    started = time.perf_counter()
    answers = run(box.run_all([ToolCall("slow", {"seconds": 5.0}), ToolCall("slow", {"seconds": 0.01})]))
    elapsed = time.perf_counter() - started  # asyncio.run returned: nothing waited for the sleeping thread
    assert answers == ["error: slow timed out after 0.2 s", "woke"]
    assert elapsed < 2.0
    assert box.stats.timeouts == {"slow": 1} and box.stats.calls == {"slow": 2}


def test_async_tools_run_concurrently_and_time_out_too():
    async def wait(seconds: float) -> dict:
        """Wait.

        Args:
            seconds: How long.
        """
        await asyncio.sleep(seconds)
        return {"waited": seconds}

    box = ToolBox([wait], tool_timeout=0.5)
    started = time.perf_counter()
    answers = run(box.run_all([ToolCall("wait", {"seconds": 0.2})] * 4 + [ToolCall("wait", {"seconds": 30})]))
    elapsed = time.perf_counter() - started
    assert answers == ['{"waited": 0.2}'] * 4 + ["error: wait timed out after 0.5 s"]
    assert elapsed < 1.5  # four 0.2 s waits at once, not one after another
    assert box.stats.timeouts == {"wait": 1}


@pytest.mark.parametrize("is_async", [False, True])
def test_no_more_calls_run_at_once_than_the_bound(is_async):
    in_flight, most = 0, 0
    lock = threading.Lock()  # sync tools run on threads

    def enter():
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)

    def leave():
        nonlocal in_flight
        with lock:
            in_flight -= 1

    def work(i: int) -> int:
        """Work.

        Args:
            i: Which.
        """
        enter()
        time.sleep(0.03)
        leave()
        return i

    async def awork(i: int) -> int:
        """Work.

        Args:
            i: Which.
        """
        enter()
        await asyncio.sleep(0.03)
        leave()
        return i

    box = ToolBox([awork if is_async else work], max_concurrent_calls=3)
    name = "awork" if is_async else "work"
    answers = run(box.run_all([ToolCall(name, {"i": i}) for i in range(12)]))
    assert answers == [str(i) for i in range(12)]
    assert most == 3


def test_two_tools_of_one_name_are_refused():
    with pytest.raises(ValueError, match="two tools are named calculate"):
        ToolBox([calculate, calculate])


def test_a_tool_may_take_a_timeout_parameter_and_raise_its_own_timeout_error():
    def fetch(url: str, timeout: float, fn: str = "get") -> str:
        """Fetch a page.

        Args:
            url: The address.
            timeout: Seconds to wait for the server.
            fn: The HTTP method.
        """
        if timeout < 1:
            raise TimeoutError(f"{url} did not answer in {timeout} s")
        return f"{fn} {url} ({timeout} s)"

    box = ToolBox([fetch], tool_timeout=5)
    answers = run(box.run_all([ToolCall("fetch", {"url": "a.org", "timeout": 2, "fn": "head"}),
                               ToolCall("fetch", {"url": "b.org", "timeout": 0.5})]))
    assert answers == ["head a.org (2 s)", "error: fetch raised TimeoutError: b.org did not answer in 0.5 s"]
    assert box.stats.errors == {"fetch": 1} and box.stats.timeouts == {}
