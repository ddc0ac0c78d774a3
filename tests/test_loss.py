"""GA-Softmax / W-Softmax logits and the GASoftmaxLoss module.

The oracle here is an independent float64 evaluation of the issue's formula, element by element
with Python's math module (no code shared with sphereops.loss)."""
import math

import pytest
import torch
import torch.nn.functional as F

from sphereops.loss import GASoftmaxLoss, SphereFaceLambda, ga_softmax_logits
from tests.helpers import assert_close

OPERATORS = ("linear", "cosine", "sigmoid")

# (dtype, rtol, atol) on logits of magnitude ~ ||x|| * (2m - 1)
DTYPES = [
    (torch.float64, 1e-10, 1e-10),
    (torch.float32, 2e-5, 2e-5),
    (torch.float16, 4e-3, 4e-3),
    (torch.bfloat16, 2e-2, 2e-2),
]


def _g_formula(theta, operator, k):
    if operator == "linear":
        return 1.0 - 2.0 * theta / math.pi
    if operator == "cosine":
        return math.cos(theta)
    # the paper's form of the sigmoid operator (not the tanh form the package uses)
    e = math.exp(-math.pi / (2.0 * k))
    return (1.0 + e) / (1.0 - e) * (1.0 - math.exp(theta / k - math.pi / (2.0 * k))) / (
        1.0 + math.exp(theta / k - math.pi / (2.0 * k)))


def formula_logits(x, w, target, margin, operator, k, lam):
    """The issue's formula, one element at a time, in float64."""
    x, w = x.double(), w.double()
    n, c = x.shape[0], w.shape[0]
    out = torch.empty(n, c, dtype=torch.float64)
    for i in range(n):
        xn = math.sqrt(float((x[i] * x[i]).sum()))
        for j in range(c):
            wn = math.sqrt(float((w[j] * w[j]).sum()))
            cos = float((x[i] * w[j]).sum()) / (xn * wn) if xn > 0 else 0.0
            theta = math.acos(max(-1.0, min(1.0, cos)))
            kj = None
            if operator == "sigmoid":
                kj = float(k[j]) if isinstance(k, torch.Tensor) and k.dim() == 1 else float(k)
            g = _g_formula(theta, operator, kj)
            if j == int(target[i]):
                jj = min(math.floor(margin * theta / math.pi), margin - 1)
                psi = _g_formula(margin * theta - jj * math.pi, operator, kj) - 2.0 * jj
                out[i, j] = (lam * xn * g + xn * psi) / (1.0 + lam)
            else:
                out[i, j] = xn * g
    return out


def _inputs(n=6, d=10, c=5, dtype=torch.float64, scale=1.0):
    x = (torch.randn(n, d, dtype=torch.float64) * scale).to(dtype)
    w = torch.randn(c, d, dtype=torch.float64).to(dtype)
    target = torch.randint(0, c, (n,))
    return x, w, target


def _at_angles(thetas, w, target, d, norm=2.0):
    """Features at exactly the given angles to their target class weight."""
    x = torch.empty(len(thetas), d, dtype=torch.float64)
    for i, th in enumerate(thetas):
        wy = w[target[i]].double()
        wy = wy / wy.norm()
        u = torch.randn(d, dtype=torch.float64)
        u = u - (u @ wy) * wy
        u = u / u.norm()
        x[i] = norm * (math.cos(th) * wy + math.sin(th) * u)
    return x


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("margin", [1, 2, 4])
@pytest.mark.parametrize("lam", [0.0, 5.0])
def test_logits_match_float64_formula(dtype, rtol, atol, operator, margin, lam):
    x, w, target = _inputs(dtype=dtype)
    k = 0.2 + 0.6 * torch.rand(w.shape[0], dtype=torch.float64) if operator == "sigmoid" else None
    out = ga_softmax_logits(x, w, target, margin=margin, operator=operator,
                            k=k.to(dtype) if k is not None else None, lambda_=lam)
    assert out.dtype == dtype and out.shape == (x.shape[0], w.shape[0])
    # reference on the same (rounded) inputs and k
    ref = formula_logits(x, w, target, margin, operator,
                         k.to(dtype).double() if k is not None else None, lam)
    scale = max(1.0, 2 * margin - 1)
    assert_close(out, ref, rtol=rtol, atol=atol * scale, name=f"logits {operator} m={margin}")


