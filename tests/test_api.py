"""Public API: functional ops, modules, torch.library integration, argument checking."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sphereops
from helpers import assert_close, make_conv_inputs, make_linear_inputs
from sphereops import reference as R
from sphereops.nn import SphereConv2d, SphereLinear

EPS = 1e-4


# --------------------------------------------------------------------------- functional forward

@pytest.mark.parametrize("operator", sphereops.OPERATORS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_functional_conv_matches_reference_and_gradients(operator, channels_last):
    inp = make_conv_inputs(n=2, c_in=4, h=7, w=6, c_out=6, stride=2, groups=2, operator=operator,
                           dtype=torch.float64, channels_last=channels_last)
    leaves = [inp.x, inp.w, inp.bias] + ([inp.k] if inp.k is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    y = sphereops.sphere_conv2d(inp.x, inp.w, inp.bias, inp.stride, inp.padding, inp.dilation,
                                inp.groups, operator=operator, k=inp.k, backend="reference")
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    ya = R.conv2d_autograd(*inp.args(), EPS)
    assert_close(y, ya, 1e-12, 1e-12)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    exp = torch.autograd.grad(ya, leaves, dy)
    for name, g, e in zip(("dx", "dw", "db", "dk"), got, exp):
        assert_close(g, e, 1e-10, 1e-11, name)


@pytest.mark.parametrize("operator", sphereops.OPERATORS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_retained_graph_keeps_the_saved_state(operator, backend):
    """Without retain_graph the eager backward writes its temporary over the saved c; with it, c
    must survive: repeated backwards through one retained graph all give autograd's gradients.
    (The Triton backward reuses c when it is channels_last: the input here is.)"""
    if backend == "triton":
        pytest.importorskip("sphereops_kernels.conv_bwd")
    dtype, tol = (torch.float64, 1e-10) if backend == "reference" else (torch.float32, 1e-4)
    inp = make_conv_inputs(n=2, c_in=4, h=6, w=5, c_out=6, padding=1, operator=operator,
                           dtype=dtype, channels_last=True)
    leaves = [inp.x, inp.w] + ([inp.k] if inp.k is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    y = sphereops.sphere_conv2d(inp.x, inp.w, inp.bias, inp.stride, inp.padding, operator=operator,
                                k=inp.k, backend=backend)
    dy = torch.randn_like(y)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    args64 = [t.detach().double() if isinstance(t, torch.Tensor) else t for t in inp.args()]
    args64[0], args64[1] = leaves64[0], leaves64[1]
    if inp.k is not None:
        args64[3] = leaves64[2]
    exp = torch.autograd.grad(R.conv2d_autograd(*args64, EPS), leaves64, dy.double())
    for retain in (True, True, False):
        got = torch.autograd.grad(y, leaves, dy, retain_graph=retain)
        for name, g, e in zip(("dx", "dw", "dk"), got, exp):
            assert_close(g.double(), e, tol, tol * e.abs().max().item(), f"{name} (retain_graph={retain})")
    with pytest.raises(RuntimeError, match="second time|freed"):
        torch.autograd.grad(y, leaves, dy)


@pytest.mark.parametrize("operator", sphereops.OPERATORS)
def test_linear_retained_graph_keeps_the_saved_state(operator):
    """SphereLinear's eager backward reuses the saved c only when the graph is not retained."""
    x, w, b, k = make_linear_inputs(m=6, in_features=5, out_features=4, operator=operator,
                                    dtype=torch.float64)
    leaves = [x, w] + ([k] if k is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    y = sphereops.sphere_linear(x, w, b, operator=operator, k=k, backend="reference")
    dy = torch.randn_like(y)
    exp = torch.autograd.grad(R.linear_autograd(x, w, b, k, operator, EPS), leaves, dy)
    for retain in (True, True, False):
        got = torch.autograd.grad(y, leaves, dy, retain_graph=retain)
        for name, g, e in zip(("dx", "dw", "dk"), got, exp):
            assert_close(g, e, 1e-10, 1e-11, f"{name} (retain_graph={retain})")


def test_scalar_k_float_and_tensor_agree_and_scalar_tensor_gets_summed_grad():
    inp = make_conv_inputs(n=1, c_in=3, h=6, w=6, c_out=4, operator="sigmoid", dtype=torch.float64)
    y_float = sphereops.sphere_conv2d(inp.x, inp.w, operator="sigmoid", k=0.3, padding=1)
    k0 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    y_t = sphereops.sphere_conv2d(inp.x, inp.w, operator="sigmoid", k=k0, padding=1)
    assert_close(y_t, y_float, 1e-14, 1e-14)
    dy = torch.randn_like(y_t)
    (dk0,) = torch.autograd.grad(y_t, [k0], dy)
    kv = torch.full((4,), 0.3, dtype=torch.float64, requires_grad=True)
    ya = R.conv2d_autograd(inp.x, inp.w, None, kv, (1, 1), (1, 1), (1, 1), 1, "sigmoid", EPS)
    (dkv,) = torch.autograd.grad(ya, [kv], dy)
    assert dk0.shape == () and abs(dk0.item() - dkv.sum().item()) < 1e-9


def test_padding_same_valid_unbatched_and_empty_batch():
    inp = make_conv_inputs(n=2, c_in=3, h=7, w=8, c_out=5, kernel=(4, 3), dilation=(1, 2), padding=0,
                           dtype=torch.float64)
    y = sphereops.sphere_conv2d(inp.x, inp.w, inp.bias, dilation=(1, 2), padding="same")
    assert y.shape[2:] == inp.x.shape[2:]
    # PyTorch's 'same' pads the odd extra at the bottom/right: compare against explicit F.pad
    xp = F.pad(inp.x, (2, 2, 1, 2))
    ref, _, _ = R.conv2d_forward(xp, inp.w, inp.bias, None, (1, 1), (0, 0), (1, 2), 1, "cosine", EPS)
    assert_close(y, ref, 1e-12, 1e-12, "same")
    yv = sphereops.sphere_conv2d(inp.x, inp.w, inp.bias, dilation=(1, 2), padding="valid")
    assert_close(yv, sphereops.sphere_conv2d(inp.x, inp.w, inp.bias, dilation=(1, 2), padding=0), 0, 0)
    y3 = sphereops.sphere_conv2d(inp.x[0], inp.w, inp.bias, padding=1)
    y4 = sphereops.sphere_conv2d(inp.x[:1], inp.w, inp.bias, padding=1)
    assert y3.shape == y4.shape[1:] and torch.equal(y3, y4[0])
    x0 = inp.x[:0].requires_grad_(True)
    y0 = sphereops.sphere_conv2d(x0, inp.w, inp.bias, padding=1)
    assert y0.shape == (0, 5, 6, 8)
    y0.sum().backward()
    assert x0.grad.shape == x0.shape


def test_linear_leading_dims_and_unbatched():
    x, w, b, _ = make_linear_inputs(m=6, in_features=5, out_features=3, dtype=torch.float64)
    x3 = x.reshape(2, 3, 5)
    y = sphereops.sphere_linear(x3, w, b, operator="linear")
    ref, _, _ = R.linear_forward(x, w, b, None, "linear", EPS)
    assert_close(y.reshape(6, 3), ref, 1e-13, 1e-13)
    assert sphereops.sphere_linear(x[0], w, b).shape == (3,)


# --------------------------------------------------------------------------- modules

def test_sphereconv2d_is_a_conv2d_and_loads_its_state_dict():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True)
    sph = SphereConv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True, operator="linear")
    assert isinstance(sph, nn.Conv2d)
    sph.load_state_dict(conv.state_dict())
    assert set(sph.state_dict()) == set(conv.state_dict())
    x = torch.randn(2, 4, 9, 9)
    y = sph(x)
    yr, _, _ = R.conv2d_forward(x.double(), conv.weight.double(), conv.bias.double(), None, (2, 2), (1, 1),
                                (1, 1), 2, "linear", EPS)
    assert_close(y, yr, 1e-5, 1e-5)
    r = repr(sph)
    assert "SphereConv2d(4, 6, kernel_size=(3, 3)" in r and "operator=linear" in r


