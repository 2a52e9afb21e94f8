"""Router configuration: built once from flags, validated, passed down."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterConfig:
    model: str  # HF-format model dir: tokenizer.json, tokenizer_config.json, config.json
    served_model_name: str = ""  # name clients pass as `model`; defaults to the dir name
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 0  # 0: no Prometheus HTTP server
    max_model_len: int = 0  # 0: config.json max_position_embeddings
    routing_policy: str = "prefix"
    prefill_addresses: tuple[str, ...] = ()
    decode_addresses: tuple[str, ...] = ()
    # Admission bound: requests (not choices) in flight; beyond it RESOURCE_EXHAUSTED, never
    # an unbounded queue.
    max_num_requests: int = 1024
    max_n: int = 16
    stats_interval_s: float = 0.5  # how often worker Stats are polled (load-aware routing)
    heartbeat_interval_ms: int = 1000  # told to self-registering workers
    worker_timeout_s: float = 600.0  # deadline for one Prefill call
    grace_s: float = 5.0  # graceful shutdown
    # Prefix-policy weight: a queued prompt token on a server costs this many uncached tokens.
    prefix_load_weight: float = 1.0

    def __post_init__(self):
        if self.routing_policy not in ("prefix", "least_load", "round_robin"):
            raise ValueError(f"unknown routing policy {self.routing_policy!r}")
        if self.max_num_requests < 1 or self.max_n < 1:
            raise ValueError("max_num_requests and max_n must be >= 1")
