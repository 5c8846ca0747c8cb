"""Chooses between the Triton kernels and the PyTorch references; builds the kernels lazily.

`LLM4SEG_KERNELS=triton` forces Triton (on CPU tensors only under `TRITON_INTERPRET=1`),
`LLM4SEG_KERNELS=torch` forces the reference; unset, CUDA tensors run Triton when it is
installed and everything else runs the reference. Nothing here queries CUDA.

triton is optional (Linux only) and is imported on the first Triton call, never by
`import kernels`: TRITON_INTERPRET is read both when triton is imported (triton.language's own
helpers such as tl.sum are jitted then) and by each triton.jit, so it only has to be set before
the first kernel runs. The kernel files therefore define their kernels as plain functions that
name a module global `tl`, and `jit_once` binds `tl` and applies triton.jit on first use. Helpers
the kernels call (marked with @triton_helper) are jitted then too, in place, so the kernels find
them as Triton functions.
"""
import functools
import importlib.util
import os

from torch import Tensor

ENV_VAR = "LLM4SEG_KERNELS"


def use_triton(x: Tensor) -> bool:
    """True when the call whose first tensor is `x` should run the Triton kernels."""
    choice = os.environ.get(ENV_VAR, "")
    if choice == "torch":
        return False
    if choice == "triton":
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{ENV_VAR}=triton got a tensor on {x.device}, expected CUDA; "
                               "set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter")
        return True
    if choice:
        raise ValueError(f"{ENV_VAR}: expected 'triton', 'torch' or unset, got {choice!r}")
    # A CUDA build of torch without triton (e.g. on Windows) still works, on the reference.
    return x.is_cuda and importlib.util.find_spec("triton") is not None


def triton_helper(function):
    """Marks a plain function that kernels call: jit_once replaces it in its module by its jitted self."""
    function.triton_helper = True
    return function


@functools.cache
def jit_once(*kernels):
    """The kernels wrapped by triton.jit, built on the first call with these kernels and cached."""
    triton = _import_triton()
    for kernel in kernels:
        module_globals = kernel.__globals__
        module_globals["tl"] = triton.language  # the name the kernel bodies use
        for name, value in list(module_globals.items()):
            if getattr(value, "triton_helper", False):
                module_globals[name] = triton.jit(value)
    return tuple(triton.jit(kernel) for kernel in kernels)


def _import_triton():
    try:
        import triton
        import triton.language
    except ImportError as error:
        raise ImportError(f"{ENV_VAR}=triton needs the triton package (pip install triton, Linux only); "
                          f"unset {ENV_VAR} or set it to 'torch' to use the PyTorch reference") from error
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") == "1":
        if not isinstance(triton.language.sum, InterpretedFunction):
            raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (transformers imports it, "
                               "for example), so its own helpers cannot be interpreted; set TRITON_INTERPRET=1 "
                               "before anything imports triton")
        check_interpreter_numpy(triton.__version__)
    return triton


def check_interpreter_numpy(triton_version: str) -> None:
    """triton < 3.7's interpreter turns a loop bound, a one-element array, into an int with int(array),
    which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every
    kernel with a runtime loop bound fails. The compiled GPU path is not affected."""
    import numpy

    def major_minor(version: str) -> tuple[int, int]:
        return tuple(int(part) for part in version.split(".")[:2])

    if major_minor(triton_version) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        raise RuntimeError(f"Triton's interpreter of triton {triton_version} cannot run with numpy "
                           f"{numpy.__version__}: install numpy<2.4 or triton>=3.7")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (Triton's `tl.arange` and tile sizes must be powers of two)."""
    return 1 << max(n - 1, 0).bit_length()


def as_rows(t: Tensor) -> Tensor:
    """(..., D) -> (N, D) with unit column stride; a view unless the layout forces a copy."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()
