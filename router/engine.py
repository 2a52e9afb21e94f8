"""The router engine: one public request from prompt to streamed choices.

admit      count against max_num_requests (refuse beyond: never an unbounded queue)
prepare    validate (tool_choice settled; a forced call becomes a structured-output
           constraint), chat template (tools, chat_template_kwargs) / tokenize, fill max_tokens
fan out    one task per choice (n), each: handoff.stream_choice -> the choice's text
           (router/choice_text.py: detokenize, stop strings, reasoning, tool calls) ->
           ChoiceChunk on a shared queue
merge      yield chunks as they come; usage rides on the very last chunk
cleanup    client gone or Abort: cancel the choice tasks (which abort on the workers)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator

from router.choice_text import ChoiceText
from router.coalesce import Coalescer
from router.config import RouterConfig
from router.handoff import HandoffLimits, stream_choice
from router.metrics import RouterMetrics
from router.policies import make_policy
from router.tokenizer import RouterTokenizer
from router.types import (
    ChoiceChunk,
    ErrorKind,
    FinishReason,
    GenerateInput,
    RequestError,
    Timing,
)
from router.validate import validate_input, validate_prompt
from router.workers import Role, WorkerPool
from tandem.records import Usage

log = logging.getLogger("tandem.router")

MAX_MODEL_NAME_LEN = 256

_FINISH_NAMES = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.ABORT: "abort",
    FinishReason.ERROR: "error",
}


class RouterEngine:
    def __init__(self, config: RouterConfig, tokenizer: RouterTokenizer, metrics: RouterMetrics):
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.model_name = config.served_model_name
        self.max_model_len = config.max_model_len or tokenizer.max_position_embeddings or 2048
        self.created = int(time.time())
        self.pool = WorkerPool(
            config.stats_interval_s, config.heartbeat_interval_ms, tls=config.tls
        )
        for addr in config.prefill_addresses:
            self.pool.add(Role.PREFILL, addr, static=True)
        for addr in config.decode_addresses:
            self.pool.add(Role.DECODE, addr, static=True)
        self.policy = make_policy(config.routing_policy, load_weight=config.prefix_load_weight)
        self.limits = HandoffLimits.from_config(config)
        self.running: dict[str, list[asyncio.Task]] = {}  # request_id -> choice tasks

    async def start(self) -> None:
        await self.pool.first_poll()
        self.pool.start()

    async def close(self) -> None:
        for tasks in self.running.values():
            for t in tasks:
                t.cancel()
        await self.pool.close()

    # -- prompt ----------------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        """ "" (proto3's unset) is the served model; anything else must be its name. A long
        name is a bad request, not an unknown model: echoed back in the status message it
        would overflow gRPC's metadata limit, which clients see as RESOURCE_EXHAUSTED."""
        if len(model) > MAX_MODEL_NAME_LEN:
            raise RequestError(
                ErrorKind.INVALID_ARGUMENT,
                f"model must have at most {MAX_MODEL_NAME_LEN} characters",
                param="model",
            )
        if model and model != self.model_name:
            raise RequestError(
                ErrorKind.NOT_FOUND, f"The model `{model}` does not exist.", param="model"
            )

    async def tokenize(self, gi: GenerateInput) -> tuple[list[int], str]:
        """(prompt token ids, prompt text) the way Generate sees them."""
        if gi.prompt_token_ids is not None:
            return gi.prompt_token_ids, self.tokenizer.decode(gi.prompt_token_ids, False)
        if gi.messages is not None:
            try:
                text = self.tokenizer.apply_chat_template(
                    gi.messages,
                    gi.add_generation_prompt,
                    gi.template_tools(),
                    **gi.chat_template_kwargs,
                )
            except ValueError as e:  # TemplateError included: the template refused the chat
                raise RequestError(ErrorKind.INVALID_ARGUMENT, str(e), param="messages") from e
            add_special = False  # the template already wrote BOS etc.
        else:
            text, add_special = gi.text, gi.add_special_tokens
        if len(text) > 4096:  # keep long tokenizations off the event loop
            ids = await asyncio.to_thread(self.tokenizer.encode, text, add_special)
        else:
            ids = self.tokenizer.encode(text, add_special)
        return ids, text

    # -- generate --------------------------------------------------------------------------

    async def generate(self, gi: GenerateInput) -> AsyncIterator[ChoiceChunk]:
        t_arrival = time.monotonic()
        try:
            self.check_model(gi.model)
            validate_input(
                gi, self.config.max_n, self.config.max_logprobs, self.config.auto_tool_choice
            )
            if len(self.running) >= self.config.max_num_requests:
                raise RequestError(ErrorKind.OVERLOADED, "too many requests", retry_after=1)
            if not self.pool.has_role(Role.DECODE):
                raise RequestError(ErrorKind.UNAVAILABLE, "no decode server", retry_after=5)
            prompt_ids, prompt_text = await self.tokenize(gi)
            validate_prompt(gi, prompt_ids, self.tokenizer.vocab_size, self.max_model_len)
        except RequestError as e:
            self.metrics.error(e.kind.value)
            raise
        gi.request_id = gi.request_id or f"req-{uuid.uuid4().hex[:16]}"
        if gi.request_id in self.running:
            raise RequestError(
                ErrorKind.INVALID_ARGUMENT, "request_id already running", param="request_id"
            )
        queue: asyncio.Queue = asyncio.Queue()
        tasks = []
        for i in range(gi.n):
            t = asyncio.create_task(
                self._run_choice(gi, i, prompt_ids, prompt_text, t_arrival, queue)
            )
            # A choice task that ends without its final chunk (Abort cancelled it, or it
            # failed) still owes the client a finish: its end is an item on the queue too,
            # always behind the task's own chunks.
            t.add_done_callback(lambda t, i=i: queue.put_nowait((i, t)))
            tasks.append(t)
        self.running[gi.request_id] = tasks
        self.metrics.running.inc()
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        log.debug(
            "event=request id=%s prompt_tokens=%d n=%d max_tokens=%d",
            gi.request_id, len(prompt_ids), gi.n, gi.sampling.max_tokens,
        )  # fmt: skip
        completion_tokens, cached, pending = 0, 0, set(range(gi.n))
        reasons: list[str] = []
        merged = Coalescer(self.config.stream_interval)
        try:
            while pending:
                item = await queue.get()
                # Whatever else is queued (the stream lagged) leaves merged with it.
                while True:
                    if isinstance(item, ChoiceChunk):
                        chunk = item
                    elif item[0] in pending:
                        chunk = self._task_end_chunk(*item)
                    else:
                        chunk = None  # the task of a finished choice ended: nothing owed
                    if chunk is not None:
                        completion_tokens += len(chunk.token_ids)
                        if chunk.finish_reason != FinishReason.NONE:
                            pending.discard(chunk.index)
                            reasons.append(_FINISH_NAMES[chunk.finish_reason])
                            if chunk.index == 0:
                                cached = chunk.num_cached_tokens
                        merged.add(chunk)
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                out = merged.take()
                if not pending and out:
                    out[-1].usage = Usage(len(prompt_ids), completion_tokens, cached)
                for chunk in out:
                    yield chunk
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            del self.running[gi.request_id]
            self.metrics.running.dec()
            self.metrics.generation_tokens.inc(completion_tokens)
            self.metrics.e2e.observe(time.monotonic() - t_arrival)
            for r in reasons:
                self.metrics.finished(r)
            log.debug(
                "event=request_done id=%s completion_tokens=%d reasons=%s e2e_ms=%.1f",
                gi.request_id, completion_tokens, ",".join(reasons) or "cancelled",
                (time.monotonic() - t_arrival) * 1000,
            )  # fmt: skip

    def _task_end_chunk(self, index: int, task: asyncio.Task) -> ChoiceChunk:
        if not task.cancelled() and isinstance(task.exception(), RequestError):
            raise task.exception()
        if not task.cancelled() and task.exception() is not None:
            log.error("event=choice_crashed index=%d error=%r", index, task.exception())
            return ChoiceChunk(index=index, finish_reason=FinishReason.ERROR)
        return ChoiceChunk(index=index, finish_reason=FinishReason.ABORT)

    def abort(self, request_id: str) -> bool:
        tasks = self.running.get(request_id)
        for t in tasks or ():
            t.cancel()
        return tasks is not None

    async def _run_choice(self, gi, index, prompt_ids, prompt_text, t_arrival, queue) -> None:
        """Worker tokens -> the choice's text (router/choice_text.py) -> ChoiceChunks on the
        queue."""
        req_id = f"{gi.request_id}-{index}"
        out = ChoiceText(self.tokenizer, prompt_ids, prompt_text, gi, self.config)
        timing = Timing()
        first = True
        num_out = num_cached = 0
        sampling = gi.sampling
        if index and sampling.prompt_logprobs is not None:  # the prompt's are the same for all
            sampling = dataclasses.replace(sampling, prompt_logprobs=None, check=False)
        stream = stream_choice(
            self.pool, self.policy, req_id, prompt_ids, sampling, timing, t_arrival, self.limits
        )
        async with contextlib.aclosing(stream):
            async for batch in stream:
                chunk = ChoiceChunk(index, list(batch.token_ids), logprobs=batch.logprobs)
                num_out += len(batch.token_ids)
                if first:
                    first = False
                    self._first_token(req_id, timing, t_arrival, batch.num_cached_tokens)
                    num_cached = batch.num_cached_tokens
                    if batch.prompt_logprobs:  # (an empty one is WorkerTokens' shared default)
                        chunk.prompt_logprobs = batch.prompt_logprobs
                    if gi.echo:
                        chunk.text, chunk.prompt_token_ids = prompt_text, list(prompt_ids)
                finished = batch.finish_reason != FinishReason.NONE
                piece = out.feed(batch.token_ids, batch.stop_token_id, finished)
                chunk.text += piece.text
                chunk.reasoning_text, chunk.tool_calls = piece.reasoning, piece.tool_calls
                if piece.stop is not None:
                    chunk.finish_reason, chunk.stop_reason = FinishReason.STOP, piece.stop
                elif finished:
                    chunk.finish_reason = batch.finish_reason
                    if batch.stop_token_id is not None:
                        chunk.stop_reason = str(batch.stop_token_id)
                if chunk.finish_reason != FinishReason.NONE:
                    self._finish_timing(timing, t_arrival, num_out)
                    chunk.timing = timing
                    chunk.num_cached_tokens = num_cached
                queue.put_nowait(chunk)  # unbounded: never waits
                if chunk.finish_reason != FinishReason.NONE:
                    return  # leaving aclosing() aborts the workers if they still run
        raise RequestError(ErrorKind.INTERNAL, "choice ended without a finish reason")

    def _first_token(self, req_id: str, timing: Timing, t_arrival: float, num_cached: int) -> None:
        ttft = time.monotonic() - t_arrival
        timing.ttft_ms = ttft * 1000
        m = self.metrics
        m.ttft.observe(ttft)
        m.queue.observe(timing.queue_ms / 1000)
        m.cached_tokens(num_cached)
        # Worker addresses stay inside: logs and metrics here, never the public response.
        log.debug(
            "event=choice_routed id=%s prefill=%s decode=%s cached_tokens=%d",
            req_id, timing.prefill_worker or "local", timing.decode_worker, num_cached,
        )  # fmt: skip
        if timing.prefill_worker:
            m.prefill.observe(timing.prefill_ms / 1000)
            m.kv_transfer.observe(timing.kv_transfer_ms / 1000)
            m.routed("prefill", timing.prefill_worker)
        m.routed("decode", timing.decode_worker)
        rest = timing.ttft_ms - timing.queue_ms - timing.prefill_ms - timing.kv_transfer_ms
        m.delivery.observe(max(rest, 0.0) / 1000)

    def _finish_timing(self, timing: Timing, t_arrival: float, num_out: int) -> None:
        timing.e2e_ms = (time.monotonic() - t_arrival) * 1000
        if num_out > 1:
            self.metrics.itl.observe((timing.e2e_ms - timing.ttft_ms) / 1000 / (num_out - 1))
