"""torch.library registration of the SphereConv ops, their autograd, and backend dispatch.

Four ops, each returning fresh tensors (see docs/ARCHITECTURE.md for the contract):

* ``sphereops::conv2d_fwd(x, w, bias?, k?, stride, padding, dilation, groups, operator, eps, backend, save_output) -> (y, c, r_x)``
* ``sphereops::conv2d_bwd(dy, x, w, k?, c, r_x, stride, padding, dilation, groups, operator, eps, backend, output_mask, bias?, saved_output) -> (dx, dw, db, dk)``
* ``sphereops::linear_fwd`` / ``sphereops::linear_bwd``: the same with a patch = a row (no
  geometry arguments).

They are ``torch.library.triton_op``s: eager calls run the Python body, and under
``torch.compile`` Inductor traces into the body and sees the Triton kernels (launched through
``wrap_triton``) or, for the reference backend, the plain aten ops. ``backend`` reaching an op is
``"reference"`` or ``"triton"`` -- the functional layer resolves ``"auto"``. Gradients that are not
needed come back as empty tensors and the autograd layer turns them into ``None``.

Only ``y`` is differentiable; ``c`` and ``r_x`` are the saved state for the backward op (with
``save_output`` c comes back empty and the backward gets y and the bias in its place).

Eager fast path: the Python dispatch of a custom op with registered autograd costs about a
millisecond of host time per call (more than the kernels of a typical layer), so eager calls go
through :func:`conv2d` / :func:`linear`, plain ``torch.autograd.Function``s that call the same
implementations directly; under ``torch.compile`` (and for ``opcheck``) the registered ops are
used, so Inductor still sees the kernels. Both paths run the same functions with the same
arguments, and the tests hold them to each other.
"""
from __future__ import annotations

import contextlib
import types
from typing import List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable
from torch import Tensor

from . import reference

_TRITON_IMPL: Optional[types.SimpleNamespace] = None


def triton_impl() -> types.SimpleNamespace:
    """The Triton launchers, imported on first use (triton is optional for ``import sphereops``)."""
    global _TRITON_IMPL
    if _TRITON_IMPL is None:
        from sphereops_kernels import conv_bwd, conv_fwd  # noqa: WPS433 (lazy on purpose)
        try:
            from sphereops_kernels import linear
            linear_fwd, linear_bwd = linear.sphere_linear_fwd, linear.sphere_linear_bwd
        except ImportError:  # the fused linear kernels may be absent; use the reference then
            linear_fwd, linear_bwd = reference.linear_forward, reference.linear_backward
        _TRITON_IMPL = types.SimpleNamespace(
            conv2d_forward=conv_fwd.sphere_conv2d_fwd,
            conv2d_backward=conv_bwd.sphere_conv2d_bwd,
            linear_forward=linear_fwd,
            linear_backward=linear_bwd,
        )
    return _TRITON_IMPL


try:  # eager launches go straight to the kernel, not through the wrap_triton HOP (~1 ms)
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # pragma: no cover - older torch: wrap_triton dispatch in eager too
    def _set_wrap_triton_enabled(enabled):
        return contextlib.nullcontext()


def _impl(backend: str):
    if backend == "reference":
        return reference
    if backend == "triton":
        return triton_impl()
    raise ValueError(f"backend must be 'reference' or 'triton' at the op level, got {backend!r}")


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _input_grads(grads, need, operator: str, n_nondiff: int) -> tuple:
    """Autograd's answer from ``(dx, dw, db, dk)``: ``None`` where a gradient was not requested
    (dk exists for sigmoid only), then ``None`` for the ``n_nondiff`` non-tensor arguments."""
    needed = (need[0], need[1], need[2], need[3] and operator == "sigmoid")
    return tuple(g if n else None for g, n in zip(grads, needed)) + (None,) * n_nondiff


