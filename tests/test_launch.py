"""The shared launch path (sphereops_kernels.launch): which way each kind of launch goes.

A CUDA launch cannot run here; a stand-in for the first tensor and a recording kernel show the
routing, which is what decides the host cost of an eager call and what torch.compile sees."""
import contextlib
import types

import pytest
import torch

from sphereops_kernels import launch as L


class _RecordingKernel:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _cuda_stand_in():
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))


@pytest.fixture
def guards(monkeypatch):
    """Records the device guards entered; the current device is 0, the stand-in's is cuda:1."""
    entered = []
    monkeypatch.setattr(L, "_current_cuda_device", lambda: 0)

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        yield

    monkeypatch.setattr(L, "_device_guard", guard)
    return entered


def test_eager_cuda_launch_goes_straight_to_the_kernel(monkeypatch, guards):
    """wrap_triton switched off (eager): no wrapper is built, the launch runs under the tensor's
    device guard."""
    from torch._library.triton import set_wrap_triton_enabled
    monkeypatch.setattr(torch.library, "wrap_triton",
                        lambda k: pytest.fail("wrap_triton must not be used for an eager launch"))
    kernel, first = _RecordingKernel(), _cuda_stand_in()
    with set_wrap_triton_enabled(False):
        L.launch(kernel, (3, 1), (first, 7), {"BLOCK": 16}, "op")
    assert kernel.calls == [((3, 1), (first, 7), {"BLOCK": 16})]
    assert guards == [torch.device("cuda", 1)]


def test_traced_cuda_launch_goes_through_wrap_triton(monkeypatch, guards):
    """wrap_triton switched on (its default; torch.compile tracing a triton_op): the launch is
    handed to the wrapper so that the graph records it."""
    wrapped = []

    def fake_wrap(kernel):
        wrapped.append(kernel)
        return kernel

    monkeypatch.setattr(torch.library, "wrap_triton", fake_wrap)
    kernel, first = _RecordingKernel(), _cuda_stand_in()
    L.launch(kernel, (2,), (first,), {}, "op")
    assert wrapped == [kernel] and kernel.calls == [((2,), (first,), {})]
    assert guards == [torch.device("cuda", 1)]


def test_no_device_guard_when_the_tensors_are_on_the_current_device(monkeypatch, guards):
    """The common case (one GPU, or the caller already on the tensors' device) skips the guard,
    whose context manager costs host time on every launch."""
    from torch._library.triton import set_wrap_triton_enabled
    monkeypatch.setattr(L, "_current_cuda_device", lambda: 1)
    kernel, first = _RecordingKernel(), _cuda_stand_in()
    with set_wrap_triton_enabled(False):
        L.launch(kernel, (1,), (first,), {}, "op")
    assert kernel.calls == [((1,), (first,), {})] and guards == []


def test_cpu_launches_run_fake_ones_are_skipped_and_traced_ones_refused():
    kernel = _RecordingKernel()
    x = torch.zeros(2)
    L.launch(kernel, (1,), (x,), {}, "op")
    assert len(kernel.calls) == 1
    meta = torch.zeros(2, device="meta")
    L.launch(kernel, (1,), (meta,), {}, "op")          # shape inference only: nothing runs
    assert len(kernel.calls) == 1

    from torch.fx.experimental.proxy_tensor import make_fx
    with pytest.raises(NotImplementedError, match="my_op"):
        make_fx(lambda t: L.launch(kernel, (1,), (t,), {}, "my_op") or t,
                tracing_mode="fake")(torch.zeros(2))


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), ("", False), ("true", True)])
def test_interpreting_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert L.interpreting() is expected


def _element_offsets(t):
    """[N*H*W, C] element offsets of every (pixel, channel) of t [N, C, H, W], pixels in flat
    (n, h, w) order."""
    n, c, h, w = t.shape
    idx = [torch.arange(size).view(*([1] * d), size, *([1] * (3 - d)))
           for d, size in enumerate((n, c, h, w))]
    offs = sum(i * s for i, s in zip(idx, t.stride()))
    return offs.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _holds_runs(t, run):
    """Whether every run of ``run`` pixels starting at a multiple of ``run`` is contiguous and
    starts at a multiple of ``run`` elements, in every channel: what epilogue.pixel_runs tells
    Triton."""
    offs = _element_offsets(t)
    usable = offs.shape[0] - offs.shape[0] % run
    runs = offs[:usable].reshape(-1, run, offs.shape[1])
    steps_ok = bool((runs[:, 1:] - runs[:, :-1] == 1).all()) if run > 1 else True
    return steps_ok and bool((runs[:, 0] % run == 0).all())


