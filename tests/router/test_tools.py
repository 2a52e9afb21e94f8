"""Forced tool choice: the constraint's schema, judged by xgrammar itself (the engine's grammar
compiler), and the constrained output turned into calls however it streams."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.tools import ForcedToolOutput, forced_tool_constraint

xgr = pytest.importorskip("xgrammar")
from xgrammar.testing import _is_grammar_accept_string  # noqa: E402

CALL_ID = re.compile(r"call_[0-9a-f]{24}")
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"],
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Now"}}  # no params
NESTED = {
    "name": "add_person",
    "parameters": {
        "type": "object",
        "properties": {"person": {"$ref": "#/$defs/Person"}},
        "required": ["person"],
        "$defs": {"Person": {"type": "object", "properties": {"age": {"type": "integer"}}}},
    },
}
TOOLS = [WEATHER, TIME, NESTED]


def accepts(constraint, text):
    return _is_grammar_accept_string(xgr.Grammar.from_json_schema(constraint.spec), text)


def test_none_and_auto_add_no_constraint():
    assert forced_tool_constraint(TOOLS, "none") is None
    assert forced_tool_constraint(TOOLS, "auto") is None


def test_named_function_output_is_its_arguments():
    constraint = forced_tool_constraint(TOOLS, "get_weather")
    assert constraint.kind == "json" and json.loads(constraint.spec) == WEATHER["parameters"]
    assert accepts(constraint, '{"city": "Paris", "unit": "c"}')
    assert not accepts(constraint, '{"unit": "c"}')  # city is required
    assert accepts(forced_tool_constraint(TOOLS, "get_time"), "{}")  # wrapped form, no params


def test_unknown_function_is_named_in_the_error():
    with pytest.raises(ValueError, match="'get_stock'"):
        forced_tool_constraint(TOOLS, "get_stock")


def test_required_is_a_non_empty_array_of_known_calls():
    constraint = forced_tool_constraint(TOOLS, "required")
    assert constraint.kind == "json"
    good = (
        '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, '
        '{"name": "get_time", "parameters": {}}, '
        '{"name": "add_person", "parameters": {"person": {"age": 3}}}]'
    )
    assert accepts(constraint, good)
    assert not accepts(constraint, "[]")
    assert not accepts(constraint, '[{"name": "get_stock", "parameters": {}}]')
    assert not accepts(constraint, '[{"name": "get_weather", "parameters": {"unit": "c"}}]')
    assert not accepts(
        constraint, '[{"name": "add_person", "parameters": {"person": {"age": "x"}}}]'
    )


def run(output, choice, pieces):
    forced = ForcedToolOutput(choice)
    deltas = []
    for piece in pieces:
        deltas += forced.feed(piece)
    deltas += forced.flush()
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.index == len(calls) and CALL_ID.fullmatch(d.id) and d.name
            calls[d.index] = [d.id, d.name, ""]
        else:
            assert d.id == "" and d.name == ""
        calls[d.index][2] += d.arguments
    assert [[c.id, c.name, c.arguments] for c in forced.calls] == list(calls.values())
    return [(n, a) for _, n, a in calls.values()]


NAMED_OUTPUT = '{\n  "city": "Paris",\n  "unit": "c"\n}'
REQUIRED_OUTPUT = (
    '[\n  {"name": "get_weather", "parameters": {"city": "a]}\\"b"}},\n'
    '  {"name": "get_time", "parameters": {}}\n]'
)


CHUNKED = [
    (NAMED_OUTPUT, "get_weather", [("get_weather", NAMED_OUTPUT)]),
    (REQUIRED_OUTPUT, "required", [("get_weather", '{"city": "a]}\\"b"}'), ("get_time", "{}")]),
]


@pytest.mark.parametrize(("output", "choice", "calls"), CHUNKED)
def test_the_grammar_accepts_the_chunked_outputs(output, choice, calls):
    assert accepts(forced_tool_constraint(TOOLS, choice), output)
    assert run(output, choice, [output]) == calls


@settings(max_examples=100, deadline=None)
@given(case=st.sampled_from(CHUNKED), cuts=st.lists(st.integers(0, 120), max_size=10))
def test_outputs_become_calls_in_any_chunking(case, cuts):
    output, choice, calls = case
    bounds = sorted({min(c, len(output)) for c in cuts} | {0, len(output)})
    pieces = [output[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert run(output, choice, pieces) == calls


def test_named_streams_id_and_name_first_then_arguments():
    forced = ForcedToolOutput("get_weather")
    assert forced.feed("  ") == []  # whitespace at either end is no part of the arguments
    (first,) = forced.feed('{"city"')
    assert (first.index, first.name, first.arguments) == (0, "get_weather", '{"city"')
    assert [(d.id, d.name, d.arguments) for d in forced.feed(': "Rome"} ')] == [
        ("", "", ': "Rome"}')
    ]
    assert forced.flush() == [] and forced.calls[0].arguments == '{"city": "Rome"}'


def test_required_emits_each_call_when_its_element_completes():
    forced = ForcedToolOutput("required")
    assert forced.feed('[{"name": "get_time", "parameters": {}}, {"name": "get_wea') != []
    assert len(forced.calls) == 1
    assert [d.name for d in forced.feed('ther", "parameters": {"city": "x"}}]')] == ["get_weather"]
    assert forced.flush() == []
    assert [c.arguments for c in forced.calls] == ["{}", '{"city": "x"}']


def test_wire_form_parameters_json_text():
    tools = [{"name": "f", "parameters_json": '{"type": "object", "required": ["a"]}'}]
    assert json.loads(forced_tool_constraint(tools, "f").spec)["required"] == ["a"]
    empty = forced_tool_constraint([{"name": "g", "parameters_json": ""}], "g")
    assert accepts(empty, "{}")
