"""Routing policies, registry, errors, and the other public RPCs."""

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from router_fakes import BLOCK_SIZE, served_by, start_fake, start_stack

from protos import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.timeout(30)

PREFIX = list(range(100, 140))  # 40 shared tokens = 10 blocks of 4


def req(ids, max_tokens=2):
    return router_pb2.GenerateRequest(
        token_ids=router_pb2.TokenIds(ids=ids),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )


async def prefill_workers_used(policy, kv_events=True, num=4):
    stack = await start_stack(
        MODEL_DIR[0], [300, 301], num_prefill=2, policy=policy, kv_events=kv_events
    )
    try:
        used = []
        async with grpc.aio.insecure_channel(stack.address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            for i in range(num):
                chunks = [c async for c in stub.Generate(req(PREFIX + [200 + i]))]
                used.append(served_by(stack.prefills, chunks[-1].request_id))
                await asyncio.sleep(0.05)  # let the KV events reach the router
        hits = [p.servicer.hits for p in stack.prefills]
        return used, hits, [p.address for p in stack.prefills]
    finally:
        await stack.stop()


MODEL_DIR = []


@pytest.fixture(autouse=True)
def _model(model_dir):
    MODEL_DIR[:] = [model_dir]


@pytest.mark.parametrize("kv_events", [True, False], ids=["exact", "approximate"])
def test_prefix_policy_sticks_to_the_server_holding_the_blocks(kv_events):
    used, hits, _ = asyncio.run(prefill_workers_used("prefix", kv_events))
    assert len(set(used)) == 1
    assert sum(hits) == 3 * (len(PREFIX) // BLOCK_SIZE) * BLOCK_SIZE


def test_round_robin_alternates():
    used, hits, addrs = asyncio.run(prefill_workers_used("round_robin"))
    assert used[0] != used[1] and used[0] == used[2] and used[1] == used[3]
    assert set(used) == set(addrs)


def test_prefix_policy_follows_reported_blocks():
    # Only the second server reported the prefix blocks: the first request goes there.
    async def scenario():
        stack = await start_stack(MODEL_DIR[0], [300, 301], num_prefill=2, policy="prefix")
        try:
            from tandem.block_hash import hash_prompt_blocks

            target = stack.prefills[1]
            target.servicer.cached.update(hash_prompt_blocks(PREFIX, BLOCK_SIZE))
            for q in target.servicer.event_queues:
                q.put_nowait(
                    worker_pb2.KVEventBatch(
                        stored_block_hashes=hash_prompt_blocks(PREFIX, BLOCK_SIZE)
                    )
                )
            await asyncio.sleep(0.1)
            used = []
            async with grpc.aio.insecure_channel(stack.address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                for i in range(3):
                    chunks = [c async for c in stub.Generate(req(PREFIX + [250 + i]))]
                    used.append(served_by(stack.prefills, chunks[-1].request_id))
            return used, target.address
        finally:
            await stack.stop()

    used, target = asyncio.run(scenario())
    assert used == [target] * 3


def test_least_load_spreads_concurrent_requests():
    async def scenario():
        stack = await start_stack(MODEL_DIR[0], [300, 301], num_prefill=2, policy="least_load")
        for p in stack.prefills:
            p.servicer.prefill_delay_s = 0.2
        try:
            async with grpc.aio.insecure_channel(stack.address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)

                async def one(i):
                    return [c async for c in stub.Generate(req(PREFIX + [i]))][-1]

                lasts = await asyncio.gather(*(one(i) for i in range(4)))
            return [served_by(stack.prefills, c.request_id) for c in lasts]
        finally:
            await stack.stop()

    used = asyncio.run(scenario())
    assert used.count(used[0]) == 2


def test_self_registered_decode_serves_requests():
    async def scenario():
        stack = await start_stack(MODEL_DIR[0], [300, 301], num_prefill=0, num_decode=0)
        extra = await start_fake("decode", [300, 301])
        try:
            async with grpc.aio.insecure_channel(stack.address) as ch:
                reg = worker_pb2_grpc.RegistryStub(ch)
                info = worker_pb2.WorkerInfo(
                    role=worker_pb2.WORKER_ROLE_DECODE, address=extra.address, model="tiny",
                    block_size=BLOCK_SIZE, num_blocks=64,
                )  # fmt: skip
                r = await reg.Register(info)
                hb = await reg.Heartbeat(worker_pb2.WorkerLoad(worker_id=r.worker_id))
                unknown = await reg.Heartbeat(worker_pb2.WorkerLoad(worker_id="nope"))
                stub = router_pb2_grpc.RouterStub(ch)
                chunks = [c async for c in stub.Generate(req([5, 6, 7]))]
                await reg.Deregister(worker_pb2.DeregisterRequest(worker_id=r.worker_id))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    [c async for c in stub.Generate(req([5, 6, 7]))]
            return r, hb, unknown, chunks, e.value.code()
        finally:
            await extra.server.stop(0)
            await stack.stop()

    r, hb, unknown, chunks, code = asyncio.run(scenario())
    assert r.worker_id and r.heartbeat_interval_ms > 0
    assert hb.known and not unknown.known
    assert [t for c in chunks for t in c.token_ids] == [300, 301]
    assert code == grpc.StatusCode.UNAVAILABLE


def test_prefill_failure_falls_back_to_local_prefill():
    async def scenario():
        stack = await start_stack(MODEL_DIR[0], [300, 301, 302], num_prefill=1)
        await stack.prefills[0].server.stop(0)  # the only prefill server is gone
        try:
            async with grpc.aio.insecure_channel(stack.address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                return [c async for c in stub.Generate(req([5, 6, 7], max_tokens=3))], stack
        finally:
            await stack.stop()

    chunks, stack = asyncio.run(scenario())
    assert [t for c in chunks for t in c.token_ids] == [300, 301, 302]
    assert served_by(stack.decodes, chunks[-1].request_id) == stack.decodes[0].address
    assert stack.prefills[0].state.requests == []  # prefilled on the decode server


BAD = [
    (dict(text="x", model="nope"), grpc.StatusCode.NOT_FOUND, "model"),
    (dict(text="x", sampling=common_pb2.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(text="x", sampling=common_pb2.SamplingParams(top_p=1.5)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(text="x", sampling=common_pb2.SamplingParams(max_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (dict(text="x", n=100), grpc.StatusCode.INVALID_ARGUMENT, "n"),
    (dict(text=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(chat=router_pb2.ChatMessages()), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    (dict(token_ids=router_pb2.TokenIds(ids=[99999])), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(token_ids=router_pb2.TokenIds(ids=[5] * 300)), grpc.StatusCode.OUT_OF_RANGE, "prompt"),
    (dict(text="x", sampling=common_pb2.SamplingParams(max_tokens=1000)), grpc.StatusCode.OUT_OF_RANGE, "max_tokens"),
]  # fmt: skip


def test_bad_requests_get_status_and_param():
    async def scenario():
        stack = await start_stack(MODEL_DIR[0], [300, 301])
        out = []
        try:
            async with grpc.aio.insecure_channel(stack.address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                for kwargs, _, _ in BAD:
                    try:
                        [c async for c in stub.Generate(router_pb2.GenerateRequest(**kwargs))]
                        out.append((None, None))
                    except grpc.aio.AioRpcError as e:
                        md = dict(e.trailing_metadata() or ())
                        out.append((e.code(), md.get("param")))
                ok = [c async for c in stub.Generate(req([5, 6]))]  # still serving
            return out, ok
        finally:
            await stack.stop()

    out, ok = asyncio.run(scenario())
    assert out == [(code, param) for _, code, param in BAD]
    assert ok[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_tokenize_detokenize_models_health_reflection():
    async def scenario():
        stack = await start_stack(MODEL_DIR[0], [300])
        try:
            async with grpc.aio.insecure_channel(stack.address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                tk = await stub.Tokenize(router_pb2.TokenizeRequest(text="Hello world"))
                dt = await stub.Detokenize(router_pb2.DetokenizeRequest(token_ids=tk.token_ids))
                chat = router_pb2.ChatMessages(
                    messages=[router_pb2.ChatMessage(role="user", content="hi")]
                )
                tc = await stub.Tokenize(router_pb2.TokenizeRequest(chat=chat))
                models = await stub.ListModels(router_pb2.ListModelsRequest())
                hc = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="tandem.v1.Router")
                )
                refl = reflection_pb2_grpc.ServerReflectionStub(ch)
                services = []
                async for r in refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                ):
                    services = [s.name for s in r.list_services_response.service]
            return tk, dt, tc, models, hc, services
        finally:
            await stack.stop()

    tk, dt, tc, models, hc, services = asyncio.run(scenario())
    assert dt.text == "Hello world" and tk.max_model_len == 256
    assert tc.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tc.token_ids[0] == 1  # <|im_start|>
    assert [m.id for m in models.models] == ["tiny"]
    assert hc.status == health_pb2.HealthCheckResponse.SERVING
    assert {"tandem.v1.Router", "tandem.v1.Registry", "grpc.health.v1.Health"} <= set(services)


def test_full_decode_servers_mean_overload_not_failure():
    async def scenario():
        stack = await start_stack(MODEL_DIR[0], [300, 301], num_decode=2)
        try:
            stack.decodes[0].servicer.full = True
            async with grpc.aio.insecure_channel(stack.address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                served = []
                for _ in range(3):
                    served.append([c async for c in stub.Generate(req([5, 6]))])
                stack.decodes[1].servicer.full = True
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    [c async for c in stub.Generate(req([5, 6]))]
            return stack, served, e.value
        finally:
            await stack.stop()

    stack, served, err = asyncio.run(scenario())
    assert {served_by(stack.decodes, s[-1].request_id) for s in served} == {
        stack.decodes[1].address
    }
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.trailing_metadata())["retry-after"] == "1"
