"""Fused backward of SphereConv2d: Triton kernels and the launcher ``sphere_conv2d_bwd``.

The math (DESIGN.md §1, ``sphereops.reference.conv2d_backward`` is the executable spec)::

    G   = dy * dg/dc(c)                       (fp32, never stored)
    A   = sum_{o in group} G c / r_x^2        [N, G, Ho, Wo] fp32
    S_o = sum_{n,p} G c,  db = sum dy,  dk = sum dy * dg/dk
    dx  = conv_transpose(G / (r_x r_w), w) - x * boxsum^T(A)
    dw  = conv_weight(x, G / (r_x r_w)) - w * S / r_w^2

Kernels and passes of the GEMM path (in this order; 3 launches with every gradient, one more
where the wgrad leaves dw to step 5, and one more for the first of two reduction levels of
step 1's partial sums when there is no dgrad or wgrad to host it):

1. ``_prep_kernel``, one launch with two kinds of program. The filter programs (first in the
   grid; only when dx or dw is asked; ``_filter_norm_block``) compute r_w [C_out] fp32 and the
   unit filters ``w_hat = w / r_w`` (input dtype, laid out [KH, KW, C_out, C_in/G] so dgrad
   reads contiguous rows): independent of the pass below (which needs r_x, not r_w), so they
   ride in its launch rather than take one of their own. The other programs make one pass over
   dy and the saved c, storing the ONE output-sized intermediate ``Hn = G / r_x`` in the input
   dtype, channels-last ([N*Ho*Wo, C_out] row-major) whatever the input layout, plus ``A`` and
   per-program fp32 partial sums of S, db and dk.
   *Why Hn = G/r_x and not H = G/(r_x r_w)*: the 1/r_w factor moves onto the (tiny) filters in
   dgrad and into the fp32 epilogue in wgrad. H itself can fall into fp16's subnormal range
   (|x|~300 with 64 channels gives H ~ 1e-6), where fp16 keeps only a few bits; Hn is r_w
   (~sqrt(fan_in) * |w|) times larger. Computing the partial sums here rather than inside the
   GEMM operand loads keeps the GEMM main loops pure loads + tl.dot (G needs an arccos for the
   sigmoid operator, which would be recomputed KH*KW times in dgrad; a probe of that variant
   took the dgrad's K step from 340 SASS instructions to 1689 (linear) and 7191 (sigmoid),
   spilling: docs/PERFORMANCE_LOG.md). With one output channel
   per group (depthwise) ``_channelwise_prep_kernel`` does the same over [pixels x channels]
   tiles across the groups (``_prep_kernel`` gives each program one group), filter programs
   included. More kinds of program ride in ``_prep_kernel``'s launch after the pass: the
   wgrad's staged input (inputs outside the fast layout), and for the grid paths
   (``conv_bwd_grid``) x staged onto the grid wgrad's padded grid (its phase planes at
   stride > 1) and the zero margin rows of Hn's grid.
2. ``_reduce_partials_kernel``: sums the partials of step 1 in a fixed order -> S (fp32), db, dk
   (two levels once there are more than 512 partial rows). With a wgrad the final level runs
   as extra programs of the wgrad launch instead (``_fold_reduction``; S is only read by the
   finalize after it -- or by the wgrad's finishing programs, which sum it themselves --, db
   and dk by nobody here), and a first level as extra programs of the dgrad launch when both
   GEMMs run (``_first_level_block``; ``SPHEREOPS_DGRAD_REDUCES=0`` keeps its own launch), so
   this kernel launches only when there is no GEMM launch to host a level.
3. ``_dgrad_kernel``: implicit-GEMM transposed convolution of Hn with w_hat, fused with the
   correction ``- x * boxsum^T(A)``. Stride > 1 is decomposed by stride phase: a program owns
   the input pixels of one phase (hi % SH, wi % SW), for which the set of contributing taps
   (kh, kw) is the same for every pixel, so it loops over exactly those taps (no zero-stuffing,
   no masked-out MMAs). Opt-in (``SPHEREOPS_DGRAD_GRID=1``, ``conv_bwd_grid``): the same
   dgrad as a plain TMA GEMM, step 1 then writing Hn onto a padded grid (``_hn_row``; the
   wgrad reads it there too; ``SPHEREOPS_WGRAD_GRID=1`` runs that wgrad as a TMA GEMM as well,
   ``conv_bwd_grid``, whose last split of each tile also writes dw: 3 launches).
4. ``_wgrad_kernel``: implicit GEMM over the N*Ho*Wo reduction, split into SPLIT contiguous
   ranges that write fp32 partials (its columns: the channels of one tap a program, or below 16
   channels a group the flattened (tap, channel) axis, so that a first layer's 3 channels do
   not fill 3 of 16 columns and Hn is not re-read once per tap; its rows' output pixels carried
   from step to step, not divided out every step; a 1x1 filter at stride 1 over dense pixel
   rows reads x as a plain GEMM operand). The split that completes a tile -- counted on an
   int32 counter the prep launch zeroed -- sums the tile's partials in split order and applies
   ``/ r_w - w S / r_w^2`` (``count_and_finish_wgrad_tile``; the counter decides only which
   program does it, not the order of any sum).
5. ``_dw_finalize_kernel``: the same for the whole dw in one launch, where the wgrad leaves it
   (``_finish_dw_in_wgrad``: past 8 splits, int64 offsets; the channelwise prep;
   ``SPHEREOPS_WGRAD_WRITES_DW=0``).
No floating-point atomics anywhere: same inputs -> bitwise same gradients.

Numerics: fp32 accumulation everywhere; fp32 inputs use tf32 tensor cores iff
``torch.backends.cudnn.allow_tf32`` (PyTorch's switch for convolutions). Pixel offsets are int64.
The 16-bit GEMM operands Hn and w_hat are rounded to the input dtype (relative error u each).
Near-parallel patches (|c| -> 1) make G up to 1/sqrt(ARCCOS_DELTA) = 1000 times dy while dx
stays O(dy): the dgrad term and x * boxsum(A) cancel, so there the 16-bit error is bounded by
2u * dgrad(|Hn|, |w_hat|) rather than by the output rounding (tests/test_conv_bwd_kernel.py
checks exactly that bound); fp32 is unaffected.
Under the interpreter (``TRITON_INTERPRET=1``) 16-bit ``tl.dot`` operands are upcast to fp32
(the interpreter's 16-bit dot is wrong) and fp32 -> bf16 stores are rounded to nearest-even by
hand (the interpreter's cast is not); the GPU build is unchanged (constexprs ``UPCAST_DOT``,
``EMULATE_RTNE``).

Pure depthwise convs (C_in/G = C_out/G = 1) take their own elementwise path, 3 launches (4
when the partials need a first reduction level): the forward saved neither c nor r_x
(conv_fwd's depthwise kernel reads x and writes y only), so ``_depthwise_prep_kernel``
recomputes each window with the forward's own helpers (and r_w from the same taps: no filter
programs), stores Hn and A -- pixel-major [M, C] for channels_last x (read along the channels at
every tap), in [N, C, Ho*Wo] planes for NCHW x (row tiles read along the pixels:
conv_fwd.depthwise_pixel_tile) -- with the column partials and the filter taps over r_w
tap-major; ``_depthwise_grad_kernel`` (with the partials' final reduction in the same launch)
walks the input pixels once for dx and the weight-gradient partials together, its taps
unrolled (elementwise FMAs over [pixels x channels] tiles: a GEMM would be 15/16 padding, and
the padded-GEMM path measured 12.8 ms on an H200 for 64x256x28x28 bf16, 10x the unfused
reference), then the shared finalize. DRAM bytes per output element, 16-bit, stride 1: about
10 in the prep (dy, x, Hn, fp32 A) and 10 in the grad pass (Hn, A, x, dx), where the saved-state
version read c and r_x too and a separate wgrad re-read Hn and x.

Known limits: grouped convolutions with a few channels per group (but more than one) run
through the GEMM kernels with 16-wide padded tiles: correct, far from memory speed. NCHW
tensors are read and written with scalar 16-bit accesses along the pixels (coalesced, not
vectorised: the padding offsets a window from any alignment Triton can prove); channels_last
is the fast layout. Eager launches cost host time per kernel (4-6 launches per call); under
CUDA graphs / torch.compile that disappears.
"""
from __future__ import annotations

import inspect
from math import prod
from types import SimpleNamespace
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .angular import OPERATOR_CODES, clamp_cos, cosine_and_dg_dc, dg_dc, dg_dk
from .conv_fwd import (CACHED_TAPS, MAX_CACHED_TAPS, MAX_ROW_W, aligned_count, dense_plane,
                       depthwise_filter_taps, depthwise_group_tile, depthwise_inv_norms,
                       depthwise_pixel_tile, depthwise_row_width, depthwise_tile_count,
                       depthwise_window, filter_tap, in_bounds, pixel_groups_fit, pixels_fast,
                       stage_input_tile, staged_channels, staged_input_meta,
                       window_tap_bits)
from .conv_fwd_grid import phase_planes, stage_grid_rows
from .epilogue import (column_slices, load_tile, pixel_runs, store_tile, tile_ptrs,
                       to_dtype_of)
from . import launch as _launch_module
from .launch import interpreting as _interpreting
from .launch import cdiv as _cdiv
from .launch import (MAX_PIXELS, env_switch, launch, offsets_need_int64, pixel_run,
                     plain_launch)
