"""Generalised angular softmax (GA-Softmax) and its special case W-Softmax (DESIGN §1).

Class weights are normalised, the feature norm is kept. With ``theta_j`` the angle between the
feature ``x`` and class weight ``w_j``::

    f_j = ||x|| g(theta_j)                                      j != y
    f_y = (lambda ||x|| g(theta_y) + ||x|| psi(theta_y)) / (1 + lambda)
    psi(theta) = g(m theta - j pi) - 2 j,   j = floor(m theta / pi)

``m = 1`` is W-Softmax (``psi = g``); with ``g = cos`` this is SphereFace's A-Softmax.
``psi`` is continuous and decreasing on [0, pi] (at each breakpoint ``g(pi) - 2j = g(0) - 2(j+1)``).

Gradients. Cosine needs no arccos at all: ``cos(m theta - j pi) = (-1)^j T_m(cos theta)`` with the
Chebyshev polynomial ``T_m``, so the gradient is a polynomial in ``c`` and finite everywhere
(theta = 0, pi and the breakpoints included). Linear and sigmoid need theta itself; its
derivative uses the project's bounded arccos rule
``dtheta/dc = -1/sqrt(max(1 - c^2, ARCCOS_DELTA))`` (``sphereops.reference``), so gradients stay
finite at theta = 0 and pi. ``j`` is piecewise constant (no gradient).

Numerics: float64 stays float64; every other dtype is computed in float32 and the logits are
returned in the input's dtype.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference as R

Tensor = torch.Tensor

__all__ = ["ga_softmax_logits", "GASoftmaxLoss", "SphereFaceLambda"]

# Norms below this count as zero when dividing (a zero feature has f_j = 0 for every class).
_TINY_NORM = 1e-12


def _chebyshev(c: Tensor, m: int) -> Tensor:
    """T_m(c) = cos(m arccos c) by the three-term recurrence (exact polynomial gradient)."""
    prev, cur = torch.ones_like(c), c
    for _ in range(m - 1):
        prev, cur = cur, 2.0 * c * cur - prev
    return cur


def _check_margin(margin) -> int:
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be an integer >= 1, got {type(margin).__name__}")
    if isinstance(margin, numbers.Integral):
        value = int(margin)
    elif float(margin).is_integer():
        value = int(margin)
    else:
        raise ValueError(f"margin must be an integer >= 1, got {margin!r}")
    if value < 1:
        raise ValueError(f"margin must be an integer >= 1, got {margin!r}")
    return value


def _check_operator(operator) -> str:
    if operator not in R.OPERATORS:
        raise ValueError(f"operator must be one of {R.OPERATORS}, got {operator!r}")
    return operator


def _check_k_value(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (numbers.Real, torch.Tensor)):
        raise TypeError(f"k must be a positive number or tensor, got {type(k).__name__}")
    if isinstance(k, numbers.Real):
        if not (k > 0 and math.isfinite(k)):
            raise ValueError(f"k must be positive and finite, got {k!r}")


def _resolve_k(k, operator: str, num_classes: int, like: Tensor) -> Optional[Tensor]:
    """k as a tensor broadcastable against [N, C] logits (sigmoid), or None."""
    if operator != "sigmoid":
        return None
    if k is None:
        k = 0.3  # the official release's fixed sigmoid steepness
    _check_k_value(k)
    if isinstance(k, numbers.Real):
        return torch.tensor(float(k), dtype=like.dtype, device=like.device)
    if k.dim() == 0:
        kt = k
    elif k.dim() == 1 and k.shape[0] == num_classes:
        kt = k.reshape(1, num_classes)
    else:
        raise ValueError(f"k must be a scalar or have shape [{num_classes}] (one per class), "
                         f"got {list(k.shape)}")
    if not k.is_floating_point():
        raise TypeError(f"k must be a floating-point tensor, got {k.dtype}")
    if bool((k.detach() <= 0).any()):
        raise ValueError("k must be positive")
    return kt.to(like.dtype)


def _validate(input: Tensor, weight: Tensor, target: Tensor) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be floating point, got {input.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if input.dim() != 2:
        raise ValueError(f"input must be 2-D [N, in_features], got shape {list(input.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [num_classes, in_features], got shape "
                         f"{list(weight.shape)}")
    if weight.shape[1] != input.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} features but input has {input.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one class")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != input.shape[0]:
        raise ValueError(f"target must have shape [{input.shape[0]}], got {list(target.shape)}")
    if target.numel() and bool(((target < 0) | (target >= weight.shape[0])).any()):
        bad = target[(target < 0) | (target >= weight.shape[0])][0].item()
        raise ValueError(f"target holds class {bad}, outside [0, {weight.shape[0]})")
    if weight.device != input.device or target.device != input.device:
        raise ValueError(f"input, weight and target must be on one device, got {input.device}, "
                         f"{weight.device} and {target.device}")


def _angular_logits(input: Tensor, weight: Tensor, target: Optional[Tensor], margin: int,
                    operator: str, k, lambda_: float):
    """Returns ``(logits with the margin on the target class, plain logits ||x|| g(theta))``;
    with ``target=None`` the first is None."""
    cd = R.compute_dtype(input.dtype)
    x, w = input.to(cd), weight.to(cd)
    w_unit = w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(_TINY_NORM)
    x_norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)          # [N, 1]
    s = x @ w_unit.t()                                                  # ||x|| cos(theta)
    c = s / x_norm.clamp_min(_TINY_NORM)
    kk = _resolve_k(k, operator, weight.shape[0], x)
    if operator == "cosine":
        plain = s                   # ||x|| cos(theta), exactly, with no clamp needed
    else:
        plain = x_norm * R.g_of_theta(R.BoundedArccos.apply(c), operator, kk)
    if target is None:
        return None, plain

    idx = target.reshape(-1, 1)
    c_y = c.gather(1, idx)                                             # [N, 1]
    with torch.no_grad():
        theta_y = torch.acos(torch.clamp(c_y, -1.0, 1.0))
        # floor(m theta / pi), kept in [0, m-1] (theta = pi exactly would give j = m)
        j = torch.clamp(torch.floor(margin * theta_y / math.pi), 0, margin - 1)
    if margin == 1:
        psi_norm = plain.gather(1, idx)
    elif operator == "cosine":
        sign = 1.0 - 2.0 * torch.remainder(j, 2.0)                    # (-1)^j
        psi_norm = x_norm * (sign * _chebyshev(R.UnitClampStraightThrough.apply(c_y), margin) - 2.0 * j)
    else:
        theta = R.BoundedArccos.apply(c_y)
        k_y = kk if kk is None or kk.dim() == 0 else kk.reshape(-1)[target].reshape(-1, 1)
        psi_norm = x_norm * (R.g_of_theta(margin * theta - j * math.pi, operator, k_y) - 2.0 * j)
    if lambda_ != 0.0:
        f_y = (lambda_ * plain.gather(1, idx) + psi_norm) / (1.0 + lambda_)
    else:
        f_y = psi_norm
    logits = plain.scatter(1, idx, f_y)
    return logits.to(input.dtype), plain.to(input.dtype)


def ga_softmax_logits(input: Tensor, weight: Tensor, target: Tensor, *, margin: int = 1,
                      operator: str = "cosine", k=None, lambda_: float = 0.0) -> Tensor:
    """GA-Softmax logits ``[N, C]`` (feed them to ``F.cross_entropy``).

    Args:
        input: features ``[N, in_features]`` (any float dtype; their norm is kept).
        weight: class weights ``[C, in_features]`` (normalised here, per class).
        target: class indices ``[N]`` (integer dtype) in ``[0, C)``.
        margin: integer ``m >= 1``; 1 is W-Softmax.
        operator: ``"linear"``, ``"cosine"`` or ``"sigmoid"`` (the g of DESIGN §1).
        k: sigmoid steepness, a positive number, a 0-d tensor or a ``[C]`` tensor (one per
            class, differentiable); None means 0.3. Ignored by the other operators.
        lambda_: SphereFace's annealing weight ``lambda >= 0``:
            ``f_y = (lambda ||x|| g(theta_y) + ||x|| psi(theta_y)) / (1 + lambda)``.

    Raises:
        TypeError / ValueError naming the argument for bad dtypes, shapes, a non-integer or
        < 1 margin, a target outside ``[0, C)``, a non-positive k or a negative lambda_.
    """
    _validate(input, weight, target)
    m = _check_margin(margin)
    op = _check_operator(operator)
    if isinstance(lambda_, bool) or not isinstance(lambda_, numbers.Real):
        raise TypeError(f"lambda_ must be a number, got {type(lambda_).__name__}")
    if not (lambda_ >= 0 and math.isfinite(lambda_)):
        raise ValueError(f"lambda_ must be finite and >= 0, got {lambda_!r}")
    logits, _ = _angular_logits(input, weight, target, m, op, k, float(lambda_))
    return logits


@dataclass(frozen=True)
class SphereFaceLambda:
    """SphereFace's annealing: ``lambda(it) = max(lambda_min, base * (1 + gamma * it)^(-power))``.

    Defaults are SphereFace's (base 1000, gamma 0.12, power 1, lambda_min 5)."""
    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    lambda_min: float = 5.0

    def __post_init__(self):
        for name in ("base", "gamma", "power", "lambda_min"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
                raise ValueError(f"SphereFaceLambda.{name} must be finite and >= 0, got {value!r}")

    def __call__(self, iteration: int) -> float:
        return max(self.lambda_min, self.base * (1.0 + self.gamma * iteration) ** (-self.power))


LambdaSchedule = Union[None, float, str, SphereFaceLambda, Callable[[int], float]]


class GASoftmaxLoss(nn.Module):
    """Cross-entropy on GA-Softmax logits, holding the class weights ``[num_classes, in_features]``.

    Args:
        in_features, num_classes: sizes of the feature and of the class set.
        margin: integer ``m >= 1`` (1: W-Softmax).
        operator: ``"linear"``, ``"cosine"`` or ``"sigmoid"``.
        k: sigmoid steepness (positive; used by ``"sigmoid"`` only).
        lambda_schedule: the target logit's annealing weight lambda:
            ``None`` -> 0 (no annealing); a number -> constant; ``"sphereface"`` ->
            :class:`SphereFaceLambda` with SphereFace's defaults; a :class:`SphereFaceLambda` or
            any callable ``iteration -> lambda``. The iteration counter (buffer ``iteration``)
            advances by one per forward in training mode.
        reduction: passed to ``F.cross_entropy`` (``"mean"``, ``"sum"``, ``"none"``).

    ``forward(input, target)`` returns the loss; ``last_logits`` then holds the detached plain
    logits ``||x|| g(theta)`` (no margin: what prediction uses) for accuracy, and
    ``predict_logits(input)`` computes them for new inputs.
    """

    def __init__(self, in_features: int, num_classes: int, *, margin: int = 1,
                 operator: str = "cosine", k: float = 0.3, lambda_schedule: LambdaSchedule = None,
                 reduction: str = "mean", device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.in_features, self.num_classes = int(in_features), int(num_classes)
        self.margin = _check_margin(margin)
        self.operator = _check_operator(operator)
        _check_k_value(k)
        self.k = float(k)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        self.lambda_schedule = self._make_schedule(lambda_schedule)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long, device=device))
        # host copy of `iteration`, so a training step does not wait on the device to read it;
        # re-read whenever the buffer was replaced or written outside forward (resume, fill_)
        self._iteration_host, self._iteration_key = 0, None
        self.last_logits: Optional[Tensor] = None
        self.reset_parameters()

    @staticmethod
    def _make_schedule(schedule) -> Optional[Callable[[int], float]]:
        if schedule is None:
            return None
        if isinstance(schedule, str):
            if schedule != "sphereface":
                raise ValueError(f"lambda_schedule string must be 'sphereface', got {schedule!r}")
            return SphereFaceLambda()
        if isinstance(schedule, numbers.Real) and not isinstance(schedule, bool):
            if not (schedule >= 0 and math.isfinite(schedule)):
                raise ValueError(f"lambda_schedule constant must be finite and >= 0, got {schedule!r}")
            value = float(schedule)
            return lambda iteration: value
        if callable(schedule):
            return schedule
        raise TypeError("lambda_schedule must be None, a number, 'sphereface', a SphereFaceLambda "
                        f"or a callable, got {type(schedule).__name__}")

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)

    def current_lambda(self) -> float:
        """lambda for the current iteration (0 without a schedule)."""
        if self.lambda_schedule is None:
            return 0.0
        return float(self.lambda_schedule(self._iteration_now()))

    def _iteration_now(self) -> int:
        key = (id(self.iteration), self.iteration._version)
        if key != self._iteration_key:
            self._iteration_host, self._iteration_key = int(self.iteration.item()), key
        return self._iteration_host

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        _validate(input, self.weight, target)
        lam = self.current_lambda()
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"lambda_schedule returned {lam!r}; it must be finite and >= 0")
        k = self.k if self.operator == "sigmoid" else None
        logits, plain = _angular_logits(input, self.weight, target, self.margin, self.operator,
                                        k, lam)
        self.last_logits = plain.detach()
        if self.training and self.lambda_schedule is not None:
            host = self._iteration_now() + 1
            self.iteration += 1
            self._iteration_host, self._iteration_key = host, (id(self.iteration), self.iteration._version)
        return F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16)
                               else logits, target, reduction=self.reduction)

    def predict_logits(self, input: Tensor) -> Tensor:
        """Plain logits ``||x|| g(theta_j)`` (no margin) for prediction/accuracy."""
        if not isinstance(input, torch.Tensor) or input.dim() != 2 or input.shape[1] != self.in_features:
            raise ValueError(f"input must have shape [N, {self.in_features}]")
        k = self.k if self.operator == "sigmoid" else None
        _, plain = _angular_logits(input, self.weight, None, 1, self.operator, k, 0.0)
        return plain.to(input.dtype)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, num_classes={self.num_classes}, "
             f"margin={self.margin}, operator={self.operator!r}")
        if self.operator == "sigmoid":
            s += f", k={self.k}"
        if self.lambda_schedule is not None:
            s += f", lambda_schedule={self.lambda_schedule!r}"
        return s
