"""Prefill servicer: chunked prefill, first token back to the router, KV pushed to decode.

A request's life on a prefill server:
    Prefill(kv_target) -> engine (chunked prefill, prefix cache, blocks held on finish)
                       -> first token sampled -> KV slabs copied out -> blocks released
                       -> PrefillResponse to the router (TTFT does not wait for the push)
                       -> background push of the slabs + first token to the decode server
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc

from decode_service.convert import finish_to_proto, logprob_to_proto, sampling_from_proto
from decode_service.worker_common import worker_stats
from kvtransfer.base import KVDest, plan_slices
from kvtransfer.grpc_transport import CHUNK_BYTES, GrpcKVSender
from protos import worker_pb2, worker_pb2_grpc
from tandem.async_engine import AsyncEngine, EngineDeadError

log = logging.getLogger(__name__)


class PrefillServicer(worker_pb2_grpc.PrefillServicer):
    def __init__(self, engine: AsyncEngine, sender: GrpcKVSender) -> None:
        self.engine = engine
        self.sender = sender
        self.block_size = engine.engine.cfg.block_size
        self._pushes: set[asyncio.Task] = set()
        self._subscribers: list[asyncio.Queue] = []
        engine.engine.block_manager.record_events = True
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
        if t.transport not in ("", "grpc"):
            raise ValueError(f"KV transport {t.transport!r} is not available on this server")

    async def Prefill(self, request, context):
        req_id, prompt = request.req_id, list(request.prompt_token_ids)
        try:
            params = sampling_from_proto(request.sampling)
            self._validate(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # only the first token is sampled here; min_tokens still masks EOS at index 0
        first_params = dataclasses.replace(
            params, max_tokens=1, min_tokens=min(1, params.min_tokens)
        )
        start = time.perf_counter()
        last = None
        try:
            async for out in self.engine.generate(req_id, prompt, first_params, hold_blocks=True):
                last = out
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        if last is None or not last.new_token_ids:
            await self.engine.call(self.engine.engine.release, req_id)
            await context.abort(grpc.StatusCode.CANCELLED, "request aborted during prefill")
        prefill_ms = (time.perf_counter() - start) * 1000
        token, logprob = last.new_token_ids[0], last.new_logprobs[0]

        t = request.kv_target
        first_block = t.num_cached_tokens // self.block_size
        slices = await self.engine.call(self._copy_out_and_release, req_id, first_block)
        dest = KVDest(t.handoff_id, t.decode_kv_address, tuple(t.block_ids), first_block)
        task = asyncio.get_running_loop().create_task(self._push(dest, slices, token, logprob))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

        if last.finish_reason == "stop":
            finish = "stop"
        elif params.max_tokens == 1:
            finish = "length"
        else:
            finish = None
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

    def _copy_out_and_release(self, req_id: str, first_block: int):
        """On the engine thread: snapshot the request's KV, then give its blocks back."""
        eng = self.engine.engine
        req = eng.requests[req_id]
        try:
            return plan_slices(eng.runner.kv_cache, req.block_table, first_block, CHUNK_BYTES)
        finally:
            eng.release(req_id)

    async def _push(self, dest, slices, token, logprob) -> None:
        try:
            await self.sender.send(dest, slices, token, logprob)
        except Exception as e:  # noqa: BLE001 - the decode side's lease reclaims the blocks
            log.warning("kv push failed handoff=%s error=%s", dest.handoff_id, e)

    async def Abort(self, request, context):
        return worker_pb2.AbortResponse(found=await self.engine.abort(request.req_id))

    async def Stats(self, request, context):
        return await worker_stats(self.engine)

    # -- prefix-index feed --------------------------------------------------------------------
    async def _pump_events(self) -> None:
        bm = self.engine.engine.block_manager
        while True:
            await asyncio.sleep(0.05)
            try:
                stored, evicted = await self.engine.call(bm.pop_events)
            except EngineDeadError:
                return
            if stored or evicted:
                batch = worker_pb2.KVEventBatch(
                    stored_block_hashes=stored, evicted_block_hashes=evicted
                )
                for q in self._subscribers:
                    q.put_nowait(batch)

    async def KVEvents(self, request, context):
        bm = self.engine.engine.block_manager
        q: asyncio.Queue = asyncio.Queue()
        snapshot = await self.engine.call(lambda: list(bm.cached))
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
        await self.sender.close()
