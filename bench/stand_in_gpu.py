"""Triton's CUDA launch path without a GPU: ``python -m bench.stand_in_gpu [--check]``.

A stand-in triton driver reports an sm_90 target, so the kernels compile for real (PTX and
cubin, as for an H100/H200) while every launch lands in a launcher that records its arguments
instead of running anything; sphereops sends launches on CPU tensors to it while it is
installed (``launch.STAND_IN_DRIVER``). The kernels must be JIT functions, not interpreted
ones: ``TRITON_INTERPRET`` unset before ``sphereops_kernels`` is first imported (a fresh
process; the test suite runs this module in one).

* ``bench.host_overhead --stand-in-gpu`` times a call with triton's own launch path included
  (binding, specialisation, the kernel-cache lookup): the whole host cost of a call but the
  driver's launch itself, on any machine.
* ``--check``: over a set of conv and linear layers, the direct launches of kept plans
  (plans.LaunchMemo) hand the launcher exactly what triton's ``JITFunction.run`` hands it --
  the same compiled kernel (told apart by its cubin), grid, stream, metadata and arguments
  (tensors by dtype, shape, strides and storage offset, everything else by value) -- and from
  the third call on no launch goes through ``JITFunction.run``; an input with the same plan
  key at a misaligned address goes back to it. Prints each layer's verdict; exit status 1 on
  the first difference.

Autotuned kernels take their first config: the stand-in benchmarker times nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys

import torch


class _RecordingLauncher:
    """Takes the place of triton's CUDA launcher: records ``(function handle, grid, stream,
    packed metadata, kernel arguments)`` in ``log`` (when it is a list)."""
    log = None

    def __init__(self, src, metadata):
        pass

    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata,
                 enter_hook, exit_hook, *args):
        if _RecordingLauncher.log is not None:
            _RecordingLauncher.log.append((function, (gx, gy, gz), stream, packed_metadata, args))


class _Utils:
    """The driver utilities a compiled kernel asks for when it is first launched."""

    def __init__(self):
        self.handles = {}   # a compiled binary's digest -> its function handle

    def load_binary(self, name, binary, shared, device):
        handle = self.handles.setdefault(hashlib.sha1(binary).hexdigest(), len(self.handles) + 1)
        return 1, handle, 0, 0, 1024   # module, function, registers, spills, max threads

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        # an H100 SXM's (max_shared_mem: the opt-in shared memory a block may have)
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 5120}


def _stand_in_driver():
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInDriver(DriverBase):
        """Device 0, stream 0, sm_90; compiled kernels load into _Utils, launch into
        _RecordingLauncher; the benchmarker times nothing (autotuners keep their first
        config)."""

        def __init__(self):
            self.utils = _Utils()
            self.launcher_cls = _RecordingLauncher

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=0):
            return (9, 0)

        def get_benchmarker(self):
            return lambda fn, quantiles=None, **kwargs: [1.0] * len(quantiles) if quantiles else 1.0

        def get_empty_cache_for_benchmark(self):
            return torch.empty(1)

        def clear_cache(self, cache):
            pass

    return StandInDriver()


@contextlib.contextmanager
def stand_in_gpu():
    """Installs the stand-in driver for the block and lets sphereops launch on CPU tensors;
    yields the launch log (a list the launcher appends to)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the stand-in GPU needs TRITON_INTERPRET unset: compiled kernels, not "
                           "interpreted ones")
    from triton.runtime.driver import driver

    import sphereops.functional as functional
    from sphereops_kernels import launch

    log = []
    saved = (functional.interpreter_enabled, launch.STAND_IN_DRIVER)
    # the driver active before (None: not yet created -- creating one needs a GPU)
    previous = getattr(driver, "_active", None)
    driver.set_active(_stand_in_driver())
    # the functional layer lets CPU tensors take backend="triton" only under the interpreter
    functional.interpreter_enabled = lambda: True
    launch.STAND_IN_DRIVER = True
    _RecordingLauncher.log = log
    try:
        yield log
    finally:
        _RecordingLauncher.log = None
        functional.interpreter_enabled, launch.STAND_IN_DRIVER = saved
        driver.set_active(previous)


