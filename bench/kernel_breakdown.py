"""Where each layer's device time goes, kernel by kernel: ``python -m bench.kernel_breakdown``.

The benchmark times whole calls (fused SphereConv vs cuDNN ``F.conv2d``), so a GPU session
learns the ratio but not which of the fused path's launches (forward: operand preparation and
the GEMM; backward: filter norms, prep pass, partial reductions, dgrad, wgrad, finalize; the
depthwise path has its own kernels) eats the gap. This answers it in one short run: for each
layer it profiles ``sphereops.sphere_conv2d(..., backend="triton")`` and plain ``F.conv2d``
under ``torch.profiler`` (CUDA activity) and sums the device time of every kernel by name.

    python -m bench.kernel_breakdown [--layers sn9.conv1_x,r18.l3] [--dtype bf16]
                                     [--operator linear] [--layout channels_last]
                                     [--iters 20] [--warmup 3] [--budget 120] [--out br.md]

Method, per layer and provider (inputs from ``bench.runner.build_conv_inputs``, the
benchmark's own copies cycled through L2, so the kernels see what the benchmark times):

* warm-up: ``--warmup`` forward+backward calls (Triton compiles and autotunes here);
* ``fwd`` pass: ``--iters`` forward calls alone, inputs requiring grad (the training forward),
  inside one profiler session;
* ``bwd`` pass: ``--iters`` forward graphs built *before* a second session starts, then only
  their backwards (``torch.autograd.grad``, as the benchmark's ``bwd`` mode: no ``.grad``
  accumulation kernels) inside it. Two sessions instead of ranges because autograd runs the
  backward on its own thread, outside any range the caller opens.

Every device event of a session (kernels, memcpy, memset) belongs to that provider and pass;
per call = session total / ``--iters``. Triton kernels keep their ``@triton.jit`` names
(``_sphere_conv_fwd_kernel``, ``_dgrad_kernel``, ...); cuDNN/cutlass/aten names are shortened
(``void`` and argument lists dropped, namespaces cut, 60 characters). The Markdown report
(stdout, and ``--out``, rewritten after every layer so a killed run keeps what it measured)
has a summary across layers and one table per layer. ``--budget`` seconds (0: none) stop new
layers from starting; the report names the layers it did not reach. Without a GPU
(``--device cpu``, or auto on a machine without CUDA) it says that device-time profiling
needs one and exits 0. No correctness check here: the benchmark spot-checks every provider.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import providers as P  # noqa: E402
from bench import runner as RN  # noqa: E402
from bench import shapes as S  # noqa: E402
from bench import timing as T  # noqa: E402

# provider key (bench.providers) -> its name in the tables
PROVIDERS = {"sphereops": "sphereops", "conv2d": "cuDNN"}
PASSES = ("fwd", "bwd")
DTYPE_NAMES = ("bf16", "fp16", "tf32", "fp32")
NAME_WIDTH = 60
DEFAULT_BUDGET_S = 120.0
NO_GPU_MESSAGE = ("bench.kernel_breakdown: device-time profiling needs a CUDA GPU (kernel times "
                  "come from the CUDA profiler activity); nothing measured on {device}.")

# Device events that are not kernels of their own: the profiler mirrors every record_function
# range onto the GPU timeline (sphereops.profile's H200 table listed its
# "sphereops.SphereConv2d.forward" range among the kernels); counting one would count the
# kernels inside it twice.
_DEVICE_TYPES = ("CUDA", "PrivateUse1")


# ---------------------------------------------------------------------------------------------
# Aggregation (pure: profiler-like events in, per-kernel statistics out)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelStat:
    """One kernel name's device time within one provider's pass, per profiled call."""

    name: str            # the full name the profiler reports
    provider: str        # key of PROVIDERS
    pass_name: str       # "fwd" or "bwd"
    launches: float      # per call
    device_us: float     # per call


def _device_type_name(evt) -> str:
    kind = getattr(evt, "device_type", None)
    return getattr(kind, "name", str(kind)) if kind is not None else "CPU"


def event_device_us(evt) -> float:
    """Device duration of one device event in us: ``device_time_total`` (torch >= 2.4), the
    deprecated ``cuda_time_total`` before it, else the event's own time range (what the
    profiler itself books as a kernel's duration; also covers an event marked async, whose
    ``device_time_total`` reads 0)."""
    if hasattr(evt, "device_time_total"):
        value = evt.device_time_total
    else:  # a torch before the rename (reading the old name on a newer one warns)
        value = getattr(evt, "cuda_time_total", None)
    if value:
        return float(value)
    span = getattr(evt, "time_range", None)
    if span is not None:
        return float(span.end - span.start)
    return 0.0


def annotation_names(events: Iterable) -> set:
    """Names of the CPU-side user ranges (record_function) of a session: their GPU mirrors
    carry the same name and are not kernels."""
    return {evt.name for evt in events
            if _device_type_name(evt) == "CPU" and getattr(evt, "is_user_annotation", False)}


def device_kernel_events(events: Iterable) -> list:
    """The events that are device work: device type CUDA (or a PrivateUse1 backend), not a
    user annotation nor the GPU mirror of one."""
    events = list(events)
    ranges = annotation_names(events)
    return [evt for evt in events
            if _device_type_name(evt) in _DEVICE_TYPES
            and not getattr(evt, "is_user_annotation", False)
            and evt.name not in ranges]


def aggregate_kernels(events: Iterable, provider: str, pass_name: str, calls: int) -> list:
    """Device events of one profiled session -> one :class:`KernelStat` per kernel name (per
    call: totals divided by ``calls``), largest device time first. An event's ``count``
    (``key_averages()`` rows carry one) counts as that many launches; raw events count 1."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    launches, device_us = defaultdict(int), defaultdict(float)
    for evt in device_kernel_events(events):
        launches[evt.name] += int(getattr(evt, "count", 1) or 1)
        device_us[evt.name] += event_device_us(evt)
    stats = [KernelStat(name, provider, pass_name, launches[name] / calls, device_us[name] / calls)
             for name in launches]
    return sorted(stats, key=lambda s: (-s.device_us, s.name))


