"""Fused SphereLinear kernels: forward and backward launchers for ``x [M, in] @ w [out, in]^T``.

The math (DESIGN §1, with a patch = one row of ``x``)::

    r_x[m] = sqrt(sum_k x[m,k]^2 + eps)        r_w[o] = sqrt(sum_k w[o,k]^2 + eps)
    c[m,o] = clamp(<x_m, w_o> / (r_x[m] r_w[o]), -1, 1)       y = g(arccos c) + b[o]

Forward: one GEMM kernel. The K-loop feeds the same ``x`` tiles to ``tl.dot`` and to the row sums
of squares, so ``r_x`` costs no extra read of ``x``; the epilogue forms ``c``, ``g`` and the bias.
``r_w`` (one scalar per filter) comes from a tiny row-norm kernel first, so the GEMM programs do not
each redo the filters' sums of squares.

Backward, with ``G = dy * dg/dc`` (``kernels/angular.py``)::

    A[m] = sum_o G c / r_x^2        S[o] = sum_m G c
    dx   = (G @ (w / r_w)) / r_x - x * A
    dw   = (G^T @ (x / r_x)) / r_w - w * S / r_w^2
    db   = sum_m dy                 dk[o] = sum_m dy * dg/dk

Two kernels: (1) an elementwise pass over ``[M, out]`` tiles writes ``G`` (input dtype) and
fp32 per-tile partial sums of ``G c`` (per row and per column), ``dy`` and ``dy dg/dk``;
(2) one GEMM kernel launched twice, for dx and (on ``G`` transposed, by its strides) for dw,
reads ``G`` and finishes by summing the partials in a fixed order (deterministic: no atomics
anywhere). The *other* GEMM operand is scaled by its inverse norm -- ``w / r_w`` for dx,
written once by the row-norm launch that computes r_w (weight-sized), and ``x / r_x`` for dw,
inside the K-loop (an input-sized copy would cost more than it saves) -- which keeps the
fp16/bf16 operands of ``tl.dot`` well scaled (rows of unit norm) instead of storing
``G / (r_x r_w)``, which underflows in fp16 for large inputs (|x| ~ 300), and lets the remaining
per-row factor leave the GEMM.

Dtypes: float32 (tf32 tensor cores iff ``torch.backends.cuda.matmul.allow_tf32``, else exact
fp32), float16, bfloat16. Accumulation and the epilogue are fp32; outputs in the input dtype,
``r_x`` in fp32. float64 is the reference backend's job (TypeError here).

Launch: through ``sphereops_kernels.launch`` (plain in eager, ``wrap_triton`` while torch.compile
traces the ``triton_op``, plain under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .angular import OPERATOR_CODES, cosine_and_dg_dc, dg_dk
from .epilogue import store_sphere_tile, to_dtype_of
from .launch import cdiv as _cdiv
from .launch import interpreting as _interpreting
from .launch import launch
from .plans import PlanCache, launch_memos, tensor_key

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _row_norm_kernel(a_ptr, out_ptr, unit_ptr, R, C, stride_ar, stride_ac, eps,
                     STORE_UNIT: tl.constexpr, EMULATE_RTNE: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[r] = sqrt(sum_c a[r, c]^2 + eps) in fp32 (the filter norms r_w) and, with STORE_UNIT,
    unit[r, c] = a[r, c] / out[r] in a's dtype (the unit filters w_hat of the dx GEMM).

    a_ptr:    [R, C] any float dtype, strides (stride_ar, stride_ac).
    out_ptr:  [R] float32, contiguous.
    unit_ptr: [R, C] a's dtype, contiguous (unwritten without STORE_UNIT).
    eps:      fp32 scalar added under the square root.
    EMULATE_RTNE: the interpreter's bf16 rounding fixed up (epilogue.to_dtype_of).
    BLOCK_R: rows per program; BLOCK_C: columns per loop step.
    Grid: (cdiv(R, BLOCK_R),).
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = row_mask[:, None] & (cols[None, :] < C)
        a = tl.load(a_ptr + rows[:, None] * stride_ar + cols[None, :] * stride_ac,
                    mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(a * a, axis=1)
    norm = tl.sqrt(acc + eps)
    tl.store(out_ptr + rows, norm, mask=row_mask)
    if STORE_UNIT:
        # the same product the in-loop scaling forms (a * (1 / r), rounded once to a's dtype)
        inv = 1.0 / norm
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = row_mask[:, None] & (cols[None, :] < C)
            a = tl.load(a_ptr + rows[:, None] * stride_ar + cols[None, :] * stride_ac,
                        mask=mask, other=0.0).to(tl.float32)
            tl.store(unit_ptr + rows[:, None] * C + cols[None, :],
                     to_dtype_of(a * inv[:, None], unit_ptr, EMULATE_RTNE), mask=mask)


@triton.jit
def _sphere_linear_fwd_kernel(
        x_ptr, w_ptr, r_w_ptr, bias_ptr, k_ptr, y_ptr, c_ptr, r_x_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
        eps,
        OPERATOR: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr, STORE_C: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Forward GEMM with fused row norms and the angular epilogue.

    x_ptr:    [M, K] input rows (fp32/fp16/bf16), strides (stride_xm, stride_xk).
    w_ptr:    [N, K] filters, same dtype, strides (stride_wn, stride_wk).
    r_w_ptr:  [N] float32 filter norms sqrt(||w_o||^2 + eps), contiguous.
    bias_ptr: [N] bias (w dtype), contiguous; read only if HAS_BIAS (else any valid pointer).
    k_ptr:    [N] sigmoid steepness (w dtype), contiguous; read only if OPERATOR == 2.
    y_ptr:    [M, N] output g(theta) + b in the input dtype, strides (stride_ym, stride_yn).
    c_ptr:    [M, N] clamped cosine in the input dtype, same strides as y.
    r_x_ptr:  [M] float32 row norms sqrt(||x_m||^2 + eps), contiguous; written by pid_n == 0.
    eps:      fp32 scalar.
    OPERATOR: 0 linear, 1 cosine, 2 sigmoid (angular.OPERATOR_CODES).
    HAS_BIAS: add bias[o] after g.
    DOT_PRECISION: "tf32" or "ieee", tl.dot input precision for fp32 operands.
    UPCAST_DOT: cast the dot operands to fp32 (interpreter only: bf16 tl.dot is wrong there).
    STORE_C:  write c (False: the caller saves y for the backward; c_ptr is then any valid
              pointer, never stored through).
    BLOCK_M, BLOCK_N, BLOCK_K: tile sizes (powers of two >= 16).
    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # a plain row sum of squares each step (per-thread partials reduced after the loop gave
    # wrong norms for some conv tiles on an H200: conv_fwd._accumulate_step)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)   # ks * stride can pass 2^31 (strided w)
        k_mask = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)  # [BLOCK_K, BLOCK_N]
        xf = x.to(tl.float32)
        # fp32 squares: fp16 x^2 overflows for |x| > 256
        sumsq += tl.sum(xf * xf, axis=1)
        if UPCAST_DOT:
            acc = tl.dot(xf, w.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    r_x = tl.sqrt(sumsq + eps)
    r_w = tl.load(r_w_ptr + cols, mask=col_mask, other=1.0)
    out_offsets = rows[:, None] * stride_ym + cols[None, :] * stride_yn
    store_sphere_tile(acc, (1.0 / r_x)[:, None] * (1.0 / r_w)[None, :], cols, col_mask, out_offsets,
                      row_mask[:, None] & col_mask[None, :], bias_ptr, k_ptr, y_ptr, c_ptr,
                      OPERATOR, HAS_BIAS, False, STORE_C)
    if pid_n == 0:
        tl.store(r_x_ptr + rows, r_x, mask=row_mask)


@triton.jit
def _sphere_linear_bwd_grad_c_kernel(
        dy_ptr, c_ptr, k_ptr, bias_ptr, grad_c_ptr, row_part_ptr, col_part_ptr,
        M, N,
        stride_dym, stride_dyn, stride_cm, stride_cn,
        OPERATOR: tl.constexpr, DELTA: tl.constexpr, FROM_OUTPUT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        NEED_GRAD_C: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Elementwise backward pass: G = dy * dg/dc and the per-tile partial reductions.

    dy_ptr:       [M, N] incoming gradient (input dtype), strides (stride_dym, stride_dyn).
    c_ptr:        [M, N] saved clamped cosine (input dtype), strides (stride_cm, stride_cn);
                  with FROM_OUTPUT the forward's output y instead (linear, cosine), c recovered
                  here (angular.cosine_and_dg_dc).
    k_ptr:        [N] sigmoid steepness, contiguous; read only if OPERATOR == 2.
    bias_ptr:     [N] contiguous, the b in y; read only if HAS_BIAS (which needs FROM_OUTPUT).
    grad_c_ptr:   [M, N] output G in the input dtype, contiguous (row stride N).
    row_part_ptr: [cdiv(N, BLOCK_N), M] float32, contiguous: sum over this program's columns
                  of G * c (the A numerator), one row of partials per column tile.
    col_part_ptr: [3, cdiv(M, BLOCK_M), N] float32, contiguous: per row tile, the column sums
                  of G * c (S), of dy (db) and of dy * dg/dk (dk).
    OPERATOR:     0 linear, 1 cosine, 2 sigmoid.  DELTA: the arccos derivative bound.
    NEED_GRAD_C:  write G and the G*c partials (dx or dw requested).
    NEED_DB, NEED_DK: write the dy and dy*dg/dk column partials.
    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                 mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                mask=mask, other=0.0).to(tl.float32)
    if OPERATOR == 2:
        kk = tl.load(k_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)[None, :]
    else:
        kk = 1.0
    if HAS_BIAS:
        bv = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    else:
        bv = 0.0
    c, dgdc = cosine_and_dg_dc(c, kk, bv, OPERATOR, DELTA, FROM_OUTPUT)
    num_m_tiles = tl.num_programs(0).to(tl.int64)
    if NEED_GRAD_C:
        grad_c = dy * dgdc
        tl.store(grad_c_ptr + rows[:, None] * N + cols[None, :],
                 grad_c.to(grad_c_ptr.dtype.element_ty), mask=mask)
        gc = grad_c * c
        tl.store(row_part_ptr + pid_n * M + rows, tl.sum(gc, axis=1), mask=row_mask)
        tl.store(col_part_ptr + pid_m * N + cols, tl.sum(gc, axis=0), mask=col_mask)
    if NEED_DB:
        tl.store(col_part_ptr + (num_m_tiles + pid_m) * N + cols, tl.sum(dy, axis=0),
                 mask=col_mask)
    if NEED_DK:
        ddk = dy * dg_dk(c, kk)
        # out-of-range lanes must add exactly 0 whatever dg/dk evaluates to there
        ddk = tl.where(mask, ddk, 0.0)
        tl.store(col_part_ptr + (2 * num_m_tiles + pid_m) * N + cols, tl.sum(ddk, axis=0),
                 mask=col_mask)


@triton.jit
def _sphere_linear_bwd_operand_kernel(
        g_ptr, b_ptr, nb_ptr, a_ptr, na_ptr, part_ptr, out_ptr,
        I, J, K, num_part_rows,
        stride_gi, stride_gj, stride_bj, stride_bk, stride_ai, stride_ak, stride_oi, stride_ok,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, B_IS_UNIT: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """The gradient of one GEMM operand (dx or dw: the same computation, transposed):

        out[i, k] = (sum_j G'[i, j] B[j, k] / nb[j]) / na[i] - A[i, k] P[i] / na[i]^2,
        P[i] = sum_t part[t, i] (summed here in tile order: deterministic).

    dx: i = rows m, j = out features, G' = G, B = w_hat = w / r_w (B_IS_UNIT: the unit
        filters the row-norm kernel wrote), A = x, na = r_x, part = the row partials of G c
        (so P / r_x^2 is DESIGN's A).
    dw: i = out features, j = rows m, G' = G^T (G's strides swapped), B = x, nb = r_x, A = w,
        na = r_w, part = the column partials of G c (P = S).

    g_ptr:    G' [I, J] (input dtype), strides (stride_gi, stride_gj).
    b_ptr:    B [J, K], strides (stride_bj, stride_bk).   nb_ptr: [J] float32 norms (unread
              with B_IS_UNIT: B's rows already have unit norm).
    a_ptr:    A [I, K], strides (stride_ai, stride_ak).   na_ptr: [I] float32 norms.
    part_ptr: [num_part_rows, I] float32 contiguous partial sums.
    out_ptr:  [I, K] output (input dtype), strides (stride_oi, stride_ok).
    DOT_PRECISION / UPCAST_DOT: as in the forward kernel. Scaling B by 1/nb inside the loop keeps
    the 16-bit dot operands unit-scaled (see the module docstring); a B scaled in registers
    makes the loop wait for each wgmma before the next step's scaling (docs/aot_table.md,
    "K-loop wgmma"), so dx takes B pre-scaled (B_IS_UNIT: both operands straight from the
    loads, a pipelined loop); dw's B is x, input-sized, and keeps the in-loop scaling.
    BLOCK_I, BLOCK_J (reduction), BLOCK_K: tile sizes.
    Grid: (cdiv(I, BLOCK_I), cdiv(K, BLOCK_K)).
    """
    pid_i = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    i_mask = offs_i < I
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        # int64: offs_j * strides can pass 2^31 for large layers and batches
        offs_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        j_mask = offs_j < J
        g = tl.load(g_ptr + offs_i[:, None] * stride_gi + offs_j[None, :] * stride_gj,
                    mask=i_mask[:, None] & j_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_j[:, None] * stride_bj + offs_k[None, :] * stride_bk,
                    mask=j_mask[:, None] & k_mask[None, :], other=0.0)
        if not B_IS_UNIT:
            inv_nb = 1.0 / tl.load(nb_ptr + offs_j, mask=j_mask, other=1.0)
            b_unit = b.to(tl.float32) * inv_nb[:, None]
            # rounded back to the operand dtype for the MMA; the interpreter's dot takes it
            # unrounded (its bf16 cast would truncate)
            b = b_unit if UPCAST_DOT else b_unit.to(b.dtype)
        if UPCAST_DOT:
            acc = tl.dot(g.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(g, b, acc, input_precision=DOT_PRECISION)
    p_sum = tl.zeros((BLOCK_I,), dtype=tl.float32)
    part_ptrs = part_ptr + offs_i            # pointer steps stay 64-bit: t * I may pass 2^31
    for _ in range(0, num_part_rows):
        p_sum += tl.load(part_ptrs, mask=i_mask, other=0.0)
        part_ptrs += I
    na = tl.load(na_ptr + offs_i, mask=i_mask, other=1.0)
    a = tl.load(a_ptr + offs_i[:, None] * stride_ai + offs_k[None, :] * stride_ak,
                mask=i_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
    out = acc / na[:, None] - a * (p_sum / (na * na))[:, None]
    tl.store(out_ptr + offs_i[:, None] * stride_oi + offs_k[None, :] * stride_ok,
             out.to(out_ptr.dtype.element_ty), mask=i_mask[:, None] & k_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

def _gemm_config(dtype: torch.dtype, precision: str) -> dict:
    """Tiles of the forward GEMM: output tile BLOCK_M x BLOCK_N, reduction step BLOCK_K.

    Chosen from the compile-time resource use (make aot-check: shared memory, registers, no
    spills) and the usual Hopper GEMM shapes; not yet timed against alternatives on a GPU.

    Tensor cores, 16-bit: 128x128 output tiles with 8 warps give wgmma enough work per load;
    BLOCK_K 64 keeps 3 stages near 64 KiB of shared memory. tf32: 128x64x32 with 4 warps -- the
    128x128x32 8-warp tile gave wrong cosines on an H200 (triton 3.6: 7,335 of 196,608 elements
    of a 512x256 @ 256x384 product beyond the tf32 rounding bound, the worst 0.06 off;
    bench/results/20261127-1339_*), while this 4-warp tile passed the same test. Exact fp32 ("ieee") runs on the FMA units, whose dot layout keeps the operands
    in registers: 64x64 tiles with 4 warps compile without spills. Large tiles also keep the
    interpreter's program count (its main cost) low at test shapes.
    """
    if dtype == torch.float32 and precision == "ieee":
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _bwd_gemm_config(dtype: torch.dtype, precision: str) -> dict:
    """Tiles of the dx and dw GEMMs: BLOCK_OUT_ROWS x BLOCK_OUT_COLS output tiles and a reduction
    step BLOCK_RED (over out_features for dx, over rows for dw). Tensor cores, 16-bit: 128x128
    outputs, 8 warps, BLOCK_RED 64, so 3 stages of (G tile + operand tile) stay near 96 KiB of
    shared memory; tf32: 128x64 outputs, 4 warps, BLOCK_RED 32 (no 8-warp tf32 tile: see
    :func:`_gemm_config`; a 128-wide fp32 step would need 240 KiB, more than an H100 SM has). Exact
    fp32: 64x64 outputs, 4 warps, as in the forward, with a reduction step of 16: the FMA dot
    keeps both operand tiles in registers, and a step of 32 spills (~430 B a thread on sm_90)."""
    if dtype == torch.float32 and precision == "ieee":
        return dict(BLOCK_OUT_ROWS=64, BLOCK_OUT_COLS=64, BLOCK_RED=16, num_warps=4, num_stages=3)
    if dtype == torch.float32:   # tf32: 4 warps, as in the forward (8-warp tf32 tiles failed)
        return dict(BLOCK_OUT_ROWS=128, BLOCK_OUT_COLS=64, BLOCK_RED=32, num_warps=4, num_stages=3)
    return dict(BLOCK_OUT_ROWS=128, BLOCK_OUT_COLS=128, BLOCK_RED=64, num_warps=8, num_stages=3)


def _elementwise_config() -> dict:
    """The grad_c pass is memory bound: 64x64 tiles; 8 warps (16 elements a thread) leave the
    sigmoid derivative's temporaries room in registers (4 warps spill)."""
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1)