@pytest.mark.parametrize("operator", OPERATORS)
def test_margin_one_is_w_softmax_and_lambda_irrelevant(operator):
    x, w, target = _inputs()
    k = 0.4 if operator == "sigmoid" else None
    a = ga_softmax_logits(x, w, target, margin=1, operator=operator, k=k)
    b = ga_softmax_logits(x, w, target, margin=1, operator=operator, k=k, lambda_=7.0)
    ref = formula_logits(x, w, target, 1, operator, 0.4, 0.0)
    assert_close(a, ref, 1e-10, 1e-10)
    assert_close(b, ref, 1e-10, 1e-10)


def test_sigmoid_scalar_k_default_is_0_3():
    x, w, target = _inputs()
    out = ga_softmax_logits(x, w, target, margin=2, operator="sigmoid")
    assert_close(out, formula_logits(x, w, target, 2, "sigmoid", 0.3, 0.0), 1e-10, 1e-10)


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("margin", [1, 2, 3, 4])
@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_gradcheck_float64(operator, margin, lam):
    x, w, target = _inputs(n=4, d=6, c=4)
    x.requires_grad_(True)
    w.requires_grad_(True)
    args = [x, w]
    if operator == "sigmoid":
        k = (0.2 + 0.6 * torch.rand(w.shape[0], dtype=torch.float64)).requires_grad_(True)
        args.append(k)
        fn = lambda x, w, k: ga_softmax_logits(x, w, target, margin=margin, operator=operator,
                                               k=k, lambda_=lam)
    else:
        fn = lambda x, w: ga_softmax_logits(x, w, target, margin=margin, operator=operator,
                                            lambda_=lam)
    assert torch.autograd.gradcheck(fn, tuple(args), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("margin", [1, 2, 3, 4])
def test_finite_gradients_at_zero_pi_and_breakpoints(operator, margin):
    c, d = 3, 8
    w = torch.randn(c, d, dtype=torch.float64)
    thetas = [0.0, math.pi] + [i * math.pi / margin for i in range(1, margin)]
    target = torch.randint(0, c, (len(thetas),))
    x = _at_angles(thetas, w, target, d).requires_grad_(True)
    wp = w.clone().requires_grad_(True)
    out = ga_softmax_logits(x, wp, target, margin=margin, operator=operator, lambda_=1.0)
    assert torch.isfinite(out).all()
    ref = formula_logits(x.detach(), w, target, margin, operator, 0.3, 1.0)
    # arccos near c = 1 turns the 1e-16 rounding of c into ~1e-8 of angle (sqrt conditioning)
    assert_close(out, ref, 1e-7, 1e-7, name="logits at breakpoints")
    F.cross_entropy(out, target).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(wp.grad).all()


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("margin", [2, 3, 4])
def test_psi_continuous_and_decreasing(operator, margin):
    """psi is continuous across the breakpoints and decreasing on [0, pi]."""
    c, d = 2, 5
    w = torch.randn(c, d, dtype=torch.float64)
    thetas = torch.linspace(0.0, math.pi, 401, dtype=torch.float64).tolist()
    for b in range(1, margin):
        thetas += [b * math.pi / margin - 1e-9, b * math.pi / margin + 1e-9]
    thetas.sort()
    target = torch.zeros(len(thetas), dtype=torch.long)
    x = _at_angles(thetas, w, target, d, norm=1.0)
    f_y = ga_softmax_logits(x, w, target, margin=margin, operator=operator)[:, 0]
    diffs = f_y[1:] - f_y[:-1]
    assert (diffs <= 1e-7).all(), "psi must not increase with theta"
    assert diffs.abs().max() < 0.2, "psi jumps somewhere (not continuous)"
    assert abs(f_y[0].item() - 1.0) < 1e-7 and abs(f_y[-1].item() - (1.0 - 2 * margin)) < 1e-7


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
def test_hard_cases_zero_nan_large(dtype, rtol, atol):
    x, w, target = _inputs(n=5, d=16, c=4, dtype=dtype)
    x[0] = 0.0
    x[1, 3] = float("nan")
    x[2] = (torch.randn(16, dtype=torch.float64) * 300).to(dtype)
    # near-parallel: a feature along its target weight plus tiny noise
    x[3] = (w[target[3]].double() * 2 + 1e-5 * torch.randn(16, dtype=torch.float64)).to(dtype)
    out = ga_softmax_logits(x, w, target, margin=4, operator="cosine", lambda_=0.0)
    ref = formula_logits(torch.where(torch.isnan(x), 0, x), w, target, 4, "cosine", None, 0.0)
    ref[1] = float("nan")
    assert (out[0] == 0).all(), "a zero feature has zero logits"
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3, 4]]).all()
    scale = ref[2].abs().max().item()
    rows = [0, 2, 3, 4]
    assert_close(out[rows], ref[rows], rtol=rtol, atol=atol * scale, name="hard rows")


