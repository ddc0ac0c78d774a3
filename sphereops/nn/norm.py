"""SphereNorm2d: SphereConv used as a normalisation layer (DESIGN §1, "SphereNorm").

Design: a *depthwise* SphereConv (``groups = C``, ``kernel_size x kernel_size``, same padding)
whose filter starts as a centre delta, followed by a per-channel affine map::

    u[n, ch, i, j] = g(angle(f_ch, patch_ch(n, i, j)))      in [-1, 1]
    y              = weight[ch] * u + bias[ch]

Why depthwise and why a centre-delta filter:

* A normalisation keeps channel identity (output channel ``ch`` is "input channel ``ch``,
  normalised"); a full SphereConv would mix channels and cost ``C^2 k^2`` per pixel, i.e. it
  would be another conv layer, not a normalisation. Depthwise costs ``C k^2`` per pixel.
* The norm is taken over a ``k x k`` spatial window of the channel, not over a single value:
  with a 1x1 window ``c = x / sqrt(x^2 + eps)`` is just ``sign(x)`` (a binariser).
* With the centre-delta filter the cosine is ``x[i, j] / sqrt(sum_window x^2 + eps)``: the value
  divided by its local energy, i.e. local contrast normalisation, bounded in [-1, 1]. The filter
  is learnable by default (it can learn which direction of the local patch to measure); pass
  ``learnable_filter=False`` to keep the plain normalisation.
* Only the sample's own pixels enter each output: no batch statistics, identical in training and
  evaluation, valid at batch size 1 and with any batch composition.
* ``weight``/``bias`` (init 1 and 0, like BatchNorm's affine) let the layer leave [-1, 1]; the
  layer can be used in place of or after a BatchNorm.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from ..reference import DEFAULT_EPS
from .conv import SphereConv2d

__all__ = ["SphereNorm2d"]


class SphereNorm2d(nn.Module):
    """Normalisation by a depthwise SphereConv (see the module docstring for the design).

    Args:
        num_features: channels ``C`` of the ``[N, C, H, W]`` input.
        kernel_size: odd window size of the local norm (default 3).
        operator, k, learnable_k, k_init, eps, backend: as :class:`sphereops.nn.SphereConv2d`.
        affine: learn the per-channel ``weight`` (scale) and ``bias`` (shift).
        learnable_filter: learn the depthwise filter (initialised as a centre delta).

    Shape: ``[N, C, H, W] -> [N, C, H, W]``; without ``affine`` the output lies in [-1, 1].
    """

    def __init__(self, num_features: int, kernel_size: int = 3, *, operator: str = "cosine",
                 k: float = 0.3, learnable_k: bool = False, k_init: float = 0.5,
                 eps: float = DEFAULT_EPS, affine: bool = True, learnable_filter: bool = True,
                 backend: str = "auto", device=None, dtype=None):
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
        self.affine, self.learnable_filter = bool(affine), bool(learnable_filter)
        self.sphere = SphereConv2d(self.num_features, self.num_features, self.kernel_size,
                                   padding=self.kernel_size // 2, groups=self.num_features,
                                   bias=False, operator=operator, k=k, learnable_k=learnable_k,
                                   k_init=k_init, eps=eps, backend=backend, **factory)
        self.sphere.weight.requires_grad_(self.learnable_filter)
        if self.affine:
            self.weight = nn.Parameter(torch.empty(self.num_features, **factory))
            self.bias = nn.Parameter(torch.empty(self.num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.sphere.weight.zero_()
            centre = self.kernel_size // 2
            self.sphere.weight[:, 0, centre, centre] = 1.0
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, torch.Tensor) or input.dim() != 4:
            raise ValueError(f"SphereNorm2d expects a 4-D [N, C, H, W] input, got "
                             f"{list(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"SphereNorm2d({self.num_features}) got an input with "
                             f"{input.shape[1]} channels")
        u = self.sphere(input)
        if not self.affine:
            return u
        return u * self.weight.view(1, -1, 1, 1).to(u.dtype) + self.bias.view(1, -1, 1, 1).to(u.dtype)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, kernel_size={self.kernel_size}, operator={self.sphere.operator}"
        if not self.affine:
            s += ", affine=False"
        if not self.learnable_filter:
            s += ", learnable_filter=False"
        return s
