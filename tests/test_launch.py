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
