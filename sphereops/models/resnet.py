"""Residual networks: SphereResNet-32 of the official release and an ImageNet-style ResNet-18."""
from __future__ import annotations

import torch
from torch import nn

from ._layers import ConvFactory, init_weights, make_norm
from .spherenet import _check_input, _check_positive_ints


class BasicUnit(nn.Module):
    """Two 3x3 convolutions with a normalisation after each and ReLU between; the sum with the
    shortcut goes through ReLU. The shortcut is the identity when the shape is unchanged, else a
    plain (never sphere) 1x1 convolution with the stride, followed by a normalisation, as in the
    official release."""

    def __init__(self, factory: ConvFactory, in_channels: int, out_channels: int, stride: int,
                 norm: str):
        super().__init__()
        self.conv1 = factory.conv(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm1 = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = factory.conv(out_channels, out_channels, 3, padding=1)
        self.norm2 = make_norm(norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                factory.conv(in_channels, out_channels, 1, stride=stride, sphere=False),
                make_norm("batch" if norm != "none" else "none", out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.relu(self.norm1(self.conv1(x)))
        residual = self.norm2(self.conv2(residual))
        return self.relu(residual + self.shortcut(x))


class _ResidualNet(nn.Module):
    """A stem, stages of ``BasicUnit``s, global average pooling and a plain linear classifier."""

    def _build_stages(self, factory, channels, widths, units_per_stage, first_strides, norm):
        stages = []
        for width, units, stride in zip(widths, units_per_stage, first_strides):
            blocks = []
            for i in range(units):
                blocks.append(BasicUnit(factory, channels, width, stride if i == 0 else 1, norm))
                channels = width
            stages.append(nn.Sequential(*blocks))
        return nn.Sequential(*stages), channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, type(self).__name__)
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


class SphereResNet32(_ResidualNet):
    """The official SphereResNet-32 (CIFAR): a 3x3 root conv (96 filters) with normalisation and
    ReLU, three stages of five basic units (96, 192, 384 filters; stride 2 at the first unit of
    stages 2 and 3; 1x1 plain projection shortcuts where the shape changes), global average
    pooling and a plain linear classifier. 1 + 3*5*2 convolutions + classifier = 32 layers.

    ``operator`` as for ``SphereNet9`` (the official release uses "linear"); every 3x3 conv is a
    SphereConv, the projection shortcuts stay plain. ``units_per_stage`` and ``widths`` shrink it
    for tests and CPU runs.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, operator="linear", k=0.3,
                 k_init=0.5, widths=(96, 192, 384), units_per_stage: int = 5, norm: str = "batch",
                 backend: str = "auto"):
        super().__init__()
        _check_positive_ints(num_classes=num_classes, in_channels=in_channels,
                             units_per_stage=units_per_stage)
        if len(widths) != 3:
            raise ValueError(f"widths must give 3 stages, got {widths!r}")
        _check_positive_ints(**{f"widths[{i}]": w for i, w in enumerate(widths)})
        factory = ConvFactory(operator, k=k, k_init=k_init, backend=backend)
        self.operator = factory.operator
        self.stem = nn.Sequential(factory.conv(in_channels, widths[0], 3, padding=1),
                                  make_norm(norm, widths[0]), nn.ReLU(inplace=True))
        self.stages, channels = self._build_stages(factory, widths[0], widths,
                                                   (units_per_stage,) * 3, (1, 2, 2), norm)
        self.embedding_dim = channels
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)


class ResNet18(_ResidualNet):
    """An ImageNet-style ResNet-18 (no torchvision): 7x7 stride-2 stem conv (64), normalisation,
    ReLU, 3x3 stride-2 max-pool, four stages of two basic units (64, 128, 256, 512; stride 2 at
    the first unit of stages 2-4), global average pooling, linear classifier.

    ``operator`` turns the stem and every 3x3 conv into SphereConvs (1x1 projection shortcuts stay
    plain, as in SphereResNet). ``stem="cifar"`` swaps the stem for a 3x3 stride-1 conv without
    the max-pool for 32x32 inputs.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, *, operator="linear", k=0.3,
                 k_init=0.5, widths=(64, 128, 256, 512), units_per_stage=(2, 2, 2, 2),
                 stem: str = "imagenet", norm: str = "batch", backend: str = "auto"):
        super().__init__()
        _check_positive_ints(num_classes=num_classes, in_channels=in_channels)
        if len(widths) != len(units_per_stage) or len(widths) == 0:
            raise ValueError("widths and units_per_stage must have the same, non-zero length")
        _check_positive_ints(**{f"widths[{i}]": w for i, w in enumerate(widths)},
                             **{f"units_per_stage[{i}]": u for i, u in enumerate(units_per_stage)})
        factory = ConvFactory(operator, k=k, k_init=k_init, backend=backend)
        self.operator = factory.operator
        if stem == "imagenet":
            self.stem = nn.Sequential(factory.conv(in_channels, widths[0], 7, stride=2, padding=3),
                                      make_norm(norm, widths[0]), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        elif stem == "cifar":
            self.stem = nn.Sequential(factory.conv(in_channels, widths[0], 3, padding=1),
                                      make_norm(norm, widths[0]), nn.ReLU(inplace=True))
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        strides = (1,) + (2,) * (len(widths) - 1)
        self.stages, channels = self._build_stages(factory, widths[0], widths,
                                                   tuple(units_per_stage), strides, norm)
        self.embedding_dim = channels
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)
