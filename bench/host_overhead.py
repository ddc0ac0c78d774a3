"""Where a SphereConv2d call spends its host time: ``python -m bench.host_overhead``.

Eager PyTorch issues work from Python; when the host needs longer to issue a call than the GPU
needs to run it, the call is host-bound and the kernels' speed does not matter. This prints,
for one layer, the median host time to issue a forward, a forward + backward and, for scale, the
plain ``F.conv2d`` and an empty tensor allocation, then the Python functions that took the most
of that time (cProfile, own time). On a GPU the launches are asynchronous, so the host time is
the issue cost alone (the GPU is synchronised between calls, never inside one).

``--stub-launches`` (CPU, no GPU needed): the GPU run's layer (bf16, channels_last) through the
Triton backend with every kernel launch replaced by a no-op: what sphereops' own Python costs a
call (validation, tile choice, allocations, autograd) without triton's launch path or the
kernels -- the part of the host time this package controls, measurable on any machine.

``--stand-in-gpu`` (CPU, no GPU needed): the same layer with the kernels compiled for sm_90 and
launched into bench.stand_in_gpu's recording launcher: triton's own launch path (argument
binding, specialisation, the kernel-cache lookup) included, the driver's launch call not. Three
columns, interleaved rounds: kept plans' direct launches (plans.LaunchMemo, the default),
every launch through triton's ``JITFunction.run`` (SPHEREOPS_DIRECT_LAUNCH=0), and launches
stubbed out. Needs TRITON_INTERPRET unset.

    python -m bench.host_overhead [--device cuda] [--calls 200] [--top 15]
                                  [--stub-launches | --stand-in-gpu]
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import io
import os
import pstats
import statistics
import time

import torch
import torch.nn.functional as F


def _host_us(fn, device: torch.device, calls: int) -> float:
    """Median host time of ``fn()`` in microseconds, the device idle at each call's start."""
    times = []
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(times)


# the kernel modules that launch (each binds launch.launch by name)
_LAUNCHING_MODULES = ("conv_fwd", "conv_bwd", "conv_fwd_grid", "conv_bwd_grid", "linear")


@contextlib.contextmanager
def stubbed_launches(counter: list):
    """Every sphereops kernel launch replaced by a no-op that counts itself in ``counter[0]``."""
    def no_launch(kernel, grid, args, kwargs, what, memo=None):
        counter[0] += 1

    modules = [importlib.import_module(f"sphereops_kernels.{name}") for name in _LAUNCHING_MODULES]
    saved = [m.launch for m in modules]
    for m in modules:
        m.launch = no_launch
    try:
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.launch = fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--stub-launches", action="store_true",
                    help="CPU: the Triton backend with every launch a no-op (sphereops' own cost)")
    ap.add_argument("--stand-in-gpu", action="store_true",
                    help="CPU: kernels compiled for sm_90, launches recorded (triton's launch "
                         "path timed with and without direct launches)")
    args = ap.parse_args(argv)
    if args.stand_in_gpu:
        if args.stub_launches or args.device == "cuda":
            ap.error("--stand-in-gpu runs alone, on the CPU")
        return _report_stand_in(args.calls)
    if args.stub_launches:
        if args.device == "cuda":
            ap.error("--stub-launches runs on the CPU (--device cpu or auto)")
        args.device = "cpu"
        # the Triton backend on CPU tensors; must be set before triton decorates the kernels
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.stub_launches:
        counter = [0]
        with stubbed_launches(counter):
            return _report(args, device, counter)
    return _report(args, device, None)