def test_bad_inputs():
    x, w, target = _inputs()
    for m in (0, -1):
        with pytest.raises(ValueError, match="margin"):
            ga_softmax_logits(x, w, target, margin=m)
    with pytest.raises(ValueError, match="margin"):
        ga_softmax_logits(x, w, target, margin=1.5)
    for m in ("2", True, None):
        with pytest.raises(TypeError, match="margin"):
            ga_softmax_logits(x, w, target, margin=m)
    assert torch.equal(ga_softmax_logits(x, w, target, margin=2.0),
                       ga_softmax_logits(x, w, target, margin=2))
    bad = target.clone()
    bad[0] = w.shape[0]
    with pytest.raises(ValueError, match="target"):
        ga_softmax_logits(x, w, bad)
    bad[0] = -1
    with pytest.raises(ValueError, match="target"):
        ga_softmax_logits(x, w, bad)
    with pytest.raises(TypeError, match="target"):
        ga_softmax_logits(x, w, target.double())
    with pytest.raises(ValueError, match="target"):
        ga_softmax_logits(x, w, target[:-1])
    with pytest.raises(ValueError, match="weight"):
        ga_softmax_logits(x, w[:, :-1], target)
    with pytest.raises(ValueError, match="input"):
        ga_softmax_logits(x[0], w, target)
    with pytest.raises(ValueError, match="weight"):
        ga_softmax_logits(x, w[0], target)
    with pytest.raises(TypeError, match="input"):
        ga_softmax_logits(x.long(), w, target)
    with pytest.raises(ValueError, match="operator"):
        ga_softmax_logits(x, w, target, operator="tanh")
    with pytest.raises(ValueError, match="lambda_"):
        ga_softmax_logits(x, w, target, lambda_=-1.0)
    with pytest.raises(ValueError, match="k"):
        ga_softmax_logits(x, w, target, operator="sigmoid", k=0.0)
    with pytest.raises(ValueError, match="k"):
        ga_softmax_logits(x, w, target, operator="sigmoid", k=torch.ones(w.shape[0] + 1))


# ------------------------------------------------------------------------------------------
# Module
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("operator", OPERATORS)
def test_module_matches_function_and_exposes_logits(operator):
    loss_fn = GASoftmaxLoss(10, 5, margin=3, operator=operator, k=0.4).double()
    x, _, target = _inputs()
    loss = loss_fn(x, target)
    k = 0.4 if operator == "sigmoid" else None
    logits = ga_softmax_logits(x, loss_fn.weight, target, margin=3, operator=operator, k=k)
    assert torch.allclose(loss, F.cross_entropy(logits, target), rtol=1e-12, atol=1e-12)
    plain = formula_logits(x, loss_fn.weight.detach(), target, 1, operator, 0.4, 0.0)
    assert_close(loss_fn.last_logits, plain, 1e-10, 1e-10, name="last_logits")
    assert_close(loss_fn.predict_logits(x), plain, 1e-10, 1e-10, name="predict_logits")
    loss.backward()
    assert torch.isfinite(loss_fn.weight.grad).all() and loss_fn.weight.grad.abs().sum() > 0


