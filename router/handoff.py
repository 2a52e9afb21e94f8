"""One choice's trip through the workers: decode reservation, prefill, token stream.

local?    no prefill server, or the prompt's part not cached on the chosen decode server
          is shorter than max_local_prefill_length -> the decode server prefills it
          (prefill_locally, no handoff); counted local / remote
attempt:  choose decode ─ a request on its Decode.Session (router/decode_stream.py)
          ──> KVTarget (remote prefill only)
          choose prefill ─ Prefill.Prefill(kv_target) ──> token 0   (yielded at once)
          decode stream ──> tokens 1.. until a finish_reason
failure:  a worker error before the choice finished starts a new attempt on other workers
          with prompt + tokens already yielded, told to the workers as num_output_tokens
          (no token lost or repeated, and seeded sampling continues at the right output
          index); at most max_migrations new attempts; no prefill server left -> the decode
          server prefills locally.
blame:    Prefill RPC failed or timed out                -> that prefill server
          decode answers ABORTED (its KV handoff failed),
          or no decode event within handoff_timeout_s
          after the prefill answered                      -> that prefill server (the KV
                                                             never arrived); the decode
                                                             server is tried again
          decode stream error or silent for idle timeout  -> that decode server
prompt logprobs (SamplingParams.prompt_logprobs): on the choice's first batch, from the
          PrefillResponse (remote prefill) or the first TokenEvent (local prefill); a
          migrated attempt after tokens went out does not ask again.
exit:     finished on the decode server: nothing to clean. Otherwise (the prefill's token
          ended it, stop string, client cancel, error): abort it on the decode server (on
          the session) and Abort on the prefill one.
deadlines: every call here has one (Prefill: prefill_timeout_s; each decode read: the
          handoff, local-prefill or idle timeout, kept by the stream without a timer per
          token; Abort: ABORT_TIMEOUT_S).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import NamedTuple

import grpc

from protos import worker_pb2
from router.convert import logprob_from_proto
from router.decode_stream import _fire_abort, _worker_error, _WorkerFailed, open_decode_stream
from router.types import ErrorKind, FinishReason, RequestError, Timing
from router.workers import Role, WorkerHandle, WorkerPool
from tandem.block_hash import hash_prompt_blocks
from tandem.records import Logprob, SamplingParams
from worker.convert import sampling_to_proto

log = logging.getLogger("tandem.router.handoff")


class HandoffLimits(NamedTuple):
    """Deadlines and the retry bound of one choice (from RouterConfig)."""

    prefill_timeout_s: float  # one Prefill call; also a local prefill's first token
    handoff_timeout_s: float  # prefill answered -> first decode event (KV arrived)
    idle_timeout_s: float  # longest gap between decode events
    max_migrations: int  # new attempts after worker failures
    # prefill on the decode server when the prompt's part not cached there is shorter (0: never)
    max_local_prefill_length: int = 0

    @classmethod
    def from_config(cls, c) -> HandoffLimits:
        return cls(
            c.worker_timeout_s,
            c.handoff_timeout_s,
            c.stream_idle_timeout_s,
            c.max_migrations,
            c.max_local_prefill_length,
        )


class WorkerTokens(NamedTuple):
    token_ids: list[int]
    logprobs: list[Logprob]
    finish_reason: FinishReason
    stop_token_id: int | None
    num_cached_tokens: int
    # SamplingParams.prompt_logprobs: the entries of prompt tokens 1.., on the choice's first
    # batch; empty otherwise (never mutated: the default is shared)
    prompt_logprobs: list[Logprob] = []


async def stream_choice(
    pool: WorkerPool,
    policy,
    req_id: str,
    prompt_ids: list[int],
    sampling: SamplingParams,
    timing: Timing,
    t_arrival: float,
    limits: HandoffLimits,
) -> AsyncIterator[WorkerTokens]:
    """Yields the choice's tokens across attempts; the last item has a finish_reason."""
    generated: list[int] = []
    bad: set[WorkerHandle] = set()
    last_error, all_full = "no worker available", True
    for attempt in range(limits.max_migrations + 1):
        if attempt and pool.choose_decode(len(prompt_ids) + len(generated), exclude=bad) is None:
            break  # every decode server failed or is full
        attempt_id = req_id if attempt == 0 else f"{req_id}.{attempt}"
        try:
            async for batch in _attempt(
                pool, policy, attempt_id, prompt_ids, generated, sampling, timing, t_arrival,
                bad, limits,
            ):  # fmt: skip
                generated.extend(batch.token_ids)
                yield batch
            return
        except _WorkerFailed as e:
            bad.add(e.worker)
            last_error = str(e)
            all_full = all_full and e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            log.warning(
                "event=worker_failed req_id=%s role=%s worker=%s attempt=%d tokens_sent=%d"
                " detail=%s",
                req_id, e.worker.role.name.lower(), e.worker.address, attempt, len(generated), e,
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
    generated: list[int],
    sampling: SamplingParams,
    timing: Timing,
    t_arrival: float,
    bad: set[WorkerHandle],
    limits: HandoffLimits,
) -> AsyncIterator[WorkerTokens]:
    token_ids = prompt_ids + generated  # a migrated attempt re-prefills what was sent
    decode = pool.choose_decode(len(token_ids), exclude=bad)
    if decode is None:
        if pool.has_role(Role.DECODE):
            raise RequestError(ErrorKind.UNAVAILABLE, "every decode server failed", retry_after=1)
        raise RequestError(ErrorKind.UNAVAILABLE, "no decode server registered", retry_after=5)
    prefills = pool.candidates(Role.PREFILL, exclude=bad)
    local = not prefills or _short_enough_for_local(decode, token_ids, limits)
    pool.prefill_decisions["local" if local else "remote"] += 1
    timing.decode_worker = decode.address
    pb_sampling = sampling_to_proto(sampling)
    if generated:  # migrated after tokens went out: the prompt logprobs went with the first
        pb_sampling.ClearField("prompt_logprobs")
    elif sampling.prompt_logprobs is not None:
        pb_sampling.prompt_logprobs = sampling.prompt_logprobs
    stream = open_decode_stream(
        decode,
        worker_pb2.DecodeRequest(
            req_id=req_id,
            prompt_token_ids=token_ids,
            sampling=pb_sampling,
            prefill_locally=local,
            num_output_tokens=len(generated),
        ),
    )
    decode.active += 1
    prefill: WorkerHandle | None = None
    finished = decode_done = False
    try:
        if local:
            timing.queue_ms = (time.monotonic() - t_arrival) * 1000
            timing.prefill_worker = ""
            # the first event carries the token sampled after the decode server's own prefill
            first_wait = (limits.prefill_timeout_s, "token from a local prefill", None)
        else:
            ev = await stream.read(limits.idle_timeout_s, "KVTarget")
            if ev is grpc.aio.EOF or ev.WhichOneof("event") != "kv_target":
                raise _WorkerFailed(decode, "decode stream did not start with a KVTarget")
            prefill = policy.choose(prefills, token_ids)
            first = await _prefill(prefill, req_id, token_ids, generated, pb_sampling, ev, timing,
                                   t_arrival, limits)  # fmt: skip
            finished = first.finish_reason != FinishReason.NONE
            yield first  # the consumer may stop here: the decode server's copy is open
            if finished:
                return
            # The decode stream says nothing until the KV arrived and it sampled token 1.
            first_wait = (limits.handoff_timeout_s, "KV handoff", prefill)
        timeout_s, waiting_for, blame = first_wait
        while True:
            ev = await stream.read(timeout_s, waiting_for, blame)
            if ev is grpc.aio.EOF:
                raise _WorkerFailed(decode, "decode stream ended before a finish_reason")
            if ev.WhichOneof("event") != "tokens":
                continue
            timeout_s, waiting_for, blame = limits.idle_timeout_s, "decode event", None
            t = ev.tokens
            if t.finish_reason == FinishReason.ERROR:
                raise _WorkerFailed(decode, t.error or "decode reported an error")
            batch = WorkerTokens(
                list(t.token_ids),
                [logprob_from_proto(lp) for lp in t.logprobs],
                FinishReason(t.finish_reason),
                t.stop_token_id if t.HasField("stop_token_id") else None,
                t.num_cached_tokens,
                [logprob_from_proto(lp) for lp in t.prompt_logprobs],
            )
            finished = decode_done = batch.finish_reason != FinishReason.NONE
            yield batch
            if finished:
                return
    finally:
        decode.active -= 1
        # not finished on the decode server (the prefill's token ended the choice, a stop
        # string, client cancel, a failure): its copy goes with an abort on the session;
        # unfinished, the prefill server's too
        stream.close(decode_done)
        if not finished and prefill is not None:
            _fire_abort(prefill, req_id)


