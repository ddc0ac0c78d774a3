"""Device helpers shared by the kernel families: the forward's store of c and y, and the cast
for storing (with the interpreter's bf16 rounding fixed up).

``store_sphere_tile`` is the epilogue of every forward kernel (conv GEMM, depthwise conv, linear):
given the fp32 dot products of a tile and the product of the two norms, it forms
``c = clamp(s / (r_x r_w))``, stores it, then ``y = g(c) + b`` and stores that.
"""
import triton
import triton.language as tl

from .angular import clamp_cos, g_of_c


@triton.jit
def to_dtype_of(v, dst_ptr, EMULATE_RTNE: tl.constexpr):
    """Cast the fp32 block v to dst_ptr's element type for storing.

    EMULATE_RTNE (interpreter only): the interpreter's fp32 -> bf16 conversion truncates instead
    of rounding to nearest-even as the GPU's cvt.rn does (half the values come out one ulp off,
    with a bias), which would inflate every bf16 error in the tests; round in fp32 first so the
    final cast is exact. NaN is passed through untouched (adding to its bits could turn it into
    Inf). Never set for GPU compiles.
    """
    if EMULATE_RTNE and dst_ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        rounded = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        v = tl.where(v == v, rounded, v)
    return v.to(dst_ptr.dtype.element_ty)


@triton.jit
def tile_ptrs(ptr, rows, cols, ROWS_FAST: tl.constexpr):
    """Pointers ptr + rows[:, None] + cols[None, :] of a [BM, BC] tile (rows: pixel offsets,
    cols: channel offsets; ptr 0 gives the offsets alone) -- held transposed, [BC, BM], when
    ROWS_FAST; read them with :func:`load_tile`.

    Why transposed: Triton lays a load's (or store's) lanes along the axis it can prove
    contiguous and, when it can prove neither (an NCHW window at stride 2, a flat pixel index
    divided by a runtime width), along the last axis. Pixels last makes that fallback run
    along the pixels -- a warp touches a few 32-byte sectors of one channel plane -- instead
    of across 32 channel planes, a sector a lane (sm_90 TTGIR of the NCHW builds: lanes
    [1, 32] on the channel axis). tl.trans of a tile relabels its registers, it copies
    nothing."""
    if ROWS_FAST:
        p = ptr + rows[None, :] + cols[:, None]
    else:
        p = ptr + rows[:, None] + cols[None, :]
    return p


@triton.jit
def load_tile(ptrs, row_mask, col_mask, ROWS_FAST: tl.constexpr):
    """The [BM, BC] tile at :func:`tile_ptrs`' pointers (0 where masked), in their dtype."""
    if ROWS_FAST:
        v = tl.trans(tl.load(ptrs, mask=col_mask[:, None] & row_mask[None, :], other=0.0))
    else:
        v = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    return v


@triton.jit
def column_quarters(acc, BM: tl.constexpr, BN: tl.constexpr):
    """The four column quarters of ``acc`` [BM, BN], each [BM, BN // 4], left to right -- for
    epilogues that would not fit their registers over a whole tile at once. The reshape,
    permutes and splits only rename accumulator registers (no shared-memory round trip in the
    PTX): acc[m, (2a + b) q + j] -> [m, b, j, a], split by a into halves [m, b, j], each
    permuted to [m, j, b] and split by b."""
    q: tl.constexpr = BN // 4
    halves = tl.permute(tl.reshape(acc, (BM, 2, 2, q)), (0, 2, 3, 1))
    left, right = tl.split(halves)
    q0, q1 = tl.split(tl.permute(left, (0, 2, 1)))
    q2, q3 = tl.split(tl.permute(right, (0, 2, 1)))
    return q0, q1, q2, q3


