"""Gateway configuration: built once from flags, validated, passed down."""

from __future__ import annotations

from dataclasses import dataclass, fields

from gateway.federation import parse_source
from rpc.tls import PLAINTEXT, TLSConfig


@dataclass(frozen=True)
class GatewayConfig:
    router: str = "127.0.0.1:50051"  # the router's public gRPC address
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""  # empty: no auth; else every route but the probes needs it (and the
    # gateway sends it to the router, whose public API may demand the same key)
    served_model_name: str = ""  # empty: whatever the router lists

    # Request limits, checked before anything is sent to the router (the router checks the
    # sampling ranges and the context length again, for its gRPC clients).
    max_body_bytes: int = 4 << 20  # HTTP body; 413 from Content-Length, before reading it
    max_n: int = 16  # choices per prompt
    max_prompts: int = 64  # prompts in one completions batch
    max_tokens_limit: int = 1 << 20  # max_tokens / max_completion_tokens
    max_stop_sequences: int = 4  # OpenAI's limit
    max_stop_len: int = 256  # characters per stop string
    max_stop_token_ids: int = 256
    max_logprobs: int = 20  # completions `logprobs`, chat `top_logprobs` (vLLM's default)
    max_prompt_chars: int = 1 << 20  # one prompt's text, or a chat's summed message text
    max_messages: int = 1024  # chat messages per request
    max_logit_bias: int = 300  # logit_bias entries (OpenAI's limit)
    reject_unknown_fields: bool = False  # True: 400 for fields the gateway does not know

    # Overload: requests past the running bound wait (FIFO) up to queue_timeout_s; past the
    # queue bound they are refused at once with 429 + Retry-After.
    max_concurrent_requests: int = 512
    max_queued_requests: int = 512
    queue_timeout_s: float = 10.0

    # Deadlines on gateway -> router calls (Generate: the whole stream).
    request_timeout_s: float = 3600.0
    router_timeout_s: float = 10.0  # unary calls (ListModels)
    # Client credentials of the gRPC channel to the router (rpc/tls.py); the public
    # HTTP port is not affected.
    tls: TLSConfig = PLAINTEXT
    # `[COMPONENT=]URL` of the routers' and workers' /metrics, served with the gateway's own
    # on its /metrics (gateway/federation.py)
    scrape_metrics: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        for f in fields(self):
            v = getattr(self, f.name)
            lowest = 0 if f.name == "max_queued_requests" else 1
            if f.name.startswith("max_") and v < lowest:
                raise ValueError(f"{f.name} must be >= {lowest}, got {v}")
        if self.queue_timeout_s < 0 or min(self.request_timeout_s, self.router_timeout_s) <= 0:
            raise ValueError("queue_timeout_s must be >= 0 and the router timeouts > 0")
        for value in self.scrape_metrics:
            parse_source(value)  # raises naming the value
