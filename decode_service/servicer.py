"""Decode servicer: admits requests, reserves KV for remote prefill, streams tokens.

A request's life on a decode server, one of many on the router's Session stream:
    generate(prefill_locally)   -> add to the engine -> every token
    generate(remote prefill)    -> reserve blocks -> KVTarget -> wait for the KV push
                                -> commit (join the running batch) -> tokens 1..
    abort on the session, Abort(req_id), the session ending
                                -> reclaims its open handoff (the waiting request ends at
                                   once) and aborts it in the engine (idempotent: frees the
                                   blocks)
The events of every request go out batched, one message per engine step (more while the
router lags); a refusal is an `error` event for that request, carrying the status code the
router acts on: RESOURCE_EXHAUSTED (no blocks / queue full: try another server), ABORTED (the
KV handoff failed: the sender's fault, retry with another prefill), INVALID_ARGUMENT (the
request itself is bad).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from dataclasses import dataclass, field

import grpc

from kvtransfer.base import HandoffState
from kvtransfer.ledger import Handoff, HandoffFailed, HandoffLedger
from kvtransfer.wire import logprob_to_proto
from protos import worker_pb2, worker_pb2_grpc
from tandem.async_engine import AsyncEngine
from tandem.engine_records import EngineDeadError, EngineFullError, StepOutput
from tandem.log_config import quote
from tandem.output_stream import OutputStream
from worker.convert import (
    checked_request,
    compile_structured,
    finish_to_proto,
    request_limits,
)
from worker.load import worker_stats

log = logging.getLogger(__name__)


class _Refused(Exception):
    """A request the server does not serve: its `error` event carries this status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refusal(e: Exception) -> _Refused | None:
    if isinstance(e, _Refused):
        return e
    if isinstance(e, ValueError):
        return _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, EngineFullError):
        return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode queue full: {e}")
    if isinstance(e, HandoffFailed):
        return _Refused(grpc.StatusCode.ABORTED, f"KV handoff failed: {e}")
    if isinstance(e, EngineDeadError):
        return _Refused(grpc.StatusCode.INTERNAL, str(e))
    return None


def _fill_tokens(tokens: worker_pb2.TokenEvent, out: StepOutput, num_prompt_tokens: int) -> None:
    # filled in place, in the session's outgoing message: a third of the cost of building a
    # TokenEvent and copying it in
    tokens.token_ids.extend(out.new_token_ids)
    tokens.num_prompt_tokens = num_prompt_tokens
    if out.num_cached_tokens:
        tokens.num_cached_tokens = out.num_cached_tokens
    if out.finish_reason is not None:
        tokens.finish_reason = finish_to_proto(out.finish_reason)
        if out.error:  # the engine failed this request alone: the router logs why
            tokens.error = out.error
    for lp in out.new_logprobs:
        if lp is not None:
            logprob_to_proto(lp, tokens.logprobs.add())
    if out.prompt_logprobs:  # the first event of a local prefill that asked
        for lp in out.prompt_logprobs:
            logprob_to_proto(lp, tokens.prompt_logprobs.add())


def _forget_abort(tasks: set):
    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("event=abort_failed error=%s", quote(repr(task.exception())))

    return done


@dataclass
class _Handoff:
    """A remote-prefill request's reservation on this server."""

    req_id: str
    handoff: Handoff
    kv_target: worker_pb2.KVTarget | None = None
    committed: bool = False  # the KV arrived and the request joined the batch


# events per Session message: a router that lagged gets what queued in messages of at most
# this many (one step of a full batch fits in one), far below the gRPC message size limits
MAX_SESSION_EVENTS = 4096


