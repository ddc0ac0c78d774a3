"""Shared ``@triton.jit`` device functions for the angular part of SphereConv / SphereLinear.

Every kernel (conv forward, conv backward, linear) computes the cosine ``c`` of the angle
between a patch and a filter in fp32 and then needs ``g(theta)``, ``dg/dc`` and (learnable
sigmoid) ``dg/dk``, with ``theta = arccos(clamp(c, -1, 1))``.  This file is the single Triton
copy of that math; ``sphereops.reference`` holds the PyTorch copy and the tests hold them to
each other.

Operators are selected by a ``tl.constexpr`` int so that the unused branches compile away:

    OPERATOR_CODES = {"linear": 0, "cosine": 1, "sigmoid": 2}

    linear   g = 1 - 2 theta / pi
    cosine   g = cos(theta) = c            (no arccos at all)
    sigmoid  g = coth(A) * tanh(B),  A = pi / (4k),  B = (pi/2 - theta) / (2k)

theta itself is never formed: :func:`linear_g` computes 1 - 2 theta / pi from c directly, and
the sigmoid's B is A times that.

All functions take and return fp32 blocks (callers upcast before calling).  Only core ``tl``
operations are used (no libdevice): the Triton CPU interpreter cannot run libdevice, and the
same code must compile unchanged for the GPU.

NaN rule: a NaN cosine gives a NaN result from every function here.  Clamping is written with
``tl.where`` on ordered comparisons (false for NaN), never with ``tl.minimum``/``tl.maximum``,
whose default NaN handling returns the non-NaN operand on the GPU.
"""

import triton
import triton.language as tl

OPERATOR_CODES = {"linear": 0, "cosine": 1, "sigmoid": 2}
"""Operator name -> value of the ``OPERATOR`` constexpr taken by the device functions."""

_HALF_PI = tl.constexpr(1.5707963267948966)
_TWO_OVER_PI = tl.constexpr(0.6366197723675814)
_QUARTER_PI = tl.constexpr(0.7853981633974483)

# Below this |x| tanh is evaluated by its Taylor series: the exp form 1 - e^{-2|x|} loses
# relative precision by cancellation for small |x|; the 7th-order series has a relative
# truncation error < 62/2835 * x^8 ~ 1.3e-9 at |x| = 0.125.
_TANH_SERIES_LIMIT = tl.constexpr(0.125)


@triton.jit
def clamp_cos(c):
    """Clamp a cosine to [-1, 1], leaving NaN as NaN (ordered comparisons are false for NaN)."""
    c = tl.where(c > 1.0, 1.0, c)
    c = tl.where(c < -1.0, -1.0, c)
    return c


@triton.jit
def _sqrt_refined(z):
    """sqrt(z) for fp32 z >= 0 (or NaN, kept) within ~0.5 ulp; z < 0 is outside its domain.

    t = z * rsqrt(z) from the hardware's approximate reciprocal square root (one MUFU), then
    one Newton step on the exact residual z - t^2 (a fused multiply-add). ``sqrt_rn`` gives the
    correctly rounded value but compiles to ~24 SASS instructions with a slow-path branch on
    sm_90, this to ~6: the forward epilogue takes one per output element (linear_g), and there
    sqrt_rn was a quarter of the 128x128x64 conv kernel's instructions (SASS 9264 -> 7136)."""
    y = tl.rsqrt(tl.where(z > 0.0, z, 1.0))   # no inf at z = 0: t, r and the result are 0
    t = z * y
    r = tl.fma(-t, t, z)
    return tl.fma(r, 0.5 * y, t)


@triton.jit
def _sqrt_for(z, APPROX_SQRT: tl.constexpr):
    """sqrt(z), z >= 0: :func:`_sqrt_refined` (~0.5 ulp, ~7 SASS instructions), or with
    APPROX_SQRT the hardware's approximate square root (one MUFU.SQRT, within 3 ulp by the
    bound NVIDIA gives for sqrt.approx.f32) -- for results that are rounded to 16 bits next
    (bf16 / fp16 outputs: 2^-9 / 2^-12 relative, a thousand times coarser)."""
    if APPROX_SQRT:
        r = tl.sqrt(z)
    else:
        r = _sqrt_refined(z)
    return r


