"""Timing, memory and ceiling measurements (DESIGN.md section 5).

GPU: CUDA events around every call after warm-up, the median of many repeats, and several input
copies cycled so that a small layer's inputs are not still in L2 from the previous call. That is
the eager time a Python caller sees, host overhead included: when the host needs longer to issue
a call than the GPU needs to run it, the events measure the host. :func:`measure_graph` adds the
device time: the calls captured in a CUDA graph and replayed, so no host work sits between
kernels.
CPU: ``time.perf_counter`` around every call, same median/rotation rules.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Optional

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_bytes(device: torch.device) -> int:
    """The last-level cache to defeat: the GPU's L2, or a generous 64 MiB for a CPU."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    return 64 * 2**20


def copies_for(set_bytes: int, device: torch.device, max_copies: int = 6) -> int:
    """How many input copies to cycle so that one full cycle moves >= 3x the cache."""
    if set_bytes <= 0:
        return 1
    return int(min(max_copies, max(2, math.ceil(3 * l2_bytes(device) / set_bytes))))


def measure(step: Callable[[int], object], device: torch.device, copies: int, *,
            warmup: int = 2, min_reps: int = 5, max_reps: int = 100,
            target_s: float = 0.15) -> dict:
    """Time ``step(i)`` (i = input copy to use) and return median / quantiles in milliseconds.

    The first calls (compilation, autotuning, allocator growth) are warm-up and not timed; the
    number of repeats is chosen from a short estimate so each measurement takes ~``target_s``.
    """
    prepare = getattr(step, "prepare", None)
    i = 0
    for _ in range(max(1, warmup)):
        if prepare is not None:
            prepare(i % copies)
        step(i % copies)
        i += 1
    synchronize(device)
    # Estimate the per-call time from a short burst.
    burst, est = 2, 0.0
    for _ in range(burst):
        if prepare is not None:
            prepare(i % copies)
            synchronize(device)
        t0 = time.perf_counter()
        step(i % copies)
        synchronize(device)
        est += time.perf_counter() - t0
        i += 1
    est = max(est / burst, 1e-6)
    reps = int(min(max_reps, max(min_reps, target_s / est)))

    times_ms = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for r in range(reps):
            if prepare is not None:
                prepare(i % copies)
            starts[r].record()
            step(i % copies)
            ends[r].record()
            i += 1
        torch.cuda.synchronize(device)
        times_ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            if prepare is not None:
                prepare(i % copies)
            t = time.perf_counter()
            step(i % copies)
            times_ms.append((time.perf_counter() - t) * 1e3)
            i += 1
    times_ms.sort()
    return {
        "median_ms": statistics.median(times_ms),
        "p20_ms": times_ms[int(0.2 * (len(times_ms) - 1))],
        "p80_ms": times_ms[int(0.8 * (len(times_ms) - 1))],
        "min_ms": times_ms[0],
        "reps": reps,
        "copies": copies,
    }


