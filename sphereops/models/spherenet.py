"""SphereNet-9, the plain nine-layer network of the official SphereNet release (CIFAR-10)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ._layers import ConvFactory, init_weights, make_norm


class SphereNet9(nn.Module):
    """Three stages of three 3x3 convolutions (stride 1, padding 1), each followed by a
    normalisation and ReLU, a 2x2 max-pool after each stage, then the 4x4 "fc6" SphereConv (no
    ReLU, normalised) and a plain linear classifier.

    Args:
        num_classes: classifier outputs.
        in_channels: image channels (3 for CIFAR, 1 for MNIST-like data).
        operator: None (plain CNN baseline), "linear", "cosine" (the official default),
            "sigmoid" or "learnable".
        k: sigmoid's k (fixed sigmoid); k_init: the learnable operator's initial k.
        input_size: image height = width. The pools round up (the official 'SAME' pooling), so
            32 -> 4 and 28 -> 4 before fc6; fc6's kernel is that final size (4 for both).
        widths: filters per stage (official 128, 192, 256); fc6_width: fc6 outputs (256).
        convs_per_stage: 3 in the official network.
        norm: "batch" (official), "sphere", "both" or "none" (see ``make_norm``).
        backend: handed to every SphereConv2d ("auto", "reference", "triton").

    ``forward_features`` returns the fc6 embedding ``[N, fc6_width]``; ``forward`` the logits.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, operator="cosine", k=0.3,
                 k_init=0.5, input_size: int = 32, widths=(128, 192, 256), fc6_width: int = 256,
                 convs_per_stage: int = 3, norm: str = "batch", backend: str = "auto"):
        super().__init__()
        _check_positive_ints(num_classes=num_classes, in_channels=in_channels,
                             input_size=input_size, fc6_width=fc6_width,
                             convs_per_stage=convs_per_stage)
        if len(widths) == 0:
            raise ValueError("widths must name at least one stage")
        _check_positive_ints(**{f"widths[{i}]": w for i, w in enumerate(widths)})
        factory = ConvFactory(operator, k=k, k_init=k_init, backend=backend)
        self.operator = factory.operator
        self.input_size = input_size
        layers = []
        channels, spatial = in_channels, input_size
        for width in widths:
            for _ in range(convs_per_stage):
                layers += [factory.conv(channels, width, 3, padding=1),
                           make_norm(norm, width), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            spatial = math.ceil(spatial / 2)
        self.features = nn.Sequential(*layers)
        self.fc6_kernel = spatial
        self.fc6 = factory.conv(channels, fc6_width, spatial)
        self.fc6_norm = make_norm(norm, fc6_width)
        self.embedding_dim = fc6_width
        self.classifier = nn.Linear(fc6_width, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, type(self).__name__)
        h = self.features(x)
        if h.shape[-2:] != (self.fc6_kernel, self.fc6_kernel):
            raise ValueError(
                f"SphereNet9 was built for {self.input_size}x{self.input_size} inputs; got "
                f"{tuple(x.shape[-2:])}"
            )
        return self.fc6_norm(self.fc6(h)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def _check_positive_ints(**values):
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_input(x, model_name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model_name} input must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{model_name} input must be [N, C, H, W], got shape {tuple(x.shape)}")
