"""Paged decode and prefill/extend attention: Triton vs the torch reference.

The cache starts as NaN and only the tokens each sequence owns get values; block-table padding
points at an all-NaN block. A kernel that reads a token it should not (past seq_len, in a
partial block, outside the window, through a padded table entry) turns the output NaN.
"""

import math

import pytest
import torch

from tandem_kernels.decode_attention import paged_decode_attention_ref
from tandem_kernels.prefill_attention import paged_prefill_attention_ref

HAS_CUDA = torch.cuda.is_available()
REL_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def make_paged_kv(seq_lens, block_size, hkv, head_dim, dtype, device, spare_cols=1):
    """Random K/V for each sequence's tokens scattered over shuffled blocks; all else NaN."""
    per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 1  # block ids[-1] stays NaN: where padded entries point
    shape = (num_blocks, block_size, hkv, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    ids = torch.randperm(num_blocks, device=device)
    poison = ids[-1]
    block_tables = torch.full(
        (len(seq_lens), max(per_seq) + spare_cols), int(poison), dtype=torch.int32, device=device
    )
    used = 0
    for b, (n, nb) in enumerate(zip(seq_lens, per_seq, strict=True)):
        mine = ids[used : used + nb]
        used += nb
        block_tables[b, :nb] = mine.int()
        for i, blk in enumerate(mine.tolist()):
            count = min(block_size, n - i * block_size)
            k_cache[blk, :count] = torch.randn(count, hkv, head_dim, dtype=dtype, device=device)
            v_cache[blk, :count] = torch.randn(count, hkv, head_dim, dtype=dtype, device=device)
    return k_cache, v_cache, block_tables


def assert_rel_close(out, ref, seed, what):
    assert torch.isfinite(out).all(), f"{what}: non-finite output (seed {seed})"
    err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    assert err <= REL_TOL[ref.dtype], f"{what}: rel err {err:.2e} (seed {seed})"


def run_decode(seq_lens, block_size, group, head_dim, window, split_len, dtype, device, seed):
    from tandem_kernels.decode_attention_triton import paged_decode_attention_triton

    hkv = 2
    k_cache, v_cache, block_tables = make_paged_kv(
        seq_lens, block_size, hkv, head_dim, dtype, device
    )
    q = torch.randn(len(seq_lens), hkv * group, head_dim, dtype=dtype, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    out = paged_decode_attention_triton(
        q, k_cache, v_cache, block_tables, lens, scale, window, split_len=split_len
    )
    ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, scale, window)
    what = f"decode bs={block_size} group={group} d={head_dim} window={window} split={split_len}"
    assert_rel_close(out, ref, seed, what)


@pytest.mark.parametrize(
    "block_size, group, head_dim, window, split_len, dtype",
    [
        (16, 1, 64, None, None, torch.bfloat16),  # split count chosen from shapes
        (4, 3, 32, None, 64, torch.bfloat16),  # several splits + reduction
        (16, 4, 128, None, 64, torch.bfloat16),
        (16, 4, 128, None, 256, torch.float16),  # one split: direct write, no reduction
        (4, 4, 64, 37, 64, torch.bfloat16),  # window crossing split and block edges
        (16, 3, 32, 100, None, torch.float32),
        (128, 1, 32, None, 64, torch.bfloat16),  # block larger than the kernel's tile
    ],
)
def test_decode_attention(seed, device, block_size, group, head_dim, window, split_len, dtype):
    seq_lens = [1, 17, 70, 200, 129]
    run_decode(seq_lens, block_size, group, head_dim, window, split_len, dtype, device, seed)


def test_decode_random_lengths(seed, device):
    seq_lens = torch.randint(1, 300, (4,)).tolist()
    block_size = [2, 4, 8, 16, 32][int(torch.randint(0, 5, ()))]
    group = int(torch.randint(1, 5, ()).item())
    window = int(torch.randint(1, 200, ()).item()) if torch.rand(()) < 0.5 else None
    try:
        run_decode(seq_lens, block_size, group, 64, window, 64, torch.bfloat16, device, seed)
    except AssertionError as e:
        raise AssertionError(f"{e} lens={seq_lens} bs={block_size}") from None


def test_decode_padded_slot_writes_zeros(seed, device):
    from tandem_kernels.decode_attention_triton import paged_decode_attention_triton

    for split_len in (64, 1024):  # through the reduction and through the direct write
        k_cache, v_cache, block_tables = make_paged_kv([5, 40], 16, 2, 32, torch.bfloat16, device)
        q = torch.randn(2, 4, 32, dtype=torch.bfloat16, device=device)
        lens = torch.tensor([5, 0], dtype=torch.int32, device=device)  # slot 1 is padding
        out = paged_decode_attention_triton(
            q, k_cache, v_cache, block_tables, lens, 0.2, split_len=split_len
        )
        ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, 0.2)
        assert torch.equal(out[1], torch.zeros_like(out[1])), f"padded slot (seed {seed})"
        assert_rel_close(out, ref, seed, f"decode with padded slot, split {split_len}")


