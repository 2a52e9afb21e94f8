"""gRPC servicers of the router: public Router and the workers' Registry."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc

from protos import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from router.convert import chunk_to_proto, generate_input_from_proto
from router.engine import RouterEngine
from router.types import ErrorKind, GenerateInput, RequestError
from router.workers import CLOSE_LINGER_S, ReportedLoad, Role

log = logging.getLogger("tandem.router.servicer")

STATUS = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.CONTEXT_LENGTH: grpc.StatusCode.OUT_OF_RANGE,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


async def _abort(context: grpc.aio.ServicerContext, e: RequestError):
    md = []
    if e.param:
        md.append(("param", e.param))
    if e.retry_after is not None:
        md.append(("retry-after", str(max(1, round(e.retry_after)))))
    if e.kind == ErrorKind.CONTEXT_LENGTH:
        md.append(("error-code", "context_length_exceeded"))
    await context.abort(STATUS[e.kind], e.message, trailing_metadata=tuple(md))


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, engine: RouterEngine):
        self.engine = engine

    async def Generate(self, request, context):
        gi = generate_input_from_proto(request)
        try:
            async for chunk in self.engine.generate(gi):
                yield chunk_to_proto(chunk, gi.request_id, self.engine.tokenizer)
        except RequestError as e:
            await _abort(context, e)

    async def Abort(self, request, context):
        return router_pb2.RouterAbortResponse(found=self.engine.abort(request.request_id))

    async def Tokenize(self, request, context):
        kind = request.WhichOneof("prompt")
        gi = GenerateInput(request_id="", model=request.model)
        if kind == "text":
            gi.text = request.text
            if request.HasField("add_special_tokens"):
                gi.add_special_tokens = request.add_special_tokens
        elif kind == "chat":
            gi.messages = [
                {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                for m in request.chat.messages
            ]
            if request.HasField("add_generation_prompt"):
                gi.add_generation_prompt = request.add_generation_prompt
        try:
            self.engine.check_model(request.model)
            if kind is None:
                raise RequestError(ErrorKind.INVALID_ARGUMENT, "text or chat required", "prompt")
            ids, text = await self.engine.tokenize(gi)
        except RequestError as e:
            await _abort(context, e)
        return router_pb2.TokenizeResponse(
            token_ids=ids, max_model_len=self.engine.max_model_len, prompt=text
        )

    async def Detokenize(self, request, context):
        try:
            self.engine.check_model(request.model)
            vocab = self.engine.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in request.token_ids):
                raise RequestError(
                    ErrorKind.INVALID_ARGUMENT, f"token ids must be in [0, {vocab})", "token_ids"
                )
        except RequestError as e:
            await _abort(context, e)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = self.engine.tokenizer.decode(list(request.token_ids), skip)
        return router_pb2.DetokenizeResponse(text=text)

    async def ListModels(self, request, context):
        e = self.engine
        card = router_pb2.ModelCard(
            id=e.model_name, max_model_len=e.max_model_len, created=e.created, root=e.config.model
        )
        return router_pb2.ListModelsResponse(models=[card])


class RegistryServicer(worker_pb2_grpc.RegistryServicer):
    """Self-registration: a worker joins the pool by starting, leaves by draining."""

    def __init__(self, engine: RouterEngine):
        self.engine = engine
        # Names a worker may give for the router's model: the served name, the --model path,
        # or that path's directory name (a worker started with the same --model).
        cfg = engine.config
        self.model_names = {engine.model_name, cfg.model, Path(cfg.model).name}

    async def Register(self, request, context):
        if request.model and request.model not in self.model_names:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker serves {request.model!r}, router serves {self.engine.model_name!r}",
            )
        if request.role not in (Role.PREFILL, Role.DECODE) or not request.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "role and address required")
        pool = self.engine.pool
        for w in list(pool.workers.values()):  # a restarted worker replaces its old entry
            if w.address == request.address and w.role == request.role:
                await pool.remove(w.worker_id, "re-registered", CLOSE_LINGER_S)
        w = pool.add(
            Role(request.role),
            request.address,
            static=False,
            kv_address=request.kv_address,
            block_size=request.block_size,
        )
        w.reported.num_total_blocks = w.reported.num_free_blocks = request.num_blocks
        log.warning(
            "event=worker_registered id=%s role=%s address=%s num_blocks=%d",
            w.worker_id, w.role.name, w.address, request.num_blocks,
        )  # fmt: skip
        return worker_pb2.RegisterResponse(
            worker_id=w.worker_id, heartbeat_interval_ms=pool.heartbeat_interval_ms
        )

    async def Heartbeat(self, request, context):
        w = self.engine.pool.workers.get(request.worker_id)
        if w is None:
            return worker_pb2.HeartbeatResponse(known=False)
        w.last_seen = time.monotonic()
        w.reported = ReportedLoad(
            request.num_running,
            request.num_waiting,
            request.num_free_blocks,
            request.num_total_blocks,
            request.in_flight_prompt_tokens,
            w.reported.prefix_cache_hits,
            w.reported.prefix_cache_queries,
        )
        if request.HasField("kv_events"):
            w.apply_kv_events(request.kv_events)
        return worker_pb2.HeartbeatResponse(known=True)

    async def Deregister(self, request, context):
        # Takes effect before the answer: no routing decision after this returns picks the
        # worker. Requests already dispatched there run to completion; the pool drops the
        # entry once nothing of ours runs there.
        w = self.engine.pool.workers.get(request.worker_id)
        if w is not None and not w.draining:
            w.draining = True
            log.warning(
                "event=worker_draining id=%s address=%s source=deregister active=%d",
                w.worker_id, w.address, w.active,
            )  # fmt: skip
        return worker_pb2.DeregisterResponse()