from .launch import next_pow2 as _next_pow2
from .plans import LaunchMemo, PlanCache, launch_memos, meta_like, tensor_key
from . import conv_fwd as _conv_fwd

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _filter_norm_block(
    w_ptr, rw_ptr, what_ptr, block, C_out, CG_IN, WHAT_LD,
    stride_wo, stride_wc, stride_wh, stride_ww, eps, CG_OUT, CGO_P,
    KH: tl.constexpr, KW: tl.constexpr, STORE_W_HAT: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    WHAT_PADDED: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """r_w = sqrt(||w_o||^2 + eps) and w_hat = w / r_w for the filters o of block ``block``
    (block * BLOCK_O .. + BLOCK_O): the filter programs of the prep kernels (_prep_kernel,
    _channelwise_prep_kernel), which run it in the same launch as their pass over dy and c.

    w_ptr:    [C_out, CG_IN, KH, KW], strides (stride_wo, stride_wc, stride_wh, stride_ww).
    rw_ptr:   [C_out] fp32, contiguous.
    what_ptr: [KH, KW, C_out, WHAT_LD] in w's dtype, contiguous (written iff STORE_W_HAT; row
              length WHAT_LD >= CG_IN, see sphere_conv2d_bwd's ``cgi_p``: zeros past CG_IN);
              with WHAT_PADDED [KH, KW, G*CGO_P, WHAT_LD] instead, filter o of group g at row
              g*CGO_P + o % CG_OUT of a tap (the grid dgrad's K boxes stay inside one group's
              rows when C_out/G is not a multiple of 16; the pad rows are left to the caller,
              which allocates them zeroed).
    eps: the epsilon inside the square root.
    KH, KW: filter size. STORE_W_HAT: also write w_hat (only dgrad needs it).
    EMULATE_RTNE: interpreter-only exact bf16 rounding (see epilogue.to_dtype_of).
    BLOCK_O: filters per program. BLOCK_F: filter elements (ci, kh, kw) per loop step
    (filter_norm_config). Blocks: cdiv(C_out, BLOCK_O).
    The stores sit in this function and their addresses come from _filter_block_index, which is
    handed no pointer (see there).
    """
    offs_o = block * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < C_out
    o64 = offs_o.to(tl.int64)
    n_f = CG_IN * KH * KW
    sumsq = tl.zeros([BLOCK_O, BLOCK_F], dtype=tl.float32)
    for f0 in range(0, n_f, BLOCK_F):
        ci, tap, mask = _filter_block_index(o_mask, f0, n_f, KH, KW, BLOCK_F)
        wv = _load_filter_block(w_ptr, o64, ci, tap, mask, stride_wo, stride_wc, stride_wh,
                                stride_ww, KW)
        sumsq += wv * wv
    r_w = tl.sqrt(tl.sum(sumsq, axis=1) + eps)
    tl.store(rw_ptr + offs_o, r_w, mask=o_mask)
    if STORE_W_HAT:
        inv_rw = 1.0 / r_w
        # over the padded rows (WHAT_LD channels a tap): zeros past CG_IN
        n_f_padded = WHAT_LD * KH * KW
        for f0 in range(0, n_f_padded, BLOCK_F):
            ci, tap, mask = _filter_block_index(o_mask, f0, n_f_padded, KH, KW, BLOCK_F)
            wv = _load_filter_block(w_ptr, o64, ci, tap, mask & (ci < CG_IN)[None, :], stride_wo,
                                    stride_wc, stride_wh, stride_ww, KW)
            if WHAT_PADDED:
                rows_a_tap = (C_out // CG_OUT) * CGO_P
                row = (o64 // CG_OUT) * CGO_P + o64 % CG_OUT
            else:
                rows_a_tap = C_out
                row = o64
            dst = (what_ptr + (tap.to(tl.int64)[None, :] * rows_a_tap + row[:, None]) * WHAT_LD
                   + ci[None, :])
            tl.store(dst, to_dtype_of(wv * inv_rw[:, None], what_ptr, EMULATE_RTNE), mask=mask)


@triton.jit
def _filter_block_index(o_mask, f0, n_f, KH: tl.constexpr, KW: tl.constexpr,
                        BLOCK_F: tl.constexpr):
    """Filter elements f0 .. f0 + BLOCK_F in (ci, kh, kw) order: ``(ci [BLOCK_F],
    tap = kh * KW + kw [BLOCK_F], mask [BLOCK_O, BLOCK_F])``.

    Takes no pointer on purpose: torch.compile's Triton mutation analysis (TTIR, before
    inlining) counts every operand of a ``tt.call`` whose results reach a store address as
    written, so w_hat's store address must not come out of a call that is handed ``w_ptr``
    (w, an op input, would be taken for mutated)."""
    offs_f = f0 + tl.arange(0, BLOCK_F)
    ci = offs_f // (KH * KW)
    tap = offs_f % (KH * KW)
    mask = o_mask[:, None] & (offs_f < n_f)[None, :]
    return ci, tap, mask


@triton.jit
def _load_filter_block(w_ptr, o64, ci, tap, mask, stride_wo, stride_wc, stride_wh, stride_ww,
                       KW: tl.constexpr):
    """The filter elements (ci, tap) of the filters o64 (``_filter_block_index``) in fp32,
    [BLOCK_O, BLOCK_F]."""
    kh = tap // KW
    kw = tap % KW
    ptrs = (w_ptr + o64[:, None] * stride_wo
            + (ci * stride_wc + kh * stride_wh + kw * stride_ww)[None, :])
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _prep_rows(offs_m, HoWo: tl.constexpr, Wo: tl.constexpr, stride_dyn, stride_dyh, stride_dyw,
               stride_cn, stride_ch, stride_cw):
    """Flat output pixels offs_m -> ``(n [int64], pixel in the image, dy row offset, c row
    offset)`` (row offsets int64, without the channel term) for the prep passes."""
    n = (offs_m // HoWo).to(tl.int64)
    hw = offs_m % HoWo
    ho = (hw // Wo).to(tl.int64)
    wo = (hw % Wo).to(tl.int64)
    return (n, hw, n * stride_dyn + ho * stride_dyh + wo * stride_dyw,
            n * stride_cn + ho * stride_ch + wo * stride_cw)


@triton.jit
def _hn_row(offs_m, howo, wo_count, HN_TOP: tl.constexpr, HN_LEFT: tl.constexpr,
            WIDE: tl.constexpr):
    """The row of Hn holding flat output pixel offs_m (n*Ho*Wo index): offs_m itself, or with
    margins (HN_TOP, HN_LEFT > 0: the dgrad's padded grid, conv_bwd_grid) row
    (n*(Ho + HN_TOP) + HN_TOP + ho) * (Wo + HN_LEFT) + HN_LEFT + wo. int64 if WIDE, else int32.
    howo = Ho*Wo and wo_count = Wo: constexprs or runtime values."""
    if HN_TOP == 0 and HN_LEFT == 0:
        if WIDE:
            row = offs_m.to(tl.int64)
        else:
            row = offs_m
    else:
        n, ho, wo = _pixel_coords(offs_m, howo, wo_count)
        if WIDE:
            n = n.to(tl.int64)
        row = ((n * (howo // wo_count + HN_TOP) + HN_TOP + ho) * (wo_count + HN_LEFT)
               + HN_LEFT + wo)
    return row


@triton.jit
def _pixel_coords(offs_m, howo, wo_count):
    """(n, ho, wo) of flat output pixels offs_m = (n*Ho + ho)*Wo + wo (howo = Ho*Wo, wo_count =
    Wo: constexprs, divided by multiply-shifts, or runtime values)."""
    n = offs_m // howo
    hw = offs_m % howo
    return n, hw // wo_count, hw % wo_count


@triton.jit
def _pixel_step(howo, wo_count, STEP: tl.constexpr):
    """STEP flat pixels as (images, rows, columns) for :func:`_advance_pixels`."""
    return STEP // howo, (STEP % howo) // wo_count, STEP % wo_count


@triton.jit
def _advance_pixels(n, ho, wo, step_n, step_h, step_w, ho_count, wo_count):
    """(n, ho, wo) of the pixels STEP further on (step_* from :func:`_pixel_step`): each
    coordinate stays below its extent and each step's part is below it too, so one carry from
    wo into ho and one from ho into n suffice, and a loop that walks pixels divides nothing."""
    wo = wo + step_w
    carry_w = wo >= wo_count
    wo = tl.where(carry_w, wo - wo_count, wo)
    ho = ho + step_h + carry_w.to(tl.int32)
    carry_h = ho >= ho_count
    ho = tl.where(carry_h, ho - ho_count, ho)
    return n + step_n + carry_h.to(tl.int32), ho, wo


@triton.jit
def _grad_c_tile(dy_ptr, c_ptr, k_ptr, bias_ptr, dy_row, c_row, offs_o, c_mask, mask,
                 stride_dyc, stride_cc, stride_k, OPERATOR: tl.constexpr, DELTA: tl.constexpr,
                 FROM_OUTPUT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One [pixels x channels] tile of the prep passes: dy and the saved state loaded (rows at
    dy_row / c_row, channels offs_o; masked lanes 0), c recovered and ``G = dy * dg/dc``.
    Returns ``(dy, c, k, G)`` in fp32 (k a [1, BC] block, or 1.0 unless sigmoid)."""
    o64 = offs_o.to(tl.int64)
    dy = tl.load(dy_ptr + dy_row[:, None] + (o64 * stride_dyc)[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    cv = tl.load(c_ptr + c_row[:, None] + (o64 * stride_cc)[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bv = tl.load(bias_ptr + offs_o, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    else:
        bv = 0.0
    if OPERATOR == 2:
        kv = tl.load(k_ptr + offs_o * stride_k, mask=c_mask, other=1.0).to(tl.float32)[None, :]
    else:
        kv = 1.0
    cv, dgdc = cosine_and_dg_dc(cv, kv, bv, OPERATOR, DELTA, FROM_OUTPUT)
    return dy, cv, kv, dy * dgdc


@triton.jit
def _dk_terms(mask, dy, cv, kv):
    """dy dg/dk of a tile, 0 in the masked lanes: the summands of dk."""
    return tl.where(mask, dy * dg_dk(cv, kv), 0.0)


@triton.jit
def _store_column_sums(part_ptr, R, pid_m, C_out, offs_o, c_mask, gc, dy, dk_terms,
                       NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr):
    """Column sums of [rows x BC] tiles into part_ptr [3, R, C_out] row pid_m: S = sum G c,
    db = sum dy, dk = sum of dk_terms (each iff asked; masked lanes hold zeros)."""
    if NEED_S:
        tl.store(part_ptr + pid_m * C_out + offs_o, tl.sum(gc, axis=0), mask=c_mask)
    if NEED_DB:
        tl.store(part_ptr + (R + pid_m) * C_out + offs_o, tl.sum(dy, axis=0), mask=c_mask)
    if NEED_DK:
        tl.store(part_ptr + (2 * R + pid_m) * C_out + offs_o, tl.sum(dk_terms, axis=0),
                 mask=c_mask)


@triton.jit
def _store_column_partials(part_ptr, R, pid_m, C_out, offs_o, c_mask, mask, dy, cv, kv, gc,
                           NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr):
    """This program's column sums into part_ptr [3, R, C_out] row pid_m: S = sum G c, db = sum
    dy, dk = sum dy dg/dk (each iff asked)."""
    _store_column_sums(part_ptr, R, pid_m, C_out, offs_o, c_mask, gc, dy, gc, NEED_S, NEED_DB,
                       False)
    if NEED_DK:   # formed after the other stores, as before: formed first, the sigmoid prep's
        # sm_90 build went from 163 registers to 96 plus 16 B of stack (make aot-check)
        _store_column_sums(part_ptr, R, pid_m, C_out, offs_o, c_mask, gc, dy,
                           _dk_terms(mask, dy, cv, kv), False, False, True)


@triton.jit
def _prep_tile(
    dy_ptr, c_ptr, rx_ptr, k_ptr, bias_ptr, hn_ptr, a_ptr, part_ptr, pid_m, g,
    M, HoWo: tl.constexpr, Wo: tl.constexpr, C_out, CG_OUT, CGO_P, G, R, stride_k,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_cn, stride_cc, stride_ch, stride_cw,
    OPERATOR: tl.constexpr, DELTA: tl.constexpr, FROM_OUTPUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_HN: tl.constexpr, STORE_A: tl.constexpr,
    NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    HN_TOP: tl.constexpr, HN_LEFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The pass over dy and c of _prep_kernel for output-pixel block pid_m of group g
    (arguments as there). Channels CG_OUT .. CGO_P of the group's Hn columns get zeros."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n, hw, dy_row, c_row = _prep_rows(offs_m, HoWo, Wo, stride_dyn, stride_dyh, stride_dyw,
                                      stride_cn, stride_ch, stride_cw)
    rx_offs = (n * G + g) * HoWo + hw
    r_x = tl.load(rx_ptr + rx_offs, mask=m_mask, other=1.0)
    inv_rx = 1.0 / r_x
    a_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, CGO_P, BLOCK_C):
        offs_cl = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_cl < CG_OUT
        offs_o = g * CG_OUT + offs_cl
        mask = m_mask[:, None] & c_mask[None, :]
        dy, cv, kv, grad_c = _grad_c_tile(dy_ptr, c_ptr, k_ptr, bias_ptr, dy_row, c_row, offs_o,
                                          c_mask, mask, stride_dyc, stride_cc, stride_k,
                                          OPERATOR, DELTA, FROM_OUTPUT, HAS_BIAS)
        gc = grad_c * cv
        if STORE_HN:
            hn = tl.where(mask, grad_c * inv_rx[:, None], 0.0)
            hn_ptrs = (hn_ptr + _hn_row(offs_m, HoWo, Wo, HN_TOP, HN_LEFT, True)[:, None]
                       * (G * CGO_P) + (g * CGO_P + offs_cl)[None, :])
            tl.store(hn_ptrs, to_dtype_of(hn, hn_ptr, EMULATE_RTNE),
                     mask=m_mask[:, None] & (offs_cl < CGO_P)[None, :])
        if STORE_A:
            a_acc += tl.sum(gc, axis=1)
        _store_column_partials(part_ptr, R, pid_m, C_out, offs_o, c_mask, mask, dy, cv, kv, gc,
                               NEED_S, NEED_DB, NEED_DK)
    if STORE_A:
        tl.store(a_ptr + rx_offs, a_acc * inv_rx * inv_rx, mask=m_mask)


@triton.jit
def _prep_kernel(
    dy_ptr, c_ptr, rx_ptr, k_ptr, bias_ptr, hn_ptr, a_ptr, part_ptr,
    w_ptr, rw_ptr, what_ptr, x_ptr, xs_ptr,
    M, HoWo: tl.constexpr, Wo: tl.constexpr, C_out, CG_OUT, CGO_P, G, R, stride_k,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_cn, stride_cc, stride_ch, stride_cw,
    n_filter_programs, CG_IN, CGI_P, stride_wo, stride_wc, stride_wh, stride_ww, eps,
    img_tiles, HW_IN, W_IN, stride_xn, stride_xc, stride_xh, stride_xw,
    n_stage_programs, grid_lead, grid_cp, grid_pad_h, grid_pad_w, grid_planes, grid_planes_w,
    cnt_ptr, n_counters,
    OPERATOR: tl.constexpr, DELTA: tl.constexpr, FROM_OUTPUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_HN: tl.constexpr, STORE_A: tl.constexpr,
    NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr,
    NORM_FILTERS: tl.constexpr, STORE_W_HAT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STAGE_X: tl.constexpr, DENSE_PLANE: tl.constexpr, STAGE_GRID: tl.constexpr,
    X_PIXELS_FAST: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    HN_TOP: tl.constexpr, HN_LEFT: tl.constexpr, GRID_SH: tl.constexpr, GRID_SW: tl.constexpr,
    WHAT_PADDED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CX: tl.constexpr,
):
    """The prep launch of the GEMM backward: the elementwise/row pass over dy and c, one block
    of output pixels and one group a program, and in the same grid the filter norms and (for
    inputs not in the GEMM kernels' fast layout) the wgrad's staged input.

    Grid: (n_filter_programs + R + n_stage_programs + E, G). Programs
    pid0 < n_filter_programs of column g == 0 run filter block pid0 (_filter_norm_block: r_w,
    and w_hat iff STORE_W_HAT; the first also zeroes the n_counters int32 of cnt_ptr, the grid
    wgrad's tile counters, conv_bwd_grid); those of the other columns return at once. Programs
    n_filter_programs <= pid0 < n_filter_programs + R run output-pixel block
    pid0 - n_filter_programs of group g (_prep_tile); the next n_stage_programs stage block
    t = pid0 - n_filter_programs - R of group g's input: with STAGE_X input tile t to xs
    (conv_fwd.stage_input_tile: N * img_tiles of them), with STAGE_GRID rows t * BLOCK_P.. of
    the grid wgrad's x grid (conv_fwd_grid.stage_grid_rows: cdiv(grid_lead +
    grid_planes*N*Hq*Wq, BLOCK_P) of them); the last E (HN_TOP or HN_LEFT > 0: cdiv(the
    margin rows, BLOCK_M)) zero block pid0 - n_filter_programs - R - n_stage_programs of Hn's
    margin rows in group g's columns (_zero_hn_margins). The filter blocks come first so that
    their loops (latency-bound: dependent round trips to memory) start with the first wave
    instead of trailing the pass.

    dy_ptr: [N, C_out, Ho, Wo], strides (stride_dyn, stride_dyc, stride_dyh, stride_dyw).
    c_ptr:  [N, C_out, Ho, Wo] saved clamped cosine, strides (stride_cn, ...); with FROM_OUTPUT
            the forward's output y = g(c) + b instead (linear and cosine operators), c recovered
            here (angular.cosine_and_dg_dc).
    bias_ptr: [C_out] contiguous, the b in y (read iff HAS_BIAS, which needs FROM_OUTPUT).
    rx_ptr: [N, G, Ho, Wo] fp32 contiguous (patch norms).
    k_ptr:  [C_out], stride stride_k (0 for an expanded scalar): sigmoid steepness (any float
            dtype); only read when OPERATOR == 2.
    hn_ptr: [M = N*Ho*Wo, G, CGO_P] contiguous, input dtype: Hn = G / r_x (written iff
            STORE_HN), zeros in channels CG_OUT .. CGO_P of each group (CGO_P = CG_OUT, or
            rounded up to 16 for aligned GEMM loads: sphere_conv2d_bwd's ``cgo_p``); with
            margins HN_TOP / HN_LEFT (> 0 for the dgrad's grid path) the rows lie on the padded
            grid [N*(Ho+HN_TOP)*(Wo+HN_LEFT), G, CGO_P] instead (_hn_row; the margin rows
            zeroed by this launch's last programs).
    a_ptr:  [N, G, Ho, Wo] fp32 contiguous: A = sum_{o in group} G c / r_x^2 (iff STORE_A).
    part_ptr: [3, R, C_out] fp32 contiguous partial sums over this program's pixels:
              row 0 S = G c (iff NEED_S), row 1 dy (iff NEED_DB), row 2 dy dg/dk (iff NEED_DK).
    w_ptr:  [C_out, CG_IN, KH, KW] filters, strides (stride_wo, stride_wc, stride_wh,
            stride_ww) (read iff NORM_FILTERS).
    rw_ptr: [C_out] fp32 contiguous: r_w = sqrt(||w_o||^2 + eps) (written iff NORM_FILTERS).
    what_ptr: [KH, KW, C_out, CGI_P] contiguous in w's dtype: w_hat = w / r_w (written iff
              STORE_W_HAT; zeros in columns CG_IN .. CGI_P); with WHAT_PADDED (the grid dgrad,
              C_out/G not a multiple of 16) [KH, KW, G*CGO_P, CGI_P], each group's rows
              padded to CGO_P (_filter_norm_block; the caller zeroes the pad rows).
    x_ptr:  [N, G*CG_IN, H, W] the forward input, strides (stride_xn, stride_xc, stride_xh,
            stride_xw), read iff STAGE_X or STAGE_GRID; xs_ptr: [N, H, W, G, CGI_P]
            contiguous, its staged copy (zero-padded channels), written iff STAGE_X; with
            STAGE_GRID instead x on the grid wgrad's padded grid [grid_lead +
            grid_planes*N*Hq*Wq, G*grid_cp] (conv_bwd_grid.x_grid_buffer; Hq = Ho + HN_TOP,
            Wq = Wo + HN_LEFT, stride (GRID_SH, GRID_SW), padding (grid_pad_h, grid_pad_w),
            grid_planes phase planes, grid_planes_w a plane row: conv_fwd_grid.stage_grid_rows);
            else any output.
    cnt_ptr: [n_counters] int32, zeroed by the first filter program (any tensor when
            n_counters is 0).
    M = N*Ho*Wo, CG_OUT = C_out / G, R = cdiv(M, BLOCK_M): the output-pixel blocks.
    n_filter_programs: cdiv(C_out, BLOCK_O) with NORM_FILTERS, else 0. CG_IN = C_in / G.
    eps: the epsilon inside r_w's square root. img_tiles = cdiv(H*W, BLOCK_P), HW_IN = H*W,
    W_IN = W: the input tiles (STAGE_X).
    HoWo = Ho*Wo, Wo: constexpr so that the pixel -> (n, ho, wo) divisions become multiply-shifts
    (one specialisation per output size; a network has a handful).
    OPERATOR: 0 linear, 1 cosine, 2 sigmoid. DELTA: the arccos-derivative bound.
    FROM_OUTPUT: c_ptr holds y (see c_ptr); HAS_BIAS: y has a bias to take off.
    STORE_HN, STORE_A, NEED_S, NEED_DB, NEED_DK: which outputs to write (output_mask).
    NORM_FILTERS: run the filter programs (dx or dw asked: r_w); STORE_W_HAT: and write w_hat
    (dx asked). Without NORM_FILTERS their stores compile away, so rw_ptr / what_ptr may then
    be any read-only tensors. KH, KW: filter size.
    EMULATE_RTNE: interpreter-only exact bf16 rounding (see epilogue.to_dtype_of).
    BLOCK_M: output pixels per program. BLOCK_C: channels per loop step.
    BLOCK_O, BLOCK_F: filters per filter program, filter elements per step (filter_norm_config).
    STAGE_X, DENSE_PLANE, BLOCK_P x BLOCK_CX: the input tiles (conv_fwd.stage_input_tile).
    STAGE_GRID, X_PIXELS_FAST (x NCHW), grid_lead (zero rows ahead of the grid), grid_cp (its
    channels a group), the padding, planes and stride above, BLOCK_P x BLOCK_CX: the x grid's
    rows (STAGE_X and STAGE_GRID are never both set).
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    if pid < n_filter_programs:
        if NORM_FILTERS:
            if g == 0:
                _filter_norm_block(w_ptr, rw_ptr, what_ptr, pid, C_out, CG_IN, CGI_P,
                                   stride_wo, stride_wc, stride_wh, stride_ww, eps, CG_OUT,
                                   CGO_P, KH, KW, STORE_W_HAT, EMULATE_RTNE, WHAT_PADDED,
                                   BLOCK_O, BLOCK_F)
                if pid == 0:
                    offs = tl.arange(0, 256)
                    for c0 in range(0, n_counters, 256):
                        tl.store(cnt_ptr + c0 + offs, tl.zeros([256], dtype=tl.int32),
                                 mask=c0 + offs < n_counters)
    elif pid < n_filter_programs + R:
        _prep_tile(dy_ptr, c_ptr, rx_ptr, k_ptr, bias_ptr, hn_ptr, a_ptr, part_ptr,
                   pid - n_filter_programs, g, M, HoWo, Wo, C_out, CG_OUT, CGO_P, G, R, stride_k,
                   stride_dyn, stride_dyc, stride_dyh, stride_dyw,
                   stride_cn, stride_cc, stride_ch, stride_cw,
                   OPERATOR, DELTA, FROM_OUTPUT, HAS_BIAS, STORE_HN, STORE_A,
                   NEED_S, NEED_DB, NEED_DK, EMULATE_RTNE, HN_TOP, HN_LEFT, BLOCK_M, BLOCK_C)
    elif pid < n_filter_programs + R + n_stage_programs:
        t = pid - n_filter_programs - R
        # xs_ptr stands in for the q output neither stager writes here
        if STAGE_X:
            stage_input_tile(x_ptr, xs_ptr, xs_ptr, t, g, img_tiles, HW_IN, W_IN, CG_IN, CGI_P,
                             G, stride_xn, stride_xc, stride_xh, stride_xw, False, True,
                             DENSE_PLANE, BLOCK_P, BLOCK_CX)
        if STAGE_GRID:
            ho = HoWo // Wo
            m_plane = (M // HoWo) * (ho + HN_TOP) * (Wo + HN_LEFT)
            stage_grid_rows(x_ptr, xs_ptr, xs_ptr, t, g, grid_lead, grid_planes * m_plane,
                            m_plane, grid_planes_w, (ho + HN_TOP) * (Wo + HN_LEFT), Wo + HN_LEFT,
                            HW_IN // W_IN, W_IN, grid_pad_h, grid_pad_w, CG_IN, grid_cp, G,
                            stride_xn, stride_xc, stride_xh, stride_xw, GRID_SH, GRID_SW, True,
                            False, X_PIXELS_FAST, BLOCK_P, BLOCK_CX)
    else:
        if HN_TOP + HN_LEFT > 0:
            _zero_hn_margins(hn_ptr, pid - n_filter_programs - R - n_stage_programs, g,
                             M // HoWo, HoWo, Wo, G, CGO_P, HN_TOP, HN_LEFT, BLOCK_M, BLOCK_C)


@triton.jit
def _zero_hn_margins(hn_ptr, tile, g, n_images, HoWo: tl.constexpr, Wo: tl.constexpr, G, CGO_P,
                     HN_TOP: tl.constexpr, HN_LEFT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """Zeros into margin rows ``tile * BLOCK_M ..`` of Hn's grid [N*Hq*Wq, G, CGO_P] (_hn_row;
    Hq = Ho + HN_TOP, Wq = Wo + HN_LEFT), group ``g``'s columns. Margin index i of image n
    runs over the HN_TOP full rows first (row i), then the HN_LEFT leading columns of each
    of the Ho data rows."""
    WQ = Wo + HN_LEFT
    BAND = HN_TOP * WQ
    PER_IMAGE = BAND + (HoWo // Wo) * HN_LEFT
    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = i < n_images * PER_IMAGE
    n = i // PER_IMAGE
    r = i - n * PER_IMAGE
    if HN_LEFT > 0:
        strip = tl.maximum(r - BAND, 0)
        in_row = (HN_TOP + strip // HN_LEFT) * WQ + strip % HN_LEFT
        r = tl.where(r < BAND, r, in_row)
    row = (n.to(tl.int64) * ((HoWo // Wo + HN_TOP) * WQ) + r) * (G * CGO_P) + g * CGO_P
    zeros = tl.zeros((BLOCK_M, BLOCK_C), dtype=hn_ptr.dtype.element_ty)
    for c0 in range(0, CGO_P, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        tl.store(hn_ptr + row[:, None] + offs_c[None, :], zeros,
                 mask=valid[:, None] & (offs_c < CGO_P)[None, :])


@triton.jit
def _channelwise_prep_tile(
    dy_ptr, c_ptr, rx_ptr, k_ptr, bias_ptr, hn_ptr, a_ptr, part_ptr, pid_m, pid_c,
    M, HoWo: tl.constexpr, Wo: tl.constexpr, C_out, R, stride_k,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_cn, stride_cc, stride_ch, stride_cw,
    OPERATOR: tl.constexpr, DELTA: tl.constexpr, FROM_OUTPUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_HN: tl.constexpr, STORE_A: tl.constexpr,
    NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The pass over dy and c of _channelwise_prep_kernel for output-pixel block pid_m and
    channel block pid_c (arguments as there)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n, hw, dy_row, c_row = _prep_rows(offs_m, HoWo, Wo, stride_dyn, stride_dyh, stride_dyw,
                                      stride_cn, stride_ch, stride_cw)
    offs_o = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_o < C_out
    o64 = offs_o.to(tl.int64)
    mask = m_mask[:, None] & c_mask[None, :]
    dy, cv, kv, grad_c = _grad_c_tile(dy_ptr, c_ptr, k_ptr, bias_ptr, dy_row, c_row, offs_o,
                                      c_mask, mask, stride_dyc, stride_cc, stride_k,
                                      OPERATOR, DELTA, FROM_OUTPUT, HAS_BIAS)
    gc = grad_c * cv
    rx_offs = (n[:, None] * C_out + o64[None, :]) * HoWo + hw[:, None]
    inv_rx = 1.0 / tl.load(rx_ptr + rx_offs, mask=mask, other=1.0)
    if STORE_HN:
        hn_ptrs = hn_ptr + offs_m.to(tl.int64)[:, None] * C_out + o64[None, :]
        tl.store(hn_ptrs, to_dtype_of(grad_c * inv_rx, hn_ptr, EMULATE_RTNE), mask=mask)
    if STORE_A:
        tl.store(a_ptr + rx_offs, gc * inv_rx * inv_rx, mask=mask)
    _store_column_partials(part_ptr, R, pid_m, C_out, offs_o, c_mask, mask, dy, cv, kv, gc,
                           NEED_S, NEED_DB, NEED_DK)


@triton.jit
def _channelwise_prep_kernel(
    dy_ptr, c_ptr, rx_ptr, k_ptr, bias_ptr, hn_ptr, a_ptr, part_ptr,
    w_ptr, rw_ptr, what_ptr,
    M, HoWo: tl.constexpr, Wo: tl.constexpr, C_out, R, stride_k,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_cn, stride_cc, stride_ch, stride_cw,
    n_filter_programs, CG_IN, stride_wo, stride_wc, stride_wh, stride_ww, eps,
    OPERATOR: tl.constexpr, DELTA: tl.constexpr, FROM_OUTPUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_HN: tl.constexpr, STORE_A: tl.constexpr,
    NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr,
    NORM_FILTERS: tl.constexpr, STORE_W_HAT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """_prep_kernel for one output channel per group (C_out / G == 1) with several input channels
    per group (pure depthwise convs recompute their state instead: _depthwise_prep_kernel).

    _prep_kernel gives each program one group: with one channel per group its channel tile is
    15/16 masked, and every dy / c load and Hn store touches one element per 32-byte sector
    (channels_last). Here a program takes BLOCK_M output pixels x BLOCK_C channels (= groups),
    so those accesses run along the channels, and A = G c / r_x^2 is elementwise.

    Pointers, strides and flags as _prep_kernel with G = C_out (r_x and A are [N, C_out, Ho, Wo]
    fp32 contiguous; part_ptr [3, R, C_out] as there, so the same reduction follows), the filter
    programs too.
    Grid: (n_filter_programs + R, cdiv(C_out, BLOCK_C)), R = cdiv(M, BLOCK_M): programs
    pid0 < n_filter_programs of column 0 run filter block pid0 (those of the other columns
    return at once), the others output-pixel block pid0 - n_filter_programs of channel block
    pid1.
    """
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    if pid < n_filter_programs:
        if NORM_FILTERS:
            if pid_c == 0:
                _filter_norm_block(w_ptr, rw_ptr, what_ptr, pid, C_out, CG_IN, CG_IN,
                                   stride_wo, stride_wc, stride_wh, stride_ww, eps, 1, 1,
                                   KH, KW, STORE_W_HAT, EMULATE_RTNE, False, BLOCK_O, BLOCK_F)
    else:
        _channelwise_prep_tile(dy_ptr, c_ptr, rx_ptr, k_ptr, bias_ptr, hn_ptr, a_ptr, part_ptr,
                               pid - n_filter_programs, pid_c, M, HoWo, Wo, C_out, R, stride_k,
                               stride_dyn, stride_dyc, stride_dyh, stride_dyw,
                               stride_cn, stride_cc, stride_ch, stride_cw,
                               OPERATOR, DELTA, FROM_OUTPUT, HAS_BIAS, STORE_HN, STORE_A,
                               NEED_S, NEED_DB, NEED_DK, EMULATE_RTNE, BLOCK_M, BLOCK_C)


@triton.jit
def _reduce_partials_kernel(
    part_ptr, out_ptr, s_ptr, db_ptr, dk_ptr,
    R, C_out, ROWS_PER_PROGRAM,
    NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr, FINAL: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Deterministic column sums of the prep partials (fixed order, no atomics), in one or two
    levels: a single program per channel block would walk all R rows serially (thousands on a
    big batch), so the first level splits the rows over grid axis 1.

    part_ptr: [3, R, C_out] fp32 contiguous (rows S, db, dk; see _prep_kernel).
    out_ptr:  [3, num_programs(1), C_out] fp32 contiguous: this level's sums (iff not FINAL).
    s_ptr:  [C_out] fp32 (iff FINAL and NEED_S). db_ptr: [C_out] in the bias dtype (iff FINAL
    and NEED_DB). dk_ptr: [C_out] in k's dtype (iff FINAL and NEED_DK).
    ROWS_PER_PROGRAM: rows summed by one program (a multiple of BLOCK_R; >= R when FINAL).
    FINAL: write the gradients instead of next-level partials.
    EMULATE_RTNE: interpreter-only exact bf16 rounding (see epilogue.to_dtype_of).
    BLOCK_R: partial rows per loop step. BLOCK_C: channels per program.
    Grid: (cdiv(C_out, BLOCK_C), cdiv(R, ROWS_PER_PROGRAM)). (The final level can also ride in
    the wgrad launch: _wgrad_kernel's reduce programs run the same _reduce_column_block.)
    """
    _reduce_column_block(part_ptr, out_ptr, s_ptr, db_ptr, dk_ptr, tl.program_id(0),
                         tl.program_id(1), tl.num_programs(1), R, C_out, ROWS_PER_PROGRAM,
                         NEED_S, NEED_DB, NEED_DK, FINAL, EMULATE_RTNE, BLOCK_R, BLOCK_C)


@triton.jit
def _reduce_column_block(
    part_ptr, out_ptr, s_ptr, db_ptr, dk_ptr, pid, pid_r, n_out_rows, R, C_out, ROWS_PER_PROGRAM,
    NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr, FINAL: tl.constexpr,
    EMULATE_RTNE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Channel block ``pid`` x row range ``pid_r`` (of ``n_out_rows``) of
    _reduce_partials_kernel (arguments as there)."""
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C_out
    acc_s = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_dk = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    r_start = pid_r * ROWS_PER_PROGRAM
    r_end = tl.minimum(r_start + ROWS_PER_PROGRAM, R)
    for r0 in range(r_start, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = (offs_r < r_end)[:, None] & c_mask[None, :]
        offs = offs_r.to(tl.int64)[:, None] * C_out + offs_c[None, :]
        if NEED_S:
            acc_s += tl.load(part_ptr + offs, mask=mask, other=0.0)
        if NEED_DB:
            acc_db += tl.load(part_ptr + R * C_out + offs, mask=mask, other=0.0)
        if NEED_DK:
            acc_dk += tl.load(part_ptr + 2 * R * C_out + offs, mask=mask, other=0.0)
    if FINAL:
        if NEED_S:
            tl.store(s_ptr + offs_c, tl.sum(acc_s, axis=0), mask=c_mask)
        if NEED_DB:
            tl.store(db_ptr + offs_c, to_dtype_of(tl.sum(acc_db, axis=0), db_ptr, EMULATE_RTNE), mask=c_mask)
        if NEED_DK:
            tl.store(dk_ptr + offs_c, to_dtype_of(tl.sum(acc_dk, axis=0), dk_ptr, EMULATE_RTNE), mask=c_mask)
    else:
        out_offs = pid_r * C_out + offs_c
        if NEED_S:
            tl.store(out_ptr + out_offs, tl.sum(acc_s, axis=0), mask=c_mask)
        if NEED_DB:
            tl.store(out_ptr + n_out_rows * C_out + out_offs, tl.sum(acc_db, axis=0), mask=c_mask)
        if NEED_DK:
            tl.store(out_ptr + 2 * n_out_rows * C_out + out_offs, tl.sum(acc_dk, axis=0), mask=c_mask)


@triton.jit
def _dgrad_kernel(
    hn_ptr, what_ptr, a_ptr, x_ptr, dx_ptr, red_ptr, red_out_ptr,
    N, H, W, Ho, Wo, C_out, CG_IN, CG_OUT, G, CGI_P, CGO_P, HP: tl.constexpr, WP: tl.constexpr,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_dxn, stride_dxc, stride_dxh, stride_dxw,
    R, RED_PROGRAMS, RED_ROWS,
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, STEP_H: tl.constexpr, STEP_W: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, PIXELS_FAST: tl.constexpr, PIX_RUN: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_RC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx = sum_{taps, o} Hn[pixel(tap), o] * w_hat[tap, o, ci] - x * boxsum^T(A).

    hn_ptr:   [N*Ho*Wo, G, CGO_P] contiguous (Hn = G / r_x, input dtype; zeros in channels
              CG_OUT .. CGO_P of a group).
    what_ptr: [KH, KW, C_out, CGI_P] contiguous (w / r_w, input dtype; zeros in columns
              CG_IN .. CGI_P, which feed output columns that are never stored).
    CGI_P, CGO_P: CG_IN / CG_OUT, or rounded up to 16 so that every row the K loop loads is
    16-element aligned and its mask uniform over 16 lanes (vector loads; sphere_conv2d_bwd).
    a_ptr:    [N, G, Ho, Wo] fp32 contiguous.
    x_ptr:    [N, G*CG_IN, H, W], strides (stride_xn, stride_xc, stride_xh, stride_xw).
    dx_ptr:   [N, G*CG_IN, H, W], strides (stride_dxn, ...); every element written once.
    HP = cdiv(H, SH), WP = cdiv(W, SW): pixels per stride phase (upper bound); constexpr so the
    pixel-index divisions compile to multiply-shifts.
    KH, KW: filter size. SH, SW: stride. PH, PW: padding. DH, DW: dilation.
    STEP_H = SH / gcd(SH, DH) (STEP_W likewise): distance between contributing taps of a phase.
    UPCAST_DOT: upcast 16-bit operands to fp32 before tl.dot (interpreter only).
    DOT_PRECISION: "tf32" or "ieee" for fp32 operands.
    EMULATE_RTNE: interpreter-only exact bf16 rounding (see epilogue.to_dtype_of).
    PIXELS_FAST: x and dx not channels_last (NCHW): their tiles are read and written with the
    lanes along the pixels (epilogue.load_tile / store_tile), not one channel plane a lane.
    PIX_RUN: runs of this many pixels aligned and contiguous in x and dx (launch.pixel_run;
    stride 1 only, where a tile's pixels are consecutive; 1 otherwise): with PIXELS_FAST the
    epilogue reads x and writes dx in 16-byte vectors along the pixels (epilogue.pixel_runs).
    BLOCK_M: input pixels of one phase per program. BLOCK_N: input channels per program.
    BLOCK_K: output channels per reduction step.
    EVEN_K: BLOCK_K divides CG_OUT = CGO_P (every K step's Hn columns and w_hat rows exist);
    EVEN_N: BLOCK_N divides CGI_P (every program's w_hat columns exist): the K loop's channel
    masks dropped (sm_90 bf16 3x3: 266 -> 227 SASS instructions a step).
    The first level of the prep partials' two-level reduction rides in this launch when the
    backward has both a dgrad and a wgrad (the wgrad's reduce programs then run the final one):
    programs past axis 2's G*SH*SW run _reduce_partials_kernel's first level (FINAL False)
    over red_ptr [3, R, C_out] fp32 into red_out_ptr [3, cdiv(R, RED_ROWS), C_out], program
    ``red`` of them channel block red % cdiv(C_out, BLOCK_RC), rows red // that, RED_ROWS rows
    a program, BLOCK_R rows a step, the planes NEED_S / NEED_DB / NEED_DK; RED_PROGRAMS of
    them (0: none, red_ptr / red_out_ptr unread). Like the wgrad's, such a program runs the
    GEMM code with no K step and every store masked: the GEMM code stays unbranched.
    Grid: (cdiv(N*HP*WP, BLOCK_M), cdiv(CG_IN, BLOCK_N), G*SH*SW + E), E = the slices the
    reduce programs need.

    Phase decomposition: input row hi = ph + SH*i receives output row ho from tap kh iff
    hi + PH - kh*DH = SH*ho, i.e. iff (ph + PH - kh*DH) % SH == 0, which does not depend on i.
    The contributing kh of a phase are kh_first, kh_first + STEP_H, ... < KH, and then
    ho = i + (ph + PH - kh*DH) / SH (an exact division).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_gp = tl.program_id(2)
    is_reduce = pid_gp >= G * SH * SW
    g = pid_gp // (SH * SW)
    phase = pid_gp % (SH * SW)
    ph = phase // SW
    pw = phase % SW

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = offs_m // (HP * WP)
    rem = offs_m % (HP * WP)
    i = rem // WP
    j = rem % WP
    hi = ph + SH * i
    wi = pw + SW * j
    m_mask = (offs_m < N * HP * WP) & (hi < H) & (wi < W)
    n64 = n.to(tl.int64)

    offs_ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    # First contributing tap of this phase in each direction, and how many (none: 0).
    kh_first, taps_h = phase_first_tap(ph + PH, KH, SH, STEP_H, DH)
    kw_first, taps_w = phase_first_tap(pw + PW, KW, SW, STEP_W, DW)
    n_kc = tl.where(is_reduce, 0, tl.cdiv(CG_OUT, BLOCK_K))   # a reduce program: no K step

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Each row's Hn row for output pixel (i, j) of its image, once: a tap moves every row by the
    # same (ho, wo) shift, so a step adds one scalar offset and compares i, j against shifted
    # scalar bounds (sm_90 bf16, 128x128x64 tiles: 381 -> 340 SASS instructions a step for 3x3,
    # 348 -> 294 for 1x1).
    # int32 unless Hn's element count could pass 2^31 (WIDE_OFFSETS, from the launcher).
    if WIDE_OFFSETS:
        hn_rows = hn_ptr + ((n64 * Ho + i) * Wo + j) * (G * CGO_P) + g * CGO_P
    else:
        hn_rows = hn_ptr + ((n * Ho + i) * Wo + j) * (G * CGO_P) + g * CGO_P
    # (tap row, tap column, channel chunk) carried from step to step: t // n_kc and
    # tap // taps_w by runtime divisors cost two integer divisions every step
    tap_h = 0
    tap_w = 0
    kc = 0
    w_tile_offs = tl.arange(0, BLOCK_K)[:, None] * CGI_P + offs_ci[None, :]
    TAP_BITS: tl.constexpr = KH * KW <= 31
    if TAP_BITS:
        # each row's phase taps that reach an output pixel, as bits (conv_fwd.window_tap_bits):
        # the phase's tap q reaches output row i + dho_first - q * (DH * STEP_H / SH), an exact
        # step (STEP_H = SH / gcd(SH, DH)); bits past taps_h / taps_w are never asked for
        taps_inside = window_tap_bits(i + (ph + PH - kh_first * DH) // SH,
                                      j + (pw + PW - kw_first * DW) // SW, m_mask, Ho, Wo,
                                      -(DH * STEP_H // SH), -(DW * STEP_W // SW), KH, KW)
    for t in range(0, taps_h * taps_w * n_kc):
        kh = kh_first + tap_h * STEP_H
        kw = kw_first + tap_w * STEP_W
        dho = (ph + PH - kh * DH) // SH    # ho = i + dho, wo = j + dwo (exact divisions)
        dwo = (pw + PW - kw * DW) // SW
        if TAP_BITS:
            valid = (taps_inside & (1 << (tap_h * KW + tap_w))) != 0
        else:
            valid = m_mask & in_bounds(i + dho, Ho) & in_bounds(j + dwo, Wo)
        if WIDE_OFFSETS:
            step_off = (dho.to(tl.int64) * Wo + dwo) * (G * CGO_P)
        else:
            step_off = (dho * Wo + dwo) * (G * CGO_P)
        offs_kl = kc * BLOCK_K + tl.arange(0, BLOCK_K)
        if EVEN_K:
            h_mask = valid[:, None]
        else:
            h_mask = valid[:, None] & (offs_kl < CGO_P)[None, :]
        h_tile = tl.load(hn_rows[:, None] + (step_off + offs_kl)[None, :], mask=h_mask,
                         other=0.0)
        # w_hat's offsets: int32 unless WIDE_OFFSETS (the launcher counts w_hat in) -- 64-bit
        # row arithmetic for the 8 rows a thread loads cost ~50 instructions a step
        if WIDE_OFFSETS:
            w_first = ((kh * KW + kw).to(tl.int64) * C_out + g * CG_OUT + kc * BLOCK_K) * CGI_P
        else:
            w_first = ((kh * KW + kw) * C_out + g * CG_OUT + kc * BLOCK_K) * CGI_P
        if EVEN_K and EVEN_N:
            w_tile = tl.load(what_ptr + w_first + w_tile_offs)
        elif EVEN_K:
            w_tile = tl.load(what_ptr + w_first + w_tile_offs, mask=(offs_ci < CGI_P)[None, :],
                             other=0.0)
        else:
            w_tile = tl.load(what_ptr + w_first + w_tile_offs,
                             mask=(offs_kl < CG_OUT)[:, None] & (offs_ci < CGI_P)[None, :],
                             other=0.0)
        if UPCAST_DOT:
            h_tile = h_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(h_tile, w_tile, acc, input_precision=DOT_PRECISION)
        kc, tap_w, tap_h = next_phase_step(kc, 1, n_kc, tap_w, taps_w, tap_h)

    # A reduce program (no K step above) has no pixel: nothing of its tile is loaded or stored
    # (masked after the loop: in the loop's mask the term moved the K loop's schedule, 235 ->
    # 258 SASS a step at stride 2)
    m_mask = m_mask & (not is_reduce)
    # The box-sum of A over the taps that reach each pixel, after the K loop and unrolled over
    # every tap a phase can have: the loads are independent, so their latencies overlap -- in
    # the loop each one stalled the next step's issue until it returned.
    box = tl.zeros([BLOCK_M], dtype=tl.float32)
    for qh in tl.static_range((KH + STEP_H - 1) // STEP_H):
        for qw in tl.static_range((KW + STEP_W - 1) // STEP_W):
            kh = kh_first + qh * STEP_H
            kw = kw_first + qw * STEP_W
            ho = i + (ph + PH - kh * DH) // SH
            wo = j + (pw + PW - kw * DW) // SW
            # (i * 0 + ...): a [BM] comparison (the interpreter rejects a scalar-bool mask term)
            tap_ok = m_mask & ((i * 0 + taps_h) > qh) & ((i * 0 + taps_w) > qw)
            valid = tap_ok & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo)
            if WIDE_OFFSETS:
                a_offs = ((n64 * G + g) * Ho + ho) * Wo + wo
            else:
                a_offs = ((n * G + g) * Ho + ho) * Wo + wo
            box += tl.load(a_ptr + a_offs, mask=valid, other=0.0)

    x_rows = n64 * stride_xn + hi.to(tl.int64) * stride_xh + wi.to(tl.int64) * stride_xw
    dx_rows = n64 * stride_dxn + hi.to(tl.int64) * stride_dxh + wi.to(tl.int64) * stride_dxw
    store_dgrad_tile(acc, box, x_ptr, dx_ptr, x_rows, dx_rows, g * CG_IN, pid_n * BLOCK_N,
                     CG_IN, m_mask, stride_xc, stride_dxc, EMULATE_RTNE, PIXELS_FAST, BLOCK_M,
                     BLOCK_N, PIX_RUN)
    if is_reduce:
        red = ((pid_gp - G * SH * SW) * tl.num_programs(0) * tl.num_programs(1)
               + pid_n * tl.num_programs(0) + pid_m)
        if red < RED_PROGRAMS:
            _first_level_block(red_ptr, red_out_ptr, red, R, C_out, RED_ROWS, NEED_S, NEED_DB,
                               NEED_DK, EMULATE_RTNE, BLOCK_R, BLOCK_RC)


@triton.jit(noinline=True)
def _first_level_block(part_ptr, out_ptr, red, R, C_out, ROWS_PER_PROGRAM,
                       NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr,
                       EMULATE_RTNE: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """Program ``red`` of _reduce_partials_kernel's first level (its grid flattened: channel
    block red % cdiv(C_out, BLOCK_C), rows red // that), for a GEMM kernel that hosts it: a
    function of its own (noinline), so that its code does not move the host's K-loop schedule
    (inlined in the dgrad: 194 -> 216 SASS a step at 64 channels, 235 -> 258 at stride 2)."""
    c_blocks = tl.cdiv(C_out, BLOCK_C)
    _reduce_column_block(part_ptr, out_ptr, out_ptr, out_ptr, out_ptr, red % c_blocks,
                         red // c_blocks, tl.cdiv(R, ROWS_PER_PROGRAM), R, C_out,
                         ROWS_PER_PROGRAM, NEED_S, NEED_DB, NEED_DK, False, EMULATE_RTNE,
                         BLOCK_R, BLOCK_C)


@triton.jit
def phase_first_tap(residue, K: tl.constexpr, S: tl.constexpr, STEP: tl.constexpr, dil):
    """The taps of one axis of a stride phase: ``(first, taps)``, the smallest filter tap r
    with r*dil = residue (mod S) (``residue`` >= 0: the padded input index's phase) and how
    many of first, first + STEP, ... lie below K (STEP = S / gcd(S, dil); 0 taps when first
    is K or more). The first solution, if any, lies below STEP."""
    first = K
    for q in tl.static_range(STEP):
        cand = STEP - 1 - q
        # (residue - cand*dil) mod S, written with a non-negative left operand
        first = tl.where((residue + cand * dil * (S - 1)) % S == 0, cand, first)
    return first, tl.where(first < K, (K - first + STEP - 1) // STEP, 0)


@triton.jit
def next_phase_step(chunk, chunk_step, chunk_end, tap_w, taps_w, tap_h):
    """A phase-decomposed dgrad's K loop counters after a step: ``(chunk, tap_w, tap_h)``, the
    channel chunk ``chunk_step`` on, wrapping at ``chunk_end`` to the phase's next tap column,
    wrapping at ``taps_w`` to its next tap row (carried from step to step: dividing the step
    index by runtime tap and chunk counts costs two integer divisions a step)."""
    chunk += chunk_step
    next_tap = chunk >= chunk_end
    chunk = tl.where(next_tap, 0, chunk)
    tap_w += next_tap.to(tl.int32)
    next_row = tap_w >= taps_w
    return chunk, tl.where(next_row, 0, tap_w), tap_h + next_row.to(tl.int32)


@triton.jit
def store_dgrad_tile(acc, box, x_ptr, dx_ptr, x_rows, dx_rows, c_first, col0, CG_IN, m_mask,
                     stride_xc, stride_dxc, EMULATE_RTNE: tl.constexpr,
                     PIXELS_FAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PIX_RUN: tl.constexpr = 1):
    """The dgrad epilogue dx = acc - x * box of a [BLOCK_M pixels, BLOCK_N channels] tile whose
    columns are the group's input channels col0 .. col0 + BLOCK_N (see _dgrad_store); shared
    with conv_bwd_grid's kernel."""
    if PIXELS_FAST:
        # a quarter of the columns at a time: the transposed x tile next to the whole fp32
        # accumulator spilled 1128 B a thread (sm_90, bf16, 128 x 128); eighths without known
        # pixel runs (epilogue.column_slices: triton 3.6 still spilled 576 B with quarters)
        PARTS: tl.constexpr = 8 if PIX_RUN == 1 and BLOCK_N >= 128 else 4
        W: tl.constexpr = BLOCK_N // PARTS
        slices = column_slices(acc, BLOCK_M, BLOCK_N, PARTS)
        for k in tl.static_range(PARTS):
            _dgrad_store(slices[k], box, x_ptr, dx_ptr, x_rows, dx_rows, c_first,
                         col0 + k * W + tl.arange(0, W), CG_IN, m_mask,
                         stride_xc, stride_dxc, EMULATE_RTNE, True, PIX_RUN)
    else:
        _dgrad_store(acc, box, x_ptr, dx_ptr, x_rows, dx_rows, c_first,
                     col0 + tl.arange(0, BLOCK_N), CG_IN, m_mask, stride_xc, stride_dxc,
                     EMULATE_RTNE, False, 1)


@triton.jit
def _dgrad_store(acc, box, x_ptr, dx_ptr, x_rows, dx_rows, c_first, offs_ci, CG_IN, m_mask,
                 stride_xc, stride_dxc, EMULATE_RTNE: tl.constexpr, PIXELS_FAST: tl.constexpr,
                 PIX_RUN: tl.constexpr):
    """dx = acc - x * box for the dgrad tile's columns offs_ci [BC] (input channels within the
    group, valid below CG_IN; c_first: the group's first channel) and its [BM] pixels: acc
    [BM, BC] fp32, box [BM] fp32, x_rows / dx_rows [BM] int64 pixel offsets into x / dx;
    PIX_RUN: epilogue.pixel_runs' RUN for x and dx (1: none)."""
    ci_mask = offs_ci < CG_IN
    c64 = (c_first + offs_ci).to(tl.int64)
    if PIX_RUN > 1:   # provably contiguous along the pixels: Triton lays the lanes there
        x_offs, tile_mask = pixel_runs(x_rows, c64 * stride_xc, m_mask, ci_mask, PIX_RUN)
        xv = tl.load(x_ptr + x_offs, mask=tile_mask, other=0.0).to(tl.float32)
    else:
        xv = load_tile(tile_ptrs(x_ptr, x_rows, c64 * stride_xc, PIXELS_FAST), m_mask, ci_mask,
                       PIXELS_FAST).to(tl.float32)
    dx = acc - xv * box[:, None]
    dx_offs, tile_mask = pixel_runs(dx_rows, c64 * stride_dxc, m_mask, ci_mask, PIX_RUN)
    store_tile(dx_ptr + dx_offs, to_dtype_of(dx, dx_ptr, EMULATE_RTNE), tile_mask, PIXELS_FAST)


@triton.jit
def _tap_input_rows(n, ho, wo, m_mask, kh, kw, H, W, stride_xn, stride_xh, stride_xw,
                    SH: tl.constexpr, SW: tl.constexpr,
                    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                    WIDE: tl.constexpr):
    """For output pixels (n, ho, wo) [BM] and filter tap (kh, kw): the offset of the input pixel
    the tap reads (without the channel term; int64 if WIDE, else int32: the launcher's
    _needs_wide_offsets) and whether it lies inside the image (not padding) -- the x operand
    rows of _wgrad_kernel."""
    hi = ho * SH - PH + kh * DH
    wi = wo * SW - PW + kw * DW
    valid = m_mask & in_bounds(hi, H) & in_bounds(wi, W)
    if WIDE:
        row = n.to(tl.int64) * stride_xn + hi.to(tl.int64) * stride_xh + wi.to(tl.int64) * stride_xw
    else:
        row = n * stride_xn + hi * stride_xh + wi * stride_xw
    return row, valid


@triton.jit
def _flat_input_tile(n, ho, wo, m_mask, kh, kw, k_mask, H, W, stride_xn, stride_xh, stride_xw,
                     SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
                     PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, WIDE: tl.constexpr):
    """The im2col rows of output pixels (n, ho, wo) [BM] for the flattened filter positions with
    taps (kh, kw) [BK] (k_mask [BK]): offsets of the input pixels they read, [BM, BK] without
    the channel term (int64 if WIDE, else int32), and whether each lies inside the image --
    the x operand of the flat-K wgrad (_wgrad_kernel's FLAT_K)."""
    top = ho * SH - PH
    left = wo * SW - PW
    hi = top[:, None] + (kh * DH)[None, :]
    wi = left[:, None] + (kw * DW)[None, :]
    valid = m_mask[:, None] & k_mask[None, :] & in_bounds(hi, H) & in_bounds(wi, W)
    # the offset as a row part plus a column part: one add per element
    if WIDE:
        row = n.to(tl.int64) * stride_xn + top.to(tl.int64) * stride_xh + left.to(tl.int64) * stride_xw
        col = (kh * DH).to(tl.int64) * stride_xh + (kw * DW).to(tl.int64) * stride_xw
    else:
        row = n * stride_xn + top * stride_xh + left * stride_xw
        col = (kh * DH) * stride_xh + (kw * DW) * stride_xw
    return row[:, None] + col[None, :], valid


@triton.jit
def _wgrad_kernel(
    hn_ptr, x_ptr, part_ptr, red_ptr, s_ptr, db_ptr, dk_ptr, cnt_ptr, w_ptr, rw_ptr, dw_ptr,
    M, HoWo: tl.constexpr, Wo: tl.constexpr, H, W, C_out, CG_IN, CG_OUT, CGI_P, CGO_P, G,
    M_PER_SPLIT, SPLIT, R, RED_PROGRAMS,
    stride_xn, stride_xc, stride_xh, stride_xw, howo_rt, wo_rt,
    stride_wo, stride_wc, stride_wh, stride_ww, stride_dwo, stride_dwc, stride_dwh, stride_dww,
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
    RUNTIME_DIV: tl.constexpr, FLAT_K: tl.constexpr, DENSE_ROWS: tl.constexpr,
    EVEN_O: tl.constexpr, EVEN_CI: tl.constexpr, HN_TOP: tl.constexpr, HN_LEFT: tl.constexpr,
    NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr,
    FINISH_DW: tl.constexpr,
    EMULATE_RTNE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial weight gradient sum_{m in split} Hn[m, o] * x_patch[m, ci, kh, kw].

    Two layouts of the GEMM's N axis (FLAT_K, wgrad_config): per tap -- program axis 1 is the
    tap (kh, kw), the columns BLOCK_CI input channels of it (C_in/G >= 16: contiguous channel
    loads) -- or flat -- axis 1 walks k = (kh * KW + kw) * CG_IN + ci in blocks of BLOCK_CI,
    each element gathered with its own (tap, ci) (C_in/G < 16: a first layer's 3 channels
    would fill 3 of 16 columns per tap, and Hn would be read once per tap instead of once per
    k block: 25 times for a 5x5 filter).

    hn_ptr:   [M = N*Ho*Wo, G, CGO_P] contiguous (Hn = G / r_x, input dtype; zeros past CG_OUT
              in each group), or on the dgrad's padded grid with margins HN_TOP / HN_LEFT
              (_prep_kernel, _hn_row).
    x_ptr:    [N, G*CGI_P, H, W], strides (stride_xn, stride_xc, stride_xh, stride_xw): the
              forward input (CGI_P = CG_IN) or its staged copy (CGI_P = CG_IN rounded up to
              16, channels_last; conv_fwd.staged_channels).
    CGI_P, CGO_P: the load bounds (and group strides) of x's channels and Hn's columns, as
    in _dgrad_kernel; rows and columns past CG_OUT / CG_IN are computed and not stored.
    part_ptr: [SPLIT, KH*KW, C_out, CG_IN] fp32 contiguous (tap-major so that the tile store is
              contiguous along ci; the partials are the bulk of wgrad's writes); this program
              writes its [BLOCK_O, BLOCK_CI] tile of split s, tap (kh, kw). Still / r_w.
    M_PER_SPLIT: output pixels per split (a multiple of BLOCK_M).
    HoWo = Ho*Wo, Wo: constexpr (divisions by constants in the main loop); howo_rt, wo_rt: the
    same as runtime values, used instead when RUNTIME_DIV (launcher: see _wgrad_runtime_div).
    KH, KW: filter size. SH, SW: stride. PH, PW: padding. DH, DW: dilation.
    UPCAST_DOT, DOT_PRECISION: see _dgrad_kernel.
    BLOCK_O: output channels per program. BLOCK_CI: input channels per program.
    BLOCK_M: output pixels per reduction step.
    FLAT_K: the flat layout above (CGI_P = CG_IN there).
    DENSE_ROWS: a 1x1 filter at stride 1 without padding over an x whose pixels lie
    stride_xw apart across rows and images (_dense_pixel_rows): output pixel m reads input
    pixel m, the x tile a plain strided block (no pixel coordinates, no bounds but M).
    EVEN_O: BLOCK_O divides CGO_P; EVEN_CI: BLOCK_CI divides CGI_P (per-tap layout): every
    row of the Hn tile / column of the x tile exists, their masks dropped (3x3: 390 -> 364).
    The final level of the prep partials' column sums rides in this launch instead of one of
    its own: programs past axis 2's SPLIT * G run _reduce_column_block's final level over
    red_ptr [3, R, C_out] fp32 (the prep partials, or the reduce kernel's first level of them),
    S into s_ptr [C_out] fp32 (NEED_S), db into db_ptr and dk into dk_ptr [C_out] (NEED_DB /
    NEED_DK), RED_PROGRAMS = cdiv(C_out, BLOCK_RC) of them, BLOCK_R rows a step, EMULATE_RTNE
    as _reduce_partials_kernel; without them (all three flags False) none runs.
    FINISH_DW: the finalize rides in this launch too (count_and_finish_wgrad_tile): cnt_ptr
    [G * axis 0 * axis 1] int32, zeroed by the prep launch, counts the splits of each tile that
    have stored their partial, and the split that completes the count writes the tile's dw
    [C_out, CG_IN, KH, KW] (dw_ptr, strides stride_dwo..) from the partials, w_ptr (strides
    stride_wo..), rw_ptr [C_out] fp32 and S summed from red_ptr's first plane -- so the reduce
    programs need not write S. Without it cnt_ptr, w_ptr, rw_ptr, dw_ptr are unread (any
    tensors) and _dw_finalize_kernel runs after this launch.
    Grid: (cdiv(CG_OUT, BLOCK_O) * cdiv(CG_IN, BLOCK_CI), KH*KW, SPLIT * G + E), or with FLAT_K
    (cdiv(CG_OUT, BLOCK_O), cdiv(KH*KW*CG_IN, BLOCK_CI), SPLIT * G + E), E = the slices the
    reduce programs need (0 without them).
    """
    pid_oc = tl.program_id(0)
    tap = tl.program_id(1)     # FLAT_K: the k block
    pid_sg = tl.program_id(2)
    # a reduce program (none in the grid unless asked) runs the GEMM part with an empty pixel
    # range and no store: the GEMM code stays unbranched (in an if/else its build took 245
    # registers instead of 208, sm_90 bf16 128x128)
    is_reduce = pid_sg >= SPLIT * G
    s = pid_sg % SPLIT
    g = pid_sg // SPLIT
    if FLAT_K:
        n_ci_blocks = 1
    else:
        n_ci_blocks = tl.cdiv(CG_IN, BLOCK_CI)
    pid_o = pid_oc // n_ci_blocks
    pid_ci = pid_oc % n_ci_blocks
    kh = tap // KW
    kw = tap % KW

    offs_ol = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_ol < CG_OUT
    offs_o = g * CG_OUT + offs_ol
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_mask = offs_ci < CG_IN
    x_chan = ((g * CGI_P + offs_ci).to(tl.int64) * stride_xc)[None, :]
    hn_col = g * CGO_P + offs_ol
    if FLAT_K:   # column j of the tile is k = tap * BLOCK_CI + j = (kh * KW + kw) * CG_IN + ci
        offs_k = tap * BLOCK_CI + tl.arange(0, BLOCK_CI)
        k_mask = offs_k < KH * KW * CG_IN
        ci_k = offs_k % CG_IN
        tap_k = offs_k // CG_IN
        kh_k = tap_k // KW
        kw_k = tap_k % KW
        x_chan = ((g * CGI_P + ci_k).to(tl.int64) * stride_xc)[None, :]

    # the pixel -> (image, row, column) divisors: constexprs (multiply-shifts), or with
    # RUNTIME_DIV the same values as runtime integers (true divisions)
    if RUNTIME_DIV:
        howo_div = howo_rt
        wo_div = wo_rt
    else:
        howo_div = HoWo
        wo_div = Wo

    m_start = s * M_PER_SPLIT
    m_end = tl.where(is_reduce, m_start, tl.minimum(m_start + M_PER_SPLIT, M))
    # the rows' output pixels (n, ho, wo): divided out once, then carried BLOCK_M pixels on a
    # step (_advance_pixels), not divided out of offs_m every step (two divisions and two
    # remainders a row; sm_90 bf16 K loop 494 -> 451 SASS instructions a step at 3x3, 628 ->
    # 458 with runtime divisors) -- where the three carried vectors fit: not for int64 offsets
    # or the flat layout (its gathered x tile already holds ~170 registers: carried, 1706 ->
    # 904 instructions but spills, in the loop on sm_80), not for exact fp32 (FMA-bound, and
    # it spilled), not with Hn on a padded grid (HN_TOP / HN_LEFT: its row map needs the
    # pixels in the Hn tile's transposed layout too; a carried copy moved there: 507 -> 574)
    CARRY: tl.constexpr = (not FLAT_K and not WIDE_OFFSETS and HN_TOP == 0 and HN_LEFT == 0
                           and not DENSE_ROWS
                           and not (DOT_PRECISION == "ieee" and x_ptr.dtype.element_ty == tl.float32))
    step_n, step_h, step_w = _pixel_step(howo_div, wo_div, BLOCK_M)
    pix_n, pix_h, pix_w = _pixel_coords(m_start + tl.arange(0, BLOCK_M), howo_div, wo_div)
    acc = tl.zeros([BLOCK_O, BLOCK_CI], dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        if not CARRY and not DENSE_ROWS:
            pix_n, pix_h, pix_w = _pixel_coords(offs_m, howo_div, wo_div)
        if DENSE_ROWS:
            if WIDE_OFFSETS:
                x_offs = (offs_m.to(tl.int64) * stride_xw)[:, None]
            else:
                x_offs = (offs_m * stride_xw)[:, None]
            x_rows_ok = m_mask
        elif FLAT_K:
            x_offs, x_mask = _flat_input_tile(pix_n, pix_h, pix_w, m_mask, kh_k, kw_k, k_mask,
                                              H, W, stride_xn, stride_xh, stride_xw,
                                              SH, SW, PH, PW, DH, DW, WIDE_OFFSETS)
        else:
            x_row, valid = _tap_input_rows(pix_n, pix_h, pix_w, m_mask, kh, kw, H, W, stride_xn,
                                           stride_xh, stride_xw, SH, SW, PH, PW, DH, DW,
                                           WIDE_OFFSETS)
            x_offs = x_row[:, None]
            x_rows_ok = valid
        if not FLAT_K:   # (the flat tile's mask covers its columns already)
            x_mask = x_rows_ok[:, None]
            if not EVEN_CI:
                x_mask = x_mask & (offs_ci < CGI_P)[None, :]
        hn_row = _hn_row(offs_m, howo_div, wo_div, HN_TOP, HN_LEFT, WIDE_OFFSETS) * (G * CGO_P)
        if CARRY:
            pix_n, pix_h, pix_w = _advance_pixels(pix_n, pix_h, pix_w, step_n, step_h, step_w,
                                                 howo_div // wo_div, wo_div)
        if EVEN_O:
            ht_mask = m_mask[None, :]
        else:
            ht_mask = (offs_ol < CGO_P)[:, None] & m_mask[None, :]
        ht = tl.load(hn_ptr + hn_row[None, :] + hn_col[:, None], mask=ht_mask, other=0.0)
        xt = tl.load(x_ptr + x_offs + x_chan, mask=x_mask, other=0.0)
        if UPCAST_DOT:
            ht = ht.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(ht, xt, acc, input_precision=DOT_PRECISION)

    if FLAT_K:
        dst = (((s * (KH * KW) + tap_k).to(tl.int64)[None, :] * C_out + offs_o[:, None]) * CG_IN
               + ci_k[None, :])
        tl.store(part_ptr + dst, acc, mask=o_mask[:, None] & k_mask[None, :] & (not is_reduce))
    else:
        dst = ((s * (KH * KW) + tap) * C_out + offs_o).to(tl.int64)[:, None] * CG_IN + offs_ci[None, :]
        tl.store(part_ptr + dst, acc, mask=o_mask[:, None] & ci_mask[None, :] & (not is_reduce))
    if is_reduce:
        slice_size = tl.num_programs(0) * tl.num_programs(1)
        red = (pid_sg - SPLIT * G) * slice_size + tap * tl.num_programs(0) + pid_oc
        if red < RED_PROGRAMS:
            _reduce_column_block(red_ptr, s_ptr, s_ptr, db_ptr, dk_ptr, red, 0, 1, R, C_out,
                                 tl.cdiv(R, BLOCK_R) * BLOCK_R, NEED_S, NEED_DB, NEED_DK, True,
                                 EMULATE_RTNE, BLOCK_R, BLOCK_RC)
    elif FINISH_DW:
        if FLAT_K:   # the tile's columns: flat (tap, channel) positions, or a tap's channels
            col0 = tap * BLOCK_CI
        else:
            col0 = pid_ci * BLOCK_CI
        tile = (g * tl.num_programs(0) + pid_oc) * tl.num_programs(1) + tap
        count_and_finish_wgrad_tile(cnt_ptr, tile, part_ptr, red_ptr, w_ptr, rw_ptr, dw_ptr, g,
                                    pid_o * BLOCK_O, col0, tap, C_out, CG_IN, CG_OUT, SPLIT, R,
                                    stride_wo, stride_wc, stride_wh, stride_ww,
                                    stride_dwo, stride_dwc, stride_dwh, stride_dww,
                                    KH, KW, FLAT_K, EMULATE_RTNE, BLOCK_O, BLOCK_CI)


@triton.jit
def _dw_state_row(n64, pix, C, HoWo, ROW_W: tl.constexpr):
    """The layout of the depthwise backward's state Hn and A (written by the prep kernel, read
    by the grad kernel): the offset of output pixel ``pix`` (ho * Wo + wo) of image ``n64``
    (int64), to which :func:`_dw_state_col` adds a channel's. ROW_W 0 (channels_last x):
    [N*Ho*Wo, C], channels contiguous; ROW_W > 0 (NCHW x, row tiles): [N, C, Ho*Wo] planes,
    pixels contiguous -- along the axis the kernels' x and dy accesses run. Linear in pix, so
    the row of pix - d is this row minus the row of pixel d of image 0."""
    if ROW_W == 0:
        row = (n64 * HoWo + pix) * C
    else:
        row = n64 * C * HoWo + pix
    return row


@triton.jit
def _dw_state_col(c64, HoWo, ROW_W: tl.constexpr):
    """Channel offsets c64 [BC] int64 in the state (:func:`_dw_state_row`)."""
    if ROW_W == 0:
        col = c64
    else:
        col = c64 * HoWo
    return col


@triton.jit
def _depthwise_prep_kernel(
    dy_ptr, x_ptr, w_ptr, k_ptr, hn_ptr, a_ptr, rw_ptr, ws_ptr, part_ptr,
    M, C, H, W, Ho, Wo, R, stride_k, eps,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wc, stride_wh, stride_ww,
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    OPERATOR: tl.constexpr, DELTA: tl.constexpr, STORE_HN: tl.constexpr, STORE_A: tl.constexpr,
    NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr,
    EMULATE_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ROW_BLOCKS: tl.constexpr, ROW_W: tl.constexpr,
):
    """The prep pass of a pure depthwise conv (C_in = C_out = G = C), from dy, x and w: the
    forward saved nothing, so each (output pixel, channel) recomputes its window exactly as the
    forward did (conv_fwd.depthwise_window / depthwise_inv_norms), then as _prep_kernel:
    G = dy dg/dc, Hn = G / r_x, A = G c / r_x^2 and the partial sums of S, db, dk.

    dy_ptr: [N, C, Ho, Wo], strides (stride_dyn, stride_dyc, stride_dyh, stride_dyw).
    x_ptr:  [N, C, H, W], strides (stride_xn, ...). w_ptr: [C, 1, KH, KW] strides (stride_wc, -,
            stride_wh, stride_ww). k_ptr: [C], stride stride_k (read iff sigmoid).
    hn_ptr: Hn, input dtype (iff STORE_HN), in the layout of :func:`_dw_state_row`:
            [M = N*Ho*Wo, C] contiguous (ROW_W 0, channels_last x) or [N, C, Ho*Wo]
            contiguous (row tiles, NCHW x) -- along the axis x's loads run.
    a_ptr:  A, fp32 (iff STORE_A), laid out as Hn.
    rw_ptr: [C] fp32, r_w = sqrt(||w_c||^2 + eps), written by the pid_m == 0 programs.
    ws_ptr: [KH*KW, C] fp32 contiguous, w[c, tap] / r_w[c] (iff STORE_A: the grad kernel's dx
            taps, one vector load a tap there instead of a strided load, a conversion and a
            product per channel), written by the pid_m == 0 programs.
    part_ptr: [3, R, C] fp32 partials as _prep_kernel's (conv_bwd's reduction follows), one
            row a program.
    R = grid axis 0: a program takes ROW_BLOCKS consecutive tiles of BLOCK_M output pixels
    (conv_fwd.depthwise_pixel_tile: ROW_W 0 consecutive pixels, else blocks of rows up to
    ROW_W wide), which share its filter loads (conv_fwd.depthwise_filter_taps) and its column
    sums (summed across the rows once, at the end).
    KH, KW, SH, SW, PH, PW, DH, DW: filter size, stride, padding, dilation. OPERATOR, DELTA,
    STORE_*, NEED_*, EMULATE_RTNE as _prep_kernel.
    Grid: (R, cdiv(C, BLOCK_C)).
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_o = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_o < C
    o64 = offs_o.to(tl.int64)
    taps, wsq, inv_rw = depthwise_filter_taps(w_ptr, offs_o, c_mask, stride_wc, stride_wh,
                                              stride_ww, eps, KH, KW)
    if pid_m == 0:
        r_w = tl.sqrt(wsq + eps)
        tl.store(rw_ptr + offs_o, r_w, mask=c_mask)
        if STORE_A:
            inv_r = 1.0 / r_w
            for tap in tl.static_range(KH * KW):
                tl.store(ws_ptr + tap * C + offs_o,
                         filter_tap(taps, tap, stride_wh, stride_ww, KH, KW) * inv_r,
                         mask=c_mask)
    if OPERATOR == 2:
        kv = tl.load(k_ptr + offs_o * stride_k, mask=c_mask, other=1.0).to(tl.float32)[None, :]
    else:
        kv = 1.0
    s_cols = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    db_cols = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    dk_cols = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    n_images = M // (Ho * Wo)
    ROWS_FAST: tl.constexpr = ROW_W > 0
    for rb in range(ROW_BLOCKS):
        tile = pid_m * ROW_BLOCKS + rb
        n, ho, wo, m_mask = depthwise_pixel_tile(tile, n_images, Ho, Wo, ROW_W, BLOCK_M)
        mask = m_mask[:, None] & c_mask[None, :]
        s, q = depthwise_window(x_ptr, taps, n, ho * SH - PH, wo * SW - PW, m_mask, offs_o,
                                c_mask, H, W, stride_xn, stride_xc, stride_xh, stride_xw,
                                stride_wh, stride_ww, DH, DW, KH, KW, BLOCK_M, BLOCK_C,
                                ROWS_FAST)
        inv_norms, inv_rx = depthwise_inv_norms(q, inv_rw, eps)
        cv = clamp_cos(s * inv_norms)
        dy_row = (n.to(tl.int64) * stride_dyn + ho.to(tl.int64) * stride_dyh
                  + wo.to(tl.int64) * stride_dyw)
        dy = load_tile(tile_ptrs(dy_ptr, dy_row, o64 * stride_dyc, ROWS_FAST), m_mask, c_mask,
                       ROWS_FAST).to(tl.float32)
        grad_c = dy * dg_dc(cv, kv, OPERATOR, DELTA)
        gc = grad_c * cv
        if ROW_W == 0:   # the tile's consecutive pixels: their flat index is the state row
            pix_rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64) * C
        else:
            pix_rows = _dw_state_row(n.to(tl.int64), ho * Wo + wo, C, Ho * Wo, ROW_W)
        rows = pix_rows[:, None] + _dw_state_col(o64, Ho * Wo, ROW_W)[None, :]
        if STORE_HN:
            tl.store(hn_ptr + rows, to_dtype_of(grad_c * inv_rx, hn_ptr, EMULATE_RTNE),
                     mask=mask)
        if STORE_A:
            tl.store(a_ptr + rows, gc * inv_rx * inv_rx, mask=mask)
        # masked lanes: dy = 0 there, so G, G c and dy dg/dk are 0 and the column sums exact
        if NEED_S:
            s_cols += gc
        if NEED_DB:
            db_cols += dy
        if NEED_DK:
            dk_cols += _dk_terms(mask, dy, cv, kv)
    _store_column_sums(part_ptr, R, pid_m, C, offs_o, c_mask, s_cols, db_cols, dk_cols,
                       NEED_S, NEED_DB, NEED_DK)


@triton.jit
def _depthwise_grad_tap(hn_ptr, a_ptr, ws_ptr, tap, pix, acc, box, c_mask, cols, offs_c, C, Ho,
                        Wo, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                        DH: tl.constexpr, DW: tl.constexpr, NEED_DX: tl.constexpr,
                        ROW_W: tl.constexpr):
    """One tap of _depthwise_grad_kernel for its [BM] input pixels x [BC] channels: ``(h, acc,
    box)`` -- h = Hn at the output pixel whose window puts tap (kh, kw) = (tap // KW, tap % KW)
    on the input pixel (0 where there is none), acc + h w / r_w and box + A there (unchanged
    without NEED_DX), all fp32. ``pix`` = (hp, wp, row0, n64, m_mask) of the input pixels.

    That output pixel is ((hp - kh DH) / SH, (wp - kw DW) / SW) with hp, wp = the input row and
    column plus the padding, if both divide and lie in the output; at stride 1 its state row
    is the tap-0 row ``row0`` (the state row of output pixel (hp, wp)) shifted by a scalar, its
    bounds tap-shifted scalars. Hn and A are in _dw_state_row's layout for ROW_W (cols: its
    channel offsets); ws_ptr [KH*KW, C] as the kernel's."""
    hp, wp, row0, n64, m_mask = pix
    dh = (tap // KW) * DH
    dw = (tap % KW) * DW
    if SH == 1 and SW == 1:
        valid = m_mask & (hp >= dh) & (hp < Ho + dh) & (wp >= dw) & (wp < Wo + dw)
        rows = row0 - _dw_state_row(0, (dh * Wo + dw).to(tl.int64), C, Ho * Wo, ROW_W)
    else:
        th = hp - dh
        tw = wp - dw
        ho = th // SH
        wo = tw // SW
        valid = (m_mask & (th >= 0) & (tw >= 0) & (th % SH == 0) & (tw % SW == 0)
                 & (ho < Ho) & (wo < Wo))
        rows = _dw_state_row(n64, ho * Wo + wo, C, Ho * Wo, ROW_W)
    ROWS_FAST: tl.constexpr = ROW_W > 0
    offs = tile_ptrs(0, rows, cols, ROWS_FAST)
    h = load_tile(hn_ptr + offs, valid, c_mask, ROWS_FAST).to(tl.float32)
    if NEED_DX:
        wv = tl.load(ws_ptr + tap * C + offs_c, mask=c_mask, other=0.0)
        acc += h * wv[None, :]
        box += load_tile(a_ptr + offs, valid, c_mask, ROWS_FAST)
    return h, acc, box


@triton.jit
def _depthwise_grad_group(hn_ptr, a_ptr, ws_ptr, x_ptr, dx_ptr, w_acc, tile, n_images, C, H, W,
                          Ho, Wo, offs_c, c_mask, c64, stride_xn, stride_xc, stride_xh,
                          stride_xw, stride_dxn, stride_dxc, stride_dxh, stride_dxw,
                          KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr,
                          PW: tl.constexpr, DH: tl.constexpr, NEED_DX: tl.constexpr,
                          NEED_DW: tl.constexpr, EMULATE_RTNE: tl.constexpr,
                          BG: tl.constexpr, PIX_GROUP: tl.constexpr):
    """Tile ``tile`` of _depthwise_grad_kernel in groups of PIX_GROUP side-by-side input
    pixels (BG groups; stride 1, width dilation 1, channels_last x, Hn and A in [N*Ho*Wo, C]):
    dx of each pixel stored, the weight-gradient products added into ``w_acc`` (a tuple of
    KH*KW [BG, BC] accumulators, returned).

    Input pixel p of a group (column wi + p) meets tap (r, kw) at output column wi + PW + p -
    kw, so over a row of taps the group reads the output columns wi + PW - (KW - 1) + j, j in
    [0, PIX_GROUP + KW - 1): each column's Hn and A are loaded once and serve every pixel
    with kw = p - j + KW - 1 in [0, KW). The columns are walked right to left, so each pixel
    still meets its taps in tap order (r, then kw), as _depthwise_grad_tap's loop."""
    gn, ghi, gwi, g_mask = depthwise_group_tile(tile, n_images, H, W, BG * PIX_GROUP,
                                                PIX_GROUP)
    n64 = gn.to(tl.int64)
    x_row = n64 * stride_xn + ghi.to(tl.int64) * stride_xh + gwi.to(tl.int64) * stride_xw
    xv = ()
    acc = ()
    box = ()
    for p in tl.static_range(PIX_GROUP):
        x_ptrs = x_ptr + (x_row + p * stride_xw)[:, None] + (c64 * stride_xc)[None, :]
        xv = xv + (tl.load(x_ptrs, mask=g_mask[:, None] & c_mask[None, :],
                           other=0.0).to(tl.float32),)
        acc = acc + (tl.zeros([BG, offs_c.shape[0]], dtype=tl.float32),)
        box = box + (tl.zeros([BG, offs_c.shape[0]], dtype=tl.float32),)
    hp = ghi + PH
    first_col = gwi + PW - (KW - 1)   # output column of j = 0
    for r in tl.static_range(KH):
        dh = r * DH
        row_ok = g_mask & (hp >= dh) & (hp < Ho + dh)
        # the state row (int64) of output pixel (hp - dh, first_col); column j is j rows on
        row_r = ((n64 * Ho + (hp - dh)) * Wo + first_col) * C
        for j in tl.static_range(PIX_GROUP + KW - 2, -1, -1):
            valid = row_ok & (first_col >= -j) & (first_col < Wo - j)
            offs = (row_r + j * C)[:, None] + c64[None, :]
            mask = valid[:, None] & c_mask[None, :]
            h = tl.load(hn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if NEED_DX:
                a = tl.load(a_ptr + offs, mask=mask, other=0.0)
            for p in tl.static_range(PIX_GROUP):
                if p - j + KW - 1 >= 0 and p - j + KW - 1 < KW:   # tap (r, p - j + KW - 1)
                    if NEED_DX:
                        wv = tl.load(ws_ptr + (r * KW + p - j + KW - 1) * C + offs_c,
                                     mask=c_mask, other=0.0)
                        acc = acc[:p] + (acc[p] + h * wv[None, :],) + acc[p + 1:]
                        box = box[:p] + (box[p] + a,) + box[p + 1:]
                    if NEED_DW:
                        w_acc = (w_acc[:r * KW + p - j + KW - 1]
                                 + (w_acc[r * KW + p - j + KW - 1] + h * xv[p],)
                                 + w_acc[r * KW + p - j + KW:])
    if NEED_DX:
        dx_row = (n64 * stride_dxn + ghi.to(tl.int64) * stride_dxh
                  + gwi.to(tl.int64) * stride_dxw)
        for p in tl.static_range(PIX_GROUP):
            dx = acc[p] - xv[p] * box[p]
            tl.store(dx_ptr + (dx_row + p * stride_dxw)[:, None] + (c64 * stride_dxc)[None, :],
                     to_dtype_of(dx, dx_ptr, EMULATE_RTNE),
                     mask=g_mask[:, None] & c_mask[None, :])
    return w_acc


@triton.jit
def _depthwise_grad_kernel(
    hn_ptr, a_ptr, ws_ptr, x_ptr, dx_ptr, part_ptr, red_ptr, s_ptr, db_ptr, dk_ptr,
    n_images, C, H, W, Ho, Wo, n_tiles, TILES_PER_SPLIT, SPLIT, R, RED_PROGRAMS,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_dxn, stride_dxc, stride_dxh, stride_dxw,
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    TAPS: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_RC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ROW_W: tl.constexpr,
    PIX_GROUP: tl.constexpr = 1,
):
    """Pure depthwise dx and weight-gradient partials in one pass over the input pixels.

    Per input pixel i and channel c, over the taps t whose output pixel p(i, t) exists:

        dx[i, c]          = sum_t Hn[p(i, t), c] w[c, t] / r_w[c] - x[i, c] sum_t A[p(i, t), c]
        part[split, t, c] = sum_{i in split} Hn[p(i, t), c] x[i, c]

    The partials are the weight gradient's sum_p Hn[p, c] x[i(p, t), c] taken from the input
    side: every (output pixel, tap) pair whose input pixel lies inside the image is exactly one
    (input pixel, tap) pair here, and pairs reading the padding contribute x = 0 on both sides.
    So Hn and x are read once for both gradients (the wgrad of a separate kernel read them again,
    once per tap).

    hn_ptr: Hn = G / r_x (input dtype) and a_ptr: A (fp32, read iff NEED_DX), in
            _dw_state_row's layout for ROW_W ([N*Ho*Wo, C] for 0, [N, C, Ho*Wo] else).
    ws_ptr: [KH*KW, C] fp32 contiguous, w[c, tap] / r_w[c] (from the prep kernel), read iff
            NEED_DX.
    x_ptr / dx_ptr: [N, C, H, W], strides (stride_xn, ...) / (stride_dxn, ...); dx written
            iff NEED_DX.
    part_ptr: [SPLIT, KH*KW, C] fp32 contiguous (iff NEED_DW): _dw_finalize_kernel's layout
            (C_in per group 1), still to be divided by r_w there.
    n_images = N; the input pixels (N*H*W < 2^31, checked by the launcher) in n_tiles tiles of
    BLOCK_M (conv_fwd.depthwise_pixel_tile, ROW_W as there: 0 for channels_last x, else the
    row width for NCHW); program s takes tiles [s * TILES_PER_SPLIT, (s + 1) *
    TILES_PER_SPLIT).
    KH, KW, SH, SW, PH, PW, DH, DW: filter size, stride, padding, dilation. TAPS: KH*KW rounded
    up to a power of two (the partials' register tile). EMULATE_RTNE: interpreter-only bf16
    rounding (epilogue.to_dtype_of).
    The final level of the prep partials' column sums rides in this launch, as in
    _wgrad_kernel: programs with axis-0 index >= SPLIT run _reduce_column_block over red_ptr
    [3, R, C] fp32 into s_ptr (NEED_S), db_ptr (NEED_DB), dk_ptr (NEED_DK), RED_PROGRAMS =
    cdiv(C, BLOCK_RC) of them, BLOCK_R rows a step; they run the pixel loop over an empty
    range and store nothing else.
    PIX_GROUP > 1 (stride 1, dilation 1 along the width, channels_last x, W a multiple of it,
    up to CACHED_TAPS taps: the launcher, conv_fwd.pixel_groups_fit): a tile is BLOCK_M //
    PIX_GROUP groups of PIX_GROUP side-by-side input pixels, and the KW output columns a row
    of taps reads for each pixel are PIX_GROUP + KW - 1 columns for the group, each loaded
    once (_depthwise_grad_group). dx keeps each pixel's tap order (the same bits as single
    pixels); the weight-gradient partials sum in another order.
    Grid: (SPLIT + cdiv(RED_PROGRAMS, cdiv(C, BLOCK_C)), cdiv(C, BLOCK_C)).
    """
    split = tl.program_id(0)
    pid_c = tl.program_id(1)
    is_reduce = split >= SPLIT
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    c64 = offs_c.to(tl.int64)
    tap_ids = tl.arange(0, TAPS)
    # Up to CACHED_TAPS taps (3x3) the taps are unrolled with one weight-gradient accumulator
    # a tap (a tuple indexed by the tap), summed over the pixels once after the loop: a
    # [BLOCK_C] sum a tap and step -- a cross-warp reduction with 4 barriers -- took 70 of
    # the 150 SASS instructions of a tap when the taps were a rolled loop (sm_90, bf16, 32 x
    # 32). Larger filters keep the rolled loop and that sum (25 or 49 accumulators would not
    # fit the registers).
    UNROLL: tl.constexpr = KH * KW <= CACHED_TAPS
    w_acc = (tl.zeros([BLOCK_M // PIX_GROUP, BLOCK_C], dtype=tl.float32),) * (KH * KW if UNROLL
                                                                           else 1)
    w_part = tl.zeros([TAPS, BLOCK_C], dtype=tl.float32)
    ROWS_FAST: tl.constexpr = ROW_W > 0
    cols = _dw_state_col(c64, Ho * Wo, ROW_W)
    t_start = split * TILES_PER_SPLIT
    t_end = tl.where(is_reduce, t_start, tl.minimum(t_start + TILES_PER_SPLIT, n_tiles))
    for t in range(t_start, t_end):
        if PIX_GROUP > 1:
            w_acc = _depthwise_grad_group(hn_ptr, a_ptr, ws_ptr, x_ptr, dx_ptr, w_acc, t,
                                          n_images, C, H, W, Ho, Wo, offs_c, c_mask, c64,
                                          stride_xn, stride_xc, stride_xh, stride_xw,
                                          stride_dxn, stride_dxc, stride_dxh, stride_dxw,
                                          KH, KW, PH, PW, DH, NEED_DX, NEED_DW, EMULATE_RTNE,
                                          BLOCK_M // PIX_GROUP, PIX_GROUP)
        else:
            n, hi, wi, m_mask = depthwise_pixel_tile(t, n_images, H, W, ROW_W, BLOCK_M)
            n64 = n.to(tl.int64)
            out_mask = m_mask[:, None] & c_mask[None, :]
            x_row = n64 * stride_xn + hi.to(tl.int64) * stride_xh + wi.to(tl.int64) * stride_xw
            xv = load_tile(tile_ptrs(x_ptr, x_row, c64 * stride_xc, ROWS_FAST), m_mask, c_mask,
                           ROWS_FAST).to(tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
            box = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
            hp = hi + PH
            wp = wi + PW
            # the state row of output pixel (hp, wp), which tap 0 reads at stride 1
            row0 = _dw_state_row(n64, hp * Wo + wp, C, Ho * Wo, ROW_W)
            pix = (hp, wp, row0, n64, m_mask)
            if UNROLL:
                for tap in tl.static_range(KH * KW):
                    h, acc, box = _depthwise_grad_tap(hn_ptr, a_ptr, ws_ptr, tap, pix, acc, box,
                                                      c_mask, cols, offs_c, C, Ho, Wo, KW, SH, SW,
                                                      DH, DW, NEED_DX, ROW_W)
                    if NEED_DW:
                        w_acc = w_acc[:tap] + (w_acc[tap] + h * xv,) + w_acc[tap + 1:]
            else:
                for tap in range(KH * KW):
                    h, acc, box = _depthwise_grad_tap(hn_ptr, a_ptr, ws_ptr, tap, pix, acc, box,
                                                      c_mask, cols, offs_c, C, Ho, Wo, KW, SH, SW,
                                                      DH, DW, NEED_DX, ROW_W)
                    if NEED_DW:
                        # this tile's sum for tap t, added into row t of the partials (others + 0)
                        tap_sum = tl.sum(h * xv, axis=0)
                        w_part += tl.where(tap_ids[:, None] == tap, tap_sum[None, :], 0.0)
            if NEED_DX:
                dx = acc - xv * box
                dx_row = (n64 * stride_dxn + hi.to(tl.int64) * stride_dxh
                          + wi.to(tl.int64) * stride_dxw)
                tl.store(dx_ptr + dx_row[:, None] + (c64 * stride_dxc)[None, :],
                         to_dtype_of(dx, dx_ptr, EMULATE_RTNE), mask=out_mask)
    if NEED_DW and UNROLL:
        for tap in tl.static_range(KH * KW):
            w_part = tl.where((tap_ids == tap)[:, None], tl.sum(w_acc[tap], axis=0)[None, :],
                              w_part)
    if NEED_DW:
        part_rows = (split * (KH * KW) + tap_ids).to(tl.int64)
        tl.store(part_ptr + part_rows[:, None] * C + c64[None, :], w_part,
                 mask=(tap_ids < KH * KW)[:, None] & c_mask[None, :] & (not is_reduce))
    if is_reduce:
        red = (split - SPLIT) * tl.num_programs(1) + pid_c
        if red < RED_PROGRAMS:
            _reduce_column_block(red_ptr, s_ptr, s_ptr, db_ptr, dk_ptr, red, 0, 1, R, C,
                                 tl.cdiv(R, BLOCK_R) * BLOCK_R, NEED_S, NEED_DB, NEED_DK, True,
                                 EMULATE_RTNE, BLOCK_R, BLOCK_RC)


@triton.jit
def _dw_finalize_kernel(
    part_ptr, w_ptr, rw_ptr, s_ptr, dw_ptr,
    C_out, CG_IN, SPLIT,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_dwo, stride_dwc, stride_dwh, stride_dww,
    KH: tl.constexpr, KW: tl.constexpr, EMULATE_RTNE: tl.constexpr, BLOCK: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    """dw = (sum over splits of the partials) / r_w - w * S / r_w^2, in a fixed order: SPLIT_BLOCK
    splits at a time summed by one [SPLIT_BLOCK, BLOCK] load and a reduction (a fixed tree), the
    blocks in turn -- not one dependent load per split (a memory round trip each), and the same
    bits on every run.

    part_ptr: [SPLIT, KH*KW, C_out, CG_IN] fp32 contiguous (from _wgrad_kernel); programs walk
              it in that order (coalesced), the small dw is written through its strides.
    w_ptr:  [C_out, CG_IN, KH, KW], strides (stride_wo, stride_wc, stride_wh, stride_ww).
    rw_ptr: [C_out] fp32. s_ptr: [C_out] fp32 (S_o = sum G c).
    dw_ptr: [C_out, CG_IN, KH, KW] in w's dtype, strides (stride_dwo, ...).
    KH, KW: filter size. BLOCK: weight elements per program; SPLIT_BLOCK: splits per step.
    EMULATE_RTNE: interpreter-only exact bf16 rounding (see epilogue.to_dtype_of).
    Grid: (cdiv(KH*KW*C_out*CG_IN, BLOCK),).
    """
    pid = tl.program_id(0)
    numel = C_out * CG_IN * KH * KW
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    offs_s = tl.arange(0, SPLIT_BLOCK)
    for s0 in range(0, SPLIT, SPLIT_BLOCK):
        rows = s0 + offs_s
        tile = tl.load(part_ptr + rows.to(tl.int64)[:, None] * numel + offs[None, :],
                       mask=(rows < SPLIT)[:, None] & mask[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    tap = offs // (C_out * CG_IN)
    f = offs % (C_out * CG_IN)
    o = f // CG_IN
    ci = f % CG_IN
    kh = tap // KW
    kw = tap % KW
    wv = tl.load(w_ptr + o * stride_wo + ci * stride_wc + kh * stride_wh + kw * stride_ww,
                 mask=mask, other=0.0).to(tl.float32)
    r_w = tl.load(rw_ptr + o, mask=mask, other=1.0)
    s_o = tl.load(s_ptr + o, mask=mask, other=0.0)
    inv_rw = 1.0 / r_w
    dw = acc * inv_rw - wv * (s_o * inv_rw * inv_rw)
    tl.store(dw_ptr + o * stride_dwo + ci * stride_dwc + kh * stride_dwh + kw * stride_dww,
             to_dtype_of(dw, dw_ptr, EMULATE_RTNE), mask=mask)


@triton.jit
def finish_wgrad_tile(part_ptr, red_ptr, w_ptr, rw_ptr, dw_ptr, g, o0, col0, tap,
                      c_out, cg_in, cg_out, n_split, R,
                      stride_wo, stride_wc, stride_wh, stride_ww,
                      stride_dwo, stride_dwc, stride_dwh, stride_dww,
                      KH: tl.constexpr, KW: tl.constexpr, FLAT_K: tl.constexpr,
                      EMULATE_RTNE: tl.constexpr, BLOCK_O: tl.constexpr,
                      BLOCK_CI: tl.constexpr):
    """dw of one wgrad tile -- group g, filters o0.., and BLOCK_CI columns from col0: input
    channels col0.. of tap ``tap``, or with FLAT_K the flat (tap, channel) positions k = col0..
    (tap k // C_in/G, channel k % C_in/G; ``tap`` unused) -- from the n_split partials of
    part_ptr [n_split, KH*KW, C_out, C_in/G] (summed in split order) and S = the column sums of
    red_ptr's first [R, C_out] plane (fixed order, FIN_ROWS rows a step): dw = sum / r_w -
    w * S / r_w^2, stored in dw's dtype (_dw_finalize_kernel's result, its sums in another
    fixed order). FIN_COLS columns at a time (a whole 128 x 128 fp32 tile and its next partial
    would take every register and spill: ~1 KB a thread). The loads bypass L1 (``.cg``): the
    partials were written by other programs (:func:`count_and_finish_wgrad_tile`)."""
    FIN_ROWS: tl.constexpr = 64
    FIN_COLS: tl.constexpr = 32 if BLOCK_CI > 32 else BLOCK_CI
    SPLIT_STEP: tl.constexpr = 2
    offs_o = o0 + tl.arange(0, BLOCK_O)
    o_mask = offs_o < cg_out
    filt = g * cg_out + offs_o
    s_acc = tl.zeros((FIN_ROWS, BLOCK_O), dtype=tl.float32)
    # the tail of a launch, once a tile: plain loops, not software-pipelined ones (the
    # kernel's num_stages would buffer these loads too, for ~90 more registers a thread)
    for r0 in tl.range(0, R, FIN_ROWS, num_stages=1):
        rows = r0 + tl.arange(0, FIN_ROWS)
        s_acc += tl.load(red_ptr + rows.to(tl.int64)[:, None] * c_out + filt[None, :],
                         mask=(rows < R)[:, None] & o_mask[None, :], other=0.0,
                         cache_modifier=".cg")
    s_o = tl.sum(s_acc, axis=0)
    inv_rw = 1.0 / tl.load(rw_ptr + filt, mask=o_mask, other=1.0)
    corr = s_o * inv_rw * inv_rw
    split_elems = KH * KW * c_out * cg_in   # one split's partials
    for c in tl.range(0, BLOCK_CI // FIN_COLS, num_stages=1):
        cols = col0 + c * FIN_COLS + tl.arange(0, FIN_COLS)
        if FLAT_K:
            col_tap = cols // cg_in
            ci = cols - col_tap * cg_in
            col_ok = cols < KH * KW * cg_in
        else:
            col_tap = tap + tl.zeros((FIN_COLS,), dtype=tl.int32)
            ci = cols
            col_ok = cols < cg_in
        mask = o_mask[:, None] & col_ok[None, :]
        r = col_tap // KW
        s = col_tap - r * KW
        acc = tl.zeros((BLOCK_O, FIN_COLS), dtype=tl.float32)
        tile_ptrs = part_ptr + ((col_tap[None, :] * c_out + filt[:, None]).to(tl.int64) * cg_in
                                + ci[None, :])
        # SPLIT_STEP splits' loads in flight at once (a round trip to L2 a step, not a split),
        # added in split order: the bits of one split at a time (past n_split: + 0)
        for s0 in tl.range(0, n_split, SPLIT_STEP, num_stages=1):
            for j in tl.static_range(SPLIT_STEP):
                split = s0 + j
                # (the split's bound as a vector: a scalar predicate in a mask trips the
                # interpreter; uniform either way on the GPU)
                in_split = (split + tl.zeros((FIN_COLS,), dtype=tl.int32)) < n_split
                acc += tl.load(tile_ptrs + split.to(tl.int64) * split_elems,
                               mask=mask & in_split[None, :], other=0.0, cache_modifier=".cg")
        wv = tl.load(w_ptr + filt[:, None] * stride_wo + (ci * stride_wc + r * stride_wh
                                                          + s * stride_ww)[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        dw = acc * inv_rw[:, None] - wv * corr[:, None]
        tl.store(dw_ptr + filt[:, None] * stride_dwo + (ci * stride_dwc + r * stride_dwh
                                                        + s * stride_dww)[None, :],
                 to_dtype_of(dw, dw_ptr, EMULATE_RTNE), mask=mask)


@triton.jit(noinline=True)
def count_and_finish_wgrad_tile(cnt_ptr, tile, part_ptr, red_ptr, w_ptr, rw_ptr, dw_ptr, g, o0,
                                col0, tap, c_out, cg_in, cg_out, n_split, R,
                                stride_wo, stride_wc, stride_wh, stride_ww,
                                stride_dwo, stride_dwc, stride_dwh, stride_dww,
                                KH: tl.constexpr, KW: tl.constexpr, FLAT_K: tl.constexpr,
                                EMULATE_RTNE: tl.constexpr, BLOCK_O: tl.constexpr,
                                BLOCK_CI: tl.constexpr):
    """After a wgrad program has stored its partial of tile ``tile``: count it on cnt_ptr
    [tiles] int32 (zeroed by the prep launch), and the program whose count completes the tile's
    n_split -- whichever split runs last -- finishes it (:func:`finish_wgrad_tile`): the
    finalize without a launch of its own, the same bits whatever order the programs ran in.
    The barrier puts every thread's partial store before the count; the count is a release
    (those stores visible to whoever acquires it) and an acquire (the other splits' partials
    visible to the finishing program), the threadfence-reduction pattern of CUDA's samples."""
    tl.debug_barrier()
    if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == n_split - 1:
        finish_wgrad_tile(part_ptr, red_ptr, w_ptr, rw_ptr, dw_ptr, g, o0, col0, tap,
                          c_out, cg_in, cg_out, n_split, R,
                          stride_wo, stride_wc, stride_wh, stride_ww,
                          stride_dwo, stride_dwc, stride_dwh, stride_dww,
                          KH, KW, FLAT_K, EMULATE_RTNE, BLOCK_O, BLOCK_CI)


# ---------------------------------------------------------------------------------------------
# Configs (fixed per shape: no autotuning, so that results never depend on timing noise and
# torch.compile sees plain launches)
# ---------------------------------------------------------------------------------------------

def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _next_pow2(max(int(v), 1))))


def dgrad_config(cg_in: int, cg_out: int, dtype: torch.dtype) -> dict:
    """Tiles for _dgrad_kernel. 128 input pixels x up to 128 input channels: one Hopper
    warpgroup (num_warps=4) holds the fp32 accumulator in 128 registers/thread; BLOCK_K 64
    (16-bit) = 128-byte rows for the swizzled shared-memory operands; fp32 operands take
    BLOCK_K 32 so 3 stages stay within shared memory. Never 8 warps (non-1x1 implicit GEMM)."""
    if dtype == torch.float32:  # 128x128 fp32 spills (~850 B of stack, sm_90): halve N
        return dict(BLOCK_M=128, BLOCK_N=_pow2_clamp(cg_in, 16, 64), BLOCK_K=_pow2_clamp(cg_out, 16, 32),
                    num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=_pow2_clamp(cg_in, 16, 128), BLOCK_K=_pow2_clamp(cg_out, 16, 64),
                num_warps=4, num_stages=3)


def wgrad_config(cg_in: int, cg_out: int, dtype: torch.dtype, taps: int = 1) -> dict:
    """Tiles for _wgrad_kernel: up to 128x128 (o x ci) per program per tap, reducing over 64
    (16-bit) or 32 (fp32) output pixels per step with 3 pipeline stages. Below 16 input
    channels a group the flat layout (FLAT_K): the columns run over the ``taps`` * C_in/G
    filter positions together, up to 64 (fp32: 32) -- every lane of the gathered x tile
    computes its own address: at 128 columns the 16-bit build took 255 registers and spilled
    256 B a thread (sm_90, 3 -> 64 channels, 5x5), at 64 about 170 and nothing."""
    block_m = 32 if dtype == torch.float32 else 64
    flat = cg_in < 16
    block_ci = (_pow2_clamp(taps * cg_in, 16, 32 if dtype == torch.float32 else 64) if flat
                else _pow2_clamp(cg_in, 16, 128))
    return dict(BLOCK_O=_pow2_clamp(cg_out, 16, 128), BLOCK_CI=block_ci, BLOCK_M=block_m,
                FLAT_K=flat, num_warps=4, num_stages=3)


def depthwise_config(kernel: str, interpreter: Optional[bool] = None, taps: int = 9,
                     rows: bool = False, pix_group: int = 1) -> dict:
    """Tiles of the pure depthwise backward kernels (``kernel`` "prep" or "grad"): elementwise
    work over [pixels x channels] tiles, channels contiguous in Hn, A and channels_last x, 4
    elements a thread. Registers and SASS (AOT compiles at several tiles, sm_90, bf16, triton
    3.9): the prep pass (32 x 32, 8 warps) unrolls its KH*KW window loads, 104-122 registers
    against 194-204 at 32 x 64 and 255 plus spills at 64 x 64. The grad kernel unrolls its
    taps too (every tap's Hn and A loads in flight, a weight-gradient accumulator a tap): 16 x
    32 with 4 warps, 144 registers -- three CTAs, 12 warps an SM -- and 487 SASS instructions
    a 16-pixel step (3x3, stride 1), as many an element as 32 x 32 with 8 warps (479 a 32-pixel
    step, 167 registers, one CTA an SM). The rolled-tap build it replaced took 1512 a 32-pixel
    step at 64 registers, and a kernel this simple is bound by issuing them (edge.depthwise,
    64x256x28x28: ~145 us of issue at full rate for the old build, 417 us measured for the whole
    backward, H200 20261127-1606). Under the interpreter: small tiles, so the test shapes still
    cover several tiles and their masks (``interpreter`` None: whether it runs now). The prep
    pass takes several pixel tiles a program (ROW_BLOCKS) only for filters of at most
    MAX_CACHED_TAPS ``taps`` (KH*KW), whose columns stay cached (conv_fwd.prune_dw_configs).

    ``rows``: tiles for NCHW x (row tiles, lanes along the pixels: conv_fwd.
    depthwise_pixel_tile), where a thread holds one pixel of several channels, so the channel
    tile narrows to 16 at the same 4 elements a thread: the prep pass 32 x 16 x 4 row blocks
    with 4 warps (157 registers linear, 185 sigmoid; 64 x 16 x 2 took 255 with sigmoid), the
    grad kernel 32 x 16 with 4 warps (168 registers, three CTAs an SM as channels_last's).

    ``pix_group`` (grad only; the launcher asks for 2 at stride 1 where conv_fwd.
    pixel_groups_fit): the grad kernel takes its input pixels in groups of that many side by
    side (_depthwise_grad_group), a tile of 16 groups x 32 channels on a GPU -- as many
    channels and rows a thread as the single-pixel tile -- and of 32 pixels under the
    interpreter. SASS of the tile loop an element (sm_90, bf16, 3x3 channels_last): single
    pixels 122.8 at 148 registers, pairs 82.4 at 168 -- three CTAs an SM either way; fours
    87.9 over 8 groups (145 registers), 66.2 over 16 but at 240 registers (two CTAs)."""
    if kernel not in ("prep", "grad"):
        raise ValueError(f"kernel must be 'prep' or 'grad', got {kernel!r}")
    interpreted = _interpreting() if interpreter is None else interpreter
    if kernel == "grad":
        if interpreted:
            return dict(BLOCK_M=32, BLOCK_C=16, num_warps=4, PIX_GROUP=pix_group)
        return dict(BLOCK_M=(32 if rows else 16) * pix_group, BLOCK_C=16 if rows else 32,
                    num_warps=4, PIX_GROUP=pix_group)
    if interpreted:
        cfg = dict(BLOCK_M=32, BLOCK_C=16, num_warps=4, ROW_BLOCKS=2)
    elif rows:
        cfg = dict(BLOCK_M=32, BLOCK_C=16, num_warps=4, ROW_BLOCKS=4)
    else:
        cfg = dict(BLOCK_M=32, BLOCK_C=32, num_warps=8, ROW_BLOCKS=4)
    if taps > MAX_CACHED_TAPS:
        cfg["ROW_BLOCKS"] = 1
    return cfg


def prep_config(operator: str, from_output: bool = False) -> dict:
    """Tiles for _prep_kernel (memory-bound). The sigmoid epilogue (arccos + several exp per
    element) needs ~220 registers/thread at 16 elements/thread and spills beyond: 32x32 keeps
    it at ~160 with no spill; the light operators take 64x64 (wider channels_last rows, half
    the partial-sum rows) -- except the linear operator from the saved output (its angle
    recovered from y: sin and cos per element), which at 64x64 spilled 120 B a thread (bf16,
    sm_90, make aot-check) and at 32x64 takes ~120 registers and spills nothing."""
    if operator == "sigmoid":
        return dict(BLOCK_M=32, BLOCK_C=32, num_warps=4)
    if operator == "linear" and from_output:
        return dict(BLOCK_M=32, BLOCK_C=64, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_C=64, num_warps=4)


def filter_norm_config(n_f: int) -> dict:
    """Tiles of the filter programs of the prep launch (_filter_norm_block) for filters of
    ``n_f = C_in/G * KH * KW`` elements. They run at the prep kernel's num_warps (4 for every
    prep_config), so their tile is sized for 4 warps.

    The filter work is latency-bound: each loop step is a dependent round trip to memory, done
    twice (norm, then w_hat). Fixed 4 x 512 tiles took 22 us a call on average on the H200 as a
    kernel of their own (SphereResNet-32 profile, 20261127-1339; the work is a few us of
    bandwidth), 3-7 steps a pass for 3x3 filters of 128-384 channels. So: a whole filter per
    step up to 2048 elements (one step a pass), several filters a program while they are small
    (2048 elements a program, at most 128 filters) -- 16 fp32 values a thread per array at 4
    warps, what the separate kernel had at its widest (4096 at 8 warps).

    Why not 4096 wide at 4 warps (one step a pass up to 3x3 x 455 channels): the merged kernel
    gets one register allocation for both kinds of program, and 32 values a thread per array
    raised it above the prep's own (make aot-check, triton 3.9, 3x3 filters): the sigmoid prep
    took 168 registers on sm_90 in every dtype and 159 / 202 / 198 on sm_80 (fp32 / fp16 /
    bf16), against 125 / 155 / 159 and 128 / 161 / 162 with the 2048-wide tile -- 2 instead of 3
    blocks of 4 warps an SM on sm_80 in 16-bit; the linear-from-output prep 226 on sm_80 in
    fp32. With at most 2048 elements a program the merged kernels stay within a few registers
    of the prep pass alone and spill nothing (docs/aot_table.md, conv_bwd_prep_*; the fp32
    channelwise prep with its 64 x 32 filter tile takes 146 against 138 / 128 alone). Up to
    2048 elements these are the separate kernel's 4-warp tiles, so those filters' sums are
    bitwise unchanged; longer filters (3x3 with 228+ input channels a group) take two or more
    steps a pass, which moves some of their fp32 norms by one ulp against the one-step 8-warp
    tile. The filter programs come first in the grid, so their loops overlap the prep's."""
    block_f = _pow2_clamp(n_f, 16, 2048)
    block_o = max(1, min(128, 2048 // block_f))
    return dict(BLOCK_O=block_o, BLOCK_F=block_f)


# 512 rows per first-level program (8 steps of 64): ~25 programs for a 64x56x56 batch
REDUCE_CONFIG = dict(BLOCK_R=64, BLOCK_C=32, ROWS_PER_PROGRAM=512, num_warps=4)
FINALIZE_CONFIG = dict(BLOCK=256, SPLIT_BLOCK=16, num_warps=4)
# the prep launch's input tiles (staged input for the wgrad): BLOCK_P pixels of an image x at
# most BLOCK_C channels a step, as the forward's preparation launch
STAGE_CONFIG = dict(BLOCK_P=64, BLOCK_C=64)


def _wgrad_split(m_out: int, base_programs: int, block_m: int, device: torch.device) -> int:
    """Number of contiguous reduction ranges for wgrad: enough programs to fill the GPU
    (about 2 per SM), each range at least 8 reduction steps long so the partials traffic stays
    small next to the GEMM. Two per SM: a 128x128 program holds ~250 registers/thread and
    ~97 KB of shared memory, so two fit at once; more splits only add partial traffic.
    Under the interpreter: up to 3, so the split path is always tested."""
    steps = _cdiv(m_out, block_m)
    if device.type != "cuda":
        return max(1, min(3, steps))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = _cdiv(2 * sms, max(base_programs, 1))
    return max(1, min(want, steps // 8, 256))


def even_ranges(total: int, ranges: int, block: int = 1):
    """``(ranges, per_range)``: ``total`` items cut into at most ``ranges`` contiguous ranges
    of ``per_range`` items, a multiple of ``block`` (the last range shorter), none empty --
    how a split reduction's programs share its rows."""
    per_range = _cdiv(_cdiv(total, ranges), block) * block
    return _cdiv(total, per_range), per_range


def _wgrad_layout(cg_in: int, cg_out: int, groups: int, taps: int, m_out: int,
                  dtype: torch.dtype, device: torch.device) -> dict:
    """The implicit-GEMM wgrad's launch shape: its tile ``cfg`` (wgrad_config), the GEMM part
    of its ``grid`` (axis 0 filter x column blocks, axis 1 taps or flat column blocks, axis 2
    splits x groups; the launcher adds the folded reduction's slices), ``split`` ranges of
    ``m_per_split`` output pixels (a multiple of BLOCK_M; _wgrad_split) and ``tiles`` = the
    (group, axis 0, axis 1) tiles that each sum ``split`` partials (one counter each with
    FINISH_DW)."""
    cfg = wgrad_config(cg_in, cg_out, dtype, taps)
    if cfg["FLAT_K"]:   # program axis 1: blocks of the flattened (tap, ci) axis
        grid_ci, grid_k = 1, _cdiv(taps * cg_in, cfg["BLOCK_CI"])
    else:
        grid_ci, grid_k = _cdiv(cg_in, cfg["BLOCK_CI"]), taps
    per_group = _cdiv(cg_out, cfg["BLOCK_O"]) * grid_ci * grid_k
    split, m_per_split = even_ranges(m_out, _wgrad_split(m_out, groups * per_group,
                                                         cfg["BLOCK_M"], device),
                                     cfg["BLOCK_M"])
    return dict(cfg=cfg, grid=(per_group // grid_k, grid_k, split * groups), split=split,
                m_per_split=m_per_split, tiles=groups * per_group)


def _depthwise_split(steps: int, c_tiles: int, device: torch.device) -> int:
    """Pixel ranges of the depthwise grad kernel when it also sums the weight-gradient
    partials: about three programs per SM in all (as many 4-warp, 144-register programs as an
    SM holds at once: one wave of equal ranges), each at least four tiles long, at most 512
    ranges (the finalize sums them 16 at a time). Under the interpreter up to 3, as
    _wgrad_split."""
    if device.type != "cuda":
        return max(1, min(3, steps))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(_cdiv(3 * sms, max(c_tiles, 1)), steps // 4, 512))


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------

def _launch(kernel, grid, args, memo=None, **kwargs):
    launch(kernel, grid, args, kwargs, "sphere_conv2d_bwd", memo)


# "auto" (the rule of _wgrad_runtime_div), or True / False to force it (bench.wgrad_probe)
_WGRAD_RUNTIME_DIV = "auto"

# The depthwise grad kernel's pairs of input pixels (depthwise_config), on unless
# SPHEREOPS_DW_PIXEL_PAIRS=0: fewer instructions an element, more registers -- one CTA an SM
# fewer under triton 3.6 -- and not yet timed on a GPU, so a switch for the A/B.
DW_PIXEL_PAIRS = env_switch("SPHEREOPS_DW_PIXEL_PAIRS", True)

# The implicit-GEMM wgrad finishes dw itself (FINISH_DW: the last split of each tile, counted
# on counters the prep zeroes) instead of a _dw_finalize_kernel launch after it, unless
# SPHEREOPS_WGRAD_WRITES_DW=0: one launch fewer a backward, not yet timed on a GPU, so a
# switch for the A/B (and bench.wgrad_probe turns it off to read the partials).
WGRAD_WRITES_DW = env_switch("SPHEREOPS_WGRAD_WRITES_DW", True)


# A big batch's first reduction level rides in the dgrad launch (when there is a dgrad and a
# wgrad) instead of a _reduce_partials_kernel launch of its own, unless
# SPHEREOPS_DGRAD_REDUCES=0: one launch fewer, bitwise the same sums, not yet timed on a GPU.
DGRAD_REDUCES = env_switch("SPHEREOPS_DGRAD_REDUCES", True)


# The most splits whose partials the finishing program of a wgrad tile sums (_finish_dw_in_wgrad)
WGRAD_FINISH_MAX_SPLIT = 8


def _finish_dw_in_wgrad(split: int, wide: bool) -> bool:
    """Whether the implicit-GEMM wgrad finishes dw itself (FINISH_DW) rather than leaving it to a
    _dw_finalize_kernel launch, given its ``split`` count and int64 offsets (``wide``). The
    finishing program of a tile reads its ``split`` partials alone, one SM's worth of bandwidth
    at the end of the launch: at up to WGRAD_FINISH_MAX_SPLIT splits (two a round trip to L2,
    4 column chunks: <= 16 round trips, a few us) that tail is about what the separate launch
    costs in device time and saves the launch's host time; a 1x1 layer with few tiles takes up
    to 256 splits (r50.l1_reduce: 132, 4 MB a tile), where the whole-GPU finalize is the faster
    way. Not with int64 offsets either: the finishing code's registers cost their K loop ~8%
    more instructions (sm_90 bf16, 616 -> 664) on a wgrad whose size dwarfs a launch."""
    return split <= WGRAD_FINISH_MAX_SPLIT and not wide


def _wgrad_runtime_div(c_out: int) -> bool:
    """Whether _wgrad_kernel divides pixel indices by runtime Ho*Wo and Wo (RUNTIME_DIV).

    On an H200 (triton 3.6; bench.wgrad_probe, 20261127-1540) the constexpr-divisor build gave a
    wrong dw -- every tap, channel and split, relative error 1.4 -- for 37x29x33x33 -> 61
    (bf16/fp16/tf32 alike) while the interpreter is right. The typed IR of the failing build is
    the one of a 32x32 image that is right, up to the divisor constants, so the fault sits in
    the lowering of the index arithmetic; the failure needed C_out and C_in both off a multiple
    of 16 (unaligned Hn rows and channels_last x rows) with a 64x32 or 64x64 tile. Runtime
    divisors compile to other code (no magic-number division). Taken when C_out is not a
    multiple of 16 -- shapes where the slower division costs little; common layers keep the
    constant divisors."""
    if _WGRAD_RUNTIME_DIV != "auto":
        return bool(_WGRAD_RUNTIME_DIV)
    return c_out % 16 != 0


def _needs_wide_offsets(x, hn_numel: int, kernel, padding, dilation) -> bool:
    """Whether the dgrad / wgrad main loops need int64 offsets: Hn's element count (dgrad's Hn
    and A rows; A has no more elements than Hn) or x's whole span (wgrad's rows run across
    samples), plus the window's reach into the padding for masked lanes, doubled for safety,
    against 2^31 (``launch.offsets_need_int64``)."""
    return offsets_need_int64(x, 0, kernel, padding, dilation, hn_numel)


def _dense_pixel_rows(x) -> bool:
    """Whether pixel (n, h, w) of x [N, C, H, W] lies at ((n*H + h)*W + w) * x.stride(3): rows
    and images back to back (channels_last contiguous, or its staged copy) -- _wgrad_kernel's
    DENSE_ROWS. Size-1 dims do not count."""
    n, _, h, w = x.shape
    return ((h == 1 or x.stride(2) == w * x.stride(3))
            and (n == 1 or x.stride(0) == h * w * x.stride(3)))


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not _interpreting():
        return "tf32"
    return "ieee"


def _pair(v, name: str) -> Tuple[int, int]:
    # fast path first (every backward passes three pairs; the generic checks cost ~2 us each)
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(e, int) and not isinstance(e, bool) for e in v)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(v[0]), int(v[1])


def _check_tensor(t, name: str, ndim: int):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def sphere_conv2d_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, k: Optional[torch.Tensor],
                      c: torch.Tensor, r_x: torch.Tensor, stride, padding, dilation, groups: int,
                      operator: str, eps: float, output_mask: Sequence[bool] = (True, True, True, True),
                      *, c_scratch: bool = False, saved: str = "cosine",
                      bias: Optional[torch.Tensor] = None, dgrad_grid: Optional[bool] = None,
                      wgrad_grid: Optional[bool] = None):
    """Backward of SphereConv2d (contract: docs/ARCHITECTURE.md, ``conv2d_backward``).

    Args:
        dy: [N, C_out, Ho, Wo] incoming gradient (any layout).
        x: [N, C_in, H, W] the forward input (NCHW or channels_last), fp32/fp16/bf16.
        w: [C_out, C_in/groups, KH, KW] filters, same dtype as x.
        k: None (linear, cosine) or [C_out] sigmoid steepness.
        c, r_x: the saved state of the forward: c [N, C_out, Ho, Wo] (input dtype),
            r_x [N, groups, Ho, Wo] float32. Pure depthwise convs (C_in/G = C_out/G = 1)
            recompute both from x and w and do not read them: their forward returns them
            empty (any tensors of the right dtypes are accepted there).
        stride, padding, dilation: pairs of ints (padding symmetric). groups: int.
        operator: "linear" | "cosine" | "sigmoid". eps: the epsilon of the norms.
        output_mask: (need_dx, need_dw, need_db, need_dk).
        c_scratch: the caller gives up c (its last use): when c is channels_last-contiguous, Hn
            (the same [N*Ho*Wo, C_out] order and dtype) is written over it instead of into a
            fresh output-sized buffer. The prep pass reads each element of c before it writes
            Hn there, in the same program, and no later kernel reads c.
        saved: what ``c`` holds: "cosine" or "output" (the forward's y, with ``bias`` the bias
            that went into it; linear and cosine operators; y is never written).
        dgrad_grid, wgrad_grid: None (the default: conv_bwd_grid.ENABLED / WGRAD_ENABLED,
            SPHEREOPS_DGRAD_GRID=1 / SPHEREOPS_WGRAD_GRID=1, for plain launches), True / False to
            ask for the TMA dgrad / wgrad on padded grids or to keep the implicit-GEMM
            kernels (tests); asked for, they still run only where
            conv_bwd_grid.grid_backward_applies.

    Returns:
        (dx, dw, db, dk): dx like x (same memory format), dw like w, db [C_out] in w's dtype,
        dk [C_out] in k's dtype (sigmoid only); a gradient not needed is None.
    """
    from sphereops.reference import saved_state_mode  # its single source

    for t, name, nd in ((dy, "dy", 4), (x, "x", 4), (w, "w", 4), (c, "c", 4), (r_x, "r_x", 4)):
        if name in ("c", "r_x") and isinstance(t, torch.Tensor) and t.numel() == 0:
            continue   # a pure depthwise forward's (empty) state; shapes are checked below
        _check_tensor(t, name, nd)
    if operator not in OPERATOR_CODES:
        raise ValueError(f"operator must be one of {tuple(OPERATOR_CODES)}, got {operator!r}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    for t, name in ((w, "w"), (dy, "dy"), (c, "c")):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if r_x.dtype != torch.float32:
        raise TypeError(f"r_x must be float32, got {r_x.dtype}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw_ = _pair(dilation, "dilation")
    if sh < 1 or sw < 1:
        raise ValueError(f"stride must be positive, got {stride!r}")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    if dh < 1 or dw_ < 1:
        raise ValueError(f"dilation must be positive, got {dilation!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    from_output, c_scratch = saved_state_mode(saved, operator, c_scratch)
    if from_output and bias is not None and (not isinstance(bias, torch.Tensor)
                                             or tuple(bias.shape) != (w.shape[0],)
                                             or bias.device != x.device):
        raise ValueError(f"bias must be a [C_out={w.shape[0]}] tensor on {x.device}")
    if len(output_mask) != 4:
        raise ValueError(f"output_mask must have 4 entries, got {output_mask!r}")
    need_dx, need_dw, need_db, need_dk = (bool(v) for v in output_mask)

    n, c_in, h, wd = x.shape
    c_out, cg_in, kh, kw = w.shape
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide C_in={c_in} and C_out={c_out}")
    if cg_in != c_in // groups:
        raise ValueError(f"w must have C_in/groups={c_in // groups} input channels, got {cg_in}")
    cg_out = c_out // groups
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw_ * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"x of spatial size {(h, wd)} is too small for the filter/padding/dilation")
    if tuple(dy.shape) != (n, c_out, ho, wo):
        raise ValueError(f"dy must have shape {(n, c_out, ho, wo)}, got {tuple(dy.shape)}")
    # Pure depthwise (one channel in and out per group): elementwise kernels instead of GEMMs,
    # and c and r_x recomputed from x and w (the forward saves neither): not read, may be empty
    depthwise = cg_in == 1 and cg_out == 1
    if not depthwise and tuple(c.shape) != (n, c_out, ho, wo):
        raise ValueError(f"c must have shape {(n, c_out, ho, wo)}, got {tuple(c.shape)}")
    if not depthwise and tuple(r_x.shape) != (n, groups, ho, wo):
        raise ValueError(f"r_x must have shape {(n, groups, ho, wo)}, got {tuple(r_x.shape)}")
    if operator == "sigmoid":
        if not isinstance(k, torch.Tensor) or k.dim() != 1 or k.shape[0] != c_out:
            raise ValueError(f"k must be a [C_out={c_out}] tensor for the sigmoid operator")
        if not k.is_floating_point():
            raise TypeError(f"k must be a floating tensor, got {k.dtype}")
    for t, name in ((dy, "dy"), (w, "w"), (c, "c"), (r_x, "r_x")) + (((k, "k"),) if operator == "sigmoid" else ()):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    interpreting = _interpreting()
    if x.device.type != "cuda" and not _launch_module.cpu_launches():
        raise ValueError("sphere_conv2d_bwd needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    m_out = n * ho * wo
    if max(m_out, n * h * wd) > MAX_PIXELS:
        raise ValueError(f"N*Ho*Wo = {m_out} output and N*H*W = {n * h * wd} input pixels: more "
                         f"than the kernels' int32 pixel indices take ({MAX_PIXELS} = 2^31 - "
                         "4097); split the batch")

    need_dk = need_dk and operator == "sigmoid"
    need_grads = need_dx or need_dw
    dev, dtype = x.device, x.dtype
    dx = dw = db = dk = None
    if not (need_grads or need_db or need_dk):
        return dx, dw, db, dk
    if m_out == 0:  # empty batch: every sum is empty (dw = -w * 0 / r_w^2 = 0)
        return (torch.zeros_like(x) if need_dx else None, torch.zeros_like(w) if need_dw else None,
                torch.zeros(c_out, device=dev, dtype=w.dtype) if need_db else None,
                torch.zeros(c_out, device=dev, dtype=k.dtype) if need_dk else None)

    upcast = interpreting and dtype != torch.float32
    rtne = interpreting
    geometry = dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw_)
    if depthwise:
        return _depthwise_backward(dy, x, w, k, operator, eps, (need_dx, need_dw, need_db, need_dk),
                                   ho, wo, geometry, rtne)
    r_x = r_x.contiguous()
    k_arg = k if operator == "sigmoid" else r_x  # never read unless sigmoid
    has_bias = from_output and bias is not None
    # the dgrad / wgrad on padded grids (conv_bwd_grid), asked for
    if need_grads and cg_out > 1:
        if dgrad_grid is None:
            dgrad_grid = conv_bwd_grid().ENABLED and plain_launch(x)
        if wgrad_grid is None:
            wgrad_grid = conv_bwd_grid().WGRAD_ENABLED and plain_launch(x)
        grid_asked = bool((dgrad_grid and need_dx) or (wgrad_grid and need_dw))
    else:
        grid_asked = False
    need = (need_dx, need_dw, need_db, need_dk)
    plan_args = (dy, x, w, k, c, ((sh, sw), (ph, pw), (dh, dw_)), groups, operator, float(eps),
                 need, c_scratch, from_output, has_bias, interpreting,
                 bool(dgrad_grid), bool(wgrad_grid))
    if grid_asked:   # the grid paths (A/B, tests) plan afresh each call
        p = _backward_plan(*plan_args)
    else:
        # every module switch and replaceable helper the plan reads is in the key
        key = (tensor_key(dy), tensor_key(x), tensor_key(w), tensor_key(k), tensor_key(c),
               plan_args[5:14], dtype == torch.float32 and torch.backends.cudnn.allow_tf32,
               _conv_fwd._STAGE_INPUT, _needs_wide_offsets, _wgrad_split, wgrad_config,
               dgrad_config, _fold_reduction, _finish_dw_in_wgrad, WGRAD_WRITES_DW,
               WGRAD_FINISH_MAX_SPLIT, DGRAD_REDUCES, _WGRAD_RUNTIME_DIV)
        p = _BACKWARD_PLANS.get(key, _backward_plan, *plan_args)

    # 1. the prep launch: the elementwise pass over dy and c and, in the same grid, the filter
    # norms (and the unit filters for the dgrad) when dx or dw is asked
    if need_grads:
        r_w = torch.empty(c_out, device=dev, dtype=torch.float32)
        # the grid dgrad's per-group rows padded to cgo_p: zeros there
        w_hat = (torch.zeros if p.what_padded else torch.empty)(p.w_hat_shape, device=dev,
                                                                dtype=dtype)
    else:  # no filter programs: their stores compile away (NORM_FILTERS), any input will do
        r_w, w_hat = r_x, w
    if p.grid_dgrad or p.grid_wgrad:
        hn = conv_bwd_grid().hn_grid_buffer(n, ho, wo, p.hn_margins, groups * p.cgo_p, dtype,
                                            dev)
    elif p.hn_over_c:
        hn = c.permute(0, 2, 3, 1).view(m_out, c_out)
    else:
        hn = torch.empty(p.hn_shape, device=dev, dtype=dtype)
    x_staged, x_grid, stage_grid, prep_flags = None, None, False, p.prep_flags
    # the input tiles of the prep launch: (programs, slack, channels, planes, plane width)
    staging = p.staging
    if p.stage_x:   # [N, H, W, G*cgi_p] viewed as [N, G*cgi_p, H, W] (channels_last strides)
        x_staged = torch.empty(p.x_staged_shape, device=dev, dtype=dtype).permute(0, 3, 1, 2)
    elif p.grid_wgrad:   # x onto its padded grid (conv_bwd_grid.x_grid_buffer), in this launch
        x_grid, x_grid_slack, stage_grid = conv_bwd_grid().x_grid_buffer(
            x, groups, (ho, wo), p.hn_margins, (kh, kw), (sh, sw), (ph, pw))
        if stage_grid:
            planes_h, planes_w = phase_planes((kh, kw), (sh, sw))
            stage_cp = x_grid.shape[1] // groups
            staging = (_cdiv(x_grid.shape[0], STAGE_CONFIG["BLOCK_P"]), x_grid_slack, stage_cp,
                       planes_h * planes_w, planes_w)
            prep_flags = dict(prep_flags, STAGE_GRID=True, GRID_SH=sh, GRID_SW=sw,
                              BLOCK_CX=_pow2_clamp(stage_cp, 16, STAGE_CONFIG["BLOCK_C"]))
        else:
            x_grid_slack = 0
    if p.grid_wgrad:
        counters = conv_bwd_grid().wgrad_tile_counters(cg_in, cg_out, groups, kh * kw, dev)
    elif p.finish_dw:
        counters = torch.empty(p.wgrad["tiles"], device=dev, dtype=torch.int32)
    else:
        counters = None
    a_buf = torch.empty(p.a_shape, device=dev, dtype=torch.float32)
    partials = torch.empty(p.partials_shape, device=dev, dtype=torch.float32)
    prep_in = (dy, c, r_x, k_arg, bias.contiguous() if has_bias else r_x, hn, a_buf, partials,
               w, r_w, w_hat)
    if cg_out == 1:   # one channel per group: tiles across the groups (_channelwise_prep_kernel)
        _launch(_channelwise_prep_kernel, p.prep_grid, prep_in + p.prep_scalars, p.prep_launch,
                **prep_flags)
    else:
        # the staged copy's place without staging: any output (never stored through)
        x_out = x_staged if p.stage_x else x_grid if stage_grid else partials
        _launch(_prep_kernel, (p.prep_grid[0] + staging[0], groups),
                prep_in + (x, x_out) + p.prep_scalars + (staging[0], staging[1], staging[2],
                                                         ph, pw, staging[3], staging[4],
                                                         counters if counters is not None
                                                         else partials,
                                                         0 if counters is None
                                                         else counters.numel()),
                p.prep_launch, **prep_flags)

    # 2. deterministic sums of the partials; the final level rides in the wgrad launch (step 4),
    # and a first level (big batches) in the implicit-GEMM dgrad's when there is one (step 3)
    s_sum, db, dk, red_level, red_rows = _reduce_column_partials(
        partials, p.r_rows, w, k, need_dw, need_db, need_dk, rtne, final=not p.fold,
        launch_first=p.first_programs == 0, memos=p.reduce_launches)

    x_wgrad = x_staged if p.stage_x else x
    # 3. dgrad fused with the norm correction
    if p.grid_dgrad:
        dx = torch.empty_like(x)  # preserves NCHW / channels_last
        conv_bwd_grid().grid_dgrad(hn, w_hat, a_buf, x, dx, (sh, sw), (ph, pw), (dh, dw_),
                                   p.hn_margins, dict(UPCAST_DOT=upcast, EMULATE_RTNE=rtne,
                                                      PIXELS_FAST=pixels_fast(dx)))
    elif need_dx:
        # torch.empty_like(x)'s strides (NCHW / channels_last preserved), planned
        dx = torch.empty_strided(x.shape, p.dx_strides, device=dev, dtype=dtype)
        _launch(_dgrad_kernel, p.dgrad_grid,
                (hn, w_hat, a_buf, x, dx, partials, red_level) + p.dgrad_scalars,
                p.dgrad_launch, **p.dgrad_flags)

    # 4. wgrad: split reduction into fp32 partials, then the ordered finalize pass
    # the folded reduction's operands and switches (either wgrad launch)
    reduction = (red_level, s_sum, db if need_db else s_sum, dk if need_dk else s_sum, red_rows)
    if p.grid_wgrad:   # one launch: the last split of each tile writes dw
        dw = conv_bwd_grid().grid_wgrad(
            hn, x_grid, x_grid_slack, x, w, r_w, counters, groups, (ho, wo), p.hn_margins,
            (sh, sw), (dh, dw_), upcast, reduction, dict(p.reduction_flags))
    elif need_dw:
        w_part = torch.empty(p.w_part_shape, device=dev, dtype=torch.float32)
        dw = torch.empty_like(w) if p.finish_dw else None
        # unread without FINISH_DW: stand-ins that are not op inputs written
        finish_args = ((counters, w, r_w, dw, *w.stride(), *dw.stride()) if p.finish_dw
                       else (w_part, w_part, w_part, w_part) + (0,) * 8)
        _launch(_wgrad_kernel, p.wgrad_grid,
                (hn, x_wgrad, w_part) + reduction[:4] + finish_args[:4] + p.wgrad_scalars
                + (red_rows, p.wgrad_reduce_programs, *x_wgrad.stride(), ho * wo, wo)
                + finish_args[4:],
                p.wgrad_launch, **p.wgrad_flags)
        if not p.finish_dw:
            dw = _finalize_dw(w_part, w, r_w, s_sum, p.wgrad["split"], rtne, p.finalize_launch)

    return dx, dw, db, dk


# the backward's launch plans by call signature (kernels/plans.py)
_BACKWARD_PLANS = PlanCache("sphere_conv2d_bwd")


def _backward_plan(dy, x, w, k, c, conv, groups, operator, eps, need, c_scratch, from_output,
                   has_bias, interpreting, dgrad_grid, wgrad_grid):
    """The GEMM backward's plan (kernels/plans.py) for validated arguments: which paths run, the
    buffers' shapes, every launch's grid, constexprs and integer arguments that do not depend
    on what is allocated when the plan runs. Reads only metadata, the options and module
    switches (listed in the launcher's cache key)."""
    from sphereops.reference import ARCCOS_DELTA  # its single source

    (sh, sw), (ph, pw), (dh, dw_) = conv
    need_dx, need_dw, need_db, need_dk = need
    n, c_in, h, wd = x.shape
    c_out, cg_in, kh, kw = w.shape
    cg_out = c_out // groups
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw_ * (kw - 1) - 1) // sw + 1
    m_out = n * ho * wo
    need_grads = need_dx or need_dw
    dtype = x.dtype
    upcast = interpreting and dtype != torch.float32
    rtne = interpreting
    precision = _dot_precision(dtype)
    geometry = dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw_)
    # the launch sites' memos (plans.LaunchMemo): kept plans call the compiled kernels directly
    p = SimpleNamespace(prep_launch=LaunchMemo(), dgrad_launch=LaunchMemo(),
                        wgrad_launch=LaunchMemo(), finalize_launch=LaunchMemo(),
                        reduce_launches=(LaunchMemo(), LaunchMemo()))
    # Aligned GEMM operands (conv_fwd.aligned_count / staged_channels): Hn's group columns and
    # w_hat's rows get cgo_p / cgi_p elements (a multiple of 16 from 16 channels up), and an
    # input not in the fast layout (NCHW, C_in/G not a multiple of 16) is staged for the wgrad
    # by the prep launch. Otherwise the 5x5 bf16 loops of a 29 -> 61 channel conv are
    # 1443 (dgrad, 376 B of spills) and 1132 (wgrad) SASS instructions a step, 302 and 195
    # aligned (sm_90, triton 3.9). The channelwise path (C_out/G = 1) keeps its layout.
    if cg_out > 1:
        cgo_p, cgi_p = aligned_count(cg_out), aligned_count(cg_in)
    else:
        cgo_p, cgi_p = cg_out, cg_in
    p.cgo_p = cgo_p
    # the dgrad / wgrad on padded grids (conv_bwd_grid): Hn's rows get margins
    grid_dgrad = grid_wgrad = False
    if need_grads and cg_out > 1 and ((dgrad_grid and need_dx) or (wgrad_grid and need_dw)) \
            and conv_bwd_grid().grid_backward_applies(x, w, (ho, wo), (sh, sw), (ph, pw),
                                                      (dh, dw_), cgi_p, cgo_p):
        grid_dgrad, grid_wgrad = dgrad_grid and need_dx, wgrad_grid and need_dw
    p.grid_dgrad, p.grid_wgrad = grid_dgrad, grid_wgrad
    p.hn_margins = ((0, 0) if not (grid_dgrad or grid_wgrad)
                    else conv_bwd_grid().grid_margins((h, wd), (ho, wo), (kh, kw), (sh, sw),
                                                      (ph, pw), (dh, dw_)))
    # the grid dgrad's K boxes must stay in one group's w_hat rows: pad them to cgo_p
    p.what_padded = grid_dgrad and cgo_p != cg_out
    # the wgrad's copy of an input outside the fast layout (the grid wgrad stages its own)
    p.stage_x = stage_x = (cg_out > 1 and need_dw and not grid_wgrad
                           and staged_channels(x, cg_in) > 0)

    cfg = prep_config(operator, from_output)
    p.r_rows = r_rows = _cdiv(m_out, cfg["BLOCK_M"])
    fcfg = filter_norm_config(cg_in * kh * kw)
    if p.what_padded:
        p.w_hat_shape = (kh, kw, groups * cgo_p, cgi_p)
    else:
        p.w_hat_shape = (kh, kw, c_out, cgi_p) if need_dx else (1,)
    w_hat_numel = prod(p.w_hat_shape) if need_grads else w.numel()
    n_filter_programs = _cdiv(c_out, fcfg["BLOCK_O"]) if need_grads else 0
    n_margin_programs = 0
    p.hn_over_c = False
    if grid_dgrad or grid_wgrad:
        top, left = p.hn_margins
        hn_numel = n * (ho + top) * (wo + left) * groups * cgo_p
        n_margin_programs = _cdiv(conv_bwd_grid().hn_margin_rows(n, ho, wo, p.hn_margins),
                                  cfg["BLOCK_M"])
    elif (need_grads and c_scratch and cgo_p == cg_out
            and c.permute(0, 2, 3, 1).is_contiguous()):
        p.hn_over_c, hn_numel = True, m_out * c_out
    else:
        p.hn_shape = (m_out, groups * cgo_p) if need_grads else (1,)
        hn_numel = prod(p.hn_shape)
    stage_p = STAGE_CONFIG["BLOCK_P"]
    # prep's input tiles without the grid wgrad's staging (the launcher's, then)
    p.staging = (n * _cdiv(h * wd, stage_p) if stage_x else 0, 0, cgi_p, 1, 1)
    x_staged = None
    if stage_x:
        p.x_staged_shape = (n, h, wd, groups * cgi_p)
        x_staged = staged_input_meta(x, groups, cgi_p)
    # int64 offsets in the dgrad / wgrad loops (w_hat too: the dgrad's filter offsets are int32
    # unless wide; the wgrad's staged copy has channels x's has not)
    wide = _needs_wide_offsets(x, max(hn_numel, w_hat_numel), (kh, kw), (ph, pw), (dh, dw_))
    if stage_x:
        wide = wide or _needs_wide_offsets(x_staged, 0, (kh, kw), (ph, pw), (dh, dw_))
    # the implicit-GEMM wgrad's tiles and splits (step 4), decided here for its tile counters
    wgrad = None
    if need_dw and not grid_wgrad:
        wgrad = _wgrad_layout(cg_in, cg_out, groups, kh * kw, m_out, dtype, x.device)
    p.wgrad = wgrad
    # the wgrad's tile counters, zeroed by the prep: the grid wgrad's always, the implicit-GEMM
    # one's when it finishes dw itself (WGRAD_WRITES_DW, _finish_dw_in_wgrad)
    p.finish_dw = finish_dw = (wgrad is not None and cg_out > 1 and WGRAD_WRITES_DW
                               and _finish_dw_in_wgrad(wgrad["split"], wide))
    p.a_shape = (n, groups, ho, wo) if need_dx else (1,)
    p.partials_shape = (3, r_rows, c_out)
    prep_flags = dict(OPERATOR=OPERATOR_CODES[operator], DELTA=float(ARCCOS_DELTA),
                      FROM_OUTPUT=from_output, HAS_BIAS=has_bias, STORE_HN=need_grads,
                      STORE_A=need_dx, NEED_S=need_dw, NEED_DB=need_db, NEED_DK=need_dk,
                      NORM_FILTERS=need_grads, STORE_W_HAT=need_dx, KH=kh, KW=kw,
                      EMULATE_RTNE=rtne, BLOCK_M=cfg["BLOCK_M"], BLOCK_O=fcfg["BLOCK_O"],
                      BLOCK_F=fcfg["BLOCK_F"], num_warps=cfg["num_warps"])
    k_stride = k.stride(0) if operator == "sigmoid" else 0
    if cg_out == 1:   # one channel per group: tiles across the groups (_channelwise_prep_kernel)
        p.prep_grid = (n_filter_programs + r_rows, _cdiv(c_out, cfg["BLOCK_C"]))
        p.prep_scalars = ((m_out, ho * wo, wo, c_out, r_rows, k_stride, *dy.stride(),
                           *c.stride(), n_filter_programs, cg_in, *w.stride(), eps))
        prep_flags.update(BLOCK_C=cfg["BLOCK_C"])
    else:
        # axis 0 without the input tiles (the launcher adds them)
        p.prep_grid = (n_filter_programs + r_rows + n_margin_programs,)
        p.prep_scalars = ((m_out, ho * wo, wo, c_out, cg_out, cgo_p, groups, r_rows, k_stride,
                           *dy.stride(), *c.stride(), n_filter_programs, cg_in, cgi_p,
                           *w.stride(), eps, _cdiv(h * wd, stage_p), h * wd, wd, *x.stride()))
        prep_flags.update(BLOCK_C=_pow2_clamp(cgo_p, 16, cfg["BLOCK_C"]), STAGE_X=stage_x,
                          DENSE_PLANE=dense_plane(x), STAGE_GRID=False,
                          X_PIXELS_FAST=pixels_fast(x), BLOCK_P=stage_p,
                          HN_TOP=p.hn_margins[0], HN_LEFT=p.hn_margins[1], GRID_SH=1, GRID_SW=1,
                          WHAT_PADDED=p.what_padded,
                          BLOCK_CX=_pow2_clamp(cgi_p, 16, STAGE_CONFIG["BLOCK_C"]))
    p.prep_flags = prep_flags

    # 2. the partials' reduction: folded into the wgrad launch (its final level) and, for big
    # batches, the dgrad's (its first level)
    p.fold = fold = _fold_reduction(need_dw)
    p.first_programs = first_programs = (_first_level_programs(r_rows, c_out)
                                         if fold and need_dx and not grid_dgrad and DGRAD_REDUCES
                                         else 0)
    red = REDUCE_CONFIG
    # 3. the implicit-GEMM dgrad
    if need_dx and not grid_dgrad:
        dx_meta = torch.empty_like(meta_like(x))
        p.dx_strides = dx_meta.stride()
        dx_pixels_fast = pixels_fast(dx_meta)
        cfg = dgrad_config(cg_in, cg_out, dtype)
        hp, wp = _cdiv(h, sh), _cdiv(wd, sw)
        grid = (_cdiv(n * hp * wp, cfg["BLOCK_M"]), _cdiv(cg_in, cfg["BLOCK_N"]), groups * sh * sw)
        # the first reduction level's programs in extra slices of grid axis 2
        p.dgrad_grid = grid[:2] + (grid[2] + _cdiv(first_programs, grid[0] * grid[1]),)
        p.dgrad_scalars = (n, h, wd, ho, wo, c_out, cg_in, cg_out, groups, cgi_p, cgo_p, hp, wp,
                           *x.stride(), *p.dx_strides, r_rows, first_programs,
                           red["ROWS_PER_PROGRAM"])
        p.dgrad_flags = dict(
            **geometry,
            NEED_S=bool(first_programs) and need_dw,
            NEED_DB=bool(first_programs) and need_db,
            NEED_DK=bool(first_programs) and need_dk,
            BLOCK_R=red["BLOCK_R"], BLOCK_RC=red["BLOCK_C"],
            STEP_H=sh // _gcd(sh, dh), STEP_W=sw // _gcd(sw, dw_),
            UPCAST_DOT=upcast, DOT_PRECISION=precision, EMULATE_RTNE=rtne, WIDE_OFFSETS=wide,
            PIXELS_FAST=dx_pixels_fast,
            # stride 1: a tile's pixels are consecutive input pixels (at stride 2 one phase's)
            PIX_RUN=(pixel_run(x, dx_meta) if dx_pixels_fast and sh == sw == 1 else 1),
            EVEN_K=cg_out % cfg["BLOCK_K"] == 0 and cgo_p == cg_out,
            EVEN_N=cgi_p % cfg["BLOCK_N"] == 0,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    # 4. wgrad: the folded reduction's switches (either wgrad launch)
    p.reduction_flags = dict(NEED_S=fold, NEED_DB=fold and need_db, NEED_DK=fold and need_dk,
                             EMULATE_RTNE=rtne)
    if wgrad is not None:
        cfg, grid, split, m_per_split = (wgrad[key] for key in ("cfg", "grid", "split",
                                                                "m_per_split"))
        p.w_part_shape = (split, kh * kw, c_out, cg_in)
        x_wgrad = x_staged if stage_x else x
        x_channels = cgi_p if stage_x else cg_in   # the x operand's channels a group (CGI_P)
        # the folded reduction: its programs in extra slices of grid axis 2
        p.wgrad_reduce_programs = red_programs = _cdiv(c_out, red["BLOCK_C"]) if fold else 0
        p.wgrad_grid = grid[:2] + (grid[2] + _cdiv(red_programs, grid[0] * grid[1]),)
        p.wgrad_scalars = (m_out, ho * wo, wo, h, wd, c_out, cg_in, cg_out, x_channels, cgo_p,
                           groups, m_per_split, split)
        # the finishing programs sum S themselves
        reduction_flags = dict(p.reduction_flags, NEED_S=fold and not finish_dw)
        p.wgrad_flags = dict(
            **geometry,
            UPCAST_DOT=upcast, DOT_PRECISION=precision, WIDE_OFFSETS=wide,
            RUNTIME_DIV=_wgrad_runtime_div(c_out), FLAT_K=cfg["FLAT_K"],
            DENSE_ROWS=(not cfg["FLAT_K"] and _dense_pixel_rows(x_wgrad)
                        and (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0)),
            EVEN_O=cgo_p % cfg["BLOCK_O"] == 0,
            EVEN_CI=not cfg["FLAT_K"] and x_channels % cfg["BLOCK_CI"] == 0,
            HN_TOP=p.hn_margins[0], HN_LEFT=p.hn_margins[1], **reduction_flags,
            FINISH_DW=finish_dw, BLOCK_R=red["BLOCK_R"], BLOCK_RC=red["BLOCK_C"],
            BLOCK_O=cfg["BLOCK_O"], BLOCK_CI=cfg["BLOCK_CI"], BLOCK_M=cfg["BLOCK_M"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return p


_GRID_MODULE = None


def conv_bwd_grid():
    """The grid dgrad / wgrad module (kernels/conv_bwd_grid.py), imported at first use: it
    builds on this module's kernels. Kept once imported (a backward asks up to 11 times; an
    import statement's lookup costs ~1-2 us each)."""
    global _GRID_MODULE
    if _GRID_MODULE is None:
        from . import conv_bwd_grid as module
        _GRID_MODULE = module
    return _GRID_MODULE


def _fold_reduction(need_dw: bool) -> bool:
    """Whether the final level of the prep partials' sums runs inside the wgrad launch (one
    launch fewer): whenever there is a wgrad (S is read by the finalize after it)."""
    return need_dw


def _reduce_column_partials(partials, r_rows, w, k, need_dw, need_db, need_dk, rtne,
                            final=True, launch_first=True, memos=(None, None)):
    """``(S [C_out] fp32, db, dk, level, rows)`` from the prep pass's partials [3, r_rows, C_out]
    with _reduce_partials_kernel: fixed-order sums, two levels above ROWS_PER_PROGRAM rows. S is
    a 1-element placeholder unless need_dw; db / dk None unless needed (w's / k's dtype).
    ``final=False``: the first level (if any) runs, the final one is left to the caller's next
    launch (the wgrad's reduce programs) over ``level`` [3, rows, C_out], and S, db, dk come
    back unwritten. ``launch_first=False`` (with final=False): the first level is left to the
    caller too (the dgrad's reduce programs, :func:`_first_level_programs`), ``level`` its
    unwritten output. ``memos``: the first and final launches' in a kept plan
    (plans.LaunchMemo)."""
    c_out, dev = w.shape[0], w.device
    s_sum = torch.empty(c_out if need_dw else 1, device=dev, dtype=torch.float32)
    db = torch.empty(c_out, device=dev, dtype=w.dtype) if need_db else None
    dk = torch.empty(c_out, device=dev, dtype=k.dtype) if need_dk else None
    if not (need_dw or need_db or need_dk):
        return s_sum, db, dk, partials, r_rows
    cfg = REDUCE_CONFIG
    flags = dict(NEED_S=need_dw, NEED_DB=need_db, NEED_DK=need_dk, EMULATE_RTNE=rtne,
                 BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    outs = (s_sum, db if need_db else s_sum, dk if need_dk else s_sum)
    c_blocks = _cdiv(c_out, cfg["BLOCK_C"])
    rows, level = r_rows, partials
    if rows > cfg["ROWS_PER_PROGRAM"]:  # first level: split the rows over programs
        n_split = _cdiv(rows, cfg["ROWS_PER_PROGRAM"])
        nxt = torch.empty((3, n_split, c_out), device=dev, dtype=torch.float32)
        if launch_first:
            _launch(_reduce_partials_kernel, (c_blocks, n_split),
                    (level, nxt, *outs, rows, c_out, cfg["ROWS_PER_PROGRAM"]), memos[0],
                    FINAL=False, **flags)
        rows, level = n_split, nxt
    if final:
        _launch(_reduce_partials_kernel, (c_blocks, 1),
                (level, level, *outs, rows, c_out, _cdiv(rows, cfg["BLOCK_R"]) * cfg["BLOCK_R"]),
                memos[1], FINAL=True, **flags)
    return s_sum, db, dk, level, rows


def _first_level_programs(r_rows: int, c_out: int) -> int:
    """The programs of the partials' first reduction level (_reduce_partials_kernel's grid,
    flattened): one per (channel block, ROWS_PER_PROGRAM rows); 0 when one level suffices."""
    cfg = REDUCE_CONFIG
    if r_rows <= cfg["ROWS_PER_PROGRAM"]:
        return 0
    return _cdiv(c_out, cfg["BLOCK_C"]) * _cdiv(r_rows, cfg["ROWS_PER_PROGRAM"])


def _depthwise_backward(dy, x, w, k, operator, eps, need, ho, wo, geometry, rtne):
    """(dx, dw, db, dk) of a pure depthwise conv (C_in = C_out = G), recomputing c and r_x:
    _depthwise_prep_kernel (Hn, A, r_w, the filter taps over r_w and the column partials), the
    partials' reduction (a first level over 512 rows; the final one inside the grad launch),
    then _depthwise_grad_kernel (dx and the weight-gradient partials in one pass) and the
    finalize. 2-4 launches; the forward saved nothing."""
    from sphereops.reference import ARCCOS_DELTA  # its single source

    need_dx, need_dw, need_db, need_dk = need
    n, c, h, wd = x.shape
    kh, kw = geometry["KH"], geometry["KW"]
    dev, dtype = x.device, x.dtype
    m_out = n * ho * wo
    need_grads = need_dx or need_dw
    # the launch sites' memos by call signature: the launches are derived afresh each call (a
    # plan gained nothing measurable here), but each one through triton's JITFunction.run costs
    # ~45 us of host time (plans.LaunchMemo); the key names what the launch arguments read
    memos = _DEPTHWISE_LAUNCHES.get(
        (tensor_key(dy), tensor_key(x), tensor_key(w), tensor_key(k), operator, float(eps), need,
         tuple(geometry.items()), rtne, DW_PIXEL_PAIRS, depthwise_config, depthwise_row_width,
         _conv_fwd.MAX_ROW_W, _depthwise_split, pixel_groups_fit, tuple(REDUCE_CONFIG.items()),
         tuple(FINALIZE_CONFIG.items())),
        launch_memos, "prep", "grad", "finalize", "reduce_first", "reduce_final")
    # NCHW x: tiles of output rows, read along the pixels, and Hn / A in planes (ROW_W > 0)
    row_w = depthwise_row_width(x, wo)
    cfg = depthwise_config("prep", taps=kh * kw, rows=row_w > 0)
    r_rows = _cdiv(depthwise_tile_count(n, ho, wo, row_w, cfg["BLOCK_M"]), cfg["ROW_BLOCKS"])
    # Hn and A: [N*Ho*Wo, C] or [N, C, Ho*Wo] (_dw_state_row), flat here
    hn = torch.empty((m_out * c,) if need_grads else (1,), device=dev, dtype=dtype)
    a_buf = torch.empty((m_out * c,) if need_dx else (1,), device=dev, dtype=torch.float32)
    r_w = torch.empty(c, device=dev, dtype=torch.float32)
    w_scaled = torch.empty((kh * kw, c) if need_dx else (1,), device=dev, dtype=torch.float32)
    partials = torch.empty((3, r_rows, c), device=dev, dtype=torch.float32)
    sigmoid = operator == "sigmoid"
    _launch(_depthwise_prep_kernel, (r_rows, _cdiv(c, cfg["BLOCK_C"])),
            (dy, x, w, k if sigmoid else r_w, hn, a_buf, r_w, w_scaled, partials, m_out, c, h,
             wd, ho, wo, r_rows, k.stride(0) if sigmoid else 0, float(eps), *dy.stride(),
             *x.stride(), w.stride(0), w.stride(2), w.stride(3)),
            **geometry, OPERATOR=OPERATOR_CODES[operator], DELTA=float(ARCCOS_DELTA),
            STORE_HN=need_grads, STORE_A=need_dx, NEED_S=need_dw, NEED_DB=need_db,
            NEED_DK=need_dk, EMULATE_RTNE=rtne, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
            ROW_BLOCKS=cfg["ROW_BLOCKS"], ROW_W=row_w, num_warps=cfg["num_warps"],
            memo=memos.prep)
    # the final level rides in the grad launch when there is one (as in the GEMM path's wgrad)
    s_sum, db, dk, red_level, red_rows = _reduce_column_partials(
        partials, r_rows, w, k, need_dw, need_db, need_dk, rtne, final=not need_grads,
        memos=(memos.reduce_first, memos.reduce_final))
    dx = dw = None
    if need_grads:
        # the state's layout is the prep's (row_w > 0: planes); the input pixels' row tiles
        # take the input's own width
        in_row_w = depthwise_row_width(x, wd) if row_w else 0
        # pairs of side-by-side input pixels at stride 1 where they fit (depthwise_config)
        pix_group = 2 if DW_PIXEL_PAIRS and geometry["SH"] == 1 and pixel_groups_fit(
            2, wd, geometry["SW"], geometry["DW"], in_row_w, kh * kw) else 1
        cfg = depthwise_config("grad", rows=row_w > 0, pix_group=pix_group)
        steps = depthwise_tile_count(n, h, wd, in_row_w, cfg["BLOCK_M"])
        c_tiles = _cdiv(c, cfg["BLOCK_C"])
        # without dw every tile is its own program; with it, contiguous ranges of tiles (the
        # partials grow with the number of ranges): about as many programs as fit at once
        split, tiles_per_split = even_ranges(
            steps, _depthwise_split(steps, c_tiles, dev) if need_dw else steps)
        dx = torch.empty_like(x) if need_dx else None  # preserves NCHW / channels_last
        w_part = torch.empty((split, kh * kw, c, 1) if need_dw else (1,), device=dev,
                             dtype=torch.float32)
        dx_arg = dx if need_dx else hn   # never written without NEED_DX
        red = REDUCE_CONFIG
        red_programs = _cdiv(c, red["BLOCK_C"]) if (need_dw or need_db or need_dk) else 0
        grid = (split + _cdiv(red_programs, c_tiles), c_tiles)
        _launch(_depthwise_grad_kernel, grid,
                (hn, a_buf, w_scaled, x, dx_arg, w_part, red_level, s_sum,
                 db if need_db else s_sum, dk if need_dk else s_sum, n, c, h, wd, ho, wo, steps,
                 tiles_per_split, split, red_rows, red_programs, *x.stride(),
                 *(dx.stride() if need_dx else x.stride())),
                **geometry, NEED_DX=need_dx, NEED_DW=need_dw, TAPS=_next_pow2(kh * kw),
                EMULATE_RTNE=rtne, NEED_S=need_dw, NEED_DB=need_db, NEED_DK=need_dk,
                BLOCK_R=red["BLOCK_R"], BLOCK_RC=red["BLOCK_C"], BLOCK_M=cfg["BLOCK_M"],
                BLOCK_C=cfg["BLOCK_C"], ROW_W=in_row_w, PIX_GROUP=cfg["PIX_GROUP"],
                num_warps=cfg["num_warps"], memo=memos.grad)
        if need_dw:
            dw = _finalize_dw(w_part, w, r_w, s_sum, split, rtne, memos.finalize)
    return dx, dw, db, dk


# the pure depthwise backward's launch memos by call signature (_depthwise_backward)
_DEPTHWISE_LAUNCHES = PlanCache("depthwise backward launches")


def _finalize_dw(w_part, w, r_w, s_sum, split, rtne, memo=None):
    """dw from the wgrad partials [split, KH*KW, C_out, C_in/G] (_dw_finalize_kernel);
    ``memo``: the launch site's in a kept plan (plans.LaunchMemo)."""
    c_out, cg_in, kh, kw = w.shape
    dw = torch.empty_like(w)
    cfg = FINALIZE_CONFIG
    _launch(_dw_finalize_kernel, (_cdiv(w.numel(), cfg["BLOCK"]),),
            (w_part, w, r_w, s_sum, dw, c_out, cg_in, split, *w.stride(), *dw.stride()),
            KH=kh, KW=kw, EMULATE_RTNE=rtne, BLOCK=cfg["BLOCK"], SPLIT_BLOCK=cfg["SPLIT_BLOCK"],
            num_warps=cfg["num_warps"], memo=memo)
    return dw


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (sphereops_kernels.aot, docs/ARCHITECTURE.md)
# ---------------------------------------------------------------------------------------------

def _signature(fn, pointers: dict, floats=()) -> dict:
    """Type every parameter of ``fn``: pointers from ``pointers`` (name -> "*fp16"...), the
    names in ``floats`` as fp32, constexprs as "constexpr" (by annotation), the rest i32."""
    # Read the annotations off the Python function (works for a JITFunction and for the
    # interpreter's wrapper alike; annotations are strings under `from __future__ import annotations`).
    params = inspect.signature(fn.fn).parameters
    sig = {}
    for name in fn.arg_names:
        if "constexpr" in str(params[name].annotation):
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _prep_spec(name: str, operator: str, from_output: bool, t: str, dtype, c: int, h: int,
               w: int, fn=None, cg_in: Optional[int] = None, stage: bool = False,
               hn_margins=(0, 0), stage_grid: bool = False, grid_stride: int = 1,
               what_padded: bool = False) -> dict:
    """The AOT spec of _prep_kernel (or ``fn``: _channelwise_prep_kernel) for one operator /
    saved state, every output requested, on a channels_last [*, c, h, w] gradient (``t``: the
    pointer type of the input dtype), with its filter programs for 3x3 filters of ``cg_in``
    input channels (default c) and w_hat (filter_norm_config's tiles); ``stage``: with the
    input tiles staging an NCHW input of cg_in channels (rows padded to aligned_count);
    ``hn_margins``: Hn written onto the grid dgrad's padded grid (_hn_row), its margins zeroed
    by the same launch; ``stage_grid``: and the grid wgrad's x grid staged from a channels_last
    input of cg_in channels (3x3 "same": one zero row and column, lead Wq + 1 rows; at
    ``grid_stride`` 2 its four phase planes); ``what_padded``: w_hat's group rows padded
    (the grid dgrad with C_out/G off a multiple of 16)."""
    fn = _prep_kernel if fn is None else fn
    cg_in = c if cg_in is None else cg_in
    cgi_p = aligned_count(cg_in)
    cfg = prep_config(operator, from_output)
    fcfg = filter_norm_config(cg_in * 9)
    pointers = {"dy_ptr": t, "c_ptr": t, "rx_ptr": "*fp32", "k_ptr": t, "bias_ptr": t,
                "hn_ptr": t, "a_ptr": "*fp32", "part_ptr": "*fp32", "w_ptr": t, "rw_ptr": "*fp32",
                "what_ptr": t, "x_ptr": t, "xs_ptr": t, "cnt_ptr": "*i32"}
    strides = dict(stride_dyn=h * w * c, stride_dyc=1, stride_dyh=w * c, stride_dyw=c,
                   stride_cn=h * w * c, stride_cc=1, stride_ch=w * c, stride_cw=c,
                   stride_wo=cg_in * 9, stride_wc=9, stride_wh=3, stride_ww=1)
    return dict(
        name=name, fn=fn, signature=_signature(fn, pointers, floats=("eps",)),
        constexprs=dict(HoWo=h * w, Wo=w, OPERATOR=OPERATOR_CODES[operator], DELTA=1e-6,
                        FROM_OUTPUT=from_output, HAS_BIAS=from_output, STORE_HN=True, STORE_A=True,
                        NEED_S=True, NEED_DB=True, NEED_DK=operator == "sigmoid",
                        NORM_FILTERS=True, STORE_W_HAT=True, KH=3, KW=3,
                        EMULATE_RTNE=False, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
                        BLOCK_O=fcfg["BLOCK_O"], BLOCK_F=fcfg["BLOCK_F"],
                        **(dict(STAGE_X=stage, DENSE_PLANE=True, STAGE_GRID=stage_grid,
                                X_PIXELS_FAST=False, BLOCK_P=STAGE_CONFIG["BLOCK_P"],
                                BLOCK_CX=_pow2_clamp(cgi_p, 16, STAGE_CONFIG["BLOCK_C"]),
                                HN_TOP=hn_margins[0], HN_LEFT=hn_margins[1],
                                GRID_SH=grid_stride, GRID_SW=grid_stride,
                                WHAT_PADDED=what_padded)
                           if fn is _prep_kernel else {})),
        num_warps=cfg["num_warps"], num_stages=1, dtype=dtype, gemm=False,
        example_args=dict(C_out=c, CG_IN=cg_in, **strides,
                          **(dict(CG_OUT=c, CGO_P=c, CGI_P=cgi_p,
                                  img_tiles=_cdiv(h * w, STAGE_CONFIG["BLOCK_P"]), HW_IN=h * w,
                                  W_IN=w, **(dict(stride_xn=h * w * cg_in, stride_xc=1,
                                                  stride_xh=w * cg_in, stride_xw=cg_in)
                                             if stage_grid else
                                             dict(stride_xn=h * w * cg_in, stride_xc=h * w,
                                                  stride_xh=w, stride_xw=1)),
                                  n_stage_programs=_cdiv(32 * (h + 1) * (w + 1) + w + 2,
                                                         STAGE_CONFIG["BLOCK_P"]),
                                  grid_lead=w + 2, grid_cp=cgi_p, grid_pad_h=1, grid_pad_w=1,
                                  grid_planes=grid_stride ** 2, grid_planes_w=grid_stride,
                                  n_counters=9 if stage_grid else 0)
                             if fn is _prep_kernel else {})))


def _wgrad_pointers(t: str) -> dict:
    """_wgrad_kernel's pointer types for input-dtype pointer type ``t``."""
    return {"hn_ptr": t, "x_ptr": t, "part_ptr": "*fp32", "red_ptr": "*fp32", "s_ptr": "*fp32",
            "db_ptr": t, "dk_ptr": t, "cnt_ptr": "*i32", "w_ptr": t, "rw_ptr": "*fp32",
            "dw_ptr": t}


def _filter_strides(cg_in: int, kh: int, kw: int) -> dict:
    """Example strides of a contiguous w and dw [C_out, cg_in, kh, kw] (the wgrad's FINISH_DW
    arguments)."""
    strides = (cg_in * kh * kw, kh * kw, kw, 1)
    return {f"stride_{name}{axis}": v for name in ("w", "dw")
            for axis, v in zip(("o", "c", "h", "w"), strides)}


# the dgrad specs model a big batch's launch (32 x 56 x 56 pixels: 1568 prep rows of 64): the
# first level of the prep partials' reduction (S and db) rides in it
_DGRAD_FIRST_LEVEL = dict(NEED_S=True, NEED_DB=True, NEED_DK=False,
                          BLOCK_R=REDUCE_CONFIG["BLOCK_R"], BLOCK_RC=REDUCE_CONFIG["BLOCK_C"])


# the wgrad specs model the default launch: it finishes dw (FINISH_DW; its finishing programs
# sum S, the folded reduction writes db)
_WGRAD_FINISH = dict(FINISH_DW=True, NEED_S=False)


# the wgrad and depthwise-grad specs model the common launch: every gradient but dk, the final
# reduction level of the prep partials (S and db) in the same launch
_FOLDED_REDUCE = dict(NEED_S=True, NEED_DB=True, NEED_DK=False, EMULATE_RTNE=False,
                     BLOCK_R=REDUCE_CONFIG["BLOCK_R"], BLOCK_RC=REDUCE_CONFIG["BLOCK_C"])


def aot_specs() -> list:
    """One spec per (kernel, config, dtype) for the AOT compile check.

    The GEMM kernels are compiled for the shapes that matter for speed: bf16/fp16 with 128
    channels per group (the big tiles), a 64-channel config, stride 2 (phase-decomposed dgrad,
    STEP 2) and 1x1; fp32 both with tf32 (tensor cores) and exact ("ieee": FMA units by design,
    so ``gemm`` is False there). Example integers describe a channels_last [32, 128, 56, 56]
    input (unit channel stride, the layout the GPU target is measured on).
    """
    n, c, h, w = 32, 128, 56, 56
    x_strides_cl = dict(stride_xn=h * w * c, stride_xc=1, stride_xh=w * c, stride_xw=c)
    specs = []
    for dtype in _SUPPORTED_DTYPES:
        t = "*" + _TRITON_DTYPE_NAMES[dtype]
        tag = _TRITON_DTYPE_NAMES[dtype]
        precisions = ("tf32", "ieee") if dtype == torch.float32 else ("ieee",)
        gemm_cases = [  # (label, C/G, KH, stride, padding)
            ("3x3_c128", 128, 3, 1, 1),
            ("3x3_c64", 64, 3, 1, 1),
            ("3x3_s2_c128", 128, 3, 2, 1),
            ("1x1_c128", 128, 1, 1, 0),
        ] if dtype != torch.float32 else [("3x3_c128", 128, 3, 1, 1)]
        for precision in precisions:
            gemm = dtype != torch.float32 or precision == "tf32"
            ptag = tag + (f"_{precision}" if dtype == torch.float32 else "")
            for label, cg, kk, st, pad in gemm_cases:
                geo = dict(KH=kk, KW=kk, SH=st, SW=st, PH=pad, PW=pad, DH=1, DW=1)
                cfg = dgrad_config(cg, cg, dtype)
                specs.append(dict(
                    name=f"conv_bwd_dgrad_{label}_{ptag}", fn=_dgrad_kernel,
                    signature=_signature(_dgrad_kernel, {"hn_ptr": t, "what_ptr": t, "a_ptr": "*fp32",
                                                         "x_ptr": t, "dx_ptr": t,
                                                         "red_ptr": "*fp32",
                                                         "red_out_ptr": "*fp32"}),
                    constexprs=dict(**geo, STEP_H=st, STEP_W=st, HP=_cdiv(h, st), WP=_cdiv(w, st), UPCAST_DOT=False,
                                    DOT_PRECISION=precision, EMULATE_RTNE=False, WIDE_OFFSETS=False,
                                    PIXELS_FAST=False, PIX_RUN=1, EVEN_K=True, EVEN_N=True,
                                    **_DGRAD_FIRST_LEVEL, BLOCK_M=cfg["BLOCK_M"],
                                    BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"]),
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], dtype=dtype, gemm=gemm,
                    example_args=dict(C_out=c, CG_IN=cg, CG_OUT=cg, CGI_P=cg, CGO_P=cg, G=c // cg,
                                      **x_strides_cl, stride_dxn=h * w * c, stride_dxc=1,
                                      stride_dxh=w * c, stride_dxw=c, R=1568,
                                      RED_PROGRAMS=(c // 32) * 4,
                                      RED_ROWS=REDUCE_CONFIG["ROWS_PER_PROGRAM"])))
                cfg = wgrad_config(cg, cg, dtype)
                specs.append(dict(
                    name=f"conv_bwd_wgrad_{label}_{ptag}", fn=_wgrad_kernel,
                    signature=_signature(_wgrad_kernel, _wgrad_pointers(t)),
                    constexprs=dict(**geo, HoWo=(h // st) * (w // st), Wo=w // st, UPCAST_DOT=False,
                                    DOT_PRECISION=precision, WIDE_OFFSETS=False, RUNTIME_DIV=False,
                                    FLAT_K=cfg["FLAT_K"], DENSE_ROWS=(kk, st, pad) == (1, 1, 0),
                                    EVEN_O=True, EVEN_CI=True, BLOCK_O=cfg["BLOCK_O"],
                                    BLOCK_CI=cfg["BLOCK_CI"], BLOCK_M=cfg["BLOCK_M"],
                                    HN_TOP=0, HN_LEFT=0,
                                    **dict(_FOLDED_REDUCE, **_WGRAD_FINISH)),
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], dtype=dtype, gemm=gemm,
                    example_args=dict(C_out=c, CG_IN=cg, CG_OUT=cg, CGI_P=cg, CGO_P=cg, G=c // cg,
                                      M_PER_SPLIT=4096, R=400, RED_PROGRAMS=c // 32,
                                      howo_rt=(h // st) * (w // st), wo_rt=w // st, **x_strides_cl,
                                      **_filter_strides(cg, kk, kk))))
                if label == "3x3_c128":   # the int64-offset builds (tensors near 2^31 elements;
                    # the wgrad leaves dw to the finalize there: _finish_dw_in_wgrad)
                    for spec, finish in zip(specs[-2:], ({}, dict(FINISH_DW=False, NEED_S=True))):
                        specs.append(dict(spec, name=spec["name"].replace("_3x3_c128_", "_3x3_c128_wide_"),
                                          constexprs=dict(spec["constexprs"], WIDE_OFFSETS=True,
                                                          **finish)))
                    # the dgrad with its channel masks (C_out/G or C_in/G off its tile)
                    spec = next(sp for sp in specs if sp["name"] == f"conv_bwd_dgrad_{label}_{ptag}")
                    specs.append(dict(spec, name=spec["name"].replace("_3x3_c128_", "_3x3_c128_masked_"),
                                      constexprs=dict(spec["constexprs"], EVEN_K=False, EVEN_N=False)))
                    # the runtime-divisor wgrad (_wgrad_runtime_div)
                    spec = specs[-4]
                    # (odd C_out: Hn's padded columns off the O tile, EVEN_O False)
                    specs.append(dict(spec, name=spec["name"].replace("_3x3_c128_", "_3x3_c128_rtdiv_"),
                                      constexprs=dict(spec["constexprs"], RUNTIME_DIV=True,
                                                      EVEN_O=False)))
                    if dtype != torch.float32:   # Hn on the grid dgrad's grid (conv_bwd_grid)
                        specs.append(dict(spec, name=spec["name"].replace("_3x3_c128_", "_3x3_c128_hngrid_"),
                                          constexprs=dict(spec["constexprs"], HN_TOP=1, HN_LEFT=1)))
                if label in ("3x3_c128", "3x3_s2_c128"):   # NCHW x and dx: lanes along pixels
                    spec = next(sp for sp in specs
                                if sp["name"] == f"conv_bwd_dgrad_{label}_{ptag}")
                    # in 16-byte runs of pixels at stride 1 (launch.pixel_run), one by one at 2
                    run = 1 if st > 1 else 16 // dtype.itemsize
                    specs.append(dict(spec, name=spec["name"].replace(f"_{label}_", f"_{label}_nchw_"),
                                      constexprs=dict(spec["constexprs"], PIXELS_FAST=True,
                                                      PIX_RUN=run),
                                      example_args=dict(
                                          spec["example_args"], stride_xn=c * h * w, stride_xc=h * w,
                                          stride_xh=w, stride_xw=1, stride_dxn=c * h * w,
                                          stride_dxc=h * w, stride_dxh=w, stride_dxw=1)))
            # the flat-K wgrad (C_in/G < 16): a first layer, 3 -> 64 channels, 5x5, on a
            # channels_last [128, 3, 32, 32] input (edge.cin3_5x5)
            cfg = wgrad_config(3, 64, dtype, 25)
            specs.append(dict(
                name=f"conv_bwd_wgrad_5x5_cin3_flat_{ptag}", fn=_wgrad_kernel,
                signature=_signature(_wgrad_kernel, _wgrad_pointers(t)),
                constexprs=dict(KH=5, KW=5, SH=1, SW=1, PH=2, PW=2, DH=1, DW=1, HoWo=32 * 32,
                                Wo=32, UPCAST_DOT=False, DOT_PRECISION=precision,
                                WIDE_OFFSETS=False, RUNTIME_DIV=False, FLAT_K=cfg["FLAT_K"],
                                DENSE_ROWS=False, EVEN_O=True, EVEN_CI=False,
                                BLOCK_O=cfg["BLOCK_O"], BLOCK_CI=cfg["BLOCK_CI"],
                                BLOCK_M=cfg["BLOCK_M"], HN_TOP=0, HN_LEFT=0,
                                **dict(_FOLDED_REDUCE, **_WGRAD_FINISH)),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], dtype=dtype, gemm=gemm,
                example_args=dict(C_out=64, CG_IN=3, CG_OUT=64, CGI_P=3, CGO_P=64, G=1,
                                  M_PER_SPLIT=512, R=2048, RED_PROGRAMS=0, howo_rt=32 * 32, wo_rt=32,
                                  stride_xn=32 * 32 * 3, stride_xc=1, stride_xh=32 * 3,
                                  stride_xw=3, **_filter_strides(3, 5, 5))))
        # the pure depthwise kernels (elementwise, no dot): 3x3, stride 1 and 2, 5x5; GPU
        # tiles; the prep pass with the heaviest operator (sigmoid: arccos and exps per element);
        # channels_last x (flat pixel tiles) and NCHW x (row tiles, state in planes)
        w_strides = dict(stride_wc=9, stride_wh=3, stride_ww=1)
        # (the grad kernel's 3x3 stride-1 launch takes pairs of pixels on the 56-wide example,
        # single pixels at odd widths: both built)
        for layout, label, ks, st, group in (("cl", "3x3", 3, 1, 2),
                                             ("cl", "3x3", 3, 1, 1), ("cl", "3x3_s2", 3, 2, 1),
                                             ("cl", "5x5", 5, 1, 1), ("nchw", "3x3", 3, 1, 1),
                                             ("nchw", "3x3_s2", 3, 2, 1)):
            rows = layout == "nchw"
            prep_cfg = depthwise_config("prep", False, ks * ks, rows=rows)
            grad_cfg = depthwise_config("grad", False, rows=rows, pix_group=group)
            geo = dict(KH=ks, KW=ks, SH=st, SW=st, PH=ks // 2, PW=ks // 2, DH=1, DW=1)
            ho, wo = h // st, w // st
            name = f"{label}_{tag}" if layout == "cl" else f"{label}_nchw_{tag}"
            if rows:
                x_strides = dict(stride_xn=c * h * w, stride_xc=h * w, stride_xh=w, stride_xw=1)
                dy_strides = dict(stride_dyn=c * ho * wo, stride_dyc=ho * wo, stride_dyh=wo,
                                  stride_dyw=1)
            else:
                x_strides = x_strides_cl
                dy_strides = dict(stride_dyn=ho * wo * c, stride_dyc=1, stride_dyh=wo * c,
                                  stride_dyw=c)
            dx_strides = {k.replace("_x", "_dx"): v for k, v in x_strides.items()}
            specs.extend([dict(
                name=f"conv_bwd_depthwise_prep_sigmoid_{name}", fn=_depthwise_prep_kernel,
                signature=_signature(_depthwise_prep_kernel,
                                     {"dy_ptr": t, "x_ptr": t, "w_ptr": t, "k_ptr": t, "hn_ptr": t,
                                      "a_ptr": "*fp32", "rw_ptr": "*fp32", "ws_ptr": "*fp32",
                                      "part_ptr": "*fp32"},
                                     floats=("eps",)),
                constexprs=dict(**geo, OPERATOR=OPERATOR_CODES["sigmoid"], DELTA=1e-6,
                                STORE_HN=True, STORE_A=True, NEED_S=True, NEED_DB=True,
                                NEED_DK=True, EMULATE_RTNE=False, BLOCK_M=prep_cfg["BLOCK_M"],
                                BLOCK_C=prep_cfg["BLOCK_C"], ROW_BLOCKS=prep_cfg["ROW_BLOCKS"],
                                ROW_W=min(_next_pow2(wo), MAX_ROW_W) if rows else 0),
                num_warps=prep_cfg["num_warps"], num_stages=1, dtype=dtype, gemm=False,
                example_args=dict(C=c, H=h, W=w, Ho=ho, Wo=wo, **x_strides, **w_strides,
                                  **dy_strides))] if group == 1 else [])
            specs.append(dict(
                name=f"conv_bwd_depthwise_grad_{label}" + (f"_pg{group}" if group > 1 else "")
                     + name[len(label):],
                fn=_depthwise_grad_kernel,
                signature=_signature(_depthwise_grad_kernel,
                                     {"hn_ptr": t, "a_ptr": "*fp32", "ws_ptr": "*fp32",
                                      "x_ptr": t, "dx_ptr": t, "part_ptr": "*fp32",
                                      "red_ptr": "*fp32", "s_ptr": "*fp32", "db_ptr": t,
                                      "dk_ptr": t}),
                constexprs=dict(**geo, NEED_DX=True, NEED_DW=True, TAPS=_next_pow2(ks * ks),
                                **_FOLDED_REDUCE, BLOCK_M=grad_cfg["BLOCK_M"],
                                BLOCK_C=grad_cfg["BLOCK_C"], PIX_GROUP=grad_cfg["PIX_GROUP"],
                                ROW_W=min(_next_pow2(w), MAX_ROW_W) if rows else 0),
                num_warps=grad_cfg["num_warps"], num_stages=1, dtype=dtype, gemm=False,
                example_args=dict(C=c, H=h, W=w, Ho=ho, Wo=wo, TILES_PER_SPLIT=256, SPLIT=528,
                                  R=400, RED_PROGRAMS=c // 32, **x_strides, **dx_strides)))
        # the memory-bound passes, once per dtype: the sigmoid prep (the heaviest epilogue) and
        # the saved-output variant (c recovered from y and the bias, with a sine for linear),
        # each with its filter programs (r_w and w_hat) for 3x3 filters of 128 input channels
        # (one 2048-wide step a filter); the sigmoid prep again with one input channel a group
        # (128 filters of 9 elements a program), and the channelwise prep with two (64 of 18)
        specs.append(_prep_spec(f"conv_bwd_prep_sigmoid_{tag}", "sigmoid", False, t, dtype, c, h, w))
        specs.append(_prep_spec(f"conv_bwd_prep_sigmoid_cin1_{tag}", "sigmoid", False, t, dtype,
                                c, h, w, cg_in=1))
        specs.append(_prep_spec(f"conv_bwd_prep_sigmoid_stage_c29_{tag}", "sigmoid", False, t,
                                dtype, c, h, w, cg_in=29, stage=True))
        specs.append(_prep_spec(f"conv_bwd_prep_linear_from_output_{tag}", "linear", True, t, dtype,
                                c, h, w))
        if dtype != torch.float32:   # Hn onto the grid dgrad's padded grid (conv_bwd_grid)
            specs.append(_prep_spec(f"conv_bwd_prep_sigmoid_hngrid_{tag}", "sigmoid", False, t,
                                    dtype, c, h, w, hn_margins=(1, 1)))
            # and x onto the grid wgrad's (conv_bwd_grid.x_grid_buffer)
            specs.append(_prep_spec(f"conv_bwd_prep_sigmoid_hngrid_gridx_{tag}", "sigmoid",
                                    False, t, dtype, c, h, w, hn_margins=(1, 1),
                                    stage_grid=True))
            # at stride 2: x's phase planes (conv_fwd_grid.phase_planes)
            specs.append(_prep_spec(f"conv_bwd_prep_sigmoid_hngrid_gridx_s2_{tag}", "sigmoid",
                                    False, t, dtype, c, h, w, hn_margins=(1, 1),
                                    stage_grid=True, grid_stride=2))
            # w_hat's group rows padded for the grid dgrad (C_out/G off a multiple of 16)
            specs.append(_prep_spec(f"conv_bwd_prep_sigmoid_hngrid_what_padded_{tag}", "sigmoid",
                                    False, t, dtype, c, h, w, hn_margins=(1, 1),
                                    what_padded=True))
        specs.append(_prep_spec(f"conv_bwd_prep_channelwise_sigmoid_{tag}", "sigmoid", False, t,
                                dtype, c, h, w, fn=_channelwise_prep_kernel, cg_in=2))
        cfg = REDUCE_CONFIG
        specs.append(dict(
            name=f"conv_bwd_reduce_partials_{tag}", fn=_reduce_partials_kernel,
            signature=_signature(_reduce_partials_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32",
                                                           "s_ptr": "*fp32", "db_ptr": t, "dk_ptr": t}),
            constexprs=dict(NEED_S=True, NEED_DB=True, NEED_DK=True, FINAL=True, EMULATE_RTNE=False,
                            BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"]),
            num_warps=cfg["num_warps"], num_stages=1, dtype=dtype, gemm=False))
        cfg = FINALIZE_CONFIG
        specs.append(dict(
            name=f"conv_bwd_dw_finalize_{tag}", fn=_dw_finalize_kernel,
            signature=_signature(_dw_finalize_kernel, {"part_ptr": "*fp32", "w_ptr": t, "rw_ptr": "*fp32",
                                                       "s_ptr": "*fp32", "dw_ptr": t}),
            constexprs=dict(KH=3, KW=3, EMULATE_RTNE=False, BLOCK=cfg["BLOCK"],
                            SPLIT_BLOCK=cfg["SPLIT_BLOCK"]),
            num_warps=cfg["num_warps"], num_stages=1, dtype=dtype, gemm=False))
    return specs
