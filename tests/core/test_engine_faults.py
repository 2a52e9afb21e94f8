"""Engine-loop isolation (AsyncEngine + tandem/recovery.py) on a tiny random model, CPU.

A request whose processing raises fails alone ("error", blocks freed) while the others of its
step go on with the same tokens; a step failure that names no request fails that step's
requests and the loop goes on; three failed steps in a row, or a device error, kill the
engine: every stream and call gets EngineDeadError and wait_dead() returns.

The faults are injected: a request's settings corrupted after admission (what the checks at
admission exist to prevent, standing for a bug that lets a bad value through), and the
runner's launch replaced by one that raises (standing for a failing forward).
"""

from __future__ import annotations

import asyncio

import pytest
from core_helpers import greedy, save_tiny_model

from tandem.async_engine import AsyncEngine
from tandem.config import EngineConfig
from tandem.engine import LLMEngine
from tandem.engine_records import EngineDeadError

PROMPT_A = [3, 17, 42, 99, 7, 11, 250, 8, 64, 5, 31]
PROMPT_B = [9, 8, 7, 6, 5, 4]
NUM_OUT = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model("llama", path)
    return path


def _engine(model_dir) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(model_dir), dtype="float32", device="cpu", kernel_backend="torch",
            block_size=4, num_blocks=64, max_num_batched_tokens=64, max_model_len=256,
        )
    )  # fmt: skip


def _run(llm: LLMEngine, body):
    engine = AsyncEngine(llm)
    try:
        return asyncio.run(asyncio.wait_for(body(engine), 60))
    finally:
        engine.shutdown()


async def _collect(stream) -> tuple[list[int], str | None, str]:
    tokens, last = [], None
    try:
        async for out in stream:
            tokens += out.new_token_ids
            last = out
    finally:
        await stream.aclose()
    return tokens, last.finish_reason, last.error


def _reference(llm: LLMEngine) -> list[int]:
    req = llm.add_request("ref", PROMPT_A, greedy(NUM_OUT))
    while llm.has_unfinished():
        llm.step()
    return req.output_token_ids


def test_a_request_whose_processing_raises_fails_alone(model_dir):
    llm = _engine(model_dir)
    want = _reference(llm)

    async def body(engine: AsyncEngine):
        a = await engine.open_stream("a", PROMPT_A, greedy(NUM_OUT))
        b = await engine.open_stream("b", PROMPT_B, greedy(NUM_OUT, logit_bias={5: 1.0}))

        def corrupt() -> None:  # a token id past the vocabulary: an IndexError in the sampler
            llm.requests["b"].params.logit_bias[10**6] = 1.0

        await engine.call(corrupt)
        got_a, got_b = await asyncio.gather(_collect(a), _collect(b))
        # a later request is served as usual
        after = await _collect(await engine.open_stream("c", PROMPT_A, greedy(NUM_OUT)))
        return got_a, got_b, after, await engine.call(llm.stats)

    (a_tokens, a_reason, _), (_, b_reason, b_error), after, stats = _run(llm, body)
    assert b_reason == "error" and "IndexError" in b_error, b_error
    assert (a_tokens, a_reason) == (want, "length")
    assert after[:2] == (want, "length")
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_running == stats.num_waiting == 0
    assert not llm.requests


def test_a_step_failure_naming_no_request_fails_that_steps_requests(model_dir):
    llm = _engine(model_dir)
    want = _reference(llm)
    launch = llm.runner.launch
    fail_next = [True]

    def failing_once(*args, **kwargs):
        if fail_next[0]:
            fail_next[0] = False
            raise RuntimeError("injected forward failure")
        return launch(*args, **kwargs)

    async def body(engine: AsyncEngine):
        llm.runner.launch = failing_once
        failed = await _collect(await engine.open_stream("x", PROMPT_B, greedy(NUM_OUT)))
        ok = await _collect(await engine.open_stream("y", PROMPT_A, greedy(NUM_OUT)))
        return failed, ok, await engine.call(llm.stats), engine.dead

    failed, ok, stats, dead = _run(llm, body)
    assert failed[1] == "error" and "injected forward failure" in failed[2]
    assert ok[:2] == (want, "length")
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not dead


@pytest.mark.parametrize(
    ("message", "num_survived"),
    [("injected forward failure", 2), ("CUDA error: an illegal memory access (injected)", 0)],
)
def test_an_engine_that_cannot_go_on_is_dead(model_dir, message, num_survived):
    """Three failed steps in a row (two requests fail alone first), or a device error at
    once: streams, calls and wait_dead() all learn it."""
    llm = _engine(model_dir)

    def broken(*args, **kwargs):
        raise RuntimeError(message)

    async def body(engine: AsyncEngine):
        llm.runner.launch = broken
        dead_waiter = asyncio.ensure_future(engine.wait_dead())
        reasons = []
        for i in range(3):
            try:
                got = await _collect(await engine.open_stream(f"r{i}", PROMPT_B, greedy(4)))
            except EngineDeadError:
                break
            reasons.append(got[1])
        error = await asyncio.wait_for(dead_waiter, 10)
        with pytest.raises(EngineDeadError):
            await engine.call(llm.stats)
        return reasons, error

    reasons, error = _run(llm, body)
    assert reasons == ["error"] * num_survived
    assert message in str(error)
