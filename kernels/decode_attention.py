"""Paged decode attention: one query token per sequence against its whole paged context.

block_tables[b, i] is the physical block holding tokens [i*bs, (i+1)*bs) of sequence b:

    logical token t of seq b  ->  k_cache[block_tables[b, t // bs], t % bs]
"""

from __future__ import annotations

import torch


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D]; seq_lens [B] includes the query token (already written to the cache).

    Returns [B, Hq, D]. Hq must be a multiple of Hkv (GQA); all math in fp32.
    """
    # one batched gather over every block-table slot (no per-sequence loop: this is the CPU
    # serving path); slots past seq_len (or before the window) are masked out, and their
    # values zeroed so padding that holds garbage, even NaN, cannot leak into the output
    num_seqs, hq = q.shape[:2]
    _, block_size, hkv, head_dim = k_cache.shape
    tables = block_tables.long()
    k = k_cache[tables].flatten(1, 2).float()  # [B, L, Hkv, D], L = max_blocks * block_size
    v = v_cache[tables].flatten(1, 2).float()
    pos = torch.arange(k.shape[1], device=q.device)[None, :]
    n = seq_lens.long()[:, None]
    valid = pos < n
    if sliding_window is not None:
        valid &= pos >= n - sliding_window
    v = torch.where(valid[:, :, None, None], v, 0.0)
    qg = q.float().view(num_seqs, hkv, hq // hkv, head_dim)  # query heads grouped by KV head
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    # an empty context (a padded batch slot, seq_len 0) attends to nothing: output zeros
    probs = torch.where(valid.any(dim=1)[:, None, None, None], probs, 0.0)
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)
    return out.reshape(num_seqs, hq, head_dim).to(q.dtype)
