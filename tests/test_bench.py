"""Tests of the benchmark suite (bench/): shapes, providers, spot checks, runner, report.

CPU only, tiny shapes.  Every provider is run for real (no stubs) and compared with the float64
reference; the stubs below exist only to prove that the runner refuses to time a wrong provider
and survives a crashing one.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:          # `bench` is a folder of the repository, not installed
    sys.path.insert(0, str(REPO))

from bench import e2e as E  # noqa: E402
from bench import providers as P  # noqa: E402
from bench import report as REP  # noqa: E402
from bench import runner as RN  # noqa: E402
from bench import shapes as S  # noqa: E402
from bench import timing as T  # noqa: E402
from sphereops import reference as R  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Shapes file
# ---------------------------------------------------------------------------------------------

def test_shapes_file_is_valid():
    S.validate_all()
    assert {s.net for s in S.FULL} >= {"spherenet9", "sphereresnet32", "resnet18", "resnet50", "edge"}
    for subset in (S.QUICK, S.SWEEP):
        assert all(S.BY_NAME[s.name] == s for s in subset)
    # The edge cases the issue asks for are present.
    assert any(s.c_in == 3 for s in S.FULL)
    assert any(s.kh == 1 and s.kw == 1 for s in S.FULL)
    assert any(s.stride == 2 for s in S.FULL)
    assert any(s.groups == s.c_in == s.c_out for s in S.FULL)          # depthwise
    assert any(s.h % 2 == 1 and s.dilation > 1 for s in S.FULL)         # odd, dilated
    assert S.CRITERION.label() == "32x64x32x32->64 3x3 p1"


@pytest.mark.parametrize("shape", S.FULL + S.TINY, ids=lambda s: s.name)
def test_shape_counts_match_torch(shape):
    """Output size and FLOPs agree with what torch itself computes (on meta tensors: free)."""
    x = torch.empty(shape.n, shape.c_in, shape.h, shape.w, device="meta", requires_grad=True)
    w = torch.empty(shape.c_out, shape.c_in // shape.groups, shape.kh, shape.kw, device="meta",
                    requires_grad=True)
    with FlopCounterMode(display=False) as fwd_counter:
        y = F.conv2d(x, w, None, shape.stride, shape.padding, shape.dilation, shape.groups)
    assert tuple(y.shape[2:]) == shape.out_hw
    assert fwd_counter.get_total_flops() == shape.flops("fwd")
    with FlopCounterMode(display=False) as bwd_counter:
        y.backward(torch.empty_like(y))
    if shape.groups == 1:
        assert bwd_counter.get_total_flops() == shape.flops("bwd")
    else:
        # torch's counter ignores groups in convolution_backward; dgrad + wgrad = 2 forwards.
        assert shape.flops("bwd") == 2 * fwd_counter.get_total_flops()
    item = 2
    ho, wo = shape.out_hw
    x_b, w_b, y_b = x.numel() * item, w.numel() * item, shape.n * shape.c_out * ho * wo * item
    assert shape.min_bytes("fwd", item) == x_b + w_b + y_b
    assert shape.min_bytes("fwd+bwd", item) == (x_b + w_b + y_b) + (y_b + 2 * x_b + 2 * w_b)


@pytest.mark.parametrize("bad, field", [
    (dict(groups=3), "groups"), (dict(padding=-1), "padding"), (dict(n=0), "n"),
    (dict(h=1, w=1, padding=0), "empty output"),
])
def test_shape_validation_names_the_problem(bad, field):
    import dataclasses
    shape = dataclasses.replace(S.TINY[0], **bad)
    with pytest.raises(ValueError, match=field):
        shape.validate()


# ---------------------------------------------------------------------------------------------
# Providers: each one for real, against the float64 reference
# ---------------------------------------------------------------------------------------------

def _provider_vs_reference(provider, operator, dtype_name, shape, layout="nchw", backend=None):
    dtype, tf32 = RN.DTYPES[dtype_name]
    spec = P.RowSpec(shape=shape, dtype=dtype, device=CPU, operator=operator,
                     channels_last=(layout == "channels_last"), tf32=tf32, sphereops_backend=backend)
    inputs = RN.build_conv_inputs(shape, dtype, spec.channels_last, operator, CPU, copies=2)
    fn = P.make_conv(provider, spec)
    x, w, b, k = inputs.sets[1]
    y = fn(x, w, b, k)
    grads = torch.autograd.grad(y, inputs.diff[1], inputs.dys[1])
    # Independent oracle: float64 autograd through PyTorch primitives.
    leaves = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
              for t in (x, w, b, k)]
    if P.provider_computes_sphere(provider):
        y64 = R.conv2d_autograd(*leaves, spec.stride, spec.padding, spec.dilation, shape.groups,
                                spec.sphere_operator, spec.eps)
    else:
        y64 = F.conv2d(leaves[0], leaves[1], leaves[2], spec.stride, spec.padding, spec.dilation,
                       shape.groups)
    want = [t for t in leaves if t is not None and t.requires_grad]
    grads64 = torch.autograd.grad(y64, want, inputs.dys[1].double())
    rtol = {"fp64": 1e-9, "fp32": 2e-4}[dtype_name]
    assert_close(y, y64, rtol=rtol, atol=rtol, name=f"{provider} y")
    names = ["dx", "dw", "db", "dk"]
    for name, g, g64 in zip(names, grads, grads64):
        assert_close(g, g64, rtol=10 * rtol, atol=10 * rtol, name=f"{provider} {name}")
    return spec


@pytest.mark.parametrize("provider", ["unfused_official", "unfused_best", "conv2d", "sphereops"])
@pytest.mark.parametrize("operator", P.BENCH_OPERATORS)
@pytest.mark.parametrize("dtype_name", ["fp64", "fp32"])
def test_eager_providers_match_float64(provider, operator, dtype_name):
    if provider == "conv2d" and operator != "linear":
        pytest.skip("the plain conv has no operator: tested once")
    shape = S.TINY[1] if operator in ("sigmoid", "learnable") else S.TINY[0]
    layout = "channels_last" if operator == "cosine" else "nchw"
    _provider_vs_reference(provider, operator, dtype_name, shape, layout)


def test_sphereops_provider_with_triton_interpreter():
    """The fused provider on CPU through the interpreter, when the kernels exist."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not set")
    try:
        import sphereops_kernels.conv_fwd  # noqa: F401
        import sphereops_kernels.conv_bwd  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the Triton conv kernels are not there yet: {exc}")
    spec = _provider_vs_reference("sphereops", "linear", "fp32", S.TINY[0], backend="triton")
    assert spec.notes["sphereops_backend"] == "triton"


