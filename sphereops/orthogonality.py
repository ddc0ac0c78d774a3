"""The orthogonality penalty on filters of the official SphereNet release.

For each selected convolution, ``W`` = its filters flattened to ``[C_out, C_in/G * kh * kw]``
(the release's ``[C_in*kh*kw, C_out]`` transposed: the Gram matrix is the same), and the penalty
is ``coeff * 1/2 * ||W W^T - I||_F^2`` (the release: ``2e-4 * tf.nn.l2_loss(W^T W - I)``),
summed over layers. It pushes the filters of a layer towards being orthonormal.
"""
from __future__ import annotations

import torch
from torch import nn

DEFAULT_COEFF = 2e-4


def filter_orthogonality(weight: torch.Tensor) -> torch.Tensor:
    """``1/2 * ||W W^T - I||_F^2`` of one filter bank (conv ``[C_out, ...]`` or linear
    ``[out, in]``), computed in float32 (float64 for float64 weights)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError("weight must be a tensor with at least 2 dimensions [C_out, ...]")
    flat = weight.reshape(weight.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    gram = flat @ flat.t()
    gram = gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return 0.5 * gram.pow(2).sum()


def orthogonality_penalty(model: nn.Module, coeff: float = DEFAULT_COEFF, *,
                          layers: str = "sphere") -> torch.Tensor:
    """The summed penalty over the convolutions of ``model``, times ``coeff``.

    ``layers="sphere"`` (as the release, which adds it to every SphereConv including fc6 but not
    to the plain shortcuts or the classifier) or ``"conv"`` (every ``nn.Conv2d``, for a CNN
    baseline). Returns a 0-d tensor (zero when no layer is selected).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if layers not in ("sphere", "conv"):
        raise ValueError(f"layers must be 'sphere' or 'conv', got {layers!r}")
    if not (isinstance(coeff, (int, float)) and coeff >= 0):
        raise ValueError(f"coeff must be a non-negative number, got {coeff!r}")
    if layers == "sphere":
        from sphereops import nn as sphere_nn

        selected = [m for m in model.modules() if isinstance(m, sphere_nn.SphereConv2d)]
    else:
        selected = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    total = None
    for module in selected:
        term = filter_orthogonality(module.weight)
        total = term if total is None else total + term
    if total is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return coeff * total