def measure_graph(step: Callable[[int], object], device: torch.device, copies: int, eager_ms: float,
                  *, warmup: int = 3, replays: int = 7, replay_ms: float = 2.0,
                  max_calls: int = 32) -> dict:
    """Device time of ``step(i)`` without host overhead: ``calls`` consecutive calls (cycling the
    input copies) captured into one CUDA graph, the graph replayed ``replays`` times between
    events; ``graph_ms`` = median replay time / calls.

    ``calls`` is chosen so one replay lasts about ``replay_ms`` given ``eager_ms`` (the eager
    median, an upper bound of the device time). Warm-up runs on a side stream first, as capture
    requires (cuDNN/cuBLAS workspaces, Triton autotuning and compilation happen there, not in
    the graph). ``step`` must not need an untimed ``prepare`` (the backward-only step does: its
    device time is fwd+bwd minus fwd, see the runner). Returns ``{"graph_ms", "graph_calls",
    "graph_replays"}``; a capture that fails raises (the caller records why)."""
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    if getattr(step, "prepare", None) is not None:
        raise ValueError("a step with an untimed prepare() cannot be captured as a whole")
    calls = int(min(max_calls, max(3, math.ceil(replay_ms / max(eager_ms, 1e-3)))))
    torch.cuda.synchronize(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for i in range(warmup):
            step(i % copies)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(calls):
                step(i % copies)      # outputs die here; their blocks stay in the graph's pool
        graph.replay()                # first replay uploads the graph: not timed
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(replays)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize(device)
        times = sorted(start.elapsed_time(end) for start, end in events)
    finally:
        del graph
        torch.cuda.synchronize(device)
    return {"graph_ms": statistics.median(times) / calls, "graph_calls": calls,
            "graph_replays": replays}


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak device memory allocated by ``fn()`` above what was allocated before it (MiB).

    CUDA only (the caching allocator keeps exact counters); None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 2**20


@contextmanager
def tf32_mode(enabled: Optional[bool]):
    """Set both TF32 switches (cuBLAS and cuDNN) for the block; None leaves them alone."""
    if enabled is None:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def tf32_flags() -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                "float32_matmul_precision": torch.get_float32_matmul_precision()}


# ---------------------------------------------------------------------------------------------
# Ceilings: measured once at the start of a run, on the card at hand.
# ---------------------------------------------------------------------------------------------

def _matmul_tflops(n: int, dtype: torch.dtype, device: torch.device, tf32: Optional[bool]) -> float:
    gen = torch.Generator(device=device).manual_seed(1234)
    a = [torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2)]
    b = [torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2)]
    with tf32_mode(tf32):
        res = measure(lambda i: torch.mm(a[i], b[i]), device, 2, warmup=2, min_reps=5,
                      max_reps=30, target_s=0.2)
    return 2.0 * n ** 3 / (res["median_ms"] * 1e-3) / 1e12


def _copy_gbs(n_bytes: int, device: torch.device) -> float:
    n = n_bytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    res = measure(lambda i: dst.copy_(src), device, 1, warmup=2, min_reps=5, max_reps=30,
                  target_s=0.2)
    return 2.0 * n * 4 / (res["median_ms"] * 1e-3) / 1e9   # bytes read + bytes written


def measure_ceilings(device: torch.device) -> dict:
    """Matrix-product TFLOP/s per math mode and copy GB/s on ``device`` (random data)."""
    out = {"device": str(device)}
    if device.type == "cuda":
        n, copy_bytes = 8192, 2 * 2**30
        modes = {"bf16": (torch.bfloat16, None), "fp16": (torch.float16, None),
                 "tf32": (torch.float32, True), "fp32": (torch.float32, False)}
    else:
        n, copy_bytes = 1024, 128 * 2**20
        modes = {"fp32": (torch.float32, False)}
    for name, (dtype, tf32) in modes.items():
        try:
            size = n if name != "fp32" or device.type != "cuda" else n // 2
            out[f"matmul_tflops_{name}"] = _matmul_tflops(size, dtype, device, tf32)
        except Exception as exc:  # noqa: BLE001 - a ceiling that cannot be measured is reported
            out[f"matmul_tflops_{name}_error"] = f"{type(exc).__name__}: {exc}"
    if device.type != "cuda":
        # CPU bf16/fp16 products run through slow paths; the fp32 rate is the honest ceiling there.
        for name in ("bf16", "fp16", "tf32"):
            if "matmul_tflops_fp32" in out:
                out[f"matmul_tflops_{name}"] = out["matmul_tflops_fp32"]
    try:
        out["copy_gbs"] = _copy_gbs(copy_bytes, device)
    except Exception as exc:  # noqa: BLE001
        out["copy_gbs_error"] = f"{type(exc).__name__}: {exc}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def peak_key(dtype: torch.dtype, tf32: bool) -> str:
    if dtype == torch.bfloat16:
        return "matmul_tflops_bf16"
    if dtype == torch.float16:
        return "matmul_tflops_fp16"
    return "matmul_tflops_tf32" if tf32 else "matmul_tflops_fp32"


