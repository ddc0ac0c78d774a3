"""Tests of bench.kernel_breakdown: aggregation of profiler events, kernel-name shortening, the
Markdown report, the budget loop, argument checks, the fwd/bwd session split and the no-GPU exit.

CPU only and fast: profiler events are synthetic (plain objects and real ``FunctionEvent``s
with a CUDA device type). The one ``gpu`` test profiles a tiny layer for real (run by
``make gpu-check``): it is what checks the profiler API on the GPU machine's torch.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:          # `bench` is a folder of the repository, not installed
    sys.path.insert(0, str(REPO))

from bench import kernel_breakdown as KB  # noqa: E402
from bench import runner as RN  # noqa: E402
from bench import shapes as S  # noqa: E402

CPU = torch.device("cpu")

CUDNN_FPROP = ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64"
               "_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cudnn")
FILL = ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
        "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)")


def _event(name, us, device="CUDA", annotation=False, **extra):
    return SimpleNamespace(name=name, device_type=SimpleNamespace(name=device),
                           device_time_total=us, is_user_annotation=annotation, **extra)


def _stat(name, provider, pass_name, us, launches=1.0):
    return KB.KernelStat(name, provider, pass_name, launches, us)


def _table_rows(lines, header_start="| kernel |"):
    """Cells of a Markdown table's body rows (after the header and the separator)."""
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------

def test_aggregate_sums_by_name_per_call_and_skips_host_events_and_ranges():
    events = [
        _event("_sphere_conv_fwd_kernel", 100.0), _event("_sphere_conv_fwd_kernel", 110.0),
        _event("_prepare_operands_kernel", 6.0), _event("_prepare_operands_kernel", 4.0),
        _event("Memset (Device)", 1.0),
        # host side: the launch calls and a record_function range with its GPU mirror
        _event("cuLaunchKernel", 7.0, device="CPU"),
        _event("my.range", 500.0, device="CPU", annotation=True),
        _event("my.range", 230.0),
        _event("other.range", 230.0, annotation=True),        # a GPU annotation marked as one
    ]
    stats = KB.aggregate_kernels(events, "sphereops", "fwd", calls=2)
    assert [s.name for s in stats] == ["_sphere_conv_fwd_kernel", "_prepare_operands_kernel",
                                      "Memset (Device)"]          # largest first
    fwd = stats[0]
    assert (fwd.provider, fwd.pass_name, fwd.launches, fwd.device_us) == ("sphereops", "fwd", 1.0, 105.0)
    assert (stats[1].launches, stats[1].device_us) == (1.0, 5.0)
    assert (stats[2].launches, stats[2].device_us) == (0.5, 0.5)  # once in two calls
    totals = KB.pass_totals(stats)
    assert totals[("sphereops", "fwd")] == pytest.approx((2.5, 110.5))
    assert KB.largest_kernel(stats, "sphereops", "fwd") is fwd
    assert KB.largest_kernel(stats, "sphereops", "bwd") is None
    # key_averages()-style rows carry a count: that many launches
    averaged = [_event("_dgrad_kernel", 40.0, count=4)]
    (dgrad,) = KB.aggregate_kernels(averaged, "sphereops", "bwd", calls=4)
    assert (dgrad.launches, dgrad.device_us) == (1.0, 10.0)
    with pytest.raises(ValueError, match="calls"):
        KB.aggregate_kernels(events, "sphereops", "fwd", calls=0)


