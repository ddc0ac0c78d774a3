"""SphereLinear: a drop-in ``nn.Linear`` whose dot product is replaced by g(angle)."""
from __future__ import annotations

from torch import Tensor, nn

from .. import functional as SF
from ..reference import DEFAULT_EPS
from .conv import _SphereMixin


class SphereLinear(_SphereMixin, nn.Linear):
    """``nn.Linear`` with the SphereConv operator applied to each input row (a "patch" = a row).

    Same constructor arguments, parameters and ``state_dict`` keys as :class:`torch.nn.Linear`,
    plus ``operator``, ``k``, ``learnable_k``, ``k_init``, ``eps``, ``backend`` and
    ``save_output`` as :class:`sphereops.nn.SphereConv2d`.
    """

    def __init__(self, in_features, out_features, bias=True, *, operator="cosine", k=0.3,
                 learnable_k=False, k_init=0.5, eps=DEFAULT_EPS, backend="auto", save_output=False,
                 device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__(in_features, out_features, bias, **factory)
        self._init_sphere(out_features, operator, k, learnable_k, k_init, eps, backend, factory,
                          save_output)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sphere_repr()

    def forward(self, input: Tensor) -> Tensor:
        return SF._sphere_linear(input, self.weight, self.bias, self.operator, self.effective_k(),
                                 self.eps, self.backend, check_k=False, save_output=self.save_output)
