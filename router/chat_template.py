"""HF `apply_chat_template` semantics with jinja2 only (the router never imports transformers).

Mirrors transformers' renderer: a sandboxed, immutable environment with trim_blocks and
lstrip_blocks, the loopcontrols extension, a `tojson` filter that keeps non-ASCII text,
`raise_exception` and `strftime_now` globals, the special tokens (bos_token, eos_token, ...) as
variables, and `{% generation %}` blocks rendered as plain text.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """The template itself rejected the conversation (raise_exception) or failed to render."""


class _GenerationTag(Extension):
    # Templates for assistant-token masks wrap assistant turns in {% generation %}; for
    # inference the body is just output.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    tools: list[dict] | None = None,
    **extra,
) -> str:
    """tools: OpenAI's shape [{"type": "function", "function": {...}}], or None (HF passes
    None too). extra: the request's chat_template_kwargs; as in HF and vLLM they may override
    add_generation_prompt and the special tokens, never the messages or the tools."""
    variables = {
        **(special_tokens or {}),
        "add_generation_prompt": add_generation_prompt,
        **extra,
        "messages": messages,
        "tools": tools,
    }
    try:
        return _compile(template).render(**variables)
    except TemplateError:
        raise
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template failed: {e}") from e
