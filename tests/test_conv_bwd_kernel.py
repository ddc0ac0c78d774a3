"""The fused SphereConv2d backward kernels (``sphereops_kernels.conv_bwd``) against float64.

Every check draws fresh random inputs (seed printed by conftest on failure), produces the saved
state ``(c, r_x)`` with the *reference* forward (so these tests do not depend on the forward
kernel), and compares dx, dw, db, dk with

* ``reference.conv2d_backward`` evaluated in float64 on the very same saved state (the
  closed-form specification: same function, so the bound is rounding only; the pure depthwise
  path reads no saved state, so there on the float64 recompute: ``_state_the_kernel_reads``),
  and
* float64 autograd through ``reference.conv2d_autograd`` (an independent derivation).

Low precision uses the adaptive bound of STYLE.md: ``max|out - ref64| <= 2 * max|ref_same_dtype -
ref64| + atol`` with ``atol`` a small multiple of the dtype's ulp at the gradient's scale (a
fp32 sum that lands on the other side of a rounding boundary than the reference's costs one ulp).
Under the interpreter every kernel runs on the CPU; with CUDA the same tests run on the GPU.
"""
import dataclasses
import math

import pytest
import torch

from helpers import (DEPTHWISE_ROW_CASE, DEPTHWISE_ROW_GEOMETRIES, RANDOM_CASES,
                     TAP_BIT_GEOMETRIES, assert_close,
                     assert_close_to_reference, make_conv_inputs, make_near_parallel_conv_inputs,
                     random_conv_geometry, record_launches)
from sphereops import reference as R

conv_bwd = pytest.importorskip("sphereops_kernels.conv_bwd")
conv_fwd = pytest.importorskip("sphereops_kernels.conv_fwd")
sphere_conv2d_bwd = conv_bwd.sphere_conv2d_bwd

EPS = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL = (True, True, True, True)

# (dtype, rtol on the relative norm error, atol as a fraction of max|ref|)
DTYPE_TOLS = [
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2.0 ** -9, id="fp16"),
    pytest.param(torch.bfloat16, 1.5e-2, 2.0 ** -7, id="bf16"),
]


def _saved_state(inp):
    """c and r_x from the reference forward, in the input's dtype / fp32."""
    with torch.no_grad():
        _, c, r_x = R.conv2d_forward(*inp.args(), EPS)
    return c, r_x


def _geometry(inp):
    return (inp.stride, inp.padding, inp.dilation, inp.groups, inp.operator, EPS)


def _kernel(dy, inp, c, r_x, mask=ALL):
    return sphere_conv2d_bwd(dy, inp.x, inp.w, inp.k, c, r_x, *_geometry(inp), mask)


def _reference(dy, inp, c, r_x, mask=ALL, dtype=None):
    """Closed-form reference on the same saved state, in ``dtype`` (None: the inputs' dtype)."""
    cv = (lambda t: t if t is None or dtype is None else t.to(dtype))
    return R.conv2d_backward(cv(dy), cv(inp.x), cv(inp.w), cv(inp.k), cv(c),
                             r_x if dtype is None else r_x.to(dtype), *_geometry(inp), mask)


def _references_from_output(dy, inp, y, r_x):
    """(float64, same-dtype) closed-form gradients from the saved output y (linear, cosine)."""
    def grads(cv):
        return R.conv2d_backward(cv(dy), cv(inp.x), cv(inp.w), None, cv(y), cv(r_x),
                                 *_geometry(inp), ALL, saved="output", bias=cv(inp.bias))
    return grads(lambda t: t.double()), grads(lambda t: t)


def _check_grad(out, ref64, ref_same, dtype, rtol, atol_frac, name):
    """Adaptive bounds (STYLE.md) for every dtype: the max-abs error may be twice the same-dtype
    reference's plus ``atol_frac * max|ref|``; the relative norm error at most
    ``max(rtol, 2 * same-dtype reference's)``. Ill-conditioned cases (near-parallel patches,
    where dw = wgrad - w S / r_w^2 cancels) thereby get exactly the slack that rounding to the
    dtype already costs the reference, and no more."""
    if ref64 is None:
        assert out is None, f"{name}: expected None"
        return
    assert out is not None, f"{name}: missing"
    assert out.dtype == ref_same.dtype, f"{name}: dtype {out.dtype} != {ref_same.dtype}"
    scale = ref64.abs().nan_to_num(0.0, 0.0, 0.0).max().item() if ref64.numel() else 0.0
    assert_close_to_reference(out, ref64, ref_same, atol=atol_frac * scale + 1e-30, name=name)
    finite = torch.isfinite(ref64).cpu()
    o, r, sm = (t.double().cpu()[finite] for t in (out, ref64, ref_same))
    if r.numel() and r.norm() > 0:
        rel = ((o - r).norm() / r.norm()).item()
        rel_same = ((sm - r).norm() / r.norm()).item()
        assert rel <= max(rtol, 2 * rel_same), \
            f"{name}: relative norm error {rel:.3g} > max({rtol:.3g}, 2 * {rel_same:.3g})"


def _state_the_kernel_reads(inp, c, r_x):
    """The saved state the float64 specification takes: the given one, except on the pure
    depthwise path, whose backward recomputes c and r_x from x and w in fp32 and never reads the
    saved (rounded) c -- its specification is the float64 recompute. Near |c| = 1 the gradient's
    dependence on c is ill-conditioned, so a float64 reference on the *rounded* c differs from
    it by far more than rounding (seed 2811481476: 3e-3 in fp16; seed 1382519499: a sigmoid
    dx element 0.60 against 0.54 in bf16)."""
    if not inp.pure_depthwise:
        return c, r_x
    _, c64, r_x64 = _forward64(inp)
    return c64, r_x64


def _check_all(out, dy, inp, c, r_x, dtype, rtol, atol_frac, mask=ALL):
    """Every gradient against the float64 closed form on the state the kernel reads, with the
    same-dtype reference on the rounded saved state (what rounding to the dtype costs)."""
    ref64 = _reference(dy, inp, *_state_the_kernel_reads(inp, c, r_x), mask, torch.float64)
    ref_same = _reference(dy, inp, c, r_x, mask)
    for name, o, r64, rs in zip(("dx", "dw", "db", "dk"), out, ref64, ref_same):
        _check_grad(o, r64, rs, dtype, rtol, atol_frac, name)
    return ref64


# fp32 is tested exact (tf32 has its own tests): TF32 off for every test here (conftest)
pytestmark = pytest.mark.usefixtures("exact_fp32")


def _case(dtype, **kw):
    inp = make_conv_inputs(dtype=dtype, device=DEVICE, **kw)
    c, r_x = _saved_state(inp)
    dy = torch.randn(c.shape, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    if kw.get("channels_last"):
        dy = dy.contiguous(memory_format=torch.channels_last)
    return inp, c, r_x, dy


# Geometry grid: each case exercises a different index path of dgrad/wgrad. The operator
# rotates so that every operator meets strides, groups and layouts.
GRID = [
    pytest.param(dict(operator="cosine"), id="3x3"),
    pytest.param(dict(operator="sigmoid", stride=2), id="s2-sigmoid"),
    pytest.param(dict(operator="linear", stride=2, padding=2, dilation=2), id="s2-d2-no-tap-phases"),
    pytest.param(dict(operator="sigmoid", h=11, w=10, stride=3, padding=1, dilation=2), id="s3-d2"),
    pytest.param(dict(operator="linear", kernel=(3, 2), stride=(2, 1), padding=(0, 1), h=8, w=7),
                 id="rect-kernel-mixed-stride"),
    pytest.param(dict(operator="cosine", kernel=1, padding=0), id="1x1"),
    pytest.param(dict(operator="linear", kernel=1, padding=0, stride=2), id="1x1-s2"),
    pytest.param(dict(operator="sigmoid", groups=2), id="groups2"),
    pytest.param(dict(operator="linear", c_in=4, c_out=4, groups=4, h=7, w=7), id="depthwise"),
    pytest.param(dict(operator="cosine", c_in=4, c_out=8, groups=4, h=7, w=7, stride=2),
                 id="depthwise-x2-s2"),
    # the elementwise depthwise kernels: several channel and pixel tiles, stride phases with
    # taps that reach no pixel, a rectangular dilated kernel
    pytest.param(dict(operator="sigmoid", c_in=20, c_out=20, groups=20, h=9, w=8, stride=2),
                 id="depthwise-s2-c20"),
    pytest.param(dict(operator="cosine", c_in=6, c_out=6, groups=6, kernel=(3, 2), stride=(2, 1),
                      padding=(2, 0), dilation=(2, 1), h=9, w=7), id="depthwise-rect-d2"),
    # an even width at stride 1: the grad kernel's pairs of input pixels (padding wider than
    # the filter reaches along the width, dilated rows)
    pytest.param(dict(operator="sigmoid", c_in=20, c_out=20, groups=20, h=5, w=8,
                      padding=(1, 2), dilation=(2, 1)), id="depthwise-pairs"),
    # a 5x5 depthwise filter: more taps than the kernels keep cached (the grad kernel's
    # rolled tap loop, the prep pass one tile a program)
    pytest.param(dict(operator="linear", c_in=10, c_out=10, groups=10, kernel=5, padding=2,
                      h=7, w=6), id="depthwise-5x5"),
    pytest.param(dict(operator="sigmoid", n=1, c_in=136, c_out=72, h=5, w=6),
                 id="multi-chunk-channels"),
    # one output channel per group: the channelwise prep pass, with several channel tiles (72
    # channels: 64- and 32-wide tiles) and with the GEMM kernels (2 input channels per group)
    pytest.param(dict(operator="linear", c_in=72, c_out=72, groups=72, h=6, w=5),
                 id="depthwise-c72"),
    pytest.param(dict(operator="sigmoid", c_in=8, c_out=4, groups=4, h=7, w=7),
                 id="one-out-per-group"),
    pytest.param(dict(operator="linear", n=3, h=13, w=11, padding=0), id="pixel-tails"),
]


@pytest.mark.parametrize("case", list(TAP_BIT_GEOMETRIES))
@pytest.mark.parametrize("dtype,rtol,atol_frac", DTYPE_TOLS)
def test_dgrad_taps_in_the_padding(case, dtype, rtol, atol_frac):
    inp, c, r_x, dy = _case(dtype, operator="linear", n=1, c_in=16, c_out=16, channels_last=True,
                            **TAP_BIT_GEOMETRIES[case])
    _check_all(_kernel(dy, inp, c, r_x), dy, inp, c, r_x, dtype, rtol, atol_frac)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("geom", GRID)
@pytest.mark.parametrize("dtype,rtol,atol_frac", DTYPE_TOLS)
def test_matches_closed_form_reference(geom, layout, dtype, rtol, atol_frac):
    if layout == "nchw" and dtype != torch.float32 and geom.get("c_in", 8) > 64:
        pytest.skip("the big-channel case is covered for 16-bit dtypes in channels_last only")
    inp, c, r_x, dy = _case(dtype, channels_last=(layout == "channels_last"), **geom)
    out = _kernel(dy, inp, c, r_x)
    _check_all(out, dy, inp, c, r_x, dtype, rtol, atol_frac)
    if layout == "channels_last":
        assert out[0].is_contiguous(memory_format=torch.channels_last), "dx must follow x's layout"
    assert out[1].shape == inp.w.shape and out[1].dtype == inp.w.dtype


@pytest.mark.parametrize("geom", [
    pytest.param(dict(), id="3x3"),
    pytest.param(dict(stride=2, dilation=2, padding=2), id="s2-d2"),
    pytest.param(dict(groups=2, stride=(1, 2), kernel=(2, 3)), id="groups-rect"),
    pytest.param(dict(c_in=4, c_out=4, groups=4), id="depthwise"),
])
@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid"])
def test_matches_float64_autograd(operator, geom):
    """Kernel (fp32) vs gradients that float64 autograd derives through PyTorch primitives."""
    inp64 = make_conv_inputs(dtype=torch.float64, device=DEVICE, operator=operator, **geom)
    x = inp64.x.clone().requires_grad_(True)
    w = inp64.w.clone().requires_grad_(True)
    b = inp64.bias.clone().requires_grad_(True)
    k = inp64.k.clone().requires_grad_(True) if inp64.k is not None else None
    y = R.conv2d_autograd(x, w, b, k, *_geometry(inp64))
    dy64 = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in (x, w, b, k) if t is not None], dy64)
    grads = list(grads) + [None] * (4 - len(grads))

    inp = inp64.to(dtype=torch.float32)
    c, r_x = _saved_state(inp)
    out = _kernel(dy64.float(), inp, c, r_x)
    for name, o, g in zip(("dx", "dw", "db", "dk"), out, grads):
        if g is None:
            assert o is None, name
            continue
        # fp32 saved state (c rounded to fp32) against exact float64: a few fp32 ulps,
        # amplified by dg/dc where c is large.
        assert_close(o, g, rtol=1e-4, atol=1e-4 * g.abs().max().item(), name=name)


