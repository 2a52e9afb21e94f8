"""Tool-call parsers over streamed output: known outputs of each format, and the same result
however the text is cut into pieces."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.tool_parsers import (
    TOOL_PARSERS,
    JsonValues,
    ToolCall,
    make_tool_parser,
    new_call_id,
)

CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def run(name, pieces):
    """Feed the pieces, then flush; checks the pieces' shape; returns (content, [(name, args)])."""
    parser = make_tool_parser(name)
    content, deltas = "", []
    for piece in [*pieces, None]:
        text, new = parser.feed(piece) if piece is not None else parser.flush()
        content += text
        deltas += new
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if d.index not in calls:  # the first piece of a call carries its id and name
            assert d.index == len(calls)
            assert CALL_ID.fullmatch(d.id) and d.name
            calls[d.index] = [d.id, d.name, ""]
        else:
            assert d.id == "" and d.name == ""
        calls[d.index][2] += d.arguments
    assert parser.calls == [ToolCall(*calls[i]) for i in range(len(calls))]
    return content, [(n, a) for _, n, a in calls.values()]


def splits(text):
    """Every way to cut `text` in two, and character by character."""
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)


# (parser, output, content, calls): outputs as the models' chat templates write the calls
CASES = [
    # Qwen2.5 / Hermes 2 Pro: one call per tag, a newline between tags
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "",
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "hermes",
        'Let me check.\n\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {"s": "été <tag>"}}\n</tool_call>',
        "Let me check.",
        [("a", '{"x": 1}'), ("b", '{"s": "été <tag>"}')],
    ),
    (
        "hermes",
        "No tools needed: 1 < 2 and <b>bold</b>.",
        "No tools needed: 1 < 2 and <b>bold</b>.",
        [],
    ),
    (
        "hermes",
        'Hi <tool_call>{"name": "f", "arguments": {oops}</tool_call> bye',
        'Hi <tool_call>{"name": "f", "arguments": {oops}</tool_call> bye',
        [],
    ),
    (  # a model that stops before the closing tag: a complete call is still a call
        "hermes",
        '<tool_call>\n{"name": "f", "arguments": {}}\n',
        "",
        [("f", "{}")],
    ),
    ("hermes", 'cut short <tool_call>\n{"name": ', 'cut short <tool_call>\n{"name": ', []),
    ("hermes", "ends with <tool_ca", "ends with <tool_ca", []),
    (
        "hermes",
        '<tool_call>{"name": "f", "arguments": {"a": [1, {"b": null}]}}</tool_call>\n\nDone.',
        "Done.",
        [("f", '{"a": [1, {"b": null}]}')],
    ),
    # Llama 3.1/3.2 JSON tool calling
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "a", "parameters": {"q": "x;y}"}}; {"name": "b", "arguments": {}}',
        "",
        [("a", '{"q": "x;y}"}'), ("b", "{}")],
    ),
    ("llama3_json", "  The answer is {x}.", "  The answer is {x}.", []),
    ("llama3_json", '{"not": "a call"}', '{"not": "a call"}', []),
    (
        "llama3_json",
        '{"name": "f", "parameters": {"a": 1',
        '{"name": "f", "parameters": {"a": 1',
        [],
    ),
    ("llama3_json", '{"name": "f", "parameters": {}} and more', "and more", [("f", "{}")]),
    # Mistral: v3 tokenizers write a JSON array, v11+ write name[ARGS]{...} per call
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "b", "arguments": {}}]',
        "",
        [("get_weather", '{"city": "Paris"}'), ("b", "{}")],
    ),
    (
        "mistral",
        'Sure.[TOOL_CALLS][{"name": "f", "arguments": {"s": "[TOOL_CALLS]"}}]',
        "Sure.",
        [("f", '{"s": "[TOOL_CALLS]"}')],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]b[ARGS]{}',
        "",
        [("get_weather", '{"city": "Paris"}'), ("b", "{}")],
    ),
    ("mistral", "[TOOL_CALLS]not a name[ARGS]{}", "[TOOL_CALLS]not a name[ARGS]{}", []),
    ("mistral", "[TOOL_CALLS] [1, 2]", "[TOOL_CALLS] [1, 2]", []),
    ("mistral", "plain [text] only", "plain [text] only", []),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "g"',
        '{"name": "g"',
        [("f", "{}")],
    ),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}, ', "", [("f", "{}")]),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}] Done.', "Done.", [("f", "{}")]),
]


@pytest.mark.parametrize(("name", "output", "content", "calls"), CASES)
def test_known_outputs_in_every_split(name, output, content, calls):
    for pieces in splits(output):
        assert run(name, pieces) == (content, calls), pieces


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_random_chunkings_match_one_feed(case, cuts):
    name, output, content, calls = case
    bounds = sorted({min(c, len(output)) for c in cuts} | {0, len(output)})
    pieces = [output[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert run(name, pieces) == (content, calls)


def test_content_streams_before_the_call_completes():
    parser = make_tool_parser("hermes")
    assert parser.feed("Hello <tool") == ("Hello", [])  # the tag's start is held back
    assert parser.feed('_call>{"name": "f", ') == ("", [])
    text, deltas = parser.feed('"arguments": {"a": 1}}</tool_call>')
    assert text == "" and [(d.index, d.name, d.arguments) for d in deltas] == [(0, "f", '{"a": 1}')]
    assert parser.flush() == ("", [])


def test_arguments_keep_unicode_and_calls_have_distinct_ids():
    content, calls = run("hermes", ['<tool_call>{"name": "f", "arguments": {"q": "naïve 東京"}}'])
    assert calls == [("f", '{"q": "naïve 東京"}')] and json.loads(calls[0][1]) == {
        "q": "naïve 東京"
    }
    assert len({new_call_id() for _ in range(100)}) == 100


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match="hermes.*llama3_json.*mistral"):
        make_tool_parser("nope")
    assert TOOL_PARSERS == ("hermes", "llama3_json", "mistral")


def test_json_values_track_strings_and_nesting():
    values = JsonValues(array_items=True)
    assert values.feed('[{"a": "}]\\"", "b": [{}]}, ') == [(1, '{"a": "}]\\"", "b": [{}]}')]
    assert values.feed('{"c": 1}] rest') == [(27, '{"c": 1}')]
    assert values.done and values.rest == " rest"
    assert [json.loads(v) for _, v in JsonValues(seps=";").feed('{"x": 1} ; {"y": 2}')] == [
        {"x": 1},
        {"y": 2},
    ]


FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "<|python_tag|>",
    '{"name": "f", "arguments": {"a": [1]}}',
    '{"name": "g", "parameters": {}}',
    '"',
    "\\",
    "{",
    "}",
    "[",
    "]",
    ",",
    ";",
    "<",
    "f",
    " ",
    "\n",
    "text",
]


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(TOOL_PARSERS),
    parts=st.lists(st.sampled_from(FRAGMENTS), max_size=14),
    cuts=st.lists(st.integers(0, 300), max_size=10),
)
def test_any_text_any_chunking_matches_one_feed(name, parts, cuts):
    output = "".join(parts)
    bounds = sorted({min(c, len(output)) for c in cuts} | {0, len(output)})
    pieces = [output[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert run(name, pieces) == run(name, [output])
