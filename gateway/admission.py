"""Admission control: a bound on requests in flight plus a small bounded FIFO wait queue.

    arrive -> running < max_running and nobody waiting -> run
           -> queue full                               -> refused (queue_full)
           -> wait (FIFO) -> a slot is handed over      -> run
                          -> queue_timeout_s passes     -> refused (queue_timeout)
    finish -> the slot goes to the oldest waiter, or is freed

A waiter holds only a future: its body is not read until it runs, so memory stays bounded
by max_running bodies plus what the HTTP server buffers per connection.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class Refused(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason  # "queue_full" | "queue_timeout"


class Admission:
    def __init__(self, max_running: int, max_waiting: int, timeout_s: float):
        self.max_running, self.max_waiting, self.timeout_s = max_running, max_waiting, timeout_s
        self.num_running = 0
        self._waiters: deque[asyncio.Future] = deque()
        self.on_change: Callable[[], None] = lambda: None  # after num_running/num_waiting move

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot or raise Refused; release() must follow a successful acquire."""
        if self.num_running < self.max_running and not self._waiters:
            self.num_running += 1
            self.on_change()
            return
        if len(self._waiters) >= self.max_waiting:
            raise Refused("queue_full")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.on_change()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot arrived as we gave up: pass it on
            else:
                fut.cancel()
                self._waiters.remove(fut)
                self.on_change()
            if isinstance(e, asyncio.TimeoutError):
                raise Refused("queue_timeout") from None
            raise

    def release(self) -> None:
        # A handed-over slot stays counted in num_running: it changes owner, never frees.
        if self._waiters:
            self._waiters.popleft().set_result(None)
        else:
            self.num_running -= 1
        self.on_change()
