"""SwiGLU gate: y = silu(gate) * up, where silu(g) = g * sigmoid(g).

Forward (float32 inside, silu rounded to the input dtype before the product, as eager PyTorch):
    y = round(g * s) * u,                 s = sigmoid(g)
Backward (s recomputed from g instead of stored, which saves one tensor of the MLP's width):
    d_up   = dy * g * s
    d_gate = dy * u * s * (1 + g * (1 - s))      = dy * u * silu'(g)

Triton: element-wise over a (rows, column blocks) grid; each program handles BLOCK_I columns of
one row, the tail of a row masked (Qwen's intermediate 8960 is not a power of two). Rows may be
strided, so gate / up sliced out of a fused projection need no copy.
"""
from __future__ import annotations  # `tl.constexpr` in kernel signatures stays text until jitted

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import as_rows, jit_once, next_power_of_2, use_triton


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


# The kernels: plain functions, wrapped by triton.jit on the first Triton call (see jit_once).
tl = None  # triton.language, bound by kernels._dispatch.jit_once


def _forward_kernel(gate_ptr, up_ptr, y_ptr, gate_row_stride, up_row_stride, y_row_stride, I,
                    BLOCK_I: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_row = cols < I
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=in_row, other=0.0)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
    tl.store(y_ptr + row * y_row_stride + cols, (silu * up).to(y_ptr.dtype.element_ty), mask=in_row)


def _backward_kernel(dy_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr,
                     dy_row_stride, gate_row_stride, up_row_stride, d_row_stride, I,
                     BLOCK_I: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_row = cols < I
    dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(d_up_ptr + row * d_row_stride + cols, (dy * g * s).to(d_up_ptr.dtype.element_ty), mask=in_row)
    d_gate = dy * up * s * (1.0 + g * (1.0 - s))
    tl.store(d_gate_ptr + row * d_row_stride + cols, d_gate.to(d_gate_ptr.dtype.element_ty), mask=in_row)


def _kernels():
    return jit_once(_forward_kernel, _backward_kernel)


def _launch_config(I: int) -> tuple[int, int]:
    """(BLOCK_I, num_warps): 1024 columns x 4 warps gives each thread 8 contiguous elements, one
    16-byte load per tensor in bf16/fp16; narrower rows get one block of the next power of two."""
    return min(1024, next_power_of_2(I)), 4


# The Triton path as two PyTorch custom operators (torch.library), with shape-only "fake" versions
# and an autograd formula, so torch.compile(fullgraph=True) traces through them as opaque calls.

@torch.library.custom_op("llm4seg::swiglu_forward", mutates_args=())
def _forward(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up (..., I) -> silu(gate) * up, (..., I) contiguous."""
    forward_kernel, _ = _kernels()
    gate_rows, up_rows = as_rows(gate), as_rows(up)  # (N, I), N = product of the leading dims
    N, I = gate_rows.shape
    block_i, num_warps = _launch_config(I)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    y_rows = y.view(N, I)
    forward_kernel[(N, -(-I // block_i))](gate_rows, up_rows, y_rows, gate_rows.stride(0), up_rows.stride(0),
                                          y_rows.stride(0), I, BLOCK_I=block_i, num_warps=num_warps)
    return y


@_forward.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("llm4seg::swiglu_backward", mutates_args=())
def _backward(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """-> d_gate, d_up, each of gate's shape and dtype."""
    _, backward_kernel = _kernels()
    dy_rows, gate_rows, up_rows = as_rows(dy), as_rows(gate), as_rows(up)
    N, I = gate_rows.shape
    block_i, num_warps = _launch_config(I)
    d_gate, d_up = (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) for _ in range(2))
    d_gate_rows, d_up_rows = d_gate.view(N, I), d_up.view(N, I)
    backward_kernel[(N, -(-I // block_i))](dy_rows, gate_rows, up_rows, d_gate_rows, d_up_rows,
                                           dy_rows.stride(0), gate_rows.stride(0), up_rows.stride(0),
                                           d_gate_rows.stride(0), I, BLOCK_I=block_i, num_warps=num_warps)
    return d_gate, d_up


@_backward.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _autograd_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return _backward(dy, gate, up)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up (..., I) of one shape and dtype -> (..., I)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: expected gate and up of one shape and dtype, got {tuple(gate.shape)} "
                         f"{gate.dtype} and {tuple(up.shape)} {up.dtype}")
    if use_triton(gate):
        return _forward(gate, up)
    return swiglu_reference(gate, up)