def test_sigmoid_scalar_k_expanded():
    """A scalar k arrives expanded to [C_out] (possibly with stride 0)."""
    inp, c, r_x, dy = _case(torch.float32, operator="sigmoid", per_channel_k=False)
    inp.k = torch.full((1,), 0.3, device=DEVICE).expand(inp.w.shape[0])
    out = _kernel(dy, inp, c, r_x)
    _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5)


MASKS = [
    (True, False, False, False),
    (False, True, False, False),
    (False, False, True, True),
    (False, False, False, True),
    (True, True, False, False),
    (False, True, True, False),
    (False, False, False, False),
]


@pytest.mark.parametrize("operator", ["cosine", "sigmoid"])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
def test_output_mask(mask, operator):
    inp, c, r_x, dy = _case(torch.float32, operator=operator, stride=2)
    out = _kernel(dy, inp, c, r_x, mask)
    expected = list(mask)
    if operator != "sigmoid":
        expected[3] = False  # dk exists for sigmoid only
    for name, o, want in zip(("dx", "dw", "db", "dk"), out, expected):
        assert (o is not None) == want, f"{name}: requested={want}, got {type(o)}"
    _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5, mask)


_UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _rounding_bound(dy, inp, c, r_x):
    """Elementwise a-priori bound on the kernel's rounding error, for ill-conditioned inputs.

    The kernel stores Hn = G / r_x and w_hat = w / r_w in the input dtype (relative error <= u
    each) and accumulates in fp32 (error ~ sqrt(n) * 2^-24 * sum|terms| for n terms, the usual
    probabilistic bound). With D = dgrad(|Hn|, |w_hat|), W = wgrad(|x|, |Hn|) / r_w and the
    correction sums |G c|:

        |d dx| <= 2u D + u_acc (D + |x| * boxsum^T(sum_o |G c| / r_x^2))
        |d dw| <=  u W + u_acc (W + |w| * sum |G c| / r_w^2)

    Near-parallel patches make G ~ 1/sqrt(DELTA) = 1000 while dx, dw are O(1) (the GEMM term
    and the correction cancel), so this is the honest bound there; an indexing or formula bug
    gives O(|dx|) errors, far above it."""
    f64 = torch.float64
    n, c_out, ho, wo = c.shape
    g = inp.groups
    kk = inp.k.to(f64).reshape(1, -1, 1, 1) if inp.k is not None else None
    c64 = c.to(f64)
    grad_c = dy.to(f64) * R.dg_dc(c64, inp.operator, kk)
    r_x64 = r_x.to(f64)
    hn = (grad_c.reshape(n, g, c_out // g, ho, wo) / r_x64.unsqueeze(2)).reshape(c.shape)
    gc_abs = (grad_c * c64).abs()
    w64, x64 = inp.w.to(f64), inp.x.to(f64)
    r_w = R.filter_norms(w64, EPS).reshape(-1, 1, 1, 1)
    kh, kw = w64.shape[2], w64.shape[3]
    conv_args = (list(inp.stride), list(inp.padding), list(inp.dilation), False, [0, 0], g)
    d_abs, _, _ = torch.ops.aten.convolution_backward(
        hn.abs(), x64, (w64 / r_w).abs(), None, *conv_args, [True, False, False])
    _, w_abs, _ = torch.ops.aten.convolution_backward(
        hn.abs(), x64.abs(), w64, None, *conv_args, [False, True, False])
    w_abs = w_abs / r_w
    a_abs = gc_abs.reshape(n, g, c_out // g, ho, wo).sum(dim=2) / r_x64 ** 2
    box_t, _, _ = torch.ops.aten.convolution_backward(
        a_abs, x64[:, :g], torch.ones(g, 1, kh, kw, dtype=f64, device=x64.device), None,
        *conv_args, [True, False, False])
    x_box = (x64.abs().reshape(n, g, -1, *x64.shape[2:]) * box_t.unsqueeze(2)).reshape(x64.shape)
    s_abs = gc_abs.sum(dim=(0, 2, 3)).reshape(-1, 1, 1, 1)
    u = _UNIT_ROUNDOFF[inp.x.dtype]
    u_acc = 2.0 ** -24 * math.sqrt(max(c_out // g * kh * kw, n * ho * wo))
    bdx = 2 * u * d_abs + u_acc * (d_abs + x_box)
    bdw = u * w_abs + u_acc * (w_abs + w64.abs() * s_abs / r_w ** 2)
    return bdx, bdw


# hard cases also through the pure depthwise path, whose backward recomputes c and r_x
HARD_GEOMS = [pytest.param({}, id="dense"),
              pytest.param(dict(c_in=12, c_out=12, groups=12), id="depthwise")]


@pytest.mark.parametrize("geom", HARD_GEOMS)
@pytest.mark.parametrize("dtype,rtol,atol_frac", DTYPE_TOLS)
def test_near_parallel_patches(dtype, rtol, atol_frac, geom):
    """Filters copied from input patches: c -> 1, where dtheta/dc uses the bounded rule; the
    gradients stay finite and equal the reference's (same rule) up to rounding. The problem is
    ill-conditioned there (see _rounding_bound), so the bound is the a-priori rounding bound of
    the kernel's arithmetic plus twice the same-dtype reference's own error, elementwise."""
    inp = make_near_parallel_conv_inputs(noise=1e-5, dtype=dtype, device=DEVICE, operator="linear",
                                         padding=0, channels_last=True, **geom)
    c, r_x = _saved_state(inp)
    assert c.float().max().item() > 0.999, "the builder should produce near-parallel patches"
    dy = torch.randn(c.shape, device=DEVICE).to(dtype)
    out = _kernel(dy, inp, c, r_x)
    for name, o in zip(("dx", "dw", "db"), out):
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
    c, r_x = _state_the_kernel_reads(inp, c, r_x)
    ref64 = _reference(dy, inp, c, r_x, ALL, torch.float64)
    ref_same = _reference(dy, inp, *_saved_state(inp))
    _check_within_rounding_bound(out, ref64, ref_same, _rounding_bound(dy, inp, c, r_x), atol_frac)


def _forward64(inp):
    """(y, c, r_x) of the reference forward evaluated in float64 on the (rounded) inputs."""
    with torch.no_grad():
        return R.conv2d_forward(*(t.double() if torch.is_tensor(t) else t for t in inp.args()),
                                EPS)


def _check_within_rounding_bound(out, ref64, ref_same, bounds, atol_frac):
    """Elementwise: |out - ref64| <= 2 |ref_same - ref64| + atol + 2 * the a-priori rounding
    bound of the kernel's arithmetic (``bounds``: dx, dw) -- the check for ill-conditioned cases."""
    for name, o, r, rs, b in zip(("dx", "dw", "db"), out, ref64, ref_same, tuple(bounds) + (None,)):
        o, r, rs = o.double().cpu(), r.cpu(), rs.double().cpu()
        allowed = 2 * (rs - r).abs() + atol_frac * r.abs().max()
        if b is not None:
            allowed = allowed + 2 * b.cpu()
        bad = (o - r).abs() > allowed
        assert not bad.any(), (f"{name}: {int(bad.sum())}/{bad.numel()} beyond the rounding bound; "
                               f"worst excess {((o - r).abs() - allowed).max().item():.3g}")


@pytest.mark.parametrize("operator", ["linear", "sigmoid"])
def test_exactly_parallel_patch_is_finite(operator):
    """c == 1 exactly (clamped) hits the DELTA bound: finite, same value as the reference."""
    inp, c, r_x, dy = _case(torch.float32, operator=operator)
    c = c.clone()
    c[0, :, 1, 2] = 1.0
    c[1, 3, 0, 0] = -1.0
    out = _kernel(dy, inp, c, r_x)
    assert all(torch.isfinite(o).all() for o in out if o is not None)
    _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5)


@pytest.mark.parametrize("geom", HARD_GEOMS)
@pytest.mark.parametrize("dtype,rtol,atol_frac", DTYPE_TOLS)
def test_zero_patches(dtype, rtol, atol_frac, geom):
    """All-zero regions and a whole zero sample: r_x = sqrt(eps), c = 0."""
    inp, c, r_x, dy = _zero_patch_case(dtype, **geom)
    out = _kernel(dy, inp, c, r_x)
    _check_all(out, dy, inp, c, r_x, dtype, rtol, atol_frac)


def _zero_patch_case(dtype, **geom):
    """A sigmoid conv of 2 samples whose first has an all-zero region and second is all zero,
    with its saved state and a gradient."""
    inp = make_conv_inputs(dtype=dtype, device=DEVICE, operator="sigmoid", n=2, **geom)
    x = inp.x.clone()
    x[0, :, 2:7, 1:6] = 0
    x[1] = 0
    inp.x = x
    c, r_x = _saved_state(inp)
    return inp, c, r_x, torch.randn(c.shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("geom", HARD_GEOMS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fp16_large_inputs(layout, geom):
    """|x| ~ 300 in fp16: x^2 overflows fp16 and G / (r_x r_w) would be subnormal; the kernel
    keeps full fp16 accuracy (Hn = G / r_x, the 1/r_w factor on the filters)."""
    inp, c, r_x, dy = _case(torch.float16, operator="linear", scale=300.0, stride=2,
                            channels_last=(layout == "channels_last"), **geom)
    out = _kernel(dy, inp, c, r_x)
    for o in out[:3]:
        assert torch.isfinite(o).all()
    _check_all(out, dy, inp, c, r_x, torch.float16, 2e-3, 2.0 ** -9)


@pytest.mark.parametrize("geom", HARD_GEOMS)
@pytest.mark.parametrize("where", ["x", "dy"])
@pytest.mark.parametrize("dtype,rtol,atol_frac", DTYPE_TOLS[:1] + DTYPE_TOLS[2:])
def test_nan_propagates(where, dtype, rtol, atol_frac, geom):
    """NaN in x or dy comes out as NaN exactly where the reference has NaN (never clamped)."""
    inp, c, r_x, dy = _case(dtype, operator="sigmoid", stride=2, **geom)
    if where == "x":
        x = inp.x.clone()
        x[1, 2, 4, 5] = float("nan")
        inp.x = x
        c, r_x = _saved_state(inp)
    else:
        dy = dy.clone()
        dy[0, 5, 1, 1] = float("nan")
    out = _kernel(dy, inp, c, r_x)
    # _check_all requires the same NaN pattern as the reference in every gradient
    ref64 = _check_all(out, dy, inp, c, r_x, dtype, rtol, atol_frac)
    affected = ("dx", "dw", "dk") + (("db",) if where == "dy" else ())
    for name, o, r in zip(("dx", "dw", "db", "dk"), out, ref64):
        if name in affected:
            assert torch.isnan(r).any(), f"test setup: the {name} reference should contain NaN"
            assert torch.isnan(o).any(), f"{name}: NaN was lost"


def test_deterministic():
    """Same inputs -> bitwise same gradients (no atomics; the wgrad split sums in order)."""
    inp, c, r_x, dy = _case(torch.bfloat16, operator="sigmoid", n=3, c_in=16, c_out=32,
                            h=10, w=10, channels_last=True)
    first = _kernel(dy, inp, c, r_x)
    second = _kernel(dy, inp, c, r_x)
    for name, a, b in zip(("dx", "dw", "db", "dk"), first, second):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{name} differs between runs"


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("mask", [ALL, (False, False, True, True)], ids=["all", "db-dk"])
def test_c_scratch_writes_hn_over_a_channels_last_c(layout, mask):
    """c_scratch=True (the eager autograd path without retain_graph) gives bitwise the gradients
    of c_scratch=False, and writes Hn over c exactly when c is channels_last and dx or dw is
    asked for (an NCHW c has another order than Hn: it stays as it was)."""
    cl = layout == "channels_last"
    inp, c, r_x, dy = _case(torch.bfloat16, operator="sigmoid", n=2, c_in=16, c_out=32, h=6, w=5,
                            stride=2, channels_last=cl)
    kept = _kernel(dy, inp, c, r_x, mask)
    c_scratch = c.clone(memory_format=torch.preserve_format)
    got = sphere_conv2d_bwd(dy, inp.x, inp.w, inp.k, c_scratch, r_x, *_geometry(inp), mask,
                            c_scratch=True)
    for name, a, b in zip(("dx", "dw", "db", "dk"), kept, got):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{name} differs"
    overwritten = not torch.equal(c_scratch, c)
    assert overwritten == (cl and (mask[0] or mask[1]))


@pytest.mark.parametrize("dtype, rtol, atol_frac", DTYPE_TOLS)
@pytest.mark.parametrize("operator", ["linear", "cosine"])
@pytest.mark.parametrize("geom", [dict(), dict(stride=2, groups=2),
                                  dict(c_in=4, c_out=4, groups=4, h=7, w=7)],
                         ids=["3x3", "s2-g2", "depthwise"])
def test_backward_from_the_saved_output(geom, operator, dtype, rtol, atol_frac):
    """saved="output": the prep pass recovers c from y and the bias; the gradients are held to
    the reference's closed form on the same saved output (same dtype and float64), and y is
    never written, even with c_scratch."""
    inp, c, r_x, dy = _case(dtype, operator=operator, channels_last=True, **geom)
    with torch.no_grad():
        inp.bias.mul_(0.1)
        y, _, _ = R.conv2d_forward(*inp.args(), EPS, store_c=False)
    y_before = y.clone()
    out = sphere_conv2d_bwd(dy, inp.x, inp.w, inp.k, y, r_x, *_geometry(inp), ALL, c_scratch=True,
                            saved="output", bias=inp.bias)
    assert torch.equal(y, y_before), "the saved output must not be written"
    for name, o, r64, rs in zip(("dx", "dw", "db", "dk"), out, *_references_from_output(dy, inp, y, r_x)):
        _check_grad(o, r64, rs, dtype, rtol, atol_frac, name)


@pytest.mark.parametrize("dtype, rtol, atol_frac", DTYPE_TOLS)
def test_backward_from_the_saved_output_near_parallel_patches(dtype, rtol, atol_frac):
    """Near-parallel patches (c -> 1, the bounded arccos derivative) from the saved output: sin
    theta comes from the angle, not from 1 - c^2; held to the same elementwise rounding bound as
    the saved-cosine case (test_near_parallel_patches: the problem is ill-conditioned there)."""
    inp = make_near_parallel_conv_inputs(noise=1e-5, dtype=dtype, device=DEVICE, operator="linear",
                                         padding=0, channels_last=True)
    with torch.no_grad():
        inp.bias.mul_(0.1)
        y, _, r_x = R.conv2d_forward(*inp.args(), EPS, store_c=False)
    assert y.float().max().item() > 0.97, "the builder should produce near-parallel patches"
    dy = torch.randn(y.shape, device=DEVICE).to(dtype)
    out = sphere_conv2d_bwd(dy, inp.x, inp.w, None, y, r_x, *_geometry(inp), ALL, saved="output",
                            bias=inp.bias)
    for name, o in zip(("dx", "dw", "db"), out):
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
    ref64, ref_same = _references_from_output(dy, inp, y, r_x)
    c = R.cosine_from_output(y, inp.bias, "linear").to(dtype)
    _check_within_rounding_bound(out, ref64, ref_same, _rounding_bound(dy, inp, c, r_x), atol_frac)


def test_backward_from_the_saved_output_refuses_sigmoid():
    inp, c, r_x, dy = _case(torch.float32, operator="sigmoid")
    with pytest.raises(ValueError, match="linear or cosine"):
        sphere_conv2d_bwd(dy, inp.x, inp.w, inp.k, c, r_x, *_geometry(inp), ALL, saved="output")


def test_strided_and_expanded_inputs():
    """dy with zero strides (from a sum), c in another layout than x, non-contiguous w."""
    inp, c, r_x, _ = _case(torch.float32, operator="linear", channels_last=True)
    dy = torch.randn(1, c.shape[1], 1, 1, device=DEVICE).expand(c.shape)
    c_nchw = c.contiguous()
    w_t = inp.w.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels_last weights
    assert not w_t.is_contiguous()
    inp.w = w_t
    out = _kernel(dy, inp, c_nchw, r_x)
    _check_all(out, dy, inp, c_nchw, r_x, torch.float32, 2e-5, 2e-5)
    assert out[1].stride() == w_t.stride(), "dw must follow w's layout"


def test_empty_batch():
    inp = make_conv_inputs(dtype=torch.float32, device=DEVICE, operator="sigmoid", n=0)
    c, r_x = _saved_state(inp)
    dy = torch.empty(c.shape, device=DEVICE)
    dx, dw, db, dk = _kernel(dy, inp, c, r_x)
    assert dx.shape == inp.x.shape and dw.shape == inp.w.shape
    for t in (dw, db, dk):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.gpu
def test_tf32_on_gpu():
    """fp32 with torch.backends.cudnn.allow_tf32 (PyTorch's default for convolutions): tf32
    tensor cores, error of the order of tf32's 10-bit mantissa."""
    inp, c, r_x, dy = _case(torch.float32, operator="sigmoid", c_in=64, c_out=64, h=16, w=16)
    torch.backends.cudnn.allow_tf32 = True
    out = _kernel(dy, inp, c, r_x)
    ref64 = _reference(dy, inp, c, r_x, ALL, torch.float64)
    for name, o, r in zip(("dx", "dw", "db", "dk"), out, ref64):
        assert_close(o, r, rtol=5e-3, atol=5e-3 * r.abs().max().item(), name=name)


def _bad_call(**override):
    inp, c, r_x, dy = _case(torch.float32, operator="sigmoid")
    args = dict(dy=dy, x=inp.x, w=inp.w, k=inp.k, c=c, r_x=r_x, stride=inp.stride,
                padding=inp.padding, dilation=inp.dilation, groups=inp.groups,
                operator=inp.operator, eps=EPS, output_mask=ALL)
    args.update(override)
    return sphere_conv2d_bwd(**args)


@pytest.mark.parametrize("override,exc,word", [
    (dict(operator="tanh"), ValueError, "operator"),
    (dict(x=torch.randn(2, 8, 9, 9, dtype=torch.float64, device=DEVICE)), TypeError, "x"),
    (dict(w=torch.randn(16, 8, 3, 3, dtype=torch.float16, device=DEVICE)), TypeError, "w"),
    (dict(c=torch.randn(2, 16, 9, 8, device=DEVICE)), ValueError, "c"),
    (dict(dy=torch.randn(2, 16, 9, device=DEVICE)), ValueError, "dy"),
    (dict(r_x=torch.ones(2, 1, 9, 9, dtype=torch.float16, device=DEVICE)), TypeError, "r_x"),
    (dict(groups=3), ValueError, "groups"),
    (dict(k=None), ValueError, "k"),
    (dict(stride=(0, 1)), ValueError, "stride"),
    (dict(padding=(-1, 1)), ValueError, "padding"),
    (dict(dilation="2"), TypeError, "dilation"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(output_mask=(True, True)), ValueError, "output_mask"),
])
def test_bad_input(override, exc, word):
    with pytest.raises(exc, match=word):
        _bad_call(**override)


@pytest.mark.parametrize("groups", [1, 4], ids=["gemm", "depthwise"])
def test_pixel_count_limit(groups):
    """As the forward's: MAX_PIXELS pixels pass (meta tensors: shapes only), one more is
    refused, naming both pixel counts and what to do."""
    def call(n):
        x = torch.empty(n, 4, 1, 1, device="meta")
        dy = torch.empty(n, 4, 1, 1, device="meta")
        c = torch.empty(n, 4, 1, 1, device="meta")
        r_x = torch.empty(n, groups, 1, 1, device="meta")
        w = torch.empty(4, 4 // groups, 1, 1, device="meta")
        return sphere_conv2d_bwd(dy, x, w, None, c, r_x, (1, 1), (0, 0), (1, 1), groups,
                                 "cosine", EPS)

    dx, dw, _, _ = call(conv_fwd.MAX_PIXELS)
    assert dx.shape == (conv_fwd.MAX_PIXELS, 4, 1, 1) and dw.shape == (4, 4 // groups, 1, 1)
    with pytest.raises(ValueError, match="int32 pixel indices.*split the batch"):
        call(conv_fwd.MAX_PIXELS + 1)


def test_aot_specs_are_well_formed():
    """The AOT specs name real parameters and type every one of them (compiling them is
    ``make aot-check``)."""
    specs = conv_bwd.aot_specs()
    kernels = {s["fn"].__name__ for s in specs}
    assert {"_dgrad_kernel", "_wgrad_kernel", "_prep_kernel", "_reduce_partials_kernel",
            "_dw_finalize_kernel", "_channelwise_prep_kernel", "_depthwise_prep_kernel",
            "_depthwise_grad_kernel"} <= kernels
    # the filter norms are programs of the prep launch: every prep spec compiles them
    preps = [s for s in specs if s["fn"].__name__ in ("_prep_kernel", "_channelwise_prep_kernel")]
    assert preps and all(s["constexprs"]["NORM_FILTERS"] for s in preps)
    assert {s["constexprs"]["BLOCK_O"] for s in preps} >= {1, 128}
    for s in specs:
        names = set(s["fn"].arg_names)
        assert set(s["signature"]) == names, s["name"]
        assert set(s["constexprs"]) <= names, s["name"]
        assert all(s["signature"][k] == "constexpr" for k in s["constexprs"]), s["name"]
        if s["fn"].__name__ in ("_dgrad_kernel", "_wgrad_kernel"):
            # implicit-GEMM conv kernels stay at one warpgroup (the rule: 8-warp
            # implicit-GEMM templates have given wrong results); the elementwise ones may not
            assert s["num_warps"] < 8, s["name"]


@pytest.mark.parametrize("operator", ["linear", "sigmoid"])
def test_two_level_partial_reduction(monkeypatch, operator):
    """Big batches sum the prep partials in two levels (rows split over programs), the first
    in a reduce launch of its own (the final one too without a wgrad); shrink the level size so
    the tiny test shapes take that path, with a ragged last split."""
    monkeypatch.setitem(conv_bwd.REDUCE_CONFIG, "BLOCK_R", 2)
    monkeypatch.setitem(conv_bwd.REDUCE_CONFIG, "ROWS_PER_PROGRAM", 2)
    launched = _record_launches(monkeypatch)
    inp, c, r_x, dy = _case(torch.float32, operator=operator, n=3, h=7, w=7)
    rows = -(-c.shape[0] * c.shape[2] * c.shape[3] // conv_bwd.prep_config(operator)["BLOCK_M"])
    assert rows > 2 and rows % 2 == 1, f"test setup: want an odd number of partial rows > 2, got {rows}"
    out = _kernel(dy, inp, c, r_x, (False, True, True, True))
    _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5, (False, True, True, True))
    # the first level in a launch of its own, the final one in the wgrad launch
    assert [k.__name__ for k, _, _ in launched].count("_reduce_partials_kernel") == 1
    launched.clear()
    out = _kernel(dy, inp, c, r_x, (False, False, True, True))   # no wgrad: both levels here
    _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5, (False, False, True, True))
    assert [k.__name__ for k, _, _ in launched].count("_reduce_partials_kernel") == 2


@pytest.mark.parametrize("mask", [ALL, (True, True, False, False)], ids=["all", "dx-dw"])
def test_first_reduction_level_in_the_dgrad_launch(monkeypatch, mask):
    """With a dgrad and a wgrad, a two-level reduction's first level runs as extra programs of
    the dgrad launch (the final one in the wgrad's): 3 launches, and every gradient bitwise
    what the first level's own launch gives (the same fixed-order sums) -- with more
    first-level programs than one grid slice holds, and a ragged last row range."""
    monkeypatch.setitem(conv_bwd.REDUCE_CONFIG, "BLOCK_R", 2)
    monkeypatch.setitem(conv_bwd.REDUCE_CONFIG, "ROWS_PER_PROGRAM", 2)
    monkeypatch.setitem(conv_bwd.REDUCE_CONFIG, "BLOCK_C", 4)   # 16 channels: 4 blocks
    launched = _record_launches(monkeypatch)
    inp, c, r_x, dy = _case(torch.float32, operator="sigmoid", n=3, h=7, w=7, c_out=16)
    hosted = _kernel(dy, inp, c, r_x, mask)
    assert [k.__name__ for k, _, _ in launched] == ["_prep_kernel", _DG, _WG]
    (grid, args), = _launches_of(launched, conv_bwd._dgrad_kernel)
    rows = args["R"]
    assert rows > 2 and rows % 2 == 1, f"test setup: want an odd number of partial rows, got {rows}"
    assert args["RED_PROGRAMS"] == 4 * -(-rows // 2) > grid[0] * grid[1]
    assert grid[2] == inp.groups + -(-args["RED_PROGRAMS"] // (grid[0] * grid[1]))
    _check_all(hosted, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5, mask)
    monkeypatch.setattr(conv_bwd, "DGRAD_REDUCES", False)   # SPHEREOPS_DGRAD_REDUCES=0
    launched.clear()
    separate = _kernel(dy, inp, c, r_x, mask)
    assert [k.__name__ for k, _, _ in launched] == ["_prep_kernel", _RED, _DG, _WG]
    for name, a, b in zip(("dx", "dw", "db", "dk"), hosted, separate):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name


@pytest.mark.parametrize("mask", [ALL, (False, True, False, False), (True, True, True, False)],
                         ids=["all", "dw", "no-dk"])
def test_reduction_in_the_wgrad_launch(monkeypatch, mask):
    """A one-level reduction of the prep partials runs as extra programs of the wgrad launch:
    with more channel blocks than one grid slice holds (several extra slices, most programs of
    the last one idle) S, db and dk are the reduce kernel's, bitwise (same fixed-order sums)."""
    monkeypatch.setitem(conv_bwd.REDUCE_CONFIG, "BLOCK_C", 2)   # 9 channel blocks
    launched = _record_launches(monkeypatch)
    inp, c, r_x, dy = _case(torch.float32, operator="sigmoid", c_in=6, c_out=18, groups=3,
                            kernel=1, padding=0, h=5, w=5)
    folded = _kernel(dy, inp, c, r_x, mask)
    names = [k.__name__ for k, _, _ in launched]
    assert "_reduce_partials_kernel" not in names
    (grid, args), = _launches_of(launched, conv_bwd._wgrad_kernel)
    assert args["RED_PROGRAMS"] == 9 and grid[0] * grid[1] < 9
    assert grid[2] == args["SPLIT"] * inp.groups + -(-9 // (grid[0] * grid[1]))
    _check_all(folded, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5, mask)
    monkeypatch.setattr(conv_bwd, "_fold_reduction", lambda need_dw: False)
    launched.clear()
    separate = _kernel(dy, inp, c, r_x, mask)
    assert "_reduce_partials_kernel" in [k.__name__ for k, _, _ in launched]
    for name, a, b in zip(("dx", "dw", "db", "dk"), folded, separate):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("geom", [dict(), dict(stride=2, padding=2, dilation=2, groups=2),
                                  dict(kernel=1, padding=0)], ids=["3x3", "s2-d2-g2", "1x1"])
def test_int64_offsets_give_the_same_gradients(geom, monkeypatch):
    """The dgrad / wgrad main loops with int64 offsets (tensors near 2^31 elements) and with
    the default int32 ones: bitwise the same dx and dw."""
    inp, c, r_x, dy = _case(torch.bfloat16, operator="cosine", channels_last=True, **geom)
    narrow = _kernel(dy, inp, c, r_x)
    monkeypatch.setattr(conv_bwd, "_needs_wide_offsets", lambda *args: True)
    wide = _kernel(dy, inp, c, r_x)
    for name, a, b in zip(("dx", "dw", "db"), narrow, wide):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("geom", [dict(), dict(stride=2, padding=2, dilation=2, groups=2, h=9, w=7)],
                         ids=["3x3", "s2-d2-g2-odd"])
def test_wgrad_runtime_divisors_give_the_same_gradients(geom, monkeypatch):
    """_wgrad_kernel with runtime Ho*Wo / Wo divisors (RUNTIME_DIV, the launcher's choice when
    C_out is not a multiple of 16) and with constexpr ones: bitwise the same dw."""
    inp, c, r_x, dy = _case(torch.bfloat16, operator="linear", channels_last=True, **geom)
    runs = []
    for forced in (True, False):
        monkeypatch.setattr(conv_bwd, "_WGRAD_RUNTIME_DIV", forced)
        runs.append(_kernel(dy, inp, c, r_x)[1])
    assert torch.equal(*runs)


def test_wgrad_runtime_divisor_rule():
    assert conv_bwd._wgrad_runtime_div(61) and conv_bwd._wgrad_runtime_div(8)
    assert not conv_bwd._wgrad_runtime_div(64) and not conv_bwd._wgrad_runtime_div(256)


def test_wide_offsets_follow_the_sizes():
    def wide(shape, hn_numel, **view):
        x = torch.empty(shape, device="meta")
        return conv_bwd._needs_wide_offsets(x, hn_numel, (3, 3), (1, 1), (1, 1))
    assert not wide((64, 64, 56, 56), 64 * 56 * 56 * 64)
    assert wide((2049, 64, 128, 128), 2049 * 128 * 128 * 16)     # x over 2^31 elements
    assert wide((8, 16, 64, 64), 2 ** 30)                          # Hn near 2^31


def _record_launches(monkeypatch):
    """[(kernel, grid, args)] of every launch conv_bwd makes from now on (they still run)."""
    return record_launches(monkeypatch, conv_bwd, "_launch")[0]


def _launches_of(launched, kernel):
    """[(grid, {argument name: value})] of the launches of ``kernel`` among ``launched``."""
    return [(grid, dict(zip(k.arg_names, args))) for k, grid, args in launched if k is kernel]


def _prep_launch(launched):
    """The one prep launch among ``launched``: (kernel, grid, {argument name: value})."""
    preps = [(k, grid, args) for k, grid, args in launched
             if k in (conv_bwd._prep_kernel, conv_bwd._channelwise_prep_kernel)]
    assert len(preps) == 1, [k.__name__ for k, _, _ in launched]
    kernel, grid, args = preps[0]
    return kernel, grid, dict(zip(kernel.arg_names, args))


_P, _RED, _DG, _WG, _FIN = ("prep", "_reduce_partials_kernel", "_dgrad_kernel", "_wgrad_kernel",
                            "_dw_finalize_kernel")


@pytest.mark.parametrize("writes_dw", [True, False], ids=["wgrad-writes-dw", "finalize-launch"])
@pytest.mark.parametrize("geom", [dict(operator="sigmoid", stride=2),
                                  dict(operator="linear", c_in=8, c_out=4, groups=4, h=7, w=7)],
                         ids=["per-group", "channelwise"])
@pytest.mark.parametrize("mask,expected", [
    (ALL, [_P, _DG, _WG, _FIN]),                     # was 6 with _filter_norm_kernel, then 5
    ((True, False, False, False), [_P, _DG]),        # was 3
    ((False, True, False, False), [_P, _WG, _FIN]),  # was 5, then 4
    ((False, False, True, True), [_P, _RED]),        # no filters, no wgrad: 2 as before
], ids=["all", "dx", "dw", "db-dk"])
def test_gemm_backward_launches(monkeypatch, geom, mask, expected, writes_dw):
    """The GEMM backward computes the filter norms (r_w, w_hat) in the prep launch, and with a
    wgrad a one-level reduction of the prep partials (S, db, dk) rides in the wgrad launch: 4
    launches with every gradient, 3 where the wgrad finishes dw itself (WGRAD_WRITES_DW, the
    default, behind a per-group prep: that one zeroes the wgrad's tile counters, one a tile).
    Filter programs run iff dx or dw is asked, cdiv(C_out, BLOCK_O) of them ahead of the
    output-pixel blocks on grid axis 0; db / dk alone launch none and keep the reduce kernel."""
    assert not hasattr(conv_bwd, "_filter_norm_kernel")
    monkeypatch.setattr(conv_bwd, "WGRAD_WRITES_DW", writes_dw)
    launched = _record_launches(monkeypatch)
    inp, c, r_x, dy = _case(torch.float32, **geom)
    out = _kernel(dy, inp, c, r_x, mask)
    channelwise = inp.w.shape[0] == inp.groups
    prep = conv_bwd._channelwise_prep_kernel if channelwise else conv_bwd._prep_kernel
    finishes = writes_dw and not channelwise and mask[1]
    expected = [prep.__name__ if name == _P else name for name in expected
                if not (finishes and name == _FIN)]
    assert [k.__name__ for k, _, _ in launched] == expected
    _, grid, args = _prep_launch(launched)
    c_out, cg_in, kh, kw = inp.w.shape
    cfg = conv_bwd.prep_config(inp.operator)
    r_rows = -(-c.shape[0] * c.shape[2] * c.shape[3] // cfg["BLOCK_M"])
    block_o = conv_bwd.filter_norm_config(cg_in * kh * kw)["BLOCK_O"]
    n_filter = -(-c_out // block_o) if (mask[0] or mask[1]) else 0
    assert args["n_filter_programs"] == n_filter and grid[0] == n_filter + r_rows
    if not channelwise:   # one counter a wgrad tile (o block, column block, group)
        grids = [g for g, _ in _launches_of(launched, conv_bwd._wgrad_kernel)]
        tiles = grids[0][0] * grids[0][1] * inp.groups if finishes else 0
        assert args["n_counters"] == tiles
    _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5, mask)


@pytest.mark.parametrize("geom", [
    pytest.param(dict(operator="sigmoid", c_in=20, c_out=24, h=9, w=7, channels_last=True),
                 id="per-tap-staged"),
    pytest.param(dict(operator="cosine", c_in=6, c_out=36, groups=2, kernel=5, padding=2, h=8,
                      w=7), id="flat-5x5-g2"),
    pytest.param(dict(operator="linear", c_in=32, c_out=48, kernel=1, padding=0, stride=2, h=9,
                      w=9), id="per-tap-1x1-s2"),
])
@pytest.mark.parametrize("mask", [ALL, (False, True, False, False)], ids=["all", "dw"])
def test_wgrad_writes_dw_as_the_finalize_does(monkeypatch, geom, mask):
    """The wgrad that finishes dw itself (WGRAD_WRITES_DW: the last split of each tile sums the
    tile's partials in split order, S from the prep partials, and writes dw) against the
    separate _dw_finalize_kernel launch on the same partials: per-tap and flat (C_in/G < 16)
    column layouts, several splits (three under the interpreter), groups, dw alone; each agrees
    with float64 and both agree to fp32 rounding (the two sum the splits and S's rows in
    different fixed orders). The same bits run to run. With int64 offsets the wgrad leaves dw
    to the finalize launch (its K loop would pay for the finishing code's registers)."""
    inp, c, r_x, dy = _case(torch.float32, **geom)
    launched = _record_launches(monkeypatch)
    monkeypatch.setattr(conv_bwd, "WGRAD_WRITES_DW", True)
    finished = _kernel(dy, inp, c, r_x, mask)
    again = _kernel(dy, inp, c, r_x, mask)
    names = [k.__name__ for k, _, _ in launched]
    assert _FIN not in names and names.count(_WG) == 2, names
    wgrad_args = [a for _, a in _launches_of(launched, conv_bwd._wgrad_kernel)]
    assert all(a["SPLIT"] > 1 for a in wgrad_args), "the test shapes must take several splits"
    monkeypatch.setattr(conv_bwd, "WGRAD_WRITES_DW", False)
    launched.clear()
    separate = _kernel(dy, inp, c, r_x, mask)
    assert [k.__name__ for k, _, _ in launched][-2:] == [_WG, _FIN]
    _check_all(finished, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5, mask)
    torch.testing.assert_close(finished[1], separate[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(finished, again):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    monkeypatch.setattr(conv_bwd, "WGRAD_WRITES_DW", True)
    monkeypatch.setattr(conv_bwd, "_needs_wide_offsets", lambda *args: True)
    launched.clear()
    wide = _kernel(dy, inp, c, r_x, mask)
    assert [k.__name__ for k, _, _ in launched][-2:] == [_WG, _FIN]
    torch.testing.assert_close(wide[1], separate[1], rtol=0, atol=0)


def test_wgrad_leaves_many_splits_to_the_finalize(monkeypatch):
    """Past WGRAD_FINISH_MAX_SPLIT splits (a few-tile 1x1 layer takes up to 256) the finishing
    program's lone read of every partial would outlast the separate finalize launch: dw comes
    from _dw_finalize_kernel again, and at the limit from the wgrad."""
    # 4 x 24 x 24 = 2304 output pixels: 72 steps of 32 (the fp32 tile), as 8 or 9 even splits
    inp, c, r_x, dy = _case(torch.float32, operator="linear", n=4, c_in=16, c_out=16, kernel=1,
                            padding=0, h=24, w=24)
    launched = _record_launches(monkeypatch)
    limit = conv_bwd.WGRAD_FINISH_MAX_SPLIT
    for split, finalize in ((limit, False), (limit + 1, True)):
        monkeypatch.setattr(conv_bwd, "_wgrad_split", lambda *args, s=split: s)
        launched.clear()
        out = _kernel(dy, inp, c, r_x)
        names = [k.__name__ for k, _, _ in launched]
        assert (_FIN in names) == finalize, (split, names)
        (_, args), = _launches_of(launched, conv_bwd._wgrad_kernel)
        assert args["SPLIT"] == split
        _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5)


# Rows the GEMM kernels cannot load aligned as they come (conv_fwd.aligned_count,
# staged_channels): C_in/G or C_out/G >= 16 and not a multiple of 16, NCHW inputs.
ALIGN_CASES = [
    pytest.param(dict(operator="sigmoid", c_in=20, c_out=24, h=6, w=5), True, id="odd-nhwc"),
    pytest.param(dict(operator="cosine", c_in=40, c_out=36, groups=2, stride=2, h=7, w=6), True,
                 id="odd-g2-s2-nhwc"),
    pytest.param(dict(operator="linear", c_in=32, c_out=16, kernel=1, padding=0, h=5, w=4),
                 False, id="1x1-nchw"),
    pytest.param(dict(operator="sigmoid", c_in=17, c_out=18, kernel=5, padding=4, dilation=2,
                      h=7, w=7), False, id="odd-5x5-d2-nchw"),
]


@pytest.mark.parametrize("geom,channels_last", ALIGN_CASES)
@pytest.mark.parametrize("dtype,rtol,atol_frac", DTYPE_TOLS)
def test_aligned_gemm_operands(geom, channels_last, dtype, rtol, atol_frac, monkeypatch):
    """Hn gets rows of G x cgo_p and w_hat rows of cgi_p elements (C_out/G, C_in/G rounded up
    to 16), Hn's padding holds zeros, and an input outside the fast layout reaches the wgrad as
    the prep launch's staged copy (exact, zero-padded). Every gradient against the float64
    reference, and bitwise the same as with the unpadded operands (SPHEREOPS_STAGE_INPUT=0):
    the padding only adds exact zeros to the same sums."""
    from sphereops_kernels import conv_fwd
    launched = _record_launches(monkeypatch)
    inp, c, r_x, dy = _case(dtype, channels_last=channels_last, **geom)
    out = _kernel(dy, inp, c, r_x)
    _check_all(out, dy, inp, c, r_x, dtype, rtol, atol_frac)

    n, c_in, h, w = inp.x.shape
    c_out, groups = inp.w.shape[0], inp.groups
    cg_in, cg_out = c_in // groups, c_out // groups
    cgi_p, cgo_p = (-(-v // 16) * 16 for v in (cg_in, cg_out))
    _, _, prep = _prep_launch(launched)
    hn = prep["hn_ptr"].view(-1, groups, cgo_p)
    assert hn.shape[0] == c.shape[0] * c.shape[2] * c.shape[3]
    assert not hn[..., cg_out:].any(), "Hn's padding must be zeros"
    assert prep["what_ptr"].shape == (*inp.w.shape[2:], c_out, cgi_p)
    assert not prep["what_ptr"][..., cg_in:].any(), "w_hat's padding must be zeros"
    wgrad_x = _launches_of(launched, conv_bwd._wgrad_kernel)[0][1]["x_ptr"]
    assert wgrad_x.shape == (n, groups * cgi_p, h, w)
    expected = torch.zeros(n, h, w, groups, cgi_p, dtype=dtype, device=DEVICE)
    expected[..., :cg_in] = inp.x.permute(0, 2, 3, 1).reshape(n, h, w, groups, cg_in)
    assert torch.equal(wgrad_x.permute(0, 2, 3, 1).reshape(n, h, w, groups, cgi_p), expected)

    monkeypatch.setattr(conv_fwd, "_STAGE_INPUT", False)
    launched.clear()
    plain = _kernel(dy, inp, c, r_x)
    assert _prep_launch(launched)[2]["hn_ptr"].shape[1] == c_out
    for name, a, b in zip(("dx", "dw", "db", "dk"), out, plain):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), f"{name}: padded and unpadded operands differ"


@pytest.mark.parametrize("geom", [
    dict(operator="sigmoid", c_in=3, c_out=20, kernel=5, padding=2, h=7, w=6),
    dict(operator="linear", c_in=16, c_out=12, groups=2, stride=2, padding=2, dilation=2, h=9,
         w=8),
], ids=["cin3-5x5", "g2-cg8-s2-d2"])
def test_flat_k_wgrad(geom, monkeypatch):
    """Below 16 input channels a group the wgrad's columns run over the flattened (tap, channel)
    axis (FLAT_K: one program covers every tap, Hn is read once per k block instead of once per
    tap): grid axis 1 counts k blocks, dw matches the float64 reference and equals the per-tap
    layout's (the same products summed in the same order)."""
    launched = _record_launches(monkeypatch)
    inp, c, r_x, dy = _case(torch.float32, channels_last=True, **geom)
    mask = (False, True, False, False)
    flat = _kernel(dy, inp, c, r_x, mask)
    _check_all(flat, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5, mask)
    c_out, cg_in, kh, kw = inp.w.shape
    cfg = conv_bwd.wgrad_config(cg_in, c_out // inp.groups, torch.float32, kh * kw)
    assert cfg["FLAT_K"]
    (_, grid, _), = [(k, g, a) for k, g, a in launched if k is conv_bwd._wgrad_kernel]
    assert grid[1] == -(-kh * kw * cg_in // cfg["BLOCK_CI"])

    real_config = conv_bwd.wgrad_config

    def per_tap(cg_in, cg_out, dtype, taps=1):
        return dict(real_config(cg_in, cg_out, dtype), FLAT_K=False, BLOCK_CI=16)
    monkeypatch.setattr(conv_bwd, "wgrad_config", per_tap)
    launched.clear()
    tapwise = _kernel(dy, inp, c, r_x, mask)
    (_, grid, _), = [(k, g, a) for k, g, a in launched if k is conv_bwd._wgrad_kernel]
    assert grid[1] == kh * kw
    assert torch.equal(flat[1], tapwise[1])


# Pixel walks of _wgrad_kernel with 16-pixel steps and one split, so that every program takes
# many steps: images smaller than a step (3x5: each step crosses an image), rows narrower than
# a step (7 wide: several row carries a step), rows wider than one (19 wide), stride 2 with
# padding, the flat (tap, channel) layout, and 1x1 filters on dense pixel rows (DENSE_ROWS:
# channels_last, and NCHW through the staged copy) and on rows that are not (stride 2,
# padding 1).
@pytest.mark.parametrize("geom,dense", [
    (dict(n=6, h=3, w=5), False),
    (dict(n=3, h=9, w=7), False),
    (dict(n=1, h=4, w=19), False),
    (dict(n=4, h=9, w=8, stride=2, padding=2, dilation=2), False),
    (dict(n=3, c_in=3, c_out=16, kernel=5, padding=2, h=6, w=5), False),
    (dict(kernel=1, padding=0, h=5, w=7), True),
    (dict(kernel=1, padding=0, h=5, w=7, channels_last=False), True),
    (dict(n=4, kernel=1, padding=0, stride=2, h=9, w=7), False),
    (dict(kernel=1, padding=1, h=5, w=6), False),
], ids=["3x5-images", "9x7-rows", "19-wide-rows", "s2-d2", "flat-cin3", "1x1-dense",
        "1x1-dense-nchw", "1x1-s2", "1x1-padded"])
@pytest.mark.parametrize("runtime_div", [False, True], ids=["const-div", "runtime-div"])
def test_wgrad_pixel_walk(geom, dense, runtime_div, monkeypatch):
    """The wgrad divides each row's output pixel into (image, row, column) once and carries it
    16 pixels on a step (conv_bwd.advance_pixels), or reads dense 1x1 rows directly: dw against
    the float64 reference, and the DENSE_ROWS switch where expected."""
    real_config = conv_bwd.wgrad_config
    monkeypatch.setattr(conv_bwd, "wgrad_config",
                        lambda *a, **k: dict(real_config(*a, **k), BLOCK_M=16))
    monkeypatch.setattr(conv_bwd, "_wgrad_split", lambda *a: 1)
    monkeypatch.setattr(conv_bwd, "_WGRAD_RUNTIME_DIV", runtime_div)
    launched, flags = record_launches(monkeypatch, conv_bwd, "_launch")
    geom = dict(dict(operator="linear", n=2, c_in=16, c_out=16, channels_last=True), **geom)
    inp, c, r_x, dy = _case(torch.float32, **geom)
    mask = (False, True, False, False)
    out = _kernel(dy, inp, c, r_x, mask)
    (args, flag), = [(a, f) for (k, _, a), f in zip(launched, flags)
                     if k is conv_bwd._wgrad_kernel]
    args = dict(zip(conv_bwd._wgrad_kernel.arg_names, args))
    assert args["M"] > 4 * 16, "the walk should take several steps"
    assert args["SPLIT"] == 1, "one split: every program walks all the pixels"
    assert flag["DENSE_ROWS"] == dense
    _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5, mask)


# (C_in, C_out, groups) -> the dgrad's (EVEN_K, EVEN_N) and the wgrad's (EVEN_O, EVEN_CI):
# fp32 tiles are BLOCK_K <= 32 / BLOCK_N <= 64 (dgrad), BLOCK_O / BLOCK_CI the channel counts
# rounded up to powers of two (wgrad)
@pytest.mark.parametrize("c_in,c_out,groups,dgrad_even,wgrad_even", [
    (32, 32, 1, (True, True), (True, True)),
    (64, 64, 2, (True, True), (True, True)),    # an unmasked tile must stay in its group
    (32, 48, 1, (False, True), (False, True)),  # 48 outputs: a 16-channel K tail / 64-row O tile
    (48, 32, 1, (True, False), (True, False)),  # 48 inputs in a 64-wide tile
    (40, 24, 1, (False, False), (True, False)),  # staged / padded to 48 and 32 (Hn's 32
                                                  # columns fill the wgrad's 32-row O tile)
], ids=["even", "even-g2", "out-tail", "in-tail", "both-tails"])
def test_gemm_backward_channel_masks(c_in, c_out, groups, dgrad_even, wgrad_even, monkeypatch):
    """The dgrad and wgrad drop their K loops' channel masks where the tiles divide the
    channels (EVEN_K / EVEN_N, EVEN_O / EVEN_CI): the flags where expected, and dx and dw
    against the float64 reference either way."""
    launched, flags = record_launches(monkeypatch, conv_bwd, "_launch")
    inp, c, r_x, dy = _case(torch.float32, operator="cosine", n=2, c_in=c_in, c_out=c_out,
                            groups=groups, h=6, w=5, channels_last=True)
    mask = (True, True, False, False)
    out = _kernel(dy, inp, c, r_x, mask)
    by_kernel = {k: f for (k, _, _), f in zip(launched, flags)}
    dgrad, wgrad = by_kernel[conv_bwd._dgrad_kernel], by_kernel[conv_bwd._wgrad_kernel]
    assert (dgrad["EVEN_K"], dgrad["EVEN_N"]) == dgrad_even
    assert (wgrad["EVEN_O"], wgrad["EVEN_CI"]) == wgrad_even
    _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5, mask)


def test_dense_pixel_rows():
    x = torch.empty(2, 8, 5, 7)
    assert not conv_bwd._dense_pixel_rows(x)                       # NCHW: images C planes apart
    assert conv_bwd._dense_pixel_rows(x[:1])                       # ... unless there is one
    assert conv_bwd._dense_pixel_rows(x.contiguous(memory_format=torch.channels_last))
    assert not conv_bwd._dense_pixel_rows(                         # a column slice: gaps
        x.contiguous(memory_format=torch.channels_last)[..., 1:])
    assert conv_bwd._dense_pixel_rows(                             # one row: no row stride
        x.contiguous(memory_format=torch.channels_last)[:1, :, 2:3, :])
    assert not conv_bwd._dense_pixel_rows(                         # ... but image gaps
        x.contiguous(memory_format=torch.channels_last)[:, :, 2:3, :])


def test_wgrad_layout_rule():
    """FLAT_K below 16 input channels a group, with up to 64 columns (32 for fp32) of the
    taps * C_in/G filter positions; per tap from 16 channels up."""
    cfg = conv_bwd.wgrad_config(3, 64, torch.bfloat16, 25)
    assert cfg["FLAT_K"] and cfg["BLOCK_CI"] == 64
    assert conv_bwd.wgrad_config(3, 64, torch.float32, 25)["BLOCK_CI"] == 32
    assert conv_bwd.wgrad_config(2, 64, torch.bfloat16, 9)["BLOCK_CI"] == 32
    cfg = conv_bwd.wgrad_config(16, 64, torch.bfloat16, 9)
    assert not cfg["FLAT_K"] and cfg["BLOCK_CI"] == 16


@pytest.mark.parametrize("cols", [slice(1, 4), slice(2, 3)], ids=["cols-1-4", "width-1"])
def test_staged_input_from_a_view(cols):
    """Views the staging must address by their strides: a column slice of an NCHW input (rows
    6 elements apart for a width of 3) and a width-1 slice (its row stride still the
    parent's: not a dense plane) -- every gradient against the float64 reference."""
    inp, _, _, _ = _case(torch.float32, operator="sigmoid", c_in=20, c_out=18, h=5, w=6)
    inp = dataclasses.replace(inp, x=inp.x[:, :, :, cols])
    assert conv_fwd.staged_channels(inp.x, 20) == 32 and not conv_fwd.dense_plane(inp.x)
    c, r_x = _saved_state(inp)
    dy = torch.randn(c.shape, dtype=torch.float64).to(DEVICE, torch.float32)
    _check_all(_kernel(dy, inp, c, r_x), dy, inp, c, r_x, torch.float32, 2e-5, 2e-5)


def _strided_weight(w):
    """w's values in a non-contiguous tensor (every other input channel of a wider one)."""
    wide = torch.empty(w.shape[0], 2 * w.shape[1], *w.shape[2:], dtype=w.dtype, device=w.device)
    wide[:, ::2] = w
    return wide[:, ::2]


@pytest.mark.parametrize("c_in,c_out,groups,kernel,layout", [
    (1, 37, 1, 3, "nchw"),               # 9-element filters: 128 of them a program
    (6, 38, 2, 5, "strided"),            # 75 elements, 16 a program; groups 2
    (8, 4, 4, 3, "channels_last"),       # one output channel a group: _channelwise_prep_kernel
    (260, 38, 2, 3, "strided"),          # 1170 elements: one 2048-wide step a pass
    (520, 37, 1, 3, "channels_last"),    # 4680 elements: three steps a pass
], ids=["c1", "5x5-c3-g2-strided", "channelwise", "c130-g2-strided", "c520-three-steps"])
def test_filter_programs_of_the_prep_launch(monkeypatch, c_in, c_out, groups, kernel, layout):
    """r_w and w_hat as the prep launch's filter programs leave them, against float64 torch:
    fresh random filters of 9 to 4680 elements, groups 1 and 2, contiguous, channels_last and
    non-contiguous weights. dx alone is asked (it needs both)."""
    launched = _record_launches(monkeypatch)
    inp, c, r_x, dy = _case(torch.float32, operator="cosine", n=1, c_in=c_in, c_out=c_out,
                            groups=groups, kernel=kernel, padding=kernel // 2, h=4, w=5)
    w = inp.w
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        w = _strided_weight(w)
        assert not w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last)
    inp = dataclasses.replace(inp, w=w)
    n_f = (c_in // groups) * kernel * kernel
    cfg = conv_bwd.filter_norm_config(n_f)
    assert cfg["BLOCK_O"] * cfg["BLOCK_F"] <= 2048 and cfg["BLOCK_F"] >= min(n_f, 2048)
    _kernel(dy, inp, c, r_x, (True, False, False, False))
    _, _, args = _prep_launch(launched)
    expected = R.filter_norms(w.double(), EPS)
    assert_close(args["rw_ptr"], expected, 1e-6, 1e-6, "r_w")
    # rows of aligned_count(C_in/G) elements, zeros past C_in/G
    cg_in = c_in // groups
    w_hat = args["what_ptr"]
    assert not w_hat[..., cg_in:].any()
    assert w_hat.shape[-1] == (cg_in if c_out == groups else -(-cg_in // 16) * 16 if cg_in >= 16
                               else cg_in)
    assert_close(w_hat[..., :cg_in],
                 (w.double() / expected.reshape(-1, 1, 1, 1)).permute(2, 3, 0, 1),
                 1e-6, 1e-6, "w_hat")


def test_pure_depthwise_uses_the_elementwise_kernels(monkeypatch):
    """C_in/G = C_out/G = 1 recomputes c and r_x (the forward saves neither) and runs the
    depthwise prep and grad kernels -- no filter-norm pass, no GEMM, no w_hat -- giving the
    same bits run to run and whatever c / r_x it is handed (they are not read). One output
    channel per group with two input channels keeps the GEMM kernels and the channelwise prep;
    a channel multiplier (C_out/G = 2) the per-group prep."""
    launched = []
    KB = conv_bwd
    real_launch = KB._launch
    monkeypatch.setattr(KB, "_launch", lambda kernel, *a, **kw: (launched.append(kernel),
                                                                  real_launch(kernel, *a, **kw))[1])
    inp, c, r_x, dy = _case(torch.bfloat16, operator="sigmoid", c_in=20, c_out=20, groups=20,
                            h=9, w=8, channels_last=True)
    first = _kernel(dy, inp, c, r_x)
    # the partial sums' one level rides in the grad launch: 3 launches
    assert launched == [KB._depthwise_prep_kernel, KB._depthwise_grad_kernel,
                        KB._dw_finalize_kernel], launched
    second = _kernel(dy, inp, c.new_empty(0), r_x.new_empty(0))
    for name, a, b in zip(("dx", "dw", "db", "dk"), first, second):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{name} differs between runs"
    launched.clear()
    inp, c, r_x, dy = _case(torch.float32, operator="linear", c_in=8, c_out=4, groups=4, h=7, w=7)
    _kernel(dy, inp, c, r_x)
    assert KB._dgrad_kernel in launched and KB._depthwise_grad_kernel not in launched
    assert KB._channelwise_prep_kernel in launched and KB._depthwise_prep_kernel not in launched
    launched.clear()
    inp, c, r_x, dy = _case(torch.float32, operator="linear", c_in=4, c_out=8, groups=4, h=7, w=7)
    _kernel(dy, inp, c, r_x)
    assert KB._dgrad_kernel in launched and KB._depthwise_grad_kernel not in launched
    assert KB._prep_kernel in launched and KB._channelwise_prep_kernel not in launched


@pytest.mark.parametrize("mask", [ALL, (True, False, True, True), (False, False, True, True)],
                         ids=["all", "dx-db-dk", "db-dk"])
def test_depthwise_reduction_in_the_grad_launch(monkeypatch, mask):
    """The depthwise path's partial sums: a first level (here forced: 2 rows a program) in a
    reduce launch, the final level as extra programs of the grad launch (several extra rows of
    programs: 1-channel reduce blocks against 16-channel tiles), or both in reduce launches
    when neither dx nor dw is asked -- every gradient against the float64 reference."""
    monkeypatch.setitem(conv_bwd.REDUCE_CONFIG, "BLOCK_R", 2)
    monkeypatch.setitem(conv_bwd.REDUCE_CONFIG, "ROWS_PER_PROGRAM", 2)
    monkeypatch.setitem(conv_bwd.REDUCE_CONFIG, "BLOCK_C", 1)
    launched = _record_launches(monkeypatch)
    inp, c, r_x, dy = _case(torch.float32, operator="sigmoid", c_in=20, c_out=20, groups=20,
                            h=18, w=16, stride=2, channels_last=True)
    cfg = conv_bwd.depthwise_config("prep")
    rows = -(-c.shape[0] * c.shape[2] * c.shape[3] // (cfg["BLOCK_M"] * cfg["ROW_BLOCKS"]))
    assert rows > 2 and rows % 2 == 1, f"test setup: want an odd number of partial rows > 2, got {rows}"
    out = _kernel(dy, inp, c, r_x, mask)
    _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5, mask)
    names = [k.__name__ for k, _, _ in launched]
    assert names.count("_reduce_partials_kernel") == (1 if mask[0] or mask[1] else 2), names


@pytest.mark.parametrize("geom", [
    dict(kernel=3, padding=1, h=5, w=8),
    dict(kernel=(3, 2), padding=(2, 0), dilation=(2, 1), h=6, w=6),
], ids=["3x3", "3x2-d2"])
@pytest.mark.parametrize("mask", [ALL, (True, False, False, False), (False, True, True, True)],
                         ids=["all", "dx", "dw-db-dk"])
def test_depthwise_grad_pairs_of_pixels(geom, mask, monkeypatch):
    """At stride 1 and an even width the depthwise grad kernel takes its input pixels in pairs
    (PIX_GROUP 2: one load of each Hn / A column for both); dx sums each pixel's taps in the
    same order as single pixels -- bitwise the single-pixel dx -- and every gradient is right
    against float64 (the weight-gradient partials sum in another order: to rounding)."""
    inp, c, r_x, dy = _case(torch.float32, operator="sigmoid", n=3, c_in=20, c_out=20,
                            groups=20, channels_last=True, **geom)
    _, flags = record_launches(monkeypatch, conv_bwd, "_launch")
    pairs = _kernel(dy, inp, c, r_x, mask=mask)
    monkeypatch.setattr(conv_bwd, "DW_PIXEL_PAIRS", False)   # SPHEREOPS_DW_PIXEL_PAIRS=0
    single = _kernel(dy, inp, c, r_x, mask=mask)
    # the grad launches (the only ones with PIX_GROUP): pairs, then single pixels
    assert [f["PIX_GROUP"] for f in flags if "PIX_GROUP" in f] == [2, 1]
    if mask[0]:
        assert torch.equal(pairs[0], single[0]), "dx of pixel pairs differs from single pixels"
    for name, a, b in zip(("dw", "db", "dk"), pairs[1:], single[1:]):
        if a is not None:
            assert_close(a, b, rtol=1e-6, atol=1e-6, name=name)
    _check_all(pairs, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5, mask=mask)


@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["dx-only", "dw-only"])
def test_depthwise_grad_kernel_with_one_gradient(need):
    """The depthwise grad kernel computes dx and the weight-gradient partials in one pass; each
    alone (NEED_DX / NEED_DW) gives the same values as both together (and the float64 reference),
    with stride 2 so the input pixels that no tap reaches are in the mix."""
    inp, c, r_x, dy = _case(torch.float32, operator="linear", c_in=12, c_out=12, groups=12,
                            h=9, w=7, stride=(2, 2), padding=(1, 1), channels_last=True)
    both = _kernel(dy, inp, c, r_x, mask=(True, True, False, False))
    alone = _kernel(dy, inp, c, r_x, mask=need + (False, False))
    for name, wanted, a, b in zip(("dx", "dw"), need, alone, both):
        if wanted:
            assert torch.equal(a, b), f"{name} alone differs from {name} with the other gradient"
        else:
            assert a is None, f"{name} was not asked for"
    _check_all(both, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5, mask=(True, True, False, False))


@pytest.mark.parametrize("seed", range(RANDOM_CASES))
def test_random_geometries_match_closed_form_reference(seed):
    """Seeded random convolutions (printed on failure): the fp32 forward and backward
    kernels against the reference (float64 forward, closed-form backward)."""
    conv_fwd = pytest.importorskip("sphereops_kernels.conv_fwd")
    torch.manual_seed(1000 + seed)
    geom = random_conv_geometry(seed)
    inp, c, r_x, dy = _case(torch.float32, **geom)
    try:
        y, c_k, r_k = conv_fwd.sphere_conv2d_fwd(*inp.args(), EPS)
        y64, c64, r64 = _forward64(inp)
        saved = (("y", y, y64), ("c", c_k, c64), ("r_x", r_k, r64))
        if inp.pure_depthwise:   # the depthwise forward saves nothing
            assert c_k.numel() == 0 and r_k.numel() == 0
            saved = saved[:1]
        for name, got, want in saved:
            assert_close(got, want, rtol=2e-5, atol=2e-5 * max(1.0, want.abs().max().item()),
                         name=name)
        out = _kernel(dy, inp, c, r_x)
        _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5)
        if geom["operator"] != "sigmoid":   # the same through the saved-output path
            out = sphere_conv2d_bwd(dy, inp.x, inp.w, None, y, r_x, *_geometry(inp), ALL,
                                    saved="output", bias=inp.bias)
            refs = _references_from_output(dy, inp, y, r_x)
            for name, o, r64, rs in zip(("dx", "dw", "db", "dk"), out, *refs):
                _check_grad(o, r64, rs, torch.float32, 2e-5, 2e-5, f"{name} (saved output)")
    except AssertionError as err:
        raise AssertionError(f"geometry {geom}: {err}") from err


def _next_pow2(v):
    return 1 << (int(v) - 1).bit_length()


def _depthwise_row_case(dtype, max_row_w, monkeypatch, **geom):
    monkeypatch.setattr(conv_fwd, "MAX_ROW_W", max_row_w)
    return _case(dtype, operator="sigmoid", **DEPTHWISE_ROW_CASE, **geom)


# NCHW x: the depthwise prep and grad kernels take row tiles (conv_fwd.depthwise_pixel_tile,
# ROW_W > 0) and keep Hn and A in [N, C, Ho*Wo] planes. MAX_ROW_W = 4 splits every row (output
# and input) into several column blocks; 64 takes whole rows, several a tile; stride 2 puts
# the gathered state rows out of line; the rectangular dilated filter mixes both.
@pytest.mark.parametrize("max_row_w", [4, 64], ids=["split-rows", "whole-rows"])
@pytest.mark.parametrize("geom", list(DEPTHWISE_ROW_GEOMETRIES))
@pytest.mark.parametrize("dtype,rtol,atol_frac", [DTYPE_TOLS[0], DTYPE_TOLS[2]])
def test_depthwise_row_tiles(max_row_w, geom, dtype, rtol, atol_frac, monkeypatch):
    inp, c, r_x, dy = _depthwise_row_case(dtype, max_row_w, monkeypatch,
                                          **DEPTHWISE_ROW_GEOMETRIES[geom])
    launches, flags = record_launches(monkeypatch, conv_bwd, "_launch")
    out = _kernel(dy, inp, c, r_x)
    _check_all(out, dy, inp, c, r_x, dtype, rtol, atol_frac)
    row_w = {k: kw.get("ROW_W") for (k, _, _), kw in zip(launches, flags)}
    wo, wd = dy.shape[3], inp.x.shape[3]
    assert row_w[conv_bwd._depthwise_prep_kernel] == min(_next_pow2(wo), max_row_w)
    assert row_w[conv_bwd._depthwise_grad_kernel] == min(_next_pow2(wd), max_row_w)


@pytest.mark.parametrize("x_layout,dy_layout", [("nchw", "channels_last"),
                                                ("channels_last", "nchw")])
def test_depthwise_mixed_layouts(x_layout, dy_layout, monkeypatch):
    """dy in the other memory format than x: the tiles follow x (row tiles for NCHW x, flat
    for channels_last), dy is read through its own strides, dx follows x."""
    inp, c, r_x, dy = _depthwise_row_case(torch.float32, 8, monkeypatch, stride=(2, 1))
    fmt = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    inp.x = inp.x.contiguous(memory_format=fmt[x_layout])
    dy = dy.contiguous(memory_format=fmt[dy_layout])
    out = _kernel(dy, inp, c, r_x)
    _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5)
    assert out[0].is_contiguous(memory_format=fmt[x_layout])


@pytest.mark.parametrize("layout, geometry, run", [
    ("nchw", dict(stride=2), 1),        # one phase's pixels: every other input pixel
    # stride 1, 4x4 planes of three images: runs of 4 pixels (16 bytes of fp32) meeting plane
    # boundaries inside a tile, a partial last tile
    ("nchw", dict(n=3, h=4, w=4), 4),
    ("nchw", dict(h=6, w=5), 2),
    ("channels_last", dict(stride=2), 1),
], ids=["nchw-s2", "nchw-run4", "nchw-run2", "channels_last"])
def test_dgrad_reads_and_writes_along_the_pixels_for_nchw(layout, geometry, run, monkeypatch):
    """NCHW x and dx: the dgrad kernel's x tile and dx store go along the pixels (PIXELS_FAST),
    in runs of PIX_RUN pixels at stride 1 (launch.pixel_run); channels_last directly -- all
    against the float64 reference."""
    launches, flags = record_launches(monkeypatch, conv_bwd, "_launch")
    inp, c, r_x, dy = _case(torch.float32, operator="cosine",
                            channels_last=layout == "channels_last", **geometry)
    out = _kernel(dy, inp, c, r_x)
    _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5)
    (dgrad,) = [kw for (k, _, _), kw in zip(launches, flags) if k is conv_bwd._dgrad_kernel]
    assert dgrad["PIXELS_FAST"] is (layout == "nchw")
    assert dgrad["PIX_RUN"] == run


def test_dgrad_nchw_without_runs_in_eighths(monkeypatch):
    """NCHW x and dx at stride 2 (a phase's pixels are every other pixel: PIX_RUN 1) on a
    128-wide dgrad tile: the epilogue works on column eighths (epilogue.column_slices), with
    full, partial and wholly masked eighths (40 input channels), against float64."""
    launches, flags = record_launches(monkeypatch, conv_bwd, "_launch")
    monkeypatch.setattr(conv_bwd, "dgrad_config", lambda *args: dict(
        BLOCK_M=32, BLOCK_N=128, BLOCK_K=16, num_warps=4, num_stages=1))
    inp, c, r_x, dy = _case(torch.float32, operator="sigmoid", stride=2, c_in=40, c_out=24)
    out = _kernel(dy, inp, c, r_x)
    _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5)
    (dgrad,) = [kw for (k, _, _), kw in zip(launches, flags) if k is conv_bwd._dgrad_kernel]
    assert dgrad["PIXELS_FAST"] and dgrad["PIX_RUN"] == 1 and dgrad["BLOCK_N"] == 128


def test_depthwise_rows_wider_than_the_tile():
    """NCHW rows wider than the prep and grad tiles (ROW_W 64 > BLOCK_M: each tile one row
    segment), 40 wide, against float64."""
    inp, c, r_x, dy = _case(torch.float32, operator="sigmoid", n=1, c_in=4, c_out=4, groups=4,
                            h=4, w=40)
    for kernel in ("prep", "grad"):
        assert conv_bwd.depthwise_config(kernel, rows=True)["BLOCK_M"] < 64
    out = _kernel(dy, inp, c, r_x)
    _check_all(out, dy, inp, c, r_x, torch.float32, 2e-5, 2e-5)


# ---------------------------------------------------------------------------------------------
# The dgrad on Hn's padded grid (sphereops_kernels.conv_bwd_grid; by input phase at stride > 1),
# forced on with dgrad_grid=True: the prep pass writes Hn onto the grid, the wgrad reads it there
# (or runs on the grids too), the dgrad is the TMA GEMM. Under the interpreter one small tile
# (configs.conv_fwd_grid_configs) so that the tiny shapes cover several M and N tiles and K
# chunks.
# ---------------------------------------------------------------------------------------------

conv_bwd_grid = pytest.importorskip("sphereops_kernels.conv_bwd_grid")
GRID_DTYPE_TOLS = DTYPE_TOLS[1:]   # 16-bit only (grid_backward_applies)

GRID_DGRAD_CASES = [
    pytest.param(dict(operator="cosine", c_in=16, c_out=16), id="3x3-same"),
    # margins (TOP, LEFT) = (3, 6) from a rectangular filter dilated both ways with less than
    # "same" padding, two groups
    pytest.param(dict(operator="sigmoid", c_in=32, c_out=32, groups=2, kernel=(3, 5),
                      padding=(1, 2), dilation=(2, 2), h=9, w=10), id="rect-dilated-g2"),
    pytest.param(dict(operator="cosine", c_in=16, c_out=32, kernel=1, padding=0),
                 id="1x1-no-margins"),
    pytest.param(dict(operator="linear", n=3, c_in=16, c_out=16, padding=0, h=7, w=6),
                 id="valid"),
    # several N tiles (48 input channels) and K chunks (32 output channels), a 5x5 filter
    pytest.param(dict(operator="sigmoid", c_in=48, c_out=32, kernel=5, padding=1, h=8, w=7),
                 id="5x5-multi-tile"),
    # strided: the dgrad by input phase, the wgrad on x's phase planes (conv_bwd_grid.
    # grid_margins). 3x3 stride 2: four phases of 4 / 2 / 2 / 1 taps
    pytest.param(dict(operator="cosine", c_in=16, c_out=16, stride=2, h=8, w=7), id="3x3-s2"),
    # a 1x1 projection: three phases without taps (dx = 0 there), no margins
    pytest.param(dict(operator="sigmoid", c_in=16, c_out=32, kernel=1, padding=0, stride=2,
                      h=8, w=7), id="1x1-s2"),
    # stride 3 with dilation 2: taps 3 apart in each phase, margins set by the wgrad's planes
    pytest.param(dict(operator="linear", c_in=16, c_out=32, stride=3, padding=1, dilation=2,
                      h=11, w=10), id="s3-d2"),
    # stride (2, 1) with a 3x2 filter; stride 2 with dilation 2 and two groups (every tap in
    # phase 0: the odd phases have none) and padding past the filter's reach on a 1x1
    pytest.param(dict(operator="linear", c_in=16, c_out=16, kernel=(3, 2), stride=(2, 1),
                      padding=(0, 1), h=8, w=7), id="rect-s2x1"),
    pytest.param(dict(operator="sigmoid", c_in=32, c_out=32, groups=2, stride=2, padding=2,
                      dilation=2, h=9, w=9), id="s2-d2-g2"),
    pytest.param(dict(operator="cosine", c_in=16, c_out=16, kernel=1, padding=1, stride=2,
                      h=7, w=6), id="1x1-s2-wide-padding"),
    # C_out/G not a multiple of 16 (24 -> Hn's columns and w_hat's rows padded to 32 a group),
    # C_in/G 20 (staged to 32), two groups: the benchmark's odd edge case in small
    pytest.param(dict(operator="sigmoid", c_in=40, c_out=48, groups=2, kernel=3, padding=2,
                      dilation=2, h=7, w=6), id="odd-channels-g2"),
    pytest.param(dict(operator="linear", c_in=20, c_out=24, stride=2, h=8, w=7),
                 id="odd-channels-s2"),
]


@pytest.fixture(autouse=True)
def _poisoned_grid_buffers(monkeypatch):
    """The grids come unwritten from their allocators; the prep launch writes every row (data,
    Hn's zero margins, x's zero padding and lead rows) and zeroes the wgrad's tile counters.
    NaN-filled (counters: 1000) here, so that a row or counter it misses shows in the
    gradients instead of whatever the allocator handed out."""
    def poisoned(allocate):
        def allocate_poisoned(*args, **kwargs):
            out = allocate(*args, **kwargs)
            buffer = out[0] if isinstance(out, tuple) else out
            staged = out[2] if isinstance(out, tuple) else True
            if staged:   # the wgrad's tile counters: a count that never reaches the splits
                buffer.fill_(float("nan") if buffer.is_floating_point() else 1000)
            return out
        return allocate_poisoned
    for name in ("hn_grid_buffer", "x_grid_buffer", "wgrad_tile_counters"):
        monkeypatch.setattr(conv_bwd_grid, name, poisoned(getattr(conv_bwd_grid, name)))


def _grid_kernel(dy, inp, c, r_x, monkeypatch, mask=ALL, wgrad_grid=True):
    """sphere_conv2d_bwd with the grid dgrad (and the grid wgrad, or the implicit-GEMM wgrad
    reading the gridded Hn) forced, asserting that they ran."""
    calls = {"grid_dgrad": 0, "grid_wgrad": 0}
    for name in calls:
        real = getattr(conv_bwd_grid, name)

        def counted(*a, name=name, real=real, **kw):
            calls[name] += 1
            return real(*a, **kw)
        monkeypatch.setattr(conv_bwd_grid, name, counted)
    out = sphere_conv2d_bwd(dy, inp.x, inp.w, inp.k, c, r_x, *_geometry(inp), mask,
                            dgrad_grid=True, wgrad_grid=wgrad_grid)
    assert calls == {"grid_dgrad": int(mask[0]), "grid_wgrad": int(mask[1] and wgrad_grid)}, \
        f"grid kernels that ran: {calls}"
    return out


@pytest.mark.parametrize("wgrad", ["grid-wgrad", "gemm-wgrad"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("geom", GRID_DGRAD_CASES)
@pytest.mark.parametrize("dtype,rtol,atol_frac", GRID_DTYPE_TOLS)
def test_grid_backward_matches_reference(geom, layout, dtype, rtol, atol_frac, wgrad,
                                         monkeypatch):
    """dx from the grid dgrad, dw from the grid wgrad (or from the implicit-GEMM wgrad reading
    the gridded Hn), db and dk from the prep pass that writes Hn onto the grid, against the
    float64 closed form."""
    inp, c, r_x, dy = _case(dtype, channels_last=(layout == "channels_last"), **geom)
    out = _grid_kernel(dy, inp, c, r_x, monkeypatch, wgrad_grid=(wgrad == "grid-wgrad"))
    _check_all(out, dy, inp, c, r_x, dtype, rtol, atol_frac)
    if layout == "channels_last":
        assert out[0].is_contiguous(memory_format=torch.channels_last), "dx must follow x's layout"


@pytest.mark.parametrize("mask", [ALL, (False, True, True, False)], ids=["all", "dw-db"])
def test_grid_wgrad_leaves_many_splits_to_the_finalize(monkeypatch, mask):
    """The grid wgrad finishes dw in its last split of each tile up to WGRAD_FINISH_MAX_SPLIT
    splits and leaves it to _dw_finalize_kernel past that (S then from its own reduce programs):
    both against float64, and as close to each other as two fixed summation orders."""
    # Hn's grid: 2 x 24 x 24 = 1152 rows, 36 steps of 32 (the interpreter's tile): 8 or 9 splits
    inp, c, r_x, dy = _case(torch.bfloat16, operator="sigmoid", c_in=16, c_out=32, n=2, h=23,
                            w=23, channels_last=True)
    launched = _record_launches(monkeypatch)
    limit = conv_bwd.WGRAD_FINISH_MAX_SPLIT
    assert limit == 8, "the test's grid is sized for 8 and 9 splits"
    outs = []
    for split, finalize in ((limit, False), (limit + 1, True)):
        monkeypatch.setattr(conv_bwd_grid, "_wgrad_split", lambda *args, s=split: s)
        launched.clear()
        outs.append(_grid_kernel(dy, inp, c, r_x, monkeypatch, mask))
        names = [k.__name__ for k, _, _ in launched]
        assert (_FIN in names) == finalize, (split, names)
        _check_all(outs[-1], dy, inp, c, r_x, torch.bfloat16, 1.5e-2, 2.0 ** -7, mask)
    torch.testing.assert_close(outs[0][1].float(), outs[1][1].float(), rtol=1e-2, atol=1e-2)


def _random_grid_geometry(seed: int) -> dict:
    """A strided conv the grid backward takes, drawn from a seeded RNG: kernel 1-4, stride 1-3
    a side (not both 1), padding 0-3, dilation 1-3, odd sizes, 16-24 channels a group in and
    16-40 out (padded to 16s on the grids), one or two groups -- the phase and margin
    arithmetic's corner cases (grid_margins) that no hand-picked case may hit."""
    rng = torch.Generator().manual_seed(seed)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    kernel, stride = (pick(1, 4), pick(1, 4)), (pick(2, 3), pick(1, 3))
    if pick(0, 1):
        stride = stride[::-1]
    dilation, padding = (pick(1, 3), pick(1, 3)), (pick(0, 3), pick(0, 3))
    groups = pick(1, 2)
    h = max(pick(3, 13), (kernel[0] - 1) * dilation[0] + 1 - 2 * padding[0])
    w = max(pick(3, 13), (kernel[1] - 1) * dilation[1] + 1 - 2 * padding[1])
    return dict(n=pick(1, 3), c_in=pick(16, 24) * groups, c_out=pick(16, 40) * groups,
                groups=groups, kernel=kernel, stride=stride, padding=padding,
                dilation=dilation, h=h, w=w,
                operator=("linear", "cosine", "sigmoid")[pick(0, 2)],
                channels_last=bool(pick(0, 1)))


@pytest.mark.parametrize("draw", range(RANDOM_CASES))
def test_random_strided_geometries_on_the_grids(draw, monkeypatch):
    """Random strided convs through the grid dgrad and wgrad, the grids NaN-poisoned first: dx,
    dw, db, dk against the float64 closed form. The geometry's seed comes from the test's own
    (fresh each run, printed on failure: conftest), so CI meets new geometries every run."""
    geom = _random_grid_geometry(int(torch.randint(0, 2 ** 31 - 1, (1,))))
    inp, c, r_x, dy = _case(torch.bfloat16, **geom)
    try:
        out = _grid_kernel(dy, inp, c, r_x, monkeypatch)
        _check_all(out, dy, inp, c, r_x, torch.bfloat16, 1.5e-2, 2.0 ** -7)
    except AssertionError as err:
        raise AssertionError(f"geometry {geom}: {err}") from err


def test_grid_hn_layout(monkeypatch):
    """The prep pass's Hn on the grid: the data rows hold Hn = G / r_x at (TOP + ho, LEFT + wo)
    of each image, the margins are zero -- against Hn built in float64 and placed by torch."""
    inp, c, r_x, dy = _case(torch.float16, operator="cosine", n=2, c_in=16, c_out=16,
                            kernel=(3, 5), padding=(1, 1), dilation=(1, 2), h=6, w=7,
                            channels_last=True)
    seen = []
    real = conv_bwd_grid.grid_dgrad
    monkeypatch.setattr(conv_bwd_grid, "grid_dgrad",
                        lambda hn, *a, **kw: (seen.append(hn.clone()), real(hn, *a, **kw))[1])
    sphere_conv2d_bwd(dy, inp.x, inp.w, inp.k, c, r_x, *_geometry(inp), ALL, dgrad_grid=True)
    top, left = conv_bwd_grid.hn_margins((3, 5), (1, 1), (1, 2))
    assert (top, left) == (1, 7)
    n, c_out, ho, wo = c.shape
    grad_c = dy.double() * R.dg_dc(c.double(), "cosine")
    expected = torch.zeros(n, ho + top, wo + left, c_out, dtype=torch.float64)
    expected[:, top:, left:] = (grad_c / r_x.double()).permute(0, 2, 3, 1)
    got = seen[0].double().view(n, ho + top, wo + left, c_out)
    assert torch.equal(got[:, :top], torch.zeros_like(got[:, :top])), "top margin not zero"
    assert torch.equal(got[:, :, :left], torch.zeros_like(got[:, :, :left])), "left margin not zero"
    assert_close(got, expected, rtol=2.0 ** -10, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("in_hw,out_hw,kernel,stride,padding,dilation,margins", [
    # stride 1: the flipped filters' padding, (K-1)*D - P
    ((9, 9), (9, 9), (3, 5), (1, 1), (1, 2), (1, 1), (1, 2)),
    # 3x3 stride 2 "same", 32 -> 16: phase 0 (taps 0 and 2, first input row q0 = 1) reads Hn
    # rows i + 1 and i for its 16 rows i: row 16 = Ho must be a zero row -> TOP 1
    ((32, 32), (16, 16), (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),
    # a 1x1 projection: phase 0 reads Hn row i itself, the others nothing -> no margins
    ((56, 56), (28, 28), (1, 1), (2, 2), (0, 0), (1, 1), (0, 0)),
    # 5x5 stride 2 valid, 9 -> 3: phase 0's taps 0, 2, 4 read Hn rows i, i - 1, i - 2 of its
    # 5 rows -> 2 zero rows above and 2 below (the next image's top margin)
    ((9, 9), (3, 3), (5, 5), (2, 2), (0, 0), (1, 1), (2, 2)),
])
def test_grid_margins(in_hw, out_hw, kernel, stride, padding, dilation, margins):
    """Hn's grid margins for the dgrad by phase and the wgrad's phase planes, worked by hand."""
    assert conv_bwd_grid.grid_margins(in_hw, out_hw, kernel, stride, padding,
                                      dilation) == margins


@pytest.mark.parametrize("dtype,rtol,atol_frac", GRID_DTYPE_TOLS)
def test_grid_dgrad_hard_inputs(dtype, rtol, atol_frac, monkeypatch):
    """Zero patches and a zero sample, then NaN in x: the grid path keeps the reference's
    values and its NaN pattern."""
    inp, c, r_x, dy = _zero_patch_case(dtype, c_in=16, c_out=16, channels_last=True)
    _check_all(_grid_kernel(dy, inp, c, r_x, monkeypatch), dy, inp, c, r_x, dtype, rtol,
               atol_frac)
    x = inp.x.clone()
    x[0, 3, 4, 5] = float("nan")
    inp.x = x
    c, r_x = _saved_state(inp)
    out = _grid_kernel(dy, inp, c, r_x, monkeypatch)
    ref64 = _check_all(out, dy, inp, c, r_x, dtype, rtol, atol_frac)
    assert torch.isnan(ref64[0]).any() and torch.isnan(out[0]).any(), "NaN was lost in dx"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grid_dgrad_fp16_large_inputs(layout, monkeypatch):
    """|x| ~ 300 in fp16 (x^2 overflows fp16) on the grid path: finite, full fp16 accuracy."""
    inp, c, r_x, dy = _case(torch.float16, operator="linear", scale=300.0, c_in=16, c_out=16,
                            channels_last=(layout == "channels_last"))
    out = _grid_kernel(dy, inp, c, r_x, monkeypatch)
    for o in out[:3]:
        assert torch.isfinite(o).all()
    _check_all(out, dy, inp, c, r_x, torch.float16, 2e-3, 2.0 ** -9)


@pytest.mark.parametrize("dtype,rtol,atol_frac", GRID_DTYPE_TOLS)
def test_grid_dgrad_near_parallel_patches(dtype, rtol, atol_frac, monkeypatch):
    """As test_near_parallel_patches, on the grid path: finite, within the rounding bound."""
    inp = make_near_parallel_conv_inputs(noise=1e-5, dtype=dtype, device=DEVICE,
                                         operator="linear", padding=0, channels_last=True,
                                         c_in=16, c_out=16)
    c, r_x = _saved_state(inp)
    assert c.float().max().item() > 0.999, "the builder should produce near-parallel patches"
    dy = torch.randn(c.shape, device=DEVICE).to(dtype)
    out = _grid_kernel(dy, inp, c, r_x, monkeypatch)
    assert torch.isfinite(out[0]).all()
    ref64 = _reference(dy, inp, c, r_x, ALL, torch.float64)
    _check_within_rounding_bound(out, ref64, _reference(dy, inp, c, r_x),
                                 _rounding_bound(dy, inp, c, r_x), atol_frac)


@pytest.mark.parametrize("mask", [(False, True, True, False), (True, False, False, False)],
                         ids=["dw-db", "dx"])
def test_grid_backward_one_gradient(mask, monkeypatch):
    """Hn goes onto the grid for whichever grid kernel runs: the wgrad alone (no dx asked: a
    first layer) and the dgrad alone."""
    inp, c, r_x, dy = _case(torch.bfloat16, operator="sigmoid", c_in=16, c_out=32, padding=0,
                            channels_last=True)
    out = _grid_kernel(dy, inp, c, r_x, monkeypatch, mask=mask)
    _check_all(out, dy, inp, c, r_x, torch.bfloat16, 1.5e-2, 2.0 ** -7, mask)


def test_grid_backward_launches_and_folded_reduction(monkeypatch):
    """The grid backward issues three launches, one fewer than the implicit-GEMM one: the prep
    launch (Hn onto its grid with zero margins, x onto the wgrad's grid behind its zero lead
    rows, the wgrad's tile counters zeroed, in the same grid), the dgrad, the wgrad with the
    final level of the prep partials' sums in extra programs (two slices here: 16 channel
    blocks, 9 programs a slice) and dw finished by the last split of each tile (no finalize
    launch; three splits under the interpreter). db and dk are bitwise the implicit-GEMM
    backward's (the same fixed-order sums)."""
    from sphereops_kernels import conv_fwd_grid
    monkeypatch.setitem(conv_bwd.REDUCE_CONFIG, "BLOCK_C", 4)   # 64 channels: 16 blocks
    launched = []
    for module, name in ((conv_bwd, "_launch"), (conv_bwd_grid, "launch"),
                         (conv_fwd_grid, "launch")):
        def record(kernel, grid, args, *rest, real=getattr(module, name), **kwargs):
            launched.append((getattr(kernel, "fn", kernel).__name__, grid, args))
            return real(kernel, grid, args, *rest, **kwargs)
        monkeypatch.setattr(module, name, record)
    inp, c, r_x, dy = _case(torch.bfloat16, operator="sigmoid", c_in=64, c_out=64, groups=4,
                            h=5, w=6)
    out = _grid_kernel(dy, inp, c, r_x, monkeypatch)
    assert [name for name, _, _ in launched] == [
        "_prep_kernel", "_dgrad_grid_kernel", "_wgrad_grid_kernel"]
    _, grid, args = launched[2]
    args = dict(zip(conv_bwd_grid._wgrad_grid_kernel.arg_names, args))
    assert args["RED_PROGRAMS"] == 16 and grid[0] * grid[1] == 9
    assert args["n_split"] > 1, "test setup: the finishing program should sum several splits"
    assert grid[2] == args["n_split"] * 4 + 2
    _check_all(out, dy, inp, c, r_x, torch.bfloat16, 1.5e-2, 2.0 ** -7)
    implicit = _kernel(dy, inp, c, r_x)
    assert torch.equal(out[2], implicit[2]) and torch.equal(out[3], implicit[3])


def test_grid_dgrad_every_gpu_config(monkeypatch):
    """Each config the GPU autotunes over, forced, under the interpreter (the tiles, their
    descriptor boxes and the quarter-column NCHW epilogue at the GPU's block sizes)."""
    from sphereops_kernels.configs import conv_fwd_grid_configs
    inp, c, r_x, dy = _case(torch.bfloat16, operator="cosine", n=1, c_in=64, c_out=64, h=6,
                            w=5, channels_last=False)
    real = conv_bwd_grid.grid_dgrad
    for cfg in conv_fwd_grid_configs(interpreter=False):
        monkeypatch.setattr(conv_bwd_grid, "grid_dgrad",
                            lambda *a, cfg=cfg, **kw: real(*a, config=cfg, **kw))
        out = sphere_conv2d_bwd(dy, inp.x, inp.w, inp.k, c, r_x, *_geometry(inp),
                                (True, False, False, False), dgrad_grid=True)
        mask = (True, False, False, False)
        ref64 = _reference(dy, inp, c, r_x, mask, torch.float64)
        _check_grad(out[0], ref64[0], _reference(dy, inp, c, r_x, mask)[0], torch.bfloat16,
                    1.5e-2, 2.0 ** -7, f"dx {cfg}")


@pytest.mark.parametrize("change,applies", [
    (dict(), True),
    (dict(padding=0), True),                  # margins (2, 2)
    (dict(kernel=1, padding=0), True),        # no margins
    (dict(stride=2), True),                   # by input phase
    (dict(kernel=1, padding=1), False),       # padding past the filter's reach: Hn cropped
    (dict(kernel=1, padding=1, stride=2), True),   # at stride > 1 any padding
    (dict(dtype=torch.float32), False),       # tf32's wgmma wants a K-major w_hat box
    (dict(c_in=8), False),                    # C_in/G < 16
    (dict(c_out=24), True),                   # C_out/G 24: padded to 32 a group
    (dict(c_out=24, groups=2, c_in=32), False),   # C_out/G 12: below one K box
    (dict(groups=2), False),                  # 16 / 2 = 8 channels a group
])
def test_grid_dgrad_rule(change, applies):
    geom = dict(c_in=16, c_out=32, kernel=3, stride=1, padding=1, dilation=1, groups=1,
                dtype=torch.bfloat16)
    geom.update(change)
    k = geom["kernel"]
    x = torch.empty(2, geom["c_in"], 9, 9, dtype=geom["dtype"])
    w = torch.empty(geom["c_out"], geom["c_in"] // geom["groups"], k, k, dtype=geom["dtype"])
    pair = (lambda v: (v, v))
    cgi_p = conv_fwd.aligned_count(geom["c_in"] // geom["groups"])
    cgo_p = conv_fwd.aligned_count(geom["c_out"] // geom["groups"])
    out = R.output_size(9, k, geom["stride"], geom["padding"], geom["dilation"])
    assert conv_bwd_grid.grid_backward_applies(x, w, (out, out), pair(geom["stride"]),
                                               pair(geom["padding"]), pair(geom["dilation"]),
                                               cgi_p, cgo_p) == applies


@pytest.mark.parametrize("switch,kernel", [("ENABLED", "grid_dgrad"),
                                           ("WGRAD_ENABLED", "grid_wgrad")])
def test_grid_backward_is_opt_in(switch, kernel, monkeypatch):
    """Off by default (SPHEREOPS_DGRAD_GRID / SPHEREOPS_WGRAD_GRID unset); with the switch on
    the default launch takes that grid kernel."""
    inp, c, r_x, dy = _case(torch.bfloat16, operator="cosine", c_in=16, c_out=16,
                            channels_last=True)
    calls = []
    real = getattr(conv_bwd_grid, kernel)
    monkeypatch.setattr(conv_bwd_grid, kernel,
                        lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    assert not getattr(conv_bwd_grid, switch)
    _kernel(dy, inp, c, r_x)
    assert calls == []
    monkeypatch.setattr(conv_bwd_grid, switch, True)
    _kernel(dy, inp, c, r_x)
    assert calls == [1]


def test_grid_dgrad_aot_specs_are_well_formed():
    specs = conv_bwd_grid.aot_specs()
    assert specs
    for s in specs:
        names = set(s["fn"].arg_names)
        assert set(s["signature"]) == names, s["name"]
        assert s["signature"]["hn_desc"].startswith("tensordesc<")
    assert {s["fn"].__name__ for s in specs} == {"_dgrad_grid_kernel", "_wgrad_grid_kernel"}