_ROW_NORM_CONFIG = dict(BLOCK_R=32, BLOCK_C=128, num_warps=4, num_stages=1)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _launch(kernel, grid, *args, memo=None, **kwargs):
    launch(kernel, grid, args, kwargs, "the SphereLinear kernels", memo)


# The launch sites' memos by call signature (plans.LaunchMemo): the launchers derive their
# launches afresh each call (cheap), but each launch through triton's JITFunction.run costs
# ~45 us of host time; a kept memo calls the compiled kernel directly. The keys name what the
# launch arguments read: the tensors' metadata, the options, the dot precision (the TF32
# switch), the interpreter switch and the config helpers.
_FORWARD_LAUNCHES = PlanCache("sphere_linear_fwd launches")
_BACKWARD_LAUNCHES = PlanCache("sphere_linear_bwd launches")


def _arccos_delta() -> float:
    """The arccos-derivative bound, read from its single source (imported lazily: the launchers
    are only reached through sphereops, and importing this module must stay light)."""
    from sphereops.reference import ARCCOS_DELTA
    return float(ARCCOS_DELTA)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _check_operator(operator: str) -> int:
    if operator not in OPERATOR_CODES:
        raise ValueError(f"operator must be one of {sorted(OPERATOR_CODES)}, got {operator!r}")
    return OPERATOR_CODES[operator]


