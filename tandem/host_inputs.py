"""One step's model inputs on the host: what the runner copies to the device, and what rank 0
broadcasts to the other tensor-parallel ranks (tandem/tp/step_sync.py)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class HostInputs(NamedTuple):
    """One step's inputs on the host (what rank 0 broadcasts at tensor-parallel size > 1)."""

    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slots: np.ndarray  # int64 [T]
    seq_lens: np.ndarray  # int32 [B]
    query_start_loc: np.ndarray  # int32 [B+1]
    block_tables: np.ndarray  # int32 [B, max_blocks]
    # rows of the packed batch whose logits are computed: the sampled ones, in chunk order,
    # then those of the prompt logprobs asked for (tandem/step_inputs.py)
    logits_rows: list[int]
    max_query_len: int

    @property
    def decode_only(self) -> bool:
        return len(self.input_ids) == len(self.seq_lens)

    @property
    def num_leading_decodes(self) -> int:
        """How many sequences at the front add one token each (the engine puts them first)."""
        longer = np.flatnonzero(np.diff(self.query_start_loc) != 1)
        return int(longer[0]) if len(longer) else len(self.seq_lens)
