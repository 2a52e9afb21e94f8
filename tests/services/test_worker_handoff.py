"""Prefill and decode servicers on an in-process grpc.aio server (127.0.0.1), real SmolLM2
engines on both sides: the router's handoff done by hand, checked against LLM.generate."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

import grpc
import pytest

from decode_service.servicer import KVOffer
from kvtransfer.base import DecodeKV
from kvtransfer.pool import ShmPoolFile
from kvtransfer.wire import pool_to_proto
from protos import common_pb2, worker_pb2, worker_pb2_grpc
from tandem.config import EngineConfig
from tandem.engine import LLMEngine
from tandem.records import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))  # worker_pair
from worker_pair import serve_worker_pair  # noqa: E402

PROMPTS = [
    [1, 9690, 314, 260, 3575, 282, 4649],
    list(range(100, 180)),  # several blocks, partial last block
    list(range(500, 532)),  # exactly two blocks
]


@pytest.fixture(scope="module")
def engines():
    cfg = EngineConfig(num_blocks=256, max_num_batched_tokens=48)  # 48: prompts prefill in chunks
    prefill = LLMEngine(cfg)
    decode = LLMEngine(cfg)
    yield prefill, decode


def _reference(engine: LLMEngine, prompt: list[int], max_tokens: int) -> list[int]:
    req = engine.add_request(
        "ref", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    )
    while engine.has_unfinished():
        engine.step()
    return req.output_token_ids


@pytest.fixture(scope="module")
def shm_decode_engine():
    """A decode engine whose KV pool lives in a /dev/shm pool file (the shm transport)."""
    pool_file = ShmPoolFile()
    engine = LLMEngine(
        EngineConfig(num_blocks=256, max_num_batched_tokens=48, kv_cache_file=pool_file.path)
    )
    yield engine, pool_file
    pool_file.close()


def _start(
    prefill_engine, decode_engine, pool_file: ShmPoolFile | None = None, shown_path: str = ""
):
    """The two workers on one in-process server; with pool_file, the decode side offers its
    shm pool (shown to the prefill side at shown_path, when given) before grpc."""
    if pool_file is None:  # a decode server that offers grpc only
        return serve_worker_pair(prefill_engine, decode_engine, lease_s=5)
    kv_cache = decode_engine.kv_cache
    export = pool_file.export(kv_cache)
    shown = dataclasses.replace(export, shm_path=shown_path or export.shm_path)
    offer = KVOffer(["shm", "grpc"], pool_to_proto(shown))
    kv = DecodeKV(kv_cache, tuple(kv_cache.shape), export=export)
    return serve_worker_pair(prefill_engine, decode_engine, offer, kv, lease_s=5)


class _Session:
    """The client side of one Decode.Session call: requests go up through a queue, events
    are collected per req_id, messages counted."""

    def __init__(self, channel) -> None:
        self.up: asyncio.Queue = asyncio.Queue()
        self.call = worker_pb2_grpc.DecodeStub(channel).Session(self._requests())
        self.events: dict[str, list] = {}
        self.num_messages = 0

    async def _requests(self):
        while (msg := await self.up.get()) is not None:
            yield msg

    def generate(self, req_id, prompt, max_tokens, local=True, **sampling):
        sampling = common_pb2.SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True, **sampling
        )
        request = worker_pb2.DecodeRequest(
            req_id=req_id, prompt_token_ids=prompt, sampling=sampling, prefill_locally=local
        )
        self.up.put_nowait(worker_pb2.SessionRequest(generate=request))

    def abort(self, req_id):
        self.up.put_nowait(worker_pb2.SessionRequest(abort=worker_pb2.AbortRequest(req_id=req_id)))

    async def read_until(self, done) -> None:
        """Read messages until done(events) holds."""
        while not done(self.events):
            msg = await asyncio.wait_for(self.call.read(), 60)
            assert msg is not grpc.aio.EOF
            self.num_messages += 1
            for ev in msg.events:
                self.events.setdefault(ev.req_id, []).append(ev)

    def tokens(self, req_id) -> list[int]:
        return [t for ev in self.events.get(req_id, []) for t in ev.tokens.token_ids]


def _ended(ev) -> bool:
    return ev.WhichOneof("event") == "error" or ev.tokens.finish_reason != 0


def _all_ended(req_ids):
    return lambda events: all(events.get(r) and _ended(events[r][-1]) for r in req_ids)


async def _handoff(channel, req_id, prompt, max_tokens):
    """The router's remote prefill by hand, on a Session of its own: the request's KVTarget,
    Prefill into it, then the decode server's tokens until the session ends."""
    prefill = worker_pb2_grpc.PrefillStub(channel)
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    s = _Session(channel)
    s.generate(req_id, prompt, max_tokens, local=False)
    await s.read_until(lambda events: req_id in events)
    first = s.events[req_id][0]
    assert first.WhichOneof("event") == "kv_target"
    resp = await prefill.Prefill(
        worker_pb2.PrefillRequest(
            req_id=req_id, prompt_token_ids=prompt, sampling=sampling, kv_target=first.kv_target
        )
    )
    await s.read_until(_all_ended([req_id]))
    s.up.put_nowait(None)  # half-close: the call ends once the request has ended there
    assert await asyncio.wait_for(s.call.read(), 30) is grpc.aio.EOF
    tokens = [resp.token_id] + s.tokens(req_id)
    for ev in s.events[req_id][1:]:
        assert ev.WhichOneof("event") == "tokens"
        if ev.tokens.finish_reason:
            assert ev.tokens.finish_reason == common_pb2.FINISH_REASON_LENGTH
    return tokens, first.kv_target