def test_learnable_k_module():
    m = SphereConv2d(3, 4, 3, padding=1, operator="sigmoid", learnable_k=True, k_init=0.5).double()
    assert m.kappa.shape == (4,)
    assert_close(m.effective_k(), torch.full((4,), 0.5, dtype=torch.float64), 1e-7, 1e-7)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        m.kappa.copy_(torch.tensor([0.3, -0.2, 0.6, -0.9]))
    y = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    k = (m.kappa.detach().abs() + 0.05).requires_grad_(True)
    ya = R.conv2d_autograd(x, m.weight.detach(), m.bias.detach(), k, (1, 1), (1, 1), (1, 1), 1, "sigmoid", EPS)
    (dk,) = torch.autograd.grad(ya, [k], dy)
    assert_close(m.kappa.grad, dk * torch.sign(m.kappa.detach()), 1e-10, 1e-11, "dkappa")
    assert "learnable_k=True" in repr(m)
    assert "kappa" in m.state_dict()


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes(mode):
    m = SphereConv2d(2, 3, 3, padding=1, padding_mode=mode, operator="cosine").double()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    xp = F.pad(x, (1, 1, 1, 1), mode=mode)
    yr, _, _ = R.conv2d_forward(xp, m.weight.detach(), m.bias.detach(), None, (1, 1), (0, 0), (1, 1), 1, "cosine", EPS)
    assert_close(m(x), yr, 1e-12, 1e-12)


