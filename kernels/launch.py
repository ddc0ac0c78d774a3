"""The one launch path of every sphereops kernel, and whether the Triton interpreter runs.

``launch(kernel, grid, args, kwargs, what)`` starts ``kernel[grid](*args, **kwargs)``; ``args[0]``
is a tensor on the launch device:

* CUDA, eager (``torch.library``'s wrap_triton switch off: inside a ``triton_op`` body called
  eagerly, and in ``sphereops.ops``' eager Functions): a plain launch under the tensor's device
  guard. Going through ``torch.library.wrap_triton`` there would only cost time: building the
  wrapper and indexing it by the grid take ~30 us each on the host, more than a mid-size
  layer's kernels run (measured on this project's CPU machine, triton 3.9 / torch 2.13).
  A launch site of a kept plan (``memo``, plans.LaunchMemo) goes through triton's
  ``JITFunction.run`` once and then calls the compiled kernel it ran directly: ~30-45 us of
  host time a launch less (``python -m bench.host_overhead --stand-in-gpu``).
* CUDA, being traced (the switch on, its default: torch.compile / make_fx tracing a
  ``triton_op``): through ``wrap_triton``, so that the graph records the kernel and Inductor
  sees it.
* CPU under ``TRITON_INTERPRET=1``: a plain launch; fake tensors (shape inference only) skip it,
  and a graph trace is refused -- wrap_triton does not wrap interpreter functions, so the traced
  graph would hold the allocations but not the kernel.
* CPU with bench.stand_in_gpu's stand-in driver (no GPU needed): the CUDA eager path, compiled
  kernels included, into a launcher that records instead of launching.
"""
from __future__ import annotations

import os

import torch

try:
    from torch._library.triton import is_wrap_triton_enabled as _wrap_triton_enabled
except ImportError:  # pragma: no cover - a torch without the switch: always wrap (safe, slower)
    def _wrap_triton_enabled() -> bool:
        return True


def env_switch(name: str, default: bool) -> bool:
    """A switch read from the environment variable ``name``: on unless it is set to "" or
    "0", or, when unset, ``default``."""
    return os.environ.get(name, "1" if default else "0") not in ("", "0")


def interpreting() -> bool:
    """Whether kernels run under the Triton interpreter (``TRITON_INTERPRET`` set, not "0")."""
    return env_switch("TRITON_INTERPRET", False)


def cpu_launches() -> bool:
    """Whether kernels may be launched on CPU tensors: under the interpreter, or while
    bench.stand_in_gpu's stand-in driver takes the launches."""
    return STAND_IN_DRIVER or interpreting()


def launch(kernel, grid, args, kwargs, what: str, memo=None) -> None:
    """Launch ``kernel`` over ``grid`` (see the module docstring); ``what`` names the op in the
    error raised when an interpreter launch is traced. ``memo``: the launch site's
    :class:`~sphereops_kernels.plans.LaunchMemo` in a kept plan, or None -- a plain launch then
    calls the compiled kernel its first launch ran directly (:func:`_launch_plain`)."""
    first = args[0]
    if first.is_cuda:
        device = first.device
        # the guard only when the tensors live elsewhere than the current device: entering
        # torch.cuda.device costs ~10-30 us of host time per launch on the H200 host
        # (bench/results/20261127-1403_*_host_overhead.txt), as much as a small kernel runs
        if device.index == _current_cuda_device():
            _launch_cuda(kernel, grid, args, kwargs, memo, device.index)
        else:
            with _device_guard(device):
                _launch_cuda(kernel, grid, args, kwargs, memo, device.index)
    elif STAND_IN_DRIVER:
        # CPU tensors through triton's compiled-kernel launch path (bench.stand_in_gpu)
        _launch_plain(kernel, grid, args, kwargs, memo, 0)
    elif not _is_fake(first):
        if memo is not None:
            memo.check(kernel, grid, args, kwargs)
        kernel[grid](*args, **kwargs)
    elif is_graph_tracing():
        raise NotImplementedError(
            f"the Triton interpreter (CPU) path of {what} cannot be traced into a graph "
            "(torch.compile / make_fx); use the reference backend on CPU")
    # else: fake-tensor propagation only (shape/dtype inference): the outputs are allocated


def plain_launch(first) -> bool:
    """Whether :func:`launch` would start a kernel whose first argument is ``first`` plainly:
    no graph being traced and, on CUDA, torch.library's wrap_triton switch off (eager calls
    through sphereops.ops). Kernels with arguments that only a plain launch is known to take
    (host-side TMA descriptors: conv_fwd_grid) run only then."""
    return not is_graph_tracing() and not (first.is_cuda and _wrap_triton_enabled())


def offsets_need_int64(x, first_dim: int, kernel, padding, dilation, other_numel: int = 0) -> bool:
    """Whether a kernel's offsets into ``x`` from dim ``first_dim`` on (1: inside one sample,
    0: across the batch) -- a window tap's, masked lanes in the padding included -- or into a
    tensor of ``other_numel`` elements could leave int32: the span plus a margin of (padding +
    dilated filter) rows and columns, doubled for safety, against 2^31. The conv kernels take
    int32 offsets otherwise (fewer instructions in their hot loops)."""
    span = sum((size - 1) * abs(stride)
               for size, stride in zip(x.shape[first_dim:], x.stride()[first_dim:]))
    reach = sum((p + d * (k - 1)) * abs(st) for k, p, d, st in
                zip(kernel, padding, dilation, x.stride()[2:]))
    return 2 * (max(span + reach, other_numel) + 1) >= 2 ** 31


