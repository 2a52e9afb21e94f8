"""Reasoning (thinking) text split from the content, streamed (vLLM's --reasoning-parser).

One parser per choice is fed the choice's output text; each feed returns (reasoning delta,
content delta). A choice's output goes through at most three phases:

    start      undecided: the output so far is whitespace or a prefix of <think> (held back)
    reasoning  up to </think> (a tail that may become </think> is held back)
    content    everything after </think>, as is

    qwen3        starts in reasoning only when the prompt ends inside an opened <think> (the
                 template opened it, prompt_text ends with "<think>" and whitespace) or the
                 output opens it; otherwise all of it is content (a </think> then is text)
    deepseek_r1  starts in reasoning (its template opens <think> in the prompt); an output
                 that opens <think> itself has the tag dropped; no </think> at all -> all of
                 it is reasoning, as vLLM does

A reasoning block opened and never closed stays reasoning: a stream cannot take back what it
sent, and the same text must give the same split however it was cut into pieces.
"""

from __future__ import annotations

from router.tool_parsers import held_len

REASONING_PARSERS: tuple[str, ...] = ("qwen3", "deepseek_r1")
THINK_START, THINK_END = "<think>", "</think>"


def make_reasoning_parser(name: str, prompt_text: str) -> ReasoningParser:
    """The parser for one choice; prompt_text is the rendered prompt (chat template output)."""
    if name == "qwen3":
        return ReasoningParser(prompt_text.rstrip().endswith(THINK_START))
    if name == "deepseek_r1":
        return ReasoningParser(True)
    raise ValueError(f"unknown reasoning parser {name!r}; choose one of {REASONING_PARSERS}")


class ReasoningParser:
    def __init__(self, start_in_reasoning: bool) -> None:
        self.start_in_reasoning = start_in_reasoning
        self.phase = "start"  # start -> reasoning -> content, or start -> content
        self._buf = ""  # text received and not yet returned

    def feed(self, text: str) -> tuple[str, str]:
        """Add output text; returns (reasoning delta, content delta)."""
        self._buf += text
        return self._drain(final=False)

    def flush(self) -> tuple[str, str]:
        """At the end of the output: what was held back (a partial tag is plain text then)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        reasoning = ""
        if self.phase == "start":
            head = self._buf.lstrip()
            if head.startswith(THINK_START):
                self._buf, self.phase = head[len(THINK_START) :], "reasoning"
            elif not final and THINK_START.startswith(head):
                return "", ""
            else:
                self.phase = "reasoning" if self.start_in_reasoning else "content"
        if self.phase == "reasoning":
            pos = self._buf.find(THINK_END)
            if pos < 0:
                cut = len(self._buf) - (0 if final else held_len(self._buf, THINK_END))
                reasoning, self._buf = self._buf[:cut], self._buf[cut:]
                return reasoning, ""
            reasoning, self._buf = self._buf[:pos], self._buf[pos + len(THINK_END) :]
            self.phase = "content"
        content, self._buf = self._buf, ""
        return reasoning, content
