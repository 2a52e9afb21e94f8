"""Rank 0 -> the other ranks: each step's inputs, as tensors broadcast over the cpu group.

Per message, three broadcasts (never pickle):

    header  int64 [6]  kind, T tokens, B sequences, W block-table width, R logits rows,
                       max_query_len
    p64     int64 [3T + R]        input_ids | positions | slot_mapping | logits rows
    p32     int32 [B + B+1 + B*W] seq_lens | query_start_loc | block_tables (row-major)

kind STOP ends the other ranks' loop (the header alone is sent). The KV handoff's commands
(KV_GATHER: header [kind, n blocks], then the block ids; KV_SCATTER: header [kind, n blocks,
layer_start, layer_end], then the block ids) are followed by the KV itself on the device group
(tp/kv_copy.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from tandem.host_inputs import HostInputs
from tandem.tp.group import TPGroup

STOP, STEP, KV_GATHER, KV_SCATTER = 0, 1, 2, 3
HEADER_LEN = 6


class StepSync:
    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp
        self._header = torch.zeros(HEADER_LEN, dtype=torch.int64)

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, src=0, group=self.tp.cpu_group)
        return t

    def send_step(self, host: HostInputs) -> None:
        t, b = len(host.input_ids), len(host.seq_lens)
        w, r = host.block_tables.shape[1], len(host.logits_rows)
        self._bcast(torch.tensor([STEP, t, b, w, r, host.max_query_len], dtype=torch.int64))
        rows = np.asarray(host.logits_rows, dtype=np.int64)
        self._bcast(
            torch.from_numpy(np.concatenate([host.input_ids, host.positions, host.slots, rows]))
        )
        p32 = [host.seq_lens, host.query_start_loc, host.block_tables.ravel()]
        self._bcast(torch.from_numpy(np.concatenate(p32)))

    def send_stop(self) -> None:
        self._bcast(torch.tensor([STOP, 0, 0, 0, 0, 0], dtype=torch.int64))

    def send_kv(self, kind: int, block_ids: list[int], layer_start=0, layer_end=0) -> None:
        n = len(block_ids)
        self._bcast(torch.tensor([kind, n, layer_start, layer_end, 0, 0], dtype=torch.int64))
        self._bcast(torch.tensor(block_ids, dtype=torch.int64))

    def recv(self) -> tuple[int, HostInputs | tuple | None]:
        """Ranks > 0: the next message: (STEP, inputs), (KV_GATHER, (block_ids,)),
        (KV_SCATTER, (block_ids, layer_start, layer_end)) or (STOP, None)."""
        kind, t, b, w, r, max_query_len = self._bcast(self._header).tolist()
        if kind == STOP:
            return kind, None
        if kind in (KV_GATHER, KV_SCATTER):
            ids = self._bcast(torch.empty(t, dtype=torch.int64)).tolist()
            return kind, (ids,) if kind == KV_GATHER else (ids, b, w)
        p64 = self._bcast(torch.empty(3 * t + r, dtype=torch.int64)).numpy()
        p32 = self._bcast(torch.empty(2 * b + 1 + b * w, dtype=torch.int32)).numpy()
        return kind, HostInputs(
            input_ids=p64[:t],
            positions=p64[t : 2 * t],
            slots=p64[2 * t : 3 * t],
            seq_lens=p32[:b],
            query_start_loc=p32[b : 2 * b + 1],
            block_tables=p32[2 * b + 1 :].reshape(b, w),
            logits_rows=p64[3 * t :].tolist(),
            max_query_len=max_query_len,
        )
