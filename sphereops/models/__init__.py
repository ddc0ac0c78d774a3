"""SphereNet models. Every model takes ``operator``: None is the plain-CNN baseline built from the
same code; "linear", "cosine", "sigmoid" and "learnable" use SphereConv2d.

``build_model(name, ...)`` builds one by name (the training CLI's ``--model``).
"""
from __future__ import annotations

from ._layers import NORM_CHOICES, OPERATOR_CHOICES, canonical_operator, scale_width
from .resnet import BasicUnit, ResNet18, SphereResNet32
from .spherenet import SphereNet9

MODEL_NAMES = ("spherenet9", "sphereresnet32", "resnet18")


def build_model(name: str, *, num_classes: int, in_channels: int = 3, input_size: int = 32,
                operator="cosine", k: float = 0.3, k_init: float = 0.5, width_mult: float = 1.0,
                norm: str = "batch", backend: str = "auto"):
    """Build a model by name with its official widths scaled by ``width_mult``.

    ``input_size`` matters for SphereNet-9 (its fc6 kernel); ResNet-18 uses the CIFAR stem for
    inputs of 64 pixels or fewer.
    """
    if not isinstance(name, str) or name.lower() not in MODEL_NAMES:
        raise ValueError(f"model must be one of {MODEL_NAMES}, got {name!r}")
    if not (isinstance(width_mult, (int, float)) and width_mult > 0):
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
    common = dict(num_classes=num_classes, in_channels=in_channels, operator=operator, k=k,
                  k_init=k_init, norm=norm, backend=backend)
    name = name.lower()
    if name == "spherenet9":
        return SphereNet9(input_size=input_size,
                          widths=tuple(scale_width(w, width_mult) for w in (128, 192, 256)),
                          fc6_width=scale_width(256, width_mult), **common)
    if name == "sphereresnet32":
        return SphereResNet32(widths=tuple(scale_width(w, width_mult) for w in (96, 192, 384)),
                              **common)
    return ResNet18(widths=tuple(scale_width(w, width_mult) for w in (64, 128, 256, 512)),
                    stem="cifar" if input_size <= 64 else "imagenet", **common)


__all__ = ["BasicUnit", "MODEL_NAMES", "NORM_CHOICES", "OPERATOR_CHOICES", "ResNet18",
           "SphereNet9", "SphereResNet32", "build_model", "canonical_operator"]
