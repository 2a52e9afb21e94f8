"""One choice's trip through the workers: decode reservation, prefill, token stream.

attempt:  choose decode ─ Decode.Generate ──> KVTarget (remote prefill only)
          choose prefill ─ Prefill.Prefill(kv_target) ──> token 0   (yielded at once)
          decode stream ──> tokens 1.. until a finish_reason
failure:  a worker error before the choice finished starts a new attempt on other
          workers with prompt + tokens already yielded (no token lost or repeated);
          no prefill server left -> the decode server prefills locally.
exit:     finished normally: nothing to clean. Closed early (stop string, client
          cancel, error): cancel the decode stream and Abort(req_id) on both workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import NamedTuple

import grpc

from protos import worker_pb2
from router.convert import logprob_from_proto, sampling_to_proto
from router.prefix_index import hash_prompt_blocks
from router.types import ErrorKind, FinishReason, Logprob, RequestError, Sampling, Timing
from router.workers import Role, WorkerHandle, WorkerPool

log = logging.getLogger("tandem.router.handoff")

MAX_ATTEMPTS = 3
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}
_background: set[asyncio.Task] = set()  # fire-and-forget aborts, kept alive until done


class WorkerTokens(NamedTuple):
    token_ids: list[int]
    logprobs: list[Logprob]
    finish_reason: FinishReason
    stop_token_id: int | None
    num_cached_tokens: int


class _WorkerFailed(Exception):
    def __init__(self, worker: WorkerHandle, detail: str, code=None):
        super().__init__(detail)
        self.worker = worker
        self.code = code  # grpc.StatusCode when the worker answered with one


def _fire_abort(worker: WorkerHandle, req_id: str) -> None:
    async def abort():
        try:
            await worker.stub.Abort(worker_pb2.AbortRequest(req_id=req_id), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            log.debug(
                "event=abort_failed worker=%s req_id=%s code=%s", worker.worker_id, req_id, e.code()
            )

    task = asyncio.get_running_loop().create_task(abort())
    _background.add(task)
    task.add_done_callback(_background.discard)


def _worker_error(e: grpc.aio.AioRpcError, worker: WorkerHandle) -> Exception:
    code = e.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return RequestError(ErrorKind.INVALID_ARGUMENT, e.details() or "invalid request")
    if code == grpc.StatusCode.OUT_OF_RANGE:
        return RequestError(ErrorKind.CONTEXT_LENGTH, e.details() or "context length exceeded")
    if code in _RETRYABLE:
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            worker.healthy = False  # the poller restores it
        return _WorkerFailed(worker, f"{code.name}: {e.details()}", code)
    return RequestError(ErrorKind.INTERNAL, f"worker {worker.address}: {code.name} {e.details()}")


async def stream_choice(
    pool: WorkerPool,
    policy,
    req_id: str,
    prompt_ids: list[int],
    sampling: Sampling,
    timing: Timing,
    t_arrival: float,
    prefill_timeout_s: float,
) -> AsyncIterator[WorkerTokens]:
    """Yields the choice's tokens across attempts; the last item has a finish_reason."""
    generated: list[int] = []
    bad: set[WorkerHandle] = set()
    last_error, all_full = "no worker available", True
    for attempt in range(MAX_ATTEMPTS):
        s = dataclasses.replace(sampling)
        if generated:  # migration: continue where the failed decode server stopped
            s.max_tokens = sampling.max_tokens - len(generated)
            s.min_tokens = max(0, sampling.min_tokens - len(generated))
        if attempt and pool.choose_decode(len(prompt_ids), exclude=bad) is None:
            break  # every decode server failed or is full
        attempt_id = req_id if attempt == 0 else f"{req_id}.{attempt}"
        try:
            async for batch in _attempt(
                pool, policy, attempt_id, prompt_ids + generated, s, timing, t_arrival, bad,
                prefill_timeout_s,
            ):  # fmt: skip
                generated.extend(batch.token_ids)
                yield batch
            return
        except _WorkerFailed as e:
            bad.add(e.worker)
            last_error = str(e)
            all_full = all_full and e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            log.warning(
                "event=worker_failed req_id=%s worker=%s attempt=%d detail=%s",
                req_id, e.worker.address, attempt, e,
            )  # fmt: skip
    if all_full:  # every worker tried was out of KV blocks / slots: overload, not failure
        raise RequestError(ErrorKind.OVERLOADED, f"workers are full: {last_error}", retry_after=1)
    raise RequestError(
        ErrorKind.UNAVAILABLE, f"request failed on every worker: {last_error}", retry_after=1
    )


