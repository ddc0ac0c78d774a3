"""The reference implementation against plain float64 autograd and independent formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import (RANDOM_CASES, assert_close, make_conv_inputs, make_linear_inputs,
                     make_near_parallel_conv_inputs, random_conv_geometry)
from sphereops import reference as R

EPS = 1e-4
CONV_OPTIONS = [
    # kernel, stride, padding, dilation, groups, c_in, c_out
    pytest.param(3, 1, 1, 1, 1, 4, 6, id="3x3"),
    pytest.param(3, 2, 1, 1, 1, 4, 6, id="3x3-s2"),
    pytest.param((3, 2), (2, 1), (0, 1), (2, 1), 2, 4, 6, id="3x2-s21-d21-g2"),
    pytest.param(1, 1, 0, 1, 1, 5, 7, id="1x1"),
    pytest.param(3, 1, 2, 2, 4, 4, 4, id="depthwise-d2"),
    pytest.param(5, 3, 2, 1, 2, 4, 8, id="5x5-s3-g2"),
]


def _inputs64(operator, kernel, stride, padding, dilation, groups, c_in, c_out, **kw):
    return make_conv_inputs(n=2, c_in=c_in, h=8, w=7, c_out=c_out, kernel=kernel, stride=stride,
                            padding=padding, dilation=dilation, groups=groups, operator=operator,
                            dtype=torch.float64, **kw)


def _independent_forward(inp, eps=EPS):
    """Forward from the DESIGN formulas with unfold (no shared code with reference.conv2d_forward)."""
    x, w = inp.x, inp.w
    kh, kw = w.shape[2:]
    n, cin = x.shape[:2]
    cols = F.unfold(x, (kh, kw), dilation=inp.dilation, padding=inp.padding, stride=inp.stride)
    L = cols.shape[-1]
    g = inp.groups
    cols = cols.reshape(n, g, cin // g * kh * kw, L)
    wg = w.reshape(g, w.shape[0] // g, -1)
    s = torch.einsum("gok,ngkl->ngol", wg, cols)
    rx = torch.sqrt((cols ** 2).sum(2) + eps)[:, :, None]
    rw = torch.sqrt((wg ** 2).sum(-1) + eps)[None, :, :, None]
    c = (s / (rx * rw)).clamp(-1, 1).reshape(n, w.shape[0], L)
    theta = torch.acos(c)
    if inp.operator == "linear":
        y = 1 - 2 * theta / math.pi
    elif inp.operator == "cosine":
        y = torch.cos(theta)
    else:
        kk = inp.k[None, :, None]
        # the paper's form, not the tanh form the code uses
        e = torch.exp(-math.pi / (2 * kk))
        y = (1 + e) / (1 - e) * (1 - torch.exp(theta / kk - math.pi / (2 * kk))) / (1 + torch.exp(theta / kk - math.pi / (2 * kk)))
    if inp.bias is not None:
        y = y + inp.bias[None, :, None]
    ho = (x.shape[2] + 2 * inp.padding[0] - inp.dilation[0] * (kh - 1) - 1) // inp.stride[0] + 1
    return y.reshape(n, w.shape[0], ho, -1)


@pytest.mark.parametrize("operator", R.OPERATORS)
@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,c_in,c_out", CONV_OPTIONS)
def test_conv_forward_matches_independent_formula(operator, kernel, stride, padding, dilation, groups, c_in, c_out):
    inp = _inputs64(operator, kernel, stride, padding, dilation, groups, c_in, c_out)
    y, c, r_x = R.conv2d_forward(*inp.args(), EPS)
    assert_close(y, _independent_forward(inp), 1e-12, 1e-12, "y")
    assert c.shape == y.shape and r_x.shape == (y.shape[0], groups, y.shape[2], y.shape[3])
    assert bool((c.abs() <= 1).all())


@pytest.mark.parametrize("operator", R.OPERATORS)
@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,c_in,c_out", CONV_OPTIONS)
def test_conv_closed_form_backward_matches_autograd(operator, kernel, stride, padding, dilation, groups, c_in, c_out):
    inp = _inputs64(operator, kernel, stride, padding, dilation, groups, c_in, c_out)
    expected, got = _closed_form_and_autograd_grads(inp)
    for name, e, g in zip(("dx", "dw", "db", "dk"), expected, got):
        assert_close(g, e, 1e-10, 1e-11, name)


def _closed_form_and_autograd_grads(inp, mask=(True, True, True, True), c_scratch=False):
    """(autograd's gradients, the closed form's) of one fresh float64 case; checks y on the way.
    With ``c_scratch`` the backward may write over the saved c: checks that it did so (the memory
    the flag is there to save) exactly when dx or dw was asked for."""
    leaves = [inp.x, inp.w, inp.bias] + ([inp.k] if inp.k is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    y = R.conv2d_autograd(*inp.args(), EPS)
    dy = torch.randn_like(y)
    expected = torch.autograd.grad(y, leaves, dy)
    y2, c, r_x = R.conv2d_forward(*inp.args(), EPS)
    assert_close(y2, y, 1e-12, 1e-12, "y")
    c_before = c.clone()
    got = R.conv2d_backward(dy, inp.x, inp.w, inp.k, c, r_x, inp.stride, inp.padding,
                            inp.dilation, inp.groups, inp.operator, EPS, mask, c_scratch=c_scratch)
    overwritten = not torch.equal(c, c_before)
    assert overwritten == (c_scratch and (mask[0] or mask[1])), "c overwritten" if overwritten else "c kept"
    return expected, got


@pytest.mark.parametrize("operator", R.OPERATORS)
@pytest.mark.parametrize("groups,channels_last", [(1, False), (1, True), (2, False), (2, True)])
@pytest.mark.parametrize("mask", [(True, True, True, True), (False, True, False, True), (True, False, False, False)],
                         ids=["all", "dw-dk", "dx"])
@pytest.mark.parametrize("c_scratch", [False, True], ids=["keep-c", "c-scratch"])
def test_conv_closed_form_batch_slices(monkeypatch, operator, groups, channels_last, mask, c_scratch):
    """The CPU path's batch-sliced chains (one sample per slice here) in both memory formats and
    with partial output masks give autograd's gradients, also when they write G/r_x over the
    saved c; what was not asked for stays None."""
    monkeypatch.setattr(R, "_SLICE_ELEMS", 1)
    inp = make_conv_inputs(n=3, c_in=4, h=6, w=5, c_out=6, kernel=3, stride=1, padding=1, groups=groups,
                           operator=operator, dtype=torch.float64, channels_last=channels_last)
    expected, got = _closed_form_and_autograd_grads(inp, mask, c_scratch)
    for name, want, e, g in zip(("dx", "dw", "db", "dk"), mask, expected, got):
        if want and (name != "dk" or operator == "sigmoid"):
            assert_close(g, e, 1e-10, 1e-11, name)
        else:
            assert g is None, name
    if mask[0] and channels_last:
        assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_batch_slices_on_cpu_only(monkeypatch):
    """CPU chains run in batch slices (page faults); other devices get one slice of the whole
    batch (every op is a kernel launch there: slicing multiplied them)."""
    monkeypatch.setattr(R, "_SLICE_ELEMS", 20)
    assert R._batch_slices(5, 10, torch.device("cpu")) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert R._batch_slices(5, 10, torch.device("meta")) == [slice(0, 5)]
    assert R._batch_slices(0, 10, torch.device("meta")) == []


@pytest.mark.parametrize("operator", R.OPERATORS)
def test_conv_autograd_gradcheck(operator):
    inp = make_conv_inputs(n=1, c_in=2, h=5, w=4, c_out=3, kernel=(2, 3), stride=(1, 2), padding=1,
                           dilation=1, groups=1, operator=operator, dtype=torch.float64)
    leaves = [inp.x, inp.w, inp.bias] + ([inp.k] if inp.k is not None else [])
    for t in leaves:
        t.requires_grad_(True)

    def fn(*ts):
        x, w, b = ts[:3]
        k = ts[3] if len(ts) > 3 else None
        return R.conv2d_autograd(x, w, b, k, inp.stride, inp.padding, inp.dilation, 1, operator, EPS)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("operator", R.OPERATORS)
@pytest.mark.parametrize("mask", [(True, True, True, True), (True, False, False, False),
                                  (False, True, False, True), (False, False, True, False)],
                         ids=["all", "dx", "dw-dk", "db"])
@pytest.mark.parametrize("c_scratch", [False, True], ids=["keep-c", "c-scratch"])
def test_linear_closed_form_matches_autograd(monkeypatch, operator, mask, c_scratch):
    """Closed-form SphereLinear backward (rows in batch slices of 2 here) against float64
    autograd for any output mask; with c_scratch it writes G / r_x over c exactly when dx or dw
    is asked for."""
    monkeypatch.setattr(R, "_SLICE_ELEMS", 8)
    x, w, b, k = make_linear_inputs(m=7, in_features=5, out_features=4, operator=operator, dtype=torch.float64)
    leaves = [x, w, b] + ([k] if k is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    y = R.linear_autograd(x, w, b, k, operator, EPS)
    dy = torch.randn_like(y)
    expected = torch.autograd.grad(y, leaves, dy)
    with torch.no_grad():
        y2, c, r_x = R.linear_forward(x, w, b, k, operator, EPS)
        c_before = c.clone()
        got = R.linear_backward(dy, x, w, k, c, r_x, operator, EPS, mask, c_scratch=c_scratch)
    assert_close(y2, y, 1e-12, 1e-12, "y")
    for name, want, e, g in zip(("dx", "dw", "db", "dk"), mask, expected, got):
        if want and (name != "dk" or operator == "sigmoid"):
            assert_close(g, e, 1e-10, 1e-11, name)
        else:
            assert g is None, name
    assert (not torch.equal(c, c_before)) == (c_scratch and (mask[0] or mask[1]))


def test_linear_equals_1x1_conv():
    """A linear layer is a 1x1 convolution on a 1x1 image: the two paths must agree."""
    x, w, b, _ = make_linear_inputs(m=6, in_features=9, out_features=5, dtype=torch.float64)
    yl, _, _ = R.linear_forward(x, w, b, None, "linear", EPS)
    yc, _, _ = R.conv2d_forward(x[:, :, None, None], w[:, :, None, None], b, None, (1, 1), (0, 0), (1, 1), 1, "linear", EPS)
    assert_close(yl, yc[:, :, 0, 0], 1e-13, 1e-13)


def test_angular_functions_endpoints_and_derivatives():
    """g maps [0, pi] onto [1, -1] with g(pi/2) = 0; derivatives agree with finite differences."""
    c = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    k = torch.tensor([0.3, 0.3, 0.3], dtype=torch.float64)
    for op in R.OPERATORS:
        g = R.g_of_c(c, op, k if op == "sigmoid" else None)
        assert_close(g, torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), 1e-12, 1e-12, op)
    cs = torch.linspace(-0.95, 0.95, 41, dtype=torch.float64)
    kk = torch.rand(41, dtype=torch.float64) + 0.2
    h = 1e-6
    for op in R.OPERATORS:
        kv = kk if op == "sigmoid" else None
        fd = (R.g_of_c(cs + h, op, kv) - R.g_of_c(cs - h, op, kv)) / (2 * h)
        assert_close(R.dg_dc(cs, op, kv), fd, 1e-6, 1e-7, f"dg/dc {op}")
    fd_k = (R.g_of_c(cs, "sigmoid", kk + h) - R.g_of_c(cs, "sigmoid", kk - h)) / (2 * h)
    assert_close(R.dg_dk(cs, kk), fd_k, 1e-6, 1e-7, "dg/dk")


def test_bounded_arccos_derivative():
    c = torch.tensor([1.0, -1.0, 1 - 1e-12, 0.5], dtype=torch.float64)
    d = R.dtheta_dc(c)
    bound = 1 / math.sqrt(R.ARCCOS_DELTA)
    assert bool(torch.isfinite(d).all())
    assert d[0].item() == pytest.approx(-bound) and d[1].item() == pytest.approx(-bound)
    assert d[3].item() == pytest.approx(-1 / math.sqrt(0.75))


@pytest.mark.parametrize("operator", R.OPERATORS)
def test_near_parallel_patches_give_finite_gradients(operator):
    # scale 30: ||patch||^2 >> eps, so 1 - c^2 falls below ARCCOS_DELTA and the bound is exercised
    inp = make_near_parallel_conv_inputs(noise=0.0, n=1, c_in=3, h=6, w=6, c_out=4, kernel=3,
                                         padding=0, operator=operator, dtype=torch.float64, scale=30.0)
    y, c, r_x = R.conv2d_forward(*inp.args(), EPS)
    assert 1 - c.max().item() ** 2 < R.ARCCOS_DELTA, "the builder should make some patches parallel to a filter"
    dy = torch.randn_like(y)
    grads = R.conv2d_backward(dy, inp.x, inp.w, inp.k, c, r_x, inp.stride, inp.padding, inp.dilation,
                              1, operator, EPS)
    for g in grads:
        if g is not None:
            assert bool(torch.isfinite(g).all())
    # the autograd oracle uses the same bounded rule, so the two still agree there
    leaves = [inp.x, inp.w]
    for t in leaves:
        t.requires_grad_(True)
    ya = R.conv2d_autograd(*inp.args(), EPS)
    ex = torch.autograd.grad(ya, leaves, dy)
    assert_close(grads[0], ex[0], 1e-9, 1e-9, "dx")
    assert_close(grads[1], ex[1], 1e-9, 1e-9, "dw")


def test_zero_input_gives_half_pi():
    """An all-zero patch has c = 0, theta = pi/2, g = 0: the output is the bias."""
    for op in R.OPERATORS:
        inp = make_conv_inputs(n=1, c_in=3, h=5, w=5, c_out=4, operator=op, dtype=torch.float64)
        y, c, _ = R.conv2d_forward(torch.zeros_like(inp.x), inp.w, inp.bias, inp.k, inp.stride,
                                   inp.padding, inp.dilation, 1, op, EPS)
        assert_close(y, inp.bias.reshape(1, -1, 1, 1).expand_as(y), 1e-12, 1e-12, op)
        assert float(c.abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_paths_compute_in_fp32(dtype):
    """fp16 inputs with |x| ~ 300 (x^2 overflows fp16) still give the float64 answer."""
    inp = make_conv_inputs(n=1, c_in=4, h=6, w=6, c_out=4, operator="linear", dtype=dtype, scale=300.0)
    y, c, r_x = R.conv2d_forward(*inp.args(), EPS)
    y64, _, _ = R.conv2d_forward(*inp.to(torch.float64).args(), EPS)
    assert y.dtype == dtype and c.dtype == dtype and r_x.dtype == torch.float32
    assert bool(torch.isfinite(y).all())
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert_close(y, y64, tol, tol)


def test_nan_propagates_only_to_affected_outputs():
    inp = make_conv_inputs(n=1, c_in=2, h=8, w=8, c_out=3, kernel=3, padding=0, operator="sigmoid", dtype=torch.float64)
    inp.x[0, 1, 0, 0] = float("nan")
    y, _, _ = R.conv2d_forward(*inp.args(), EPS)
    assert bool(torch.isnan(y[0, :, 0, 0]).all())
    assert not bool(torch.isnan(y[0, :, 1:, :]).any()) and not bool(torch.isnan(y[0, :, :, 1:]).any())


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 2), (2, 1), (0, 1), (2, 1)),
    ((5, 5), (3, 3), (2, 2), (1, 1)),
    ((1, 1), (2, 2), (0, 0), (1, 1)),
    ((2, 4), (1, 3), (3, 0), (3, 2)),
])
def test_box_sum_is_a_ones_convolution_and_its_transpose_the_adjoint(kernel, stride, padding, dilation):
    """The shifted-add box filters against the grouped ones convolution (float64) and the
    adjoint identity <box(q), a> = <q, box^T(a)>, with input sizes that leave stride remainders."""
    (kh, kw), g = kernel, 3
    q = torch.randn(2, g, 11, 9, dtype=torch.float64)
    ones = torch.ones(g, 1, kh, kw, dtype=torch.float64)
    expected = F.conv2d(q, ones, None, stride, padding, dilation, g)
    got = R.box_sum(q, kh, kw, stride, padding, dilation)
    assert_close(got, expected, 1e-12, 1e-12, "box_sum")
    a = torch.randn_like(got)
    back = R.box_filter_transposed(a, (11, 9), kh, kw, stride, padding, dilation)
    assert back.shape == q.shape
    assert float((got * a).sum()) == pytest.approx(float((q * back).sum()), rel=1e-12, abs=1e-12)
    unit = torch.zeros_like(a)
    unit[1, 2, -1, -1] = 1.0            # the last window: covers exactly its taps inside the input
    taps = R.box_filter_transposed(unit, (11, 9), kh, kw, stride, padding, dilation)
    assert_close(taps, torch.autograd.grad(F.conv2d(q.requires_grad_(), ones, None, stride, padding,
                                                   dilation, g)[1, 2, -1, -1], q)[0], 0, 0, "taps")


@pytest.mark.parametrize("seed", range(RANDOM_CASES))
def test_random_geometries_closed_form_matches_autograd(seed):
    """The seeded random convolutions of the kernel sweep (any kernel, stride, padding,
    dilation, groups, layout; printed on failure): the closed-form forward and backward (box
    sums, batch slices) against float64 autograd through the unfold-based oracle."""
    torch.manual_seed(2000 + seed)
    geom = random_conv_geometry(seed)
    inp = make_conv_inputs(dtype=torch.float64, **geom)
    try:
        expected, got = _closed_form_and_autograd_grads(inp)
        for name, e, g in zip(("dx", "dw", "db", "dk"), expected, got):
            assert_close(g, e, 1e-10, 1e-11, name)
    except AssertionError as err:
        raise AssertionError(f"geometry {geom}: {err}") from err


@pytest.mark.parametrize("operator", ["linear", "cosine"])
@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,c_in,c_out", CONV_OPTIONS)
def test_conv_backward_from_the_saved_output_matches_autograd(operator, kernel, stride, padding,
                                                              dilation, groups, c_in, c_out):
    """saved="output": the backward recovers c from y and the bias (the forward then stores no
    c) and still gives autograd's gradients; y itself is left as it was."""
    inp = _inputs64(operator, kernel, stride, padding, dilation, groups, c_in, c_out)
    leaves = [inp.x, inp.w, inp.bias]
    for t in leaves:
        t.requires_grad_(True)
    dy_shape = R.conv2d_autograd(*inp.args(), EPS)
    dy = torch.randn_like(dy_shape)
    expected = torch.autograd.grad(dy_shape, leaves, dy)
    y, c, r_x = R.conv2d_forward(*inp.args(), EPS, store_c=False)
    assert c.numel() == 0
    y_before = y.clone()
    got = R.conv2d_backward(dy, inp.x, inp.w, None, y, r_x, inp.stride, inp.padding, inp.dilation,
                            inp.groups, operator, EPS, c_scratch=True, saved="output", bias=inp.bias)
    assert torch.equal(y, y_before), "the saved output must not be written"
    for name, e, g in zip(("dx", "dw", "db"), expected, got):
        assert_close(g, e, 1e-10, 1e-11, name)


def test_cosine_from_output_inverts_g_and_refuses_sigmoid():
    c = torch.linspace(-1, 1, 101, dtype=torch.float64).reshape(1, 1, 101, 1).expand(1, 3, 101, 1)
    b = torch.tensor([0.0, 0.5, -2.0], dtype=torch.float64)
    for op in ("linear", "cosine"):
        y = R.g_of_c(c, op) + b.reshape(1, 3, 1, 1)
        assert_close(R.cosine_from_output(y, b, op), c, 1e-12, 1e-12, op)
    with pytest.raises(ValueError, match="linear and cosine"):
        R.cosine_from_output(c, None, "sigmoid")
