"""Sphere modules, drop-in replacements for their torch.nn counterparts."""
from ..loss import GASoftmaxLoss
from .conv import SphereConv2d, enable_save_output
from .linear import SphereLinear
from .norm import SphereNorm2d
from .recurrent import SphereGRU, SphereGRUCell, SphereLSTM, SphereLSTMCell

__all__ = ["SphereConv2d", "SphereLinear", "SphereNorm2d", "SphereLSTMCell", "SphereGRUCell",
           "SphereLSTM", "SphereGRU", "GASoftmaxLoss", "enable_save_output"]
