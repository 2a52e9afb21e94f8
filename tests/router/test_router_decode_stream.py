"""router.decode_stream._SessionStream on its own, over a fake session: one timer per stream
(not per read), the deadline only while a read waits, and a cancel from outside stays a cancel.
test_router_deadlines.py covers the same deadlines end to end over gRPC."""

import asyncio

import grpc
import pytest

from protos import worker_pb2
from router.decode_stream import _SessionStream, _WorkerFailed

pytestmark = pytest.mark.timeout(30)


class Worker:  # what _SessionStream and _WorkerFailed need of a WorkerHandle
    def __init__(self, name):
        self.name = name


DECODE, PREFILL = Worker("decode"), Worker("prefill")


class FakeSession:
    """What a _SessionStream needs of its DecodeSession: the worker, and leave()."""

    worker = DECODE

    def __init__(self):
        self.left: list[tuple[str, bool]] = []  # (req_id, abort)

    def leave(self, req_id: str, stream, abort: bool) -> None:
        self.left.append((req_id, abort))


def open_stream(cls=_SessionStream):
    session = FakeSession()
    return cls(session, worker_pb2.DecodeRequest(req_id="r/0")), session


def event(i: int) -> worker_pb2.SessionEvent:
    return worker_pb2.SessionEvent(req_id="r/0", tokens=worker_pb2.TokenEvent(token_ids=[i]))


def kv_target() -> worker_pb2.SessionEvent:
    return worker_pb2.SessionEvent(req_id="r/0", kv_target=worker_pb2.KVTarget(handoff_id="h"))


def count_timers(loop) -> list:
    started = []
    call_at = loop.call_at

    def counting(when, cb, *args, **kw):
        started.append(when)
        return call_at(when, cb, *args, **kw)

    loop.call_at = counting
    return started


def test_a_streaming_stream_starts_one_timer_not_one_per_read():
    async def scenario():
        started = count_timers(asyncio.get_running_loop())
        stream, session = open_stream()
        got = []
        for i in range(200):
            asyncio.get_running_loop().call_soon(stream._push, event(i))
            got.append(list((await stream.read(60.0, "decode event")).tokens.token_ids))
        stream.close()
        return got, started, stream, session

    got, started, stream, session = asyncio.run(scenario())
    assert got == [[i] for i in range(200)]
    assert len(started) == 1  # the first read's; the others only moved the deadline
    # close() stops the timer and leaves the session (finished: no abort)
    assert stream._timer is None and session.left == [("r/0", False)]


def test_a_shorter_timeout_than_the_timer_starts_it_anew():
    async def scenario():
        started = count_timers(asyncio.get_running_loop())
        stream, _ = open_stream()
        asyncio.get_running_loop().call_soon(stream._push, kv_target())  # the read waits
        await stream.read(60.0, "KVTarget")
        with pytest.raises(_WorkerFailed) as e:
            await stream.read(0.05, "KV handoff", PREFILL)
        return started, e.value

    started, err = asyncio.run(scenario())
    assert len(started) == 2
    assert err.worker is PREFILL and err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert str(err) == "no KV handoff within 0.05s"


def test_silence_past_the_deadline_fails_and_blames_the_decode_server():
    async def scenario():
        loop = asyncio.get_running_loop()
        stream, _ = open_stream()
        for i in range(5):  # events every 20 ms keep a 100 ms deadline moving
            loop.call_later(0.02, stream._push, event(i))
            await stream.read(0.1, "decode event")
        t0 = loop.time()
        with pytest.raises(_WorkerFailed) as e:
            await stream.read(0.1, "decode event")
        return e.value, loop.time() - t0

    err, waited = asyncio.run(scenario())
    assert err.worker is DECODE and str(err) == "no decode event within 0.1s"
    assert 0.09 <= waited < 1.0


def test_no_deadline_runs_between_reads():
    async def scenario():
        stream, _ = open_stream()
        asyncio.get_running_loop().call_soon(stream._push, kv_target())
        await stream.read(0.05, "KVTarget")
        await asyncio.sleep(0.15)  # the Prefill call: longer than the last read's timeout
        asyncio.get_running_loop().call_later(0.02, stream._push, event(7))
        return await stream.read(0.05, "KV handoff", PREFILL)

    assert list(asyncio.run(scenario()).tokens.token_ids) == [7]


def test_a_cancel_from_outside_while_reading_stays_a_cancel():
    async def scenario():
        stream, _ = open_stream()
        task = asyncio.create_task(stream.read(60.0, "decode event"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_a_cancel_from_outside_at_the_deadline_stays_a_cancel():
    class LeftAsItExpired(_SessionStream):
        __slots__ = ("task",)

        def _expire(self) -> None:
            super()._expire()
            self.task.cancel()  # the client left as it expired

    async def scenario():
        stream, _ = open_stream(LeftAsItExpired)
        task = stream.task = asyncio.create_task(stream.read(0.05, "decode event"))
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_a_lagging_session_choice_reads_its_queued_token_events_as_one():
    import collections

    from protos import common_pb2, worker_pb2
    from router.decode_stream import _merge_tokens

    def ev(tokens, finish=0, stop=None):
        e = worker_pb2.SessionEvent(req_id="r")
        e.tokens.token_ids.extend(tokens)
        for t in tokens:
            e.tokens.logprobs.add(token_id=t, logprob=-0.1 * t)
        e.tokens.num_cached_tokens = 16
        if finish:
            e.tokens.finish_reason = finish
        if stop is not None:
            e.tokens.stop_token_id = stop
        return e

    first = ev([1])
    queued = collections.deque(
        [ev([2, 3]), ev([4], common_pb2.FINISH_REASON_STOP, stop=4), ev([99])]
    )
    _merge_tokens(first.tokens, queued)
    t = first.tokens
    assert list(t.token_ids) == [1, 2, 3, 4]
    assert [lp.token_id for lp in t.logprobs] == [1, 2, 3, 4]
    assert t.finish_reason == common_pb2.FINISH_REASON_STOP and t.stop_token_id == 4
    assert t.num_cached_tokens == 16
    assert [list(e.tokens.token_ids) for e in queued] == [[99]]  # not past the finish
