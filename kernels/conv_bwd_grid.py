"""SphereConv2d dgrad and wgrad as plain TMA GEMMs over padded grids (by input phase at stride > 1).

At stride 1 the dgrad ``dx = conv_transpose(Hn, w_hat) - x * boxsum^T(A)`` (conv_bwd) is a
convolution of Hn [N, Ho, Wo, C_out] with the flipped unit filters, padding
``TOP = (KH-1)*DH - PH`` rows and ``LEFT = (KW-1)*DW - PW`` columns, output H x W. This module
applies conv_fwd_grid's trick to it: the prep pass of conv_bwd writes Hn straight onto a grid
whose zero margins are stored (conv_bwd._hn_row),

    Hn grid  [N*Hq*Wq, G*Og]   row (n, i, j): Hn at output pixel (i - TOP, j - LEFT), zeros
                               in the margins (i < TOP or j < LEFT)
    Hq = Ho + TOP = H + PH,  Wq = Wo + LEFT = W + PW

so that input pixel (n, hi, wi) is grid row p = (n*Hq + hi)*Wq + wi and the flipped tap (r, s)
-- filter tap (KH-1-r, KW-1-s) -- reads grid row p + r*DH*Wq + s*DW: the same offset for every
row of a tile. Each row's data ends exactly at the pitch (LEFT + Wo = Wq), so the next row's
LEFT zero columns are a row's right padding, and the next image's TOP zero rows an image's
bottom padding; past the last image TMA's out-of-bounds fill gives the zeros. Every K step is
then one ``[BLOCK_M, BLOCK_K]`` TMA box of the grid and one ``[BLOCK_K, BLOCK_N]`` box of
w_hat [KH*KW*C_out, CGI_P]: no masks or address arithmetic in the K loop, as in the forward
grid path. The margins (Hq*Wq - Ho*Wo rows an image: 3.6% of Hn at 56x56 for a 3x3 "same"
conv) are zeroed by extra programs of the same prep launch (conv_bwd._zero_hn_margins), and
their rows' MMAs are computed and dropped; the wgrad reads the same Hn through the same row
map (conv_bwd._hn_row).

The epilogue is the implicit-GEMM dgrad's (conv_bwd.store_dgrad_tile): the box sum of A over
the taps that reach each pixel (masked loads of A [N, G, Ho, Wo], once a tile), then
``dx = acc - x * box`` at the rows that are input pixels.

The wgrad ``dw[o, ci, r, s] = sum_p Hn[p, o] x[p + tap, ci]`` takes the same Hn grid and x on
the forward grid path's padded grid (conv_fwd_grid: pixel (n, hi, wi) at row
(n*Hq + PH + hi)*Wq + PW + wi; at stride 1 with PH <= (KH-1)*DH its Hq, Wq are Hn's) behind
``slack`` zero rows, staged by more programs of the same prep launch
(conv_fwd_grid.stage_grid_rows): then Hn's row p and tap (r, s) meet x-grid row
p + (r*DH - TOP)*Wq + s*DW - LEFT, again one offset for every row, so each reduction step is a
``[BLOCK_M, BLOCK_O]`` box of Hn and a ``[BLOCK_M, BLOCK_CI]`` box of x and a wgmma (Hn's
margin rows are zero: their products vanish). Partials are conv_bwd's (fp32 split-K), and the
prep partials' last reduction level rides in the wgrad launch as there; the finalize does too:
each (tile, tap)'s splits count themselves on a counter the prep launch zeroed, and the split
that completes the count sums the tile's partials in split order (the same bits whichever
program finishes) and writes dw. So the grid backward is three launches (prep, dgrad, wgrad),
one fewer than the implicit-GEMM backward's.

At stride (SH, SW) > 1 the dgrad splits by input phase, as the forward's grid does by
output phase: padded input row u = q*SH + a (phase a) is reached only by the filter rows r
with r*DH = a (mod SH) -- r0, r0 + STEP, ... (STEP = SH / gcd(SH, DH)) -- each from Hn row
q - t_r, t_r = (r*DH - a) / SH. So a phase's dx is a stride-1 correlation of Hn with its own
taps, one TMA box a tap again: program axis 1 is the phase, its grid row (n, i, j) is input
pixel ((i + q0_a)*SH + a - PH, (j + q0_b)*SW + b - PW) (q0: the phase's first row inside the
image), and tap r reads Hn grid row i + q0_a + TOP - t_r. The margins (:func:`grid_margins`)
are chosen so that every such read is a data row or a zero row of the image's own margins or
the next image's top ones, with no stuffed zeros: a phase computes only its own taps (3x3
stride 2: 4, 2, 2 and 1 of the 9), a phase with none stores dx = -x * 0. The epilogue's box
sum of A runs over the phase's taps. The wgrad reads x's phase planes (conv_fwd_grid's strided
grid) laid out with Hn's pitches, so tap (r, s) is again one row offset into plane
(r*DH % SH, s*DW % SW); TOP >= (KH-1)*DH // SH keeps a tap's rows inside its image's rows of
the plane.

sm_90 bf16 SASS a K step (``python -m sphereops_kernels.aot --sass``, triton 3.9): dgrad 106
(stride 2: 114) against the implicit-GEMM dgrad's 340 (128 x 128 x 64), wgrad 97 (stride 2:
97) against 494 (128 x 128, 64 pixels a step), the same 8 wgmma each.

Taken (:func:`grid_backward_applies`) at stride 1 for 0 <= padding <= (K-1)*dilation and at
any larger stride for any padding, with C_in/G >= 16 and C_out/G >= 16 (Hn's group columns
and w_hat's group rows zero-padded to a multiple of 16 when it is not one), in fp16 /
bf16 (a tf32 wgmma wants both operands K-major; w_hat's box is N-major), on TMA GPUs, in
plain launches, when ``SPHEREOPS_DGRAD_GRID=1`` (dgrad) / ``SPHEREOPS_WGRAD_GRID=1``
(wgrad); both off by default until a GPU run has checked and timed them.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .configs import dgrad_grid_configs, prune_dgrad_grid_configs
from .conv_bwd import (REDUCE_CONFIG, _finalize_dw, _finish_dw_in_wgrad, _reduce_column_block,
                       _wgrad_split, count_and_finish_wgrad_tile, even_ranges,
                       next_phase_step, phase_first_tap, store_dgrad_tile)
from .conv_fwd import _CHANNEL_CHUNK_MIN, gemm_tile_of_program
from .conv_fwd_grid import (GRID_ALIGN, TensorDescriptor, autotune_tma_kernel, direct_grid,
                            grid_channels, grid_row_pixels, has_tma, launch_tma_kernel,
                            next_channel_chunk, phase_planes, strided_tap_row_offset,
                            tap_row_offset)
from .launch import cdiv, env_switch, interpreting, launch

_INTERPRET = interpreting()
_WHAT = "sphere_conv2d_bwd"

# SPHEREOPS_DGRAD_GRID=1 / SPHEREOPS_WGRAD_GRID=1 send eligible dgrads / wgrads here
# (grid_backward_applies); off by default until a GPU run has verified and timed them
ENABLED = env_switch("SPHEREOPS_DGRAD_GRID", False)
WGRAD_ENABLED = env_switch("SPHEREOPS_WGRAD_GRID", False)


def hn_margins(kernel, padding, dilation):
    """``(TOP, LEFT)``: the zero rows above and columns left of Hn's data on the grid -- the
    padding of the stride-1 dgrad seen as a convolution of Hn with the flipped filters."""
    return tuple((k - 1) * d - p for k, p, d in zip(kernel, padding, dilation))


def _strided_margin(size, out, k, s, p, d):
    """One axis of :func:`grid_margins` at stride ``s`` > 1 (input ``size``, output ``out``,
    filter ``k``, padding ``p``, dilation ``d``): the least TOP (or LEFT) for which every
    phase's box reads of Hn stay on the grid's zeros or data, and the wgrad's x planes (Hn's
    pitch) hold every row a tap reads inside the image's own rows.

    Padded input index u = q*s + a (phase a); its taps are the r with r*d = a (mod s), which
    read Hn at q - t_r, t_r = (r*d - a) // s. The phase's input pixels are q = q0 .. q0+hp-1
    (q0 = ceil((p - a)/s)), its M rows i = q - q0, and tap r reads Hn grid row
    i + q0 + TOP - t_r. That must be >= 0 (t_r - q0 <= TOP), at most the next image's zero
    rows (i + q0 + TOP - t_r < out + 2*TOP for i < hp: hp + q0 - t_r - out <= TOP), and the
    phase's rows must fit the grid (hp <= out + TOP). The wgrad's tap (r, .) meets Hn's data
    row oh at plane row oh + r*d // s < out + TOP: (k-1)*d // s <= TOP."""
    need = (k - 1) * d // s
    for a in range(s):
        q0 = -((a - p) // s)
        hp = max(0, -((a - p - size) // s) - q0)
        need = max(need, hp - out)
        for r in range(k):
            if (r * d - a) % s == 0:
                t = (r * d - a) // s
                need = max(need, t - q0, hp + q0 - t - out)
    return need


@functools.lru_cache(maxsize=256)
def grid_margins(in_hw, out_hw, kernel, stride, padding, dilation):
    """``(TOP, LEFT)`` of Hn's grid for a conv: :func:`hn_margins` at stride 1 (negative when
    the padding exceeds the filter's reach: no grid then), else :func:`_strided_margin` on each
    axis (never negative). Arguments: pairs as tuples (cached: a network has a handful of
    geometries, and every backward call asks)."""
    if tuple(stride) == (1, 1):
        return hn_margins(kernel, padding, dilation)
    return tuple(_strided_margin(*axis) for axis in zip(in_hw, out_hw, kernel, stride, padding,
                                                        dilation))


def grid_backward_applies(x, w, out_hw, stride, padding, dilation, cgi_p, cgo_p) -> bool:
    """Whether the dgrad and wgrad of a conv can run on the grids: at stride 1 margins >= 0
    (padding at most the dilated filter's reach; more would crop Hn), any stride above;
    fp16 / bf16; C_in/G >= 16 (the grid GEMM's N) with w_hat's rows 16-byte aligned (TMA);
    Hn's columns a group (cgo_p: C_out/G rounded up to 16 from 16 channels up) a multiple of
    16, so that every K box stays within one group's Hn columns and w_hat rows (padded alike
    by the prep launch); host descriptors in this triton and TMA on the GPU; the grids' rows
    plus a window's reach within int32. ``out_hw``: (Ho, Wo)."""
    if TensorDescriptor is None:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if x.is_cuda and not has_tma(x.device):
        return False
    n, c_in, h, wd = x.shape
    c_out, cg_in, kh, kw = w.shape
    cg_out = c_out // (c_in // cg_in)
    if cg_in < _CHANNEL_CHUNK_MIN or (cgi_p * x.element_size()) % 16:
        return False
    if cgo_p % GRID_ALIGN or cgo_p < cg_out:
        return False
    top, left = grid_margins((h, wd), out_hw, (kh, kw), stride, padding, dilation)
    if top < 0 or left < 0:
        return False
    hq, wq = out_hw[0] + top, out_hw[1] + left
    planes_h, planes_w = phase_planes((kh, kw), stride)
    reach = (kh - 1) * dilation[0] * wq + (kw - 1) * dilation[1] + 256
    return planes_h * planes_w * n * hq * wq + 2 * reach < 2 ** 31


def hn_grid_buffer(n, ho, wo, margins, columns, dtype, device):
    """Hn's padded grid [N*Hq*Wq, columns], unwritten: conv_bwd's prep launch writes the data
    rows (_hn_row) and zeroes the margin rows (:func:`hn_margin_rows` of them,
    conv_bwd._zero_hn_margins)."""
    top, left = margins
    return torch.empty((n * (ho + top) * (wo + left), columns), dtype=dtype, device=device)


def hn_margin_rows(n, ho, wo, margins) -> int:
    """The rows of Hn's grid that are margins: TOP full rows and LEFT columns of the Ho data
    rows, in each of the N images."""
    top, left = margins
    return n * (top * (wo + left) + ho * left)


@triton.jit
def _phase_taps(a, K: tl.constexpr, S: tl.constexpr, STEP: tl.constexpr, dil, pad, size,
                margin):
    """One axis of a strided dgrad's phase ``a`` (padded input index u = q*S + a; module
    docstring, :func:`_strided_margin`): ``(r0, taps, q0, count, base)`` -- the phase's first
    filter tap and their number (conv_bwd.phase_first_tap: r0, r0 + STEP, ...), the first q
    of an input pixel, the phase's input pixels, and the Hn grid offset q0 + margin - t_r0 of
    tap r0 (tap r0 + k*STEP: k*STEP*dil/S less)."""
    r0, taps = phase_first_tap(a, K, S, STEP, dil)
    q0 = (pad - a + S - 1) // S
    count = (pad + size - a + S - 1) // S - q0
    base = q0 + margin - (r0 * dil - a) // S
    return r0, taps, q0, count, base


@triton.jit
def _dgrad_grid_kernel(
    dx_ptr, hn_desc, w_desc, a_ptr, x_ptr,
    m_grid, hw_q, w_q, in_h, in_w, out_h, out_w, c_out, cg_in, cg_out, groups,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_dxn, stride_dxc, stride_dxh, stride_dxw,
    pad_h, pad_w, dil_h, dil_w, hn_top, hn_left,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    STEP_H: tl.constexpr, STEP_W: tl.constexpr,
    UPCAST_DOT: tl.constexpr, EMULATE_RTNE: tl.constexpr, PIXELS_FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The dgrad on Hn's padded grid; program = (group, M tile of grid rows, N tile of the
    group's input channels) on axis 0, the input phase (a, b) on axis 1 (one at stride 1).

    Descriptors and pointers (Og = cg_out, a multiple of BLOCK_K; M = m_grid = N*Hq*Wq; when
    C_out/G is not a multiple of 16 the launcher passes Og = C_out/G rounded up to 16 and
    C_out = G*Og: Hn's group columns and w_hat's group rows are zero-padded to it):
      hn_desc  TMA descriptor of the Hn grid [M, G*Og] (module docstring), block
               [BLOCK_M, BLOCK_K].
      w_desc   TMA descriptor of w_hat [KH*KW*C_out, CGI_P] (conv_bwd's unit filters, tap-major,
               zeros past C_in/G), block [BLOCK_K, BLOCK_N].
      a_ptr    [N, G, Ho, Wo] fp32 contiguous (A = sum_o G c / r_x^2).
      x_ptr    [N, G*cg_in, H, W], strides (stride_xn, stride_xc, stride_xh, stride_xw).
      dx_ptr   [N, G*cg_in, H, W], strides (stride_dxn, ...): every element written once.
    Scalars: hw_q = Hq*Wq, w_q = Wq, H, W, Ho, Wo, C_out, C_in/G, C_out/G, G, padding, dilation,
      Hn's margins (hn_top, hn_left; read at stride > 1).
    Constexprs: filter size; stride, STEP_H/W = stride / gcd(stride, dilation) (the distance
      between a phase's taps); UPCAST_DOT, EMULATE_RTNE (interpreter only); PIXELS_FAST (x and
      dx NCHW: conv_bwd.store_dgrad_tile); the tile. Offsets int32 in the loop (the launcher
      keeps M plus the window's reach below 2^31), int64 into x and dx.

    At stride 1 grid row (n, i, j) is input pixel (i, j) and the K loop runs over the flipped
    taps. At stride > 1 it is the phase's input pixel ((i + q0_a)*SH + a - PH, (j + q0_b)*SW +
    b - PW) and the K loop over the phase's taps only (:func:`_phase_taps`; a phase without
    taps stores dx = -x * 0). A box row past M reads zeros (TMA fill); w_hat columns past
    CGI_P read zeros and those past C_in/G reach only columns the epilogue drops.
    """
    g, pid_m, pid_n = gemm_tile_of_program(tl.program_id(0), groups, m_grid, cg_in,
                                           BLOCK_M, BLOCK_N, GROUP_M)
    p0 = pid_m * BLOCK_M
    hn_col = g * cg_out
    ci0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_chunks = cg_out // BLOCK_K
    if STRIDE_H * STRIDE_W == 1:
        tap = 0
        c0 = 0
        for it in range(0, KH * KW * n_chunks):
            h_tile = hn_desc.load([p0 + tap_row_offset(tap, KW, dil_h, dil_w, w_q), hn_col + c0])
            # flipped tap (r, s) is filter tap (KH-1-r, KW-1-s): w_hat row block KH*KW-1-tap
            w_tile = w_desc.load([(KH * KW - 1 - tap) * c_out + hn_col + c0, ci0])
            if UPCAST_DOT:   # the interpreter's 16-bit dot is wrong (conv_bwd)
                acc = tl.dot(h_tile.to(tl.float32), w_tile.to(tl.float32), acc)
            else:
                acc = tl.dot(h_tile, w_tile, acc)
            tap, c0 = next_channel_chunk(tap, c0, cg_out, BLOCK_K)

        rows = p0 + tl.arange(0, BLOCK_M)
        img, hi, wi, m_mask = grid_row_pixels(rows, m_grid, hw_q, w_q, in_h, in_w)
        img64 = img.to(tl.int64)
        # the box sum of A over the taps that reach each pixel: output (hi + PH - kh*DH, ...)
        a_rows = a_ptr + (img64 * groups + g) * out_h * out_w
        box = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for t in range(KH * KW):
            ho = hi + pad_h - (t // KW) * dil_h
            wo = wi + pad_w - (t % KW) * dil_w
            ok = m_mask & (ho >= 0) & (ho < out_h) & (wo >= 0) & (wo < out_w)
            box += tl.load(a_rows + ho * out_w + wo, mask=ok, other=0.0)
    else:
        phase = tl.program_id(1)
        a = phase // STRIDE_W
        b = phase - a * STRIDE_W
        r0, taps_h, q0_h, count_h, base_h = _phase_taps(a, KH, STRIDE_H, STEP_H, dil_h, pad_h,
                                                        in_h, hn_top)
        s0, taps_w, q0_w, count_w, base_w = _phase_taps(b, KW, STRIDE_W, STEP_W, dil_w, pad_w,
                                                        in_w, hn_left)
        # Hn row offset between consecutive taps of the phase: STEP*dil/S
        dt_h = STEP_H * dil_h // STRIDE_H
        dt_w = STEP_W * dil_w // STRIDE_W
        kr = 0
        ks = 0
        c0 = 0
        for it in range(0, taps_h * taps_w * n_chunks):
            shift = (base_h - kr * dt_h) * w_q + base_w - ks * dt_w
            h_tile = hn_desc.load([p0 + shift, hn_col + c0])
            w_row = (r0 + kr * STEP_H) * KW + s0 + ks * STEP_W
            w_tile = w_desc.load([w_row * c_out + hn_col + c0, ci0])
            if UPCAST_DOT:
                acc = tl.dot(h_tile.to(tl.float32), w_tile.to(tl.float32), acc)
            else:
                acc = tl.dot(h_tile, w_tile, acc)
            c0, ks, kr = next_phase_step(c0, BLOCK_K, cg_out, ks, taps_w, kr)

        rows = p0 + tl.arange(0, BLOCK_M)
        img, i, j, m_mask = grid_row_pixels(rows, m_grid, hw_q, w_q, count_h, count_w)
        hi = (i + q0_h) * STRIDE_H + a - pad_h
        wi = (j + q0_w) * STRIDE_W + b - pad_w
        img64 = img.to(tl.int64)
        # the box sum of A over the phase's taps: output (i + base_h - top - kr*dt_h, ...)
        a_rows = a_ptr + (img64 * groups + g) * out_h * out_w
        box = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for kr2 in range(0, taps_h):
            ho = i + base_h - hn_top - kr2 * dt_h
            for ks2 in range(0, taps_w):
                wo = j + base_w - hn_left - ks2 * dt_w
                ok = m_mask & (ho >= 0) & (ho < out_h) & (wo >= 0) & (wo < out_w)
                box += tl.load(a_rows + ho * out_w + wo, mask=ok, other=0.0)
    x_rows = img64 * stride_xn + hi.to(tl.int64) * stride_xh + wi.to(tl.int64) * stride_xw
    dx_rows = img64 * stride_dxn + hi.to(tl.int64) * stride_dxh + wi.to(tl.int64) * stride_dxw
    store_dgrad_tile(acc, box, x_ptr, dx_ptr, x_rows, dx_rows, g * cg_in, ci0, cg_in, m_mask,
                     stride_xc, stride_dxc, EMULATE_RTNE, PIXELS_FAST, BLOCK_M, BLOCK_N)


def _set_block_shapes(nargs):
    """Autotune pre-hook: the descriptors' boxes follow the config's tile."""
    nargs["hn_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


_dgrad_grid_autotuned = autotune_tma_kernel(
    _dgrad_grid_kernel, dgrad_grid_configs(interpreter=_INTERPRET),
    ["m_grid", "cg_in", "cg_out", "KH", "KW", "STRIDE_H", "STRIDE_W"], prune_dgrad_grid_configs,
    _set_block_shapes)


def grid_dgrad(hn, w_hat, a_buf, x, dx, stride, padding, dilation, margins, flags,
               config=None):
    """Launch the grid dgrad into ``dx`` (allocated by conv_bwd's launcher, which has validated
    everything, checked :func:`grid_backward_applies` and had the prep pass write ``hn`` onto the
    grid of :func:`hn_grid_buffer` with ``margins`` = :func:`grid_margins`). ``flags``:
    UPCAST_DOT, EMULATE_RTNE, PIXELS_FAST; ``config``: a triton.Config that bypasses
    autotuning (tests)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c_in, h, wd = x.shape
    kh, kw, c_out, cgi_p = w_hat.shape
    groups, ho, wo = a_buf.shape[1], a_buf.shape[2], a_buf.shape[3]
    top, left = margins
    hq, wq = ho + top, wo + left
    m_grid = n * hq * wq
    if hn.shape[0] != m_grid:
        raise AssertionError(f"Hn grid has {hn.shape[0]} rows, expected {m_grid}")
    # the boxes are placeholders until the config is known (_set_block_shapes)
    hn_desc = TensorDescriptor.from_tensor(hn, [16, 16])
    w_desc = TensorDescriptor.from_tensor(w_hat.view(kh * kw * c_out, cgi_p), [16, 16])
    cg_in = c_in // groups
    args = (dx, hn_desc, w_desc, a_buf, x, m_grid, hq * wq, wq, h, wd, ho, wo, c_out, cg_in,
            c_out // groups, groups, *x.stride(), *dx.stride(), ph, pw, dh, dw, top, left)
    launch_tma_kernel(
        _dgrad_grid_autotuned, _dgrad_grid_kernel, config, dict(hn_desc=hn_desc, w_desc=w_desc),
        _set_block_shapes, args,
        dict(KH=kh, KW=kw, STRIDE_H=sh, STRIDE_W=sw, STEP_H=sh // math.gcd(sh, dh),
             STEP_W=sw // math.gcd(sw, dw), **flags),
        lambda meta: groups * cdiv(m_grid, meta["BLOCK_M"]) * cdiv(cg_in, meta["BLOCK_N"]), _WHAT,
        phases=sh * sw)


@triton.jit
def _wgrad_grid_kernel(
    part_ptr, hn_desc, x_desc, red_ptr, s_ptr, db_ptr, dk_ptr, cnt_ptr, w_ptr, rw_ptr, dw_ptr,
    m_grid, w_q, c_out, cg_in, cg_out, cgo_p, c_pad, groups, n_split, rows_per_split,
    top, left, slack, dil_h, dil_w, plane_rows_h, plane_rows_w, R, RED_PROGRAMS,
    stride_wo, stride_wc, stride_wh, stride_ww, stride_dwo, stride_dwc, stride_dwh, stride_dww,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    NEED_S: tl.constexpr, NEED_DB: tl.constexpr, NEED_DK: tl.constexpr, FINISH_DW: tl.constexpr,
    EMULATE_RTNE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Wgrad partials on the grids: sum over this split's grid rows p of
    Hn[p, o] * x[p + shift(tap), ci], a TMA GEMM with no masks.

    Descriptors and pointers (M = m_grid = N*Hq*Wq, Og = cg_out, Cp = c_pad):
      hn_desc   TMA descriptor of the Hn grid [M, G*cgo_p] (module docstring), block
                [BLOCK_M, BLOCK_O].
      x_desc    TMA descriptor of [slack + P*M, G*Cp]: ``slack`` zero rows, then x on the
                forward grid path's padded grid with Hn's pitches (conv_fwd_grid: at stride 1
                pixel (n, hi, wi) at row (n*Hq + PH + hi)*Wq + PW + wi; at stride > 1 P phase
                planes of M rows, plane (a, b) at a * plane_rows_h + b * plane_rows_w holding
                padded pixel (i*SH + a, j*SW + b) at row (n*Hq + i)*Wq + j), block
                [BLOCK_M, BLOCK_CI].
      part_ptr  [n_split, KH*KW, C_out, cg_in] fp32 contiguous: this program's tile of split s,
                tap (r, s') (as conv_bwd._wgrad_kernel's partials; conv_bwd._finalize_dw).
    Row p of Hn's grid is output pixel (ho, wo) = (i - top, j - left) of its image; the tap's
    input pixel (ho - PH + r*DH, wo - PW + s*DW) is x-grid row p + (r*DH - top)*Wq + s*DW - left
    at stride 1 (the shift; + slack >= 0), at stride > 1 row p + (r*DH // SH - top)*Wq +
    s*DW // SW - left of plane (r*DH % SH, s*DW % SW) (conv_fwd_grid.strided_tap_row_offset;
    grid_margins keeps every such row inside the image's rows of its plane). Hn's margin rows
    are zero, so their products vanish; rows past M read zeros (TMA fill). Box columns past a group's Og / C_in/G reach only dropped
    accumulator rows / columns.
    Scalars: Wq, C_out, C_in/G, C_out/G, cgo_p (Hn's columns a group: C_out/G rounded up to
    16, zeros past it), Cp, G, n_split, rows a split (a multiple of BLOCK_M),
    top / left (Hn's margins), slack = top*Wq + left, dilation, the planes' row offsets
    (plane_rows_h = planes_w * M, plane_rows_w = M; read at stride > 1).
    The final level of the prep partials' column sums rides in this launch, as in
    conv_bwd._wgrad_kernel (red_ptr [3, R, C_out], s_ptr, db_ptr, dk_ptr, RED_PROGRAMS,
    NEED_S / NEED_DB / NEED_DK, EMULATE_RTNE, BLOCK_R, BLOCK_RC as there): programs past axis
    2's n_split * G run conv_bwd._reduce_column_block.
    And so does the finalize (conv_bwd._dw_finalize_kernel's work): cnt_ptr [G * axis 0 * KH*KW]
    int32, zeroed by the prep launch, counts the splits of each (group, o x ci tile, tap) that
    have stored their partial; the program that brings it to n_split (whichever runs last)
    sums the tile's n_split partials in split order -- the same bits whatever the order the
    programs ran in -- and S over the R rows of red_ptr's first plane for its filters, and
    writes dw = sum / r_w - w * S / r_w^2 (conv_bwd.count_and_finish_wgrad_tile; w_ptr, dw_ptr
    [C_out, C_in/G, KH, KW] through their strides, rw_ptr [C_out] fp32) -- with FINISH_DW;
    without it (past conv_bwd.WGRAD_FINISH_MAX_SPLIT splits) conv_bwd._dw_finalize_kernel
    does, after this launch, and cnt_ptr, w_ptr, rw_ptr, dw_ptr are unread.
    Grid: (cdiv(Og, BLOCK_O) * cdiv(C_in/G, BLOCK_CI), KH*KW, n_split * G + E), E = the slices
    the reduce programs need (0 without them).
    """
    pid_oc = tl.program_id(0)
    tap = tl.program_id(1)
    pid_sg = tl.program_id(2)
    # a reduce program runs the GEMM part with an empty row range and no store (unbranched
    # GEMM code, as conv_bwd._wgrad_kernel)
    is_reduce = pid_sg >= n_split * groups
    split = pid_sg % n_split
    g = pid_sg // n_split
    n_ci_blocks = tl.cdiv(cg_in, BLOCK_CI)
    o0 = (pid_oc // n_ci_blocks) * BLOCK_O
    ci0 = (pid_oc % n_ci_blocks) * BLOCK_CI
    x_shift = (slack + strided_tap_row_offset(tap, KW, STRIDE_H, STRIDE_W, dil_h, dil_w, w_q,
                                              plane_rows_h, plane_rows_w) - top * w_q - left)
    m_start = split * rows_per_split
    m_end = tl.where(is_reduce, m_start, tl.minimum(m_start + rows_per_split, m_grid))
    acc = tl.zeros((BLOCK_O, BLOCK_CI), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        h_tile = hn_desc.load([m0, g * cgo_p + o0])
        x_tile = x_desc.load([m0 + x_shift, g * c_pad + ci0])
        if UPCAST_DOT:   # the interpreter's 16-bit dot is wrong (conv_bwd)
            acc = tl.dot(h_tile.to(tl.float32).T, x_tile.to(tl.float32), acc)
        else:
            acc = tl.dot(h_tile.T, x_tile, acc)
    offs_o = o0 + tl.arange(0, BLOCK_O)
    offs_ci = ci0 + tl.arange(0, BLOCK_CI)
    dst = (((split * (KH * KW) + tap) * c_out + g * cg_out + offs_o).to(tl.int64)[:, None] * cg_in
           + offs_ci[None, :])
    tl.store(part_ptr + dst, acc,
             mask=(offs_o < cg_out)[:, None] & (offs_ci < cg_in)[None, :] & (not is_reduce))
    if is_reduce:
        red = ((pid_sg - n_split * groups) * tl.num_programs(0) * tl.num_programs(1)
               + tap * tl.num_programs(0) + pid_oc)
        if red < RED_PROGRAMS:
            _reduce_column_block(red_ptr, s_ptr, s_ptr, db_ptr, dk_ptr, red, 0, 1, R, c_out,
                                 tl.cdiv(R, BLOCK_R) * BLOCK_R, NEED_S, NEED_DB, NEED_DK, True,
                                 EMULATE_RTNE, BLOCK_R, BLOCK_RC)
    elif FINISH_DW:
        tile = (g * tl.num_programs(0) + pid_oc) * (KH * KW) + tap
        count_and_finish_wgrad_tile(cnt_ptr, tile, part_ptr, red_ptr, w_ptr, rw_ptr, dw_ptr, g,
                                    o0, ci0, tap, c_out, cg_in, cg_out, n_split, R,
                                    stride_wo, stride_wc, stride_wh, stride_ww,
                                    stride_dwo, stride_dwc, stride_dwh, stride_dww,
                                    KH, KW, False, EMULATE_RTNE, BLOCK_O, BLOCK_CI)


def wgrad_grid_config(cg_in: int, cg_out: int, interpreter: bool = False) -> dict:
    """The wgrad grid's tile: up to 128 x 128 (o x ci), 64 grid rows a step, 3 stages of TMA
    boxes (as conv_bwd.wgrad_config's 16-bit tile); under the interpreter 16 x 16 x 32 so that
    tiny test shapes cover several tiles and steps."""
    if interpreter:
        return dict(BLOCK_O=16, BLOCK_CI=16, BLOCK_M=32, num_warps=4, num_stages=1)
    return dict(BLOCK_O=min(128, max(16, triton.next_power_of_2(cg_out))),
                BLOCK_CI=min(128, max(16, triton.next_power_of_2(cg_in))), BLOCK_M=64,
                num_warps=4, num_stages=3)


def x_grid_buffer(x, groups, out_hw, margins, kernel, stride, padding):
    """``(x_grid, slack, staged)``: the wgrad's x on the forward grid path's padded grid with
    Hn's pitches (Hq, Wq = Ho + TOP, Wo + LEFT; at stride > 1 the phase planes of
    conv_fwd_grid.phase_planes) behind ``slack`` zero rows (the most negative tap shift,
    :func:`_wgrad_grid_kernel`), as [slack + planes*N*Hq*Wq, G*Cp], unwritten (``staged``:
    conv_bwd's prep launch stages it with conv_fwd_grid.stage_grid_rows); or x itself when it
    already is that grid (conv_fwd_grid.direct_grid: an aligned channels_last 1x1 input at
    stride 1, no slack; ``staged`` False)."""
    n, c_in, h, wd = x.shape
    c_pad = grid_channels(c_in // groups)
    top, left = margins
    hq, wq = out_hw[0] + top, out_hw[1] + left
    slack = top * wq + left
    if slack == 0 and tuple(stride) == (1, 1):
        direct = direct_grid(x, groups, padding, c_pad)
        if direct is not None:
            return direct, 0, False
    planes_h, planes_w = phase_planes(kernel, stride)
    rows = slack + planes_h * planes_w * n * hq * wq
    storage = torch.empty((rows, groups * c_pad), dtype=x.dtype, device=x.device)
    return storage, slack, True


def _wgrad_tiles(cfg, cg_in, cg_out, groups, taps):
    """``(axis-0 programs, tiles)`` of :func:`_wgrad_grid_kernel` at tile ``cfg``
    (:func:`wgrad_grid_config`): o x ci tiles a group and tap, and all of them (one counter
    each)."""
    per_group = cdiv(cg_out, cfg["BLOCK_O"]) * cdiv(cg_in, cfg["BLOCK_CI"])
    return per_group, groups * per_group * taps


def wgrad_tile_counters(cg_in, cg_out, groups, taps, device):
    """The grid wgrad's tile counters [tiles] int32, unwritten: conv_bwd's prep launch zeroes
    them (its first filter program), the wgrad counts its splits there
    (:func:`_wgrad_grid_kernel`)."""
    cfg = wgrad_grid_config(cg_in, cg_out, _INTERPRET)
    return torch.empty(_wgrad_tiles(cfg, cg_in, cg_out, groups, taps)[1], dtype=torch.int32,
                       device=device)


def grid_wgrad(hn, x_grid, slack, x, w, r_w, counters, groups, out_hw, margins, stride,
               dilation, upcast, reduction, reduction_flags):
    """dw of the conv from Hn on its grid (``margins`` = :func:`grid_margins`) and x on its grid
    behind ``slack`` zero rows (:func:`x_grid_buffer`), both written by conv_bwd's prep launch
    along with r_w [C_out] fp32 and the zeroed ``counters`` (:func:`wgrad_tile_counters`): one
    launch, its split-K partials [split, KH*KW, C_out, C_in/G] fp32 finished into dw by the
    last split of each tile (:func:`_wgrad_grid_kernel`) -- up to conv_bwd.
    WGRAD_FINISH_MAX_SPLIT splits; past that (a few-tile layer's many splits: one program
    would read each tile's partials alone at the end of the launch) by _dw_finalize_kernel
    in a launch of its own. ``reduction`` = (red_ptr, s_ptr, db_ptr, dk_ptr, R) and
    ``reduction_flags`` (NEED_S, NEED_DB, NEED_DK, EMULATE_RTNE, as for conv_bwd.
    _wgrad_kernel): the final level of the prep partials' sums, run by extra programs of this
    launch -- db and dk only when the finishing programs take S from red_ptr themselves.
    conv_bwd's launcher has validated everything and checked :func:`grid_backward_applies`."""
    n, c_in, h, wd = x.shape
    c_out, cg_in, kh, kw = w.shape
    cg_out = c_out // groups
    c_pad = grid_channels(cg_in)
    top, left = margins
    wq = out_hw[1] + left
    m_grid = n * (out_hw[0] + top) * wq
    planes_h, planes_w = phase_planes((kh, kw), stride)
    if hn.shape[0] != m_grid or x_grid.shape[0] != slack + planes_h * planes_w * m_grid:
        raise AssertionError(f"grids of {hn.shape[0]} / {x_grid.shape[0]} rows, expected "
                             f"{m_grid} / {slack + planes_h * planes_w * m_grid}")
    cfg = wgrad_grid_config(cg_in, cg_out, _INTERPRET)
    bo, bci, bm = cfg["BLOCK_O"], cfg["BLOCK_CI"], cfg["BLOCK_M"]
    per_group, tiles = _wgrad_tiles(cfg, cg_in, cg_out, groups, kh * kw)
    if counters.numel() != tiles:
        raise AssertionError(f"{counters.numel()} tile counters, expected {tiles}")
    split, rows_per_split = even_ranges(m_grid, _wgrad_split(m_grid, tiles, bm, x.device), bm)
    partials = torch.empty((split, kh * kw, c_out, cg_in), dtype=torch.float32, device=x.device)
    hn_desc = TensorDescriptor.from_tensor(hn, [bm, bo])
    x_desc = TensorDescriptor.from_tensor(x_grid, [bm, bci])
    red = REDUCE_CONFIG
    red_ptr, s_ptr, db_ptr, dk_ptr, red_rows = reduction
    finish = _finish_dw_in_wgrad(split, False)
    # without FINISH_DW dw_ptr is unread: the partials stand in (not an op input)
    dw = torch.empty_like(w) if finish else partials
    if finish:   # the finishing programs sum S themselves
        reduction_flags = dict(reduction_flags, NEED_S=False)
    folded = any(reduction_flags[f] for f in ("NEED_S", "NEED_DB", "NEED_DK"))
    red_programs = cdiv(c_out, red["BLOCK_C"]) if folded else 0
    grid = (per_group, kh * kw, split * groups)
    grid = grid[:2] + (grid[2] + cdiv(red_programs, grid[0] * grid[1]),)
    launch(_wgrad_grid_kernel, grid,
           (partials, hn_desc, x_desc, red_ptr, s_ptr, db_ptr, dk_ptr, counters, w, r_w, dw,
            m_grid, wq, c_out, cg_in, cg_out, hn.shape[1] // groups, c_pad, groups, split,
            rows_per_split, top, left, slack, dilation[0], dilation[1], planes_w * m_grid,
            m_grid, red_rows, red_programs, *w.stride(), *(dw if finish else w).stride()),
           dict(KH=kh, KW=kw, STRIDE_H=stride[0], STRIDE_W=stride[1], UPCAST_DOT=upcast,
                **reduction_flags, FINISH_DW=finish, BLOCK_R=red["BLOCK_R"],
                BLOCK_RC=red["BLOCK_C"], **cfg), _WHAT)
    if not finish:
        return _finalize_dw(partials, w, r_w, s_ptr, split, reduction_flags["EMULATE_RTNE"])
    return dw


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (docs/ARCHITECTURE.md, "The AOT compile check contract")
# ---------------------------------------------------------------------------------------------

# The modelled launch: the dgrad of a channels_last 3x3 "same" conv, N=32, 64 -> 64 channels
# at 56x56 (ResNet stage 1): Hq = Wq = 57.
_DGRAD_EXAMPLE = dict(m_grid=32 * 57 * 57, hw_q=57 * 57, w_q=57, in_h=56, in_w=56, out_h=56,
                      out_w=56, c_out=64, cg_in=64, cg_out=64, groups=1,
                      stride_xn=56 * 56 * 64, stride_xc=1, stride_xh=56 * 64, stride_xw=64,
                      stride_dxn=56 * 56 * 64, stride_dxc=1, stride_dxh=56 * 64, stride_dxw=64,
                      pad_h=1, pad_w=1, dil_h=1, dil_w=1, hn_top=1, hn_left=1)
# the dgrad of a downsampling 3x3 conv, stride 2, 56x56 -> 28x28 (margins (1, 1): Hq = Wq = 29)
_DGRAD_EXAMPLE_S2 = dict(_DGRAD_EXAMPLE, m_grid=32 * 29 * 29, hw_q=29 * 29, w_q=29, out_h=28,
                         out_w=28)


def aot_specs():
    """Compile specs for ``make aot-check``: every dgrad grid config x fp16/bf16 as the dgrad
    of a 3x3 conv, channels_last and NCHW (the quarter-column epilogue) and at stride 2
    (by phase), and the wgrad grid's tiles (at stride 2 on x's phase planes), the descriptors
    typed by the tile's boxes."""
    from .conv_fwd import _spec

    specs = []
    for cfg in dgrad_grid_configs():
        bm, bn, bk = (cfg.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        for dtype_name in ("fp16", "bf16"):
            for label, nchw, stride in (("", False, 1), ("_nchw", True, 1), ("_s2", False, 2)):
                constexprs = dict(KH=3, KW=3, STRIDE_H=stride, STRIDE_W=stride, STEP_H=stride,
                                  STEP_W=stride, UPCAST_DOT=False, EMULATE_RTNE=False,
                                  PIXELS_FAST=nchw, **cfg.kwargs)
                example = _DGRAD_EXAMPLE if stride == 1 else _DGRAD_EXAMPLE_S2
                if nchw:
                    example = dict(example, stride_xc=56 * 56, stride_xh=56, stride_xw=1,
                                   stride_dxc=56 * 56, stride_dxh=56, stride_dxw=1)
                spec = _spec(f"conv_bwd_dgrad_grid_3x3{label}_{bm}x{bn}x{bk}_w{cfg.num_warps}"
                             f"_s{cfg.num_stages}_{dtype_name}", _dgrad_grid_kernel, dtype_name,
                             constexprs, example, cfg.num_warps, cfg.num_stages, gemm=True)
                spec["signature"].update(a_ptr="*fp32",
                                         hn_desc=f"tensordesc<{dtype_name}[{bm},{bk}]>",
                                         w_desc=f"tensordesc<{dtype_name}[{bk},{bn}]>")
                specs.append(spec)
    # the wgrad grid's tile per dtype (64 -> 64 channels: 64 x 64 x 64; 128 -> 128: 128 x 128
    # x 64) and the x staging (conv_fwd_grid's preparation kernel, grid programs only) is in
    # conv_fwd_grid's specs
    for cg, stride in ((64, 1), (128, 1), (128, 2)):
        cfg = wgrad_grid_config(cg, cg)
        bo, bci, bm = cfg["BLOCK_O"], cfg["BLOCK_CI"], cfg["BLOCK_M"]
        example = dict(m_grid=32 * 57 * 57, w_q=57, c_out=cg, cg_in=cg, cg_out=cg, cgo_p=cg,
                       c_pad=cg,
                       groups=1, n_split=11, rows_per_split=9472, top=1, left=1, slack=58,
                       dil_h=1, dil_w=1, plane_rows_h=32 * 57 * 57, plane_rows_w=32 * 57 * 57,
                       R=400, RED_PROGRAMS=cg // REDUCE_CONFIG["BLOCK_C"],
                       stride_wo=cg * 9, stride_wc=9, stride_wh=3, stride_ww=1,
                       stride_dwo=cg * 9, stride_dwc=9, stride_dwh=3, stride_dww=1)
        label = ""
        if stride == 2:   # 56x56 -> 28x28: margins (1, 1), four planes of 32 x 29 x 29 rows
            m_plane = 32 * 29 * 29
            example.update(m_grid=m_plane, w_q=29, rows_per_split=2496, slack=30,
                           plane_rows_h=2 * m_plane, plane_rows_w=m_plane, R=100)
            label = "_s2"
        for dtype_name in ("fp16", "bf16"):
            # with the folded reduction of db and the finishing programs (S summed there)
            spec = _spec(f"conv_bwd_wgrad_grid_3x3{label}_c{cg}_{bo}x{bci}x{bm}_{dtype_name}",
                         _wgrad_grid_kernel, dtype_name,
                         dict(KH=3, KW=3, STRIDE_H=stride, STRIDE_W=stride, UPCAST_DOT=False,
                              NEED_S=False, NEED_DB=True,
                              NEED_DK=False, FINISH_DW=True, EMULATE_RTNE=False,
                              BLOCK_R=REDUCE_CONFIG["BLOCK_R"], BLOCK_RC=REDUCE_CONFIG["BLOCK_C"],
                              BLOCK_O=bo, BLOCK_CI=bci, BLOCK_M=bm), example, cfg["num_warps"],
                         cfg["num_stages"], gemm=True)
            spec["signature"].update(part_ptr="*fp32", red_ptr="*fp32", s_ptr="*fp32",
                                     cnt_ptr="*i32", rw_ptr="*fp32",
                                     hn_desc=f"tensordesc<{dtype_name}[{bm},{bo}]>",
                                     x_desc=f"tensordesc<{dtype_name}[{bm},{bci}]>")
            specs.append(spec)
    return specs
