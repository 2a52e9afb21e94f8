"""One request's outputs on its event loop: what AsyncEngine's per-step callback feeds and a
server's handler consumes (`async for`, or AsyncEngine.pump's sink)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tandem.engine_records import EngineDeadError, StepOutput


class OutputStream:
    """One request's outputs on its event loop (async iterator of StepOutput).

    The engine thread hands each step's outputs to the loop in one callback (AsyncEngine's
    `_deliver`), which appends to `_pending` and wakes the consumer only if it is waiting: one
    future per wake-up, no asyncio.Queue. The consumer takes everything pending at once, merged into one
    StepOutput, so a stream that fell behind catches up with one message instead of lagging.
    An engine failure arrives as an exception in `_pending`: the outputs before it are still
    returned, then EngineDeadError is raised.
    """

    __slots__ = (
        "req_id",
        "loop",
        "_streams",
        "_abort",
        "_pending",
        "_waiter",
        "_finished",
        "_closed",
        "_held",
        "_handed",
        "_sink",
        "_done",
    )

    def __init__(
        self,
        req_id: str,
        loop: asyncio.AbstractEventLoop,
        streams: dict[str, OutputStream],
        abort: Callable[[str], Awaitable[None]],
    ):
        self.req_id = req_id
        self.loop = loop
        self._streams = streams  # the engine's open streams, by request id (shared)
        self._abort = abort  # frees the blocks of a request whose consumer went away
        self._pending: list[StepOutput | BaseException] = []
        self._waiter: asyncio.Future | None = None  # set while the consumer waits
        self._finished = False  # the output with a finish_reason was returned
        self._closed = False
        # engine thread only: outputs held back by stream_interval, and whether any was handed
        self._held: list[StepOutput] = []
        self._handed = False
        # AsyncEngine.pump: outputs go to _sink as they arrive; _done ends the wait
        self._sink: Callable[[StepOutput], None] | None = None
        self._done: asyncio.Future | None = None

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self._finished or self._closed:
            raise StopAsyncIteration
        while not self._pending:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        pending = self._pending
        out = pending[0]
        if len(pending) == 1:
            pending.clear()
        else:
            out, rest = _merge(pending)
            self._pending = rest
        if isinstance(out, BaseException):
            raise EngineDeadError(f"engine failed: {out!r}") from out
        if out.finish_reason is not None:
            self._finished = True
            self._streams.pop(self.req_id, None)
        return out

    def _feed(self, outs: list[StepOutput | BaseException]) -> None:
        """pump's delivery: each output to the sink, up to the finish or an engine error."""
        done = self._done
        if self._closed or done.done():
            return
        sink = self._sink
        for out in outs:
            if isinstance(out, BaseException):
                done.set_exception(EngineDeadError(f"engine failed: {out!r}"))
                return
            try:
                sink(out)
            except Exception as e:  # noqa: BLE001 - the waiter gets it; other streams go on
                done.set_exception(e)
                return
            if out.finish_reason is not None:
                self._finished = True
                if self._streams.get(self.req_id) is self:
                    del self._streams[self.req_id]
                done.set_result(None)
                return

    async def aclose(self) -> None:
        """Idempotent; aborts the request in the engine unless it finished."""
        if self._closed:
            return
        self._closed = True
        if self._streams.get(self.req_id) is self:
            del self._streams[self.req_id]
        if not self._finished:
            await self._abort(self.req_id)


def _merge(
    pending: list[StepOutput | BaseException],
) -> tuple[StepOutput | BaseException, list[StepOutput | BaseException]]:
    """Several queued steps -> one StepOutput (and what is left: an error after them)."""
    first = pending[0]
    if isinstance(first, BaseException):
        return first, []
    token_ids, logprobs = list(first.new_token_ids), list(first.new_logprobs)
    last = first
    for i in range(1, len(pending)):
        nxt = pending[i]
        if isinstance(nxt, BaseException):
            return _with(first, token_ids, logprobs, last), pending[i:]
        token_ids += nxt.new_token_ids
        logprobs += nxt.new_logprobs
        last = nxt
    return _with(first, token_ids, logprobs, last), []


def _with(first: StepOutput, token_ids, logprobs, last: StepOutput) -> StepOutput:
    # prompt logprobs ride on a request's first output only: the merge's first
    return StepOutput(
        first.req_id,
        token_ids,
        logprobs,
        last.finish_reason,
        last.num_cached_tokens,
        last.error,
        first.prompt_logprobs,
    )
