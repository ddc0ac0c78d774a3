"""Layer factories shared by the model definitions.

Every model takes ``operator``: ``None`` builds the plain-convolution baseline from exactly the
same code, so a comparison between a CNN and a SphereNet differs only in the convolutions.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..nn import SphereNorm2d

# "learnable" is the sigmoid operator with one learned k per output channel (the official
# "lr_sigmoid"); the other three are the fixed SphereConv operators of sphereops.reference.
OPERATOR_CHOICES = (None, "linear", "cosine", "sigmoid", "learnable")
NORM_CHOICES = ("batch", "sphere", "both", "none")

# The official release normalises with eps = 1e-3 (its TF batch_norm); the running-average
# momentum stays at PyTorch's 0.1 because the official 0.999 EMA needs tens of thousands of
# iterations before the evaluation statistics mean anything, far more than a CPU budget allows.
BATCHNORM_EPS = 1e-3


def canonical_operator(operator):
    """Map the accepted spellings of ``operator`` onto ``OPERATOR_CHOICES``.

    ``None``, ``"none"`` and ``"plain"`` all mean the ordinary convolution.
    """
    if operator is None:
        return None
    if not isinstance(operator, str):
        raise TypeError(f"operator must be a string or None, got {type(operator).__name__}")
    name = operator.lower()
    if name in ("none", "plain", "cnn"):
        return None
    if name == "lr_sigmoid":
        name = "learnable"
    if name not in OPERATOR_CHOICES:
        raise ValueError(
            f"operator must be one of None, 'linear', 'cosine', 'sigmoid', 'learnable'; got {operator!r}"
        )
    return name


def _sphere_modules():
    """Import the SphereConv2d / SphereLinear modules at use time (sphereops.nn is optional)."""
    try:
        from sphereops import nn as sphere_nn

        return sphere_nn.SphereConv2d, sphere_nn.SphereLinear
    except (ImportError, AttributeError) as exc:  # pragma: no cover - only while nn is missing
        raise ImportError(
            "sphereops.nn.SphereConv2d / SphereLinear are not available; SphereConv models need them"
        ) from exc


class ConvFactory:
    """Builds the convolutions of one model: plain ``nn.Conv2d`` or ``SphereConv2d``.

    ``operator`` None -> plain conv; "linear" / "cosine" / "sigmoid" -> SphereConv2d with that
    angular function (``k`` for sigmoid); "learnable" -> sigmoid with a learned per-channel k
    starting at ``k_init``. ``backend`` is handed to every SphereConv2d.
    """

    def __init__(self, operator="cosine", *, k=0.3, k_init=0.5, backend="auto"):
        self.operator = canonical_operator(operator)
        if not (isinstance(k, (int, float)) and k > 0):
            raise ValueError(f"k must be a positive number, got {k!r}")
        if not (isinstance(k_init, (int, float)) and k_init > 0.05):
            raise ValueError(f"k_init must be a number > 0.05 (k = |kappa| + 0.05), got {k_init!r}")
        self.k = float(k)
        self.k_init = float(k_init)
        self.backend = backend

    def conv(self, in_channels, out_channels, kernel_size, *, stride=1, padding=0, bias=False,
             sphere=True) -> nn.Conv2d:
        """One convolution; ``sphere=False`` forces a plain conv (shortcuts, as in the release)."""
        if self.operator is None or not sphere:
            return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                             bias=bias)
        sphere_conv2d, _ = _sphere_modules()
        if self.operator == "learnable":
            return sphere_conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                 padding=padding, bias=bias, operator="sigmoid", learnable_k=True,
                                 k_init=self.k_init, backend=self.backend)
        return sphere_conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                             bias=bias, operator=self.operator, k=self.k, backend=self.backend)


def make_norm(kind: str, channels: int) -> nn.Module:
    """The normalisation after a convolution.

    ``"batch"``: BatchNorm2d (the official models); ``"none"``: identity; ``"sphere"``:
    ``sphereops.nn.SphereNorm2d``; ``"both"``: SphereNorm2d followed by BatchNorm2d.
    """
    if kind not in NORM_CHOICES:
        raise ValueError(f"norm must be one of {NORM_CHOICES}, got {kind!r}")
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=BATCHNORM_EPS)
    if kind == "none":
        return nn.Identity()
    if kind == "sphere":
        return SphereNorm2d(channels)
    return nn.Sequential(SphereNorm2d(channels), nn.BatchNorm2d(channels, eps=BATCHNORM_EPS))


def init_weights(model: nn.Module) -> None:
    """He-normal filters (std = sqrt(2 / fan_in), the official initialiser) for every conv,
    plain or sphere, so that the CNN baseline and a SphereNet built from the same seed start from
    the same filters; classifier weights get PyTorch's default, biases zero."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            with torch.no_grad():
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
                if module.bias is not None:
                    module.bias.zero_()
        elif isinstance(module, nn.Linear) and module.bias is not None:
            with torch.no_grad():
                module.bias.zero_()


def scale_width(width: int, width_mult: float) -> int:
    """A channel count scaled by ``width_mult`` (for CPU-sized versions), at least 4."""
    return max(4, int(round(width * width_mult)))
