"""End-to-end rows: a SphereResNet-32 training step, and issue 2's CPU criterion layer.

Training step (issue 5): batch 128, bf16 autocast, channels_last on CUDA -- fused (sphereops
kernels) vs unfused (reference backend) vs the plain ResNet-32 with cuDNN convs, time and peak
memory.  The model is ``sphereops.models.SphereResNet32`` (``operator=None`` is the plain
baseline built from the same code); if the models package is missing, a residual stack of the
same layout defined here stands in.  On CPU a narrow, small-batch version in fp32 is timed
(the Triton interpreter is far too slow for a training step).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import timing as T


def _noop(msg: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

class _FallbackUnit(nn.Module):
    def __init__(self, conv: Callable, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = conv(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv(c_out, c_out, 1)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.proj = None
        if stride != 1 or c_in != c_out:
            self.proj = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.proj is None else self.proj(x)))


class FallbackResNet(nn.Module):
    """SphereResNet-32's layout (root conv, 3 stages of ``units`` basic units, stride 2 at the
    start of stages 2 and 3, 1x1 plain projections), used only if sphereops.models is absent."""

    def __init__(self, operator: Optional[str], widths=(96, 192, 384), units: int = 5,
                 num_classes: int = 10, backend: str = "auto"):
        super().__init__()
        import sphereops.nn as snn

        def conv(c_in, c_out, stride):
            if operator is None:
                return nn.Conv2d(c_in, c_out, 3, stride, 1)
            sig = operator in ("sigmoid", "learnable")
            return snn.SphereConv2d(c_in, c_out, 3, stride, 1,
                                    operator="sigmoid" if sig else operator,
                                    learnable_k=(operator == "learnable"), backend=backend)
        self.root = nn.Sequential(conv(3, widths[0], 1), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c = [], widths[0]
        for stage, width in enumerate(widths):
            for unit in range(units):
                layers.append(_FallbackUnit(conv, c, width, 2 if (stage > 0 and unit == 0) else 1))
                c = width
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stages(self.root(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(operator: Optional[str], backend: str, widths, units: int):
    """``sphereops.models.SphereResNet32`` if it exists, else :class:`FallbackResNet`."""
    try:
        from sphereops.models import SphereResNet32
    except Exception:  # noqa: BLE001 - the models package is optional for the benchmark
        return FallbackResNet(operator, widths, units, backend=backend), "bench.e2e.FallbackResNet"
    model = SphereResNet32(num_classes=10, operator=operator, widths=tuple(widths),
                           units_per_stage=units, backend=backend)
    return model, "sphereops.models.SphereResNet32"


def _sphere_output_dtypes(model: nn.Module, x: torch.Tensor, autocast_dtype) -> list:
    """The dtypes the SphereConv layers produce under the step's autocast (a fairness check:
    a Sphere layer that silently runs in fp32 under bf16 autocast pays twice the bytes)."""
    seen = []
    hooks = []
    for mod in model.modules():
        if type(mod).__name__.startswith("SphereConv"):
            hooks.append(mod.register_forward_hook(lambda m, i, o: seen.append(str(o.dtype))))
            break
    try:
        with torch.no_grad(), _autocast(x.device, autocast_dtype):
            model(x[:2])
    finally:
        for h in hooks:
            h.remove()
    return seen


def _autocast(device: torch.device, dtype, cache_enabled: bool = True):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def run_e2e(device: torch.device, *, batch: Optional[int] = None, widths=None,
            units: Optional[int] = None, target_s: float = 0.2, log=_noop, budget=None,
            sphereops_backend: Optional[str] = None, statistic_key: str = "median_ms",
            graphs: bool = True) -> list:
    """Time one optimizer step (forward, loss, backward, SGD) for each variant; one dict each.

    On CUDA with ``graphs``, also the step's device time: whole steps captured in a CUDA graph
    and replayed (``graph_ms``), the GPU's share of the step without the host's."""
    cuda = device.type == "cuda"
    batch = batch or (128 if cuda else 8)
    widths = tuple(widths or ((96, 192, 384) if cuda else (16, 32, 64)))
    units = units or (5 if cuda else 2)
    amp_dtype = torch.bfloat16 if cuda else None
    fmt = torch.channels_last if cuda else torch.contiguous_format
    fused_backend = sphereops_backend or ("triton" if cuda else "auto")
    # sphereops_save_output: the same model with enable_save_output (a BatchNorm follows every
    # SphereConv, so the layers keep no activation of their own)
    variants = [("plain", None, "auto"), ("sphereops", "linear", fused_backend),
                ("sphereops_save_output", "linear", fused_backend)]
    if cuda or (sphereops_backend not in (None, "auto", "reference")):
        variants.append(("unfused_best", "linear", "reference"))
    rows = []
    for name, operator, backend in variants:
        row = {"variant": name, "operator": operator or "-", "backend": backend, "batch": batch,
               "widths": list(widths), "units_per_stage": units,
               "precision": "bf16 autocast" if amp_dtype else "fp32",
               "layout": "channels_last" if cuda else "nchw", "status": "pending"}
        if budget is not None and budget.exhausted():
            row.update(status="skipped", reason="time budget spent")
            budget.skipped += 1
            rows.append(row)
            continue
        try:
            torch.manual_seed(0)
            model, source = build_model(operator, backend, widths, units)
            if name == "sphereops_save_output":
                from sphereops.nn import enable_save_output
                row["save_output_layers"] = len(enable_save_output(model))
            model = model.to(device).to(memory_format=fmt)
            row["model"] = source
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            copies = 2 if cuda else 1
            # CPU RNG: after a failed CUDA-graph capture the CUDA generator is unusable
            xs = [torch.randn(batch, 3, 32, 32).to(device).contiguous(memory_format=fmt)
                  for _ in range(copies)]
            ys = [torch.randint(0, 10, (batch,)).to(device) for _ in range(copies)]
            if operator is not None:
                row["sphere_layer_dtype"] = _sphere_output_dtypes(model, xs[0], amp_dtype)

            def step(i, cache_enabled=True):
                opt.zero_grad(set_to_none=True)
                with _autocast(device, amp_dtype, cache_enabled):
                    loss = F.cross_entropy(model(xs[i]), ys[i])
                loss.backward()
                opt.step()
                return loss

            loss0 = float(step(0).detach())
            if not math.isfinite(loss0):
                raise FloatingPointError(f"non-finite loss {loss0}")
            res = T.measure(step, device, copies, warmup=2, min_reps=3, max_reps=30,
                            target_s=max(target_s, 0.3))
            row.update(status="ok", **res, loss=loss0)
            row["time_ms"] = row[statistic_key]
            row["peak_mem_mb"] = T.peak_memory_mb(lambda: step(0), device)
            row["saved_mb"] = saved_for_backward_mb(model, xs[0], ys[0], device, amp_dtype)
            if cuda:
                row["peak_mem_total_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            if cuda and graphs and not (budget is not None and budget.exhausted()):
                try:
                    # autocast's cast cache off inside a graph, as torch's graph docs ask
                    row.update(T.measure_graph(lambda i: step(i, cache_enabled=False), device,
                                               copies, row["median_ms"], replay_ms=20.0))
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001 - the eager row stands on its own
                    row["graph_error"] = (f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                                          if str(exc) else type(exc).__name__)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001
            row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                       if str(exc) else type(exc).__name__)
        finally:
            model = opt = None
            if cuda:
                torch.cuda.empty_cache()
        log(f"e2e    {name:14s} {row['status']:7s} "
            + (f"{row['time_ms']:.2f} ms/step" if row["status"] == "ok" else row.get("error", ""))
            + (f", device {row['graph_ms']:.2f} ms/step" if row.get("graph_ms") else ""))
        rows.append(row)
    plain = next((r for r in rows if r["variant"] == "plain" and r["status"] == "ok"), None)
    for r in rows:
        if plain is not None and r["status"] == "ok" and r is not plain:
            r["time_ratio_to_plain"] = r["time_ms"] / plain["time_ms"]
            if r.get("peak_mem_mb") and plain.get("peak_mem_mb"):
                r["mem_ratio_to_plain"] = r["peak_mem_mb"] / plain["peak_mem_mb"]
            if r.get("saved_mb") and plain.get("saved_mb"):
                r["saved_ratio_to_plain"] = r["saved_mb"] / plain["saved_mb"]
            if r.get("graph_ms") and plain.get("graph_ms"):
                r["graph_time_ratio_to_plain"] = r["graph_ms"] / plain["graph_ms"]
    return rows


# ---------------------------------------------------------------------------------------------
# Issue 2's criterion: reference SphereConv2d fwd+bwd vs nn.Conv2d fwd+bwd on CPU
# ---------------------------------------------------------------------------------------------

def saved_for_backward_mb(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          device: torch.device, amp_dtype) -> float:
    """MiB that autograd holds for the backward after one forward + loss: every distinct
    storage a node saved, the parameters excluded (the activation memory of the step, the same
    on any device, counted once however many nodes share a tensor)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(device, amp_dtype):
        loss = F.cross_entropy(model(x), y)
    del loss
    return sum(saved.values()) / 2 ** 20