def pass_totals(stats: Iterable[KernelStat]) -> dict:
    """``{(provider, pass): (launches per call, device us per call)}`` summed over kernels."""
    totals = defaultdict(lambda: [0.0, 0.0])
    for s in stats:
        entry = totals[(s.provider, s.pass_name)]
        entry[0] += s.launches
        entry[1] += s.device_us
    return {key: (launches, us) for key, (launches, us) in totals.items()}


def largest_kernel(stats: Iterable[KernelStat], provider: str, pass_name: str) -> Optional[KernelStat]:
    candidates = [s for s in stats if s.provider == provider and s.pass_name == pass_name]
    return max(candidates, key=lambda s: s.device_us) if candidates else None


# ---------------------------------------------------------------------------------------------
# Kernel names
# ---------------------------------------------------------------------------------------------

# "at::native::", "(anonymous namespace)::", "cudnn::engines_precompiled::" ...
_NAMESPACE = re.compile(r"(?:\(anonymous namespace\)|\b[A-Za-z_]\w*)::")


def _drop_argument_list(name: str) -> str:
    """``f<T>(int, float)`` -> ``f<T>``: the trailing balanced ``(...)`` of a C++ signature.
    A parenthesis after a space is part of a name (``Memset (Device)``) and stays."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            head = name[:i]
            if not head or head[-1].isspace() or head.endswith("::"):
                return name
            return head
    return name


def shorten_kernel_name(name: str, width: int = NAME_WIDTH) -> str:
    """A readable kernel name: ``void``, the argument list and namespace qualifiers dropped,
    whitespace collapsed, cut to ``width`` characters (``...`` marks a cut). Triton kernels'
    ``@triton.jit`` names come through unchanged."""
    short = name.strip()
    if short.startswith("void "):
        short = short[len("void "):]
    short = _drop_argument_list(short)
    short = _NAMESPACE.sub("", short)
    short = re.sub(r"\s+", " ", short).strip() or name.strip()
    if len(short) > width:
        short = short[:width - 3] + "..."
    return short


def short_names(names: Iterable[str], width: int = NAME_WIDTH) -> dict:
    """``{full name: short name}``, distinct: two kernels that shorten alike (cuDNN names that
    differ only past the cut) get ``#2``, ``#3``, ... in the order given."""
    result, taken = {}, defaultdict(int)
    for name in names:
        if name in result:
            continue
        short = shorten_kernel_name(name, width)
        taken[short] += 1
        result[name] = short if taken[short] == 1 else f"{short} #{taken[short]}"
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

@dataclass
class LayerResult:
    name: str
    label: str
    stats: list = field(default_factory=list)     # [KernelStat]
    errors: list = field(default_factory=list)    # ["provider pass: what went wrong"]
    seconds: float = 0.0                          # wall time spent on the layer


def _fmt_launches(value: float) -> str:
    return str(int(round(value))) if abs(value - round(value)) < 1e-9 else f"{value:.2f}"


