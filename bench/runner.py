"""The benchmark run: plan the rows, check each provider, time it, collect the records.

A *row* is one layer under one numeric config (dtype, layout, operator); for every provider the
runner first runs a correctness spot check against the float64 reference on the very inputs it
will time (a wrong result is recorded as ``status="wrong"`` and never timed), then times the
forward, backward and forward+backward modes.  Every step sits in its own try/except: a failure
becomes a record with ``status="error"`` and the run goes on.  A time budget stops new
measurements once spent (``status="skipped"``), and results are written after every row so an
interrupted run keeps what it measured.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from sphereops import reference as R

from . import providers as P
from . import shapes as S
from . import timing as T

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_VERSION = 1

# name -> (torch dtype, tf32 allowed)
DTYPES = {
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "tf32": (torch.float32, True),
    "fp32": (torch.float32, False),
    "fp64": (torch.float64, False),
}
LAYOUTS = ("channels_last", "nchw")

# Spot-check bound on ||out - ref64|| / ||ref64|| per dtype (gradients get GRAD_FACTOR times
# more).  Loose on purpose: it must let every honest rounding through and stop a broken kernel,
# whose error is O(1).  tf32 keeps 10 mantissa bits, bf16 8, fp16 11.
SPOT_RTOL = {"fp64": 1e-9, "fp32": 1e-4, "tf32": 1e-2, "fp16": 1e-2, "bf16": 5e-2}
GRAD_FACTOR = 2.0

# The configuration the headline goals are stated in (issue 5): bf16, channels_last.
HEADLINE = {"dtype": "bf16", "layout": "channels_last", "operator": "linear"}
CPU_HEADLINE = {"dtype": "fp32", "layout": "nchw", "operator": "linear"}

# tests.helpers lives in the repository, not in the installed package.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from tests.helpers import make_conv_inputs, make_linear_inputs  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Configuration and budget
# ---------------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    device: torch.device
    full: bool = False
    budget_s: Optional[float] = None          # None: no limit
    providers: tuple = P.CONV_PROVIDERS
    linear_providers: tuple = P.LINEAR_PROVIDERS
    modes: tuple = S.MODES
    compile: bool = True
    e2e: bool = True
    linear: bool = True
    criterion: bool = True
    graphs: bool = True                        # CUDA: device time from CUDA-graph replay too
    # CUDA: the training step's device time as well. Off by default: capturing loss.backward()
    # failed on the H200 (torch 2.11; see bench/README.md) and a failed capture leaves the CUDA
    # RNG unusable for the rest of the process
    e2e_graphs: bool = False
    conv: bool = True
    conv_shapes: Optional[list] = None         # override of the suite's shapes
    linear_shapes: Optional[list] = None
    configs: Optional[list] = None             # override: [(dtype, layout, operator), ...]
    sphereops_backend: Optional[str] = None
    target_s: Optional[float] = None           # time per measurement
    e2e_batch: Optional[int] = None
    e2e_widths: Optional[tuple] = None
    e2e_units: Optional[int] = None
    criterion_rounds: int = 11
    criterion_operators: tuple = P.BENCH_OPERATORS
    criterion_shape: Optional[S.ConvShape] = None   # None: shapes.CRITERION
    verbose: bool = True

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def measurement_target_s(self) -> float:
        if self.target_s is not None:
            return self.target_s
        return 0.12 if self.is_cuda else 0.4


class Budget:
    """Wall-clock budget for starting new measurements."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.start = time.perf_counter()
        self.skipped = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def exhausted(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------

def _run(cmd: list, timeout: float = 10.0) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict:
    # SPHEREOPS_COMMIT names the commit of a copied tree: a lent GPU machine's copy may have no
    # .git, or a stale one (the H200 copies of 2026-11-27 reported 5565678 for ca1cf52 -- and
    # "dirty", the working tree differing from that stale HEAD). When it is set it wins.
    named = os.environ.get("SPHEREOPS_COMMIT")
    if named:
        return {"commit": named, "dirty": None, "branch": None}
    commit = _run(["git", "rev-parse", "--short=10", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit or "unknown", "dirty": bool(status) if status is not None else None,
            "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"])}


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # Other processes' load makes CPU timings noisy: keep it next to the numbers.
        "loadavg_at_start": _loadavg(),
        "device_type": device.type,
        "tf32_flags_at_start": T.tf32_flags(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "argv": sys.argv,
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - triton is optional for the CPU path
        env["triton"] = f"unavailable ({type(exc).__name__})"
    env.update(git_info())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["l2_mib"] = round(T.l2_bytes(device) / 2**20, 1)
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    else:
        env["device_name"] = _cpu_name()
        env["driver"] = None
    return env


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or "unknown")


def device_slug(env: dict) -> str:
    if env.get("device_type") != "cuda":
        return "cpu"
    name = env.get("device_name", "gpu").lower()
    slug = "".join(ch if ch.isalnum() else "-" for ch in name)
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug.strip("-") or "gpu"


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

@dataclass
class ConvJob:
    shape: S.ConvShape
    dtype: str
    layout: str
    operator: str
    providers: tuple
    tier: str