def _layer(device, big: bool, backend: str):
    """``(shape, x, sphere_fwd, sphere_fwd_bwd, conv_fwd, conv_fwd_bwd)`` of the measured
    layer, SphereConv2d through ``backend``: a mid-size ResNet layer in bf16 channels_last when
    ``big`` (the GPU's and the stand-ins'), a small fp32 one otherwise (the CPU reference)."""
    import sphereops

    n, c, hw, dtype = (32, 128, 32, torch.bfloat16) if big else (4, 16, 8, torch.float32)
    fmt = torch.channels_last if big else torch.contiguous_format
    x = torch.randn(n, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(c, c, 3, 3, device=device, dtype=dtype)
    b = torch.zeros(c, device=device, dtype=dtype)
    dy = torch.randn(n, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=fmt)
    leaves = [t.requires_grad_(True) for t in (x, w, b)]

    def sphere_fwd():
        return sphereops.sphere_conv2d(*leaves, padding=1, operator="linear", backend=backend)

    def sphere_fwd_bwd():
        return torch.autograd.grad(sphere_fwd(), leaves, dy)

    def conv_fwd():
        return F.conv2d(*leaves, padding=1)

    def conv_fwd_bwd():
        return torch.autograd.grad(conv_fwd(), leaves, dy)

    shape = (f"{n}x{c}x{hw}x{hw} -> {c}, 3x3, {str(dtype).replace('torch.', '')}"
             + (", channels_last" if big else ""))
    return shape, x, sphere_fwd, sphere_fwd_bwd, conv_fwd, conv_fwd_bwd


def _report_stand_in(calls: int, rounds: int = 3) -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from bench.stand_in_gpu import clear_kept_plans, stand_in_gpu
    from sphereops_kernels import launch

    with stand_in_gpu():
        shape, _, sphere_fwd, sphere_fwd_bwd, _, _ = _layer(torch.device("cpu"), True, "triton")
        cases = [("sphere_conv2d fwd", sphere_fwd), ("sphere_conv2d fwd+bwd", sphere_fwd_bwd)]
        modes = ("direct launches", "triton's path", "launches stubbed")
        times = {(name, mode): [] for name, _ in cases for mode in modes}
        counter = [0]
        for _ in range(rounds):
            for mode in modes:
                launch.DIRECT_LAUNCH = mode != "triton's path"
                clear_kept_plans()
                stub = stubbed_launches(counter) if mode == modes[2] else contextlib.nullcontext()
                with stub:
                    for name, fn in cases:
                        for _ in range(3):     # compile, keep plans and memos
                            fn()
                        times[name, mode].append(_host_us(fn, torch.device("cpu"), calls))
        launch.DIRECT_LAUNCH = True
    print(f"host time to issue one call on this machine's CPU with triton's launch path: "
          f"stand-in GPU driver (sm_90 kernels compiled, launches recorded, not run); {shape}; "
          f"median of {calls} calls, min and max over {rounds} interleaved rounds, us:")
    print(f"  {'':24s}" + "".join(f"{m:>22s}" for m in modes))
    for name, _ in cases:
        cells = "".join(f"{min(times[name, m]):>13.1f} - {max(times[name, m]):<6.1f}"
                        for m in modes)
        print(f"  {name:24s}{cells}")
    return 0


def _triton_path(fn):
    """``fn`` with kept plans' direct launches off (SPHEREOPS_DIRECT_LAUNCH=0) while it runs."""
    from sphereops_kernels import launch

    def run():
        launch.DIRECT_LAUNCH = False
        try:
            return fn()
        finally:
            launch.DIRECT_LAUNCH = True
    return run


def _report(args, device: torch.device, launch_counter) -> int:
    cuda = device.type == "cuda"
    stub = launch_counter is not None
    backend = "triton" if stub else "auto"
    # the big layer on the GPU -- and with stubbed launches --; a small one through the CPU
    # reference
    shape, x, sphere_fwd, sphere_fwd_bwd, conv_fwd, conv_fwd_bwd = _layer(device, cuda or stub,
                                                                           backend)

    cases = [("torch.empty_like(x)", lambda: torch.empty_like(x))]
    if not stub:   # (on the CPU F.conv2d would time its arithmetic, not its issue cost)
        cases += [("F.conv2d fwd", conv_fwd), ("F.conv2d fwd+bwd", conv_fwd_bwd)]
    cases += [("sphere_conv2d fwd", sphere_fwd), ("sphere_conv2d fwd+bwd", sphere_fwd_bwd)]
    if cuda:   # A/B: every launch through triton's JITFunction.run
        cases += [("  triton's path: fwd", _triton_path(sphere_fwd)),
                  ("  triton's path: fwd+bwd", _triton_path(sphere_fwd_bwd))]
    for _, fn in cases:          # compile, autotune, allocator growth
        for _ in range(3):
            fn()
    if stub:
        launch_counter[0] = 0
        sphere_fwd()
        fwd_launches = launch_counter[0]
        launch_counter[0] = 0
        sphere_fwd_bwd()
        print(f"sphereops' own host time, kernel launches stubbed out ({fwd_launches} launches "
              f"a forward, {launch_counter[0]} a forward+backward not made):")
    print(f"host time to issue one call ({device.type}, {shape}, median of {args.calls}):")
    for name, fn in cases:
        print(f"  {name:26s} {_host_us(fn, device, args.calls):9.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        sphere_fwd_bwd()
    prof.disable()
    if cuda:
        torch.cuda.synchronize(device)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
    print(f"\ncProfile of {args.calls} sphere_conv2d fwd+bwd calls (own time; the profiler "
          "inflates it, the ranking is what counts):")
    print("\n".join(line for line in buf.getvalue().splitlines() if line.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
