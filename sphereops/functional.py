"""Functional SphereConv API: argument checking and normalisation, then the ops.

``sphere_conv2d`` takes the arguments of ``torch.nn.functional.conv2d`` plus the angular
operator; ``sphere_linear`` those of ``torch.nn.functional.linear``. Everything a user can get
wrong is checked here, with an error that names the argument; the ops below assume clean input.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
import os
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from . import reference
from .reference import DEFAULT_EPS, OPERATORS

BACKENDS = ("auto", "triton", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

KType = Union[None, float, Tensor]
IntPair = Union[int, Sequence[int]]


# ---------------------------------------------------------------------------------------------
# Backend resolution
# ---------------------------------------------------------------------------------------------

_triton_found: Optional[bool] = None


def triton_available() -> bool:
    """Whether triton can be imported (looked up once; never imports it)."""
    global _triton_found
    if _triton_found is None:
        _triton_found = importlib.util.find_spec("triton") is not None
    return _triton_found


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, x: Tensor) -> str:
    """``"auto"`` -> ``"triton"`` for CUDA tensors when triton is installed, else ``"reference"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    if backend == "auto":
        return "triton" if (x.is_cuda and triton_available() and x.dtype in _TRITON_DTYPES) else "reference"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 inputs, got {x.dtype}; "
                        "use backend='reference' for float64")
    if not x.is_cuda and not interpreter_enabled():
        raise RuntimeError("backend='triton' on a CPU tensor needs the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before importing sphereops, or use backend='reference'")
    return backend


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------

def _check_operator(operator: str) -> None:
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {OPERATORS}, got {operator!r}")


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")


