"""The fused SphereConv2d forward kernel and the shared angular device functions.

Everything is compared with the float64 reference (``sphereops.reference``) on fresh random
inputs.  Without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest.py), so shapes
are tiny; with CUDA (``make gpu-check``) the same tests run the compiled kernels.
"""
import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need triton")
tl = pytest.importorskip("triton.language")

from sphereops import reference as R  # noqa: E402
from sphereops_kernels import angular, configs  # noqa: E402
from sphereops_kernels import conv_fwd as F  # noqa: E402

from helpers import (  # noqa: E402
    DEPTHWISE_ROW_CASE,
    DEPTHWISE_ROW_GEOMETRIES,
    TAP_BIT_GEOMETRIES,
    assert_close,
    assert_close_to_reference,
    make_conv_inputs,
    make_near_parallel_conv_inputs,
    record_launches,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = R.DEFAULT_EPS

# (dtype, rtol, atol).  fp32: the kernel accumulates the same products in fp32 as the float64
# reference does exactly, so the error is a few ulps of c amplified by at most |g'| ~ 3.
# fp16/bf16: the adaptive bound (2x the error of the same-dtype reference, which is the output
# rounding) plus atol, one output ulp just below |y| = 1 (bf16 outputs are rounded to nearest
# like the GPU's cast also under the interpreter, whose own cast truncates: EMULATE_RTNE).
DTYPE_TOLS = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 0.0, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 0.0, 4e-3, id="bf16"),
]
# The GEMM forward's conv launch: through its autotuner, or -- for a call signature launched
# before -- straight to the kernel with the config the autotuner picked (_launch_autotuned).
GEMM_FORWARD = (F._sphere_conv_fwd_autotuned, F._sphere_conv_fwd_kernel)


def _kinds(launched):
    """The forward's launches as "prepare" / "gemm" / the kernel itself."""
    return ["prepare" if k is F._prepare_operands_kernel else "gemm" if k in GEMM_FORWARD else k
            for k, _, _ in launched]


# r_x is accumulated in fp32 from exactly representable inputs whatever the input dtype.
RX_RTOL, RX_ATOL = 1e-5, 1e-6


# fp32 is tested exact (tf32 has its own tests): TF32 off for every test here (conftest)
pytestmark = pytest.mark.usefixtures("exact_fp32")


def _run_kernel(inp, **impl_kwargs):
    return F._sphere_conv2d_fwd_impl(*inp.args(), EPS, **impl_kwargs)


def _references(inp):
    """(float64 reference on float64 copies, same-dtype reference on the inputs as given)."""
    ref64 = R.conv2d_forward(*inp.to(torch.float64).args(), EPS)
    ref_same = R.conv2d_forward(*inp.args(), EPS)
    return ref64, ref_same


def _check_against_reference(inp, out, dtype, rtol, atol, saves_state=None):
    """y, c and r_x against the references; ``saves_state`` (None: all but pure depthwise
    convs, which must return c and r_x empty -- False) says whether c and r_x are expected."""
    y, c, r_x = out
    (y64, c64, rx64), (y_same, c_same, _) = _references(inp)
    if saves_state is None:
        saves_state = not inp.pure_depthwise
    if not saves_state:
        assert c.numel() == 0 and r_x.numel() == 0, "the depthwise forward saves no state"
        c, c64, c_same = y, y64, y_same   # check y twice rather than branch below
    fmt = torch.channels_last if F._output_memory_format(inp.x) is torch.channels_last \
        else torch.contiguous_format
    for name, t in (("y", y), ("c", c)):
        assert t.shape == y64.shape, f"{name} shape {tuple(t.shape)} != {tuple(y64.shape)}"
        assert t.dtype == dtype, f"{name} dtype {t.dtype} != {dtype}"
        assert t.is_contiguous(memory_format=fmt), f"{name} does not follow x's memory format"
    assert r_x.dtype == torch.float32 and r_x.is_contiguous()
    assert r_x.shape == rx64.shape or not saves_state
    if dtype == torch.float32:
        assert_close(y, y64, rtol, atol, "y")
        assert_close(c, c64, rtol, atol, "c")
    else:
        assert_close_to_reference(y, y64, y_same, atol, "y")
        assert_close_to_reference(c, c64, c_same, atol, "c")
    if saves_state:
        _check_rx(r_x, rx64)


def _check_rx(r_x, rx64):
    """r_x against the reference; an Inf input gives r_x = Inf (c is then NaN), compared as a
    pattern because Inf - Inf is no error measure."""
    r_x = r_x.cpu()
    assert torch.equal(torch.isinf(r_x), torch.isinf(rx64)), "r_x Inf pattern differs"
    finite = ~torch.isinf(rx64)
    assert_close(r_x[finite], rx64[finite], RX_RTOL, RX_ATOL, "r_x")


# ---------------------------------------------------------------------------------------------
# Angular device functions
# ---------------------------------------------------------------------------------------------

@triton.jit
def _angular_probe_kernel(c_ptr, k_ptr, out_ptr, n, OPERATOR: tl.constexpr, WHAT: tl.constexpr,
                          DELTA: tl.constexpr, BLOCK: tl.constexpr):
    """Evaluates one angular function elementwise.  c_ptr, k_ptr, out_ptr: [n] fp32 contiguous.
    WHAT: 1 g_of_c, 2 dg_dc, 3 dg_dk, 4 g_of_c with the approximate square root of 16-bit
    outputs.  OPERATOR: angular.OPERATOR_CODES value.
    DELTA: the arccos-derivative bound.  BLOCK: elements per program."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = tl.load(c_ptr + offs, mask=mask, other=0.0)
    k = tl.load(k_ptr + offs, mask=mask, other=1.0)
    if WHAT == 1:
        r = angular.g_of_c(c, k, OPERATOR)
    elif WHAT == 2:
        r = angular.dg_dc(c, k, OPERATOR, DELTA)
    elif WHAT == 4:
        r = angular.g_of_c(c, k, OPERATOR, True)
    else:
        r = angular.dg_dk(c, k)
    tl.store(out_ptr + offs, r, mask=mask)


_WHAT = {"g": 1, "dg_dc": 2, "dg_dk": 3, "g_approx_sqrt": 4}


def _probe(what, c, k, operator="linear"):
    c = c.to(device=DEVICE, dtype=torch.float32).contiguous()
    k = k.to(device=DEVICE, dtype=torch.float32).contiguous()
    out = torch.empty_like(c)
    block = 4096
    _angular_probe_kernel[(triton.cdiv(c.numel(), block),)](
        c, k, out, c.numel(), angular.OPERATOR_CODES[operator], _WHAT[what], R.ARCCOS_DELTA,
        BLOCK=block)
    return out.cpu()


def _cosine_samples(n_random=20000):
    """Fresh random cosines over [-1, 1], dense near +-1 (where arccos is steep), plus the ends."""
    u = torch.rand(n_random, dtype=torch.float64) * 2 - 1
    near_one = 1 - torch.rand(n_random // 4, dtype=torch.float64) ** 4 * 1e-3
    grid = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    ends = torch.tensor([-1.0, 1.0, 0.0, -0.5, 0.5], dtype=torch.float64)
    c = torch.cat([u, near_one, -near_one, grid, ends]).float()
    return c  # fp32 inputs; references evaluate these exact values in float64


def test_operator_codes():
    assert angular.OPERATOR_CODES == {"linear": 0, "cosine": 1, "sigmoid": 2}
    assert set(angular.OPERATOR_CODES) == set(R.OPERATORS)


def test_linear_g_max_error():
    """The linear operator's g = 1 - 2 arccos(c) / pi (angular.linear_g, through which the
    sigmoid's angle goes too) within 1.5e-7 of float64 -- about one ulp of 1 -- on fresh
    cosines dense near +-1 and 0; odd in c; NaN stays NaN. (The interpreter's square roots
    are exact, so the approximate-sqrt build is held to the same bound here; test_gpu checks
    its own.)"""
    c = _cosine_samples()
    ref = R.g_of_c(c.double(), "linear")
    for what in ("g", "g_approx_sqrt"):
        out = _probe(what, c, torch.ones_like(c)).double()
        err = (out - ref).abs()
        worst = int(err.argmax())
        assert err[worst].item() <= 1.5e-7, \
            f"{what}: max |g - ref| = {err[worst].item():.3g} at c = {c[worst].item()!r}"
        assert torch.equal(_probe(what, -c, torch.ones_like(c)).double(), -out)
        special = _probe(what, torch.tensor([float("nan"), 1.0, -1.0, 0.0]), torch.ones(4))
        assert torch.isnan(special[0]) and special[1:].tolist() == pytest.approx(
            [1.0, -1.0, 0.0], abs=1.5e-7)


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("what", ["g", "dg_dc", "dg_dk"])
def test_angular_functions_match_reference(operator, what):
    if what == "dg_dk" and operator != "sigmoid":
        pytest.skip("dg/dk exists for the sigmoid operator only")
    c = _cosine_samples()
    # per-element k: the helper's learnable range [0.2, 0.8] plus steep and flat extremes
    k = torch.cat([0.2 + 0.6 * torch.rand(c.numel() - 2000, dtype=torch.float64),
                   torch.full((1000,), 0.05, dtype=torch.float64),
                   torch.full((1000,), 5.0, dtype=torch.float64)])
    k = k[torch.randperm(c.numel())].float()
    out = _probe(what, c, k, operator).double()
    cd, kd = c.double(), (k.double() if operator == "sigmoid" else None)
    if what == "g":
        ref = R.g_of_c(cd, operator, kd)
    elif what == "dg_dc":
        ref = R.dg_dc(cd, operator, kd)
    else:
        ref = R.dg_dk(cd, kd)
    # fp32 evaluation: relative 2e-5 of the function's scale, pointwise relative 1e-4 where
    # dg/dc is large (|c| -> 1), the shape of fp32 rounding in 1 - c^2
    scale = ref.abs().max().item()
    bound = 2e-5 * scale + 1e-4 * ref.abs()
    bad = (out - ref).abs() > bound
    i = int(((out - ref).abs() - bound).argmax())
    assert not bool(bad.any()), (
        f"{int(bad.sum())} mismatches; worst at c={c[i].item()!r}, k={k[i].item()!r}: "
        f"out={out[i].item()!r} ref={ref[i].item()!r}")


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid"])
def test_angular_functions_propagate_nan(operator):
    c = torch.tensor([float("nan"), 0.3, float("nan")])
    k = torch.full_like(c, 0.3)
    assert torch.isnan(_probe("g", c, k, operator)[[0, 2]]).all()
    assert torch.isfinite(_probe("g", c, k, operator)[1])
    if operator != "cosine":  # cosine: dg/dc is exactly 1 (straight-through), NaN-free
        assert torch.isnan(_probe("dg_dc", c, k, operator)[[0, 2]]).all()
    assert torch.isnan(_probe("dg_dk", c, k, operator)[[0, 2]]).all()


def test_angular_dg_dc_bounded_at_parallel():
    """|c| = 1 gives the DELTA-bounded derivative, never Inf."""
    c = torch.tensor([1.0, -1.0, 0.9999999])
    k = torch.full_like(c, 0.3)
    for operator in ("linear", "sigmoid"):
        out = _probe("dg_dc", c, k, operator).double()
        ref = R.dg_dc(c.double(), operator, k.double() if operator == "sigmoid" else None)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, ref, rtol=1e-4, atol=0), (operator, out, ref)


# ---------------------------------------------------------------------------------------------
# Forward kernel vs the float64 reference over the option grid
# ---------------------------------------------------------------------------------------------

# Tiny shapes; comments name the kernel path each case exercises.
CONV_CASES = {
    # flat K loop (C_in/G = 6 < 16), partial N tile, odd sizes
    "3x3": dict(n=2, c_in=6, h=7, w=6, c_out=20, kernel=3, padding=1),
    # channel-chunk K loop (C_in/G = 24: a full and a partial chunk), partial N tile
    "3x3_chunks": dict(n=1, c_in=24, h=6, w=5, c_out=24, kernel=3, padding=1),
    # stride + dilation + padding larger than the dilated half-filter
    "strided_dilated": dict(n=2, c_in=4, h=9, w=8, c_out=16, kernel=3, stride=2, padding=3,
                            dilation=2),
    # rectangular filter with per-dimension stride/padding/dilation, no padding on one side
    "rect_5x3": dict(n=1, c_in=4, h=9, w=7, c_out=16, kernel=(5, 3), stride=(2, 1),
                     padding=(2, 0), dilation=(1, 2)),
    # groups in the flat loop: C_in/G = 2, C_out/G = 3
    "grouped": dict(n=2, c_in=8, h=6, w=6, c_out=12, kernel=3, padding=1, groups=4),
    # groups in the channel-chunk loop: C_in/G = 16
    "grouped_chunks": dict(n=1, c_in=32, h=5, w=5, c_out=8, kernel=3, padding=1, groups=2),
    # depthwise: the dedicated kernel
    "depthwise": dict(n=2, c_in=12, h=6, w=7, c_out=12, kernel=3, padding=1, groups=12),
    # depthwise 5x5, strided: more taps than the kernel keeps cached (filter columns loaded
    # in every window, one pixel tile a program)
    "depthwise_5x5": dict(n=2, c_in=10, h=9, w=8, c_out=10, kernel=5, stride=2, padding=2,
                          groups=10),
    # depthwise with a channel multiplier: implicit GEMM with C_in/G = 1, C_out/G = 2
    "depthwise_mult": dict(n=1, c_in=6, h=6, w=6, c_out=12, kernel=3, stride=2, padding=1,
                           groups=6),
    # 1x1 in the channel-chunk loop, strided
    "1x1": dict(n=2, c_in=16, h=5, w=6, c_out=16, kernel=1, stride=2, padding=0),
    # no bias, no padding
    "no_bias_valid": dict(n=1, c_in=3, h=8, w=8, c_out=16, kernel=3, padding=0, bias=False),
}


@pytest.mark.parametrize("dtype, rtol, atol", DTYPE_TOLS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_forward_matches_reference(case, operator, channels_last, dtype, rtol, atol):
    inp = make_conv_inputs(**CONV_CASES[case], operator=operator, dtype=dtype, device=DEVICE,
                           channels_last=channels_last)
    _check_against_reference(inp, _run_kernel(inp), dtype, rtol, atol)


@pytest.mark.parametrize("dtype, rtol, atol", DTYPE_TOLS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [c for c in CONV_CASES if c != "depthwise"])
def test_forward_patch_norms_from_the_prepass(case, channels_last, dtype, rtol, atol):
    """patch_norms="prepass": the channel sums of squares first, their KH x KW window sums after
    the K loop (every geometry of the GEMM kernel: both K loops, strides, dilation, padding,
    rectangles, groups) against the float64 reference; r_x agrees with the fused path's."""
    inp = make_conv_inputs(**CONV_CASES[case], operator="sigmoid", dtype=dtype, device=DEVICE,
                           channels_last=channels_last)
    out = _run_kernel(inp, patch_norms="prepass")
    _check_against_reference(inp, out, dtype, rtol, atol)
    fused = _run_kernel(inp, patch_norms="fused")
    torch.testing.assert_close(out[2], fused[2], rtol=1e-6, atol=1e-6)


