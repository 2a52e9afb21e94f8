"""Incremental detokenization (vLLM's prefix/read offsets over the `tokenizers` decoder).

Decoding token by token breaks words that depend on their neighbours (SentencePiece spaces)
and multi-byte UTF-8 characters split across byte-level tokens. Each step decodes a short
window twice:

    ids:  ... [prefix_offset ........ read_offset) [new tokens ...]
                 already emitted context            not yet emitted

and emits new_text[len(prefix_text):] only when the window no longer ends in U+FFFD (an
incomplete character); otherwise the tokens wait for the next step.
"""

from __future__ import annotations

from router.tokenizer import RouterTokenizer

# Prompt tokens kept as left context for the first output tokens (vLLM uses the same 5).
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: RouterTokenizer, prompt_ids: list[int], skip_special_tokens: bool = True
    ):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly completed text ("" while it is incomplete)."""
        self.ids.append(token_id)
        return self._step()

    def add_many(self, token_ids: list[int]) -> str:
        """Append a worker message's tokens with one pair of decodes (not one per token).

        Same text in total as add() per token; only where the batch ends in an incomplete
        character the whole batch's text waits for the next one (add() would have let the
        complete part out one token earlier)."""
        if not token_ids:
            return ""
        self.ids += token_ids
        return self._step()

    def _step(self) -> str:
        prefix_text = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        new_text = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            # Keep the window short: only the last emitted stretch is context.
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of the sequence (e.g. a truncated character)."""
        prefix_text = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        new_text = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
