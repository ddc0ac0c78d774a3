"""``python -m sphereops.profile`` on CPU: traces, tables, and FLOP accounting.

FLOPs are checked against an independent count, ``torch.utils.flop_counter.FlopCounterMode`` on
the plain-convolution network of the same shape (the same layers, so the SphereConv network's
sphere + plain conv FLOPs must add up to it). Tiny shapes: the whole file runs in seconds.
"""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sphereops import profile


def _conv_flops_by_torch(workload):
    """(forward, backward) convolution FLOPs of one training step, counted by torch."""
    x, target = workload.make_batch()
    with FlopCounterMode(display=False) as counter:
        workload.loss_fn(workload.model(x), target).backward()
    counts = counter.get_flop_counts()["Global"]
    forward = sum(v for k, v in counts.items() if str(k).endswith("aten.convolution"))
    backward = sum(v for k, v in counts.items() if str(k).endswith("aten.convolution_backward"))
    assert forward > 0 and backward > 0, counts
    return forward, backward


def _counted(workload):
    counter = profile.FlopCounter().attach(workload.model)
    x, target = workload.make_batch()
    workload.loss_fn(workload.model(x), target).backward()
    counter.detach()
    return dict(counter.per_family)


@pytest.mark.parametrize("width_mult, units", [(1 / 16, 1), (1 / 8, 2)])
def test_flop_counter_matches_torch(width_mult, units):
    args, device = profile.parse_args(["--device", "cpu", "--width-mult", str(width_mult),
                                       "--units-per-stage", str(units), "--batch", "3"])
    plain = profile._build_resnet(args, None, torch.device("cpu"))
    sphere = profile._build_resnet(args, "cosine", torch.device("cpu"))
    forward, backward = _conv_flops_by_torch(plain)

    plain_counted = _counted(plain)
    assert plain_counted["conv.fwd"] == forward
    # the stem's input needs no gradient: torch counts no dgrad there, neither do we
    assert plain_counted["conv.dgrad"] + plain_counted["conv.wgrad"] == backward
    assert plain_counted["conv.dgrad"] < plain_counted["conv.wgrad"]

    sphere_counted = _counted(sphere)
    assert sphere_counted["sphere.fwd"] > 0 and sphere_counted["conv.fwd"] > 0  # 1x1 shortcuts
    assert sphere_counted["sphere.fwd"] + sphere_counted["conv.fwd"] == forward
    assert sum(sphere_counted[f"{k}.{g}"] for k in ("sphere", "conv")
               for g in ("dgrad", "wgrad")) == backward


def test_layer_flops_match_the_benchmark_shape():
    shapes = pytest.importorskip("bench.shapes")
    shape = shapes.BY_NAME["srn32.s3"].with_batch(1)
    args, _ = profile.parse_args(["--device", "cpu", "--layer", "srn32.s3", "--batch", "1"])
    counted = _counted(profile._build_layer(args, "sigmoid", torch.device("cpu")))
    assert counted["sphere.fwd"] == shape.flops("fwd")
    assert counted["sphere.dgrad"] + counted["sphere.wgrad"] == shape.flops("bwd")


