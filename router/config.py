"""Router configuration: built once from flags, validated, passed down."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.reasoning import REASONING_PARSERS
from router.tool_parsers import TOOL_PARSERS
from rpc.tls import PLAINTEXT, TLSConfig


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
    # Fault tolerance (router/handoff.py): a choice restarts on other workers after a worker
    # failure at most this many times (prefill retries and decode migrations together).
    max_migrations: int = 3
    # After the prefill server answered, the decode stream's first event (KV arrived, joined
    # the batch) must come within this; else the handoff is abandoned and retried.
    handoff_timeout_s: float = 30.0
    # Longest silence on a decode stream once tokens flow; beyond it the server is presumed
    # stuck and the choice migrates.
    stream_idle_timeout_s: float = 60.0
    grace_s: float = 5.0  # graceful shutdown
    # Prefix-policy weight: a queued prompt token on a server costs this many uncached tokens.
    prefix_load_weight: float = 1.0
    # Its own port and its channels to the workers (rpc/tls.py); default plaintext.
    tls: TLSConfig = PLAINTEXT
    # Conditional disaggregation: a prompt whose part not cached on the chosen decode server is
    # shorter than this many tokens is prefilled there (no KV handoff); 0: always remote.
    max_local_prefill_length: int = 0
    # Send a choice's tokens at most every N tokens (vLLM's --stream-interval; its first and
    # last chunk go at once). 1: every worker message, merged only when the stream lags.
    stream_interval: int = 1
    # Largest top_logprobs a request may ask for (vLLM's --max-logprobs; the workers get the
    # same bound from `tandem serve`).
    max_logprobs: int = 20
    # The public Router API demands `authorization: Bearer <api_key>` when set (the gateway's
    # key: the gRPC API is no back door around it); internal services are unaffected.
    api_key: str = field(default="", repr=False)
    # Tool calling and reasoning (vLLM's flags). tool_call_parser: how tool calls are found in
    # a choice's output text (router/tool_parsers.py; "": none); tool_choice "auto" is
    # allowed only with it and enable_auto_tool_choice ("required" and a named function are
    # forced with structured outputs and need neither). reasoning_parser: how a chat choice's
    # reasoning is split from its content (router/reasoning.py; "": none).
    tool_call_parser: str = ""
    enable_auto_tool_choice: bool = False
    reasoning_parser: str = ""

    def __post_init__(self):
        if self.routing_policy not in ("prefix", "least_load", "round_robin"):
            raise ValueError(f"unknown routing policy {self.routing_policy!r}")
        if self.max_num_requests < 1 or self.max_n < 1:
            raise ValueError("max_num_requests and max_n must be >= 1")
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")
        if self.max_migrations < 0:
            raise ValueError("max_migrations must be >= 0")
        if self.max_local_prefill_length < 0:
            raise ValueError("max_local_prefill_length must be >= 0")
        if min(self.worker_timeout_s, self.handoff_timeout_s, self.stream_idle_timeout_s) <= 0:
            raise ValueError("worker, handoff and stream-idle timeouts must be > 0")
        if self.tool_call_parser and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(
                f"unknown tool call parser {self.tool_call_parser!r}; one of {TOOL_PARSERS}"
            )
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser")
        if self.reasoning_parser and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"unknown reasoning parser {self.reasoning_parser!r}; one of {REASONING_PARSERS}"
            )

    @property
    def auto_tool_choice(self) -> bool:
        """Whether tool_choice "auto" can be served (vLLM: both flags set)."""
        return self.enable_auto_tool_choice and bool(self.tool_call_parser)
