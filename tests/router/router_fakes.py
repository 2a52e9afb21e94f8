"""In-process FAKE prefill/decode workers implementing worker.proto's semantics.

Deterministic: the i-th output token of a request is script[i] (script given per test; a
migrated attempt's i starts at its num_output_tokens), so expected text is known exactly. The
fake prefill really transfers one KV slab (an empty KVChunk) and the first token to the fake
decode's KVTransfer service; the fake decode waits for it before streaming tokens 1.. on the
router's session, as a real decode server does. The prefill fake keeps a prefix cache of
block hashes and streams KV events; both fakes record aborts and active requests.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field

import grpc

from protos import common_pb2, worker_pb2, worker_pb2_grpc
from tandem.block_hash import hash_prompt_blocks

BLOCK_SIZE = 4
EOS = 2  # <|im_end|> in SmolLM2's vocabulary


def _finish(i: int, tok: int, s: common_pb2.SamplingParams) -> int:
    """FinishReason after output token i (0-based) was tok."""
    if not s.ignore_eos and (tok == EOS or tok in s.stop_token_ids) and i + 1 >= s.min_tokens:
        return common_pb2.FINISH_REASON_STOP
    if i + 1 >= s.max_tokens:
        return common_pb2.FINISH_REASON_LENGTH
    return common_pb2.FINISH_REASON_UNSPECIFIED


def _logprob(tok: int, s: common_pb2.SamplingParams):
    top = [common_pb2.TopLogprob(token_id=tok + k, logprob=-0.5 * k) for k in range(s.top_logprobs)]
    return common_pb2.TokenLogprob(token_id=tok, logprob=-0.25, top=top)


@dataclass
class FakeState:
    script: list[int]
    token_delay_s: float = 0.0
    active: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    # decode: a request's first attempt (req_id without a ".N" migration suffix) goes silent
    # after this many events (its KVTarget counts), as a stuck server does; None: never
    stall_after: int | None = None


class FakeDecode(worker_pb2_grpc.DecodeServicer, worker_pb2_grpc.KVTransferServicer):
    def __init__(self, state: FakeState, kv_address: str = ""):
        self.state = state
        self.kv_address = kv_address
        self.handoffs: dict[str, asyncio.Future] = {}
        self._ids = itertools.count()
        self.num_total_blocks = 64
        self.full = False  # True: refuse admissions like a decode server out of KV blocks
        self.num_sessions = 0  # Session calls opened

    async def Session(self, request_iterator, context):
        """Many requests on one stream, events batched as they queue; a refused request gets
        an `error` event."""
        self.num_sessions += 1
        out: asyncio.Queue = asyncio.Queue()
        tasks: dict[str, asyncio.Task] = {}

        async def run(request):
            key = request.req_id  # the router's "<attempt id>/<n>", unique on its session
            try:
                async for ev in self._events(request, attempt=key.rsplit("/", 1)[0]):
                    ev.req_id = key
                    out.put_nowait(ev)
            except _Refused as e:
                err = worker_pb2.SessionError(code=e.code.value[0], message=e.details)
                out.put_nowait(worker_pb2.SessionEvent(req_id=key, error=err))

        async def read_requests():
            async for msg in request_iterator:
                if msg.WhichOneof("op") == "abort":
                    self.state.aborted.append(msg.abort.req_id.rsplit("/", 1)[0])
                    task = tasks.pop(msg.abort.req_id, None)
                    if task is not None:
                        task.cancel()
                else:
                    tasks[msg.generate.req_id] = asyncio.ensure_future(run(msg.generate))

        reader = asyncio.ensure_future(read_requests())
        try:
            while True:
                batch = worker_pb2.SessionEvents(events=[await out.get()])
                while not out.empty():
                    batch.events.append(out.get_nowait())
                await context.write(batch)
        finally:
            reader.cancel()
            for task in tasks.values():
                task.cancel()

    async def _events(self, request, attempt: str):
        """One request's SessionEvents (req_id unset), recorded under its attempt id."""
        st = self.state
        if self.full:
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free KV blocks")
        st.requests.append(attempt)
        st.active.add(attempt)
        stall_at = st.stall_after if "." not in attempt else None
        try:
            s = request.sampling
            start = request.num_output_tokens  # a migrated attempt goes on from there
            if stall_at == 0:
                await asyncio.Event().wait()  # silent until the router aborts it
            if not request.prefill_locally:
                hid = f"h{next(self._ids)}"
                fut = asyncio.get_running_loop().create_future()
                self.handoffs[hid] = fut
                n_blocks = -(-len(request.prompt_token_ids) // BLOCK_SIZE)
                yield worker_pb2.SessionEvent(
                    kv_target=worker_pb2.KVTarget(
                        handoff_id=hid,
                        decode_kv_address=self.kv_address,
                        block_ids=list(range(n_blocks)),
                        block_size=BLOCK_SIZE,
                    )
                )
                first = await fut  # the transfer's done
                if _finish(start, first, s):
                    return  # finished at the prefill's token: nothing left for decode
                start += 1
            sent = 1 if not request.prefill_locally else 0  # the KVTarget
            for i in itertools.count(start):
                if st.token_delay_s:
                    await asyncio.sleep(st.token_delay_s)
                if sent == stall_at:
                    await asyncio.Event().wait()
                sent += 1
                tok = st.script[i % len(st.script)]
                fin = _finish(i, tok, s)
                ev = worker_pb2.TokenEvent(
                    token_ids=[tok],
                    finish_reason=fin,
                    num_prompt_tokens=len(request.prompt_token_ids),
                )
                if s.logprobs:
                    ev.logprobs.append(_logprob(tok, s))
                if fin == common_pb2.FINISH_REASON_STOP:
                    ev.stop_token_id = tok
                yield worker_pb2.SessionEvent(tokens=ev)
                if fin:
                    return
        finally:
            st.active.discard(attempt)

    async def Transfer(self, request_iterator, context):
        async for msg in request_iterator:
            kind = msg.WhichOneof("kind")
            if msg.handoff_id not in self.handoffs:
                yield worker_pb2.KVTransferReply(
                    reply=worker_pb2.KV_REPLY_STOP, error="unknown handoff"
                )
                return
            if kind == "begin":
                yield worker_pb2.KVTransferReply(reply=worker_pb2.KV_REPLY_GRANT)
            elif kind == "done":
                self.handoffs.pop(msg.handoff_id).set_result(msg.done.first_token_id)
                yield worker_pb2.KVTransferReply(reply=worker_pb2.KV_REPLY_COMPLETE)
                return

    async def Abort(self, request, context):
        self.state.aborted.append(request.req_id)
        return worker_pb2.AbortResponse(found=request.req_id in self.state.active)

    async def Stats(self, request, context):
        return worker_pb2.WorkerStats(
            num_running=len(self.state.active),
            num_free_blocks=self.num_total_blocks,
            num_total_blocks=self.num_total_blocks,
            block_size=BLOCK_SIZE,
        )


class _Refused(Exception):
    """A request the fake decode refuses: its `error` event carries the status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


async def transfer_kv(address: str, target: worker_pb2.KVTarget, first_token_id: int) -> str:
    """KVTransfer.Transfer of one empty slab and the first token; "" or the receiver's error."""
    hid = target.handoff_id
    msgs = [
        worker_pb2.KVTransferMessage(
            handoff_id=hid, begin=worker_pb2.KVBegin(transport="grpc", num_slabs=1)
        ),
        worker_pb2.KVTransferMessage(
            handoff_id=hid,
            chunk=worker_pb2.KVChunk(num_blocks=len(target.block_ids), dtype="float16"),
        ),
        worker_pb2.KVTransferMessage(
            handoff_id=hid, done=worker_pb2.KVDone(first_token_id=first_token_id)
        ),
    ]
    async with grpc.aio.insecure_channel(address) as ch:
        async for reply in worker_pb2_grpc.KVTransferStub(ch).Transfer(iter(msgs)):
            if reply.reply == worker_pb2.KV_REPLY_STOP:
                return reply.error or "stopped"
            if reply.reply == worker_pb2.KV_REPLY_COMPLETE:
                return ""
    return "the transfer ended without an answer"


class FakePrefill(worker_pb2_grpc.PrefillServicer):
    def __init__(self, state: FakeState, kv_events: bool = True):
        self.state = state
        self.kv_events = kv_events
        self.cached: set[int] = set()
        self.hits = self.queries = 0
        self.event_queues: list[asyncio.Queue] = []
        self.prefill_delay_s = 0.0

    async def Prefill(self, request, context):
        st = self.state
        st.requests.append(request.req_id)
        st.active.add(request.req_id)
        try:
            hashes = hash_prompt_blocks(list(request.prompt_token_ids), BLOCK_SIZE)
            hit = 0
            for h in hashes:
                if h not in self.cached:
                    break
                hit += 1
            self.queries += len(request.prompt_token_ids)
            self.hits += hit * BLOCK_SIZE
            new = [h for h in hashes if h not in self.cached]
            self.cached.update(hashes)
            for q in self.event_queues:
                q.put_nowait(worker_pb2.KVEventBatch(stored_block_hashes=new))
            if self.prefill_delay_s:
                await asyncio.sleep(self.prefill_delay_s)
            n = request.num_output_tokens
            tok = st.script[n % len(st.script)]
            s = request.sampling
            target = request.kv_target
            error = await transfer_kv(target.decode_kv_address, target, tok)
            if error:
                await context.abort(grpc.StatusCode.INTERNAL, error)
            resp = worker_pb2.PrefillResponse(
                token_id=tok,
                finish_reason=_finish(n, tok, s),
                num_cached_tokens=hit * BLOCK_SIZE,
                prefill_ms=1.0,
                kv_transfer_ms=0.5,
            )
            if s.logprobs:
                resp.logprob.CopyFrom(_logprob(tok, s))
            return resp
        finally:
            st.active.discard(request.req_id)

    async def Abort(self, request, context):
        self.state.aborted.append(request.req_id)
        return worker_pb2.AbortResponse(found=request.req_id in self.state.active)

    async def Stats(self, request, context):
        return worker_pb2.WorkerStats(
            num_running=len(self.state.active),
            prefix_cache_hits=self.hits,
            prefix_cache_queries=self.queries,
            block_size=BLOCK_SIZE,
        )

    async def KVEvents(self, request, context):
        if not self.kv_events:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no events")
        q: asyncio.Queue = asyncio.Queue()
        self.event_queues.append(q)
        try:
            yield worker_pb2.KVEventBatch(reset=True, stored_block_hashes=list(self.cached))
            while True:
                yield await q.get()
        finally:
            self.event_queues.remove(q)


@dataclass
class FakeServer:
    server: grpc.aio.Server
    address: str
    servicer: object
    state: FakeState


def served_by(fakes: list[FakeServer], request_id: str) -> str:
    """The address of the fake that ran choice 0 of a request, "" when none did. (The public
    Timing carries no worker address; the router logs it, event=choice_routed.)"""
    key = f"{request_id}-0"
    (*found,) = (f.address for f in fakes if any(r.split(".")[0] == key for r in f.state.requests))
    assert len(found) <= 1, f"{request_id} ran on several fakes: {found}"
    return found[0] if found else ""


async def start_fake(role: str, script: list[int], **kwargs) -> FakeServer:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    state = FakeState(script=script, token_delay_s=kwargs.pop("token_delay_s", 0.0))
    if role == "decode":
        servicer = FakeDecode(state, kv_address=address)
        worker_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
        worker_pb2_grpc.add_KVTransferServicer_to_server(servicer, server)
    else:
        servicer = FakePrefill(state, **kwargs)
        worker_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
    await server.start()
    return FakeServer(server, address, servicer, state)


# ---------------------------------------------------------------------------------------------
# A synthetic HF-format model dir (byte-level BPE + ChatML template), built in milliseconds so
# tests never need the real model; special ids match the fakes (EOS = 2).

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. STOP here. The end.",
    "héllo wörld 你好 😀 emoji and accents é è ü",
] * 20