def _memory_format_of(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# ---------------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------------

@torch.library.triton_op("sphereops::conv2d_fwd", mutates_args=())
def conv2d_fwd(x: Tensor, w: Tensor, bias: Optional[Tensor], k: Optional[Tensor], stride: List[int],
               padding: List[int], dilation: List[int], groups: int, operator: str, eps: float,
               backend: str, save_output: bool) -> Tuple[Tensor, Tensor, Tensor]:
    y, c, r_x = _impl(backend).conv2d_forward(x, w, bias, k, tuple(stride), tuple(padding),
                                              tuple(dilation), groups, operator, eps,
                                              store_c=not save_output)
    return y, c, r_x


@torch.library.triton_op("sphereops::conv2d_bwd", mutates_args=())
def conv2d_bwd(dy: Tensor, x: Tensor, w: Tensor, k: Optional[Tensor], c: Tensor, r_x: Tensor,
               stride: List[int], padding: List[int], dilation: List[int], groups: int, operator: str,
               eps: float, backend: str, output_mask: List[bool], bias: Optional[Tensor],
               saved_output: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _impl(backend)
    grads = impl.conv2d_backward(dy, x, w, k, c, r_x, tuple(stride), tuple(padding), tuple(dilation),
                                 groups, operator, eps, tuple(output_mask),
                                 saved=_SAVED[saved_output], bias=bias)
    return tuple(_empty_if_none(g, x) for g in grads)


_SAVED = {False: "cosine", True: "output"}   # what the backward's c argument holds


def _conv2d_setup_context(ctx, inputs, output):
    x, w, bias, k, stride, padding, dilation, groups, operator, eps, backend, save_output = inputs
    y, c, r_x = output
    ctx.save_for_backward(x, w, k, y if save_output else c, r_x, bias if save_output else None)
    ctx.config = (stride, padding, dilation, groups, operator, eps, backend, save_output)


def _conv2d_backward(ctx, dy, _dc, _dr_x):
    x, w, k, c, r_x, bias = ctx.saved_tensors
    stride, padding, dilation, groups, operator, eps, backend, save_output = ctx.config
    need = [bool(n) for n in ctx.needs_input_grad[:4]]
    if not any(need):
        return (None,) * 12
    dy = dy.contiguous(memory_format=_memory_format_of(x))  # y follows x (c may be empty)
    dx, dw, db, dk = torch.ops.sphereops.conv2d_bwd(dy, x, w, k, c, r_x, stride, padding, dilation,
                                                     groups, operator, eps, backend, need, bias,
                                                     save_output)
    return _input_grads((dx, dw, db, dk), need, operator, 8)


conv2d_fwd.register_autograd(_conv2d_backward, setup_context=_conv2d_setup_context)


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------

@torch.library.triton_op("sphereops::linear_fwd", mutates_args=())
def linear_fwd(x: Tensor, w: Tensor, bias: Optional[Tensor], k: Optional[Tensor], operator: str,
               eps: float, backend: str, save_output: bool) -> Tuple[Tensor, Tensor, Tensor]:
    y, c, r_x = _impl(backend).linear_forward(x, w, bias, k, operator, eps,
                                              store_c=not save_output)
    return y, c, r_x


@torch.library.triton_op("sphereops::linear_bwd", mutates_args=())
def linear_bwd(dy: Tensor, x: Tensor, w: Tensor, k: Optional[Tensor], c: Tensor, r_x: Tensor,
               operator: str, eps: float, backend: str, output_mask: List[bool],
               bias: Optional[Tensor], saved_output: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _impl(backend).linear_backward(dy, x, w, k, c, r_x, operator, eps, tuple(output_mask),
                                           saved=_SAVED[saved_output], bias=bias)
    return tuple(_empty_if_none(g, x) for g in grads)


def _linear_setup_context(ctx, inputs, output):
    x, w, bias, k, operator, eps, backend, save_output = inputs
    y, c, r_x = output
    ctx.save_for_backward(x, w, k, y if save_output else c, r_x, bias if save_output else None)
    ctx.config = (operator, eps, backend, save_output)


def _linear_backward(ctx, dy, _dc, _dr_x):
    x, w, k, c, r_x, bias = ctx.saved_tensors
    operator, eps, backend, save_output = ctx.config
    need = [bool(n) for n in ctx.needs_input_grad[:4]]
    if not any(need):
        return (None,) * 8
    dx, dw, db, dk = torch.ops.sphereops.linear_bwd(dy.contiguous(), x, w, k, c, r_x, operator, eps,
                                                     backend, need, bias, save_output)
    return _input_grads((dx, dw, db, dk), need, operator, 4)


linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# ---------------------------------------------------------------------------------------------
# Eager fast path (see the module docstring): same implementations, no custom-op dispatch.
# ---------------------------------------------------------------------------------------------

_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _saved_state_dies_here() -> bool:
    """True inside a backward that runs without ``retain_graph``: autograd frees the saved
    tensors once the node's backward returns, so the eager Functions' private saved ``c`` (never
    handed to the user) may serve as scratch memory. AOTAutograd's donated buffers rest on the
    same engine flag. False when the flag is not available (the safe answer)."""
    return _keep_graph is not None and not _keep_graph()


class _Conv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, k, stride, padding, dilation, groups, operator, eps, backend,
                save_output):
        with _set_wrap_triton_enabled(False):
            y, c, r_x = _impl(backend).conv2d_forward(x, w, bias, k, stride, padding, dilation,
                                                      groups, operator, eps,
                                                      store_c=not save_output)
        ctx.save_for_backward(x, w, k, y if save_output else c, r_x, bias if save_output else None)
        ctx.config = (stride, padding, dilation, groups, operator, eps, backend, save_output)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w, k, c, r_x, bias = ctx.saved_tensors
        stride, padding, dilation, groups, operator, eps, backend, save_output = ctx.config
        need = tuple(bool(n) for n in ctx.needs_input_grad[:4])
        dy = dy.contiguous(memory_format=_memory_format_of(x))  # y follows x (c may be empty)
        # a saved c is private to this node: its memory may take the backward's largest
        # temporary when nothing reads c later (a saved y is the user's: never written)
        with _set_wrap_triton_enabled(False):
            impl = _impl(backend)
            dx, dw, db, dk = impl.conv2d_backward(dy, x, w, k, c, r_x, stride, padding, dilation,
                                                  groups, operator, eps, need,
                                                  c_scratch=not save_output and _saved_state_dies_here(),
                                                  saved=_SAVED[save_output], bias=bias)
        return _input_grads((dx, dw, db, dk), need, operator, 8)


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, k, operator, eps, backend, save_output):
        with _set_wrap_triton_enabled(False):
            y, c, r_x = _impl(backend).linear_forward(x, w, bias, k, operator, eps,
                                                      store_c=not save_output)
        ctx.save_for_backward(x, w, k, y if save_output else c, r_x, bias if save_output else None)
        ctx.config = (operator, eps, backend, save_output)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w, k, c, r_x, bias = ctx.saved_tensors
        operator, eps, backend, save_output = ctx.config
        need = tuple(bool(n) for n in ctx.needs_input_grad[:4])
        # the reference reuses a private saved c (see _Conv2dFunction); a saved y is the user's
        extra = ({"c_scratch": not save_output and _saved_state_dies_here()}
                 if backend == "reference" else {})
        with _set_wrap_triton_enabled(False):
            dx, dw, db, dk = _impl(backend).linear_backward(dy.contiguous(), x, w, k, c, r_x,
                                                            operator, eps, need,
                                                            saved=_SAVED[save_output], bias=bias,
                                                            **extra)
        return _input_grads((dx, dw, db, dk), need, operator, 4)


def conv2d(x: Tensor, w: Tensor, bias: Optional[Tensor], k: Optional[Tensor], stride: Tuple[int, int],
           padding: Tuple[int, int], dilation: Tuple[int, int], groups: int, operator: str, eps: float,
           backend: str, save_output: bool = False) -> Tensor:
    """SphereConv2d output ``y``: the registered op under torch.compile, the fast path in eager.
    ``save_output``: the backward keeps y (and the bias) instead of the cosine c."""
    if torch.compiler.is_compiling():
        return torch.ops.sphereops.conv2d_fwd(x, w, bias, k, list(stride), list(padding),
                                              list(dilation), groups, operator, eps, backend,
                                              save_output)[0]
    return _Conv2dFunction.apply(x, w, bias, k, tuple(stride), tuple(padding), tuple(dilation),
                                 groups, operator, eps, backend, save_output)


def linear(x: Tensor, w: Tensor, bias: Optional[Tensor], k: Optional[Tensor], operator: str, eps: float,
           backend: str, save_output: bool = False) -> Tensor:
    """SphereLinear output ``y`` for 2-D ``x``: the registered op under torch.compile, else the fast
    path. ``save_output`` as in :func:`conv2d`."""
    if torch.compiler.is_compiling():
        return torch.ops.sphereops.linear_fwd(x, w, bias, k, operator, eps, backend, save_output)[0]
    return _LinearFunction.apply(x, w, bias, k, operator, eps, backend, save_output)
