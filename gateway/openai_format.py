"""Accumulate router chunks into OpenAI chat / completions objects and SSE events.

Choice index across a batch of prompts: prompt_index * n + choice index (as OpenAI and vLLM).
"""

from __future__ import annotations

import time

from gateway.responses import FINISH, CompletionLogprobs, chat_logprobs, usage_json


class _Builder:
    object_name = ""
    chunk_object = ""

    def __init__(self, rid: str, model: str, n: int, num_prompts: int, body):
        self.id, self.model, self.n = rid, model, n
        self.created = int(time.time())
        self.num_choices = n * num_prompts
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.texts = [""] * self.num_choices
        self.finish = [None] * self.num_choices
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        self.cached = 0

    def _index(self, prompt_idx: int, chunk) -> int:
        return prompt_idx * self.n + chunk.index

    def _account(self, chunk) -> None:
        if chunk.HasField("usage"):
            u = usage_json(chunk.usage)
            for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
                self.usage[k] += u[k]
            self.cached += chunk.usage.cached_tokens

    def _usage(self) -> dict:
        u = dict(self.usage)
        if self.cached:
            u["prompt_tokens_details"] = {"cached_tokens": self.cached}
        return u

    def finish_reasons(self):
        return self.finish

    def _event(self, choices: list[dict]) -> dict:
        e = {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            e["usage"] = None
        return e

    def stream_end(self) -> list[dict]:
        if not self.include_usage:
            return []
        e = self._event([])
        e["usage"] = self._usage()
        return [e]


class ChatBuilder(_Builder):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, *args):
        super().__init__(*args)
        self.logprobs = [[] for _ in range(self.num_choices)]
        self.want_logprobs = args[-1].logprobs

    def stream_start(self) -> list[dict]:
        return [
            self._event(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for i in range(self.num_choices)
        ]

    def stream_chunk(self, prompt_idx: int, chunk) -> list[dict]:
        self._account(chunk)
        i = self._index(prompt_idx, chunk)
        reason = FINISH[chunk.finish_reason]
        self.finish[i] = reason or self.finish[i]
        if not chunk.text and reason is None and not chunk.logprobs:
            return []
        choice = {
            "index": i,
            "delta": {"content": chunk.text} if chunk.text else {},
            "logprobs": {"content": chat_logprobs(chunk)} if self.want_logprobs else None,
            "finish_reason": reason,
        }
        return [self._event([choice])]

    def add(self, prompt_idx: int, chunk) -> None:
        self._account(chunk)
        i = self._index(prompt_idx, chunk)
        self.texts[i] += chunk.text
        self.logprobs[i] += chat_logprobs(chunk)
        self.finish[i] = FINISH[chunk.finish_reason] or self.finish[i]

    def response(self) -> dict:
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": self.texts[i]},
                    "logprobs": {"content": self.logprobs[i]} if self.want_logprobs else None,
                    "finish_reason": self.finish[i],
                }
                for i in range(self.num_choices)
            ],
            "usage": self._usage(),
        }


class CompletionBuilder(_Builder):
    object_name = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, *args):
        super().__init__(*args)
        self.want_logprobs = args[-1].logprobs is not None
        self.logprobs = [CompletionLogprobs() for _ in range(self.num_choices)]

    def stream_start(self) -> list[dict]:
        return []

    def _lp(self, i, chunk):
        # echo: the prompt text leads the first chunk, so token offsets start after it
        if chunk.prompt_token_ids and not chunk.token_ids:
            self.logprobs[i].offset += len(chunk.text)
        elif chunk.prompt_token_ids:
            self.logprobs[i].offset += len(chunk.text) - sum(len(lp.token) for lp in chunk.logprobs)
        return self.logprobs[i].add(chunk)

    def stream_chunk(self, prompt_idx: int, chunk) -> list[dict]:
        self._account(chunk)
        i = self._index(prompt_idx, chunk)
        reason = FINISH[chunk.finish_reason]
        self.finish[i] = reason or self.finish[i]
        lp = self._lp(i, chunk) if self.want_logprobs else None
        if not chunk.text and reason is None and not chunk.logprobs:
            return []
        choice = {"index": i, "text": chunk.text, "logprobs": lp, "finish_reason": reason}
        return [self._event([choice])]

    def add(self, prompt_idx: int, chunk) -> None:
        self._account(chunk)
        i = self._index(prompt_idx, chunk)
        if self.want_logprobs:
            self._lp(i, chunk)
        self.texts[i] += chunk.text
        self.finish[i] = FINISH[chunk.finish_reason] or self.finish[i]

    def response(self) -> dict:
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": i,
                    "text": self.texts[i],
                    "logprobs": self.logprobs[i].json() if self.want_logprobs else None,
                    "finish_reason": self.finish[i],
                }
                for i in range(self.num_choices)
            ],
            "usage": self._usage(),
        }
