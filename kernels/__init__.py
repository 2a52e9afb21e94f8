"""Kernels: each file holds one op as a plain torch reference (the CPU path and the test
oracle) and, where written, its Triton version (the CUDA path). `get_ops(name)` picks a set."""

from kernels.registry import KernelOps, available_backends, get_ops

__all__ = ["KernelOps", "available_backends", "get_ops"]
