"""pytest-benchmark entry point: ``pytest bench/`` times the same cases as ``python -m bench``.

    pytest bench/ --benchmark-json=out.json          # quick suite on the present device
    pytest bench/ --bench-suite=full --benchmark-autosave
    pytest bench/ --benchmark-compare                 # against the last saved run

Options: ``--bench-suite quick|full|tiny``, ``--bench-compile`` (add torch.compile rows; slow to
build), ``--bench-device auto|cpu|cuda``.  Every case is spot-checked against the float64
reference before it is timed: a wrong provider fails its test instead of producing a number.
"""
import os

import pytest
import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_addoption(parser):
    group = parser.getgroup("sphereops-bench")
    group.addoption("--bench-suite", default=os.environ.get("SPHEREOPS_BENCH_SUITE", "quick"),
                    choices=("quick", "full", "tiny"), help="which layer list to time")
    group.addoption("--bench-compile", action="store_true", help="include torch.compile rows")
    group.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"))


@pytest.fixture(scope="session")
def bench_device(request):
    choice = request.config.getoption("--bench-device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device")
    return torch.device(choice)


def pytest_generate_tests(metafunc):
    from bench import pytest_cases
    if "conv_case" in metafunc.fixturenames:
        cases = pytest_cases.conv_cases(metafunc.config)
        metafunc.parametrize("conv_case", cases, ids=[c.id for c in cases])
    if "linear_case" in metafunc.fixturenames:
        cases = pytest_cases.linear_cases(metafunc.config)
        metafunc.parametrize("linear_case", cases, ids=[c.id for c in cases])