def test_compiled_provider_is_checked_and_timed_in_every_mode():
    """torch.compile of the closed-form path: traced whole (fullgraph), passes the float64 spot
    check (learnable k: dk too), and times fwd, bwd (a fresh graph per call: compiled backwards
    refuse retain_graph) and fwd+bwd."""
    cfg = _tiny_cfg(providers=("compiled_best",), compile=True,
                    configs=[("fp32", "nchw", "learnable")])
    res = RN.Runner(cfg).run()
    recs = [r for r in res["records"] if r["provider"] == "compiled_best"]
    assert {r["mode"]: r["status"] for r in recs} == {m: "ok" for m in S.MODES}, recs
    assert recs[0]["notes"].get("compiled_variant") == "closed_form", recs[0]["notes"]
    assert set(recs[0]["check"]) == {"y", "dx", "dw", "db", "dk"}


@pytest.mark.parametrize("provider", ["sphereops", "unfused_official", "linear"])
@pytest.mark.parametrize("operator", ["linear", "learnable"])
def test_linear_providers_match_float64(provider, operator):
    if provider == "linear" and operator != "linear":
        pytest.skip("F.linear has no operator: tested once")
    spec = P.RowSpec(shape=S.LINEAR_TINY[0], dtype=torch.float64, device=CPU, operator=operator)
    inputs = RN.build_linear_inputs(S.LINEAR_TINY[0], torch.float64, operator, CPU, copies=1)
    fn = P.make_linear(provider, spec)
    ref = RN.linear_reference(inputs, spec, P.provider_computes_sphere(provider))
    ok, errors = RN.spot_check(fn, inputs, ref, "fp64")
    assert ok, errors
    assert set(errors) >= {"y", "dx", "dw", "db"} | ({"dk"} if operator == "learnable" else set())


