"""Input builders and comparison helpers shared by the tests and the benchmark suite.

What the benchmark times is built by the same functions the tests check.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

# (dtype, rtol on the relative norm error, atol added to the max-abs bound) per dtype. The
# low-precision bounds are loose on purpose: the main check is `assert_close_to_reference`,
# which compares with how far the same-dtype rounding of the float64 answer already is.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}

@dataclass
class ConvInputs:
    x: torch.Tensor
    w: torch.Tensor
    bias: Optional[torch.Tensor]
    k: Optional[torch.Tensor]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    operator: str

    def args(self):
        """Positional arguments of the ``conv2d_forward`` contract (without eps)."""
        return (self.x, self.w, self.bias, self.k, self.stride, self.padding, self.dilation,
                self.groups, self.operator)

    @property
    def pure_depthwise(self) -> bool:
        """C_in/G = C_out/G = 1: the Triton forward saves neither c nor r_x there (the backward
        recomputes them)."""
        return self.w.shape[1] == 1 and self.w.shape[0] == self.groups

    def to(self, dtype=None, device=None):
        def cv(t):
            if t is None:
                return None
            fmt = torch.channels_last if _is_channels_last(t) else torch.contiguous_format
            return t.to(dtype=dtype, device=device).contiguous(memory_format=fmt)
        return ConvInputs(cv(self.x), cv(self.w), cv(self.bias), cv(self.k), self.stride,
                          self.padding, self.dilation, self.groups, self.operator)

def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)

def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)

def make_conv_inputs(n=2, c_in=8, h=9, w=9, c_out=16, kernel=3, stride=1, padding=1, dilation=1,
                     groups=1, operator="cosine", bias=True, per_channel_k=True,
                     dtype=torch.float32, device="cpu", channels_last=False, scale=1.0,
                     generator: Optional[torch.Generator] = None) -> ConvInputs:
    """Fresh random SphereConv2d inputs (never zeros). ``k`` in [0.2, 0.8] for sigmoid."""
    kh, kw = _pair(kernel)
    x = torch.randn(n, c_in, h, w, generator=generator, dtype=torch.float64) * scale
    wt = torch.randn(c_out, c_in // groups, kh, kw, generator=generator, dtype=torch.float64)
    b = torch.randn(c_out, generator=generator, dtype=torch.float64) * 0.1 if bias else None
    k = None
    if operator == "sigmoid":
        k = (0.2 + 0.6 * torch.rand(c_out, generator=generator, dtype=torch.float64)
             if per_channel_k else torch.full((c_out,), 0.3, dtype=torch.float64))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(dtype=dtype, device=device).contiguous(memory_format=fmt)
    wt = wt.to(dtype=dtype, device=device)
    b = b.to(dtype=dtype, device=device) if b is not None else None
    k = k.to(dtype=dtype, device=device) if k is not None else None
    return ConvInputs(x, wt, b, k, _pair(stride), _pair(padding), _pair(dilation), groups, operator)

# How many random geometries the seeded sweeps draw: SPHEREOPS_RANDOM_CASES=200 sweeps more
# (120 passed through the kernels when the sweep was added).
RANDOM_CASES = int(os.environ.get("SPHEREOPS_RANDOM_CASES", "8"))

# The forward's and the dgrad's K loops take each row's in-window taps as int32 bits formed
# before the loop (conv_fwd.window_tap_bits) up to 31 taps and compare per step past that:
# strided, dilated filters whose windows reach into the padding on every side, at 30 and 31
# taps (the highest bit) and at 32 and 49 (the per-step compares); make_conv_inputs arguments
# for a GEMM of any channel count (16 for the channel-chunk loops, 3 for the forward's flat one).
TAP_BIT_GEOMETRIES = {
    "5x6-30-taps": dict(kernel=(5, 6), stride=(2, 1), padding=(3, 1), dilation=(1, 2), h=7, w=9),
    "1x31-31-taps": dict(kernel=(1, 31), stride=1, padding=(0, 15), dilation=1, h=3, w=6),
    "4x8-32-taps": dict(kernel=(4, 8), stride=(1, 2), padding=(2, 4), dilation=1, h=5, w=9),
    "7x7-d2-49-taps": dict(kernel=7, stride=2, padding=5, dilation=2, h=8, w=7),
}


# Pure depthwise convs on NCHW input (the kernels' row tiles), 20 channels over 3 images of
# 9 x 13 (make_conv_inputs arguments), with these on top: 3x3 at stride 1, stride 2 (gathered
# state rows out of line in the backward), a rectangular dilated filter with mixed strides.
DEPTHWISE_ROW_CASE = dict(n=3, c_in=20, c_out=20, groups=20, h=9, w=13)
DEPTHWISE_ROW_GEOMETRIES = {
    "3x3": dict(),
    "s2": dict(stride=2),
    "rect-d2": dict(kernel=(3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
}


def record_launches(monkeypatch, module, name: str) -> tuple:
    """Replace ``module.name`` -- a launcher taking (kernel, grid, args), then the kernel's
    constexprs and launch options as keyword arguments (conv_bwd._launch) or as one dict
    argument (launch.launch) -- by one that records each launch and still runs it. Returns
    ``(launches, flags)``: the [(kernel, grid, args)] and the [dict of constexprs and options]
    of the launches, in order."""
    real = getattr(module, name)
    launches, flags = [], []

    def record(kernel, grid, args, *rest, **kwargs):
        launches.append((kernel, grid, args))
        flags.append(dict(kwargs) if kwargs else dict(rest[0]))
        return real(kernel, grid, args, *rest, **kwargs)
    monkeypatch.setattr(module, name, record)
    return launches, flags


def random_conv_geometry(seed: int) -> dict:
    """A conv drawn from a seeded RNG: kernel 1-4 per side, stride 1-3, padding 0-2, dilation
    1-2, groups 1 / 2 / depthwise, odd sizes -- index paths no hand-picked case may hit."""
    rng = torch.Generator().manual_seed(seed)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    kernel, stride = (pick(1, 4), pick(1, 4)), (pick(1, 3), pick(1, 3))
    dilation = (pick(1, 2), pick(1, 2))
    padding = (pick(0, 2), pick(0, 2))
    kind = ("dense", "groups2", "depthwise")[pick(0, 2)]
    c_in = pick(1, 6) * (2 if kind == "groups2" else 1)
    groups = {"dense": 1, "groups2": 2, "depthwise": c_in}[kind]
    c_out = c_in if kind == "depthwise" else groups * pick(1, 5)
    # spatial size: at least one output pixel
    h = max(pick(3, 12), (kernel[0] - 1) * dilation[0] + 1 - 2 * padding[0])
    w = max(pick(3, 12), (kernel[1] - 1) * dilation[1] + 1 - 2 * padding[1])
    operator = ("linear", "cosine", "sigmoid")[pick(0, 2)]
    return dict(n=pick(1, 3), c_in=c_in, c_out=c_out, h=h, w=w, kernel=kernel, stride=stride,
                padding=padding, dilation=dilation, groups=groups, operator=operator,
                channels_last=bool(pick(0, 1)))


def make_near_parallel_conv_inputs(noise=1e-4, **kw) -> ConvInputs:
    """Filters copied from input patches (plus tiny noise): c -> 1 at those pixels."""
    inp = make_conv_inputs(**kw)
    x64 = inp.x.double()
    kh, kw_ = inp.w.shape[2], inp.w.shape[3]
    cg = inp.w.shape[1]
    w = inp.w.double().clone()
    hp, wp = x64.shape[2] - (kh - 1) * inp.dilation[0], x64.shape[3] - (kw_ - 1) * inp.dilation[1]
    for o in range(w.shape[0]):
        g = o // (w.shape[0] // inp.groups)
        i, j = o % max(hp, 1), (3 * o) % max(wp, 1)
        patch = x64[0, g * cg:(g + 1) * cg, i:i + (kh - 1) * inp.dilation[0] + 1:inp.dilation[0],
                    j:j + (kw_ - 1) * inp.dilation[1] + 1:inp.dilation[1]]
        w[o] = patch * (1.0 + 0.5 * o) + noise * torch.randn_like(patch)
    inp.w = w.to(inp.w.dtype)
    return inp

def make_linear_inputs(m=16, in_features=32, out_features=24, operator="cosine", bias=True,
                       per_channel_k=True, dtype=torch.float32, device="cpu", scale=1.0,
                       generator: Optional[torch.Generator] = None):
    """Fresh random SphereLinear inputs ``(x [m, in], w [out, in], bias, k)``."""
    x = torch.randn(m, in_features, generator=generator, dtype=torch.float64) * scale
    w = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    b = torch.randn(out_features, generator=generator, dtype=torch.float64) * 0.1 if bias else None
    k = None
    if operator == "sigmoid":
        k = (0.2 + 0.6 * torch.rand(out_features, generator=generator, dtype=torch.float64)
             if per_channel_k else torch.full((out_features,), 0.3, dtype=torch.float64))
    cv = (lambda t: t.to(dtype=dtype, device=device) if t is not None else None)
    return cv(x), cv(w), cv(b), cv(k)

def _describe_mismatch(out: torch.Tensor, ref: torch.Tensor, bad: torch.Tensor) -> str:
    n_bad = int(bad.sum())
    idx = tuple(int(i) for i in torch.nonzero(bad)[0]) if n_bad else None
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref)
    msg = f"{n_bad}/{out.numel()} elements mismatch"
    if idx is not None:
        msg += f"; first at {idx}: out={out[idx].item()!r} ref={ref[idx].item()!r}"
    if bool((nan_out != nan_ref).any()):
        msg += (f"; NaN on one side only: out has {int((nan_out & ~nan_ref).sum())}, "
                f"ref has {int((nan_ref & ~nan_out).sum())}")
    return msg

def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float, name: str = "output"):
    """``max|out-ref| <= atol + rtol*max|ref|`` and relative-norm error <= rtol; NaN where ref is NaN.

    ``ref`` is normally the float64 reference; ``out`` is compared in float64."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    nan_o, nan_r = torch.isnan(o), torch.isnan(r)
    assert torch.equal(nan_o, nan_r), f"{name}: NaN pattern differs: " + _describe_mismatch(o, r, nan_o != nan_r)
    o, r = torch.where(nan_r, 0.0, o), torch.where(nan_r, 0.0, r)
    assert bool(torch.isfinite(o).all() == torch.isfinite(r).all()), f"{name}: Inf pattern differs"
    scale = r.abs().max().item() if r.numel() else 0.0
    bound = atol + rtol * scale
    bad = (o - r).abs() > bound
    assert not bool(bad.any()), f"{name}: max-abs bound {bound:.3g} exceeded: " + _describe_mismatch(o, r, bad)
    if r.numel():
        rel = ((o - r).norm() / r.norm().clamp_min(1e-300)).item()
        assert rel <= max(rtol, 1e-12) or r.norm().item() < atol, f"{name}: relative norm error {rel:.3g} > {rtol:.3g}"

def assert_close_to_reference(out: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor,
                              atol: float, name: str = "output"):
    """STYLE's adaptive bound for low precision:
    ``max|out - ref64| <= 2 * max|ref_same_dtype - ref64| + atol`` (and the same NaN pattern)."""
    o, r, s = (t.detach().double().cpu() for t in (out, ref64, ref_same_dtype))
    nan_o, nan_r = torch.isnan(o), torch.isnan(r)
    assert torch.equal(nan_o, nan_r), f"{name}: NaN pattern differs: " + _describe_mismatch(o, r, nan_o != nan_r)
    o, r, s = (torch.where(nan_r, 0.0, t) for t in (o, r, s))
    bound = 2.0 * (s - r).abs().max().item() + atol if r.numel() else atol
    bad = (o - r).abs() > bound
    assert not bool(bad.any()), f"{name}: bound {bound:.3g} exceeded: " + _describe_mismatch(o, r, bad)
