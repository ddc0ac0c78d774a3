"""End to end: a small SphereConv network trained with the fused Triton path (the interpreter on
CPU, the compiler on a GPU) follows the reference backend's loss curve step by step."""
import copy
import os

import pytest
import torch
from torch import nn

from sphereops.nn import SphereConv2d, SphereLinear

from helpers import record_launches

pytest.importorskip("triton")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _net(backend):
    return nn.Sequential(
        SphereConv2d(3, 16, 3, padding=1, operator="linear", backend=backend),
        nn.ReLU(),
        SphereConv2d(16, 16, 3, stride=2, padding=1, groups=2, operator="sigmoid", learnable_k=True,
                     backend=backend),
        nn.ReLU(),
        SphereConv2d(16, 16, 1, operator="cosine", backend=backend),
        nn.Flatten(),
        SphereLinear(16 * 4 * 4, 5, operator="cosine", backend=backend),
    )


def _train(model, data, steps, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    x, target = data
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x) * 4.0, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1",
                    reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_training_follows_reference(channels_last):
    _check_training(channels_last, allow_tf32=False)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                    reason="CPU interpreter variant (on a GPU the grid path is tf32 for fp32; "
                           "tests/test_gpu.py checks it against float64 there)")
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_training_with_the_grid_forward_follows_reference(channels_last, monkeypatch):
    """The same with SPHEREOPS_FWD_GRID on: the 1x1 16 -> 16 layer's forward runs on the padded
    grid (read in place when channels_last) and its saved state feeds the backward. TF32 is
    allowed so that fp32 qualifies; the interpreter computes it exactly."""
    from sphereops_kernels import conv_fwd_grid

    monkeypatch.setattr(conv_fwd_grid, "ENABLED", True)
    launched = record_launches(monkeypatch, conv_fwd_grid, "launch")[0]
    _check_training(channels_last, allow_tf32=True)
    assert conv_fwd_grid._sphere_conv_fwd_grid_autotuned in [kernel for kernel, _, _ in launched]


def _check_training(channels_last, allow_tf32):
    dev = _device()
    ref_model = _net("reference").to(dev)
    tri_model = copy.deepcopy(ref_model)
    for m in tri_model.modules():
        if hasattr(m, "backend"):
            m.backend = "triton"
    x = torch.randn(4, 3, 8, 8, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        ref_model, tri_model = (m.to(memory_format=torch.channels_last) for m in (ref_model, tri_model))
    target = torch.randint(0, 5, (4,), device=dev)
    with torch.backends.cudnn.flags(allow_tf32=allow_tf32):
        ref = _train(ref_model, (x, target), steps=4)
        tri = _train(tri_model, (x, target), steps=4)
    assert ref[-1] < ref[0], f"the reference run should learn: {ref}"
    for step, (a, b) in enumerate(zip(ref, tri)):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), f"step {step}: reference {ref} vs triton {tri}"
    for (name, p_ref), (_, p_tri) in zip(ref_model.named_parameters(), tri_model.named_parameters()):
        err = (p_ref - p_tri).abs().max().item()
        assert err <= 1e-3 * max(1.0, p_ref.abs().max().item()), f"{name} drifted by {err}"
