"""The tool-call format: parsing good, several and malformed calls, and rendering them back."""

import json

from quartet.envs import MalformedCall, ToolCall, parse_tool_calls, render_tool_call, render_tool_result, tool_message

TOOLS = {"calculate", "lookup"}


def test_one_call_with_text_around_it():
    text = 'Let me compute.\n<tool_call>\n{"name": "calculate", "arguments": {"expression": "2 + 3"}}\n</tool_call>'
    assert parse_tool_calls(text, TOOLS) == [ToolCall("calculate", {"expression": "2 + 3"})]


def test_several_calls_keep_their_order_and_arguments_may_be_a_json_string():
    text = ('<tool_call>{"name": "lookup", "arguments": {"key": "a"}}</tool_call> and '
            '<tool_call>{"name": "calculate", "arguments": "{\\"expression\\": \\"1/0\\"}"}</tool_call>'
            '<tool_call>{"name": "lookup"}</tool_call>')
    assert parse_tool_calls(text, TOOLS) == [ToolCall("lookup", {"key": "a"}), ToolCall("calculate", {"expression": "1/0"}),
                                             ToolCall("lookup", {})]


def test_no_call_is_an_empty_list():
    assert parse_tool_calls("The answer is 5.", TOOLS) == []


def test_malformed_calls_become_errors_the_model_can_read_in_place():
    text = ('<tool_call>{"name": "calculate", "arguments": {"expression": "2"</tool_call>'  # bad JSON
            '<tool_call>{"arguments": {}}</tool_call>'  # no name
            '<tool_call>{"name": "search", "arguments": {}}</tool_call>'  # unknown tool
            '<tool_call>{"name": "lookup", "arguments": [1, 2]}</tool_call>'  # arguments not an object
            '<tool_call>{"name": "lookup", "arguments": "{oops"}</tool_call>'  # arguments string not JSON
            '<tool_call>["lookup"]</tool_call>'  # not an object
            '<tool_call>{"name": "lookup", "arguments": {"key": "b"}}</tool_call>'  # fine
            '<tool_call>{"name": "lookup", "arguments": {}}')  # never closed
    calls = parse_tool_calls(text, TOOLS)
    assert [type(c) for c in calls] == [MalformedCall] * 6 + [ToolCall, MalformedCall]
    errors = [c.error for c in calls if isinstance(c, MalformedCall)]
    assert all(e.startswith("error: ") for e in errors)
    assert "not valid JSON" in errors[0] and '"expression": "2"' in errors[0]
    assert 'no "name"' in errors[1]
    assert "no tool named 'search'" in errors[2] and "calculate, lookup" in errors[2]
    assert calls[2].name == "search"
    assert "should be a JSON object" in errors[3] and "[1, 2]" in errors[3]
    assert "lookup" in errors[4] and "not valid JSON" in errors[4]
    assert "JSON object" in errors[5]
    assert calls[6] == ToolCall("lookup", {"key": "b"})
    assert "not closed" in errors[6] and "</tool_call>" in errors[6]


def test_without_tool_names_any_name_is_accepted():
    assert parse_tool_calls('<tool_call>{"name": "anything", "arguments": {}}</tool_call>') == [ToolCall("anything", {})]


def test_a_rendered_call_parses_back_to_itself_in_qwens_layout():
    args = {"expression": "π * 2", "digits": [1, 2], "exact": False, "note": None}
    text = render_tool_call("calculate", args)
    assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>")
    assert "π" in text  # written as it is, as the chat template's tojson writes it
    assert json.loads(text.split("\n")[1]) == {"name": "calculate", "arguments": args}
    assert parse_tool_calls(text, TOOLS) == [ToolCall("calculate", args)]


def test_results_render_as_text_json_or_str():
    class Opaque:
        def __str__(self):
            return "opaque!"

    assert render_tool_result("5") == "5"
    assert render_tool_result({"a": [1, 2.5]}) == '{"a": [1, 2.5]}'
    assert render_tool_result(None) == "null"
    assert render_tool_result(Opaque()) == "opaque!"
    assert render_tool_result({"x": Opaque()}).startswith("{'x': <")  # not JSON-able: str()
    assert tool_message("5", "calculate") == {"role": "tool", "name": "calculate", "content": "5"}
    assert tool_message("error: x") == {"role": "tool", "content": "error: x"}


# The tool parts of Qwen2.5's chat template: tools listed as JSON, an assistant's calls, tool answers.
QWEN_TOOL_TEMPLATE = (
    "{%- if tools %}<tools>{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}{{- '\\n</tools>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- message.content or '' }}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}"
    "{%- elif message.role == 'tool' %}{{- '<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- else %}{{- message.content }}{%- endif %}{%- endfor %}"
)


def test_schemas_and_calls_go_through_a_chat_template_as_qwens_renders_them(tokenizer):
    from quartet.envs import tool_schema

    def calculate(expression: str, exact: bool = False) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expression: The expression.
            exact: Whether to keep fractions.
        """

    schema = tool_schema(calculate)
    args = {"expression": "π * (2 + 3)", "exact": True}
    messages = [{"role": "user", "content": "Q"},
                {"role": "assistant", "content": "Let me compute.",
                 "tool_calls": [{"type": "function", "function": {"name": "calculate", "arguments": args}}]},
                tool_message(render_tool_result(15.7), "calculate")]
    text = tokenizer.apply_chat_template(messages, tools=[schema], chat_template=QWEN_TOOL_TEMPLATE, tokenize=False)
    assert json.loads(text.split("\n")[1]) == schema  # the schema reaches the prompt whole
    assert "Let me compute.\n" + render_tool_call("calculate", args) in text  # our rendering is the template's
    assert text.endswith("<tool_response>\n15.7\n</tool_response>")
