"""Chooses between the Triton kernels and the PyTorch references; the optional triton import.

`LLM4SEG_KERNELS=triton` forces Triton (on CPU tensors only under `TRITON_INTERPRET=1`),
`LLM4SEG_KERNELS=torch` forces the reference; unset, CUDA tensors run Triton when it is
installed and everything else runs the reference. triton is optional (Linux only): without it
`import kernels` still works and every call runs the reference. Nothing here queries CUDA.

The kernel files define their kernels as plain functions and wrap them with `triton.jit` on
first Triton use (`jit_once`), because `triton.jit` reads TRITON_INTERPRET when it runs: a test
that sets it after something else imported `kernels` still gets interpreted kernels.
"""
import functools
import os

from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

ENV_VAR = "LLM4SEG_KERNELS"


def use_triton(x: Tensor) -> bool:
    """True when the call whose first tensor is `x` should run the Triton kernels."""
    choice = os.environ.get(ENV_VAR, "")
    if choice == "torch":
        return False
    if choice == "triton":
        if triton is None:
            raise ImportError(f"{ENV_VAR}=triton needs the triton package (pip install triton, Linux only); "
                              f"unset {ENV_VAR} or set it to 'torch' to use the PyTorch reference")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{ENV_VAR}=triton got a tensor on {x.device}, expected CUDA; "
                               "set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter")
        return True
    if choice:
        raise ValueError(f"{ENV_VAR}: expected 'triton', 'torch' or unset, got {choice!r}")
    # A CUDA build of torch without triton (e.g. on Windows) still works, on the reference.
    return x.is_cuda and triton is not None


@functools.cache
def jit_once(*kernels):
    """The kernels wrapped by triton.jit, built on the first call with these kernels and cached."""
    return tuple(triton.jit(kernel) for kernel in kernels)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (Triton's `tl.arange` and tile sizes must be powers of two)."""
    return 1 << max(n - 1, 0).bit_length()


def as_rows(t: Tensor) -> Tensor:
    """(..., D) -> (N, D) with unit column stride; a view unless the layout forces a copy."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()
