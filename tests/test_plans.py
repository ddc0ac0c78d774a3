"""Launch plans (kernels/plans.py): what the conv launchers derive from the arguments'
metadata, kept per call signature.

The kernel tests run with SPHEREOPS_CHECK_PLANS=1 (conftest): every cache hit is rebuilt and
compared. Here the cache itself, and the launchers the way a user runs them -- plans kept, not
rebuilt -- over sequences of calls with the same shapes and other options, each against the
same call on empty caches (bitwise) and the float64 reference.
"""
from types import SimpleNamespace

import pytest
import torch

from helpers import TOLERANCES, assert_close, make_conv_inputs
from sphereops import reference as R

plans = pytest.importorskip("sphereops_kernels.plans")
conv_fwd = pytest.importorskip("sphereops_kernels.conv_fwd")
conv_bwd = pytest.importorskip("sphereops_kernels.conv_bwd")

EPS = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fp32 is exact unless a test turns TF32 on itself (conftest)
pytestmark = pytest.mark.usefixtures("exact_fp32")


@pytest.fixture
def kept_plans(monkeypatch):
    """Plans kept and served without the rebuild of check mode (how a user's calls run), on
    empty caches; emptied again afterwards."""
    monkeypatch.setattr(plans, "CHECK_PLANS", False)
    caches = (conv_fwd._FORWARD_PLANS, conv_bwd._BACKWARD_PLANS, conv_bwd._DEPTHWISE_LAUNCHES)
    for cache in caches + (conv_fwd._PICKED_CONFIGS,):
        cache.clear()
    yield caches
    for cache in caches + (conv_fwd._PICKED_CONFIGS,):
        cache.clear()


def _counting(monkeypatch, module, name):
    """Count the calls of ``module.name`` (a plan builder), still running it."""
    real, calls = getattr(module, name), []

    def counted(*args):
        calls.append(args)
        return real(*args)
    monkeypatch.setattr(module, name, counted)
    return calls


# ---------------------------------------------------------------------------------------------
# PlanCache
# ---------------------------------------------------------------------------------------------

def test_a_plan_is_built_once_per_key(monkeypatch):
    monkeypatch.setattr(plans, "CHECK_PLANS", False)
    cache, built = plans.PlanCache("test"), []

    def build(v):
        built.append(v)
        return SimpleNamespace(v=v)
    first = cache.get(("key", 1), build, 1)
    assert cache.get(("key", 1), build, 1) is first and built == [1]
    assert cache.get(("key", 2), build, 2).v == 2 and built == [1, 2] and len(cache) == 2


def test_check_mode_rebuilds_every_hit_and_refuses_a_stale_plan(monkeypatch):
    monkeypatch.setattr(plans, "CHECK_PLANS", True)
    cache, switch, built = plans.PlanCache("test"), {"on": False}, []

    def build():
        built.append(1)
        return SimpleNamespace(on=switch["on"])
    cache.get("key", build)
    cache.get("key", build)
    assert len(built) == 2
    switch["on"] = True   # something the plan reads and the key does not name
    with pytest.raises(AssertionError, match="stale test launch plan"):
        cache.get("key", build)


def test_a_build_that_raises_keeps_nothing(monkeypatch):
    monkeypatch.setattr(plans, "CHECK_PLANS", False)
    cache = plans.PlanCache("test")

    def build():
        raise ValueError("bad shape")
    with pytest.raises(ValueError, match="bad shape"):
        cache.get("key", build)
    assert len(cache) == 0


def test_an_unhashable_key_plans_afresh(monkeypatch):
    """Symbolic sizes (torch.compile with dynamic shapes) cannot be hashed: such a call plans
    afresh and keeps nothing."""
    monkeypatch.setattr(plans, "CHECK_PLANS", False)
    cache, built = plans.PlanCache("test"), []

    def build():
        built.append(1)
        return SimpleNamespace()
    for _ in range(2):
        cache.get(("key", [1, 2]), build)
    assert len(built) == 2 and len(cache) == 0


