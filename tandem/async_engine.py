"""The engine on its own thread, driven from asyncio (the servers' event loop).

    asyncio side                         engine thread
    ------------                         -------------
    call(fn) / generate(...) --queue-->  run pending calls between steps
                                         step() -> outputs
    per-request asyncio.Queue <--loop.call_soon_threadsafe-- outputs

Everything that touches the engine (add, abort, reserve, commit, KV reads) runs on the engine
thread, so the engine itself needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from tandem.engine import LLMEngine, StepOutput
from tandem.request import Logprob
from tandem.sampling_params import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_MAX_NUM_WAITING = 1024  # a server's waiting-queue bound (the router admits 1024)


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(
        self, engine: LLMEngine, max_num_waiting: int | None = DEFAULT_MAX_NUM_WAITING
    ) -> None:
        """max_num_waiting bounds the engine's waiting queue: beyond it `generate` raises
        EngineFullError (the servicers answer RESOURCE_EXHAUSTED; the router tries another
        server or refuses with a retryable status)."""
        self.engine = engine
        engine.max_num_waiting = max_num_waiting
        self._calls: queue.SimpleQueue[
            tuple[Callable, tuple, asyncio.Future, asyncio.AbstractEventLoop]
        ] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- asyncio side ---------------------------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the engine thread between steps; returns its result."""
        if self._error is not None:
            raise EngineDeadError(f"engine failed: {self._error!r}")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._calls.put((fn, args, fut, loop))
        return await fut

    async def generate(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        hold_blocks: bool = False,
        num_output_tokens: int = 0,
    ) -> AsyncIterator[StepOutput]:
        """Stream a request's outputs; leaving the loop early (or cancelling) aborts it."""
        q = self._open_stream(req_id)
        try:
            await self.call(
                self.engine.add_request,
                req_id,
                prompt_token_ids,
                params,
                hold_blocks,
                num_output_tokens,
            )
        except BaseException:
            self._streams.pop(req_id, None)
            raise
        async for out in self._drain(req_id, q):
            yield out

    async def commit(
        self, req_id: str, first_token_id: int, first_logprob: Logprob | None
    ) -> AsyncIterator[StepOutput]:
        """Decode side of a handoff: join the batch, then stream the tokens sampled here."""
        q = self._open_stream(req_id)
        try:
            done = await self.call(self.engine.commit, req_id, first_token_id, first_logprob)
        except BaseException:
            self._streams.pop(req_id, None)
            raise
        if done is not None:
            self._streams.pop(req_id, None)
            yield done
            return
        async for out in self._drain(req_id, q):
            yield out

    async def abort(self, req_id: str) -> bool:
        return await self.call(self.engine.abort, req_id)

    def _open_stream(self, req_id: str) -> asyncio.Queue:
        if req_id in self._streams:
            raise ValueError(f"request id {req_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[req_id] = (q, asyncio.get_running_loop())
        return q

    async def _drain(self, req_id: str, q: asyncio.Queue) -> AsyncIterator[StepOutput]:
        finished = False
        try:
            while True:
                out = await q.get()
                # a consumer that fell behind takes every queued step at once: one message
                # downstream for several tokens, so a slow stream catches up instead of lagging
                while not q.empty() and not isinstance(out, BaseException):
                    nxt = q.get_nowait()
                    if isinstance(nxt, BaseException):
                        out = nxt
                        break
                    out = StepOutput(
                        out.req_id,
                        out.new_token_ids + nxt.new_token_ids,
                        out.new_logprobs + nxt.new_logprobs,
                        nxt.finish_reason,
                        nxt.num_cached_tokens,
                    )
                if isinstance(out, BaseException):
                    raise EngineDeadError(f"engine failed: {out!r}") from out
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(req_id, None)
            if not finished and self._error is None:
                # the consumer went away (cancelled, disconnected): free the request's blocks
                try:
                    await asyncio.shield(self.call(self.engine.abort, req_id))
                except (asyncio.CancelledError, EngineDeadError):
                    self._calls.put((self.engine.abort, (req_id,), None, None))

    def shutdown(self) -> None:
        self._stop.set()
        self._calls.put((lambda: None, (), None, None))
        self._thread.join(timeout=10)
        if not self._thread.is_alive():  # a stuck step still owns the collectives
            self.engine.shutdown()

    # -- engine thread ------------------------------------------------------------------------
    def _run_calls(self, block: bool) -> None:
        try:
            item = self._calls.get(timeout=0.5) if block else self._calls.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, args, fut, loop = item
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                if fut is not None:
                    loop.call_soon_threadsafe(_set_exception, fut, e)
            else:
                if fut is not None:
                    loop.call_soon_threadsafe(_set_result, fut, result)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_calls(block=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # noqa: BLE001 - an engine bug must not hang clients
                log.exception("engine step failed; failing every open stream")
                self._error = e
                for q, loop in list(self._streams.values()):
                    loop.call_soon_threadsafe(q.put_nowait, e)
                return
            if outputs:
                # one wake-up of each event loop per step, not one per request: at a batch
                # of hundreds, per-token call_soon_threadsafe calls saturate the loop
                by_loop: dict[asyncio.AbstractEventLoop, list] = {}
                for out in outputs:
                    stream = self._streams.get(out.req_id)
                    if stream is not None:
                        by_loop.setdefault(stream[1], []).append((stream[0], out))
                for loop, items in by_loop.items():
                    loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue, StepOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


def _set_result(fut: asyncio.Future, result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
