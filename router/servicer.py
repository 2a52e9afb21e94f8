"""gRPC servicers of the router: public Router and the workers' Registry."""

from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path

import grpc

from protos import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from router.convert import (
    chunk_to_proto,
    generate_input_from_proto,
    messages_from_proto,
    template_kwargs_from_json,
    tools_from_proto,
)
from router.engine import RouterEngine
from router.types import ErrorKind, GenerateInput, RequestError
from router.validate import check_template_kwargs
from router.workers import CLOSE_LINGER_S, ReportedLoad, Role, WorkerHandle
from rpc.auth import peer_roles

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
        try:
            gi = generate_input_from_proto(request)
        except RequestError as e:  # a field that does not parse (a tool's schema, ...)
            self.engine.metrics.error(e.kind.value)
            await _abort(context, e)
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
            gi.messages = messages_from_proto(request.chat.messages)
            if request.HasField("add_generation_prompt"):
                gi.add_generation_prompt = request.add_generation_prompt
        try:
            self.engine.check_model(request.model)
            if kind is None:
                raise RequestError(ErrorKind.INVALID_ARGUMENT, "text or chat required", "prompt")
            # the template sees what Generate's would: tools and chat_template_kwargs
            gi.tools = tools_from_proto(request.tools)
            if gi.tools and kind != "chat":
                raise RequestError(ErrorKind.INVALID_ARGUMENT, "tools need chat messages", "tools")
            gi.chat_template_kwargs = template_kwargs_from_json(request.chat_template_kwargs_json)
            check_template_kwargs(gi)
            ids, text = await self.engine.tokenize(gi)
        except RequestError as e:
            await _abort(context, e)
        strs = self.engine.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else []
        return router_pb2.TokenizeResponse(
            token_ids=ids, max_model_len=self.engine.max_model_len, prompt=text, token_strs=strs
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
            # root: the served name, never the --model path (where the router's files live)
            id=e.model_name,
            max_model_len=e.max_model_len,
            created=e.created,
            root=e.model_name,
        )
        return router_pb2.ListModelsResponse(models=[card])