def test_the_cache_starts_over_when_full(monkeypatch):
    monkeypatch.setattr(plans, "CHECK_PLANS", False)
    monkeypatch.setattr(plans, "MAX_PLANS", 3)
    cache = plans.PlanCache("test")
    for key in range(3):
        cache.get(key, SimpleNamespace)
    assert len(cache) == 3
    cache.get(3, SimpleNamespace)
    assert len(cache) == 1


def test_tensor_key_names_layout_offset_dtype_and_device():
    x = torch.randn(2, 16, 5, 5)
    key = plans.tensor_key(x)
    assert key == plans.tensor_key(torch.randn(2, 16, 5, 5))
    assert key != plans.tensor_key(x.contiguous(memory_format=torch.channels_last))
    assert key != plans.tensor_key(torch.randn(2 * 16 * 25 + 1)[1:].view(2, 16, 5, 5))
    assert key != plans.tensor_key(x.to(torch.float16))
    assert key != plans.tensor_key(x.to("meta"))
    assert plans.tensor_key(None) is None


def test_dense_strides_and_meta_like_match_what_torch_allocates():
    for shape in [(2, 16, 5, 7), (1, 1, 1, 1), (3, 4, 1, 6), (0, 8, 3, 3)]:
        for fmt in (torch.contiguous_format, torch.channels_last):
            assert plans.dense_strides(shape, fmt) == torch.empty(shape, memory_format=fmt).stride()
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    m = plans.meta_like(x)
    assert (m.shape, m.stride(), m.dtype, m.device.type) == (x.shape, x.stride(), x.dtype, "meta")


# ---------------------------------------------------------------------------------------------
# The launchers with kept plans
# ---------------------------------------------------------------------------------------------

def _forward(inp, **options):
    return conv_fwd.sphere_conv2d_fwd(*inp.args(), EPS, **options)


def _variant_inputs(dtype):
    """Inputs that share every shape and differ in layout, bias and operator."""
    base = make_conv_inputs(n=2, c_in=16, c_out=16, h=6, w=6, operator="sigmoid", dtype=dtype,
                            device=DEVICE)
    nchw = base.to()
    last = base.to()
    last.x = last.x.contiguous(memory_format=torch.channels_last)
    no_bias = base.to()
    no_bias.bias = None
    linear = base.to()
    linear.operator, linear.k = "linear", None
    return {"nchw": nchw, "channels_last": last, "no_bias": no_bias, "linear": linear}


