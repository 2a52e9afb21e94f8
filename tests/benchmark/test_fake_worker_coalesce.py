"""The fake decode server's Session: lockstep by default (the next step once the last write is
done), and with --coalesce tokens made on the engine's clock, a stream that lags getting every
step made meanwhile in one message (as the real decode server's session)."""

import asyncio

import pytest

from bench.fake_worker import FakeDecode, output_token
from protos import common_pb2, worker_pb2

pytestmark = pytest.mark.timeout(30)

PROMPT = [5, 6, 7, 8, 9]


def sampling(**kw):
    return common_pb2.SamplingParams(max_tokens=12, **kw)


class LaggingContext:
    """A servicer context whose first write returns only after lag_turns loop turns."""

    def __init__(self, lag_turns: int) -> None:
        self.lag_turns = lag_turns
        self.msgs: list[worker_pb2.SessionEvents] = []

    async def write(self, msg) -> None:
        self.msgs.append(msg)
        if len(self.msgs) == 1:
            for _ in range(self.lag_turns):  # the engine steps once per loop turn (itl 0)
                await asyncio.sleep(0)


async def messages(worker, s, lag_turns: int = 0) -> list[tuple[list[int], int]]:
    """(tokens, finish_reason of the last) per Session message, for one local request."""
    request = worker_pb2.DecodeRequest(
        req_id="l", prompt_token_ids=PROMPT, sampling=s, prefill_locally=True
    )

    async def requests():
        yield worker_pb2.SessionRequest(generate=request)
        await asyncio.Event().wait()  # the router keeps its session open

    ctx = LaggingContext(lag_turns)
    session = asyncio.ensure_future(worker.Session(requests(), ctx))
    out: list[tuple[list[int], int]] = []
    while not out or not out[-1][1]:  # the fake stops the request at its finish reason
        while len(ctx.msgs) <= len(out):
            await asyncio.sleep(0)
        evs = ctx.msgs[len(out)].events
        out.append(([t for ev in evs for t in ev.tokens.token_ids], evs[-1].tokens.finish_reason))
    session.cancel()
    return out


@pytest.mark.parametrize("s", [sampling(), sampling(stop_token_ids=[8], min_tokens=5)])
def test_lagging_stream_gets_queued_tokens_in_one_message(s):
    async def go():
        lockstep = await messages(FakeDecode("unused"), s, lag_turns=3 * 12)
        lagged = await messages(FakeDecode("unused", coalesce=True), s, lag_turns=3 * 12)
        return lockstep, lagged

    lockstep, lagged = asyncio.run(go())
    tokens = [t for toks, _ in lockstep for t in toks]
    assert all(len(toks) == 1 for toks, _ in lockstep)
    assert [t for toks, _ in lagged for t in toks] == tokens
    assert tokens == [output_token(PROMPT, i) for i in range(len(tokens))]
    assert len(lagged) == 2  # the first token, then everything made while it lagged
    assert [r for _, r in lagged[:-1]] == [common_pb2.FINISH_REASON_UNSPECIFIED]
    assert lagged[-1][1] == lockstep[-1][1] != common_pb2.FINISH_REASON_UNSPECIFIED


def test_session_steps_every_request_on_one_clock():
    """The fake's Session serves local and remote-prefill requests on one stream (--coalesce:
    on one engine clock), each write carrying several events."""
    import grpc

    from protos import worker_pb2, worker_pb2_grpc

    async def go():
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        address = f"127.0.0.1:{port}"
        worker = FakeDecode(address, coalesce=True)
        worker_pb2_grpc.add_DecodeServicer_to_server(worker, server)
        worker_pb2_grpc.add_KVTransferServicer_to_server(worker, server)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = worker_pb2_grpc.DecodeStub(ch)
                up: asyncio.Queue = asyncio.Queue()

                async def requests():
                    while (m := await up.get()) is not None:
                        yield m

                call = stub.Session(requests())
                for i in range(3):
                    req = worker_pb2.DecodeRequest(
                        req_id=f"l{i}", prompt_token_ids=PROMPT, sampling=sampling(),
                        prefill_locally=True,
                    )  # fmt: skip
                    up.put_nowait(worker_pb2.SessionRequest(generate=req))
                req = worker_pb2.DecodeRequest(
                    req_id="r", prompt_token_ids=PROMPT, sampling=sampling()
                )
                up.put_nowait(worker_pb2.SessionRequest(generate=req))
                got: dict[str, list] = {}
                msgs = 0
                while len([r for r, evs in got.items() if evs[-1].tokens.finish_reason]) < 4:
                    batch = await call.read()
                    msgs += 1
                    for ev in batch.events:
                        got.setdefault(ev.req_id, []).append(ev)
                        if ev.WhichOneof("event") == "kv_target":
                            hid = ev.kv_target.handoff_id
                            transfer = [
                                worker_pb2.KVTransferMessage(
                                    handoff_id=hid, begin=worker_pb2.KVBegin(num_slabs=1)
                                ),
                                worker_pb2.KVTransferMessage(
                                    handoff_id=hid,
                                    done=worker_pb2.KVDone(first_token_id=output_token(PROMPT, 0)),
                                ),
                            ]
                            kv = worker_pb2_grpc.KVTransferStub(ch)
                            replies = [r.reply async for r in kv.Transfer(iter(transfer))]
                            assert replies[-1] == worker_pb2.KV_REPLY_COMPLETE
                up.put_nowait(None)
                call.cancel()
        finally:
            await server.stop(None)
        return got, msgs

    got, msgs = asyncio.run(go())
    want = [output_token(PROMPT, i) for i in range(12)]
    for i in range(3):
        assert [t for ev in got[f"l{i}"] for t in ev.tokens.token_ids] == want
    assert got["r"][0].WhichOneof("event") == "kv_target"
    assert [t for ev in got["r"][1:] for t in ev.tokens.token_ids] == want[1:]
    assert msgs < sum(len(evs) for evs in got.values())  # one write carries several events
