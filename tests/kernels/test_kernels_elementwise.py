"""RMSNorm, rotary, SiLU*mul and the KV-cache scatter: Triton vs the torch reference."""

import pytest
import torch

from tandem_kernels.activation import silu_and_mul_ref
from tandem_kernels.kv_cache_write import write_kv_cache_ref
from tandem_kernels.rms_norm import rms_norm_ref
from tandem_kernels.rotary import rotary_ref

# Both sides round the same fp32 values, which may differ in the last fp32 bits (sum order,
# exp/rsqrt implementations): one ulp per rounding step. bf16 allows two ulps because the
# Triton interpreter (3.9) truncates fp32 -> bf16 instead of rounding to nearest.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def _assert_close(out, ref, seed, what, rounded_in=None):
    """rounded_in: the dtype the last rounding happened in, when narrower than ref's."""
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype} (seed {seed})"
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape} (seed {seed})"
    assert torch.isfinite(out).all(), f"{what}: non-finite output (seed {seed})"
    tol = TOL[rounded_in or ref.dtype]
    torch.testing.assert_close(out, ref, **tol, msg=lambda m: f"{what} (seed {seed}): {m}")


@pytest.mark.parametrize(
    "shape, dtype, weight_dtype, with_residual",
    [
        ((5, 64), torch.bfloat16, torch.bfloat16, False),
        ((5, 64), torch.bfloat16, torch.bfloat16, True),
        ((2, 3, 100), torch.float16, torch.float32, True),  # non-pow2 hidden, promoted weight
        ((7, 128), torch.float32, torch.float32, True),
        ((1, 4096), torch.bfloat16, torch.float32, False),
    ],
)
def test_rms_norm(seed, device, shape, dtype, weight_dtype, with_residual):
    from tandem_kernels.rms_norm_triton import rms_norm_triton

    x = torch.randn(shape, dtype=dtype, device=device) * 3
    w = torch.randn(shape[-1], dtype=weight_dtype, device=device)
    res = torch.randn(shape, dtype=dtype, device=device) if with_residual else None
    out, res_out = rms_norm_triton(x, w, 1e-6, res)
    ref, ref_res = rms_norm_ref(x, w, 1e-6, res)
    _assert_close(out, ref, seed, "rms_norm out", rounded_in=dtype)
    if with_residual:
        _assert_close(res_out, ref_res, seed, "rms_norm residual out")
        if device == "cuda":  # one rounding of the same fp32 sum: exact where rounding is RNE
            assert torch.equal(res_out, ref_res), f"residual out differs (seed {seed})"
    else:
        assert res_out is None


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary(seed, device, head_dim, dtype):
    from tandem_kernels.rotary_triton import rotary_triton

    num_tokens, hq, hkv, max_pos = 9, 6, 2, 50
    # q and k as strided views of one fused qkv projection, as the model produces them
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * head_dim, dtype=dtype, device=device)
    q = qkv[:, : hq * head_dim].view(num_tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(num_tokens, hkv, head_dim)
    angles = torch.rand(max_pos, head_dim // 2, device=device) * 6.3
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    positions = torch.randint(0, max_pos, (num_tokens,), device=device)
    q_out, k_out = rotary_triton(q, k, positions, cos_sin)
    q_ref, k_ref = rotary_ref(q, k, positions, cos_sin)
    _assert_close(q_out, q_ref, seed, "rotary q")
    _assert_close(k_out, k_ref, seed, "rotary k")


@pytest.mark.parametrize("shape", [(3, 2 * 64), (4, 2 * 100), (2, 5, 2 * 1500)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_silu_and_mul(seed, device, shape, dtype):
    from tandem_kernels.activation_triton import silu_and_mul_triton

    x = torch.randn(shape, dtype=dtype, device=device) * 4
    _assert_close(silu_and_mul_triton(x), silu_and_mul_ref(x), seed, "silu_and_mul")


@pytest.mark.parametrize("block_size, hkv, head_dim", [(4, 1, 32), (16, 3, 64), (16, 8, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_kv_cache(seed, device, block_size, hkv, head_dim, dtype):
    from tandem_kernels.kv_cache_write_triton import write_kv_cache_triton

    num_blocks, num_tokens = 6, 11
    k = torch.randn(num_tokens, hkv, head_dim, dtype=dtype, device=device)
    v = torch.randn(num_tokens, hkv, head_dim, dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[torch.rand(num_tokens, device=device) < 0.3] = -1  # padding: must not be stored
    k_cache = torch.randn(num_blocks, block_size, hkv, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache_triton(k, v, k_cache, v_cache, slots)
    write_kv_cache_ref(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref), f"k cache differs (seed {seed}, slots {slots.tolist()})"
    assert torch.equal(v_cache, v_ref), f"v cache differs (seed {seed}, slots {slots.tolist()})"
