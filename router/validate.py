"""Request checks shared by every client of the router (the gateway checks again, for HTTP).

The sampling and token rules themselves live in the core (tandem/validation.py), which the
workers apply at their own boundary too; this module adds what only the public API has
(prompt text, chat messages, n, tools and tool_choice, chat_template_kwargs; structured-output
specs checked as far as the router can without xgrammar) and turns a refusal into a
RequestError with its param.

The bounds on sizes keep one gRPC request (up to 64 MiB) from costing unbounded tokenizer time
or worker memory; they sit above the gateway's defaults, which are the tighter, tunable ones.
"""

from __future__ import annotations

import json
import re

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from router.tools import forced_tool_constraint
from router.types import ErrorKind, GenerateInput, RequestError
from tandem.records import StructuredOutput
from tandem.validation import (  # noqa: F401 - the bounds, re-exported for the router's users
    MAX_LOGIT_BIAS,
    MAX_STOP_LEN,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_STRUCTURED_SPEC,
    MAX_TOP_LOGPROBS,
    InvalidField,
    RequestLimits,
    check_prompt,
    check_sampling,
)
from tandem.validation import check_structured as check_structured_shape

MAX_MESSAGES = 4096
MAX_PROMPT_CHARS = 1 << 23  # prompt text, or a chat's summed message text, before tokenizing
MAX_TOOLS = 128
MAX_SCHEMA_CHARS = MAX_STRUCTURED_SPEC  # one tool's parameters schema, as JSON text
MAX_TOOLS_CHARS = 1 << 20  # all tools' names, descriptions and schemas together
MAX_TEMPLATE_KWARGS_CHARS = 1 << 16  # chat_template_kwargs as JSON text
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_MODES = ("none", "auto", "required")
# the names the template itself binds: chat_template_kwargs may not replace them
RESERVED_TEMPLATE_VARS = frozenset({"messages", "tools"})
AUTO_TOOL_CHOICE_MESSAGE = (
    '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
)


def _bad(param: str, message: str) -> RequestError:
    return RequestError(ErrorKind.INVALID_ARGUMENT, message, param=param)


def validate_input(
    gi: GenerateInput,
    max_n: int,
    max_top_logprobs: int = MAX_TOP_LOGPROBS,
    auto_tool_choice: bool = False,
) -> None:
    """Everything that does not need the tokenized prompt. Settles gi.tool_choice (unset: "auto"
    with tools, else "none") and, for "required" or a named function, the structured-output
    constraint that forces the call (router/tools.py). auto_tool_choice: the router has a
    tool-call parser and --enable-auto-tool-choice."""
    given = [x is not None for x in (gi.text, gi.messages, gi.prompt_token_ids)]
    if not any(given):
        raise _bad("prompt", "one of prompt text, chat messages or token ids is required")
    if gi.messages is not None:
        if not gi.messages:
            raise _bad("messages", "messages must not be empty")
        if len(gi.messages) > MAX_MESSAGES:
            raise _bad("messages", f"at most {MAX_MESSAGES} messages")
        for i, m in enumerate(gi.messages):
            if not m.get("role"):
                raise _bad(f"messages[{i}].role", "every message needs a role")
        if sum(_message_chars(m) for m in gi.messages) > MAX_PROMPT_CHARS:
            raise _bad("messages", f"the messages hold more than {MAX_PROMPT_CHARS} characters")
    if gi.text is not None and len(gi.text) > MAX_PROMPT_CHARS:
        raise _bad("prompt", f"the prompt has more than {MAX_PROMPT_CHARS} characters")
    if not 1 <= gi.n <= max_n:
        raise _bad("n", f"n must be between 1 and {max_n}, got {gi.n}")
    s = gi.sampling
    if s.structured is not None:
        try:
            check_structured_shape(s.structured)  # kind, sizes: before parsing anything
        except InvalidField as e:
            raise _bad(e.param, e.message) from None
        check_structured(s.structured)
    check_template_kwargs(gi)
    forced = _check_tools(gi, auto_tool_choice)
    try:
        check_sampling(s, gi.top_logprobs, max_top_logprobs)
    except InvalidField as e:
        # a forced call's constraint too large for the workers: the tools are to blame
        param = "tools" if forced and e.param == "structured_outputs" else e.param
        raise _bad(param, e.message) from None


def validate_prompt(gi: GenerateInput, prompt_ids: list[int], vocab_size: int, max_model_len: int):
    """Token-level checks; fills sampling.max_tokens when unset."""
    param = "messages" if gi.messages is not None else "prompt"
    s = gi.sampling
    try:
        check_prompt(prompt_ids, s, RequestLimits(vocab_size, max_model_len), param)
    except InvalidField as e:
        kind = ErrorKind.CONTEXT_LENGTH if e.context_length else ErrorKind.INVALID_ARGUMENT
        raise RequestError(kind, e.message, param=e.param) from None
    if s.max_tokens is None:
        s.max_tokens = max_model_len - len(prompt_ids)


def _message_chars(m: dict) -> int:
    n = len(m.get("content") or "") + len(m.get("reasoning_content") or "")
    for call in m.get("tool_calls") or ():
        args = call["function"]["arguments"]
        n += len(args) if isinstance(args, str) else len(json.dumps(args))
    return n