def test_official_unfused_is_the_papers_sigmoid():
    """The official-style sigmoid (paper form) equals the reference's tanh form in float64."""
    c = torch.linspace(-0.999, 0.999, 101, dtype=torch.float64).reshape(1, -1, 1, 1)
    k = torch.full((101,), 0.3, dtype=torch.float64)
    # A 1x1 conv with an identity filter on unit-norm "patches" reproduces c exactly.
    x = torch.stack([c, torch.sqrt(1 - c * c)], dim=1).reshape(1, 2, 101, 1)
    w = torch.tensor([[1.0, 0.0]], dtype=torch.float64).reshape(1, 2, 1, 1)
    y = P.official_unfused_conv2d(x, w, None, k[:1], (1, 1), (0, 0), (1, 1), 1, "sigmoid", 0.0)
    want = R.g_of_c(c.reshape(1, 1, 101, 1), "sigmoid", torch.tensor(0.3, dtype=torch.float64))
    assert torch.allclose(y, want, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Spot check, errors, budget
# ---------------------------------------------------------------------------------------------

def _tiny_cfg(**kw):
    base = dict(device=CPU, budget_s=None, compile=False, e2e=False, linear=False, criterion=False,
                conv_shapes=[S.TINY[0]], configs=[("fp32", "nchw", "linear")], target_s=0.01,
                verbose=False)
    base.update(kw)
    return RN.RunConfig(**base)


def test_wrong_provider_is_never_timed(monkeypatch):
    # A provider that computes the cosine operator when "linear" is asked for: plausible numbers,
    # wrong function.
    def wrong_factory(spec):
        return lambda x, w, b, k: P.official_unfused_conv2d(x, w, b, k, spec.stride, spec.padding,
                                                            spec.dilation, spec.shape.groups,
                                                            "cosine", spec.eps)
    monkeypatch.setitem(P.CONV_FACTORIES, "unfused_official", wrong_factory)
    run = RN.Runner(_tiny_cfg(providers=("unfused_official", "conv2d")))
    res = run.run()
    wrong = [r for r in res["records"] if r["provider"] == "unfused_official"]
    assert len(wrong) == 3 and all(r["status"] == "wrong" for r in wrong)
    assert all("median_ms" not in r for r in wrong)
    assert float(wrong[0]["check"]["y"]) > RN.SPOT_RTOL["fp32"]
    assert all(r["status"] == "ok" for r in res["records"] if r["provider"] == "conv2d")


def test_crashing_provider_is_recorded_and_run_goes_on(monkeypatch):
    def crash(spec):
        def call(x, w, b, k):
            raise RuntimeError("kernel exploded")
        return call
    monkeypatch.setitem(P.CONV_FACTORIES, "unfused_official", crash)
    res = RN.Runner(_tiny_cfg(providers=("unfused_official", "conv2d"))).run()
    errs = [r for r in res["records"] if r["provider"] == "unfused_official"]
    assert errs and all(r["status"] == "error" and "kernel exploded" in r["error"] for r in errs)
    assert {r["mode"] for r in res["records"] if r["provider"] == "conv2d" and r["status"] == "ok"} == set(S.MODES)
    assert "kernel exploded" in REP.summary_markdown(res)


def test_spent_budget_skips_and_says_so():
    res = RN.Runner(_tiny_cfg(budget_s=0.0, providers=("conv2d",))).run()
    assert res["records"] and all(r["status"] == "skipped" for r in res["records"])
    assert res["config"]["skipped_for_budget"] == len(res["records"])
    assert "skipped for the budget" in REP.summary_markdown(res)


def test_a_failed_capture_stops_that_provider_then_all():
    """One provider's failed CUDA-graph capture stops its own captures only; a second
    provider's stops every capture (the process's CUDA state may be what is broken)."""
    run = RN.Runner(_tiny_cfg())
    assert run.capture_allowed("compiled_best") and run.capture_allowed("sphereops")
    run.capture_failed("compiled_best", "fwd+bwd", "AcceleratorError: capture")
    assert not run.capture_allowed("compiled_best")
    assert run.capture_allowed("sphereops") and run.capture_allowed("conv2d")
    assert any("compiled_best" in n for n in run.notes)
    run.capture_failed("sphereops", "fwd", "AcceleratorError: capture")
    assert not run.capture_allowed("conv2d") and not run.graphs_ok
    assert "stopped after failed captures of compiled_best, sphereops" in run.notes[-1]


def test_measure_times_what_it_runs():
    import time
    res = T.measure(lambda i: time.sleep(0.004), CPU, 2, warmup=1, min_reps=3, max_reps=5,
                    target_s=0.01)
    assert 3.5 <= res["median_ms"] < 200 and 3 <= res["reps"] <= 5 and res["copies"] == 2
    assert res["p20_ms"] <= res["median_ms"] <= res["p80_ms"]


def test_floor_is_the_larger_of_compute_and_bytes():
    ceilings = {"matmul_tflops_bf16": 100.0, "copy_gbs": 1000.0}
    # 1 TFLOP at 100 TFLOP/s = 10 ms; 1 GB at 1000 GB/s = 1 ms -> compute-bound.
    assert math.isclose(T.floor_ms(1e12, 1e9, ceilings, torch.bfloat16, False), 10.0)
    assert math.isclose(T.floor_ms(1e9, 1e11, ceilings, torch.bfloat16, False), 100.0)
    assert T.floor_ms(1e9, 1e9, ceilings, torch.float32, False) is None   # fp32 peak unmeasured


# ---------------------------------------------------------------------------------------------
# A whole (tiny) run, its files, the report and the comparison
# ---------------------------------------------------------------------------------------------

def test_tiny_run_writes_json_markdown_png_and_compares(tmp_path, capsys):
    cfg = _tiny_cfg(configs=[("fp32", "nchw", "linear"), ("fp32", "channels_last", "learnable")],
                    linear=True, linear_shapes=S.LINEAR_TINY, e2e=True, e2e_batch=2,
                    e2e_widths=(4, 8, 8), e2e_units=1, criterion=True,
                    criterion_shape=S.TINY[0], criterion_rounds=2, criterion_operators=("linear",))
    jobs = RN.plan(cfg) + ["e2e", "criterion"]
    res = RN.Runner(cfg).run(jobs)
    ok = [r for r in res["records"] if r["status"] == "ok"]
    by = {(r["kind"], r["operator"], r["provider"], r["mode"]) for r in ok}
    for mode in S.MODES:
        for prov in ("sphereops", "unfused_official", "conv2d"):
            op = "-" if prov == "conv2d" else "linear"
            assert ("conv", op, prov, mode) in by
        assert ("conv", "learnable", "sphereops", mode) in by
        assert ("linear", "linear", "sphereops", mode) in by
    for r in ok:
        assert r["median_ms"] > 0 and r["reps"] >= 5 and r["tflops"] > 0 and "check" in r
        assert r["time_ms"] == r["min_ms"]          # a CPU run compares minima (shared machine)
        if r["provider"] != "conv2d" and r["kind"] == "conv":
            assert "conv2d" in r["ratio_to"]
    assert {e["variant"] for e in res["e2e"] if e["status"] == "ok"} == {"plain", "sphereops",
                                                                         "sphereops_save_output"}
    assert res["criterion"][0]["status"] == "ok" and res["criterion"][0]["ratio"] > 0
    meta = res["meta"]
    for key in ("device_name", "torch", "triton", "commit", "tf32_flags_at_start", "date"):
        assert key in meta

    path = RN.write_json(res, tmp_path / f"{RN.output_stem(res)}.json")
    assert path.name.endswith(".json") and "_cpu_" in path.name
    loaded = json.loads(path.read_text())
    paths = REP.write_report(loaded, path)
    md = paths["md"].read_text()
    assert "Geomean time ratio" in md and "All rows" in md and "criterion" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The CLI regenerates the report from the JSON alone, and compares two runs.
    other = json.loads(path.read_text())
    for r in other["records"]:
        if r.get("status") == "ok":
            r["time_ms"] *= 2.0
    other_path = tmp_path / "older.json"
    other_path.write_text(json.dumps(other))
    assert REP.main([str(path), "--out-dir", str(tmp_path / "again"), "--no-plot"]) == 0
    assert (tmp_path / "again" / f"{path.stem}.md").exists()
    assert REP.main([str(path), "--compare", str(other_path)]) == 0
    text = capsys.readouterr().out
    assert "0.500x" in text          # every row is exactly twice as fast in the "new" run


def test_report_geomeans_and_goals_from_a_hand_made_json():
    def rec(shape, provider, mode, ms, op="linear"):
        return {"kind": "conv", "shape": shape, "net": "x", "label": shape, "dtype": "bf16",
                "layout": "channels_last", "operator": op, "provider": provider, "mode": mode,
                "status": "ok", "median_ms": ms}
    records = []
    for shape, fused in (("a", 2.0), ("b", 8.0)):
        for mode in S.MODES:
            records += [rec(shape, "conv2d", mode, 1.0, "-"), rec(shape, "sphereops", mode, fused),
                        rec(shape, "unfused_official", mode, 3 * fused)]
    results = {"meta": {"device_name": "Fake GPU", "device_type": "cuda"},
               "config": {"headline": RN.HEADLINE}, "records": records, "e2e": [], "criterion": []}
    md = REP.summary_markdown(results)
    # geomean(2, 8) = 4 vs the conv; official-style is exactly 3x slower everywhere.
    assert "4.00x (2)" in md and "3.00x (2)" in md
    goals = {g[0].split(" (")[0]: g for g in REP.goal_rows(results)}
    assert goals["fused fwd+bwd time / cuDNN fwd+bwd"][3] == "FAIL"
    assert goals["speed-up over eager official-style unfused"][3] == "PASS"
    assert goals["speed-up over torch.compile(best unfused)"][3] == "not measured"


def test_device_time_ratios_goals_and_derived_backward():
    """CUDA-graph device times: the backward's is fwd+bwd minus fwd, ratios are taken between
    device times only, and the goals are stated on both bases (device first, then eager)."""
    def rec(shape, provider, mode, eager, device, op="linear"):
        r = {"kind": "conv", "shape": shape, "net": "x", "label": shape, "dtype": "bf16",
             "layout": "channels_last", "operator": op, "provider": provider, "mode": mode,
             "status": "ok", "median_ms": eager, "flops": 1e9}
        if device is not None and mode != "bwd":
            r["graph_ms"] = device
        return r
    records, timed = [], {}
    for shape in ("a", "b"):
        # eager: every call host-bound at 1 ms; device: sphereops 1.5x the conv, fwd 1/3 of fwd+bwd
        for prov, op, scale in (("conv2d", "-", 1.0), ("sphereops", "linear", 1.5),
                                ("unfused_official", "linear", None)):
            per_mode = {}
            for mode in S.MODES:
                device = None if scale is None else scale * {"fwd": 0.1, "fwd+bwd": 0.3}.get(mode, 0)
                per_mode[mode] = rec(shape, prov, mode, 1.0, device, op)
                records.append(per_mode[mode])
            RN._derive_backward_device_time({(prov, m): r for m, r in per_mode.items()})
    bwd = [r for r in records if r["provider"] == "sphereops" and r["mode"] == "bwd"][0]
    assert bwd["graph_ms"] == pytest.approx(1.5 * 0.2) and bwd["graph_basis"] == "fwd+bwd - fwd"
    assert bwd["graph_tflops"] == pytest.approx(1e9 / (0.3e-3) / 1e12)
    assert "graph_ms" not in [r for r in records if r["provider"] == "unfused_official"][1]
    RN.compute_ratios(records)
    assert bwd["graph_ratio_to"]["conv2d"] == pytest.approx(1.5)
    assert bwd["ratio_to"]["conv2d"] == pytest.approx(1.0)
    assert "unfused_official" not in bwd["graph_ratio_to"]      # no device time there
    results = {"meta": {"device_name": "Fake GPU", "device_type": "cuda"},
               "config": {"headline": RN.HEADLINE}, "records": records, "e2e": [], "criterion": []}
    goals = [g for g in REP.goal_rows(results) if g[0].startswith("fused fwd+bwd time")]
    assert [g[0].split("; ")[-2] for g in goals] == ["device time, CUDA graph", "eager, host included"]
    assert [g[1] for g in goals] == ["1.50x", "1.00x"]
    md = REP.summary_markdown(results)
    assert "device time, CUDA graph" in md and "1.50x (2)" in md


def test_device_time_needs_cuda_and_a_whole_step():
    with pytest.raises(RuntimeError, match="CUDA"):
        T.measure_graph(lambda i: None, torch.device("cpu"), 1, 1.0)


def test_host_overhead_report_runs_on_cpu(capsys):
    from bench import host_overhead
    assert host_overhead.main(["--device", "cpu", "--calls", "3", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "sphere_conv2d fwd+bwd" in out and "F.conv2d fwd" in out and "cProfile" in out


def test_host_overhead_with_stubbed_launches_makes_no_launch(capsys):
    """--stub-launches: the Triton backend's Python runs on the GPU run's layer, every launch a
    counted no-op (none reaches a kernel: the interpreter would take minutes at that size), and
    the real launch function is back afterwards."""
    from bench import host_overhead
    from sphereops_kernels import conv_bwd, launch
    assert host_overhead.main(["--stub-launches", "--calls", "2", "--top", "3"]) == 0
    out = capsys.readouterr().out
    # 2 + 3: the forward's preparation and GEMM; the backward's prep, dgrad and the wgrad that
    # finishes dw
    assert "2 launches a forward, 5 a forward+backward not made" in out
    assert "sphere_conv2d fwd+bwd" in out and "F.conv2d" not in out
    assert conv_bwd.launch is launch.launch


def test_tile_sweep_checks_every_tile_against_float64(monkeypatch):
    """bench.tile_sweep's rows (here under the interpreter, device time stubbed): each tile's
    result checked against the float64 reference, a tile that fails to run is a row too, the
    backward tile override is undone afterwards."""
    from bench import tile_sweep as TS
    from sphereops_kernels import conv_bwd as CB
    from sphereops_kernels import conv_fwd as CF
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the kernels through the Triton interpreter")
    monkeypatch.setattr(T, "measure_graph", lambda step, *a, **k: (step(), {"graph_ms": 0.5})[1])
    shape = S.ConvShape("tiny", "t", 2, 16, 16, 6, 6, 3, 3, 1, 1)
    tiles = {"fwd": ["32x16x16s1w4"], "fwd_prepass": ["32x16x16s1w4"], "dgrad": ["32x16x16s1w4"],
             "wgrad": ["16x16x32s1w4"]}
    real_dgrad = CB.dgrad_config
    rows = TS.sweep_layer(shape, torch.float32, TS.KERNELS, tiles, CPU, 100.0, float("inf"))
    assert CB.dgrad_config is real_dgrad
    assert [r[:3] for r in rows] == [["fwd", "32x16x16s1w4", "ok"], ["fwd_prepass", "32x16x16s1w4", "ok"],
                                     ["dgrad", "32x16x16s1w4", "ok"], ["wgrad", "16x16x32s1w4", "ok"]]
    assert all(float(r[6]) < 1e-4 for r in rows)           # fp32 kernels vs float64
    flops = shape.gemm_flops
    assert rows[0][4] == f"{flops / 0.5e-3 / 1e12:.1f}"
    # the cosine operator (no arccos in the epilogue), against its own float64 reference
    rows = TS.sweep_layer(shape, torch.float32, ("fwd", "dgrad"), tiles, CPU, 100.0, float("inf"),
                          operator="cosine")
    assert [r[2] for r in rows] == ["ok", "ok"] and all(float(r[6]) < 1e-4 for r in rows)

    real_impl = CF._sphere_conv2d_fwd_impl

    def broken(*args, config=None, **kwargs):
        if config is not None:          # the swept tile; the set-up forward runs normally
            raise RuntimeError("out of resources: shared memory")
        return real_impl(*args, **kwargs)
    monkeypatch.setattr(CF, "_sphere_conv2d_fwd_impl", broken)
    rows = TS.sweep_layer(shape, torch.float32, ("fwd",), tiles, CPU, 100.0, float("inf"))
    assert rows[0][2].startswith("error: RuntimeError: out of resources")
    with pytest.raises(ValueError, match="powers of two"):
        TS.parse_tile("100x64x64s3w4")


def test_e2e_model_builds_from_the_models_package_when_present():
    model, source = E.build_model("linear", "reference", (4, 8, 8), 1)
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert source in ("sphereops.models.SphereResNet32", "bench.e2e.FallbackResNet")
    fallback = E.FallbackResNet("learnable", (4, 8, 8), 1, backend="reference")
    assert fallback(torch.randn(2, 3, 8, 8)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def test_cli_rejects_bad_arguments(capsys):
    from bench.__main__ import main
    assert main(["--shapes", "no.such.layer", "--device", "cpu"]) == 2
    assert "unknown layer" in capsys.readouterr().err
    assert main(["--providers", "cudnn9000", "--device", "cpu"]) == 2


def test_gpu_check_script_is_valid_bash():
    script = REPO / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "unset TRITON_INTERPRET" in text and "--no-build-isolation --no-deps -e ." in text
    assert "-m gpu tests" in text and "-m bench" in text


def test_pytest_benchmark_entry_point_writes_its_json(tmp_path):
    """``pytest bench/ --benchmark-json`` works (tiny suite, a few rounds)."""
    out = tmp_path / "bench.json"
    # the child is a fresh pytest: drop the interpreter switch and pytest-xdist's worker variables
    # (pytest-benchmark disables itself when it believes it runs under xdist)
    env = {k: v for k, v in os.environ.items()
           if k != "TRITON_INTERPRET" and not k.startswith(("PYTEST_", "PYTEST_XDIST"))}
    cmd = [sys.executable, "-m", "pytest", "bench/test_conv_bench.py", "-q", "-p", "no:cacheprovider",
           "--bench-suite=tiny", "-k", "test_conv and (conv2d or unfused_official)",
           "--benchmark-json", str(out), "--benchmark-max-time=0.01", "--benchmark-min-rounds=2",
           "--benchmark-warmup=off"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    names = {b["extra_info"]["provider"] for b in data["benchmarks"]}
    assert names == {"conv2d", "unfused_official"}
    assert all(b["stats"]["median"] > 0 and b["extra_info"]["spot_check"] for b in data["benchmarks"])


def test_gpu_plan_puts_the_headline_first_and_covers_every_config():
    """The quick CUDA plan (built without a GPU: planning touches no device)."""
    cfg = RN.RunConfig(device=torch.device("cuda"))
    jobs = RN.plan(cfg)
    conv = [j for j in jobs if isinstance(j, RN.ConvJob)]
    n = len(S.QUICK)
    head = jobs[:n]
    assert all(isinstance(j, RN.ConvJob) and (j.dtype, j.layout, j.operator) ==
               ("bf16", "channels_last", "linear") and "compiled_best" not in j.providers
               and {"sphereops", "conv2d", "unfused_official", "unfused_best"} <= set(j.providers)
               for j in head)
    assert [j.shape for j in head] == S.QUICK
    assert jobs[n] == "e2e"
    compiled = [j for j in conv if j.providers == ("compiled_best",)]
    assert [j.shape for j in compiled] == S.QUICK
    assert any(isinstance(j, RN.LinearJob) for j in jobs)
    configs = {(j.dtype, j.layout, j.operator) for j in conv}
    assert configs >= {("bf16", "channels_last", op) for op in P.BENCH_OPERATORS}
    assert configs >= {("fp16", "channels_last", "linear"), ("tf32", "channels_last", "linear"),
                       ("fp32", "channels_last", "linear"), ("bf16", "nchw", "linear")}
    nchw = {j.shape.name for j in conv if j.layout == "nchw" and j.tier == "dtypes"}
    assert {"edge.depthwise", "r18.l3"} <= nchw
    full = RN.plan(RN.RunConfig(device=torch.device("cuda"), full=True))
    assert {j.shape.name for j in full if isinstance(j, RN.ConvJob)} == {s.name for s in S.FULL}
    assert "criterion" not in jobs and RN.plan(_tiny_cfg(configs=None, criterion=True))[0] == "criterion"


@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
@pytest.mark.parametrize("operator", ["linear", "learnable"])
@pytest.mark.parametrize("provider", ["unfused_official", "sphereops", "conv2d"])
def test_low_precision_providers_pass_the_spot_check(provider, operator, dtype_name):
    """The spot-check bounds let every honest low-precision provider through (a baseline that
    fails them on the GPU would silently lose its rows)."""
    if provider == "conv2d" and operator != "linear":
        pytest.skip("the plain conv has no operator: tested once")
    shape = S.TINY[1]
    dtype, _ = RN.DTYPES[dtype_name]
    spec = P.RowSpec(shape=shape, dtype=dtype, device=CPU, operator=operator, channels_last=True)
    inputs = RN.build_conv_inputs(shape, dtype, True, operator, CPU, copies=1)
    if provider == "conv2d":
        inputs = inputs.without_k()
    ref = RN.conv_reference(inputs, spec, P.provider_computes_sphere(provider))
    ok, errors = RN.spot_check(P.make_conv(provider, spec), inputs, ref, dtype_name)
    assert ok, errors
    # ... and the bound is not vacuous: the same provider's result with the bias dropped fails.
    x, w, b, k = inputs.sets[0]
    fn = P.make_conv(provider, spec)
    ok_wrong, _ = RN.spot_check(lambda x_, w_, b_, k_: fn(x_, w_, None, k_) + 0 * b_.sum(),
                                inputs, ref, dtype_name)
    assert not ok_wrong


def test_criterion_default_then_steady_allocator_in_a_fresh_process():
    """The criterion's two allocator regimes (the steady one changes glibc's knobs for the rest
    of the process, so it runs in its own interpreter here): both rows measured, page faults
    counted, the steady pass labelled as such."""
    code = (
        "import json, torch\n"
        "from bench import e2e, shapes\n"
        "rows = e2e.run_criterion(torch.device('cpu'), rounds=2, operators=('cosine',),\n"
        "                         shape=shapes.TINY[0])\n"
        "print(json.dumps([{k: r.get(k) for k in ('allocator', 'status', 'ratio', 'sphere_faults')}\n"
        "                  for r in rows]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout
    rows = json.loads(out.strip().splitlines()[-1])
    assert [r["allocator"] for r in rows][0] == "default"
    assert all(r["status"] == "ok" and r["ratio"] > 0 for r in rows)
    if sys.platform.startswith("linux"):
        assert [r["allocator"] for r in rows] == ["default", "steady"]
        assert all(isinstance(r["sphere_faults"], (int, float)) for r in rows)


def test_saved_for_backward_counts_the_cosine_once_and_save_output_drops_it():
    """The e2e memory column: with save_output the SphereConv's saved state shrinks by exactly
    its cosine c (the output y is kept by the BatchNorm after it anyway, counted once)."""
    import sphereops.nn as snn
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2,))
    sizes = []
    for save_output in (False, True):
        conv = snn.SphereConv2d(3, 4, 3, padding=1, operator="linear", save_output=save_output,
                                backend="reference")
        model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten())
        sizes.append(E.saved_for_backward_mb(model, x, y, torch.device("cpu"), None))
    c_mib = 2 * 4 * 8 * 8 * 4 / 2 ** 20
    assert sizes[0] - sizes[1] == pytest.approx(c_mib, rel=1e-9)