def clear_kept_plans() -> None:
    """Forget every kept plan, picked config and launch memo."""
    from sphereops_kernels import conv_bwd, conv_fwd, linear
    for cache in (conv_fwd._FORWARD_PLANS, conv_bwd._BACKWARD_PLANS, conv_fwd._PICKED_CONFIGS,
                  conv_bwd._DEPTHWISE_LAUNCHES, linear._FORWARD_LAUNCHES,
                  linear._BACKWARD_LAUNCHES):
        cache.clear()


# (name, N, C_in, C_out, H=W, kernel, stride, padding, groups, dtype, channels_last, operator,
#  bias): the GEMM path's launch variants -- dense channels_last, NCHW with a staged input
#  (C_in/G = 20), a flat K loop (3 channels), grouped stride 2 with the sigmoid's k -- and the
#  pure depthwise path, channels_last and NCHW (row tiles), and a big batch
CHECK_LAYERS = (
    ("gemm.bf16.cl", 4, 32, 32, 8, 3, 1, 1, 1, torch.bfloat16, True, "linear", True),
    ("gemm.fp32.nchw.staged", 2, 20, 24, 7, 3, 1, 1, 1, torch.float32, False, "cosine", False),
    ("gemm.fp16.flat_k", 2, 3, 16, 9, 5, 1, 2, 1, torch.float16, True, "linear", True),
    ("gemm.bf16.groups.s2", 2, 32, 32, 9, 3, 2, 1, 2, torch.bfloat16, True, "sigmoid", False),
    ("depthwise.bf16", 2, 16, 16, 8, 3, 1, 1, 16, torch.bfloat16, True, "linear", True),
    ("depthwise.fp32.nchw.s2", 2, 16, 16, 9, 3, 2, 1, 16, torch.float32, False, "sigmoid", False),
    # 160k pixels: a first level of the column-partial reduction before the grad launch
    ("depthwise.bf16.big_batch", 40, 16, 16, 64, 3, 1, 1, 16, torch.bfloat16, True, "linear",
     True),
)


# (name, M, in_features, out_features, dtype, operator, bias): SphereLinear's launches -- the
# forward's two, the backward's four
CHECK_LINEAR_LAYERS = (
    ("linear.bf16.sigmoid", 48, 64, 40, torch.bfloat16, "sigmoid", True),
    ("linear.fp32.cosine", 33, 20, 24, torch.float32, "cosine", False),
)


def misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its shape, strides and storage offset (0) -- the same plan key --
    whose data pointer is one element past a 16-byte boundary."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    buf = bytearray((span + 1) * t.element_size() + 16)
    shift = -torch.frombuffer(buf, dtype=torch.uint8).data_ptr() % 16 + t.element_size()
    out = torch.frombuffer(buf, dtype=t.dtype, offset=shift, count=span).as_strided(
        t.shape, t.stride())
    return out.copy_(t)


def layer_step(spec, seed: int = 0):
    """A forward+backward closure of ``spec`` (one of CHECK_LAYERS) through backend="triton";
    ``step(misaligned=True)`` runs it on a misaligned copy of the input (misaligned_copy)."""
    import sphereops
    (_, n, c_in, c_out, hw, ks, stride, padding, groups, dtype, cl, operator, bias) = spec
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, hw, hw, generator=gen).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in // groups, ks, ks, generator=gen).to(dtype)
    b = torch.randn(c_out, generator=gen).to(dtype) if bias else None
    k = torch.rand(c_out, generator=gen).add(0.5).to(dtype) if operator == "sigmoid" else None
    leaves = [t.requires_grad_(True) for t in (x, w, b) if t is not None]
    kwargs = dict(stride=stride, padding=padding, groups=groups, operator=operator,
                  backend="triton")
    if k is not None:
        kwargs["k"] = k

    x_off = misaligned_copy(x.detach()).requires_grad_(True)

    def step(misaligned=False):
        inp = x_off if misaligned else x
        y = sphereops.sphere_conv2d(inp, w, b, **kwargs)
        return torch.autograd.grad(y, [inp] + leaves[1:], torch.ones_like(y))
    return step


