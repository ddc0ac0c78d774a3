"""Recurrent cells whose input and hidden projections are SphereLinear layers.

``SphereLSTMCell`` / ``SphereGRUCell`` follow ``torch.nn.LSTMCell`` / ``torch.nn.GRUCell``
exactly in their call signature and gate equations; only the two affine projections
``W_i x + b_i`` and ``W_h h + b_h`` become ``SphereLinear`` (``g(angle(w_j, x)) + b_j``), so each
projection is bounded in [-1, 1] before its bias, whatever the magnitude of ``x`` or ``h``.
``SphereLSTM`` / ``SphereGRU`` run a stack of cells over a sequence with the call signature of
``torch.nn.LSTM`` / ``torch.nn.GRU`` (unidirectional; ``batch_first`` and inter-layer dropout
supported).

A zero hidden state (the default initial state) is fine: a zero row has ``c = 0`` (``eps`` under
the square root), i.e. ``g(pi/2) = 0`` for every operator, so ``W_h h`` contributes only its bias,
as in the torch cells.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reference import DEFAULT_EPS
from .linear import SphereLinear

__all__ = ["SphereLSTMCell", "SphereGRUCell", "SphereLSTM", "SphereGRU"]


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class _SphereCellBase(nn.Module):
    """Holds ``ih: SphereLinear(input_size, G*hidden)`` and ``hh: SphereLinear(hidden, G*hidden)``."""

    _num_gates = 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *,
                 operator: str = "cosine", k: float = 0.3, learnable_k: bool = False,
                 k_init: float = 0.5, eps: float = DEFAULT_EPS, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.bias = bool(bias)
        sphere = dict(operator=operator, k=k, learnable_k=learnable_k, k_init=k_init, eps=eps,
                      backend=backend, device=device, dtype=dtype)
        out = self._num_gates * self.hidden_size
        self.ih = SphereLinear(self.input_size, out, bias=self.bias, **sphere)
        self.hh = SphereLinear(self.hidden_size, out, bias=self.bias, **sphere)

    def _prepare(self, input: Tensor, hx: Optional[Tuple[Tensor, ...]], num_states: int):
        """Validate; add a batch dim to unbatched input; zero initial states when hx is None."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{type(self).__name__}: expected input of shape [batch, "
                             f"{self.input_size}] or [{self.input_size}], got {list(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{type(self).__name__}: input has {input.shape[-1]} features, "
                             f"expected input_size={self.input_size}")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(x.shape[0], self.hidden_size, dtype=x.dtype, device=x.device)
            states = (zeros,) * num_states
        else:
            states = tuple(hx)
            if len(states) != num_states:
                raise ValueError(f"{type(self).__name__}: hx must hold {num_states} tensor(s)")
            want = (x.shape[0], self.hidden_size) if batched else (self.hidden_size,)
            for s in states:
                if not isinstance(s, torch.Tensor) or tuple(s.shape) != want:
                    raise ValueError(f"{type(self).__name__}: hidden state must have shape "
                                     f"{list(want)}, got "
                                     f"{list(s.shape) if isinstance(s, torch.Tensor) else s!r}")
            if not batched:
                states = tuple(s.unsqueeze(0) for s in states)
        return x, states, batched

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        return s


class SphereLSTMCell(_SphereCellBase):
    """``torch.nn.LSTMCell`` with SphereLinear projections.

    ``i, f, g, o = split(ih(x) + hh(h))``; ``c' = sigmoid(f) c + sigmoid(i) tanh(g)``;
    ``h' = sigmoid(o) tanh(c')``. ``forward(input, hx=None) -> (h', c')``, input ``[B, in]`` or
    ``[in]``, ``hx = (h, c)`` each ``[B, hidden]`` (or ``[hidden]``).

    Extra keyword arguments (operator, k, learnable_k, k_init, eps, backend) go to both
    :class:`sphereops.nn.SphereLinear` projections.
    """

    _num_gates = 4   # the constructor's signature is the base class's

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tensor]:
        x, (h, c), batched = self._prepare(input, hx, 2)
        gates = self.ih(x) + self.hh(h)
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if not batched:
            return h_new.squeeze(0), c_new.squeeze(0)
        return h_new, c_new