@pytest.mark.parametrize("dtype, n, c, h, w, expected", [
    (torch.bfloat16, 2, 3, 56, 56, 8),    # 16 bytes of bf16
    (torch.float32, 2, 3, 56, 56, 4),     # 16 bytes of fp32
    (torch.float16, 3, 5, 14, 14, 4),     # 196 = 4 * 49
    (torch.float16, 2, 4, 7, 7, 1),       # 49: a run would cross a plane
    (torch.float16, 2, 3, 1, 12, 4),      # one row a plane
    (torch.bfloat16, 1, 1, 8, 8, 8),
])
def test_pixel_run_of_contiguous_planes(dtype, n, c, h, w, expected):
    """pixel_run of NCHW tensors: the widest run up to 16 bytes that the planes allow, and the
    promise checked element by element (runs contiguous, aligned, inside one plane)."""
    t = torch.empty(n, c, h, w, dtype=dtype)
    assert L.pixel_run(t) == expected
    assert _holds_runs(t, expected)
    # a run one wider than promised would be false (or wider than 16 bytes)
    wider = 2 * expected
    assert wider * t.element_size() > 16 or not _holds_runs(t, wider)


def test_pixel_run_refuses_what_it_cannot_promise():
    """Planes that are not dense, channel strides off the run, and several tensors at once
    (the smallest run of them)."""
    base = torch.empty(2, 4, 16, 24, dtype=torch.float16)
    cases = [
        (base[:, :, :, :16], 1),                       # rows 24 apart, 16 wide: not dense
        (base[:, :, ::2], 1),                          # every other row
        (base.contiguous(memory_format=torch.channels_last), 1),
        (torch.empty(2, 4, 16 * 24 + 2, dtype=torch.float16)[..., :16 * 24].view(2, 4, 16, 24), 2),
        (base[:, 1:3], 8),                             # a channel slice: planes still aligned
    ]
    for t, expected in cases:
        assert L.pixel_run(t) == expected, t.stride()
        assert _holds_runs(t, expected)
    assert L.pixel_run(base, torch.empty(2, 4, 4, 12, dtype=torch.float16)) == 8
    assert L.pixel_run(base, torch.empty(2, 4, 2, 3, dtype=torch.float16)) == 2


# -- direct launches of kept plans (plans.LaunchMemo) ------------------------------------------

class _Compiled:
    """A compiled kernel's launch interface: ``run(grid x, y, z, stream, function, packed
    metadata, launch metadata, enter hook, exit hook, *arguments)``."""
    function, packed_metadata = "function", "packed"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class _JitKernel:
    """A JIT function's surface as launch and LaunchMemo use it: the signature, pre-run hooks,
    ``kernel[grid](*args, **kwargs)`` returning the compiled kernel it launched."""

    def __init__(self):
        def kernel_fn(x_ptr, out_ptr, n, BLOCK, EVEN=True):
            pass
        import inspect
        self.signature = inspect.signature(kernel_fn)
        self.pre_run_hooks = []
        self.compiled = _Compiled()
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.compiled
        return run