def floor_ms(flops: float, n_bytes: float, ceilings: dict, dtype: torch.dtype, tf32: bool) -> Optional[float]:
    """max(FLOPs / measured matmul peak, bytes / measured copy bandwidth), in ms."""
    peak = ceilings.get(peak_key(dtype, tf32))
    bw = ceilings.get("copy_gbs")
    if not peak or not bw:
        return None
    return max(flops / (peak * 1e12), n_bytes / (bw * 1e9)) * 1e3


def measure_group(steps: dict, device: torch.device, copies: int, *, warmup: int = 2,
                  min_reps: int = 5, max_reps: int = 100, target_s: float = 0.15) -> dict:
    """Time several providers' ``step(i)`` *interleaved*: round r runs every provider once (in
    a rotating order), so a slow-down from the machine (other processes, clocks) hits all of them
    alike and the ratios stay honest.  ``target_s`` is per provider.

    Returns ``{name: stats}`` like :func:`measure`, or ``{name: {"error": message}}`` for a
    provider whose step raised (it is dropped from the remaining rounds)."""
    results: dict = {}
    active = dict(steps)

    def prepare(name, i):
        """Untimed set-up (a backward-only step builds its forward graph here)."""
        step = active.get(name)
        if step is not None and hasattr(step, "prepare"):
            try:
                step.prepare(i)
            except Exception as exc:  # noqa: BLE001
                results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                                 if str(exc) else type(exc).__name__}
                del active[name]

    def call(name, i):
        if name not in active:
            return False
        try:
            active[name](i)
            return True
        except Exception as exc:  # noqa: BLE001 - one provider's failure must not end the group
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                             if str(exc) else type(exc).__name__}
            del active[name]
            return False

    i = 0
    for name in list(active):
        for _ in range(max(1, warmup)):
            prepare(name, i % copies)
            if not call(name, i % copies):
                break
            i += 1
    est = {}
    for name in list(active):
        prepare(name, i % copies)
        synchronize(device)
        t0 = time.perf_counter()
        if call(name, i % copies):
            synchronize(device)
            est[name] = max(time.perf_counter() - t0, 1e-6)
        i += 1
    if not active:
        return results
    total_est = sum(est.get(n, 1e-6) for n in active)
    reps = int(min(max_reps, max(min_reps, target_s * len(active) / total_est)))
    names = list(active)
    times = {n: [] for n in names}
    host = {n: [] for n in names}
    cuda = device.type == "cuda"
    pending = []
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if name not in active:
                continue
            prepare(name, i % copies)
            if name not in active:
                continue
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t = time.perf_counter()
                start.record()
                ok = call(name, i % copies)
                end.record()
                if ok:
                    pending.append((name, start, end))
                    # Host time to issue the call: when it is close to the device time, the
                    # provider is launch/dispatch-bound, not kernel-bound.
                    host[name].append((time.perf_counter() - t) * 1e3)
            else:
                t = time.perf_counter()
                ok = call(name, i % copies)
                if ok:
                    times[name].append((time.perf_counter() - t) * 1e3)
            i += 1
    if cuda:
        torch.cuda.synchronize(device)
        for name, start, end in pending:
            times[name].append(start.elapsed_time(end))
    for name in names:
        if name in results:          # failed part-way: an error, not a partial timing
            continue
        ts = sorted(times[name])
        if not ts:
            results[name] = {"error": "no successful timed call"}
            continue
        results[name] = {
            "median_ms": statistics.median(ts),
            "p20_ms": ts[int(0.2 * (len(ts) - 1))],
            "p80_ms": ts[int(0.8 * (len(ts) - 1))],
            "min_ms": ts[0],
            "reps": len(ts),
            "copies": copies,
            "interleaved_with": [n for n in names if n != name],
        }
        if host[name]:
            results[name]["host_ms"] = statistics.median(host[name])
    return results
