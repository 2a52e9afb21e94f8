"""Prometheus metrics of the router (served by prometheus_client on --metrics-port).

vLLM's names where the meaning is the same (dashboards built for vLLM work), `tandem:` for the
rest. Time to first token is broken down as

    ttft = queue (admission -> prefill dispatch) + prefill + kv transfer + first-token delivery

where delivery is the remainder (RPC round trips, scheduling, detokenization). Every family
has vLLM's `model_name` label; no `*_created` series (no dashboard reads them). `tandem serve`'s
gateways serve these on their /metrics too (gateway/federation.py), where the families the
gateway measures itself (time to first token, end-to-end latency, tokens, finished requests)
are the gateway's.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily

disable_created_metrics()  # process-wide in prometheus-client

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip


class RouterMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, m = self.registry, ["model_name"]
        self.model_name = model_name

        def hist(name, doc):
            return Histogram(name, doc, m, registry=r, buckets=_LATENCY_BUCKETS).labels(model_name)

        self.running = Gauge(
            "vllm:num_requests_running", "Requests streaming from workers.", m, registry=r
        ).labels(model_name)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.")
        self.e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end request latency.")
        self.queue = hist("vllm:request_queue_time_seconds", "Admission to prefill dispatch.")
        self.prefill = hist("vllm:request_prefill_time_seconds", "Prefill compute time.")
        self.kv_transfer = hist("tandem:kv_transfer_time_seconds", "KV push before token 0.")
        self.delivery = hist(
            "tandem:first_token_delivery_seconds", "TTFT minus queue, prefill and KV transfer."
        )
        self.itl = hist("vllm:time_per_output_token_seconds", "Mean inter-token latency.")
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefill tokens processed.", m, registry=r
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens.", m, registry=r
        ).labels(model_name)
        self._success = Counter(
            "vllm:request_success", "Finished requests.", m + ["finished_reason"], registry=r
        )
        self._errors = Counter(
            "tandem:request_errors", "Refused or failed requests.", m + ["kind"], registry=r
        )
        self._routed = Counter(
            "tandem:routed_requests", "Choices routed per worker.", m + ["role", "worker"],
            registry=r,
        )  # fmt: skip
        self._prefix_hit = Counter(
            "tandem:prefill_cached_tokens", "Prompt tokens served from prefix caches.", m,
            registry=r,
        ).labels(model_name)  # fmt: skip

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def error(self, kind: str) -> None:
        self._errors.labels(self.model_name, kind).inc()

    def routed(self, role: str, worker: str) -> None:
        self._routed.labels(self.model_name, role, worker).inc()

    def cached_tokens(self, n: int) -> None:
        if n > 0:
            self._prefix_hit.inc(n)


class PrefillDecisionCollector:
    """`tandem:prefill_decisions_total{decision=local|remote}`: where each attempt's prompt was
    prefilled (router/handoff.py counts them in the pool), read at scrape time."""

    def __init__(self, counts: Mapping[str, int], model_name: str) -> None:
        self.counts = counts
        self.model_name = model_name

    def collect(self):
        c = CounterMetricFamily(
            "tandem:prefill_decisions",
            "Prompts prefilled on the decode server (local) or a prefill server (remote).",
            labels=["model_name", "decision"],
        )
        for decision in ("local", "remote"):
            c.add_metric([self.model_name, decision], self.counts.get(decision, 0))
        yield c