def _short_enough_for_local(decode: WorkerHandle, token_ids: list[int], limits) -> bool:
    """Conditional disaggregation: the prompt's part the decode server does not cache is
    shorter than max_local_prefill_length, so a local prefill costs less than the handoff.

    What the decode server caches is approximated from what this router sent it (decode
    servers stream no KV events): every prompt it was given, as full blocks, LRU-bounded.
    """
    n = limits.max_local_prefill_length
    if n <= 0:
        return False
    hashes = hash_prompt_blocks(token_ids, decode.block_size)
    cached = decode.blocks.num_matched(hashes) * decode.block_size
    decode.blocks.store(hashes)  # held there after this request, wherever it is prefilled
    uncached = len(token_ids) - min(cached, len(token_ids) - 1)  # the last one is recomputed
    return uncached < n


async def _prefill(
    prefill: WorkerHandle,
    req_id: str,
    token_ids: list[int],
    generated: list[int],
    pb_sampling,
    ev,
    timing: Timing,
    t_arrival: float,
    limits: HandoffLimits,
) -> WorkerTokens:
    """Prefill.Prefill into the decode server's KVTarget; the sequence's next token."""
    timing.prefill_worker = prefill.address
    if not prefill.exact_events:
        prefill.blocks.store(hash_prompt_blocks(token_ids, prefill.block_size))
    timing.queue_ms = (time.monotonic() - t_arrival) * 1000
    prefill.inflight_prompt_tokens += len(token_ids)
    try:
        resp = await prefill.stub.Prefill(
            worker_pb2.PrefillRequest(
                req_id=req_id,
                prompt_token_ids=token_ids,
                sampling=pb_sampling,
                kv_target=ev.kv_target,
                num_output_tokens=len(generated),
            ),
            timeout=limits.prefill_timeout_s,
        )
    except grpc.aio.AioRpcError as e:
        raise _worker_error(e, prefill) from e
    finally:
        prefill.inflight_prompt_tokens -= len(token_ids)
    timing.prefill_ms = resp.prefill_ms
    timing.kv_transfer_ms = resp.kv_transfer_ms
    return WorkerTokens(
        [resp.token_id],
        [logprob_from_proto(resp.logprob)] if resp.HasField("logprob") else [],
        FinishReason(resp.finish_reason),
        None,
        resp.num_cached_tokens,
        [logprob_from_proto(lp) for lp in resp.prompt_logprobs],
    )