def _fmt_us(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def _share(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole > 0 else "-"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def format_layer_table(result: LayerResult) -> list:
    """Markdown lines of one layer: its kernels grouped by provider and pass, largest first,
    each group closed by its total (the share column of a group adds up to 100%)."""
    lines = [f"## {result.name}: {result.label}", ""]
    if result.stats:
        lines += ["| kernel | provider | pass | launches/call | device us/call | share of the provider's pass |",
                  "| --- | --- | --- | ---: | ---: | ---: |"]
        names = short_names(s.name for s in result.stats)
        totals = pass_totals(result.stats)
        for provider in PROVIDERS:
            for pass_name in PASSES:
                group = [s for s in result.stats if s.provider == provider and s.pass_name == pass_name]
                if not group:
                    continue
                launches, total_us = totals[(provider, pass_name)]
                label = PROVIDERS[provider]
                for s in sorted(group, key=lambda s: (-s.device_us, s.name)):
                    lines.append(f"| `{_cell(names[s.name])}` | {label} | {pass_name} | "
                                 f"{_fmt_launches(s.launches)} | {_fmt_us(s.device_us)} | "
                                 f"{_share(s.device_us, total_us)} |")
                lines.append(f"| **{label} {pass_name} total** | {label} | {pass_name} | "
                             f"{_fmt_launches(launches)} | {_fmt_us(total_us)} | "
                             f"{'100.0%' if total_us > 0 else '-'} |")
    else:
        lines.append("no device kernels recorded")
    lines += [f"- error: {_cell(err)}" for err in result.errors]
    return lines + [""]


def _largest_cell(stats, pass_name: str) -> str:
    top = largest_kernel(stats, "sphereops", pass_name)
    if top is None:
        return "-"
    total = pass_totals(stats)[("sphereops", pass_name)][1]
    return (f"`{_cell(shorten_kernel_name(top.name))}` {_fmt_us(top.device_us)} us "
            f"({_share(top.device_us, total)})")


def _ratio(num: Optional[float], den: Optional[float]) -> str:
    return f"{num / den:.2f}x" if num is not None and den else "-"


def format_summary(results: list, skipped: list, skipped_reason: str = "budget") -> list:
    """The table across layers: device us per call of each provider and pass, sphereops /
    cuDNN, and the largest sphereops kernel of each pass; then the layers not reached."""
    lines = ["## Summary", "",
             "| layer | sphereops fwd us | cuDNN fwd us | fwd ratio | sphereops bwd us | "
             "cuDNN bwd us | bwd ratio | largest sphereops fwd kernel | largest sphereops bwd kernel |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for result in results:
        totals = pass_totals(result.stats)
        us = {key: value[1] for key, value in totals.items()}
        sf, cf = us.get(("sphereops", "fwd")), us.get(("conv2d", "fwd"))
        sb, cb = us.get(("sphereops", "bwd")), us.get(("conv2d", "bwd"))
        note = " (errors)" if result.errors else ""
        lines.append(f"| {result.name}{note} | {_fmt_us(sf)} | {_fmt_us(cf)} | {_ratio(sf, cf)} | "
                     f"{_fmt_us(sb)} | {_fmt_us(cb)} | {_ratio(sb, cb)} | "
                     f"{_largest_cell(result.stats, 'fwd')} | {_largest_cell(result.stats, 'bwd')} |")
    for name in skipped:
        lines.append(f"| {name} (skipped: {skipped_reason}) | - | - | - | - | - | - | - | - |")
    return lines + [""]


def format_report(header: list, results: list, skipped: list, stop_note: Optional[str] = None,
                  skipped_reason: str = "budget") -> str:
    """The whole Markdown report: header lines, summary, the stop note (budget spent,
    interrupted, or a partial report), then one table per layer."""
    lines = list(header) + format_summary(results, skipped, skipped_reason)
    if stop_note:
        lines += [stop_note, ""]
    for result in results:
        lines += format_layer_table(result)
    return "\n".join(lines).rstrip() + "\n"


def budget_note(budget_s: Optional[float], done: int, skipped: list) -> Optional[str]:
    if not skipped or budget_s is None:
        return None
    return (f"Budget of {budget_s:g} s spent after {done} layer(s): not started: "
            f"{', '.join(skipped)} (rerun with --layers {','.join(skipped)}).")


# ---------------------------------------------------------------------------------------------
# The loop over layers (budget, interruption)
# ---------------------------------------------------------------------------------------------

def run_layers(shapes: list, budget: RN.Budget, profile_layer: Callable[[S.ConvShape], LayerResult],
               on_layer: Optional[Callable[[list, list], None]] = None) -> tuple:
    """Profile ``shapes`` in order until ``budget`` is spent: a layer starts only while budget
    is left (one already running finishes). Returns ``(results, skipped names, interrupted)``;
    a KeyboardInterrupt (``timeout -s INT``) stops the loop and keeps what was measured.
    ``on_layer(results, skipped)`` runs after each layer (the report is rewritten there)."""
    results, skipped, interrupted = [], [], False
    for i, shape in enumerate(shapes):
        if budget.exhausted():
            skipped = [s.name for s in shapes[i:]]
            break
        try:
            results.append(profile_layer(shape))
        except KeyboardInterrupt:
            interrupted = True
            skipped = [s.name for s in shapes[i:]]
            break
        if on_layer is not None:
            on_layer(results, skipped)
    return results, skipped, interrupted


# ---------------------------------------------------------------------------------------------
# Profiling (CUDA)
# ---------------------------------------------------------------------------------------------

def cuda_session():
    """A torch.profiler session recording CPU and CUDA activity. CPU too: a kernel's CPU-side
    launch is what the profiler correlates it with, and the CPU ranges are how
    :func:`device_kernel_events` recognises their GPU mirrors (``sphereops.profile``, which
    also records both, listed such a mirror among its kernels on the H200, torch 2.11)."""
    from torch.profiler import ProfilerActivity, profile
    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False)


def profile_passes(call: Callable, inputs: RN.Inputs, iters: int, warmup: int,
                   open_session: Callable = cuda_session,
                   sync: Callable[[], None] = lambda: None) -> dict:
    """``{"fwd": events, "bwd": events}`` of ``call(x, w, bias, k)`` on ``inputs`` (copies
    cycled): warm-up fwd+bwd calls, then a session of forwards alone and a session of
    backwards alone, their forward graphs built before that session opened."""
    copies = inputs.copies
    for i in range(warmup):
        j = i % copies
        torch.autograd.grad(call(*inputs.sets[j]), inputs.diff[j], inputs.dys[j])
    sync()

    with open_session() as fwd_session:
        for i in range(iters):
            call(*inputs.sets[i % copies])          # the graph is dropped at once: no kernels
        sync()

    graphs = [call(*inputs.sets[i % copies]) for i in range(iters)]
    sync()
    with open_session() as bwd_session:
        for i in range(iters):
            j = i % copies
            y, graphs[i] = graphs[i], None              # freed after its backward
            torch.autograd.grad(y, inputs.diff[j], inputs.dys[j])
            del y
        sync()
    return {"fwd": list(fwd_session.events()), "bwd": list(bwd_session.events())}


def profile_layer(shape: S.ConvShape, dtype_name: str, operator: str, channels_last: bool,
                  iters: int, warmup: int, device: torch.device,
                  open_session: Callable = cuda_session) -> LayerResult:
    """Both providers on ``shape`` (each in its own try: a failing provider is an error line,
    the other is still measured)."""
    start = time.perf_counter()
    dtype, tf32 = RN.DTYPES[dtype_name]
    result = LayerResult(shape.name, shape.label())
    spec = P.RowSpec(shape=shape, dtype=dtype, device=device, operator=operator,
                     channels_last=channels_last, tf32=tf32,
                     sphereops_backend="triton")
    inputs = RN.build_conv_inputs(shape, dtype, channels_last, operator, device)
    sync = (lambda: T.synchronize(device))
    for provider in PROVIDERS:
        # a plain conv has no k: autograd must not be asked for its gradient
        provider_inputs = inputs if P.provider_computes_sphere(provider) else inputs.without_k()
        try:
            call = P.make_conv(provider, spec)
            with T.tf32_mode(tf32 if dtype == torch.float32 and device.type == "cuda" else None):
                events = profile_passes(call, provider_inputs, iters, warmup, open_session, sync)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - a provider that fails is a result
            result.errors.append(f"{PROVIDERS[provider]}: {RN._short_error(exc)}")
            continue
        for pass_name in PASSES:
            result.stats += aggregate_kernels(events[pass_name], provider, pass_name, iters)
    del inputs
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    result.seconds = time.perf_counter() - start
    return result


def header_lines(env: dict, args) -> list:
    """Title and the environment: card, versions, commit, what was profiled and how."""
    dirty = " (dirty tree)" if env.get("dirty") else ""
    autotune = os.environ.get("SPHEREOPS_AUTOTUNE", "1")
    tiles = "one fixed tile per kernel" if autotune in ("", "0") else "autotuned tiles"
    return [f"# Kernel breakdown: {env.get('device_name')}, {args.dtype}, {args.layout}, "
            f"{args.operator} operator", "",
            f"- torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
            f"cuDNN {env.get('cudnn')}, driver {env.get('driver')}; commit {env.get('commit')}{dirty}; "
            f"{env.get('date')}",
            f"- SPHEREOPS_AUTOTUNE={autotune} ({tiles}); {args.warmup} warm-up fwd+bwd call(s), then "
            f"{args.iters} profiled calls per pass; device time per call = the session's kernel "
            "time / calls (torch.profiler, CUDA activity)",
            "- fwd: forward calls alone (inputs require grad); bwd: torch.autograd.grad on forward "
            "graphs built before its session; cuDNN = plain F.conv2d (all it launches); ratio = "
            "sphereops / cuDNN", ""]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.kernel_breakdown",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default=",".join(S.QUICK_NAMES),
                    help="comma-separated layer names from bench/shapes.py (default: the quick suite)")
    ap.add_argument("--dtype", default="bf16", choices=DTYPE_NAMES)
    ap.add_argument("--operator", default="linear", choices=P.BENCH_OPERATORS)
    ap.add_argument("--layout", default="channels_last", choices=RN.LAYOUTS)
    ap.add_argument("--iters", type=int, default=20, help="profiled calls per provider and pass")
    ap.add_argument("--warmup", type=int, default=3, help="fwd+bwd calls before profiling")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help="seconds after which no new layer starts (0 or less: no limit)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--out", default=None, help="also write the Markdown report to this file")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed and checked arguments; ``shapes`` holds the layers' ConvShapes in the given order.
    A bad value exits through ``ArgumentParser.error`` (status 2, the reason on stderr)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    names = [name.strip() for name in args.layers.split(",") if name.strip()]
    if not names:
        ap.error("--layers: no layer named")
    unknown = [name for name in names if name not in S.BY_NAME]
    if unknown:
        ap.error(f"--layers: unknown layer(s) {', '.join(unknown)}; names are those of "
                 f"bench/shapes.py, e.g. the quick suite: {','.join(S.QUICK_NAMES)}")
    if args.iters < 1:
        ap.error(f"--iters must be >= 1, got {args.iters}")
    if args.warmup < 1:
        # Triton compiles and autotunes on a shape's first call: profiled, its benchmarking
        # launches would be booked as the layer's kernels
        ap.error(f"--warmup must be >= 1, got {args.warmup}")
    args.shapes = [S.BY_NAME[name] for name in dict.fromkeys(names)]
    args.budget_s = args.budget if args.budget > 0 else None
    return args


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _write(text: str, out: Optional[str]) -> None:
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.kernel_breakdown: --device cuda, but torch.cuda.is_available() is False",
              file=sys.stderr)
        return 2
    if device.type != "cuda":
        message = NO_GPU_MESSAGE.format(device=device.type)
        print(message)
        _write(message + "\n", args.out)
        return 0

    # the real compiler: an inherited TRITON_INTERPRET would time the interpreter
    os.environ.pop("TRITON_INTERPRET", None)
    header = header_lines(RN.environment(device), args)
    budget = RN.Budget(args.budget_s)
    channels_last = args.layout == "channels_last"

    def one_layer(shape):
        print(f"[kernel_breakdown {budget.elapsed():.0f}s] {shape.name} ...", file=sys.stderr)
        result = profile_layer(shape, args.dtype, args.operator, channels_last, args.iters,
                               args.warmup, device)
        print(f"[kernel_breakdown {budget.elapsed():.0f}s] {shape.name} done in "
              f"{result.seconds:.1f}s{' with errors' if result.errors else ''}", file=sys.stderr)
        return result

    def write_partial(results, skipped):
        # a run killed past its timeout's grace still leaves this, marked as partial
        note = f"Partial report: {len(results)} of {len(args.shapes)} layer(s) so far, run going on."
        _write(format_report(header, results, skipped, note), args.out)

    results, skipped, interrupted = run_layers(args.shapes, budget, one_layer, write_partial)
    if interrupted:
        note = f"Interrupted (SIGINT) after {len(results)} layer(s): not measured: {', '.join(skipped)}."
    else:
        note = budget_note(args.budget_s, len(results), skipped)
    text = format_report(header, results, skipped, note,
                         skipped_reason="interrupted" if interrupted else "budget")
    print(text, end="")
    _write(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