def _check_same(name: str, t: Optional[Tensor], ref: Tensor, ref_name: str) -> None:
    if t is None:
        return
    _check_float(name, t)
    if t.device != ref.device:
        raise RuntimeError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def _pair(name: str, v: IntPair) -> Tuple[int, int]:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v), int(v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, numbers.Integral) for i in v):
        return int(v[0]), int(v[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def _check_eps(eps: float) -> None:
    if not isinstance(eps, numbers.Real) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def prepare_k(operator: str, k: KType, n_out: int, weight: Tensor, check_values: bool = True) -> Optional[Tensor]:
    """Check ``k`` and return it as a ``[n_out]`` tensor (sigmoid) or ``None``.

    A float or a one-element tensor is expanded to every output channel (differentiably)."""
    if operator != "sigmoid":
        if k is not None:
            raise ValueError(f"k is a parameter of operator='sigmoid' only; got k={k!r} with operator={operator!r}")
        return None
    if k is None:
        raise ValueError("operator='sigmoid' needs k: a positive float or a tensor of shape "
                         f"[{n_out}] (one k per output channel); the official release uses k=0.3")
    if isinstance(k, numbers.Real) and not isinstance(k, bool):
        if not (k > 0 and math.isfinite(k)):
            raise ValueError(f"k must be positive and finite, got {k!r}")
        return torch.full((n_out,), float(k), dtype=weight.dtype, device=weight.device)
    if not isinstance(k, Tensor):
        raise TypeError(f"k must be a float or a tensor, got {type(k).__name__}")
    _check_same("k", k, weight, "weight")
    if k.numel() == 1:
        k = k.reshape(1).expand(n_out).contiguous()
    elif k.shape != (n_out,):
        raise ValueError(f"k must be a scalar or have shape [{n_out}] (one per output channel), got {tuple(k.shape)}")
    # the value check reads k back to the host: not while tracing, nor while a CUDA graph is
    # being captured (a synchronising read is illegal there)
    if (check_values and not torch.compiler.is_compiling()
            and not (k.is_cuda and torch.cuda.is_current_stream_capturing())):
        if bool((k.detach() <= 0).any()):
            raise ValueError("k must be positive in every output channel")
    return k


def _autocast(device_type: str, *tensors):
    """Follow autocast like F.conv2d/F.linear do: cast the float operands to the autocast dtype."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if (isinstance(t, Tensor) and t.is_floating_point()) else t for t in tensors)


def _same_padding(kernel: Tuple[int, int], dilation: Tuple[int, int]):
    """PyTorch's 'same': total d*(k-1) per dim, the odd extra on the right/bottom."""
    pads = []
    for kk, d in zip(kernel, dilation):
        total = d * (kk - 1)
        pads.append((total // 2, total - total // 2))
    return pads


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def sphere_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                  padding: Union[str, IntPair] = 0, dilation: IntPair = 1, groups: int = 1, *,
                  operator: str = "cosine", k: KType = None, eps: float = DEFAULT_EPS,
                  backend: str = "auto", save_output: bool = False) -> Tensor:
    """Hyperspherical 2-D convolution: ``y = g(angle(w_o, x_patch)) + b``.

    Arguments as :func:`torch.nn.functional.conv2d` (``padding`` may be an int, a pair,
    ``"same"`` or ``"valid"``; 3-D unbatched input is accepted). ``operator`` picks g:
    ``"linear"`` (1 - 2θ/π), ``"cosine"`` (cos θ), ``"sigmoid"`` (needs ``k`` > 0: a float or a
    per-output-channel tensor, differentiable). ``eps`` is added inside both norms' square roots.
    ``backend``: ``"auto"`` (fused Triton kernels for CUDA tensors, the PyTorch reference
    otherwise), ``"triton"`` (CPU only under ``TRITON_INTERPRET=1``) or ``"reference"``.

    ``save_output`` (linear and cosine operators): the backward keeps the output y and the bias
    instead of the cosine c and recovers c from them (cosine ``c = y - b``, linear
    ``c = sin(π/2 (y - b))``): no output-sized tensor of its own when the next layer keeps y
    anyway (BatchNorm does), and the Triton forward stores y only. y must then not be modified
    in place before the backward (autograd raises if it is). c is then as exact as y's dtype
    resolves ``y - b``: keep ``|b|`` small next to ``|g|`` (a bias before BatchNorm is
    redundant anyway). Sigmoid has no such inverse where it saturates and is refused.
    """
    return _sphere_conv2d(input, weight, bias, stride, padding, dilation, groups, operator, k, eps,
                          backend, check_k=True, save_output=save_output)


def check_save_output(save_output, operator: str) -> None:
    """``save_output`` must be a bool, and True only for the operators the output determines c for."""
    if not isinstance(save_output, bool):
        raise TypeError(f"save_output must be a bool, got {save_output!r}")
    if save_output and operator not in reference.OUTPUT_INVERTIBLE_OPERATORS:
        raise ValueError(f"save_output=True needs operator 'linear' or 'cosine' (the sigmoid's "
                         f"output does not determine the angle where it saturates), got {operator!r}")


def _check_operands(input, weight, bias, k, operator, eps):
    """Checks shared by the conv and linear entry points; returns the operands after autocast."""
    _check_operator(operator)
    _check_eps(eps)
    _check_float("input", input)
    _check_float("weight", weight)
    if input.device.type in ("cuda", "cpu"):
        input, weight, bias, k = _autocast(input.device.type, input, weight, bias, k)
    _check_same("weight", weight, input, "input")
    _check_same("bias", bias, input, "input")
    return input, weight, bias, k


def _sphere_conv2d(input, weight, bias, stride, padding, dilation, groups, operator, k, eps, backend,
                   check_k: bool, save_output: bool = False) -> Tensor:
    input, weight, bias, k = _check_operands(input, weight, bias, k, operator, eps)
    check_save_output(save_output, operator)
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be 3-D (C, H, W) or 4-D (N, C, H, W), got {input.dim()}-D shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (C_out, C_in/groups, kh, kw), got shape {tuple(weight.shape)}")
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    c_in, c_out = x.shape[1], weight.shape[0]
    if c_out % groups:
        raise ValueError(f"out channels ({c_out}, weight.shape[0]) must be divisible by groups={groups}")
    if c_in % groups:
        raise ValueError(f"in channels ({c_in}, input.shape[1]) must be divisible by groups={groups}")
    if weight.shape[1] * groups != c_in:
        raise ValueError(f"weight expects {weight.shape[1] * groups} input channels "
                         f"(weight.shape[1]={weight.shape[1]} x groups={groups}) but input has {c_in}")
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias must have shape [{c_out}], got {tuple(bias.shape)}")
    k_t = prepare_k(operator, k, c_out, weight, check_values=check_k)
    stride_p, dilation_p = _pair("stride", stride), _pair("dilation", dilation)
    if min(stride_p) < 1 or min(dilation_p) < 1:
        raise ValueError(f"stride and dilation must be >= 1, got stride={stride!r}, dilation={dilation!r}")
    kernel = (weight.shape[2], weight.shape[3])
    if isinstance(padding, str):
        if padding == "valid":
            padding_p = (0, 0)
        elif padding == "same":
            if stride_p != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (as in torch)")
            (top, bottom), (left, right) = _same_padding(kernel, dilation_p)
            if top != bottom or left != right:
                x = F.pad(x, (left, right, top, bottom))
                padding_p = (0, 0)
            else:
                padding_p = (top, left)
        else:
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        padding_p = _pair("padding", padding)
        if min(padding_p) < 0:
            raise ValueError(f"padding must be >= 0, got {padding!r}")
    for i, name in enumerate(("height", "width")):
        span = dilation_p[i] * (kernel[i] - 1) + 1
        if x.shape[2 + i] + 2 * padding_p[i] < span:
            raise ValueError(f"input {name} {x.shape[2 + i]} (+ padding) is smaller than the dilated kernel ({span})")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()  # the kernels take NCHW or NHWC strides, not arbitrary views
    be = resolve_backend(backend, x)
    y = ops.conv2d(x, weight, bias, k_t, stride_p, padding_p, dilation_p, int(groups), operator,
                   float(eps), be, save_output)
    return y.squeeze(0) if unbatched else y


def sphere_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                  operator: str = "cosine", k: KType = None, eps: float = DEFAULT_EPS,
                  backend: str = "auto", save_output: bool = False) -> Tensor:
    """Hyperspherical fully connected layer: ``y = g(angle(w_o, x_row)) + b``.

    ``input`` is ``[..., in_features]`` (any leading dims, or 1-D), ``weight``
    ``[out_features, in_features]``; other arguments (``save_output`` included) as
    :func:`sphere_conv2d`."""
    return _sphere_linear(input, weight, bias, operator, k, eps, backend, check_k=True,
                          save_output=save_output)


def _sphere_linear(input, weight, bias, operator, k, eps, backend, check_k: bool,
                   save_output: bool = False) -> Tensor:
    input, weight, bias, k = _check_operands(input, weight, bias, k, operator, eps)
    check_save_output(save_output, operator)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if input.dim() < 1:
        raise ValueError("input must have at least 1 dimension (..., in_features)")
    n_out, n_in = weight.shape
    if input.shape[-1] != n_in:
        raise ValueError(f"input.shape[-1] = {input.shape[-1]} does not match weight's in_features = {n_in}")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias must have shape [{n_out}], got {tuple(bias.shape)}")
    k_t = prepare_k(operator, k, n_out, weight, check_values=check_k)
    lead = input.shape[:-1]
    x2 = input.reshape(-1, n_in).contiguous()
    be = resolve_backend(backend, x2)
    y = ops.linear(x2, weight, bias, k_t, operator, float(eps), be, save_output)
    return y.reshape(*lead, n_out)


def sphere_norm2d(input: Tensor, kernel_size: int = 1, *, operator: str = "cosine", k: KType = None,
                  eps: float = DEFAULT_EPS) -> Tensor:
    """SphereConv used as a normalisation: ``u[n, o, i, j] = g(theta)`` with

    ``cos theta = x[n, o, i, j] / (sqrt(sum_c sum_window x[n, c]^2 + eps) * sqrt(1 + eps))``,

    i.e. the SphereConv of ``input`` with the fixed unit filter ``e_(o, centre)`` (a delta on
    channel ``o`` at the centre of a ``kernel_size`` x ``kernel_size`` window, same zero
    padding): each output is the angle between the local patch -- all channels of the window --
    and one of its axes. ``kernel_size=1`` projects each pixel's channel vector onto the unit
    sphere. The output is bounded in [-1, 1] and depends on the sample's own pixels only.

    Computed in closed form (the filters are fixed, so no GEMM: a channel-sum of squares, a box
    sum and an elementwise g), in float32 for half inputs, differentiable by autograd with the
    bounded arccos derivative of the SphereConv ops. ``k``: as :func:`sphere_conv2d` (sigmoid),
    one per channel.
    """
    return _sphere_norm2d(input, kernel_size, operator, k, eps, check_k=True)


def _sphere_norm2d(input, kernel_size, operator, k, eps, check_k: bool) -> Tensor:
    # check_k=False: the module's k = |kappa| + 0.05 is positive by construction, and checking a
    # CUDA tensor's values would synchronise with the device on every call
    _check_float("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D [N, C, H, W], got shape {tuple(input.shape)}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral) \
            or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer (same padding), got {kernel_size!r}")
    _check_operator(operator)
    _check_eps(eps)
    k_t = prepare_k(operator, k, input.shape[1], input, check_values=check_k)
    cd = reference.compute_dtype(input.dtype)
    x = input.to(cd)
    energy = (x * x).sum(dim=1, keepdim=True)
    if kernel_size > 1:
        # box sum with zero padding: the mean over the window (pads counted) times its size
        energy = F.avg_pool2d(energy, kernel_size, 1, kernel_size // 2,
                              count_include_pad=True) * (kernel_size * kernel_size)
    c = x * torch.rsqrt(energy + eps) * (1.0 / math.sqrt(1.0 + eps))
    k_view = k_t.to(cd).reshape(1, -1, 1, 1) if k_t is not None else None
    return reference.g_autograd(c, operator, k_view).to(input.dtype)