def test_aggregate_reads_real_function_events():
    """torch's own FunctionEvent (this torch): device time of a CUDA event from its time range,
    also when it is marked async (device_time_total reads 0 there)."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    def fe(i, name, start, end, device_type, **kwargs):
        return FunctionEvent(id=i, name=name, thread=0, start_us=start, end_us=end,
                             use_device="cuda", device_type=device_type, **kwargs)

    events = EventList([
        fe(1, "aten::conv2d", 0, 50, DeviceType.CPU),
        fe(2, "cudaLaunchKernel", 1, 3, DeviceType.CPU),
        fe(3, CUDNN_FPROP, 10, 35, DeviceType.CUDA),
        fe(4, CUDNN_FPROP, 40, 61, DeviceType.CUDA, is_async=True),
        fe(5, FILL, 70, 72.5, DeviceType.CUDA),
    ])
    assert KB.event_device_us(events[2]) == 25.0
    assert KB.event_device_us(events[3]) == 21.0
    stats = KB.aggregate_kernels(events, "conv2d", "fwd", calls=2)
    assert [(s.name, s.launches, s.device_us) for s in stats] == [(CUDNN_FPROP, 1.0, 23.0),
                                                                  (FILL, 0.5, 1.25)]


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

def test_kernel_names_are_shortened_readably():
    assert KB.shorten_kernel_name("_sphere_conv_fwd_kernel") == "_sphere_conv_fwd_kernel"
    assert KB.shorten_kernel_name("Memset (Device)") == "Memset (Device)"
    assert KB.shorten_kernel_name("Memcpy DtoD (Device -> Device)") == "Memcpy DtoD (Device -> Device)"
    fill = KB.shorten_kernel_name(FILL)
    assert fill == "vectorized_elementwise_kernel<4, FillFunctor<float>, arra..."
    assert len(fill) == KB.NAME_WIDTH
    assert KB.shorten_kernel_name(FILL, width=200) == (
        "vectorized_elementwise_kernel<4, FillFunctor<float>, array<char*, 1ul> >")
    fprop = KB.shorten_kernel_name(CUDNN_FPROP)
    assert fprop == CUDNN_FPROP[:57] + "..." and len(fprop) == 60
    nchw = ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, "
            "float, false, true, (cudnnKernelDataType_t)0>(cudnn::engines_precompiled::"
            "nchw2nhwc_params_t<float>, __nv_bfloat16 const*, __nv_bfloat16*)")
    assert KB.shorten_kernel_name(nchw, width=200) == (
        "nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true, "
        "(cudnnKernelDataType_t)0>")
    anon = "void at::native::(anonymous namespace)::reduce_kernel<512, 1>(int)"
    assert KB.shorten_kernel_name(anon) == "reduce_kernel<512, 1>"
    # two cuDNN names equal up to the cut stay apart in a table
    other = CUDNN_FPROP.replace("tilesize128x128x64", "tilesize128x256x64")
    names = KB.short_names([CUDNN_FPROP, other, "_dgrad_kernel", CUDNN_FPROP])
    assert names == {CUDNN_FPROP: fprop, other: fprop + " #2", "_dgrad_kernel": "_dgrad_kernel"}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _layer_result():
    stats = [
        _stat("_sphere_conv_fwd_kernel", "sphereops", "fwd", 90.0),
        _stat("_prepare_operands_kernel", "sphereops", "fwd", 10.0),
        _stat("_dgrad_kernel", "sphereops", "bwd", 70.0),
        _stat("_wgrad_kernel", "sphereops", "bwd", 100.0),
        _stat("_prep_kernel", "sphereops", "bwd", 25.0),
        _stat("_reduce_partials_kernel", "sphereops", "bwd", 5.0, launches=2.0),
        _stat(CUDNN_FPROP, "conv2d", "fwd", 40.0),
        _stat("sm90_xmma_dgrad_implicit_gemm", "conv2d", "bwd", 45.0),
        _stat("sm90_xmma_wgrad_implicit_gemm", "conv2d", "bwd", 50.0),
        _stat(FILL, "conv2d", "bwd", 5.0, launches=0.5),
    ]
    return KB.LayerResult("sn9.conv1_x", S.BY_NAME["sn9.conv1_x"].label(), stats)


def test_layer_table_columns_totals_and_shares():
    lines = KB.format_layer_table(_layer_result())
    assert lines[0] == "## sn9.conv1_x: 128x128x32x32->128 3x3 p1"
    assert lines[2] == ("| kernel | provider | pass | launches/call | device us/call | "
                        "share of the provider's pass |")
    rows = _table_rows(lines)
    assert all(len(row) == 6 for row in rows)
    # groups in order sphereops fwd, sphereops bwd, cuDNN fwd, cuDNN bwd, each closed by a total
    totals = [row for row in rows if row[0].startswith("**")]
    assert [row[0] for row in totals] == ["**sphereops fwd total**", "**sphereops bwd total**",
                                          "**cuDNN fwd total**", "**cuDNN bwd total**"]
    assert [(row[3], row[4]) for row in totals] == [("2", "100.0"), ("5", "200.0"),
                                                    ("1", "40.0"), ("2.50", "100.0")]
    groups, current = [], []
    for row in rows:
        if row[0].startswith("**"):
            groups.append((current, row))
            current = []
        else:
            current.append(row)
    for kernels, total in groups:
        assert sum(float(r[4]) for r in kernels) == pytest.approx(float(total[4]))
        assert sum(float(r[5].rstrip("%")) for r in kernels) == pytest.approx(100.0, abs=0.2)
        assert all(r[1] == total[1] and r[2] == total[2] for r in kernels)
        us = [float(r[4]) for r in kernels]
        assert us == sorted(us, reverse=True)
    bwd_rows = groups[1][0]
    assert bwd_rows[0] == ["`_wgrad_kernel`", "sphereops", "bwd", "1", "100.0", "50.0%"]
    assert bwd_rows[-1] == ["`_reduce_partials_kernel`", "sphereops", "bwd", "2", "5.0", "2.5%"]
    assert groups[2][0][0][0] == f"`{CUDNN_FPROP[:57]}...`"
    # a layer whose providers failed says so instead of an empty table
    failed = KB.format_layer_table(KB.LayerResult("x", "lbl", [], ["sphereops: RuntimeError: boom"]))
    assert "no device kernels recorded" in failed and "- error: sphereops: RuntimeError: boom" in failed


def test_summary_and_report_across_layers():
    result = _layer_result()
    only_cudnn = KB.LayerResult("edge.odd", "odd", [_stat(CUDNN_FPROP, "conv2d", "fwd", 8.0)],
                                ["sphereops: RuntimeError: boom"])
    header = ["# Kernel breakdown: test", ""]
    note = KB.budget_note(60.0, 2, ["r18.l1", "r18.l3"])
    assert note == ("Budget of 60 s spent after 2 layer(s): not started: r18.l1, r18.l3 "
                    "(rerun with --layers r18.l1,r18.l3).")
    assert KB.budget_note(60.0, 3, []) is None
    text = KB.format_report(header, [result, only_cudnn], ["r18.l1", "r18.l3"], note)
    lines = text.splitlines()
    assert lines[:2] == header and lines[2] == "## Summary"
    rows = _table_rows(lines, "| layer |")
    assert len(rows) == 4 and all(len(row) == 9 for row in rows)
    assert rows[0][:7] == ["sn9.conv1_x", "100.0", "40.0", "2.50x", "200.0", "100.0", "2.00x"]
    assert rows[0][7] == "`_sphere_conv_fwd_kernel` 90.0 us (90.0%)"
    assert rows[0][8] == "`_wgrad_kernel` 100.0 us (50.0%)"
    assert rows[1] == ["edge.odd (errors)", "-", "8.0", "-", "-", "-", "-", "-", "-"]
    assert rows[2][0] == "r18.l1 (skipped: budget)" and rows[3][0] == "r18.l3 (skipped: budget)"
    assert note in lines
    # the per-layer tables follow the summary and the note, in the order measured
    headings = [line for line in lines if line.startswith("## ")]
    assert headings == ["## Summary", f"## sn9.conv1_x: {result.label}", "## edge.odd: odd"]
    assert lines.index(note) < lines.index(headings[1])
    assert KB.budget_note(None, 1, ["r18.l1"]) is None            # no budget: nothing to blame
    interrupted = KB.format_report(header, [], ["r18.l1"], skipped_reason="interrupted")
    assert "| r18.l1 (skipped: interrupted) |" in interrupted


# ---------------------------------------------------------------------------------------------
# Budget loop
# ---------------------------------------------------------------------------------------------

def test_budget_stops_new_layers_and_interrupt_keeps_results():
    shapes = [S.BY_NAME[name] for name in ("sn9.conv1_x", "srn32.s3", "r18.l1")]
    budget = RN.Budget(10.0)
    seen, written = [], []

    def profile(shape):
        seen.append(shape.name)
        budget.start -= 11.0                 # this layer took longer than the whole budget
        return KB.LayerResult(shape.name, shape.label())

    results, skipped, interrupted = KB.run_layers(
        shapes, budget, profile, lambda res, sk: written.append([r.name for r in res]))
    assert seen == ["sn9.conv1_x"]           # a started layer finishes, no new one starts
    assert [r.name for r in results] == ["sn9.conv1_x"]
    assert skipped == ["srn32.s3", "r18.l1"] and not interrupted
    assert written == [["sn9.conv1_x"]]      # the report is rewritten after every layer

    spent = RN.Budget(5.0)
    spent.start -= 6.0                       # spent before the first layer: none starts
    results, skipped, _ = KB.run_layers(shapes, spent, profile)
    assert results == [] and skipped == [s.name for s in shapes] and seen == ["sn9.conv1_x"]

    results, skipped, _ = KB.run_layers(shapes, RN.Budget(None), lambda s: KB.LayerResult(s.name, ""))
    assert [r.name for r in results] == [s.name for s in shapes] and skipped == []

    def interrupted_at_second(shape):
        if shape.name == "srn32.s3":
            raise KeyboardInterrupt
        return KB.LayerResult(shape.name, "")
    results, skipped, interrupted = KB.run_layers(shapes, RN.Budget(None), interrupted_at_second)
    assert [r.name for r in results] == ["sn9.conv1_x"]
    assert skipped == ["srn32.s3", "r18.l1"] and interrupted


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def test_arguments_defaults_and_errors(capsys):
    args = KB.parse_args([])
    assert [s.name for s in args.shapes] == list(S.QUICK_NAMES)
    assert (args.dtype, args.operator, args.layout, args.budget_s) == ("bf16", "linear",
                                                                       "channels_last", 120.0)
    args = KB.parse_args(["--layers", "r18.l3, sn9.conv1_x,r18.l3", "--budget", "0"])
    assert [s.name for s in args.shapes] == ["r18.l3", "sn9.conv1_x"] and args.budget_s is None

    for argv, expected in ((["--layers", "sn9.conv1_x,nope.layer"], "unknown layer(s) nope.layer"),
                           (["--layers", ","], "no layer named"),
                           (["--iters", "0"], "--iters must be >= 1"),
                           (["--warmup", "0"], "--warmup must be >= 1"),
                           (["--dtype", "int8"], "invalid choice")):
        with pytest.raises(SystemExit) as exc:
            KB.parse_args(argv)
        assert exc.value.code == 2
        assert expected in capsys.readouterr().err


def test_without_cuda_main_says_so_and_exits_0(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sub" / "breakdown.md"
    assert KB.main(["--device", "cpu", "--layers", "sn9.conv1_x", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "device-time profiling needs a CUDA GPU" in printed and "cpu" in printed
    assert out.read_text().strip() == printed.strip()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert KB.main([]) == 0                                   # auto without a GPU
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert KB.main(["--device", "cuda"]) == 2                 # asked for CUDA, none there
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
    with pytest.raises(SystemExit):                           # arguments are checked first
        KB.main(["--device", "cpu", "--layers", "bogus"])


def test_main_with_cuda_wires_budget_report_and_out_file(tmp_path, capsys, monkeypatch):
    """main's GPU path with the device and the profiling stubbed: the layers asked for, the
    budget stopping new layers, the report on stdout and in --out."""
    import time
    # main drops TRITON_INTERPRET (the real compiler on a GPU); monkeypatch puts it back after
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(RN, "environment", lambda device: {
        "device_name": "Fake H200", "torch": "2.11.0", "triton": "3.6.0", "commit": "abc123"})
    calls = []

    def fake_profile(shape, dtype, operator, channels_last, iters, warmup, device):
        calls.append((shape.name, dtype, operator, channels_last, iters, warmup, device.type))
        time.sleep(0.3)                        # longer than the whole budget
        return KB.LayerResult(shape.name, shape.label(),
                              [_stat("_sphere_conv_fwd_kernel", "sphereops", "fwd", 30.0),
                               _stat(CUDNN_FPROP, "conv2d", "fwd", 10.0)])
    monkeypatch.setattr(KB, "profile_layer", fake_profile)
    out = tmp_path / "breakdown.md"
    rc = KB.main(["--layers", "srn32.s3,r18.l1,edge.odd", "--dtype", "fp16", "--iters", "4",
                  "--budget", "0.2", "--out", str(out)])
    assert rc == 0
    assert calls == [("srn32.s3", "fp16", "linear", True, 4, 3, "cuda")]
    text = out.read_text()
    assert capsys.readouterr().out == text
    assert text.startswith("# Kernel breakdown: Fake H200, fp16, channels_last, linear operator")
    assert "torch 2.11.0, triton 3.6.0" in text and "commit abc123" in text
    assert "| srn32.s3 | 30.0 | 10.0 | 3.00x | - | - | - | `_sphere_conv_fwd_kernel` 30.0 us (100.0%) | - |" in text
    assert "| r18.l1 (skipped: budget) |" in text and "| edge.odd (skipped: budget) |" in text
    assert "Budget of 0.2 s spent after 1 layer(s): not started: r18.l1, edge.odd" in text
    assert "Partial report" not in text


# ---------------------------------------------------------------------------------------------
# The fwd / bwd split (CPU: a logging conv and a fake profiler session)
# ---------------------------------------------------------------------------------------------

class _LoggedConv(torch.autograd.Function):
    log: list = []

    @staticmethod
    def forward(ctx, x, w, b):
        _LoggedConv.log.append("fwd")
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w, b, padding=1)

    @staticmethod
    def backward(ctx, dy):
        _LoggedConv.log.append("bwd")
        x, w = ctx.saved_tensors
        return (torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1),
                torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1), dy.sum((0, 2, 3)))


class _FakeSession:
    """Stands in for a profiler session: its events are the calls logged while it was open."""

    def __enter__(self):
        self.start = len(_LoggedConv.log)
        return self

    def __exit__(self, *exc):
        self.calls = list(_LoggedConv.log[self.start:])
        return False

    def events(self):
        return [_event(f"k_{call}", 1.0) for call in self.calls]


def test_profile_passes_puts_forwards_and_backwards_in_separate_sessions():
    _LoggedConv.log = []
    shape = S.TINY[0]
    inputs = RN.build_conv_inputs(shape, torch.float32, True, "linear", CPU, copies=2)
    inputs = inputs.without_k()

    def call(x, w, b, k):
        return _LoggedConv.apply(x, w, b)

    events = KB.profile_passes(call, inputs, iters=5, warmup=2, open_session=_FakeSession)
    assert [e.name for e in events["fwd"]] == ["k_fwd"] * 5
    assert [e.name for e in events["bwd"]] == ["k_bwd"] * 5
    # warm-up fwd+bwd twice, then 5 forwards, 5 untimed forwards for the graphs, 5 backwards
    assert _LoggedConv.log == ["fwd", "bwd"] * 2 + ["fwd"] * 10 + ["bwd"] * 5


def test_real_cpu_profiler_session_flows_through_and_books_no_host_op_as_a_kernel():
    """torch.profiler's own session object (CPU activity: this machine has no CUDA): its events
    come through profile_passes, host operators are there, none is taken for a kernel."""
    from torch.profiler import ProfilerActivity, profile

    inputs = RN.build_conv_inputs(S.TINY[0], torch.float32, False, "linear", CPU, copies=2).without_k()

    def call(x, w, b, k):
        return F.conv2d(x, w, b, padding=1)

    events = KB.profile_passes(call, inputs, iters=2, warmup=1,
                               open_session=lambda: profile(activities=[ProfilerActivity.CPU]))
    fwd_ops = {e.name for e in events["fwd"]}
    assert "aten::conv2d" in fwd_ops and "aten::convolution_backward" not in fwd_ops
    assert "aten::convolution_backward" in {e.name for e in events["bwd"]}
    assert KB.aggregate_kernels(events["fwd"], "conv2d", "fwd", 2) == []
    assert KB.aggregate_kernels(events["bwd"], "conv2d", "bwd", 2) == []


def test_profile_layer_runs_both_providers_on_the_benchmark_inputs():
    """The glue of one layer on CPU: the fused path under the Triton interpreter (backend
    "triton") and F.conv2d, a fake session, every pass of both providers aggregated."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the fused kernels through the Triton interpreter")
    sessions = []

    class Session:
        def __enter__(self):
            sessions.append(self)
            self.index = len(sessions)
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return [_event(f"kernel_of_session_{self.index}", 3.0 * self.index)]

    result = KB.profile_layer(S.TINY[0], "fp32", "linear", True, iters=1, warmup=1, device=CPU,
                              open_session=Session)
    assert result.errors == [] and len(sessions) == 4
    assert [(s.provider, s.pass_name, s.name, s.device_us) for s in result.stats] == [
        ("sphereops", "fwd", "kernel_of_session_1", 3.0), ("sphereops", "bwd", "kernel_of_session_2", 6.0),
        ("conv2d", "fwd", "kernel_of_session_3", 9.0), ("conv2d", "bwd", "kernel_of_session_4", 12.0)]

    # a provider that fails is an error line; the other one is still measured
    failing = iter([RuntimeError("out of resources: shared memory")])

    class FailingFirst(Session):
        def __enter__(self):
            exc = next(failing, None)
            if exc is not None:
                raise exc
            return super().__enter__()

    sessions.clear()
    result = KB.profile_layer(S.TINY[0], "fp32", "linear", True, iters=1, warmup=1, device=CPU,
                              open_session=FailingFirst)
    assert result.errors == ["sphereops: RuntimeError: out of resources: shared memory"]
    assert {(s.provider, s.pass_name) for s in result.stats} == {("conv2d", "fwd"), ("conv2d", "bwd")}


