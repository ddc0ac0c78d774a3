"""Profile a SphereResNet training step (or one named layer) under ``torch.profiler``.

    python -m sphereops.profile                      # SphereResNet-32 step (tiny on CPU)
    python -m sphereops.profile --layer srn32.s3     # one layer of the benchmark suite
    python -m sphereops.profile --out $OUT --precision bf16

Each run profiles two steps side by side: the SphereConv version and the same network (or layer)
with plain ``nn.Conv2d`` (cuDNN on a GPU), so the fused kernels appear next to cuDNN's. For each
it writes a Chrome trace (``<out>/trace_<label>.json``, open in chrome://tracing or Perfetto) and
prints a per-kernel table (on a GPU: device kernels; on CPU: operators by self time) with calls,
total and mean time, the share of the profiled steps, and achieved TFLOP/s where the FLOPs are
known. The markdown of both tables goes to ``<out>/profile.md``.

FLOPs follow DESIGN.md section 5: ``2*N*Ho*Wo*C_out*(C_in/G)*kh*kw`` per convolution GEMM, one
GEMM in forward, dgrad and wgrad each (no dgrad for a layer whose input needs no gradient). They
are recorded by forward hooks on every conv module and attributed to kernel families by name:
the fused Triton kernels (forward, dgrad, wgrad), cuDNN's fprop/dgrad/wgrad kernels and, on CPU,
a profiler range around each SphereConv2d forward and the autograd node of its backward
(inclusive time), and aten's convolution ops.
A family's TFLOP/s is printed on every row when the family has a single kernel; otherwise on the
family line of the summary. Epilogue work (norms, arccos, g) is not counted as FLOPs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
OPERATORS = ("linear", "cosine", "sigmoid", "learnable")


# ---------------------------------------------------------------------------------------------
# FLOP bookkeeping
# ---------------------------------------------------------------------------------------------
def conv_gemm_flops(x_shape, weight_shape, out_shape, groups) -> int:
    """``2 * N * Ho * Wo * C_out * (C_in/G) * kh * kw`` for one conv GEMM."""
    n, _, ho, wo = out_shape
    c_out, c_in_per_group, kh, kw = weight_shape
    return 2 * n * ho * wo * c_out * c_in_per_group * kh * kw


#: The fused kernels that do a convolution GEMM (``@triton.jit`` names, which is what the
#: profiler shows), by FLOP family. tests/test_profile.py checks they exist in sphereops_kernels.
SPHERE_GEMM_KERNELS = {
    "_sphere_conv_fwd_kernel": "sphere.fwd",
    "_sphere_conv_dw_fwd_kernel": "sphere.fwd",
    "_dgrad_kernel": "sphere.dgrad",
    "_wgrad_kernel": "sphere.wgrad",
}


#: The profiler range the FlopCounter opens around every SphereConv2d forward: eager calls go
#: through an autograd.Function straight to the implementation, with no operator event of their
#: own (only ``torch.compile`` goes through the registered ``sphereops::conv2d_fwd`` op).
SPHERE_FORWARD_RANGE = "sphereops.SphereConv2d.forward"


class FlopCounter:
    """Per-step convolution FLOPs by family, recorded by forward hooks on conv modules; also
    marks every SphereConv2d forward with a :data:`SPHERE_FORWARD_RANGE` profiler range."""

    def __init__(self):
        self.per_family: Dict[str, int] = defaultdict(int)
        self._handles = []

    def attach(self, model: nn.Module) -> "FlopCounter":
        from sphereops.nn import SphereConv2d

        for module in model.modules():
            if isinstance(module, SphereConv2d):
                self._handles.append(module.register_forward_pre_hook(self._open_range))
                self._handles.append(module.register_forward_hook(self._close_range))
                self._handles.append(module.register_forward_hook(self._hook("sphere")))
            elif isinstance(module, nn.Conv2d):
                self._handles.append(module.register_forward_hook(self._hook("conv")))
        return self

    @staticmethod
    def _open_range(module, inputs):
        module._sphereops_profile_range = torch.autograd.profiler.record_function(
            SPHERE_FORWARD_RANGE)
        module._sphereops_profile_range.__enter__()

    @staticmethod
    def _close_range(module, inputs, output):
        module._sphereops_profile_range.__exit__(None, None, None)
        del module._sphereops_profile_range

    def _hook(self, kind):
        def record(module, inputs, output):
            x = inputs[0]
            flops = conv_gemm_flops(x.shape, module.weight.shape, output.shape, module.groups)
            self.per_family[f"{kind}.fwd"] += flops
            if torch.is_grad_enabled() and module.weight.requires_grad:
                self.per_family[f"{kind}.wgrad"] += flops
            if torch.is_grad_enabled() and x.requires_grad:
                self.per_family[f"{kind}.dgrad"] += flops
        return record

    def reset(self):
        self.per_family.clear()

    def detach(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def kernel_family(name: str, on_gpu: bool) -> Optional[str]:
    """The FLOP family of a profiled kernel / operator name, or None when it does no conv GEMM.

    GPU: the fused Triton kernels by their @triton.jit names, cuDNN / CUTLASS kernels by the
    fprop/dgrad/wgrad words NVIDIA's kernel names carry. CPU: the SphereConv2d forward range,
    the autograd node of its backward (or the sphereops ops under torch.compile) and aten's
    convolution ops (the reference path of a SphereConv also calls aten convolutions, which is
    why CPU sphere rows use the inclusive time of the outermost sphere event instead).
    """
    lowered = name.lower()
    if on_gpu:
        if name in SPHERE_GEMM_KERNELS:
            return SPHERE_GEMM_KERNELS[name]
        if "dgrad" in lowered:
            return "conv.dgrad"
        if "wgrad" in lowered:
            return "conv.wgrad"
        if "fprop" in lowered or "implicit_convolve" in lowered or "conv2d_" in lowered:
            return "conv.fwd"
        return None
    if name in ("sphereops::conv2d_fwd", SPHERE_FORWARD_RANGE):
        return "sphere.fwd"
    if name == "sphereops::conv2d_bwd" or name.endswith("_Conv2dFunctionBackward"):
        return "sphere.bwd"
    if name in ("aten::convolution", "aten::mkldnn_convolution", "aten::_convolution"):
        return "conv.fwd"
    if name == "aten::convolution_backward":
        return "conv.bwd"
    return None


# ---------------------------------------------------------------------------------------------
# What is profiled
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Workload:
    label: str
    description: str
    model: nn.Module
    make_batch: Callable[[], tuple]
    loss_fn: Callable


def _build_resnet(args, operator, device):
    from sphereops.models import SphereResNet32

    widths = tuple(max(4, int(round(w * args.width_mult))) for w in (96, 192, 384))
    model = SphereResNet32(num_classes=10, operator=operator, widths=widths,
                           units_per_stage=args.units_per_stage, backend=args.backend)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    shape = (args.batch, 3, args.image_size, args.image_size)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def make_batch():
        x = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
        y = torch.randint(0, 10, (args.batch,), device=device)
        return x, y

    name = "plain" if operator is None else operator
    return Workload(
        label=f"sphereresnet32_{name}",
        description=(f"SphereResNet-32 ({'plain nn.Conv2d' if operator is None else operator}) "
                     f"widths {widths}, {args.units_per_stage} unit(s)/stage, batch {args.batch}, "
                     f"{args.image_size}x{args.image_size}"),
        model=model, make_batch=make_batch, loss_fn=nn.functional.cross_entropy)


def _load_layer_shape(name):
    try:
        from bench.shapes import BY_NAME
    except ImportError as err:  # bench/ is a folder of the repository, not an installed package
        raise ValueError(f"--layer needs the benchmark suite (bench.shapes); run from the "
                         f"repository root ({err})") from err
    if name not in BY_NAME:
        raise ValueError(f"--layer: unknown layer {name!r}; known: {', '.join(sorted(BY_NAME))}")
    return BY_NAME[name]


def _build_layer(args, operator, device):
    from sphereops.nn import SphereConv2d

    shape = _load_layer_shape(args.layer)
    if args.batch_given:
        shape = shape.with_batch(args.batch)
    common = dict(stride=shape.stride, padding=shape.padding, dilation=shape.dilation,
                  groups=shape.groups)
    if operator is None:
        layer = nn.Conv2d(shape.c_in, shape.c_out, (shape.kh, shape.kw), **common)
    elif operator == "learnable":
        layer = SphereConv2d(shape.c_in, shape.c_out, (shape.kh, shape.kw), operator="sigmoid",
                             learnable_k=True, backend=args.backend, **common)
    else:
        layer = SphereConv2d(shape.c_in, shape.c_out, (shape.kh, shape.kw), operator=operator,
                             backend=args.backend, **common)
    layer = layer.to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    layer = layer.to(memory_format=memory_format)

    def make_batch():
        x = torch.randn(shape.n, shape.c_in, shape.h, shape.w, device=device)
        x = x.contiguous(memory_format=memory_format).requires_grad_(True)
        return x, None

    def loss_fn(out, _target):
        return out.float().square().mean()

    name = "plain" if operator is None else operator
    return Workload(
        label=f"{shape.name}_{name}",
        description=(f"layer {shape.name} ({'plain nn.Conv2d' if operator is None else operator})"
                     f": x [{shape.n}, {shape.c_in}, {shape.h}, {shape.w}], "
                     f"{shape.kh}x{shape.kw}, stride {shape.stride}, padding {shape.padding}, "
                     f"dilation {shape.dilation}, groups {shape.groups}"),
        model=layer, make_batch=make_batch, loss_fn=loss_fn)


def _autocast(args, device):
    if args.precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return torch.autocast(device_type=device.type, enabled=False)


def _train_step(workload, optimizer, args, device):
    x, target = workload.make_batch()
    optimizer.zero_grad(set_to_none=True)
    with _autocast(args, device):
        out = workload.model(x)
        loss = workload.loss_fn(out, target)
    loss.backward()
    optimizer.step()
    return loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Profiling and the table
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    name: str
    calls: int
    total_us: float
    family: Optional[str]


@dataclasses.dataclass
class ProfileResult:
    workload: Workload
    rows: List[Row]
    step_us: float  # wall time of one step, averaged over the profiled steps
    steps: int
    flops: Dict[str, int]  # per step, by family
    family_us: Dict[str, float]  # total over the profiled steps, by family
    trace: Path
    # GPU: (calls, total us) of the SphereConv2d forward range on the device timeline -- first
    # kernel to last, idle gaps included; a range, not a kernel, so not among ``rows``
    forward_span: Optional[Tuple[int, float]] = None


def _device_time(evt):
    for attr in ("self_device_time_total", "self_cuda_time_total"):  # torch 2.11+ / older
        value = getattr(evt, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def _is_device_kernel(evt):
    device_type = getattr(evt, "device_type", None)
    return device_type is not None and device_type.name in ("CUDA", "PrivateUse1") \
        and _device_time(evt) > 0


def profile_workload(workload, args, device, out_dir: Path) -> ProfileResult:
    from torch.profiler import ProfilerActivity, profile

    model = workload.model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    counter = FlopCounter().attach(model)
    for _ in range(args.warmup):  # autotuning and first-call compiles happen here
        _train_step(workload, optimizer, args, device)
    _sync(device)
    counter.reset()

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, record_shapes=False) as prof:
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            _train_step(workload, optimizer, args, device)
        _sync(device)
        elapsed = time.perf_counter() - start
    counter.detach()
    flops = {family: total // args.steps for family, total in counter.per_family.items()}

    trace = out_dir / f"trace_{workload.label}.json"
    prof.export_chrome_trace(str(trace))

    rows, family_us, span = [], defaultdict(float), None
    for evt in prof.key_averages():
        if on_gpu:
            if not _is_device_kernel(evt):
                continue
            if evt.key == SPHERE_FORWARD_RANGE:
                span = (int(evt.count), _device_time(evt))
                continue
            total = _device_time(evt)
            family = kernel_family(evt.key, on_gpu=True)
        else:
            if getattr(evt, "device_type", None) is not None and evt.device_type.name != "CPU":
                continue
            family = kernel_family(evt.key, on_gpu=False)
            total = float(evt.self_cpu_time_total)
        if on_gpu and family is not None:
            family_us[family] += total
        rows.append(Row(evt.key, int(evt.count), total, family))
    rows.sort(key=lambda r: -r.total_us)
    if not on_gpu:
        family_us = _cpu_family_times(prof.events())
    return ProfileResult(workload, rows, elapsed * 1e6 / args.steps, args.steps, flops,
                         dict(family_us), trace, span)


def _cpu_family_times(events):
    """Inclusive CPU time of the outermost conv-family operators (a sphereops op's own time is
    only its Python glue; the aten convolutions inside the reference path are its work, not
    plain convolutions, so operators nested in another family's operator are skipped)."""
    times = defaultdict(float)
    for evt in events:
        family = kernel_family(evt.name, on_gpu=False)
        if family is None:
            continue
        parent, nested = evt.cpu_parent, False
        while parent is not None and not nested:
            nested = kernel_family(parent.name, on_gpu=False) is not None
            parent = parent.cpu_parent
        if not nested:
            times[family] += float(evt.cpu_time_total)
    return dict(times)


def _family_flops(result, family):
    """FLOPs per step of a family; CPU "bwd" families are dgrad + wgrad."""
    if family is None:
        return None
    if family.endswith(".bwd"):
        kind = family.split(".")[0]
        total = result.flops.get(f"{kind}.dgrad", 0) + result.flops.get(f"{kind}.wgrad", 0)
        return total or None
    return result.flops.get(family) or None


def _short(name, width=60):
    return name if len(name) <= width else name[:width - 3] + "..."


def format_result(result: ProfileResult, top: int, on_gpu: bool) -> str:
    step_total_us = result.step_us * result.steps
    family_names = defaultdict(set)
    for row in result.rows:
        if row.family is not None:
            family_names[row.family].add(row.name)
    what = "device kernels" if on_gpu else "CPU operators (self time)"
    lines = [f"### {result.workload.description}", "",
             f"{result.steps} profiled step(s), {result.step_us / 1e3:.3f} ms per step (wall); "
             f"{what}; trace `{result.trace.name}`", "",
             "| kernel | calls | total ms | mean us | % of step | TFLOP/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in result.rows[:top]:
        tflops = "-"
        flops = _family_flops(result, row.family)
        if flops and on_gpu and len(family_names[row.family]) == 1 and row.total_us > 0:
            tflops = f"{flops * result.steps / (row.total_us * 1e-6) / 1e12:.2f}"
        lines.append(f"| `{_short(row.name)}` | {row.calls} | {row.total_us / 1e3:.3f} | "
                     f"{row.total_us / max(row.calls, 1):.1f} | "
                     f"{100 * row.total_us / step_total_us:.1f} | {tflops} |")
    if len(result.rows) > top:
        rest = sum(r.total_us for r in result.rows[top:])
        lines.append(f"| ({len(result.rows) - top} more) | | {rest / 1e3:.3f} | | "
                     f"{100 * rest / step_total_us:.1f} | |")
    if on_gpu:
        busy = sum(r.total_us for r in result.rows)
        lines += ["", f"Kernels: {busy / result.steps / 1e3:.3f} ms per step of "
                      f"{result.step_us / 1e3:.3f} ms wall (the GPU busy "
                      f"{100 * busy / step_total_us:.0f}% of the step; the rest waits on the host)."]
        if result.forward_span is not None:
            calls, total = result.forward_span
            lines.append(f"SphereConv2d forward on the GPU timeline (first kernel to last, idle "
                         f"gaps included): {calls} calls, mean {total / max(calls, 1):.1f} us; "
                         "far above its kernels' time means the layer is host-bound.")
    inclusive = "" if on_gpu else " (inclusive CPU time of the outermost conv operators)"
    lines += ["", f"Convolution families{inclusive}:", "",
              "| conv family | GFLOP per step | total ms | % of step | TFLOP/s |",
              "| --- | ---: | ---: | ---: | ---: |"]
    # On CPU backward is one operator per conv (dgrad + wgrad together): list "bwd" only.
    with_flops = {f for f in result.flops if on_gpu or not f.endswith(("dgrad", "wgrad"))}
    families = sorted(set(result.family_us) | with_flops)
    for family in families:
        flops = _family_flops(result, family)
        spent = result.family_us.get(family, 0.0)
        rate = (f"{flops * result.steps / (spent * 1e-6) / 1e12:.3g}"
                if flops and spent > 0 else "-")
        lines.append(f"| {family} | {flops / 1e9 if flops else 0:.4g} | {spent / 1e3:.3f} | "
                     f"{100 * spent / step_total_us:.1f} | {rate} |")
    return "\n".join(lines) + "\n"


def _environment(device) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).resolve().parent,
                                timeout=10).stdout.strip() or "unknown"
    except Exception:  # informational only
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() \
        or platform.machine()
    return (f"device {device.type} ({name}), torch {torch.__version__}, triton {triton_version}, "
            f"commit {commit}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sphereops.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default=None,
                        help="profile one layer of the benchmark suite (bench/shapes.py name, "
                             "e.g. srn32.s3) instead of a SphereResNet-32 training step")
    parser.add_argument("--operator", default="cosine", choices=OPERATORS)
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"))
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="fp32 (tf32 off), tf32, bf16 / fp16 (autocast); default tf32 on "
                             "CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default 128 on CUDA, 2 on CPU; a --layer keeps its "
                             "suite batch unless given)")
    parser.add_argument("--image-size", type=int, default=None, help="default 32 (CUDA), 8 (CPU)")
    parser.add_argument("--width-mult", type=float, default=None,
                        help="SphereResNet-32 widths (96, 192, 384) times this; default 1 (CUDA), "
                             "1/16 (CPU)")
    parser.add_argument("--units-per-stage", type=int, default=None,
                        help="basic units per stage; default 5 (CUDA, the real SphereResNet-32), "
                             "1 (CPU)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 (CUDA), 1 (CPU)")
    parser.add_argument("--steps", type=int, default=None, help="default 5 (CUDA), 1 (CPU)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the plain nn.Conv2d (cuDNN) version")
    parser.add_argument("--top", type=int, default=25, help="rows of the per-kernel table")
    parser.add_argument("--out", type=Path, default=Path("traces"),
                        help="folder for the traces and profile.md (default traces/)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    gpu = device.type == "cuda"
    args.batch_given = args.batch is not None
    defaults = dict(precision="tf32" if gpu else "fp32", batch=128 if gpu else 2,
                    image_size=32 if gpu else 8, width_mult=1.0 if gpu else 1 / 16,
                    units_per_stage=5 if gpu else 1, warmup=3 if gpu else 1, steps=5 if gpu else 1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch", "image_size", "units_per_stage", "steps", "top"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not args.width_mult > 0:
        parser.error(f"--width-mult must be > 0, got {args.width_mult}")
    if args.precision == "fp16" and not gpu:
        parser.error("--precision fp16 needs CUDA (CPU autocast supports bf16)")
    return args, device


def main(argv=None) -> int:
    args, device = parse_args(argv)
    if device.type == "cuda":
        tf32 = args.precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
    try:
        build = _build_layer if args.layer else _build_resnet
        operators = [args.operator] + ([] if args.no_baseline else [None])
        workloads = [build(args, op, device) for op in operators]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))

    header = (f"## sphereops profile: {'layer ' + args.layer if args.layer else 'training step'}"
              f"\n\n{_environment(device)}; precision {args.precision}, backend {args.backend}"
              f"{', channels_last' if args.channels_last else ''}\n")
    sections = [header]
    print(header)
    results = []
    for workload in workloads:
        result = profile_workload(workload, args, device, args.out)
        results.append(result)
        text = format_result(result, args.top, device.type == "cuda")
        sections.append(text)
        print(text, flush=True)
    if len(results) == 2 and results[1].step_us > 0:
        summary = (f"Step time SphereConv / plain conv: {results[0].step_us / 1e3:.3f} ms / "
                   f"{results[1].step_us / 1e3:.3f} ms = "
                   f"{results[0].step_us / results[1].step_us:.2f}x\n")
        sections.append(summary)
        print(summary)
    report = args.out / "profile.md"
    report.write_text("\n".join(sections))
    print(f"traces: {', '.join(str(r.trace) for r in results)}; table: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