@pytest.fixture
def direct(monkeypatch):
    """Direct launches on, the CUDA eager path with the tensors on the current device 0, a
    triton runtime without launch hooks, stream 7; yields the runtime (hooks settable)."""
    from torch._library.triton import set_wrap_triton_enabled
    monkeypatch.setattr(L, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(L, "_current_cuda_device", lambda: 0)
    runtime = types.SimpleNamespace(launch_enter_hook=types.SimpleNamespace(calls=[]),
                                    launch_exit_hook=None)
    driver = types.SimpleNamespace(active=types.SimpleNamespace(
        get_current_stream=lambda device: 7))
    monkeypatch.setattr(L, "_triton_runtime", lambda: (runtime, driver))
    with set_wrap_triton_enabled(False):
        yield runtime


class _CudaTensor:
    """A stand-in CUDA tensor at a given address."""

    def __init__(self, address):
        self.address = address
        self.is_cuda, self.device = True, torch.device("cuda", 0)

    def data_ptr(self):
        return self.address


@pytest.fixture
def cuda_tensors(monkeypatch):
    """The stand-ins have no dtype for CHECK_PLANS' fingerprints: checks off."""
    from sphereops_kernels import plans
    monkeypatch.setattr(plans, "CHECK_PLANS", False)


def test_a_kept_site_calls_its_compiled_kernel_directly(direct, cuda_tensors):
    """The first launch goes through kernel[grid] (triton's JITFunction.run) and keeps what it
    ran; the next ones call it with the arguments in signature order -- the keyword constexprs
    and the defaults after the positional ones -- the canonical grid and the current stream."""
    from sphereops_kernels.plans import LaunchMemo
    kernel, memo = _JitKernel(), LaunchMemo()
    grid = lambda meta: (meta["n"] // meta["BLOCK"], 2)                       # noqa: E731
    for address in (0x1000, 0x2000, 0x3000):
        x, out = _CudaTensor(address), _CudaTensor(address + 0x100)
        L.launch(kernel, grid, (x, out, 64), {"BLOCK": 16, "num_warps": 4}, "op", memo)
    assert len(kernel.calls) == 1
    runs = kernel.compiled.runs
    assert len(runs) == 2
    for run, address in zip(runs, (0x2000, 0x3000)):
        assert run[:9] == (4, 2, 1, 7, "function", "packed", None, None, None)
        assert [getattr(a, "address", a) for a in run[9:]] == [address, address + 0x100, 64, 16,
                                                                 True]


def test_direct_launches_fall_back_to_triton(direct, cuda_tensors, monkeypatch):
    """Triton's path again for a pointer no longer 16-byte aligned (the kept kernel assumed it),
    while a launch hook is set (it needs JITFunction.run's metadata), and never kept with
    SPHEREOPS_DIRECT_LAUNCH=0 or without a memo."""
    from sphereops_kernels.plans import LaunchMemo

    def launches(memo, addresses):
        kernel = _JitKernel()
        for address in addresses:
            L.launch(kernel, (1,), (_CudaTensor(address), _CudaTensor(0x8000), 5),
                     {"BLOCK": 16}, "op", memo)
        return len(kernel.calls), len(kernel.compiled.runs)

    assert launches(LaunchMemo(), (0x1000, 0x1000, 0x1002, 0x1000)) == (2, 2)
    # kept while unaligned: that kernel takes any pointer
    assert launches(LaunchMemo(), (0x1002, 0x1000, 0x1004)) == (1, 2)
    assert launches(None, (0x1000, 0x1000)) == (2, 0)
    direct.launch_enter_hook.calls.append(print)
    assert launches(LaunchMemo(), (0x1000, 0x1000)) == (2, 0)
    direct.launch_enter_hook.calls.clear()
    direct.launch_exit_hook = print
    assert launches(LaunchMemo(), (0x1000, 0x1000)) == (2, 0)
    direct.launch_exit_hook = None
    monkeypatch.setattr(L, "DIRECT_LAUNCH", False)
    assert launches(LaunchMemo(), (0x1000, 0x1000)) == (2, 0)


def test_a_site_with_a_keyword_tensor_or_pre_run_hooks_is_not_kept(direct, cuda_tensors):
    from sphereops_kernels.plans import LaunchMemo
    kernel, memo = _JitKernel(), LaunchMemo()
    for _ in range(2):   # a tensor among the trailing arguments would be stale next time
        L.launch(kernel, (1,), (_CudaTensor(0), _CudaTensor(0)),
                 {"n": _CudaTensor(0), "BLOCK": 16}, "op", memo)
    assert (len(kernel.calls), len(kernel.compiled.runs)) == (2, 0)
    kernel, memo = _JitKernel(), LaunchMemo()
    kernel.pre_run_hooks.append(print)
    for _ in range(2):
        L.launch(kernel, (1,), (_CudaTensor(0), _CudaTensor(0), 3), {"BLOCK": 16}, "op", memo)
    assert (len(kernel.calls), len(kernel.compiled.runs)) == (2, 0)


def test_check_plans_refuses_a_site_whose_arguments_vary(monkeypatch):
    """Under SPHEREOPS_CHECK_PLANS a kept site's later launches must match its first one in
    everything but tensor addresses (alignment: checked at each direct launch) and float
    values (interpreter launches included)."""
    from sphereops_kernels import plans
    monkeypatch.setattr(plans, "CHECK_PLANS", True)
    kernel, memo = _RecordingKernel(), plans.LaunchMemo()
    x = torch.zeros(4)
    L.launch(kernel, (2,), (x, 3, 0.5), {"BLOCK": 16}, "op", memo)
    L.launch(kernel, (2,), (torch.ones(4), 3, 0.25), {"BLOCK": 16}, "op", memo)   # fine
    for args, kwargs, grid in (((x, 4, 0.5), {"BLOCK": 16}, (2,)),
                               ((x, 3, 0.5), {"BLOCK": 32}, (2,)),
                               ((x, 3, 0.5), {"BLOCK": 16}, (3,)),
                               ((x.half(), 3, 0.5), {"BLOCK": 16}, (2,)),
                               ((x, None, 0.5), {"BLOCK": 16}, (2,))):
        with pytest.raises(AssertionError, match="other arguments than at its first launch"):
            L.launch(kernel, grid, args, kwargs, "op", memo)
    assert len(kernel.calls) == 2


def test_memos_do_not_make_plans_differ():
    """CHECK_PLANS compares a kept plan with a rebuilt one: memos, kept or not, are equal."""
    from sphereops_kernels.plans import LaunchMemo
    kept = LaunchMemo()
    kept.compiled = object()
    assert types.SimpleNamespace(a=1, launch=kept) == types.SimpleNamespace(a=1,
                                                                            launch=LaunchMemo())
    assert LaunchMemo() != object()


def test_direct_launches_hand_the_launcher_what_triton_does():
    """bench.stand_in_gpu --check in a fresh process (compiled kernels need TRITON_INTERPRET
    unset): over GEMM, depthwise and linear layers (layouts, staging, flat K, groups, sigmoid,
    a big batch), kept plans' direct launches give triton's CUDA launcher the same compiled
    kernel (sm_90 cubin), grid, stream and arguments as JITFunction.run, no launch goes
    through it from the third call on, and a misaligned input goes back to it."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "bench.stand_in_gpu", "--check"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(" ok") == 9, out.stdout