# ---------------------------------------------------------------------------------------------
# GPU (make gpu-check): the real profiler on this torch
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_real_profile_finds_the_fused_kernels_in_their_pass():
    """A tiny layer profiled for real: the fused kernels appear under their @triton.jit names in
    the right pass, cuDNN's fwd and bwd have device time, no host event leaks in."""
    device = torch.device("cuda")
    result = KB.profile_layer(S.TINY[0], "bf16", "linear", True, iters=2, warmup=1, device=device)
    assert result.errors == []
    names = {(p, q): {s.name for s in result.stats if (s.provider, s.pass_name) == (p, q)}
             for p in KB.PROVIDERS for q in KB.PASSES}
    assert "_sphere_conv_fwd_kernel" in names[("sphereops", "fwd")]
    assert {"_dgrad_kernel", "_wgrad_kernel"} <= names[("sphereops", "bwd")]
    assert not {"_dgrad_kernel", "_wgrad_kernel"} & names[("sphereops", "fwd")]
    assert "_sphere_conv_fwd_kernel" not in names[("sphereops", "bwd")]
    totals = KB.pass_totals(result.stats)
    for key in totals:
        assert totals[key][1] > 0
    assert set(totals) == {(p, q) for p in KB.PROVIDERS for q in KB.PASSES}
    assert not any(s.name.startswith(("aten::", "cuda", "cuLaunch")) for s in result.stats)
