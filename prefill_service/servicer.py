"""Prefill servicer: chunked prefill, first token back to the router, KV pushed to decode.

A request's life on a prefill server:
    Prefill(kv_target) -> validate; kvtransfer picks the sender for this target
                          (kvtransfer/select.py); the handoff opens in the ledger
                       -> engine (chunked prefill, prefix cache, blocks held on finish)
                       -> first token sampled
                       -> the sender reads the KV through the engine's KV calls, as its
                          transport needs: a copy with the blocks released (grpc), or the
                          held blocks themselves (shm / cuda_ipc)
                       -> PrefillResponse to the router (TTFT does not wait for the push)
                       -> background push of the KV + first token to the decode server;
                          once it is over (however), held blocks go back
    Abort(req_id)      -> stops the compute, cancels the push (the decode side sees the
                          call cancelled and fails its handoff at once); idempotent

The sender's half of the handoff ledger (kvtransfer/ledger.py) tracks each handoff from
admission (RESERVED) through the push (RECEIVING) to COMPLETE / FAILED / RECLAIMED.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc

from kvtransfer.base import HandoffFailed, HandoffRefused, HandoffState, KVDest, KVSender, KVSource
from kvtransfer.ledger import Handoff, HandoffLedger
from kvtransfer.select import KVSenders
from kvtransfer.wire import dest_from_proto, logprob_to_proto
from protos import worker_pb2, worker_pb2_grpc
from tandem.async_engine import AsyncEngine
from tandem.engine_records import EngineDeadError, EngineFullError
from tandem.log_config import quote
from worker.convert import (
    checked_request,
    compile_structured,
    finish_to_proto,
    request_limits,
)
from worker.load import worker_stats

log = logging.getLogger(__name__)


class PrefillServicer(worker_pb2_grpc.PrefillServicer):
    def __init__(self, engine: AsyncEngine, senders: KVSenders) -> None:
        self.engine = engine
        self.senders = senders  # one per KV transport; kvtransfer picks one per handoff
        core = engine.engine  # read once here: the servicer calls the engine, never walks it
        self.block_size = core.cfg.block_size
        # sender side of each handoff; a push may take at most the sender's timeout
        self.ledger = HandoffLedger(lease_s=senders.channels.timeout_s)
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

    async def Prefill(self, request, context):
        req_id = request.req_id
        try:
            # checked here, whoever sent it: nothing out of range may reach the engine loop
            _, params = checked_request(request, request_limits(self.engine.engine))
            await compile_structured(self.engine.engine, params)  # off the engine loop
            self._validate(request)
            dest = dest_from_proto(request.kv_target, req_id, self.block_size)
            sender = await self.senders.pick(dest)  # ValueError when none fits
            h = self.ledger.open(dest.handoff_id, req_id)
        except (ValueError, HandoffFailed) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            return await self._prefill(request, context, h, params, dest, sender)
        finally:
            if h.state != HandoffState.RECEIVING:  # no push running: the handoff ends here
                self.ledger.fail(h.handoff_id, HandoffState.FAILED, "prefill did not finish")
                self.ledger.close(h.handoff_id)

    async def _prefill(self, request, context, h: Handoff, params, dest: KVDest, sender):
        req_id, prompt = request.req_id, list(request.prompt_token_ids)
        num_out = request.num_output_tokens
        # Only output index num_out is sampled here; min_tokens still masks EOS at it.
        first_params = dataclasses.replace(
            params, max_tokens=num_out + 1, min_tokens=min(num_out + 1, params.min_tokens)
        )
        start = time.perf_counter()
        last = prompt_logprobs = None
        try:
            stream = self.engine.generate(
                req_id, prompt, first_params, hold_blocks=True, num_output_tokens=num_out
            )
            async for out in stream:
                last = out
                if out.prompt_logprobs is not None:  # on the first output
                    prompt_logprobs = out.prompt_logprobs
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineFullError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"prefill queue full: {e}")
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        if last is not None and last.finish_reason == "error":  # the engine failed it alone
            await context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {last.error}")
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

        source = None
        if finish is None:  # the decode server continues: it needs the KV
            source = await self.senders.read(sender, self.engine, req_id, dest.first_block)
        if source is None:  # finished at this token (or aborted just now): nothing to push
            await self.engine.release(req_id)
            why = "sequence finished at its first token" if finish else "aborted"
            self.ledger.fail(h.handoff_id, HandoffState.RECLAIMED, why)
            if finish is None:
                await context.abort(grpc.StatusCode.CANCELLED, "request aborted during prefill")
        else:
            self.ledger.receiving(h)
            h.task = self._track(self._push(h, sender, dest, source, token, logprob))
            # once the push is over (however), held blocks go back (a copy's went already)
            h.task.add_done_callback(lambda _: self._track(self._release(source)))

        resp = worker_pb2.PrefillResponse(
            token_id=token,
            finish_reason=finish_to_proto(finish),
            num_cached_tokens=last.num_cached_tokens,
            prefill_ms=prefill_ms,
        )
        lp = logprob_to_proto(logprob)
        if lp is not None:
            resp.logprob.CopyFrom(lp)
        for plp in prompt_logprobs or ():
            logprob_to_proto(plp, resp.prompt_logprobs.add())
        return resp

    async def _release(self, source: KVSource) -> None:
        """Held blocks back to the pool (they stay cached); idempotent."""
        try:
            await source.release()
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

    async def _push(
        self, h: Handoff, sender: KVSender, dest: KVDest, source: KVSource, token, logprob
    ) -> None:
        try:
            await sender.send(dest, source, token, logprob)
            self.ledger.complete(h, transport=sender.name)
        except asyncio.CancelledError:  # Abort, or shutdown: the receiver sees the cancel
            self.ledger.fail(h.handoff_id, HandoffState.RECLAIMED, "push cancelled")
        except HandoffRefused as e:  # its handoff already ended there (cancelled request)
            self.ledger.fail(h.handoff_id, HandoffState.FAILED, str(e))
            log.info("event=kv_push_refused handoff=%s error=%s", dest.handoff_id, quote(e))
        except Exception as e:  # noqa: BLE001 - the receiver already failed its side
            self.ledger.fail(h.handoff_id, HandoffState.FAILED, str(e))
            log.warning("event=kv_push_failed handoff=%s error=%s", dest.handoff_id, quote(e))
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
        await self.senders.close()
