"""The requests' block tables on the host, as int32 rows of one array (a row per request).

A row is extended in place as the request's blocks are appended: a step copies only new
entries (input preparation does not grow with context) and gathers a batch's rows in one numpy
operation. The eager input preparation (step_inputs.py) and the decode graphs
(decode_graphs.py) read the same rows.
"""

from __future__ import annotations

import numpy as np

from tandem.request import Request

# block tables' width is a multiple of this (see BlockTables.width)
TABLE_WIDTH_ALIGN = 16


class BlockTables:
    def __init__(self, max_blocks_per_seq: int) -> None:
        # [rows, max_blocks_per_seq]; replaced (not resized in place) when it grows, so a row
        # taken before a growth is a view of the old array
        self._tables = np.zeros((64, max_blocks_per_seq), dtype=np.int32)
        self._slot_of: dict[str, int] = {}
        self._slot_src: list[list[int] | None] = [None] * 64  # the block_table a row mirrors
        self._slot_filled = [0] * 64
        self._free_slots = list(range(63, -1, -1))

    def width(self, max_blocks: int) -> int:
        """A step's block-table width: max_blocks rounded up to a multiple of
        TABLE_WIDTH_ALIGN (within the rows' own width, which the decode graphs' tables have
        too), so the tables' row stride never changes what Triton specializes a kernel on."""
        padded = -(-max_blocks // TABLE_WIDTH_ALIGN) * TABLE_WIDTH_ALIGN
        return max(max_blocks, min(padded, self._tables.shape[1]))

    def slot(self, req: Request) -> int:
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

    def row(self, req: Request) -> np.ndarray:
        slot = self.slot(req)  # first: it may grow (replace) the array
        return self._tables[slot]

    def forget(self, req_id: str) -> None:
        """The request left the runner (finished, aborted, released)."""
        slot = self._slot_of.pop(req_id, None)
        if slot is not None:
            self._slot_src[slot] = None
            self._slot_filled[slot] = 0
            self._free_slots.append(slot)