@triton.jit
def _column_halves(part, BM: tl.constexpr, BP: tl.constexpr):
    """The left and right column halves of ``part`` [BM, BP] (register renaming only, as in
    :func:`column_quarters`)."""
    return tl.split(tl.permute(tl.reshape(part, (BM, 2, BP // 2)), (0, 2, 1)))


@triton.jit
def column_slices(acc, BM: tl.constexpr, BN: tl.constexpr, PARTS: tl.constexpr):
    """The PARTS (4 or 8) column slices of ``acc`` [BM, BN], each [BM, BN // PARTS], left to
    right: :func:`column_quarters`, each halved for 8.

    Eighths are for epilogues that store along the pixels (NCHW) without known runs of
    pixels (pixel_runs' RUN 1) on 128-wide tiles: each slice's transposed layout conversion
    then keeps less of the tile live (triton 3.6, sm_90, 128x128: the forward's NCHW epilogue
    848 B of spills a thread -> 0; make aot-check)."""
    q0, q1, q2, q3 = column_quarters(acc, BM, BN)
    if PARTS == 8:
        e0, e1 = _column_halves(q0, BM, BN // 4)
        e2, e3 = _column_halves(q1, BM, BN // 4)
        e4, e5 = _column_halves(q2, BM, BN // 4)
        e6, e7 = _column_halves(q3, BM, BN // 4)
        slices = (e0, e1, e2, e3, e4, e5, e6, e7)
    else:
        slices = (q0, q1, q2, q3)
    return slices


@triton.jit
def pixel_runs(rows, cols, row_mask, col_mask, RUN: tl.constexpr):
    """``(offs, mask)`` [BM, BC] = ``rows[:, None] + cols[None, :]`` and ``row_mask[:, None] &
    col_mask[None, :]`` for a tile of BM pixels (rows: element offsets from a flat pixel index,
    the tile starting at a multiple of RUN) x BC channels, with the launcher's promise
    (launch.pixel_run) made visible to Triton's alignment analysis: every run of RUN rows
    starting at a multiple of RUN is contiguous, starts at a multiple of RUN elements and is
    masked as one. Triton cannot prove this through the index's division by the plane size
    and, without it, moves an NCHW tile one element an instruction (sm_90 SASS of the 128x128
    bf16 forward: 256 STG.U16 a thread, against 32 STG.128 with it). RUN 1: no hint.

    The hints are set here, where the two tensors are formed: Triton attaches them to the op
    that defines a value, and a value passed in from the caller has none in this function."""
    offs = rows[:, None] + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if RUN > 1:
        offs = tl.max_contiguous(tl.multiple_of(offs, [RUN, 1]), [RUN, 1])
        mask = tl.max_constancy(mask, [RUN, 1])
    return offs, mask


@triton.jit
def store_tile(ptrs, value, mask, ROWS_FAST: tl.constexpr):
    """Store the [BM, BC] tile ``value`` at ``ptrs`` [BM, BC] where ``mask``; ROWS_FAST: through
    the transposed tile, so that the lanes run along the rows (pixels) where Triton can prove
    no contiguity on either axis (see :func:`tile_ptrs`)."""
    if ROWS_FAST:
        tl.store(tl.trans(ptrs), tl.trans(value), mask=tl.trans(mask))
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit
def store_sphere_tile(acc, inv_norms, o_glob, mask_n, out_offs, out_mask,
                      bias_ptr, k_ptr, y_ptr, c_ptr,
                      OPERATOR: tl.constexpr, HAS_BIAS: tl.constexpr,
                      EMULATE_RTNE: tl.constexpr, STORE_C: tl.constexpr = True,
                      PIXELS_FAST: tl.constexpr = False):
    """c = clamp(acc * inv_norms), y = g(c) + b; store c (unless not STORE_C), then y.

    acc: [BM, BN] fp32 dot products; inv_norms: 1 / (r_x r_w) broadcastable to acc (fp32) --
      the callers form it from per-row and per-column reciprocals, so no element pays a
      division (a reciprocal on the special-function unit, a quarter of the FMA rate, each).
    o_glob: [BN] global output-channel index; mask_n: [BN] channel mask.
    out_offs: [BM, BN] int64 element offsets into y and c (same strides); out_mask: [BM, BN].
    bias_ptr, k_ptr: [C_out] contiguous, read only when HAS_BIAS / OPERATOR == 2 (sigmoid).
    y_ptr, c_ptr: the outputs (the input's dtype) addressed through out_offs.
    Constexprs: OPERATOR 0 linear / 1 cosine / 2 sigmoid; HAS_BIAS adds the bias after g;
      EMULATE_RTNE: see to_dtype_of; STORE_C: False when the caller saves y for the backward
      (c_ptr is then never written); PIXELS_FAST: store along the rows (pixels) where Triton
      cannot see their contiguity -- NCHW outputs of a flat pixel index (:func:`store_tile`).
    """
    c = clamp_cos(acc * inv_norms)
    # c is stored before g is formed so that it can die element by element inside g: keeping
    # both full tiles live at once costs registers a large tile does not have
    if STORE_C:
        store_tile(c_ptr + out_offs, to_dtype_of(c, c_ptr, EMULATE_RTNE), out_mask, PIXELS_FAST)
    # y in 16 bits: g's square root may be the hardware's approximate one (angular._sqrt_for)
    approx: tl.constexpr = y_ptr.dtype.element_ty != tl.float32
    if OPERATOR == 2:
        k = tl.load(k_ptr + o_glob, mask=mask_n, other=1.0).to(tl.float32)
        g = g_of_c(c, k[None, :], OPERATOR, approx)
    else:
        g = g_of_c(c, 1.0, OPERATOR, approx)
    if HAS_BIAS:
        b = tl.load(bias_ptr + o_glob, mask=mask_n, other=0.0).to(tl.float32)
        g = g + b[None, :]
    store_tile(y_ptr + out_offs, to_dtype_of(g, y_ptr, EMULATE_RTNE), out_mask, PIXELS_FAST)
