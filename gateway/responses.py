"""tandem.v1.GenerateResponse chunks -> OpenAI JSON (chat and completions, stream or not)."""

from __future__ import annotations

from protos import common_pb2

FINISH = {
    common_pb2.FINISH_REASON_UNSPECIFIED: None,
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",  # vLLM's value; OpenAI has none
    common_pb2.FINISH_REASON_ERROR: "error",
}


def usage_json(u: common_pb2.Usage) -> dict:
    out = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }
    if u.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": u.cached_tokens}
    return out


def chat_logprobs(chunk) -> list[dict]:
    return [
        {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": list(lp.token_bytes),
            "top_logprobs": [
                {"token": t.token, "logprob": t.logprob, "bytes": list(t.token_bytes)}
                for t in lp.top
            ],
        }
        for lp in chunk.logprobs
    ]


class CompletionLogprobs:
    """Legacy completions format: parallel lists plus character offsets into the text."""

    def __init__(self, offset: int = 0):
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict] = []
        self.text_offset: list[int] = []
        self.offset = offset

    def add(self, chunk) -> dict:
        part = CompletionLogprobs(self.offset)
        for lp in chunk.logprobs:
            for target in (self, part):
                target.tokens.append(lp.token)
                target.token_logprobs.append(lp.logprob)
                target.top_logprobs.append({t.token: t.logprob for t in lp.top})
                target.text_offset.append(self.offset)
            self.offset += len(lp.token)
        return part.json()

    def json(self) -> dict:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def prompt_logprobs_json(entries) -> list[dict | None]:
    """vLLM's prompt_logprobs: None for the first prompt token (nothing precedes it), then per
    position {token id (str): {"logprob", "rank", "decoded_token"}}, the prompt token first,
    then its top alternatives (rank = place among them, 1-based).

    The prompt token's own rank comes from the worker (its place in the whole distribution)."""
    out: list[dict | None] = [None]
    for lp in entries:
        top = {t.token_id: (k, t) for k, t in enumerate(lp.top, 1)}
        own_rank = lp.rank if lp.HasField("rank") else top.get(lp.token_id, (None,))[0]
        position = {str(lp.token_id): _prompt_lp(lp.logprob, own_rank, lp.token)}
        for rank, t in top.values():
            position.setdefault(str(t.token_id), _prompt_lp(t.logprob, rank, t.token))
        out.append(position)
    return out


def _prompt_lp(logprob: float, rank: int | None, token: str) -> dict:
    return {"logprob": logprob, "rank": rank, "decoded_token": token}


def tool_call_delta_json(d) -> dict:
    """A router ToolCallDelta -> an entry of OpenAI's delta.tool_calls (id, type and name on
    the call's first piece only)."""
    if not d.id:
        return {"index": d.index, "function": {"arguments": d.arguments}}
    return {
        "index": d.index,
        "id": d.id,
        "type": "function",
        "function": {"name": d.name, "arguments": d.arguments},
    }


class ToolCalls:
    """One choice's tool calls, assembled from the router's deltas (non-streaming)."""

    def __init__(self):
        self.calls: list[dict] = []

    def add(self, deltas) -> None:
        for d in deltas:
            while len(self.calls) <= d.index:
                fn = {"name": "", "arguments": ""}
                self.calls.append({"id": "", "type": "function", "function": fn})
            call = self.calls[d.index]
            if d.id:
                call["id"], call["function"]["name"] = d.id, d.name
            call["function"]["arguments"] += d.arguments
