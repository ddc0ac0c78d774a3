"""The CUDA tier (``make gpu-check``; every test is marked ``gpu`` and skipped without CUDA).

The compiled fused kernels at realistic sizes (N=32, C=128, 32x32, 3x3 and its relatives)
against the float64 reference ``sphereops.reference.conv2d_autograd`` on the same GPU, forward
and every gradient (dx, dw, db, dk), through the public ``sphereops.sphere_conv2d(...,
backend="triton")`` and autograd; plus a > 2^31-element input (int64 indexing), bitwise
determinism, hard inputs (fp16 with |x| ~ 300, NaN) and ``torch.compile(fullgraph=True)``
keeping the Triton kernels.

Compile time dominates this tier (every (dtype, operator, layout, geometry) is a separate
specialisation of several kernels), so the operator x precision x layout matrix is a covering
design rather than the full product: every operator, every precision (fp32 with tf32 off and on,
fp16, bf16), both layouts and every geometry appear, every (operator, layout) and
(precision, layout) pair appears, and the extra tests reuse those compiled specialisations.

``SPHEREOPS_GPU_REPORT=<file.json>`` records the measured error of every comparison next to its
bound, so a run shows the margins, not only pass/fail.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import sphereops
from sphereops import reference

from helpers import assert_close

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:          # `bench` is a folder of the repository, not installed
    sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.gpu

EPS = 1e-4
DEVICE = "cuda"

# (relative-norm tolerance, absolute tolerance) of assert_close per precision. tf32 rounds the
# GEMM operands to 10 mantissa bits; fp16/bf16 round inputs, saved state and outputs.
TOLERANCES = {
    "fp32": (1e-4, 1e-4),
    "tf32": (5e-3, 5e-3),
    "fp16": (5e-3, 5e-3),
    "bf16": (3e-2, 3e-2),
}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
          "bf16": torch.bfloat16}

# name -> (N, C_in, C_out, H=W, kernel, stride, padding, groups)
GEOMETRIES = {
    # 31 images of 28x28: 24304 pixels, a partial last 128-pixel tile, and image boundaries
    # inside tiles -- where the NCHW epilogues' aligned runs of 8 (16-bit) or 4 (fp32) pixels
    # (launch.pixel_run) must still stay inside one plane
    "3x3": (31, 128, 128, 28, 3, 1, 1, 1),
    "3x3_s2": (32, 128, 256, 32, 3, 2, 1, 1),
    "1x1": (32, 128, 256, 32, 1, 1, 0, 1),
    "depthwise": (32, 128, 128, 32, 3, 1, 1, 128),
    "depthwise_s2": (32, 96, 96, 33, 3, 2, 1, 96),
    "depthwise_5x5": (16, 64, 64, 28, 5, 1, 2, 64),
    "grouped": (32, 128, 128, 32, 3, 1, 1, 4),
    # 64 x 32 x 32 = 65536 output pixels: 1024 prep rows, the two-level partial reduction (its
    # first level in the dgrad launch)
    "3x3_big_batch": (64, 64, 64, 32, 3, 1, 1, 1),
}

# (operator, precision, channels_last, geometry): the covering design described above.
CASES = [
    ("cosine", "fp32", False, "3x3"),
    ("linear", "tf32", True, "3x3"),
    ("sigmoid", "fp16", False, "3x3"),
    ("sigmoid", "bf16", True, "3x3"),
    ("cosine", "bf16", False, "3x3_s2"),
    ("linear", "fp16", True, "1x1"),
    ("sigmoid", "tf32", False, "depthwise"),
    # the depthwise path recomputes c and r_x in the backward: the benchmark's dtype and layout,
    # and stride 2 on an odd size (input pixels no tap reaches; ragged tiles)
    ("linear", "bf16", True, "depthwise"),
    ("cosine", "fp16", True, "depthwise_s2"),
    # a filter over the cached taps: columns loaded in every window, the rolled grad taps
    ("sigmoid", "bf16", True, "depthwise_5x5"),
    # NCHW depthwise: row tiles read along the pixels, the backward's state in planes, stride 2
    # on an odd size (33 -> 17: rows of 17 in 32-wide tiles)
    ("linear", "bf16", False, "depthwise_s2"),
    ("cosine", "fp32", True, "grouped"),
    ("linear", "bf16", False, "grouped"),
    ("cosine", "fp16", True, "3x3_s2"),
]

_RECORDS = []


@pytest.fixture(scope="module", autouse=True)
def _error_report():
    yield
    path = os.environ.get("SPHEREOPS_GPU_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                       "records": _RECORDS}, f, indent=1)


@pytest.fixture
def precision(request):
    """Sets PyTorch's tf32 switches (which the kernels follow) for one test, then restores."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    name = request.param
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    yield name
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _check(test, name, out, ref, rtol, atol):
    """assert_close, after recording the error and its bound."""
    o, r = out.detach().double(), ref.detach().double()
    finite = torch.isfinite(r)
    diff = (o - r).abs()[finite]
    scale = r[finite].abs().max().item() if finite.any() else 0.0
    rel = ((o - r)[finite].norm() / r[finite].norm().clamp_min(1e-300)).item()
    _RECORDS.append({"test": test, "name": name, "rel_norm_err": rel, "rtol": rtol,
                     "max_abs_err": diff.max().item() if diff.numel() else 0.0,
                     "max_abs_bound": atol + rtol * scale})
    assert_close(out, ref, rtol=rtol, atol=atol, name=f"{test}: {name}")


