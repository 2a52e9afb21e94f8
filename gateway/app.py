"""The OpenAI-compatible HTTP API over the router's gRPC API (FastAPI).

parse     body size -> JSON -> pydantic model (errors name the offending field)
translate OpenAI request -> GenerateRequest (gateway.translate)
call      Router.Generate; gRPC status -> OpenAI error object (gateway.errors)
respond   JSON, or SSE `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`
cancel    client gone -> the gRPC call is cancelled -> the router aborts every worker
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from gateway import openai_format as fmt
from gateway.config import GatewayConfig
from gateway.errors import APIError, bad_request, from_grpc
from gateway.metrics import GatewayMetrics
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.translate import chat_to_proto, completion_to_protos
from protos import router_pb2, router_pb2_grpc


async def parse_body(request: Request, model_cls, max_bytes: int):
    body = await request.body()
    if len(body) > max_bytes:
        raise APIError(413, f"request body exceeds {max_bytes} bytes")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"malformed JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model_cls.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        param = loc[0] if loc else None
        raise bad_request(f"{'.'.join(loc) or 'body'}: {err['msg']}", param) from None


async def merged(stub, reqs, timeout):
    """(prompt index, chunk) from one Generate call per prompt, in arrival order."""
    calls = [stub.Generate(r, timeout=timeout) for r in reqs]
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, call):
        try:
            async for c in call:
                await queue.put((i, c))
            await queue.put((i, done))
        except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(calls)]
    try:
        remaining = len(calls)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for c in calls:
            c.cancel()  # client gone or error: the router aborts on every worker
        for t in tasks:
            t.cancel()


def create_app(config: GatewayConfig) -> FastAPI:
    metrics = GatewayMetrics()
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        channel = grpc.aio.insecure_channel(
            config.router, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        state["stub"] = router_pb2_grpc.RouterStub(channel)
        yield
        await channel.close()

    app = FastAPI(title="tandem", lifespan=lifespan, docs_url=None, redoc_url=None)
    expected_auth = f"Bearer {config.api_key}".encode()

    @app.middleware("http")
    async def auth_and_metrics(request: Request, call_next):
        path = request.url.path
        if config.api_key and path != "/health":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected_auth):  # constant time
                resp = APIError(
                    401, "Incorrect or missing API key.", code="invalid_api_key"
                ).response()
                metrics.http.labels(path, "401").inc()
                return resp
        response = await call_next(request)
        metrics.http.labels(path, str(response.status_code)).inc()
        return response

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        try:
            resp = await state["stub"].ListModels(router_pb2.ListModelsRequest(), timeout=10)
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e) from None
        data = [
            {
                "id": config.served_model_name or m.id,
                "object": "model",
                "created": m.created,
                "owned_by": "tandem",
                "root": m.root,
                "max_model_len": m.max_model_len,
            }
            for m in resp.models
        ]
        return {"object": "list", "data": data}

    def model_for(r) -> str:
        return config.served_model_name or r.model or ""

    async def run(request: Request, body, reqs, kind: str):
        model = model_for(body)
        if config.served_model_name and body.model and body.model != config.served_model_name:
            raise APIError(
                404, f"The model `{body.model}` does not exist.", param="model",
                code="model_not_found",
            )  # fmt: skip
        if config.served_model_name:
            for r in reqs:
                r.model = ""  # the router's own name may differ from the alias
        t0 = time.monotonic()
        stream = merged(state["stub"], reqs, config.request_timeout_s)
        # The first chunk arrives before any HTTP status is sent, so refusals (bad params,
        # context length, overload) become proper error responses rather than SSE events.
        try:
            first = await anext(stream)
        except grpc.aio.AioRpcError as e:
            await stream.aclose()
            raise from_grpc(e) from None
        except StopAsyncIteration:
            raise APIError(500, "empty response from router", "internal_error") from None
        metrics.running.inc()
        metrics.ttft.labels(model).observe(time.monotonic() - t0)
        n = body.n
        builder = (fmt.ChatBuilder if kind == "chat" else fmt.CompletionBuilder)(
            f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", model, n,
            len(reqs), body,
        )  # fmt: skip

        def finish():
            metrics.running.dec()
            metrics.e2e.labels(model).observe(time.monotonic() - t0)
            u = builder.usage
            metrics.prompt_tokens.labels(model).inc(u["prompt_tokens"])
            metrics.generation_tokens.labels(model).inc(u["completion_tokens"])
            for reason in builder.finish_reasons():
                metrics.success.labels(model, reason or "abort").inc()

        async def chunks():
            yield first
            async for item in stream:
                yield item

        if body.stream:

            async def sse():
                try:
                    for event in builder.stream_start():
                        yield f"data: {json.dumps(event)}\n\n"
                    async for i, c in chunks():
                        for event in builder.stream_chunk(i, c):
                            yield f"data: {json.dumps(event)}\n\n"
                    for event in builder.stream_end():
                        yield f"data: {json.dumps(event)}\n\n"
                except grpc.aio.AioRpcError as e:
                    yield f"data: {json.dumps(from_grpc(e).body())}\n\n"
                finally:
                    await stream.aclose()
                    finish()
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        async def collect():
            async for i, c in chunks():
                builder.add(i, c)

        task = asyncio.create_task(collect())
        try:
            # Non-streaming: nothing is written until the end, so watch for the client
            # leaving and cancel the call (and the work on every server) if it does.
            while not task.done():
                await asyncio.wait([task], timeout=0.5)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
            await task
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e) from None
        except asyncio.CancelledError:
            return Response(status_code=499)
        finally:
            await stream.aclose()
            finish()
        return JSONResponse(builder.response())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest, config.max_body_bytes)
        return await run(request, body, [chat_to_proto(body, config)], "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest, config.max_body_bytes)
        return await run(request, body, completion_to_protos(body, config), "completion")

    return app
