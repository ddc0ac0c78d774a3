"""sphereops: fused Triton kernels for hyperspherical convolution (SphereConv).

``import sphereops`` needs only torch: triton is imported on first use of the Triton backend, and
no CUDA device is queried at import time.
"""
from . import nn, reference
from .functional import sphere_conv2d, sphere_linear
from .reference import OPERATORS

__version__ = "0.1.0"
__all__ = ["sphere_conv2d", "sphere_linear", "nn", "reference", "OPERATORS"]