def _make_inputs(operator, dtype, channels_last, geometry, scale=1.0):
    n, c_in, c_out, hw, kernel, stride, padding, groups = GEOMETRIES[geometry]
    x = torch.randn(n, c_in, hw, hw, device=DEVICE, dtype=torch.float64) * scale
    w = torch.randn(c_out, c_in // groups, kernel, kernel, device=DEVICE, dtype=torch.float64)
    b = 0.1 * torch.randn(c_out, device=DEVICE, dtype=torch.float64)
    k = (0.2 + 0.6 * torch.rand(c_out, device=DEVICE, dtype=torch.float64)
         if operator == "sigmoid" else None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(dtype).contiguous(memory_format=fmt)
    w, b = w.to(dtype), b.to(dtype)
    k = k.to(dtype) if k is not None else None
    return x, w, b, k, dict(stride=stride, padding=padding, groups=groups)


def _fused_and_reference(x, w, b, k, conv, operator, dy=None, save_output=False,
                         reference_too=True):
    """Fused forward + backward and the float64 autograd reference on the same inputs (the
    reference None without ``reference_too``)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in (x, w, b, k)]
    y = sphereops.sphere_conv2d(*leaves[:3], operator=operator, k=leaves[3], eps=EPS,
                                backend="triton", save_output=save_output, **conv)
    if dy is None:
        dy = torch.randn_like(y, dtype=torch.float64)
    y.backward(dy.to(y.dtype))
    fused = [y] + [t.grad for t in leaves if t is not None]
    names = ["y", "dx", "dw", "db"] + (["dk"] if k is not None else [])
    if not reference_too:
        return names, fused, None

    leaves64 = [t.detach().double().requires_grad_(True) if t is not None else None
                for t in (x, w, b, k)]
    y64 = reference.conv2d_autograd(*leaves64[:3], leaves64[3], (conv["stride"],) * 2,
                                    (conv["padding"],) * 2, (1, 1), conv["groups"], operator, EPS)
    y64.backward(dy.double())
    ref = [y64] + [t.grad for t in leaves64 if t is not None]
    return names, fused, ref


@pytest.mark.parametrize("operator, precision, channels_last, geometry", CASES,
                         indirect=["precision"],
                         ids=[f"{o}-{p}-{'nhwc' if cl else 'nchw'}-{g}" for o, p, cl, g in CASES])
def test_forward_backward_vs_float64(operator, precision, channels_last, geometry, request):
    x, w, b, k, conv = _make_inputs(operator, DTYPES[precision], channels_last, geometry)
    names, fused, ref = _fused_and_reference(x, w, b, k, conv, operator)
    y, dx = fused[0], fused[1]
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    rtol, atol = TOLERANCES[precision]
    for name, out, expected in zip(names, fused, ref):
        _check(request.node.name, name, out, expected, rtol, atol)


@pytest.mark.parametrize("operator, precision", [("linear", "bf16"), ("cosine", "fp16")],
                         indirect=["precision"])
def test_save_output_vs_float64(operator, precision, request):
    """save_output: the forward without its c store, the backward recovering c from y and the
    bias in the prep pass (channels_last, the training layout), against float64 autograd."""
    x, w, b, k, conv = _make_inputs(operator, DTYPES[precision], True, "3x3")
    names, fused, ref = _fused_and_reference(x, w, b, k, conv, operator, save_output=True)
    rtol, atol = TOLERANCES[precision]
    for name, out, expected in zip(names, fused, ref):
        _check(request.node.name, name, out, expected, rtol, atol)


@pytest.mark.parametrize("precision", ["fp16"], indirect=True)
def test_fp16_large_magnitude_and_nan(precision, request):
    """|x| ~ 300 (x^2 overflows fp16: the norms must accumulate in fp32) and a NaN pixel that
    must come out as NaN exactly where its windows reach (the float64 reference says where)."""
    x, w, b, k, conv = _make_inputs("sigmoid", torch.float16, False, "3x3", scale=300.0)
    assert x.abs().max().item() > 256  # x^2 > fp16 max somewhere
    names, fused, ref = _fused_and_reference(x, w, b, k, conv, "sigmoid")
    rtol, atol = TOLERANCES["fp16"]
    for name, out, expected in zip(names, fused, ref):
        _check(request.node.name + "[x300]", name, out, expected, rtol, atol)

    x = x / 300
    x[3, 5, 7, 9] = float("nan")
    y = sphereops.sphere_conv2d(x, w, b, operator="sigmoid", k=k, eps=EPS, backend="triton",
                                **conv)
    y64 = reference.conv2d_autograd(x.double(), w.double(), b.double(), k.double(), (1, 1),
                                    (1, 1), (1, 1), 1, "sigmoid", EPS)
    assert int(torch.isnan(y64).sum()) == w.shape[0] * 9  # all channels, 3x3 neighbourhood
    _check(request.node.name + "[nan]", "y", y, y64, rtol, atol)  # checks the NaN pattern too


@pytest.mark.parametrize("precision", ["fp16"], indirect=True)
def test_bitwise_deterministic(precision):
    """Two identical fwd+bwd runs give bitwise identical outputs and gradients (no atomics)."""
    x, w, b, k, conv = _make_inputs("sigmoid", torch.float16, False, "3x3")
    dy = torch.randn(x.shape[0], w.shape[0], x.shape[2], x.shape[3], device=DEVICE,
                     dtype=torch.float64)
    runs = []
    for _ in range(2):
        names, fused, _ = _fused_and_reference(x, w, b, k, conv, "sigmoid", dy=dy,
                                               reference_too=False)
        runs.append(fused)
    for name, first, second in zip(names, *runs):
        assert torch.equal(first, second), f"{name} differs between two identical runs"


@pytest.mark.parametrize("precision", ["bf16"], indirect=True)
@pytest.mark.parametrize("operator, channels_last, geometry", [
    ("sigmoid", True, "3x3"), ("cosine", False, "3x3_s2"), ("linear", True, "depthwise")])
def test_direct_launches_match_triton_path(operator, channels_last, geometry, precision,
                                           request, monkeypatch):
    """Kept plans call their compiled kernels directly from the second or third call of a
    signature on (plans.LaunchMemo): four calls with direct launches -- the first checked
    against float64 -- give bitwise what every launch through triton's JITFunction.run gives
    (SPHEREOPS_DIRECT_LAUNCH=0), and the later calls do launch directly."""
    from bench.stand_in_gpu import clear_kept_plans, counted_jit_runs
    from sphereops_kernels import launch
    x, w, b, k, conv = _make_inputs(operator, torch.bfloat16, channels_last, geometry)
    y_shape = sphereops.sphere_conv2d(x, w, b, operator=operator, k=k, **conv).shape
    dy = torch.randn(y_shape, device=DEVICE, dtype=torch.float64)
    results = {}
    with counted_jit_runs() as jit_runs:
        for direct in (False, True):
            monkeypatch.setattr(launch, "DIRECT_LAUNCH", direct)
            clear_kept_plans()
            calls = []
            for call in range(4):
                jit_runs[0] = 0
                names, fused, ref = _fused_and_reference(x, w, b, k, conv, operator, dy=dy,
                                                         reference_too=call == 0 and direct)
                calls.append((fused, jit_runs[0]))
                if ref is not None:
                    rtol, atol = TOLERANCES["bf16"]
                    for name, o, r in zip(names, fused, ref):
                        _check(request.node.name, name, o, r, rtol, atol)
            results[direct] = calls
    for call, ((direct_out, _), (plain_out, _)) in enumerate(zip(results[True],
                                                                 results[False])):
        for name, d, p in zip(names, direct_out, plain_out):
            assert torch.equal(d, p), f"call {call}: {name} differs from triton's path"
    # from the third call on every launch is direct (the forward GEMM's from its second)
    assert [n_jit for _, n_jit in results[True][2:]] == [0, 0], results[True]
    assert results[False][3][1] > 0


@pytest.mark.parametrize("precision", ["bf16"], indirect=True)
@pytest.mark.parametrize("geometry, splits", [("3x3", (2, 5, 8, 9)), ("3x3_big_batch", (8,))])
def test_wgrad_finishing_dw_vs_float64_and_bitwise(geometry, splits, precision, request,
                                                   monkeypatch):
    """The wgrad's last split of each tile finishes dw (a counter a tile, an acq_rel atomic after
    a barrier: conv_bwd.count_and_finish_wgrad_tile) -- the interpreter runs programs one after
    another, so only a GPU can show a race: at 2, 5 and 8 splits (finished in the wgrad) and 9
    (the finalize launch), dw against float64 and bitwise the same over three runs; a big batch
    also runs its reduction's first level in the dgrad launch."""
    from sphereops_kernels import conv_bwd
    x, w, b, k, conv = _make_inputs("linear", torch.bfloat16, True, geometry)
    dy = torch.randn(x.shape[0], w.shape[0], x.shape[2], x.shape[3], device=DEVICE,
                     dtype=torch.float64)
    rtol, atol = TOLERANCES["bf16"]
    names, _, ref = _fused_and_reference(x, w, b, k, conv, "linear", dy=dy)
    for split in splits:
        monkeypatch.setattr(conv_bwd, "_wgrad_split", lambda *args, s=split: s)
        runs = [_fused_and_reference(x, w, b, k, conv, "linear", dy=dy, reference_too=False)
                for _ in range(3)]
        fused = runs[0][1]
        for name, out, expected in zip(names, fused, ref):
            _check(f"{request.node.name}[split={split}]", name, out, expected, rtol, atol)
        for _, other, _ in runs[1:]:
            for name, first, again in zip(names, fused, other):
                assert torch.equal(first, again), f"split={split}: {name} differs between runs"


@pytest.mark.parametrize("precision", ["bf16"], indirect=True)
def test_input_over_2_31_elements(precision, request):
    """x [2049, 64, 128, 128] bf16 (2^31 + 2^20 elements): the last image starts past 2^31."""
    n, c_in, c_out, hw = 2049, 64, 16, 128
    assert n * c_in * hw * hw > 2 ** 31
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30:
        pytest.skip("needs a GPU with >= 40 GiB")
    _check_batch_edges(request.node.name, n, c_in, c_out, hw)


def _check_batch_edges(test, n, c_in, c_out, hw):
    """Sigmoid 3x3 conv of x [n, c_in, hw, hw] bf16; the first and last images are checked.

    dy is zero except on the last image, so dx must vanish elsewhere and dw/db/dk come from the
    last image alone: each is checked against the float64 reference of that one image, which
    exercises the int64 offsets of the forward, dgrad and wgrad kernels."""
    x = torch.empty(n, c_in, hw, hw, device=DEVICE, dtype=torch.bfloat16).normal_()
    w = torch.randn(c_out, c_in, 3, 3, device=DEVICE, dtype=torch.bfloat16)
    b = (0.1 * torch.randn(c_out, device=DEVICE)).to(torch.bfloat16)
    k = (0.2 + 0.6 * torch.rand(c_out, device=DEVICE)).to(torch.bfloat16)
    leaves = [t.requires_grad_(True) for t in (x, w, b, k)]
    y = sphereops.sphere_conv2d(*leaves[:3], padding=1, operator="sigmoid", k=leaves[3],
                                eps=EPS, backend="triton")
    dy = torch.zeros_like(y)
    dy[-1] = torch.randn_like(dy[-1])
    y.backward(dy)
    rtol, atol = TOLERANCES["bf16"]
    for image in (0, n - 1):
        y64 = reference.conv2d_autograd(x[image:image + 1].detach().double(), w.detach().double(),
                                        b.detach().double(), k.detach().double(), (1, 1), (1, 1),
                                        (1, 1), 1, "sigmoid", EPS)
        _check(test, f"y[{image}]", y[image:image + 1], y64, rtol, atol)
    assert not bool(x.grad[:-1].any()), "dx is non-zero on images whose dy is zero"

    last = [t.detach()[-1:].double().requires_grad_(True) if i == 0 else
            t.detach().double().requires_grad_(True) for i, t in enumerate((x, w, b, k))]
    y64 = reference.conv2d_autograd(*last[:3], last[3], (1, 1), (1, 1), (1, 1), 1, "sigmoid", EPS)
    y64.backward(dy[-1:].double())
    for name, out, t64 in zip(("dx[-1]", "dw", "db", "dk"),
                              (x.grad[-1:], w.grad, b.grad, k.grad), last):
        _check(test, name, out, t64.grad, rtol, atol)


@pytest.mark.parametrize("precision", ["bf16"], indirect=True)
def test_torch_compile_fullgraph_keeps_triton_kernels(precision, request):
    """Inductor traces the triton_op and emits our kernels (forward and backward) in its code."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    x, w, b, k, conv = _make_inputs("cosine", torch.bfloat16, True, "3x3")
    dy = torch.randn(x.shape[0], w.shape[0], x.shape[2], x.shape[3], device=DEVICE,
                     dtype=torch.bfloat16)

    def layer(x, w, b):
        return sphereops.sphere_conv2d(x, w, b, operator="cosine", eps=EPS, backend="triton",
                                       **conv)

    compiled = torch.compile(layer, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]

    def step():
        y = compiled(*leaves)
        y.backward(dy)
        return y

    y, codes = run_and_get_code(step)
    code = "\n".join(codes)
    for kernel in ("_sphere_conv_fwd_kernel", "_dgrad_kernel", "_wgrad_kernel"):
        assert kernel in code, f"{kernel} not in Inductor's output code"

    names, eager, ref = _fused_and_reference(x, w, b, None, conv, "cosine", dy=dy.double())
    rtol, atol = TOLERANCES["bf16"]
    for name, out, expected, same in zip(names, [y] + [t.grad for t in leaves], ref, eager):
        _check(request.node.name, name, out, expected, rtol, atol)
        torch.testing.assert_close(out, same, rtol=2e-2, atol=2e-2)  # compiled ~ eager


@pytest.mark.parametrize("precision", ["bf16"], indirect=True)
def test_cuda_graph_replay_matches_eager(precision):
    """The benchmark's device times replay the calls from a CUDA graph: a captured forward +
    backward (sigmoid: k's value check must stay off the capturing stream) replays to the eager
    results bit for bit, and ``bench.timing.measure_graph`` times it."""
    from bench import timing

    x, w, b, k, conv = _make_inputs("sigmoid", torch.bfloat16, True, "3x3")
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, k)]
    dy = torch.randn(x.shape[0], w.shape[0], x.shape[2], x.shape[3], device=DEVICE,
                     dtype=torch.bfloat16)

    def step(_i=0):
        y = sphereops.sphere_conv2d(*leaves[:3], operator="sigmoid", k=leaves[3], eps=EPS,
                                    backend="triton", **conv)
        return (y,) + torch.autograd.grad(y, leaves, dy)

    # detached: a live autograd graph keeps the leaves' AccumulateGrad nodes, whose stream (the
    # default one) the captured backward would then have to sync with -- illegal while capturing
    # ("operation would make the legacy stream depend on a capturing blocking stream", H200)
    eager = [t.detach() for t in step()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for name, e, c in zip(("y", "dx", "dw", "db", "dk"), eager, captured):
        assert torch.equal(e, c), f"{name}: graph replay differs from the eager call"
    del graph, captured
    res = timing.measure_graph(step, torch.device(DEVICE), 1, eager_ms=1.0)
    assert res["graph_ms"] > 0 and res["graph_calls"] >= 3


@pytest.mark.parametrize("precision", ["bf16"], indirect=True)
def test_odd_geometry_vs_float64(precision, request):
    """The benchmark's ``edge.odd`` layer (N=37, 29 -> 61 channels, 33x33, 5x5, padding 4,
    dilation 2; bf16, x and w channels_last, linear): the H200 runs of 20261127-1403 and -1540
    got dw wrong (relative error 1.4; y, dx, db within 3e-3) while the interpreter gets it
    right -- a GPU-only fault of the wgrad kernel's constexpr-divisor build, which
    conv_bwd._wgrad_runtime_div now avoids (bench.wgrad_probe). Odd channel counts, a 5x5
    dilated filter and more than 512 prep rows (the two-level partial reduction) appear in no
    other GPU test."""
    from helpers import make_conv_inputs

    inp = make_conv_inputs(n=37, c_in=29, h=33, w=33, c_out=61, kernel=(5, 5), stride=1,
                           padding=4, dilation=2, groups=1, operator="linear", bias=True,
                           dtype=torch.bfloat16, device=DEVICE, channels_last=True)
    x, w, b = inp.x, inp.w.contiguous(memory_format=torch.channels_last), inp.bias
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    y = sphereops.sphere_conv2d(*leaves, padding=4, dilation=2, operator="linear", eps=EPS,
                                backend="triton")
    dy = torch.randn_like(y, dtype=torch.float64)
    fused = [y] + list(torch.autograd.grad(y, leaves, dy.to(y.dtype)))
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    y64 = reference.conv2d_autograd(*leaves64, None, (1, 1), (4, 4), (2, 2), 1, "linear", EPS)
    ref = [y64] + list(torch.autograd.grad(y64, leaves64, dy))
    rtol, atol = TOLERANCES["bf16"]
    for name, out, expected in zip(("y", "dx", "dw", "db"), fused, ref):
        _check(request.node.name, name, out, expected, rtol, atol)


@pytest.mark.parametrize("precision", ["bf16"], indirect=True)
@pytest.mark.parametrize("layer", ["cin3_5x5", "odd_nchw"])
def test_flat_wgrad_and_staged_input_vs_float64(layer, precision, request):
    """Code paths no other GPU test takes at size: a first layer (3 -> 64 channels, 5x5: the
    flat-K wgrad, whose pixel divisions are constants since C_out is a multiple of 16 -- the
    constant-divisor build of the per-tap wgrad went wrong on an H200 for odd channel counts)
    and an odd-channel NCHW input (29 -> 40 channels: staged input, padded Hn / w_hat rows).
    bf16, linear, y and every gradient against float64."""
    from helpers import make_conv_inputs

    geo = (dict(n=64, c_in=3, c_out=64, h=32, w=32, kernel=(5, 5), padding=2, dilation=1)
           if layer == "cin3_5x5" else
           dict(n=16, c_in=29, c_out=40, h=30, w=30, kernel=(3, 3), padding=1, dilation=1))
    inp = make_conv_inputs(**geo, stride=1, groups=1, operator="linear", bias=True,
                           dtype=torch.bfloat16, device=DEVICE,
                           channels_last=layer == "cin3_5x5")
    pad, dil = (geo["padding"],) * 2, (geo["dilation"],) * 2
    leaves = [t.detach().clone().requires_grad_(True) for t in (inp.x, inp.w, inp.bias)]
    y = sphereops.sphere_conv2d(*leaves, padding=pad, dilation=dil, operator="linear", eps=EPS,
                                backend="triton")
    dy = torch.randn_like(y, dtype=torch.float64)
    fused = [y] + list(torch.autograd.grad(y, leaves, dy.to(y.dtype)))
    leaves64 = [t.detach().double().requires_grad_(True) for t in (inp.x, inp.w, inp.bias)]
    y64 = reference.conv2d_autograd(*leaves64, None, (1, 1), pad, dil, 1, "linear", EPS)
    ref = [y64] + list(torch.autograd.grad(y64, leaves64, dy))
    rtol, atol = TOLERANCES["bf16"]
    for name, out, expected in zip(("y", "dx", "dw", "db"), fused, ref):
        _check(request.node.name, name, out, expected, rtol, atol)


@pytest.mark.parametrize("precision", ["bf16"], indirect=True)
@pytest.mark.parametrize("geometry", ["3x3", "3x3_s2", "grouped"])
def test_prepass_patch_norms_vs_float64(geometry, precision, request):
    """The forward with patch_norms="prepass" (channel sums of squares first, a window sum after
    the K loop) at realistic sizes against float64; r_x equal to the fused path's to fp32
    rounding."""
    from sphereops_kernels import conv_fwd

    x, w, b, _, conv = _make_inputs("linear", torch.bfloat16, True, geometry)
    geo = ((conv["stride"],) * 2, (conv["padding"],) * 2, (1, 1), conv["groups"])
    y, _, r_x = conv_fwd.sphere_conv2d_fwd(x, w, b, None, *geo, "linear", EPS,
                                           patch_norms="prepass")
    _, _, r_x_fused = conv_fwd.sphere_conv2d_fwd(x, w, b, None, *geo, "linear", EPS,
                                                 patch_norms="fused")
    y64, _, _ = reference.conv2d_forward(x.double(), w.double(), b.double(), None, *geo,
                                         "linear", EPS)
    rtol, atol = TOLERANCES["bf16"]
    _check(request.node.name, "y", y, y64, rtol, atol)
    torch.testing.assert_close(r_x, r_x_fused, rtol=1e-5, atol=0)


def _seeded_bf16_conv(seed, n, c_in, c_out, hw, kernel, padding, dilation, channels_last,
                      stride=1):
    """``(x, w, b, geometry, float64 reference forward)`` of a bf16 conv (linear), the same
    inputs on every run (a CPU generator seeded with ``seed``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, c_in, hw, hw, generator=gen).to(DEVICE, torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, kernel, kernel, generator=gen).to(DEVICE, torch.bfloat16)
    b = (0.1 * torch.randn(c_out, generator=gen)).to(DEVICE, torch.bfloat16)
    geo = ((stride,) * 2, (padding,) * 2, (dilation,) * 2, 1)
    ref = reference.conv2d_forward(x.double(), w.double(), b.double(), None, *geo, "linear",
                                   EPS)
    return x, w, b, geo, ref


# (N, C_in, C_out, H=W, kernel, padding, dilation): a ResNet-like 3x3 layer, the benchmark's
# odd edge case shrunk in N (odd channel counts, 5x5, dilated: every mask is partial) and a
# ResNet-50-like 1x1 reduction (the fused path's 8-warp tile)
CONFIG_GEOMETRIES = {"3x3": (32, 128, 128, 32, 3, 1, 1), "odd_5x5_d2": (8, 29, 61, 33, 5, 4, 2),
                     "1x1": (32, 256, 64, 28, 1, 0, 1)}


@pytest.mark.parametrize("precision", ["bf16"], indirect=True)
@pytest.mark.parametrize("patch_norms", ["prepass", "fused"])
@pytest.mark.parametrize("geometry", sorted(CONFIG_GEOMETRIES))
def test_every_forward_config_vs_float64(geometry, patch_norms, precision, request):
    """Every autotune config the launcher may pick for this shape (after pruning), launched
    directly, against float64: r_x to fp32 rounding and y to twice bf16's output rounding --
    much tighter than the tier's bf16 tolerance, since the H200 tile sweep of 20261127-1540
    found tiles whose norms were off by 4e-3 to 0.12 relative (fused norms), which a loose
    bound would let through. The 8-warp tile is among them for the pre-pass (configs.py)."""
    from sphereops_kernels import configs, conv_fwd

    n, c_in, c_out, hw, kernel, padding, dilation = CONFIG_GEOMETRIES[geometry]
    x, w, b, geo, (y64, _, rx64) = _seeded_bf16_conv(3, n, c_in, c_out, hw, kernel, padding,
                                                     dilation, channels_last=True)
    # the same pruning the autotuner applies at launch time (configs.prune_conv_fwd_configs)
    cands = configs.prune_conv_fwd_configs(
        configs.conv_fwd_configs(), dict(c_out_per_group=c_out, c_in_per_group=c_in, KH=kernel,
                                         KW=kernel, x_ptr=x),
        DOT_PRECISION="ieee", NORMS_FROM_Q=patch_norms == "prepass")
    assert cands
    bad = []
    for cfg in cands:
        y, _, r_x = conv_fwd._sphere_conv2d_fwd_impl(x, w, b, None, *geo, "linear", EPS,
                                                     config=cfg, patch_norms=patch_norms)
        rx_err = ((r_x.double() - rx64).norm() / rx64.norm()).item()
        y_err = ((y.double() - y64).norm() / y64.norm()).item()
        _RECORDS.append({"test": request.node.name, "name": f"{cfg}", "rx_rel": rx_err,
                         "y_rel": y_err})
        if not (rx_err <= 1e-5 and y_err <= 5e-3):
            bad.append(f"{cfg}: r_x rel {rx_err:.2e}, y rel {y_err:.2e}")
    assert not bad, "configs off vs float64:\n" + "\n".join(bad)


# (N, C_in, C_out, H=W, kernel, padding, dilation, channels_last[, stride]) for the grid path
# (conv_fwd_grid, SPHEREOPS_FWD_GRID=1): a ResNet-like 3x3 layer; the odd edge case (29
# channels staged to 32, 5x5 dilated, padding past the dilated half filter); a 1x1 reduction
# whose aligned channels_last input is the grid itself; an 8x8 image (a quarter of the grid
# rows no output pixel) from NCHW; the strided ones read phase planes (a SphereResNet-32
# downsampling 3x3, a ResNet projection 1x1 from NCHW)
GRID_GEOMETRIES = {"3x3": (32, 128, 128, 32, 3, 1, 1, True),
                   "odd_5x5_d2": (8, 29, 61, 33, 5, 4, 2, True),
                   "1x1": (32, 256, 64, 28, 1, 0, 1, True),
                   "8x8_nchw": (64, 256, 256, 8, 3, 1, 1, False),
                   "3x3_s2": (64, 96, 192, 32, 3, 1, 1, True, 2),
                   "1x1_s2_nchw": (32, 128, 256, 28, 1, 0, 1, False, 2)}


@pytest.mark.parametrize("precision", ["bf16"], indirect=True)
@pytest.mark.parametrize("geometry", sorted(GRID_GEOMETRIES))
def test_every_grid_config_vs_float64(geometry, precision, request):
    """Every config of the grid path (TMA boxes of the padded grid) the autotuner may pick for
    the shape, launched directly, against float64 with the tight bounds of
    test_every_forward_config_vs_float64 (r_x to fp32 rounding, y to 5e-3 relative)."""
    from sphereops_kernels import configs, conv_fwd, conv_fwd_grid

    x, w, b, geo, (y64, c64, rx64) = _seeded_bf16_conv(5, *GRID_GEOMETRIES[geometry])
    c_in, c_out = x.shape[1], w.shape[0]
    c_pad = conv_fwd_grid.grid_channels(c_in)
    cands = configs.prune_conv_fwd_grid_configs(
        configs.conv_fwd_grid_configs(), dict(c_pad=c_pad, c_out_per_group=c_out, y_ptr=x))
    assert cands
    bad = []
    for cfg in cands:
        y, c, r_x = conv_fwd._sphere_conv2d_fwd_impl(x, w, b, None, *geo, "linear", EPS,
                                                     config=cfg, patch_norms="prepass",
                                                     grid_path=True)
        errs = {name: ((out.double() - ref).norm() / ref.norm()).item()
                for name, out, ref in (("r_x", r_x, rx64), ("y", y, y64), ("c", c, c64))}
        _RECORDS.append({"test": request.node.name, "name": f"{cfg}", **errs})
        if not (errs["r_x"] <= 1e-5 and errs["y"] <= 5e-3 and errs["c"] <= 5e-3):
            bad.append(f"{cfg}: " + ", ".join(f"{k} rel {v:.2e}" for k, v in errs.items()))
    assert not bad, "grid configs off vs float64:\n" + "\n".join(bad)


@pytest.mark.parametrize("precision", ["fp16", "tf32"], indirect=True)
def test_grid_path_forward_backward_vs_float64(precision, request, monkeypatch):
    """SPHEREOPS_FWD_GRID on, through the public op and autograd: the grid forward's y and its
    saved c and r_x feeding the backward, fp16 and tf32, NCHW, sigmoid (per-channel k)."""
    from sphereops_kernels import conv_fwd_grid

    monkeypatch.setattr(conv_fwd_grid, "ENABLED", True)
    x, w, b, k, conv = _make_inputs("sigmoid", DTYPES[precision], False, "3x3")
    names, fused, ref = _fused_and_reference(x, w, b, k, conv, "sigmoid")
    rtol, atol = TOLERANCES[precision]
    for name, out, r in zip(names, fused, ref):
        _check(request.node.name, name, out, r, rtol, atol)


# (N, C_in, C_out, H=W, kernel, padding, dilation, channels_last[, stride]) for the grid dgrad
# (conv_bwd_grid, SPHEREOPS_DGRAD_GRID=1): a ResNet-like 3x3 layer; a 5x5 dilated filter with
# less than "same" padding (margins 4 and 4) on an odd size; a 1x1 expansion (no margins); an
# 8x8 image from NCHW (the quarter-column epilogue); strided: a SphereResNet-32 downsampling
# 3x3 (four phases, 4 / 2 / 2 / 1 taps), a ResNet projection 1x1 from NCHW (three phases
# without taps: dx = 0 there); the benchmark's odd edge case shrunk in N (29 -> 61 channels:
# x staged to 32, Hn's columns and w_hat's rows padded to 64)
DGRAD_GRID_GEOMETRIES = {"3x3": (32, 128, 128, 32, 3, 1, 1, True),
                         "odd_5x5_d2": (8, 29, 61, 33, 5, 4, 2, True),
                         "5x5_d2": (8, 48, 64, 33, 5, 4, 2, True),
                         "1x1": (32, 64, 256, 28, 1, 0, 1, True),
                         "8x8_nchw": (64, 256, 256, 8, 3, 1, 1, False),
                         "3x3_s2": (64, 96, 192, 32, 3, 1, 1, True, 2),
                         "1x1_s2_nchw": (32, 128, 256, 28, 1, 0, 1, False, 2)}


@pytest.mark.parametrize("precision", ["bf16"], indirect=True)
@pytest.mark.parametrize("geometry", sorted(DGRAD_GRID_GEOMETRIES))
def test_every_dgrad_grid_config_vs_float64(geometry, precision, request, monkeypatch):
    """Every config of the grid dgrad the autotuner may pick for the shape, forced, against the
    float64 closed-form backward on the same saved state: dx (the TMA GEMM on Hn's grid) and dw
    (the implicit-GEMM wgrad reading the gridded Hn) within max(5e-3, 2 x the implicit-GEMM
    path's error); then the grid wgrad's dw (x staged onto the forward's grid) likewise, and
    bitwise the same over repeated runs."""
    from sphereops_kernels import configs, conv_bwd, conv_bwd_grid

    n, c_in, c_out, hw, kernel, padding, dilation, channels_last, *stride = \
        DGRAD_GRID_GEOMETRIES[geometry]
    x, w, b, geo, (y64, c64, rx64) = _seeded_bf16_conv(7, n, c_in, c_out, hw, kernel, padding,
                                                       dilation, channels_last, *stride)
    gen = torch.Generator(device="cpu").manual_seed(8)
    dy = torch.randn(y64.shape, generator=gen).to(DEVICE, torch.bfloat16)
    if channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    c, r_x = c64.to(torch.bfloat16), rx64.float()
    args = (dy, x, w, None, c, r_x, *geo, "linear", EPS, (True, True, False, False))
    ref = reference.conv2d_backward(dy.double(), x.double(), w.double(), None, c.double(),
                                    r_x.double(), *geo, "linear", EPS, (True, True, False, False))

    def rel(out, r):
        return ((out.double() - r).norm() / r.norm()).item()

    base = conv_bwd.sphere_conv2d_bwd(*args, dgrad_grid=False, wgrad_grid=False)
    bounds = [max(5e-3, 2 * rel(o, r)) for o, r in zip(base[:2], ref[:2])]
    cands = configs.prune_dgrad_grid_configs(
        configs.dgrad_grid_configs(), dict(cg_out=c_out, cg_in=c_in, dx_ptr=x))
    assert cands
    real = conv_bwd_grid.grid_dgrad
    bad = []
    for cfg in cands:
        monkeypatch.setattr(conv_bwd_grid, "grid_dgrad",
                            lambda *a, cfg=cfg, **kw: real(*a, config=cfg, **kw))
        dx, dw, _, _ = conv_bwd.sphere_conv2d_bwd(*args, dgrad_grid=True, wgrad_grid=False)
        errs = {"dx": rel(dx, ref[0]), "dw": rel(dw, ref[1])}
        _RECORDS.append({"test": request.node.name, "name": f"{cfg}", **errs,
                         "bound_dx": bounds[0], "bound_dw": bounds[1]})
        if not (errs["dx"] <= bounds[0] and errs["dw"] <= bounds[1]):
            bad.append(f"{cfg}: " + ", ".join(f"{k} rel {v:.2e}" for k, v in errs.items()))
    monkeypatch.setattr(conv_bwd_grid, "grid_dgrad", real)
    _, dw, _, _ = conv_bwd.sphere_conv2d_bwd(*args, dgrad_grid=True, wgrad_grid=True)
    err = rel(dw, ref[1])
    _RECORDS.append({"test": request.node.name, "name": "grid wgrad", "dw": err,
                     "bound_dw": bounds[1]})
    if not err <= bounds[1]:
        bad.append(f"grid wgrad: dw rel {err:.2e}")
    # whichever split finishes a tile sums its partials in split order: the same bits each run
    for _ in range(3):
        _, again, _, _ = conv_bwd.sphere_conv2d_bwd(*args, dgrad_grid=True, wgrad_grid=True)
        if not torch.equal(again, dw):
            bad.append("grid wgrad: dw differs between runs (the finishing split's sum)")
            break
    assert not bad, f"dgrad grid configs off vs float64 (bounds {bounds}):\n" + "\n".join(bad)


@pytest.mark.parametrize("precision", ["bf16", "fp16"], indirect=True)
def test_grid_paths_forward_backward_vs_float64(precision, request, monkeypatch):
    """Every grid path on (SPHEREOPS_FWD_GRID, SPHEREOPS_DGRAD_GRID, SPHEREOPS_WGRAD_GRID),
    through the public op and autograd, channels_last, sigmoid (per-channel k): y, dx, dw, db,
    dk against float64."""
    from sphereops_kernels import conv_bwd_grid, conv_fwd_grid

    monkeypatch.setattr(conv_fwd_grid, "ENABLED", True)
    monkeypatch.setattr(conv_bwd_grid, "ENABLED", True)
    monkeypatch.setattr(conv_bwd_grid, "WGRAD_ENABLED", True)
    x, w, b, k, conv = _make_inputs("sigmoid", DTYPES[precision], True, "3x3")
    names, fused, ref = _fused_and_reference(x, w, b, k, conv, "sigmoid")
    rtol, atol = TOLERANCES[precision]
    for name, out, r in zip(names, fused, ref):
        _check(request.node.name, name, out, r, rtol, atol)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("kernel", [3, 5])
def test_every_depthwise_config_vs_float64(kernel, layout, request):
    """Every depthwise forward config the autotuner may pick (after its pruning: a 5x5 filter
    keeps one tile a program) -- channels_last's flat tiles, NCHW's row tiles -- launched
    directly on a bf16 depthwise conv against float64, y to twice bf16's output rounding: the
    autotuner would pick a wrong tile as readily as a right one. Groups of pixels included
    (channels_last 3x3)."""
    from sphereops_kernels import conv_fwd

    # 28 wide: groups of 4 and 2 pixels fit (conv_fwd.pixel_groups_fit); 15 images: the
    # 128-pixel tiles end partial
    n, c, hw = 15, 96, 28
    gen = torch.Generator(device="cpu").manual_seed(5)
    x = torch.randn(n, c, hw, hw, generator=gen).to(DEVICE, torch.bfloat16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, 1, kernel, kernel, generator=gen).to(DEVICE, torch.bfloat16)
    b = (0.1 * torch.randn(c, generator=gen)).to(DEVICE, torch.bfloat16)
    geo = ((1, 1), (kernel // 2,) * 2, (1, 1), c)
    y64, _, _ = reference.conv2d_forward(x.double(), w.double(), b.double(), None, *geo,
                                         "linear", EPS)
    configs = conv_fwd._dw_configs() if layout == "channels_last" else conv_fwd._dw_row_configs()
    cands = conv_fwd.prune_dw_configs(configs, {}, KH=kernel, KW=kernel, out_w=hw,
                                      conv_stride_w=1, dil_w=1,
                                      ROW_W=conv_fwd.depthwise_row_width(x, hw))
    assert cands
    if layout == "channels_last" and kernel == 3:
        assert {cfg.kwargs["PIX_GROUP"] for cfg in cands} == {1, 2, 4}
    bad = []
    for cfg in cands:
        y, _, _ = conv_fwd._sphere_conv2d_fwd_impl(x, w, b, None, *geo, "linear", EPS,
                                                   config=cfg)
        y_err = ((y.double() - y64).norm() / y64.norm()).item()
        _RECORDS.append({"test": request.node.name, "name": f"{cfg}", "y_rel": y_err})
        if not y_err <= 5e-3:
            bad.append(f"{cfg}: y rel {y_err:.2e}")
    assert not bad, "depthwise configs off vs float64:\n" + "\n".join(bad)


@pytest.mark.parametrize("what, bound", [("g", 2e-7), ("g_approx_sqrt", 6e-7)])
def test_linear_g_on_the_gpu(what, bound):
    """The linear operator's g (angular.linear_g, the angle of every operator) against float64
    on the GPU: with the refined square root (fp32 outputs) within 2e-7, with the hardware's
    approximate one (16-bit outputs: sqrt.approx.f32, 3 ulp) within 6e-7 -- the interpreter's
    square roots are exact, so only a GPU tests them; NaN, +-1 and 0 exactly."""
    import test_conv_fwd_kernel as F

    def probe(c):
        c = c.to(DEVICE, torch.float32).contiguous()
        out = torch.empty_like(c)
        F._angular_probe_kernel[(-(-c.numel() // 4096),)](
            c, torch.ones_like(c), out, c.numel(), 0, F._WHAT[what], reference.ARCCOS_DELTA,
            BLOCK=4096)
        return out.cpu().double()

    c = F._cosine_samples(200000)
    err = (probe(c) - reference.g_of_c(c.double(), "linear")).abs()
    worst = int(err.argmax())
    assert err[worst].item() <= bound, f"{what} off by {err[worst].item():.3g} at c={c[worst].item()!r}"
    special = probe(torch.tensor([float("nan"), 1.0, -1.0, 0.0]))
    assert torch.isnan(special[0])
    assert special[1:].tolist() == pytest.approx([1.0, -1.0, 0.0], abs=bound)
