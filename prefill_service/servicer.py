"""Prefill servicer: chunked prefill, first token back to the router, KV pushed to decode.

A request's life on a prefill server:
    Prefill(kv_target) -> pick the KV transport (kvtransfer/select.py)
                       -> engine (chunked prefill, prefix cache, blocks held on finish)
                       -> first token sampled
                          grpc:             KV slabs copied out -> blocks released
                          shm / cuda_ipc:   blocks stay held
                       -> PrefillResponse to the router (TTFT does not wait for the push)
                       -> background push of the KV + first token to the decode server
                          (shm / cuda_ipc: written from the held blocks, then released)
    Abort(req_id)      -> stops the compute, cancels the push (the decode side sees the
                          stream cancelled and fails its handoff at once); idempotent

The sender's half of the handoff ledger (kvtransfer/ledger.py) tracks each handoff from
admission (RESERVED) through the push (RECEIVING) to COMPLETE / FAILED / RECLAIMED.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time

import grpc

from kvtransfer.base import HandoffState, KVDest, plan_slices
from kvtransfer.direct_transport import DirectKVSender, check_pool_layout, pool_from_proto
from kvtransfer.grpc_transport import CHUNK_BYTES, GrpcKVSender, HandoffRefused
from kvtransfer.ledger import Handoff, HandoffFailed, HandoffLedger
from kvtransfer.pool import PoolExport, gpu_uuid, host_id
from kvtransfer.select import Endpoint, choose_transport
from protos import worker_pb2, worker_pb2_grpc
from tandem.async_engine import AsyncEngine, EngineDeadError
from tandem.engine import EngineFullError
from worker.bootstrap import worker_stats
from worker.convert import finish_to_proto, logprob_to_proto, sampling_from_proto

log = logging.getLogger(__name__)


class PrefillServicer(worker_pb2_grpc.PrefillServicer):
    def __init__(
        self, engine: AsyncEngine, sender: GrpcKVSender, kv_transport: str = "auto"
    ) -> None:
        self.engine = engine
        self.sender = sender
        self.kv_transport = kv_transport  # --kv-transport: auto, or the one forced
        core = engine.engine  # read once here: the servicer calls the engine, never walks it
        self.kv_cache = core.kv_cache
        self.tp_size = core.cfg.tensor_parallel_size
        self.here = Endpoint(host_id(), gpu_uuid(self.kv_cache.device))
        self.direct = DirectKVSender(sender, self.here)
        self._unopenable: set[str] = set()  # pool ids auto mode could not open: grpc for them
        self.block_size = core.cfg.block_size
        # sender side of each handoff; a push may take at most the sender's timeout
        self.ledger = HandoffLedger(lease_s=sender.timeout_s)
        self._pushes: set[asyncio.Task] = set()
        self._subscribers: list[asyncio.Queue] = []
        core.enable_kv_events()
        self._events_task = asyncio.get_running_loop().create_task(self._pump_events())

    def _validate(self, request) -> None:
        t = request.kv_target
        num_blocks = -(-len(request.prompt_token_ids) // self.block_size)
        if t.block_size != self.block_size:
            raise ValueError(
                f"kv_target.block_size {t.block_size} != this server's {self.block_size}"
            )
        if len(t.block_ids) != num_blocks:
            raise ValueError(
                f"kv_target has {len(t.block_ids)} blocks; the prompt needs {num_blocks}"
            )
        if t.num_cached_tokens % self.block_size or t.num_cached_tokens > len(
            request.prompt_token_ids
        ):
            raise ValueError(
                "kv_target.num_cached_tokens must be block-aligned and within the prompt"
            )

    def _pick_transport(self, t) -> tuple[str, PoolExport | None]:
        """The transport for this KVTarget (and its pool); ValueError when none fits."""
        pool = pool_from_proto(t.pool) if t.HasField("pool") else None
        offered = list(t.transports) or [t.transport or "grpc"]
        if self.tp_size > 1:
            # the direct writes copy one local pool holding every KV head; at TP > 1 each
            # rank holds only its heads, and only grpc gathers them (_copy_out_and_release)
            if "grpc" not in offered:
                raise ValueError("at tensor-parallel size > 1 KV can only be sent over grpc")
            return "grpc", None
        name = choose_transport(self.kv_transport, self.here, offered, pool)
        if name == "grpc" or pool is None:
            return name, None
        if self.kv_transport == "auto" and pool.pool_id in self._unopenable and "grpc" in offered:
            return "grpc", None
        try:  # opened once per decode server, here so a failure still leaves grpc
            check_pool_layout(self.kv_cache, self.direct.pool(t.decode_kv_address, pool))
        except (OSError, RuntimeError, ValueError) as e:
            if self.kv_transport != "auto":
                raise ValueError(f"cannot open the decode server's {name} pool: {e}") from e
            if pool.pool_id not in self._unopenable:
                self._unopenable.add(pool.pool_id)
                log.warning("event=kv_pool_unopenable transport=%s error=%s", name, e)
            if "grpc" not in offered:
                raise ValueError(f"cannot open the decode server's {name} pool: {e}") from e
            return "grpc", None
        return name, pool

    async def Prefill(self, request, context):
        req_id, prompt = request.req_id, list(request.prompt_token_ids)
        num_out = request.num_output_tokens
        try:
            params = sampling_from_proto(request.sampling)
            self._validate(request)
            transport = self._pick_transport(request.kv_target)
            h = self.ledger.open(request.kv_target.handoff_id, req_id)
        except (ValueError, HandoffFailed) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            return await self._prefill(request, context, h, prompt, params, num_out, transport)
        finally:
            if h.state != HandoffState.RECEIVING:  # no push running: the handoff ends here
                self.ledger.fail(h.handoff_id, HandoffState.FAILED, "prefill did not finish")
                self.ledger.close(h.handoff_id)

    async def _prefill(self, request, context, h: Handoff, prompt, params, num_out, transport):
        req_id = request.req_id
        # Only output index num_out is sampled here; min_tokens still masks EOS at it.
        first_params = dataclasses.replace(
            params, max_tokens=num_out + 1, min_tokens=min(num_out + 1, params.min_tokens)
        )
        start = time.perf_counter()
        last = None
        try:
            stream = self.engine.generate(
                req_id, prompt, first_params, hold_blocks=True, num_output_tokens=num_out
            )
            async for out in stream:
                last = out
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineFullError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill queue full: {e}")
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        if last is None or not last.new_token_ids or h.state.terminal:
            # aborted (Abort RPC) during or right after the prefill
            await self.engine.release(req_id)
            await context.abort(grpc.StatusCode.CANCELLED, "request aborted during prefill")
        prefill_ms = (time.perf_counter() - start) * 1000
        token, logprob = last.new_token_ids[0], last.new_logprobs[0]
        if last.finish_reason == "stop":
            finish = "stop"
        elif params.max_tokens is not None and num_out + 1 >= params.max_tokens:
            finish = "length"
        else:
            finish = None

        t = request.kv_target
        first_block = t.num_cached_tokens // self.block_size
        name, pool = transport
        kv = None
        if finish is None:  # the decode server continues: it needs the KV
            # grpc: a copy of the KV, blocks released; same host: the held block ids
            if pool is None:
                kv = await self.engine.copy_kv_and_release(req_id, first_block)
                if kv is not None:  # block i of the copy is table entry first_block + i
                    ids = [0] * first_block + list(range(kv.shape[2]))
                    kv = plan_slices(kv, ids, first_block, CHUNK_BYTES)
            else:
                kv = await self.engine.held_block_ids(req_id, first_block)
        if kv is None:  # finished at this token (or aborted just now): nothing to push
            await self.engine.release(req_id)
            why = "sequence finished at its first token" if finish else "aborted"
            self.ledger.fail(h.handoff_id, HandoffState.RECLAIMED, why)
            if finish is None:
                await context.abort(grpc.StatusCode.CANCELLED, "request aborted during prefill")
        else:
            dest = KVDest(
                t.handoff_id, t.decode_kv_address, tuple(t.block_ids), first_block, req_id
            )
            if pool is None:
                send = functools.partial(self.sender.send, dest, kv, token, logprob)
            else:
                send = functools.partial(
                    self.direct.send, dest, pool, self.kv_cache, kv, token, logprob
                )
            self.ledger.receiving(h)
            h.task = asyncio.get_running_loop().create_task(self._push(h, dest, send, name))
            if pool is not None:  # once the push is over (however), the blocks go back
                h.task.add_done_callback(lambda _: self._track(self._release(req_id)))
            self._pushes.add(h.task)
            h.task.add_done_callback(self._pushes.discard)

        resp = worker_pb2.PrefillResponse(
            token_id=token,
            finish_reason=finish_to_proto(finish),
            num_cached_tokens=last.num_cached_tokens,
            prefill_ms=prefill_ms,
        )
        lp = logprob_to_proto(logprob)
        if lp is not None:
            resp.logprob.CopyFrom(lp)
        return resp

    async def _release(self, req_id: str) -> None:
        """Held blocks back to the pool (they stay cached); idempotent."""
        try:
            await self.engine.release(req_id)
        except EngineDeadError:
            pass

    def _track(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)
        return task

    @property
    def num_pushes(self) -> int:
        """KV pushes in flight (a drain waits for them)."""
        return sum(h.state == HandoffState.RECEIVING for h in self.ledger.handoffs.values())

    async def _push(self, h: Handoff, dest, send, transport: str) -> None:
        try:
            await send()
            self.ledger.complete(h, transport=transport)
        except asyncio.CancelledError:  # Abort, or shutdown: the receiver sees the cancel
            self.ledger.fail(h.handoff_id, HandoffState.RECLAIMED, "push cancelled")
        except HandoffRefused as e:  # its handoff already ended there (cancelled request)
            self.ledger.fail(h.handoff_id, HandoffState.FAILED, str(e))
            log.info("event=kv_push_refused handoff=%s error=%s", dest.handoff_id, e)
        except Exception as e:  # noqa: BLE001 - the receiver already failed its side
            self.ledger.fail(h.handoff_id, HandoffState.FAILED, str(e))
            log.warning("event=kv_push_failed handoff=%s error=%s", dest.handoff_id, e)
        finally:
            self.ledger.close(h.handoff_id)

    async def Abort(self, request, context):
        cancelled = self.ledger.abort_request(request.req_id, "aborted by Abort RPC")
        found = await self.engine.abort(request.req_id)
        return worker_pb2.AbortResponse(found=found or bool(cancelled))

    async def Stats(self, request, context):
        return await worker_stats(self.engine, self.ledger.num_active, self.ledger.num_completed)

    # -- prefix-index feed --------------------------------------------------------------------
    async def _pump_events(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            try:
                stored, evicted = await self.engine.pop_kv_events()
            except EngineDeadError:
                return
            if stored or evicted:
                batch = worker_pb2.KVEventBatch(
                    stored_block_hashes=stored, evicted_block_hashes=evicted
                )
                for q in self._subscribers:
                    q.put_nowait(batch)

    async def KVEvents(self, request, context):
        q: asyncio.Queue = asyncio.Queue()
        snapshot = await self.engine.cached_block_hashes()
        self._subscribers.append(q)
        try:
            yield worker_pb2.KVEventBatch(reset=True, stored_block_hashes=snapshot)
            while True:
                yield await q.get()
        finally:
            self._subscribers.remove(q)

    async def close(self) -> None:
        self._events_task.cancel()
        if self._pushes:
            await asyncio.wait(self._pushes, timeout=10)
        self.direct.close()
        await self.sender.close()
