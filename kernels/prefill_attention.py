"""Prefill/extend attention over paged KV: a packed batch of new chunks, each attending causally
to its sequence's cached prefix plus itself. The chunk's own K/V are written to the cache first.

For sequence b with q_len new tokens and seq_len total tokens, query i (0-based in the chunk)
sits at position p = seq_len - q_len + i and sees keys at positions [0, p] (or the last
`sliding_window` of them):

    context: [ cached prefix (seq_len - q_len) | new chunk (q_len) ]
    query i  ------------------------------------------^ attends to everything left of it
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_context(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first num_tokens K and V of one sequence, contiguous: [num_tokens, Hkv, D]."""
    block_size = k_cache.shape[1]
    num_blocks = (num_tokens + block_size - 1) // block_size
    ids = block_table[:num_blocks].long()
    k = k_cache.index_select(0, ids).flatten(0, 1)[:num_tokens]
    v = v_cache.index_select(0, ids).flatten(0, 1)[:num_tokens]
    return k, v


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    max_query_len: int | None = None,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] packed; query_start_loc [B+1] (cumulative q_lens); seq_lens [B] totals.

    max_query_len (the longest chunk) and k/v (the chunk's own K/V [T, Hkv, D], already in the
    cache) are unused here; every backend accepts them so the model can always pass them: the
    Triton kernel then sizes its grid without a device->host sync and reads the chunk densely.
    """
    del max_query_len, k, v
    from tandem_kernels.decode_attention import paged_decode_attention_ref

    out = torch.empty_like(q)
    hq, hkv = q.shape[1], k_cache.shape[2]
    starts = query_start_loc.tolist()
    q_lens = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    # sequences adding one token (decodes in a mixed step) go through the batched decode path
    single = [b for b, n in enumerate(q_lens) if n == 1]
    if single:
        rows = torch.tensor([starts[b] for b in single], device=q.device)
        idx = torch.tensor(single, device=q.device)
        out[rows] = paged_decode_attention_ref(
            q[rows], k_cache, v_cache, block_tables[idx], seq_lens[idx], scale, sliding_window
        )
    for b in range(len(starts) - 1):
        q0, q1 = starts[b], starts[b + 1]
        if q1 - q0 <= 1:
            continue
        n = int(seq_lens[b])
        q_len = q1 - q0
        k, v = gather_context(k_cache, v_cache, block_tables[b], n)
        q_pos = torch.arange(n - q_len, n, device=q.device)[:, None]
        k_pos = torch.arange(n, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        qb = q[q0:q1].float().transpose(0, 1)  # [Hq, q_len, D]
        kb = k.float().transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        vb = v.float().transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, scale=scale)
        out[q0:q1] = ob.transpose(0, 1).to(q.dtype)
    return out
