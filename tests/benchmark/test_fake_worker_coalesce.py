"""The fake decode server's --coalesce mode: tokens made on the engine's clock, and a stream
that lags gets every queued token in one event (as the real decode server's `_drain`)."""

import asyncio

import pytest

from bench.fake_worker import FakeDecode, output_token
from protos import common_pb2

pytestmark = pytest.mark.timeout(30)

PROMPT = [5, 6, 7, 8, 9]


def sampling(**kw):
    return common_pb2.SamplingParams(max_tokens=12, **kw)


async def events(gen, lag_turns: int = 0) -> list[tuple[list[int], int]]:
    out = [await anext(gen)]
    for _ in range(lag_turns):  # the engine makes one token per loop turn (itl 0)
        await asyncio.sleep(0)
    while not out[-1][1]:  # the servicer stops at the finish reason
        out.append(await anext(gen))
    await gen.aclose()
    return out


@pytest.mark.parametrize("s", [sampling(), sampling(stop_token_ids=[8], min_tokens=5)])
def test_lagging_stream_gets_queued_tokens_in_one_event(s):
    async def go():
        worker = FakeDecode("unused", coalesce=True)
        lockstep = await events(FakeDecode("unused")._lockstep(PROMPT, s, 0))
        lagged = await events(worker._steps(PROMPT, s, 0), lag_turns=3 * 12)
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
    """--session: the fake's Session serves local and remote-prefill requests on one stream,
    tokens as in Generate, and says so in Stats (which makes the router use it)."""
    import grpc

    from protos import worker_pb2, worker_pb2_grpc

    async def go():
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        address = f"127.0.0.1:{port}"
        worker = FakeDecode(address, session=True)
        worker_pb2_grpc.add_DecodeServicer_to_server(worker, server)
        worker_pb2_grpc.add_KVTransferServicer_to_server(worker, server)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = worker_pb2_grpc.DecodeStub(ch)
                stats = await stub.Stats(worker_pb2.StatsRequest())
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
                            chunk = worker_pb2.KVChunk(
                                handoff_id=ev.kv_target.handoff_id, last=True,
                                first_token_id=output_token(PROMPT, 0),
                            )  # fmt: skip
                            kv = worker_pb2_grpc.KVTransferStub(ch)
                            assert (await kv.Push(iter([chunk]))).ok
                up.put_nowait(None)
                call.cancel()
        finally:
            await server.stop(None)
        return stats, got, msgs

    stats, got, msgs = asyncio.run(go())
    assert stats.decode_session
    want = [output_token(PROMPT, i) for i in range(12)]
    for i in range(3):
        assert [t for ev in got[f"l{i}"] for t in ev.tokens.token_ids] == want
    assert got["r"][0].WhichOneof("event") == "kv_target"
    assert [t for ev in got["r"][1:] for t in ev.tokens.token_ids] == want[1:]
    assert msgs < sum(len(evs) for evs in got.values())  # one write carries several events
