"""The "triton" kernel set: the Triton version of every op in KernelOps.

Loaded by tandem_kernels.registry for "auto" on CUDA and for "triton". On a machine without a GPU
the same kernels run under the Triton interpreter (TRITON_INTERPRET=1), which is how the CPU
tests check them against the torch references.
"""

from __future__ import annotations

import triton  # noqa: F401  (an ImportError here makes "auto" fall back to torch)


def triton_ops() -> dict:
    """The fields of the registry's KernelOps, by name."""
    from tandem_kernels.activation_triton import silu_and_mul_triton
    from tandem_kernels.decode_attention_triton import paged_decode_attention_triton
    from tandem_kernels.kv_cache_write_triton import write_kv_cache_triton
    from tandem_kernels.prefill_attention_triton import paged_prefill_attention_triton
    from tandem_kernels.rms_norm_triton import rms_norm_triton
    from tandem_kernels.rotary_triton import rotary_triton

    return dict(
        rms_norm=rms_norm_triton,
        rotary=rotary_triton,
        silu_and_mul=silu_and_mul_triton,
        write_kv_cache=write_kv_cache_triton,
        decode_attention=paged_decode_attention_triton,
        prefill_attention=paged_prefill_attention_triton,
    )