class RegistryServicer(worker_pb2_grpc.RegistryServicer):
    """Self-registration: a worker joins the pool by starting, leaves by draining.

    Who may call it at all is the auth interceptor's business (rpc/auth.py: a prefill or
    decode certificate, or the internal token). Here: a worker joins only as the role its
    certificate names, for this router's model, at an address no static or live worker
    holds; Heartbeat and Deregister act only on the unguessable id Register handed out.
    """

    def __init__(self, engine: RouterEngine):
        self.engine = engine
        # Names a worker may give for the router's model: the served name, or the --model
        # directory's name (what a worker started with the same --model and no
        # --served-model-name reports).
        self.model_names = {engine.model_name, Path(engine.config.model).name}

    async def Register(self, request, context):
        refusal = self._check_info(request) or _check_role(request.role, peer_roles(context))
        if refusal is None:
            refusal = await self._check_address(request)
        if refusal is not None:
            code, message = refusal
            log.warning(
                "event=worker_refused role=%d address=%.64r code=%s reason=%s",
                request.role, request.address, code.name, message,
            )  # fmt: skip
            await context.abort(code, message)
        pool = self.engine.pool
        w = pool.add(
            Role(request.role),
            request.address,
            static=False,
            kv_address=request.kv_address,
            block_size=request.block_size,
        )
        w.reported.num_total_blocks = w.reported.num_free_blocks = request.num_blocks
        log.info(
            "event=worker_registered id=%s role=%s address=%s kv_address=%s num_blocks=%d",
            w.worker_id, w.role.name, w.address, w.kv_address, request.num_blocks,
        )  # fmt: skip
        return worker_pb2.RegisterResponse(
            worker_id=w.worker_id, heartbeat_interval_ms=pool.heartbeat_interval_ms
        )

    def _check_info(self, r: worker_pb2.WorkerInfo) -> Refusal | None:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if not r.model:
            return bad, "WorkerInfo.model is required"
        if r.model not in self.model_names:
            shown = r.model if len(r.model) <= MAX_NAME_LEN else r.model[:MAX_NAME_LEN] + "..."
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker serves {shown!r}, router serves {self.engine.model_name!r}",
            )
        if r.role not in (Role.PREFILL, Role.DECODE):
            return bad, "WorkerInfo.role must be WORKER_ROLE_PREFILL or WORKER_ROLE_DECODE"
        if not _is_host_port(r.address):
            return bad, "WorkerInfo.address must be host:port"
        if r.kv_address and not _is_host_port(r.kv_address):
            return bad, "WorkerInfo.kv_address must be empty or host:port"
        if not 1 <= r.block_size <= MAX_BLOCK_SIZE:
            return bad, f"WorkerInfo.block_size must be in [1, {MAX_BLOCK_SIZE}]"
        if not 1 <= r.num_blocks <= MAX_NUM_BLOCKS:
            return bad, f"WorkerInfo.num_blocks must be in [1, {MAX_NUM_BLOCKS}]"
        if r.max_num_seqs < 0:
            return bad, "WorkerInfo.max_num_seqs must be >= 0"
        return None

    async def _check_address(self, r: worker_pb2.WorkerInfo) -> Refusal | None:
        """Refuse an address (or KV address) another worker holds; drop stale holders."""
        pool = self.engine.pool
        if len(pool.workers) >= MAX_WORKERS:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, f"the pool holds {MAX_WORKERS} workers"
        stale: list[WorkerHandle] = []
        for w in pool.holding(r.address, r.kv_address):
            if w.static:
                # The operator named this address (--prefill/--decode): nothing that
                # registers may take it over or shadow it.
                return (
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{w.address} is a static worker of this router (--{w.role.name.lower()})",
                )
            # A live registered worker keeps its address until it leaves: replacing it would
            # let any caller that may register evict a serving worker (whose next heartbeat
            # re-registers and evicts back: flapping) and take over its traffic. Refusing
            # costs a worker that crashed and restarted at the same address at most
            # MISSED_HEARTBEATS intervals: it retries, and once the old entry went silent
            # past the limit (or drains, which only its own holder of the id can start)
            # the address is free again.
            if pool.is_live(w):
                return (
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{r.address} is held by a registered worker that still heartbeats; "
                    "retry once it has been silent for the heartbeat limit",
                )
            stale.append(w)
        for w in stale:  # its channel lingers for calls already decided
            await pool.remove(w.worker_id, "re-registered", CLOSE_LINGER_S)
        return None

    async def Heartbeat(self, request, context):
        w = self._registered(request.worker_id)
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
        w = self._registered(request.worker_id)
        if w is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, "DeregisterRequest.worker_id: no such worker"
            )
        if not w.draining:
            w.draining = True
            log.info(
                "event=worker_draining id=%s address=%s source=deregister active=%d",
                w.worker_id, w.address, w.active,
            )  # fmt: skip
        return worker_pb2.DeregisterResponse()

    def _registered(self, worker_id: str) -> WorkerHandle | None:
        """The self-registered worker with this id; static workers never registered, so no
        caller can name them."""
        w = self.engine.pool.workers.get(worker_id)
        return None if w is None or w.static else w


Refusal = tuple[grpc.StatusCode, str]

MAX_NAME_LEN = 256
MAX_BLOCK_SIZE = 1024  # tokens per KV block
MAX_NUM_BLOCKS = 1 << 24  # KV blocks of one worker
MAX_WORKERS = 1024  # registered and static together: a bound on what callers can add


def _check_role(role: int, roles: frozenset[str]) -> Refusal | None:
    """Under mutual TLS the certificate says what the caller is: a prefill certificate
    cannot join as a decode server (and answer users with its own text)."""
    if not roles or role not in (Role.PREFILL, Role.DECODE):
        return None  # no certificate: the internal token (rpc/auth.py) was the credential
    name = Role(role).name.lower()
    if name not in roles:
        return (
            grpc.StatusCode.PERMISSION_DENIED,
            f"WorkerInfo.role {name} does not match the caller's certificate "
            f"({', '.join(sorted(roles))})",
        )
    return None


def _is_host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or len(address) > 300:
        return False
    if host.startswith("[") and host.endswith("]"):  # [ipv6]:port
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    labels = host.split(".")
    return bool(host) and all(
        0 < len(x) <= 63 and x.replace("-", "").replace("_", "").isalnum() and x.isascii()
        for x in labels
    )