def test_sphereface_lambda_schedule():
    sched = SphereFaceLambda()
    for it in (0, 1, 10, 100, 5000):
        assert sched(it) == pytest.approx(max(5.0, 1000.0 * (1 + 0.12 * it) ** -1.0))
    loss_fn = GASoftmaxLoss(10, 5, margin=4, lambda_schedule="sphereface").double()
    x, _, target = _inputs()
    assert loss_fn.current_lambda() == pytest.approx(1000.0)
    for _ in range(3):
        loss = loss_fn(x, target)
    assert int(loss_fn.iteration) == 3
    lam = 1000.0 / (1 + 0.12 * 2)
    logits = ga_softmax_logits(x, loss_fn.weight, target, margin=4, lambda_=lam)
    assert torch.allclose(loss, F.cross_entropy(logits, target), rtol=1e-12, atol=1e-12)
    loss_fn.eval()
    loss_fn(x, target)
    assert int(loss_fn.iteration) == 3, "eval forwards must not advance the schedule"
    assert "iteration" in loss_fn.state_dict()
    # the schedule follows the buffer when it is written outside forward (resume, fill_)
    resumed = GASoftmaxLoss(10, 5, margin=4, lambda_schedule="sphereface").double()
    assert resumed.current_lambda() == pytest.approx(1000.0)
    resumed.load_state_dict(loss_fn.state_dict())
    assert resumed.current_lambda() == pytest.approx(1000.0 / (1 + 0.12 * 3))
    resumed.iteration.fill_(100)
    assert resumed.current_lambda() == pytest.approx(max(5.0, 1000.0 / (1 + 0.12 * 100)))
    resumed(x, target)
    assert int(resumed.iteration) == 101
    assert resumed.current_lambda() == pytest.approx(max(5.0, 1000.0 / (1 + 0.12 * 101)))
    const = GASoftmaxLoss(10, 5, margin=2, lambda_schedule=2.5)
    assert const.current_lambda() == 2.5


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="margin"):
        GASoftmaxLoss(4, 3, margin=0)
    with pytest.raises(ValueError, match="margin"):
        GASoftmaxLoss(4, 3, margin=2.5)
    with pytest.raises(ValueError, match="num_classes"):
        GASoftmaxLoss(4, 0)
    with pytest.raises(ValueError, match="operator"):
        GASoftmaxLoss(4, 3, operator="relu")
    with pytest.raises(ValueError, match="lambda_schedule"):
        GASoftmaxLoss(4, 3, lambda_schedule="cosine")
    with pytest.raises(ValueError, match="k"):
        GASoftmaxLoss(4, 3, operator="sigmoid", k=-1.0)
    loss_fn = GASoftmaxLoss(4, 3)
    with pytest.raises(ValueError, match="target"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="weight"):
        loss_fn(torch.randn(2, 5), torch.tensor([0, 1]))


def test_module_learns_separable_classes():
    """W-Softmax with a margin trains a linear feature map on three Gaussian blobs."""
    centers = torch.randn(3, 6) * 3
    labels = torch.randint(0, 3, (96,))
    feats = centers[labels] + 0.3 * torch.randn(96, 6)
    embed = torch.nn.Linear(6, 8)
    loss_fn = GASoftmaxLoss(8, 3, margin=2, lambda_schedule=SphereFaceLambda(base=10, lambda_min=1))
    opt = torch.optim.Adam(list(embed.parameters()) + list(loss_fn.parameters()), lr=0.05)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(embed(feats), labels)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    acc = (loss_fn.predict_logits(embed(feats)).argmax(1) == labels).float().mean().item()
    assert loss.item() < 0.5 * first and acc > 0.9
