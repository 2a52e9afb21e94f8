"""tool_choice "required" or a named function, enforced by structured outputs (as vLLM does).

The output is constrained to JSON that is the call(s), so no tool-call parser is needed:

    named function  the output IS the function's arguments (kind "json", the function's
                    parameters schema); ForcedToolOutput streams it as one call: id and name
                    first, then the arguments text as it comes
    "required"      the output is a non-empty array [{"name": ..., "parameters": {...}}, ...]
                    (anyOf over the tools, each name a const); each call is emitted whole once
                    its array element is complete
    "none", "auto"  no constraint (auto uses the router's tool-call parser, if any)
"""

from __future__ import annotations

import json

from router.tool_parsers import JsonValues, ToolCall, ToolCallDelta, new_call_id
from tandem.records import StructuredOutput

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def _function(tool: dict) -> dict:
    """The function dict of a tool ({"type": "function", "function": {...}} or the function)."""
    return tool.get("function", tool) if tool.get("type", "function") == "function" else tool


def _parameters(function: dict) -> dict:
    params = function.get("parameters", function.get("parameters_json"))
    if isinstance(params, str):  # JSON text, as the wire's Tool.parameters_json carries it
        params = json.loads(params) if params.strip() else None
    return params or dict(EMPTY_PARAMETERS)


def forced_tool_constraint(tools: list[dict], choice: str) -> StructuredOutput | None:
    """The structured output that forces `choice` ("none" | "auto" | "required" | a name)."""
    if choice in ("none", "auto"):
        return None
    functions = [_function(t) for t in tools]
    if choice != "required":
        for f in functions:
            if f.get("name") == choice:
                return StructuredOutput("json", json.dumps(_parameters(f)))
        raise ValueError(f"tool_choice names function {choice!r}, which is not in tools")
    if not functions:
        raise ValueError('tool_choice "required" needs at least one tool')
    # $defs of each schema move to the top, where "#/$defs/..." references resolve.
    defs: dict = {}
    items = []
    for f in functions:
        params = _parameters(f)
        if "$defs" in params:
            params = dict(params)
            defs.update(params.pop("$defs"))
        items.append(
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "parameters": params},
                "required": ["name", "parameters"],
            }
        )
    schema: dict = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if defs:
        schema["$defs"] = defs
    return StructuredOutput("json", json.dumps(schema))


class ForcedToolOutput:
    """Turns the output constrained by forced_tool_constraint into tool-call pieces."""

    def __init__(self, choice: str) -> None:
        self.choice = choice
        self._calls: list[ToolCall] = []
        self._values = JsonValues(array_items=True)  # "required": the array's elements
        self._pending_ws = ""  # named: whitespace held back (dropped at the ends)

    def feed(self, text: str) -> list[ToolCallDelta]:
        if self.choice != "required":
            return self._feed_named(text)
        deltas = []
        for _, value in self._values.feed(text):
            try:
                obj = json.loads(value)
            except ValueError:  # the grammar allows no such element; ignore it if one comes
                continue
            name, params = obj.get("name"), obj.get("parameters", {})
            if not isinstance(name, str):
                continue
            call = ToolCall(new_call_id(), name, json.dumps(params, ensure_ascii=False))
            self._calls.append(call)
            deltas.append(ToolCallDelta(len(self._calls) - 1, call.id, name, call.arguments))
        return deltas

    def flush(self) -> list[ToolCallDelta]:
        """At the end of the output; an unfinished element of "required" is dropped."""
        self._pending_ws = ""
        return []

    @property
    def calls(self) -> list[ToolCall]:
        """The calls so far (named: its arguments so far, all of them after flush)."""
        return list(self._calls)

    def _feed_named(self, text: str) -> list[ToolCallDelta]:
        """The arguments text, stripped of whitespace at both ends (held until more comes)."""
        text = self._pending_ws + text
        if not self._calls:
            text = text.lstrip()
        body = text.rstrip()
        self._pending_ws = text[len(body) :]
        if not body:
            return []
        if not self._calls:
            call = ToolCall(new_call_id(), self.choice, body)
            self._calls.append(call)
            return [ToolCallDelta(0, call.id, call.name, body)]
        self._calls[0].arguments += body
        return [ToolCallDelta(0, arguments=body)]
