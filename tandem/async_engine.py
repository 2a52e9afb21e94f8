"""The engine on its own thread, driven from asyncio (the servers' event loop).

    asyncio side                         engine thread
    ------------                         -------------
    call(fn) / generate(...) --queue-->  run pending calls between steps
                                         step() -> outputs
    per-request OutputStream <--one loop.call_soon_threadsafe per step-- outputs
      consumed by `async for`, or handed to a callback by pump() (no task per output)

Everything that touches the engine (add, abort, reserve, commit, KV reads) runs on the engine
thread, so the engine itself needs no locks.

Faults: a call that raises hands its exception to its caller (a request that got halfway in
is taken out again); a step that raises fails the request it names, or else the requests of
that step, and the loop goes on (tandem/recovery.py). An engine that cannot go on (repeated
step failures, a device error) is dead: every stream and call gets EngineDeadError, and
`wait_dead()` returns, for the server to report NOT_SERVING and exit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from tandem.engine import LLMEngine
from tandem.engine_records import EngineDeadError, EngineFullError, StepOutput
from tandem.output_stream import OutputStream
from tandem.records import Logprob, SamplingParams
from tandem.recovery import MAX_CONSECUTIVE_STEP_FAILURES, is_unrecoverable, recover

log = logging.getLogger(__name__)

DEFAULT_MAX_NUM_WAITING = 1024  # a server's waiting-queue bound (the router admits 1024)


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        max_num_waiting: int | None = DEFAULT_MAX_NUM_WAITING,
        stream_interval: int = 1,
    ) -> None:
        """max_num_waiting bounds the engine's waiting queue: beyond it `generate` raises
        EngineFullError (the servicers answer RESOURCE_EXHAUSTED; the router tries another
        server or refuses with a retryable status). stream_interval N (vLLM's and SGLang's
        --stream-interval): a stream's tokens are handed to its consumer N at a time (its
        first and its last at once), so a large batch costs the event loop N times fewer
        wake-ups and gRPC messages per step."""
        if stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")
        self.engine = engine
        self.stream_interval = stream_interval
        engine.max_num_waiting = max_num_waiting
        self._calls: queue.SimpleQueue[
            tuple[Callable, tuple, asyncio.Future, asyncio.AbstractEventLoop]
        ] = queue.SimpleQueue()
        self._streams: dict[str, OutputStream] = {}
        self._stop = threading.Event()
        self._error: BaseException | None = None  # set once: the engine is dead
        self._num_step_failures = 0  # in a row
        self._dead_lock = threading.Lock()
        self._dead_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
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
        if self._error is not None:  # died as it was queued: nobody else will answer it
            self._fail_calls()
        return await fut

    async def wait_dead(self) -> BaseException:
        """Returns (the error) once the engine can no longer go on."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._dead_lock:
            if self._error is not None:
                return self._error
            self._dead_waiters.append((loop, fut))
        return await fut

    @property
    def dead(self) -> bool:
        return self._error is not None

    async def open_stream(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        hold_blocks: bool = False,
        num_output_tokens: int = 0,
    ) -> OutputStream:
        """Add a request; its outputs arrive on the returned stream, which the caller must
        `aclose()` (that aborts the request unless it finished)."""
        stream = self._open_stream(req_id)
        try:
            await self.call(
                self.engine.add_request,
                req_id,
                prompt_token_ids,
                params,
                hold_blocks,
                num_output_tokens,
            )
        except BaseException as e:
            self._streams.pop(req_id, None)
            if not isinstance(e, (ValueError, EngineFullError, EngineDeadError)):
                # not a refusal (nothing was added then): a cancel, whose add runs anyway, or a
                # bug halfway in; abort (idempotent) so that nothing is left holding blocks
                self._calls.put((self.engine.abort, (req_id,), None, None))
            raise
        return stream

    async def generate(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        hold_blocks: bool = False,
        num_output_tokens: int = 0,
    ) -> AsyncIterator[StepOutput]:
        """Stream a request's outputs; leaving the loop early (or cancelling) aborts it."""
        stream = await self.open_stream(
            req_id, prompt_token_ids, params, hold_blocks, num_output_tokens
        )
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    async def open_commit(
        self, req_id: str, first_token_id: int, first_logprob: Logprob | None
    ) -> OutputStream | StepOutput:
        """Decode side of a handoff: join the batch; the stream of the tokens sampled here
        (the caller must `aclose()` it), or the request's last output when the first token
        already finished it."""
        stream = self._open_stream(req_id)
        try:
            done = await self.call(self.engine.commit, req_id, first_token_id, first_logprob)
        except BaseException:
            self._streams.pop(req_id, None)
            raise
        if done is not None:
            self._streams.pop(req_id, None)
            return done
        return stream

    async def pump(self, stream: OutputStream, sink: Callable[[StepOutput], None]) -> None:
        """Hand each of the stream's outputs to sink(output), called on the loop from the
        engine's per-step callback itself: no consumer task is woken per output (a session
        carrying hundreds of requests pays one callback per step, not one wake-up each).
        Returns once the output with a finish_reason was handed; raises EngineDeadError if
        the engine failed. The caller still `aclose()`s the stream (that aborts it when the
        wait is cancelled)."""
        done = stream.loop.create_future()
        stream._sink, stream._done = sink, done
        pending, stream._pending = stream._pending, []
        if pending:
            stream._feed(pending)
        await done

    async def abort(self, req_id: str) -> bool:
        return await self.call(self.engine.abort, req_id)

    async def release(self, req_id: str) -> None:
        await self.call(self.engine.release, req_id)

    async def held_block_ids(self, req_id: str, first_block: int = 0) -> list[int] | None:
        return await self.call(self.engine.held_block_ids, req_id, first_block)

    async def copy_kv_and_release(self, req_id: str, first_block: int = 0):
        return await self.call(self.engine.copy_kv_and_release, req_id, first_block)

    async def write_kv(self, block_ids: list[int], layer_start: int, layer_end: int, kv) -> None:
        await self.call(self.engine.write_kv, block_ids, layer_start, layer_end, kv)

    async def pop_kv_events(self) -> tuple[list[int], list[int]]:
        return await self.call(self.engine.pop_kv_events)

    async def cached_block_hashes(self) -> list[int]:
        return await self.call(self.engine.cached_block_hashes)

    def _open_stream(self, req_id: str) -> OutputStream:
        if req_id in self._streams:
            raise ValueError(f"request id {req_id!r} is already in use")
        loop = asyncio.get_running_loop()
        stream = OutputStream(req_id, loop, self._streams, self._abort_unfinished)
        self._streams[req_id] = stream
        return stream

    async def _abort_unfinished(self, req_id: str) -> None:
        """A consumer went away (cancelled, disconnected): free the request's blocks."""
        if self._error is not None:
            return
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
                self._num_step_failures = 0
            except BaseException as e:  # noqa: BLE001 - an engine bug must not hang clients
                outputs = self._recover(e)
                if outputs is None:
                    return
            if outputs:
                # one wake-up of each event loop per step, not one per request: at a batch
                # of hundreds, per-token call_soon_threadsafe calls saturate the loop
                by_loop: dict[asyncio.AbstractEventLoop, list] = {}
                streams = self._streams
                interval = self.stream_interval
                for out in outputs:
                    stream = streams.get(out.req_id)
                    if stream is None:
                        continue
                    held = stream._held
                    if interval > 1 and out.finish_reason is None and stream._handed:
                        held.append(out)  # engine thread only: no lock
                        if len(held) < interval:
                            continue
                        stream._held, batch = [], held
                    elif held:
                        stream._held, batch = [], [*held, out]
                    else:
                        batch = [out]
                    stream._handed = True
                    items = by_loop.get(stream.loop)
                    if items is None:
                        items = by_loop[stream.loop] = []
                    items.append((stream, batch))
                for loop, items in by_loop.items():
                    loop.call_soon_threadsafe(_deliver, items)

    def _recover(self, e: BaseException) -> list[StepOutput] | None:
        """The outputs of the requests failed for a step that raised e; None: dead."""
        self._num_step_failures += 1
        n = self._num_step_failures
        if n < MAX_CONSECUTIVE_STEP_FAILURES and not is_unrecoverable(self.engine, e):
            log.error("event=engine_step_failed in_a_row=%d", n, exc_info=e)
            try:
                return recover(self.engine, e)
            except Exception as again:  # noqa: BLE001 - not in order: it cannot go on
                again.__cause__ = e
                e = again
        log.critical("event=engine_dead steps_failed_in_a_row=%d", n, exc_info=e)
        self._die(e)
        return None

    def _die(self, e: BaseException) -> None:
        """Engine thread: every open stream, queued call and wait_dead() learns it."""
        with self._dead_lock:
            self._error = e
            waiters, self._dead_waiters = self._dead_waiters, []
        for stream in list(self._streams.values()):
            _call_soon(stream.loop, _deliver, [(stream, [*stream._held, e])])
        for loop, fut in waiters:
            _call_soon(loop, _set_result, fut, e)
        self._fail_calls()

    def _fail_calls(self) -> None:
        """Answer every queued call with EngineDeadError (the engine thread runs none now)."""
        while True:
            try:
                _, _, fut, loop = self._calls.get_nowait()
            except queue.Empty:
                return
            if fut is not None:
                err = EngineDeadError(f"engine failed: {self._error!r}")
                _call_soon(loop, _set_exception, fut, err)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that loop is closed: nobody is waiting there
        pass


def _deliver(items: list[tuple[OutputStream, list[StepOutput | BaseException]]]) -> None:
    for stream, outs in items:
        if stream._sink is not None:
            stream._feed(outs)
            continue
        stream._pending += outs
        waiter = stream._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _set_result(fut: asyncio.Future, result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
