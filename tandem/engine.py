"""The engine one worker runs: receive -> schedule -> run -> process, one step at a time.

Single-threaded by design: servers call it from one engine thread.

Async scheduling (on for CUDA at tensor-parallel size 1; EngineConfig.async_scheduling): a
step is launched on the GPU and the engine goes on to schedule and launch the next one before
the first one's tokens reach the host, so the host's work (scheduling, input preparation,
processing outputs, the server's calls between steps) overlaps the GPU's instead of leaving it
idle. One step is in flight at a time:

    step() call k:  schedule N+1 -> launch N+1 (inputs of its decode rows taken on the GPU from
                    N's sampled tokens) -> wait for N's tokens -> process N -> return N's outputs

What follows from scheduling a step before the previous one's tokens are known:
  - a request being sampled in the step in flight has num_pending_tokens = 1; the scheduler
    counts that token, and does not schedule a request the pending token ends (max_tokens,
    context length, a prefill server's one token);
  - a request that stops on EOS or a stop token was already scheduled once more: that extra
    token is dropped when its step is processed (its KV write is the EOS token's, correct);
  - blocks of a request in the step in flight are freed only after that step is processed
    (a same-host KV transport may write a freed block from another process at once);
  - penalties and logprobs need the previous tokens on the host: while any request with them
    is in the engine, steps run synchronously (the offline API and servers behave the same);
    a grammar's mask waits for them only at sampling, after the forward (tandem/structured.py).

Besides plain generation it has the two halves of a KV handoff:
    prefill side:  add_request(hold_blocks=True) ... finished -> read KV -> release(req_id)
    decode side:   reserve(...) -> KV written into the reserved blocks -> commit(...)
"""

from __future__ import annotations

import atexit
import logging

import torch

