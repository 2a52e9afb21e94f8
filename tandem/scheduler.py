"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

A request's lifecycle, as queues:
    waiting  --admit (prefix match, blocks for its first chunk)-->  running
    running  --each step: next chunk of its prompt, or one decode token-->  running
    running  --out of blocks: newest request preempted, blocks freed-->  front of waiting
    running  --EOS / stop token / length / abort-->  finished (blocks freed, or held)
    reserved --KV arrived from a prefill server (commit)-->  running

Every step has one token budget (max_num_batched_tokens). Running requests are served first,
oldest first, so decodes are never starved by a long prompt; a prompt larger than what is left
is split into chunks across steps (chunked prefill). A step lists its one-token chunks first
(decodes), then the longer ones: the model runs the first through the decode kernel and the
rest through the prefill kernel (AttentionMetadata.num_decode_rows).
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from tandem.block_manager import BlockManager
from tandem.request import Request, RequestStatus


class ScheduledChunk(NamedTuple):
    req: Request
    num_new_tokens: int


class SchedulerOutput(NamedTuple):
    chunks: list[ScheduledChunk]
    preempted: list[Request]


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.bm = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self._cap_to_pool(req)
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """A request whose KV is already in place (committed handoff) joins the batch."""
        self._cap_to_pool(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _cap_to_pool(self, req: Request) -> None:
        # A request longer than the whole pool would preempt itself forever once it runs alone:
        # it ends with "length" when its KV fills the pool (the last sampled token needs none).
        pool_tokens = self.bm.num_blocks * self.bm.block_size
        req.max_total_tokens = min(req.max_total_tokens or pool_tokens, pool_tokens)
        req.prepare_limits()

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledChunk] = []  # one new token each
        chunks: list[ScheduledChunk] = []  # longer: prompt chunks
        preempted: list[Request] = []

        running, bs = self.running, self.block_size
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            pend = req.num_pending_tokens
            known = len(req.token_ids) + pend
            c = req.num_computed_tokens
            num_new = min(known - c, budget)
            if num_new <= 0 or (
                # the token being sampled ends it (max_tokens, context), or it is a prefill
                # server's (hold_blocks: one token): nothing to schedule after it
                pend and (req.hold_blocks or known >= req.max_num_tokens)
            ):
                i += 1
                continue
            if num_new == 1 and c < len(req.block_table) * bs:
                decodes.append(ScheduledChunk(req, 1))  # a decode step with room in its block
                budget -= 1
                i += 1
                continue
            while not self.bm.can_allocate(req, num_new):
                victim = self.running.pop()  # the newest request gives way
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                self.bm.allocate(req, num_new)
                (decodes if num_new == 1 else chunks).append(ScheduledChunk(req, num_new))
                budget -= num_new
                i += 1

        # no admissions in a step that had to preempt: the pool is already short
        while (
            self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs
        ):
            req = self.waiting[0]
            if req.num_pending_tokens:  # preempted while its last token was being sampled
                break
            if not req.block_table:
                req.num_computed_tokens = req.num_cached_tokens = self.bm.match_prefix(req)
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.bm.can_allocate(req, num_new):
                # Give the prefix hit back (its blocks stay cached, so the retry hits them
                # again): a waiting request holding blocks could starve the preempted request
                # queued before it, with nothing running to free any.
                self.bm.free(req)
                req.num_computed_tokens = req.num_cached_tokens = 0
                break
            self.waiting.popleft()
            self.bm.allocate(req, num_new)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            (decodes if num_new == 1 else chunks).append(ScheduledChunk(req, num_new))
            budget -= num_new
        if chunks and decodes:
            decodes += chunks
        return SchedulerOutput(decodes or chunks, preempted)

    def requeue(self, req: Request) -> None:
        """A running request to be computed again from the start (its step failed:
        tandem/recovery.py), as a preemption does."""
        self.running.remove(req)
        self._preempt(req)

    def _preempt(self, req: Request) -> None:
        self.bm.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def finish(self, req: Request, status: RequestStatus, free_blocks: bool = True) -> None:
        """Take req out of the queues; free its blocks unless it holds them for a KV handoff
        or the caller frees them later (free_blocks=False: a launched step still writes them)."""
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if free_blocks and not req.hold_blocks:
            self.bm.free(req)
