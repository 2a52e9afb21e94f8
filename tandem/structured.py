"""Structured outputs: token masks that keep a request's output inside its constraint (xgrammar).

A constrained request's life:
    compile   StructuredOutput -> CompiledGrammar, by GrammarBackend.compile (cached by
              StructuredOutput.key). The servers call it in a thread before the request
              reaches the engine loop; there the engine's lookup is a cache hit (the offline
              API's first request compiles in the engine, once).
    admit     Request.grammar = GrammarState: a fresh matcher that has replayed the request's
              earlier outputs (a migrated request's last prompt tokens), refused when they do
              not match
    sample    grammar_bitmask(): each constrained row's matcher catches up with the tokens
              sampled so far (under async scheduling, the previous step's token, read from
              the host once that step's copy is done) and fills its row of the mask, which
              the sampler applies to the logits before anything else
    process   the engine appends the token; GrammarState.advance accepts it; a terminated
              matcher (it accepted a stop token) ends the request with "stop"

The matcher lives on the Request: it goes with it on finish, abort or failure.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tandem.engine_records import RequestFailed
from tandem.records import StructuredOutput
from tandem.validation import InvalidField

if TYPE_CHECKING:
    from tandem.request import Request

PARAM = "structured_outputs"  # the public API's name for the field (InvalidField.param)
# xgrammar's messages start with "[hh:mm:ss] /path/file.cc:123: "; users need only the rest
_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def _clean(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return _XGR_PREFIX.sub("", text)


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF for "exactly one of choices": an alternation of escaped string literals (JSON's
    escapes, which xgrammar's EBNF reads)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarBackend:
    """Compiles constraints for one model's vocabulary; thread-safe (the servers compile in
    worker threads while the engine thread looks grammars up).

    Built cheaply with the engine; the tokenizer and xgrammar's compiler load on the first
    structured request. vocab_size is the model's (embedding rows, may exceed the
    tokenizer's): the masks cover every logit.
    """

    def __init__(
        self,
        model_dir: Path | str,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        any_whitespace: bool = False,
        cache_size: int = 256,
    ) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        # JSON: no free whitespace between tokens by default (small models loop on it)
        self.any_whitespace = any_whitespace
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Any] = OrderedDict()  # key -> CompiledGrammar
        self._lock = threading.Lock()
        self._compiler = None

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(self.model_dir))
                info = xgr.TokenizerInfo.from_huggingface(
                    tok, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = xgr.GrammarCompiler(info)
            return self._compiler

    def compile(self, so: StructuredOutput):
        """The compiled grammar of so (cached); InvalidField for a spec xgrammar refuses."""
        key = so.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(self._get_compiler(), so)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, compiler, so: StructuredOutput):
        kind, ws = so.kind, self.any_whitespace
        what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(kind, kind)
        try:
            if kind == "json":
                schema = json.loads(so.spec)
                return compiler.compile_json_schema(
                    json.dumps(schema), any_whitespace=ws, strict_mode=True
                )
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=ws)
            if kind == "regex":
                return compiler.compile_regex(so.spec)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(so.choices))
            if kind == "grammar":
                return compiler.compile_grammar(so.spec)
            if kind == "structural_tag":
                json.loads(so.spec)
                return compiler.compile_structural_tag(so.spec)
        except (ValueError, RuntimeError, TypeError) as e:
            raise InvalidField(PARAM, f"invalid {what} for structured outputs: {_clean(e)}") from e
        raise InvalidField(PARAM, f"unknown structured output kind {kind!r}")

    def new_state(self, so: StructuredOutput, output_ids: Sequence[int] = ()) -> GrammarState:
        """A request's matcher, having replayed its earlier outputs (a migrated request)."""
        import xgrammar as xgr

        state = GrammarState(xgr.GrammarMatcher(self.compile(so)))
        for token in output_ids:
            if not state.matcher.accept_token(token):
                raise InvalidField(
                    PARAM,
                    "the earlier output tokens (num_output_tokens) do not match the constraint",
                )
            state.num_accepted += 1
        return state