# (prefix already cached, new tokens) per sequence: fresh prompts, chunks after a cached
# prefix, a one-token chunk, an empty slot, and prefixes that put the causal diagonal one key
# before / at a 16-key tile edge (15, 14; 30 with a 32-row tile)
EXTEND_BATCH = [(0, 23), (7, 9), (40, 17), (3, 0), (12, 1), (0, 1), (15, 20), (14, 5), (30, 34)]


def chunk_kv(k_cache, v_cache, block_tables, batch):
    """The new chunks' own K/V, dense [T, Hkv, D] (what the model passes next to the cache),
    as one strided view of a wider buffer like the model's fused qkv output."""
    from tandem_kernels.prefill_attention import gather_context

    ks, vs = [], []
    for b, (p, n) in enumerate(batch):
        k, v = gather_context(k_cache, v_cache, block_tables[b], p + n)
        ks.append(k[p:])
        vs.append(v[p:])
    k, v = torch.cat(ks), torch.cat(vs)
    wide = torch.cat([torch.randn_like(k), k, v], dim=1)  # [T, 3*Hkv, D]
    hkv = k.shape[1]
    return wide[:, hkv : 2 * hkv], wide[:, 2 * hkv :]


def poison_chunks(k_cache, v_cache, block_tables, batch):
    """NaN over the cache slots of every chunk's own tokens."""
    bs = k_cache.shape[1]
    for b, (p, n) in enumerate(batch):
        for pos in range(p, p + n):
            blk = int(block_tables[b, pos // bs])
            k_cache[blk, pos % bs] = float("nan")
            v_cache[blk, pos % bs] = float("nan")


def run_prefill(batch, block_size, group, head_dim, window, dtype, device, seed, **kwargs):
    from tandem_kernels.prefill_attention_triton import paged_prefill_attention_triton

    hkv = 2
    seq_lens = [p + n for p, n in batch]
    k_cache, v_cache, block_tables = make_paged_kv(
        seq_lens, block_size, hkv, head_dim, dtype, device
    )
    q_lens = torch.tensor([n for _, n in batch])
    qsl = torch.zeros(len(batch) + 1, dtype=torch.int32)
    qsl[1:] = q_lens.cumsum(0)
    qsl = qsl.to(device)
    q = torch.randn(int(qsl[-1]), hkv * group, head_dim, dtype=dtype, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    ref = paged_prefill_attention_ref(
        q, k_cache, v_cache, block_tables, qsl, lens, scale, window,
        max_query_len=kwargs.get("max_query_len"),
    )  # fmt: skip
    if kwargs.pop("dense", False):
        kwargs["k"], kwargs["v"] = chunk_kv(k_cache, v_cache, block_tables, batch)
        poison_chunks(k_cache, v_cache, block_tables, batch)  # the kernel must not read them
    out = paged_prefill_attention_triton(
        q, k_cache, v_cache, block_tables, qsl, lens, scale, window, **kwargs
    )
    shown = {k: v for k, v in kwargs.items() if k not in ("k", "v")}
    what = f"prefill bs={block_size} group={group} d={head_dim} window={window} {shown}"
    assert_rel_close(out, ref, seed, what)


@pytest.mark.parametrize(
    "block_size, group, head_dim, window, dtype",
    [
        (16, 1, 64, None, torch.bfloat16),
        (4, 3, 32, None, torch.bfloat16),
        (16, 4, 128, None, torch.float16),
        (4, 4, 64, 6, torch.bfloat16),  # window narrower than a tile
        (16, 3, 32, 20, torch.float32),
    ],
)
def test_prefill_attention(seed, device, block_size, group, head_dim, window, dtype):
    run_prefill(EXTEND_BATCH, block_size, group, head_dim, window, dtype, device, seed)


def test_prefill_random_batch(seed, device):
    batch = [tuple(torch.randint(0, 60, (2,)).tolist()) for _ in range(4)]
    window = int(torch.randint(1, 80, ()).item()) if torch.rand(()) < 0.5 else None
    try:
        run_prefill(batch, 8, 4, 32, window, torch.bfloat16, device, seed)
    except AssertionError as e:
        raise AssertionError(f"{e} batch={batch}") from None


def test_prefill_other_tiles_and_max_query_len(seed, device):
    """Tiles that straddle blocks differently, and a caller-supplied (generous) max_query_len."""
    run_prefill(
        EXTEND_BATCH, 4, 2, 32, None, torch.bfloat16, device, seed,
        max_query_len=40, config=(32, 16, 4, 1),
    )  # fmt: skip
    run_prefill(EXTEND_BATCH, 8, 3, 64, 9, torch.bfloat16, device, seed, config=(16, 32, 4, 1))


@pytest.mark.parametrize(
    "block_size, group, head_dim, dtype, config, load",
    [
        (16, 1, 64, torch.bfloat16, None, 1),  # DENSE with the default tiles
        (4, 3, 32, torch.bfloat16, (32, 16, 4, 1), 1),  # the diagonal spans two key tiles
        (8, 2, 32, torch.float16, (16, 32, 4, 1), 2),  # DENSE_TMA: key tile wider than rows
        (16, 4, 48, torch.float32, None, 2),  # padded head dim: TMA falls back to DENSE
    ],
)
def test_prefill_dense_chunk(seed, device, block_size, group, head_dim, dtype, config, load):
    """The chunk's keys read from the model's dense K/V (strided like the fused qkv output),
    the prefix from the cache; a cached prefix that ends inside a tile, and empty chunks."""
    kw = dict(dense=True, new_kv_load=load, **({"config": config} if config else {}))
    run_prefill(EXTEND_BATCH, block_size, group, head_dim, None, dtype, device, seed, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [None, 1000])
def test_full_size_gpu(seed, window):
    """Llama-3.1-8B attention shapes (32 q / 8 kv heads, d=128, block 16) on the GPU."""
    lens = [1, 300, 2049, 4096, 777, 1500, 3001, 64]
    from tandem_kernels.decode_attention_triton import paged_decode_attention_triton

    k_cache, v_cache, block_tables = make_paged_kv(lens, 16, 8, 128, torch.bfloat16, "cuda")
    q = torch.randn(len(lens), 32, 128, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, 0.088, window)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, 0.088, window)
    assert_rel_close(out, ref, seed, "full-size decode")
    batch = [(0, 1024), (1536, 512), (3, 700), (0, 1)]
    run_prefill(batch, 16, 4, 128, window, torch.bfloat16, "cuda", seed)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_decode_cuda_graph_replay(seed):
    """Captured once, replayed with other lengths and tables: the grid must not depend on them."""
    from tandem_kernels.decode_attention_triton import paged_decode_attention_triton

    lens_a, lens_b = [5, 700, 1500, 33], [1400, 2, 64, 1023]
    full = [max(a, b) for a, b in zip(lens_a, lens_b, strict=True)]
    k_cache, v_cache, block_tables = make_paged_kv(full, 16, 8, 128, torch.bfloat16, "cuda")
    q = torch.randn(4, 32, 128, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.tensor(lens_a, dtype=torch.int32, device="cuda")
    paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, 0.1)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, 0.1)
    for lens in (lens_a, lens_b):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.normal_()
        graph.replay()
        ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, 0.1)
        assert_rel_close(out, ref, seed, f"graph replay lens={lens}")