class _Outbox:
    """A session's events not yet written, in the one message the next write sends: the
    requests' tasks add to it, the session's writer swaps it for an empty one and writes."""

    __slots__ = ("msg", "_waiter")

    def __init__(self) -> None:
        self.msg = worker_pb2.SessionEvents()
        self._waiter: asyncio.Future | None = None

    def add(self, req_id: str) -> worker_pb2.SessionEvent:
        ev = self.msg.events.add()
        ev.req_id = req_id
        self.wake()
        return ev

    def wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def take(self, finished) -> worker_pb2.SessionEvents | None:
        """What queued, once there is something; None when finished() and nothing is left."""
        while not self.msg.events:
            if finished():
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        queued = self.msg.events
        if len(queued) <= MAX_SESSION_EVENTS:
            msg, self.msg = self.msg, worker_pb2.SessionEvents()
            return msg
        msg = worker_pb2.SessionEvents()
        msg.events.extend(queued[:MAX_SESSION_EVENTS])
        del queued[:MAX_SESSION_EVENTS]
        return msg


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
        self._session_tasks: dict[str, asyncio.Task] = {}  # req_id -> its task, every session
        self._aborting: set[asyncio.Task] = set()  # session aborts in progress

    @property
    def num_session_requests(self) -> int:
        """Requests admitted on a Session and not ended (the drain waits for them)."""
        return len(self._session_tasks)

    async def Session(self, request_iterator, context):
        out = _Outbox()
        tasks: dict[str, asyncio.Task] = {}  # this session's requests

        def ended(task: asyncio.Task, req_id: str) -> None:
            if tasks.get(req_id) is task:
                del tasks[req_id]
            if self._session_tasks.get(req_id) is task:
                del self._session_tasks[req_id]
            out.wake()  # the writer may be waiting for the last request to end

        async def read_requests() -> None:
            async for msg in request_iterator:
                op = msg.WhichOneof("op")
                if op == "abort":  # not awaited here: later admissions do not wait for it
                    self._abort_soon(msg.abort.req_id)
                    continue
                req_id = msg.generate.req_id
                refused = (
                    "a SessionRequest needs generate or abort"
                    if op is None
                    else f"request id {req_id!r} is already in use"
                    if req_id in self._session_tasks
                    else None
                )
                if refused is not None:
                    ev = out.add(req_id)
                    ev.error.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                    ev.error.message = refused
                    continue
                task = asyncio.ensure_future(self._session_request(msg.generate, out))
                tasks[req_id] = self._session_tasks[req_id] = task
                task.add_done_callback(lambda t, r=req_id: ended(t, r))

        reader = asyncio.ensure_future(read_requests())
        reader.add_done_callback(lambda _: out.wake())  # half-closed, or broken
        try:
            # ends once the router half-closed and every request on it ended
            while (msg := await out.take(lambda: reader.done() and not tasks)) is not None:
                await context.write(msg)
            reader.result()  # a broken request stream ends the session with its error
        finally:
            reader.cancel()
            # Abort, not just cancel: a task may be waiting on an engine call (add_request,
            # reserve, commit) that runs anyway; the engine's abort queues after it.
            for req_id in list(tasks):
                self._abort_soon(req_id)

    def _abort_soon(self, req_id: str) -> None:
        task = asyncio.ensure_future(self._abort(req_id))
        self._aborting.add(task)
        task.add_done_callback(_forget_abort(self._aborting))

    async def _session_request(self, request, out: _Outbox) -> None:
        req_id, num_prompt = request.req_id, len(request.prompt_token_ids)

        def emit(o: StepOutput) -> None:  # on the loop, from the engine's step callback
            _fill_tokens(out.add(req_id).tokens, o, num_prompt)

        try:
            # checked here, whoever sent it: nothing out of range may reach the engine loop
            prompt, params = checked_request(request, request_limits(self.engine.engine))
            await compile_structured(self.engine.engine, params)  # off the engine loop
            num_out = request.num_output_tokens
            if request.prefill_locally:
                await self._pump(
                    await self.engine.open_stream(
                        req_id, prompt, params, num_output_tokens=num_out
                    ),
                    emit,
                )
            else:
                # the prefill server computes the prompt, and its prompt logprobs: this
                # server's own prefix cache serves the reservation
                params = dataclasses.replace(params, prompt_logprobs=None, check=False)
                async with self._handoff(req_id, prompt, params, num_out) as hs:
                    out.add(req_id).kv_target.CopyFrom(hs.kv_target)
                    stream = await self._commit_after_kv(hs)
                    if type(stream) is StepOutput:
                        emit(stream)
                    else:
                        await self._pump(stream, emit)
        except Exception as e:
            refused = _refusal(e)
            if refused is None:
                log.exception("event=session_request_failed req_id=%s", req_id)
                refused = _Refused(grpc.StatusCode.INTERNAL, f"decode server error: {e!r}")
            ev = out.add(req_id)
            ev.error.code = refused.code.value[0]
            ev.error.message = refused.message

    async def _pump(self, stream: OutputStream, emit) -> None:
        try:
            await self.engine.pump(stream, emit)
        finally:
            await stream.aclose()  # unfinished (cancelled, error): abort, free blocks

    @contextlib.asynccontextmanager
    async def _handoff(self, req_id, prompt, params, num_out):
        """Reserve the prompt's blocks and open its handoff; on the way out (finished,
        failed or cancelled) the handoff is closed and, unless committed, the blocks freed."""
        eng = self.engine.engine
        target = await self.engine.call(eng.reserve, req_id, prompt, params, num_out)
        if target is None:
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "no free KV blocks for this prompt right now"
            )
        handoff_id = f"{req_id}#{next(self._handoff_ids)}"
        h = self.ledger.open(handoff_id, req_id, target.block_ids, target.num_cached_tokens)
        hs = _Handoff(req_id, h)
        try:  # (reserve ran before: a cancel during it is the caller's abort to clean up)
            hs.kv_target = worker_pb2.KVTarget(
                handoff_id=handoff_id,
                decode_kv_address=self.kv_address,
                block_ids=target.block_ids,
                num_cached_tokens=target.num_cached_tokens,
                block_size=eng.cfg.block_size,
                transport=self.offer.legacy_transport,
                transports=self.offer.transports,
                capability=h.capability,  # what the Transfer call must present (receiver.py)
            )
            if self.offer.pool is not None:
                hs.kv_target.pool.CopyFrom(self.offer.pool)
            yield hs
        finally:
            self.ledger.fail(handoff_id, HandoffState.RECLAIMED, "request ended")
            # its own task: a second cancel (an abort, then the session ending) must not cut
            # it short between the settle and the free
            release = asyncio.ensure_future(self._release(hs, handoff_id))
            self._aborting.add(release)
            release.add_done_callback(_forget_abort(self._aborting))
            await asyncio.shield(release)

    async def _release(self, hs: _Handoff, handoff_id: str) -> None:
        try:
            if not hs.committed:  # blocks still reserved: take them back (idempotent)
                await self.ledger.settle(hs.handoff)  # no chunk write may land after the free
                await self.engine.abort(hs.req_id)
        finally:
            self.ledger.close(handoff_id)

    async def _commit_after_kv(self, hs: _Handoff):
        """Wait for the KV push, then join the batch (AsyncEngine.open_commit's result)."""
        h = await self.ledger.wait(hs.handoff)
        # committed only once open_commit returned: if it raised or was cancelled (its
        # commit call runs anyway), the release aborts the request instead of orphaning it
        opened = await self.engine.open_commit(hs.req_id, h.first_token_id, h.first_logprob)
        hs.committed = True
        return opened

    async def Abort(self, request, context):
        return worker_pb2.AbortResponse(found=await self._abort(request.req_id))

    async def _abort(self, req_id: str) -> bool:
        task = self._session_tasks.pop(req_id, None)
        if task is not None:
            task.cancel()  # its events stop; its cleanup aborts it in the engine
        reclaimed = self.ledger.abort_request(req_id, "aborted")
        for h in reclaimed:
            await self.ledger.settle(h)
        found = await self.engine.abort(req_id)
        return found or bool(reclaimed) or task is not None

    async def Stats(self, request, context):
        return await worker_stats(self.engine, self.ledger.num_active, self.ledger.num_completed)
