"""The gateway's admission gauges follow the Admission's counts as they move (set on every
change, which is what lets several gateway processes sum them in multiprocess mode)."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from gateway.admission import Admission, Refused
from gateway.metrics import GatewayMetrics


def _gauges(metrics: GatewayMetrics) -> tuple[float, float]:
    get = metrics.registry.get_sample_value
    return get("tandem:gateway_requests_admitted"), get("tandem:gateway_requests_queued")


def test_admission_gauges_track_running_and_waiting():
    async def scenario():
        metrics = GatewayMetrics()
        admission = Admission(max_running=1, max_waiting=1, timeout_s=5.0)
        metrics.watch(admission)
        assert metrics.multiprocess_dir is None
        await admission.acquire()
        assert _gauges(metrics) == (1, 0)
        waiter = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0)
        assert _gauges(metrics) == (1, 1)
        try:  # the queue is full
            await admission.acquire()
            raise AssertionError("a third request was admitted")
        except Refused as e:
            assert e.reason == "queue_full"
        admission.release()  # the slot passes to the waiter
        await waiter
        assert _gauges(metrics) == (1, 0)
        late = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0)
        late.cancel()  # a waiter that gives up leaves the queue
        await asyncio.gather(late, return_exceptions=True)
        assert _gauges(metrics) == (1, 0)
        admission.release()
        assert _gauges(metrics) == (0, 0)
        body, media_type = await metrics.exposition()
        assert b"tandem:gateway_requests_admitted 0.0" in body and media_type.startswith("text/")

    asyncio.run(scenario())


def test_own_exposition_has_vllm_names_model_name_labels_and_no_created_series():
    async def scenario():
        metrics = GatewayMetrics()
        metrics.running.labels("tiny").inc()
        metrics.ttft.labels("tiny").observe(0.2)
        metrics.e2e.labels("tiny").observe(0.5)
        metrics.prompt_tokens.labels("tiny").inc(7)
        metrics.generation_tokens.labels("tiny").inc(3)
        metrics.success.labels("tiny", "stop").inc()
        body, _ = await metrics.exposition()
        return {f.name: f for f in text_string_to_metric_families(body.decode())}

    families = asyncio.run(scenario())
    assert not [name for name in families if name.endswith("_created")]
    vllm = {
        "vllm:num_requests_running": "gauge",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter",
    }
    for name, kind in vllm.items():
        f = families[name]
        assert f.type == kind and f.samples, name
        assert all(s.labels.get("model_name") == "tiny" for s in f.samples), name
    assert families["vllm:prompt_tokens"].samples[0].value == 7