# the forward options each variant runs with besides the defaults
FORWARD_OPTIONS = [dict(), dict(store_c=False), dict(patch_norms="fused"),
                   dict(patch_norms="prepass")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_with_kept_plans_matches_a_fresh_plan(dtype, kept_plans, monkeypatch):
    """Calls that share the shapes but not the layout, bias, operator or options, in one order
    and then in the reverse one with their plans kept: bitwise what each gives on empty caches,
    and within the dtype's tolerance of the float64 reference."""
    calls = [(name, inp, opts) for name, inp in _variant_inputs(dtype).items()
             for opts in FORWARD_OPTIONS]
    fresh = {}
    for name, inp, opts in calls:
        kept_plans[0].clear()
        fresh[name, str(opts)] = _forward(inp, **opts)
    kept_plans[0].clear()
    builds = _counting(monkeypatch, conv_fwd, "_forward_plan")
    for round_ in (calls, calls[::-1]):
        for name, inp, opts in round_:
            out = _forward(inp, **opts)
            for a, b in zip(out, fresh[name, str(opts)]):
                assert torch.equal(a, b), (name, opts)
        # one plan a distinct call (all of them here), none rebuilt the second time round
        assert len(builds) == len(calls) == len(kept_plans[0])
    rtol, atol = TOLERANCES[dtype]
    for name, inp, opts in calls[:1]:
        y64, _, _ = R.conv2d_forward(*inp.to(torch.float64).args(), EPS)
        assert_close(fresh[name, str(opts)][0].double(), y64, rtol, atol)


def test_forward_plan_follows_the_tf32_switch(kept_plans, monkeypatch):
    """fp32's dot precision is read from torch.backends.cudnn.allow_tf32 at each call: a kept
    plan must not carry it from the call that built it."""
    launches, flags = _record_conv_flags(monkeypatch)
    inp = make_conv_inputs(n=1, c_in=16, c_out=16, h=4, w=4, dtype=torch.float32, device=DEVICE)
    saved = torch.backends.cudnn.allow_tf32
    try:
        for allow in (True, False, True):
            torch.backends.cudnn.allow_tf32 = allow
            _forward(inp)
            assert flags[-1]["DOT_PRECISION"] == ("tf32" if allow else "ieee")
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    assert len(kept_plans[0]) == 2


def _record_conv_flags(monkeypatch):
    """The constexprs of each forward conv-kernel launch (the preparation launch left out)."""
    real, launches, flags = conv_fwd.launch, [], []

    def record(kernel, grid, args, kwargs, what, memo=None):
        if kernel is not conv_fwd._prepare_operands_kernel:
            launches.append(kernel)
            flags.append(dict(kwargs))
        return real(kernel, grid, args, kwargs, what, memo)
    monkeypatch.setattr(conv_fwd, "launch", record)
    return launches, flags


def _saved_state(inp):
    with torch.no_grad():
        _, c, r_x = R.conv2d_forward(*inp.args(), EPS)
    return c, r_x


BACKWARD_OPTIONS = [dict(output_mask=(True, True, True, True)),
                    dict(output_mask=(True, False, False, False)),
                    dict(output_mask=(False, True, True, False)),
                    dict(output_mask=(True, True, True, True), c_scratch=True)]


def _backward(inp, c, r_x, dy, opts):
    opts = dict(opts)
    mask = opts.pop("output_mask")
    if opts.get("c_scratch"):
        c = c.clone()   # written over
    return conv_bwd.sphere_conv2d_bwd(dy, inp.x, inp.w, inp.k, c, r_x, inp.stride, inp.padding,
                                      inp.dilation, inp.groups, inp.operator, EPS, mask, **opts)


def test_backward_with_kept_plans_matches_a_fresh_plan(kept_plans, monkeypatch):
    """As the forward's: the backward over layouts, operators, needed gradients and c as
    scratch, same shapes throughout, plans kept -- bitwise the empty-cache results."""
    calls = []
    for name, inp in _variant_inputs(torch.bfloat16).items():
        c, r_x = _saved_state(inp)
        if name == "channels_last":   # Hn over c needs a channels_last c
            c = c.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(c.shape, dtype=c.dtype, device=DEVICE).contiguous(
            memory_format=torch.channels_last if name == "channels_last"
            else torch.contiguous_format)
        calls += [(name, inp, c, r_x, dy, opts) for opts in BACKWARD_OPTIONS]
    fresh = {}
    for name, inp, c, r_x, dy, opts in calls:
        kept_plans[1].clear()
        fresh[name, str(opts)] = _backward(inp, c, r_x, dy, opts)
    kept_plans[1].clear()
    builds = _counting(monkeypatch, conv_bwd, "_backward_plan")
    for round_ in (calls, calls[::-1]):
        for name, inp, c, r_x, dy, opts in round_:
            for a, b in zip(_backward(inp, c, r_x, dy, opts), fresh[name, str(opts)]):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), \
                    (name, opts)
        # one plan a distinct signature -- the bias is no backward argument, so the no-bias
        # variant shares the NCHW one's plans -- none rebuilt the second time round
        assert len(builds) == len(calls) - len(BACKWARD_OPTIONS) == len(kept_plans[1])
    # and the first of them against the float64 closed form
    name, inp, c, r_x, dy, opts = calls[0]
    ref = R.conv2d_backward(dy.double(), inp.x.double(), inp.w.double(), inp.k.double(),
                            c.double(), r_x.double(), inp.stride, inp.padding, inp.dilation,
                            inp.groups, inp.operator, EPS, opts["output_mask"])
    for got, want in zip(fresh[name, str(opts)], ref):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 3e-2 * scale


