"""Accumulate router chunks into OpenAI chat / completions objects and SSE events.

Choice index across a batch of prompts: prompt_index * n + choice index (as OpenAI and vLLM).

Streaming takes the router's chunks in batches (gateway.app.merged: several only when the
SSE writer lagged). A batch becomes one SSE event per choice that has something to say, its
chunks merged: their text (and reasoning) joined, a tool call's argument pieces joined, every
token's logprobs entry kept in order, the last finish_reason. The events' JSON is the chunk's
fixed fields, encoded once per request, around json.dumps of the choice: the same bytes
json.dumps of the whole event would give.

Chat: a choice that made tool calls and stopped finishes with "tool_calls" (OpenAI); its
message content is null when the output was only tool calls. prompt_logprobs (vLLM's shape,
gateway.responses) are top-level for chat (one prompt), per choice for completions.
"""

from __future__ import annotations

import json
import time

from gateway.responses import (
    FINISH,
    CompletionLogprobs,
    ToolCalls,
    chat_logprobs,
    prompt_logprobs_json,
    tool_call_delta_json,
    usage_json,
)


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
        self.prompt_logprobs: list[list | None] = [None] * self.num_choices
        self.want_prompt_logprobs = body.prompt_logprobs is not None
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        self.cached = 0
        self.frame = self._sse_frame()

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

    def _prompt_logprobs(self, i: int, chunk) -> None:
        """The router sends a prompt's entries with its choice 0 only (the same for every
        choice): they go to each choice of that prompt."""
        if self.want_prompt_logprobs and chunk.index == 0 and self.prompt_logprobs[i] is None:
            entries = prompt_logprobs_json(chunk.prompt_logprobs)
            for j in range(i, i + self.n):
                self.prompt_logprobs[j] = entries

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

    def _sse_frame(self) -> tuple[str, str]:
        """('data: {...fixed fields..., "choices": [', ']...}\\n\\n') around one choice."""
        marker = "\x00choice\x00"
        head, tail = json.dumps(self._event([marker])).split(json.dumps(marker))
        return "data: " + head, tail + "\n\n"

    def sse(self, choices: list[dict]) -> str:
        """One SSE event per choice, all in one string (one write)."""
        head, tail = self.frame
        return "".join(head + json.dumps(c) + tail for c in choices)

    def stream_batch(self, batch) -> list[dict]:
        """(prompt index, chunk) pairs -> at most one choice per index, chunks merged."""
        out: dict[int, dict] = {}
        for prompt_idx, chunk in batch:
            choice = self.stream_chunk(prompt_idx, chunk)
            if choice is None:
                continue
            prev = out.get(choice["index"])
            if prev is None:
                out[choice["index"]] = choice
            else:
                self._merge(prev, choice)
                prev["finish_reason"] = choice["finish_reason"] or prev["finish_reason"]
        return list(out.values())

    def stream_end(self) -> str:
        if not self.include_usage:
            return ""
        e = self._event([])
        e["usage"] = self._usage()
        return f"data: {json.dumps(e)}\n\n"