@triton.jit
def linear_g(c, APPROX_SQRT: tl.constexpr = False):
    """g = 1 - 2 arccos(c) / pi, the linear operator, for an fp32 block c in [-1, 1] (every
    caller clamps first); max error 9e-8 in float32 arithmetic (under one ulp of 1; sampled
    against float64, tests/test_conv_fwd_kernel.py::test_linear_g_max_error); with
    APPROX_SQRT (:func:`_sqrt_for`, for 16-bit outputs) up to ~5e-7. NaN gives NaN.

    With a = |c|: 1 - (2/pi) arccos(a) = 1 - sqrt(1 - a) Q(a), where Q = (2/pi) arccos(a) /
    sqrt(1 - a) is analytic on [0, 1] (the square root carries arccos' singularity at a = 1,
    and 1 - a is exact in fp32), and arccos(-a) = pi - arccos(a) makes g odd: g(c) = sign(c)
    g(|c|). Q is our degree-7 minimax fit (Lawson's reweighted least squares on 8000 Chebyshev
    nodes, weighted by sqrt(1 - a): the error of g). The forward epilogue evaluates this once
    per output element, where an arccos (two argument reductions selected branch-free and a
    reflection about pi in two parts) and the scaling by 2/pi took ~28 SASS instructions and
    this takes ~17.

    Every operator's angle goes through here: pi/2 - theta = asin(c) = (pi/2) g, so the
    sigmoid's B = (pi/2 - theta) / (2k) is A g with A = pi / (4k) (:func:`g_of_c`)."""
    a = tl.abs(c)
    q = -0.0009176749894045861
    q = q * a + 0.004612596720943963
    q = q * a - 0.011337552959180925
    q = q * a + 0.019948780833096924
    q = q * a - 0.03203011360873676
    q = q * a + 0.05665869176080348
    q = q * a - 0.13661853467622462
    q = q * a + 0.9999999920574553
    g_abs = 1.0 - _sqrt_for(1.0 - a, APPROX_SQRT) * q
    return tl.where(c < 0.0, -g_abs, g_abs)


@triton.jit
def tanh_f32(x):
    """tanh(x) in fp32 without overflow for any |x| and with full relative precision near 0.

    Uses e = exp(-2|x|) in (0, 1] (never overflows): tanh|x| = (1 - e) / (1 + e), sign restored
    after; small |x| takes the odd Taylor series instead to avoid the cancellation in 1 - e.
    """
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t_exp = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    t_series = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                                                             - x2 * 0.05396825396825397)))
    t = tl.where(ax < _TANH_SERIES_LIMIT, t_series, t_exp)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def coth_f32(x):
    """coth(x) = 1 / tanh(x) (x != 0), accurate for small and large |x| through tanh_f32."""
    return 1.0 / tanh_f32(x)


@triton.jit
def sech2_f32(x):
    """sech^2(x) = 4 e / (1 + e)^2 with e = exp(-2|x|): no overflow, and no cancellation for
    large |x| (where the form 1 - tanh^2 would lose every digit)."""
    e = tl.exp(-2.0 * tl.abs(x))
    d = 1.0 + e
    return 4.0 * e / (d * d)


@triton.jit
def csch2_f32(x):
    """csch^2(x) = sech^2(x) / tanh^2(x) (x != 0): both factors are stable, whereas
    coth^2 - 1 cancels for large |x| and 4e/(1-e)^2 cancels for small |x|."""
    t = tanh_f32(x)
    return sech2_f32(x) / (t * t)


@triton.jit
def g_of_c(c, k, OPERATOR: tl.constexpr, APPROX_SQRT: tl.constexpr = False):
    """g(theta) for theta = arccos(clamp(c, -1, 1)).

    c: fp32 block of cosines (clamped here, NaN kept).
    k: fp32 sigmoid steepness, a scalar or a block broadcastable against c; ignored unless
       OPERATOR == 2 (callers may pass any dummy value then).
    OPERATOR: constexpr int, 0 linear, 1 cosine, 2 sigmoid (see OPERATOR_CODES).
    APPROX_SQRT: the result is rounded to 16 bits next (:func:`_sqrt_for`).
    """
    c = clamp_cos(c)   # free after store_sphere_tile's clamp: the compiler folds the repeat
    if OPERATOR == 0:
        g = linear_g(c, APPROX_SQRT)
    elif OPERATOR == 1:
        g = c
    else:
        # A = pi / (4k) has k's shape (a [1, BN] column block in the epilogue): one division
        # per column; B = (pi/2 - theta) / (2k) = A * linear_g(c) (see linear_g)
        a = _QUARTER_PI / k
        b = a * linear_g(c, APPROX_SQRT)
        g = coth_f32(a) * tanh_f32(b)
    return g


