"""The OpenAI-compatible HTTP API over the router's gRPC API (FastAPI).

guard     auth, body size, admission slot (gateway.middleware)
parse     JSON -> pydantic model (errors name the offending field)
translate limits (gateway.limits), OpenAI request -> GenerateRequest (gateway.translate)
call      Router.Generate; gRPC status -> OpenAI error object (gateway.errors)
respond   JSON, or SSE `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`
cancel    client gone (at any point, first token or not) -> the gRPC calls are cancelled
          -> the router aborts the request on every worker
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gateway import openai_format as fmt
from gateway import translate
from gateway.admission import Admission
from gateway.config import GatewayConfig
from gateway.errors import APIError, bad_request, from_grpc, unavailable
from gateway.federation import Federation
from gateway.metrics import GatewayMetrics
from gateway.middleware import Guard
from gateway.protocol import (
    MAX_MODEL_NAME_LEN,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from gateway.readiness import RouterReadiness
from protos import router_pb2, router_pb2_grpc
from rpc.tls import aio_channel

log = logging.getLogger("tandem.gateway")


# Gateway -> router channel: reconnect quickly after a router restart (gRPC's default
# backoff grows to 120 s, during which every call would fail), and notice a dead peer with
# keepalive pings (at most 2 per call without data, so the router never sees ping abuse).
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


class ClientGone(Exception):
    """The HTTP client disconnected before the response was complete."""


async def parse_body(request: Request, model_cls):
    """The JSON body as model_cls; pydantic's parser bounds nesting depth and number size."""
    try:
        body = await request.body()  # the Guard's receive stops it past max_body_bytes
    except ClientDisconnect:
        raise ClientGone from None
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = [str(x) for x in err["loc"]]
        if err["type"] == "json_invalid":
            raise bad_request(f"malformed JSON body: {err['msg']}") from None
        if not loc:
            if err["type"] == "value_error":  # a whole-body rule (gateway.protocol)
                raise bad_request(str(err.get("ctx", {}).get("error", err["msg"]))) from None
            raise bad_request("the request body must be a JSON object") from None
        raise bad_request(f"{'.'.join(loc)}: {err['msg']}", loc[0]) from None


async def _until_disconnected(request: Request) -> None:
    # Once the body is read, the server's receive() only returns at disconnect (or when the
    # response is complete).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, aw):
    """await aw, or cancel it and raise ClientGone if the client disconnects first."""
    task = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


async def merged(stub, reqs, timeout, metadata=()):
    """Batches of (prompt index, chunk) from one Generate call per prompt, in arrival order.

    A batch is everything that had arrived when the consumer asked for the next one: one
    chunk while the consumer keeps up, several when it lagged (the SSE writer then sends
    them as one write, and merges each choice's chunks into one event)."""
    calls = [stub.Generate(r, timeout=timeout, metadata=metadata) for r in reqs]
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, call):
        try:
            async for c in call:
                queue.put_nowait((i, c))  # unbounded: never waits
            queue.put_nowait((i, done))
        except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(calls)]
    try:
        remaining = len(calls)
        while remaining:
            batch, error = [], None
            i, item = await queue.get()
            while True:
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    error = item
                    break
                else:
                    batch.append((i, item))
                if queue.empty():
                    break
                i, item = queue.get_nowait()
            if batch:
                yield batch
            if error is not None:
                raise error  # after the chunks that came before it
    finally:
        for c in calls:
            c.cancel()  # client gone or error: the router aborts on every worker
        for t in tasks:
            t.cancel()


