"""Gateway /metrics: vLLM's names for what the client sees end to end, tandem:* for HTTP."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class GatewayMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        m = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests in flight.", registry=r)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", m, registry=r,
            buckets=_BUCKETS,
        )  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end latency.", m, registry=r,
            buckets=_BUCKETS,
        )  # fmt: skip
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens.", m, registry=r)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens.", m, registry=r
        )
        self.success = Counter(
            "vllm:request_success", "Finished requests.", m + ["finished_reason"], registry=r
        )
        self.http = Counter(
            "tandem:http_requests", "HTTP requests by route and status.", ["route", "status"],
            registry=r,
        )  # fmt: skip
        self.refused = Counter(
            "tandem:gateway_refused_requests",
            "Requests refused, by reason (unauthorized, body_too_large, limit, invalid_request, "
            "not_found, context, queue_full, queue_timeout, router_overloaded, "
            "router_unavailable, timeout).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.admitted = Gauge(
            "tandem:gateway_requests_admitted", "Generation requests holding a slot.", registry=r
        )
        self.queued = Gauge(
            "tandem:gateway_requests_queued", "Generation requests waiting for a slot.", registry=r
        )

    def watch(self, admission) -> None:
        self.admitted.set_function(lambda: admission.num_running)
        self.queued.set_function(lambda: admission.num_waiting)