def _check_vector(name: str, t: Optional[torch.Tensor], n: int, like: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {list(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device}")


def _check_inputs(x: torch.Tensor, w: torch.Tensor, operator: str, k: Optional[torch.Tensor]):
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {list(t.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported by the Triton linear kernels "
                        f"(float32, float16, bfloat16; use the reference backend otherwise)")
    if w.dtype != x.dtype:
        raise TypeError(f"w has dtype {w.dtype} but x has {x.dtype}")
    if w.device != x.device:
        raise ValueError(f"w is on {w.device} but x is on {x.device}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but w expects {w.shape[1]}")
    if x.shape[1] == 0:
        raise ValueError("x: in_features must be positive")
    code = _check_operator(operator)
    if code == OPERATOR_CODES["sigmoid"]:
        if k is None:
            raise ValueError("k is required (shape [out_features]) for operator 'sigmoid'")
        _check_vector("k", k, w.shape[0], x)
    return code


def _row_norms(w: torch.Tensor, eps: float, unit: bool, memo=None):
    """``(r_w, w_hat)``: r_w [out] = sqrt(||w_o||^2 + eps) in float32 and, when ``unit``,
    w / r_w [out, in] contiguous in w's dtype (the dx GEMM's B operand:
    _sphere_linear_bwd_operand_kernel, B_IS_UNIT), in one launch of the row-norm kernel; w_hat
    is None otherwise. ``memo``: the launch site's (plans.LaunchMemo)."""
    n, kdim = w.shape
    r_w = torch.empty(n, dtype=torch.float32, device=w.device)
    w_hat = torch.empty((n, kdim), dtype=w.dtype, device=w.device) if unit else None
    if n == 0:
        return r_w, w_hat
    cfg = _ROW_NORM_CONFIG
    grid = (_cdiv(n, cfg["BLOCK_R"]),)
    # without the unit filters unit_ptr gets r_w: never stored through (STORE_UNIT False)
    _launch(_row_norm_kernel, grid, w, r_w, w_hat if unit else r_w, n, kdim, w.stride(0),
            w.stride(1), float(eps), STORE_UNIT=unit,
            EMULATE_RTNE=unit and _interpreting() and w.dtype == torch.bfloat16,
            BLOCK_R=cfg["BLOCK_R"],
            BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            memo=memo)
    return r_w, w_hat


def sphere_linear_fwd(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                      k: Optional[torch.Tensor], operator: str, eps: float, *, store_c: bool = True
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SphereLinear forward. ``x [M, in]``, ``w [out, in]``, ``bias [out]`` or None, ``k [out]``
    (sigmoid) or None. Returns ``(y [M, out], c [M, out], r_x [M] float32)``; with
    ``store_c=False`` c is neither allocated nor written (it comes back empty)."""
    code = _check_inputs(x, w, operator, k)
    m, kdim = x.shape
    n = w.shape[0]
    _check_vector("bias", bias, n, x)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    c = torch.empty((m, n) if store_c else (0,), dtype=x.dtype, device=x.device)
    r_x = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        if m:
            r_x.copy_(torch.sqrt(x.float().pow(2).sum(1) + eps))
        return y, c, r_x
    precision = _dot_precision(x.dtype)
    memos = _FORWARD_LAUNCHES.get(
        (tensor_key(x), tensor_key(w), tensor_key(bias), tensor_key(k), code, float(eps),
         store_c, precision, _interpreting(), _gemm_config, tuple(_ROW_NORM_CONFIG.items())),
        launch_memos, "row_norms", "gemm")
    r_w = _row_norms(w, eps, False, memos.row_norms)[0]
    bias_arg = bias.contiguous() if bias is not None else r_w
    k_arg = k.contiguous() if code == OPERATOR_CODES["sigmoid"] else r_w
    cfg = _gemm_config(x.dtype, precision)
    grid = (_cdiv(m, cfg["BLOCK_M"]), _cdiv(n, cfg["BLOCK_N"]))
    _launch(_sphere_linear_fwd_kernel, grid,
            x, w, r_w, bias_arg, k_arg, y, c if store_c else r_w, r_x,
            m, n, kdim,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
            float(eps),
            OPERATOR=code, HAS_BIAS=bias is not None, DOT_PRECISION=precision,
            UPCAST_DOT=_interpreting() and x.dtype != torch.float32, STORE_C=store_c,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], memo=memos.gemm)
    return y, c, r_x


def _launch_operand_grad(cfg, precision, upcast, g, g_strides, b, nb, a, na, part, out,
                         i_size, j_size, k_size, b_is_unit, memo):
    """One launch of _sphere_linear_bwd_operand_kernel (dx or dw, see its docstring)."""
    grid = (_cdiv(i_size, cfg["BLOCK_OUT_ROWS"]), _cdiv(k_size, cfg["BLOCK_OUT_COLS"]))
    _launch(_sphere_linear_bwd_operand_kernel, grid,
            g, b, nb, a, na, part, out,
            i_size, j_size, k_size, part.shape[0],
            *g_strides, b.stride(0), b.stride(1), a.stride(0), a.stride(1),
            out.stride(0), out.stride(1),
            DOT_PRECISION=precision, UPCAST_DOT=upcast, B_IS_UNIT=b_is_unit,
            BLOCK_I=cfg["BLOCK_OUT_ROWS"], BLOCK_J=cfg["BLOCK_RED"], BLOCK_K=cfg["BLOCK_OUT_COLS"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], memo=memo)


def sphere_linear_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                      k: Optional[torch.Tensor], c: torch.Tensor, r_x: torch.Tensor,
                      operator: str, eps: float,
                      output_mask: Sequence[bool] = (True, True, True, True), *,
                      saved: str = "cosine", bias: Optional[torch.Tensor] = None):
    """SphereLinear backward. Returns ``(dx [M, in], dw [out, in], db [out], dk [out])``; a
    gradient not requested by ``output_mask = (dx, dw, db, dk)`` is None (dk also for operators
    other than sigmoid). ``c`` and ``r_x`` are the forward's saved state; with
    ``saved="output"`` (linear, cosine) ``c`` is the forward's output y and ``bias`` the bias in
    it (y is never written)."""
    code = _check_inputs(x, w, operator, k)
    m, kdim = x.shape
    n = w.shape[0]
    from sphereops.reference import saved_state_mode  # the one check of every backend
    from_output, _ = saved_state_mode(saved, operator, False)
    has_bias = from_output and bias is not None
    if has_bias:
        _check_vector("bias", bias, n, x)
    for name, t in (("dy", dy), ("c", c)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.shape != (m, n):
            raise ValueError(f"{name} must have shape [{m}, {n}], got {list(t.shape)}")
    if not isinstance(r_x, torch.Tensor) or r_x.shape != (m,):
        raise ValueError(f"r_x must be a tensor of shape [{m}]")
    if len(output_mask) != 4:
        raise ValueError(f"output_mask must have 4 entries (dx, dw, db, dk), got {output_mask!r}")
    need_dx, need_dw, need_db, need_dk = (bool(v) for v in output_mask)
    need_dk = need_dk and code == OPERATOR_CODES["sigmoid"]

    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
    dw = torch.empty_like(w, memory_format=torch.contiguous_format) if need_dw else None
    if m == 0 or n == 0:
        if dx is not None:
            dx.zero_()
        if dw is not None:
            dw.zero_()
        db = torch.zeros(n, dtype=w.dtype, device=w.device) if need_db else None
        dk = torch.zeros(n, dtype=k.dtype, device=k.device) if need_dk else None
        return dx, dw, db, dk

    precision = _dot_precision(x.dtype)
    memos = _BACKWARD_LAUNCHES.get(
        (tensor_key(dy), tensor_key(x), tensor_key(w), tensor_key(k), tensor_key(c),
         tensor_key(r_x), tensor_key(bias), code, float(eps), need_dx, need_dw, need_db, need_dk,
         from_output, has_bias, precision, _interpreting(), _elementwise_config,
         _bwd_gemm_config, tuple(_ROW_NORM_CONFIG.items())),
        launch_memos, "grad_c", "row_norms", "dx", "dw")
    ew = _elementwise_config()
    num_m_tiles = _cdiv(m, ew["BLOCK_M"])
    num_n_tiles = _cdiv(n, ew["BLOCK_N"])
    need_grad_c = need_dx or need_dw
    grad_c = torch.empty((m, n) if need_grad_c else (1, 1), dtype=x.dtype, device=x.device)
    row_part = torch.empty((num_n_tiles, m) if need_grad_c else (1,),
                           dtype=torch.float32, device=x.device)
    col_part = torch.empty((3, num_m_tiles, n), dtype=torch.float32, device=x.device)
    k_arg = k.contiguous() if code == OPERATOR_CODES["sigmoid"] else col_part
    if need_grad_c or need_db or need_dk:
        _launch(_sphere_linear_bwd_grad_c_kernel, (num_m_tiles, num_n_tiles),
                dy, c, k_arg, bias.contiguous() if has_bias else col_part, grad_c, row_part,
                col_part, m, n, dy.stride(0), dy.stride(1), c.stride(0), c.stride(1),
                OPERATOR=code, DELTA=_arccos_delta(), FROM_OUTPUT=from_output, HAS_BIAS=has_bias,
                NEED_GRAD_C=need_grad_c, NEED_DB=need_db, NEED_DK=need_dk,
                BLOCK_M=ew["BLOCK_M"], BLOCK_N=ew["BLOCK_N"],
                num_warps=ew["num_warps"], num_stages=ew["num_stages"], memo=memos.grad_c)

    # fixed-order reductions of the weight-sized partials: deterministic run to run
    db = col_part[1].sum(dim=0).to(w.dtype) if need_db else None
    dk = col_part[2].sum(dim=0).to(k.dtype) if need_dk else None

    if need_grad_c:
        r_w, w_hat = _row_norms(w, eps, need_dx, memos.row_norms)
        r_x = r_x.to(torch.float32).contiguous()
        cfg = _bwd_gemm_config(x.dtype, precision)
        upcast = _interpreting() and x.dtype != torch.float32
        n_stride = grad_c.stride(0)
        if need_dx:   # i = rows, j = out features
            _launch_operand_grad(cfg, precision, upcast, grad_c, (n_stride, 1), w_hat, r_w, x,
                                 r_x, row_part, dx, m, n, kdim, True, memos.dx)
        if need_dw:   # i = out features, j = rows: G transposed
            _launch_operand_grad(cfg, precision, upcast, grad_c, (1, n_stride), x, r_x, w, r_w,
                                 col_part[0], dw, n, m, kdim, False, memos.dw)
    return dx, dw, db, dk


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ---------------------------------------------------------------------------------------------

# A typical launch (contiguous tensors, sizes divisible by 16) for the check's specialisation:
# unit strides become compile-time constants at launch, as they do here.
_EX_M, _EX_N, _EX_K = 8192, 4096, 4096


def aot_specs() -> list:
    """One spec per (kernel, config, dtype) for ``sphereops_kernels.aot`` (see ARCHITECTURE.md).

    Sigmoid is the heaviest epilogue (it exercises every angular device function), so every
    dtype is compiled with it; the fp32 GEMMs are compiled once with tf32 and once exact.
    """
    specs = []
    ew = _elementwise_config()
    for dtype in _SUPPORTED_DTYPES:
        t = "*" + _TL_DTYPES[dtype]
        # exact fp32 ("ieee") runs on the FMA units by design: no mma expected
        on_tensor_cores = dtype != torch.float32
        precisions = ("tf32", "ieee") if dtype == torch.float32 else ("ieee",)
        for precision in precisions:
            cfg = _gemm_config(dtype, precision)
            blocks = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
            bcfg = _bwd_gemm_config(dtype, precision)
            tag = f"{_TL_DTYPES[dtype]}" + (f"_{precision}" if dtype == torch.float32 else "")
            gemm = on_tensor_cores or precision == "tf32"
            specs.append(dict(
                name=f"linear_fwd_sigmoid_{tag}", fn=_sphere_linear_fwd_kernel,
                signature={"x_ptr": t, "w_ptr": t, "r_w_ptr": "*fp32", "bias_ptr": t, "k_ptr": t,
                           "y_ptr": t, "c_ptr": t, "r_x_ptr": "*fp32",
                           "M": "i32", "N": "i32", "K": "i32",
                           "stride_xm": "i32", "stride_xk": "i32", "stride_wn": "i32",
                           "stride_wk": "i32", "stride_ym": "i32", "stride_yn": "i32",
                           "eps": "fp32",
                           "OPERATOR": "constexpr", "HAS_BIAS": "constexpr",
                           "DOT_PRECISION": "constexpr", "UPCAST_DOT": "constexpr",
                           "STORE_C": "constexpr",
                           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
                constexprs=dict(OPERATOR=OPERATOR_CODES["sigmoid"], HAS_BIAS=True,
                                DOT_PRECISION=precision, UPCAST_DOT=False, STORE_C=True, **blocks),
                example_args=dict(M=_EX_M, N=_EX_N, K=_EX_K, stride_xm=_EX_K, stride_xk=1,
                                  stride_wn=_EX_K, stride_wk=1, stride_ym=_EX_N, stride_yn=1),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], dtype=dtype, gemm=gemm))
            operand_blocks = dict(BLOCK_I=bcfg["BLOCK_OUT_ROWS"], BLOCK_J=bcfg["BLOCK_RED"],
                                  BLOCK_K=bcfg["BLOCK_OUT_COLS"])
            # dx: i = rows (G row-major), j = out features; dw: G transposed
            for what, i_size, j_size, g_strides, unit_b in (("dx", _EX_M, _EX_N, (_EX_N, 1), True),
                                                            ("dw", _EX_N, _EX_M, (1, _EX_N), False)):
                specs.append(dict(
                    name=f"linear_bwd_{what}_{tag}", fn=_sphere_linear_bwd_operand_kernel,
                    signature={"g_ptr": t, "b_ptr": t, "nb_ptr": "*fp32", "a_ptr": t,
                               "na_ptr": "*fp32", "part_ptr": "*fp32", "out_ptr": t,
                               "I": "i32", "J": "i32", "K": "i32", "num_part_rows": "i32",
                               "stride_gi": "i32", "stride_gj": "i32", "stride_bj": "i32",
                               "stride_bk": "i32", "stride_ai": "i32", "stride_ak": "i32",
                               "stride_oi": "i32", "stride_ok": "i32",
                               "DOT_PRECISION": "constexpr", "UPCAST_DOT": "constexpr",
                               "B_IS_UNIT": "constexpr", "BLOCK_I": "constexpr",
                               "BLOCK_J": "constexpr", "BLOCK_K": "constexpr"},
                    constexprs=dict(DOT_PRECISION=precision, UPCAST_DOT=False, B_IS_UNIT=unit_b,
                                    **operand_blocks),
                    example_args=dict(I=i_size, J=j_size, K=_EX_K, num_part_rows=j_size // 64,
                                      stride_gi=g_strides[0], stride_gj=g_strides[1],
                                      stride_bj=_EX_K, stride_bk=1, stride_ai=_EX_K, stride_ak=1,
                                      stride_oi=_EX_K, stride_ok=1),
                    num_warps=bcfg["num_warps"], num_stages=bcfg["num_stages"], dtype=dtype,
                    gemm=gemm))
        # the elementwise pass: sigmoid (heaviest), and linear from the saved output
        for op, from_output in (("sigmoid", False), ("linear", True)):
            specs.append(dict(
                name=f"linear_bwd_grad_c_{op}{'_from_output' if from_output else ''}_{_TL_DTYPES[dtype]}",
                fn=_sphere_linear_bwd_grad_c_kernel,
                signature={"dy_ptr": t, "c_ptr": t, "k_ptr": t, "bias_ptr": t, "grad_c_ptr": t,
                           "row_part_ptr": "*fp32", "col_part_ptr": "*fp32", "M": "i32",
                           "N": "i32", "stride_dym": "i32", "stride_dyn": "i32",
                           "stride_cm": "i32", "stride_cn": "i32",
                           "OPERATOR": "constexpr", "DELTA": "constexpr",
                           "FROM_OUTPUT": "constexpr", "HAS_BIAS": "constexpr",
                           "NEED_GRAD_C": "constexpr", "NEED_DB": "constexpr",
                           "NEED_DK": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                constexprs=dict(OPERATOR=OPERATOR_CODES[op], DELTA=_arccos_delta(),
                                FROM_OUTPUT=from_output, HAS_BIAS=from_output, NEED_GRAD_C=True,
                                NEED_DB=True, NEED_DK=op == "sigmoid",
                                BLOCK_M=ew["BLOCK_M"], BLOCK_N=ew["BLOCK_N"]),
                example_args=dict(M=_EX_M, N=_EX_N, stride_dym=_EX_N, stride_dyn=1,
                                  stride_cm=_EX_N, stride_cn=1),
                num_warps=ew["num_warps"], num_stages=ew["num_stages"], dtype=dtype, gemm=False))
        specs.append(dict(
            name=f"linear_row_norm_{_TL_DTYPES[dtype]}", fn=_row_norm_kernel,
            signature={"a_ptr": t, "out_ptr": "*fp32", "unit_ptr": t, "R": "i32", "C": "i32",
                       "stride_ar": "i32", "stride_ac": "i32", "eps": "fp32",
                       "STORE_UNIT": "constexpr", "EMULATE_RTNE": "constexpr",
                       "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
            constexprs=dict(STORE_UNIT=True, EMULATE_RTNE=False, BLOCK_R=_ROW_NORM_CONFIG["BLOCK_R"],
                            BLOCK_C=_ROW_NORM_CONFIG["BLOCK_C"]),
            example_args=dict(R=_EX_N, C=_EX_K, stride_ar=_EX_K, stride_ac=1),
            num_warps=_ROW_NORM_CONFIG["num_warps"], num_stages=_ROW_NORM_CONFIG["num_stages"],
            dtype=dtype, gemm=False))
    return specs