class SphereGRUCell(_SphereCellBase):
    """``torch.nn.GRUCell`` with SphereLinear projections.

    ``r, z, n`` from ``gi = ih(x)``, ``gh = hh(h)``: ``r = sigmoid(gi_r + gh_r)``,
    ``z = sigmoid(gi_z + gh_z)``, ``n = tanh(gi_n + r * gh_n)``, ``h' = (1 - z) n + z h``.
    ``forward(input, hx=None) -> h'``.
    """

    _num_gates = 3   # the constructor's signature is the base class's

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, (h,), batched = self._prepare(input, None if hx is None else (hx,), 1)
        gi_r, gi_z, gi_n = self.ih(x).chunk(3, dim=1)
        gh_r, gh_z, gh_n = self.hh(h).chunk(3, dim=1)
        r = torch.sigmoid(gi_r + gh_r)
        z = torch.sigmoid(gi_z + gh_z)
        n = torch.tanh(gi_n + r * gh_n)
        h_new = (1.0 - z) * n + z * h
        return h_new if batched else h_new.squeeze(0)


class _SphereRNNBase(nn.Module):
    _cell_type = None
    _num_states = 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, *,
                 operator: str = "cosine", k: float = 0.3, learnable_k: bool = False,
                 k_init: float = 0.5, eps: float = DEFAULT_EPS, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        sphere_kwargs = dict(operator=operator, k=k, learnable_k=learnable_k, k_init=k_init,
                             eps=eps, backend=backend, device=device, dtype=dtype)
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.num_layers = _check_size("num_layers", num_layers)
        if bidirectional:
            raise ValueError(f"{type(self).__name__}: bidirectional=True is not supported")
        if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.cells = nn.ModuleList(
            self._cell_type(self.input_size if layer == 0 else self.hidden_size, self.hidden_size,
                            self.bias, **sphere_kwargs)
            for layer in range(self.num_layers))

    def _run(self, input: Tensor, hx):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a tensor (PackedSequence is not supported), got "
                            f"{type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__}: expected a 3-D (batched) or 2-D (unbatched) "
                             f"input, got shape {list(input.shape)}")
        batched = input.dim() == 3
        if batched:
            x = input.transpose(0, 1) if self.batch_first else input    # [T, B, in]
        else:
            x = input.unsqueeze(1)          # unbatched [T, in], whatever batch_first says
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected "
                             f"input_size={self.input_size}")
        steps, batch = x.shape[0], x.shape[1]
        want = (self.num_layers, batch, self.hidden_size)
        if hx is None:
            states = [torch.zeros(want, dtype=x.dtype, device=x.device)] * self._num_states
        else:
            states = list(hx) if self._num_states > 1 else [hx]
            if len(states) != self._num_states:
                raise ValueError(f"{type(self).__name__}: hx must hold {self._num_states} tensors")
            if not batched:
                states = [s.unsqueeze(1) if isinstance(s, torch.Tensor) else s for s in states]
            for s in states:
                if not isinstance(s, torch.Tensor) or tuple(s.shape) != want:
                    raise ValueError(f"{type(self).__name__}: hidden state must have shape "
                                     f"{list(want) if batched else [want[0], want[2]]}")
        layer_input = x
        finals = [[] for _ in range(self._num_states)]
        for layer, cell in enumerate(self.cells):
            state = tuple(s[layer] for s in states)
            outputs = []
            for t in range(steps):
                state = cell(layer_input[t], state if self._num_states > 1 else state[0])
                if self._num_states == 1:
                    state = (state,)
                outputs.append(state[0])
            for i, s in enumerate(state):
                finals[i].append(s)
            layer_input = torch.stack(outputs, dim=0)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        finals = [torch.stack(f, dim=0) for f in finals]
        if batched:
            output = layer_input.transpose(0, 1) if self.batch_first else layer_input
        else:
            output = layer_input.squeeze(1)
            finals = [f.squeeze(1) for f in finals]
        return output, finals

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s


class SphereLSTM(_SphereRNNBase):
    """A stack of :class:`SphereLSTMCell` over a sequence, called like ``torch.nn.LSTM``:
    ``forward(input, hx=None) -> (output, (h_n, c_n))`` with input ``[T, B, in]`` (``[B, T, in]``
    if ``batch_first``) or unbatched ``[T, in]``, ``h_n, c_n`` of shape ``[num_layers, B, hidden]``.
    """

    _cell_type = SphereLSTMCell
    _num_states = 2

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None):
        output, (h_n, c_n) = self._run(input, hx)
        return output, (h_n, c_n)


class SphereGRU(_SphereRNNBase):
    """A stack of :class:`SphereGRUCell` over a sequence, called like ``torch.nn.GRU``:
    ``forward(input, hx=None) -> (output, h_n)``."""

    _cell_type = SphereGRUCell
    _num_states = 1

    def forward(self, input: Tensor, hx: Optional[Tensor] = None):
        output, (h_n,) = self._run(input, hx)
        return output, h_n
