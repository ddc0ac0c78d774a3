"""SphereNorm2d and the Sphere recurrent cells / sequence wrappers.

Numeric oracles are written here in float64 from the formulas (unfold + cosine for the norm, the
gate equations for the cells), independently of sphereops.reference."""
import math

import pytest
import torch
import torch.nn.functional as F

import sphereops
from sphereops.nn.norm import SphereNorm2d
from sphereops.nn.recurrent import SphereGRU, SphereGRUCell, SphereLSTM, SphereLSTMCell
from tests.helpers import assert_close

EPS = 1e-4
DTYPES = [(torch.float64, 1e-10), (torch.float32, 2e-5), (torch.bfloat16, 2e-2)]


def _g(c, operator, k=0.3):
    theta = torch.acos(c.clamp(-1, 1))
    if operator == "cosine":
        return c.clamp(-1, 1)
    if operator == "linear":
        return 1 - 2 * theta / math.pi
    e = torch.exp(torch.as_tensor(-math.pi / (2 * k), dtype=torch.float64))
    t = torch.exp(theta / k - math.pi / (2 * k))
    return (1 + e) / (1 - e) * (1 - t) / (1 + t)


def norm_formula(x, kernel_size, scale, shift, operator, k=0.3):
    """SphereConv of x with the fixed axis filters e_(o, centre) (all channels of the window in
    the patch, same zero padding), via unfold in float64; then the affine map."""
    x = x.double()
    n, ch, h, w = x.shape
    ks = kernel_size
    cols = F.unfold(x, ks, padding=ks // 2).reshape(n, ch, ks * ks, h * w)   # [n, c, window, p]
    r_x = torch.sqrt((cols * cols).sum((1, 2)) + EPS)                         # [n, p]
    filt_norm = math.sqrt(1.0 + EPS)                                           # |e_(o, centre)|
    dot = cols[:, :, (ks * ks) // 2]                                           # <e_(o, centre), patch>
    kk = k.double().view(1, -1, 1) if isinstance(k, torch.Tensor) else k
    out = _g(dot / (r_x[:, None] * filt_norm), operator, kk).reshape(n, ch, h, w)
    if scale is not None:
        out = out * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    return out


def _randomise(norm):
    with torch.no_grad():
        if norm.affine:
            norm.weight.mul_(1 + 0.3 * torch.randn_like(norm.weight))
            norm.bias.copy_(0.3 * torch.randn_like(norm.bias))
        if norm.kappa is not None:
            norm.kappa.copy_(0.2 + 0.5 * torch.rand_like(norm.kappa))
    return norm


# ------------------------------------------------------------------------------------------
# SphereNorm2d
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("operator", ["cosine", "linear", "sigmoid", "learnable"])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_norm_matches_float64_formula(dtype, tol, operator, kernel_size):
    learnable = operator == "learnable"
    op = "sigmoid" if learnable else operator
    norm = _randomise(SphereNorm2d(3, kernel_size, operator=op, learnable_k=learnable)).to(dtype)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64).to(dtype)
    out = norm(x)
    assert out.dtype == dtype and out.shape == x.shape
    ref = norm_formula(x, kernel_size, norm.weight, norm.bias, op,
                       norm.effective_k().detach() if learnable else 0.3)
    assert_close(out, ref, rtol=tol, atol=tol * 3 * kernel_size, name=f"SphereNorm2d {operator}")


@pytest.mark.parametrize("operator", ["cosine", "linear", "sigmoid"])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_norm_is_sphere_conv_with_axis_filters(operator, kernel_size):
    """The closed form equals sphere_conv2d with the dense filters e_(o, centre)."""
    ch = 4
    norm = SphereNorm2d(ch, kernel_size, operator=operator, affine=False).double()
    x = torch.randn(2, ch, 5, 6, dtype=torch.float64)
    axes = torch.zeros(ch, ch, kernel_size, kernel_size, dtype=torch.float64)
    axes[torch.arange(ch), torch.arange(ch), kernel_size // 2, kernel_size // 2] = 1.0
    want = sphereops.sphere_conv2d(x, axes, padding=kernel_size // 2, operator=operator,
                                   k=0.3 if operator == "sigmoid" else None, backend="reference")
    assert_close(norm(x), want, 1e-12, 1e-12)


def test_norm_initial_state_is_unit_rms_pixel_normalisation():
    norm = SphereNorm2d(16).double()
    x = torch.randn(3, 16, 5, 5, dtype=torch.float64) * 7.0
    expected = x / torch.sqrt((x * x).sum(1, keepdim=True) + EPS) / math.sqrt(1 + EPS) * 4.0
    out = norm(x)
    assert_close(out, expected, 1e-12, 1e-12)
    assert 0.9 < out.pow(2).mean().sqrt().item() < 1.1, "affine init gives unit-RMS outputs"


@pytest.mark.parametrize("batch", [1, 4])
def test_norm_sample_independent_of_batch(batch):
    norm = _randomise(SphereNorm2d(4, 3)).double()
    x = torch.randn(batch, 4, 5, 6, dtype=torch.float64)
    out = norm(x)
    for i in range(batch):
        alone = norm(x[i:i + 1])
        assert_close(alone, out[i:i + 1], 1e-12, 1e-12, name=f"sample {i} alone")
    if batch > 1:
        other = x.clone()
        other[1:] = 1000.0 * torch.randn_like(other[1:])     # wildly different batch-mates
        assert_close(norm(other)[:1], out[:1], 1e-12, 1e-12, name="sample 0 with new batch-mates")
    norm.eval()
    assert_close(norm(x), out, 0.0, 0.0, name="eval == train (no running statistics)")
    assert len(list(norm.buffers())) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("operator", ["cosine", "linear", "sigmoid"])
def test_norm_output_bounded_without_affine(dtype, operator):
    norm = SphereNorm2d(3, 3, affine=False, operator=operator).to(dtype)
    x = (torch.randn(2, 3, 6, 6, dtype=torch.float64) * 300).to(dtype)   # x^2 overflows fp16
    x[0, 0] = 0.0
    x[1, :, :2, :2] = 0.0                                             # an all-zero patch
    out = norm(x)
    assert torch.isfinite(out).all()
    assert out.abs().max() <= 1.0 + 1e-3
    assert (out[0, 0].abs() <= 1e-6).all(), "a zero channel has c = 0 -> g = 0"
    assert (out[1, :, 0, 0].abs() <= 1e-6).all(), "an all-zero patch has c = 0 -> g = 0"
    assert_close(out, norm_formula(x, 3, None, None, operator), 2e-3, 2e-3)


def test_norm_near_axis_patch_has_finite_gradient():
    """A pixel whose energy sits in one channel has c -> 1: the bounded arccos keeps it finite."""
    norm = SphereNorm2d(3, operator="linear").double()
    x = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    x[0, 0] = 5.0
    x.requires_grad_(True)
    norm(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_norm_nan_stays_in_its_patch():
    norm = SphereNorm2d(2, 3).double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    x[1, 0, 2, 2] = float("nan")
    out = norm(x)
    assert torch.isnan(out[1, :, 1:4, 1:4]).all()
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[1, :, 1:4, 1:4] = False
    assert torch.isfinite(out[mask]).all()


def test_norm_gradcheck_and_learnable_parameters():
    norm = _randomise(SphereNorm2d(2, 3, operator="sigmoid", learnable_k=True)).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    params = (norm.kappa, norm.weight, norm.bias)
    assert {n for n, p in norm.named_parameters()} == {"kappa", "weight", "bias"}

    def fn(inp, kappa, scale, shift):
        return torch.func.functional_call(norm, {"kappa": kappa, "weight": scale, "bias": shift}, (inp,))

    assert torch.autograd.gradcheck(fn, (x,) + params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_norm_bad_arguments():
    with pytest.raises(ValueError, match="num_features"):
        SphereNorm2d(0)
    with pytest.raises(ValueError, match="kernel_size"):
        SphereNorm2d(3, kernel_size=2)
    with pytest.raises(ValueError, match="operator"):
        SphereNorm2d(3, operator="relu")
    with pytest.raises(ValueError, match="learnable_k"):
        SphereNorm2d(3, learnable_k=True)
    norm = SphereNorm2d(3)
    with pytest.raises(ValueError, match="channels"):
        norm(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        norm(torch.randn(3, 5, 5))
    with pytest.raises(TypeError, match="floating"):
        norm(torch.ones(1, 3, 2, 2, dtype=torch.int64))
    assert "operator=cosine" in repr(norm)


# ------------------------------------------------------------------------------------------
# Recurrent cells
# ------------------------------------------------------------------------------------------

def _sphere_linear_formula(x, lin):
    """g(cos(x, w)) + b in float64 with eps under both square roots (cosine operator)."""
    x, w = x.double(), lin.weight.double()
    c = (x @ w.t()) / (torch.sqrt((x * x).sum(1, keepdim=True) + EPS)
                       * torch.sqrt((w * w).sum(1) + EPS)[None, :])
    y = c.clamp(-1, 1)
    return y + lin.bias.double() if lin.bias is not None else y


def test_lstm_cell_matches_gate_equations():
    cell = SphereLSTMCell(5, 7, backend="reference").double()
    x = torch.randn(3, 5, dtype=torch.float64)
    h = torch.randn(3, 7, dtype=torch.float64)
    c = torch.randn(3, 7, dtype=torch.float64)
    h1, c1 = cell(x, (h, c))
    gates = _sphere_linear_formula(x, cell.ih) + _sphere_linear_formula(h, cell.hh)
    i, f, g, o = gates.chunk(4, 1)
    c_ref = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_ref = torch.sigmoid(o) * torch.tanh(c_ref)
    assert_close(c1, c_ref, 1e-12, 1e-12, name="c'")
    assert_close(h1, h_ref, 1e-12, 1e-12, name="h'")


def test_gru_cell_matches_gate_equations():
    cell = SphereGRUCell(5, 7, backend="reference").double()
    x = torch.randn(3, 5, dtype=torch.float64)
    h = torch.randn(3, 7, dtype=torch.float64)
    gi = _sphere_linear_formula(x, cell.ih).chunk(3, 1)
    gh = _sphere_linear_formula(h, cell.hh).chunk(3, 1)
    r = torch.sigmoid(gi[0] + gh[0])
    z = torch.sigmoid(gi[1] + gh[1])
    n = torch.tanh(gi[2] + r * gh[2])
    assert_close(cell(x, h), (1 - z) * n + z * h, 1e-12, 1e-12, name="h'")


@pytest.mark.parametrize("cell_type,torch_type", [(SphereLSTMCell, torch.nn.LSTMCell),
                                                  (SphereGRUCell, torch.nn.GRUCell)])
def test_cells_are_drop_in(cell_type, torch_type):
    ours, theirs = cell_type(4, 6), torch_type(4, 6)
    for x in (torch.randn(3, 4), torch.randn(4)):        # batched and unbatched
        a, b = ours(x), theirs(x)
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        assert [t.shape for t in a] == [t.shape for t in b]
        state = tuple(torch.randn_like(t) for t in b)
        state = state if len(state) > 1 else state[0]
        a2, b2 = ours(x, state), theirs(x, state)
        a2, b2 = (a2, b2) if isinstance(a2, tuple) else ((a2,), (b2,))
        assert [t.shape for t in a2] == [t.shape for t in b2]
    # hx=None means a zero state, as in torch
    x = torch.randn(2, 4)
    implicit = ours(x)
    zeros = torch.zeros(2, 6)
    explicit = ours(x, (zeros, zeros) if isinstance(implicit, tuple) else zeros)
    implicit = implicit if isinstance(implicit, tuple) else (implicit,)
    explicit = explicit if isinstance(explicit, tuple) else (explicit,)
    for a, b in zip(implicit, explicit):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wrapper,torch_type", [(SphereLSTM, torch.nn.LSTM), (SphereGRU, torch.nn.GRU)])
@pytest.mark.parametrize("batch_first", [False, True])
def test_sequence_wrapper_matches_cell_loop_and_torch_shapes(wrapper, torch_type, batch_first):
    rnn = wrapper(3, 5, num_layers=2, batch_first=batch_first, backend="reference").double()
    ref_rnn = torch_type(3, 5, num_layers=2, batch_first=batch_first).double()
    x = torch.randn(4, 6, 3, dtype=torch.float64)        # [T, B, in] or [B, T, in]
    out, hidden = rnn(x)
    ref_out, ref_hidden = ref_rnn(x)
    assert out.shape == ref_out.shape
    hs = hidden if isinstance(hidden, tuple) else (hidden,)
    ref_hs = ref_hidden if isinstance(ref_hidden, tuple) else (ref_hidden,)
    assert [h.shape for h in hs] == [h.shape for h in ref_hs]
    # explicit loop over the cells
    seq = x.transpose(0, 1) if batch_first else x
    layer_in = seq
    finals = []
    for cell in rnn.cells:
        state, outs = None, []
        for t in range(seq.shape[0]):
            state = cell(layer_in[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        finals.append(state)
        layer_in = torch.stack(outs)
    expected = layer_in.transpose(0, 1) if batch_first else layer_in
    assert_close(out, expected, 1e-12, 1e-12, name="sequence output")
    h_last = finals[-1][0] if isinstance(finals[-1], tuple) else finals[-1]
    assert_close(hs[0][-1], h_last, 1e-12, 1e-12, name="h_n")
    # unbatched [T, in] and an explicit initial state
    out_u, _ = rnn(x[:, 0] if not batch_first else x[0])
    assert out_u.shape == ref_rnn(x[:, 0] if not batch_first else x[0])[0].shape
    out_h, _ = rnn(x, hidden)
    assert out_h.shape == out.shape


def test_recurrent_bad_arguments():
    with pytest.raises(ValueError, match="input_size"):
        SphereLSTMCell(0, 3)
    with pytest.raises(ValueError, match="bidirectional"):
        SphereLSTM(3, 4, bidirectional=True)
    with pytest.raises(ValueError, match="dropout"):
        SphereGRU(3, 4, dropout=1.5)
    cell = SphereLSTMCell(3, 4)
    with pytest.raises(ValueError, match="input_size"):
        cell(torch.randn(2, 5))
    with pytest.raises(ValueError, match="hidden state"):
        cell(torch.randn(2, 3), (torch.randn(2, 5), torch.randn(2, 4)))
    with pytest.raises(ValueError, match="hidden state"):
        SphereGRUCell(3, 4)(torch.randn(2, 3), torch.randn(3, 4))
    with pytest.raises(ValueError, match="hidden state"):
        SphereLSTM(3, 4)(torch.randn(5, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)))


def _train(rnn, make_batch, steps, threshold, lr=0.05):
    head = torch.nn.Linear(rnn.hidden_size, 1)
    opt = torch.optim.Adam(list(rnn.parameters()) + list(head.parameters()), lr=lr)
    recent = []
    for _ in range(steps):
        x, y = make_batch()
        out, _ = rnn(x)
        loss = F.binary_cross_entropy_with_logits(head(out[-1]).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-5:]
        if len(recent) == 5 and max(recent) < threshold:
            break
    return max(recent)


def _bits(steps, batch=32):
    bits = torch.randint(0, 2, (steps, batch))
    return bits, F.one_hot(bits, 2).float()


def test_sphere_lstm_learns_parity():
    """3-bit parity (XOR of all inputs), read from the last hidden state."""
    def batch():
        bits, x = _bits(3)
        return x, (bits.sum(0) % 2).float()
    worst_recent = _train(SphereLSTM(2, 8, backend="reference"), batch, steps=250, threshold=0.1)
    assert worst_recent < 0.1, f"parity not learned: last losses up to {worst_recent:.3f}"


def test_sphere_gru_learns_delayed_recall():
    """Output the first bit of a 5-step sequence (a copy over 4 distracting steps)."""
    def batch():
        bits, x = _bits(5)
        return x, bits[0].float()
    worst_recent = _train(SphereGRU(2, 8, backend="reference"), batch, steps=250, threshold=0.1)
    assert worst_recent < 0.1, f"recall not learned: last losses up to {worst_recent:.3f}"


# ------------------------------------------------------------------------------------------
# Triton backend (interpreter on CPU): the same modules through the fused kernels
# ------------------------------------------------------------------------------------------

def _grads(module, x, dy):
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    return [out] + list(torch.autograd.grad(out, [x] + params, dy))


def test_lstm_cell_triton_backend_matches_float64():
    pytest.importorskip("triton")
    cell = SphereLSTMCell(6, 5, operator="sigmoid", learnable_k=True, backend="triton")
    ref = SphereLSTMCell(6, 5, operator="sigmoid", learnable_k=True, backend="reference").double()
    ref.load_state_dict(cell.state_dict())
    x, dy = torch.randn(3, 6), torch.randn(3, 5)
    names = ["h"] + ["dx"] + [n for n, _ in cell.named_parameters()]
    for got, want, name in zip(_grads(cell, x, dy), _grads(ref, x.double(), dy.double()), names):
        assert_close(got, want, 2e-5, 2e-5 * max(1.0, want.abs().max().item()), name=name)
