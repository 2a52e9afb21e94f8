"""CUDA graphs of the model's forward for decode-only steps (one per batch size of a ladder).

At tensor-parallel size > 1 every rank holds its own DecodeGraphs, captured in the same order
(the NCCL all-reduces are inside the graphs) and replayed in lockstep from the same inputs.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from tandem.block_tables import BlockTables
from tandem.host_inputs import HostInputs
from tandem.models.attention_metadata import AttentionMetadata
from tandem.scheduler import ScheduledChunk
from tandem.tp.group import TPGroup

log = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The decode batch sizes captured as CUDA graphs; a batch runs in the smallest >= it."""
    ladder = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256]
    ladder += list(range(320, max_batch_size + 1, 64))
    sizes = [b for b in ladder if b < max_batch_size] + [max_batch_size]
    return sorted(set(sizes)) if max_batch_size > 0 else []


class DecodeGraphs:
    """CUDA graphs of the model's forward for decode-only batches.

    One graph per batch size of the ladder, all sharing one memory pool (captured largest
    first). Inputs live in static device buffers; a step copies its inputs from pinned host
    buffers into the first B rows, pads the rest (slot -1: no KV write; seq_len 0: attention
    writes zeros) and replays the smallest graph that holds B. Block tables keep their full
    width (max_model_len / block_size), so the decode kernel's grid is fixed per graph.
    """

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        tables: BlockTables,
        block_size: int,
        max_blocks_per_seq: int,
        tp: TPGroup,
        device: torch.device,
        sizes: list[int],
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.tables = tables  # the requests' block-table rows (the runner's, shared)
        self.block_size = block_size
        self.tp = tp
        self.sizes = sizes
        self.max_batch_size = sizes[-1]
        dev, nb = device, max_blocks_per_seq
        mb = self.max_batch_size
        # int64 inputs as the rows of one buffer, so a step stages them with one copy:
        # input ids, positions, KV slots, and (async scheduling) the rows whose input token is
        # still on the GPU and, in the same order, their rows in the previous step's tokens
        self._inputs64 = torch.zeros(5, mb, dtype=torch.long, device=dev)
        self.input_ids, self.positions, self.slots = (
            self._inputs64[0],
            self._inputs64[1],
            self._inputs64[2],
        )
        self.slots.fill_(-1)
        self.seq_lens = torch.zeros(mb, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(mb, nb, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(mb + 1, dtype=torch.int32, device=dev)
        # the smallest captured size >= n, for every n
        self._size_for = [next(s for s in sizes if s >= n) for n in range(mb + 1)]
        # pinned staging: the five int64 rows, [seq_lens | block tables] as int32; two sets,
        # used in turn: under async scheduling the host fills step N+1's while step N's copies
        # may still be queued (step N-1, the set's last user, has finished)
        self._staging = [
            (
                torch.zeros(5, mb, dtype=torch.long).pin_memory(),
                torch.zeros(mb * (1 + nb), dtype=torch.int32).pin_memory(),
            )
            for _ in range(2)
        ]
        self._turn = 0
        self._host64, self._host32 = self._staging[0]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        t0 = time.perf_counter()
        self._capture()
        log.info(
            "event=cuda_graphs_captured sizes=%d max_batch=%d tp_rank=%d/%d seconds=%.1f",
            len(sizes),
            mb,
            tp.rank,
            tp.size,
            time.perf_counter() - t0,
        )

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b],
            block_tables=self.block_tables[:b],
            seq_lens=self.seq_lens[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            max_query_len=1,
            decode_only=True,
        )

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.input_ids[:b], self.positions[:b], self._meta(b), self.kv_caches)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):
                self._forward(b)  # compile and autotune outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        # tensor parallel: the captured forward includes the NCCL all-reduces (capturable since
        # NCCL 2.9.6; c10d keeps captured work out of its watchdog), and thread_local capture
        # keeps CUDA calls of other threads (c10d's watchdog, gRPC's) from breaking it
        mode = "thread_local" if self.tp.size > 1 else "global"
        for b in reversed(self.sizes):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, capture_error_mode=mode):
                self.outputs[b] = self._forward(b)
            self.graphs[b] = g
        torch.cuda.synchronize()

    def _next_staging(self) -> None:
        self._turn ^= 1
        self._host64, self._host32 = self._staging[self._turn]

    def stage(
        self, chunks: list[ScheduledChunk], prev_tokens: torch.Tensor | None
    ) -> tuple[int, int, int]:
        """Fill the graph's input buffers for chunks (host staging, then async copies); returns
        what replay() takes. A request whose input token is still on the GPU (async
        scheduling: it is row req.pending_row of prev_tokens, the previous step's sampled
        tokens) gets it there, by a gather on the device after the copies."""
        self._next_staging()
        tables = self.tables
        bs = self.block_size
        n = len(chunks)
        h64 = self._host64.numpy()
        # one pass over the batch, into plain lists (element stores into numpy arrays cost
        # more than the rest of the loop)
        slot = tables.slot
        slots, starts, ids, dst, src = [], [], [], [], []
        width = 1
        for i, (req, _) in enumerate(chunks):
            slots.append(slot(req))
            c = req.num_computed_tokens
            starts.append(c)
            toks = req.token_ids
            if c < len(toks):
                ids.append(toks[c])
            else:
                ids.append(0)
                dst.append(i)
                src.append(req.pending_row)
            if len(req.block_table) > width:
                width = len(req.block_table)
        pos = np.asarray(starts, dtype=np.int64)
        # after the loop: slot() may have grown (replaced) the array; read in place, not
        # through a method (a call per step)
        rows = tables._tables[np.asarray(slots), :width]  # [n, width]: only the columns in use
        h64[0, :n] = ids
        h64[1, :n] = pos
        h64[2, :n] = rows[np.arange(n), pos // bs].astype(np.int64) * bs + pos % bs
        k = len(dst)
        if k:
            assert prev_tokens is not None, "a pending token needs its step"
            h64[3, :k] = dst
            h64[4, :k] = src
        h32 = self._host32.numpy()
        h32[:n] = pos + 1
        h32[self.max_batch_size : self.max_batch_size + n * width].reshape(n, width)[:] = rows
        staged = self._copy_in(n, self._size_for[n], width)
        if k:
            self.input_ids.index_copy_(
                0, self._inputs64[3, :k], prev_tokens.index_select(0, self._inputs64[4, :k])
            )
        return staged

    def run_host(self, host: HostInputs) -> torch.Tensor:
        """stage() and replay() from prepared host inputs (tensor parallel: every rank, the
        same inputs)."""
        self._next_staging()
        n = len(host.seq_lens)
        h64 = self._host64.numpy()
        h32 = self._host32.numpy()
        mb, width = self.max_batch_size, host.block_tables.shape[1]
        h64[0, :n] = host.input_ids
        h64[1, :n] = host.positions
        h64[2, :n] = host.slots
        h32[:n] = host.seq_lens
        h32[mb : mb + n * width] = host.block_tables.ravel()
        return self.replay(*self._copy_in(n, self._size_for[n], width))

    def _copy_in(self, n: int, b: int, width: int) -> tuple[int, int, int]:
        """Pad rows n..b of the staged inputs and copy them to the graph's buffers."""
        h64 = self._host64.numpy()
        h32 = self._host32.numpy()
        mb = self.max_batch_size
        h64[:2, n:b] = 0
        h64[2, n:b] = -1
        h32[n:b] = 0
        # all five int64 rows in one copy (contiguous; rows past b are never read)
        self._inputs64.copy_(self._host64, non_blocking=True)
        self.seq_lens[:b].copy_(self._host32[:b], non_blocking=True)
        # only the columns in use: the kernel never reads a block past seq_len
        staged = self._host32[mb : mb + b * width].view(b, width)
        self.block_tables[:b, :width].copy_(staged, non_blocking=True)
        return n, b, width

    def replay(self, n: int, b: int, width: int) -> torch.Tensor:
        self.graphs[b].replay()
        return self.outputs[b][:n]
