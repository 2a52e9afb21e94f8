"""The offline API, shaped like vLLM's: `LLM(...).generate(prompts, SamplingParams(...))`.

n and best_of (vLLM's): a prompt runs as best_of (default n) sequences in the engine, sample
i seeded with seed + i when seeded; best_of keeps the n with the highest cumulative logprob.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

from tandem.config import EngineConfig
from tandem.engine import LLMEngine
from tandem.records import Logprob, SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[Logprob] | None = None
    # sum of the sampled tokens' logprobs, when logprobs or best_of ask for it
    cumulative_logprob: float | None = None


@dataclass(frozen=True)
class LogprobEntry:
    """One token's entry in RequestOutput.prompt_logprobs (vLLM's Logprob)."""

    logprob: float
    rank: int | None = None  # 1: the most likely token at its position
    decoded_token: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    # SamplingParams.prompt_logprobs, as vLLM has it: None for the first prompt token, then
    # per position {token_id: LogprobEntry} for the prompt token and the top alternatives
    prompt_logprobs: list[dict[int, LogprobEntry] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


def _truncate_at_stop(text: str, stop: list[str], include: bool) -> tuple[str, bool]:
    hits = [(text.find(s), s) for s in stop if s and s in text]
    if not hits:
        return text, False
    pos, s = min(hits)
    return text[: pos + len(s) if include else pos], True


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        **engine_kwargs: Any,
    ) -> None:
        self.engine = LLMEngine(
            EngineConfig(model=model, dtype=dtype, device=device, **engine_kwargs)
        )
        self._tokenizer = None
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stops the tensor-parallel ranks now (they also stop when this process exits)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.engine.model_dir))
        return self._tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Prompts are strings or token-id lists; outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or a single one for all")

        results: dict[str, tuple[RequestOutput, SamplingParams, CompletionOutput]] = {}
        outs = []
        for prompt, p in zip(prompts, params_list, strict=True):
            ids = (
                self.tokenizer.encode(prompt, add_special_tokens=False)
                if isinstance(prompt, str)
                else list(prompt)
            )
            req_id = str(next(self._ids))
            out = RequestOutput(req_id, prompt if isinstance(prompt, str) else None, ids)
            for i, sample_params in enumerate(_samples(p)):
                sample_id = req_id if i == 0 else f"{req_id}#{i}"
                self.engine.add_request(sample_id, ids, sample_params)
                comp = CompletionOutput(i, "", [], None, [] if p.logprobs is not None else None)
                out.outputs.append(comp)
                results[sample_id] = (out, p, comp)
            outs.append(out)
        self._run(results, use_tqdm)
        for out, p in zip(outs, params_list, strict=True):
            _keep_best(out, p)
        return outs

    def _run(
        self,
        results: dict[str, tuple[RequestOutput, SamplingParams, CompletionOutput]],
        use_tqdm: bool,
    ) -> None:
        from tqdm import tqdm

        bar = tqdm(
            total=len(results),
            desc="generating",
            unit="req",
            disable=not use_tqdm or len(results) < 2,
        )
        while self.engine.has_unfinished():
            for step in self.engine.step():
                out, p, comp = results[step.req_id]
                comp.token_ids += step.new_token_ids
                if comp.logprobs is not None:
                    comp.logprobs += step.new_logprobs
                if step.new_logprobs and step.new_logprobs[0] is not None:
                    total = comp.cumulative_logprob or 0.0
                    comp.cumulative_logprob = total + sum(lp.logprob for lp in step.new_logprobs)
                if step.prompt_logprobs is not None:
                    out.prompt_logprobs = self._prompt_entries(out, step.prompt_logprobs)
                if comp.index == 0:  # the first sample's (as Usage.cached_tokens)
                    out.num_cached_tokens = step.num_cached_tokens
                if p.stop:  # also on the last step: a stop string wins over "length"
                    text = self.tokenizer.decode(
                        comp.token_ids, skip_special_tokens=p.skip_special_tokens
                    )
                    comp.text, hit = _truncate_at_stop(text, p.stop, p.include_stop_str_in_output)
                    if hit:
                        if step.finish_reason is None:
                            self.engine.abort(step.req_id)
                        comp.finish_reason = "stop"
                        bar.update()
                        continue
                if step.finish_reason is not None:
                    comp.finish_reason = step.finish_reason
                    bar.update()
        bar.close()
        for _, p, comp in results.values():
            text = self.tokenizer.decode(comp.token_ids, skip_special_tokens=p.skip_special_tokens)
            comp.text, _ = _truncate_at_stop(text, p.stop, p.include_stop_str_in_output)

    def _prompt_entries(
        self, out: RequestOutput, lps: list[Logprob]
    ) -> list[dict[int, LogprobEntry] | None]:
        """The engine's prompt logprobs (prompt tokens 1..) in vLLM's shape: each position's
        prompt token first, then its top alternatives, with their ranks and text."""
        text = self.tokenizer.decode
        entries: list[dict[int, LogprobEntry] | None] = [None]
        for lp in lps:
            pos = {lp.token_id: LogprobEntry(lp.logprob, lp.rank, text([lp.token_id]))}
            for rank, (tok, value) in enumerate(lp.top, 1):
                if tok not in pos:
                    pos[tok] = LogprobEntry(value, rank, text([tok]))
            entries.append(pos)
        return entries[: len(out.prompt_token_ids)]

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Applies the model's chat template, then generates; one conversation or a list."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt, tokenize=False
            )
            for conv in conversations
        ]
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outs = self.generate(ids, sampling_params, use_tqdm)
        for out, prompt in zip(outs, prompts, strict=True):
            out.prompt = prompt
        return outs


def _samples(p: SamplingParams) -> list[SamplingParams]:
    """The sequences a prompt runs as: best_of (default n), sample i seeded with seed + i;
    best_of > n needs the sampled tokens' logprobs (to rank them), prompt logprobs come once."""
    num = p.best_of or p.n
    if p.n < 1 or num < p.n:
        raise ValueError(f"n must be >= 1 and best_of >= n, got n={p.n} best_of={p.best_of}")
    if num == 1:
        return [p]
    ranked = num > p.n and p.logprobs is None
    return [
        dataclasses.replace(
            p,
            n=1,
            best_of=None,
            seed=None if p.seed is None else p.seed + i,
            logprobs=0 if ranked else p.logprobs,
            prompt_logprobs=p.prompt_logprobs if i == 0 else None,
        )
        for i in range(num)
    ]


def _keep_best(out: RequestOutput, p: SamplingParams) -> None:
    """best_of > n: the n outputs with the highest cumulative logprob, best first, indexed
    0..n-1 in that order (vLLM's ranking)."""
    if len(out.outputs) <= p.n:
        return
    best = sorted(out.outputs, key=lambda c: c.cumulative_logprob, reverse=True)[: p.n]
    for i, comp in enumerate(best):
        comp.index = i
    out.outputs = best


__all__ = ["LLM", "RequestOutput", "CompletionOutput", "LogprobEntry", "SamplingParams"]