def _parse_schema(text: str, what: str, param: str) -> object:
    """The schema in `text`, parsed and checked against its metaschema."""
    if len(text) > MAX_SCHEMA_CHARS:
        raise _bad(param, f"{what} is longer than {MAX_SCHEMA_CHARS} characters")
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise _bad(param, f"{what} is not valid JSON: {e}") from None
    return check_schema(schema, what, param)


def check_schema(schema: object, what: str, param: str) -> object:
    """A JSON Schema (an object or a boolean) that its own metaschema accepts."""
    if not isinstance(schema, dict | bool):
        raise _bad(param, f"{what} must be a JSON object, got {type(schema).__name__}")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        where = "/".join(map(str, e.absolute_path))
        raise _bad(
            param,
            f"{what} is not a valid JSON Schema: {e.message}" + (f" (at {where})" if where else ""),
        ) from None
    except RecursionError:
        raise _bad(param, f"{what} is nested too deeply") from None
    return schema


def check_structured(c: StructuredOutput) -> None:
    """What the router can tell of a constraint (its shape and size checked before): a JSON
    schema that parses and that its metaschema accepts, a regex that compiles, a structural
    tag that is a JSON object. Whether xgrammar compiles it is the workers' to say.

    param is "structured_outputs" whatever field the client used (response_format,
    guided_json, ...): the router cannot know it; the gateway renames it."""
    param = "structured_outputs"
    if c.kind == "json":
        _parse_schema(c.spec, "the JSON schema", param)
    elif c.kind == "regex":
        try:
            re.compile(c.spec)
        except (re.error, RecursionError) as e:
            raise _bad(param, f"invalid regex {c.spec[:200]!r}: {e}") from None
    elif c.kind == "grammar":
        if not c.spec.strip():
            raise _bad(param, "the grammar is empty")
    elif c.kind == "structural_tag":
        try:
            tag = json.loads(c.spec)
        except ValueError as e:
            raise _bad(param, f"the structural tag is not valid JSON: {e}") from None
        if not isinstance(tag, dict):
            raise _bad(param, "the structural tag must be a JSON object")


def check_template_kwargs(gi: GenerateInput) -> None:
    kwargs = gi.chat_template_kwargs
    if not kwargs:
        return
    if gi.messages is None:
        raise _bad("chat_template_kwargs", "chat_template_kwargs needs chat messages")
    if len(json.dumps(kwargs)) > MAX_TEMPLATE_KWARGS_CHARS:
        raise _bad(
            "chat_template_kwargs",
            f"chat_template_kwargs is longer than {MAX_TEMPLATE_KWARGS_CHARS} characters",
        )
    taken = RESERVED_TEMPLATE_VARS & kwargs.keys()
    if taken:
        raise _bad(
            "chat_template_kwargs",
            f"chat_template_kwargs may not set {', '.join(sorted(taken))}: use the request's field",
        )


def _check_tools(gi: GenerateInput, auto_tool_choice: bool) -> bool:
    """Checks tools and tool_choice, settles tool_choice; True when a call is forced."""
    tools, choice = gi.tools or [], gi.tool_choice
    if tools and gi.messages is None:
        raise _bad("tools", "tools need chat messages")
    if len(tools) > MAX_TOOLS:
        raise _bad("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    names = set()
    size = 0
    for i, f in enumerate(tools):
        name = f.get("name", "")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise _bad(
                f"tools[{i}].function.name",
                "a function name is 1 to 64 letters, digits, '_' or '-'",
            )
        names.add(name)
        params = f.get("parameters", {})
        text = json.dumps(params)
        if len(text) > MAX_SCHEMA_CHARS:
            raise _bad(
                f"tools[{i}].function.parameters",
                f"{name}'s parameters schema is longer than {MAX_SCHEMA_CHARS} characters",
            )
        check_schema(params, f"{name}'s parameters", f"tools[{i}].function.parameters")
        size += len(text) + len(name) + len(f.get("description") or "")
    if size > MAX_TOOLS_CHARS:
        raise _bad("tools", f"the tools hold more than {MAX_TOOLS_CHARS} characters")
    if choice is None:
        choice = "auto" if tools else "none"
    if choice not in TOOL_MODES and not tools:
        raise _bad("tool_choice", "a named tool_choice needs tools")
    if choice == "required" and not tools:
        raise _bad("tool_choice", 'tool_choice "required" needs tools')
    if choice not in TOOL_MODES and choice not in names:
        raise _bad("tool_choice", f"tool_choice names {choice!r}, which is not among the tools")
    if choice == "auto" and tools and not auto_tool_choice:
        raise _bad("tool_choice", AUTO_TOOL_CHOICE_MESSAGE)
    gi.tool_choice = choice
    if choice in TOOL_MODES[:2]:
        return False
    if gi.sampling.structured is not None:
        raise _bad(
            "tool_choice",
            f"tool_choice {choice!r} cannot be combined with a structured output constraint "
            "(response_format / structured_outputs): the forced call is one",
        )
    gi.sampling.structured = forced_tool_constraint(tools, choice)
    return True
