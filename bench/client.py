"""One streamed request to the OpenAI API (completions or chat) and its timings.

send       POST with stream=true and stream_options.include_usage (the token counts come from
           the final usage chunk, not from counting chunks)
read       SSE bytes as they arrive; every event in one network read gets that read's time
measure    content chunk (text, or a finish_reason): the first sets TTFT, later ones add an
           ITL gap; the usage chunk sets prompt/output/cached tokens; `[DONE]` ends it
fail       HTTP status != 200, an error event in the stream, or a transport error
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx

from bench.datasets import SampleRequest
from bench.metrics import RequestRecord


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # server root, e.g. http://127.0.0.1:8000 (no /v1)
    model: str
    kind: str = "completions"  # "completions" | "chat"
    prompt_format: str = "ids"  # completions only: "ids" (token-id list) | "text"
    api_key: str = ""
    ignore_eos: bool = True
    temperature: float = 0.0
    # Extra JSON fields merged into every request body (e.g. top_p, min_tokens).
    extra_body: tuple[tuple[str, object], ...] = ()

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"
        return self.base_url + path

    def headers(self) -> dict[str, str]:
        h = {"Accept-Encoding": "identity"}  # the stream is read raw (aiter_raw)
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def payload(self, req: SampleRequest) -> dict:
        body: dict = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": self.temperature,
            "max_tokens": req.output_len,
            "ignore_eos": self.ignore_eos,
        }
        if self.kind == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt_ids if self.prompt_format == "ids" else req.prompt
        body.update(self.extra_body)
        return body


def _content(choice: dict, kind: str) -> str | None:
    if kind == "chat":
        return (choice.get("delta") or {}).get("content")
    return choice.get("text")


class _StreamState:
    """Turns SSE events into a RequestRecord."""

    def __init__(self, record: RequestRecord, kind: str, t_send: float):
        self.record = record
        self.kind = kind
        self.t_send = t_send
        self.t_last = 0.0  # time of the last content chunk
        self.done = False

    def event(self, data: bytes, now: float) -> None:
        if not data.startswith(b"data:"):
            return  # SSE comments / other fields: the gateway sends none
        data = data[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        obj = json.loads(data.decode())  # str: json skips sniffing the encoding
        r = self.record
        if "error" in obj:
            err = obj["error"]
            raise _StreamError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
        for choice in obj.get("choices") or ():
            reason = choice.get("finish_reason")
            if reason:
                r.finish_reason = reason
            if not _content(choice, self.kind) and not reason:
                continue  # e.g. the chat role chunk: no token yet
            if r.num_chunks == 0:
                r.ttft = now - self.t_send
            else:
                r.itl.append(now - self.t_last)
            r.num_chunks += 1
            self.t_last = now
        usage = obj.get("usage")
        if usage:
            r.prompt_tokens = usage.get("prompt_tokens") or 0
            r.output_tokens = usage.get("completion_tokens") or 0
            r.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


class _StreamError(Exception):
    pass


async def stream_request(
    client: httpx.AsyncClient, endpoint: Endpoint, req: SampleRequest, record: RequestRecord,
    t0: float,
) -> RequestRecord:  # fmt: skip
    """Send one request and fill `record` (send_time relative to t0, a perf_counter value)."""
    payload = endpoint.payload(req)
    t_send = time.perf_counter()
    record.send_time = t_send - t0
    state = _StreamState(record, endpoint.kind, t_send)
    try:
        async with client.stream(
            "POST", endpoint.url, json=payload, headers=endpoint.headers()
        ) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                record.error = f"HTTP {resp.status_code}: {body[:500]}"
                return record
            buf = b""
            async for data in resp.aiter_raw():  # identity: no decoder needed
                now = time.perf_counter()
                *events, buf = (buf + data).split(b"\n\n")
                for event in events:
                    state.event(event, now)
    except _StreamError as e:
        record.error = f"stream error: {e}"
        return record
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return record
    if not state.done:
        record.error = "stream ended without [DONE]"
    elif record.num_chunks == 0:
        record.error = "no content chunk in the stream"
    else:
        record.latency = state.t_last - t_send
        record.success = True
    return record
