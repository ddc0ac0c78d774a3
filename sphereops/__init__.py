"""sphereops: fused Triton kernels for hyperspherical convolution (SphereConv).

``import sphereops`` needs only torch (triton is optional; the kernels package
``sphereops_kernels`` is imported on first use of the Triton backend), and no CUDA device is
queried at import time.
"""
from . import models, nn, reference
from .convert import ConversionReport, convert
from .functional import sphere_conv2d, sphere_linear
from .loss import ga_softmax_logits
from .orthogonality import orthogonality_penalty
from .reference import OPERATORS

__version__ = "0.1.0"
__all__ = ["sphere_conv2d", "sphere_linear", "ga_softmax_logits", "convert", "ConversionReport",
           "orthogonality_penalty", "models", "nn", "reference", "OPERATORS"]
