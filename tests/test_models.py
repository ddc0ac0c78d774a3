"""Models, convert and the orthogonality penalty, against the float64 reference.

Every forward/backward test runs the model in float32 (reference backend: CPU) and again in
float64 with each SphereConv2d swapped for ``sphereops.reference.conv2d_autograd`` (the autograd
oracle), and compares the logits and every parameter gradient.
"""
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_close
from sphereops import reference
from sphereops.convert import ConversionReport, convert
from sphereops.models import (MODEL_NAMES, ResNet18, SphereNet9, SphereResNet32, build_model,
                              canonical_operator)
from sphereops.nn import SphereConv2d, SphereLinear
from sphereops.orthogonality import filter_orthogonality, orthogonality_penalty

OPERATORS = [None, "linear", "cosine", "sigmoid", "learnable"]


def tiny_model(name, operator, num_classes=5, in_channels=3, norm="batch"):
    """Each architecture at its smallest (cheap under the reference backend)."""
    common = dict(num_classes=num_classes, in_channels=in_channels, operator=operator,
                  backend="reference", norm=norm)
    if name == "spherenet9":
        return SphereNet9(input_size=8, widths=(4, 6, 4), fc6_width=6, **common), 8
    if name == "sphereresnet32":
        return SphereResNet32(widths=(4, 6, 8), units_per_stage=1, **common), 8
    return ResNet18(widths=(4, 4, 6, 6), units_per_stage=(1, 1, 1, 1), **common), 32


def _oracle_forward(self, x):
    k = None
    if self.operator == "sigmoid":
        k = self.effective_k()
        if not isinstance(k, torch.Tensor):
            k = torch.full((self.out_channels,), float(k), dtype=x.dtype)
    padding = self.padding
    if isinstance(padding, str):
        raise AssertionError("the tiny models use explicit padding")
    return reference.conv2d_autograd(x, self.weight, self.bias, k, self.stride, padding,
                                     self.dilation, self.groups, self.operator, self.eps)


def float64_oracle(model):
    """A float64 copy of ``model`` whose SphereConv2d layers run the autograd oracle."""
    oracle = copy.deepcopy(model).double()
    for module in oracle.modules():
        if isinstance(module, SphereConv2d):
            module.forward = types.MethodType(_oracle_forward, module)
    return oracle


