"""What the engine does after a step raised, so that one request's failure is not everyone's.

    step() raised RequestFailed(req_id)  -> that request fails ("error", blocks freed); the
                                            step's other requests are computed again
    step() raised anything else          -> the step's requests (the running ones) fail;
                                            waiting, reserved and held requests go on
    the same, MAX_CONSECUTIVE_STEP_FAILURES steps in a row, a device error (CUDA), a
    tensor-parallel engine, or the recovery itself raising
                                         -> unrecoverable: AsyncEngine marks the engine dead,
                                            and the server reports NOT_SERVING and exits

Computing again: a failed step may have advanced a request's counters, written part of its KV
or lost the token it sampled, so the survivors are preempted (blocks freed, back to the front
of the waiting queue), exactly as when the pool runs short; the prefix cache holds only blocks
registered by steps that completed, so what they recompute is correct.

A friend of LLMEngine: it resets the engine's in-flight step state, which lives in engine.py
(kept within its size bound by having this here).
"""

from __future__ import annotations

import logging

import torch

from tandem.engine import LLMEngine
from tandem.engine_records import RequestFailed, StepOutput
from tandem.log_config import quote
from tandem.request import Request, RequestStatus

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_STEP_FAILURES = 3
# a device error leaves the CUDA context unusable (every later call fails the same way)
_DEVICE_ERRORS = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "cuDNN error", "NCCL")


def is_unrecoverable(engine: LLMEngine, exc: BaseException) -> bool:
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit, ...
        return True
    if engine.cfg.tensor_parallel_size > 1:  # the other ranks are out of step in a collective
        return True
    if isinstance(exc, MemoryError) or type(exc).__name__ == "AcceleratorError":
        return True
    text = str(exc)
    return any(marker in text for marker in _DEVICE_ERRORS)


def recover(engine: LLMEngine, exc: BaseException) -> list[StepOutput]:
    """After engine.step() raised exc: the failed requests' last outputs (finish_reason
    "error"); the engine can step again. Raises when it cannot be put back in order."""
    if engine.runner.device.type == "cuda":  # no kernel of the failed step may write later
        torch.cuda.synchronize(engine.runner.device)
    engine._inflight = None  # its tokens are lost: whoever sampled there fails or recomputes
    for req in engine._deferred_free:  # finished in the lost step: nothing writes them now
        engine.block_manager.free(req)
    engine._deferred_free = []
    sched = engine.scheduler
    for req in [*sched.running, *sched.waiting]:
        req.num_pending_tokens, req.pending_row = 0, -1
    running = list(sched.running)
    named = engine.requests.get(exc.req_id) if isinstance(exc, RequestFailed) else None
    victims = [named] if named is not None and named in running else running
    why = f"the engine failed this request: {exc!r}"
    outputs = [_fail(engine, req, why) for req in victims]
    survivors = [req for req in running if req not in victims]
    for req in reversed(survivors):  # the oldest ends up first in the waiting queue
        sched.requeue(req)
    engine.num_preemptions += len(survivors)
    log.warning(
        "event=step_failed failed=%s recomputed=%d error=%s",
        ",".join(req.req_id for req in victims), len(survivors), quote(repr(exc)),
    )  # fmt: skip
    return outputs


def _fail(engine: LLMEngine, req: Request, why: str) -> StepOutput:
    # no cache_full_blocks (LLMEngine._finish does it): its KV of the failed step may be
    # partial, and only blocks registered by completed steps may serve a prefix hit
    req.hold_blocks = False
    engine.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
    engine.runner.tables.forget(req.req_id)
    engine._drop(req.req_id)
    return StepOutput(req.req_id, [], [], "error", req.num_cached_tokens, why)
