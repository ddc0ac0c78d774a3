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
