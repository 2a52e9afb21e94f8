"""Model runner: owns the model and the paged KV pool; turns scheduled chunks into one forward.

Input preparation for a packed batch (chunk of request b covers positions [c_b, c_b + n_b)):

    input_ids       = concat(token_ids_b[c_b : c_b + n_b])
    positions       = concat(range(c_b, c_b + n_b))
    slot_mapping[t] = block_table_b[pos // bs] * bs + pos % bs
    seq_lens[b]     = c_b + n_b
    logits rows     = the last token of every chunk that reaches the end of its request

At tensor-parallel size N (tandem/tp) every rank holds a runner with its shard of the model and
of the KV pool (num_kv_heads / N heads). Rank 0 prepares each step's inputs on the host,
broadcasts them (StepSync) and runs the same forward (run_host) as the other ranks, which loop
in serve_worker; only rank 0 gets logits and samples.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from tandem.config import EngineConfig, ModelConfig, resolve_dtype
from tandem.decode_graphs import DecodeGraphs, graph_batch_sizes
from tandem.host_inputs import HostInputs
from tandem.loader import load_model
from tandem.models.attention_metadata import AttentionMetadata
from tandem.request import Logprob, Request
from tandem.sampler import gather_logprobs, sample_on_device
from tandem.scheduler import ScheduledChunk
from tandem.tp.group import TPGroup
from tandem.tp.step_sync import KV_GATHER, KV_SCATTER, STEP, StepSync
from tandem_kernels.registry import get_ops

log = logging.getLogger(__name__)


class Launched:
    """One step on its way: the forward and the sampling are queued on the GPU; the sampled
    tokens are being copied into pinned host memory (collect() waits for them)."""

    __slots__ = ("sampling", "tokens", "host_tokens", "event", "logprobs", "chunk_reqs", "step_id")

    def __init__(self, sampling, tokens=None, host_tokens=None, event=None, logprobs=None):
        self.sampling: list[Request] = sampling  # the requests that sample, in row order
        self.tokens: torch.Tensor | None = tokens  # [S] int64 on the device
        self.host_tokens: torch.Tensor | None = host_tokens  # [S] int64, pinned
        self.event: torch.cuda.Event | None = event  # recorded after the copy
        self.logprobs: torch.Tensor | None = logprobs  # [S, V] when a request asked
        self.chunk_reqs: list[Request] = []  # every request of the step (set by the engine)
        self.step_id = -1


# block tables' width is a multiple of this (see _host_inputs)
TABLE_WIDTH_ALIGN = 16


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(a)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device.type == "cpu" else t.to(device)


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
        self.device = cfg.torch_device(tp.rank)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.block_size = cfg.block_size
        self.model_cfg = model_cfg
        self.num_kv_heads = model_cfg.num_kv_heads // tp.size  # this rank's KV heads
        self.ops = get_ops(cfg.kernel_backend, self.device)
        load_format = cfg.load_format
        if load_format == "auto":
            load_format = "safetensors"
        self.model = load_model(
            model_dir,
            model_cfg,
            self.ops,
            self.device,
            self.dtype,
            max_model_len,
            load_format,
            cfg.seed,
            tp,
        )
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        # every rank's pool has the same block ids: the smallest count any rank can hold
        self.num_blocks = tp.min_int(cfg.num_blocks or self._blocks_from_memory(cfg))
        # one pool for all layers: [layer, k|v, block, slot in block, kv head, head dim]
        shape = (
            model_cfg.num_layers,
            2,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            model_cfg.head_dim,
        )
        if cfg.kv_cache_file:
            if self.device.type != "cpu":
                raise ValueError("kv_cache_file (a shared-memory KV pool) is for CPU engines")
            # a new file reads as zeros; pages are only allocated when written
            numel = int(np.prod(shape))
            self.kv_cache = torch.from_file(
                cfg.kv_cache_file, shared=True, size=numel, dtype=self.dtype
            ).view(shape)
        else:
            self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kv_caches = [
            (self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(model_cfg.num_layers)
        ]
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        # block tables as int32 rows of one array, a slot per request, extended in place as
        # blocks are appended: a step copies only new entries (preparation does not grow with
        # context) and gathers a batch's rows in one numpy operation
        self._tables = np.zeros((64, self.max_blocks_per_seq), dtype=np.int32)
        self._slot_of: dict[str, int] = {}
        self._slot_src: list[list[int] | None] = [None] * 64  # the block_table a row mirrors
        self._slot_filled = [0] * 64
        self._free_slots = list(range(63, -1, -1))
        # a mixed step's decode rows (the engine puts them first) go through the decode kernel,
        # which reads each KV head once for its query heads: the prefill kernel's tiles would
        # read it once per query head and fill a BLOCK_M-row tile for one row (False: one
        # prefill-kernel call for every row, for comparisons)
        self.split_mixed_attention = True
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not cfg.enforce_eager and cfg.cuda_graph_max_batch_size:
            sizes = graph_batch_sizes(min(cfg.cuda_graph_max_batch_size, cfg.max_num_seqs))
            self.graphs = self._capture_graphs(sizes)
        if self.device.type == "cuda":
            self._warm_up_kernels(cfg.max_num_batched_tokens, cfg.max_num_seqs)
        self.sync = StepSync(tp) if tp.size > 1 else None
        log.info(
            "kv cache num_blocks=%d block_size=%d backend=%s tp_rank=%d/%d",
            self.num_blocks,
            self.block_size,
            self.ops.name,
            tp.rank,
            tp.size,
        )

    def _capture_graphs(self, sizes: list[int]) -> DecodeGraphs | None:
        """At tp > 1 every rank captures the same graphs in the same order (the NCCL
        all-reduces inside them) and replays them in lockstep; if any rank's capture fails,
        every rank runs decode eagerly (they agree through the cpu group)."""
        if self.tp.size == 1:
            return DecodeGraphs(self, sizes)
        try:
            graphs = DecodeGraphs(self, sizes)
        except RuntimeError:
            log.exception("event=cuda_graph_capture_failed tp_rank=%d", self.tp.rank)
            graphs = None
        if self.tp.min_int(int(graphs is not None)) == 0:
            log.warning("event=cuda_graphs_off reason=capture_failed tp_size=%d", self.tp.size)
            return None
        return graphs

    @property
    def block_bytes(self) -> int:
        m = self.model_cfg
        return (
            m.num_layers
            * 2
            * self.block_size
            * self.num_kv_heads
            * m.head_dim
            * self.dtype.itemsize
        )

    def _blocks_from_memory(self, cfg: EngineConfig) -> int:
        """KV blocks from this process's share of the GPU: gpu_memory_utilization is the
        fraction of the whole GPU this process may use (weights + activations + KV), as in
        vLLM V1, so a prefill and a decode server can share one GPU with, say, 0.3 and 0.6.
        The free memory caps it, less a margin for the CUDA context and graphs."""
        if self.device.type != "cuda":
            return max(16, int(cfg.cpu_kv_cache_gib * 2**30) // self.block_bytes)
        torch.cuda.synchronize()
        peak = self._profile_activation_bytes(cfg.max_num_batched_tokens)
        free, total = torch.cuda.mem_get_info(self.device)
        ours = torch.cuda.memory_reserved(self.device)
        budget = min(total * cfg.gpu_memory_utilization - ours - peak, free - peak - (1 << 30))
        if budget < self.block_bytes * 16:
            raise RuntimeError(
                f"not enough GPU memory for the KV cache (budget {budget / 2**30:.2f} GiB, "
                f"{free / 2**30:.1f} GiB free); raise --gpu-memory-utilization or lower "
                "--max-num-batched-tokens"
            )
        log.info(
            "event=kv_budget gib=%.2f weights_and_reserved_gib=%.2f activation_peak_gib=%.2f",
            budget / 2**30,
            ours / 2**30,
            peak / 2**30,
        )
        return int(budget // self.block_bytes)

    @torch.inference_mode()
    def _profile_activation_bytes(self, num_tokens: int) -> int:
        """Peak memory of one forward over a full token budget, without a KV cache yet."""
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        m = self.model_cfg
        scratch = torch.zeros(
            m.num_layers,
            2,
            1,
            num_tokens,
            self.num_kv_heads,
            m.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        caches = [(scratch[i, 0], scratch[i, 1]) for i in range(m.num_layers)]
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        pos = torch.arange(num_tokens, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=pos.clone(),
            block_tables=torch.zeros(1, 1, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            max_query_len=num_tokens,
            decode_only=False,
        )
        hidden = self.model(ids, pos, meta, caches)
        self.model.compute_logits(hidden[-256:])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del scratch, caches, hidden
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def _warm_up_kernels(self, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        """Compile, at startup, the kernel variants that the first traffic would otherwise
        compile mid-step (a second or more each, stalling every running request): prefill
        chunks on both sides of the tile-size switch at 1k tokens, a mixed step (decode rows
        + a chunk) and decode batches outside CUDA graphs. Tiny eager forwards over the real
        cache that write no KV (slot -1) and whose outputs are dropped; every tensor-parallel
        rank runs the same ones in the same order (the all-reduces inside)."""
        t0 = time.perf_counter()
        dev, bs = self.device, self.block_size
        max_len = self.max_blocks_per_seq * bs  # >= max_model_len: positions stay in range
        lengths = [16]
        if min(max_num_batched_tokens, max_len) > 1024:
            lengths.append(min(max_num_batched_tokens, max_len, 1040))
        batches: list[tuple[list[int], list[int]]] = [([n], [n]) for n in lengths]
        batches.append(([1, 1, 16], [17, 17, 16]))  # mixed: 2 decode rows, then a chunk
        # decode batches within the step limits (the profile pass sized activations for them)
        most = min(max_num_seqs, max_num_batched_tokens)
        batches += [([1] * b, [17] * b) for b in (1, 256) if b <= most]
        for q_lens, seq_lens in batches:
            # the steps' own inputs (_device_inputs), every slot -1 and every block 0
            starts = np.zeros(len(q_lens) + 1, dtype=np.int32)
            np.cumsum(q_lens, out=starts[1:])
            pos = [p for q, s in zip(q_lens, seq_lens, strict=True) for p in range(s - q, s)]
            width = self._table_width(-(-max(seq_lens) // bs))
            host = HostInputs(
                input_ids=np.zeros(len(pos), dtype=np.int64),
                positions=np.array(pos, dtype=np.int64),
                slots=np.full(len(pos), -1, dtype=np.int64),
                seq_lens=np.array(seq_lens, dtype=np.int32),
                query_start_loc=starts,
                block_tables=np.zeros((len(q_lens), width), dtype=np.int32),
                logits_rows=[],
                max_query_len=max(q_lens),
            )
            self.model(*self._device_inputs(host), self.kv_caches)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        log.info("event=kernels_warmed_up seconds=%.2f", time.perf_counter() - t0)

    def _table_width(self, max_blocks: int) -> int:
        """A step's block-table width: max_blocks rounded up to a multiple of
        TABLE_WIDTH_ALIGN (within the rows' own width, which the decode graphs' tables have
        too), so the tables' row stride never changes what Triton specializes a kernel on."""
        padded = -(-max_blocks // TABLE_WIDTH_ALIGN) * TABLE_WIDTH_ALIGN
        return max(max_blocks, min(padded, self._tables.shape[1]))

    def _slot(self, req: Request) -> int:
        """req's row in self._tables, brought up to date with its block table."""
        slot = self._slot_of.get(req.req_id)
        table = req.block_table
        if slot is None:
            if not self._free_slots:
                self._grow_slots()
            slot = self._slot_of[req.req_id] = self._free_slots.pop()
            self._slot_src[slot], filled = table, 0
        elif self._slot_src[slot] is not table:  # its table was reset (preempted)
            self._slot_src[slot], filled = table, 0
        else:
            filled = self._slot_filled[slot]
        n = len(table)
        if n > filled:
            if n > self._tables.shape[1]:  # longer than max_model_len (pool-capped runs)
                wider = np.zeros((len(self._tables), n + 16), dtype=np.int32)
                wider[:, : self._tables.shape[1]] = self._tables
                self._tables = wider
            self._tables[slot, filled:n] = table[filled:]
            self._slot_filled[slot] = n
        return slot

    def _grow_slots(self) -> None:
        old = len(self._tables)
        self._tables = np.concatenate([self._tables, np.zeros_like(self._tables)])
        self._slot_src += [None] * old
        self._slot_filled += [0] * old
        self._free_slots += range(2 * old - 1, old - 1, -1)

    def _table_row(self, req: Request) -> np.ndarray:
        slot = self._slot(req)  # first: it may grow (replace) the array
        return self._tables[slot]

    def forget(self, req_id: str) -> None:
        """The request left this runner (finished, aborted, released)."""
        slot = self._slot_of.pop(req_id, None)
        if slot is not None:
            self._slot_src[slot] = None
            self._slot_filled[slot] = 0
            self._free_slots.append(slot)

    def prepare(
        self, chunks: list[ScheduledChunk], pending: list[tuple[int, int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        host = self.prepare_host(chunks, pending)
        return (*self._device_inputs(host), host.logits_rows)

    def prepare_host(
        self, chunks: list[ScheduledChunk], pending: list[tuple[int, int]] | None = None
    ) -> HostInputs:
        """pending: where to collect (packed row, row in the previous step's sampled tokens)
        for decode chunks whose input token is still on the GPU (async scheduling); their
        input_ids entry is left 0 for the caller to fill on the device."""
        bs = self.block_size
        n_seqs = len(chunks)
        lens = np.fromiter((n for _, n in chunks), dtype=np.int64, count=n_seqs)
        starts = np.zeros(n_seqs + 1, dtype=np.int64)
        np.cumsum(lens, out=starts[1:])
        total = int(starts[-1])
        input_ids = np.empty(total, dtype=np.int64)
        positions = np.empty(total, dtype=np.int64)
        slots = np.empty(total, dtype=np.int64)
        seq_lens = np.empty(n_seqs, dtype=np.int32)
        max_blocks = 1
        rows = []
        logits_rows: list[int] = []
        for i, (req, n) in enumerate(chunks):
            c = req.num_computed_tokens
            s = int(starts[i])
            row = self._table_row(req)
            rows.append(row)
            max_blocks = max(max_blocks, len(req.block_table))
            if n == 1:
                if c < len(req.token_ids):
                    input_ids[s] = req.token_ids[c]
                else:
                    input_ids[s] = 0
                    pending.append((s, req.pending_row))
                positions[s] = c
                slots[s] = int(row[c // bs]) * bs + c % bs
            else:
                input_ids[s : s + n] = req.token_ids[c : c + n]
                pos = np.arange(c, c + n)
                positions[s : s + n] = pos
                slots[s : s + n] = row[pos // bs].astype(np.int64) * bs + pos % bs
            seq_lens[i] = c + n
            if c + n == req.num_scheduled_tokens:  # the chunk reaches its end: it samples
                logits_rows.append(s + n - 1)
        width = self._table_width(max_blocks)
        tables = np.zeros((n_seqs, width), dtype=np.int32)
        for i, row in enumerate(rows):  # a row taken before the array grew is shorter
            n = min(width, len(row))
            tables[i, :n] = row[:n]
        return HostInputs(
            input_ids,
            positions,
            slots,
            seq_lens,
            starts.astype(np.int32),
            tables,
            logits_rows,
            int(lens.max()),
        )

    def _device_inputs(
        self, host: HostInputs
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=_to_device(host.slots, dev),
            block_tables=_to_device(host.block_tables, dev),
            seq_lens=_to_device(host.seq_lens, dev),
            query_start_loc=_to_device(host.query_start_loc, dev),
            max_query_len=host.max_query_len,
            decode_only=host.decode_only,
        )
        if not host.decode_only and self.split_mixed_attention:
            nd = host.num_leading_decodes
            if nd:  # a mixed step: the decode rows' attention through the decode kernel
                meta.num_decode_rows = nd
                meta.prefill_query_start_loc = _to_device(host.query_start_loc[nd:] - nd, dev)
                # its own tensor: seq_lens[nd:] starts 4*nd bytes in, and a pointer that is not
                # 16-byte aligned is another Triton specialization (a compile mid-traffic)
                meta.prefill_seq_lens = _to_device(host.seq_lens[nd:], dev)
        return _to_device(host.input_ids, dev), _to_device(host.positions, dev), meta

    def _graph_fits(self, num_seqs: int, decode_only: bool) -> bool:
        g = self.graphs
        return g is not None and decode_only and num_seqs <= g.max_batch_size

    def execute(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[list[Request], list[int], list[Logprob | None]]:
        """Run one step and wait for it; returns the requests that sampled, their tokens and
        logprobs (no token may be pending: this is the synchronous path)."""
        sampling = [req for req, n in chunks if req.num_computed_tokens + n == req.num_tokens]
        launched = self.launch(chunks, sampling, None)
        tokens, logprobs = self.collect(launched)
        return launched.sampling, tokens, logprobs

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
        if self.sync is not None:  # tensor parallel: every rank runs the same inputs
            host = self.prepare_host(chunks, pending)
            assert not pending, "async scheduling is off at tensor-parallel size > 1"
            self.sync.send_step(host)
            logits = self.run_host(host)
        elif self._graph_fits(len(chunks), all(n == 1 for _, n in chunks)):
            staged = self.graphs.stage(chunks, prev.tokens if prev is not None else None)
            hidden = self.graphs.replay(*staged)  # decode: every chunk samples, rows 0..B-1
            logits = self.model.compute_logits(hidden)
        else:
            ids, pos, meta, rows = self.prepare(chunks, pending)
            if pending:
                self._fill_pending(ids, pending, prev)
            hidden = self.model(ids, pos, meta, self.kv_caches)
            if sampling:  # rows through pinned memory: indexing with a list would sync
                idx = _to_device(np.asarray(rows, dtype=np.int64), self.device)
                logits = self.model.compute_logits(hidden.index_select(0, idx))
        if not sampling:
            return Launched([])
        tokens, logprobs = sample_on_device(logits, sampling, self.gen)
        if self.device.type != "cuda":
            return Launched(sampling, tokens, tokens, None, logprobs)
        host = torch.empty(len(sampling), dtype=torch.long, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Launched(sampling, tokens, host, event, logprobs)

    def _fill_pending(
        self, input_ids: torch.Tensor, pending: list[tuple[int, int]], prev: Launched | None
    ) -> None:
        assert prev is not None and prev.tokens is not None, "a pending token needs its step"
        idx = _to_device(np.asarray(pending, dtype=np.int64).T.copy(), self.device)
        input_ids.index_copy_(0, idx[0], prev.tokens.index_select(0, idx[1]))

    def collect(self, launched: Launched) -> tuple[list[int], list[Logprob | None]]:
        """Wait for a launched step's sampled tokens (the one host sync of a step)."""
        if not launched.sampling:
            return [], []
        if launched.event is not None:
            launched.event.synchronize()  # releases the GIL while it waits
        tokens = launched.host_tokens.tolist()
        return tokens, gather_logprobs(tokens, launched.logprobs, launched.sampling)

    @torch.inference_mode()
    def run_host(self, host: HostInputs) -> torch.Tensor | None:
        """The forward of one step from host inputs, on every rank: rank 0 gets the logits of
        host.logits_rows (None when nothing samples), the other ranks None."""
        if self._graph_fits(len(host.seq_lens), host.decode_only):
            hidden = self.graphs.run_host(host)  # decode: every row samples
        else:
            ids, pos, meta = self._device_inputs(host)
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
                self._gather_kv(*msg)
            elif kind == KV_SCATTER:
                self._scatter_kv(*msg)
            else:
                return

    # -- KV handoff at any tensor-parallel size: the wire carries every KV head ----------------
    @property
    def kv_transfer_shape(self) -> tuple[int, ...]:
        """The pool's shape with all KV heads (the TP=1 layout the grpc transport carries)."""
        shape = list(self.kv_cache.shape)
        shape[4] = self.model_cfg.num_kv_heads
        return tuple(shape)

    @torch.inference_mode()
    def gather_kv(self, block_ids: list[int]) -> torch.Tensor:
        """Rank 0: blocks block_ids of every layer with all KV heads,
        [layers, 2, len(block_ids), block_size, num_kv_heads, head_dim] on this device."""
        if self.sync is not None:
            self.sync.send_kv(KV_GATHER, block_ids)
        return self._gather_kv(block_ids)

    def _gather_kv(self, block_ids: list[int]) -> torch.Tensor | None:
        index = torch.tensor(block_ids, device=self.device)
        return self.tp.gather(self.kv_cache.index_select(2, index), dim=4)

    @torch.inference_mode()
    def scatter_kv(
        self, block_ids: list[int], layer_start: int, layer_end: int, kv: torch.Tensor
    ) -> None:
        """Rank 0: store kv (all KV heads, [layer_end - layer_start, 2, len(block_ids), ...])
        into blocks block_ids; each rank keeps its heads."""
        if self.sync is not None:
            self.sync.send_kv(KV_SCATTER, block_ids, layer_start, layer_end)
        self._scatter_kv(block_ids, layer_start, layer_end, kv)

    def _scatter_kv(self, block_ids, layer_start, layer_end, kv=None) -> None:
        index = torch.tensor(block_ids, device=self.device)
        if self.tp.size > 1:
            shape = list(self.kv_transfer_shape)
            shape[0], shape[2] = layer_end - layer_start, len(block_ids)
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            if kv is not None:
                buf.copy_(kv)
            h = self.num_kv_heads
            kv = self.tp.broadcast(buf)[:, :, :, :, self.tp.rank * h : (self.tp.rank + 1) * h]
        self.kv_cache[layer_start:layer_end].index_copy_(2, index, kv.to(self.device))