# The most pixels one call's kernels index in int32: a tile's row offsets run up to a tile
# past the last pixel before the masks drop them (128 rows at most today, the depthwise row
# blocks included; 4096 leaves room) and must not wrap around there.
MAX_PIXELS = 2 ** 31 - 1 - 4096


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python for the launchers' grids and tiles: triton.cdiv (and
    triton.next_power_of_2) are jit-callables whose argument unwrapping costs ~4 us of host time
    a call, several calls a launch (cProfile, CPU)."""
    return -(-a // b)


def next_pow2(v: int) -> int:
    """The smallest power of two >= v (1 for v <= 1), in plain Python (see :func:`cdiv`)."""
    return 1 << (max(int(v), 1) - 1).bit_length()


def pow2_factor(v: int, cap: int = 256) -> int:
    """The largest power of two dividing ``v`` (``cap`` for 0 or past it): a kernel's
    constexpr saying which power-of-two tiles divide a channel count, without making the
    count itself a compile-time constant."""
    v = int(v)
    return cap if v == 0 else min(cap, v & -v)


def pixel_run(*tensors) -> int:
    """The pixel-run constexpr (OUT_RUN / PIX_RUN) of a kernel that reads or writes NCHW tensors
    [N, C, H, W] through a flat pixel index m = (n, h, w): the most pixels R, a power of two up
    to 16 bytes' worth, such that in every tensor each run of R pixels starting at an m that is
    a multiple of R lies in one (h, w) plane, is contiguous there and starts at an element
    offset that is a multiple of R. Then the kernel may tell Triton so (epilogue.pixel_runs)
    and move R pixels per vector access instead of one element per instruction. It holds when
    each plane is dense (stride_w 1, stride_h W) and H*W and the channel and batch strides are
    multiples of R (a run cannot cross a plane boundary, which lies at a multiple of H*W).
    1: no such run (a plane not dense, an odd H*W such as 7x7). The tensors' base pointers are
    Triton's own business: it vectorises only what it has proven 16-byte aligned."""
    run = 16 // tensors[0].element_size()
    for t in tensors:
        _, _, h, w = t.shape
        if t.stride(3) != 1 or (h > 1 and t.stride(2) != w):
            return 1
        run = min(run, pow2_factor(h * w), pow2_factor(t.stride(1)), pow2_factor(t.stride(0)))
    return run


# Later launches of a kept plan's launch site call the compiled kernel directly (plans.LaunchMemo);
# SPHEREOPS_DIRECT_LAUNCH=0 sends every launch through triton's JITFunction.run (A/B runs).
DIRECT_LAUNCH = env_switch("SPHEREOPS_DIRECT_LAUNCH", True)

# Set by bench.stand_in_gpu while triton's active driver is a stand-in: kernels compile for a
# GPU target and "launch" on CPU tensors into a recording launcher, so that triton's launch path
# (and the direct one) can be timed and compared on a machine without a GPU.
STAND_IN_DRIVER = False


def _launch_plain(kernel, grid, args, kwargs, memo, device: int) -> None:
    """A plain (eager, untraced) launch on ``device``, the current one. Without a memo, or at
    a memo's first launch: ``kernel[grid]``, triton's JITFunction.run, which binds and
    specialises the arguments, hashes a cache key, finds (or compiles) the kernel and launches
    it; the memo then keeps what it ran. Later: the kept compiled kernel's own ``run``, with the
    arguments in signature order -- what JITFunction.run would have passed it, ~30-45 us of host
    time a launch sooner (see plans.LaunchMemo for why the plan fixes everything else)."""
    if memo is None:
        kernel[grid](*args, **kwargs)
        return
    memo.check(kernel, grid, args, kwargs)
    compiled = memo.compiled
    if (compiled is not None and DIRECT_LAUNCH and memo.device == device
            and memo.still_specialised(args)):
        runtime, driver = _triton_runtime()
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        # launch hooks (a profiler's) get their metadata from JITFunction.run
        if not (getattr(enter, "calls", enter) or getattr(leave, "calls", leave)):
            g0, g1, g2 = memo.grid
            compiled.run(g0, g1, g2, driver.active.get_current_stream(device), compiled.function,
                         compiled.packed_metadata, None, None, None, *args, *memo.tail)
            return
    ran = kernel[grid](*args, **kwargs)
    if compiled is None and DIRECT_LAUNCH:
        memo.keep(kernel, ran, grid, args, kwargs, device)


_TRITON_RUNTIME = None


def _triton_runtime():
    """``(triton.knobs.runtime, triton.runtime.driver.driver)``, imported once."""
    global _TRITON_RUNTIME
    if _TRITON_RUNTIME is None:
        from triton import knobs
        from triton.runtime.driver import driver
        _TRITON_RUNTIME = (knobs.runtime, driver)
    return _TRITON_RUNTIME


def _launch_cuda(kernel, grid, args, kwargs, memo, device: int) -> None:
    """A launch on ``device``, the current one: through wrap_triton while a graph is traced,
    else plain (:func:`_launch_plain`)."""
    if _wrap_triton_enabled():
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    else:
        _launch_plain(kernel, grid, args, kwargs, memo, device)


def _current_cuda_device() -> int:
    return torch.cuda.current_device()


def _device_guard(device: torch.device):
    """The tensors' device for the launch, not the current one (Triton launches on the current
    device)."""
    return torch.cuda.device(device)


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return t.device.type == "meta" or is_fake(t)


def is_graph_tracing() -> bool:
    """Whether a graph is being traced (torch.compile / make_fx: a proxy mode is active)."""
    try:
        from torch.fx.experimental.proxy_tensor import get_proxy_mode
    except ImportError:  # pragma: no cover - a torch without the helper: refuse to be safe
        return True
    return get_proxy_mode() is not None