def _minor_faults() -> Optional[int]:
    """This process's minor page faults so far (None where getrusage does not exist)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def steady_glibc_allocator() -> bool:
    """Make glibc keep freed memory instead of unmapping and re-faulting it (harness-only).

    By default glibc serves blocks above a dynamic threshold with fresh mmap()s and trims the
    heap top when more than twice that is free, so a training step's large temporaries are
    page-faulted again on every step (~2 us per 4 KiB page measured on the 2-core CI VM: as
    much as the arithmetic of an elementwise pass). PyTorch's CPU performance guide recommends
    jemalloc/tcmalloc for the same reason. This sets the equivalent glibc knobs with mallopt --
    M_MMAP_THRESHOLD at its 32 MiB maximum, no trimming, 256 MiB top pad -- for the benchmark
    process only (the library never touches the allocator). Returns False where it cannot
    (not glibc)."""
    import ctypes
    import ctypes.util
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = mallopt(m_mmap_threshold, 32 << 20) == 1
    ok &= mallopt(m_trim_threshold, (1 << 31) - 1) == 1
    ok &= mallopt(m_top_pad, 256 << 20) == 1
    return bool(ok)


def run_criterion(device: torch.device, *, rounds: int = 11, operators=("cosine",), log=_noop,
                  shape=None, statistic: str = "median",
                  allocators: Sequence[str] = ("default", "steady")) -> list:
    """Interleaved timing (A, B, A, B, ...) so that load from other processes hits both sides
    alike; the ratio is stat(SphereConv2d) / stat(nn.Conv2d) with ``statistic`` "median" or
    "min" (both ratios are recorded), with the minor page faults per call of each side.

    ``allocators``: "default" measures under the allocator as the process found it (what a
    user gets; with glibc its page faulting depends on the process's allocation history, so it
    varies between runs), then "steady" under :func:`steady_glibc_allocator` (the arithmetic
    alone: no page faults on either side). The order matters: once set, the knobs stay."""
    from . import shapes as S
    import sphereops.nn as snn

    shape = shape or S.CRITERION
    rows = []
    x = torch.randn(shape.n, shape.c_in, shape.h, shape.w, device=device, requires_grad=True)
    plain = nn.Conv2d(shape.c_in, shape.c_out, (shape.kh, shape.kw), shape.stride,
                      shape.padding).to(device)
    ho, wo = shape.out_hw
    dy = torch.randn(shape.n, shape.c_out, ho, wo, device=device)

    def fwd_bwd(mod):
        params = [p for p in mod.parameters() if p.requires_grad]
        return lambda: torch.autograd.grad(mod(x), [x] + params, dy)

    for allocator in allocators:
        if allocator == "steady" and (device.type != "cpu" or not steady_glibc_allocator()):
            log("criterion: steady allocator not available here (not glibc on CPU); skipped")
            continue
        for op in operators:
            row = {"operator": op, "allocator": allocator, "shape": shape.as_dict(),
                   "device": str(device), "rounds": rounds,
                   "target": S.CRITERION_TARGET, "long_run_target": S.CRITERION_LONG_RUN}
            try:
                row.update(_time_criterion_pair(snn, shape, op, plain, fwd_bwd, rounds,
                                                statistic, device))
                row.update(passes=row["ratio"] <= S.CRITERION_TARGET,
                           passes_long_run=row["ratio"] <= S.CRITERION_LONG_RUN)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001
                row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:300])
            log(f"criterion {op:9s} {allocator:7s} allocator: "
                + (f"SphereConv2d {row['sphere_ms']:.1f} ms vs nn.Conv2d {row['conv_ms']:.1f} ms: "
                   f"{row['ratio']:.2f}x" if row["status"] == "ok" else row["error"]))
            rows.append(row)
    return rows


def _time_criterion_pair(snn, shape, op: str, plain: nn.Module, fwd_bwd, rounds: int,
                         statistic: str, device: torch.device) -> dict:
    sig = op in ("sigmoid", "learnable")
    sphere = snn.SphereConv2d(shape.c_in, shape.c_out, (shape.kh, shape.kw), shape.stride,
                              shape.padding, operator="sigmoid" if sig else op,
                              learnable_k=(op == "learnable"), backend="reference").to(device)
    with torch.no_grad():
        sphere.weight.copy_(plain.weight)
    fa, fb = fwd_bwd(sphere), fwd_bwd(plain)
    fa(), fb()                      # warm-up (allocator, first-call dispatch)
    ta, tb, pa, pb = [], [], [], []
    for _ in range(rounds):
        for f, acc, faults in ((fa, ta, pa), (fb, tb, pb)):
            T.synchronize(device)
            f0 = _minor_faults()
            t0 = time.perf_counter()
            f()
            T.synchronize(device)
            acc.append((time.perf_counter() - t0) * 1e3)
            if f0 is not None:
                faults.append(_minor_faults() - f0)
    pick = min if statistic == "min" else statistics.median
    ma, mb = pick(ta), pick(tb)
    return dict(status="ok", sphere_ms=ma, conv_ms=mb, ratio=ma / mb, statistic=statistic,
                ratio_median=statistics.median(ta) / statistics.median(tb),
                ratio_min=min(ta) / min(tb), sphere_times_ms=ta, conv_times_ms=tb,
                sphere_faults=statistics.median(pa) if pa else None,
                conv_faults=statistics.median(pb) if pb else None)
