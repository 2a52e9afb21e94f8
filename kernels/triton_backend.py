"""Registers the "triton" kernel set: the Triton version of every op in KernelOps.

Imported by tandem_kernels.registry for "auto" on CUDA and for "triton". On a machine without a GPU
the same kernels run under the Triton interpreter (TRITON_INTERPRET=1), which is how the CPU
tests check them against the torch references.
"""

from __future__ import annotations

import triton  # noqa: F401  (an ImportError here makes "auto" fall back to torch)

from tandem_kernels.registry import KernelOps, register_backend


def _triton_ops() -> KernelOps:
    from tandem_kernels.activation_triton import silu_and_mul_triton
    from tandem_kernels.decode_attention_triton import paged_decode_attention_triton
    from tandem_kernels.kv_cache_write_triton import write_kv_cache_triton
    from tandem_kernels.prefill_attention_triton import paged_prefill_attention_triton
    from tandem_kernels.rms_norm_triton import rms_norm_triton
    from tandem_kernels.rotary_triton import rotary_triton

    return KernelOps(
        name="triton",
        rms_norm=rms_norm_triton,
        rotary=rotary_triton,
        silu_and_mul=silu_and_mul_triton,
        write_kv_cache=write_kv_cache_triton,
        decode_attention=paged_decode_attention_triton,
        prefill_attention=paged_prefill_attention_triton,
    )


register_backend("triton", _triton_ops)
