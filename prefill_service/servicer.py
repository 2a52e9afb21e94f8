"""Prefill servicer: chunked prefill, first token back to the router, KV pushed to decode.

A request's life on a prefill server:
    Prefill(kv_target) -> engine (chunked prefill, prefix cache, blocks held on finish)
                       -> first token sampled -> KV slabs copied out -> blocks released
                       -> PrefillResponse to the router (TTFT does not wait for the push)
                       -> background push of the slabs + first token to the decode server
    Abort(req_id)      -> stops the compute, cancels the push (the decode side sees the
                          stream cancelled and fails its handoff at once); idempotent

The sender's half of the handoff ledger (kvtransfer/ledger.py) tracks each handoff from
admission (RESERVED) through the push (RECEIVING) to COMPLETE / FAILED / RECLAIMED.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc

from decode_service.convert import finish_to_proto, logprob_to_proto, sampling_from_proto
from decode_service.worker_common import worker_stats
from kvtransfer.base import HandoffState, KVDest, plan_slices
from kvtransfer.grpc_transport import CHUNK_BYTES, GrpcKVSender, HandoffRefused
from kvtransfer.ledger import Handoff, HandoffFailed, HandoffLedger
from protos import worker_pb2, worker_pb2_grpc
from tandem.async_engine import AsyncEngine, EngineDeadError
from tandem.engine import EngineFullError

log = logging.getLogger(__name__)


class PrefillServicer(worker_pb2_grpc.PrefillServicer):
    def __init__(self, engine: AsyncEngine, sender: GrpcKVSender) -> None:
        self.engine = engine
        self.sender = sender
        self.block_size = engine.engine.cfg.block_size
        # sender side of each handoff; a push may take at most the sender's timeout
        self.ledger = HandoffLedger(lease_s=sender.timeout_s)
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
        num_out = request.num_output_tokens
        try:
            params = sampling_from_proto(request.sampling)
            self._validate(request)
            h = self.ledger.open(request.kv_target.handoff_id, req_id)
        except (ValueError, HandoffFailed) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            return await self._prefill(request, context, h, prompt, params, num_out)
        finally:
            if h.state != HandoffState.RECEIVING:  # no push running: the handoff ends here
                self.ledger.fail(h.handoff_id, HandoffState.FAILED, "prefill did not finish")
                self.ledger.close(h.handoff_id)

    async def _prefill(self, request, context, h: Handoff, prompt, params, num_out):
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
            await self.engine.call(self.engine.engine.release, req_id)
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
        slices = None
        if finish is None:  # the decode server continues: it needs the KV
            slices = await self.engine.call(self._copy_out_and_release, req_id, first_block)
        if slices is None:  # finished at this token (or aborted just now): nothing to push
            await self.engine.call(self.engine.engine.release, req_id)
            why = "sequence finished at its first token" if finish else "aborted"
            self.ledger.fail(h.handoff_id, HandoffState.RECLAIMED, why)
            if finish is None:
                await context.abort(grpc.StatusCode.CANCELLED, "request aborted during prefill")
        else:
            dest = KVDest(
                t.handoff_id, t.decode_kv_address, tuple(t.block_ids), first_block, req_id
            )
            self.ledger.receiving(h)
            h.task = asyncio.get_running_loop().create_task(
                self._push(h, dest, slices, token, logprob)
            )
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

    def _copy_out_and_release(self, req_id: str, first_block: int):
        """On the engine thread: snapshot the request's KV, then give its blocks back.
        None when the request is gone (aborted after its last step)."""
        eng = self.engine.engine
        req = eng.requests.get(req_id)
        if req is None:
            return None
        try:
            runner = eng.runner
            if runner.tp.size == 1:
                return plan_slices(runner.kv_cache, req.block_table, first_block, CHUNK_BYTES)
            # tensor parallel: gather every rank's KV heads of the blocks to send (the wire
            # carries all heads whatever the TP size); block i of that copy is table entry
            # first_block + i
            kv = runner.gather_kv(req.block_table[first_block:])
            ids = [0] * first_block + list(range(kv.shape[2]))
            return plan_slices(kv, ids, first_block, CHUNK_BYTES)
        finally:
            eng.release(req_id)

    async def _push(self, h: Handoff, dest, slices, token, logprob) -> None:
        try:
            await self.sender.send(dest, slices, token, logprob)
            self.ledger.complete(h)
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
        return await worker_stats(self.engine, self.ledger.num_active)

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
