"""SphereConv2d: a drop-in ``nn.Conv2d`` whose dot product is replaced by g(angle)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as SF
from ..reference import DEFAULT_EPS, OPERATORS, OUTPUT_INVERTIBLE_OPERATORS

# Learnable k is parameterised as k = |kappa| + K_FLOOR (official release), so k stays >= 0.05
# whatever the optimiser does to kappa.
K_FLOOR = 0.05


def check_operator_args(operator: str, k: float, learnable_k: bool, k_init: float, eps: float) -> None:
    """Validation shared by the Sphere modules, run in ``__init__`` (not at the first forward)."""
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {OPERATORS}, got {operator!r}")
    if learnable_k and operator != "sigmoid":
        raise ValueError(f"learnable_k=True needs operator='sigmoid', got operator={operator!r}")
    if operator == "sigmoid":
        if learnable_k:
            if not (k_init > K_FLOOR and math.isfinite(k_init)):
                raise ValueError(f"k_init must be finite and > {K_FLOOR} (k = |kappa| + {K_FLOOR}), got {k_init!r}")
        elif not (isinstance(k, (int, float)) and k > 0 and math.isfinite(k)):
            raise ValueError(f"k must be a positive finite float, got {k!r}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


class _SphereMixin:
    """The operator state shared by SphereConv2d, SphereLinear (``_init_sphere``: operator and
    backend) and SphereNorm2d (``_init_operator``: the operator alone)."""

    def _init_sphere(self, n_out, operator, k, learnable_k, k_init, eps, backend, factory,
                     save_output=False):
        if backend not in SF.BACKENDS:
            raise ValueError(f"backend must be one of {SF.BACKENDS}, got {backend!r}")
        self._init_operator(n_out, operator, k, learnable_k, k_init, eps, factory)
        self.backend = backend
        SF.check_save_output(save_output, operator)
        self.save_output = save_output

    def _init_operator(self, n_out, operator, k, learnable_k, k_init, eps, factory):
        check_operator_args(operator, k, learnable_k, k_init, eps)
        self.operator, self.eps = operator, float(eps)
        self.learnable_k = bool(learnable_k)
        self.k_init = float(k_init)
        self.k = float(k) if operator == "sigmoid" and not learnable_k else None
        if self.learnable_k:
            self.kappa = nn.Parameter(torch.full((n_out,), self.k_init - K_FLOOR, **factory))
        else:
            self.register_parameter("kappa", None)

    def effective_k(self):
        """k as the op sees it: None, a float, or the per-channel ``|kappa| + 0.05``."""
        if self.kappa is not None:
            return self.kappa.abs() + K_FLOOR
        return self.k

    def _operator_repr(self) -> str:
        s = f", operator={self.operator}"
        if self.operator == "sigmoid":
            s += f", learnable_k=True, k_init={self.k_init}" if self.learnable_k else f", k={self.k}"
        if self.eps != DEFAULT_EPS:
            s += f", eps={self.eps}"
        return s

    def _sphere_repr(self) -> str:
        s = self._operator_repr()
        if self.backend != "auto":
            s += f", backend={self.backend}"
        if self.save_output:
            s += ", save_output=True"
        return s


class SphereConv2d(_SphereMixin, nn.Conv2d):
    """``nn.Conv2d`` with the SphereConv operator ``y = g(angle(w_o, patch)) + b``.

    Same constructor arguments, parameters and ``state_dict`` keys as :class:`torch.nn.Conv2d`
    (a Conv2d checkpoint loads into it), plus the operator: ``"linear"``, ``"cosine"`` or
    ``"sigmoid"`` with a fixed ``k`` or, with ``learnable_k=True``, one ``k = |kappa| + 0.05``
    per output channel (``kappa`` initialised to ``k_init - 0.05``).

    ``save_output=True`` (linear and cosine operators): see
    :func:`sphereops.sphere_conv2d` -- the layer then costs no activation memory beyond its
    output when the next layer keeps that output anyway (BatchNorm does), but the output must
    not be changed in place before the backward (use ``nn.ReLU(inplace=False)`` right after it).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", *, operator="cosine", k=0.3,
                 learnable_k=False, k_init=0.5, eps=DEFAULT_EPS, backend="auto",
                 save_output=False, device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, **factory)
        self._init_sphere(out_channels, operator, k, learnable_k, k_init, eps, backend, factory,
                          save_output)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sphere_repr()

    def forward(self, input: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return SF._sphere_conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                                 self.groups, self.operator, self.effective_k(), self.eps,
                                 self.backend, check_k=False, save_output=self.save_output)


def enable_save_output(model: nn.Module, enabled: bool = True) -> list:
    """Set ``save_output`` on every SphereConv2d and SphereLinear of ``model`` whose operator
    allows it (linear, cosine; sigmoid layers are left as they are). Returns the names set.

    For models whose Sphere layers feed a layer that keeps its input anyway (BatchNorm, as in
    the SphereNet/SphereResNet models here): their activation memory then matches a plain CNN's.
    Only where nothing modifies such a layer's output in place before the backward (autograd
    raises if something does, e.g. ``nn.ReLU(inplace=True)`` right after the conv)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    changed = []
    for name, module in model.named_modules():
        if (isinstance(module, _SphereMixin) and hasattr(module, "save_output")
                and module.operator in OUTPUT_INVERTIBLE_OPERATORS):
            module.save_output = enabled
            changed.append(name)
    return changed