def test_spherelinear_is_a_linear_and_loads_its_state_dict():
    lin = nn.Linear(5, 3)
    sph = SphereLinear(5, 3, operator="sigmoid", k=0.4)
    assert isinstance(sph, nn.Linear)
    sph.load_state_dict(lin.state_dict())
    x = torch.randn(4, 5)
    yr, _, _ = R.linear_forward(x.double(), lin.weight.double(), lin.bias.double(),
                                torch.full((3,), 0.4, dtype=torch.float64), "sigmoid", EPS)
    assert_close(sph(x), yr, 1e-5, 1e-5)
    assert "operator=sigmoid, k=0.4" in repr(sph)


def test_module_bad_arguments_fail_in_init():
    with pytest.raises(ValueError, match="operator"):
        SphereConv2d(2, 2, 3, operator="tanh")
    with pytest.raises(ValueError, match="learnable_k"):
        SphereConv2d(2, 2, 3, operator="cosine", learnable_k=True)
    with pytest.raises(ValueError, match="k must"):
        SphereConv2d(2, 2, 3, operator="sigmoid", k=-1.0)
    with pytest.raises(ValueError, match="k_init"):
        SphereLinear(2, 2, operator="sigmoid", learnable_k=True, k_init=0.01)
    with pytest.raises(ValueError, match="backend"):
        SphereLinear(2, 2, backend="cuda")
    with pytest.raises(ValueError, match="groups"):
        SphereConv2d(3, 4, 3, groups=2)


# --------------------------------------------------------------------------- bad input

def _x_w():
    return torch.randn(1, 4, 6, 6), torch.randn(6, 4, 3, 3)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(operator="tanh"), ValueError, "operator"),
    (dict(operator="sigmoid"), ValueError, "needs k"),
    (dict(operator="sigmoid", k=0.0), ValueError, "positive"),
    (dict(operator="sigmoid", k=torch.tensor([0.3, -0.1, 0.3, 0.3, 0.3, 0.3])), ValueError, "positive"),
    (dict(operator="sigmoid", k=torch.ones(5)), ValueError, "shape"),
    (dict(operator="cosine", k=0.3), ValueError, "sigmoid"),
    (dict(operator="linear", k=torch.ones(6)), ValueError, "sigmoid"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(stride=0), ValueError, "stride"),
    (dict(padding="full"), ValueError, "padding"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(padding="same", stride=2), ValueError, "same"),
])
def test_bad_conv_arguments(kwargs, exc, match):
    x, w = _x_w()
    with pytest.raises(exc, match=match):
        sphereops.sphere_conv2d(x, w, **kwargs)


