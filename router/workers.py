"""The worker pool: prefill and decode servers, static (flags) or self-registered.

Membership of a worker:
    static (--prefill/--decode)     added at start, never removed
    self-registered (Registry)      Register -> Heartbeat ... -> removed after
                                    MISSED_HEARTBEATS intervals without one
    draining                        Deregister, or grpc health NOT_SERVING: no new work;
                                    a self-registered worker leaves once the router has
                                    nothing running there, a static one serves again when
                                    its health is SERVING again (restarted)

Per worker the router keeps two kinds of load: what the worker reported (Stats polling or
heartbeats, slightly stale) and what the router itself dispatched and has not seen answered
(exact, updated at dispatch time). Routing uses the second first, so a burst of requests
spreads even before any report arrives.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.core import GaugeMetricFamily

from protos import worker_pb2, worker_pb2_grpc
from router.prefix_index import WorkerBlocks
from rpc.tls import PLAINTEXT, TLSConfig, aio_channel

log = logging.getLogger("tandem.router.workers")

DEFAULT_BLOCK_SIZE = 16  # until the worker tells (Stats.block_size / WorkerInfo.block_size)
APPROX_CAPACITY = 65536  # blocks remembered per worker without KV events
MISSED_HEARTBEATS = 3  # a self-registered worker silent this many intervals is dropped
CLOSE_LINGER_S = 30.0  # a drained or replaced worker's channel outlives its removal this long


class Role(enum.IntEnum):
    # Values equal tandem.v1.WorkerRole.
    PREFILL = 1
    DECODE = 2


@dataclass(slots=True)
class ReportedLoad:
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    in_flight_prompt_tokens: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_queries: int = 0


@dataclass(slots=True, eq=False)
class WorkerHandle:
    worker_id: str
    role: Role
    address: str
    channel: grpc.aio.Channel
    stub: object  # PrefillStub or DecodeStub
    static: bool  # from flags (never expires) or self-registered (heartbeats)
    kv_address: str = ""
    block_size: int = DEFAULT_BLOCK_SIZE
    healthy: bool = True  # optimistic until a poll or a call fails
    draining: bool = False
    reported: ReportedLoad = field(default_factory=ReportedLoad)
    inflight_prompt_tokens: int = 0  # prefill: sent, not yet answered
    active: int = 0  # decode: router requests streaming from it
    blocks: WorkerBlocks = field(default_factory=lambda: WorkerBlocks(APPROX_CAPACITY))
    exact_events: bool = False  # KV events arrive: the prefix index is exact
    # decode: the Session call its choices share (router/decode_stream.py), opened on first use
    session: object = None
    last_seen: float = field(default_factory=time.monotonic)

    def prefill_load(self) -> int:
        return self.inflight_prompt_tokens

    @property
    def idle(self) -> bool:
        """Nothing this router dispatched is still running there."""
        return self.active == 0 and self.inflight_prompt_tokens == 0

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        return "serving" if self.healthy else "unhealthy"

    def apply_kv_events(self, batch: worker_pb2.KVEventBatch) -> None:
        if not self.exact_events:
            self.exact_events = True
            self.blocks.capacity = 0
            self.blocks.clear()  # drop the approximation once the real feed starts
        if batch.reset:
            self.blocks.clear()
        self.blocks.evict(batch.evicted_block_hashes)
        self.blocks.store(batch.stored_block_hashes)


# Router -> worker channels: a restarted worker is reached again within a second (gRPC's
# default reconnect backoff grows to 120 s, and a static worker keeps its address), and a
# vanished peer is noticed by keepalive pings even on an idle channel (workers accept pings
# every 5 s: kvtransfer's server options).
WORKER_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class WorkerPool:
    def __init__(
        self,
        stats_interval_s: float = 0.5,
        heartbeat_interval_ms: int = 1000,
        tls: TLSConfig = PLAINTEXT,  # the router's files, as client credentials
    ):
        self.workers: dict[str, WorkerHandle] = {}
        self.tls = tls
        self.stats_interval_s = stats_interval_s
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        # where attempts were prefilled: "local" (decode server) / "remote" (router/handoff.py)
        self.prefill_decisions: collections.Counter[str] = collections.Counter()
        self._decode_rr = itertools.count()

    # -- membership -----------------------------------------------------------------------

    def add(self, role: Role, address: str, static: bool, kv_address: str = "", block_size=0):
        # the server must hold a certificate of the role it is added as (role certificates)
        peer = "prefill" if role == Role.PREFILL else "decode"
        channel = aio_channel(address, self.tls, WORKER_CHANNEL_OPTIONS, peer_role=peer)
        stub = (
            worker_pb2_grpc.PrefillStub(channel)
            if role == Role.PREFILL
            else worker_pb2_grpc.DecodeStub(channel)
        )
        # Unguessable: an id is what Heartbeat and Deregister act on, so only the worker that
        # registered (and the router's logs) may know it.
        wid = f"{role.name.lower()}-{secrets.token_urlsafe(16)}"
        w = WorkerHandle(wid, role, address, channel, stub, static, kv_address)
        if block_size > 0:
            w.block_size = block_size
        self.workers[wid] = w
        log.info("event=worker_added id=%s role=%s address=%s", wid, role.name, address)
        if self._started:  # watch the newcomer too
            self._watch(w)
        return w

    async def remove(self, wid: str, reason: str, linger_s: float = 0.0) -> None:
        """Forget a worker. linger_s > 0 keeps its channel open that long, so calls decided
        just before (a prefill picked from an earlier candidate list, a late Abort) reach the
        worker or fail with a status code the router retries; 0 closes it now, cancelling
        whatever still runs there (a silent worker: those requests fail over)."""
        w = self.workers.pop(wid, None)
        if w is None:
            return
        # a worker that stopped heartbeating was lost; any other removal is the pool at work
        log.log(
            logging.WARNING if reason == "heartbeat_timeout" else logging.INFO,
            "event=worker_removed id=%s role=%s address=%s reason=%s",
            wid, w.role.name, w.address, reason,
        )  # fmt: skip
        if linger_s > 0 and self._started:
            self._spawn(_close_later(w.channel, linger_s))
        else:
            await w.channel.close()

    def holding(self, *addresses: str) -> list[WorkerHandle]:
        """Workers reached at any of these addresses (their gRPC or KV address)."""
        wanted = {a for a in addresses if a}
        return [w for w in self.workers.values() if wanted & {w.address, w.kv_address}]

    @property
    def heartbeat_limit_s(self) -> float:
        """Silence after which a self-registered worker is dropped."""
        return MISSED_HEARTBEATS * self.heartbeat_interval_ms / 1000

    def is_live(self, w: WorkerHandle) -> bool:
        """Static, or self-registered, heard from within the limit and not leaving."""
        if w.static:
            return True
        silent = time.monotonic() - w.last_seen
        return not w.draining and silent <= self.heartbeat_limit_s

    def membership(self) -> dict[tuple[str, str], int]:
        """(role, state) -> number of workers, every combination present."""
        counts = {(r.name.lower(), s): 0 for r in Role for s in WORKER_STATES}
        for w in list(self.workers.values()):
            counts[(w.role.name.lower(), w.state)] += 1
        return counts

    def candidates(self, role: Role, exclude=()) -> list[WorkerHandle]:
        ws = [w for w in self.workers.values() if w.role == role and not w.draining]
        ws = [w for w in ws if w not in exclude]
        healthy = [w for w in ws if w.healthy]
        # All marked unhealthy: try them anyway (a restart may have fixed them) rather than
        # refusing while a poll catches up.
        return healthy or ws

    def has_role(self, role: Role) -> bool:
        return any(w.role == role and not w.draining for w in self.workers.values())

    def choose_decode(self, num_prompt_tokens: int, exclude=()) -> WorkerHandle | None:
        ws = self.candidates(Role.DECODE, exclude)
        if not ws:
            return None
        start = next(self._decode_rr) % len(ws)
        ws = ws[start:] + ws[:start]

        # Prefer servers with room for the prompt, then the fewest streams (counted at
        # dispatch), then the most free blocks reported.
        def key(w: WorkerHandle):
            r = w.reported
            needed = -(-num_prompt_tokens // max(w.block_size, 1))
            no_room = r.num_total_blocks > 0 and r.num_free_blocks < needed
            return (no_room, w.active + r.num_waiting, -r.num_free_blocks)

        return min(ws, key=key)

    # -- background: stats polling, KV events, heartbeat expiry -----------------------------

    async def first_poll(self, timeout_s: float = 2.0) -> None:
        """One Stats round over the static workers, so the router knows their block sizes
        (prefix hashes depend on it) before it routes anything; bounded, failures tolerated."""
        workers = list(self.workers.values())
        if workers:
            await asyncio.wait(
                [asyncio.ensure_future(self._poll_stats(w)) for w in workers], timeout=timeout_s
            )

    def start(self) -> None:
        self._started = True
        self._spawn(self._expire_loop())
        for w in list(self.workers.values()):
            self._watch(w)

    def _watch(self, w: WorkerHandle) -> None:
        self._spawn(self._poll_loop(w))
        if w.role == Role.PREFILL:
            self._spawn(self._events_loop(w))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._started = False
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        workers, self.workers = list(self.workers.values()), {}
        for w in workers:
            await w.channel.close()

    async def _poll_loop(self, w: WorkerHandle) -> None:
        health_stub = health_pb2_grpc.HealthStub(w.channel)
        has_stats = True
        while w.worker_id in self.workers:
            if has_stats:  # first: the block size is needed before prefix routing is right
                has_stats = await self._poll_stats(w)
            await self._check_health(w, health_stub)
            await asyncio.sleep(self.stats_interval_s)

    async def _poll_stats(self, w: WorkerHandle) -> bool:
        """One Stats poll; False when the worker has no Stats (route on dispatch counts)."""
        try:
            s = await w.stub.Stats(worker_pb2.StatsRequest(), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return False
            if w.healthy:
                log.warning("event=worker_unhealthy id=%s code=%s", w.worker_id, e.code().name)
            w.healthy = False
            return True
        w.reported = ReportedLoad(
            s.num_running,
            s.num_waiting,
            s.num_free_blocks,
            s.num_total_blocks,
            s.in_flight_prompt_tokens,
            s.prefix_cache_hits,
            s.prefix_cache_queries,
        )
        if s.block_size > 0:
            w.block_size = s.block_size
        if not w.healthy:
            log.info("event=worker_healthy id=%s", w.worker_id)
        w.healthy = True
        return True

    async def _check_health(self, w: WorkerHandle, stub) -> None:
        # A draining worker says NOT_SERVING before it deregisters; a static worker can only
        # tell this way.
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            return  # unreachable: Stats marks it unhealthy
        serving = resp.status == health_pb2.HealthCheckResponse.SERVING
        if not serving and not w.draining:
            w.draining = True
            log.info("event=worker_draining id=%s source=health", w.worker_id)
        elif serving and w.draining and w.static:
            w.draining = False  # restarted at the same address
            log.info("event=worker_serving id=%s source=health", w.worker_id)

    async def _events_loop(self, w: WorkerHandle) -> None:
        while w.worker_id in self.workers:
            try:
                async for batch in w.stub.KVEvents(worker_pb2.KVEventsRequest()):
                    w.apply_kv_events(batch)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("event=kv_events_unavailable id=%s mode=approximate", w.worker_id)
                    return  # keep approximating from routing decisions
            await asyncio.sleep(1.0)

    async def _expire_loop(self) -> None:
        interval_s = self.heartbeat_interval_ms / 1000
        limit = self.heartbeat_limit_s
        while True:
            await asyncio.sleep(interval_s / 2)
            now = time.monotonic()
            for w in list(self.workers.values()):
                if w.static:
                    continue
                if w.draining and w.idle:
                    await self.remove(w.worker_id, "drained", CLOSE_LINGER_S)
                elif now - w.last_seen > limit:
                    # A draining worker heartbeats until it exits, so this also catches one
                    # that died mid-drain (its streams fail over to other workers).
                    await self.remove(w.worker_id, "heartbeat_timeout")


async def _close_later(channel: grpc.aio.Channel, linger_s: float) -> None:
    try:
        await asyncio.sleep(linger_s)
    finally:  # also when the pool closes first
        await channel.close()


WORKER_STATES = ("serving", "unhealthy", "draining")


class MembershipCollector:
    """`tandem:workers{role,state}`, computed from the pool at scrape time."""

    def __init__(self, pool: WorkerPool, model_name: str) -> None:
        self.pool = pool
        self.model_name = model_name

    def collect(self):
        g = GaugeMetricFamily(
            "tandem:workers",
            "Workers in the router's pool by role and state.",
            labels=["model_name", "role", "state"],
        )
        for (role, state), n in self.pool.membership().items():
            g.add_metric([self.model_name, role, state], n)
        yield g
