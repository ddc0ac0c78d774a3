"""Test configuration.

Without CUDA the Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
triton decorates the kernels, i.e. before ``sphereops_kernels`` is first imported, hence here.
With CUDA (``make gpu-check``) the variable is left alone so the real compiler is tested.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The same floating-point contraction on every triton version.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Every cached launch plan is rebuilt and compared on each hit (kernels/plans.py): a plan key
# that misses a switch a test flips fails that test instead of running a stale plan.
os.environ.setdefault("SPHEREOPS_CHECK_PLANS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run by `make gpu-check`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed each run (fresh random inputs), shown in a failing test's report so the
    failure can be reproduced: ``SPHEREOPS_TEST_SEED=<seed> pytest <test id>`` reruns it."""
    seed = int(os.environ.get("SPHEREOPS_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.add_report_section("setup", "seed", f"torch.manual_seed({seed})")
    yield seed


@pytest.fixture
def exact_fp32():
    """fp32 runs at full precision (TF32 off) unless a test turns it on itself; the switch is
    restored afterwards. The kernel test modules use it for every test (``pytestmark``)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved
