"""Fused SphereConv2d forward: y = g(arccos c) + b, c and r_x in one conv kernel launch after
one small preparation launch (pure depthwise convs: y alone, in one launch).

    s[o, p]  = <w_o, x_p>                      (implicit GEMM, tl.dot, fp32 accumulation)
    q[g, p]  = ||x_p||^2                       (box sum of the pre-pass's channel sums of
                                                squares; patch_norms="fused": from the
                                                loaded input tiles)
    r_x      = sqrt(q + eps),  r_w = sqrt(||w_o||^2 + eps)
    c        = clamp(s / (r_x r_w), -1, 1),    y = g(c) + b

GEMM view, per group g: M = N*Ho*Wo output pixels, N = C_out/G filters, K = C_in/G*kh*kw.
K is ordered (kh, kw, c) so that, for channels_last inputs, every K step of the channel-chunk
loop reads BLOCK_K consecutive channels of one input pixel (contiguous, vectorised loads).  The
filters are repacked once per call to the same order, ``w_packed [C_out, kh, kw, C_in/G]``
(a view when the weight is already channels_last).

Implicit-GEMM convs, two launches per call:
* ``_prepare_operands_kernel`` -- one small launch before the conv kernel: one program per
  filter (repack, ||w_o||^2 in fp32) and, in the same grid, input tiles that make one pass
  over x: the channel sums of squares q [N, G, H, W] (the default pre-pass patch norms) and,
  for inputs not in the kernel's fast layout (NCHW, C_in/G not a multiple of 16:
  ``staged_channels``), a staged copy [N, H, W, G, Cp] with Cp = C_in/G rounded up to 16,
  zero-padded, which the conv kernel then reads instead of x (the filters get the same Cp).
* ``_sphere_conv_fwd_kernel`` -- implicit GEMM for every conv.  Constexpr ``CHANNEL_CHUNKS``
  picks the K loop: chunks of BLOCK_K channels at one (r, s) filter tap (C_in/G >= 16: cheap
  scalar index math per step, contiguous loads), or a flat loop over k = (r*kw + s)*C_in/G
  + c decomposed per element (C_in/G < 16: first layers, grouped convs with few channels,
  depthwise with a channel multiplier), which wastes no K padding.

Pure depthwise convs (C_in/G == C_out/G == 1), one launch: ``_sphere_conv_dw_fwd_kernel``, a
[pixels x channels] tile with elementwise FMAs over the kh*kw taps (a GEMM would be 15/16
padding), the filter norms summed from the weights its taps load. Memory-bound, so it moves
what cuDNN moves -- x in, y out -- and saves neither c nor r_x (an fp32 r_x per channel would
be twice y's bytes): the backward recomputes both with the same ``depthwise_window`` /
``depthwise_inv_norms`` (``conv_bwd._depthwise_prep_kernel``). Channels_last tiles are
consecutive pixels with the lanes along the channels; NCHW tiles are whole rows with the lanes
along the pixels (``depthwise_pixel_tile``, ``tile_ptrs``), each layout with its own configs.

The launcher ``sphere_conv2d_fwd`` follows docs/ARCHITECTURE.md exactly.
"""

import os
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from .angular import OPERATOR_CODES
from .configs import (
    CONV_FWD_AUTOTUNE_KEY,
    conv_fwd_configs,
    conv_fwd_default_config,
    conv_fwd_interpreter_config,
    fits_flat_k_loop,
    fits_fma_dot,
    prune_conv_fwd_configs,
)
from .epilogue import column_slices, load_tile, pixel_runs, store_sphere_tile, tile_ptrs
from .launch import cdiv as _cdiv
from .launch import (MAX_PIXELS, env_switch, interpreting, launch, offsets_need_int64,
                     pixel_run, plain_launch)
from .launch import next_pow2 as _next_pow2
from .launch import pow2_factor
from .plans import MAX_PLANS, LaunchMemo, PlanCache, dense_strides, meta_like, tensor_key

_INTERPRET = interpreting()

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Channel counts per group at or above which the channel-chunk K loop is used.
_CHANNEL_CHUNK_MIN = 16


@triton.jit
def _store_column_slice(acc, o_glob, o_end, inv_rx, out_row, mask_m, w_sqnorm_ptr, eps, stride_yc,
                        bias_ptr, k_ptr, y_ptr, c_ptr, OPERATOR: tl.constexpr,
                        HAS_BIAS: tl.constexpr, EMULATE_RTNE: tl.constexpr, STORE_C: tl.constexpr,
                        PIXELS_FAST: tl.constexpr, OUT_RUN: tl.constexpr):
    """The epilogue of one column slice of the GEMM tile (see _store_gemm_tile).

    acc: [BM, BS] fp32 dot products; o_glob: [BS] global output channels, valid below o_end;
    inv_rx: [BM] fp32 1 / patch norm; out_row: [BM] int64 offsets of the tile's pixels in y and c;
    mask_m: [BM]; OUT_RUN: epilogue.pixel_runs' RUN for y and c (1: none);
    the other arguments as epilogue.store_sphere_tile."""
    mask_n = o_glob < o_end
    inv_rw = 1.0 / tl.sqrt(tl.load(w_sqnorm_ptr + o_glob, mask=mask_n, other=1.0) + eps)
    out_offs, out_mask = pixel_runs(out_row, o_glob.to(tl.int64) * stride_yc, mask_m, mask_n,
                                    OUT_RUN)
    store_sphere_tile(acc, inv_rx[:, None] * inv_rw[None, :], o_glob, mask_n, out_offs,
                       out_mask, bias_ptr, k_ptr, y_ptr, c_ptr,
                       OPERATOR, HAS_BIAS, EMULATE_RTNE, STORE_C, PIXELS_FAST)


@triton.jit
def _store_gemm_tile(acc, o_first, o_end, inv_rx, out_row, mask_m, w_sqnorm_ptr, eps, stride_yc,
                     bias_ptr, k_ptr, y_ptr, c_ptr, OPERATOR: tl.constexpr,
                     HAS_BIAS: tl.constexpr, EMULATE_RTNE: tl.constexpr, STORE_C: tl.constexpr,
                     PIXELS_FAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     OUT_RUN: tl.constexpr = 1):
    """The GEMM kernel's epilogue, run on four column quarters of the tile in turn (eighths for
    NCHW outputs without pixel runs: epilogue.column_slices).

    Forming c and g over a whole 128x128 fp32 tile at once needs more than 255 registers a
    thread with 4 warps (the sigmoid epilogue spilled 1152 B a thread on sm_90, make aot-check);
    a quarter at a time spills nothing. o_first: the tile's first global output channel; the
    rest as _store_column_slice."""
    # eighths where an NCHW tile is stored without known pixel runs (epilogue.column_slices)
    PARTS: tl.constexpr = 8 if PIXELS_FAST and OUT_RUN == 1 and BLOCK_N >= 128 else 4
    w: tl.constexpr = BLOCK_N // PARTS
    o_w = o_first + tl.arange(0, w)
    slices = column_slices(acc, BLOCK_M, BLOCK_N, PARTS)
    for k in tl.static_range(PARTS):
        _store_column_slice(slices[k], o_w + k * w, o_end, inv_rx, out_row, mask_m,
                            w_sqnorm_ptr, eps, stride_yc, bias_ptr, k_ptr, y_ptr, c_ptr,
                            OPERATOR, HAS_BIAS, EMULATE_RTNE, STORE_C, PIXELS_FAST, OUT_RUN)


@triton.jit
def _output_pixels(offs_m, out_h, out_w, conv_stride_h, conv_stride_w, pad_h, pad_w):
    """Flat output-pixel indices -> ``(n, pixel in the image, ho, wo, top row, left column)``,
    the last two being the window's first input row/column (may be negative: padding)."""
    hw_out = out_h * out_w
    n_idx = offs_m // hw_out
    pix = offs_m % hw_out
    ho = pix // out_w
    wo = pix % out_w
    return n_idx, pix, ho, wo, ho * conv_stride_h - pad_h, wo * conv_stride_w - pad_w


@triton.jit
def in_bounds(v, bound):
    """0 <= v < bound as one unsigned comparison: a negative v wraps past any int32 bound.
    Triton compares a uint32 tensor with an int32 bound as unsigned (ISETP.*.U32); the bound
    may arrive as constexpr 1, which has no ``.to``. The K loops' padding checks (two compares
    and selects a row fewer than v >= 0 and v < bound)."""
    return v.to(tl.uint32) < bound


@triton.jit
def window_tap_bits(h_base, w_base, mask_m, in_h, in_w, dil_h, dil_w, KH: tl.constexpr,
                    KW: tl.constexpr):
    """Which taps of each row's KH x KW window fall inside the input: int32 bits, tap
    t = r * KW + s at bit t, 0 for rows past the end (mask_m False); KH * KW <= 31. Tap (r, s)
    reads row h_base + r * dil_h and column w_base + s * dil_w (the dgrad passes its phase's
    first output pixel and negative steps: conv_bwd._dgrad_kernel).

    Formed once before a K loop as (taps of the rows inside) & (taps of the columns inside):
    KH + KW compares a row instead of two a row and step -- in the loop a step's row mask is
    then one AND with the step's tap bit. The loop had formed it from two compares and a chain
    of selects a row (nine instructions for each of the eight rows a thread loads, sm_90)."""
    rows_inside = tl.zeros_like(h_base)
    for r in tl.static_range(KH):
        rows_inside |= tl.where(in_bounds(h_base + r * dil_h, in_h), ((1 << KW) - 1) << (r * KW), 0)
    cols_inside = tl.zeros_like(w_base)
    for s in tl.static_range(KW):
        column = 0
        for r in tl.static_range(KH):
            column |= 1 << (r * KW + s)
        cols_inside |= tl.where(in_bounds(w_base + s * dil_w, in_w), column, 0)
    return tl.where(mask_m, rows_inside & cols_inside, 0)


@triton.jit
def _accumulate_step(acc, sumsq, x_tile, w_tile, DOT_PRECISION: tl.constexpr,
                     UPCAST_DOT: tl.constexpr, NORMS_IN_LOOP: tl.constexpr):
    """One K step of the implicit GEMM: ``acc += x_tile @ w_tile`` and, with NORMS_IN_LOOP, the
    patch norms' sums of squares ``sumsq += rowsum(x_tile^2)`` (in fp32: fp16 x^2 overflows for
    |x| > 256) from the same loaded tile. x_tile [BM, BK], w_tile [BK, BN] in the input dtype;
    returns both. NORMS_IN_LOOP False: the norms come from the pre-pass (``sumsq`` unchanged).

    A plain row sum each step, not per-thread partials over groups of 8 K elements reduced after
    the loop: that variant (fewer shuffles, 830 -> 679 PTX instructions in the 128x128x64 bf16
    loop) gave wrong norms on an H200 for some tiles (bench.tile_sweep, 20261127-1540: relative
    errors 4e-3 to 0.12 where the pre-pass tiles gave 1.6e-3), so it was taken out."""
    if NORMS_IN_LOOP:
        x_f32 = x_tile.to(tl.float32)
        sumsq += tl.sum(x_f32 * x_f32, axis=1)
    if UPCAST_DOT:
        x_f32 = x_tile.to(tl.float32)
        acc = tl.dot(x_f32, w_tile.to(tl.float32), acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(x_tile, w_tile, acc, input_precision=DOT_PRECISION)
    return acc, sumsq


@triton.jit
def _window_sum(q_ptr, n_idx, g, groups, h_base, w_base, mask_m, in_h, in_w, dil_h, dil_w,
                KH: tl.constexpr, KW: tl.constexpr):
    """Sum of q [N, G, H, W] (fp32 contiguous) over each output pixel's KH x KW window (taps
    in padding count 0): ``[BM]`` fp32, the patch sums of squares from the pre-pass."""
    q_rows = q_ptr + (n_idx.to(tl.int64) * groups + g) * (in_h * in_w)
    total = tl.zeros(mask_m.shape, dtype=tl.float32)
    for tap in range(KH * KW):
        hi = h_base + (tap // KW) * dil_h
        wi = w_base + (tap % KW) * dil_w
        inside = mask_m & (hi >= 0) & (hi < in_h) & (wi >= 0) & (wi < in_w)
        total += tl.load(q_rows + hi * in_w + wi, mask=inside, other=0.0)
    return total


@triton.jit
def gemm_tile_of_program(pid, groups, m_rows, n_cols, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(group, M tile, N tile)`` of a GEMM forward program: the group fastest (neighbouring
    programs read neighbouring channels of grouped convs), then GROUP_M consecutive M tiles
    sweep all N tiles before moving on, so the input rows of a band stay in L2 while every
    filter tile passes over them."""
    g = pid % groups
    pid_mn = pid // groups
    num_pid_m = tl.cdiv(m_rows, BLOCK_M)
    num_pid_n = tl.cdiv(n_cols, BLOCK_N)
    num_pid_in_band = GROUP_M * num_pid_n
    first_pid_m = (pid_mn // num_pid_in_band) * GROUP_M
    band_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid_mn % num_pid_in_band) % band_m
    pid_n = (pid_mn % num_pid_in_band) // band_m
    return g, pid_m, pid_n


@triton.jit
def _sphere_conv_fwd_kernel(
    x_ptr, w_ptr, w_sqnorm_ptr, bias_ptr, k_ptr, y_ptr, c_ptr, rx_ptr, q_ptr,
    n_pixels, c_out_per_group, c_in_per_group, groups,
    in_h, in_w, out_h, out_w,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    eps,
    KH: tl.constexpr, KW: tl.constexpr,
    OPERATOR: tl.constexpr, HAS_BIAS: tl.constexpr, CHANNEL_CHUNKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    STORE_C: tl.constexpr, NORMS_FROM_Q: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
    OUT_PIXELS_FAST: tl.constexpr, OUT_RUN: tl.constexpr, C_ALIGN: tl.constexpr,
    N_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Implicit-GEMM SphereConv2d forward; program = (group, M tile, N tile).

    Pointers (Cg = C_in/G, Og = C_out/G):
      x_ptr      [N, C_in, H, W] input, any strides (stride_xn, stride_xc, stride_xh, stride_xw);
                 channels_last (stride_xc == 1) gives contiguous K loads.
      w_ptr      [C_out, KH, KW, Cg] packed filters, contiguous (row o at o*KH*KW*Cg), same
                 dtype as x.
      w_sqnorm_ptr [C_out] fp32, ||w_o||^2 (contiguous).
      bias_ptr   [C_out] contiguous, read only if HAS_BIAS.
      k_ptr      [C_out] contiguous sigmoid steepness, read only if OPERATOR == 2.
      y_ptr, c_ptr [N, C_out, Ho, Wo] outputs in x's dtype, both with strides
                 (stride_yn, stride_yc, stride_yh, stride_yw).
      rx_ptr     [N, G, Ho, Wo] fp32, contiguous; written by the N-tile-0 programs only.
      q_ptr      [N, G, H, W] fp32 contiguous: each input pixel's sum of squares over its
                 group's channels (the pre-pass programs of _prepare_operands_kernel),
                 read iff NORMS_FROM_Q.
    Scalars: n_pixels = N*Ho*Wo (< 2^31), Og, Cg, G, H, W, Ho, Wo, conv stride / padding /
      dilation, eps (inside both square roots).
    Constexprs:
      KH, KW          filter size.
      OPERATOR        0 linear, 1 cosine, 2 sigmoid (angular.OPERATOR_CODES).
      HAS_BIAS        add bias after g.
      CHANNEL_CHUNKS  True: K loop over (tap, chunk of BLOCK_K channels), needs Cg >= 16 to be
                      efficient; False: flat K loop with per-element (r, s, c) decomposition.
      DOT_PRECISION   tl.dot input_precision, "tf32" or "ieee" (matters for fp32 only).
      UPCAST_DOT      upcast dot operands to fp32 (bf16 under the CPU interpreter only, whose
                      bf16 dot is wrong; never set for GPU compiles).
      EMULATE_RTNE    round bf16 outputs to nearest by hand (CPU interpreter only, whose cast
                      truncates; never set for GPU compiles).
      STORE_C         write c (False: the caller saves y for the backward; c_ptr is then
                      any valid pointer, never stored through).
      NORMS_FROM_Q    patch norms as the KH x KW box sum of q after the K loop (the pre-pass)
                      instead of squares of the loaded x tiles inside it.
      WIDE_OFFSETS    int64 offsets inside an image too (the launcher sets it when one
                      sample's span could pass 2^30 elements); else int32 there (the sample
                      offset n * stride_xn is int64 either way).
      C_ALIGN, N_ALIGN the largest powers of two (at most 256) dividing c_in_per_group and
                      c_out_per_group (launch.pow2_factor): where they are multiples of the
                      tile's BLOCK_K / BLOCK_N no channel of a K step or filter of the tile is
                      missing, and the channel-chunk loop loads without channel masks (sm_90
                      bf16 128x128x64: 242 -> 189 SASS instructions a step). Constexprs of
                      the problem, not of the config, so the autotuner's pick decides.
      OUT_PIXELS_FAST y and c not channels_last (NCHW): stored with the lanes along the
                      pixels (epilogue.store_tile) -- across the channels, as Triton lays them
                      out for a flat pixel index, each lane wrote its own 32-byte sector.
      OUT_RUN         runs of this many pixels aligned and contiguous in y and c
                      (launch.pixel_run; 1 for channels_last): with OUT_PIXELS_FAST the
                      epilogue stores 16-byte vectors along the pixels (epilogue.pixel_runs).
      BLOCK_M/N/K     tile sizes (powers of two >= 16); GROUP_M: M tiles per L2 swizzle group.
    """
    g, pid_m, pid_n = gemm_tile_of_program(tl.program_id(0), groups, n_pixels, c_out_per_group,
                                           BLOCK_M, BLOCK_N, GROUP_M)
    TAP_BITS: tl.constexpr = KH * KW <= 31   # the rows' in-window taps as bits (window_tap_bits)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # int32: n_pixels < 2^31 (launcher)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < n_pixels
    mask_n = offs_n < c_out_per_group

    hw_out = out_h * out_w
    n_idx, pix, ho, wo, h_base, w_base = _output_pixels(offs_m, out_h, out_w, conv_stride_h,
                                                        conv_stride_w, pad_h, pad_w)

    x_rows = (x_ptr + n_idx.to(tl.int64) * stride_xn
              + (g * c_in_per_group).to(tl.int64) * stride_xc)  # [BM] pointers
    o_glob = g * c_out_per_group + offs_n
    k_total = KH * KW * c_in_per_group
    w_cols = w_ptr + o_glob.to(tl.int64) * k_total  # [BN] pointers

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)   # patch sums of squares (NORMS_IN_LOOP)

    # Each row's window origin, once: a step then adds tap offsets that are the same for every
    # row (a scalar in the channel-chunk loop, a [BLOCK_K] vector in the flat one) and compares
    # the origins against tap-shifted bounds, instead of forming hi, wi and hi * stride_xh +
    # wi * stride_xw per row and step (sm_90 bf16 3x3: 277 -> 233 SASS instructions a step at
    # 128x64x64, 290 -> 258 at 128x128x64; folding mask_m into the origins made it 245).
    if WIDE_OFFSETS:
        x_win = x_rows + (h_base.to(tl.int64) * stride_xh + w_base.to(tl.int64) * stride_xw)
    else:   # in-image offsets fit int32 (launcher): half the address arithmetic
        x_win = x_rows + (h_base * stride_xh + w_base * stride_xw)
    if CHANNEL_CHUNKS:
        n_chunks = tl.cdiv(c_in_per_group, BLOCK_K)
        if TAP_BITS:
            taps_inside = window_tap_bits(h_base, w_base, mask_m, in_h, in_w, dil_h, dil_w, KH, KW)
            tap_bit = 1
        # one flat loop over (tap, chunk) so the software pipeliner sees a single K loop; tap and
        # the chunk's first channel are carried from step to step (it // n_chunks by a runtime
        # divisor cost an integer division every step)
        tap = 0
        c0 = 0
        for it in range(0, KH * KW * n_chunks):
            r = tap // KW
            s = tap - r * KW
            dh = r * dil_h
            dw = s * dil_w
            if TAP_BITS:
                valid_m = (taps_inside & tap_bit) != 0
            else:
                valid_m = mask_m & in_bounds(h_base + dh, in_h) & in_bounds(w_base + dw, in_w)
            offs_c = c0 + tl.arange(0, BLOCK_K)
            mask_c = offs_c < c_in_per_group
            if WIDE_OFFSETS:
                tap_off = dh.to(tl.int64) * stride_xh + dw.to(tl.int64) * stride_xw
                chan_off = offs_c.to(tl.int64) * stride_xc
            else:
                tap_off = dh * stride_xh + dw * stride_xw
                chan_off = offs_c * stride_xc
            x_ptrs = x_win[:, None] + (tap_off + chan_off)[None, :]
            w_ptrs = w_cols[None, :] + (tap * c_in_per_group + offs_c)[:, None]
            if C_ALIGN % BLOCK_K == 0:   # every channel of the step exists
                x_tile = tl.load(x_ptrs, mask=valid_m[:, None], other=0.0)
                if N_ALIGN % BLOCK_N == 0:
                    w_tile = tl.load(w_ptrs)
                else:
                    w_tile = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                x_tile = tl.load(x_ptrs, mask=valid_m[:, None] & mask_c[None, :], other=0.0)
                w_tile = tl.load(w_ptrs, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
            acc, sumsq = _accumulate_step(acc, sumsq, x_tile, w_tile, DOT_PRECISION, UPCAST_DOT,
                                          not NORMS_FROM_Q)
            c0 += BLOCK_K
            wrap = c0 >= c_in_per_group
            tap += wrap.to(tl.int32)
            if TAP_BITS:
                tap_bit = tl.where(wrap, tap_bit << 1, tap_bit)
            c0 = tl.where(wrap, 0, c0)
    else:
        if TAP_BITS:
            taps_inside = window_tap_bits(h_base, w_base, mask_m, in_h, in_w, dil_h, dil_w, KH, KW)
        # each column's (tap, channel), carried from step to step: dividing k by the runtime
        # channel count every step cost triton 3.6 ~17 integer divisions a thread and step
        cin = tl.arange(0, BLOCK_K) % c_in_per_group
        tap = tl.arange(0, BLOCK_K) // c_in_per_group
        step_taps = BLOCK_K // c_in_per_group
        step_cin = BLOCK_K - step_taps * c_in_per_group
        for k0 in range(0, k_total, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_total
            r = tap // KW
            s = tap - r * KW
            dh = r * dil_h
            dw = s * dil_w
            if TAP_BITS:
                # each column's tap bit (none past K; the shift kept below 31 there), and an
                # element's mask one AND with its row's bits: the per-element compares of the
                # window bounds are per-row work before the loop
                tap_bit = tl.where(mask_k, 1 << tl.minimum(tap, 30), 0)
                valid = (taps_inside[:, None] & tap_bit[None, :]) != 0
            else:
                valid = (mask_m[:, None] & mask_k[None, :]
                         & in_bounds(h_base[:, None] + dh[None, :], in_h)
                         & in_bounds(w_base[:, None] + dw[None, :], in_w))
            if WIDE_OFFSETS:
                col_off = (dh.to(tl.int64) * stride_xh + dw.to(tl.int64) * stride_xw
                           + cin.to(tl.int64) * stride_xc)
            else:
                col_off = dh * stride_xh + dw * stride_xw + cin * stride_xc
            x_tile = tl.load(x_win[:, None] + col_off[None, :], mask=valid, other=0.0)
            w_ptrs = w_cols[None, :] + offs_k[:, None]
            w_tile = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc, sumsq = _accumulate_step(acc, sumsq, x_tile, w_tile, DOT_PRECISION, UPCAST_DOT,
                                          not NORMS_FROM_Q)
            cin += step_cin
            wrap = cin >= c_in_per_group
            cin = tl.where(wrap, cin - c_in_per_group, cin)
            tap += step_taps + wrap.to(tl.int32)

    if NORMS_FROM_Q:
        r_x = tl.sqrt(_window_sum(q_ptr, n_idx, g, groups, h_base, w_base, mask_m, in_h, in_w,
                                  dil_h, dil_w, KH, KW) + eps)
    else:
        r_x = tl.sqrt(sumsq + eps)
    out_row = (n_idx.to(tl.int64) * stride_yn + ho.to(tl.int64) * stride_yh
               + wo.to(tl.int64) * stride_yw)
    _store_gemm_tile(acc, g * c_out_per_group + pid_n * BLOCK_N, c_out_per_group * (g + 1),
                     1.0 / r_x, out_row, mask_m, w_sqnorm_ptr, eps, stride_yc, bias_ptr, k_ptr,
                     y_ptr, c_ptr, OPERATOR, HAS_BIAS, EMULATE_RTNE, STORE_C, OUT_PIXELS_FAST,
                     BLOCK_M, BLOCK_N, OUT_RUN)

    if pid_n == 0:
        # r_x is the same for every N tile of this M tile: one writer
        rx_offs = (n_idx.to(tl.int64) * groups + g) * hw_out + pix
        tl.store(rx_ptr + rx_offs, r_x, mask=mask_m)


# Depthwise filters of up to this many taps are loaded once a program and kept in registers (a
# thread's channels x taps: 36 for 3x3 at four channels a thread); larger ones -- 5x5 took
# 176-255 registers that way (sm_90, bf16) -- are loaded a tap at a time in every window.
MAX_CACHED_TAPS = 9
CACHED_TAPS = tl.constexpr(MAX_CACHED_TAPS)


@triton.jit
def depthwise_filter_taps(w_ptr, offs_c, mask_c, stride_wc, stride_wh, stride_ww, eps,
                          KH: tl.constexpr, KW: tl.constexpr):
    """The filters of BC depthwise channels for every pixel tile a program takes: ``(taps, wsq,
    inv_rw)`` -- ``taps`` for :func:`filter_tap` (up to CACHED_TAPS taps: a tuple of the KH*KW
    [BC] fp32 filter columns, tap = kh * KW + kw, loaded once; beyond: the channels' filter
    pointers, the columns loaded where used), wsq [BC] = sum of the squared taps (the filter
    norms squared: no filter-norm launch) and inv_rw = 1 / r_w = rsqrt(wsq + eps).

    w_ptr [C, 1, KH, KW] with strides (stride_wc, -, stride_wh, stride_ww); offs_c, mask_c
    [BC]. The loads are unmasked: lanes past the last channel read channel 0's taps (they are
    never stored), so a load needs no predicate and no zeroed destination."""
    w_rows = w_ptr + tl.where(mask_c, offs_c, 0).to(tl.int64) * stride_wc
    wv = _load_filter_tap(w_rows, 0, stride_wh, stride_ww, KW)
    wsq = wv * wv
    if KH * KW <= CACHED_TAPS:
        taps = (wv,)
        for tap in tl.static_range(1, KH * KW):
            wv = _load_filter_tap(w_rows, tap, stride_wh, stride_ww, KW)
            taps = taps + (wv,)
            wsq += wv * wv
    else:
        taps = (w_rows,)
        for tap in range(1, KH * KW):
            wv = _load_filter_tap(w_rows, tap, stride_wh, stride_ww, KW)
            wsq += wv * wv
    return taps, wsq, tl.rsqrt(wsq + eps)


@triton.jit
def _load_filter_tap(w_rows, tap, stride_wh, stride_ww, KW: tl.constexpr):
    return tl.load(w_rows + ((tap // KW) * stride_wh + (tap % KW) * stride_ww)).to(tl.float32)


@triton.jit
def filter_tap(taps, tap, stride_wh, stride_ww, KH: tl.constexpr, KW: tl.constexpr):
    """Tap ``tap`` (kh * KW + kw) of :func:`depthwise_filter_taps`' filters, [BC] fp32: from its
    cache (up to CACHED_TAPS taps; ``tap`` a constexpr then), else loaded through the filter
    pointers in ``taps[0]``."""
    if KH * KW <= CACHED_TAPS:
        wv = taps[tap]
    else:
        wv = _load_filter_tap(taps[0], tap, stride_wh, stride_ww, KW)
    return wv


@triton.jit
def depthwise_pixel_tile(tile, n_images, height, width, ROW_W: tl.constexpr, BM: tl.constexpr):
    """Pixel tile ``tile`` of an [n_images, height, width] pixel grid: ``(n, h, w, mask)``, each
    [BM] (n a scalar for row tiles), int32.

    ROW_W == 0: BM consecutive pixels in (n, h, w) order -- for channels_last tensors, whose
    channels are the contiguous axis, so the pixels' order does not matter.
    ROW_W > 0: a block of BM // TW rows x TW columns of one image, TW = min(ROW_W, BM) (the
    launcher's next power of two of the width, capped) -- for NCHW tensors, whose pixels along
    a row are the contiguous axis: the lanes of a load then run along a row, and Triton sees
    the TW-long contiguity (no division by a runtime width splits it) and coalesces along it.
    The tiles of an image run row block by row block, TW-wide column blocks within."""
    r = tl.arange(0, BM)
    if ROW_W == 0:
        offs = tile * BM + r
        mask = offs < n_images * height * width
        n = offs // (height * width)
        hw = offs % (height * width)
        h = hw // width
        w = hw % width
    else:
        TW: tl.constexpr = ROW_W if ROW_W < BM else BM
        col_tiles = tl.cdiv(width, TW)
        image_tiles = tl.cdiv(height, BM // TW) * col_tiles
        n = tile // image_tiles
        t = tile % image_tiles
        h = (t // col_tiles) * (BM // TW) + r // TW
        w = (t % col_tiles) * TW + r % TW
        # a tile past the last image (a program's last row blocks) has no rows
        mask = (h < tl.where(n < n_images, height, 0)) & (w < width)
    return n, h, w, mask


@triton.jit
def depthwise_group_tile(tile, n_images, height, width, BM: tl.constexpr,
                         PIX_GROUP: tl.constexpr):
    """Tile ``tile`` of BM consecutive pixels of an [n_images, height, width] grid (width a
    multiple of PIX_GROUP; channels_last flat tiles) as BM // PIX_GROUP groups of PIX_GROUP
    side-by-side pixels: ``(n, h, w, mask)``, each [BM // PIX_GROUP], w the group's first
    column -- the same pixels as :func:`depthwise_pixel_tile`'s tile ``tile`` (ROW_W 0), so
    the grid and tile count are those of single pixels."""
    n, h, w, mask = depthwise_pixel_tile(tile, n_images, height, width // PIX_GROUP, 0,
                                         BM // PIX_GROUP)
    return n, h, w * PIX_GROUP, mask


def depthwise_tile_count(n_images: int, height: int, width: int, row_w: int, bm: int) -> int:
    """How many :func:`depthwise_pixel_tile` tiles of BM pixels cover the grid (host side)."""
    if row_w == 0:
        return _cdiv(n_images * height * width, bm)
    tw = min(row_w, bm)
    return n_images * _cdiv(height, bm // tw) * _cdiv(width, tw)


# Row tiles are at most this wide (wider rows take several column blocks).
MAX_ROW_W = 64


def depthwise_row_width(t: torch.Tensor, width: int) -> int:
    """The ROW_W constexpr of the depthwise kernels for tensor ``t`` [N, C, H, W] whose pixel
    grid is ``width`` wide: 0 (flat pixel tiles) when its channels are contiguous (channels_last),
    else (:func:`pixels_fast`) the width's next power of two up to MAX_ROW_W (row tiles, see
    :func:`depthwise_pixel_tile`)."""
    if not pixels_fast(t):
        return 0
    return min(_next_pow2(max(width, 1)), MAX_ROW_W)


@triton.jit
def depthwise_window(x_ptr, taps, n_idx, h_base, w_base, mask_m, offs_c, mask_c, in_h, in_w,
                     stride_xn, stride_xc, stride_xh, stride_xw, stride_wh, stride_ww, dil_h,
                     dil_w, KH: tl.constexpr, KW: tl.constexpr, BM: tl.constexpr,
                     BC: tl.constexpr, ROWS_FAST: tl.constexpr):
    """The depthwise window of BM output pixels x BC channels, fp32: ``(s, q)`` with s [BM, BC]
    = sum over taps of w x and q [BM, BC] = sum of x^2 (the patch norms squared, one per pixel
    and channel); ``taps`` from :func:`depthwise_filter_taps` (filter strides stride_wh,
    stride_ww for taps that are not cached).

    The one definition of c for pure depthwise convs: the forward's epilogue and the backward's
    recompute (conv_bwd._depthwise_prep_kernel) both take it with :func:`depthwise_inv_norms`.
    n_idx, h_base, w_base, mask_m [BM]: image, window origin (may be negative: padding), valid
    pixel. offs_c, mask_c [BC]: channels. x_ptr [N, C, H, W] with strides (stride_x*).
    ROWS_FAST: the loads are laid along the pixels (NCHW: :func:`tile_ptrs`)."""
    # each row's window origin once (it may lie in the padding: only masked lanes point
    # there); a tap adds a scalar offset and compares the origin against tap-shifted bounds
    x_base = tile_ptrs(x_ptr, n_idx.to(tl.int64) * stride_xn + h_base.to(tl.int64) * stride_xh
                       + w_base.to(tl.int64) * stride_xw,
                       offs_c.to(tl.int64) * stride_xc, ROWS_FAST)
    s = tl.zeros((BM, BC), dtype=tl.float32)
    q = tl.zeros((BM, BC), dtype=tl.float32)
    for tap in tl.static_range(KH * KW):
        dh = (tap // KW) * dil_h
        dw = (tap % KW) * dil_w
        inside = (mask_m & (h_base >= -dh) & (h_base < in_h - dh) & (w_base >= -dw)
                  & (w_base < in_w - dw))
        x_ptrs = x_base + (dh.to(tl.int64) * stride_xh + dw.to(tl.int64) * stride_xw)
        xv = load_tile(x_ptrs, inside, mask_c, ROWS_FAST).to(tl.float32)
        s += xv * filter_tap(taps, tap, stride_wh, stride_ww, KH, KW)[None, :]
        q += xv * xv
    return s, q


@triton.jit
def depthwise_window_group(x_ptr, taps, n_idx, h_base, w_base, mask_g, offs_c, mask_c, in_h,
                           in_w, stride_xn, stride_xc, stride_xh, stride_xw, dil_h,
                           KH: tl.constexpr, KW: tl.constexpr, PIX_GROUP: tl.constexpr):
    """:func:`depthwise_window` for PIX_GROUP horizontally adjacent output pixels at a time,
    stride 1 and dilation 1 along the width: ``(s, q)``, tuples of PIX_GROUP [BG, BC] fp32
    tiles, s[p] and q[p] those of the pixels whose window starts at column w_base + p.

    Such windows overlap: the PIX_GROUP + KW - 1 input columns of a kernel row serve all of
    them, so each input element is loaded, converted and masked once for up to KW outputs
    instead of once for each (a 3x3 filter over groups of four: 18 loads where single pixels
    take 36). Every output still sums its own taps in tap order (kernel row by row, column
    by column), the same floating-point operations as :func:`depthwise_window`'s: the two give
    the same bits. Only cached taps (KH * KW <= CACHED_TAPS; the launcher's configs).

    n_idx, h_base, w_base, mask_g [BG]: image, first window row / column of the group's
    first pixel (may be negative: padding), valid group; offs_c, mask_c [BC]. x_ptr [N, C, H,
    W] with strides (stride_x*); channels_last (the loads run along the channels)."""
    x_base = (x_ptr + (n_idx.to(tl.int64) * stride_xn + h_base.to(tl.int64) * stride_xh
                       + w_base.to(tl.int64) * stride_xw)[:, None]
              + (offs_c.to(tl.int64) * stride_xc)[None, :])
    s = (tl.zeros((mask_g.shape[0], offs_c.shape[0]), dtype=tl.float32),) * PIX_GROUP
    q = s
    for r in tl.static_range(KH):
        dh = r * dil_h
        row_ok = mask_g & (h_base >= -dh) & (h_base < in_h - dh)
        for j in tl.static_range(PIX_GROUP + KW - 1):
            inside = row_ok & (w_base >= -j) & (w_base < in_w - j)
            xv = tl.load(x_base + (dh.to(tl.int64) * stride_xh + j * stride_xw),
                         mask=inside[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            for p in tl.static_range(PIX_GROUP):
                if j - p >= 0 and j - p < KW:   # tap (r, j - p) of pixel p
                    wv = taps[r * KW + j - p]
                    s = s[:p] + (s[p] + xv * wv[None, :],) + s[p + 1:]
                    q = q[:p] + (q[p] + xv * xv,) + q[p + 1:]
    return s, q


@triton.jit
def interleave_rows(tiles, PIX_GROUP: tl.constexpr):
    """PIX_GROUP [BG, BC] tiles (a tuple of 2 or 4) as one [BG * PIX_GROUP, BC] tile whose row
    g * PIX_GROUP + p is row g of tiles[p]. join / permute / reshape only rename registers:
    each thread holds the same rows and columns of every tile."""
    if PIX_GROUP == 2:
        t = tl.permute(tl.join(tiles[0], tiles[1]), (0, 2, 1))
    else:
        # [BG, BC, lo, hi] with p = 2 hi + lo -> [BG, hi, lo, BC]
        t = tl.permute(tl.join(tl.join(tiles[0], tiles[1]), tl.join(tiles[2], tiles[3])),
                       (0, 3, 2, 1))
    return tl.reshape(t, (tiles[0].shape[0] * PIX_GROUP, tiles[0].shape[1]))


@triton.jit
def depthwise_inv_norms(q, inv_rw, eps):
    """``1 / (r_x r_w)`` [BM, BC] and ``1 / r_x`` [BM, BC] from :func:`depthwise_window`'s q
    (eps inside the square root, as in inv_rw from :func:`depthwise_filter_taps`), so
    c = clamp(s * inv_norms) everywhere it is formed."""
    inv_rx = tl.rsqrt(q + eps)
    return inv_rx * inv_rw[None, :], inv_rx


@triton.jit
def _sphere_conv_dw_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, k_ptr, y_ptr,
    n_pixels, channels,
    in_h, in_w, out_h, out_w,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_wc, stride_wh, stride_ww,
    conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
    eps,
    KH: tl.constexpr, KW: tl.constexpr,
    OPERATOR: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    ROW_W: tl.constexpr, PIX_GROUP: tl.constexpr = 1,
):
    """Depthwise SphereConv2d forward (G = C_in = C_out); program = (ROW_BLOCKS consecutive
    tiles of BLOCK_M pixels, channel tile). Reads x and the filters, writes y: the only launch
    of the forward, and it saves nothing (the backward recomputes c and r_x from x and w:
    ``conv_bwd._depthwise_prep_kernel``).

    Pointers (C = channels = G):
      x_ptr      [N, C, H, W] input, strides (stride_xn, stride_xc, stride_xh, stride_xw);
                 channels_last makes the BLOCK_C channels of a pixel contiguous.
      w_ptr      [C, 1, KH, KW] filters in x's dtype, strides (stride_wc, -, stride_wh, stride_ww).
      bias_ptr [C] (if HAS_BIAS).   k_ptr [C] (if sigmoid).
      y_ptr      [N, C, Ho, Wo], strides (stride_yn, stride_yc, stride_yh, stride_yw).
    Scalars: n_pixels = N*Ho*Wo (< 2^31), C, H, W, Ho, Wo, conv stride/padding/dilation, eps.
    Constexprs: KH, KW filter size (taps unrolled); OPERATOR 0 linear / 1 cosine / 2 sigmoid;
      HAS_BIAS; EMULATE_RTNE (CPU interpreter + bf16 only: round outputs to nearest by hand);
      BLOCK_M pixels and BLOCK_C channels a tile; ROW_BLOCKS pixel tiles a program, which share
      its filter loads (a thread's channels' KH*KW taps, loaded and converted once); ROW_W 0:
      tiles of consecutive pixels (channels_last), else of whole output rows up to ROW_W wide,
      read and written along the pixels (NCHW; :func:`depthwise_pixel_tile`); PIX_GROUP > 1
      (channels_last, stride and dilation 1 along the width, Wo a multiple of it, cached
      taps: prune_dw_configs): a tile is BLOCK_M // PIX_GROUP groups of PIX_GROUP
      horizontally adjacent pixels, whose windows share their input columns
      (:func:`depthwise_window_group`; the same bits as single pixels).
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    taps, wsq, inv_rw = depthwise_filter_taps(w_ptr, offs_c, mask_c, stride_wc, stride_wh,
                                              stride_ww, eps, KH, KW)
    out_mask_c = mask_c[None, :]
    out_cols = offs_c.to(tl.int64)[None, :] * stride_yc
    n_images = n_pixels // (out_h * out_w)
    for rb in range(ROW_BLOCKS):
        tile = pid_m * ROW_BLOCKS + rb
        if PIX_GROUP > 1:
            n_idx, ho, wo, mask_m = depthwise_group_tile(tile, n_images, out_h, out_w, BLOCK_M,
                                                         PIX_GROUP)
            s_group, q_group = depthwise_window_group(
                x_ptr, taps, n_idx, ho * conv_stride_h - pad_h, wo - pad_w, mask_m, offs_c,
                mask_c, in_h, in_w, stride_xn, stride_xc, stride_xh, stride_xw, dil_h, KH, KW,
                PIX_GROUP)
            # back to one [BLOCK_M, BLOCK_C] tile of consecutive pixels (row g * PIX_GROUP +
            # p is pixel p of group g), so the epilogue's per-channel work is done once
            s = interleave_rows(s_group, PIX_GROUP)
            q = interleave_rows(q_group, PIX_GROUP)
            # and the epilogue's pixels as a single-pixel tile has them, formed only now: the
            # group coordinates interleaved would cross threads (a shared-memory round trip,
            # 1932 -> 2000 SASS instructions a 128 x 64 bf16 tile), and this tile formed
            # before the windows stays live through them (2955 -> 2976, 228 -> 245 registers)
            n_idx, ho, wo, mask_m = depthwise_pixel_tile(tile, n_images, out_h, out_w, 0,
                                                         BLOCK_M)
        else:
            n_idx, ho, wo, mask_m = depthwise_pixel_tile(tile, n_images, out_h, out_w, ROW_W,
                                                         BLOCK_M)
            s, q = depthwise_window(x_ptr, taps, n_idx, ho * conv_stride_h - pad_h,
                                    wo * conv_stride_w - pad_w, mask_m, offs_c, mask_c, in_h,
                                    in_w, stride_xn, stride_xc, stride_xh, stride_xw,
                                    stride_wh, stride_ww, dil_h, dil_w, KH, KW, BLOCK_M,
                                    BLOCK_C, ROW_W > 0)
        inv_norms, _ = depthwise_inv_norms(q, inv_rw, eps)
        out_row = (n_idx.to(tl.int64) * stride_yn + ho.to(tl.int64) * stride_yh
                   + wo.to(tl.int64) * stride_yw)
        out_offs = out_row[:, None] + out_cols
        out_mask = mask_m[:, None] & out_mask_c
        # y_ptr stands in for c_ptr: STORE_C False never stores through it
        store_sphere_tile(s, inv_norms, offs_c, mask_c, out_offs, out_mask, bias_ptr, k_ptr,
                          y_ptr, y_ptr, OPERATOR, HAS_BIAS, EMULATE_RTNE, False)


@triton.jit
def stage_input_tile(
    x_ptr, q_ptr, xs_ptr, pid_p, g, img_tiles, HW, W, CG, CG_PAD, G,
    stride_xn, stride_xc, stride_xh, stride_xw,
    STORE_Q: tl.constexpr, STAGE_X: tl.constexpr, DENSE_PLANE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One pass over BLOCK_P input pixels of one image and group g's channels (BLOCK_C a step):
    tile ``pid_p`` = (image n = pid_p // img_tiles, pixels (pid_p % img_tiles) * BLOCK_P ...).

    STORE_Q: q[n, g, h, w] = sum over the group's channels of x^2 (fp32: fp16 squares overflow
    for |x| > 256), the pre-pass patch norms. STAGE_X: the same loaded values copied to the
    staged input xs [N, H, W, G, CG_PAD] (contiguous, x's dtype; channels CG..CG_PAD written as
    zeros), the layout the GEMM kernels read fastest (see ``staged_channels``).
    x_ptr [N, G*CG, H, W] with strides (stride_xn, stride_xc, stride_xh, stride_xw); q_ptr
    [N, G, H, W] fp32 contiguous (stored iff STORE_Q); xs_ptr as above (stored iff STAGE_X).
    DENSE_PLANE (:func:`dense_plane`: rows W strides apart, as in NCHW and channels_last, or a
    single row): a pixel's offset is hw * stride_xw, so for NCHW the tile's pixels are visibly
    contiguous and the loads coalesce along them. Called by _prepare_operands_kernel here and
    by conv_bwd's prep kernel (the weight gradient's staged input)."""
    n = (pid_p // img_tiles).to(tl.int64)
    hw = (pid_p % img_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = hw < HW
    if DENSE_PLANE:
        row = n * stride_xn + hw.to(tl.int64) * stride_xw
    else:
        row = n * stride_xn + (hw // W).to(tl.int64) * stride_xh + (hw % W).to(tl.int64) * stride_xw
    staged_row = (n * HW + hw) * (G * CG_PAD) + g * CG_PAD
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, CG_PAD if STAGE_X else CG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        chan = (g * CG + offs_c).to(tl.int64) * stride_xc
        v = tl.load(x_ptr + row[:, None] + chan[None, :],
                    mask=p_mask[:, None] & (offs_c < CG)[None, :], other=0.0)
        if STAGE_X:
            tl.store(xs_ptr + staged_row[:, None] + offs_c[None, :], v,
                     mask=p_mask[:, None] & (offs_c < CG_PAD)[None, :])
        if STORE_Q:
            vf = v.to(tl.float32)
            acc += vf * vf
    if STORE_Q:
        tl.store(q_ptr + (n * G + g) * HW + hw, tl.sum(acc, axis=1), mask=p_mask)


@triton.jit
def _pack_filter(
    w_ptr, packed_ptr, sqnorm_ptr, o, c_in_per_group, cg_pad,
    stride_wo, stride_wc, stride_wh, stride_ww,
    KH: tl.constexpr, KW: tl.constexpr, WRITE_PACKED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One filter program of _prepare_operands_kernel: filter o (int64) copied into the packed
    (kh, kw, c) order with cg_pad >= c_in_per_group channels a tap (the padding written as
    zeros; if WRITE_PACKED) and its squared norm summed in fp32, BLOCK elements a step.
    Pointers as _prepare_operands_kernel."""
    k_total = KH * KW * cg_pad
    sumsq = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, k_total, BLOCK):
        offs_k = k0 + tl.arange(0, BLOCK)
        mask = offs_k < k_total
        cin = offs_k % cg_pad
        tap = offs_k // cg_pad
        r = tap // KW
        s = tap - r * KW
        vals = tl.load(w_ptr + o * stride_wo + cin.to(tl.int64) * stride_wc
                       + r.to(tl.int64) * stride_wh + s.to(tl.int64) * stride_ww,
                       mask=mask & (cin < c_in_per_group), other=0.0)
        if WRITE_PACKED:
            tl.store(packed_ptr + o * k_total + offs_k, vals, mask=mask)
        v = vals.to(tl.float32)
        sumsq += v * v
    tl.store(sqnorm_ptr + o, tl.sum(sumsq, axis=0))


@triton.jit
def _prepare_operands_kernel(
    x_ptr, q_ptr, xs_ptr, w_ptr, packed_ptr, sqnorm_ptr,
    n_sq_programs, img_tiles, HW, W, c_in_per_group, cg_pad, groups,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wh, stride_ww,
    KH: tl.constexpr, KW: tl.constexpr, WRITE_PACKED: tl.constexpr, STORE_Q: tl.constexpr,
    STAGE_X: tl.constexpr, DENSE_PLANE: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Everything the conv kernel needs before it runs, in one launch: the pass over the input
    (pre-pass patch norms and/or the staged input) and the filter preparation.  1-D grid of
    ``n_sq_programs + C_out`` programs:

    * pid < n_sq_programs (= N * img_tiles * G when STORE_Q or STAGE_X, else 0): input tile
      ``pid // G`` (image-major, ``img_tiles = cdiv(H*W, BLOCK_P)`` a image) of group ``pid % G``
      (group fastest: neighbouring programs read neighbouring channels of the same pixels):
      :func:`stage_input_tile`;
    * pid >= n_sq_programs: filter o = pid - n_sq_programs, packed into the GEMM's K order
      (kh, kw, c) with cg_pad channels a tap and ||w_o||^2 summed in fp32.

    Pointers (Cg = c_in_per_group = C_in/G; Cp = cg_pad, Cg rounded up to 16 when the input
    is staged, else Cg; K = KH*KW*Cp):
      x_ptr       [N, G*Cg, H, W] input, any strides (stride_xn, stride_xc, stride_xh,
                  stride_xw); read by the input programs only.
      q_ptr       [N, G, H, W] fp32 contiguous, written iff STORE_Q (else any fp32 output).
      xs_ptr      [N, H, W, G, Cp] contiguous in x's dtype, the staged input, written iff
                  STAGE_X (else any output).
      w_ptr       [C_out, Cg, KH, KW] filters, any strides (stride_wo, stride_wc, stride_wh,
                  stride_ww).
      packed_ptr  [C_out, KH, KW, Cp] contiguous output in w's dtype (row o at o*K); written
                  only if WRITE_PACKED (else any output, never a view of w).
      sqnorm_ptr  [C_out] fp32 output, ||w_o||^2.
    Scalars: n_sq_programs, img_tiles, HW = H*W, W, Cg, Cp, G.
    Constexprs: KH, KW filter size; WRITE_PACKED False when w is already in packed order
      (channels_last weight, Cp == Cg), so only the norms are computed; STORE_Q, STAGE_X,
      DENSE_PLANE as stage_input_tile; BLOCK filter elements per step; BLOCK_P pixels x BLOCK_C
      channels per input step.
    """
    pid = tl.program_id(0)
    if pid < n_sq_programs:
        stage_input_tile(x_ptr, q_ptr, xs_ptr, pid // groups, pid % groups, img_tiles, HW, W,
                         c_in_per_group, cg_pad, groups, stride_xn, stride_xc, stride_xh,
                         stride_xw, STORE_Q, STAGE_X, DENSE_PLANE, BLOCK_P, BLOCK_C)
    else:
        _pack_filter(w_ptr, packed_ptr, sqnorm_ptr, (pid - n_sq_programs).to(tl.int64),
                     c_in_per_group, cg_pad, stride_wo, stride_wc, stride_wh, stride_ww, KH, KW,
                     WRITE_PACKED, BLOCK)


def _dw_configs():
    """Depthwise tiles: BLOCK_M pixels x BLOCK_C channels (contiguous in channels_last), 8
    warps (no tensor cores; with 4 the unrolled taps' loads in flight push a tile to 255
    registers), ROW_BLOCKS tiles a program. The kernel is bound by issuing instructions more
    than by memory (an H200 runs its old build's SASS for edge.depthwise, 64x256x28x28, in
    ~48 us at full issue rate; 107 us measured, cuDNN 55, 20261127-1606), and a thread's
    channels' filter taps -- KH*KW scalar loads, conversions and squares a channel -- cost as
    much as a pixel row's window: a program that takes several tiles loads them once. SASS an
    element (sm_90, bf16, 3x3, linear): 64x64 one tile 109, two 88; 32x64 132 / 90; 32x32 156
    / 112 -- at 140 / 210, 77 / 154 and 48 / 80 registers.

    PIX_GROUP > 1 (_sphere_conv_dw_fwd_kernel; only where prune_dw_configs lets it: Wo a
    multiple of it, stride and dilation 1 along the width, channels_last, cached taps): groups
    of side-by-side pixels share their windows' input columns. A tile's loop, SASS an element
    (sm_90, bf16, 3x3, two tiles a program; linear / sigmoid), registers: 64 x 64 single pixels
    75.2 / 116.9, 212 / 179; groups of 4 69.2 / 101.9 at 127 (two CTAs an SM), 128 x 64 in
    groups of 4 60.4 / 92.3 at 243 / 228; 64 x 64 in groups of 2 (Wo = 14) 69.3 / 111.6 at
    176."""
    def cfg(block_m, block_c, row_blocks, pix_group=1):
        return triton.Config({"BLOCK_M": block_m, "BLOCK_C": block_c, "ROW_BLOCKS": row_blocks,
                              "PIX_GROUP": pix_group}, num_warps=8, num_stages=1)
    return [
        # 64 channels x 64 pixels, two tiles a program: the fewest instructions an element of
        # the single-pixel tiles, one CTA an SM
        cfg(64, 64, 2),
        # groups of four pixels: two CTAs an SM at 64 x 64, the fewest instructions at 128 x 64
        cfg(64, 64, 2, 4),
        cfg(128, 64, 2, 4),
        # groups of two (Wo = 14, 2 mod 4)
        cfg(64, 64, 2, 2),
        # 32 channels x 128 pixels: for C < 64 (fewer masked lanes)
        cfg(128, 32, 1),
        # 64 channels x 32 pixels, two tiles: as few instructions, shorter programs
        cfg(32, 64, 2),
        # 32 x 32, four tiles a program: 80 registers, three CTAs an SM
        cfg(32, 32, 4),
        # 32 x 32 alone: 48 registers, five CTAs an SM, the most programs for small layers
        cfg(32, 32, 1),
    ]


def _dw_row_configs():
    """Depthwise tiles for row tiles (NCHW: ROW_W > 0, see depthwise_pixel_tile). Their lanes
    run along the pixels, so a thread holds several channels of one pixel -- each with its KH*KW
    cached taps -- where channels_last's threads hold eight channels of two pixels: narrow
    channel tiles keep that in registers (64 x 64 took 255 registers and spilled, sm_90 bf16).
    The NCHW loads cannot be vectorised (the padding offsets the window from any alignment
    Triton can prove), one 16-bit load an element and tap against channels_last's eight. SASS
    an element (sm_90, bf16, 3x3, linear; sigmoid in brackets), registers: 64 x 16 x 2 with 4
    warps 106 (173), 234; with 8 warps 123 (189), 128; 32 x 16 x 4 with 4 warps 122 (189), 127;
    64 x 16 alone 161 (227) with the filter loads, 96. The NCHW build before row tiles (the
    channels_last tiles with a warp's lanes across the channels: a sector a lane, 32 a load)
    took 178-223 an element over those tiles, 96-255 registers."""
    def cfg(block_m, block_c, row_blocks, warps):
        return triton.Config({"BLOCK_M": block_m, "BLOCK_C": block_c, "ROW_BLOCKS": row_blocks,
                              "PIX_GROUP": 1}, num_warps=warps, num_stages=1)
    return [
        cfg(64, 16, 2, 4),    # the fewest instructions an element, 8 warps an SM
        cfg(64, 16, 2, 8),    # 16 warps an SM
        cfg(32, 16, 4, 4),    # rows up to 32 wide, 16 warps an SM
        cfg(64, 16, 1, 4),    # the most programs, 20 warps an SM: small layers
        cfg(128, 16, 1, 8),   # rows of 64 (two a tile), 16 warps an SM
    ]


def pixel_groups_fit(pix_group, out_w, conv_stride_w, dil_w, row_w, taps) -> bool:
    """Whether _sphere_conv_dw_fwd_kernel may take its pixels in groups of ``pix_group``:
    side by side in one row (Wo a multiple of it), their windows one input column apart
    (stride and dilation 1 along the width), tiles of consecutive pixels (channels_last:
    ``row_w`` 0) and the filter's taps cached (at most MAX_CACHED_TAPS)."""
    return pix_group == 1 or (out_w % pix_group == 0 and conv_stride_w == 1 and dil_w == 1
                              and row_w == 0 and taps <= MAX_CACHED_TAPS)


def prune_dw_configs(configs, named_args, **kwargs):
    """The configs a launch may take: groups of pixels only where they fit
    (:func:`pixel_groups_fit`; the arguments it reads are in the autotuning key), and several
    pixel tiles a program only for filters whose taps stay cached (at most MAX_CACHED_TAPS):
    a larger filter's columns are loaded in every window, and the compiler hoists those loads
    out of the tile loop -- 5x5 at 32 x 32 x 4 took 245 registers."""
    def arg(name):
        return int(kwargs.get(name, named_args.get(name, 1)))

    taps = arg("KH") * arg("KW")
    configs = [c for c in configs
               if pixel_groups_fit(c.kwargs.get("PIX_GROUP", 1), arg("out_w"),
                                   arg("conv_stride_w"), arg("dil_w"), arg("ROW_W"), taps)]
    if taps <= MAX_CACHED_TAPS:
        return configs
    single = [c for c in configs if c.kwargs["ROW_BLOCKS"] == 1]
    if single:
        return single
    first = configs[0]   # e.g. SPHEREOPS_AUTOTUNE=0: its one config, a tile a program
    return [triton.Config({**first.kwargs, "ROW_BLOCKS": 1}, num_warps=first.num_warps,
                          num_stages=first.num_stages)]


def _dw_interpreter_config():
    return triton.Config({"BLOCK_M": 32, "BLOCK_C": 16, "ROW_BLOCKS": 2, "PIX_GROUP": 1},
                         num_warps=4, num_stages=1)


# SPHEREOPS_AUTOTUNE=0 skips autotuning (one fixed config per kernel): first-call latency of
# a few compiles instead of one per config, e.g. for test runs on a GPU.
_AUTOTUNE = env_switch("SPHEREOPS_AUTOTUNE", True)

if _INTERPRET:
    _gemm_configs, _dw_cfgs = [conv_fwd_interpreter_config()], [_dw_interpreter_config()]
    _dw_row_cfgs = _dw_cfgs
elif not _AUTOTUNE:
    _gemm_configs, _dw_cfgs = [conv_fwd_default_config()], _dw_configs()[:1]
    _dw_row_cfgs = _dw_row_configs()[:1]
else:
    _gemm_configs, _dw_cfgs, _dw_row_cfgs = conv_fwd_configs(), _dw_configs(), _dw_row_configs()

_sphere_conv_fwd_autotuned = triton.autotune(
    configs=_gemm_configs, key=CONV_FWD_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": prune_conv_fwd_configs},
)(_sphere_conv_fwd_kernel)

# out_w, conv_stride_w, dil_w: which configs prune_dw_configs keeps (pixel groups)
_DW_AUTOTUNE_KEY = ["n_pixels", "channels", "KH", "KW", "stride_xc", "ROW_W", "out_w",
                    "conv_stride_w", "dil_w"]
# channels_last (ROW_W 0) and NCHW (row tiles) have their own tile sets
_sphere_conv_dw_fwd_autotuned = triton.autotune(
    configs=_dw_cfgs, key=_DW_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": prune_dw_configs},
)(_sphere_conv_dw_fwd_kernel)
_sphere_conv_dw_fwd_rows_autotuned = triton.autotune(
    configs=_dw_row_cfgs, key=_DW_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": prune_dw_configs},
)(_sphere_conv_dw_fwd_kernel)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------

_WHAT = "sphere_conv2d_fwd"  # names the op in launch errors

# Where the GEMM kernel's patch norms come from (the depthwise kernel always squares its loads):
# "prepass" (the default) -- the channel sums of squares q first (one read of x, in the launch
# that prepares the filters: _prepare_operands_kernel), then a KH x KW box sum of q after the K
# loop; "fused" -- squares of the x tiles inside the K loop. On the H200 (bench.tile_sweep,
# 20261127-1540) the pre-pass was as fast or faster on every tile (its K loop is lighter) and
# right on all of them, 8-warp tiles included, where the fused variant of then gave wrong norms
# on three tiles. Except for 1x1 filters: there a patch is one pixel, the pre-pass is one more
# full read of x while the GEMM itself reads x about once (r50.l1_reduce, 256 -> 64 channels at
# 56x56: forward 0.072 ms with the in-loop norms in 20261127-1540, 0.110 ms with the pre-pass in
# -1606), and the in-loop 1x1 builds were right on the H200 (8-warp tile included; the faulty
# tiles of the sweep were 3x3 builds). SPHEREOPS_PATCH_NORMS ("fused" / "prepass") overrides the
# rule; inputs of 2^31 or more pixels always take "fused" (int32 pre-pass indices; _prepass_fits).
PATCH_NORMS = ("fused", "prepass")
_PATCH_NORMS_OVERRIDE = os.environ.get("SPHEREOPS_PATCH_NORMS", "")


def default_patch_norms(kh, kw):
    """Where the GEMM forward takes its patch norms from when the caller does not say (the rule
    above): SPHEREOPS_PATCH_NORMS if set, else "fused" for 1x1 filters and "prepass" otherwise."""
    if _PATCH_NORMS_OVERRIDE:
        return _PATCH_NORMS_OVERRIDE
    return "fused" if kh * kw == 1 else "prepass"
# _prepare_operands_kernel: BLOCK_P x BLOCK_C pre-pass tiles, BLOCK filter elements a step
_PREP_CONFIG = dict(BLOCK_P=64, BLOCK_C=64, BLOCK=1024, num_warps=4)


def _needs_wide_offsets(x, kernel, padding, dilation) -> bool:
    """WIDE_OFFSETS of the GEMM kernel: its int32 offsets stay inside one sample of x."""
    return offsets_need_int64(x, 1, kernel, padding, dilation)


def _prepass_programs(n, hw, groups):
    """Input programs of the merged launch: one per BLOCK_P pixels of an image, per group."""
    return n * _cdiv(hw, _PREP_CONFIG["BLOCK_P"]) * groups


def _prepass_fits(n, hw, groups, c_out):
    """Whether the input pass (pre-pass norms, staged input) can run: the merged launch's 1-D
    grid (input tiles + one program per filter) has at most 2^31 - 1 programs and an image's
    pixel indices are int32."""
    return hw < 2 ** 31 and _prepass_programs(n, hw, groups) + c_out < 2 ** 31


# The GEMM kernels' fast input layout: every pixel's channels of a group contiguous and
# 16-element aligned (channels_last, C_in/G a multiple of 16). Anything else -- NCHW, odd
# channel counts, unaligned views -- compiles to scalar gathers: the 5x5 bf16 K loop of a
# 29-channel channels_last conv is 961 SASS instructions a step with 552 B of spills (158 for
# 32 channels), NCHW 943 (make aot-check models; scratch probe, sm_90, triton 3.9). Such inputs
# are staged once into [N, H, W, G, Cp] with Cp = C_in/G rounded up to 16 (zeros in the
# padding, which change neither the dot products nor the norms) by the input programs of the
# preparation launch -- one extra write of x, in a pass the pre-pass norms make anyway.
# SPHEREOPS_STAGE_INPUT=0 turns staging off (for A/B measurements).
STAGE_ALIGN = 16
_STAGE_INPUT = env_switch("SPHEREOPS_STAGE_INPUT", True)


def aligned_count(channels):
    """The row length the GEMM kernels get for rows of ``channels`` elements: rounded up to
    STAGE_ALIGN (zero-padded) from 16 channels up, so that every row starts 16-element aligned
    and a K step's mask is uniform over 16 lanes (vector loads); unchanged below 16 (flat K
    loops, gathers either way) or with SPHEREOPS_STAGE_INPUT=0."""
    if not _STAGE_INPUT or channels < _CHANNEL_CHUNK_MIN:
        return channels
    return _cdiv(channels, STAGE_ALIGN) * STAGE_ALIGN


def staged_channels(x, c_in_g):
    """Channels a group has in the staged input (``aligned_count(C_in/G)``), or 0 when the
    GEMM kernels read x where it lies: flat-K convs (C_in/G < 16: per-element gathers either
    way), inputs already in the fast layout, SPHEREOPS_STAGE_INPUT=0."""
    if not _STAGE_INPUT or c_in_g < _CHANNEL_CHUNK_MIN:
        return 0
    sn, sc, sh, sw = x.stride()
    if (sc == 1 and c_in_g % STAGE_ALIGN == 0 and sh % STAGE_ALIGN == 0 and sw % STAGE_ALIGN == 0
            and sn % STAGE_ALIGN == 0 and x.storage_offset() % STAGE_ALIGN == 0):
        return 0
    return aligned_count(c_in_g)


def dense_plane(x):
    """DENSE_PLANE of stage_input_tile: a pixel's offset is (h * W + w) * stride_w -- rows W
    strides apart, or a single row (a width-1 slice keeps its parent's row stride: not dense)."""
    return x.shape[2] == 1 or x.stride(2) == x.shape[3] * x.stride(3)


def filters_already_packed(w, cp, align=1) -> bool:
    """Whether w [C_out, C_in/G, KH, KW] is its own packed copy [C_out, KH, KW, cp] (a
    channels_last weight, cp = C_in/G) at an address that is a multiple of ``align`` bytes
    (1: any; the alignment is the one part that is not metadata)."""
    return (cp == w.shape[1] and w.permute(0, 2, 3, 1).is_contiguous()
            and (align == 1 or w.data_ptr() % align == 0))


def filter_buffers(w, cp, already_packed):
    """``(packed, sqnorm)`` for _pack_filter: the filters [C_out, KH, KW, cp] in the GEMM's K
    order -- a view of w when ``already_packed`` (:func:`filters_already_packed`): no copy --
    and the [C_out] fp32 squared norms."""
    c_out, _, kh, kw = w.shape
    packed = w.permute(0, 2, 3, 1) if already_packed else torch.empty(
        (c_out, kh, kw, cp), dtype=w.dtype, device=w.device)
    return packed, torch.empty((c_out,), dtype=torch.float32, device=w.device)


def packed_filter_buffers(w, cp, align=1):
    """``(packed, sqnorm, already_packed)``: :func:`filter_buffers` for
    :func:`filters_already_packed`."""
    already_packed = filters_already_packed(w, cp, align)
    return (*filter_buffers(w, cp, already_packed), already_packed)


def staged_input_meta(x, groups, cp):
    """A meta tensor shaped and strided as the staged input the preparation launches write,
    [N, G*cp, H, W] with channels_last strides: what a plan inspects before the copy exists."""
    shape = (x.shape[0], groups * cp, x.shape[2], x.shape[3])
    return meta_like(x, shape, dense_strides(shape, torch.channels_last))


def _prepare_operands(x, w, groups, prepass, cg_pad=0):
    """``(w_packed, w_sqnorm, q, x_staged)`` from ONE launch of _prepare_operands_kernel.

    w_packed [C_out, KH, KW, Cp] contiguous: the filters in the GEMM's K order with Cp = cg_pad
    channels a tap (zeros past Cg; Cp = Cg when cg_pad is 0; a view of w, no copy, when w is
    channels_last and Cp = Cg); w_sqnorm [C_out] fp32: ||w_o||^2; q [N, G, H, W] fp32: each
    input pixel's sum of squares over its group's channels (the patch-norm pre-pass) when
    ``prepass``, else None; x_staged: x copied to [N, H, W, G, Cp] and viewed as [N, G*Cp, H,
    W] (channels_last strides) when cg_pad (:func:`staged_channels`), else None. Only the
    filter programs run when neither is asked."""
    return _run_prepare(x, w, _prepare_plan(x, w, groups, prepass, cg_pad))


def _prepare_plan(x, w, groups, prepass, cg_pad):
    """What :func:`_prepare_operands` derives from the shapes (part of the forward's plan)."""
    n, _, h, wd = x.shape
    c_out, c_in_g, kh, kw = w.shape
    fits = _prepass_fits(n, h * wd, groups, c_out)
    if prepass and not fits:
        raise ValueError(f"N*H*W = {n * h * wd} input pixels in {groups} group(s) is too large "
                         "for the pre-pass patch norms (at most 2^31 - 1 programs); split the "
                         "batch or use patch_norms='fused'")
    stage = bool(cg_pad) and fits
    cp = cg_pad if stage else c_in_g
    already_packed = filters_already_packed(w, cp)
    # no input programs for an empty input or when neither q nor the staged input is asked
    n_sq = _prepass_programs(n, h * wd, groups) if (prepass or stage) else 0
    cfg = _PREP_CONFIG
    flags = dict(KH=kh, KW=kw, WRITE_PACKED=not already_packed, STORE_Q=prepass,
                 STAGE_X=stage, DENSE_PLANE=dense_plane(x),
                 BLOCK=min(cfg["BLOCK"], max(16, _next_pow2(kh * kw * cp))),
                 BLOCK_P=cfg["BLOCK_P"],
                 BLOCK_C=min(cfg["BLOCK_C"], max(16, _next_pow2(cp))),
                 num_warps=cfg["num_warps"])
    scalars = (n_sq, _cdiv(h * wd, cfg["BLOCK_P"]), h * wd, wd, c_in_g, cp, groups, *x.stride(),
               *w.stride())
    return SimpleNamespace(prepass=prepass, stage=stage, cp=cp, already_packed=already_packed,
                           flags=flags, scalars=scalars, programs=n_sq + c_out,
                           q_shape=(n, groups, h, wd), staged_shape=(n, h, wd, groups * cp),
                           launch=LaunchMemo())


def _run_prepare(x, w, plan):
    """Allocate and launch what :func:`_prepare_plan` planned; returns _prepare_operands'
    tuple."""
    packed, sqnorm = filter_buffers(w, plan.cp, plan.already_packed)
    q = (torch.empty(plan.q_shape, dtype=torch.float32, device=x.device) if plan.prepass
         else None)
    staged = (torch.empty(plan.staged_shape, dtype=x.dtype, device=x.device) if plan.stage
              else None)
    # never hand the kernel a view of w (or x) as an output pointer, even an unwritten one: a
    # torch.compile mutation analysis must not see the op's input as written
    args = (x, q if plan.prepass else sqnorm, staged if plan.stage else sqnorm, w,
            sqnorm if plan.already_packed else packed, sqnorm) + plan.scalars
    launch(_prepare_operands_kernel, (plan.programs,), args, plan.flags, _WHAT, plan.launch)
    if plan.stage:
        staged = staged.permute(0, 3, 1, 2)
    return packed, sqnorm, q, staged


def pixels_fast(t: torch.Tensor) -> bool:
    """Whether a kernel stores (or loads) ``t`` [N, C, H, W] through a flat pixel index with its
    lanes along the pixels (epilogue.store_tile / load_tile ROWS_FAST): when its channels are
    not the contiguous axis (NCHW, or a single channel)."""
    return t.stride(1) != 1 or t.shape[1] == 1


def _check_pair(name, value, minimum):
    # fast path first (every call passes through here: the generic checks cost ~3 us a pair)
    if type(value) is tuple and len(value) == 2:
        a, b = value
        if type(a) is int and type(b) is int and a >= minimum and b >= minimum:
            return value
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be a 2-tuple of ints, got {value!r}")
    if any(v < minimum for v in value):
        raise ValueError(f"{name} must be >= {minimum} in both dims, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _output_memory_format(x):
    # the reference's rule: a tensor that is both (e.g. C == 1) counts as contiguous
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _validate(x, w, bias, k, stride, padding, dilation, groups, operator, eps):
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [N, C_in, H, W], got shape {tuple(x.shape)}")
    if w.dim() != 4:
        raise ValueError(f"w must be a 4-D tensor [C_out, C_in/groups, kh, kw], got shape "
                         f"{tuple(w.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x dtype {x.dtype} is not supported by the Triton forward "
                        f"(float16, bfloat16, float32; use the reference backend for float64)")
    if w.dtype != x.dtype:
        raise TypeError(f"w dtype {w.dtype} must equal x dtype {x.dtype}")
    if w.device != x.device:
        raise ValueError(f"w is on {w.device} but x is on {x.device}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c_in, c_out = x.shape[1], w.shape[0]
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide C_in={c_in} and C_out={c_out}")
    if w.shape[1] * groups != c_in:
        raise ValueError(f"w.shape[1]={w.shape[1]} must be C_in/groups={c_in // groups}")
    if operator not in OPERATOR_CODES:
        raise ValueError(f"operator must be one of {tuple(OPERATOR_CODES)}, got {operator!r}")
    for name, t in (("bias", bias), ("k", k)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (c_out,):
            raise ValueError(f"{name} must be a tensor of shape [{c_out}]")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if operator == "sigmoid" and k is None:
        raise ValueError("k is required for operator='sigmoid'")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    stride = _check_pair("stride", stride, 1)
    padding = _check_pair("padding", padding, 0)
    dilation = _check_pair("dilation", dilation, 1)
    return stride, padding, dilation


def sphere_conv2d_fwd(x, w, bias, k, stride, padding, dilation, groups, operator, eps, *,
                      store_c=True, patch_norms=None):
    """Fused SphereConv2d forward on the GPU (or CPU under TRITON_INTERPRET=1).

    Same contract and results as ``sphereops.reference.conv2d_forward``: returns ``(y, c, r_x)``
    with y, c ``[N, C_out, Ho, Wo]`` in x's dtype and memory format (c clamped to [-1, 1]) and
    r_x ``[N, G, Ho, Wo]`` float32 contiguous.  fp32 inputs use TF32 tensor cores exactly when
    ``torch.backends.cudnn.allow_tf32`` is true.  ``store_c=False``: c is neither allocated nor
    written (it comes back empty): one output-sized store less. ``patch_norms``: "fused" or
    "prepass" (see PATCH_NORMS; None: :func:`default_patch_norms`).
    """
    return _sphere_conv2d_fwd_impl(x, w, bias, k, stride, padding, dilation, groups, operator,
                                   eps, store_c=store_c, patch_norms=patch_norms)


def _sphere_conv2d_fwd_impl(x, w, bias, k, stride, padding, dilation, groups, operator, eps,
                            config=None, force_gemm=False, store_c=True, patch_norms=None,
                            grid_path=None):
    """The launcher; ``config`` (a triton.Config) bypasses autotuning and ``force_gemm`` sends
    depthwise shapes to the implicit-GEMM kernel (both for tests). ``grid_path``: True / False
    forces the grid path (conv_fwd_grid) on or off where it applies; None: on iff
    SPHEREOPS_FWD_GRID=1 and the launches are plain (``launch.plain_launch``: eager, not traced).

    Everything derived from the shapes is the call's plan (:func:`_forward_plan`), kept per
    signature in ``_FORWARD_PLANS`` (kernels/plans.py); what is left here is allocating and
    launching. The grid path and an explicit ``config`` (A/B and tests) plan afresh each call."""
    conv = _validate(x, w, bias, k, stride, padding, dilation, groups, operator, eps)
    if grid_path is None:
        grid_path = conv_fwd_grid().ENABLED and plain_launch(x)
    plan_args = (x, w, bias, k, conv, groups, operator, float(eps), force_gemm, store_c,
                 patch_norms, bool(grid_path))
    if config is None and not grid_path:
        # every module switch and replaceable helper the plan reads is in the key
        key = (tensor_key(x), tensor_key(w), tensor_key(bias), tensor_key(k), conv, groups,
               operator, float(eps), force_gemm, store_c, patch_norms,
               x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32,
               _STAGE_INPUT, _PATCH_NORMS_OVERRIDE, _needs_wide_offsets, MAX_ROW_W, _INTERPRET)
        plan = _FORWARD_PLANS.get(key, _forward_plan, *plan_args)
    else:
        key, plan = None, _forward_plan(*plan_args)
    n, c_out = x.shape[0], w.shape[0]
    y = torch.empty(plan.out_shape, dtype=x.dtype, device=x.device, memory_format=plan.fmt)
    flags = plan.flags

    if plan.path == "depthwise":
        # pure depthwise: one launch, x in and y out; c and r_x are not saved, the backward
        # recomputes them (docs/ARCHITECTURE.md, "The saved state")
        empty_state = (x.new_empty(0), x.new_empty(0, dtype=torch.float32))
        if plan.empty:
            return (y,) + empty_state
        row_w = flags["ROW_W"]
        kernel = _sphere_conv_dw_fwd_rows_autotuned if row_w else _sphere_conv_dw_fwd_autotuned
        if config is not None:
            kernel, flags = _sphere_conv_dw_fwd_kernel, {**flags, **config.kwargs,
                                                          "num_warps": config.num_warps}
        # bias_ptr / k_ptr unread without a bias / for linear and cosine: any input tensor
        args = (x, w, bias.contiguous() if bias is not None else w,
                k.contiguous() if operator == "sigmoid" else w, y) + plan.scalars
        ho, wo = plan.out_shape[2:]

        def dw_grid(meta):
            return (_cdiv(depthwise_tile_count(n, ho, wo, row_w, meta["BLOCK_M"]),
                          meta["ROW_BLOCKS"]),
                    _cdiv(c_out, meta["BLOCK_C"]))

        _launch_autotuned(kernel, _sphere_conv_dw_fwd_kernel, dw_grid, args, flags, key,
                          prune_dw_configs)
        return (y,) + empty_state

    c = (torch.empty(plan.out_shape, dtype=x.dtype, device=x.device, memory_format=plan.fmt)
         if store_c else x.new_empty(0))
    r_x = torch.empty(plan.r_x_shape, dtype=torch.float32, device=x.device)
    if plan.empty:
        return y, c, r_x
    if plan.path == "grid":
        conv_fwd_grid().grid_forward(x, w, bias, k if operator == "sigmoid" else None, y, c, r_x,
                                     *conv, eps, flags, config)
        return y, c, r_x
    # one launch before the conv kernel: the filters in K order (kh, kw, c) -- a no-op for
    # channels_last weights -- and their squared norms, plus the GEMM kernel's patch-norm
    # pre-pass q unless patch_norms="fused"
    # and, for inputs not in the kernels' fast layout, the staged input (staged_channels)
    w_packed, w_sqnorm, q, x_staged = _run_prepare(x, w, plan.prepare)
    if x_staged is not None:   # the GEMM reads the staged copy: Cp channels a group
        x = x_staged
    # without c the kernels' c_ptr gets a read-only input (never stored through: STORE_C), not
    # y -- an output passed twice would alias in the graph torch.compile traces
    c_arg = c if store_c else w_sqnorm
    bias_arg = bias.contiguous() if bias is not None else w_sqnorm
    k_arg = k.contiguous() if (operator == "sigmoid") else w_sqnorm
    kernel = _sphere_conv_fwd_autotuned
    if config is not None:
        kernel = _sphere_conv_fwd_kernel
        flags = {**flags, **config.kwargs, "num_warps": config.num_warps,
                 "num_stages": config.num_stages}
    # q_ptr is unread without the pre-pass (NORMS_FROM_Q False): any fp32 input will do
    args = (x, w_packed, w_sqnorm, bias_arg, k_arg, y, c_arg, r_x,
            q if q is not None else w_sqnorm) + plan.scalars
    groups_, m_rows, n_cols = plan.gemm_grid

    def grid(meta):
        return (groups_ * _cdiv(m_rows, meta["BLOCK_M"]) * _cdiv(n_cols, meta["BLOCK_N"]),)

    _launch_autotuned(kernel, _sphere_conv_fwd_kernel, grid, args, flags, key,
                      prune_conv_fwd_configs)
    return y, c, r_x


# the forward's launch plans by call signature (kernels/plans.py)
_FORWARD_PLANS = PlanCache("sphere_conv2d_fwd")

# the config each autotuner picked, the flags it was picked with, both merged into the kernel's
# keywords, and the launch memo of ``kernel`` with them (plans.LaunchMemo), by (autotuner, plan
# key): _launch_autotuned
_PICKED_CONFIGS = {}


def _launch_autotuned(autotuned, kernel, grid, args, flags, key, prune):
    """Launch ``autotuned`` (triton.autotune of the JIT function ``kernel``) for a call whose
    plan key is ``key`` (it names everything the autotuner's key reads), or None: a plain
    launch of ``autotuned`` -- also what a call with an explicit config gets, ``autotuned``
    being the kernel itself then.

    The first plain launch of a key goes through the autotuner, which tunes or looks up its
    config; the later ones go to ``kernel`` with that config. Triton's Autotuner.run rebuilds
    its key from every argument on each call: ~23 us of host time a launch with several configs
    against ~2 us for the kernel's own run (this project's CPU machine, triton 3.9, the launch
    path stubbed) -- on a GPU host each forward pays it. A config that the autotuner's
    ``prune`` would not keep for these arguments (one another thread's launch could have left
    in ``best_config``) is not kept. Traced launches (torch.compile) keep the autotuner. The
    picked config's launches share a :class:`~sphereops_kernels.plans.LaunchMemo`: from the
    plan's third call on they call the compiled kernel directly."""
    if key is None or not plain_launch(args[0]):
        launch(autotuned, grid, args, flags, _WHAT)
        return
    slot = (autotuned, key)
    kept = _PICKED_CONFIGS.get(slot)
    if kept is not None:
        picked, picked_flags, kwargs, memo = kept
        if flags is not picked_flags:   # (a kept plan passes its one flags dict)
            kwargs = {**flags, **picked.all_kwargs()}
        launch(kernel, grid, args, kwargs, _WHAT, memo)
        return
    launch(autotuned, grid, args, flags, _WHAT)
    picked = getattr(autotuned, "best_config", None)
    if picked is not None and any(
            c.all_kwargs() == picked.all_kwargs()
            for c in prune(autotuned.configs, dict(zip(autotuned.arg_names, args)), **flags)):
        if len(_PICKED_CONFIGS) >= MAX_PLANS:
            _PICKED_CONFIGS.clear()
        _PICKED_CONFIGS[slot] = (picked, flags, {**flags, **picked.all_kwargs()},
                                 LaunchMemo())


def _forward_plan(x, w, bias, k, conv, groups, operator, eps, force_gemm, store_c, patch_norms,
                  grid_path):
    """The forward's plan (kernels/plans.py): output shapes and memory format, the path
    ("depthwise", "grid" or "gemm"), the conv kernel's constexprs and integer arguments, the
    preparation launch's plan; ``empty``: no launch (an empty batch or no filters). Raises on
    shapes the kernels cannot take. Reads only metadata, the options and module switches."""
    (sh, sw), (ph, pw), (dh, dw) = conv
    n, c_in, h, wd = x.shape
    c_out, c_in_g, kh, kw = w.shape
    # the grid path always takes its norms from its own pre-pass; it is off only when the caller
    # asks for in-loop norms
    grid_norms = patch_norms or "prepass"
    if patch_norms is None:
        patch_norms = (default_patch_norms(kh, kw) if _prepass_fits(n, h * wd, groups, c_out)
                       else "fused")
    if patch_norms not in PATCH_NORMS:
        raise ValueError(f"patch_norms must be one of {PATCH_NORMS}, got {patch_norms!r}")
    c_out_g = c_out // groups
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"output size would be {ho}x{wo}: input {h}x{wd} is smaller than the "
                         f"dilated filter {dh * (kh - 1) + 1}x{dw * (kw - 1) + 1} plus padding")
    fmt = _output_memory_format(x)
    out_shape = (n, c_out, ho, wo)
    y_strides = dense_strides(out_shape, fmt)
    n_pixels = n * ho * wo
    if n_pixels > MAX_PIXELS:
        raise ValueError(f"N*Ho*Wo = {n_pixels} output pixels is more than the kernels' int32 "
                         f"pixel indices take ({MAX_PIXELS} = 2^31 - 4097); split the batch")
    if c_in_g == 0:
        raise ValueError("C_in/groups must be >= 1")
    flags = dict(KH=kh, KW=kw, OPERATOR=OPERATOR_CODES[operator], HAS_BIAS=bias is not None,
                 EMULATE_RTNE=_INTERPRET and x.dtype == torch.bfloat16)
    conv_args = (sh, sw, ph, pw, dh, dw, eps)
    plan = SimpleNamespace(out_shape=out_shape, fmt=fmt, r_x_shape=(n, groups, ho, wo),
                           empty=n_pixels == 0 or c_out == 0, flags=flags)

    if c_in_g == 1 and c_out_g == 1 and not force_gemm:
        # ROW_W: rows of y's pixel grid along the lanes (NCHW), 0 for channels_last tiles
        flags["ROW_W"] = depthwise_row_width(x, wo)
        plan.path = "depthwise"
        plan.scalars = ((n_pixels, c_out, h, wd, ho, wo, *x.stride(), *y_strides)
                        + (w.stride(0), w.stride(2), w.stride(3)) + conv_args)
        return plan

    prepass = patch_norms == "prepass"
    if x.dtype == torch.float32:
        precision = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    else:
        precision = "ieee"
    y_meta = meta_like(x, out_shape, y_strides)
    out_pixels_fast = pixels_fast(y_meta)
    flags.update(STORE_C=store_c, DOT_PRECISION=precision, OUT_PIXELS_FAST=out_pixels_fast,
                 OUT_RUN=pixel_run(y_meta) if out_pixels_fast else 1,
                 UPCAST_DOT=_INTERPRET and x.dtype == torch.bfloat16)
    if grid_path and conv_fwd_grid().grid_path_applies(x, w, (sh, sw), (ph, pw), (dh, dw),
                                                       (ho, wo), precision, grid_norms):
        plan.path = "grid"
        return plan
    plan.path = "gemm"
    plan.prepare = _prepare_plan(x, w, groups, prepass, staged_channels(x, c_in_g))
    x_gemm = x
    if plan.prepare.stage:   # the GEMM reads the staged copy: Cp channels a group
        c_in_g = plan.prepare.cp
        x_gemm = staged_input_meta(x, groups, c_in_g)
    x_strides = x_gemm.stride()
    flags.update(CHANNEL_CHUNKS=c_in_g >= _CHANNEL_CHUNK_MIN, NORMS_FROM_Q=prepass,
                 C_ALIGN=pow2_factor(c_in_g), N_ALIGN=pow2_factor(c_out_g),
                 WIDE_OFFSETS=_needs_wide_offsets(x_gemm, (kh, kw), (ph, pw), (dh, dw)))
    plan.scalars = ((n_pixels, c_out_g, c_in_g, groups, h, wd, ho, wo, *x_strides, *y_strides)
                    + conv_args)
    plan.gemm_grid = (groups, n_pixels, c_out_g)
    return plan


_GRID_MODULE = None


def conv_fwd_grid():
    """The grid path's module (conv_fwd_grid imports this one's device helpers, so it
    is imported on first use)."""
    global _GRID_MODULE
    if _GRID_MODULE is None:
        from . import conv_fwd_grid as module
        _GRID_MODULE = module
    return _GRID_MODULE


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (docs/ARCHITECTURE.md, "The AOT compile check contract")
# ---------------------------------------------------------------------------------------------

def _signature(fn, dtype_name, constexprs):
    """ASTSource signature of ``fn`` in parameter order; constexprs appear as "constexpr"."""
    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in ("w_sqnorm_ptr", "rx_ptr", "sqnorm_ptr", "q_ptr"):
            sig[a] = "*fp32"
        elif a.endswith("_ptr"):
            sig[a] = "*" + dtype_name
        elif a == "eps":
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    return sig


# Typical launches that the AOT specs model (``example_args``): a channels_last bf16 3x3 conv,
# N=32, 64 -> 64 channels, 56x56, stride/padding/dilation 1 (ResNet stage 1); the depthwise
# kernel on 256 channels at 28x28; the preparation launch of the GEMM example: the pre-pass
# over its input and the packing of a contiguous 64x64x3x3 weight.
_GEMM_EXAMPLE = dict(
    n_pixels=32 * 56 * 56, c_out_per_group=64, c_in_per_group=64, groups=1,
    in_h=56, in_w=56, out_h=56, out_w=56,
    stride_xn=56 * 56 * 64, stride_xc=1, stride_xh=56 * 64, stride_xw=64,
    stride_yn=56 * 56 * 64, stride_yc=1, stride_yh=56 * 64, stride_yw=64,
    conv_stride_h=1, conv_stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1)
_DW_EXAMPLE = dict(
    n_pixels=32 * 28 * 28, channels=256, in_h=28, in_w=28, out_h=28, out_w=28,
    stride_xn=28 * 28 * 256, stride_xc=1, stride_xh=28 * 256, stride_xw=256,
    stride_yn=28 * 28 * 256, stride_yc=1, stride_yh=28 * 256, stride_yw=256,
    stride_wc=9, stride_wh=3, stride_ww=1,
    conv_stride_h=1, conv_stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1)
_DW_NCHW_EXAMPLE = dict(
    _DW_EXAMPLE, stride_xn=256 * 28 * 28, stride_xc=28 * 28, stride_xh=28, stride_xw=1,
    stride_yn=256 * 28 * 28, stride_yc=28 * 28, stride_yh=28, stride_yw=1)
_PREP_EXAMPLE = dict(
    n_sq_programs=32 * 56 * 56 // _PREP_CONFIG["BLOCK_P"], img_tiles=56 * 56 // _PREP_CONFIG["BLOCK_P"],
    HW=56 * 56, W=56, c_in_per_group=64, cg_pad=64, groups=1,
    stride_xn=56 * 56 * 64, stride_xc=1, stride_xh=56 * 64, stride_xw=64,
    stride_wo=64 * 9, stride_wc=9, stride_wh=3, stride_ww=1)
# the staging launches: an NCHW input (pixel-contiguous loads) and a channels_last one with 29
# channels (padded to 32), both 33x33
_STAGE_EXAMPLES = {
    "nchw": dict(_PREP_EXAMPLE, img_tiles=_cdiv(33 * 33, _PREP_CONFIG["BLOCK_P"]), HW=33 * 33,
                 W=33, stride_xn=33 * 33 * 64, stride_xc=33 * 33, stride_xh=33, stride_xw=1),
    "odd": dict(_PREP_EXAMPLE, img_tiles=_cdiv(33 * 33, _PREP_CONFIG["BLOCK_P"]), HW=33 * 33,
                W=33, c_in_per_group=29, cg_pad=32, stride_xn=33 * 33 * 29, stride_xc=1,
                stride_xh=33 * 29, stride_xw=29, stride_wo=29 * 9),
}


def _spec(name, fn, dtype_name, constexprs, example_args, num_warps, num_stages, gemm):
    """One AOT spec, specialised as the JIT launcher would for ``example_args``: integers equal
    to 1 become constexprs, pointers and integers divisible by 16 get ``tt.divisibility=16``
    (``attrs``, ASTSource's fourth argument).  Without those hints a compile shows scalar loads
    and no cp.async pipeline, which is not what runs."""
    constexprs = dict(constexprs)
    constexprs.update({a: 1 for a, v in example_args.items() if v == 1})
    sig = _signature(fn, dtype_name, constexprs)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or (sig[a] == "i32" and example_args.get(a, 1) % 16 == 0)}
    runtime_examples = {a: v for a, v in example_args.items() if a not in constexprs}
    return dict(name=name, fn=fn, signature=sig, constexprs=constexprs, attrs=attrs,
                example_args=runtime_examples, num_warps=num_warps, num_stages=num_stages,
                dtype=dtype_name, gemm=gemm)


def _gemm_constexprs(taps, precision, cfg, **overrides):
    """The GEMM forward's constexprs in an AOT spec: a taps x taps filter with the heaviest
    epilogue (sigmoid, bias) on the default launch -- channel-chunk K loop, pre-pass patch
    norms, c stored, int32 offsets, a channels_last output -- with ``overrides``, and the tile
    of ``cfg``."""
    constexprs = dict(KH=taps, KW=taps, OPERATOR=OPERATOR_CODES["sigmoid"], HAS_BIAS=True,
                      CHANNEL_CHUNKS=True, DOT_PRECISION=precision, UPCAST_DOT=False,
                      EMULATE_RTNE=False, STORE_C=True, NORMS_FROM_Q=True, WIDE_OFFSETS=False,
                      OUT_PIXELS_FAST=False, OUT_RUN=1, C_ALIGN=256, N_ALIGN=256)
    constexprs.update(overrides)
    return dict(constexprs, **cfg.kwargs)


def aot_specs():
    """Compile specs for ``make aot-check`` (docs/ARCHITECTURE.md), one per kernel x config x
    dtype: every GEMM config x fp16/bf16/fp32 (x tf32/ieee for fp32; ieee only for the
    configs that fit the FMA dot, the others are pruned at launch), the depthwise configs and
    the preparation kernel (filters + pre-pass) per dtype.  They model the typical launches
    above with the heaviest epilogue (sigmoid, with bias); 8-warp GEMM configs for 16-bit
    dtypes only, as 3x3 convs with the pre-pass and as 1x1 convs with fused norms (the only
    filters they run on there).  ``gemm`` is False for fp32-ieee (allow_tf32 off: there is no
    full-fp32 tensor-core instruction), the depthwise kernel and the preparation kernel (no
    dot).
    Extra keys: ``example_args`` (the modelled launch's runtime integers; those equal to 1 are
    already constexprs) and ``attrs`` (the divisibility hints derived from them)."""
    specs = []
    sigmoid = OPERATOR_CODES["sigmoid"]
    # every autotune config on the default path (pre-pass patch norms; 8 warps are legal there
    # for 16-bit 3x3 filters), then the fused-norm variant below
    for cfg in conv_fwd_configs():
        bm, bn, bk = (cfg.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        taps = 3
        example = dict(_GEMM_EXAMPLE, pad_h=taps // 2, pad_w=taps // 2)
        for dtype_name in ("fp16", "bf16", "fp32"):
            for precision in (("tf32", "ieee") if dtype_name == "fp32" else ("ieee",)):
                if dtype_name == "fp32" and (cfg.num_warps >= 8
                                             or (precision == "ieee" and not fits_fma_dot(cfg))):
                    continue  # pruned at launch: never runs
                constexprs = _gemm_constexprs(taps, precision, cfg)
                name = (f"conv_fwd_gemm_{taps}x{taps}_{bm}x{bn}x{bk}_w{cfg.num_warps}"
                        f"_s{cfg.num_stages}_{dtype_name}"
                        + (f"_{precision}" if dtype_name == "fp32" else ""))
                specs.append(_spec(name, _sphere_conv_fwd_kernel, dtype_name, constexprs,
                                   example, cfg.num_warps, cfg.num_stages,
                                   gemm=not (dtype_name == "fp32" and precision == "ieee")))
    # channels_last (flat pixel tiles) and NCHW (row tiles of the 28-wide example: ROW_W 32)
    dw_sets = (("", _dw_configs(), _DW_EXAMPLE, 0),
               ("nchw_", _dw_row_configs(), _DW_NCHW_EXAMPLE, 32))
    for layout, configs, example, row_w in dw_sets:
        for cfg in configs:
            for dtype_name in ("fp16", "bf16", "fp32"):
                group = cfg.kwargs["PIX_GROUP"]
                name = (f"conv_fwd_depthwise_{layout}{cfg.kwargs['BLOCK_M']}x"
                        f"{cfg.kwargs['BLOCK_C']}_rb{cfg.kwargs['ROW_BLOCKS']}"
                        + (f"_pg{group}" if group > 1 else "")
                        + (f"_w{cfg.num_warps}" if layout else "") + f"_{dtype_name}")
                constexprs = dict(KH=3, KW=3, OPERATOR=sigmoid, HAS_BIAS=True,
                                  EMULATE_RTNE=False, ROW_W=row_w, **cfg.kwargs)
                specs.append(_spec(name, _sphere_conv_dw_fwd_kernel, dtype_name, constexprs,
                                   example, cfg.num_warps, cfg.num_stages, gemm=False))
                if cfg.kwargs["ROW_BLOCKS"] == 1:   # 5x5: filter columns loaded in every window
                    specs.append(_spec(name.replace("depthwise_", "depthwise_5x5_"),
                                       _sphere_conv_dw_fwd_kernel, dtype_name,
                                       dict(constexprs, KH=5, KW=5),
                                       dict(example, pad_h=2, pad_w=2),
                                       cfg.num_warps, cfg.num_stages, gemm=False))
    for dtype_name in ("fp16", "bf16", "fp32"):
        # the preparation launch (filter packing + norms and the patch-norm pre-pass in one
        # grid); the fused-norm GEMM (patch_norms="fused") and the int64 build on the two
        # workhorse 3x3 tiles, and the 8-warp tile the fused path keeps for 1x1
        prep = _PREP_CONFIG
        constexprs = dict(KH=3, KW=3, WRITE_PACKED=True, STORE_Q=True, STAGE_X=False,
                          DENSE_PLANE=True, BLOCK=prep["BLOCK"], BLOCK_P=prep["BLOCK_P"],
                          BLOCK_C=prep["BLOCK_C"])
        specs.append(_spec(f"conv_fwd_prepare_operands_{dtype_name}", _prepare_operands_kernel,
                           dtype_name, constexprs, _PREP_EXAMPLE, prep["num_warps"], 1,
                           gemm=False))
        for label, example in _STAGE_EXAMPLES.items():
            specs.append(_spec(f"conv_fwd_prepare_operands_stage_{label}_{dtype_name}",
                               _prepare_operands_kernel, dtype_name,
                               dict(constexprs, STAGE_X=True, BLOCK_C=32), example,
                               prep["num_warps"], 1, gemm=False))
        for cfg in [c for c in conv_fwd_configs() if c.num_warps == 4][:2]:
            bm, bn, bk = (cfg.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            precision = "tf32" if dtype_name == "fp32" else "ieee"
            # NCHW y and c (the input staged): stored with the lanes along the pixels, in
            # 16-byte runs of pixels (56x56 planes) or, for planes such as 7x7, one by one
            for label, run in (("", 4 if dtype_name == "fp32" else 8), ("_run1", 1)):
                constexprs = _gemm_constexprs(3, precision, cfg, OUT_PIXELS_FAST=True,
                                              OUT_RUN=run)
                specs.append(_spec(f"conv_fwd_gemm_nchw_out{label}_3x3_{bm}x{bn}x{bk}"
                                   f"_w{cfg.num_warps}_s{cfg.num_stages}_{dtype_name}",
                                   _sphere_conv_fwd_kernel, dtype_name, constexprs,
                                   dict(_GEMM_EXAMPLE, pad_h=1, pad_w=1, stride_yn=64 * 56 * 56,
                                        stride_yc=56 * 56, stride_yh=56, stride_yw=1),
                                   cfg.num_warps, cfg.num_stages, gemm=True))
            # (masked: channel counts off the tile, e.g. 61 -> 48, the channel-masked loads)
            for variant, prepass, wide, align in (("fused", False, False, 256),
                                                  ("wide", False, True, 256),
                                                  ("masked", True, False, 16)):
                constexprs = _gemm_constexprs(3, precision, cfg, NORMS_FROM_Q=prepass,
                                              WIDE_OFFSETS=wide, C_ALIGN=align, N_ALIGN=align)
                specs.append(_spec(f"conv_fwd_gemm_{variant}_3x3_{bm}x{bn}x{bk}_w{cfg.num_warps}"
                                   f"_s{cfg.num_stages}_{dtype_name}", _sphere_conv_fwd_kernel,
                                   dtype_name, constexprs, dict(_GEMM_EXAMPLE, pad_h=1, pad_w=1),
                                   cfg.num_warps, cfg.num_stages, gemm=True))
        # the flat K loop (C_in/G < 16): a first layer, 3 -> 64 channels, 5x5, on a channels_last
        # [128, 3, 32, 32] input (edge.cin3_5x5), on the 64-wide tiles the pruning keeps there
        flat_example = dict(_GEMM_EXAMPLE, n_pixels=128 * 32 * 32, c_in_per_group=3, in_h=32,
                            in_w=32, out_h=32, out_w=32, stride_xn=32 * 32 * 3, stride_xh=32 * 3,
                            stride_xw=3, stride_yn=32 * 32 * 64, stride_yh=32 * 64, pad_h=2,
                            pad_w=2)
        for cfg in [c for c in conv_fwd_configs() if c.num_warps == 4
                    and c.kwargs["BLOCK_N"] == 64 and fits_flat_k_loop(c)]:
            bm, bn, bk = (cfg.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            constexprs = _gemm_constexprs(5, "tf32" if dtype_name == "fp32" else "ieee", cfg,
                                          CHANNEL_CHUNKS=False)
            specs.append(_spec(f"conv_fwd_gemm_flat_5x5_cin3_{bm}x{bn}x{bk}_w{cfg.num_warps}"
                               f"_s{cfg.num_stages}_{dtype_name}", _sphere_conv_fwd_kernel,
                               dtype_name, constexprs, flat_example, cfg.num_warps,
                               cfg.num_stages, gemm=True))
        if dtype_name != "fp32":
            cfg = next(c for c in conv_fwd_configs() if c.num_warps == 8)
            bm, bn, bk = (cfg.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            constexprs = _gemm_constexprs(1, "ieee", cfg, NORMS_FROM_Q=False)
            specs.append(_spec(f"conv_fwd_gemm_fused_1x1_{bm}x{bn}x{bk}_w8_s{cfg.num_stages}"
                               f"_{dtype_name}", _sphere_conv_fwd_kernel, dtype_name, constexprs,
                               dict(_GEMM_EXAMPLE, pad_h=0, pad_w=0), cfg.num_warps,
                               cfg.num_stages, gemm=True))
    return specs