from tandem.block_manager import BlockManager
from tandem.config import EngineConfig, ModelConfig
from tandem.engine_records import EngineFullError, EngineStats, HandoffTarget, StepOutput
from tandem.loader import read_hf_config
from tandem.loader.default_model import resolve_model_dir
from tandem.records import Logprob, SamplingParams
from tandem.request import Request, RequestStatus, finish_reason
from tandem.runner import Launched, ModelRunner
from tandem.scheduler import Scheduler
from tandem.structured import GrammarBackend
from tandem.tp.group import check_tensor_parallel
from tandem.validation import RequestLimits, check_prompt, check_sampling

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.model_dir = (
            resolve_model_dir(cfg.model) if cfg.load_format != "dummy" or cfg.model else None
        )
        if self.model_dir is None:
            raise ValueError("dummy weights still need a model directory with config.json")
        self.hf_config = read_hf_config(self.model_dir, cfg.hf_overrides)
        self.model_cfg = ModelConfig.from_hf(self.hf_config)
        self.max_model_len = cfg.max_model_len or self.model_cfg.max_position_embeddings
        self.limits = RequestLimits(self.model_cfg.vocab_size, self.max_model_len, cfg.max_logprobs)
        check_tensor_parallel(self.model_cfg, cfg.tensor_parallel_size)
        self.tp_workers = None  # ranks 1..N-1 at tensor_parallel_size N > 1
        tp = None
        if cfg.tensor_parallel_size > 1:
            from tandem.tp.launch import TPWorkers

            self.tp_workers = TPWorkers(cfg, self.model_dir, self.hf_config, self.max_model_len)
            tp = self.tp_workers.group
            atexit.register(self.shutdown)
        try:
            self.runner = ModelRunner(cfg, self.model_cfg, self.model_dir, self.max_model_len, tp)
        except BaseException:
            if self.tp_workers is not None:
                self.tp_workers.stop(lambda: None)
            raise
        self.block_manager = BlockManager(
            self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}  # every request the engine holds, any state
        self.eos_token_ids = frozenset(self.model_cfg.eos_token_ids)
        # structured outputs: the tokenizer and compiler load on the first constrained request
        self.grammars = GrammarBackend(self.model_dir, self.limits.vocab_size, self.eos_token_ids)
        self.num_preemptions = 0
        # Admission bound on the waiting queue (servers set it; None: unbounded, the offline
        # API). Preempted requests go back to the queue whatever its length.
        self.max_num_waiting: int | None = None
        auto = self.runner.device.type == "cuda" and cfg.tensor_parallel_size == 1
        self.async_scheduling = auto if cfg.async_scheduling is None else cfg.async_scheduling
        if self.async_scheduling and cfg.tensor_parallel_size > 1:
            raise ValueError("async scheduling needs tensor_parallel_size 1")
        self._inflight: Launched | None = None  # the launched step not processed yet
        self._step_id = 0
        self._deferred_free: list[Request] = []  # finished while their step was in flight
        self._sync_reqs: set[str] = set()  # requests whose sampling needs the host's tokens

    # -- receive ------------------------------------------------------------------------------
    def _new_request(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        num_output_tokens: int = 0,
    ) -> Request:
        """num_output_tokens: the last tokens of prompt_token_ids are earlier outputs of this
        sequence (a migrated request); sampling continues at that output index, so seeds,
        penalties, min_tokens and max_tokens count them."""
        if req_id in self.requests:
            raise ValueError(f"request id {req_id!r} is already in use")
        # the servers checked already (worker/convert.py); the offline API's callers did not
        check_sampling(params)
        check_prompt(prompt_token_ids, params, self.limits, "prompt", num_output_tokens, True)
        if -(-len(prompt_token_ids) // self.cfg.block_size) > self.block_manager.num_blocks:
            raise ValueError("prompt needs more KV blocks than this worker's whole pool")
        req = Request(
            req_id=req_id,
            prompt_token_ids=list(prompt_token_ids[: len(prompt_token_ids) - num_output_tokens]),
            token_ids=list(prompt_token_ids),
            params=params,
            eos_token_ids=self.eos_token_ids,
            max_total_tokens=self.max_model_len,
        )
        if params.structured is not None:  # the servers compiled it before: a cache hit
            req.grammar = self.grammars.new_state(params.structured, req.output_token_ids)
        self.requests[req_id] = req
        asks = self.runner.prompt_logprobs.ask(req)  # prompt logprobs: steps run synchronously too
        if params.needs_penalties or params.logprobs is not None or asks:
            self._sync_reqs.add(req_id)
        return req

    def _drop(self, req_id: str) -> None:
        """req_id leaves the engine's table."""
        self.requests.pop(req_id, None)
        self._sync_reqs.discard(req_id)
        self.runner.prompt_logprobs.forget(req_id)

    def add_request(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        hold_blocks: bool = False,
        num_output_tokens: int = 0,
    ) -> Request:
        if self.max_num_waiting is not None and len(self.scheduler.waiting) >= self.max_num_waiting:
            raise EngineFullError(f"{len(self.scheduler.waiting)} requests are already waiting")
        req = self._new_request(req_id, prompt_token_ids, params, num_output_tokens)
        req.hold_blocks = hold_blocks
        self.scheduler.add(req)
        return req

    def reserve(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        num_output_tokens: int = 0,
    ) -> HandoffTarget | None:
        """Decode side: blocks for the whole prompt, reusing this pool's cached prefix.

        Returns None (nothing reserved) when the pool cannot hold the prompt now.
        """
        req = self._new_request(req_id, prompt_token_ids, params, num_output_tokens)
        num_cached = self.block_manager.match_prefix(req)
        req.num_computed_tokens = num_cached
        if not self.block_manager.can_allocate(req, req.num_tokens - num_cached):
            self.block_manager.free(req)
            self._drop(req_id)
            return None
        self.block_manager.allocate(req, req.num_tokens - num_cached)
        req.num_cached_tokens = num_cached
        req.status = RequestStatus.RESERVED
        return HandoffTarget(list(req.block_table), num_cached)

    def commit(
        self, req_id: str, first_token_id: int, first_logprob: Logprob | None = None
    ) -> StepOutput | None:
        """Decode side: the prompt's KV is in the reserved blocks; join the running batch."""
        req = self.requests.get(req_id)
        if req is None:  # aborted (Abort RPC) just as its KV arrived: nothing to run
            return StepOutput(req_id, [], [], "abort", 0)
        assert req.status == RequestStatus.RESERVED, req.status
        req.num_computed_tokens = req.num_tokens
        self.block_manager.cache_full_blocks(req)
        self.scheduler.add_running(req)
        self._append_token(req, first_token_id, first_logprob)
        if req.status.finished:
            self._finish(req, req.status)
            return StepOutput(req_id, [], [], finish_reason(req.status), req.num_cached_tokens)
        return None

    def release(self, req_id: str) -> None:
        """Prefill side: the held blocks have been sent; give them back (they stay cached)."""
        req = self.requests.get(req_id)
        self._drop(req_id)
        if req is not None and req.block_table:
            self.block_manager.free(req)

    # -- what a KV transport reads and writes (servers never reach into the runner) -----------
    @property
    def kv_cache(self) -> torch.Tensor:
        """This rank's KV pool, [layers, 2, num_blocks, block_size, local kv_heads, head_dim]."""
        return self.runner.kv_cache

    @property
    def kv_transfer_shape(self) -> tuple[int, ...]:
        """The pool's shape with every KV head (what crosses the wire at any TP size)."""
        return self.runner.kv_copy.transfer_shape

    def held_block_ids(self, req_id: str, first_block: int = 0) -> list[int] | None:
        """Prefill side: the request's block ids from first_block (held after it finished, so
        nothing overwrites them until release); None when the request is gone."""
        req = self.requests.get(req_id)
        return None if req is None else list(req.block_table[first_block:])

    def copy_kv_and_release(self, req_id: str, first_block: int = 0) -> torch.Tensor | None:
        """Prefill side: a copy of the request's KV from block first_block with every KV head
        (gathered over the tensor-parallel ranks), [layers, 2, n, block_size, kv_heads,
        head_dim]; then its blocks go back (they stay cached). None when the request is gone
        (aborted after its last step)."""
        req = self.requests.get(req_id)
        if req is None:
            return None
        try:
            return self.runner.kv_copy.gather(req.block_table[first_block:])
        finally:
            self.release(req_id)

    def write_kv(self, block_ids: list[int], layer_start: int, layer_end: int, kv) -> None:
        """Decode side: store kv (every KV head, [layer_end - layer_start, 2, len(block_ids),
        ...]) into block_ids; each tensor-parallel rank keeps its own heads."""
        self.runner.kv_copy.scatter(block_ids, layer_start, layer_end, kv)

    # -- prefix-cache events (the router's prefix index) ----------------------------------------
    def enable_kv_events(self) -> None:
        self.block_manager.record_events = True

    def pop_kv_events(self) -> tuple[list[int], list[int]]:
        """Block hashes (stored, evicted) since the last call."""
        return self.block_manager.pop_events()

    def cached_block_hashes(self) -> list[int]:
        return list(self.block_manager.cached)

    def abort(self, req_id: str) -> bool:
        """Idempotent: False when the request is unknown (finished or never seen)."""
        req = self.requests.get(req_id)
        if req is None:
            return False
        if req.status in (RequestStatus.RESERVED,) or req.status.finished:
            req.hold_blocks = False
            self.block_manager.free(req)
            req.status = RequestStatus.FINISHED_ABORTED
            self._drop(req_id)
        else:
            req.hold_blocks = False
            self._finish(req, RequestStatus.FINISHED_ABORTED)
        return True

    # -- schedule, run, process -----------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._inflight is not None

    def step(self) -> list[StepOutput]:
        """Schedule and launch a step; returns the outputs of the step this call finished
        (under async scheduling, the one launched by the previous call)."""
        prev = self._inflight
        sync = not self.async_scheduling or bool(self._sync_reqs)
        if prev is not None and sync:  # drain: the next call runs a synchronous step
            self._inflight = None
            return self._process(prev)
        sched = self.scheduler.schedule()
        self.num_preemptions += len(sched.preempted)
        if not sched.chunks:
            self._inflight = None
            return self._process(prev) if prev is not None else []
        launched = self._launch(sched.chunks, prev)
        if sync:
            return self._process(launched)
        self._inflight = launched
        return self._process(prev) if prev is not None else []

    def _launch(self, chunks, prev: Launched | None) -> Launched:
        self._step_id += 1
        sid = self._step_id
        sampling = [
            req for req, n in chunks if req.num_computed_tokens + n == req.num_scheduled_tokens
        ]
        launched = self.runner.launch(chunks, sampling, prev)
        for req, n in chunks:
            req.num_computed_tokens += n
            req.step_id = sid
        for i, req in enumerate(sampling):
            req.num_pending_tokens += 1
            req.pending_row = i
        launched.chunk_reqs = [req for req, _ in chunks]
        launched.step_id = sid
        return launched

    def _process(self, launched: Launched) -> list[StepOutput]:
        """Wait for a launched step's tokens and hand them to their requests."""
        tokens, logprobs = self.runner.collect(launched)
        outputs = []
        append, running, bs = self._append_token, RequestStatus.RUNNING, self.cfg.block_size
        take_plp = self.runner.prompt_logprobs.take
        for req, token, logprob in zip(launched.sampling, tokens, logprobs, strict=True):
            req.num_pending_tokens -= 1
            status = req.status
            if status is not running and status.finished:  # aborted, or stopped already
                continue
            append(req, token, logprob)
            plp = None if req.params.prompt_logprobs is None else take_plp(req.req_id)
            if req.status is running:
                outputs.append(
                    StepOutput(req.req_id, [token], [logprob], None, req.num_cached_tokens, "", plp)
                )
                continue
            reason = finish_reason(req.status)
            outputs.append(
                StepOutput(req.req_id, [token], [logprob], reason, req.num_cached_tokens, "", plp)
            )
            if reason is not None:
                self._finish(req, req.status)
        cache = self.block_manager.cache_full_blocks
        for req in launched.chunk_reqs:
            # only when a block filled up (every block_size tokens of a decode)
            if req.num_computed_tokens // bs > req.num_registered_blocks:
                if not req.status.finished:
                    cache(req)
        if self._deferred_free:
            keep = []
            for req in self._deferred_free:
                if req.step_id <= launched.step_id:
                    self.block_manager.free(req)
                else:
                    keep.append(req)
            self._deferred_free = keep
        return outputs

    @staticmethod
    def _append_token(req: Request, token: int, logprob: Logprob | None) -> None:
        toks = req.token_ids
        toks.append(token)
        if logprob is not None:
            req.logprobs.append(logprob)
        n = len(toks)
        if token in req.stop_ids and n >= req.min_num_tokens:
            req.status = RequestStatus.FINISHED_STOPPED
        elif req.grammar is not None and req.grammar.advance(req):  # its end (even ignore_eos)
            req.status = RequestStatus.FINISHED_STOPPED
        elif n >= req.max_num_tokens:
            req.status = RequestStatus.FINISHED_LENGTH

    def _finish(self, req: Request, status: RequestStatus) -> None:
        # the sampled token's KV is never computed: cache only blocks full of computed tokens
        self.block_manager.cache_full_blocks(req)
        inflight = self._inflight
        defer = inflight is not None and req.step_id == inflight.step_id and not req.hold_blocks
        self.scheduler.finish(req, status, free_blocks=not defer)
        if defer:  # the step in flight still writes its KV: free after it is processed
            self._deferred_free.append(req)
        self.runner.tables.forget(req.req_id)
        self._sync_reqs.discard(req.req_id)
        if not req.hold_blocks:
            self._drop(req.req_id)

    def shutdown(self) -> None:
        """Stops the other tensor-parallel ranks (idempotent; nothing to do at size 1)."""
        if self.tp_workers is not None:
            self.tp_workers.stop(self.runner.sync.send_stop)
            atexit.unregister(self.shutdown)

    def num_in_flight_prompt_tokens(self) -> int:
        """Prompt tokens admitted and not computed yet (the router's load measure)."""
        waiting = sum(r.num_tokens - r.num_computed_tokens for r in self.scheduler.waiting)
        running = sum(
            max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in self.scheduler.running
        )
        return waiting + running

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            num_cached_blocks=bm.num_cached_blocks,
            prefix_cache_queries=bm.num_queried_tokens,
            prefix_cache_hits=bm.num_hit_tokens,
            num_preemptions=self.num_preemptions,
        )
