"""The offline API, shaped like vLLM's: `LLM(...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

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


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0

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

        results: dict[str, tuple[RequestOutput, SamplingParams]] = {}
        for prompt, p in zip(prompts, params_list, strict=True):
            ids = (
                self.tokenizer.encode(prompt, add_special_tokens=False)
                if isinstance(prompt, str)
                else list(prompt)
            )
            req_id = str(next(self._ids))
            self.engine.add_request(req_id, ids, p)
            out = RequestOutput(req_id, prompt if isinstance(prompt, str) else None, ids)
            out.outputs.append(
                CompletionOutput(0, "", [], None, [] if p.logprobs is not None else None)
            )
            results[req_id] = (out, p)
        self._run(results, use_tqdm)
        return [out for out, _ in results.values()]

    def _run(
        self, results: dict[str, tuple[RequestOutput, SamplingParams]], use_tqdm: bool
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
                out, p = results[step.req_id]
                comp = out.outputs[0]
                comp.token_ids += step.new_token_ids
                if comp.logprobs is not None:
                    comp.logprobs += step.new_logprobs
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
        for out, p in results.values():
            comp = out.outputs[0]
            text = self.tokenizer.decode(comp.token_ids, skip_special_tokens=p.skip_special_tokens)
            comp.text, _ = _truncate_at_stop(text, p.stop, p.include_stop_str_in_output)

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


__all__ = ["LLM", "RequestOutput", "CompletionOutput", "SamplingParams"]