@dataclass
class LinearJob:
    shape: S.LinearShape
    dtype: str
    operator: str
    providers: tuple
    tier: str


def default_configs(cfg: RunConfig) -> dict:
    """Tiers of (dtype, layout, operator) configs: the headline first, then the sweeps."""
    if not cfg.is_cuda:
        return {
            "headline": [("fp32", "nchw", "linear")],
            "operators": [("fp32", "nchw", op) for op in ("cosine", "sigmoid", "learnable")],
            "layouts": [("fp32", "channels_last", "linear")],
        }
    headline = [("bf16", "channels_last", "linear")]
    operators = [("bf16", "channels_last", op) for op in ("cosine", "sigmoid", "learnable")]
    dtypes = [("fp16", "channels_last", "linear"), ("tf32", "channels_last", "linear"),
              ("fp32", "channels_last", "linear"), ("bf16", "nchw", "linear"),
              ("fp32", "nchw", "linear")]
    return {"headline": headline, "operators": operators, "dtypes": dtypes}


def plan(cfg: RunConfig) -> list:
    """Jobs in priority order, so that a short budget still measures what matters most."""
    jobs: list = []
    tiers = default_configs(cfg)
    if cfg.conv_shapes is not None:
        main_shapes = sweep_shapes = list(cfg.conv_shapes)
    elif cfg.is_cuda:
        main_shapes = S.FULL if cfg.full else S.QUICK
        sweep_shapes = S.FULL if cfg.full else S.SWEEP
    else:
        main_shapes = S.CPU_FULL if cfg.full else S.CPU_QUICK
        sweep_shapes = main_shapes if cfg.full else main_shapes[:1]
    providers = tuple(p for p in cfg.providers if p != "compiled_best" or cfg.compile)
    eager = tuple(p for p in providers if p != "compiled_best")
    compiled = ("compiled_best",) if "compiled_best" in providers else ()

    if cfg.configs is not None:
        for dtype, layout, op in cfg.configs:
            for shape in main_shapes:
                jobs.append(ConvJob(shape, dtype, layout, op, providers, "custom"))
        return jobs + _linear_jobs(cfg)

    # Priority: eager headline rows, the training step, then a few torch.compile rows (~10-30 s
    # each to build, so even a short budget gets the compile comparison), SphereLinear, the
    # remaining compile rows, the sweeps.
    early_compile = 0 if cfg.full else 3
    (dtype, layout, op), = tiers["headline"]
    if cfg.conv:
        for shape in main_shapes:
            jobs.append(ConvJob(shape, dtype, layout, op, eager, "headline"))
    if cfg.e2e:
        jobs.append("e2e")
    if cfg.conv and compiled:
        for shape in main_shapes[:early_compile]:
            jobs.append(ConvJob(shape, dtype, layout, op, compiled, "headline"))
    if cfg.criterion and not cfg.is_cuda:
        jobs.insert(0, "criterion")
    jobs.extend(_linear_jobs(cfg))
    if cfg.conv:
        if compiled:
            for shape in main_shapes[early_compile:]:
                jobs.append(ConvJob(shape, dtype, layout, op, compiled, "headline"))
        if cfg.is_cuda and not cfg.full:
            # NCHW is PyTorch's default: the pure depthwise kernels' row tiles and the GEMM
            # path's pixel-wise NCHW stores (y, c, dx) are measured there, on one layer each
            main_names = {s.name for s in main_shapes}
            for name in ("edge.depthwise", "r18.l3"):
                if name in main_names:
                    jobs.append(ConvJob(S.BY_NAME[name], dtype, "nchw", op, eager, "dtypes"))
        for tier in [t for t in tiers if t != "headline"]:
            for dtype_, layout_, op_ in tiers[tier]:
                for shape in sweep_shapes:
                    # torch.compile runs on the headline config only (each compiled row costs
                    # ~10-30 s to build; the sweeps ask how the fused kernels vary, not Inductor).
                    jobs.append(ConvJob(shape, dtype_, layout_, op_, eager, tier))
    if cfg.criterion and not cfg.is_cuda:
        # last: it changes glibc's knobs for the rest of the process (e2e.steady_glibc_allocator)
        jobs.append("criterion_steady")
    return jobs


def _linear_jobs(cfg: RunConfig) -> list:
    if not cfg.linear:
        return []
    if cfg.linear_shapes is not None:
        shapes = cfg.linear_shapes
    elif cfg.is_cuda:
        shapes = S.LINEAR_FULL if cfg.full else S.LINEAR_QUICK
    else:
        shapes = S.LINEAR_CPU
    dtype = "bf16" if cfg.is_cuda else "fp32"
    ops = P.BENCH_OPERATORS if cfg.full else ("linear",)
    return [LinearJob(s, dtype, op, cfg.linear_providers, "linear") for op in ops for s in shapes]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:400]