def _perturb(model, generator):
    """Move every parameter away from its init (BatchNorm 1/0, biases 0, kappa constant) so the
    gradient test sees generic values."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 2e-3, 1e-5)])
def test_model_forward_backward_matches_float64_oracle(name, operator, dtype, rtol, atol, _fresh_seed):
    generator = torch.Generator().manual_seed(_fresh_seed)
    model, size = tiny_model(name, operator)
    _perturb(model, generator)
    model.train()
    x = torch.randn(3, 3, size, size, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 5, (3,), generator=generator)

    oracle = float64_oracle(model)
    model = model.to(dtype)
    x32 = x.to(dtype).requires_grad_(True)
    x64 = x.clone().requires_grad_(True)
    logits = model(x32)
    logits64 = oracle(x64)
    assert logits.shape == (3, 5) and logits.dtype == dtype
    assert_close(logits, logits64, rtol=rtol, atol=atol, name=f"{name}/{operator} logits")

    F.cross_entropy(logits.double(), target).backward()
    F.cross_entropy(logits64, target).backward()
    assert_close(x32.grad, x64.grad, rtol=rtol * 5, atol=atol, name="input gradient")
    params64 = dict(oracle.named_parameters())
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert_close(p.grad, params64[pname].grad, rtol=rtol * 5, atol=atol, name=f"grad {pname}")


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("operator", OPERATORS)
def test_model_layer_types(name, operator):
    model, _ = tiny_model(name, operator)
    op = canonical_operator(operator)
    sphere = [m for m in model.modules() if isinstance(m, SphereConv2d)]
    plain = [m for m in model.modules() if type(m) is nn.Conv2d]
    assert type(model.classifier) is nn.Linear
    if op is None:
        assert sphere == [] and len(plain) > 0
        return
    # Only the 1x1 projection shortcuts stay plain.
    assert all(m.kernel_size == (1, 1) for m in plain)
    expected_operator = "sigmoid" if op == "learnable" else op
    for m in sphere:
        assert m.operator == expected_operator
        assert m.learnable_k == (op == "learnable")
        assert m.backend == "reference"
    if op == "learnable":
        assert all(m.kappa is not None and m.kappa.requires_grad for m in sphere)


def _conv_params(cin, cout, k):
    return cin * cout * k * k


def test_full_size_parameter_counts_follow_the_official_networks():
    """Counts derived here from the published architectures, not from the code."""
    bn = lambda c: 2 * c  # noqa: E731  (weight and bias; running stats are buffers)
    # SphereNet-9: 3 stages x 3 convs (128, 192, 256), fc6 4x4 -> 256, classifier 256 -> 10.
    expected, cin = 0, 3
    for width in (128, 192, 256):
        for _ in range(3):
            expected += _conv_params(cin, width, 3) + bn(width)
            cin = width
    expected += _conv_params(256, 256, 4) + bn(256) + 256 * 10 + 10
    assert sum(p.numel() for p in SphereNet9(operator="cosine").parameters()) == expected

    # SphereResNet-32: root 3x3 -> 96, 3 stages x 5 units, projections at the stage changes.
    expected = _conv_params(3, 96, 3) + bn(96)
    cin = 96
    for width in (96, 192, 384):
        for unit in range(5):
            expected += _conv_params(cin, width, 3) + bn(width) + _conv_params(width, width, 3) + bn(width)
            if cin != width:
                expected += _conv_params(cin, width, 1) + bn(width)
            cin = width
    expected += 384 * 10 + 10
    model = SphereResNet32(operator="linear")
    assert sum(p.numel() for p in model.parameters()) == expected
    # 1 root + 30 unit convs are SphereConvs (the 32nd layer is the classifier).
    assert sum(isinstance(m, SphereConv2d) for m in model.modules()) == 31

    # ResNet-18 (ImageNet): 11,689,512 parameters for 1000 classes.
    assert sum(p.numel() for p in ResNet18(operator=None).parameters()) == 11_689_512


def test_spherenet9_sizes_and_learnable_parameters():
    model = SphereNet9(num_classes=10, in_channels=1, operator="learnable", input_size=28,
                       widths=(4, 4, 4), fc6_width=8, backend="reference")
    assert model.fc6.kernel_size == (4, 4)  # 28 -> 14 -> 7 -> 4 with the rounding-up pools
    out = model.forward_features(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 8)
    kappas = [n for n, _ in model.named_parameters() if n.endswith("kappa")]
    assert len(kappas) == 10  # 9 convs + fc6
    with pytest.raises(ValueError, match="built for 28x28"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        model(torch.randn(1, 28, 28))


@pytest.mark.parametrize("kwargs,match", [
    (dict(operator="tanh"), "operator"),
    (dict(operator=3), "operator"),
    (dict(norm="layer"), "norm"),
    (dict(num_classes=0), "num_classes"),
    (dict(k=-1.0, operator="sigmoid"), "k must"),
    (dict(widths=(4, 0, 4)), r"widths\[1\]"),
])
def test_model_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SphereNet9(**kwargs)


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vgg16", num_classes=10)
    with pytest.raises(ValueError, match="width_mult"):
        build_model("spherenet9", num_classes=10, width_mult=0)


def test_sphere_norm_options_fail_clearly_or_work():
    try:
        from sphereops.nn import SphereNorm2d  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="SphereNorm2d"):
            tiny_model("spherenet9", "cosine", norm="sphere")
    else:
        model, size = tiny_model("spherenet9", "cosine", norm="both")
        assert model(torch.randn(2, 3, size, size)).shape == (2, 5)


# ----------------------------------------------------------------------------- convert
@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "learnable"])
def test_convert_plain_model_and_back(name, operator, _fresh_seed):
    generator = torch.Generator().manual_seed(_fresh_seed)
    plain, size = tiny_model(name, None)
    _perturb(plain, generator)
    plain.eval()
    conv_names = [n for n, m in plain.named_modules() if type(m) is nn.Conv2d]
    original_state = {k: v.clone() for k, v in plain.state_dict().items()}

    sphere, report = convert(plain, operator=operator, backend="reference")
    assert isinstance(report, ConversionReport)
    assert sorted(report.replaced_names) == sorted(conv_names)
    assert report.skipped == []
    assert all(layer.source == "Conv2d" and layer.target == "SphereConv2d" for layer in report.replaced)
    # A copy was converted: the original still has its plain convs and its state.
    assert all(type(m) is nn.Conv2d for n, m in plain.named_modules() if n in conv_names)
    for n in conv_names:
        new = sphere.get_submodule(n)
        old = plain.get_submodule(n)
        assert isinstance(new, SphereConv2d) and not new.training
        assert new.operator == ("sigmoid" if operator == "learnable" else operator)
        assert torch.equal(new.weight, old.weight)
        for attr in ("stride", "padding", "dilation", "groups", "kernel_size", "padding_mode"):
            assert getattr(new, attr) == getattr(old, attr)
    for key, value in plain.state_dict().items():
        assert torch.equal(sphere.state_dict()[key], value), key

    # The converted model computes the SphereNet function (float64 oracle).
    x = torch.randn(2, 3, size, size, generator=generator)
    assert_close(sphere(x), float64_oracle(sphere)(x.double()), rtol=2e-3, atol=1e-5,
                 name="converted model")

    back, back_report = convert(sphere, operator=None)
    assert sorted(back_report.replaced_names) == sorted(conv_names)
    if operator == "learnable":
        assert all(layer.dropped == ("kappa",) for layer in back_report.replaced)
    assert all(type(back.get_submodule(n)) is nn.Conv2d for n in conv_names)
    assert torch.equal(back(x), plain(x))
    for key, value in original_state.items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_convert_sphere_model_back_and_forth(name, _fresh_seed):
    generator = torch.Generator().manual_seed(_fresh_seed)
    sphere, size = tiny_model(name, "sigmoid")
    _perturb(sphere, generator)
    sphere.eval()
    x = torch.randn(2, 3, size, size, generator=generator)
    plain, _ = convert(sphere, operator=None)
    # The projection shortcuts were plain in the SphereResNets: keep them plain.
    again, report = convert(plain, operator="sigmoid", k=0.3, backend="reference", skip="*shortcut*")
    assert torch.equal(again(x), sphere(x))
    # Already the requested operator: nothing to do.
    _, nothing = convert(again, operator="sigmoid", k=0.3, skip="*shortcut*")
    assert len(nothing) == 0
    # A different operator re-creates the layers with the same weights.
    cos, report = convert(again, operator="cosine", backend="reference", skip="*shortcut*")
    assert len(report) == len([m for m in sphere.modules() if isinstance(m, SphereConv2d)])
    assert_close(cos(x), float64_oracle(cos)(x.double()), rtol=2e-3, atol=1e-5, name="cosine")


class _Mixed(nn.Module):
    """Grouped, depthwise, strided, dilated and reflect-padded convs and a linear head."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=True)
        self.depthwise = nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=6)
        self.reflect = nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect", bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.reflect(self.depthwise(self.grouped(x)))
        return self.head(h.mean(dim=(2, 3)))


