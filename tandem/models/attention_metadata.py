"""What the attention layers need to find each token's KV in the paged cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is stored (-1: nowhere)
    block_tables: torch.Tensor  # [B, max_blocks] int32: physical blocks of each sequence
    seq_lens: torch.Tensor  # [B] int32: tokens in each sequence's context incl. the new ones
    query_start_loc: torch.Tensor  # [B+1] int32: cumulative new-token counts (packed offsets)
    max_query_len: int  # longest new chunk in the batch
    decode_only: bool  # every sequence adds exactly one token: the decode kernel applies
    # a mixed step: its first num_decode_rows sequences add one token each and go through the
    # decode kernel, the rest through the prefill kernel with these offsets (rebased to 0)
    # and context lengths (seq_lens[num_decode_rows:] in a tensor of its own)
    num_decode_rows: int = 0
    prefill_query_start_loc: torch.Tensor | None = None
    prefill_seq_lens: torch.Tensor | None = None