async def _attempt(
    pool: WorkerPool,
    policy,
    req_id: str,
    prompt_ids: list[int],
    sampling: Sampling,
    timing: Timing,
    t_arrival: float,
    bad: set[WorkerHandle],
    prefill_timeout_s: float,
) -> AsyncIterator[WorkerTokens]:
    decode = pool.choose_decode(len(prompt_ids), exclude=bad)
    if decode is None:
        if pool.has_role(Role.DECODE):
            raise RequestError(ErrorKind.UNAVAILABLE, "every decode server failed", retry_after=1)
        raise RequestError(ErrorKind.UNAVAILABLE, "no decode server registered", retry_after=5)
    prefills = pool.candidates(Role.PREFILL, exclude=bad)
    local = not prefills
    timing.decode_worker = decode.address
    pb_sampling = sampling_to_proto(sampling)
    call = decode.stub.Generate(
        worker_pb2.DecodeRequest(
            req_id=req_id,
            prompt_token_ids=prompt_ids,
            sampling=pb_sampling,
            prefill_locally=local,
        )
    )
    decode.active += 1
    prefill: WorkerHandle | None = None
    finished = False
    try:
        if local:
            timing.queue_ms = (time.monotonic() - t_arrival) * 1000
            timing.prefill_worker = ""
        else:
            try:
                ev = await call.read()
            except grpc.aio.AioRpcError as e:
                raise _worker_error(e, decode) from e
            if ev is grpc.aio.EOF or ev.WhichOneof("event") != "kv_target":
                raise _WorkerFailed(decode, "decode stream did not start with a KVTarget")
            prefill = policy.choose(prefills, prompt_ids)
            timing.prefill_worker = prefill.address
            if not prefill.exact_events:
                prefill.blocks.store(hash_prompt_blocks(prompt_ids, prefill.block_size))
            t_dispatch = time.monotonic()
            timing.queue_ms = (t_dispatch - t_arrival) * 1000
            prefill.inflight_prompt_tokens += len(prompt_ids)
            try:
                resp = await prefill.stub.Prefill(
                    worker_pb2.PrefillRequest(
                        req_id=req_id,
                        prompt_token_ids=prompt_ids,
                        sampling=pb_sampling,
                        kv_target=ev.kv_target,
                    ),
                    timeout=prefill_timeout_s,
                )
            except grpc.aio.AioRpcError as e:
                raise _worker_error(e, prefill) from e
            finally:
                prefill.inflight_prompt_tokens -= len(prompt_ids)
            timing.prefill_ms = resp.prefill_ms
            timing.kv_transfer_ms = resp.kv_transfer_ms
            first = WorkerTokens(
                [resp.token_id],
                [logprob_from_proto(resp.logprob)] if resp.HasField("logprob") else [],
                FinishReason(resp.finish_reason),
                None,
                resp.num_cached_tokens,
            )
            finished = first.finish_reason != FinishReason.NONE
            yield first
            if finished:
                _fire_abort(decode, req_id)  # decode knows too; Abort is idempotent
                return
        while True:
            try:
                ev = await call.read()
            except grpc.aio.AioRpcError as e:
                raise _worker_error(e, decode) from e
            if ev is grpc.aio.EOF:
                raise _WorkerFailed(decode, "decode stream ended before a finish_reason")
            if ev.WhichOneof("event") != "tokens":
                continue
            t = ev.tokens
            if t.finish_reason == FinishReason.ERROR:
                raise _WorkerFailed(decode, t.error or "decode reported an error")
            batch = WorkerTokens(
                list(t.token_ids),
                [logprob_from_proto(lp) for lp in t.logprobs],
                FinishReason(t.finish_reason),
                t.stop_token_id if t.HasField("stop_token_id") else None,
                t.num_cached_tokens,
            )
            finished = batch.finish_reason != FinishReason.NONE
            yield batch
            if finished:
                return
    finally:
        decode.active -= 1
        call.cancel()  # no-op when the stream already ended
        if not finished:
            # Stop string, client cancel or a failure: free the request everywhere.
            _fire_abort(decode, req_id)
            if prefill is not None:
                _fire_abort(prefill, req_id)