def _mixed_oracle(model, x):
    """The converted _Mixed computed layer by layer with reference.conv2d_forward in float64."""
    def conv(m, h):
        padding = m.padding
        if m.padding_mode != "zeros":
            h = F.pad(h, (padding[1], padding[1], padding[0], padding[0]), mode=m.padding_mode)
            padding = (0, 0)
        b = m.bias.double() if m.bias is not None else None
        return reference.conv2d_forward(h, m.weight.double(), b, None, m.stride, padding,
                                        m.dilation, m.groups, m.operator, m.eps)[0]
    h = conv(model.reflect, conv(model.depthwise, conv(model.grouped, x.double())))
    pooled = h.mean(dim=(2, 3))
    m = model.head
    return reference.linear_forward(pooled, m.weight.double(), m.bias.double(), None, m.operator, m.eps)[0]


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-4, 1e-6), (torch.float64, 1e-10, 1e-12)])
def test_convert_grouped_depthwise_and_linear(dtype, rtol, atol, _fresh_seed):
    generator = torch.Generator().manual_seed(_fresh_seed)
    model = _Mixed().to(dtype)
    x = torch.randn(2, 4, 9, 9, generator=generator, dtype=dtype)
    sphere, report = convert(model, operator="linear", include_linear=True, backend="reference")
    assert {l.name: l.groups for l in report.replaced} == {"grouped": 2, "depthwise": 6, "reflect": 1, "head": 1}
    assert isinstance(sphere.head, SphereLinear) and sphere.head.weight.dtype == dtype
    assert_close(sphere(x), _mixed_oracle(sphere, x), rtol=rtol, atol=atol, name="mixed model")


