"""Conditional disaggregation over in-process fake workers: a prompt whose part not cached on
the decode server is shorter than --max-local-prefill-length is prefilled there (no prefill
server call, no KV handoff); longer ones go remote; the decisions are a Prometheus counter."""

import asyncio

import grpc
import pytest
from router_fakes import BLOCK_SIZE, served_by, start_stack

from protos import common_pb2, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.timeout(30)

LIMIT = 8  # tokens
SHORT = list(range(10, 15))  # 5 tokens, nothing cached: 5 < 8, local
LONG = list(range(20, 40))  # 20 tokens, 5 full blocks: remote the first time


async def _generate(stack, ids: list[int]) -> list:
    async with grpc.aio.insecure_channel(stack.address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        req = router_pb2.GenerateRequest(
            token_ids=router_pb2.TokenIds(ids=ids),
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
        )
        return [c async for c in stub.Generate(req)]


def _decisions(stack) -> dict[str, float]:
    registry = stack.router.engine.metrics.registry
    return {
        d: registry.get_sample_value(
            "tandem:prefill_decisions_total", {"model_name": "tiny", "decision": d}
        )
        for d in ("local", "remote")
    }


def test_short_uncached_part_is_prefilled_on_the_decode_server(model_dir):
    assert BLOCK_SIZE == 4  # the arithmetic below

    async def scenario():
        stack = await start_stack(model_dir, [5, 6, 7], max_local_prefill_length=LIMIT)
        try:
            out = []
            # short: local; long: remote; the long one again: the decode server now holds its
            # 5 full blocks, 1 token left to compute (the last is always recomputed): local
            for ids in (SHORT, LONG, LONG):
                out.append(await _generate(stack, ids))
            return stack, out, _decisions(stack)
        finally:
            await stack.stop()

    stack, out, decisions = asyncio.run(scenario())
    assert [[t for c in chunks for t in c.token_ids] for chunks in out] == [[5, 6, 7]] * 3
    assert [served_by(stack.prefills, chunks[-1].request_id) for chunks in out] == [
        "",
        stack.prefills[0].address,
        "",
    ]
    assert len(stack.prefills[0].state.requests) == 1  # only the first LONG went remote
    assert len(stack.decodes[0].state.requests) == 3
    assert decisions == {"local": 2.0, "remote": 1.0}


def test_zero_means_always_remote(model_dir):
    async def scenario():
        stack = await start_stack(model_dir, [5, 6, 7])  # default 0
        try:
            for ids in (SHORT, SHORT):
                await _generate(stack, ids)
            return stack, _decisions(stack)
        finally:
            await stack.stop()

    stack, decisions = asyncio.run(scenario())
    assert len(stack.prefills[0].state.requests) == 2
    assert decisions == {"local": 0.0, "remote": 2.0}