def create_app(config: GatewayConfig) -> FastAPI:
    metrics = GatewayMetrics()
    admission = Admission(
        config.max_concurrent_requests, config.max_queued_requests, config.queue_timeout_s
    )
    metrics.watch(admission)
    federation = Federation(config.scrape_metrics)  # the routers' and workers' /metrics
    state: dict = {}
    # The router enforces the same key on its public API (rpc/auth.py) once it has one.
    router_md = (("authorization", f"Bearer {config.api_key}"),) if config.api_key else ()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        channel = aio_channel(config.router, config.tls, CHANNEL_OPTIONS, peer_role="router")
        state["stub"] = router_pb2_grpc.RouterStub(channel)
        state["readiness"] = RouterReadiness(channel)
        # The startup heap lives as long as the process: out of the cyclic GC's rescans.
        gc.collect()
        gc.freeze()
        yield
        await channel.close()
        await federation.close()
        metrics.process_exited()

    app = FastAPI(title="tandem", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, config=config, metrics=metrics, admission=admission)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        metrics.refused.labels(exc.reason).inc()
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        # unknown routes and methods get OpenAI error objects too
        return await api_error(request, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(ClientGone)
    async def client_gone(request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it; logs and metrics do

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.exception("event=internal_error path=%s", request.url.path)
        return APIError(500, "internal error", "internal_error", reason="error").response()

    # Probes (open without the API key, gateway.middleware): /live while the process runs;
    # /health and /ready while the router answers its health check too.
    @app.get("/live")
    async def live():
        return Response(status_code=200)

    @app.get("/health")
    @app.get("/ready")
    async def ready():
        if await state["readiness"].ready():
            return Response(status_code=200)
        return unavailable("router_unavailable", message="the router is not reachable").response()

    @app.get("/metrics")
    async def prometheus():
        body, media_type = await metrics.exposition(federation)
        return Response(body, media_type=media_type)

    @app.get("/v1/models")
    async def models():
        resp = await unary("ListModels", router_pb2.ListModelsRequest())
        if resp.models:
            state["served_name"] = resp.models[0].id
        data = [
            {
                "id": config.served_model_name or m.id,
                "object": "model",
                "created": m.created,
                "owned_by": "tandem",
                "root": m.root,  # the router's served name, never a path
                "max_model_len": m.max_model_len,
            }
            for m in resp.models
        ]
        return {"object": "list", "data": data}

    async def unary(method: str, req):
        try:
            return await getattr(state["stub"], method)(
                req, timeout=config.router_timeout_s, metadata=router_md
            )
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e) from None

    async def served_name() -> str:
        """The router's model name (ListModels, asked once), for requests that name none."""
        if "served_name" not in state:
            resp = await unary("ListModels", router_pb2.ListModelsRequest())
            if not resp.models:
                raise unavailable("no_model", message="the router serves no model")
            state["served_name"] = resp.models[0].id
        return state["served_name"]

    async def model_for(body, reqs) -> str:
        """The model name of every response and chunk; the router's requests get the
        router's own name ("" when the gateway serves it under an alias)."""
        # Absent (None) means the served model, as in vLLM; "" or a name longer than any
        # model's is a bad request, never an unknown model or an overload.
        if body.model is not None and not 0 < len(body.model) <= MAX_MODEL_NAME_LEN:
            raise bad_request(f"model must have 1..{MAX_MODEL_NAME_LEN} characters", "model")
        if not config.served_model_name:
            return body.model or await served_name()
        if body.model and body.model != config.served_model_name:
            raise APIError(
                404, f"The model `{body.model}` does not exist.", param="model",
                code="model_not_found",
            )  # fmt: skip
        for r in reqs:
            r.model = ""  # the router's own name may differ from the alias
        return config.served_model_name

    def client_error(body, e: grpc.aio.AioRpcError) -> APIError:
        err = from_grpc(e)
        if err.param == "structured_outputs":  # the router's name for any constraint
            err.param = translate.constraint_field(body) or err.param
        return err

    async def run(request: Request, body, reqs, kind: str):
        model = await model_for(body, reqs)
        t0 = time.monotonic()
        stream = merged(state["stub"], reqs, config.request_timeout_s, router_md)
        # The first chunk arrives before any HTTP status is sent, so refusals (bad params,
        # context length, overload) become proper error responses rather than SSE events.
        # Until then nothing reads from the client, so watch for it leaving: a disconnect
        # cancels the calls and the router aborts the request on every worker.
        try:
            first = await unless_gone(request, anext(stream))
        except BaseException as e:
            await stream.aclose()
            if isinstance(e, grpc.aio.AioRpcError):
                raise client_error(body, e) from None
            if isinstance(e, StopAsyncIteration):
                raise APIError(500, "empty response from router", "internal_error") from None
            raise
        metrics.running.labels(model).inc()
        metrics.ttft.labels(model).observe(time.monotonic() - t0)
        n = body.n
        builder = (fmt.ChatBuilder if kind == "chat" else fmt.CompletionBuilder)(
            f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", model, n,
            len(reqs), body,
        )  # fmt: skip

        def finish():
            metrics.running.labels(model).dec()
            metrics.e2e.labels(model).observe(time.monotonic() - t0)
            u = builder.usage
            metrics.prompt_tokens.labels(model).inc(u["prompt_tokens"])
            metrics.generation_tokens.labels(model).inc(u["completion_tokens"])
            for reason in builder.finish_reasons():
                metrics.success.labels(model, reason or "abort").inc()

        async def batches():
            yield first
            async for batch in stream:
                yield batch

        if body.stream:

            async def sse():
                try:
                    if text := builder.stream_start():
                        yield text
                    async for batch in batches():
                        if choices := builder.stream_batch(batch):
                            yield builder.sse(choices)  # one write for all of them
                    if text := builder.stream_end():
                        yield text
                except grpc.aio.AioRpcError as e:
                    yield f"data: {json.dumps(client_error(body, e).body())}\n\n"
                finally:
                    await stream.aclose()
                    finish()
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        async def collect():
            async for batch in batches():
                for i, c in batch:
                    builder.add(i, c)

        try:
            # Non-streaming: nothing is written until the end, so the client leaving is
            # noticed by watching for the disconnect, which cancels the calls.
            await unless_gone(request, collect())
        except grpc.aio.AioRpcError as e:
            raise client_error(body, e) from None
        finally:
            await stream.aclose()
            finish()
        return JSONResponse(builder.response())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        return await run(request, body, [translate.chat_to_proto(body, config)], "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        return await run(request, body, translate.completion_to_protos(body, config), "completion")

    # vLLM's tokenizer endpoints (same API key as the rest; no admission slot: no generation)
    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await parse_body(request, TokenizeRequest)
        req = translate.tokenize_to_proto(body, config)
        await model_for(body, [req])
        resp = await unary("Tokenize", req)
        return {
            "count": len(resp.token_ids),
            "max_model_len": resp.max_model_len,
            "tokens": list(resp.token_ids),
            "token_strs": list(resp.token_strs) if body.return_token_strs else None,
        }

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await parse_body(request, DetokenizeRequest)
        req = router_pb2.DetokenizeRequest(
            model=body.model or "", token_ids=body.tokens, skip_special_tokens=False
        )  # vLLM decodes special tokens too
        await model_for(body, [req])
        try:
            resp = await unary("Detokenize", req)
        except APIError as e:
            e.param = "tokens" if e.param == "token_ids" else e.param
            raise
        return {"prompt": resp.text}

    return app
