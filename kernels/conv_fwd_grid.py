"""SphereConv2d forward as a plain TMA GEMM over a padded pixel grid (phase planes at stride > 1).

The implicit-GEMM kernel of ``conv_fwd`` gathers its input tile with one address per row and a
padding mask per step; Triton can then only pipeline it through ``cp.async`` with the address
arithmetic in the same warps as the MMAs (~30% of the bf16 roofline on an H200's large layers,
``bench/results/*1606*``). For stride 1 the gather disappears if the input is laid out on a grid
whose zero padding is stored:

    grid    [N*Hq*Wq, G*Cp]   row p = (n, i, j): input pixel (i - PH, j - PW), zeros outside
                              the image; Cp = C_in/G rounded up to 16 (zeros past C_in/G)
    Hq = max(H + PH, Ho),  Wq = max(W + PW, Wo)

One zero run of PW columns sits between two rows' data and serves as the right padding of one
and the left padding of the next (likewise PH rows between two images): a window that runs past
a row's end lands in the next row's left padding. Output pixel (n, ho, wo) is grid row
p = (n*Hq + ho)*Wq + wo, and its tap (r, s) reads grid row p + r*DH*Wq + s*DW -- the same
offset for every row of a tile. So every K step of an M tile is one rectangular
``[BLOCK_M, BLOCK_K]`` box of the grid (a TMA load, rows past the end filled with zeros by the
hardware) and one ``[BLOCK_N, BLOCK_K]`` box of the packed filters: wgmma from shared memory,
no masks and no address arithmetic in the K loop. The price: the grid rows that are no output
pixel (Hq*Wq - Ho*Wo of every image: 3.5% at 56x56, 15% at 14x14, 27% at 8x8 for a 3x3
"same" conv) are computed and dropped, and the input is written once more (the staging pass,
merged with the pre-pass norms and the filter packing in one launch).

At stride (SH, SW) > 1 a tap's rows are no longer one box of such a grid (the window origins of
neighbouring outputs lie SW pixels apart), so the input is split by phase: plane (a, b) holds
the padded input's pixels (i*SH + a, j*SW + b), Hq = Ho + (KH-1)*DH // SH rows of Wq = Wo +
(KW-1)*DW // SW, all planes stacked in one grid [planes*N*Hq*Wq, G*Cp]. Tap (r, s) of output
(n, ho, wo) is pixel (ho*SH + r*DH, wo*SW + s*DW) of the padded input, i.e. row (ho + r*DH //
SH, wo + s*DW // SW) of plane (r*DH % SH, s*DW % SW): again one offset for every row of a tile
(:func:`strided_tap_row_offset`). Each plane keeps its own zero columns (the shared runs of
stride 1 would put a window's overrun on another phase); the planes together hold about the
input's pixels once (a 1x1 filter reads one plane: only it is staged), and the rows computed and
dropped, Hq*Wq - Ho*Wo an image, are 13% more MMA work for a 3x3 stride-2 conv at 32x32 -> 16x16.

* ``_prepare_grid_kernel`` -- one launch: grid rows (the staged input and each row's channel
  sum of squares q, zeros on padding) and, in the same 1-D grid, the filters (conv_fwd's
  ``_pack_filter``: packed with Cp channels a tap, squared norms).
* ``_sphere_conv_fwd_grid_kernel`` -- the TMA GEMM, then the epilogue of conv_fwd's kernel:
  r_x from the KH x KW box sum of q (mask-free offsets on the grid), c, g(c), bias, stores at
  the rows that are output pixels.

Chosen by ``conv_fwd`` for convs with C_in/G >= 16 in 16-bit or tf32 when
``SPHEREOPS_FWD_GRID=1`` (off by default until a GPU run has checked and timed it: the
interpreter tests cover its numerics, the AOT check its compile; see :func:`grid_path_applies`).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .configs import conv_fwd_grid_configs, fits_grid_channels, prune_conv_fwd_grid_configs
from .conv_fwd import (
    _CHANNEL_CHUNK_MIN,
    _pack_filter,
    _store_gemm_tile,
    gemm_tile_of_program,
    packed_filter_buffers,
    pixels_fast,
)
from .epilogue import load_tile, tile_ptrs
from .launch import cdiv, env_switch, interpreting, launch, next_pow2

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - a triton without host-side tensor descriptors
    TensorDescriptor = None

_INTERPRET = interpreting()
_WHAT = "sphere_conv2d_fwd"

# SPHEREOPS_FWD_GRID=1 sends eligible convs here (grid_path_applies); off by default until a
# GPU run has verified and timed the path
ENABLED = env_switch("SPHEREOPS_FWD_GRID", False)

# the staging programs: BLOCK_P grid rows x BLOCK_C channels a step; BLOCK filter elements a step
PREP_CONFIG = dict(BLOCK_P=64, BLOCK_C=64, BLOCK=1024, num_warps=4)
# channels a group of the grid are padded to a multiple of this (TMA: 16-byte row pitch and box),
# whatever SPHEREOPS_STAGE_INPUT says (conv_fwd.aligned_count follows that A/B switch)
GRID_ALIGN = 16


def grid_channels(c_in_per_group: int) -> int:
    """Cp: the channels a group has on the grid (and a tap in the packed filters)."""
    return cdiv(c_in_per_group, GRID_ALIGN) * GRID_ALIGN


def grid_pitches(h, w, ph, pw, ho, wo):
    """``(Hq, Wq)``: rows an image and columns a row of the stride-1 padded grid (module
    docstring)."""
    return max(h + ph, ho), max(w + pw, wo)


def phase_planes(kernel, stride):
    """``(planes_h, planes_w)``: the phase planes a strided grid holds -- one a phase along an
    axis with stride > 1 and more than one tap, else one (a 1x1 filter reads phase 0 only)."""
    return tuple(s if k > 1 else 1 for k, s in zip(kernel, stride))


def strided_grid_geometry(x_hw, out_hw, kernel, stride, padding, dilation):
    """``(Hq, Wq, planes_h, planes_w)`` of the grid for a conv (module docstring): at stride 1
    :func:`grid_pitches` and one plane. Else one plane a phase (a, b) of the padded input that
    a tap reads (:func:`phase_planes`), each with rows Hq = Ho + (KH-1)*DH // SH of Wq = Wo +
    (KW-1)*DW // SW columns, so that an output pixel's every tap lands inside its own image's
    plane (no shared padding runs: a window past a plane row's end would land on another
    phase)."""
    (h, w), (ho, wo), (kh, kw) = x_hw, out_hw, kernel
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    if (sh, sw) == (1, 1):
        return (*grid_pitches(h, w, ph, pw, ho, wo), 1, 1)
    return (ho + (kh - 1) * dh // sh, wo + (kw - 1) * dw // sw, *phase_planes(kernel, stride))


_TMA_BY_DEVICE = {}


def has_tma(device) -> bool:
    """Whether a CUDA device has the Tensor Memory Accelerator (compute capability >= 9.0);
    asked once a device, at the first call (no device query at import time)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TMA_BY_DEVICE:
        _TMA_BY_DEVICE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _TMA_BY_DEVICE[index]