class GrammarState:
    """One request's matcher and how many of its output tokens it has accepted."""

    __slots__ = ("matcher", "num_accepted")

    def __init__(self, matcher) -> None:
        self.matcher = matcher
        self.num_accepted = 0

    def _accept(self, req: Request, token: int) -> None:
        if not self.matcher.accept_token(token):  # the mask allows no such token: a bug
            error = ValueError(f"token {token} breaks the structured output's grammar")
            raise RequestFailed(req.req_id, error)
        self.num_accepted += 1

    def advance(self, req: Request, pending_token: int | None = None) -> bool:
        """Accept the request's output tokens not accepted yet (and the token still on its
        way into req.token_ids, under async scheduling); True once the matcher terminated.
        A token the grammar refuses fails the request alone (RequestFailed)."""
        toks = req.token_ids
        lost = self.num_accepted - (len(toks) - req.num_prompt_tokens)
        if lost > 0:  # a failed step's tokens, taken from its host copy, never reached req
            self.matcher.rollback(lost)
            self.num_accepted -= lost
        for i in range(req.num_prompt_tokens + self.num_accepted, len(toks)):
            self._accept(req, toks[i])
        if pending_token is not None:
            self._accept(req, pending_token)
        return self.matcher.is_terminated()


def grammar_bitmask(logits: torch.Tensor, reqs: list[Request], prev) -> torch.Tensor | None:
    """The token mask of a batch's sampled rows (logits [len(reqs), V]): [len(reqs),
    ceil(V/32)] int32 on the logits' device, a row of ones for an unconstrained request; None
    when no row is constrained.

    prev: the step in flight (tandem/runner.py Launched) whose tokens some of these requests
    still wait for; its host copy is awaited here, after the new step's forward was queued,
    so the GPU computes on while the matchers advance.
    """
    rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
    if not rows:
        return None
    import xgrammar as xgr

    pending = None
    if prev is not None and prev.sampling and any(reqs[i].num_pending_tokens for i in rows):
        if prev.event is not None:
            prev.event.synchronize()
        pending = prev.host_tokens.tolist()
    mask = xgr.allocate_token_bitmask(len(reqs), logits.shape[-1])
    fill_rows = []
    for i in rows:
        req = reqs[i]
        state: GrammarState = req.grammar
        token = pending[req.pending_row] if req.num_pending_tokens and pending else None
        if not state.advance(req, token):  # terminated: the row's token is dropped
            fill_rows.append(i)
    _fill(xgr, mask, reqs, fill_rows)
    if logits.device.type == "cuda":  # pinned: a pageable copy would wait for the GPU
        return mask.pin_memory().to(logits.device, non_blocking=True)
    return mask


_BATCH_MIN_ROWS = 8  # below this, one thread fills the rows faster than a hand-off
_batch_matcher = None


def _fill(xgr, mask: torch.Tensor, reqs: list[Request], rows: list[int]) -> None:
    """Fill the mask's rows from their requests' matchers: many rows in xgrammar's thread pool
    (a row inside a JSON string costs tens of microseconds, a batch of hundreds milliseconds on
    one thread), a few on this thread. An error fails the row's request alone."""
    global _batch_matcher
    if len(rows) >= _BATCH_MIN_ROWS:
        if _batch_matcher is None:
            _batch_matcher = xgr.BatchGrammarMatcher(max_threads="auto")
        try:
            matchers = [reqs[i].grammar.matcher for i in rows]
            _batch_matcher.batch_fill_next_token_bitmask(matchers, mask, rows)
            return
        except Exception:
            pass  # find the row that failed, below
    for i in rows:
        try:
            reqs[i].grammar.matcher.fill_next_token_bitmask(mask, i)
        except Exception as e:
            raise RequestFailed(reqs[i].req_id, e) from e


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """Disallowed tokens' logits -> -inf, in place, on the logits' device."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=logits.shape[-1])
