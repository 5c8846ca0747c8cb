"""Non-causal grouped-query attention: softmax(cap(c q k^T)) v per head, flash-style.

q (B, Hq, T, d); k, v (B, Hkv, T, d); kv head j serves q heads j*g .. j*g+g-1, g = Hq / Hkv.
c = scale (default 1/sqrt(d); Gemma-2 uses query_pre_attn_scalar^-1/2). cap is Gemma-2's logit
soft-capping, cap(x) = softcap * tanh(x / softcap), or the identity when softcap = 0.
Forward, per q head:
    X = c q k^T (T, T)   S = cap(X)   P = softmax_rows(S)   O = P v   L = logsumexp_rows(S)  (saved)
Backward (P rebuilt block by block from q, k and L; never stored):
    delta = rowsum(dO * O)                   (= rowsum(P * dP), the softmax Jacobian's shift)
    dP = dO v^T     dS = P * (dP - delta)    dX = dS * cap'(X),  cap'(X) = 1 - (S / softcap)^2
    dQ = c dX k     dK = c dX^T q     dV = P^T dO
    dK, dV of a kv head sum those of its g q heads.

Triton forward: one program per (BLOCK_M query rows, q head); it streams BLOCK_N keys at a time
with an online softmax (running max m and sum l, in base 2: exp2(S log2 e) = exp(S)), so the
T x T matrix is never materialised; it saves O and L (one float32 per row, kept in base 2).
Backward: a preprocess kernel computes delta; a dK/dV program owns BLOCK_N keys of one kv head
and loops over all query blocks of every q head of its group, so the group sum happens in its
registers (deterministic, no atomics, no k / v copied per q head); a dQ program owns BLOCK_M
query rows and loops over the keys. T needs no multiple of a block (tails are masked); d is any
multiple of 16 from 16 to 256 (tiles are BLOCK_D = next power of two wide, the extra columns
masked: zeros add nothing to q k^T, and the padded output columns are not stored); all products
accumulate in float32.
"""
from __future__ import annotations  # `tl.constexpr` in kernel signatures stays text until jitted

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import jit_once, next_power_of_2, triton_helper, use_triton

LOG2_E = 1.4426950408889634


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                        softcap: float = 0.0) -> Tensor:
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, Hq, T, d)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, Hq, T, T)
    scores = softcap * torch.tanh(scores / softcap)
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


# The kernels: plain functions, wrapped by triton.jit on the first Triton call (see jit_once).
# Each (B, H, T, d) operand comes with its (batch, head, time) strides, d being contiguous, so
# transposed or GQA-shared tensors are read in place. input_precision="ieee" keeps fp32 dots out
# of TF32 on a GPU and does not change fp16 / bf16 dots.
tl = None  # triton.language, bound by kernels._dispatch.jit_once


@triton_helper
def _head(ptr, batch, head, stride_b, stride_h):
    """The start of one head's (T, d) matrix in a (B, H, T, d) tensor."""
    return ptr + batch * stride_b + head * stride_h


