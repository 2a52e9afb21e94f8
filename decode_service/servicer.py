"""Decode servicer: admits requests, reserves KV for remote prefill, streams tokens.

A request's life on a decode server:
    Generate(prefill_locally)   -> add to the engine -> stream every token
    Generate(remote prefill)    -> reserve blocks -> send KVTarget -> wait for the KV push
                                -> commit (join the running batch) -> stream tokens 1..
    stream cancelled / error    -> engine.abort (idempotent) frees the blocks
    Abort(req_id)               -> reclaims its open handoff (the waiting stream ends at once)
                                   and aborts it in the engine; idempotent

Status codes the router acts on: RESOURCE_EXHAUSTED (no blocks / queue full: try another
server), ABORTED (the KV handoff failed: the sender's fault, retry with another prefill),
INVALID_ARGUMENT (the request itself is bad).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import grpc

from decode_service.convert import finish_to_proto, logprob_to_proto, sampling_from_proto
from decode_service.worker_common import worker_stats
from kvtransfer.base import HandoffState
from kvtransfer.ledger import HandoffFailed, HandoffLedger
from protos import worker_pb2, worker_pb2_grpc
from tandem.async_engine import AsyncEngine, EngineDeadError
from tandem.engine import EngineFullError, StepOutput

log = logging.getLogger(__name__)


def _token_event(out: StepOutput, num_prompt_tokens: int) -> worker_pb2.DecodeEvent:
    # filled in place: a third of the cost of building a TokenEvent and wrapping it
    ev = worker_pb2.DecodeEvent()
    tokens = ev.tokens
    tokens.token_ids.extend(out.new_token_ids)
    tokens.num_prompt_tokens = num_prompt_tokens
    if out.num_cached_tokens:
        tokens.num_cached_tokens = out.num_cached_tokens
    if out.finish_reason is not None:
        tokens.finish_reason = finish_to_proto(out.finish_reason)
    for lp in out.new_logprobs:
        if lp is not None:
            logprob_to_proto(lp, tokens.logprobs.add())
    return ev


@dataclass(frozen=True)
class KVOffer:
    """What every KVTarget of this server offers (decode_service/server.py builds it)."""

    transports: list[str] = field(default_factory=lambda: ["grpc"])  # best first
    pool: worker_pb2.KVPoolExport | None = None  # the exported pool, for shm / cuda_ipc

    @property
    def legacy_transport(self) -> str:
        """KVTarget.transport: what a sender that knows only that field must use."""
        return "grpc" if "grpc" in self.transports else self.transports[0]


class DecodeServicer(worker_pb2_grpc.DecodeServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        ledger: HandoffLedger,
        kv_address: str,
        offer: KVOffer | None = None,
    ) -> None:
        self.engine = engine
        self.ledger = ledger
        self.kv_address = kv_address
        self.offer = offer or KVOffer()
        self._handoff_ids = itertools.count()

    async def Generate(self, request, context):
        req_id = request.req_id
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        prompt = list(request.prompt_token_ids)
        num_out = request.num_output_tokens
        try:
            if request.prefill_locally:
                stream = await self.engine.open_stream(
                    req_id, prompt, params, num_output_tokens=num_out
                )
            else:
                stream = self._remote_prefill(req_id, prompt, params, num_out, context)
            # context.write, not yield: no async generator between the engine and gRPC (nor
            # the interceptor's wrapper around one), a few µs less per token on the loop
            write, num_prompt = context.write, len(prompt)
            try:
                async for item in stream:
                    if type(item) is StepOutput:
                        await write(_token_event(item, num_prompt))
                    else:
                        await write(item)
            finally:
                await stream.aclose()  # unfinished (client gone, error): abort, free blocks
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineFullError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode queue full: {e}")
        except HandoffFailed as e:
            await context.abort(grpc.StatusCode.ABORTED, f"KV handoff failed: {e}")
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))

    async def _remote_prefill(self, req_id, prompt, params, num_out, context):
        eng = self.engine.engine
        target = await self.engine.call(eng.reserve, req_id, prompt, params, num_out)
        if target is None:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "no free KV blocks for this prompt right now"
            )
        handoff_id = f"{req_id}#{next(self._handoff_ids)}"
        h = self.ledger.open(handoff_id, req_id, target.block_ids, target.num_cached_tokens)
        committed = False
        try:
            kv_target = worker_pb2.KVTarget(
                handoff_id=handoff_id,
                decode_kv_address=self.kv_address,
                block_ids=target.block_ids,
                num_cached_tokens=target.num_cached_tokens,
                block_size=eng.cfg.block_size,
                transport=self.offer.legacy_transport,
                transports=self.offer.transports,
            )
            if self.offer.pool is not None:
                kv_target.pool.CopyFrom(self.offer.pool)
            yield worker_pb2.DecodeEvent(kv_target=kv_target)
            await self.ledger.wait(h)
            committed = True
            async for out in self.engine.commit(req_id, h.first_token_id, h.first_logprob):
                yield out
        finally:
            self.ledger.fail(handoff_id, HandoffState.RECLAIMED, "request ended")
            if not committed:  # blocks still reserved: take them back (idempotent)
                await self.ledger.settle(h)  # no chunk write may land after the free
                await self.engine.abort(req_id)
            self.ledger.close(handoff_id)

    async def Abort(self, request, context):
        reclaimed = self.ledger.abort_request(request.req_id, "aborted by Abort RPC")
        for h in reclaimed:
            await self.ledger.settle(h)
        found = await self.engine.abort(request.req_id)
        return worker_pb2.AbortResponse(found=found or bool(reclaimed))

    async def Stats(self, request, context):
        return await worker_stats(self.engine, self.ledger.num_active, self.ledger.num_completed)
