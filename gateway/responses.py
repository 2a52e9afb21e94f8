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
