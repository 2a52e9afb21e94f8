"""Gateway configuration: built once from flags, validated, passed down."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayConfig:
    router: str = "127.0.0.1:50051"  # the router's public gRPC address
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""  # empty: no auth; else every route but /health needs it
    served_model_name: str = ""  # empty: whatever the router lists
    # Request bounds (HTTP-side; the router checks sampling ranges again for gRPC clients).
    max_body_bytes: int = 4 << 20
    max_n: int = 16
    max_tokens_limit: int = 1 << 20
    max_stop_sequences: int = 4
    max_stop_len: int = 256
    max_prompts: int = 64  # prompts in one completions batch
    request_timeout_s: float = 3600.0

    def __post_init__(self):
        if self.max_body_bytes < 1024 or self.max_n < 1:
            raise ValueError("max_body_bytes must be >= 1024 and max_n >= 1")
