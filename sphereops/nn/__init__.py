"""Sphere modules, drop-in replacements for their torch.nn counterparts."""
from .conv import SphereConv2d
from .linear import SphereLinear

__all__ = ["SphereConv2d", "SphereLinear"]