def test_convert_in_place_skip_rules_and_flags():
    model = _Mixed()
    model.grouped.weight.requires_grad_(False)
    same, report = convert(model, operator="cosine", inplace=True,
                           skip=["reflect", nn.Linear, lambda name, m: name == "depthwise"])
    assert same is model
    assert report.replaced_names == ["grouped"]
    assert set(report.skipped_names) == {"reflect", "depthwise"}
    assert isinstance(model.grouped, SphereConv2d) and not model.grouped.weight.requires_grad
    assert type(model.head) is nn.Linear
    assert "grouped: Conv2d -> SphereConv2d groups=2" in str(report)

    class Custom(nn.Conv2d):
        pass

    wrapper = nn.Sequential(Custom(3, 3, 1), nn.Conv2d(3, 3, 1))
    _, report = convert(wrapper, operator="cosine")
    assert report.replaced_names == ["1"]
    assert report.skipped[0][0] == "0" and "Custom" in report.skipped[0][1]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(operator="tanh"), ValueError, "operator"),
    (dict(operator="cosine", learnable_k=True), ValueError, "learnable_k"),
    (dict(operator="sigmoid", k=0.0), ValueError, "k must"),
    (dict(operator="cosine", skip=3), TypeError, "skip"),
    (dict(operator="cosine", include_linear="yes"), TypeError, "include_linear"),
])
def test_convert_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        convert(_Mixed(), **kwargs)
    with pytest.raises(TypeError, match="model"):
        convert("not a model")


# ----------------------------------------------------------------------------- orthogonality
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_orthogonality_penalty_matches_official_formula(dtype, rtol, _fresh_seed):
    generator = torch.Generator().manual_seed(_fresh_seed)
    model, _ = tiny_model("sphereresnet32", "cosine")
    model = model.to(dtype)
    penalty = orthogonality_penalty(model, 2e-4)
    penalty.backward()
    expected = torch.zeros((), dtype=torch.float64)
    grads = {}
    for name, m in model.named_modules():
        if isinstance(m, SphereConv2d):
            # The release's layout: [kh, kw, C_in, C_out] reshaped to [C_in*kh*kw, C_out].
            w = m.weight.detach().double().permute(2, 3, 1, 0).reshape(-1, m.out_channels)
            gram_err = w.t() @ w - torch.eye(m.out_channels, dtype=torch.float64)
            expected += 2e-4 * 0.5 * gram_err.pow(2).sum()
            # d/dW of 1/2 ||W^T W - I||^2 = 2 W (W^T W - I).
            grads[name] = (2e-4 * 2 * w @ gram_err).reshape(m.kernel_size + (m.in_channels, m.out_channels)).permute(3, 2, 0, 1)
    assert_close(penalty, expected, rtol=rtol, atol=0, name="penalty")
    for name, m in model.named_modules():
        if isinstance(m, SphereConv2d):
            assert_close(m.weight.grad, grads[name], rtol=rtol * 10, atol=0, name=f"grad {name}")
        elif type(m) is nn.Conv2d:
            assert m.weight.grad is None  # plain shortcuts are not penalised by default


def test_orthogonality_penalty_zero_for_orthonormal_filters_and_layer_choice():
    conv = nn.Conv2d(2, 4, 3, bias=False)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(18, 4, dtype=torch.float64))
        conv.weight.copy_(q.t().reshape(4, 2, 3, 3))
    model = nn.Sequential(conv)
    assert orthogonality_penalty(model, layers="conv").item() < 1e-10
    assert orthogonality_penalty(model).item() == 0.0  # no SphereConv2d in it
    with pytest.raises(ValueError, match="layers"):
        orthogonality_penalty(model, layers="all")
    with pytest.raises(ValueError, match="coeff"):
        orthogonality_penalty(model, -1.0)
    with pytest.raises(ValueError, match="weight"):
        filter_orthogonality(torch.randn(3))
    assert math.isnan(filter_orthogonality(torch.full((2, 2), float("nan"))).item())


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "learnable"])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 2e-3, 1e-5)])
def test_zero_and_nan_images(operator, dtype, rtol, atol, _fresh_seed):
    """A black image (all patches zero: c = 0, theta = pi/2) gives the oracle's finite logits;
    a NaN pixel makes that image's logits NaN (eval mode: no batch mixing), never a finite lie."""
    generator = torch.Generator().manual_seed(_fresh_seed)
    model, size = tiny_model("spherenet9", operator)
    _perturb(model, generator)
    model.eval()
    x = torch.randn(3, 3, size, size, generator=generator, dtype=torch.float64)
    x[0] = 0.0
    x[2, 1, 3, 4] = float("nan")
    oracle = float64_oracle(model)
    out = model.to(dtype)(x.to(dtype))
    ref = oracle(x)
    assert bool(torch.isfinite(out[:2]).all()) and bool(torch.isnan(out[2]).all())
    assert_close(out, ref, rtol=rtol, atol=atol, name=f"{operator} zero/NaN images")