def test_remote_prefill_handoff_matches_local_generation(engines):
    prefill_engine, decode_engine = engines
    want = [_reference(prefill_engine, p, 12) for p in PROMPTS]
    prefill_engine.block_manager.reset_prefix_cache()

    async def main():
        async with _start(prefill_engine, decode_engine) as channel:
            results = await asyncio.gather(
                *(_handoff(channel, f"r{i}", p, 12) for i, p in enumerate(PROMPTS))
            )
            # same prompt again: the decode side reuses its own cached prefix blocks
            again, target = await _handoff(channel, "again", PROMPTS[1], 12)
            stats = await worker_pb2_grpc.DecodeStub(channel).Stats(worker_pb2.StatsRequest())
        return results, again, target, stats

    results, again, target, stats = asyncio.run(main())
    assert [tokens for tokens, _ in results] == want
    assert again == want[1]
    # full blocks, less the one holding the last prompt token (always recomputed)
    assert target.num_cached_tokens == ((len(PROMPTS[1]) - 1) // 16) * 16
    assert stats.num_free_blocks == stats.num_total_blocks  # nothing leaked
    assert dict(stats.num_kv_handoffs) == {"grpc": len(PROMPTS) + 1}
    assert prefill_engine.block_manager.num_free_blocks == prefill_engine.block_manager.num_blocks


def test_shm_handoff_matches_local_generation(engines, shm_decode_engine):
    """Same handoffs, the KV written by the prefill servicer straight into the decode pool
    file; Stats counts them by transport on both sides."""
    prefill_engine, _ = engines
    decode_engine, pool_file = shm_decode_engine
    want = [_reference(prefill_engine, p, 12) for p in PROMPTS]
    prefill_engine.block_manager.reset_prefix_cache()

    async def main():
        async with _start(prefill_engine, decode_engine, pool_file) as channel:
            results = await asyncio.gather(
                *(_handoff(channel, f"s{i}", p, 12) for i, p in enumerate(PROMPTS))
            )
            stats = [
                await stub(channel).Stats(worker_pb2.StatsRequest())
                for stub in (worker_pb2_grpc.DecodeStub, worker_pb2_grpc.PrefillStub)
            ]
        return results, stats

    results, (decode_stats, prefill_stats) = asyncio.run(main())
    assert [tokens for tokens, _ in results] == want
    assert all(t.transports == ["shm", "grpc"] and t.pool.shm_path for _, t in results)
    assert {t.transport for _, t in results} == {"grpc"}  # what an older sender reads
    assert dict(decode_stats.num_kv_handoffs) == {"shm": len(PROMPTS)}
    assert dict(prefill_stats.num_kv_handoffs) == {"shm": len(PROMPTS)}
    assert decode_stats.num_free_blocks == decode_stats.num_total_blocks
    assert prefill_engine.block_manager.num_free_blocks == prefill_engine.block_manager.num_blocks


def test_auto_falls_back_to_grpc_when_the_pool_cannot_be_opened(engines, shm_decode_engine):
    """A pool offered but not visible to the sender (another mount namespace's /dev/shm):
    auto mode hands the KV over through grpc instead."""
    prefill_engine, _ = engines
    decode_engine, pool_file = shm_decode_engine
    want = _reference(prefill_engine, PROMPTS[1], 6)
    prefill_engine.block_manager.reset_prefix_cache()
    decode_engine.block_manager.reset_prefix_cache()

    async def main():
        missing = pool_file.path + "-not-here"
        async with _start(prefill_engine, decode_engine, pool_file, missing) as channel:
            tokens, _ = await _handoff(channel, "fb", PROMPTS[1], 6)
            stats = await worker_pb2_grpc.DecodeStub(channel).Stats(worker_pb2.StatsRequest())
        return tokens, stats

    tokens, stats = asyncio.run(main())
    assert tokens == want
    assert dict(stats.num_kv_handoffs) == {"grpc": 1}


def test_cancelled_decode_stream_frees_reserved_blocks(engines):
    _, decode_engine = engines

    async def main():
        async with _start(*engines) as channel:
            decode = worker_pb2_grpc.DecodeStub(channel)
            s = _Session(channel)
            s.generate("c", PROMPTS[1], 8, local=False)
            await s.read_until(lambda events: "c" in events)
            first = s.events["c"][0]
            assert first.kv_target.block_ids
            s.call.cancel()
            for _ in range(100):
                await asyncio.sleep(0.02)
                stats = await decode.Stats(worker_pb2.StatsRequest())
                if stats.num_free_blocks == stats.num_total_blocks:
                    break
            return stats

    stats = asyncio.run(main())
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_active_handoffs == 0


def test_aggregated_decode_streams_every_token(engines):
    prefill_engine, decode_engine = engines
    want = _reference(prefill_engine, PROMPTS[0], 10)

    async def main():
        async with _start(*engines) as channel:
            s = _Session(channel)
            s.generate("a", PROMPTS[0], 10)
            await s.read_until(_all_ended(["a"]))
            s.up.put_nowait(None)
            return s.tokens("a")

    assert asyncio.run(main()) == want


def test_bad_kv_target_is_invalid_argument(engines):
    async def main():
        async with _start(*engines) as channel:
            stub = worker_pb2_grpc.PrefillStub(channel)
            target = worker_pb2.KVTarget(
                handoff_id="x", decode_kv_address="127.0.0.1:1", block_ids=[1], block_size=8
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Prefill(
                    worker_pb2.PrefillRequest(
                        req_id="bad", prompt_token_ids=[1, 2, 3], kv_target=target
                    )
                )
            return err.value.code()

    assert asyncio.run(main()) == grpc.StatusCode.INVALID_ARGUMENT


# -- Decode.Session: many requests on one stream ------------------------------------------


async def _idle(channel, timeout=30.0) -> worker_pb2.WorkerStats:
    stub = worker_pb2_grpc.DecodeStub(channel)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        s = await stub.Stats(worker_pb2.StatsRequest())
        idle = s.num_running + s.num_waiting + s.num_active_handoffs == 0
        if (idle and s.num_free_blocks == s.num_total_blocks) or (
            asyncio.get_running_loop().time() > deadline
        ):
            return s
        await asyncio.sleep(0.05)


def test_session_streams_many_requests_batched_and_equal_to_generate(engines):
    prefill_engine, decode_engine = engines
    want = [_reference(decode_engine, p, 12) for p in PROMPTS]
    decode_engine.block_manager.reset_prefix_cache()

    async def main():
        async with _start(prefill_engine, decode_engine) as channel:
            s = _Session(channel)
            for i, p in enumerate(PROMPTS):
                s.generate(f"m{i}", p, 12)
            names = [f"m{i}" for i in range(len(PROMPTS))]
            await s.read_until(_all_ended(names))
            stats = await worker_pb2_grpc.DecodeStub(channel).Stats(worker_pb2.StatsRequest())
            s.up.put_nowait(None)  # half-close: the server ends the call, nothing is left
            end = await asyncio.wait_for(s.call.read(), 30)
            return s, names, stats, end, await s.call.code()

    s, names, stats, end, code = asyncio.run(main())
    assert [s.tokens(n) for n in names] == want
    for n, p in zip(names, PROMPTS, strict=True):
        evs = s.events[n]
        assert all(ev.WhichOneof("event") == "tokens" for ev in evs)
        assert [ev.tokens.finish_reason for ev in evs][-1] == common_pb2.FINISH_REASON_LENGTH
        assert evs[0].tokens.num_prompt_tokens == len(p)
    # one message carries the step's tokens of every request, not one message per token
    num_events = sum(len(evs) for evs in s.events.values())
    assert s.num_messages < num_events
    assert end is grpc.aio.EOF and code == grpc.StatusCode.OK


def test_session_refuses_a_bad_request_with_an_error_event_and_serves_the_others(engines):
    prefill_engine, decode_engine = engines
    want = _reference(decode_engine, PROMPTS[0], 6)
    decode_engine.block_manager.reset_prefix_cache()

    async def main():
        async with _start(prefill_engine, decode_engine) as channel:
            s = _Session(channel)
            s.generate("long", PROMPTS[1], 8_000)
            await s.read_until(lambda ev: "long" in ev)
            s.generate("bad", PROMPTS[0], 6, top_p=2.0)  # out of range: INVALID_ARGUMENT
            s.generate("long", PROMPTS[0], 6)  # its id is in use on this server
            s.generate("good", PROMPTS[0], 6)
            await s.read_until(lambda ev: _all_ended(["bad", "good"])(ev) and len(ev["long"]) > 1)
            s.up.put_nowait(worker_pb2.SessionRequest())  # neither generate nor abort
            await s.read_until(lambda ev: "" in ev)
            s.abort("long")
            s.abort("never-seen")  # unknown ids are ignored
            stats = await _idle(channel)
            return s, stats

    s, stats = asyncio.run(main())
    bad = s.events["bad"]
    assert len(bad) == 1 and bad[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "top_p" in bad[0].error.message
    # the second "long" is refused; the first one's tokens go on around that event
    dup = [ev.error for ev in s.events["long"] if ev.WhichOneof("event") == "error"]
    assert [e.code for e in dup] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert "in use" in dup[0].message
    empty = s.events[""]
    assert len(empty) == 1 and empty[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert s.tokens("good") == want
    # the aborted request's events stopped without a final one; nothing leaked
    assert not any(ev.tokens.finish_reason for ev in s.events["long"])
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks


def test_session_remote_prefill_handoff_and_abort_while_the_kv_is_awaited(engines):
    prefill_engine, decode_engine = engines
    want = _reference(prefill_engine, PROMPTS[1], 8)
    prefill_engine.block_manager.reset_prefix_cache()
    decode_engine.block_manager.reset_prefix_cache()

    async def main():
        async with _start(prefill_engine, decode_engine) as channel:
            s = _Session(channel)
            s.generate("h", PROMPTS[1], 8, local=False)
            s.generate("waits", PROMPTS[2], 8, local=False)  # its KV never comes
            await s.read_until(lambda ev: "h" in ev and "waits" in ev)
            first = s.events["h"][0]
            assert first.WhichOneof("event") == "kv_target"
            assert s.events["waits"][0].WhichOneof("event") == "kv_target"
            sampling = common_pb2.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            resp = await worker_pb2_grpc.PrefillStub(channel).Prefill(
                worker_pb2.PrefillRequest(
                    req_id="h", prompt_token_ids=PROMPTS[1], sampling=sampling,
                    kv_target=first.kv_target,
                )
            )  # fmt: skip
            await s.read_until(_all_ended(["h"]))
            s.abort("waits")  # reclaims its reserved blocks
            return resp.token_id, s, await _idle(channel)

    token0, s, stats = asyncio.run(main())
    assert [token0, *s.tokens("h")] == want
    assert len(s.events["waits"]) == 1  # the KVTarget, then nothing
    assert stats.num_active_handoffs == 0
    assert stats.num_free_blocks == stats.num_total_blocks


def test_ending_the_session_aborts_every_request_on_it(engines):
    async def main():
        async with _start(*engines) as channel:
            s = _Session(channel)
            for i, p in enumerate(PROMPTS):
                s.generate(f"e{i}", p, 10_000, local=i != 2)  # e2 waits for its KV
            await s.read_until(lambda ev: len(ev) == len(PROMPTS))
            s.call.cancel()  # the router went away
            return await _idle(channel)

    stats = asyncio.run(main())
    assert (stats.num_running, stats.num_waiting, stats.num_active_handoffs) == (0, 0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks


def test_ending_the_session_while_its_requests_are_being_admitted_leaks_nothing(engines):
    """The call ends while add_request / reserve are still queued for the engine thread:
    they run anyway, and the abort the session's end sends after them frees what they took."""

    async def main():
        async with _start(*engines) as channel:
            for round_ in range(3):
                s = _Session(channel)
                for i, p in enumerate(PROMPTS):
                    s.generate(f"x{round_}-{i}", p, 10_000, local=i != 1)
                await asyncio.sleep(0.05 * round_)  # before, during and after admission
                s.call.cancel()
            return await _idle(channel)

    stats = asyncio.run(main())
    assert (stats.num_running, stats.num_waiting, stats.num_active_handoffs) == (0, 0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks
