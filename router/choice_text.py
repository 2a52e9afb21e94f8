"""One choice's output text, from worker tokens to what the client sees.

detokenize  token ids -> text, incrementally (the stop token's own text dropped unless
            include_stop_str_in_output)
stop        stop strings: the first match ends the choice, text after it is cut
reasoning   --reasoning-parser, chat only: thinking -> reasoning_text, the rest goes on
tools       tool_choice "required" or a named function: the rest is the forced call(s)
            (router/tools.py ForcedToolOutput; the workers' structured-output masks made it
            JSON); "auto" with tools and a --tool-call-parser: calls found in the rest ->
            tool_calls, the remaining text -> text
The choice's last batch flushes each stage in this order, so nothing held back is lost.

Each stage exists only when the request asks for it: a plain request costs what it did before.
"""

from __future__ import annotations

from typing import NamedTuple

from router.config import RouterConfig
from router.detokenizer import IncrementalDetokenizer
from router.reasoning import make_reasoning_parser
from router.stop import StopStringMatcher
from router.tokenizer import RouterTokenizer
from router.tool_parsers import ToolCallDelta, make_tool_parser
from router.tools import ForcedToolOutput
from router.types import GenerateInput


class TextPiece(NamedTuple):
    text: str  # content to show
    reasoning: str  # reasoning text (--reasoning-parser)
    tool_calls: list[ToolCallDelta]
    stop: str | None  # the stop string that ended the choice here, or None


class ChoiceText:
    def __init__(
        self,
        tokenizer: RouterTokenizer,
        prompt_ids: list[int],
        prompt_text: str,
        gi: GenerateInput,
        config: RouterConfig,
    ):
        s = gi.sampling
        skip_special = s.skip_special_tokens
        self.forced = self.parser = self.reasoning = None
        if gi.tool_choice not in (None, "none", "auto"):
            self.forced = ForcedToolOutput(gi.tool_choice)
        elif gi.tool_choice == "auto" and gi.tools and config.auto_tool_choice:
            self.parser = make_tool_parser(config.tool_call_parser)
            # the calls' markers (<|python_tag|>, [TOOL_CALLS], ...) may be special tokens,
            # which the parser must see (vLLM's parsers ask for them the same way)
            skip_special = False
        # A constrained output (structured, or a forced call) is masked from its first token:
        # it holds no reasoning, and a parser that starts in reasoning (deepseek_r1) would
        # take all of it as such.
        if config.reasoning_parser and gi.messages is not None and s.structured is None:
            self.reasoning = make_reasoning_parser(config.reasoning_parser, prompt_text)
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special)
        self.stops = StopStringMatcher(s.stop, s.include_stop_str_in_output)
        self.keep_stop_token = s.include_stop_str_in_output
        self.plain = self.forced is None and self.parser is None and self.reasoning is None

    def feed(self, token_ids: list[int], stop_token_id: int | None, finished: bool) -> TextPiece:
        """The next batch of the choice's tokens; finished: it is the last one."""
        ids = token_ids
        if stop_token_id is not None and not self.keep_stop_token:
            ids = [t for t in ids if t != stop_token_id]  # the stop token's text is not output
        detok = self.detok
        text = detok.add(ids[0]) if len(ids) == 1 else detok.add_many(ids)
        if finished:
            text += detok.flush()
        text, matched = self.stops.feed(text)
        if finished and matched is None:
            text += self.stops.flush()
        if self.plain:
            return TextPiece(text, "", [], matched)
        return self._split(text, finished or matched is not None, matched)

    def _split(self, text: str, end: bool, matched: str | None) -> TextPiece:
        reasoning = ""
        if self.reasoning is not None:
            reasoning, text = self.reasoning.feed(text)
            if end:
                more_reasoning, more_text = self.reasoning.flush()
                reasoning, text = reasoning + more_reasoning, text + more_text
        calls: list[ToolCallDelta] = []
        if self.forced is not None:
            calls = self.forced.feed(text) + (self.forced.flush() if end else [])
            text = ""
        elif self.parser is not None:
            text, calls = self.parser.feed(text)
            if end:
                more_text, more_calls = self.parser.flush()
                text, calls = text + more_text, calls + more_calls
        return TextPiece(text, reasoning, calls, matched)
