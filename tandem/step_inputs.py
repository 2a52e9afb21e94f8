"""Input preparation: one step's chunks flattened into one packed batch.

For a packed batch (chunk of request b covers positions [c_b, c_b + n_b)):

    input_ids       = concat(token_ids_b[c_b : c_b + n_b])
    positions       = concat(range(c_b, c_b + n_b))
    slot_mapping[t] = block_table_b[pos // bs] * bs + pos % bs
    seq_lens[b]     = c_b + n_b
    logits rows     = the last token of every chunk that reaches the end of its request,
                      then the prompt-logprob rows: positions [start, end) of each PromptSpan

prepare_host builds it on the host (numpy; what rank 0 broadcasts at tensor-parallel size > 1),
device_inputs copies it to the device. Decode-only steps under CUDA graphs take another path
(decode_graphs.py) over the same block-table rows.
"""

from __future__ import annotations

import numpy as np
import torch

from tandem.block_tables import BlockTables
from tandem.engine_records import PromptSpan
from tandem.host_inputs import HostInputs
from tandem.models.attention_metadata import AttentionMetadata
from tandem.scheduler import ScheduledChunk


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(a)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device.type == "cpu" else t.to(device)


class StepInputs:
    def __init__(self, tables: BlockTables, block_size: int, device: torch.device) -> None:
        self.tables = tables
        self.block_size = block_size
        self.device = device
        # a mixed step's decode rows (the engine puts them first) go through the decode kernel,
        # which reads each KV head once for its query heads: the prefill kernel's tiles would
        # read it once per query head and fill a BLOCK_M-row tile for one row (False: one
        # prefill-kernel call for every row, for comparisons)
        self.split_mixed_attention = True

    def prepare(
        self,
        chunks: list[ScheduledChunk],
        pending: list[tuple[int, int]] | None = None,
        spans: list[PromptSpan] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        host = self.prepare_host(chunks, pending, spans)
        return (*self.device_inputs(host), host.logits_rows)

    def prepare_host(
        self,
        chunks: list[ScheduledChunk],
        pending: list[tuple[int, int]] | None = None,
        spans: list[PromptSpan] = (),
    ) -> HostInputs:
        """pending: where to collect (packed row, row in the previous step's sampled tokens)
        for decode chunks whose input token is still on the GPU (async scheduling); their
        input_ids entry is left 0 for the caller to fill on the device. spans: the prompt
        positions whose logits give prompt logprobs; their rows follow the sampled ones."""
        bs = self.block_size
        table_row = self.tables.row
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
            row = table_row(req)
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
        for i, start, end in spans:  # packed row of position p: starts[i] + p - c
            first = int(starts[i]) + start - chunks[i].req.num_computed_tokens
            logits_rows.extend(range(first, first + end - start))
        width = self.tables.width(max_blocks)
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

    def device_inputs(
        self, host: HostInputs
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=to_device(host.slots, dev),
            block_tables=to_device(host.block_tables, dev),
            seq_lens=to_device(host.seq_lens, dev),
            query_start_loc=to_device(host.query_start_loc, dev),
            max_query_len=host.max_query_len,
            decode_only=host.decode_only,
        )
        if not host.decode_only and self.split_mixed_attention:
            nd = host.num_leading_decodes
            if nd:  # a mixed step: the decode rows' attention through the decode kernel
                meta.num_decode_rows = nd
                meta.prefill_query_start_loc = to_device(host.query_start_loc[nd:] - nd, dev)
                # its own tensor: seq_lens[nd:] starts 4*nd bytes in, and a pointer that is not
                # 16-byte aligned is another Triton specialization (a compile mid-traffic)
                meta.prefill_seq_lens = to_device(host.seq_lens[nd:], dev)
        return to_device(host.input_ids, dev), to_device(host.positions, dev), meta