def grid_path_applies(x, w, stride, padding, dilation, out_hw, precision, patch_norms) -> bool:
    """Whether a conv can take the grid path: any stride, C_in/G >= 16 (the channel-chunk
    loop), 16-bit or tf32 (exact fp32 runs its dot on the FMA units, operands in registers:
    the conv_fwd kernel's tiles suit it better), pre-pass patch norms (the path has no in-loop
    variant), host-side tensor descriptors in this triton and TMA on the GPU (Hopper on: Triton
    lowers descriptor loads to plain loads before it, where this kernel spills -- sm_80 128 x
    128 x 64, docs/aot_table.md), and the grid's rows plus a window's reach and a tile within
    int32."""
    if TensorDescriptor is None or patch_norms != "prepass":
        return False
    if x.is_cuda and not has_tma(x.device):
        return False
    if x.dtype == torch.float32 and precision != "tf32":
        return False
    n, _, h, wd = x.shape
    _, c_in_g, kh, kw = w.shape
    if c_in_g < _CHANNEL_CHUNK_MIN:
        return False
    hq, wq, planes_h, planes_w = strided_grid_geometry((h, wd), out_hw, (kh, kw), stride,
                                                       padding, dilation)
    reach = (kh - 1) * dilation[0] * wq + (kw - 1) * dilation[1] + 256
    return planes_h * planes_w * n * hq * wq + reach < 2 ** 31


