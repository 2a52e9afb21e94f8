"""Model runner: owns the model and the paged KV pool; runs one step's forward and sampling.

A step's chunks become one packed batch (step_inputs.py; decode-only steps on CUDA replay a
graph instead, decode_graphs.py), the model runs it, and the rows that reach the end of their
request are sampled on the device (sampler.py). The pool is sized from memory in kv_pool.py;
its KV crosses to other servers through kv_copy (tp/kv_copy.py).

Prompt logprobs (SamplingParams.prompt_logprobs) come from the same forward: the positions a
request asks for (engine_records.PromptLogprobs.spans) get logits too, only for the requests
that ask, a slice of rows at a time, and log_softmax in fp32 scores each prompt token.

At tensor-parallel size N (tandem/tp) every rank holds a runner with its shard of the model and
of the KV pool (num_kv_heads / N heads). Rank 0 prepares each step's inputs on the host,
broadcasts them (StepSync) and runs the same forward (run_host) as the other ranks, which loop
in serve_worker; only rank 0 gets logits and samples.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from tandem.block_tables import BlockTables
from tandem.config import EngineConfig, ModelConfig, resolve_dtype
from tandem.decode_graphs import DecodeGraphs, graph_batch_sizes
from tandem.engine_records import PromptLogprobs, PromptSpan
from tandem.host_inputs import HostInputs
from tandem.kv_pool import KVLayout, allocate_kv_pool, blocks_from_memory
from tandem.loader import load_model
from tandem.records import Logprob
from tandem.request import Request
from tandem.sampler import gather_logprobs, sample_on_device
from tandem.scheduler import ScheduledChunk
from tandem.step_inputs import StepInputs, to_device
from tandem.structured import grammar_bitmask
from tandem.tp.group import TPGroup
from tandem.tp.kv_copy import KVCopier
from tandem.tp.step_sync import KV_GATHER, KV_SCATTER, STEP, StepSync
from tandem.warmup import warm_up_kernels
from tandem_kernels.registry import get_ops

log = logging.getLogger(__name__)

# prompt-logprob rows per lm_head call: bounds their fp32 [rows, vocab] logits
PROMPT_LOGITS_ROWS = 512


class Launched:
    """One step on its way: the forward and the sampling are queued on the GPU; the sampled
    tokens are being copied into pinned host memory (collect() waits for them)."""

    __slots__ = (
        "sampling",
        "tokens",
        "host_tokens",
        "event",
        "logprobs",
        "chunk_reqs",
        "step_id",
        "prompt",
    )

    def __init__(self, sampling, tokens=None, host_tokens=None, event=None, logprobs=None):
        self.sampling: list[Request] = sampling  # the requests that sample, in row order
        self.tokens: torch.Tensor | None = tokens  # [S] int64 on the device
        self.host_tokens: torch.Tensor | None = host_tokens  # [S] int64, pinned
        self.event: torch.cuda.Event | None = event  # recorded after the copy
        self.logprobs: torch.Tensor | None = logprobs  # [S, V] when a request asked
        self.chunk_reqs: list[Request] = []  # every request of the step (set by the engine)
        self.step_id = -1
        # prompt logprobs on their way: ([(req_id, target token ids, k)], device scores)
        self.prompt: tuple[list, tuple[torch.Tensor, ...]] | None = None


class ModelRunner:
    def __init__(
        self,
        cfg: EngineConfig,
        model_cfg: ModelConfig,
        model_dir,
        max_model_len: int,
        tp: TPGroup | None = None,
    ) -> None:
        self.tp = tp = tp or TPGroup()
        self.device = device = cfg.torch_device(tp.rank)
        dtype = resolve_dtype(cfg.dtype, device)
        self.block_size = cfg.block_size
        self.ops = get_ops(cfg.kernel_backend, device)
        load_format = cfg.load_format
        if load_format == "auto":
            load_format = "safetensors"
        self.model = load_model(
            model_dir,
            model_cfg,
            self.ops,
            device,
            dtype,
            max_model_len,
            load_format,
            cfg.seed,
            tp,
        )
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        layout = KVLayout(
            model_cfg.num_layers,
            self.block_size,
            model_cfg.num_kv_heads // tp.size,  # this rank's KV heads
            model_cfg.head_dim,
            dtype,
        )
        self.block_bytes = layout.block_bytes
        # every rank's pool has the same block ids: the smallest count any rank can hold
        self.num_blocks = tp.min_int(
            cfg.num_blocks or blocks_from_memory(cfg, layout, self.model, device)
        )
        self.kv_cache = allocate_kv_pool(layout, self.num_blocks, device, cfg.kv_cache_file)
        self.kv_caches = [
            (self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(model_cfg.num_layers)
        ]
        max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.tables = BlockTables(max_blocks_per_seq)
        self.inputs = StepInputs(self.tables, self.block_size, device)
        self.prompt_logprobs = PromptLogprobs()  # the engine asks, takes and forgets
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and not cfg.enforce_eager and cfg.cuda_graph_max_batch_size:
            sizes = graph_batch_sizes(min(cfg.cuda_graph_max_batch_size, cfg.max_num_seqs))
            self.graphs = self._capture_graphs(max_blocks_per_seq, sizes)
        if device.type == "cuda":
            warm_up_kernels(
                self.model,
                self.inputs,
                self.kv_caches,
                max_blocks_per_seq * self.block_size,  # >= max_model_len
                cfg.max_num_batched_tokens,
                cfg.max_num_seqs,
            )
        self.sync = StepSync(tp) if tp.size > 1 else None
        self.kv_copy = KVCopier(self.kv_cache, model_cfg.num_kv_heads, tp, self.sync, device)
        log.info(
            "event=kv_cache num_blocks=%d block_size=%d backend=%s tp_rank=%d/%d",
            self.num_blocks,
            self.block_size,
            self.ops.name,
            tp.rank,
            tp.size,
        )

    def _capture_graphs(self, max_blocks_per_seq: int, sizes: list[int]) -> DecodeGraphs | None:
        """At tp > 1 every rank captures the same graphs in the same order (the NCCL
        all-reduces inside them) and replays them in lockstep; if any rank's capture fails,
        every rank runs decode eagerly (they agree through the cpu group)."""

        def capture() -> DecodeGraphs:
            return DecodeGraphs(
                self.model,
                self.kv_caches,
                self.tables,
                self.block_size,
                max_blocks_per_seq,
                self.tp,
                self.device,
                sizes,
            )

        if self.tp.size == 1:
            return capture()
        try:
            graphs = capture()
        except RuntimeError:
            log.exception("event=cuda_graph_capture_failed tp_rank=%d", self.tp.rank)
            graphs = None
        if self.tp.min_int(int(graphs is not None)) == 0:
            log.warning("event=cuda_graphs_off reason=capture_failed tp_size=%d", self.tp.size)
            return None
        return graphs

    def _graph_fits(self, num_seqs: int, decode_only: bool) -> bool:
        g = self.graphs
        return g is not None and decode_only and num_seqs <= g.max_batch_size

    @torch.inference_mode()
    def launch(
        self, chunks: list[ScheduledChunk], sampling: list[Request], prev: Launched | None
    ) -> Launched:
        """Queue one step's forward and sampling on the device and start copying the sampled
        tokens to the host; returns without waiting for the GPU. sampling: the requests whose
        chunk reaches their end, in chunk order. A decode chunk whose input token is not on the
        host yet (c == len(token_ids): async scheduling) takes it from prev.tokens on the
        device, at row req.pending_row."""
        pending: list[tuple[int, int]] = []
        spans = self.prompt_logprobs.spans(chunks)
        prompt = None
        if self.sync is not None:  # tensor parallel: every rank runs the same inputs
            host = self.inputs.prepare_host(chunks, pending, spans)
            assert not pending, "async scheduling is off at tensor-parallel size > 1"
            self.sync.send_step(host)
            logits = self.run_host(host)
            if spans:  # the prompt rows follow the sampled ones
                s = len(sampling)
                prompt = self._score_prompt(chunks, spans, None, logits[s:])
                logits = logits[:s]
        elif not spans and self._graph_fits(len(chunks), all(n == 1 for _, n in chunks)):
            staged = self.graphs.stage(chunks, prev.tokens if prev is not None else None)
            hidden = self.graphs.replay(*staged)  # decode: every chunk samples, rows 0..B-1
            logits = self.model.compute_logits(hidden)
        else:
            ids, pos, meta, rows = self.inputs.prepare(chunks, pending, spans)
            if pending:
                self._fill_pending(ids, pending, prev)
            hidden = self.model(ids, pos, meta, self.kv_caches)
            if spans:
                prompt_rows, rows = rows[len(sampling) :], rows[: len(sampling)]
                idx = to_device(np.asarray(prompt_rows, dtype=np.int64), self.device)
                prompt = self._score_prompt(chunks, spans, hidden.index_select(0, idx))
            if sampling:  # rows through pinned memory: indexing with a list would sync
                idx = to_device(np.asarray(rows, dtype=np.int64), self.device)
                logits = self.model.compute_logits(hidden.index_select(0, idx))
        if not sampling:
            launched = Launched([])
            launched.prompt = prompt
            return launched
        mask = grammar_bitmask(logits, sampling, prev)  # constrained rows wait for prev's tokens
        tokens, logprobs = sample_on_device(logits, sampling, self.gen, mask)
        if self.device.type != "cuda":
            launched = Launched(sampling, tokens, tokens, None, logprobs)
        else:
            host = torch.empty(len(sampling), dtype=torch.long, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            launched = Launched(sampling, tokens, host, event, logprobs)
        launched.prompt = prompt
        return launched

    def _score_prompt(
        self,
        chunks: list[ScheduledChunk],
        spans: list[PromptSpan],
        hidden: torch.Tensor | None,
        logits: torch.Tensor | None = None,
    ) -> tuple[list, tuple[torch.Tensor, ...]] | None:
        """Each span's prompt tokens scored from the logits of the positions before them
        (given, or from their hidden rows PROMPT_LOGITS_ROWS at a time): the token's
        logprob and rank, and the top-k. None on the ranks > 0 (no logits there)."""
        metas, targets = [], []
        for i, start, end in spans:
            req = chunks[i].req
            ids = req.token_ids[start + 1 : end + 1]
            metas.append((req.req_id, ids, req.params.prompt_logprobs))
            targets += ids
        k = max(m[2] for m in metas)
        target = torch.tensor(targets, dtype=torch.long).to(self.device, non_blocking=True)
        if logits is not None:
            return metas, _prompt_scores(logits, target, k)
        parts = []
        for a in range(0, len(targets), PROMPT_LOGITS_ROWS):
            b = a + PROMPT_LOGITS_ROWS
            part = self.model.compute_logits(hidden[a:b])  # every rank: a collective at tp > 1
            if part is not None:
                parts.append(_prompt_scores(part, target[a:b], k))
        if not parts:
            return None
        return metas, tuple(torch.cat(t) for t in zip(*parts, strict=True))

    def _fill_pending(
        self, input_ids: torch.Tensor, pending: list[tuple[int, int]], prev: Launched | None
    ) -> None:
        assert prev is not None and prev.tokens is not None, "a pending token needs its step"
        idx = to_device(np.asarray(pending, dtype=np.int64).T.copy(), self.device)
        input_ids.index_copy_(0, idx[0], prev.tokens.index_select(0, idx[1]))

    def collect(self, launched: Launched) -> tuple[list[int], list[Logprob | None]]:
        """Wait for a launched step's sampled tokens (the one host sync of a step)."""
        if launched.prompt is not None:
            self._collect_prompt(*launched.prompt)
        if not launched.sampling:
            return [], []
        if launched.event is not None:
            launched.event.synchronize()  # releases the GIL while it waits
        tokens = launched.host_tokens.tolist()
        return tokens, gather_logprobs(tokens, launched.logprobs, launched.sampling)

    def _collect_prompt(self, metas: list, scores: tuple[torch.Tensor, ...]) -> None:
        logprob, rank, top_vals, top_ids = (t.tolist() for t in scores)
        r = 0
        for req_id, ids, k in metas:
            entries = [
                Logprob(
                    t,
                    logprob[r + j],
                    list(zip(top_ids[r + j][:k], top_vals[r + j][:k], strict=True)),
                    rank[r + j],
                )
                for j, t in enumerate(ids)
            ]
            r += len(ids)
            self.prompt_logprobs.add(req_id, entries)

    @torch.inference_mode()
    def run_host(self, host: HostInputs) -> torch.Tensor | None:
        """The forward of one step from host inputs, on every rank: rank 0 gets the logits of
        host.logits_rows (None when nothing samples), the other ranks None."""
        num_seqs = len(host.seq_lens)
        every_row_samples = host.logits_rows == list(range(num_seqs))  # no prompt rows
        if every_row_samples and self._graph_fits(num_seqs, host.decode_only):
            hidden = self.graphs.run_host(host)  # decode: every row samples
        else:
            ids, pos, meta = self.inputs.device_inputs(host)
            hidden = self.model(ids, pos, meta, self.kv_caches)
            if not host.logits_rows:
                return None
            hidden = hidden[host.logits_rows]
        return self.model.compute_logits(hidden)

    def serve_worker(self) -> None:
        """Ranks > 0: run every step (and KV copy) rank 0 broadcasts, until it says stop."""
        while True:
            kind, msg = self.sync.recv()
            if kind == STEP:
                self.run_host(msg)
            elif kind == KV_GATHER:
                self.kv_copy.gather_part(*msg)
            elif kind == KV_SCATTER:
                self.kv_copy.scatter_part(*msg)
            else:
                return


def _prompt_scores(
    logits: torch.Tensor, target: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 logits [R, V] and the tokens they score [R] -> each token's logprob and rank
    (1: the most likely), and the top-k logprobs and ids [R, k]."""
    lp = logits.float().log_softmax(-1)
    tok = lp.gather(1, target[:, None])
    rank = (lp > tok).sum(-1) + 1
    top_vals, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], target[:, None][:, :0])
    return tok[:, 0], rank, top_vals, top_ids
