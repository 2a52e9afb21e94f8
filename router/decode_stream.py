"""A choice's events from its decode server, read with deadlines, over the server's Session
stream (one per decode server, shared by every choice routed there).

    DecodeSession ── one Decode.Session call per decode server ──────────────────────────
      up:   SessionRequest(generate=DecodeRequest) per choice attempt, (abort=...) when a
            choice ends early
      down: SessionEvents, one message per engine step for the whole batch; the reader
            task hands each event to its choice's _SessionStream
      the call ends (server stopped, channel closed, error): every open choice fails over
      opened on a choice's first use of the server, again after it ended

A choice's _SessionStream.read(timeout_s, waiting_for, blame) -> an event with a `kv_target`
or `tokens`, raising _WorkerFailed (migrate) or RequestError (the request is bad); each
read's deadline is kept by one lazily re-armed timer per stream, not a timer per token.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math

import grpc

from protos import worker_pb2
from router.types import ErrorKind, RequestError

log = logging.getLogger("tandem.router.decode_stream")

_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}
_CODES = {c.value[0]: c for c in grpc.StatusCode}
ABORT_TIMEOUT_S = 2.0
_background: set[asyncio.Task] = set()  # fire-and-forget aborts, kept alive until done


class _WorkerFailed(Exception):
    def __init__(self, worker, detail: str, code=None):
        super().__init__(detail)
        self.worker = worker
        self.code = code  # grpc.StatusCode when the worker answered with one


# A worker's refusal starts with the wire field it names ("sampling.structured: ..."); the
# public API names these fields so (a grammar only the worker's xgrammar can refuse)
_PUBLIC_PARAMS = {
    "sampling.structured": "structured_outputs",
    "sampling.prompt_logprobs": "prompt_logprobs",
}


def _invalid_argument(details: str) -> RequestError:
    field, sep, rest = details.partition(": ")
    param = _PUBLIC_PARAMS.get(field) if sep else None
    if param is None:
        return RequestError(ErrorKind.INVALID_ARGUMENT, details or "invalid request")
    return RequestError(ErrorKind.INVALID_ARGUMENT, f"{param}: {rest}", param=param)


def _status_error(code: grpc.StatusCode, details: str, worker) -> Exception:
    """A worker's status -> RequestError (the request's fault) or _WorkerFailed (retry)."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return _invalid_argument(details)
    if code == grpc.StatusCode.OUT_OF_RANGE:
        return RequestError(ErrorKind.CONTEXT_LENGTH, details or "context length exceeded")
    if code in _RETRYABLE:
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            worker.healthy = False  # the poller restores it
        return _WorkerFailed(worker, f"{code.name}: {details}", code)
    return RequestError(ErrorKind.INTERNAL, f"worker {worker.address}: {code.name} {details}")


def _worker_error(e: grpc.aio.AioRpcError, worker) -> Exception:
    return _status_error(e.code(), e.details(), worker)


def _fire_abort(worker, req_id: str) -> None:
    async def abort():
        try:
            await worker.stub.Abort(worker_pb2.AbortRequest(req_id=req_id), timeout=ABORT_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            log.debug(
                "event=abort_failed worker=%s req_id=%s code=%s", worker.worker_id, req_id, e.code()
            )

    task = asyncio.get_running_loop().create_task(abort())
    _background.add(task)
    task.add_done_callback(_background.discard)


class _Deadline:
    """A read's deadline for a float per read: the read writes its deadline down; one timer
    sleeps until the earliest deadline written and, woken to find that the deadline moved on
    (events kept coming), sleeps until the new one. A stream that keeps streaming wakes it
    once per idle timeout, not once per token. Past the deadline with a read waiting, it
    calls _expire(). Between reads none runs."""

    __slots__ = ("_loop", "_deadline", "_due", "_timer", "_waiting", "_expired")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._deadline = math.inf  # the read's (loop.time()); the last read's between reads
        self._due = math.inf  # when the timer fires: never after _deadline
        self._timer: asyncio.TimerHandle | None = None
        self._waiting = False  # a read is waiting
        self._expired = False  # the deadline passed with a read waiting

    def _arm(self, timeout_s: float) -> None:
        deadline = self._loop.time() + timeout_s
        self._deadline = deadline
        if deadline < self._due:  # sooner than the timer (the first read, a shorter timeout)
            if self._timer is not None:
                self._timer.cancel()
            self._due = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._due = None, math.inf
        if not self._waiting:
            return  # between reads: the next read starts it again
        if self._loop.time() < self._deadline:  # an event came since it was set
            self._due = self._deadline
            self._timer = self._loop.call_at(self._due, self._on_timer)
        else:
            self._expired = True
            self._expire()

    def _expire(self) -> None:
        raise NotImplementedError

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self, blame, timeout_s: float, waiting_for: str) -> _WorkerFailed:
        return _WorkerFailed(
            blame or self.worker,
            f"no {waiting_for} within {timeout_s:g}s",
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )


