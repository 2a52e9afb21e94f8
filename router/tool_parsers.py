"""Tool calls in a model's output text, streamed (vLLM's --tool-call-parser, by the same names).

One parser per choice is fed the choice's output text as it streams; each feed returns the
content to show now and the pieces of tool calls found. A call is emitted whole (id, name and
all of its arguments in one piece) once its JSON is complete: the split of the text into
pieces never changes what comes out, only when.

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, several allowed;
                 text outside the tags is content, malformed JSON inside them is content too
    llama3_json  output starting (after whitespace or <|python_tag|>) with `{` is calls
                 {"name": ..., "parameters"|"arguments": {...}} separated by `;`
    mistral      [TOOL_CALLS] then a JSON array of {"name", "arguments"}, or the newer
                 [TOOL_CALLS]name[ARGS]{...} (repeatable); text before it is content

Text that may still become a tag is held back, so no partial tag is ever shown as content;
whitespace right before a call's tag or right after a call is dropped (it only separates calls).
Where calls turn out malformed, the text they held comes out as content instead.

llama's <|python_tag|> and mistral's [TOOL_CALLS]/[ARGS] are special tokens: the output must
be decoded with skip_special_tokens=False for these parsers to see them (vLLM's parsers set it).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass


@dataclass(slots=True)
class ToolCallDelta:
    """One piece of a streamed tool call (OpenAI's delta.tool_calls entry)."""

    index: int  # position of the call among this choice's calls
    id: str = ""  # first piece only ("call_" + 24 hex chars)
    name: str = ""  # first piece only
    arguments: str = ""  # text to append to the call's arguments (JSON text)


@dataclass(slots=True)
class ToolCall:
    """One complete tool call."""

    id: str  # "call_...", echoed by the tool message that answers it
    name: str
    arguments: str  # JSON text


TOOL_PARSERS: tuple[str, ...] = ("hermes", "llama3_json", "mistral")


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def make_tool_parser(name: str) -> ToolParser:
    parsers = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}
    if name not in parsers:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {TOOL_PARSERS}")
    return parsers[name]()