def test_cli_writes_traces_and_prints_tables(tmp_path, capsys):
    assert profile.main(["--device", "cpu", "--out", str(tmp_path), "--warmup", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| kernel | calls | total ms | mean us | % of step | TFLOP/s |") == 2
    for family in ("sphere.fwd", "sphere.bwd", "conv.fwd", "conv.bwd"):
        row = next(line for line in printed.splitlines() if line.startswith(f"| {family} |"))
        assert float(row.split("|")[3]) > 0, row  # total ms of the family
    assert "Step time SphereConv / plain conv" in printed
    report = (tmp_path / "profile.md").read_text()
    assert "SphereResNet-32 (cosine)" in report and "SphereResNet-32 (plain nn.Conv2d)" in report
    for label in ("sphereresnet32_cosine", "sphereresnet32_plain"):
        trace = json.loads((tmp_path / f"trace_{label}.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        assert "aten::convolution" in names
        assert (profile.SPHERE_FORWARD_RANGE in names) == label.endswith("cosine")


def test_family_rows_are_consistent(tmp_path):
    """Family times lie within the profiled wall time; TFLOP/s = FLOPs / time."""
    args, device = profile.parse_args(["--device", "cpu", "--warmup", "0", "--steps", "2"])
    result = profile.profile_workload(profile._build_resnet(args, "linear", device), args, device,
                                      tmp_path)
    assert result.steps == 2 and result.trace.exists()
    assert set(result.family_us) == {"sphere.fwd", "sphere.bwd", "conv.fwd", "conv.bwd"}
    wall_us = result.step_us * result.steps
    assert 0 < sum(result.family_us.values()) <= wall_us * 1.05
    text = profile.format_result(result, top=10, on_gpu=False)
    row = next(line for line in text.splitlines() if line.startswith("| sphere.fwd |"))
    gflop, total_ms, _share, tflops = (float(c) for c in row.strip("|").split("|")[1:])
    assert gflop == pytest.approx(result.flops["sphere.fwd"] / 1e9, rel=1e-3)
    assert tflops == pytest.approx(gflop * 2 / total_ms, rel=2e-2)  # 2 steps, ms -> TFLOP/s


@pytest.mark.parametrize("name, family", [
    ("_sphere_conv_fwd_kernel", "sphere.fwd"),
    ("_sphere_conv_dw_fwd_kernel", "sphere.fwd"),
    ("_dgrad_kernel", "sphere.dgrad"),
    ("_wgrad_kernel", "sphere.wgrad"),
    ("sm90_xmma_fprop_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nhwc_tilesize128x128x32",
     "conv.fwd"),
    ("sm80_xmma_dgrad_implicit_gemm_indexed_f32f32_tf32f32_f32_nhwckrsc_nchw", "conv.dgrad"),
    ("sm90_xmma_wgrad_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nhwc", "conv.wgrad"),
    ("void implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false>", "conv.fwd"),
    ("_prep_kernel", None),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
     None),
])
def test_gpu_kernel_families(name, family):
    assert profile.kernel_family(name, on_gpu=True) == family


def test_sphere_kernel_names_exist():
    """The profiler finds the fused kernels by name: a rename must show up here."""
    from sphereops_kernels import conv_bwd, conv_fwd

    for name in profile.SPHERE_GEMM_KERNELS:
        assert hasattr(conv_fwd, name) or hasattr(conv_bwd, name), name


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--width-mult", "0"], "--width-mult must be > 0"),
    (["--device", "cpu", "--precision", "fp16"], "--precision fp16 needs CUDA"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        profile.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_unknown_layer(tmp_path, capsys):
    assert profile.main(["--device", "cpu", "--layer", "no.such.layer", "--out",
                         str(tmp_path)]) == 2
    assert "--layer: unknown layer 'no.such.layer'" in capsys.readouterr().err


def test_gpu_table_from_synthetic_kernels(tmp_path):
    """The GPU formatting path (no GPU here): per-kernel TFLOP/s only where a family has a
    single kernel, family TFLOP/s = FLOPs / summed kernel time, shares of the wall time."""
    workload = profile.Workload("synthetic", "synthetic step", torch.nn.Identity(), lambda: None,
                                lambda *a: None)
    us = 1e3  # 1 ms
    rows = [profile.Row("_sphere_conv_fwd_kernel", 4, 2 * us, "sphere.fwd"),
            profile.Row("_dgrad_kernel", 4, 3 * us, "sphere.dgrad"),
            profile.Row("sm90_xmma_wgrad_a", 2, 1 * us, "conv.wgrad"),
            profile.Row("sm90_xmma_wgrad_b", 2, 1 * us, "conv.wgrad"),
            profile.Row("void at::native::elementwise_kernel", 8, 0.5 * us, None)]
    flops = {"sphere.fwd": int(4e12), "sphere.dgrad": int(3e12), "conv.wgrad": int(1e12)}
    family_us = {"sphere.fwd": 2 * us, "sphere.dgrad": 3 * us, "conv.wgrad": 2 * us}
    result = profile.ProfileResult(workload, rows, step_us=5 * us, steps=2, flops=flops,
                                   family_us=family_us, trace=tmp_path / "t.json",
                                   forward_span=(4, 6 * us))
    lines = profile.format_result(result, top=10, on_gpu=True).splitlines()
    # kernels 7.5 ms over 2 steps of 5 ms wall; the forward range spans 1.5 ms a call
    assert "Kernels: 3.750 ms per step of 5.000 ms wall (the GPU busy 75% of the step" in "\n".join(lines)
    assert any("4 calls, mean 1500.0 us" in line for line in lines)

    def cells(prefix):
        row = next(line for line in lines if line.startswith(prefix))
        return [c.strip() for c in row.strip("|").split("|")]

    # 4e12 FLOP/step x 2 steps in 2 ms = 4000 TFLOP/s (synthetic numbers)
    assert cells("| `_sphere_conv_fwd_kernel`") == ["`_sphere_conv_fwd_kernel`", "4", "2.000",
                                                    "500.0", "20.0", "4000.00"]
    assert cells("| `_dgrad_kernel`")[-1] == "2000.00"
    assert cells("| `sm90_xmma_wgrad_a`")[-1] == "-"  # two kernels share the family
    assert cells("| conv.wgrad |") == ["conv.wgrad", "1000", "2.000", "20.0", "1e+03"]
    assert cells("| `void at::native::elementwise_kernel`")[-1] == "-"


def test_device_event_filters():
    class Kind:
        def __init__(self, name):
            self.name = name

    class Event:
        def __init__(self, kind, time):
            self.device_type, self.self_device_time_total = Kind(kind), time

    assert profile._is_device_kernel(Event("CUDA", 12.5))
    assert not profile._is_device_kernel(Event("CPU", 12.5))
    assert not profile._is_device_kernel(Event("CUDA", 0.0))
    assert profile._device_time(Event("CUDA", 7.0)) == 7.0
