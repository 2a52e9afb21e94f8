"""A worker's load: one snapshot refreshed between engine steps, read by heartbeats and
exported as Prometheus metrics on --metrics-port.

Names follow vLLM's V1 engine where the meaning is the same (autoscalers and dashboards built
for vLLM work; the Kubernetes HPA examples scale on them), `tandem:` for the rest; every
family has vLLM's `model_name` label.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from protos import worker_pb2
from tandem.async_engine import AsyncEngine
from tandem.engine_records import EngineDeadError, EngineStats

log = logging.getLogger("tandem.worker.load")

SAMPLE_PERIOD_S = 0.5
# How long Stats waits for the engine thread (it reads the engine between steps) before it
# answers with the last figures read instead: a long step (a CUDA-graph capture, a large
# prefill chunk on a loaded host) must not push a Stats past the router's 2 s deadline, which
# would mark a busy but healthy worker unhealthy.
STATS_WAIT_S = 1.0

# the last figures read per engine: what a Stats answers while the engine is busy
_last_read: weakref.WeakKeyDictionary[AsyncEngine, tuple] = weakref.WeakKeyDictionary()


async def read_stats(engine: AsyncEngine, wait_s: float = STATS_WAIT_S) -> tuple[EngineStats, int]:
    """(EngineStats, in-flight prompt tokens): fresh, or the last read if the engine thread
    does not answer within wait_s."""
    core = engine.engine

    def collect():
        return core.stats(), core.num_in_flight_prompt_tokens()

    read = asyncio.ensure_future(engine.call(collect))
    try:
        s, in_flight = await asyncio.wait_for(asyncio.shield(read), wait_s)
    except asyncio.TimeoutError:
        if engine not in _last_read:
            s, in_flight = await read  # nothing read yet: wait for the first figures
        else:
            s, in_flight = _last_read[engine]
            # the read still lands later and refreshes the figures for the next Stats
            read.add_done_callback(lambda f: _remember(engine, f))
    else:
        _last_read[engine] = (s, in_flight)
    return s, in_flight


async def worker_stats(
    engine: AsyncEngine,
    num_active_handoffs: int = 0,
    num_kv_handoffs: Mapping[str, int] | None = None,
    wait_s: float = STATS_WAIT_S,
) -> worker_pb2.WorkerStats:
    s, in_flight = await read_stats(engine, wait_s)
    return _to_proto(engine, s, in_flight, num_active_handoffs, num_kv_handoffs)


def _to_proto(
    engine: AsyncEngine,
    s: EngineStats,
    in_flight: int,
    num_active_handoffs: int,
    num_kv_handoffs: Mapping[str, int] | None,
) -> worker_pb2.WorkerStats:
    return worker_pb2.WorkerStats(
        num_running=s.num_running,
        num_waiting=s.num_waiting,
        num_free_blocks=s.num_free_blocks,
        num_total_blocks=s.num_total_blocks,
        num_cached_blocks=s.num_cached_blocks,
        prefix_cache_hits=s.prefix_cache_hits,
        prefix_cache_queries=s.prefix_cache_queries,
        num_active_handoffs=num_active_handoffs,
        block_size=engine.engine.cfg.block_size,
        in_flight_prompt_tokens=in_flight,
        num_kv_handoffs=dict(num_kv_handoffs or {}),
    )


def _remember(engine: AsyncEngine, read: asyncio.Future) -> None:
    if not read.cancelled() and read.exception() is None:
        _last_read[engine] = read.result()


class WorkerMetrics:
    """The worker's metrics, read from the latest load snapshot at scrape time: counters are
    the engine's own running totals (nothing is summed here, so none can drift)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.stats = worker_pb2.WorkerStats()
        self.num_preemptions = 0  # not in WorkerStats: the router has no use for it
        self.registry = registry or CollectorRegistry()
        self.registry.register(self)

    def update(self, s: worker_pb2.WorkerStats, num_preemptions: int = 0) -> None:
        self.stats, self.num_preemptions = s, num_preemptions

    def collect(self):
        s = self.stats
        used = s.num_total_blocks - s.num_free_blocks
        usage = used / s.num_total_blocks if s.num_total_blocks else 0.0
        for kind, name, doc, value in (
            (GaugeMetricFamily, "vllm:num_requests_running", "Requests in the running batch.",
             s.num_running),
            (GaugeMetricFamily, "vllm:num_requests_waiting", "Requests waiting to be scheduled.",
             s.num_waiting),
            (GaugeMetricFamily, "vllm:kv_cache_usage_perc",
             "Fraction of KV blocks in use or reserved (1 = full).", usage),
            (CounterMetricFamily, "vllm:prefix_cache_queries",
             "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            (CounterMetricFamily, "vllm:prefix_cache_hits",
             "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
            (CounterMetricFamily, "vllm:num_preemptions",
             "Requests preempted (blocks freed, recomputed later).", self.num_preemptions),
            (GaugeMetricFamily, "tandem:num_active_handoffs",
             "KV handoffs in progress (decode: reserved or receiving; prefill: KV pushes).",
             s.num_active_handoffs),
        ):  # fmt: skip
            family = kind(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        handoffs = CounterMetricFamily(
            "tandem:kv_handoffs",
            "KV handoffs completed, by transport (decode: received; prefill: sent).",
            labels=["model_name", "transport"],
        )
        for transport, n in sorted(s.num_kv_handoffs.items()):
            handoffs.add_metric([self.model_name, transport], n)
        yield handoffs


class LoadSampler:
    """Keeps `latest` fresh. Readers never wait on the engine (a long step only ages it)."""

    def __init__(
        self,
        engine: AsyncEngine,
        num_active_handoffs: Callable[[], int],
        metrics: WorkerMetrics | None = None,
        num_kv_handoffs: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.engine = engine
        self.num_active_handoffs = num_active_handoffs
        self.num_kv_handoffs = num_kv_handoffs
        self.metrics = metrics
        self.latest = worker_pb2.WorkerStats()
        self._task: asyncio.Task | None = None

    async def refresh(self) -> worker_pb2.WorkerStats:
        s, in_flight = await read_stats(self.engine)
        self.latest = _to_proto(
            self.engine, s, in_flight, self.num_active_handoffs(), self.num_kv_handoffs()
        )
        if self.metrics is not None:
            self.metrics.update(self.latest, s.num_preemptions)
        return self.latest

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_PERIOD_S)
            try:
                await self.refresh()
            except EngineDeadError:
                log.error("event=load_sampling_stopped reason=engine_dead")
                return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
