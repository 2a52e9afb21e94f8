"""Router over in-process fake workers: handoff, detokenization, stop strings, n, cancel."""

import asyncio

import grpc
import pytest
from router_fakes import EOS, served_by, start_stack

from protos import common_pb2, router_pb2, router_pb2_grpc
from router.tokenizer import RouterTokenizer

pytestmark = pytest.mark.timeout(30)


def run(coro):
    return asyncio.run(coro)


async def collect(stack, **kwargs):
    async with grpc.aio.insecure_channel(stack.address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        return [c async for c in stub.Generate(router_pb2.GenerateRequest(**kwargs))]


def sampling(**kw):
    return common_pb2.SamplingParams(temperature=0.0, **kw)


def text_of(chunks, index=0):
    return "".join(c.text for c in chunks if c.index == index)


def test_full_handoff_flow(model_dir):
    tok = RouterTokenizer(model_dir)
    script = tok.encode("Hello world, this is a tiny corpus")

    async def scenario():
        stack = await start_stack(model_dir, script)
        try:
            chat = router_pb2.ChatMessages(
                messages=[router_pb2.ChatMessage(role="user", content="hi")]
            )
            chunks = await collect(stack, chat=chat, sampling=sampling(max_tokens=5))
            return stack, chunks
        finally:
            await stack.stop()

    stack, chunks = run(scenario())
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == script[:5]
    assert text_of(chunks) == tok.decode(script[:5])
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert all(not c.HasField("usage") for c in chunks[:-1])
    prompt_len = len(
        tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]), False)
    )
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt_len, 5)
    # which workers served it stays inside the router: the public Timing names none
    assert last.timing.prefill_worker == last.timing.decode_worker == ""
    assert served_by(stack.prefills, last.request_id) == stack.prefills[0].address
    assert served_by(stack.decodes, last.request_id) == stack.decodes[0].address
    assert last.timing.ttft_ms > 0 and last.timing.e2e_ms >= last.timing.ttft_ms
    # one request on each fake, nothing aborted on a normal finish
    assert len(stack.prefills[0].state.requests) == len(stack.decodes[0].state.requests) == 1
    assert stack.decodes[0].state.aborted == [] and stack.prefills[0].state.aborted == []
    assert len({c.request_id for c in chunks}) == 1


def test_eos_stops_and_is_not_in_text(model_dir):
    tok = RouterTokenizer(model_dir)
    script = tok.encode("Hello world") + [EOS]

    async def scenario():
        stack = await start_stack(model_dir, script)
        try:
            return await collect(stack, text="x", sampling=sampling(max_tokens=50))
        finally:
            await stack.stop()

    chunks = run(scenario())
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert text_of(chunks) == "Hello world"
    assert [t for c in chunks for t in c.token_ids][-1] == EOS


def test_finish_at_first_token(model_dir):
    async def scenario():
        stack = await start_stack(model_dir, [300, 301])
        try:
            chunks = await collect(stack, text="x", sampling=sampling(max_tokens=1))
            await asyncio.sleep(0.1)
            return stack, chunks
        finally:
            await stack.stop()

    stack, chunks = run(scenario())
    assert [t for c in chunks for t in c.token_ids] == [300]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 1
    assert stack.decodes[0].state.active == set()


def test_stop_string_across_token_boundaries(model_dir):
    tok = RouterTokenizer(model_dir)
    full = "The quick brown fox jumps over the lazy dog"
    script = tok.encode(full)
    stop = "x jum"  # spans " fox" | " jumps"

    async def scenario():
        stack = await start_stack(model_dir, script, token_delay_s=0.01)
        try:
            chunks = await collect(stack, text="x", stop=[stop], sampling=sampling(max_tokens=50))
            await asyncio.sleep(0.1)
            return stack, chunks
        finally:
            await stack.stop()

    stack, chunks = run(scenario())
    assert text_of(chunks) == full[: full.index(stop)]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert chunks[-1].stop_reason == stop
    # the decode server was told to stop generating
    assert stack.decodes[0].state.aborted == [chunks[0].request_id + "-0"]
    assert stack.decodes[0].state.active == set()


def test_include_stop_str_in_output(model_dir):
    tok = RouterTokenizer(model_dir)
    full = "The quick brown fox jumps over"
    script = tok.encode(full)

    async def scenario():
        stack = await start_stack(model_dir, script)
        try:
            return await collect(
                stack, text="x", stop=["brown"], include_stop_str_in_output=True,
                sampling=sampling(max_tokens=50),
            )  # fmt: skip
        finally:
            await stack.stop()

    assert text_of(run(scenario())) == "The quick brown"