@triton_helper
def _tile_mask(in_range, cols, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Which elements of a (rows, BLOCK_D) tile exist: rows before T, columns before HEAD_DIM. The
    column test is compiled in only when the head dim is padded (80 -> 128, say)."""
    if HEAD_DIM == BLOCK_D:
        return in_range[:, None]
    else:
        return in_range[:, None] & (cols[None, :] < HEAD_DIM)


@triton_helper
def _load_rows(head_ptr, rows, stride_t, cols, mask):
    """Rows `rows` (a block of time steps) x the d columns of a head's matrix; what `mask` leaves out reads 0."""
    return tl.load(head_ptr + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)


@triton_helper
def _logits(qk, qk_scale_log2, softcap_log2, SOFTCAP: tl.constexpr):
    """Base-2 logits S log2(e) of a q k^T tile. Soft-capping commutes with the change of base:
    cap tanh(x / cap) log2(e) = cap2 tanh(x log2(e) / cap2) with cap2 = cap log2(e)."""
    s = qk * qk_scale_log2
    if SOFTCAP:
        # tanh(y) = (1 - e) / (1 + e) with e = exp(-2 |y|) <= 1: no overflow, and the interpreter
        # has no libdevice tanh. Its absolute error is ~1 ulp of 1, ~6e-8.
        y = s / softcap_log2
        e = tl.math.exp2(-2.8853900817779268 * tl.abs(y))  # 2 log2(e)
        tanh = (1.0 - e) / (1.0 + e)
        s = softcap_log2 * tl.where(y < 0, -tanh, tanh)
    return s


@triton_helper
def _through_cap(ds, s, softcap_log2, SOFTCAP: tl.constexpr):
    """dS -> dX: the soft-cap's derivative 1 - tanh^2, tanh read back from the capped logits."""
    if SOFTCAP:
        tanh = s / softcap_log2
        ds = ds * (1.0 - tanh * tanh)
    return ds


@triton_helper
def _store_rows(head_ptr, rows, stride_t, cols, mask, values):
    tl.store(head_ptr + rows[:, None] * stride_t + cols[None, :], values.to(head_ptr.dtype.element_ty), mask=mask)


def _forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                    Hq, T, qk_scale_log2, softcap_log2, GROUP: tl.constexpr, SOFTCAP: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    batch_head = tl.program_id(1).to(tl.int64)
    batch, q_head = batch_head // Hq, batch_head % Hq
    kv_head = q_head // GROUP
    q_head_ptr = _head(q_ptr, batch, q_head, stride_qb, stride_qh)  # this head's (T, d) matrix
    k_head_ptr = _head(k_ptr, batch, kv_head, stride_kb, stride_kh)
    v_head_ptr = _head(v_ptr, batch, kv_head, stride_vb, stride_vh)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_in = rows < T
    row_tile = _tile_mask(row_in, cols, HEAD_DIM, BLOCK_D)
    q = _load_rows(q_head_ptr, rows, stride_qt, cols, row_tile)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running row max of S log2(e)
    l = tl.zeros((BLOCK_M,), tl.float32)  # running row sum of exp2(S log2(e) - m)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # running (unnormalised) P v
    for start_n in range(0, T, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_in = keys < T
        key_tile = _tile_mask(key_in, cols, HEAD_DIM, BLOCK_D)
        k = _load_rows(k_head_ptr, keys, stride_kt, cols, key_tile)
        v = _load_rows(v_head_ptr, keys, stride_vt, cols, key_tile)
        s = _logits(tl.dot(q, tl.trans(k), input_precision="ieee"), qk_scale_log2, softcap_log2, SOFTCAP)
        s = tl.where(key_in[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        rescale = tl.math.exp2(m - m_new)  # earlier blocks were summed against a smaller max
        l = l * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new
    o_head_ptr = _head(o_ptr, batch, q_head, stride_ob, stride_oh)
    _store_rows(o_head_ptr, rows, stride_ot, cols, row_tile, acc / l[:, None])
    tl.store(lse_ptr + batch_head * T + rows, m + tl.math.log2(l), mask=row_in)


def _delta_kernel(o_ptr, do_ptr, delta_ptr, stride_ob, stride_oh, stride_ot,
                  stride_dob, stride_doh, stride_dot, Hq, T,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    batch_head = tl.program_id(1).to(tl.int64)
    batch, q_head = batch_head // Hq, batch_head % Hq
    o_head_ptr = _head(o_ptr, batch, q_head, stride_ob, stride_oh)
    do_head_ptr = _head(do_ptr, batch, q_head, stride_dob, stride_doh)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_in = rows < T
    row_tile = _tile_mask(row_in, cols, HEAD_DIM, BLOCK_D)
    o = _load_rows(o_head_ptr, rows, stride_ot, cols, row_tile)
    do = _load_rows(do_head_ptr, rows, stride_dot, cols, row_tile)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + batch_head * T + rows, delta, mask=row_in)


def _dk_dv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                  stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                  stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                  stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                  Hq, Hkv, T, sm_scale, qk_scale_log2, softcap_log2, GROUP: tl.constexpr, SOFTCAP: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    batch_head = tl.program_id(1).to(tl.int64)
    batch, kv_head = batch_head // Hkv, batch_head % Hkv
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    key_in = keys < T
    key_tile = _tile_mask(key_in, cols, HEAD_DIM, BLOCK_D)
    k_head_ptr = _head(k_ptr, batch, kv_head, stride_kb, stride_kh)
    v_head_ptr = _head(v_ptr, batch, kv_head, stride_vb, stride_vh)
    k = _load_rows(k_head_ptr, keys, stride_kt, cols, key_tile)
    v = _load_rows(v_head_ptr, keys, stride_vt, cols, key_tile)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for group_member in range(GROUP):  # the q heads this kv head serves; their sum stays here
        q_head = kv_head * GROUP + group_member
        q_head_ptr = _head(q_ptr, batch, q_head, stride_qb, stride_qh)
        do_head_ptr = _head(do_ptr, batch, q_head, stride_dob, stride_doh)
        row_stats = (batch * Hq + q_head) * T  # offset of this head's L and delta
        for start_m in range(0, T, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_in = rows < T
            row_tile = _tile_mask(row_in, cols, HEAD_DIM, BLOCK_D)
            q = _load_rows(q_head_ptr, rows, stride_qt, cols, row_tile)
            do = _load_rows(do_head_ptr, rows, stride_dot, cols, row_tile)
            lse = tl.load(lse_ptr + row_stats + rows, mask=row_in, other=0.0)
            delta = tl.load(delta_ptr + row_stats + rows, mask=row_in, other=0.0)
            # Transposed tiles (keys x queries), so dK and dV accumulate without a transpose.
            s_t = _logits(tl.dot(k, tl.trans(q), input_precision="ieee"), qk_scale_log2, softcap_log2, SOFTCAP)
            p_t = tl.where(row_in[None, :], tl.math.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
            dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
            ds_t = _through_cap(p_t * (dp_t - delta[None, :]), s_t, softcap_log2, SOFTCAP)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision="ieee")
    dk_head_ptr = _head(dk_ptr, batch, kv_head, stride_dkb, stride_dkh)
    dv_head_ptr = _head(dv_ptr, batch, kv_head, stride_dvb, stride_dvh)
    _store_rows(dk_head_ptr, keys, stride_dkt, cols, key_tile, dk * sm_scale)
    _store_rows(dv_head_ptr, keys, stride_dvt, cols, key_tile, dv)


def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
               stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
               stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
               stride_dqb, stride_dqh, stride_dqt,
               Hq, T, sm_scale, qk_scale_log2, softcap_log2, GROUP: tl.constexpr, SOFTCAP: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    batch_head = tl.program_id(1).to(tl.int64)
    batch, q_head = batch_head // Hq, batch_head % Hq
    kv_head = q_head // GROUP
    q_head_ptr = _head(q_ptr, batch, q_head, stride_qb, stride_qh)
    do_head_ptr = _head(do_ptr, batch, q_head, stride_dob, stride_doh)
    k_head_ptr = _head(k_ptr, batch, kv_head, stride_kb, stride_kh)
    v_head_ptr = _head(v_ptr, batch, kv_head, stride_vb, stride_vh)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_in = rows < T
    row_tile = _tile_mask(row_in, cols, HEAD_DIM, BLOCK_D)
    q = _load_rows(q_head_ptr, rows, stride_qt, cols, row_tile)
    do = _load_rows(do_head_ptr, rows, stride_dot, cols, row_tile)
    lse = tl.load(lse_ptr + batch_head * T + rows, mask=row_in, other=0.0)
    delta = tl.load(delta_ptr + batch_head * T + rows, mask=row_in, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, T, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_in = keys < T
        key_tile = _tile_mask(key_in, cols, HEAD_DIM, BLOCK_D)
        k = _load_rows(k_head_ptr, keys, stride_kt, cols, key_tile)
        v = _load_rows(v_head_ptr, keys, stride_vt, cols, key_tile)
        s = _logits(tl.dot(q, tl.trans(k), input_precision="ieee"), qk_scale_log2, softcap_log2, SOFTCAP)
        p = tl.where(key_in[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = _through_cap(p * (dp - delta[:, None]), s, softcap_log2, SOFTCAP)
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    dq_head_ptr = _head(dq_ptr, batch, q_head, stride_dqb, stride_dqh)
    _store_rows(dq_head_ptr, rows, stride_dqt, cols, row_tile, dq * sm_scale)


def _kernels():
    return jit_once(_forward_kernel, _delta_kernel, _dk_dv_kernel, _dq_kernel)


def _launch_config(head_dim: int, T: int, float32: bool = False) -> dict:
    """Tile sizes and warps, by head_dim (reasoning for an H100 below). Every config holds BLOCK_D,
    the head dim padded to a power of two (tl.arange's rule: 80, 96, 112 -> 128), and the rules
    below read that padded width, which is what the registers hold.

    The rows of a program's dots (BLOCK_M queries in the forward and dQ, BLOCK_N keys in dK/dV) are
    the tensor cores' M side. An H100 warpgroup (4 warps) multiplies 64-row bands (wgmma m64), so a
    tile of 16 x num_warps rows or more with the warps stacked along the rows keeps every softmax row
    inside one warp's band, and P goes into the next dot in the same arrangement. Fewer rows than that
    (64 rows on 8 warps) gives each of the two dots its own layout (at d = 128, q k^T on warps [8, 1]
    with n = 32 instructions, P v on [4, 2]), so P changes hands between warps, and the forward's PTX
    holds 20 wgmma instructions for 64 rows where 128 stacked rows need 12 (read from the sm_90 TTGIR
    and PTX; tests/test_kernels_compile.py asserts the layouts). Hence, in fp16 / bf16:
    - d <= 64 (Llama-3.2-1B): 64 x 64 tiles on 4 warps everywhere (3 stages in the forward).
    - d = 128 (Llama-3.1-8B, DeepSeek, Mistral, Qwen2): the forward takes 128 query rows x 64 keys
      on 8 warps, as FlashAttention-2 takes 128 query rows at this head dim (sm_90: 179 registers,
      no spill, 128 KiB shared; sm_80: 205, no spill, 96 KiB). dQ takes 64 rows x 32-key steps on
      4 warps, stacked (18 wgmma instructions where 8 warps needed 34; 126 registers, no spill).
      dK/dV keeps 64 keys x 32 query steps on 8 warps, unstacked: 64 keys on 4 warps spill 16 B per
      thread on sm_90, and 128 keys on 8 warps (245 registers on sm_90, 16 B spill on sm_80) would
      halve its programs, to 32 for DeepSeek's 2 kv heads at B = 8, T = 256, a quarter of an H100's
      132 SMs. Which costs least only a GPU can tell.
    - d = 256 (Gemma-2): 32-wide steps on 8 warps, as measured to fit; not reasoned further.
    Programs at B = 8, T = 256: 4 row blocks x B*Hq for 64-row tiles (Llama-3.2-1B: 1,024, over 7
    per SM), 2 x B*Hq for DeepSeek's 128-row forward (192, under 2 waves of one 8-warp program per SM).
    Short sequences shrink the blocks (never below 16, the smallest tl.dot side) so T = 1 or 17
    does not compute 64-wide padding.
    float32 inputs (parity tests, --precision fp32) hold twice the bytes per tile: 64-row tiles with
    3 stages needed 180,480 B of shared memory at d = 128 (over an A100's 166,912) and spilled up to
    7.4 kB per thread (as first measured, unspecialised), so they use 32-row tiles and 2 stages (4 warps up to d = 64, else 8), and
    16-row tiles at d = 256, where 32 rows spilled 8.2 kB per thread in dK/dV on sm_80.
    Figures for the builds a launch at T = 256 gets (aligned pointers and strides, triton 3.9), from
    tests/kernel_resources.py; tests/test_kernels_compile.py asserts them.
    """
    fit = max(16, next_power_of_2(T))
    block_d = next_power_of_2(head_dim)
    warps = 4 if block_d <= 64 else 8
    if float32:
        block = step = min(32 if block_d <= 128 else 16, fit)
        return dict(
            forward=dict(BLOCK_D=block_d, BLOCK_M=block, BLOCK_N=block, num_warps=warps, num_stages=2),
            delta=dict(BLOCK_D=block_d, BLOCK_M=block),
            dk_dv=dict(BLOCK_D=block_d, BLOCK_N=block, BLOCK_M=step, num_warps=warps, num_stages=2),
            dq=dict(BLOCK_D=block_d, BLOCK_M=block, BLOCK_N=step, num_warps=warps, num_stages=2),
        )
    block = min(64 if block_d <= 128 else 32, fit)
    step = min(32, fit)
    return dict(
        forward=dict(BLOCK_D=block_d, BLOCK_M=min(128 if block_d == 128 else 64, fit), BLOCK_N=block,
                     num_warps=warps, num_stages=3 if block_d <= 128 else 2),
        delta=dict(BLOCK_D=block_d, BLOCK_M=block),
        dk_dv=dict(BLOCK_D=block_d, BLOCK_N=block, BLOCK_M=step, num_warps=warps, num_stages=2),
        dq=dict(BLOCK_D=block_d, BLOCK_M=block, BLOCK_N=step, num_warps=4 if block_d <= 128 else 8, num_stages=2),
    )


def _strides(t: Tensor) -> tuple[int, int, int]:
    """(batch, head, time) strides of a (B, H, T, d) tensor whose last dimension is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# The Triton path as two PyTorch custom operators (torch.library), with shape-only "fake" versions
# and an autograd formula, so torch.compile(fullgraph=True) traces through them as opaque calls.
# Outputs take their input's layout (empty_like): for q viewed from a (B, T, Hq, d) projection, the
# caller's transpose(1, 2).reshape(B, T, Hq * d) of o is then a view, not a copy (the same for dq).

@torch.library.custom_op("llm4seg::attention_forward", mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float) -> tuple[Tensor, Tensor]:
    """q (B, Hq, T, d), k, v (B, Hkv, T, d) -> o (B, Hq, T, d), lse (B, Hq, T) float32 in base 2."""
    forward_kernel, *_ = _kernels()
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, T, d = q.shape
    config = _launch_config(d, T, q.dtype == torch.float32)["forward"]
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    grid = (-(-T // config["BLOCK_M"]), B * Hq)
    forward_kernel[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                         Hq, T, scale * LOG2_E, softcap * LOG2_E, GROUP=Hq // k.shape[1], SOFTCAP=softcap > 0,
                         HEAD_DIM=d, **config)
    return o, lse


@_forward.register_fake
def _(q, k, v, scale, softcap):
    B, Hq, T, _ = q.shape
    return torch.empty_like(_last_dim_contiguous(q)), q.new_empty((B, Hq, T), dtype=torch.float32)


@torch.library.custom_op("llm4seg::attention_backward", mutates_args=())
def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float,
              softcap: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv, each in its input's shape and layout."""
    _, delta_kernel, dk_dv_kernel, dq_kernel = _kernels()
    q, k, v, do = (_last_dim_contiguous(t) for t in (q, k, v, do))
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    config = _launch_config(d, T, q.dtype == torch.float32)
    scores = dict(GROUP=Hq // Hkv, SOFTCAP=softcap > 0, HEAD_DIM=d)  # constexprs of both gradient kernels
    delta = torch.empty_like(lse)
    block_m = config["dq"]["BLOCK_M"]
    delta_kernel[(-(-T // block_m), B * Hq)](o, do, delta, *_strides(o), *_strides(do), Hq, T,
                                             HEAD_DIM=d, **config["delta"])
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dk_dv_kernel[(-(-T // config["dk_dv"]["BLOCK_N"]), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dk), *_strides(dv), Hq, Hkv, T, scale, scale * LOG2_E, softcap * LOG2_E,
        **scores, **config["dk_dv"])
    dq = torch.empty_like(q)
    dq_kernel[(-(-T // block_m), B * Hq)](
        q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dq), Hq, T, scale, scale * LOG2_E, softcap * LOG2_E, **scores, **config["dq"])
    return dq, dk, dv


@_backward.register_fake
def _(do, q, k, v, o, lse, scale, softcap):
    return tuple(torch.empty_like(_last_dim_contiguous(t)) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.scale, ctx.softcap = inputs
    ctx.save_for_backward(q, k, v, *output)


def _autograd_backward(ctx, do, _dlse):
    return *_backward(do, *ctx.saved_tensors, ctx.scale, ctx.softcap), None, None  # none for scale, softcap


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, softcap: float = 0.0) -> Tensor:
    """q (B, Hq, T, d), k/v (B, Hkv, T, d) with Hq % Hkv == 0 -> (B, Hq, T, d). scale: of q k^T,
    None = 1/sqrt(d); softcap > 0 caps the scaled logits to (-softcap, softcap) (Gemma-2), 0 = off."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention: expected q (B, Hq, T, d) and k, v (B, Hkv, T, d), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"attention: expected Hq a multiple of Hkv, got Hq={q.shape[1]}, Hkv={k.shape[1]}")
    if softcap < 0:
        raise ValueError(f"attention: expected softcap >= 0 (0 = no soft-capping), got {softcap}")
    if not use_triton(q):
        return attention_reference(q, k, v, scale=scale, softcap=softcap)
    d = q.shape[-1]
    if d % 16 or not 16 <= d <= 256:
        raise ValueError(f"attention: the Triton kernel expects head_dim a multiple of 16 from 16 to 256, got {d} "
                         "(tl.dot needs sides of 16 or more); set LLM4SEG_KERNELS=torch to use the PyTorch reference")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: expected q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return _forward(q, k, v, 1.0 / math.sqrt(d) if scale is None else float(scale), float(softcap))[0]