@triton.jit
def dg_dc(c, k, OPERATOR: tl.constexpr, DELTA: tl.constexpr):
    """dg/dc = g'(theta) * dtheta/dc with the bounded dtheta/dc = -1 / sqrt(max(1 - c^2, DELTA)).

    c: fp32 block of cosines (clamped to [-1, 1] here, NaN kept).
    k: fp32 sigmoid steepness (scalar or block broadcastable against c), ignored unless sigmoid.
    OPERATOR: constexpr int, 0 linear, 1 cosine, 2 sigmoid.
    DELTA: constexpr float, ``sphereops.reference.ARCCOS_DELTA`` passed in by the launcher.

    Cosine returns exactly 1 (straight-through clamp: dL/dc = dy).  1 - c^2 is formed as
    (1 - c)(1 + c), which keeps its relative precision for |c| near 1.
    """
    c = clamp_cos(c)
    if OPERATOR == 1:
        d = tl.zeros_like(c) + 1.0
    else:
        one_minus_c2 = (1.0 - c) * (1.0 + c)
        # max(., DELTA) written with where so that a NaN c stays NaN; rsqrt: one MUFU (within
        # ~2^-22.9 relative) where 1 / sqrt was an approximate sqrt, then a division with its
        # range checks (~10 SASS instructions an element in the backward's prep passes)
        inv_sin = tl.rsqrt(tl.where(one_minus_c2 < DELTA, DELTA, one_minus_c2))
        if OPERATOR == 0:
            # g' = -2/pi, dtheta/dc = -inv_sin
            d = _TWO_OVER_PI * inv_sin
        else:
            a = _QUARTER_PI / k
            b = a * linear_g(c)   # (pi/2 - theta) / (2k)
            # g' = -coth(A) sech^2(B) / (2k), dtheta/dc = -inv_sin
            d = coth_f32(a) * sech2_f32(b) / (2.0 * k) * inv_sin
    return d


@triton.jit
def dg_dk(c, k):
    """dg/dk of the sigmoid operator at theta = arccos(clamp(c, -1, 1)):

        A = pi/(4k), B = (pi/2 - theta)/(2k),
        dg/dk = (A csch^2(A) tanh(B) - B coth(A) sech^2(B)) / k

    c: fp32 block of cosines; k: fp32 steepness (scalar or block broadcastable against c), > 0.
    """
    c = clamp_cos(c)
    a = _QUARTER_PI / k
    b = a * linear_g(c)   # (pi/2 - theta) / (2k)
    return (a * csch2_f32(a) * tanh_f32(b) - b * coth_f32(a) * sech2_f32(b)) / k


@triton.jit
def cosine_and_dg_dc(v, k, b, OPERATOR: tl.constexpr, DELTA: tl.constexpr,
                     FROM_OUTPUT: tl.constexpr):
    """``(c, dg/dc)`` from a block of the backward's saved state ``v`` (fp32).

    FROM_OUTPUT False: v is the saved clamped cosine c; dg/dc as :func:`dg_dc`.
    FROM_OUTPUT True (linear and cosine operators): v is the forward's output y and ``b`` the
    bias in it (a block broadcastable against v, or 0.0): cosine ``c = y - b``; linear
    ``theta = pi/2 (1 - (y - b))``, so ``c = sin(pi/2 (y - b))`` and the bounded derivative takes
    ``sin(theta) = cos(pi/2 (y - b))`` from the angle itself, exact where ``1 - c^2`` would cancel
    (the twin of ``sphereops.reference._angle_from_output``). NaN stays NaN.
    k: the sigmoid steepness (FROM_OUTPUT False only), DELTA: the arccos-derivative bound.
    """
    if FROM_OUTPUT:
        g = clamp_cos(v - b)
        if OPERATOR == 0:
            half = g * _HALF_PI
            sin2 = tl.cos(half) * tl.cos(half)
            c = tl.sin(half)
            # max(., DELTA) written with where so that a NaN stays NaN
            d = _TWO_OVER_PI * tl.rsqrt(tl.where(sin2 < DELTA, DELTA, sin2))
        else:
            c = g
            d = dg_dc(g, k, OPERATOR, DELTA)
    else:
        c = v
        d = dg_dc(v, k, OPERATOR, DELTA)
    return c, d