def test_incremental_utf8_detokenization(model_dir):
    tok = RouterTokenizer(model_dir)
    full = "ok 🚀 go €"
    script = tok.encode(full) + [EOS]
    assert len(script) > len(full.split()) + 4  # the rocket is split into byte tokens

    async def scenario():
        stack = await start_stack(model_dir, script)
        try:
            return await collect(stack, text="x", sampling=sampling(max_tokens=50))
        finally:
            await stack.stop()

    chunks = run(scenario())
    assert all("\ufffd" not in c.text for c in chunks)
    assert text_of(chunks) == full


def test_n2_fans_out(model_dir):
    tok = RouterTokenizer(model_dir)
    script = tok.encode("Hello world, this is")

    async def scenario():
        stack = await start_stack(model_dir, script)
        try:
            return stack, await collect(stack, text="x", n=2, sampling=sampling(max_tokens=4))
        finally:
            await stack.stop()

    stack, chunks = run(scenario())
    assert {c.index for c in chunks} == {0, 1}
    for i in (0, 1):
        assert text_of(chunks, i) == tok.decode(script[:4])
    assert [c for c in chunks if c.HasField("usage")] == [chunks[-1]]
    assert chunks[-1].usage.completion_tokens == 8
    assert sorted(stack.decodes[0].state.requests) == [
        chunks[0].request_id + "-0",
        chunks[0].request_id + "-1",
    ]


def test_client_cancel_aborts_prefill_and_decode(model_dir):
    async def scenario():
        stack = await start_stack(model_dir, [300, 301, 302], token_delay_s=0.02)
        try:
            async with grpc.aio.insecure_channel(stack.address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                call = stub.Generate(
                    router_pb2.GenerateRequest(
                        text="x", request_id="cancel-me", sampling=sampling(max_tokens=200)
                    )
                )
                got = 0
                async for _ in call:
                    got += 1
                    if got == 3:
                        break
                call.cancel()
            for _ in range(100):  # aborts are fire-and-forget: poll briefly
                if stack.decodes[0].state.aborted and stack.prefills[0].state.aborted:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)
            return stack
        finally:
            await stack.stop()

    stack = run(scenario())
    assert stack.decodes[0].state.aborted == ["cancel-me-0"]
    assert stack.prefills[0].state.aborted == ["cancel-me-0"]
    assert stack.decodes[0].state.active == set()
    assert stack.router.engine.running == {}


def test_abort_rpc(model_dir):
    async def scenario():
        stack = await start_stack(model_dir, [300, 301], token_delay_s=0.02)
        try:
            async with grpc.aio.insecure_channel(stack.address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                call = stub.Generate(
                    router_pb2.GenerateRequest(
                        text="x", request_id="r1", sampling=sampling(max_tokens=200)
                    )
                )
                chunks = [await call.read()]
                resp = await stub.Abort(router_pb2.RouterAbortRequest(request_id="r1"))
                while (c := await call.read()) is not grpc.aio.EOF:
                    chunks.append(c)
                return resp, chunks
        finally:
            await stack.stop()

    resp, chunks = run(scenario())
    assert resp.found
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert chunks[-1].HasField("usage")


def test_aggregated_mode_without_prefill_servers(model_dir):
    tok = RouterTokenizer(model_dir)
    script = tok.encode("Hello world, this")

    async def scenario():
        stack = await start_stack(model_dir, script, num_prefill=0)
        try:
            return await collect(
                stack, text="x", sampling=sampling(max_tokens=3, logprobs=True, top_logprobs=2)
            )
        finally:
            await stack.stop()

    chunks = run(scenario())
    assert [t for c in chunks for t in c.token_ids] == script[:3]
    lps = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in lps] == script[:3]
    assert len(lps[0].top) == 2 and lps[0].token == tok.decode([script[0]])


def test_choices_share_one_session_per_decode_server(model_dir):
    """Every choice on a decode server, remote or local prefill, rides one Session call."""
    tok = RouterTokenizer(model_dir)
    script = tok.encode("Hello world, this is a tiny corpus")

    async def scenario():
        stack = await start_stack(model_dir, script, num_decode=2)
        try:
            outs = await asyncio.gather(
                *(collect(stack, text=f"x{i}", sampling=sampling(max_tokens=4)) for i in range(8)),
                collect(stack, text="y", n=3, sampling=common_pb2.SamplingParams(max_tokens=4)),
            )
            return stack, outs
        finally:
            await stack.stop()

    stack, outs = run(scenario())
    for chunks in outs:
        for index in {c.index for c in chunks}:
            assert [t for c in chunks if c.index == index for t in c.token_ids] == script[:4]
    sessions = [d.servicer.num_sessions for d in stack.decodes]
    assert sum(len(d.state.requests) for d in stack.decodes) == 11
    assert all(n == 1 for n in sessions if n), sessions  # one each, reused
    assert sum(sessions) >= 1
