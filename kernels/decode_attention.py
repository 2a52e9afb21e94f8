"""Paged decode attention: one query token per sequence against its whole paged context.

block_tables[b, i] is the physical block holding tokens [i*bs, (i+1)*bs) of sequence b:

    logical token t of seq b  ->  k_cache[block_tables[b, t // bs], t % bs]
"""

from __future__ import annotations

import torch

from kernels.prefill_attention import gather_context


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
    out = torch.empty_like(q)
    hq, hkv = q.shape[1], k_cache.shape[2]
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        k, v = gather_context(k_cache, v_cache, block_tables[b], n)  # [n, Hkv, D]
        start = 0 if sliding_window is None else max(0, n - sliding_window)
        k = k[start:].float().repeat_interleave(hq // hkv, dim=1)
        v = v[start:].float().repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        probs = scores.softmax(dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, v).to(q.dtype)
    return out