def _record_launches(monkeypatch):
    """Every launch of the forward launcher, recorded as (kernel, grid, args) and run."""
    return record_launches(monkeypatch, F, "launch")[0]


@pytest.mark.parametrize("dtype, rtol, atol", DTYPE_TOLS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("groups", [1, 2])
def test_gemm_forward_is_two_launches(groups, channels_last, dtype, rtol, atol, monkeypatch):
    """The implicit-GEMM forward with the pre-pass launches twice: the preparation kernel (the
    pre-pass tiles and one program per filter in one grid), then the GEMM kernel. The operands
    the GEMM kernel gets from the first launch -- q, ||w_o||^2 and the packed copy of a
    contiguous (not channels_last) weight -- against plain torch in float64; magnitudes ~300,
    whose fp16 squares overflow: the sums must be fp32."""
    launched = _record_launches(monkeypatch)
    inp = make_conv_inputs(n=2, c_in=5 * groups, h=5, w=4, c_out=3 * groups, groups=groups,
                           operator="cosine", dtype=dtype, device=DEVICE,
                           channels_last=channels_last, scale=300.0)
    inp.w = (inp.w.double() * 300).to(dtype)
    assert not inp.w.is_contiguous(memory_format=torch.channels_last)  # the repack runs
    out = _run_kernel(inp, patch_norms="prepass")
    _check_against_reference(inp, out, dtype, rtol, atol)

    assert _kinds(launched) == ["prepare", "gemm"]
    (_, prep_grid, _), (_, _, gemm_args) = launched
    n, c_in, h, w = inp.x.shape
    n_sq = n * triton.cdiv(h * w, F._PREP_CONFIG["BLOCK_P"]) * groups
    assert prep_grid == (n_sq + inp.w.shape[0],)
    gemm = dict(zip(F._sphere_conv_fwd_kernel.arg_names, gemm_args))
    q, sqnorm, packed = gemm["q_ptr"], gemm["w_sqnorm_ptr"], gemm["w_ptr"]
    assert q.dtype == sqnorm.dtype == torch.float32 and q.is_contiguous()
    q_ref = inp.x.double().pow(2).reshape(n, groups, c_in // groups, h, w).sum(dim=2)
    assert_close(q, q_ref, 1e-5, 0.0, "q")
    assert_close(sqnorm, inp.w.double().pow(2).sum(dim=(1, 2, 3)), 1e-5, 0.0, "||w||^2")
    assert packed.is_contiguous() and packed.data_ptr() != inp.w.data_ptr()
    assert torch.equal(packed, inp.w.permute(0, 2, 3, 1))


def test_gemm_forward_with_fused_norms_is_two_launches(monkeypatch):
    """patch_norms="fused": the same two launches, the first with the filter programs only."""
    launched = _record_launches(monkeypatch)
    inp = make_conv_inputs(**CONV_CASES["grouped"], operator="linear", device=DEVICE)
    _check_against_reference(inp, _run_kernel(inp, patch_norms="fused"), torch.float32, 1e-5,
                             1e-5)
    assert _kinds(launched) == ["prepare", "gemm"]
    assert launched[0][1] == (inp.w.shape[0],)


@pytest.mark.parametrize("kernel, expected", [(1, "fused"), (3, "prepass")])
def test_default_patch_norms_follow_the_filter_size(kernel, expected, monkeypatch):
    """Without patch_norms (and no SPHEREOPS_PATCH_NORMS): 1x1 filters square the loaded tiles
    in the K loop (a pre-pass would read x once more), larger filters take the pre-pass; the
    environment variable overrides the rule. Outputs against the reference either way."""
    monkeypatch.setattr(F, "_PATCH_NORMS_OVERRIDE", "")
    assert F.default_patch_norms(kernel, kernel) == expected
    launched = _record_launches(monkeypatch)
    # 16 channels, channels_last: the input is read where it lies (no staging programs)
    inp = make_conv_inputs(n=2, c_in=16, h=5, w=6, c_out=8, kernel=kernel, padding=kernel // 2,
                           operator="linear", device=DEVICE, channels_last=True)
    _check_against_reference(inp, F.sphere_conv2d_fwd(*inp.args(), EPS), torch.float32, 1e-5,
                             1e-5)
    (_, prep_grid, _), (_, _, gemm_args) = launched[-2:]
    from_q = dict(zip(F._sphere_conv_fwd_kernel.arg_names, gemm_args))["q_ptr"].dim() == 4
    assert from_q == (expected == "prepass")
    assert (prep_grid == (inp.w.shape[0],)) == (expected == "fused")
    monkeypatch.setattr(F, "_PATCH_NORMS_OVERRIDE", "prepass")
    assert F.default_patch_norms(1, 1) == "prepass"


def test_prepass_of_an_empty_image():
    """H = 0 with padding: output pixels but no input pixel -- no pre-pass program runs (only
    the filter programs), q is empty and every patch is all padding (r_x = sqrt(eps))."""
    inp = make_conv_inputs(n=2, c_in=4, h=0, w=3, c_out=4, kernel=1, padding=1,
                           operator="linear", device=DEVICE)
    y, c, r_x = _run_kernel(inp, patch_norms="prepass")
    assert y.shape == c.shape == (2, 4, 2, 5) and r_x.shape == (2, 1, 2, 5)
    packed, sqnorm, q, staged = F._prepare_operands(inp.x, inp.w, 1, prepass=True)
    assert q.shape == (2, 1, 0, 3) and staged is None
    assert_close(sqnorm, inp.w.double().pow(2).sum(dim=(1, 2, 3)), 1e-5, 0.0, "||w||^2")
    # (the reference cannot reshape an empty image: the expected values by hand) c = 0,
    # theta = pi/2, g = 0, y = b
    assert_close(r_x, torch.full(r_x.shape, math.sqrt(EPS), dtype=torch.float64), 1e-6, 0.0,
                 "r_x")
    assert_close(c, torch.zeros(c.shape, dtype=torch.float64), 0.0, 1e-6, "c")
    assert_close(y, inp.bias.double()[None, :, None, None].expand(y.shape), 1e-6, 1e-6, "y")


@pytest.mark.parametrize("scale", [300.0, float("nan")], ids=["fp16-300", "nan"])
def test_forward_prepass_hard_inputs(scale):
    """fp16 |x| ~ 300 (x^2 overflows fp16: the pre-pass squares in fp32) and a NaN input (it
    reaches the patches whose windows hold it, as in the fused path)."""
    inp = make_conv_inputs(**CONV_CASES["3x3_chunks"], operator="linear", dtype=torch.float16,
                           device=DEVICE, channels_last=True)
    if math.isnan(scale):
        inp.x[0, 3, 2, 2] = float("nan")
    else:
        inp.x.mul_(scale / 4)
    pre, fused = _run_kernel(inp, patch_norms="prepass"), _run_kernel(inp, patch_norms="fused")
    assert torch.equal(torch.isnan(pre[0]), torch.isnan(fused[0]))
    torch.testing.assert_close(pre[2], fused[2], rtol=1e-5, atol=0, equal_nan=True)
    if not math.isnan(scale):
        assert torch.isfinite(pre[2]).all() and pre[2].max() > 256
        _check_against_reference(inp, pre, torch.float16, 2e-3, 2e-3)


@pytest.mark.parametrize("dtype, rtol, atol", DTYPE_TOLS)
@pytest.mark.parametrize("case", list(TAP_BIT_GEOMETRIES))
@pytest.mark.parametrize("c_in", [16, 3], ids=["channel-chunks", "flat-k"])
def test_windows_in_the_padding(c_in, case, dtype, rtol, atol):
    """Both K loops' padding masks (tap bits up to 31 taps, compares past that): the
    channel-chunk loop's a row and step, the flat loop's an element."""
    inp = make_conv_inputs(n=1, c_in=c_in, c_out=16, operator="linear", dtype=dtype,
                           device=DEVICE, channels_last=True, **TAP_BIT_GEOMETRIES[case])
    _check_against_reference(inp, _run_kernel(inp), dtype, rtol, atol)


@pytest.mark.parametrize("case", ["3x3", "3x3_chunks", "strided_dilated", "grouped"])
def test_forward_int64_offsets_give_the_same_result(case, monkeypatch):
    """The int64 in-image offsets (samples over ~2^30 elements) and the default int32 ones
    compute the same addresses: bitwise the same y, c and r_x, both K loops."""
    inp = make_conv_inputs(**CONV_CASES[case], operator="linear", dtype=torch.bfloat16,
                           device=DEVICE, channels_last=True)
    narrow = _run_kernel(inp)
    monkeypatch.setattr(F, "_needs_wide_offsets", lambda *args: True)
    wide = _run_kernel(inp)
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)


def test_wide_offsets_when_a_sample_nears_2_31_elements():
    def wide(*shape, **view):
        x = torch.empty(shape, device="meta")
        if view.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        return F._needs_wide_offsets(x, (3, 3), (1, 1), (1, 1))
    assert not wide(64, 64, 56, 56)                   # 200k elements a sample
    assert not wide(1, 64, 2048, 2048)                # 2^28
    assert wide(1, 256, 2048, 2048)                   # 2^30: within the safety factor
    assert wide(2, 512, 2048, 2048, channels_last=True)
    # a strided view: the span counts, not the element count
    big = torch.empty(1, 4, 2 ** 15, 2 ** 15, device="meta")[:, :, ::4096, ::4096]
    assert big.numel() == 256 and F._needs_wide_offsets(big, (3, 3), (1, 1), (1, 1))


def test_patch_norms_choice_is_checked():
    inp = make_conv_inputs(**CONV_CASES["3x3"], operator="linear", device=DEVICE)
    with pytest.raises(ValueError, match="patch_norms"):
        _run_kernel(inp, patch_norms="box")
    huge = torch.empty(2 ** 24, 1, 2 ** 7, 2 ** 7, device="meta")     # 2^32 pixel tiles
    with pytest.raises(ValueError, match="input pixels"):
        F._prepare_operands(huge, torch.empty(4, 1, 3, 3, device="meta"), 1, prepass=True)
    # the pre-pass's limits: at most 2^31 - 1 programs in the merged launch (BLOCK_P pixels of
    # one image x one group each, plus one program per filter), int32 pixel indices in an image
    tiles = 4096 // F._PREP_CONFIG["BLOCK_P"]
    assert F._prepass_fits(2 ** 31 // tiles - 1, 4096, 1, 63)
    assert not F._prepass_fits(2 ** 31 // tiles - 1, 4096, 1, 64)
    assert F._prepass_fits(2 ** 24 // tiles, 4096, 64, 64)
    assert not F._prepass_fits(2 ** 24 // tiles, 4096, 128, 64)
    assert not F._prepass_fits(1, 2 ** 31, 1, 1)


@pytest.mark.parametrize("groups", [1, 4], ids=["gemm", "depthwise"])
def test_pixel_count_limit(groups):
    """The kernels index pixels in int32 and a tile runs up to a tile past the last pixel:
    MAX_PIXELS output pixels pass (shape inference on meta tensors), one more is refused with a
    message that says what to do, on the GEMM and the depthwise path."""
    w = torch.empty(4, 4 // groups, 1, 1, device="meta")
    ok = torch.empty(F.MAX_PIXELS, 4, 1, 1, device="meta")
    y, _, _ = F.sphere_conv2d_fwd(ok, w, None, None, (1, 1), (0, 0), (1, 1), groups, "cosine",
                                  EPS)
    assert y.shape == (F.MAX_PIXELS, 4, 1, 1)
    over = torch.empty(F.MAX_PIXELS + 1, 4, 1, 1, device="meta")
    with pytest.raises(ValueError, match="int32 pixel indices.*split the batch"):
        F.sphere_conv2d_fwd(over, w, None, None, (1, 1), (0, 0), (1, 1), groups, "cosine", EPS)


def test_inputs_past_the_prepass_limits_take_fused_norms(monkeypatch):
    """By default an input too large for the pre-pass (here 2^24 pixel tiles x 128 groups:
    more programs than a 1-D grid holds) takes the fused norms, and its preparation launch has
    only the filter programs; asking for the pre-pass raises. Meta tensors: nothing runs."""
    launched = []
    monkeypatch.setattr(F, "launch", lambda kernel, grid, args, kwargs, what, memo=None:
                        launched.append((kernel, grid, kwargs)))
    x = torch.empty(2 ** 14, 256, 2 ** 8, 2 ** 8, device="meta")    # 2^30 input pixels
    w = torch.empty(128, 2, 3, 3, device="meta")
    F._sphere_conv2d_fwd_impl(x, w, None, None, (1, 1), (1, 1), (1, 1), 128, "linear", EPS)
    (prep, prep_grid, _), (gemm, _, gemm_flags) = launched
    assert prep is F._prepare_operands_kernel and prep_grid == (128,)
    assert gemm in GEMM_FORWARD and not gemm_flags["NORMS_FROM_Q"]
    with pytest.raises(ValueError, match="input pixels"):
        F._sphere_conv2d_fwd_impl(x, w, None, None, (1, 1), (1, 1), (1, 1), 128, "linear", EPS,
                                  patch_norms="prepass")


@pytest.mark.parametrize("case", ["3x3", "3x3_chunks", "depthwise"])
def test_forward_without_c_writes_the_same_y(case):
    """store_c=False (save_output): c comes back empty and y is bitwise the y of the default
    launch, through the GEMM kernel (both K loops) and the depthwise kernel."""
    inp = make_conv_inputs(**CONV_CASES[case], operator="linear", dtype=torch.bfloat16,
                           device=DEVICE, channels_last=True)
    y, c, r_x = _run_kernel(inp)
    y2, c2, r_x2 = _run_kernel(inp, store_c=False)
    assert c2.numel() == 0 and c.numel() == (0 if case == "depthwise" else y.numel())
    assert torch.equal(y2.view(torch.int16), y.view(torch.int16)) and torch.equal(r_x2, r_x)


@pytest.mark.parametrize("dtype, rtol, atol", DTYPE_TOLS)
def test_forward_arbitrary_strides(dtype, rtol, atol):
    """A non-contiguous view (every other row, channels permuted in memory) is read through its
    strides; outputs come back contiguous (NCHW)."""
    base = make_conv_inputs(n=2, c_in=8, h=12, w=5, c_out=16, operator="sigmoid", dtype=dtype,
                            device=DEVICE)
    x = base.x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)[:, :, ::2, :]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    base.x = x
    y, c, r_x = _run_kernel(base)
    assert y.is_contiguous() and c.is_contiguous()
    _check_against_reference(base, (y, c, r_x), dtype, rtol, atol)


def test_forward_sigmoid_scalar_like_k_and_channels_last_weight():
    """k equal for every channel (the fixed-sigmoid case) and a channels_last weight (the packed
    layout is then a view)."""
    inp = make_conv_inputs(n=1, c_in=16, h=5, w=5, c_out=16, operator="sigmoid",
                           per_channel_k=False, device=DEVICE, channels_last=True)
    inp.w = inp.w.contiguous(memory_format=torch.channels_last)
    _check_against_reference(inp, _run_kernel(inp), torch.float32, 1e-5, 1e-5)


def test_forward_tf32_when_allowed():
    """fp32 uses TF32 exactly when cudnn.allow_tf32 is set (only observable on a GPU: the
    interpreter computes the dot in full fp32).  TF32 keeps 10 mantissa bits: c within ~2e-3."""
    torch.backends.cudnn.allow_tf32 = True
    inp = make_conv_inputs(n=1, c_in=32, h=6, w=6, c_out=16, operator="linear", device=DEVICE)
    y, c, r_x = _run_kernel(inp)
    (y64, c64, rx64), _ = _references(inp)
    assert_close(c, c64, 2e-3, 2e-3, "c")
    assert_close(y, y64, 3e-3, 3e-3, "y")
    assert_close(r_x, rx64, RX_RTOL, RX_ATOL, "r_x")  # sum of squares never goes through TF32


# Every GPU autotune config (and the depthwise ones), forced, on shapes where the tiles are
# mostly masked: the masks and the grid swizzle are right for every tile shape.
@pytest.mark.parametrize("cfg", configs.conv_fwd_configs(),
                         ids=lambda c: f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x"
                                       f"{c.kwargs['BLOCK_K']}w{c.num_warps}")
@pytest.mark.parametrize("case", ["3x3", "3x3_chunks", "depthwise"])
def test_forward_every_gpu_config(cfg, case):
    inp = make_conv_inputs(**CONV_CASES[case], operator="sigmoid", device=DEVICE,
                           channels_last=True)
    out = _run_kernel(inp, config=cfg, force_gemm=True)
    _check_against_reference(inp, out, torch.float32, 1e-5, 1e-5, saves_state=True)


def test_depthwise_configs_beyond_the_cached_taps():
    """Filters with more taps than MAX_CACHED_TAPS keep only one-tile-a-program configs (or
    the first made one); up to it every config that fits the geometry stays."""
    configs = F._dw_configs()
    assert F.prune_dw_configs(configs, {}, KH=3, KW=3, out_w=28, ROW_W=0) == configs
    kept = F.prune_dw_configs(configs, {}, KH=5, KW=5, out_w=28, ROW_W=0)
    assert kept and all(c.kwargs["ROW_BLOCKS"] == 1 for c in kept)
    assert len(kept) < len(configs)
    (only,) = F.prune_dw_configs(configs[:1], {}, KH=1, KW=F.MAX_CACHED_TAPS + 1)
    assert only.kwargs == {**configs[0].kwargs, "ROW_BLOCKS": 1}


@pytest.mark.parametrize("cfg", F._dw_configs(),
                         ids=lambda c: f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_C']}"
                                       f"x{c.kwargs['ROW_BLOCKS']}g{c.kwargs['PIX_GROUP']}")
def test_forward_every_depthwise_config(cfg):
    case = CONV_CASES["depthwise"]
    if cfg.kwargs["PIX_GROUP"] > 1:   # 8 wide: the groups fit (pixel_groups_fit)
        case = dict(case, w=8)
    inp = make_conv_inputs(**case, operator="linear", device=DEVICE, channels_last=True)
    _check_against_reference(inp, _run_kernel(inp, config=cfg), torch.float32, 1e-5, 1e-5)


def test_depthwise_pixel_groups_fit():
    """Groups of pixels only side by side in a row, their windows a column apart, in
    channels_last's flat tiles, with cached taps -- the rule prune_dw_configs applies, and the
    arguments it reads are in the autotuning key (a cached pick must fit every launch with
    the same key)."""
    fits = F.pixel_groups_fit
    assert fits(4, 28, 1, 1, 0, 9) and fits(2, 14, 1, 1, 0, 9) and fits(1, 7, 2, 3, 32, 49)
    assert not fits(4, 14, 1, 1, 0, 9)       # Wo not a multiple of the group
    assert not fits(2, 28, 2, 1, 0, 9)       # stride 2 along the width
    assert not fits(2, 28, 1, 2, 0, 9)       # dilation 2 along the width
    assert not fits(2, 28, 1, 1, 32, 9)      # NCHW row tiles
    assert not fits(2, 28, 1, 1, 0, 25)      # 5x5: taps not cached
    groups = {c.kwargs["PIX_GROUP"] for c in F.prune_dw_configs(
        F._dw_configs(), {"out_w": 14, "conv_stride_w": 1, "dil_w": 1}, KH=3, KW=3, ROW_W=0)}
    assert groups == {1, 2}
    assert {"out_w", "conv_stride_w", "dil_w", "ROW_W", "KH", "KW"} <= set(F._DW_AUTOTUNE_KEY)


@pytest.mark.parametrize("geom", [
    dict(h=5, w=8, kernel=3, padding=1),
    # rows strided and dilated (only the width must be stride and dilation 1), a 3x2 filter
    dict(h=9, w=9, kernel=(3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 1)),
], ids=["3x3", "3x2-s2x1-d2x1"])
@pytest.mark.parametrize("operator", ["linear", "sigmoid"])
@pytest.mark.parametrize("group", [2, 4])
def test_depthwise_pixel_groups_give_the_same_bits(group, operator, geom):
    """A tile of pixel groups sums every output's taps in the same order as single pixels
    (depthwise_window_group): y is bitwise the single-pixel tile's, and right against float64
    -- 3 images (groups never cross a row; tiles cross images and end partial), a channel tile
    partly masked, the padding on every side."""
    case = dict(n=3, c_in=20, c_out=20, groups=20, **geom)
    inp = make_conv_inputs(**case, operator=operator, device=DEVICE, channels_last=True)
    single = triton.Config({"BLOCK_M": 16, "BLOCK_C": 16, "ROW_BLOCKS": 2, "PIX_GROUP": 1},
                           num_warps=4)
    grouped = triton.Config({**single.kwargs, "PIX_GROUP": group}, num_warps=4)
    out = _run_kernel(inp, config=grouped)
    assert torch.equal(out[0], _run_kernel(inp, config=single)[0])
    _check_against_reference(inp, out, torch.float32, 1e-5, 1e-5)


# Inputs the GEMM kernels cannot read fast where they lie (staged_channels): NCHW, C_in/G not
# a multiple of 16 (odd channel counts), with groups, a 1x1 filter (fused norms: the staging
# programs run without the pre-pass).
STAGE_CASES = {
    "odd_nhwc": (dict(n=2, c_in=20, h=5, w=6, c_out=12, kernel=3, padding=1), True),
    "chunks_nchw": (CONV_CASES["3x3_chunks"], False),
    "grouped_odd_nhwc": (dict(n=1, c_in=36, h=4, w=5, c_out=8, kernel=3, padding=2, dilation=2,
                              groups=2), True),
    "1x1_nchw": (CONV_CASES["1x1"], False),
}


@pytest.mark.parametrize("dtype, rtol, atol", DTYPE_TOLS)
@pytest.mark.parametrize("case", list(STAGE_CASES))
def test_unaligned_inputs_are_staged(case, dtype, rtol, atol, monkeypatch):
    """Such inputs are copied by the preparation launch to [N, H, W, G, Cp] (Cp = C_in/G rounded
    up to 16; an exact copy, zeros in the padding) and the packed filters get the same Cp; the
    GEMM reads those. Outputs against the float64 reference, and the same as reading x where it
    lies (SPHEREOPS_STAGE_INPUT=0): the padding only adds exact zeros -- r_x bitwise, c to a few
    ulp and y = g(c) + b to a few more (the filter norms' fp32 sums run over a differently
    padded vector, which can move r_w by an ulp)."""
    geometry, channels_last = STAGE_CASES[case]
    launched = _record_launches(monkeypatch)
    inp = make_conv_inputs(**geometry, operator="sigmoid", dtype=dtype, device=DEVICE,
                           channels_last=channels_last)
    out = _run_kernel(inp)
    _check_against_reference(inp, out, dtype, rtol, atol)

    (_, _, prep_args), (_, _, gemm_args) = launched
    prep = dict(zip(F._prepare_operands_kernel.arg_names, prep_args))
    gemm = dict(zip(F._sphere_conv_fwd_kernel.arg_names, gemm_args))
    n, c_in, h, w = inp.x.shape
    groups = geometry.get("groups", 1)
    cg = c_in // groups
    cp = -(-cg // 16) * 16
    staged, packed = gemm["x_ptr"], gemm["w_ptr"]
    assert gemm["c_in_per_group"] == cp and staged.shape == (n, groups * cp, h, w)
    assert staged.is_contiguous(memory_format=torch.channels_last)
    assert staged.data_ptr() == prep["xs_ptr"].data_ptr()
    expected = torch.zeros(n, h, w, groups, cp, dtype=dtype, device=DEVICE)
    expected[..., :cg] = inp.x.permute(0, 2, 3, 1).reshape(n, h, w, groups, cg)
    assert torch.equal(staged.permute(0, 2, 3, 1).reshape(n, h, w, groups, cp), expected)
    assert packed.shape == (inp.w.shape[0], *inp.w.shape[2:], cp) and packed.is_contiguous()
    assert torch.equal(packed[..., :cg], inp.w.permute(0, 2, 3, 1))
    assert not packed[..., cg:].any()

    monkeypatch.setattr(F, "_STAGE_INPUT", False)
    direct = _run_kernel(inp)
    assert launched[-1][2][0] is inp.x          # read where it lies
    assert torch.equal(out[2], direct[2])
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(out[1], direct[1], rtol=4 * ulp, atol=4 * ulp)
    torch.testing.assert_close(out[0], direct[0], rtol=8 * ulp, atol=8 * ulp)


@pytest.mark.parametrize("cols", [slice(1, 4), slice(2, 3)], ids=["cols-1-4", "width-1"])
def test_staged_input_from_a_view(cols):
    """The staging addresses views by their strides: a column slice of an NCHW input (rows 6
    elements apart for a width of 3) and a width-1 slice (row stride still the parent's, so
    not a dense plane), against the float64 reference."""
    inp = make_conv_inputs(n=2, c_in=20, h=5, w=6, c_out=12, kernel=3, padding=1,
                           operator="cosine", device=DEVICE)
    inp.x = inp.x[:, :, :, cols]
    assert F.staged_channels(inp.x, 20) == 32 and not F.dense_plane(inp.x)
    _check_against_reference(inp, _run_kernel(inp), torch.float32, 1e-5, 1e-5)


def test_staged_channels_rule(monkeypatch):
    """staged_channels: 0 (read x where it lies) for channels_last inputs with C_in/G a multiple
    of 16 at 16-element aligned offsets, and for the flat K loop (C_in/G < 16); else C_in/G
    rounded up to 16."""
    def cl(*shape):
        return torch.empty(shape).contiguous(memory_format=torch.channels_last)
    assert F.staged_channels(cl(2, 32, 5, 5), 32) == 0
    assert F.staged_channels(cl(2, 32, 5, 5), 16) == 0            # two groups of 16
    assert F.staged_channels(cl(2, 48, 5, 5), 24) == 32           # two groups of 24
    assert F.staged_channels(cl(2, 29, 5, 5), 29) == 32
    assert F.staged_channels(torch.empty(2, 32, 5, 5), 32) == 32  # NCHW
    assert F.staged_channels(cl(2, 8, 5, 5), 8) == 0              # flat K loop
    assert F.staged_channels(torch.empty(2, 8, 5, 5), 8) == 0
    # channel slices of a channels_last tensor: strides of 48, offset 16 (aligned) or 8 (not)
    assert F.staged_channels(cl(2, 48, 5, 5)[:, 16:48], 32) == 0
    assert F.staged_channels(cl(2, 48, 5, 5)[:, 8:40], 32) == 32
    monkeypatch.setattr(F, "_STAGE_INPUT", False)
    assert F.staged_channels(torch.empty(2, 32, 5, 5), 32) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_prepare_filters(layout, dtype):
    """The filter programs of the preparation launch (alone: no pre-pass): packing into
    (kh, kw, C_in/G) order is an exact copy (a view for channels_last weights) and ||w_o||^2 is
    summed in fp32 (fp16 weights of ~300: their squares overflow fp16)."""
    w = (torch.randn(12, 5, 3, 2, dtype=torch.float64) * 300).to(dtype).to(DEVICE)
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        w = torch.randn(12, 10, 3, 4, dtype=torch.float64).to(dtype).to(DEVICE)[:, ::2, :, 1:3]
    x = torch.randn(1, 5, 3, 3, dtype=torch.float64).to(dtype).to(DEVICE)  # unread
    packed, sqnorm, q, staged = F._prepare_operands(x, w, 1, prepass=False)
    assert q is None and staged is None
    assert packed.shape == (12, 3, 2, 5) and packed.is_contiguous()
    assert torch.equal(packed, w.permute(0, 2, 3, 1))
    if layout == "channels_last":
        assert packed.data_ptr() == w.data_ptr(), "a channels_last weight must not be copied"
    ref = w.double().pow(2).sum(dim=(1, 2, 3))
    assert sqnorm.dtype == torch.float32 and torch.isfinite(sqnorm).all()
    assert_close(sqnorm, ref, 1e-6, 0.0, "||w||^2")


# ---------------------------------------------------------------------------------------------
# Hard cases
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, rtol, atol", DTYPE_TOLS)
@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("noise", [0.0, 1e-4], ids=["exact", "noisy"])
def test_forward_near_parallel_patches(noise, operator, dtype, rtol, atol):
    """Filters equal to (scaled) input patches: c -> 1, where arccos turns an ulp of c into
    ~sqrt(ulp) of angle.  Bound: the same-dtype reference's own error (2x) plus atol, in fp32
    too, since the amplification is a property of the function, not of the kernel."""
    inp = make_near_parallel_conv_inputs(noise=noise, n=1, c_in=4, h=6, w=6, c_out=16,
                                         kernel=3, padding=0, operator=operator, dtype=dtype,
                                         device=DEVICE)
    y, c, r_x = _run_kernel(inp)
    (y64, c64, rx64), (y_same, c_same, _) = _references(inp)
    assert c64.max().item() > 1 - 1e-5, "the inputs do not reach the near-parallel regime"
    assert torch.isfinite(y).all() and torch.isfinite(c).all()
    assert c.abs().max().item() <= 1.0
    assert_close_to_reference(c, c64, c_same, atol, "c")
    # near c = 1, |dy| = |dg/dtheta| * |dtheta| with dtheta ~ sqrt(2 |dc|)
    y_atol = atol + 2.0 * math.sqrt(2 * 2.0 ** -23 * 4)
    assert_close_to_reference(y, y64, y_same, y_atol, "y")
    assert_close(r_x, rx64, RX_RTOL, RX_ATOL, "r_x")


@pytest.mark.parametrize("dtype, rtol, atol", DTYPE_TOLS)
@pytest.mark.parametrize("case", ["3x3", "3x3_chunks", "depthwise"])
def test_forward_zero_patches(case, dtype, rtol, atol):
    """All-zero patches: r_x = sqrt(eps), c = 0, y = g(pi/2) + b = b."""
    inp = make_conv_inputs(**CONV_CASES[case], operator="sigmoid", dtype=dtype, device=DEVICE,
                           channels_last=True)
    x = inp.x.clone()
    x[0] = 0  # a whole image: every patch of image 0 is zero
    inp.x = x
    y, c, r_x = _run_kernel(inp)
    _check_against_reference(inp, (y, c, r_x), dtype, rtol, atol)
    if not inp.pure_depthwise:   # (the depthwise forward saves no c, r_x)
        assert (c[0] == 0).all()
        assert torch.allclose(r_x[0], torch.full_like(r_x[0], math.sqrt(EPS)), rtol=1e-6, atol=0)
    assert torch.allclose(y[0].double(), inp.bias.double().view(-1, 1, 1).expand_as(y[0]),
                          rtol=0, atol=atol + 1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", ["3x3", "3x3_chunks", "depthwise"])
def test_forward_fp16_large_magnitude(case, channels_last):
    """fp16 with |x| ~ 300: x^2 overflows fp16 (65504), so the norms must be summed in fp32."""
    inp = make_conv_inputs(**CONV_CASES[case], operator="linear", dtype=torch.float16,
                           device=DEVICE, channels_last=channels_last, scale=300.0)
    assert inp.x.abs().max().item() > 256
    y, c, r_x = _run_kernel(inp)
    assert torch.isfinite(r_x).all() and torch.isfinite(y).all()
    _check_against_reference(inp, (y, c, r_x), torch.float16, 0.0, 1e-3)


@pytest.mark.parametrize("dtype, rtol, atol", DTYPE_TOLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("case", ["3x3", "3x3_chunks", "grouped", "depthwise"])
def test_forward_nonfinite_input_poisons_only_affected_outputs(case, bad, dtype, rtol, atol):
    """A NaN/Inf input pixel gives NaN in exactly the outputs whose patch contains it (all
    filters of its group, the windows covering it, its image) and nowhere else."""
    inp = make_conv_inputs(**CONV_CASES[case], operator="sigmoid", dtype=dtype, device=DEVICE,
                           channels_last=True)
    x = inp.x.clone()
    x[0, 1, 2, 3] = bad
    inp.x = x
    y, c, r_x = _run_kernel(inp)
    (y64, c64, rx64), _ = _references(inp)
    nan_ref = torch.isnan(y64)
    assert 0 < int(nan_ref.sum()) < y64.numel(), "the reference must have NaN and finite outputs"
    assert torch.equal(torch.isnan(y).cpu(), nan_ref), "y NaN pattern differs from the reference"
    if not inp.pure_depthwise:
        assert torch.equal(torch.isnan(c).cpu(), torch.isnan(c64)), "c NaN pattern differs"
    _check_against_reference(inp, (y, c, r_x), dtype, rtol, atol)


# ---------------------------------------------------------------------------------------------
# Shapes, empty inputs, argument checking, AOT specs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 4])
def test_forward_empty_batch(groups):
    inp = make_conv_inputs(n=0, c_in=8, h=5, w=5, c_out=8, groups=groups, device=DEVICE,
                           channels_last=True)
    y, c, r_x = F.sphere_conv2d_fwd(*inp.args(), EPS)
    assert y.shape == c.shape == (0, 8, 5, 5) and r_x.shape == (0, groups, 5, 5)
    assert y.dtype == c.dtype == torch.float32 and r_x.dtype == torch.float32


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU interpreter path; on CUDA wrap_triton traces")
def test_forward_fake_tensors_propagate_metadata_only():
    """Fake tensors (shape inference, opcheck's fake-tensor test) get correctly shaped outputs
    without a kernel launch; graph tracing of the interpreter path is refused, not run wrong."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    inp = make_conv_inputs(n=2, c_in=8, h=6, w=6, c_out=12, groups=4, stride=2,
                           operator="sigmoid", channels_last=True)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = [mode.from_tensor(t) for t in (inp.x, inp.w, inp.bias, inp.k)]
        y, c, r_x = F.sphere_conv2d_fwd(*fake, inp.stride, inp.padding, inp.dilation,
                                        inp.groups, "sigmoid", EPS)
    assert y.shape == c.shape == (2, 12, 3, 3) and r_x.shape == (2, 4, 3, 3)
    assert y.is_contiguous(memory_format=torch.channels_last) and r_x.dtype == torch.float32

    def traced(x, w, b, k):
        return F.sphere_conv2d_fwd(x, w, b, k, inp.stride, inp.padding, inp.dilation,
                                   inp.groups, "sigmoid", EPS)[0]
    with pytest.raises(NotImplementedError, match="cannot be traced"):
        make_fx(traced, tracing_mode="fake")(inp.x, inp.w, inp.bias, inp.k)


def _good_args():
    inp = make_conv_inputs(n=1, c_in=4, h=5, w=5, c_out=8, operator="sigmoid", device=DEVICE)
    return dict(x=inp.x, w=inp.w, bias=inp.bias, k=inp.k, stride=(1, 1), padding=(1, 1),
                dilation=(1, 1), groups=1, operator="sigmoid", eps=EPS)


@pytest.mark.parametrize("change, exc, match", [
    (dict(x="x"), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.zeros(4, 5, 5)), ValueError, "x must be a 4-D"),
    (dict(x=torch.zeros(1, 4, 5, 5, dtype=torch.float64)), TypeError, "x dtype"),
    (dict(x=torch.zeros(1, 4, 5, 5, dtype=torch.int32)), TypeError, "x dtype"),
    (dict(w=torch.zeros(8, 4, 3, 3, dtype=torch.float16)), TypeError, "w dtype"),
    (dict(w=torch.zeros(8, 3, 3, 3)), ValueError, "w.shape"),
    (dict(groups=3), ValueError, "groups"),
    (dict(groups=0), ValueError, "groups"),
    (dict(bias=torch.zeros(7)), ValueError, "bias"),
    (dict(k=None), ValueError, "k is required"),
    (dict(k=torch.zeros(3)), ValueError, "k must"),
    (dict(operator="tanh"), ValueError, "operator"),
    (dict(stride=(0, 1)), ValueError, "stride"),
    (dict(stride=2), TypeError, "stride"),
    (dict(padding=(-1, 0)), ValueError, "padding"),
    (dict(dilation=(1.5, 1)), TypeError, "dilation"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(padding=(0, 0), dilation=(3, 3)), ValueError, "output size"),
])
def test_forward_bad_arguments(change, exc, match):
    args = _good_args()
    for key, value in change.items():
        if isinstance(value, torch.Tensor):
            value = value.to(DEVICE)
        args[key] = value
    with pytest.raises(exc, match=match):
        F.sphere_conv2d_fwd(**args)


def test_aot_specs_are_well_formed():
    specs = F.aot_specs()
    names = [s["name"] for s in specs]
    assert len(names) == len(set(names))
    cfgs = configs.conv_fwd_configs()
    n_gemm, n_eight_warps = len(cfgs), sum(c.num_warps >= 8 for c in cfgs)
    # every config on the default path (pre-pass norms), 3x3: fp16, bf16, fp32-tf32; 8-warp
    # tiles are 16-bit only (pruned for fp32 at launch)
    default = [s for s in specs if s["gemm"] and s["constexprs"].get("NORMS_FROM_Q")
               and s["constexprs"]["CHANNEL_CHUNKS"] and not s["constexprs"]["OUT_PIXELS_FAST"]
               and s["constexprs"]["C_ALIGN"] == 256]
    assert len(default) == n_gemm * 3 - n_eight_warps
    # the channel-masked loads (C_ALIGN / N_ALIGN below the tile) on the two 4-warp 3x3 tiles
    masked = [s for s in specs if s["gemm"] and s["constexprs"]["C_ALIGN"] < 256]
    assert len(masked) == 2 * 3 and all(s["constexprs"]["C_ALIGN"] % s["constexprs"]["BLOCK_K"]
                                        for s in masked)
    # NCHW outputs (stores along the pixels) on the two 4-warp 3x3 tiles per dtype, in 16-byte
    # runs of pixels (OUT_RUN, 56x56 planes) and one pixel at a time (planes such as 7x7)
    nchw = [s for s in specs if s["gemm"] and s["constexprs"]["OUT_PIXELS_FAST"]]
    assert len(nchw) == 2 * 3 * 2 and all(s["example_args"]["stride_yc"] != 1 for s in nchw)
    for s in nchw:
        itemsize = 4 if s["dtype"] == "fp32" else 2
        assert s["constexprs"]["OUT_RUN"] == (1 if "_run1_" in s["name"] else 16 // itemsize)
    assert all(s["constexprs"]["OUT_RUN"] == 1 for s in specs
               if s["gemm"] and not s["constexprs"]["OUT_PIXELS_FAST"])
    # the flat K loop (a 3-channel 5x5 first layer) on its 64-wide tiles, every dtype
    flat = [s for s in specs if s["gemm"] and not s["constexprs"]["CHANNEL_CHUNKS"]]
    assert len(flat) == 2 * 3 and all(configs.fits_flat_k_loop(triton.Config(
        {k: s["constexprs"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")})) for s in flat)
    assert all(s["constexprs"]["KH"] == 3 and not s["constexprs"]["WIDE_OFFSETS"] for s in default)
    # the fused-norm variant on two 4-warp 3x3 tiles per dtype plus its 8-warp 1x1 tile (16-bit)
    # and the int64-offset variant on the two 4-warp tiles per dtype
    fused = [s for s in specs if s["gemm"] and not s["constexprs"].get("NORMS_FROM_Q")
             and not s["constexprs"].get("WIDE_OFFSETS")]
    assert len(fused) == 2 * 3 + 2 * n_eight_warps
    assert sum(s["gemm"] and bool(s["constexprs"].get("WIDE_OFFSETS")) for s in specs) == 2 * 3
    assert not any(s["num_warps"] >= 8 and s["dtype"] == "fp32" for s in specs if s["gemm"])
    for s in specs:
        assert set(s) >= {"name", "fn", "signature", "constexprs", "num_warps", "num_stages",
                          "dtype", "gemm"}
        # a JITFunction (an interpreter function when TRITON_INTERPRET=1, as here on CPU)
        assert callable(s["fn"]) and hasattr(s["fn"], "arg_names")
        assert list(s["signature"]) == list(s["fn"].arg_names)
        for name, value in s["signature"].items():
            assert (value == "constexpr") == (name in s["constexprs"]), name
        ptr_types = {v for v in s["signature"].values() if v.startswith("*")}
        assert ptr_types <= {"*" + s["dtype"], "*fp32"}


_AOT_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sphereops_kernels.conv_fwd import aot_specs
spec = next(s for s in aot_specs() if s["name"] == {name!r})
assert isinstance(spec["fn"], triton.JITFunction)
source = ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec["attrs"])
options = {{"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}}
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
ptx = kernel.asm["ptx"]
print("WGMMA" if "wgmma" in ptx else "NO-WGMMA", "CP_ASYNC" if "cp.async" in ptx else "NO-CP_ASYNC")
"""


def test_aot_compile_smallest_gemm_config_emits_wgmma():
    """The compiler (not the interpreter) accepts the kernel, uses Hopper tensor cores and
    pipelines the loads.  In a subprocess: with TRITON_INTERPRET=1 set, @triton.jit yields
    interpreter functions that cannot be compiled."""
    import os
    import subprocess
    import sys
    name = next(s["name"] for s in F.aot_specs()
                if s["name"].startswith("conv_fwd_gemm_3x3_128x16x16") and s["dtype"] == "bf16")
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT.format(name=name)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WGMMA CP_ASYNC" in proc.stdout, proc.stdout


def test_config_pruning_follows_the_shape_and_the_dot_unit():
    """The launch-time pruning: exact fp32 keeps only tiles that fit the FMA dot, tensor-core
    dtypes keep the large tiles, 8 warps only for 16-bit 1x1 filters or pre-pass norms, no N
    block far above C_out/G, the flat K loop only tiles that fit it."""
    cfgs = configs.conv_fwd_configs()
    wide = dict(c_out_per_group=256, c_in_per_group=256, KH=3, KW=3)

    def kept(dtype, precision, **shape):
        x = torch.empty(1, dtype=dtype)
        return configs.prune_conv_fwd_configs(cfgs, dict(wide, x_ptr=x, **shape),
                                              DOT_PRECISION=precision)

    def tiles(cs):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in cs}

    exact = kept(torch.float32, "ieee")
    assert exact and all(configs.fits_fma_dot(c) for c in exact)
    assert (128, 128, 64, 4) not in tiles(exact)
    for dtype, precision in ((torch.float32, "tf32"), (torch.bfloat16, "ieee"), (torch.float16, "ieee")):
        assert (128, 128, 64, 4) in tiles(kept(dtype, precision)), (dtype, precision)
    assert all(w < 8 for *_, w in tiles(kept(torch.bfloat16, "ieee")))
    assert (128, 128, 64, 8) in tiles(kept(torch.bfloat16, "ieee", KH=1, KW=1))
    assert all(w < 8 for *_, w in tiles(kept(torch.float32, "tf32", KH=1, KW=1)))
    # pre-pass norms: the 8-warp tile for 16-bit 3x3 too, never for fp32
    assert (128, 128, 64, 8) in tiles(kept(torch.bfloat16, "ieee", NORMS_FROM_Q=True))
    assert all(w < 8 for *_, w in tiles(kept(torch.bfloat16, "ieee", NORMS_FROM_Q=False)))
    assert all(w < 8 for *_, w in tiles(kept(torch.float32, "tf32", NORMS_FROM_Q=True)))
    # the tile that went wrong on the GPU with fused norms only
    assert (64, 128, 64, 4) in tiles(kept(torch.bfloat16, "ieee", NORMS_FROM_Q=True))
    assert (64, 128, 64, 4) not in tiles(kept(torch.bfloat16, "ieee", NORMS_FROM_Q=False))
    # few channels both ways (edge.odd: 29 -> 61): a 64-wide N tile with a 32-wide K step stays
    odd = tiles(kept(torch.bfloat16, "ieee", c_out_per_group=61, c_in_per_group=29,
                     KH=5, KW=5, NORMS_FROM_Q=True))
    assert (128, 64, 32, 4) in odd and all(n <= 64 and k <= 32 for _, n, k, _ in odd)
    assert all(bn <= 16 for _, bn, _, _ in tiles(kept(torch.bfloat16, "ieee", c_out_per_group=16)))
    # the flat K loop (a 3-channel first layer): no tile that spills there
    flat = kept(torch.bfloat16, "ieee", c_out_per_group=64, c_in_per_group=3, KH=5, KW=5,
                NORMS_FROM_Q=True)
    assert (128, 64, 32, 4) in tiles(flat) and (128, 64, 64, 4) not in tiles(flat)
    assert all(configs.fits_flat_k_loop(c) for c in flat)


# NCHW depthwise convs take row tiles (depthwise_pixel_tile with ROW_W > 0): blocks of whole
# output rows read along the pixels. MAX_ROW_W = 4 splits every row into several column blocks;
# 64 takes whole rows, several a tile; 15 tiles of 2 rows (3 images of 9 rows, 13 wide) leave
# a program's second row block past the last image.
@pytest.mark.parametrize("max_row_w", [4, 64], ids=["split-rows", "whole-rows"])
@pytest.mark.parametrize("geom", list(DEPTHWISE_ROW_GEOMETRIES))
@pytest.mark.parametrize("dtype, rtol, atol", [DTYPE_TOLS[0], DTYPE_TOLS[2]])
def test_depthwise_row_tiles(max_row_w, geom, dtype, rtol, atol, monkeypatch):
    monkeypatch.setattr(F, "MAX_ROW_W", max_row_w)
    _, flags = record_launches(monkeypatch, F, "launch")
    inp = make_conv_inputs(**DEPTHWISE_ROW_CASE, **DEPTHWISE_ROW_GEOMETRIES[geom],
                           operator="sigmoid", dtype=dtype, device=DEVICE)
    out = _run_kernel(inp)
    _check_against_reference(inp, out, dtype, rtol, atol)
    wo = out[0].shape[3]
    (launched,) = flags
    assert launched["ROW_W"] == min(triton.next_power_of_2(wo), max_row_w)
    if max_row_w == 64 and geom == "3x3":
        ho, bm = out[0].shape[2], F._dw_interpreter_config().kwargs["BLOCK_M"]
        assert F.depthwise_tile_count(3, ho, wo, launched["ROW_W"], bm) == 15


@pytest.mark.parametrize("c_in,c_out,groups,aligns", [
    (32, 32, 1, (32, 32)),
    (64, 96, 2, (32, 16)),    # per group 32 -> 48
    (48, 40, 1, (16, 8)),     # channel tails in K and N
    (40, 24, 1, (16, 8)),     # C_in staged to 48 (its K loop sees 48 channels)
], ids=["even", "groups", "tails", "staged"])
def test_forward_channel_alignment(c_in, c_out, groups, aligns, monkeypatch):
    """The GEMM forward learns which power-of-two tiles divide its channel counts (C_ALIGN,
    N_ALIGN: the K loop drops its channel masks where they do): the values passed, and y
    against the float64 reference whichever loads the tile took."""
    launched, flags = record_launches(monkeypatch, F, "launch")
    inp = make_conv_inputs(n=2, c_in=c_in, c_out=c_out, groups=groups, h=6, w=5,
                           operator="cosine", dtype=torch.float32, device=DEVICE,
                           channels_last=True)
    out = _run_kernel(inp)
    _check_against_reference(inp, out, torch.float32, *DTYPE_TOLS[0].values[1:])
    gemm = [f for (k, _, _), f in zip(launched, flags) if "C_ALIGN" in f]
    assert [(f["C_ALIGN"], f["N_ALIGN"]) for f in gemm] == [aligns]


def test_pow2_factor():
    from sphereops_kernels.launch import pow2_factor
    assert [pow2_factor(v) for v in (1, 3, 48, 64, 96, 1024, 0)] == [1, 1, 16, 64, 32, 256, 256]


def test_depthwise_row_width_rule():
    """Flat pixel tiles (ROW_W 0) where the channels are contiguous, row tiles -- the width's
    next power of two up to MAX_ROW_W -- otherwise: NCHW, a strided view, one channel."""
    x = torch.empty(2, 8, 5, 6)
    assert F.depthwise_row_width(x.contiguous(memory_format=torch.channels_last), 6) == 0
    assert F.depthwise_row_width(x, 6) == 8
    assert F.depthwise_row_width(x, 1) == 1
    assert F.depthwise_row_width(x, 1000) == F.MAX_ROW_W
    assert F.depthwise_row_width(torch.empty(2, 8, 5, 12)[..., ::2], 6) == 8
    one = torch.empty(2, 1, 5, 6).contiguous(memory_format=torch.channels_last)
    assert F.depthwise_row_width(one, 6) == 8   # one channel: the pixels are the contiguous axis
    # the host's tile count: flat tiles, or per image row blocks x column blocks
    assert F.depthwise_tile_count(3, 5, 6, 0, 32) == 3
    assert F.depthwise_tile_count(3, 5, 6, 8, 32) == 3 * 2 * 1
    assert F.depthwise_tile_count(3, 5, 100, 64, 32) == 3 * 5 * 4


@pytest.mark.parametrize("cfg", F._dw_row_configs(),
                         ids=lambda c: f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_C']}"
                                       f"x{c.kwargs['ROW_BLOCKS']}w{c.num_warps}")
def test_forward_every_depthwise_row_config(cfg):
    """Every NCHW (row-tile) tile the autotuner may pick, forced: rows of 7 in 8-wide tiles."""
    inp = make_conv_inputs(**CONV_CASES["depthwise"], operator="linear", device=DEVICE)
    _check_against_reference(inp, _run_kernel(inp, config=cfg), torch.float32, 1e-5, 1e-5)


@pytest.mark.parametrize("channels_last, case, run", [
    (False, CONV_CASES["3x3_chunks"], 2),          # 6x5 planes: runs of 2 pixels
    # 4x4 planes, three images in 48 pixels: runs of 4 (16 bytes of fp32) meeting plane
    # boundaries inside a tile and a partial last tile
    (False, dict(n=3, c_in=20, h=4, w=4, c_out=20, kernel=3, padding=1), 4),
    (False, dict(n=2, c_in=16, h=5, w=5, c_out=16, kernel=3, padding=1), 1),   # 25: no run
    (True, CONV_CASES["3x3_chunks"], 1),
], ids=["nchw-run2", "nchw-run4", "nchw-run1", "nhwc"])
def test_gemm_stores_along_the_pixels_for_nchw(channels_last, case, run, monkeypatch):
    """NCHW outputs of the GEMM forward are stored through the transposed tile (lanes along
    the pixels: OUT_PIXELS_FAST) in runs of OUT_RUN pixels (launch.pixel_run), channels_last
    ones directly -- all against float64."""
    _, flags = record_launches(monkeypatch, F, "launch")
    inp = make_conv_inputs(**case, operator="sigmoid", device=DEVICE,
                           channels_last=channels_last)
    _check_against_reference(inp, _run_kernel(inp), torch.float32, 1e-5, 1e-5)
    (gemm,) = [f for f in flags if "OUT_PIXELS_FAST" in f]
    assert gemm["OUT_PIXELS_FAST"] is (not channels_last)
    assert gemm["OUT_RUN"] == run
    assert F.pixels_fast(torch.empty(2, 1, 3, 3).contiguous(memory_format=torch.channels_last))


def test_nchw_output_without_runs_in_eighths(monkeypatch):
    """An NCHW output whose planes give no pixel runs (5x5: OUT_RUN 1) on a 128-wide tile: the
    epilogue works on column eighths (epilogue.column_slices), here with full, partial and
    wholly masked eighths (40 filters), against float64."""
    _, flags = record_launches(monkeypatch, F, "launch")
    cfg = triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 16, "GROUP_M": 8},
                        num_warps=4, num_stages=1)
    inp = make_conv_inputs(n=2, c_in=16, h=5, w=5, c_out=40, operator="sigmoid",
                           device=DEVICE)
    _check_against_reference(inp, _run_kernel(inp, config=cfg), torch.float32, 1e-5, 1e-5)
    (gemm,) = [f for f in flags if "OUT_PIXELS_FAST" in f]
    assert gemm["OUT_PIXELS_FAST"] and gemm["OUT_RUN"] == 1 and gemm["BLOCK_N"] == 128


def test_depthwise_rows_wider_than_the_tile():
    """Rows wider than a tile (ROW_W > BLOCK_M: the tile is one row segment of BLOCK_M, TW
    capped at BLOCK_M), here 20-wide rows in 16-pixel tiles, against float64."""
    inp = make_conv_inputs(n=2, c_in=6, h=5, w=20, c_out=6, groups=6, operator="cosine",
                           device=DEVICE)
    assert F.depthwise_row_width(inp.x, 20) == 32
    cfg = triton.Config({"BLOCK_M": 16, "BLOCK_C": 16, "ROW_BLOCKS": 2}, num_warps=4)
    _check_against_reference(inp, _run_kernel(inp, config=cfg), torch.float32, 1e-5, 1e-5)


# ---------------------------------------------------------------------------------------------
# The grid path (conv_fwd_grid: the padded pixel grid through TMA descriptors)
# ---------------------------------------------------------------------------------------------

from sphereops_kernels import conv_fwd_grid as FG  # noqa: E402

# Geometries; comments say what each tests of the grid's shared padding (stride 1) or of its
# phase planes (stride > 1).
GRID_CASES = {
    # 3x3 "same": one zero column / row between rows / images serves both sides; a full and a
    # partial channel chunk (24 -> Cp 32), a partial N tile
    "3x3_same": dict(n=2, c_in=24, h=6, w=7, c_out=20, kernel=3, padding=1),
    # rectangular, dilated, padding wider than the dilated half filter on one axis (Hq = Ho)
    # and none on the other (windows that never wrap)
    "rect_dilated": dict(n=2, c_in=20, h=5, w=9, c_out=12, kernel=(3, 2), padding=(3, 0),
                         dilation=(2, 3)),
    # 5x5, padding 3 > 2: outputs past the pitch (Wq = Wo = W + 2)
    "5x5_overpad": dict(n=1, c_in=18, h=7, w=6, c_out=8, kernel=5, padding=3),
    # groups: each group's channels at its own column of the grid and of the packed filters;
    # 48 channels a group (Cp not a power of two: the staging's channel block rounds up)
    "grouped": dict(n=1, c_in=96, h=5, w=4, c_out=12, kernel=3, padding=1, groups=2),
    # 1x1 without padding: an aligned channels_last input is the grid itself (no staging)
    "1x1": dict(n=3, c_in=32, h=5, w=5, c_out=16, kernel=1, padding=0),
    # valid conv, no bias
    "valid_no_bias": dict(n=2, c_in=16, h=6, w=6, c_out=16, kernel=3, padding=0, bias=False),
    # stride 2: four phase planes of (Ho + 1) x (Wo + 1); an odd and an even side
    "3x3_s2": dict(n=2, c_in=24, h=9, w=8, c_out=20, kernel=3, stride=2, padding=1),
    # 1x1 at stride 2: one plane (every 2nd pixel), staged even for an aligned input
    "1x1_s2": dict(n=2, c_in=32, h=7, w=6, c_out=16, kernel=1, stride=2, padding=0),
    # stride (2, 1), dilation 2 along H: every tap row on phase 0 (plane 1 staged, never read),
    # along W a stride-1 axis with dilation 3 and no padding
    "s21_dilated": dict(n=2, c_in=16, h=9, w=9, c_out=16, kernel=(3, 2), stride=(2, 1),
                        padding=(2, 0), dilation=(2, 3)),
    # 5x5 at stride 3 with groups: nine planes, taps two rows / columns into a plane
    "5x5_s3_grouped": dict(n=1, c_in=32, h=11, w=10, c_out=8, kernel=5, stride=3, padding=2,
                           groups=2),
}


@pytest.fixture
def tf32_allowed(exact_fp32):
    """fp32 takes the grid path with TF32 only (exact fp32 keeps the conv_fwd kernel); after
    exact_fp32, which restores the switch."""
    torch.backends.cudnn.allow_tf32 = True
    yield


def _grid_tolerances(dtype, rtol, atol):
    """The fp32 grid path runs TF32 on a GPU (10 mantissa bits: c within ~2e-3, as
    test_forward_tf32_when_allowed); the interpreter computes fp32 exactly."""
    if dtype == torch.float32 and DEVICE == "cuda":
        return 3e-3, 3e-3
    return rtol, atol


def _run_grid(inp, monkeypatch, **kwargs):
    """The forward forced onto the grid path; fails unless its two kernels are what ran."""
    launched = record_launches(monkeypatch, FG, "launch")[0]
    out = _run_kernel(inp, grid_path=True, patch_norms="prepass", **kwargs)
    kernels = [kernel for kernel, _, _ in launched]
    want = FG._sphere_conv_fwd_grid_kernel if "config" in kwargs else \
        FG._sphere_conv_fwd_grid_autotuned
    assert kernels == [FG._prepare_grid_kernel, want], kernels
    return out, launched


@pytest.mark.usefixtures("tf32_allowed")
@pytest.mark.parametrize("dtype, rtol, atol", DTYPE_TOLS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("case", list(GRID_CASES))
def test_grid_forward_matches_reference(case, operator, channels_last, dtype, rtol, atol,
                                        monkeypatch):
    inp = make_conv_inputs(**GRID_CASES[case], operator=operator, dtype=dtype, device=DEVICE,
                           channels_last=channels_last)
    out, _ = _run_grid(inp, monkeypatch)
    _check_against_reference(inp, out, dtype, *_grid_tolerances(dtype, rtol, atol))


@pytest.mark.usefixtures("tf32_allowed")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_grid_staging_and_operands(channels_last, monkeypatch):
    """The preparation launch's grid against one built with torch: zero rows and columns
    around every image (one run between neighbours), channels padded to 16; q its rows' sums of
    squares in fp32 (|x| ~ 300: fp16 squares would overflow); the TMA boxes follow the tile."""
    inp = make_conv_inputs(**GRID_CASES["3x3_same"], operator="cosine", dtype=torch.float16,
                           device=DEVICE, channels_last=channels_last, scale=300.0)
    (y, c, r_x), launched = _run_grid(inp, monkeypatch)
    _check_against_reference(inp, (y, c, r_x), torch.float16, 0.0, 1e-3)
    (_, _, prep_args), (_, _, gemm_args) = launched
    prep = dict(zip(FG._prepare_grid_kernel.arg_names, prep_args))
    gemm = dict(zip(FG._sphere_conv_fwd_grid_kernel.arg_names, gemm_args))
    n, c_in, h, w = inp.x.shape
    hq, wq = FG.grid_pitches(h, w, 1, 1, h, w)
    assert (hq, wq) == (h + 1, w + 1)
    expect = torch.zeros(n, hq, wq, 32, dtype=torch.float64)
    expect[:, 1:, 1:, :c_in] = inp.x.double().permute(0, 2, 3, 1).cpu()
    grid_x = prep["grid_ptr"]
    assert grid_x.shape == (n * hq * wq, 32)
    assert torch.equal(grid_x.double().cpu(), expect.reshape(n * hq * wq, 32))
    assert_close(prep["q_ptr"][0], expect.pow(2).sum(-1).reshape(-1), 1e-5, 0.0, "q")
    assert gemm["x_desc"].base is grid_x and gemm["c_pad"] == 32
    assert gemm["m_grid"] == n * hq * wq and gemm["w_q"] == wq


@pytest.mark.usefixtures("tf32_allowed")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_strided_grid_phase_planes(channels_last, monkeypatch):
    """At stride 2 the preparation launch writes four phase planes, built here with torch from
    the zero-padded input (plane (a, b) = padded[a::2, b::2], Ho + 1 rows of Wo + 1 columns);
    q their rows' sums of squares; the GEMM reads the planes through the offsets it is given."""
    inp = make_conv_inputs(**GRID_CASES["3x3_s2"], operator="cosine", dtype=torch.float16,
                           device=DEVICE, channels_last=channels_last)
    (y, c, r_x), launched = _run_grid(inp, monkeypatch)
    _check_against_reference(inp, (y, c, r_x), torch.float16, 0.0, 1e-3)
    (_, _, prep_args), (_, _, gemm_args) = launched
    prep = dict(zip(FG._prepare_grid_kernel.arg_names, prep_args))
    gemm = dict(zip(FG._sphere_conv_fwd_grid_kernel.arg_names, gemm_args))
    n, c_in, h, w = inp.x.shape
    ho, wo = y.shape[2:]
    hq, wq, planes_h, planes_w = FG.strided_grid_geometry((h, w), (ho, wo), (3, 3), (2, 2),
                                                          (1, 1), (1, 1))
    assert (hq, wq, planes_h, planes_w) == (ho + 1, wo + 1, 2, 2)
    padded = torch.zeros(n, 2 * hq + 1, 2 * wq + 1, 32, dtype=torch.float64)
    padded[:, 1:h + 1, 1:w + 1, :c_in] = inp.x.double().permute(0, 2, 3, 1).cpu()
    planes = [padded[:, a::2, b::2][:, :hq, :wq] for a in range(2) for b in range(2)]
    expect = torch.stack(planes).reshape(4 * n * hq * wq, 32)
    assert torch.equal(prep["grid_ptr"].double().cpu(), expect)
    assert_close(prep["q_ptr"][0], expect.pow(2).sum(-1), 1e-5, 0.0, "q")
    m = n * hq * wq
    assert (gemm["m_grid"], gemm["m_total"], gemm["plane_rows_h"], gemm["plane_rows_w"]) == \
        (m, 4 * m, 2 * m, m)


@pytest.mark.usefixtures("tf32_allowed")
def test_grid_reads_an_aligned_1x1_input_where_it_lies(monkeypatch):
    """1x1, no padding, channels_last with C_in/G a multiple of 16: the descriptor is built on
    x itself and the preparation launch stages nothing (STAGE_X off), NCHW is staged."""
    for channels_last, staged in ((True, False), (False, True)):
        inp = make_conv_inputs(**GRID_CASES["1x1"], operator="linear", device=DEVICE,
                               channels_last=channels_last)
        launches, flags = record_launches(monkeypatch, FG, "launch")
        out = _run_kernel(inp, grid_path=True, patch_norms="prepass")
        _check_against_reference(inp, out, torch.float32, *_grid_tolerances(
            torch.float32, 1e-5, 1e-5))
        assert flags[0]["STAGE_X"] is staged
        base = dict(zip(FG._sphere_conv_fwd_grid_kernel.arg_names, launches[1][2]))["x_desc"].base
        assert (base.data_ptr() == inp.x.data_ptr()) is not staged
        monkeypatch.undo()


@pytest.mark.usefixtures("tf32_allowed")
def test_grid_packs_a_misaligned_weight_view(monkeypatch):
    """A channels_last weight is the packed filters as it lies, unless its address is not a
    multiple of 16 bytes (a TMA descriptor's base must be): then it is copied."""
    inp = make_conv_inputs(**GRID_CASES["3x3_same"], operator="linear", dtype=torch.float16,
                           device=DEVICE, channels_last=True)
    inp.w = inp.w[:, :16].contiguous(memory_format=torch.channels_last)
    inp.x = inp.x[:, :16].contiguous(memory_format=torch.channels_last)
    c_out, cg, kh, kw = inp.w.shape
    storage = torch.empty(inp.w.numel() + 1, dtype=inp.w.dtype, device=DEVICE)
    shifted = storage[1:].view(c_out, kh, kw, cg).permute(0, 3, 1, 2)
    shifted.copy_(inp.w)
    for w, copied in ((inp.w, False), (shifted, True)):
        inp.w = w
        out, launched = _run_grid(inp, monkeypatch)
        _check_against_reference(inp, out, torch.float16, 0.0, 1e-3)
        base = dict(zip(FG._sphere_conv_fwd_grid_kernel.arg_names, launched[1][2]))["w_desc"].base
        assert (base.data_ptr() != w.data_ptr()) is copied
        monkeypatch.undo()


@pytest.mark.usefixtures("tf32_allowed")
@pytest.mark.parametrize("cfg", FG.conv_fwd_grid_configs(),
                         ids=lambda c: f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x"
                                       f"{c.kwargs['BLOCK_K']}w{c.num_warps}")
def test_grid_every_gpu_config(cfg, monkeypatch):
    """Every GPU tile of the grid path, forced, on a 64-channel conv (every BLOCK_K divides
    its Cp) whose tiles are mostly grid rows that are no output pixel or past the end."""
    inp = make_conv_inputs(n=1, c_in=64, h=5, w=6, c_out=20, kernel=3, padding=1,
                           operator="sigmoid", device=DEVICE, channels_last=True)
    out, _ = _run_grid(inp, monkeypatch, config=cfg)
    _check_against_reference(inp, out, torch.float32, *_grid_tolerances(
        torch.float32, 1e-5, 1e-5))


@pytest.mark.usefixtures("tf32_allowed")
@pytest.mark.parametrize("dtype, rtol, atol", DTYPE_TOLS)
@pytest.mark.parametrize("case", ["3x3_same", "3x3_s2"])
def test_grid_hard_inputs(case, dtype, rtol, atol, monkeypatch):
    """Zero patches (image 0: r_x = sqrt(eps), c = 0, y = bias) and a NaN pixel (NaN exactly in
    the outputs whose window holds it) on the grid path."""
    inp = make_conv_inputs(**GRID_CASES[case], operator="sigmoid", dtype=dtype,
                           device=DEVICE, channels_last=True)
    x = inp.x.clone()
    x[0] = 0
    x[1, 3, 2, 4] = float("nan")
    inp.x = x
    (y, c, r_x), _ = _run_grid(inp, monkeypatch)
    (y64, _, _), _ = _references(inp)
    assert torch.equal(torch.isnan(y).cpu(), torch.isnan(y64))
    assert 0 < int(torch.isnan(y64).sum()) < y64[1].numel()
    assert (c[0] == 0).all()
    assert torch.allclose(r_x[0], torch.full_like(r_x[0], math.sqrt(EPS)), rtol=1e-6, atol=0)
    _check_against_reference(inp, (y, c, r_x), dtype, *_grid_tolerances(dtype, rtol, atol))


def test_grid_path_rule():
    """Where the grid path applies: any stride, C_in/G >= 16, 16-bit or tf32, pre-pass norms,
    every phase plane's rows (and a window's reach) within int32."""
    x = torch.empty(2, 32, 8, 8, dtype=torch.bfloat16)
    w = torch.empty(16, 32, 3, 3, dtype=torch.bfloat16)

    def applies(x=x, w=w, stride=(1, 1), precision="ieee", norms="prepass"):
        return FG.grid_path_applies(x, w, stride, (1, 1), (1, 1), (8, 8), precision, norms)
    assert applies() and applies(stride=(2, 2)) and applies(stride=(1, 2))
    assert not applies(norms="fused")
    assert not applies(x=x[:, :8], w=w[:, :8])             # C_in/G = 8: flat K loop
    assert not applies(w=w[:, :8])                         # groups=4: C_in/G = 8
    assert not applies(x=x.float(), w=w.float())           # exact fp32
    assert applies(x=x.float(), w=w.float(), precision="tf32")
    huge = torch.empty(2 ** 31 // 81 + 1, 32, 8, 8, dtype=torch.bfloat16, device="meta")
    assert not applies(x=huge)                             # grid rows past int32
    # stride 2 (output 8x8 kept: the rule reads the given out_hw): 4 planes of 9 x 9 rows
    big = torch.empty(2 ** 31 // 324 + 1, 32, 16, 16, dtype=torch.bfloat16, device="meta")
    assert applies(x=big[:2 ** 31 // 324 - 16], stride=(2, 2))
    assert not applies(x=big, stride=(2, 2))


def test_grid_path_needs_tma_on_cuda(monkeypatch):
    """On CUDA only devices with TMA (compute capability >= 9) take the grid path, asked once
    a device."""
    asked = []

    def capability(index):
        asked.append(index)
        return {0: (8, 0), 1: (9, 0)}[index]
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(FG, "_TMA_BY_DEVICE", {})
    assert not FG.has_tma(torch.device("cuda", 0)) and FG.has_tma(torch.device("cuda", 1))
    assert FG.has_tma(torch.device("cuda", 1)) and asked == [0, 1]


def test_grid_path_is_opt_in(monkeypatch):
    """Unless asked (SPHEREOPS_FWD_GRID=1, grid_path=True) the conv_fwd kernel runs; with the
    switch on, an eligible conv takes the grid, a strided one too."""
    inp = make_conv_inputs(**GRID_CASES["3x3_same"], operator="linear", dtype=torch.float16,
                           device=DEVICE, channels_last=True)
    launched = _record_launches(monkeypatch)
    _run_kernel(inp)
    assert launched[-1][0] in GEMM_FORWARD
    monkeypatch.setattr(FG, "ENABLED", True)
    grid_launches, grid_flags = record_launches(monkeypatch, FG, "launch")
    _check_against_reference(inp, _run_kernel(inp), torch.float16, 0.0, 1e-3)
    assert grid_launches[-1][0] is FG._sphere_conv_fwd_grid_autotuned
    inp.stride = (2, 2)
    _check_against_reference(inp, _run_kernel(inp), torch.float16, 0.0, 1e-3)
    assert grid_launches[-1][0] is FG._sphere_conv_fwd_grid_autotuned and len(grid_launches) == 4
    assert grid_flags[-1]["STRIDE_H"] == grid_flags[-1]["STRIDE_W"] == 2
    inp.stride = (1, 1)   # in-loop norms asked for: the grid path has none
    _check_against_reference(inp, _run_kernel(inp, patch_norms="fused"), torch.float16, 0.0, 1e-3)
    assert launched[-1][0] in GEMM_FORWARD and len(grid_launches) == 4
    # a 1x1 filter (in-loop norms by default on the conv_fwd path) takes the grid all the same
    one = make_conv_inputs(**GRID_CASES["1x1"], operator="linear", dtype=torch.float16,
                           device=DEVICE, channels_last=True)
    _check_against_reference(one, _run_kernel(one), torch.float16, 0.0, 1e-3)
    assert grid_launches[-1][0] is FG._sphere_conv_fwd_grid_autotuned and len(grid_launches) == 6
    # a traced graph (or wrap_triton launches on CUDA) keeps the conv_fwd kernel
    from sphereops_kernels import launch as L
    monkeypatch.setattr(L, "is_graph_tracing", lambda: True)
    _check_against_reference(inp, _run_kernel(inp), torch.float16, 0.0, 1e-3)
    assert launched[-1][0] is F._sphere_conv_fwd_autotuned and len(grid_launches) == 6


def test_plain_launch_rule(monkeypatch):
    """plain_launch: not while a graph is traced; on CUDA only with wrap_triton switched off."""
    from types import SimpleNamespace

    from sphereops_kernels import launch as L
    cpu, cuda = SimpleNamespace(is_cuda=False), SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(L, "is_graph_tracing", lambda: False)
    monkeypatch.setattr(L, "_wrap_triton_enabled", lambda: True)
    assert L.plain_launch(cpu) and not L.plain_launch(cuda)
    monkeypatch.setattr(L, "_wrap_triton_enabled", lambda: False)
    assert L.plain_launch(cpu) and L.plain_launch(cuda)
    monkeypatch.setattr(L, "is_graph_tracing", lambda: True)
    assert not L.plain_launch(cpu) and not L.plain_launch(cuda)


def test_grid_config_pruning():
    """BLOCK_K divides Cp; fp32 boxes of at most 32 channels and 4 warps; N capped by C_out/G."""
    cfgs = FG.conv_fwd_grid_configs()
    y16 = torch.empty(0, dtype=torch.bfloat16)
    y32 = torch.empty(0, dtype=torch.float32)
    kept = configs.prune_conv_fwd_grid_configs(cfgs, {"c_pad": 48, "c_out_per_group": 64,
                                                      "y_ptr": y16})
    assert kept and all(c.kwargs["BLOCK_K"] == 16 for c in kept)
    kept = configs.prune_conv_fwd_grid_configs(cfgs, {"c_pad": 64, "c_out_per_group": 40,
                                                      "y_ptr": y32})
    assert kept and all(c.kwargs["BLOCK_K"] <= 32 and c.num_warps == 4
                        and c.kwargs["BLOCK_N"] <= 64 for c in kept)
    kept = configs.prune_conv_fwd_grid_configs(cfgs, {"c_pad": 128, "c_out_per_group": 256,
                                                      "y_ptr": y16})
    assert len(kept) == len(cfgs)
