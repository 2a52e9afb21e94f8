"""Backend resolution: torch everywhere, triton on CUDA for "auto", triton by name anywhere."""

import torch

from tandem_kernels.registry import available_backends, get_ops
from tandem_kernels.rms_norm import rms_norm_ref


def test_torch_and_auto_resolve(device):
    assert get_ops("torch").name == "torch"
    assert get_ops("auto", "cpu").name == "torch"
    if device == "cuda":
        assert get_ops("auto", "cuda").name == "triton"


def test_triton_by_name_runs(seed, device):
    ops = get_ops("triton", device)
    assert ops.name == "triton" and "triton" in available_backends()
    x = torch.randn(3, 64, device=device)
    w = torch.randn(64, device=device)
    out, _ = ops.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-5)[0], msg=f"seed {seed}")
