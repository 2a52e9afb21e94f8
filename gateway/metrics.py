"""Gateway /metrics: vLLM's names for what the client sees end to end, tandem:* for HTTP.

Several gateway processes on one port (`--reuse-port`, `tandem serve --gateways N`) share
PROMETHEUS_MULTIPROC_DIR: prometheus-client then keeps every value in a file per process, and
/metrics, whichever process answers it, sums them (gauges over the live processes). The
routers' and workers' metrics are fetched by the answering process and added once
(gateway/federation.py).

No `*_created` series (the time each counter was created): no dashboard reads them, and they
add a series to every counter and histogram.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
)

from gateway.federation import Federation, merge

disable_created_metrics()  # process-wide in prometheus-client

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client when it is imported

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class GatewayMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        m = ["model_name"]
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self.running = Gauge(
            "vllm:num_requests_running", "Requests streaming tokens to clients.", m,
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
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
            "tandem:gateway_requests_admitted", "Generation requests holding a slot.", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.queued = Gauge(
            "tandem:gateway_requests_queued", "Generation requests waiting for a slot.",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.scrape_errors = Counter(
            "tandem:metrics_scrape_errors",
            "Scrapes of --scrape-metrics sources that failed (left out of that /metrics).",
            ["source"], registry=r,
        )  # fmt: skip
        # every family the gateway exports, also those with no sample yet (federation.merge)
        self.family_names = {f.name for f in r.collect()}

    def watch(self, admission) -> None:
        def changed() -> None:
            self.admitted.set(admission.num_running)
            self.queued.set(admission.num_waiting)

        admission.on_change = changed

    async def exposition(self, federation: Federation | None = None) -> tuple[bytes, str]:
        """The text format: this process's registry (or every gateway process's values), plus
        the families of the federation's sources that answered."""
        scraped, failed = await federation.scrape() if federation is not None else ([], [])
        for src in failed:
            self.scrape_errors.labels(src.source).inc()
        own = self.registry
        if self.multiprocess_dir is not None:
            own = CollectorRegistry()
            multiprocess.MultiProcessCollector(own, path=self.multiprocess_dir)
        return merge(own.collect(), self.family_names, scraped), CONTENT_TYPE_LATEST

    def process_exited(self) -> None:
        """Drop this process's live gauges from the shared directory (on shutdown)."""
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)
