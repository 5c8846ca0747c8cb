"""RMSNorm: y = w * x / sqrt(mean(x^2) + eps), statistics in float32, result in x's dtype.

Forward, per row x (D,), as Hugging Face's LlamaRMSNorm:
    r = 1 / sqrt(sum_i x_i^2 / D + eps)          float32, saved (one number per row)
    n = round_to_x_dtype(x * r)                  Llama rounds before scaling by the weight
    y = w * n                                    dtype = promote(x.dtype, w.dtype)
Backward, with x^ = x * r and g = dy * w (float32; the rounding of n counts as identity):
    dx = r * (g - x^ * sum_j(g_j * x^_j) / D)
    dw = sum over rows of dy * n                 only when w requires grad (a frozen layer skips it)

Triton: one row per program, the whole row in registers (BLOCK_D = next power of two >= D, the
tail masked), so x is read once and y written once. The backward walks `rows_per_program` rows per
program and writes one float32 partial dw per program, summed afterwards: deterministic, no atomics.
"""
from __future__ import annotations  # `tl.constexpr` in kernel signatures stays text until jitted

import torch
from torch import Tensor

from ._dispatch import as_rows, jit_once, next_power_of_2, use_triton


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    # Llama casts back to the input dtype before scaling by the weight, so do we.
    return weight * normed.to(x.dtype)


# The kernels: plain functions, wrapped by triton.jit on the first Triton call (see jit_once).
tl = None  # triton.language, bound by kernels._dispatch.jit_once


def _forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, x_row_stride, y_row_stride, D, eps,
                    BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=in_row, other=0.0)
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / D + eps)
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    tl.store(y_ptr + row * y_row_stride + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=in_row)
    tl.store(rstd_ptr + row, rstd)


def _backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
                     dy_row_stride, x_row_stride, dx_row_stride, N, D, rows_per_program,
                     BLOCK_D: tl.constexpr, COMPUTE_DW: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < D
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first_row = program.to(tl.int64) * rows_per_program
    for i in range(0, tl.minimum(rows_per_program, N - first_row)):
        row = first_row + i
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=in_row, other=0.0)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x.to(tl.float32) * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / D))
        tl.store(dx_ptr + row * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_row)
        if COMPUTE_DW:
            dw += dy * x_hat.to(x.dtype).to(tl.float32)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + program * D + cols, dw, mask=in_row)


def _kernels():
    return jit_once(_forward_kernel, _backward_kernel)


def _launch_config(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps): the whole row in one tile; enough warps that each thread holds
    8-16 elements (one or two 16-byte vector loads), e.g. D=2048 -> 8 warps x 32 threads x 8."""
    block_d = next_power_of_2(D)
    if block_d > 65536:
        raise ValueError(f"rms_norm: expected a last dimension <= 65536, got {D}; use LLM4SEG_KERNELS=torch")
    num_warps = 4 if block_d <= 1024 else 8 if block_d <= 4096 else 16 if block_d <= 16384 else 32
    return block_d, num_warps


# A weight gradient is reduced from at most this many per-program partials (a couple of waves of
# programs on a 132-SM H100), so the partial buffer stays small whatever the number of rows.
_MAX_DW_PARTIALS = 256


# The Triton path as two PyTorch custom operators (torch.library), with shape-only "fake" versions
# and an autograd formula, so torch.compile(fullgraph=True) traces through them as opaque calls.

@torch.library.custom_op("llm4seg::rms_norm_forward", mutates_args=())
def _forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x (..., D), weight (D,) -> y (..., D) in promote(x.dtype, weight.dtype), rstd (N,) float32."""
    forward_kernel, _ = _kernels()
    x_rows = as_rows(x)  # (N, D), N = product of the leading dims
    N, D = x_rows.shape
    block_d, num_warps = _launch_config(D)
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    y_rows = y.view(N, D)
    forward_kernel[(N,)](x_rows, weight, y_rows, rstd, x_rows.stride(0), y_rows.stride(0), D, eps,
                         BLOCK_D=block_d, num_warps=num_warps)
    return y, rstd


@_forward.register_fake
def _(x, weight, eps):
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty((rows,), dtype=torch.float32))


@torch.library.custom_op("llm4seg::rms_norm_backward", mutates_args=())
def _backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, compute_dw: bool) -> tuple[Tensor, Tensor]:
    """-> dx (x's shape and dtype) and dw (D,) in weight's dtype, or an empty dw when not compute_dw."""
    _, backward_kernel = _kernels()
    x_rows, dy_rows = as_rows(x), as_rows(dy)
    N, D = x_rows.shape
    block_d, num_warps = _launch_config(D)
    rows_per_program = -(-N // _MAX_DW_PARTIALS) if compute_dw else 1
    n_programs = -(-N // rows_per_program)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx_rows = dx.view(N, D)
    dw_partial = torch.empty((n_programs, D) if compute_dw else (1,), dtype=torch.float32, device=dy.device)
    backward_kernel[(n_programs,)](dy_rows, x_rows, weight, rstd, dx_rows, dw_partial,
                                   dy_rows.stride(0), x_rows.stride(0), dx_rows.stride(0), N, D,
                                   rows_per_program, BLOCK_D=block_d, COMPUTE_DW=compute_dw,
                                   num_warps=num_warps)
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else weight.new_empty(0)
    return dx, dw


@_backward.register_fake
def _(dy, x, weight, rstd, compute_dw):
    return x.new_empty(x.shape), weight.new_empty(weight.shape if compute_dw else (0,))


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _autograd_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    compute_dw = ctx.needs_input_grad[1]
    dx, dw = _backward(dy, x, weight, rstd, compute_dw)
    return dx, dw if compute_dw else None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x (..., D), weight (D,) -> (..., D) in promote(x.dtype, weight.dtype)."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: expected weight of shape ({x.shape[-1]},) for x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if use_triton(x):
        return _forward(x, weight.contiguous(), eps)[0]
    return rms_norm_reference(x, weight, eps)
