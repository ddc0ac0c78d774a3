"""SphereNorm2d: SphereConv used as a normalisation layer (DESIGN §1, "SphereNorm").

Design (see :func:`sphereops.functional.sphere_norm2d`): output channel ``o`` at a pixel is
g(angle) between the local patch -- *all* channels of a ``kernel_size`` x ``kernel_size``
window, same padding -- and the patch's axis ``(o, centre)``, i.e. the SphereConv with the
fixed unit filters ``e_(o, centre)``, followed by a per-channel affine map::

    u[n, o, i, j] = g(arccos(x[n, o, i, j] / (r(n, i, j) * sqrt(1 + eps))))     in [-1, 1]
    r(n, i, j)    = sqrt(sum_c sum_window x[n, c]^2 + eps)
    y             = weight[o] * u + bias[o]

Why this patch, and not the channel's own window (the first version of this layer):

* The patch spans the channels, like a SphereConv's: the layer keeps the relative magnitudes of
  the channels at a pixel (and, with a window, of its neighbours) and removes only the local
  overall scale. A per-channel window binarises: with one pixel in it (a 1x1 map, e.g. after
  the last pooling) ``x / sqrt(x^2 + eps)`` is ``sign(x)`` with a gradient of ~1/sqrt(eps) near
  0 and ~0 elsewhere -- SphereNet-9 with that layer stayed at chance at batch size 4.
* The filters are fixed, so the angle has a closed form: no GEMM (a learnable filter would make
  this a full SphereConv layer, which is what SphereConv2d is). Cost: a channel-sum of squares,
  a box sum and an elementwise g -- memory-bound PyTorch ops, not a Triton kernel.
* Only the sample's own pixels enter each output: no batch statistics, identical in training
  and evaluation, valid at batch size 1 and with any batch composition.
* The affine ``weight`` starts at ``sqrt(C * kernel_size^2)``: a patch whose energy is spread
  evenly over its ``C * kernel_size^2`` entries then gives unit-RMS outputs, the scale a
  BatchNorm hands the next layer (starting at 1 trained worse: the outputs are ~1/sqrt(C)).
  ``bias`` starts at 0. Without ``affine`` the output lies in [-1, 1].
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from .. import functional as SF
from ..reference import DEFAULT_EPS
from .conv import K_FLOOR, _SphereMixin

__all__ = ["SphereNorm2d"]


class SphereNorm2d(_SphereMixin, nn.Module):
    """Normalisation by SphereConv with fixed axis filters (see the module docstring).

    Args:
        num_features: channels ``C`` of the ``[N, C, H, W]`` input.
        kernel_size: odd window size of the patch (default 1: each pixel's channel vector).
        operator, k, learnable_k, k_init, eps: as :class:`sphereops.nn.SphereConv2d`
            (learnable k: one ``k = |kappa| + 0.05`` per channel).
        affine: learn the per-channel ``weight`` (scale, initially ``sqrt(C * kernel_size^2)``)
            and ``bias`` (shift, initially 0).

    Shape: ``[N, C, H, W] -> [N, C, H, W]``; without ``affine`` the output lies in [-1, 1].
    """

    def __init__(self, num_features: int, kernel_size: int = 1, *, operator: str = "cosine",
                 k: float = 0.3, learnable_k: bool = False, k_init: float = 0.5,
                 eps: float = DEFAULT_EPS, affine: bool = True, device=None, dtype=None):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral) \
                or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer (same padding), got "
                             f"{kernel_size!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.kernel_size = int(num_features), int(kernel_size)
        self._init_operator(self.num_features, operator, k, learnable_k, k_init, eps, factory)
        self.affine = bool(affine)
        if self.affine:
            self.weight = nn.Parameter(torch.empty(self.num_features, **factory))
            self.bias = nn.Parameter(torch.empty(self.num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.kappa is not None:
                self.kappa.fill_(self.k_init - K_FLOOR)
            if self.affine:
                self.weight.fill_(math.sqrt(self.num_features * self.kernel_size ** 2))
                self.bias.zero_()

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, torch.Tensor) or input.dim() != 4:
            raise ValueError(f"SphereNorm2d expects a 4-D [N, C, H, W] input, got "
                             f"{list(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"SphereNorm2d({self.num_features}) got an input with "
                             f"{input.shape[1]} channels")
        k = self.effective_k()
        if isinstance(k, Tensor):
            k = k.to(input.dtype)
        u = SF._sphere_norm2d(input, self.kernel_size, self.operator, k, self.eps, check_k=False)
        if not self.affine:
            return u
        return u * self.weight.view(1, -1, 1, 1).to(u.dtype) + self.bias.view(1, -1, 1, 1).to(u.dtype)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, kernel_size={self.kernel_size}" + self._operator_repr()
        if not self.affine:
            s += ", affine=False"
        return s