def test_eager_training_steps_build_each_plan_once(kept_plans, monkeypatch):
    """Through the public API: three forward+backward steps of one layer build one forward and
    one backward plan."""
    import sphereops

    fwd_builds = _counting(monkeypatch, conv_fwd, "_forward_plan")
    bwd_builds = _counting(monkeypatch, conv_bwd, "_backward_plan")
    inp = make_conv_inputs(n=2, c_in=16, c_out=16, h=5, w=5, operator="linear",
                           dtype=torch.bfloat16, device=DEVICE, channels_last=True)
    leaves = [t.detach().requires_grad_(True) for t in (inp.x, inp.w, inp.bias)]
    for _ in range(3):
        y = sphereops.sphere_conv2d(*leaves, padding=1, operator="linear", backend="triton")
        y.float().square().sum().backward()
    assert (len(fwd_builds), len(bwd_builds)) == (1, 1)


# ---------------------------------------------------------------------------------------------
# The forward's autotuned kernels, launched past the autotuner once it has picked
# ---------------------------------------------------------------------------------------------

AUTOTUNED_CASES = [
    pytest.param(dict(c_in=16, c_out=16), "_sphere_conv_fwd_autotuned", "_sphere_conv_fwd_kernel",
                 id="gemm"),
    pytest.param(dict(c_in=16, c_out=16, groups=16), "_sphere_conv_dw_fwd_autotuned",
                 "_sphere_conv_dw_fwd_kernel", id="depthwise"),
]


def _conv_launches(monkeypatch):
    """The forward's launches as (kernel, constexprs), the preparation launch left out."""
    real, launched = conv_fwd.launch, []

    def record(kernel, grid, args, kwargs, what, memo=None):
        if kernel is not conv_fwd._prepare_operands_kernel:
            launched.append((kernel, dict(kwargs)))
        return real(kernel, grid, args, kwargs, what, memo)
    monkeypatch.setattr(conv_fwd, "launch", record)
    return launched


@pytest.mark.parametrize("shape, autotuned, kernel", AUTOTUNED_CASES)
def test_a_repeated_signature_launches_the_picked_config(shape, autotuned, kernel, kept_plans,
                                                         monkeypatch):
    """The first call goes through the autotuner; a second with the same signature straight to
    the kernel with the config the autotuner picked: the same launch, bitwise the same
    outputs."""
    launched = _conv_launches(monkeypatch)
    inp = make_conv_inputs(n=2, h=5, w=5, operator="linear", dtype=torch.bfloat16,
                           device=DEVICE, channels_last=True, **shape)
    first = _forward(inp)
    second = _forward(inp)
    (k1, flags1), (k2, flags2) = launched
    tuner = getattr(conv_fwd, autotuned)
    assert k1 is tuner and k2 is getattr(conv_fwd, kernel)
    assert flags2 == {**flags1, **tuner.best_config.all_kwargs()}
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_traced_launches_and_unkept_configs_go_through_the_autotuner(kept_plans, monkeypatch):
    """Launches while a graph is traced keep the autotuner (Inductor's to handle), and so does
    a signature whose picked config the autotuner's pruning would not keep for it."""
    launched = _conv_launches(monkeypatch)
    inp = make_conv_inputs(n=2, c_in=16, c_out=16, h=5, w=5, operator="linear",
                           dtype=torch.bfloat16, device=DEVICE, channels_last=True)
    plain_launch = conv_fwd.plain_launch
    monkeypatch.setattr(conv_fwd, "plain_launch", lambda first: False)
    _forward(inp)
    _forward(inp)
    assert [k for k, _ in launched] == [conv_fwd._sphere_conv_fwd_autotuned] * 2
    assert len(conv_fwd._PICKED_CONFIGS) == 0
    monkeypatch.setattr(conv_fwd, "plain_launch", plain_launch)
    monkeypatch.setattr(conv_fwd, "prune_conv_fwd_configs", lambda configs, named, **kw: [])
    _forward(inp)
    _forward(inp)
    assert [k for k, _ in launched] == [conv_fwd._sphere_conv_fwd_autotuned] * 4
    assert len(conv_fwd._PICKED_CONFIGS) == 0