def write_model_dir(path, max_position_embeddings: int = 256):
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    (path / "config.json").write_text(
        json.dumps({"max_position_embeddings": max_position_embeddings, "vocab_size": 400})
    )
    return path


# ---------------------------------------------------------------------------------------------
# A router over fakes, in-process


@dataclass
class Stack:
    router: object  # router.server.RunningRouter
    address: str
    prefills: list[FakeServer]
    decodes: list[FakeServer]

    async def stop(self):
        await self.router.stop(0)
        for f in self.prefills + self.decodes:
            await f.server.stop(0)


async def start_stack(
    model_dir,
    script: list[int],
    num_prefill: int = 1,
    num_decode: int = 1,
    policy: str = "prefix",
    token_delay_s: float = 0.0,
    kv_events: bool = True,
    **config_kwargs,
) -> Stack:
    from router.config import RouterConfig
    from router.server import start_router

    prefills = [
        await start_fake("prefill", script, kv_events=kv_events) for _ in range(num_prefill)
    ]
    decodes = [
        await start_fake("decode", script, token_delay_s=token_delay_s) for _ in range(num_decode)
    ]
    config = RouterConfig(
        model=str(model_dir),
        served_model_name="tiny",
        port=0,
        routing_policy=policy,
        prefill_addresses=tuple(f.address for f in prefills),
        decode_addresses=tuple(f.address for f in decodes),
        stats_interval_s=0.05,
        **config_kwargs,
    )
    running = await start_router(config)
    return Stack(running, f"127.0.0.1:{running.port}", prefills, decodes)


class LoopThread:
    """An asyncio loop in a thread, for the in-process router and fakes."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def _serve_forever(num_prefill: int, num_decode: int, script: list[int], delay: float):
    import json

    fakes = [await start_fake("prefill", script) for _ in range(num_prefill)]
    fakes += [await start_fake("decode", script, token_delay_s=delay) for _ in range(num_decode)]
    print(json.dumps([f.address for f in fakes]), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    # Fake workers as a process (for the e2e tests):
    # python router_fakes.py NUM_PREFILL NUM_DECODE TOKEN_DELAY_S TOKEN_ID...
    import sys

    asyncio.run(
        _serve_forever(
            int(sys.argv[1]), int(sys.argv[2]), [int(t) for t in sys.argv[4:]], float(sys.argv[3])
        )
    )
