"""Exact prefix index: which prefill server holds which full KV blocks.

Fed by the servers' KV events (stored / evicted block hashes, the same chained hashes the
servers compute, tandem.block_hash). A prompt's blocks are hashed once per block size; a
server's match is the number of leading prompt blocks it holds, since a block hash names the
whole prefix up to that block.

Servers that do not stream KV events are tracked approximately: the router records the
blocks of every prompt it sends them (bounded, oldest forgotten first), as if cached.
"""

from __future__ import annotations

from collections import OrderedDict


class WorkerBlocks:
    """Block hashes one worker holds; LRU-bounded when approximate."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity  # 0: unbounded (exact, driven by evictions)
        self.hashes: OrderedDict[int, None] = OrderedDict()

    def store(self, hashes) -> None:
        for h in hashes:
            self.hashes[h] = None
            self.hashes.move_to_end(h)
        while self.capacity and len(self.hashes) > self.capacity:
            self.hashes.popitem(last=False)

    def evict(self, hashes) -> None:
        for h in hashes:
            self.hashes.pop(h, None)

    def clear(self) -> None:
        self.hashes.clear()

    def num_matched(self, prompt_hashes: list[int]) -> int:
        """Leading prompt blocks held (chained hashes: stop at the first miss)."""
        n = 0
        for h in prompt_hashes:
            if h not in self.hashes:
                break
            n += 1
        return n
