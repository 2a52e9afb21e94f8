"""Kernel tests run the Triton kernels under the Triton interpreter when there is no GPU.

triton.jit decides interpreter vs compiler when a kernel is decorated, i.e. when a
kernels/*_triton.py module is first imported. pytest loads this file before it imports the test
modules of this folder, and nothing else imports those modules earlier (torch alone does not
import triton on CPU), so setting the variable here is early enough.
"""

import os
import secrets

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (set TANDEM_TEST_SEED to replay one); tests quote it on failure."""
    value = int(os.environ.get("TANDEM_TEST_SEED") or secrets.randbits(31))
    torch.manual_seed(value)
    return value


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def nan_poisoned_outputs():
    """Make torch.empty return NaN (deterministic mode's fill), so the outputs the kernels
    allocate start poisoned and any element a kernel forgets to write fails the comparison."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = was_fill
    torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
