"""The implementations the benchmark compares, behind one calling convention.

Every convolution provider turns a :class:`RowSpec` (layer, dtype, layout, operator) into a
function ``f(x, w, bias, k) -> y`` that is differentiable in every tensor argument that requires
grad.  The runner builds the inputs (``tests.helpers.make_conv_inputs``), checks ``f`` against the
float64 reference and only then times it.

Providers (DESIGN.md section 5, "the honest baselines"):

``sphereops``         the package's public function ``sphereops.sphere_conv2d``: the fused Triton
                      kernels on CUDA (``backend="triton"``); on CPU the package's own CPU path
                      (``backend="auto"`` -> reference).
``unfused_official``  SphereConv written the way the authors' release does it: one conv for
                      ``w.x``, a second conv of ``x^2`` with an all-ones kernel for the patch
                      norms, elementwise clamp / arccos / g in the input dtype, plain autograd.
``unfused_best``      the best eager unfused version: ``sphereops.sphere_conv2d(...,
                      backend="reference")`` -- channel-sum of ``x^2`` then a box filter, math in
                      fp32, closed-form backward (on CPU this *is* ``sphereops``, so it is not
                      timed twice there).
``compiled_best``     ``torch.compile`` of the best unfused version.  Compiling through the
                      package's custom op would hide the graph from Inductor, so the closed-form
                      reference functions are wrapped in a plain ``autograd.Function`` that
                      Dynamo traces (fallback: the autograd version ``reference.conv2d_autograd``).
``conv2d``            plain ``F.conv2d`` (cuDNN on CUDA): the floor any SphereConv pays.

The linear twins (``sphere_linear``, unfused official-style, ``F.linear``) follow the same rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from sphereops import reference as R

CONV_PROVIDERS = ("sphereops", "unfused_official", "unfused_best", "compiled_best", "conv2d")
LINEAR_PROVIDERS = ("sphereops", "unfused_official", "unfused_best", "linear")
# Operators as the benchmark names them: "learnable" is sigmoid with a per-channel k that
# requires grad (its backward also produces dk).
BENCH_OPERATORS = ("linear", "cosine", "sigmoid", "learnable")
# The official release's fixed sigmoid k.
FIXED_SIGMOID_K = 0.3

PROVIDER_TITLES = {
    "sphereops": "sphereops fused",
    "unfused_official": "eager unfused, official style",
    "unfused_best": "eager unfused, best (reference)",
    "compiled_best": "torch.compile(best unfused)",
    "conv2d": "F.conv2d (cuDNN)",
    "linear": "F.linear (cuBLAS)",
}


@dataclass
class RowSpec:
    """What one benchmark row computes: a layer, a numeric config and an operator."""

    shape: object                     # shapes.ConvShape or shapes.LinearShape
    dtype: torch.dtype
    device: torch.device
    operator: str = "linear"          # one of BENCH_OPERATORS
    channels_last: bool = False
    tf32: bool = False                # fp32 rows only: tensor-core TF32 allowed
    eps: float = R.DEFAULT_EPS
    sphereops_backend: Optional[str] = None   # None: "triton" on CUDA, "auto" elsewhere
    notes: dict = field(default_factory=dict)  # providers record what they actually ran

    @property
    def sphere_operator(self) -> str:
        return "sigmoid" if self.operator == "learnable" else self.operator

    @property
    def learnable(self) -> bool:
        return self.operator == "learnable"

    @property
    def stride(self):
        return (self.shape.stride, self.shape.stride)

    @property
    def padding(self):
        return (self.shape.padding, self.shape.padding)

    @property
    def dilation(self):
        return (self.shape.dilation, self.shape.dilation)

    def resolved_sphereops_backend(self) -> str:
        if self.sphereops_backend is not None:
            return self.sphereops_backend
        return "triton" if self.device.type == "cuda" else "auto"


ConvFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]],
                  torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Official-style unfused SphereConv (written from the paper's formulas, in the input dtype).
# ---------------------------------------------------------------------------------------------

def official_unfused_conv2d(x, w, bias, k, stride, padding, dilation, groups, operator, eps):
    """SphereConv the straightforward way: every step an eager PyTorch op, autograd for backward.

    The patch norm is a convolution of ``x^2`` with an all-ones ``[G, C_in/G, kh, kw]`` kernel
    (one output channel per group); the filter norm a reduction over each filter; then the
    cosine, its clamp, ``arccos`` and g (no bounded arccos derivative: this is the baseline, not
    the specification).  The convolutions and the cosine run in the input dtype; for fp16/bf16
    the chain after the cosine runs in fp32 and y is cast back, as autocast would run
    ``acos``/``exp`` -- in bf16 the learnable-k gradient (a sum of many cancelling terms) is off
    by ~20 % and would fail the spot check.
    """
    kh, kw = w.shape[2], w.shape[3]
    c_in = x.shape[1]
    dot = F.conv2d(x, w, None, stride, padding, dilation, groups)
    ones = torch.ones(groups, c_in // groups, kh, kw, dtype=x.dtype, device=x.device)
    x_norm = torch.sqrt(F.conv2d(x * x, ones, None, stride, padding, dilation, groups) + eps)
    w_norm = torch.sqrt((w * w).sum(dim=(1, 2, 3)) + eps)
    n, c_out, ho, wo = dot.shape
    per_group = c_out // groups
    # Broadcast each group's patch norm over that group's output channels.
    x_norm = x_norm.repeat_interleave(per_group, dim=1) if groups > 1 else x_norm
    cos = dot / x_norm / w_norm.reshape(1, -1, 1, 1)
    cos = torch.clamp(cos, -1.0, 1.0)
    out_dtype = cos.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        cos = cos.float()
    if operator == "cosine":
        y = cos
    elif operator == "linear":
        y = 1.0 - (2.0 / math.pi) * torch.acos(cos)
    elif operator == "sigmoid":
        kk = k.reshape(1, -1, 1, 1).to(cos.dtype)
        # The paper's form: (1+e^{-pi/2k})/(1-e^{-pi/2k}) * (1-e^{theta/k-pi/2k})/(1+e^{theta/k-pi/2k})
        edge = torch.exp(-math.pi / (2.0 * kk))
        scale = (1.0 + edge) / (1.0 - edge)
        t = torch.exp(torch.acos(cos) / kk - math.pi / (2.0 * kk))
        y = scale * (1.0 - t) / (1.0 + t)
    else:
        raise ValueError(f"operator must be one of {R.OPERATORS}, got {operator!r}")
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y.to(out_dtype)


def official_unfused_linear(x, w, bias, k, operator, eps):
    """The linear twin of :func:`official_unfused_conv2d` (a patch = one row of ``x``)."""
    dot = F.linear(x, w)
    x_norm = torch.sqrt((x * x).sum(dim=1, keepdim=True) + eps)
    w_norm = torch.sqrt((w * w).sum(dim=1) + eps)
    cos = torch.clamp(dot / x_norm / w_norm, -1.0, 1.0)
    out_dtype = cos.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        cos = cos.float()
        k = k.float() if k is not None else None
    if operator == "cosine":
        y = cos
    elif operator == "linear":
        y = 1.0 - (2.0 / math.pi) * torch.acos(cos)
    elif operator == "sigmoid":
        edge = torch.exp(-math.pi / (2.0 * k))
        t = torch.exp(torch.acos(cos) / k - math.pi / (2.0 * k))
        y = (1.0 + edge) / (1.0 - edge) * (1.0 - t) / (1.0 + t)
    else:
        raise ValueError(f"operator must be one of {R.OPERATORS}, got {operator!r}")
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Closed-form reference as a plain autograd.Function (traceable by Dynamo, unlike a custom op).
# ---------------------------------------------------------------------------------------------

class ClosedFormSphereConv2d(torch.autograd.Function):
    """``reference.conv2d_forward`` / ``conv2d_backward`` glued into an autograd.Function."""

    @staticmethod
    def forward(ctx, x, w, bias, k, stride, padding, dilation, groups, operator, eps):
        y, c, r_x = R.conv2d_forward(x, w, bias, k, stride, padding, dilation, groups, operator, eps)
        ctx.save_for_backward(x, w, k, c, r_x)
        ctx.conf = (stride, padding, dilation, groups, operator, eps)
        ctx.has_k = k is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, k, c, r_x = ctx.saved_tensors
        stride, padding, dilation, groups, operator, eps = ctx.conf
        need = ctx.needs_input_grad
        mask = (need[0], need[1], need[2], bool(need[3] and ctx.has_k))
        dx, dw, db, dk = R.conv2d_backward(dy.contiguous() if dy.dim() != 4 else dy, x, w, k, c,
                                           r_x, stride, padding, dilation, groups, operator, eps,
                                           mask)
        return dx, dw, db, dk, None, None, None, None, None, None


def closed_form_conv2d(x, w, bias, k, stride, padding, dilation, groups, operator, eps):
    return ClosedFormSphereConv2d.apply(x, w, bias, k, stride, padding, dilation, groups,
                                        operator, eps)


def _sphereops_module():
    import sphereops
    return sphereops


# ---------------------------------------------------------------------------------------------
# Conv providers
# ---------------------------------------------------------------------------------------------

def _conv_args(spec: RowSpec):
    return spec.stride, spec.padding, spec.dilation, spec.shape.groups


def _make_sphereops(spec: RowSpec) -> ConvFn:
    sphereops = _sphereops_module()
    stride, padding, dilation, groups = _conv_args(spec)
    op, eps, backend = spec.sphere_operator, spec.eps, spec.resolved_sphereops_backend()
    spec.notes["sphereops_backend"] = backend

    def call(x, w, bias, k):
        return sphereops.sphere_conv2d(x, w, bias, stride, padding, dilation, groups,
                                       operator=op, k=k, eps=eps, backend=backend)
    return call


def _make_unfused_official(spec: RowSpec) -> ConvFn:
    stride, padding, dilation, groups = _conv_args(spec)
    op, eps = spec.sphere_operator, spec.eps

    def call(x, w, bias, k):
        return official_unfused_conv2d(x, w, bias, k, stride, padding, dilation, groups, op, eps)
    return call


def _make_unfused_best(spec: RowSpec) -> ConvFn:
    stride, padding, dilation, groups = _conv_args(spec)
    op, eps = spec.sphere_operator, spec.eps
    try:
        sphere_conv2d = _sphereops_module().sphere_conv2d
    except (ImportError, AttributeError):
        sphere_conv2d = None
    if sphere_conv2d is None:
        # The public function is missing (an older checkout): time the same closed form directly.
        spec.notes["unfused_best_variant"] = "ClosedFormSphereConv2d"

        def call(x, w, bias, k):
            return closed_form_conv2d(x, w, bias, k, stride, padding, dilation, groups, op, eps)
        return call

    def call(x, w, bias, k):
        return sphere_conv2d(x, w, bias, stride, padding, dilation, groups, operator=op, k=k,
                             eps=eps, backend="reference")
    return call


def _reset_dynamo():
    import torch._dynamo
    torch._dynamo.reset()
    # Each row compiles afresh (reset above); the limit only has to cover one row's guards.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))


def _make_compiled_best(spec: RowSpec) -> ConvFn:
    """torch.compile(fullgraph=True, dynamic=False) of the closed-form path; falls back to the
    autograd version if Dynamo cannot trace the autograd.Function on this torch version.

    fullgraph=True makes a graph break an error (recorded in the row) instead of a silent,
    partly-eager "compiled" baseline."""
    stride, padding, dilation, groups = _conv_args(spec)
    op, eps = spec.sphere_operator, spec.eps
    _reset_dynamo()

    def closed_form(x, w, bias, k):
        return closed_form_conv2d(x, w, bias, k, stride, padding, dilation, groups, op, eps)

    def autograd_version(x, w, bias, k):
        return R.conv2d_autograd(x, w, bias, k, stride, padding, dilation, groups, op, eps)

    variants = [("closed_form", closed_form), ("conv2d_autograd", autograd_version)]
    state = {"fn": None}

    def call(x, w, bias, k):
        if state["fn"] is not None:
            return state["fn"](x, w, bias, k)
        errors = []
        for name, fn in variants:
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            try:
                y = compiled(x, w, bias, k)
            except Exception as exc:  # noqa: BLE001 - try the next variant, report all
                errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                _reset_dynamo()
                continue
            state["fn"] = compiled
            spec.notes["compiled_variant"] = name
            if errors:
                spec.notes["compiled_fallback_reason"] = errors
            return y
        raise RuntimeError("torch.compile failed for every variant: " + " | ".join(errors))
    return call


def _make_conv2d(spec: RowSpec) -> ConvFn:
    stride, padding, dilation, groups = _conv_args(spec)

    def call(x, w, bias, k):
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)
    return call


CONV_FACTORIES = {
    "sphereops": _make_sphereops,
    "unfused_official": _make_unfused_official,
    "unfused_best": _make_unfused_best,
    "compiled_best": _make_compiled_best,
    "conv2d": _make_conv2d,
}


def conv_unsupported(provider: str, spec: RowSpec) -> Optional[str]:
    """Why ``provider`` cannot run ``spec`` (None when it can)."""
    if provider not in CONV_FACTORIES:
        return f"unknown provider {provider!r}"
    if provider == "sphereops":
        try:
            sphereops = _sphereops_module()
        except ImportError as exc:
            return f"sphereops does not import: {exc}"
        if not hasattr(sphereops, "sphere_conv2d"):
            return "sphereops.sphere_conv2d does not exist yet"
        if spec.device.type == "cpu" and spec.resolved_sphereops_backend() == "auto":
            # On CPU "auto" is the reference path: the same code as unfused_best, timed once.
            return None
    if provider == "unfused_best" and spec.device.type == "cpu" and spec.sphereops_backend in (None, "auto", "reference"):
        return "same code as sphereops on CPU (the reference backend)"
    return None


def make_conv(provider: str, spec: RowSpec) -> ConvFn:
    return CONV_FACTORIES[provider](spec)


def provider_computes_sphere(provider: str) -> bool:
    return provider not in ("conv2d", "linear")


# ---------------------------------------------------------------------------------------------
# Linear providers
# ---------------------------------------------------------------------------------------------

def _make_linear_sphereops(spec: RowSpec):
    sphereops = _sphereops_module()
    op, eps, backend = spec.sphere_operator, spec.eps, spec.resolved_sphereops_backend()
    spec.notes["sphereops_backend"] = backend

    def call(x, w, bias, k):
        return sphereops.sphere_linear(x, w, bias, operator=op, k=k, eps=eps, backend=backend)
    return call


def _make_linear_official(spec: RowSpec):
    op, eps = spec.sphere_operator, spec.eps

    def call(x, w, bias, k):
        return official_unfused_linear(x, w, bias, k, op, eps)
    return call


def _make_linear_best(spec: RowSpec):
    sphereops = _sphereops_module()
    op, eps = spec.sphere_operator, spec.eps

    def call(x, w, bias, k):
        return sphereops.sphere_linear(x, w, bias, operator=op, k=k, eps=eps, backend="reference")
    return call


def _make_linear_plain(spec: RowSpec):
    def call(x, w, bias, k):
        return F.linear(x, w, bias)
    return call


LINEAR_FACTORIES = {
    "sphereops": _make_linear_sphereops,
    "unfused_official": _make_linear_official,
    "unfused_best": _make_linear_best,
    "linear": _make_linear_plain,
}


def linear_unsupported(provider: str, spec: RowSpec) -> Optional[str]:
    if provider not in LINEAR_FACTORIES:
        return f"unknown provider {provider!r}"
    if provider in ("sphereops", "unfused_best"):
        try:
            sphereops = _sphereops_module()
        except ImportError as exc:
            return f"sphereops does not import: {exc}"
        if not hasattr(sphereops, "sphere_linear"):
            return "sphereops.sphere_linear does not exist yet"
    if provider == "unfused_best" and spec.device.type == "cpu" and spec.sphereops_backend in (None, "auto", "reference"):
        return "same code as sphereops on CPU (the reference backend)"
    return None


def make_linear(provider: str, spec: RowSpec):
    return LINEAR_FACTORIES[provider](spec)
