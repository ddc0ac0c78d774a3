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
def store_sphere_tile(acc, inv_norms, o_glob, mask_n, out_offs, out_mask,
                      bias_ptr, k_ptr, y_ptr, c_ptr,
                      OPERATOR: tl.constexpr, HAS_BIAS: tl.constexpr,
                      EMULATE_RTNE: tl.constexpr, STORE_C: tl.constexpr = True):
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
      (c_ptr is then never written).
    """
    c = clamp_cos(acc * inv_norms)
    # c is stored before g is formed so that it can die element by element inside g: keeping
    # both full tiles live at once costs registers a large tile does not have
    if STORE_C:
        tl.store(c_ptr + out_offs, to_dtype_of(c, c_ptr, EMULATE_RTNE), mask=out_mask)
    if OPERATOR == 2:
        k = tl.load(k_ptr + o_glob, mask=mask_n, other=1.0).to(tl.float32)
        g = g_of_c(c, k[None, :], OPERATOR)
    else:
        g = g_of_c(c, 1.0, OPERATOR)
    if HAS_BIAS:
        b = tl.load(bias_ptr + o_glob, mask=mask_n, other=0.0).to(tl.float32)
        g = g + b[None, :]
    tl.store(y_ptr + out_offs, to_dtype_of(g, y_ptr, EMULATE_RTNE), mask=out_mask)
