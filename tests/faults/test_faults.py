"""Faults injected into a real stack (2 prefill + 2 decode servers, router, gateway, all on
127.0.0.1): kill -9 of a prefill server during prefill and of a decode server mid-stream, a
KV stream that stalls half-way, and 200 requests cancelled at random points. Every request
must complete correctly (same tokens as a run without the fault) or end as its client asked,
and afterwards every server's KV blocks must all be free again. docs/reliability.md keeps
the figures.

Order matters only for cost: the storm and the stall run on the intact stack, the kills last
(a killed decode server is restarted, since the seeded migration needs two again).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import NamedTuple

import httpx
import pytest
from fault_stack import MODEL_NAME, NUM_BLOCKS, FaultStack

from router.client import AsyncTandemClient, TandemError
from tandem.loader.default_model import resolve_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

STALL_REQUEST_ID = "kv-stall"  # choice 0 of it, first attempt: its KV push stalls
LEASE_S = 60.0  # the decode servers' default --kv-lease-seconds


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = FaultStack(
        resolve_model_dir(None),
        tmp_path_factory.mktemp("fault_logs"),
        num_prefill=2,
        num_decode=2,
        stall_kv_req_id=f"{STALL_REQUEST_ID}-0",
    )
    yield s
    s.stop()


class Result(NamedTuple):
    token_ids: list[int]
    text: str
    finish_reason: str | None
    ttft_s: float  # what the client saw of the fault: a later first token ...
    max_gap_s: float  # ... or a longer pause between two chunks

    def same_output(self, other: Result) -> bool:
        return self[:3] == other[:3]


async def _generate(router: str, prompt, on_tokens=None, **kwargs) -> Result:
    ids, text, reason = [], "", None
    t0 = last = time.monotonic()
    ttft, max_gap = None, 0.0
    async with AsyncTandemClient(router, timeout=180) as client:
        async for ch in client.generate(prompt, **kwargs):
            now = time.monotonic()
            if ttft is None:
                ttft = now - t0
            else:
                max_gap = max(max_gap, now - last)
            last = now
            ids += ch.token_ids
            text += ch.text
            reason = ch.finish_reason or reason
            if on_tokens is not None:
                on_tokens(len(ids))
    return Result(ids, text, reason, ttft or 0.0, max_gap)


def _assert_no_leaks(stack: FaultStack) -> None:
    seen = stack.wait_idle()
    for address, s in seen.items():
        assert (s.num_running, s.num_waiting, s.num_active_handoffs) == (0, 0, 0), (address, s)
        assert s.num_free_blocks == s.num_total_blocks == NUM_BLOCKS, (address, s)


def _long_prompt(topic: str, num_items: int) -> str:
    lines = [f"Notes on {topic}."]
    for i in range(num_items):
        lines.append(
            f"Item {i}: the {topic} measurement number {i * 7 % 13} was recorded as {i * 31 % 97}."
        )
    return "\n".join(lines) + "\nSummary:"


# -- cancel storm -------------------------------------------------------------------------------

STORM_REQUESTS = 200
STORM_CONCURRENCY = 12
CANCEL_KINDS = ("complete", "disconnect", "abort_rpc", "deadline", "http_disconnect")
WORDS = "alpha beta gamma delta river mountain cloud paper engine window garden".split()


def _storm_prompt(rng: random.Random) -> str:
    if rng.random() < 0.2:  # a few several-block prompts: multi-chunk KV pushes
        return _long_prompt(rng.choice(WORDS), rng.randint(6, 14))
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))


async def _storm_one(stack: FaultStack, i: int, rng: random.Random) -> str:
    """One request of the storm, ended the way its kind says (cut 0: before any token, i.e.
    during prefill or the handoff); returns what happened."""
    kind = rng.choice(CANCEL_KINDS)
    prompt = _storm_prompt(rng)
    max_tokens = rng.randint(2, 24)
    cut = rng.randint(0, max_tokens)  # chunks to read before cancelling
    rid = f"storm-{i}"
    sampling = dict(max_tokens=max_tokens, temperature=rng.choice([0.0, 0.8]), seed=i)
    if kind == "http_disconnect":
        await _http_disconnect(stack, prompt, cut, sampling)
        return kind
    timeout = rng.uniform(0.05, 2.0) if kind == "deadline" else 180
    async with AsyncTandemClient(stack.router, timeout=timeout) as client:
        state = {"n": 0, "reason": None}

        async def consume():
            async for ch in client.generate(prompt, request_id=rid, **sampling):
                state["n"] += 1
                state["reason"] = ch.finish_reason or state["reason"]
                if kind == "disconnect" and state["n"] >= cut:
                    return  # the client goes away mid-stream
                if kind == "abort_rpc" and state["n"] == max(cut, 1):
                    await client.abort(rid)  # False when it had just finished

        task = asyncio.create_task(consume())
        if kind == "disconnect" and cut == 0:
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return kind
        except TandemError as e:
            assert kind == "deadline" and e.code == "DEADLINE_EXCEEDED", e
            return "deadline_hit"
    if kind == "complete":
        assert state["reason"] in ("stop", "length"), state
    if kind == "abort_rpc" and state["reason"] == "abort":
        return "aborted"
    return kind


async def _http_disconnect(stack: FaultStack, prompt: str, cut: int, sampling: dict) -> None:
    body = {"model": MODEL_NAME, "prompt": prompt, "stream": True, **sampling}
    async with httpx.AsyncClient(timeout=120) as http:
        async with http.stream("POST", stack.base_url + "/completions", json=body) as resp:
            assert resp.status_code == 200, await resp.aread()
            n = 0
            async for line in resp.aiter_lines():
                if n >= cut:
                    break  # leaving the block closes the connection mid-stream
                if line.startswith("data: ") and line != "data: [DONE]":
                    json.loads(line[6:])
                    n += 1


def test_cancel_storm_leaves_every_block_free(stack):
    idle = {a: stack.stats(a) for a in stack.workers}
    assert all(s.num_free_blocks == s.num_total_blocks for s in idle.values()), idle
    rng = random.Random(7)
    seeds = [rng.random() for _ in range(STORM_REQUESTS)]

    async def main():
        sem = asyncio.Semaphore(STORM_CONCURRENCY)

        async def one(i):
            async with sem:
                return await asyncio.wait_for(
                    _storm_one(stack, i, random.Random(seeds[i])), timeout=180
                )

        return await asyncio.gather(*(one(i) for i in range(STORM_REQUESTS)))

    t0 = time.monotonic()
    outcomes = asyncio.run(main())
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    print(f"storm: {len(outcomes)} requests in {time.monotonic() - t0:.1f}s: {counts}")
    assert len(outcomes) == STORM_REQUESTS
    _assert_no_leaks(stack)


# -- stalled KV stream ----------------------------------------------------------------------------


def test_stalled_kv_stream_hits_its_deadline_and_is_retried(stack):
    prompt = _long_prompt("harbour", 12)  # 227 tokens, 15 blocks: three KV slabs
    kw = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    t0 = time.monotonic()
    faulty = asyncio.run(_generate(stack.router, prompt, request_id=STALL_REQUEST_ID, **kw))
    elapsed = time.monotonic() - t0
    clean = asyncio.run(_generate(stack.router, prompt, **kw))
    print(
        f"kv stall: request took {elapsed:.1f}s, longest pause {faulty.max_gap_s:.1f}s"
        f" (no fault: {clean.max_gap_s:.2f}s)"
    )
    assert faulty.same_output(clean) and faulty.finish_reason == "length"
    assert elapsed < LEASE_S / 3, (
        f"took {elapsed:.1f}s: waited for the lease, not the stall deadline"
    )
    assert any(
        f"{STALL_REQUEST_ID}-0 role=prefill" in line and "stalled" in line
        for line in stack.log("router").splitlines()
    ), "the router did not see the stall as the prefill server's failure"
    assert "fault=kv_stall" in "".join(stack.log(a) for a in stack.prefill)
    _assert_no_leaks(stack)


# -- decode server killed mid-stream ---------------------------------------------------------------


def _kill_decode_mid_stream(stack: FaultStack, prompt: str, after: int, **kw) -> tuple[Result, str]:
    killed: list[str] = []

    def on_tokens(n: int) -> None:
        if n >= after and not killed:
            busy = [a for a in stack.decode if stack.stats(a).num_running > 0]
            assert len(busy) == 1, busy
            stack.kill(busy[0])
            killed.append(busy[0])

    result = asyncio.run(_generate(stack.router, prompt, on_tokens, **kw))
    assert killed, "the stream ended before the kill"
    return result, killed[0]


@pytest.mark.parametrize(
    "sampling",
    [
        dict(temperature=0.0),
        # seeds are keyed by output index, penalties count earlier outputs: both must carry
        # across the migration
        dict(temperature=0.9, top_p=0.95, seed=1234, frequency_penalty=0.4),
    ],
    ids=["greedy", "seeded"],
)
def test_decode_killed_mid_stream_migrates_without_losing_tokens(stack, sampling):
    prompt = "Write a short story about a lighthouse keeper and a storm."
    kw = dict(max_tokens=40, ignore_eos=True, **sampling)
    faulty, dead = _kill_decode_mid_stream(stack, prompt, after=10, **kw)
    clean = asyncio.run(_generate(stack.router, prompt, **kw))
    print(
        f"decode kill ({list(sampling)}): longest pause {faulty.max_gap_s:.2f}s"
        f" (no fault: {clean.max_gap_s:.2f}s)"
    )
    assert faulty.token_ids == clean.token_ids
    assert faulty.text == clean.text and faulty.finish_reason == "length"
    assert "role=decode" in stack.log("router")
    _assert_no_leaks(stack)
    stack.restart(dead)


# -- prefill server killed during prefill --------------------------------------------------------


def test_prefill_killed_during_prefill_is_retried(stack):
    prompt = _long_prompt("glacier", 110)  # 2,110 tokens: nine 256-token steps

    async def main():
        task = asyncio.create_task(
            _generate(stack.router, prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
        )
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and not task.done() and time.monotonic() < deadline:
            for a in stack.prefill:
                s = await asyncio.to_thread(stack.stats, a)
                if s.in_flight_prompt_tokens > 0:
                    victim = a
                    break
            await asyncio.sleep(0.05)
        assert victim is not None, "no prefill server was seen prefilling"
        stack.kill(victim)
        return await task, victim

    faulty, victim = asyncio.run(main())
    clean = asyncio.run(
        _generate(stack.router, prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
    )
    # the same length, not cached anywhere: what a cold prefill costs without the fault
    cold = asyncio.run(
        _generate(stack.router, _long_prompt("tundra", 110), max_tokens=1, temperature=0.0)
    )
    print(
        f"prefill kill: first token after {faulty.ttft_s:.1f}s"
        f" (no fault: {cold.ttft_s:.1f}s cold, {clean.ttft_s:.1f}s cached)"
    )
    assert faulty.same_output(clean) and faulty.finish_reason == "length"
    assert f"worker={victim}" in stack.log("router")
    _assert_no_leaks(stack)


def test_no_prefill_server_left_the_decode_server_prefills_locally(stack):
    """Runs after the prefill kill: with the last prefill server dead too, every choice
    falls back to a local prefill on a decode server."""
    prompt = "List three facts about octopuses."
    kw = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    clean = asyncio.run(_generate(stack.router, prompt, **kw))
    for a in stack.prefill:
        if stack.procs[a].poll() is None:
            stack.kill(a)
    local = asyncio.run(_generate(stack.router, prompt, **kw))
    assert local.same_output(clean) and local.finish_reason == "length"
    _assert_no_leaks(stack)