@triton.jit
def stage_grid_rows(
    x_ptr, grid_ptr, q_ptr, tile, g, lead, m_grid, m_plane, planes_w, hw_q, w_q, in_h, in_w,
    pad_h, pad_w, c_in_per_group, c_pad, groups, stride_xn, stride_xc, stride_xh, stride_xw,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, STAGE_X: tl.constexpr,
    STORE_Q: tl.constexpr, PIXELS_FAST: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows ``tile * BLOCK_P ..`` of a staged grid of group ``g``: ``lead`` zero rows, then the
    grid (module docstring); grid row p = buffer row p + lead. If STAGE_X the rows (all Cp
    channels; zeros on padding, in the lead rows and past C_in/G); if STORE_Q the grid rows'
    sums of squares over the group's channels (fp32; 0 on padding).

      x_ptr     [N, G*Cg, H, W] input, any strides (stride_xn, stride_xc, stride_xh, stride_xw).
      grid_ptr  [lead + M, G*Cp] contiguous, x's dtype (written iff STAGE_X).
      q_ptr     [G, M] fp32 contiguous (written iff STORE_Q).
    Scalars: M = m_grid = planes * m_plane, m_plane = N*Hq*Wq, hw_q = Hq*Wq, w_q = Wq, H, W,
    PH, PW, Cg = C_in/G, Cp, G. At stride 1 one plane (m_plane = M, planes_w unread): grid
    row (n, i, j) holds pixel (i - PH, j - PW). Else (STRIDE_H, STRIDE_W) the M rows are planes
    of m_plane rows, plane a * planes_w + b holding the phase (a, b) of the padded input: its
    row (n, i, j) is pixel (i*SH + a - PH, j*SW + b - PW) (:func:`strided_grid_geometry`).
    PIXELS_FAST (conv_fwd.pixels_fast: x's channels not its contiguous axis, NCHW): x is read
    through the transposed tile (epilogue.tile_ptrs), lanes along the pixels; the grid rows'
    own source addresses show Triton no contiguity (padding gaps), so it would otherwise lay
    the lanes across the channel planes, a 32-byte sector a lane."""
    r = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    in_buffer = r < lead + m_grid
    # lead rows: grid row < 0, clamped to 0 for the (masked) index arithmetic
    p = tl.maximum(r - lead, 0)
    in_grid = in_buffer & (r >= lead)
    if STRIDE_H * STRIDE_W == 1:
        img = p // hw_q
        rem = p - img * hw_q
        hi = rem // w_q - pad_h
        wi = rem % w_q - pad_w
    else:
        plane = p // m_plane
        pp = p - plane * m_plane
        img = pp // hw_q
        rem = pp - img * hw_q
        a = plane // planes_w
        hi = (rem // w_q) * STRIDE_H + a - pad_h
        wi = (rem % w_q) * STRIDE_W + (plane - a * planes_w) - pad_w
    data = in_grid & (hi >= 0) & (hi < in_h) & (wi >= 0) & (wi < in_w)
    src = (img.to(tl.int64) * stride_xn + hi.to(tl.int64) * stride_xh
           + wi.to(tl.int64) * stride_xw)
    dst = r.to(tl.int64) * (groups * c_pad) + g * c_pad
    sumsq = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, c_pad if STAGE_X else c_in_per_group, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        chan = (g * c_in_per_group + offs_c).to(tl.int64) * stride_xc
        v = load_tile(tile_ptrs(x_ptr, src, chan, PIXELS_FAST), data,
                      offs_c < c_in_per_group, PIXELS_FAST)
        if STAGE_X:
            tl.store(grid_ptr + dst[:, None] + offs_c[None, :], v,
                     mask=in_buffer[:, None] & (offs_c < c_pad)[None, :])
        if STORE_Q:
            vf = v.to(tl.float32)
            sumsq += vf * vf
    if STORE_Q:
        tl.store(q_ptr + g.to(tl.int64) * m_grid + p, tl.sum(sumsq, axis=1), mask=in_grid)


@triton.jit
def _prepare_grid_kernel(
    x_ptr, grid_ptr, q_ptr, w_ptr, packed_ptr, sqnorm_ptr,
    n_grid_programs, m_grid, m_plane, planes_w, hw_q, w_q, in_h, in_w, pad_h, pad_w,
    c_in_per_group, c_pad, groups, stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wh, stride_ww,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    STAGE_X: tl.constexpr,
    WRITE_PACKED: tl.constexpr, PIXELS_FAST: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The grid path's preparation, one launch; 1-D grid of ``n_grid_programs + C_out``:

    * pid < n_grid_programs (= cdiv(M, BLOCK_P) * G, group fastest): BLOCK_P grid rows of group
      ``pid % G`` (:func:`stage_grid_rows`, no lead rows): q[g, p] = sum over the group's
      channels of x^2 (fp32; 0 on padding) and, if STAGE_X, the rows themselves;
    * pid >= n_grid_programs: filter ``pid - n_grid_programs`` (conv_fwd._pack_filter).

    Pointers (Cg = C_in/G, Cp = c_pad, M = m_grid = planes * N*Hq*Wq):
      x_ptr, grid_ptr, q_ptr: as :func:`stage_grid_rows` (grid_ptr [M, G*Cp], written iff
                  STAGE_X, else any output; q_ptr [G, M] fp32 always written).
      w_ptr, packed_ptr, sqnorm_ptr: as conv_fwd._prepare_operands_kernel (packed with Cp).
    Scalars: m_plane = N*Hq*Wq, planes_w, hw_q = Hq*Wq, w_q = Wq, H, W, PH, PW, Cg, Cp, G;
    strides and PIXELS_FAST: as :func:`stage_grid_rows`.
    """
    pid = tl.program_id(0)
    if pid < n_grid_programs:
        stage_grid_rows(x_ptr, grid_ptr, q_ptr, pid // groups, pid % groups, 0, m_grid, m_plane,
                        planes_w, hw_q, w_q, in_h, in_w, pad_h, pad_w, c_in_per_group, c_pad,
                        groups, stride_xn, stride_xc, stride_xh, stride_xw, STRIDE_H, STRIDE_W,
                        STAGE_X, True, PIXELS_FAST, BLOCK_P, BLOCK_C)
    else:
        _pack_filter(w_ptr, packed_ptr, sqnorm_ptr, (pid - n_grid_programs).to(tl.int64),
                     c_in_per_group, c_pad, stride_wo, stride_wc, stride_wh, stride_ww, KH, KW,
                     WRITE_PACKED, BLOCK)


@triton.jit
def tap_row_offset(tap, KW: tl.constexpr, dil_h, dil_w, w_q):
    """The grid-row offset of filter tap ``tap`` = r * KW + s on a grid of pitch Wq:
    r*DH*Wq + s*DW, the same for every row of a tile."""
    r = tap // KW
    return r * dil_h * w_q + (tap - r * KW) * dil_w


@triton.jit
def strided_tap_row_offset(tap, KW: tl.constexpr, STRIDE_H: tl.constexpr,
                           STRIDE_W: tl.constexpr, dil_h, dil_w, w_q, plane_rows_h,
                           plane_rows_w):
    """:func:`tap_row_offset` on a strided grid: tap (r, s) reads phase plane (u % SH, v % SW)
    (u = r*DH, v = s*DW) at rows (u // SH, v // SW) on, the plane (a, b) beginning at grid row
    a * plane_rows_h + b * plane_rows_w (= (a * planes_w + b) * N*Hq*Wq)."""
    if STRIDE_H * STRIDE_W == 1:
        offset = tap_row_offset(tap, KW, dil_h, dil_w, w_q)
    else:
        r = tap // KW
        u = r * dil_h
        v = (tap - r * KW) * dil_w
        offset = ((u % STRIDE_H) * plane_rows_h + (u // STRIDE_H) * w_q
                  + (v % STRIDE_W) * plane_rows_w + v // STRIDE_W)
    return offset


@triton.jit
def next_channel_chunk(tap, c0, channels, BLOCK_K: tl.constexpr):
    """The grid GEMMs' K loop counters after a step: ``(tap, c0)`` BLOCK_K channels on,
    wrapping to the next tap at ``channels`` (carried: a division a step would cost more)."""
    c0 += BLOCK_K
    wrap = c0 >= channels
    return tap + wrap.to(tl.int32), tl.where(wrap, 0, c0)


@triton.jit
def grid_row_pixels(rows, m_grid, hw_q, w_q, h_lim, w_lim):
    """Grid rows [BM] -> ``(image, row i, column j, mask)``: the mask keeps the rows inside
    the grid whose (i, j) is a pixel of the H x W (h_lim x w_lim) image the kernel writes."""
    img = rows // hw_q
    rem = rows - img * hw_q
    i = rem // w_q
    j = rem - i * w_q
    return img, i, j, (rows < m_grid) & (i < h_lim) & (j < w_lim)


@triton.jit
def _sphere_conv_fwd_grid_kernel(
    y_ptr, x_desc, w_desc, w_sqnorm_ptr, bias_ptr, k_ptr, c_ptr, rx_ptr, q_ptr,
    m_grid, m_total, plane_rows_h, plane_rows_w, hw_q, w_q, c_out_per_group, c_pad, groups,
    out_h, out_w, stride_yn, stride_yc, stride_yh, stride_yw, dil_h, dil_w, eps,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    OPERATOR: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    STORE_C: tl.constexpr, OUT_PIXELS_FAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """SphereConv2d forward on the padded grid; program = (group, M tile, N tile) over the
    first plane's rows (those of the output pixels).

    Descriptors and pointers (Cp = c_pad, a multiple of BLOCK_K; Og = C_out/G; M = m_grid =
    N*Hq*Wq rows a plane, m_total = planes * M rows in all: one plane at stride 1):
      x_desc     TMA descriptor of the grid [m_total, G*Cp] (row pitch G*Cp), block
                 [BLOCK_M, BLOCK_K].
      w_desc     TMA descriptor of the packed filters [C_out, KH*KW*Cp] (contiguous), block
                 [BLOCK_N, BLOCK_K].
      w_sqnorm_ptr, bias_ptr, k_ptr, y_ptr, c_ptr, rx_ptr: as conv_fwd._sphere_conv_fwd_kernel
                 (y and c [N, C_out, Ho, Wo] with strides (stride_yn, stride_yc, stride_yh,
                 stride_yw); rx [N, G, Ho, Wo] fp32 contiguous).
      q_ptr      [G, m_total] fp32 contiguous: each grid row's sum of squares (0 on padding).
    Scalars: plane_rows_h / plane_rows_w = the rows between phase planes a and a + 1 / b and
    b + 1 (:func:`strided_tap_row_offset`; unread at stride 1), hw_q = Hq*Wq, w_q = Wq, Og,
    Cp, G, Ho, Wo, dilation, eps. STRIDE_H, STRIDE_W: the conv's stride.
    Constexprs: as conv_fwd._sphere_conv_fwd_kernel (the pre-pass norms and the channel-chunk
      loop always; offsets int32: the launcher keeps M plus the window's reach below 2^31).

    A box row past m_total reads zeros (TMA's out-of-bounds fill). Filter rows of the next group (an
    N tile past Og) and of no filter (past C_out: zeros) only reach columns the epilogue drops.
    """
    g, pid_m, pid_n = gemm_tile_of_program(tl.program_id(0), groups, m_grid, c_out_per_group,
                                           BLOCK_M, BLOCK_N, GROUP_M)
    p0 = pid_m * BLOCK_M
    w_row = g * c_out_per_group + pid_n * BLOCK_N
    x_col = g * c_pad
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_chunks = c_pad // BLOCK_K
    tap = 0
    c0 = 0
    for it in range(0, KH * KW * n_chunks):
        x_tile = x_desc.load([p0 + strided_tap_row_offset(tap, KW, STRIDE_H, STRIDE_W, dil_h,
                                                          dil_w, w_q, plane_rows_h,
                                                          plane_rows_w), x_col + c0])
        w_tile = w_desc.load([w_row, tap * c_pad + c0])
        if UPCAST_DOT:   # the interpreter's bf16 dot is wrong (conv_fwd)
            acc = tl.dot(x_tile.to(tl.float32), w_tile.to(tl.float32).T, acc,
                         input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x_tile, w_tile.T, acc, input_precision=DOT_PRECISION)
        tap, c0 = next_channel_chunk(tap, c0, c_pad, BLOCK_K)

    rows = p0 + tl.arange(0, BLOCK_M)
    img, ho, wo, mask_m = grid_row_pixels(rows, m_grid, hw_q, w_q, out_h, out_w)
    q_rows = q_ptr + g.to(tl.int64) * m_total
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(KH * KW):
        if STRIDE_H * STRIDE_W == 1:
            # this form, not tap_row_offset's: with it ptxas serialises the K loop's wgmmas
            # (C7515, accumulator registers redefined inside the pipeline; triton 3.6 and 3.9)
            pos = rows + (t // KW) * dil_h * w_q + (t % KW) * dil_w
        else:
            pos = rows + strided_tap_row_offset(t, KW, STRIDE_H, STRIDE_W, dil_h, dil_w, w_q,
                                                plane_rows_h, plane_rows_w)
        sumsq += tl.load(q_rows + pos, mask=mask_m & (pos < m_total), other=0.0)
    r_x = tl.sqrt(sumsq + eps)
    out_row = (img.to(tl.int64) * stride_yn + ho.to(tl.int64) * stride_yh
               + wo.to(tl.int64) * stride_yw)
    _store_gemm_tile(acc, w_row, c_out_per_group * (g + 1), 1.0 / r_x, out_row, mask_m,
                     w_sqnorm_ptr, eps, stride_yc, bias_ptr, k_ptr, y_ptr, c_ptr, OPERATOR,
                     HAS_BIAS, EMULATE_RTNE, STORE_C, OUT_PIXELS_FAST, BLOCK_M, BLOCK_N)
    if pid_n == 0:
        # r_x is the same for every N tile of this M tile: one writer
        rx_offs = ((img.to(tl.int64) * groups + g) * out_h + ho) * out_w + wo
        tl.store(rx_ptr + rx_offs, r_x, mask=mask_m)


def _set_block_shapes(nargs):
    """Autotune pre-hook: the descriptors' boxes follow the config's tile."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def autotune_tma_kernel(kernel, configs, key, prune, set_block_shapes):
    """``kernel`` autotuned over ``configs`` (the first alone with SPHEREOPS_AUTOTUNE=0, as
    conv_fwd), each config's pre-hook setting the descriptors' boxes to its tile."""
    if not env_switch("SPHEREOPS_AUTOTUNE", True):
        configs = configs[:1]
    for cfg in configs:
        cfg.pre_hook = set_block_shapes
    return triton.autotune(configs=configs, key=key,
                           prune_configs_by={"early_config_prune": prune})(kernel)


def launch_tma_kernel(autotuned, kernel, config, descriptors, set_block_shapes, args, flags,
                      programs, what, phases=1):
    """Launch a TMA kernel: ``autotuned``, or with ``config`` (a triton.Config: tests) the plain
    ``kernel`` at that tile, its descriptors' boxes set here. ``programs(meta)`` -> grid axis
    0 for a tile; axis 1 has ``phases`` programs."""
    if config is not None:
        autotuned = kernel
        flags = dict(flags, **config.kwargs, num_warps=config.num_warps,
                     num_stages=config.num_stages)
        set_block_shapes(dict(descriptors, **config.kwargs))
    launch(autotuned, lambda meta: (programs(meta), phases), args, flags, what)


_sphere_conv_fwd_grid_autotuned = autotune_tma_kernel(
    _sphere_conv_fwd_grid_kernel, conv_fwd_grid_configs(interpreter=_INTERPRET),
    ["m_grid", "c_out_per_group", "c_pad", "KH", "KW", "STRIDE_H", "STRIDE_W"],
    prune_conv_fwd_grid_configs,
    _set_block_shapes)


def direct_grid(x, groups, padding, c_pad):
    """x itself as the grid [N*H*W, C] when it already is one: no padding, channels_last
    contiguous, Cp = C_in/G, 16-byte aligned (a 1x1 conv on an aligned channels_last input);
    else None."""
    n, c_in, h, wd = x.shape
    if tuple(padding) != (0, 0) or c_pad != c_in // groups:
        return None
    if not x.permute(0, 2, 3, 1).is_contiguous() or x.data_ptr() % 16:
        return None
    return x.permute(0, 2, 3, 1).reshape(n * h * wd, c_in)


def launch_grid_preparation(x, grid_out, q, groups, stride, padding, geometry, kernel,
                            filters):
    """One launch of :func:`_prepare_grid_kernel`: x onto ``grid_out`` [planes*N*Hq*Wq, G*Cp]
    (None: x is the grid already, read in place), each grid row's sum of squares into ``q``
    [G, planes*N*Hq*Wq] and the filter programs (conv_fwd._pack_filter) with ``filters`` = (w,
    packed, sqnorm, write_packed); ``geometry`` = :func:`strided_grid_geometry`'s."""
    n, c_in, h, wd = x.shape
    c_in_g = c_in // groups
    c_pad = grid_channels(c_in_g)
    hq, wq, planes_h, planes_w = geometry
    m_plane = n * hq * wq
    m_grid = planes_h * planes_w * m_plane
    cfg = PREP_CONFIG
    n_grid_programs = cdiv(m_grid, cfg["BLOCK_P"]) * groups
    w, packed, sqnorm, write_packed = filters
    # outputs never alias an input (torch.compile's mutation analysis): unused ones get sqnorm
    launch(_prepare_grid_kernel, (n_grid_programs + w.shape[0],),
           (x, grid_out if grid_out is not None else sqnorm, q, w, packed, sqnorm,
            n_grid_programs, m_grid, m_plane, planes_w, hq * wq, wq, h, wd, padding[0],
            padding[1], c_in_g, c_pad, groups, *x.stride(), *w.stride()),
           dict(KH=kernel[0], KW=kernel[1], STRIDE_H=stride[0], STRIDE_W=stride[1],
                STAGE_X=grid_out is not None,
                WRITE_PACKED=write_packed, PIXELS_FAST=pixels_fast(x), BLOCK=cfg["BLOCK"],
                BLOCK_P=cfg["BLOCK_P"], BLOCK_C=grid_stage_block_c(c_pad),
                num_warps=cfg["num_warps"]), _WHAT)


def grid_stage_block_c(c_pad: int) -> int:
    """Channels a step of :func:`stage_grid_rows`: at most PREP_CONFIG's, a power of two
    (Cp = 48 takes 64, its last 16 masked)."""
    return min(PREP_CONFIG["BLOCK_C"], next_pow2(c_pad))


def grid_forward(x, w, bias, k, y, c, r_x, stride, padding, dilation, eps, flags, config=None):
    """Launch the grid path for ``y``, ``c`` (empty: not stored) and ``r_x``, allocated by
    conv_fwd's launcher, which has validated everything and checked :func:`grid_path_applies`.
    ``flags``: the constexprs conv_fwd's kernel would get (KH, KW, OPERATOR, HAS_BIAS,
    EMULATE_RTNE, STORE_C, DOT_PRECISION, UPCAST_DOT, OUT_PIXELS_FAST); ``config``: a
    triton.Config that bypasses autotuning (tests)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c_in, h, wd = x.shape
    c_out, c_in_g, kh, kw = w.shape
    groups = c_in // c_in_g
    ho, wo = y.shape[2], y.shape[3]
    geometry = strided_grid_geometry((h, wd), (ho, wo), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    hq, wq, planes_h, planes_w = geometry
    m_grid = n * hq * wq
    m_total = planes_h * planes_w * m_grid
    c_pad = grid_channels(c_in_g)
    dev = x.device
    grid_x = direct_grid(x, groups, (ph, pw), c_pad) if (sh, sw) == (1, 1) else None
    stage = grid_x is None
    if stage:
        grid_x = torch.empty((m_total, groups * c_pad), dtype=x.dtype, device=dev)
    q = torch.empty((groups, m_total), dtype=torch.float32, device=dev)
    # a TMA descriptor's base must be 16-byte aligned: a misaligned weight view is packed
    packed, sqnorm, already_packed = packed_filter_buffers(w, c_pad, align=16)
    launch_grid_preparation(x, grid_x if stage else None, q, groups, (sh, sw), (ph, pw),
                            geometry, (kh, kw), (w, sqnorm if already_packed else packed,
                                                 sqnorm, not already_packed))
    w_flat = packed.reshape(c_out, kh * kw * c_pad)
    # the boxes are placeholders until the config is known (_set_block_shapes)
    x_desc = TensorDescriptor.from_tensor(grid_x, [16, 16])
    w_desc = TensorDescriptor.from_tensor(w_flat, [16, 16])
    kernel_flags = {key: flags[key] for key in (
        "KH", "KW", "OPERATOR", "HAS_BIAS", "DOT_PRECISION", "UPCAST_DOT", "EMULATE_RTNE",
        "STORE_C", "OUT_PIXELS_FAST")}
    kernel_flags.update(STRIDE_H=sh, STRIDE_W=sw)
    # bias / k unread without a bias / for linear and cosine, c without STORE_C: any tensor
    # y first: launch() takes the device from the first argument (a tensor)
    args = (y, x_desc, w_desc, sqnorm, bias.contiguous() if bias is not None else sqnorm,
            k.contiguous() if k is not None else sqnorm,
            c if flags["STORE_C"] else sqnorm, r_x, q, m_grid, m_total, planes_w * m_grid, m_grid,
            hq * wq, wq, c_out // groups, c_pad, groups, ho, wo, *y.stride(), dh, dw, float(eps))

    launch_tma_kernel(
        _sphere_conv_fwd_grid_autotuned, _sphere_conv_fwd_grid_kernel, config,
        dict(x_desc=x_desc, w_desc=w_desc), _set_block_shapes, args, kernel_flags,
        lambda meta: groups * cdiv(m_grid, meta["BLOCK_M"]) * cdiv(c_out // groups,
                                                                    meta["BLOCK_N"]),
        _WHAT)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (docs/ARCHITECTURE.md, "The AOT compile check contract")
# ---------------------------------------------------------------------------------------------

# The modelled launch: a channels_last 3x3 "same" conv, N=32, 64 -> 64 channels at 56x56
# (ResNet stage 1): Hq = Wq = 57; at stride 2 (a downsampling 3x3 conv, 56x56 -> 28x28): four
# phase planes of 29 x 29.
_GRID_EXAMPLE = dict(m_grid=32 * 57 * 57, m_total=32 * 57 * 57, plane_rows_h=32 * 57 * 57,
                     plane_rows_w=32 * 57 * 57, hw_q=57 * 57, w_q=57, c_out_per_group=64,
                     c_pad=64, groups=1, out_h=56, out_w=56, stride_yn=56 * 56 * 64, stride_yc=1,
                     stride_yh=56 * 64, stride_yw=64, dil_h=1, dil_w=1)
_GRID_EXAMPLE_S2 = dict(_GRID_EXAMPLE, m_grid=32 * 29 * 29, m_total=4 * 32 * 29 * 29,
                        plane_rows_h=2 * 32 * 29 * 29, plane_rows_w=32 * 29 * 29,
                        hw_q=29 * 29, w_q=29, out_h=28, out_w=28, stride_yn=28 * 28 * 64,
                        stride_yh=28 * 64)
_PREP_EXAMPLE = dict(n_grid_programs=32 * 57 * 57 // PREP_CONFIG["BLOCK_P"], m_grid=32 * 57 * 57,
                     m_plane=32 * 57 * 57, planes_w=1,
                     hw_q=57 * 57, w_q=57, in_h=56, in_w=56, pad_h=1, pad_w=1,
                     c_in_per_group=64, c_pad=64, groups=1, stride_xn=56 * 56 * 64,
                     stride_xc=1, stride_xh=56 * 64, stride_xw=64, stride_wo=64 * 9,
                     stride_wc=9, stride_wh=3, stride_ww=1)


def aot_specs():
    """Compile specs for ``make aot-check``: every grid config x fp16/bf16/tf32 (the
    configs fp32 prunes -- BLOCK_K > 32, 8 warps -- left out) as 3x3 convs with the heaviest
    epilogue (sigmoid, bias, c stored), the descriptors typed by the tile's boxes, and every
    config at stride 2 in bf16 (the tap offsets over phase planes); the preparation kernel per
    dtype, staging and not, and staging at stride 2."""
    from .angular import OPERATOR_CODES
    from .conv_fwd import _spec

    specs = []
    for cfg in conv_fwd_grid_configs():
        bm, bn, bk = (cfg.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        for dtype_name, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16),
                                        ("fp32", torch.float32)):
            if not fits_grid_channels(cfg, 64, torch_dtype):
                continue
            precision = "tf32" if dtype_name == "fp32" else "ieee"
            for stride in (1, 2):
                if stride == 2 and dtype_name != "bf16":
                    continue
                constexprs = dict(KH=3, KW=3, STRIDE_H=stride, STRIDE_W=stride,
                                  OPERATOR=OPERATOR_CODES["sigmoid"], HAS_BIAS=True,
                                  DOT_PRECISION=precision, UPCAST_DOT=False,
                                  EMULATE_RTNE=False, STORE_C=True, OUT_PIXELS_FAST=False,
                                  **cfg.kwargs)
                label = "" if stride == 1 else "_s2"
                spec = _spec(f"conv_fwd_grid_3x3{label}_{bm}x{bn}x{bk}_w{cfg.num_warps}"
                             f"_s{cfg.num_stages}_{dtype_name}", _sphere_conv_fwd_grid_kernel,
                             dtype_name, constexprs,
                             _GRID_EXAMPLE if stride == 1 else _GRID_EXAMPLE_S2,
                             cfg.num_warps, cfg.num_stages, gemm=True)
                spec["signature"].update(x_desc=f"tensordesc<{dtype_name}[{bm},{bk}]>",
                                         w_desc=f"tensordesc<{dtype_name}[{bn},{bk}]>")
                specs.append(spec)
    for dtype_name in ("fp16", "bf16", "fp32"):
        # staging a channels_last input, an NCHW one (read along the pixels), and the q pass
        # alone (an aligned 1x1 input read in place); conv_bwd's prep kernel stages the wgrad's
        # grid (conv_bwd_prep_*_gridx_*)
        for label, stage, nchw, stride in (("_stage", True, False, 1),
                                           ("_stage_nchw", True, True, 1), ("", False, False, 1),
                                           ("_stage_s2", True, False, 2)):
            constexprs = dict(KH=3, KW=3, STRIDE_H=stride, STRIDE_W=stride, STAGE_X=stage,
                              WRITE_PACKED=True, PIXELS_FAST=nchw, BLOCK=PREP_CONFIG["BLOCK"],
                              BLOCK_P=PREP_CONFIG["BLOCK_P"], BLOCK_C=PREP_CONFIG["BLOCK_C"])
            example = (dict(_PREP_EXAMPLE, stride_xc=56 * 56, stride_xh=56, stride_xw=1)
                       if nchw else _PREP_EXAMPLE)
            if stride == 2:
                example = dict(example, m_grid=4 * 32 * 29 * 29, m_plane=32 * 29 * 29,
                               planes_w=2, hw_q=29 * 29, w_q=29,
                               n_grid_programs=4 * 32 * 29 * 29 // PREP_CONFIG["BLOCK_P"])
            specs.append(_spec(f"conv_fwd_grid_prepare{label}_{dtype_name}", _prepare_grid_kernel,
                               dtype_name, constexprs, example, PREP_CONFIG["num_warps"], 1,
                               gemm=False))
    return specs
