"""Named kernel sets. The model receives one `KernelOps` and never asks which backend it is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelOps:
    """The ops the model calls. Signatures and semantics are fixed by the torch references."""

    name: str
    rms_norm: Callable  # (x, weight, eps, residual=None) -> (out, residual_out | None)
    rotary: Callable  # (q, k, positions, cos_sin_cache) -> (q, k)
    silu_and_mul: Callable  # (x [T, 2I]) -> [T, I]
    write_kv_cache: Callable  # (k, v, k_cache, v_cache, slot_mapping) -> None (in place)
    decode_attention: Callable  # (q, k_cache, v_cache, block_tables, seq_lens, scale, window)
    # (q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, window,
    #  *, max_query_len=None)
    prefill_attention: Callable


def _torch_ops() -> KernelOps:
    from tandem_kernels.activation import silu_and_mul_ref
    from tandem_kernels.decode_attention import paged_decode_attention_ref
    from tandem_kernels.kv_cache_write import write_kv_cache_ref
    from tandem_kernels.prefill_attention import paged_prefill_attention_ref
    from tandem_kernels.rms_norm import rms_norm_ref
    from tandem_kernels.rotary import rotary_ref

    return KernelOps(
        name="torch",
        rms_norm=rms_norm_ref,
        rotary=rotary_ref,
        silu_and_mul=silu_and_mul_ref,
        write_kv_cache=write_kv_cache_ref,
        decode_attention=paged_decode_attention_ref,
        prefill_attention=paged_prefill_attention_ref,
    )


def _triton_ops() -> KernelOps:
    # ImportError when Triton is missing: "auto" falls back to torch
    from tandem_kernels.triton_backend import triton_ops

    return KernelOps(name="triton", **triton_ops())


_BACKENDS: dict[str, Callable[[], KernelOps]] = {"torch": _torch_ops, "triton": _triton_ops}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_ops(name: str = "auto", device: torch.device | str = "cpu") -> KernelOps:
    """`auto` is Triton on CUDA (when importable) and torch everywhere else."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            try:
                return _triton_ops()
            except ImportError:
                pass
        name = "torch"
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose from {available_backends()}")
    return _BACKENDS[name]()
