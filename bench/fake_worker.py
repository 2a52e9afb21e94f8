"""FAKE prefill and decode workers: the real worker.proto services with no model behind them.

A benchmark tool for the control plane (router + gateway + HTTP), never a stand-in in a test
that claims anything about model output: its "tokens" are the prompt's own ids replayed
(output token i = prompt[i % len(prompt)], valid ids that detokenize to real text), produced
as fast as the stream accepts them, or one every --itl-ms.

decode   Session: every request on the router's stream steps on one engine clock, one token
         each per step, and each write carries every event queued since the last one
         (prefill_locally=true: every token; false: a KVTarget first, then, once the fake
         prefill's transfer (one empty slab and token 0) arrived, tokens 1..)
         default (lockstep): the next step is made once the last write is done, so every
         message carries one step, each token made when the stream takes it
         --coalesce: like the real decode server, the "engine" steps on its own clock (one
         step per --itl-ms, or per event-loop turn at 0) whether or not the stream takes
         them, and a stream that lags gets every step made meanwhile in one message
prefill  Prefill: transfer one empty KV slab and token 0 to the decode server, answer
         token 0. No KV events (the router then approximates its prefix index).
both     Abort, Stats (no KV blocks: the pool is reported as effectively unbounded), health.

No torch and no engine import: `python -m bench.fake_worker --role decode`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import common_pb2, worker_pb2, worker_pb2_grpc
from rpc.auth import server_interceptors
from rpc.tls import PLAINTEXT, TLSConfig, add_port, add_tls_args, aio_channel, tls_from_args
from tandem.log_config import LEVELS, configure_logging, quote

log = logging.getLogger("tandem.fake_worker")

BLOCK_SIZE = 16
NUM_BLOCKS = 1 << 20  # reported pool size: never the limit
HANDOFF_TIMEOUT_S = 60.0
_UNSET = common_pb2.FINISH_REASON_UNSPECIFIED


def finish_reason(i: int, token_id: int, s: common_pb2.SamplingParams) -> int:
    """FinishReason after output token i (0-based) was token_id."""
    max_tokens = s.max_tokens if s.HasField("max_tokens") else 16
    if not s.ignore_eos and token_id in s.stop_token_ids and i + 1 >= s.min_tokens:
        return common_pb2.FINISH_REASON_STOP
    if i + 1 >= max_tokens:
        return common_pb2.FINISH_REASON_LENGTH
    return _UNSET


def output_token(prompt: list[int], i: int) -> int:
    return prompt[i % len(prompt)] if prompt else 0


class FakeDecode(worker_pb2_grpc.DecodeServicer, worker_pb2_grpc.KVTransferServicer):
    def __init__(self, address: str, itl_s: float = 0.0, coalesce: bool = False):
        self.address = address  # KVTransfer is served on the same port
        self.itl_s = itl_s
        self.coalesce = coalesce
        self.active: set[str] = set()
        self.handoffs: dict[str, asyncio.Future] = {}
        self._ids = itertools.count()

    async def Session(self, request_iterator, context):
        running: dict[str, list] = {}  # req_id -> [prompt, sampling, next output index]
        waiting: dict[str, asyncio.Task] = {}  # remote prefill: waiting for the KV transfer
        out = [worker_pb2.SessionEvents()]
        queued, have_work, written = asyncio.Event(), asyncio.Event(), asyncio.Event()

        def event(req_id: str) -> worker_pb2.SessionEvent:
            ev = out[0].events.add()
            ev.req_id = req_id
            queued.set()
            return ev

        async def handoff(req_id, prompt, s, hid, fut):
            try:
                first = await asyncio.wait_for(fut, HANDOFF_TIMEOUT_S)
            except asyncio.TimeoutError:
                err = event(req_id).error
                err.code, err.message = grpc.StatusCode.UNAVAILABLE.value[0], "no KV transfer"
                return
            finally:
                self.handoffs.pop(hid, None)
                waiting.pop(req_id, None)
            if not finish_reason(0, first, s):
                running[req_id] = [prompt, s, 1]
                have_work.set()

        async def read_requests():
            async for msg in request_iterator:
                if msg.WhichOneof("op") == "abort":
                    rid = msg.abort.req_id
                    running.pop(rid, None)
                    task = waiting.pop(rid, None)
                    if task is not None:
                        task.cancel()
                    self.active.discard(rid)
                    continue
                r = msg.generate
                prompt = list(r.prompt_token_ids)
                self.active.add(r.req_id)
                if r.prefill_locally:
                    running[r.req_id] = [prompt, r.sampling, 0]
                    have_work.set()
                    continue
                hid = f"{r.req_id}#{next(self._ids)}"
                fut = asyncio.get_running_loop().create_future()
                self.handoffs[hid] = fut
                target = event(r.req_id).kv_target
                target.handoff_id, target.decode_kv_address = hid, self.address
                target.block_ids.extend(range(-(-len(prompt) // BLOCK_SIZE)))
                target.block_size, target.transport = BLOCK_SIZE, "grpc"
                waiting[r.req_id] = asyncio.ensure_future(
                    handoff(r.req_id, prompt, r.sampling, hid, fut)
                )

        async def engine():
            while True:
                if not running:
                    have_work.clear()
                    await have_work.wait()
                await asyncio.sleep(self.itl_s)  # one decode step (0: one loop turn)
                for rid, st in list(running.items()):
                    prompt, s, i = st
                    tok = output_token(prompt, i)
                    reason = finish_reason(i, tok, s)
                    t = event(rid).tokens
                    t.token_ids.append(tok)
                    t.num_prompt_tokens = len(prompt)
                    if reason:
                        t.finish_reason = reason
                        del running[rid]
                        self.active.discard(rid)
                    else:
                        st[2] = i + 1
                if not self.coalesce and out[0].events:  # lockstep: once this one is written
                    written.clear()
                    await written.wait()

        tasks = [asyncio.ensure_future(read_requests()), asyncio.ensure_future(engine())]
        try:
            while True:
                await queued.wait()
                queued.clear()
                msg, out[0] = out[0], worker_pb2.SessionEvents()
                await context.write(msg)
                written.set()
        finally:
            for task in [*tasks, *waiting.values()]:
                task.cancel()
            for rid in [*running, *waiting]:
                self.active.discard(rid)

    async def Transfer(self, request_iterator, context):
        async for msg in request_iterator:
            fut = self.handoffs.get(msg.handoff_id)
            if fut is None or fut.done():
                yield worker_pb2.KVTransferReply(
                    reply=worker_pb2.KV_REPLY_STOP, error="unknown handoff"
                )
                return
            kind = msg.WhichOneof("kind")
            if kind == "begin":
                yield worker_pb2.KVTransferReply(reply=worker_pb2.KV_REPLY_GRANT)
            elif kind == "done":
                fut.set_result(msg.done.first_token_id)
                yield worker_pb2.KVTransferReply(reply=worker_pb2.KV_REPLY_COMPLETE)
                return

    async def Abort(self, request, context):
        return worker_pb2.AbortResponse(found=request.req_id in self.active)

    async def Stats(self, request, context):
        return worker_pb2.WorkerStats(
            num_running=len(self.active),
            num_free_blocks=NUM_BLOCKS,
            num_total_blocks=NUM_BLOCKS,
            num_active_handoffs=len(self.handoffs),
            block_size=BLOCK_SIZE,
        )


class FakePrefill(worker_pb2_grpc.PrefillServicer):
    def __init__(self, tls: TLSConfig = PLAINTEXT):
        self.tls = tls
        self.active: set[str] = set()
        self.pushes: set[asyncio.Task] = set()  # KV pushes running behind their responses
        self.channels: dict[str, grpc.aio.Channel] = {}  # decode KV address -> channel

    def _kv_stub(self, address: str) -> worker_pb2_grpc.KVTransferStub:
        if address not in self.channels:
            self.channels[address] = aio_channel(address, self.tls, peer_role="decode")
        return worker_pb2_grpc.KVTransferStub(self.channels[address])

    async def Prefill(self, request, context):
        # As the real prefill server does: the first token goes back at once and the KV push
        # runs behind it, so the router streams token 0 before the decode server's tokens
        # (pushing first would race them: the decode server starts as soon as the push is done)
        tok = output_token(list(request.prompt_token_ids), 0)
        self.active.add(request.req_id)
        push = asyncio.get_running_loop().create_task(self._push(request.kv_target, tok))
        self.pushes.add(push)
        push.add_done_callback(self.pushes.discard)
        push.add_done_callback(lambda _: self.active.discard(request.req_id))
        return worker_pb2.PrefillResponse(
            token_id=tok, finish_reason=finish_reason(0, tok, request.sampling), prefill_ms=0.0
        )

    async def _push(self, target: worker_pb2.KVTarget, tok: int) -> None:
        """One grpc transfer with no KV bytes: begin, an empty chunk, done with the token. A
        refusal is only logged: the fake decode ends that handoff itself (HANDOFF_TIMEOUT_S)."""
        hid = target.handoff_id
        msgs = [
            worker_pb2.KVTransferMessage(
                handoff_id=hid, begin=worker_pb2.KVBegin(transport="grpc", num_slabs=1)
            ),
            worker_pb2.KVTransferMessage(handoff_id=hid, chunk=worker_pb2.KVChunk()),
            worker_pb2.KVTransferMessage(
                handoff_id=hid, done=worker_pb2.KVDone(first_token_id=tok)
            ),
        ]
        try:
            async for reply in self._kv_stub(target.decode_kv_address).Transfer(iter(msgs)):
                if reply.reply != worker_pb2.KV_REPLY_GRANT:
                    if reply.reply != worker_pb2.KV_REPLY_COMPLETE:
                        log.info(
                            "event=fake_kv_refused handoff=%s error=%s", hid, quote(reply.error)
                        )
                    return
        except grpc.RpcError as e:
            log.info("event=fake_kv_failed handoff=%s error=%s", hid, e.code())

    async def Abort(self, request, context):
        return worker_pb2.AbortResponse(found=request.req_id in self.active)

    async def Stats(self, request, context):
        return worker_pb2.WorkerStats(num_running=len(self.active), block_size=BLOCK_SIZE)

    async def KVEvents(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake prefill keeps no KV cache")

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()


async def serve(args: argparse.Namespace) -> None:
    """config -> grpc.aio.server -> servicer + health -> start -> signals -> stop(grace)."""
    tls = tls_from_args(args)
    # the same authorization as a real worker (rpc/auth.py), so that the control-plane
    # benchmark measures what mutual TLS and the checks cost
    server = grpc.aio.server(interceptors=server_interceptors(tls))
    port = add_port(server, f"{args.host}:{args.port}", tls)
    address = f"{args.host}:{port}"
    prefill = None
    if args.role == "decode":
        decode = FakeDecode(address, args.itl_ms / 1000, args.coalesce)
        worker_pb2_grpc.add_DecodeServicer_to_server(decode, server)
        worker_pb2_grpc.add_KVTransferServicer_to_server(decode, server)
        services = ["Decode", "KVTransfer"]
    else:
        prefill = FakePrefill(tls)
        worker_pb2_grpc.add_PrefillServicer_to_server(prefill, server)
        services = ["Prefill"]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    for name in ["", *(f"tandem.v1.{s}" for s in services)]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("event=fake_worker_ready role=%s address=%s", args.role, address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)
    if prefill is not None:
        await prefill.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fake_worker", description=__doc__)
    p.add_argument("--role", choices=["decode", "prefill"], required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--itl-ms", type=float, default=0.0, help="decode: delay before each token")
    p.add_argument(
        "--coalesce",
        action="store_true",
        help="decode: step on the engine's clock, not once per write (a lagging stream gets "
        "every step made meanwhile in one message)",
    )
    p.add_argument("--log-level", default="info", choices=LEVELS)
    add_tls_args(p)
    args = p.parse_args(argv)
    configure_logging(args.log_level)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
