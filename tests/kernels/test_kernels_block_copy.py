"""KV block copy between two pools (the same-host KV handoff's data path): Triton vs the torch
reference, into a NaN-poisoned destination whose untouched blocks must stay NaN."""

import pytest
import torch

from tandem_kernels.kv_block_copy import copy_kv_blocks_ref


@pytest.mark.parametrize(
    "layers, block_size, heads, head_dim, dtype, span",
    [
        (3, 16, 2, 32, torch.bfloat16, (0, 3)),
        (4, 4, 3, 20, torch.float32, (1, 3)),  # a run that is not a multiple of the chunk
        (2, 8, 1, 64, torch.float16, (1, 2)),
    ],
)
def test_copy_kv_blocks(seed, device, layers, block_size, heads, head_dim, dtype, span):
    from tandem_kernels.kv_block_copy_triton import copy_kv_blocks_triton

    src = torch.randn(layers, 2, 9, block_size, heads, head_dim, device=device).to(dtype)
    dst = torch.full((layers, 2, 13, block_size, heads, head_dim), float("nan"), device=device)
    dst = dst.to(dtype)
    src_ids = torch.randperm(9, device=device)[:5]
    dst_ids = torch.randperm(13, device=device)[:5]
    ref = dst.clone()
    copy_kv_blocks_ref(src, ref, src_ids, dst_ids, *span)
    copy_kv_blocks_triton(src, dst, src_ids, dst_ids, *span)
    assert torch.equal(dst.isnan(), ref.isnan()), f"written set differs (seed {seed})"
    assert torch.equal(dst.nan_to_num(), ref.nan_to_num()), f"values differ (seed {seed})"
    written = ~ref.isnan()
    assert written.sum() == (span[1] - span[0]) * 2 * 5 * block_size * heads * head_dim