class _SessionStream(_Deadline):
    """One choice attempt's events on its decode server's session."""

    __slots__ = ("session", "worker", "request", "_events", "_error", "_waiter")

    def __init__(self, session: DecodeSession, request: worker_pb2.DecodeRequest):
        super().__init__()
        self.session = session
        self.worker = session.worker
        self.request = request
        self._events: collections.deque = collections.deque()
        self._error: Exception | None = None  # the session ended under it
        self._waiter: asyncio.Future | None = None

    async def read(self, timeout_s: float, waiting_for: str, blame=None):
        """The next decode event within timeout_s. Failures blame the decode server, except
        ABORTED (a failed KV handoff) and a timeout, which blame `blame` when given (the
        prefill server)."""
        if not self._events and self._error is None:
            self._arm(timeout_s)
            self._waiting, self._expired = True, False
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
                self._waiting = False
            if self._expired and not self._events:
                raise self._timed_out(blame, timeout_s, waiting_for)
        events = self._events
        if events:
            ev = events.popleft()
            kind = ev.WhichOneof("event")
            if kind == "error":
                raise self._event_error(ev.error, blame)
            if kind == "tokens" and events and events[0].WhichOneof("event") == "tokens":
                _merge_tokens(ev.tokens, events)  # it lagged: what queued, as one event
            return ev
        raise self._error

    def _event_error(self, err: worker_pb2.SessionError, blame) -> Exception:
        code = _CODES.get(err.code, grpc.StatusCode.UNKNOWN)
        if blame is not None and code == grpc.StatusCode.ABORTED:
            return _WorkerFailed(blame, f"ABORTED: {err.message}", code)
        return _status_error(code, err.message, self.worker)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _push(self, ev: worker_pb2.SessionEvent) -> None:
        self._events.append(ev)
        self._wake()

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._wake()

    def _expire(self) -> None:
        self._wake()

    def close(self, finished: bool = True) -> None:
        """Leave the session; unfinished, the request is aborted on the decode server."""
        self._stop_timer()
        self.session.leave(self.request.req_id, self, abort=not finished)


def _merge_tokens(into: worker_pb2.TokenEvent, events: collections.deque) -> None:
    """Append the token events at the front of `events` to `into` (in place, consumed)."""
    while events and events[0].WhichOneof("event") == "tokens":
        t = events.popleft().tokens
        into.token_ids.extend(t.token_ids)
        into.logprobs.extend(t.logprobs)
        into.prompt_logprobs.extend(t.prompt_logprobs)  # (only a first event has them)
        into.num_cached_tokens = t.num_cached_tokens
        if t.HasField("stop_token_id"):
            into.stop_token_id = t.stop_token_id
        if t.error:
            into.error = t.error
        if t.finish_reason:
            into.finish_reason = t.finish_reason
            return  # a request's last event


class DecodeSession:
    """One Decode.Session call to a decode server, for every choice routed there."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self.closed = False
        self._streams: dict[str, _SessionStream] = {}
        self._seq = itertools.count()
        self._up: asyncio.Queue[worker_pb2.SessionRequest | None] = asyncio.Queue()
        self._call = worker.stub.Session(self._requests())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def open(self, request: worker_pb2.DecodeRequest) -> _SessionStream:
        # a key of its own on this session: a client may reuse a request_id as soon as the
        # last one ended, while that one's abort and last events are still on the wire
        request.req_id = f"{request.req_id}/{next(self._seq)}"
        stream = _SessionStream(self, request)
        self._streams[request.req_id] = stream
        self._up.put_nowait(worker_pb2.SessionRequest(generate=request))
        return stream

    def leave(self, req_id: str, stream: _SessionStream, abort: bool) -> None:
        if self._streams.get(req_id) is stream:
            del self._streams[req_id]
        if abort and not self.closed:
            self._up.put_nowait(
                worker_pb2.SessionRequest(abort=worker_pb2.AbortRequest(req_id=req_id))
            )

    async def _requests(self):
        while (msg := await self._up.get()) is not None:
            yield msg

    async def _read(self) -> None:
        error: Exception = _WorkerFailed(
            self.worker, "the decode session ended", grpc.StatusCode.UNAVAILABLE
        )
        try:
            async for batch in self._call:
                streams = self._streams
                for ev in batch.events:
                    stream = streams.get(ev.req_id)
                    if stream is not None:  # else: a choice that already left
                        stream._push(ev)
        except grpc.aio.AioRpcError as e:
            error = _worker_error(e, self.worker)
            if not isinstance(error, _WorkerFailed):  # the session's fault, not a request's
                error = _WorkerFailed(self.worker, str(error), e.code())
        except asyncio.CancelledError:
            error = _WorkerFailed(self.worker, "the decode session was cancelled")
            raise
        except Exception as e:  # noqa: BLE001 - a bug here must fail the choices over, not hang
            log.exception("event=decode_session_failed worker=%s", self.worker.address)
            error = _WorkerFailed(self.worker, f"decode session: {e!r}")
        finally:
            self.closed = True
            self._up.put_nowait(None)  # ends the request iterator grpc is still polling
            self._call.cancel()  # (a no-op once the call ended)
            if self.worker.session is self:
                self.worker.session = None
            streams, self._streams = self._streams, {}
            for stream in streams.values():
                stream._fail(error)
            log.debug("event=decode_session_ended worker=%s detail=%s", self.worker.address, error)


def open_decode_stream(worker, request: worker_pb2.DecodeRequest) -> _SessionStream:
    """The choice attempt's stream on `worker`'s session (opened on first use)."""
    session = worker.session
    if session is None or session.closed:
        session = worker.session = DecodeSession(worker)
    return session.open(request)