def test_bad_conv_tensors():
    x, w = _x_w()
    with pytest.raises(ValueError, match="divisible by groups"):
        sphereops.sphere_conv2d(x, torch.randn(5, 2, 3, 3), groups=2)
    with pytest.raises(ValueError, match="input channels"):
        sphereops.sphere_conv2d(x, torch.randn(6, 3, 3, 3))
    with pytest.raises(ValueError, match="4-D"):
        sphereops.sphere_conv2d(x[0, 0], w)
    with pytest.raises(ValueError, match="weight must be 4-D"):
        sphereops.sphere_conv2d(x, w[0])
    with pytest.raises(TypeError, match="dtype"):
        sphereops.sphere_conv2d(x, w.double())
    with pytest.raises(TypeError, match="floating"):
        sphereops.sphere_conv2d(x.to(torch.int32), w)
    with pytest.raises(TypeError, match="bias"):
        sphereops.sphere_conv2d(x, w, torch.zeros(6, dtype=torch.float16))
    with pytest.raises(ValueError, match="bias must have shape"):
        sphereops.sphere_conv2d(x, w, torch.zeros(5))
    with pytest.raises(TypeError, match="k has dtype"):
        sphereops.sphere_conv2d(x, w, operator="sigmoid", k=torch.full((6,), 0.3, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        sphereops.sphere_conv2d(x, torch.randn(6, 4, 7, 7))
    with pytest.raises(TypeError, match="float64"):
        sphereops.sphere_conv2d(x.double(), w.double(), backend="triton")


def test_bad_linear_arguments():
    x, w, b, _ = make_linear_inputs(m=3, in_features=5, out_features=4)
    with pytest.raises(ValueError, match="in_features"):
        sphereops.sphere_linear(x[:, :4], w)
    with pytest.raises(ValueError, match="2-D"):
        sphereops.sphere_linear(x, w[None])
    with pytest.raises(ValueError, match="sigmoid"):
        sphereops.sphere_linear(x, w, operator="cosine", k=0.3)


def test_triton_backend_on_cpu_without_interpreter_is_refused():
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None)\n"
            "import torch, sphereops\n"
            "try:\n"
            "    sphereops.sphere_conv2d(torch.randn(1,2,4,4), torch.randn(3,2,3,3), backend='triton')\n"
            "except RuntimeError as e:\n"
            "    assert 'TRITON_INTERPRET' in str(e), e\n"
            "    print('refused')\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "refused", out.stderr


def test_import_needs_no_triton_and_no_cuda_query():
    code = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name == 'triton' or name.startswith('triton.') or name.startswith('sphereops_kernels'):\n"
            "        raise ImportError('blocked ' + name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import torch\n"
            "calls = []\n"
            "torch.cuda.is_available = lambda: calls.append(1) or False\n"
            "torch.cuda.device_count = lambda: calls.append(1) or 0\n"
            "import sphereops, sphereops.nn\n"
            "y = sphereops.sphere_conv2d(torch.randn(1,2,5,5), torch.randn(3,2,3,3))\n"
            "assert not calls, 'CUDA queried at import'\n"
            "print('ok', tuple(y.shape))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok (1, 3, 3, 3)", out.stderr


# --------------------------------------------------------------------------- numerics

def test_nan_input_gives_nan_output_where_affected():
    inp = make_conv_inputs(n=1, c_in=2, h=6, w=6, c_out=3, padding=0, operator="linear")
    inp.x[0, 0, 5, 5] = float("nan")
    y = sphereops.sphere_conv2d(inp.x, inp.w, operator="linear")
    assert bool(torch.isnan(y[0, :, 3, 3]).all())
    assert not bool(torch.isnan(y[0, :, :3]).any())
    inf = inp.x.clone()
    inf[0, 0, 5, 5] = float("inf")
    assert bool(torch.isnan(sphereops.sphere_conv2d(inf, inp.w, operator="linear")[0, :, 3, 3]).all())


def test_all_zero_input_gives_bias_and_finite_gradients():
    x = torch.zeros(1, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4)
    for op, k in (("linear", None), ("cosine", None), ("sigmoid", 0.3)):
        y = sphereops.sphere_conv2d(x, w, b, padding=1, operator=op, k=k)
        assert_close(y, b.reshape(1, 4, 1, 1).expand_as(y), 1e-6, 1e-6, op)
        gx, gw = torch.autograd.grad(y.sum(), [x, w])
        assert bool(torch.isfinite(gx).all()) and bool(torch.isfinite(gw).all())


def test_autocast_follows_conv2d():
    m = SphereConv2d(3, 4, 3, padding=1, operator="cosine")
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.float32


# --------------------------------------------------------------------------- torch.library

@pytest.mark.parametrize("operator", sphereops.OPERATORS)
def test_opcheck(operator):
    inp = make_conv_inputs(n=2, c_in=4, h=5, w=5, c_out=4, stride=1, padding=1, groups=2,
                           operator=operator, dtype=torch.float64)
    args = (inp.x.requires_grad_(True), inp.w.requires_grad_(True), inp.bias, inp.k, [1, 1], [1, 1], [1, 1],
            2, operator, EPS, "reference")
    torch.library.opcheck(torch.ops.sphereops.conv2d_fwd, args + (False,))
    if operator != "sigmoid":
        torch.library.opcheck(torch.ops.sphereops.conv2d_fwd, args + (True,))
    x, w, b, k = make_linear_inputs(m=4, in_features=5, out_features=3, operator=operator, dtype=torch.float64)
    for save_output in ((False, True) if operator != "sigmoid" else (False,)):
        torch.library.opcheck(torch.ops.sphereops.linear_fwd,
                              (x.requires_grad_(True), w, b, k, operator, EPS, "reference", save_output))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = nn.Sequential(SphereConv2d(3, 8, 3, padding=1, operator="sigmoid", learnable_k=True), nn.ReLU(),
                          SphereConv2d(8, 8, 3, stride=2, padding=1, operator="linear"), nn.Flatten(),
                          SphereLinear(8 * 4 * 4, 5, operator="cosine"))
    x = torch.randn(2, 3, 8, 8)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    assert_close(out, eager, 1e-5, 1e-5)
    out.sum().backward()
    assert model[0].kappa.grad is not None and bool(torch.isfinite(model[0].weight.grad).all())


@pytest.mark.parametrize("fn", ["conv", "linear"])
def test_double_backward_is_refused_not_silently_wrong(fn):
    """The closed-form backward is not itself differentiable: differentiating it raises."""
    import sphereops
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    if fn == "conv":
        w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
        y = sphereops.sphere_conv2d(x, w, padding=1, operator="linear", backend="reference")
    else:
        w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        y = sphereops.sphere_linear(x, w, operator="linear", backend="reference")
    dy = torch.randn_like(y, requires_grad=True)
    (gx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        torch.autograd.grad(gx.sum(), (x, dy))


# --------------------------------------------------------------------------- save_output

@pytest.mark.parametrize("operator", ["linear", "cosine"])
@pytest.mark.parametrize("backend,channels_last", [("reference", False), ("reference", True),
                                                   ("triton", False), ("triton", True)])
def test_save_output_gives_the_same_output_and_gradients(operator, backend, channels_last):
    """save_output=True: the same y, and gradients that match float64 autograd as closely as
    those of the default (saved cosine) path do."""
    if backend == "triton":
        pytest.importorskip("sphereops_kernels.conv_bwd")
    dtype, tol = (torch.float64, 1e-10) if backend == "reference" else (torch.float32, 1e-4)
    inp = make_conv_inputs(n=2, c_in=4, h=7, w=6, c_out=6, stride=2, groups=2, operator=operator,
                           dtype=dtype, channels_last=channels_last)
    with torch.no_grad():
        inp.bias.mul_(0.1)       # a bias small next to g, as the docstring asks
    leaves = [inp.x, inp.w, inp.bias]
    for t in leaves:
        t.requires_grad_(True)
    args = (inp.x, inp.w, inp.bias, inp.stride, inp.padding, inp.dilation, inp.groups)
    y0 = sphereops.sphere_conv2d(*args, operator=operator, backend=backend)
    y1 = sphereops.sphere_conv2d(*args, operator=operator, backend=backend, save_output=True)
    assert torch.equal(y0, y1)
    dy = torch.randn_like(y1)
    got = torch.autograd.grad(y1, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    exp = torch.autograd.grad(R.conv2d_autograd(*leaves64, None, inp.stride, inp.padding, inp.dilation,
                                                inp.groups, operator, EPS), leaves64, dy.double())
    for name, g, e in zip(("dx", "dw", "db"), got, exp):
        assert_close(g.double(), e, tol, tol * e.abs().max().item(), name)


def test_save_output_refuses_in_place_changes_sigmoid_and_non_bool():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    conv = SphereConv2d(3, 4, 3, operator="linear", save_output=True, backend="reference")
    assert "save_output=True" in repr(conv)
    y = conv(x)
    y.relu_()                                   # an in-place op on the saved output
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    with pytest.raises(ValueError, match="save_output=True needs operator"):
        SphereConv2d(3, 4, 3, operator="sigmoid", save_output=True)
    with pytest.raises(ValueError, match="save_output=True needs operator"):
        sphereops.sphere_conv2d(x, torch.randn(4, 3, 3, 3), operator="sigmoid", k=0.3,
                                save_output=True)
    with pytest.raises(TypeError, match="save_output must be a bool"):
        sphereops.sphere_conv2d(x, torch.randn(4, 3, 3, 3), save_output=1)


def test_save_output_under_torch_compile_matches_eager():
    torch._dynamo.reset()
    model = nn.Sequential(SphereConv2d(3, 8, 3, padding=1, operator="cosine", save_output=True),
                          nn.BatchNorm2d(8), nn.ReLU(),
                          SphereConv2d(8, 4, 3, stride=2, operator="linear", bias=False, save_output=True))
    x = torch.randn(2, 3, 8, 8)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = torch.compile(model, fullgraph=True)(x)
    out.sum().backward()
    # BatchNorm in training mode updated its running stats twice; outputs use batch statistics
    assert_close(out, eager, 1e-5, 1e-5)
    for g, p in zip(grads, model.parameters()):
        assert_close(p.grad, g, 1e-4, 1e-5, "grad")


def test_enable_save_output_sets_the_eligible_layers_and_keeps_training_correct():
    from sphereops.models import SphereResNet32
    from sphereops.nn import enable_save_output
    torch.manual_seed(0)
    model = SphereResNet32(operator="linear", widths=(4, 8, 8), units_per_stage=1,
                           backend="reference").double()
    sig = SphereConv2d(3, 4, 3, operator="sigmoid")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model(x).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    names = enable_save_output(model)
    spheres = [n for n, m in model.named_modules() if isinstance(m, SphereConv2d)]
    assert names == spheres and all(model.get_submodule(n).save_output for n in names)
    model(x).sum().backward()           # BatchNorm follows every SphereConv: no in-place change
    for g, p in zip(before, model.parameters()):
        assert_close(p.grad, g, 1e-9, 1e-12, "grad")
    assert enable_save_output(sig) == [] and not sig.save_output
    with pytest.raises(TypeError, match="enabled must be a bool"):
        enable_save_output(model, 1)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(use_reentrant):
    """torch.utils.checkpoint recomputes the forward in the backward: the backward's reuse of
    the saved cosine (c_scratch) meets recomputed tensors there and must still be exact."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    block = nn.Sequential(SphereConv2d(3, 6, 3, padding=1, operator="linear", backend="reference"),
                          nn.ReLU(),
                          SphereConv2d(6, 4, 3, padding=1, operator="cosine", backend="reference",
                                       save_output=True)).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    leaves = [x, *block.parameters()]

    def grads(run):
        for t in leaves:
            t.grad = None
        run().square().sum().backward()     # reentrant checkpointing refuses autograd.grad
        return [t.grad.clone() for t in leaves]

    plain = grads(lambda: block(x))
    ckpt = grads(lambda: checkpoint(block, x, use_reentrant=use_reentrant))
    for a, b in zip(plain, ckpt):
        assert_close(b, a, 1e-12, 1e-13, "grad")


@pytest.mark.parametrize("operator", ["linear", "cosine"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sphere_linear_save_output_matches_float64_autograd(operator, backend):
    if backend == "triton":
        pytest.importorskip("sphereops_kernels.linear")
    dtype, tol = (torch.float64, 1e-10) if backend == "reference" else (torch.float32, 1e-4)
    x, w, b, _ = make_linear_inputs(m=12, in_features=9, out_features=7, operator=operator,
                                    dtype=dtype)
    b = (0.1 * b).detach()
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    y = sphereops.sphere_linear(*leaves, operator=operator, backend=backend, save_output=True)
    assert torch.equal(y, sphereops.sphere_linear(*leaves, operator=operator, backend=backend))
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    exp = torch.autograd.grad(R.linear_autograd(*leaves64, None, operator, EPS), leaves64,
                              dy.double())
    for name, g, e in zip(("dx", "dw", "db"), got, exp):
        assert_close(g.double(), e, tol, tol * e.abs().max().item(), name)


def test_spherelinear_save_output_module_and_enable_save_output():
    from sphereops.nn import enable_save_output
    with pytest.raises(ValueError, match="save_output=True needs operator"):
        SphereLinear(4, 3, operator="sigmoid", save_output=True)
    lin = SphereLinear(4, 3, operator="cosine", save_output=True)
    assert "save_output=True" in repr(lin)
    model = nn.Sequential(SphereLinear(4, 3, operator="linear"), nn.BatchNorm1d(3),
                          SphereLinear(3, 2, operator="sigmoid"))
    assert enable_save_output(model) == ["0"]
    assert model[0].save_output and not model[2].save_output
    model(torch.randn(5, 4)).sum().backward()
