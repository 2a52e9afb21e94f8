"""Model runner: owns the model and the paged KV pool; turns scheduled chunks into one forward.

Input preparation for a packed batch (chunk of request b covers positions [c_b, c_b + n_b)):

    input_ids       = concat(token_ids_b[c_b : c_b + n_b])
    positions       = concat(range(c_b, c_b + n_b))
    slot_mapping[t] = block_table_b[pos // bs] * bs + pos % bs
    seq_lens[b]     = c_b + n_b
    logits rows     = the last token of every chunk that reaches the end of its request
"""

from __future__ import annotations

import logging

import torch

from kernels import get_ops
from tandem.config import EngineConfig, ModelConfig, resolve_dtype
from tandem.loader import load_model
from tandem.models.attention_metadata import AttentionMetadata
from tandem.request import Logprob, Request
from tandem.sampler import sample
from tandem.scheduler import ScheduledChunk

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self, cfg: EngineConfig, model_cfg: ModelConfig, model_dir, max_model_len: int
    ) -> None:
        self.device = cfg.torch_device()
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.block_size = cfg.block_size
        self.model_cfg = model_cfg
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
        )
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.num_blocks = cfg.num_blocks or self._blocks_from_memory(cfg)
        # one pool for all layers: [layer, k|v, block, slot in block, kv head, head dim]
        self.kv_cache = torch.zeros(
            model_cfg.num_layers,
            2,
            self.num_blocks,
            self.block_size,
            model_cfg.num_kv_heads,
            model_cfg.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.kv_caches = [
            (self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(model_cfg.num_layers)
        ]
        log.info(
            "kv cache num_blocks=%d block_size=%d backend=%s",
            self.num_blocks,
            self.block_size,
            self.ops.name,
        )

    @property
    def block_bytes(self) -> int:
        m = self.model_cfg
        return (
            m.num_layers * 2 * self.block_size * m.num_kv_heads * m.head_dim * self.dtype.itemsize
        )

    def _blocks_from_memory(self, cfg: EngineConfig) -> int:
        if self.device.type != "cuda":
            return max(16, int(cfg.cpu_kv_cache_gib * 2**30) // self.block_bytes)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info(self.device)
        peak = self._profile_activation_bytes(cfg.max_num_batched_tokens)
        budget = total * cfg.gpu_memory_utilization - (total - free) - peak
        if budget < self.block_bytes * 16:
            raise RuntimeError(
                f"not enough GPU memory for the KV cache (budget {budget / 2**30:.2f} GiB); "
                "raise --gpu-memory-utilization or lower --max-num-batched-tokens"
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
            m.num_kv_heads,
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

    def prepare(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        logits_rows: list[int] = []
        for req, n in chunks:
            c = req.num_computed_tokens
            input_ids += req.token_ids[c : c + n]
            table = req.block_table
            for pos in range(c, c + n):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            seq_lens.append(c + n)
            starts.append(starts[-1] + n)
            if c + n == req.num_tokens:
                logits_rows.append(starts[-1] - 1)
        max_blocks = max(len(req.block_table) for req, _ in chunks)
        tables = [req.block_table + [0] * (max_blocks - len(req.block_table)) for req, _ in chunks]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            max_query_len=max(n for _, n in chunks),
            decode_only=all(n == 1 for _, n in chunks),
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos, meta, logits_rows

    @torch.inference_mode()
    def execute(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[list[Request], list[int], list[Logprob | None]]:
        """Run one step; returns the requests that sampled, their tokens and logprobs."""
        ids, pos, meta, rows = self.prepare(chunks)
        hidden = self.model(ids, pos, meta, self.kv_caches)
        sampling = [req for req, n in chunks if req.num_computed_tokens + n == req.num_tokens]
        if not sampling:
            return [], [], []
        logits = self.model.compute_logits(hidden[rows])
        tokens, logprobs = sample(logits, sampling, self.gen)
        return sampling, tokens, logprobs