def linear_step(spec, seed: int = 0):
    """A forward+backward closure of ``spec`` (one of CHECK_LINEAR_LAYERS), as
    :func:`layer_step`."""
    import sphereops
    _, m, k_in, k_out, dtype, operator, bias = spec
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k_in, generator=gen).to(dtype).requires_grad_(True)
    w = torch.randn(k_out, k_in, generator=gen).to(dtype).requires_grad_(True)
    b = torch.randn(k_out, generator=gen).to(dtype).requires_grad_(True) if bias else None
    k = torch.rand(k_out, generator=gen).add(0.5).to(dtype) if operator == "sigmoid" else None
    x_off = misaligned_copy(x.detach()).requires_grad_(True)
    params = [t for t in (w, b) if t is not None]

    def step(misaligned=False):
        inp = x_off if misaligned else x
        y = sphereops.sphere_linear(inp, w, b, operator=operator, k=k, backend="triton")
        return torch.autograd.grad(y, [inp] + params, torch.ones_like(y))
    return step


def _comparable(record):
    """A launch record with tensors replaced by what identifies their role and layout."""
    function, grid, stream, packed, args = record
    return (function, grid, stream, packed,
            tuple((t.dtype, tuple(t.shape), t.stride(), t.storage_offset())
                  if isinstance(t, torch.Tensor) else t for t in args))


@contextlib.contextmanager
def counted_jit_runs():
    """Counts the launches through triton's JITFunction.run in the yielded list's first item
    while the block runs."""
    from triton.runtime.jit import JITFunction
    counter = [0]
    original = JITFunction.run

    def counted(self, *args, **kwargs):
        counter[0] += 1
        return original(self, *args, **kwargs)

    JITFunction.run = counted
    try:
        yield counter
    finally:
        JITFunction.run = original


def check_layer(step, log) -> str | None:
    """None if the direct launches of ``step`` (layer_step / linear_step) match triton's path,
    else what differs."""
    from sphereops_kernels import launch
    runs = {}
    try:
        with counted_jit_runs() as counter:
            for direct in (False, True):
                launch.DIRECT_LAUNCH = direct
                clear_kept_plans()
                calls = []
                # the first call keeps the plans (and memos), the others reuse them; the fourth's
                # input has the same plan key but a misaligned address: triton's path again
                for call in range(4):
                    del log[:]
                    counter[0] = 0
                    step(misaligned=call == 3)
                    calls.append(([_comparable(r) for r in log], counter[0]))
                runs[direct] = calls
    finally:
        launch.DIRECT_LAUNCH = True
    for i, ((direct, direct_jit), (plain, plain_jit)) in enumerate(zip(runs[True],
                                                                         runs[False]), 1):
        if direct != plain:
            for j, (a, b) in enumerate(zip(direct, plain)):
                if a != b:
                    return f"call {i}, launch {j}: direct {a} != triton's {b}"
            return f"call {i}: {len(direct)} launches, on triton's path {len(plain)}"
        # every site is kept by then (an autotuned site's memo starts at the plan's second
        # call: direct from the third)
        if i == 3 and (direct_jit or not plain_jit):
            return (f"call {i}: {direct_jit} of {len(direct)} launches through "
                    f"JITFunction.run, {plain_jit} without direct launches")
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="compare direct launches with triton's path over CHECK_LAYERS")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if not args.check:
        ap.print_help()
        return 0
    with stand_in_gpu() as log:
        steps = ([(spec[0], layer_step(spec)) for spec in CHECK_LAYERS]
                 + [(spec[0], linear_step(spec)) for spec in CHECK_LINEAR_LAYERS])
        for name, step in steps:
            problem = check_layer(step, log)
            print(f"{name:28s} {'ok' if problem is None else 'DIFFERS: ' + problem}",
                  flush=True)
            if problem is not None:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