def _rel_err(out: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> float:
    """||out - ref|| / ||ref|| in float64; inf when shapes differ or NaN appears on one side."""
    if out is None or ref is None:
        return 0.0 if out is None and ref is None else math.inf
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    o = out.detach().to(device=ref.device, dtype=torch.float64)
    r = ref.detach().to(torch.float64)
    if not torch.equal(torch.isnan(o), torch.isnan(r)):
        return math.inf
    o, r = torch.nan_to_num(o, nan=0.0), torch.nan_to_num(r, nan=0.0)
    denom = r.norm().item()
    num = (o - r).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@dataclass
class Inputs:
    """``copies`` independent input sets of one row plus the output gradients."""

    sets: list                  # [(x, w, bias, k)]
    dys: list
    diff: list                  # [(tensors that require grad)]

    @property
    def copies(self) -> int:
        return len(self.sets)

    def without_k(self) -> "Inputs":
        """The same copies with ``k`` dropped from the differentiated inputs (a plain conv does
        not use k; asking autograd for its gradient would be an error)."""
        diff = [tuple(t for t in d if t is not s[3]) for d, s in zip(self.diff, self.sets)]
        return Inputs(self.sets, self.dys, diff)


def _set_requires_grad(x, w, b, k, learnable: bool):
    x.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    if k is not None and learnable:
        k.requires_grad_(True)
    return tuple(t for t in (x, w, b, k) if t is not None and t.requires_grad)


def build_conv_inputs(shape: S.ConvShape, dtype: torch.dtype, channels_last: bool, operator: str,
                      device: torch.device, copies: Optional[int] = None) -> Inputs:
    """Input copies from ``tests.helpers.make_conv_inputs`` (what is timed is what is tested)."""
    sphere_op = "sigmoid" if operator == "learnable" else operator
    ho, wo = shape.out_hw
    item = torch.tensor([], dtype=dtype).element_size()
    set_bytes = item * (shape.n * shape.c_in * shape.h * shape.w
                        + shape.c_out * (shape.c_in // shape.groups) * shape.kh * shape.kw
                        + shape.n * shape.c_out * ho * wo)
    if copies is None:
        copies = T.copies_for(set_bytes, device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    sets, dys, diff = [], [], []
    for _ in range(copies):
        inp = make_conv_inputs(n=shape.n, c_in=shape.c_in, h=shape.h, w=shape.w, c_out=shape.c_out,
                               kernel=(shape.kh, shape.kw), stride=shape.stride,
                               padding=shape.padding, dilation=shape.dilation, groups=shape.groups,
                               operator=sphere_op, bias=True,
                               per_channel_k=(operator == "learnable"), dtype=dtype,
                               device=device, channels_last=channels_last)
        x, w, b, k = inp.x, inp.w, inp.bias, inp.k
        if channels_last:
            # Like nn.Module.to(memory_format=channels_last): the filters follow the input.
            w = w.contiguous(memory_format=torch.channels_last)
        diff.append(_set_requires_grad(x, w, b, k, operator == "learnable"))
        sets.append((x, w, b, k))
        # CPU RNG, like make_conv_inputs: a failed CUDA-graph capture leaves the CUDA generator
        # unusable ("Offset increment outside graph capture"), which failed every later job of
        # the H200 runs 20261127-1403 and -1606
        dy = torch.randn(shape.n, shape.c_out, ho, wo, dtype=torch.float32)
        dys.append(dy.to(device=device, dtype=dtype).contiguous(memory_format=fmt))
    return Inputs(sets, dys, diff)


def build_linear_inputs(shape: S.LinearShape, dtype: torch.dtype, operator: str,
                        device: torch.device, copies: Optional[int] = None) -> Inputs:
    sphere_op = "sigmoid" if operator == "learnable" else operator
    item = torch.tensor([], dtype=dtype).element_size()
    set_bytes = item * (shape.m * shape.in_features + shape.out_features * shape.in_features
                        + shape.m * shape.out_features)
    if copies is None:
        copies = T.copies_for(set_bytes, device)
    sets, dys, diff = [], [], []
    for _ in range(copies):
        x, w, b, k = make_linear_inputs(m=shape.m, in_features=shape.in_features,
                                        out_features=shape.out_features, operator=sphere_op,
                                        bias=True, per_channel_k=(operator == "learnable"),
                                        dtype=dtype, device=device)
        diff.append(_set_requires_grad(x, w, b, k, operator == "learnable"))
        sets.append((x, w, b, k))
        # CPU RNG, as for the conv inputs (build_conv_inputs)
        dys.append(torch.randn(shape.m, shape.out_features).to(device=device, dtype=dtype))
    return Inputs(sets, dys, diff)


def _grads_or_none(outputs, inputs_with_grad, all_inputs, dy):
    grads = torch.autograd.grad(outputs, inputs_with_grad, dy, allow_unused=True)
    by_id = {id(t): g for t, g in zip(inputs_with_grad, grads)}
    return [by_id.get(id(t)) if t is not None else None for t in all_inputs]


def _first_inputs_float64(inputs: Inputs):
    """``(x, w, b, k, dy)`` of input copy 0, detached, in float64 (None stays None)."""
    x, w, b, k = inputs.sets[0]
    return tuple(None if t is None else t.detach().to(torch.float64)
                 for t in (x, w, b, k, inputs.dys[0]))


def conv_reference(inputs: Inputs, spec: P.RowSpec, sphere: bool) -> dict:
    """float64 y and gradients for input copy 0 (closed-form reference, or F.conv2d)."""
    x64, w64, b64, k64, dy64 = _first_inputs_float64(inputs)
    if sphere:
        y, c, r_x = R.conv2d_forward(x64, w64, b64, k64, spec.stride, spec.padding, spec.dilation,
                                     spec.shape.groups, spec.sphere_operator, spec.eps)
        need_dk = spec.learnable
        dx, dw, db, dk = R.conv2d_backward(dy64, x64, w64, k64, c, r_x, spec.stride, spec.padding,
                                           spec.dilation, spec.shape.groups, spec.sphere_operator,
                                           spec.eps, (True, True, b64 is not None, need_dk))
        del c, r_x
    else:
        leaves = [t.requires_grad_(True) for t in (x64, w64, b64)]
        y = F.conv2d(leaves[0], leaves[1], leaves[2], spec.stride, spec.padding, spec.dilation,
                     spec.shape.groups)
        dx, dw, db = torch.autograd.grad(y, leaves, dy64)
        y, dk = y.detach(), None
    return {"y": y, "dx": dx, "dw": dw, "db": db, "dk": dk if spec.learnable else None}


def linear_reference(inputs: Inputs, spec: P.RowSpec, sphere: bool) -> dict:
    x64, w64, b64, k64, dy64 = _first_inputs_float64(inputs)
    if sphere:
        y, c, r_x = R.linear_forward(x64, w64, b64, k64, spec.sphere_operator, spec.eps)
        dx, dw, db, dk = R.linear_backward(dy64, x64, w64, k64, c, r_x, spec.sphere_operator,
                                           spec.eps, (True, True, True, spec.learnable))
    else:
        leaves = [t.requires_grad_(True) for t in (x64, w64, b64)]
        y = F.linear(*leaves)
        dx, dw, db = torch.autograd.grad(y, leaves, dy64)
        y, dk = y.detach(), None
    return {"y": y, "dx": dx, "dw": dw, "db": db, "dk": dk if spec.learnable else None}


def spot_check(fn: Callable, inputs: Inputs, ref: dict, dtype_name: str) -> tuple:
    """Run ``fn`` on copy 0 (forward and backward) and compare with ``ref``.

    Returns ``(ok, errors)`` with the relative error of every output; NaN on one side only or a
    shape mismatch counts as an infinite error."""
    x, w, b, k = inputs.sets[0]
    y = fn(x, w, b, k)
    grads = _grads_or_none(y, inputs.diff[0], (x, w, b, k), inputs.dys[0])
    errors = {"y": _rel_err(y, ref["y"])}
    for name, g in zip(("dx", "dw", "db", "dk"), grads):
        if ref.get(name) is not None or g is not None:
            errors[name] = _rel_err(g, ref.get(name))
    rtol = SPOT_RTOL[dtype_name]
    ok = all(err <= (rtol if name == "y" else rtol * GRAD_FACTOR) for name, err in errors.items())
    return ok, {name: (err if math.isfinite(err) else "inf") for name, err in errors.items()}


def make_steps(fn: Callable, inputs: Inputs, mode: str):
    """A ``step(i)`` callable for ``mode`` on input copy ``i`` (and what must be freed after)."""
    if mode == "fwd":
        def step(i):
            return fn(*inputs.sets[i])
        return step, None
    if mode == "fwd+bwd":
        def step(i):
            y = fn(*inputs.sets[i])
            return torch.autograd.grad(y, inputs.diff[i], inputs.dys[i])
        return step, None
    if mode == "bwd":
        return BackwardStep(fn, inputs), None
    raise ValueError(f"mode must be one of {S.MODES}, got {mode!r}")


class BackwardStep:
    """The backward mode: ``prepare(i)`` builds a fresh forward graph on copy ``i`` (untimed),
    ``step(i)`` runs only its backward.  A fresh graph per call instead of ``retain_graph``:
    torch.compile's backward donates its buffers and refuses to run twice on one graph.

    On CUDA the timer's start event is recorded after ``prepare`` in the same stream, so the
    measured interval starts when the forward kernels have finished."""

    def __init__(self, fn: Callable, inputs: "Inputs"):
        self.fn, self.inputs, self.graphs = fn, inputs, {}

    def prepare(self, i: int) -> None:
        self.graphs[i] = self.fn(*self.inputs.sets[i])

    def __call__(self, i: int):
        y = self.graphs.pop(i, None)
        if y is None:                       # not prepared (e.g. a memory probe): build it now
            y = self.fn(*self.inputs.sets[i])
        return torch.autograd.grad(y, self.inputs.diff[i], self.inputs.dys[i])


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, cfg: RunConfig, on_progress: Optional[Callable[[dict], None]] = None):
        self.cfg = cfg
        self.device = cfg.device
        self.budget = Budget(cfg.budget_s)
        self.records: list = []
        self.e2e: list = []
        self.criterion: list = []
        self.notes: list = []
        self.ceilings: dict = {}
        self.env: dict = {}
        self.on_progress = on_progress
        self._plain_done: set = set()
        self.interrupted = False
        self.graph_failed: set = set()   # providers whose capture failed (not captured again)
        # GPU: the median, as DESIGN section 5 asks.  CPU (a shared 2-core machine, where other
        # processes preempt the timed calls): the minimum, the least-disturbed repeat; both are
        # recorded in every row either way.
        self.statistic_key = "median_ms" if cfg.is_cuda else "min_ms"

    # -- CUDA-graph captures ---------------------------------------------------------------------
    @property
    def graphs_ok(self) -> bool:
        """False after failed captures of two providers: nothing is captured any more."""
        return len(self.graph_failed) < 2

    def capture_allowed(self, prov: str) -> bool:
        """Whether ``prov``'s calls may still be captured for device time."""
        return self.graphs_ok and prov not in self.graph_failed

    def capture_failed(self, prov: str, mode: str, error: str) -> None:
        """A capture of ``prov`` failed: that provider is not captured again (on the H200,
        torch.compile's fwd+bwd capture failed on one layer, and the run then stopped every
        capture, the other providers' device times of all later rows lost with it). A failed
        capture can also leave the process's CUDA state broken (a CUDA-RNG user failed every
        later job, 20261127-1606; the inputs come from the CPU RNG since): a second provider
        failing stops all captures."""
        self.graph_failed.add(prov)
        if not self.graphs_ok:
            self.notes.append(f"CUDA-graph timing stopped after failed captures of "
                              f"{', '.join(sorted(self.graph_failed))} ({prov} {mode}: {error})")
        else:
            self.notes.append(f"CUDA-graph timing of {prov} stopped after a failed capture "
                              f"({mode}: {error})")

    # -- logging -------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.cfg.verbose:
            print(f"[bench {self.budget.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)

    def _add(self, rec: dict) -> None:
        self.records.append(rec)
        if self.cfg.verbose and rec["status"] != "unsupported":
            if rec["status"] == "ok":
                extra = f"{rec['time_ms']:.3f} ms"
                if rec.get("tflops") is not None:
                    extra += f", {rec['tflops']:.3g} TFLOP/s"
            else:
                extra = rec.get("error") or rec.get("reason") or ""
            self.log(f"{rec['kind']:6s} {rec['shape']:16s} {rec['dtype']:4s} {rec['layout']:13s} "
                     f"{rec['operator']:9s} {rec['provider']:16s} {rec['mode']:7s} "
                     f"{rec['status']:7s} {extra}")

    # -- whole run ----------------------------------------------------------------------------
    def run(self, jobs: Optional[list] = None) -> dict:
        self.env = environment(self.device)
        self.log(f"device {self.env.get('device_name')}  torch {self.env['torch']}  "
                 f"triton {self.env.get('triton')}  commit {self.env['commit']}")
        try:
            self.ceilings = T.measure_ceilings(self.device)
        except Exception as exc:  # noqa: BLE001
            self.ceilings = {"error": _short_error(exc)}
        self.log("ceilings: " + ", ".join(f"{k}={v:.3g}" for k, v in self.ceilings.items()
                                          if isinstance(v, float)))
        jobs = plan(self.cfg) if jobs is None else jobs
        try:
            for job in jobs:
                self._run_job(job)
                if self.on_progress is not None:
                    self.on_progress(self.results())
        except KeyboardInterrupt:
            self.interrupted = True
            self.notes.append("interrupted (SIGINT / time limit): the remaining rows were not run")
            self.log("interrupted: writing what was measured")
        return self.results()

    def _run_job(self, job) -> None:
        try:
            if job == "e2e":
                self._run_e2e()
            elif job in ("criterion", "criterion_steady"):
                self._run_criterion("steady" if job == "criterion_steady" else "default")
            elif isinstance(job, ConvJob):
                self.run_conv_row(job)
            elif isinstance(job, LinearJob):
                self.run_linear_row(job)
            else:
                raise ValueError(f"unknown job {job!r}")
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - a job-level failure must not end the run
            self.notes.append(f"job {job!r} failed: {_short_error(exc)}")
            self.log(f"job failed: {_short_error(exc)}\n{traceback.format_exc(limit=3)}")
        finally:
            _free(self.device)

    def results(self) -> dict:
        compute_ratios(self.records)
        if self.env:
            self.env["loadavg_at_end"] = _loadavg()
        return {
            "schema": SCHEMA_VERSION,
            "meta": self.env,
            "config": {
                "full": self.cfg.full, "budget_s": self.cfg.budget_s,
                "providers": list(self.cfg.providers), "modes": list(self.cfg.modes),
                "compile": self.cfg.compile, "target_s": self.cfg.measurement_target_s(),
                "headline": HEADLINE if self.cfg.is_cuda else CPU_HEADLINE,
                "spot_rtol": SPOT_RTOL, "grad_factor": GRAD_FACTOR,
                "statistic": self.statistic_key.replace("_ms", ""),
                "elapsed_s": round(self.budget.elapsed(), 1),
                "skipped_for_budget": self.budget.skipped,
                "interrupted": self.interrupted,
            },
            "ceilings": self.ceilings,
            "records": self.records,
            "e2e": self.e2e,
            "criterion": self.criterion,
            "notes": self.notes,
        }

    # -- rows -----------------------------------------------------------------------------------
    def _base_record(self, kind, shape, dtype, layout, operator, provider, mode, spec) -> dict:
        dtype_t, tf32 = DTYPES[dtype]
        item = torch.tensor([], dtype=dtype_t).element_size()
        rec = {"kind": kind, "shape": shape.name, "net": getattr(shape, "net", "linear"),
               "label": shape.label(), "dtype": dtype, "layout": layout, "operator": operator,
               "provider": provider, "mode": mode, "status": "pending", "tier": None}
        if mode in S.MODES:
            flops = shape.flops(mode)
            n_bytes = shape.min_bytes(mode, item)
            rec.update(flops=flops, min_bytes=n_bytes,
                       floor_ms=T.floor_ms(flops, n_bytes, self.ceilings, dtype_t, tf32))
        return rec

    def run_conv_row(self, job: ConvJob) -> None:
        self._run_row("conv", job.shape, job.dtype, job.layout, job.operator, job.providers,
                      job.tier)

    def run_linear_row(self, job: LinearJob) -> None:
        self._run_row("linear", job.shape, job.dtype, "-", job.operator, job.providers, job.tier)

    def _run_row(self, kind, shape, dtype, layout, operator, providers, tier) -> None:
        """Check every provider of one row, then time the ones that passed, interleaved."""
        cfg, device = self.cfg, self.device
        dtype_t, tf32 = DTYPES[dtype]
        plain_name = "conv2d" if kind == "conv" else "linear"
        todo = []
        for prov in providers:
            key = (kind, shape.name, dtype, layout, prov)
            if prov == plain_name:
                if key in self._plain_done:
                    continue                       # operator-independent: timed once per config
                self._plain_done.add(key)
            todo.append(prov)
        if not todo:
            return

        def op_label(prov):
            return operator if P.provider_computes_sphere(prov) else "-"

        def record(prov, mode, **fields):
            rec = self._base_record(kind, shape, dtype, layout, op_label(prov), prov, mode, None)
            rec.update(tier=tier, **fields)
            if rec["status"] == "ok":
                rec["time_ms"] = rec[self.statistic_key]
                if rec.get("flops"):
                    rec["tflops"] = rec["flops"] / (rec["time_ms"] * 1e-3) / 1e12
                if rec.get("floor_ms"):
                    rec["pct_floor"] = 100.0 * rec["floor_ms"] / rec["time_ms"]
            if rec["status"] == "skipped":
                self.budget.skipped += 1
            self._add(rec)
            return rec

        if self.budget.exhausted():
            for prov in todo:
                for mode in cfg.modes:
                    record(prov, mode, status="skipped", reason="time budget spent")
            return

        spec = P.RowSpec(shape=shape, dtype=dtype_t, device=device, operator=operator,
                         channels_last=(layout == "channels_last"), tf32=tf32,
                         sphereops_backend=cfg.sphereops_backend)
        with T.tf32_mode(tf32 if dtype_t == torch.float32 and device.type == "cuda" else None):
            if kind == "conv":
                inputs = build_conv_inputs(shape, dtype_t, spec.channels_last, operator, device)
            else:
                inputs = build_linear_inputs(shape, dtype_t, operator, device)
            refs: dict = {}
            ready = {}          # provider -> (fn, inputs, check errors, notes, first-call seconds)
            for prov in todo:
                sphere = P.provider_computes_sphere(prov)
                why = (P.conv_unsupported(prov, spec) if kind == "conv"
                       else P.linear_unsupported(prov, spec))
                if why is not None:
                    record(prov, "all", status="unsupported", reason=why)
                    continue
                if self.budget.exhausted():
                    for mode in cfg.modes:
                        record(prov, mode, status="skipped", reason="time budget spent")
                    continue
                prov_inputs = inputs if sphere else inputs.without_k()
                spec.notes.clear()
                try:
                    fn = P.make_conv(prov, spec) if kind == "conv" else P.make_linear(prov, spec)
                    if sphere not in refs:
                        refs[sphere] = (conv_reference if kind == "conv" else linear_reference)(
                            inputs, spec, sphere)
                    t0 = time.perf_counter()
                    ok, errors = spot_check(fn, prov_inputs, refs[sphere], dtype)
                    first_call_s = round(time.perf_counter() - t0, 3)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001
                    for mode in cfg.modes:
                        record(prov, mode, status="error", error=_short_error(exc),
                               stage="spot check", notes=dict(spec.notes))
                    _free(device)
                    continue
                if not ok:
                    for mode in cfg.modes:
                        record(prov, mode, status="wrong", check=errors, notes=dict(spec.notes),
                               error="spot check vs float64 reference failed: not timed")
                    continue
                ready[prov] = (fn, prov_inputs, errors, dict(spec.notes), first_call_s)
            refs.clear()
            _free(device)
            timed = {}        # (provider, mode) -> its ok record
            for mode in cfg.modes:
                if not ready:
                    break
                if self.budget.exhausted():
                    for prov in ready:
                        record(prov, mode, status="skipped", reason="time budget spent")
                    continue
                self._time_mode(mode, ready, inputs.copies, record, timed)
            _derive_backward_device_time(timed)
        del inputs
        _free(device)

    def _time_mode(self, mode, ready, copies, record, timed) -> None:
        """Time ``mode`` for every ready provider (interleaved), then each one's peak memory and
        (CUDA, fwd and fwd+bwd) device time from a CUDA graph; ok records go into ``timed``."""
        device = self.device
        steps, keep, failed = {}, [], {}
        for prov, (fn, inputs, _, _, _) in ready.items():
            try:
                step, kept = make_steps(fn, inputs, mode)
                steps[prov] = step
                keep.append(kept)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001
                failed[prov] = _short_error(exc)
        try:
            stats = T.measure_group(steps, device, copies, target_s=self.cfg.measurement_target_s())
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a CUDA error poisoning the context
            stats = {prov: {"error": _short_error(exc)} for prov in steps}
        keep.clear()
        _free(device)
        for prov, (fn, inputs, errors, notes, first_call_s) in ready.items():
            common = dict(check=errors, notes=notes, first_call_s=first_call_s)
            if prov in failed:
                record(prov, mode, status="error", error=failed[prov], stage=mode, **common)
                continue
            res = stats.get(prov, {"error": "not measured"})
            if "error" in res:
                record(prov, mode, status="error", error=res["error"], stage=mode, **common)
                continue
            rec = record(prov, mode, status="ok", **common, **res)
            timed[(prov, mode)] = rec
            if (self.cfg.graphs and self.capture_allowed(prov) and device.type == "cuda"
                    and mode in GRAPH_MODES and not self.budget.exhausted()):
                try:
                    step, _ = make_steps(fn, inputs, mode)
                    _add_device_time(rec, T.measure_graph(step, device, copies, rec["median_ms"]))
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. a sync inside the call
                    rec["graph_error"] = _short_error(exc)
                    self.capture_failed(prov, mode, rec["graph_error"])
                _free(device)
            if mode == "fwd+bwd" and device.type == "cuda":
                try:
                    step, _ = make_steps(fn, inputs, mode)
                    rec["peak_mem_mb"] = T.peak_memory_mb(lambda: step(0), device)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001
                    rec["peak_mem_error"] = _short_error(exc)
                _free(device)

    # -- end to end and the CPU criterion --------------------------------------------------------
    def _run_e2e(self) -> None:
        from . import e2e
        if self.budget.exhausted():
            self.e2e.append({"status": "skipped", "reason": "time budget spent"})
            self.budget.skipped += 1
            return
        self.e2e.extend(e2e.run_e2e(self.device, batch=self.cfg.e2e_batch,
                                    statistic_key=self.statistic_key,
                                    widths=self.cfg.e2e_widths, units=self.cfg.e2e_units,
                                    target_s=self.cfg.measurement_target_s(), log=self.log,
                                    budget=self.budget, sphereops_backend=self.cfg.sphereops_backend,
                                    graphs=self.cfg.graphs and self.cfg.e2e_graphs and self.graphs_ok))

    def _run_criterion(self, allocator: str) -> None:
        from . import e2e
        self.criterion.extend(e2e.run_criterion(self.device, rounds=self.cfg.criterion_rounds,
                                                allocators=(allocator,),
                                                statistic=self.statistic_key.replace("_ms", ""),
                                                operators=self.cfg.criterion_operators,
                                                log=self.log, shape=self.cfg.criterion_shape))


# ---------------------------------------------------------------------------------------------
# Device time (CUDA graph replay)
# ---------------------------------------------------------------------------------------------

# Modes captured whole; the backward alone needs its forward built outside the timed region,
# so its device time is the difference of the two (same graph conditions, same input copies).
GRAPH_MODES = ("fwd", "fwd+bwd")


def _add_device_time(rec: dict, res: dict) -> None:
    rec.update(res)
    if rec.get("flops") and rec.get("graph_ms"):
        rec["graph_tflops"] = rec["flops"] / (rec["graph_ms"] * 1e-3) / 1e12
    if rec.get("floor_ms") and rec.get("graph_ms"):
        rec["graph_pct_floor"] = 100.0 * rec["floor_ms"] / rec["graph_ms"]


def _derive_backward_device_time(timed: dict) -> None:
    """``graph_ms`` of each provider's bwd record = its fwd+bwd minus its fwd device time."""
    for (prov, mode), rec in timed.items():
        if mode != "bwd":
            continue
        both = timed.get((prov, "fwd+bwd")), timed.get((prov, "fwd"))
        if all(r is not None and r.get("graph_ms") for r in both):
            diff = both[0]["graph_ms"] - both[1]["graph_ms"]
            if diff > 0:
                _add_device_time(rec, {"graph_ms": diff, "graph_basis": "fwd+bwd - fwd"})
            else:
                rec["graph_error"] = "fwd+bwd device time not above fwd (noise): no bwd estimate"


# ---------------------------------------------------------------------------------------------
# Ratios (also used by report.py on any results JSON)
# ---------------------------------------------------------------------------------------------

BASELINES = ("conv2d", "linear", "unfused_official", "unfused_best", "compiled_best", "sphereops")


def _time(rec: dict) -> float:
    return rec.get("time_ms", rec["median_ms"])


def _row_key(rec: dict) -> tuple:
    return (rec["kind"], rec["shape"], rec["dtype"], rec["layout"], rec["mode"])


def compute_ratios(records: Iterable[dict]) -> None:
    """Attach ``ratio_to[baseline] = time / baseline time`` (> 1: slower than the baseline) to
    every timed record, matching layer, dtype, layout, mode and operator (plain convs match any
    operator); ``graph_ratio_to`` likewise from the device times (``graph_ms``) where both
    sides have one."""
    records = list(records)
    for key_name, time_of in (("ratio_to", _time), ("graph_ratio_to", lambda r: r.get("graph_ms"))):
        index = {}
        for rec in records:
            if rec.get("status") == "ok" and time_of(rec):
                index[_row_key(rec) + (rec["operator"], rec["provider"])] = time_of(rec)
        for rec in records:
            if rec.get("status") != "ok" or not time_of(rec):
                continue
            ratios = {}
            for base in BASELINES:
                if base == rec["provider"]:
                    continue
                op = "-" if base in ("conv2d", "linear") else rec["operator"]
                t = index.get(_row_key(rec) + (op, base))
                if t:
                    ratios[base] = time_of(rec) / t
            rec[key_name] = ratios


# ---------------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------------

def output_stem(results: dict) -> str:
    meta = results.get("meta", {})
    try:
        stamp = _dt.datetime.fromisoformat(meta["date"]).strftime("%Y%m%d-%H%M")
    except (KeyError, ValueError):
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    commit = meta.get("commit", "unknown") + ("-dirty" if meta.get("dirty") else "")
    return f"{stamp}_{device_slug(meta)}_{commit}"


def _json_default(obj):
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return repr(obj)


def _sanitize(obj):
    """JSON has no inf/NaN: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def write_json(results: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(_sanitize(results), fh, indent=1, default=_json_default)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# One case prepared for an external timer (pytest-benchmark)
# ---------------------------------------------------------------------------------------------

class WrongResult(AssertionError):
    """A provider disagreed with the float64 reference: it must not be timed."""


@dataclass
class PreparedCase:
    fn: Callable
    inputs: Inputs
    spec: P.RowSpec
    check: dict
    device: torch.device

    def step(self, mode: str) -> Callable[[], object]:
        """A no-argument callable running one ``mode`` call on the next input copy and waiting
        for the device (so a wall-clock timer measures the work)."""
        inner, _ = make_steps(self.fn, self.inputs, mode)
        counter = {"i": 0}

        def call():
            i = counter["i"] % self.inputs.copies
            counter["i"] += 1
            out = inner(i)
            T.synchronize(self.device)
            return out

        def prepare():
            """Untimed set-up of the next call (the forward graph of a backward-only call)."""
            if hasattr(inner, "prepare"):
                inner.prepare(counter["i"] % self.inputs.copies)
                T.synchronize(self.device)
        call.prepare = prepare
        return call


def prepare_case(kind: str, shape, dtype: str, layout: str, operator: str, provider: str,
                 device: torch.device, sphereops_backend: Optional[str] = None) -> PreparedCase:
    """Inputs + provider function for one case, spot-checked against float64.

    Raises ``LookupError`` if the provider cannot run the case and :class:`WrongResult` if it
    computes something else than the reference."""
    dtype_t, tf32 = DTYPES[dtype]
    spec = P.RowSpec(shape=shape, dtype=dtype_t, device=device, operator=operator,
                     channels_last=(layout == "channels_last"), tf32=tf32,
                     sphereops_backend=sphereops_backend)
    why = P.conv_unsupported(provider, spec) if kind == "conv" else P.linear_unsupported(provider, spec)
    if why is not None:
        raise LookupError(why)
    if kind == "conv":
        inputs = build_conv_inputs(shape, dtype_t, spec.channels_last, operator, device)
        fn = P.make_conv(provider, spec)
        if not P.provider_computes_sphere(provider):
            inputs = inputs.without_k()
        ref = conv_reference(inputs, spec, P.provider_computes_sphere(provider))
    else:
        inputs = build_linear_inputs(shape, dtype_t, operator, device)
        fn = P.make_linear(provider, spec)
        ref = linear_reference(inputs, spec, P.provider_computes_sphere(provider))
    ok, errors = spot_check(fn, inputs, ref, dtype)
    if not ok:
        raise WrongResult(f"{provider} on {shape.name} {dtype} {layout} {operator}: relative "
                          f"errors vs float64 {errors} exceed {SPOT_RTOL[dtype]} (grads x{GRAD_FACTOR})")
    return PreparedCase(fn, inputs, spec, errors, device)
