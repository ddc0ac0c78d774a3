"""pytest-benchmark cases: one test per (layer, provider, mode); see bench/conftest.py."""
from __future__ import annotations

import pytest

from bench import runner as RN


def _run_case(benchmark, case, device):
    # A plain-conv case ignores the operator; build it with "linear" inputs.
    operator = "linear" if case.operator == "-" else case.operator
    try:
        prepared = RN.prepare_case(case.kind, case.shape, case.dtype, case.layout, operator,
                                   case.provider, device)
    except LookupError as exc:
        pytest.skip(str(exc))
    # RN.WrongResult (an AssertionError) propagates: a wrong provider fails and is not timed.
    step = prepared.step(case.mode)
    for _ in range(2):                         # warm-up: compilation, autotuning, allocator
        step.prepare()
        step()
    flops = case.shape.flops(case.mode)
    benchmark.group = case.group
    benchmark.extra_info.update(
        kind=case.kind, layer=case.shape.name, label=case.shape.label(), dtype=case.dtype,
        layout=case.layout, operator=case.operator, provider=case.provider, mode=case.mode,
        flops=flops, copies=prepared.inputs.copies, spot_check=prepared.check,
        device=str(device), notes=dict(prepared.spec.notes))
    if case.mode == "bwd":
        # Backward only: the forward graph is built in pytest-benchmark's untimed setup.
        rounds = 20 if device.type == "cuda" else 5
        benchmark.pedantic(step, setup=step.prepare, rounds=rounds, warmup_rounds=1, iterations=1)
    else:
        benchmark(step)


def test_conv(benchmark, conv_case, bench_device):
    _run_case(benchmark, conv_case, bench_device)


def test_linear(benchmark, linear_case, bench_device):
    _run_case(benchmark, linear_case, bench_device)
