"""The gateway's /metrics carries the routers' and workers' metrics (`--scrape-metrics`): one
valid exposition, read here with prometheus-client's own parser, with vLLM's names and
labels; a source that is down or hangs is left out and counted, never a failed scrape."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import GatewayConfig
from gateway.federation import parse_source
from gateway.server import add_cli_args, config_from_args
from protos import worker_pb2
from router.metrics import RouterMetrics
from worker.load import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]


def _serve(registry) -> tuple[str, object]:
    httpd, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    return f"http://127.0.0.1:{httpd.server_port}/metrics", httpd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def sources():
    decode = WorkerMetrics("tiny")
    decode.update(
        worker_pb2.WorkerStats(
            num_running=2, num_waiting=3, num_free_blocks=25, num_total_blocks=100,
            prefix_cache_queries=64, prefix_cache_hits=48, num_active_handoffs=1,
            num_kv_handoffs={"grpc": 4},
        ),
        num_preemptions=2,
    )  # fmt: skip
    prefill = WorkerMetrics("tiny")
    prefill.update(worker_pb2.WorkerStats(num_waiting=1, num_total_blocks=10, num_free_blocks=10))
    router = RouterMetrics("tiny")
    router.queue.observe(0.01)
    router.itl.observe(0.02)
    router.ttft.observe(0.3)  # the gateway measures this one itself: not taken from here
    router.finished("stop")
    served = [_serve(m.registry) for m in (decode, prefill, router)]
    # a source that accepts connections and never answers (its backlog holds them)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    urls = [url for url, _ in served]
    yield {
        "decode": urls[0],
        "prefill": urls[1],
        "router": urls[2],
        "dead": f"http://127.0.0.1:{_free_port()}/metrics",
        "hung": f"http://127.0.0.1:{hung.getsockname()[1]}/metrics",
    }
    hung.close()
    for _, httpd in served:
        httpd.shutdown()


def test_gateway_metrics_merge_workers_and_router_under_vllm_names(sources, make_gateway):
    url = make_gateway(
        GatewayConfig(
            router="127.0.0.1:1",  # /metrics needs no router
            scrape_metrics=(
                f"decode={sources['decode']}", f"prefill={sources['prefill']}",
                f"router={sources['router']}", sources["dead"], f"decode={sources['hung']}",
            ),
        )
    )  # fmt: skip
    t0 = time.monotonic()
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert time.monotonic() - t0 < 3  # the hung source costs its 1 s timeout, no more
    text = r.text
    families = _families(text)

    # one HELP/TYPE per family, whatever the number of sources
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    assert not [n for n in families if n.endswith("_created")]
    assert "_created" not in text

    def by_component(name: str) -> dict:
        return {s.labels.get("component"): s for s in families[name].samples}

    decode_port = sources["decode"].split("/")[2]
    usage = by_component("vllm:kv_cache_usage_perc")
    assert usage["decode"].value == pytest.approx(0.75) and usage["prefill"].value == 0
    assert usage["decode"].labels == {
        "model_name": "tiny", "component": "decode", "source": decode_port,
    }  # fmt: skip
    assert {c: s.value for c, s in by_component("vllm:num_requests_waiting").items()} == {
        "decode": 3, "prefill": 1,
    }  # fmt: skip
    for name, kind, value in (
        ("vllm:prefix_cache_queries", "counter", 64),
        ("vllm:prefix_cache_hits", "counter", 48),
        ("vllm:num_preemptions", "counter", 2),
    ):
        assert families[name].type == kind
        assert by_component(name)["decode"].value == value
    for name in ("vllm:request_queue_time_seconds", "vllm:time_per_output_token_seconds"):
        f = families[name]
        assert f.type == "histogram"
        count = [s for s in f.samples if s.name == name + "_count"]
        assert [(s.labels["component"], s.labels["model_name"], s.value) for s in count] == [
            ("router", "tiny", 1)
        ]
    # what the gateway measures itself is the gateway's alone: no sample from the router
    for name in (
        "vllm:time_to_first_token_seconds", "vllm:request_success", "vllm:num_requests_running",
    ):  # fmt: skip
        assert all("source" not in s.labels for s in families.get(name, ()).samples), name

    # the dead and the hung source are left out and counted
    errors = {s.labels["source"]: s.value for s in families["tandem:metrics_scrape_errors"].samples}
    dead, hung = (sources[k].split("/")[2] for k in ("dead", "hung"))
    assert errors == {dead: 1, hung: 1}
    assert not any(
        s.labels.get("source") in (dead, hung) for f in families.values() for s in f.samples
        if f.name != "tandem:metrics_scrape_errors"
    )  # fmt: skip


def test_several_gateway_processes_add_the_scraped_part_once(sources, tmp_path):
    """Multiprocess mode (`tandem serve --gateways N`): the answering process sums every
    gateway process's values from the shared directory and adds the sources once."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from gateway.federation import Federation
        from gateway.metrics import GatewayMetrics

        metrics = GatewayMetrics()
        assert metrics.multiprocess_dir is not None
        metrics.success.labels("tiny", "stop").inc(5)

        async def scrape():
            federation = Federation(["router={sources["router"]}", "decode={sources["decode"]}"])
            try:
                return (await metrics.exposition(federation))[0]
            finally:
                await federation.close()

        sys.stdout.write(asyncio.run(scrape()).decode())
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    families = _families(out.stdout)
    assert [s.value for s in families["vllm:request_success"].samples] == [5]
    (waiting,) = families["vllm:num_requests_waiting"].samples
    assert waiting.labels["component"] == "decode" and waiting.value == 3
    queue = families["vllm:request_queue_time_seconds"].samples
    assert [s.value for s in queue if s.name.endswith("_count")] == [1]
    assert not [n for n in families if n.endswith("_created")]


def test_scrape_metrics_flag_parses_and_rejects_bad_values(capsys):
    parser = add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--scrape-metrics", "http://127.0.0.1:9100/metrics",
         "--scrape-metrics", "decode-0=http://127.0.0.1:9101/metrics"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.scrape_metrics == (
        "http://127.0.0.1:9100/metrics", "decode-0=http://127.0.0.1:9101/metrics",
    )  # fmt: skip
    assert parse_source(config.scrape_metrics[1]).labels == {
        "source": "127.0.0.1:9101", "component": "decode-0",
    }  # fmt: skip
    assert parse_source(config.scrape_metrics[0]).labels == {"source": "127.0.0.1:9100"}
    for bad in ("127.0.0.1:9100", "ftp://h/metrics", "a b=http://h:1/metrics"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--scrape-metrics", bad])
        assert "--scrape-metrics" in capsys.readouterr().err
    with pytest.raises(ValueError, match="scrape_metrics"):
        GatewayConfig(scrape_metrics=("http://",))