def held_len(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag` (may become it)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def call_from_json(
    text: str, args_keys: tuple[str, ...] = ("arguments",)
) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a call object's text, or None when it is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models send the arguments as JSON text already
        return obj["name"], args
    return obj["name"], json.dumps(args, ensure_ascii=False)


class JsonValues:
    """Splits streamed text into complete JSON values: objects separated by `seps` at the top
    level (array_items=False), or the object elements of one top-level array (array_items=True).

    Text is scanned once, character by character (strings and escapes tracked, not literals:
    json.loads judges each value). Scanning stops at the first character that cannot continue
    (`stop` is its index in `text`), or when done: after `max_values` values or at the array's
    closing bracket (`stop` is then the index just after).
    """

    def __init__(self, array_items: bool = False, seps: str = "", max_values: int = 0):
        self.array_items = array_items
        self.seps = seps or ("," if array_items else "")  # allowed after a value
        self.max_values = max_values
        self.text = ""  # all text fed
        self.stop = -1  # index where scanning stopped, -1 while it goes on
        self.done = False  # stopped at a proper end (not at a bad character)
        self.num_values = 0
        self.depth = 0
        self.value_start = 0  # where the value being scanned (or the text after the last) began
        self._pos = 0
        self._in_str = False
        self._esc = False
        # Depth of the values we return: 1 for top-level objects, 2 for an array's elements.
        self._level = 2 if array_items else 1

    def feed(self, text: str) -> list[tuple[int, str]]:
        """Add text; returns the values it completed, as (start index in self.text, text)."""
        self.text += text
        found: list[tuple[int, str]] = []
        t, level = self.text, self._level
        i = self._pos
        while self.stop < 0 and i < len(t):
            ch = t[i]
            i += 1
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
                continue
            if self.depth < level:  # between values
                if ch.isspace() or (self.num_values and ch in self.seps):
                    continue
                if ch == "[" and self.depth == 0 and self.array_items:
                    self.depth = 1
                elif ch == "]" and self.depth == 1 and self.array_items:
                    self.stop, self.done = i, True
                elif ch == "{":
                    self.value_start, self.depth = i - 1, level
                else:
                    self.stop = i - 1
                continue
            if ch == '"':
                self._in_str = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth < level:
                    found.append((self.value_start, t[self.value_start : i]))
                    self.value_start = i  # what follows is no value yet
                    self.num_values += 1
                    if self.num_values == self.max_values:
                        self.stop, self.done = i, True
        self._pos = i
        return found

    @property
    def rest(self) -> str:
        """The text from where scanning stopped."""
        return self.text[self.stop :] if self.stop >= 0 else ""


class ToolParser:
    """Base: keeps the calls emitted so far. Subclasses implement _drain(final)."""

    def __init__(self) -> None:
        self._calls: list[ToolCall] = []
        self._buf = ""  # text received and not yet resolved into content or calls

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Add output text; returns (content to show now, pieces of tool calls)."""
        self._buf += text
        return self._drain(final=False)

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        """At the end of the output: everything still held back."""
        return self._drain(final=True)

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._calls)

    def _drain(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        raise NotImplementedError

    def _call(self, name: str, arguments: str) -> ToolCallDelta:
        call = ToolCall(new_call_id(), name, arguments)
        self._calls.append(call)
        return ToolCallDelta(len(self._calls) - 1, call.id, name, arguments)

    def _content(self, tag: str, final: bool, strip_lead: bool) -> tuple[str, int]:
        """Content of self._buf up to `tag`: (text to emit, index of the tag or -1).

        Drops leading whitespace when strip_lead (right after a call) and the whitespace
        before the tag; holds back a tail that may become the tag, and whitespace before it.
        """
        buf = self._buf.lstrip() if strip_lead else self._buf
        pos = buf.find(tag)
        if pos >= 0:
            self._buf = buf[pos + len(tag) :]
            return buf[:pos].rstrip(), pos
        if final:
            self._buf = ""
            return buf, -1
        keep = buf[: len(buf) - held_len(buf, tag)]
        cut = len(keep.rstrip())
        self._buf = buf[cut:]
        return buf[:cut], -1


class HermesParser(ToolParser):
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._in_call = False
        self._after_call = False  # drop the whitespace that follows a call
        self._ws_before = ""  # whitespace dropped before the open tag (back if it is not a call)

    def _drain(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            if not self._in_call:
                before = self._buf.lstrip() if self._after_call else self._buf
                text, pos = self._content(self.START, final, self._after_call)
                content.append(text)
                if text or pos >= 0:
                    self._after_call = False
                if pos < 0:
                    return "".join(content), deltas
                self._ws_before = before[len(text) : pos]
                self._in_call = True
                continue
            pos = self._buf.find(self.END)
            if pos < 0 and not final:
                return "".join(content), deltas
            inner = self._buf if pos < 0 else self._buf[:pos]
            self._buf = "" if pos < 0 else self._buf[pos + len(self.END) :]
            self._in_call = False
            call = call_from_json(inner.strip(), ("arguments", "parameters"))
            if call is not None:
                deltas.append(self._call(*call))
                self._after_call = True
            else:
                end = "" if pos < 0 else self.END
                content.append(self._ws_before + self.START + inner + end)


class Llama3JsonParser(ToolParser):
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._mode = "start"  # start (undecided) -> calls -> content (on a bad value)
        self._seen = ""  # all text fed while no call is out: the content if none is valid
        self._values = JsonValues(seps=";")

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self._mode != "content" and not self._calls:
            self._seen += text
        return super().feed(text)

    def _drain(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        if self._mode == "start":
            head = self._buf.lstrip()
            if head.startswith(self.PYTHON_TAG) or head.startswith("{"):
                self._mode = "calls"
                self._buf = head.removeprefix(self.PYTHON_TAG)
            elif not final and self.PYTHON_TAG.startswith(head):
                return "", []
            else:
                self._mode = "content"
        text, self._buf = self._buf, ""
        if self._mode == "content":
            return text, []
        deltas: list[ToolCallDelta] = []
        values = self._values
        for start, value in values.feed(text):
            call = call_from_json(value, ("parameters", "arguments"))
            if call is None:
                return self._give_up(start), deltas
            deltas.append(self._call(*call))
        if values.stop >= 0:
            return self._give_up(values.stop), deltas
        if final and values.depth:  # an unfinished object
            return self._give_up(values.value_start), deltas
        return "", deltas

    def _give_up(self, start: int) -> str:
        """Not (or no longer) calls: the rest is content; before any call, all of it is."""
        self._mode = "content"
        if not self._calls:
            return self._seen
        return self._values.text[start:].lstrip(" \t\r\n;")


class MistralParser(ToolParser):
    TAG, ARGS = "[TOOL_CALLS]", "[ARGS]"
    _NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

    def __init__(self) -> None:
        super().__init__()
        # content -> tag (just after [TOOL_CALLS]) -> array | name -> args -> content
        self._mode = "content"
        self._after_call = False
        self._block = ""  # text of the current [TOOL_CALLS] block: the content if it fails
        self._block_calls = 0
        self._values = JsonValues()
        self._name = ""

    def _drain(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            if self._mode == "content":
                before = self._buf.lstrip() if self._after_call else self._buf
                text, pos = self._content(self.TAG, final, self._after_call)
                content.append(text)
                if text or pos >= 0:
                    self._after_call = False
                if pos < 0:
                    return "".join(content), deltas
                self._block, self._block_calls = before[len(text) : pos] + self.TAG, 0
                self._mode = "tag"
            if self._mode == "tag":
                head = self._buf.lstrip()
                if not head and not final:
                    return "".join(content), deltas
                self._mode = "array" if head.startswith("[") else "name"
                self._values = JsonValues(array_items=True)
            if self._mode == "name":
                pos = self._buf.find(self.ARGS)
                name = self._buf[:pos].split("[CALL_ID]")[0].strip()
                if pos < 0 and not final:
                    return "".join(content), deltas
                if pos < 0 or not self._NAME.fullmatch(name):
                    content.append(self._fail(""))
                    continue
                self._block += self._buf[: pos + len(self.ARGS)]
                self._buf = self._buf[pos + len(self.ARGS) :]
                self._name, self._mode = name, "args"
                self._values = JsonValues(max_values=1)
            text, self._buf = self._buf, ""
            values = self._values
            for start, value in values.feed(text):
                call = self._parse(value)
                if call is None:
                    content.append(self._fail(values.text[start:]))
                    break
                deltas.append(self._call(*call))
                self._block_calls += 1
            else:
                if values.done:
                    self._buf, self._mode, self._after_call = values.rest, "content", True
                elif values.stop >= 0 or final:
                    start = values.stop if values.stop >= 0 else values.value_start
                    content.append(self._fail(values.text[start:]))
                else:
                    return "".join(content), deltas

    def _parse(self, value: str) -> tuple[str, str] | None:
        if self._mode == "array":
            return call_from_json(value)
        try:
            return self._name, json.dumps(json.loads(value), ensure_ascii=False)
        except ValueError:
            return None

    def _fail(self, rest: str) -> str:
        """The block is not (or no longer) calls: its text (or what is left of it) is content."""
        out = self._block + self._values.text + self._buf
        if self._block_calls:  # only what follows the calls
            out = rest.lstrip(" \t\r\n,")
        self._buf, self._block, self._mode = "", "", "content"
        self._values = JsonValues()
        return out
