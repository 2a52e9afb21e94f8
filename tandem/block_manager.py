"""Paged KV block pool: allocation on demand, reference counts, prefix caching by chained hash.

A block is in exactly one of three places:
    in use    ref_count > 0, in some request's block_table
    free      ref_count == 0, in `free_queue` (LRU order: evict from the front)
A free block may still hold a cached prefix (its hash is in `cached`); it is reused as-is on a
hash hit and loses its hash only when it is taken for new tokens (eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tandem.block_hash import hash_block_tokens
from tandem.request import Request


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while the block holds a full, cached block of tokens


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block_id
        # prefix-cache counters, in tokens (vLLM's prefix_cache_queries / hits)
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        # KV events for the router's prefix index, drained by the worker (recorded only when
        # a worker feeds a router, so a plain engine does not accumulate them)
        self.record_events = False
        self.stored_hashes: list[int] = []
        self.evicted_hashes: list[int] = []

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_table))

    # -- prefix cache -----------------------------------------------------------------------
    def match_prefix(self, req: Request) -> int:
        """Attach the longest cached prefix of a fresh request; returns the tokens it covers.

        At least one token is always left to compute, since its logits give the next token.
        A request asking for prompt logprobs takes no hit (as in vLLM): they come from the
        logits of every prompt position, and a cached one has none.
        """
        assert not req.block_table and req.num_computed_tokens == 0
        self._extend_hashes(req)
        if req.params.prompt_logprobs is not None:
            return 0
        num_hit = 0
        if self.enable_prefix_caching:
            max_blocks = (req.num_tokens - 1) // self.block_size
            for block_hash in req.block_hashes[:max_blocks]:
                block_id = self.cached.get(block_hash)
                if block_id is None:
                    break
                self._take(block_id)
                req.block_table.append(block_id)
                num_hit += 1
        self.num_queried_tokens += req.num_tokens
        self.num_hit_tokens += num_hit * self.block_size
        return num_hit * self.block_size

    def cache_full_blocks(self, req: Request) -> None:
        """Register the blocks whose tokens are all computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = min(req.num_computed_tokens // self.block_size, len(req.block_table))
        start = req.num_registered_blocks
        if num_full <= start:
            return  # nothing newly full: O(1) on most decode steps
        self._extend_hashes(req)
        req.num_registered_blocks = num_full
        for i in range(start, num_full):
            block = self.blocks[req.block_table[i]]
            if block.hash is not None:
                continue
            block_hash = req.block_hashes[i]
            if block_hash in self.cached:  # computed twice concurrently: keep the first copy
                continue
            block.hash = block_hash
            self.cached[block_hash] = block.block_id
            if self.record_events:
                self.stored_hashes.append(block_hash)

    def _extend_hashes(self, req: Request) -> None:
        bs = self.block_size
        for i in range(len(req.block_hashes), req.num_tokens // bs):
            parent = req.block_hashes[-1] if req.block_hashes else None
            req.block_hashes.append(hash_block_tokens(parent, req.token_ids[i * bs : (i + 1) * bs]))

    # -- allocation -------------------------------------------------------------------------
    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req, num_new_tokens) <= self.num_free_blocks

    def allocate(self, req: Request, num_new_tokens: int) -> list[int]:
        """Give req enough blocks for num_new_tokens more tokens; returns the new block ids."""
        needed = self.blocks_needed(req, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, have {self.num_free_blocks}")
        new_ids = []
        for _ in range(needed):
            block_id = next(iter(self.free_queue))
            self._take(block_id)
            self._evict(self.blocks[block_id])
            new_ids.append(block_id)
        req.block_table.extend(new_ids)
        return new_ids

    def free(self, req: Request) -> None:
        """Return req's blocks. Tail blocks go in first, so they are evicted before the prefix."""
        for block_id in reversed(req.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        req.block_table = []
        req.num_registered_blocks = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _evict(self, block: Block) -> None:
        if block.hash is not None:
            del self.cached[block.hash]
            if self.record_events:
                self.evicted_hashes.append(block.hash)
            block.hash = None

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                self._evict(block)

    def pop_events(self) -> tuple[list[int], list[int]]:
        stored, evicted = self.stored_hashes, self.evicted_hashes
        self.stored_hashes, self.evicted_hashes = [], []
        return stored, evicted
