"""Unfused pure-PyTorch SphereConv: the float64 oracle, the CPU path and the executable spec.

Everything here works in any floating dtype; low-precision inputs are computed in float32 and the
outputs cast back, float64 stays float64. Arguments arrive already normalised by the functional
layer (see docs/ARCHITECTURE.md): ``stride``/``padding``/``dilation`` are 2-tuples of ints,
``k`` is ``None`` or a ``[C_out]`` tensor, ``operator`` is one of :data:`OPERATORS`.

Forward (DESIGN §1)::

    s = conv2d(x, w)            q = boxsum(sum_{c in group} x^2)       r_x = sqrt(q + eps)
    r_w = sqrt(||w_o||^2 + eps)  c = clamp(s / (r_x r_w), -1, 1)        y = g(arccos c) + b

Three implementations share the same arithmetic:

* :func:`conv2d_forward` / :func:`conv2d_backward` -- closed form (run under ``no_grad``: not
  themselves differentiable), the CPU path and the specification the Triton kernels must match
  (saved state: ``c`` in the input dtype and ``r_x`` in fp32, exactly what the kernels save);
* :func:`conv2d_autograd` -- the same forward written with differentiable PyTorch primitives, so
  ``torch.autograd`` derives the gradients independently (the float64 gradient oracle);
* the ``linear_*`` twins, where a patch is one row of the input.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

OPERATORS = ("linear", "cosine", "sigmoid")
DEFAULT_EPS = 1e-4
# dtheta/dc = -1/sqrt(1 - c^2) is unbounded at |c| = 1 (a patch parallel to its filter). We use
# -1/sqrt(max(1 - c^2, ARCCOS_DELTA)): |dtheta/dc| <= 1000. 1e-6 sits above float32's resolution of
# 1 - c^2 near |c| = 1 (~1.2e-7) so fp32 and fp64 paths agree on which points are bounded, and it
# only touches angles below ~1e-3 rad (0.06 degrees). Kernels read this constant, never a copy.
ARCCOS_DELTA = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Angular functions g(theta) and their derivatives (the PyTorch twin of kernels/angular.py).
# ---------------------------------------------------------------------------------------------

def _k_view(k: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return k.to(like.dtype).reshape(shape)


def g_of_theta(theta: Tensor, operator: str, k: Optional[Tensor] = None) -> Tensor:
    """g at an angle ``theta`` in [0, pi] (DESIGN §1's table); ``k`` broadcastable (sigmoid).

    Sigmoid is written ``tanh(B) / tanh(A)`` (= ``coth(A) tanh(B)``), the numerically stable form
    of the paper's expression."""
    if operator == "cosine":
        return torch.cos(theta)
    if operator == "linear":
        return 1.0 - theta * (2.0 / math.pi)
    a = math.pi / (4.0 * k)
    b = (math.pi / 2.0 - theta) / (2.0 * k)
    return torch.tanh(b) / torch.tanh(a)


def g_of_c(c: Tensor, operator: str, k: Optional[Tensor] = None) -> Tensor:
    """g(arccos c) for clamped cosines ``c``; ``k`` already broadcastable to ``c`` (sigmoid)."""
    if operator == "cosine":
        return c
    return g_of_theta(torch.acos(c), operator, k)


def dtheta_dc(c: Tensor) -> Tensor:
    """The bounded arccos derivative: ``-1/sqrt(max(1 - c^2, ARCCOS_DELTA))``."""
    return -torch.rsqrt(torch.clamp(1.0 - c * c, min=ARCCOS_DELTA))


def dg_dtheta(c: Tensor, operator: str, k: Optional[Tensor] = None) -> Tensor:
    if operator == "linear":
        return torch.full_like(c, -2.0 / math.pi)
    if operator == "cosine":
        return -torch.sqrt(torch.clamp(1.0 - c * c, min=0.0))
    theta = torch.acos(c)
    a = math.pi / (4.0 * k)
    b = (math.pi / 2.0 - theta) / (2.0 * k)
    sech2_b = 1.0 - torch.tanh(b) ** 2
    return -sech2_b / (torch.tanh(a) * 2.0 * k)


def dg_dc(c: Tensor, operator: str, k: Optional[Tensor] = None) -> Tensor:
    """dg/dc = g'(theta) * dtheta/dc with the bounded arccos rule; exactly 1 for cosine."""
    if operator == "cosine":
        return torch.ones_like(c)
    return dg_dtheta(c, operator, k) * dtheta_dc(c)


def dg_dk(c: Tensor, k: Tensor) -> Tensor:
    """d g_sigmoid / dk at fixed theta (DESIGN §1):
    ``(A csch^2(A) tanh(B) - B coth(A) sech^2(B)) / k`` with ``A = pi/4k``, ``B = (pi/2-theta)/2k``."""
    theta = torch.acos(c)
    a = math.pi / (4.0 * k)
    b = (math.pi / 2.0 - theta) / (2.0 * k)
    tanh_a, tanh_b = torch.tanh(a), torch.tanh(b)
    csch2_a = 1.0 / torch.sinh(a) ** 2
    sech2_b = 1.0 - tanh_b * tanh_b
    return (a * csch2_a * tanh_b - b * sech2_b / tanh_a) / k


# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------

def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# Full-size temporaries cost page faults on CPU (glibc maps and trims large blocks: ~2 us per
# 4 KiB page measured here, as much as the arithmetic of a pass), so the elementwise chains of the
# CPU path run over batch slices whose temporaries stay below this many elements.
_SLICE_ELEMS = 1 << 18


# Devices whose elementwise chains run in batch slices. Not CUDA: there every op is a kernel
# launch (~10-50 us of host time), and slicing multiplied them -- a 128x128x32x32 backward went
# from 1.3 to 15 ms on an H200 (bench/results/20261127-1339_*); the caching allocator has no
# page-fault cost to avoid.
_SLICED_DEVICES = ("cpu",)


def _batch_slices(n: int, per_sample: int, device: torch.device):
    """Batch slices whose full-size temporaries stay below _SLICE_ELEMS elements on CPU; one
    slice (the whole batch) elsewhere."""
    if device.type not in _SLICED_DEVICES:
        return [slice(0, n)] if n else []
    step = max(1, _SLICE_ELEMS // max(1, per_sample))
    return [slice(n0, n0 + step) for n0 in range(0, n, step)]


def _group_square_sum(x: Tensor, groups: int) -> Tensor:
    """sum over each group's channels of x^2: ``[N, G, H, W]``, in batch slices (see
    _SLICE_ELEMS; x*x then a sum is ~10x faster on CPU than torch.linalg.vector_norm over the
    channel dim)."""
    n, cin, h, w = x.shape
    out = x.new_empty(n, groups, h, w)
    for rows in _batch_slices(n, cin * h * w, x.device):
        xs = x[rows]
        # the batch dim by name, not -1: an empty image (h or w = 0) has no elements to infer it
        torch.sum((xs * xs).reshape(xs.shape[0], groups, cin // groups, h, w), dim=2,
                  out=out[rows])
    return out


def _window_slices(out_len: int, kernel: int, stride: int, dilation: int):
    """For each tap t of a 1-D window: the input positions ``t*dilation + j*stride``, j < out_len,
    as a slice of the padded axis."""
    span = (out_len - 1) * stride + 1
    return [slice(t * dilation, t * dilation + span, stride) for t in range(kernel)]


def box_sum(q: Tensor, kh: int, kw: int, stride, padding, dilation) -> Tensor:
    """Windowed sum ``[N, G, H, W] -> [N, G, Ho, Wo]``: what a grouped convolution with a ones
    filter computes, as kw + kh shifted strided adds (separable: rows, then columns).

    A single-channel convolution is a poor fit for the CPU convolution library: the adds are
    2-4x faster on the patch-norm maps here (8-128 x 1 x 32 x 32, 3x3)."""
    ho = output_size(q.shape[2], kh, stride[0], padding[0], dilation[0])
    wo = output_size(q.shape[3], kw, stride[1], padding[1], dilation[1])
    qp = F.pad(q, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else q
    cols = _window_slices(wo, kw, stride[1], dilation[1])
    rows = _window_slices(ho, kh, stride[0], dilation[0])
    acc = qp[..., cols[0]].clone()
    for sl in cols[1:]:
        acc.add_(qp[..., sl])
    out = acc[:, :, rows[0]].clone()
    for sl in rows[1:]:
        out.add_(acc[:, :, sl])
    return out


def patch_norms(x: Tensor, groups: int, kh: int, kw: int, stride, padding, dilation, eps: float) -> Tensor:
    """r_x [N, G, Ho, Wo] = sqrt(box-sum of the group's channel-summed squares + eps).

    The cheap way: one pass for sum_c x^2 per group, then a box sum -- never an unfold."""
    q = box_sum(_group_square_sum(x, groups), kh, kw, stride, padding, dilation)
    return q.add_(eps).sqrt_()


def box_filter_transposed(a: Tensor, in_size: Tuple[int, int], kh: int, kw: int, stride, padding,
                          dilation) -> Tensor:
    """boxsum^T(a): every input pixel gets the sum of ``a`` over the output pixels whose window
    covers it. ``a [N, G, Ho, Wo]`` -> ``[N, G, H, W]``.

    The transpose of :func:`box_sum`: shifted strided adds into the padded input grid (columns,
    then rows), then the padding cropped off -- any stride, dilation and padding alike."""
    n, g, ho, wo = a.shape
    hp, wp = in_size[0] + 2 * padding[0], in_size[1] + 2 * padding[1]
    cols = a.new_zeros(n, g, ho, wp)
    for sl in _window_slices(wo, kw, stride[1], dilation[1]):
        cols[..., sl].add_(a)          # in place on the view (``+=`` would copy it back)
    out = a.new_zeros(n, g, hp, wp)
    for sl in _window_slices(ho, kh, stride[0], dilation[0]):
        out[:, :, sl].add_(cols)
    return out[:, :, padding[0]:padding[0] + in_size[0], padding[1]:padding[1] + in_size[1]]


def filter_norms(w: Tensor, eps: float) -> Tensor:
    """r_w [C_out] = sqrt(||w_o||^2 + eps)."""
    return torch.sqrt(w.reshape(w.shape[0], -1).pow(2).sum(dim=1) + eps)


def _divide_by_norms(s: Tensor, r_x: Tensor, r_w: Tensor, groups: int, inplace: bool = False) -> Tensor:
    """``s / (r_x r_w)`` with r_x per (pixel, group) broadcast over the group's channels.

    Two broadcast multiplies by the (small) reciprocals, in place on ``s`` when ``inplace`` (the
    CPU path's full-size temporaries are what it pays for beyond the convolution)."""
    n, cout, ho, wo = s.shape
    inv_rw = r_w.reciprocal().reshape(1, groups, cout // groups, 1, 1)
    inv_rx = r_x.reciprocal().unsqueeze(2)
    s5 = s.reshape(n, groups, cout // groups, ho, wo)
    out5 = s5.mul_(inv_rw) if inplace else torch.mul(s5, inv_rw)
    return out5.mul_(inv_rx).reshape(n, cout, ho, wo)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _g_plus_bias(c: Tensor, operator: str, k: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """``g(arccos c) + b`` as a new tensor in as few full-size passes as possible (CPU hot loop).

    linear: ``(1 + b) - (2/pi) * acos(c)`` in the acos buffer; cosine: ``c + b`` one pass."""
    b = _k_view(bias, c, 1) if bias is not None else None
    if operator == "cosine":
        return c.clone() if b is None else torch.add(c, b)
    if operator == "linear":
        # in place on the acos buffer: a fresh full-size output costs more than a pass on CPU
        y = torch.acos(c).mul_(-2.0 / math.pi)
        return y.add_(1.0 + b) if b is not None else y.add_(1.0)
    # sigmoid: coth(A) tanh(B) + b = 2 coth(A) sigmoid(2B) - (coth(A) - b) with
    # 2B = (pi/2 - theta)/k = asin(c)/k, all in the asin buffer. tanh through sigmoid: float32
    # tanh is ~8x slower than sigmoid on CPU (3.7 vs 0.5 ms per 2M elements here), and the
    # absolute error stays ~1e-7.
    coth_a = 1.0 / torch.tanh(math.pi / (4.0 * k))
    y = torch.asin(c).mul_(1.0 / k).sigmoid_().mul_(2.0 * coth_a)
    return y.sub_(coth_a - b) if b is not None else y.sub_(coth_a)


def _grad_terms(dy: Tensor, c: Tensor, r_x: Tensor, groups: int, operator: str, k: Optional[Tensor],
                need_dx: bool, need_dw: bool, need_dk: bool, sum_dy: Optional[Tensor],
                h_out: Optional[Tensor] = None, output_bias: Optional[Tensor] = None,
                from_output: bool = False):
    """``(H', A, S, dk)`` of DESIGN §1 in one sweep over batch slices, with ``G = dL/dc``:

    * ``H' = G / r_x`` -- what the convolution's backward takes (r_w rides on the filters) --
      written into ``h_out`` when given (it may be ``c`` itself: each slice of ``c`` is read
      before its ``H'`` is written), else into one fresh buffer; None unless dx or dw is needed;
    * ``A [N, G, Ho, Wo] = sum_{o in group} G c / r_x^2`` (dx's norm term) if ``need_dx``;
    * ``S [C_out] = sum G c`` (dw's norm term) if ``need_dw``;
    * ``dk`` for sigmoid if ``need_dk``.

    ``from_output``: ``c`` holds the forward's output y (with ``output_bias`` the bias in it,
    broadcastable): each slice's c comes from :func:`_angle_from_output`, and the linear
    operator's ``sqrt(1 - c^2) = sin(theta)`` from the angle directly (exact where ``1 - c^2``
    would cancel).

    CPU hot path: every fresh full-size buffer costs page faults comparable to a pass here, so
    the per-element chains run over batch slices (small, cache-resident temporaries) and write
    only ``H'``. Sigmoid, with ``2B = (pi/2 - theta)/k = asin(c)/k`` and ``sigma = sigmoid(2B)``
    (tanh B = 2 sigma - 1, sech^2 B = 4 sigma(1 - sigma); float32 tanh is ~8x slower than sigmoid):

    * ``dL/dc = (2 coth(A) / k) * dy * sigma(1-sigma) / sqrt(max(1 - c^2, DELTA))``;
    * ``dk = alpha sum(dy tanh B) - beta sum(dy B sech^2 B)`` with ``alpha = A csch^2(A) / k``,
      ``beta = coth(A) / k``, i.e.
      ``alpha (2 sum(dy sigma) - sum(dy)) - 2 beta sum(dy 2B sigma(1-sigma))``.
    """
    n, cout = dy.shape[:2]
    need_h = need_dx or need_dw
    h = (h_out if h_out is not None else torch.empty_like(dy)) if need_h else None
    inv_rx = r_x.reciprocal()
    a = torch.empty_like(r_x) if need_dx else None
    s_o = dy.new_zeros(cout) if need_dw else None
    sig_op = operator == "sigmoid"
    if sig_op:
        kv = k.reshape(-1)
        inv_k = (1.0 / kv).reshape(1, -1, 1, 1)
        scale = (2.0 / (kv * torch.tanh(math.pi / (4.0 * kv)))).reshape(1, -1, 1, 1)
        sum_ds, sum_bs = dy.new_zeros(cout), dy.new_zeros(cout)
    if not (need_h or (sig_op and need_dk)):
        return h, a, s_o, None
    one = torch.ones((), dtype=c.dtype, device=c.device)
    slices = _batch_slices(n, dy[0].numel() if n else 1, dy.device)
    # the slices' temporaries live in three slice-sized buffers allocated once a call: fresh ones
    # per slice churn the allocator (a new mmap and its page faults each time, whenever glibc's
    # threshold sits below their size)
    scratch = [torch.empty_like(dy[slices[0]]) for _ in range(3)] if slices else []
    for rows in slices:
        dy_s = dy[rows]
        t1, t2, t3 = (buf[:dy_s.shape[0]] for buf in scratch)
        c_s, sin_theta = (_angle_from_output(c[rows], output_bias, operator) if from_output
                          else (c[rows], None))
        if operator == "cosine":
            g = dy_s
        elif operator == "linear":   # dg/dc = (2/pi) / sqrt(max(1 - c^2, DELTA))
            sin2 = (torch.addcmul(one, c_s, c_s, value=-1.0, out=t1) if sin_theta is None
                    else sin_theta.mul_(sin_theta))
            g = sin2.clamp_(min=ARCCOS_DELTA).rsqrt_()
            g.mul_(dy_s).mul_(2.0 / math.pi)
        else:
            two_b = torch.asin(c_s, out=t1).mul_(inv_k)
            sig = torch.sigmoid(two_b, out=t2)
            if need_dk:
                sum_ds += torch.mul(dy_s, sig, out=t3).sum(dim=(0, 2, 3))
            sig.addcmul_(sig, sig, value=-1.0)               # sigma (1 - sigma)
            if need_dk:
                sum_bs += two_b.mul_(sig).mul_(dy_s).sum(dim=(0, 2, 3))
            if not need_h:
                continue
            g = torch.addcmul(one, c_s, c_s, value=-1.0, out=two_b).clamp_(min=ARCCOS_DELTA).rsqrt_()
            g.mul_(sig).mul_(dy_s).mul_(scale)
        gc = torch.mul(g, c_s, out=t3)
        if need_dw:
            s_o += gc.sum(dim=(0, 2, 3))
        if need_dx:
            ns, _, ho, wo = gc.shape
            torch.sum(gc.reshape(ns, groups, cout // groups, ho, wo), dim=2, out=a[rows])
        _scale_by_patch(g, inv_rx[rows], groups, out=h[rows])    # last reader of c_s
    if need_dx:
        a.mul_(inv_rx).mul_(inv_rx)
    dk = None
    if sig_op and need_dk:
        ka = math.pi / (4.0 * kv)
        alpha = ka / torch.sinh(ka) ** 2 / kv
        beta = 1.0 / (torch.tanh(ka) * kv)
        dk = alpha * (2.0 * sum_ds - sum_dy) - 2.0 * beta * sum_bs
    return h, a, s_o, dk


def _scale_by_patch(t: Tensor, per_pixel: Tensor, groups: int, out: Optional[Tensor] = None) -> Tensor:
    """``t * per_pixel`` with ``per_pixel [N, G, Ho, Wo]`` broadcast over each group's channels,
    written into ``out`` when given (``out`` may be ``t``: in place), any memory format."""
    if groups == 1:
        return torch.mul(t, per_pixel, out=out) if out is not None else t * per_pixel
    n, cout = t.shape[:2]
    shape5 = (n, groups, cout // groups, *t.shape[2:])
    if out is not None and out.is_contiguous():
        torch.mul(t.reshape(shape5), per_pixel.unsqueeze(2), out=out.view(shape5))
        return out
    res = (t.reshape(shape5) * per_pixel.unsqueeze(2)).reshape(t.shape)
    return out.copy_(res) if out is not None else res


@torch.no_grad()
def conv2d_forward(x: Tensor, w: Tensor, bias: Optional[Tensor], k: Optional[Tensor],
                   stride: Tuple[int, int], padding: Tuple[int, int], dilation: Tuple[int, int],
                   groups: int, operator: str, eps: float, *,
                   store_c: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """Closed-form forward. Returns ``(y, c, r_x)`` (see docs/ARCHITECTURE.md for the saved state);
    with ``store_c=False`` c comes back empty (the caller saves y for the backward instead).

    The filter norm is folded into the (small) weight before the convolution, so beyond the conv
    the full-size work is: c = s' / r_x, the clamp, and g."""
    out_dtype, fmt = x.dtype, _memory_format(x)
    cd = compute_dtype(x.dtype)
    xc, wc = x.to(cd), w.to(cd)
    kh, kw = w.shape[2], w.shape[3]
    r_x = patch_norms(xc, groups, kh, kw, stride, padding, dilation, eps)
    w_unit = wc / filter_norms(wc, eps).reshape(-1, 1, 1, 1)
    s_unit = F.conv2d(xc, w_unit, None, stride, padding, dilation, groups)
    c = _scale_by_patch(s_unit, r_x.reciprocal(), groups, out=s_unit).clamp_(-1.0, 1.0)
    y = _g_plus_bias(c, operator, _k_view(k, c, 1) if k is not None else None, bias)
    y = y.to(out_dtype).contiguous(memory_format=fmt)
    c = c.to(out_dtype).contiguous(memory_format=fmt) if store_c else c.new_empty(0, dtype=out_dtype)
    return y, c, r_x.contiguous()


SAVED_STATES = ("cosine", "output")
# the operators whose output y = g(c) + b determines c (see _angle_from_output)
OUTPUT_INVERTIBLE_OPERATORS = ("linear", "cosine")


def _angle_from_output(y: Tensor, bias: Optional[Tensor], operator: str):
    """``(c, sin(theta) or None)`` from the output ``y = g(c) + b`` (``bias`` broadcastable
    against y, or None), fresh tensors in y's compute dtype: cosine ``c = y - b``; linear
    ``theta = pi/2 (1 - (y - b))``, so ``c = sin(pi/2 (y - b))`` and
    ``sin(theta) = cos(pi/2 (y - b))``."""
    if operator not in OUTPUT_INVERTIBLE_OPERATORS:
        raise ValueError(f"the output determines c only for the linear and cosine operators, "
                         f"not {operator!r}")
    g = y.to(compute_dtype(y.dtype))
    g = g - bias if bias is not None else g.clone()
    g.clamp_(-1.0, 1.0)
    if operator == "cosine":
        return g, None
    half = g.mul_(math.pi / 2.0)
    return torch.sin(half), half.cos_()


def cosine_from_output(y: Tensor, bias: Optional[Tensor], operator: str) -> Tensor:
    """The clamped cosine c recovered from the output ``y = g(c) + b`` (``bias [C_out]``, channel
    dim 1), a fresh tensor in y's compute dtype: cosine ``c = y - b``; linear
    ``c = sin(pi/2 (y - b))`` (``1 - 2 theta / pi = y - b``). Sigmoid has no such inverse here:
    where it saturates, y no longer resolves theta in a 16-bit dtype."""
    b = _k_view(bias, y.to(compute_dtype(y.dtype)), 1) if bias is not None else None
    return _angle_from_output(y, b, operator)[0]


def saved_state_mode(saved: str, operator: str, c_scratch: bool) -> Tuple[bool, bool]:
    """``(from_output, c_scratch)`` for a backward (every backend's): checks ``saved``; a saved
    output is the caller's tensor, so it is never scratch."""
    if saved not in SAVED_STATES:
        raise ValueError(f"saved must be one of {SAVED_STATES}, got {saved!r}")
    from_output = saved == "output"
    if from_output and operator not in OUTPUT_INVERTIBLE_OPERATORS:
        raise ValueError(f"saved='output' needs the linear or cosine operator, got {operator!r}")
    return from_output, c_scratch and not from_output


@torch.no_grad()
def conv2d_backward(dy: Tensor, x: Tensor, w: Tensor, k: Optional[Tensor], c: Tensor, r_x: Tensor,
                    stride, padding, dilation, groups: int, operator: str, eps: float,
                    output_mask: Sequence[bool] = (True, True, True, True), *,
                    c_scratch: bool = False, saved: str = "cosine", bias: Optional[Tensor] = None):
    """Closed-form backward (DESIGN §1). Returns ``(dx, dw, db, dk)``; unrequested ones are None.

    ``saved``: what ``c`` holds -- "cosine" (the saved clamped cosine) or "output" (the forward's
    output y, with ``bias`` the bias that went into it; linear and cosine operators only: see
    :func:`cosine_from_output`). y is the caller's tensor: it is never written.

    ``G = dy * dg/dc``, ``H = G / (r_x r_w)``, ``A = sum_{o in group} G c / r_x^2``,
    ``S_o = sum G c``; ``dx = dgrad(H) - x * boxsum^T(A)``, ``dw = wgrad(H) - w S / r_w^2``.
    As in the forward, r_w rides on the filters: ``dgrad(H, w) = dgrad(G/r_x, w/r_w)`` and
    ``wgrad(x, H)_o = wgrad(x, G/r_x)_o / r_w[o]``.

    ``c_scratch``: the caller gives up ``c`` (this is its last use), so ``G/r_x`` is written over
    it instead of into a fresh full-size buffer -- the eager autograd path passes it when the
    graph is not retained. A compute-dtype copy of ``c`` is always used that way."""
    need_dx, need_dw, need_db, need_dk = output_mask
    cd = compute_dtype(x.dtype)
    from_output, c_scratch = saved_state_mode(saved, operator, c_scratch)
    dyc, xc, wc, cc = dy.to(cd), x.to(cd), w.to(cd), c.to(cd)
    r_x = r_x.to(cd)
    kh, kw = w.shape[2], w.shape[3]
    kk = _k_view(k, cc, 1) if k is not None else None
    need_dk = need_dk and operator == "sigmoid"
    sum_dy = dyc.sum(dim=(0, 2, 3)) if (need_db or need_dk) else None
    db = sum_dy.to(w.dtype) if need_db else None
    h_out = cc if (c_scratch or cc is not c) else None
    b = _k_view(bias, cc, 1) if (from_output and bias is not None) else None
    h_unit, a, s_o, dk = _grad_terms(dyc, cc, r_x, groups, operator, kk, need_dx, need_dw, need_dk,
                                     sum_dy, h_out, output_bias=b, from_output=from_output)
    dk = dk.to(k.dtype) if dk is not None else None
    dx = dw = None
    if need_dx or need_dw:
        r_w = filter_norms(wc, eps)
        dx, dw_unit, _ = torch.ops.aten.convolution_backward(
            h_unit, xc, wc / r_w.reshape(-1, 1, 1, 1), None, list(stride), list(padding),
            list(dilation), False, [0, 0], groups, [need_dx, need_dw, False])
        del h_unit
        if need_dx:
            nb, cin, hh, ww = xc.shape
            box_t = box_filter_transposed(a, (hh, ww), kh, kw, stride, padding, dilation)
            dx5 = dx.reshape(nb, groups, cin // groups, hh, ww)
            dx5.addcmul_(xc.reshape(nb, groups, cin // groups, hh, ww), box_t.unsqueeze(2), value=-1.0)
            dx = dx5.reshape(xc.shape).to(x.dtype).contiguous(memory_format=_memory_format(x))
        if need_dw:
            inv_rw = r_w.reciprocal().reshape(-1, 1, 1, 1)
            dw = (dw_unit.addcmul_(wc, s_o.reshape(-1, 1, 1, 1) * inv_rw, value=-1.0) * inv_rw).to(w.dtype)
    return dx, dw, db, dk


# ---------------------------------------------------------------------------------------------
# Plain-autograd versions (the gradient oracle): every step a differentiable PyTorch primitive.
# ---------------------------------------------------------------------------------------------

class BoundedArccos(torch.autograd.Function):
    """theta = arccos(clamp(c, -1, 1)) with the bounded derivative -1/sqrt(max(1-c^2, DELTA))."""

    @staticmethod
    def forward(ctx, c):
        cl = torch.clamp(c, -1.0, 1.0)
        ctx.save_for_backward(cl)
        return torch.acos(cl)

    @staticmethod
    def backward(ctx, grad):
        (cl,) = ctx.saved_tensors
        return grad * dtheta_dc(cl)


class UnitClampStraightThrough(torch.autograd.Function):
    """clamp(c, -1, 1) whose gradient is the identity (cosine: dL/dc = dy exactly)."""

    @staticmethod
    def forward(ctx, c):
        return torch.clamp(c, -1.0, 1.0)

    @staticmethod
    def backward(ctx, grad):
        return grad


def g_autograd(c: Tensor, operator: str, k: Optional[Tensor]) -> Tensor:
    """g(arccos c) through autograd-differentiable primitives with the bounded arccos rule (and
    the identity gradient of the unit clamp for cosine); ``k`` broadcastable to ``c``."""
    if operator == "cosine":
        return UnitClampStraightThrough.apply(c)
    return g_of_theta(BoundedArccos.apply(c), operator, k)


def conv2d_autograd(x: Tensor, w: Tensor, bias: Optional[Tensor], k: Optional[Tensor],
                    stride, padding, dilation, groups: int, operator: str, eps: float) -> Tensor:
    """SphereConv2d through differentiable primitives; autograd gives the reference gradients.

    Uses an independent patch norm (unfold) so that it also cross-checks the box-filter path."""
    kh, kw = w.shape[2], w.shape[3]
    n, cin = x.shape[0], x.shape[1]
    s = F.conv2d(x, w, None, stride, padding, dilation, groups)
    ho, wo = s.shape[2], s.shape[3]
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    q = cols.reshape(n, groups, (cin // groups) * kh * kw, ho * wo).pow(2).sum(dim=2)
    r_x = torch.sqrt(q + eps).reshape(n, groups, ho, wo)
    r_w = torch.sqrt(w.reshape(w.shape[0], -1).pow(2).sum(dim=1) + eps)
    c = _divide_by_norms(s, r_x, r_w, groups)
    y = g_autograd(c, operator, _k_view(k, c, 1) if k is not None else None)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y


# ---------------------------------------------------------------------------------------------
# Linear: a patch is one row of x [M, in]; r_x is [M].
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def linear_forward(x: Tensor, w: Tensor, bias: Optional[Tensor], k: Optional[Tensor],
                   operator: str, eps: float, *, store_c: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """Closed-form forward of SphereLinear: ``(y, c, r_x)``, the conv path's recipe with a patch
    = a row (the filter norm rides on the weight; c is scaled and clamped in place); c comes
    back empty with ``store_c=False`` (see :func:`conv2d_forward`)."""
    cd = compute_dtype(x.dtype)
    xc, wc = x.to(cd), w.to(cd)
    r_x = torch.sqrt(torch.linalg.vecdot(xc, xc) + eps)
    c = xc @ (wc / filter_norms(wc, eps)[:, None]).t()
    c.mul_(r_x.reciprocal()[:, None]).clamp_(-1.0, 1.0)
    y = _g_plus_bias(c, operator, _k_view(k, c, 1) if k is not None else None, bias)
    return y.to(x.dtype), (c.to(x.dtype) if store_c else c.new_empty(0, dtype=x.dtype)), r_x


@torch.no_grad()
def linear_backward(dy: Tensor, x: Tensor, w: Tensor, k: Optional[Tensor], c: Tensor, r_x: Tensor,
                    operator: str, eps: float, output_mask: Sequence[bool] = (True, True, True, True),
                    *, c_scratch: bool = False, saved: str = "cosine", bias: Optional[Tensor] = None):
    """Closed-form backward of SphereLinear (DESIGN §1 with a patch = a row); ``c_scratch``,
    ``saved`` and ``bias`` as in :func:`conv2d_backward`. The per-element chain is the conv
    path's (rows as ``[M, out, 1, 1]`` pixels of one group), then ``dx = H' w_unit - x A`` and
    ``dw = (H'^T x) / r_w - w S / r_w^2`` with ``H' = G / r_x``, ``w_unit = w / r_w``."""
    need_dx, need_dw, need_db, need_dk = output_mask
    cd = compute_dtype(x.dtype)
    from_output, c_scratch = saved_state_mode(saved, operator, c_scratch)
    dyc, xc, wc, cc, r_x = dy.to(cd), x.to(cd), w.to(cd), c.to(cd), r_x.to(cd)
    m, n_out = dyc.shape
    need_dk = need_dk and operator == "sigmoid"
    sum_dy = dyc.sum(dim=0) if (need_db or need_dk) else None
    db = sum_dy.to(w.dtype) if need_db else None
    h_out = cc.view(m, n_out, 1, 1) if (c_scratch or cc is not c) else None
    kk = _k_view(k, cc, 1).reshape(1, -1, 1, 1) if k is not None else None
    b = bias.to(cd).reshape(1, -1, 1, 1) if (from_output and bias is not None) else None
    h_unit, a, s_o, dk = _grad_terms(dyc.reshape(m, n_out, 1, 1), cc.reshape(m, n_out, 1, 1),
                                     r_x.reshape(m, 1, 1, 1), 1, operator, kk, need_dx, need_dw,
                                     need_dk, sum_dy, h_out, output_bias=b, from_output=from_output)
    dk = dk.to(k.dtype) if dk is not None else None
    dx = dw = None
    if need_dx or need_dw:
        r_w = filter_norms(wc, eps)
        h_unit = h_unit.view(m, n_out)
        if need_dx:
            dx = torch.addmm(xc * a.view(m, 1), h_unit, wc / r_w[:, None], beta=-1.0).to(x.dtype)
        if need_dw:
            inv_rw = r_w.reciprocal()[:, None]
            dw = (h_unit.t() @ xc).mul_(inv_rw).addcmul_(wc, s_o[:, None] * inv_rw * inv_rw,
                                                          value=-1.0).to(w.dtype)
    return dx, dw, db, dk


def linear_autograd(x: Tensor, w: Tensor, bias: Optional[Tensor], k: Optional[Tensor],
                    operator: str, eps: float) -> Tensor:
    r_x = torch.sqrt(x.pow(2).sum(dim=1) + eps)
    r_w = torch.sqrt(w.pow(2).sum(dim=1) + eps)
    c = (x @ w.t()) / (r_x[:, None] * r_w[None, :])
    y = g_autograd(c, operator, _k_view(k, c, 1) if k is not None else None)
    if bias is not None:
        y = y + bias
    return y