class ChatBuilder(_Builder):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, *args):
        super().__init__(*args)
        self.logprobs = [[] for _ in range(self.num_choices)]
        self.want_logprobs = args[-1].logprobs
        self.reasoning = [""] * self.num_choices
        self.tool_calls = [ToolCalls() for _ in range(self.num_choices)]
        self.called = [False] * self.num_choices  # the choice made tool calls (stream)

    def _finish_reason(self, i: int, reason: str | None) -> str | None:
        # OpenAI: a choice that ended by calling tools finishes with "tool_calls"
        return "tool_calls" if reason == "stop" and self.called[i] else reason

    def stream_start(self) -> str:
        return self.sse(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i in range(self.num_choices)
            ]
        )

    def stream_chunk(self, prompt_idx: int, chunk) -> dict | None:
        self._account(chunk)
        i = self._index(prompt_idx, chunk)
        reason = FINISH[chunk.finish_reason]
        self.finish[i] = reason or self.finish[i]
        delta: dict = {}
        if chunk.reasoning_text:
            delta["reasoning_content"] = chunk.reasoning_text
        if chunk.text:
            delta["content"] = chunk.text
        if chunk.tool_calls:
            delta["tool_calls"] = [tool_call_delta_json(d) for d in chunk.tool_calls]
            self.called[i] = True
        if not delta and reason is None and not chunk.logprobs:
            return None
        return {
            "index": i,
            "delta": delta,
            "logprobs": {"content": chat_logprobs(chunk)} if self.want_logprobs else None,
            "finish_reason": self._finish_reason(i, reason),
        }

    @staticmethod
    def _merge(acc: dict, choice: dict) -> None:
        into, delta = acc["delta"], choice["delta"]
        for key in ("reasoning_content", "content"):
            if key in delta:
                into[key] = into.get(key, "") + delta[key]
        for call in delta.get("tool_calls", ()):
            calls = into.setdefault("tool_calls", [])
            if calls and calls[-1]["index"] == call["index"] and "id" not in call:
                calls[-1]["function"]["arguments"] += call["function"]["arguments"]
            else:
                calls.append(call)
        if acc["logprobs"] is not None:
            acc["logprobs"]["content"] += choice["logprobs"]["content"]

    def add(self, prompt_idx: int, chunk) -> None:
        self._account(chunk)
        i = self._index(prompt_idx, chunk)
        self.texts[i] += chunk.text
        self.reasoning[i] += chunk.reasoning_text
        self.tool_calls[i].add(chunk.tool_calls)
        self.called[i] = self.called[i] or bool(chunk.tool_calls)
        self.logprobs[i] += chat_logprobs(chunk)
        self.finish[i] = FINISH[chunk.finish_reason] or self.finish[i]
        self._prompt_logprobs(i, chunk)

    def _message(self, i: int) -> dict:
        calls = self.tool_calls[i].calls
        m = {
            "role": "assistant",
            # OpenAI: null content when the output was only tool calls
            "content": self.texts[i] if self.texts[i] or not calls else None,
            "reasoning_content": self.reasoning[i] or None,
        }
        if calls:
            m["tool_calls"] = calls
        return m

    def response(self) -> dict:
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": i,
                    "message": self._message(i),
                    "logprobs": {"content": self.logprobs[i]} if self.want_logprobs else None,
                    "finish_reason": self._finish_reason(i, self.finish[i]),
                }
                for i in range(self.num_choices)
            ],
            "usage": self._usage(),
            # vLLM: one prompt, so one list for the response (None unless asked)
            "prompt_logprobs": self.prompt_logprobs[0],
        }


class CompletionBuilder(_Builder):
    object_name = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, *args):
        super().__init__(*args)
        self.want_logprobs = args[-1].logprobs is not None
        self.logprobs = [CompletionLogprobs() for _ in range(self.num_choices)]

    def stream_start(self) -> str:
        return ""

    def _lp(self, i, chunk):
        # echo: the prompt text leads the first chunk, so token offsets start after it
        if chunk.prompt_token_ids and not chunk.token_ids:
            self.logprobs[i].offset += len(chunk.text)
        elif chunk.prompt_token_ids:
            self.logprobs[i].offset += len(chunk.text) - sum(len(lp.token) for lp in chunk.logprobs)
        return self.logprobs[i].add(chunk)

    def stream_chunk(self, prompt_idx: int, chunk) -> dict | None:
        self._account(chunk)
        i = self._index(prompt_idx, chunk)
        reason = FINISH[chunk.finish_reason]
        self.finish[i] = reason or self.finish[i]
        lp = self._lp(i, chunk) if self.want_logprobs else None
        if not chunk.text and reason is None and not chunk.logprobs:
            return None
        return {"index": i, "text": chunk.text, "logprobs": lp, "finish_reason": reason}

    @staticmethod
    def _merge(acc: dict, choice: dict) -> None:
        acc["text"] += choice["text"]
        if acc["logprobs"] is not None:
            for key, values in choice["logprobs"].items():
                acc["logprobs"][key] += values

    def add(self, prompt_idx: int, chunk) -> None:
        self._account(chunk)
        i = self._index(prompt_idx, chunk)
        if self.want_logprobs:
            self._lp(i, chunk)
        self.texts[i] += chunk.text
        self.finish[i] = FINISH[chunk.finish_reason] or self.finish[i]
        self._prompt_logprobs(i, chunk)

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
                    "prompt_logprobs": self.prompt_logprobs[i],  # vLLM: per choice
                }
                for i in range(self.num_choices)
            ],
            "usage": self._usage(),
        }
