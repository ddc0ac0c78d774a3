"""The layer suite: every convolution shape the benchmark times, in one place.

Each network's *distinct* convolutions (a shape that occurs several times in a network is listed
once) plus edge cases that stress the kernels differently (C_in = 3 first layers, 1x1, stride 2,
depthwise, grouped, odd sizes with dilation).  ``QUICK`` is the subset ``make bench`` times on a
GPU, ``FULL`` everything, ``CPU_QUICK`` / ``CPU_FULL`` the batch-reduced shapes used without a GPU
(the CPU reference path is ~100x slower, so the same layers are kept but the batch is small).

Counting conventions (DESIGN.md section 5):

* FLOPs: ``2 * N * Ho * Wo * C_out * (C_in / G) * kh * kw`` per GEMM; forward has one GEMM,
  backward two (dgrad + wgrad), forward+backward three.  The epilogue (norms, arccos, g) is not
  counted: TFLOP/s are "useful convolution FLOPs per second", comparable across providers.
* Bytes: the fewest a convolution must move, each input read once and each output written once
  (forward: x, w in, y out; backward: dy, x, w in, dx, dw out).  The same conv floor is used for
  every provider, so "% of floor" says how close a SphereConv gets to what a plain conv must pay.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODES = ("fwd", "bwd", "fwd+bwd")
# Number of convolution-sized GEMMs in each mode (see the module docstring).
GEMMS_PER_MODE = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


@dataclass(frozen=True)
class ConvShape:
    """One convolution layer: ``x [n, c_in, h, w]`` -> ``y [n, c_out, ho, wo]``."""

    name: str
    net: str
    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    kh: int
    kw: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1

    def validate(self) -> None:
        """Raise ValueError (naming the field) for a shape no conv could have."""
        for field in ("n", "c_in", "c_out", "h", "w", "kh", "kw", "stride", "dilation", "groups"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {field} must be a positive int, got {value!r}")
        if not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"{self.name}: padding must be an int >= 0, got {self.padding!r}")
        if self.c_in % self.groups or self.c_out % self.groups:
            raise ValueError(f"{self.name}: groups={self.groups} must divide c_in={self.c_in} "
                             f"and c_out={self.c_out}")
        ho, wo = self.out_hw
        if ho < 1 or wo < 1:
            raise ValueError(f"{self.name}: empty output {ho}x{wo}")

    @property
    def out_hw(self) -> tuple[int, int]:
        def out(size: int, k: int) -> int:
            return (size + 2 * self.padding - self.dilation * (k - 1) - 1) // self.stride + 1
        return out(self.h, self.kh), out(self.w, self.kw)

    @property
    def gemm_flops(self) -> int:
        ho, wo = self.out_hw
        return 2 * self.n * ho * wo * self.c_out * (self.c_in // self.groups) * self.kh * self.kw

    def flops(self, mode: str) -> int:
        return GEMMS_PER_MODE[mode] * self.gemm_flops

    def min_bytes(self, mode: str, itemsize: int) -> int:
        ho, wo = self.out_hw
        x = self.n * self.c_in * self.h * self.w
        w = self.c_out * (self.c_in // self.groups) * self.kh * self.kw
        y = self.n * self.c_out * ho * wo
        fwd = x + w + y
        bwd = (y + x + w) + (x + w)          # read dy, x, w; write dx, dw
        elems = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
        return elems * itemsize

    def with_batch(self, n: int) -> "ConvShape":
        return dataclasses.replace(self, n=n)

    def label(self) -> str:
        """Compact human label: ``N x Cin x H x W -> Cout, kh x kw /s p d g``."""
        extra = []
        if self.stride != 1:
            extra.append(f"s{self.stride}")
        if self.padding:
            extra.append(f"p{self.padding}")
        if self.dilation != 1:
            extra.append(f"d{self.dilation}")
        if self.groups != 1:
            extra.append(f"g{self.groups}")
        tail = (" " + ",".join(extra)) if extra else ""
        return f"{self.n}x{self.c_in}x{self.h}x{self.w}->{self.c_out} {self.kh}x{self.kw}{tail}"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ho"], d["wo"] = self.out_hw
        d["label"] = self.label()
        return d


def _conv(name, net, n, c_in, c_out, hw, k, stride=1, padding=None, dilation=1, groups=1):
    if padding is None:
        padding = dilation * (k - 1) // 2          # "same"-style padding for odd kernels
    return ConvShape(name, net, n, c_in, c_out, hw, hw, k, k, stride, padding, dilation, groups)


# SphereNet-9 (official CIFAR release): 3 stages of three 3x3 convs (128, 192, 256), 2x2 max-pool
# after each stage, a 4x4 valid "fc6" conv with 256 outputs.  Batch 128.
SPHERENET9 = [
    _conv("sn9.conv1_1", "spherenet9", 128, 3, 128, 32, 3),
    _conv("sn9.conv1_x", "spherenet9", 128, 128, 128, 32, 3),
    _conv("sn9.conv2_1", "spherenet9", 128, 128, 192, 16, 3),
    _conv("sn9.conv2_x", "spherenet9", 128, 192, 192, 16, 3),
    _conv("sn9.conv3_1", "spherenet9", 128, 192, 256, 8, 3),
    _conv("sn9.conv3_x", "spherenet9", 128, 256, 256, 8, 3),
    _conv("sn9.fc6", "spherenet9", 128, 256, 256, 4, 4, padding=0),
]

# SphereResNet-32 (official release): 3x3 root conv with 96 filters, stages of 96 / 192 / 384
# filters, stride 2 at the first unit of stages 2 and 3 (1x1 projection shortcuts there).
SPHERERESNET32 = [
    _conv("srn32.root", "sphereresnet32", 128, 3, 96, 32, 3),
    _conv("srn32.s1", "sphereresnet32", 128, 96, 96, 32, 3),
    _conv("srn32.s2_down", "sphereresnet32", 128, 96, 192, 32, 3, stride=2),
    _conv("srn32.s2", "sphereresnet32", 128, 192, 192, 16, 3),
    _conv("srn32.s2_proj", "sphereresnet32", 128, 96, 192, 32, 1, stride=2),
    _conv("srn32.s3_down", "sphereresnet32", 128, 192, 384, 16, 3, stride=2),
    _conv("srn32.s3", "sphereresnet32", 128, 384, 384, 8, 3),
    _conv("srn32.s3_proj", "sphereresnet32", 128, 192, 384, 16, 1, stride=2),
]

# ImageNet ResNet-18 at batch 64 (224x224 input).
RESNET18 = [
    _conv("r18.stem", "resnet18", 64, 3, 64, 224, 7, stride=2, padding=3),
    _conv("r18.l1", "resnet18", 64, 64, 64, 56, 3),
    _conv("r18.l2_down", "resnet18", 64, 64, 128, 56, 3, stride=2),
    _conv("r18.l2", "resnet18", 64, 128, 128, 28, 3),
    _conv("r18.l2_proj", "resnet18", 64, 64, 128, 56, 1, stride=2),
    _conv("r18.l3_down", "resnet18", 64, 128, 256, 28, 3, stride=2),
    _conv("r18.l3", "resnet18", 64, 256, 256, 14, 3),
    _conv("r18.l3_proj", "resnet18", 64, 128, 256, 28, 1, stride=2),
    _conv("r18.l4_down", "resnet18", 64, 256, 512, 14, 3, stride=2),
    _conv("r18.l4", "resnet18", 64, 512, 512, 7, 3),
    _conv("r18.l4_proj", "resnet18", 64, 256, 512, 14, 1, stride=2),
]

# ImageNet ResNet-50 (v1.5: stride on the 3x3) at batch 64; the stem equals ResNet-18's.
RESNET50 = [
    _conv("r50.l1_reduce0", "resnet50", 64, 64, 64, 56, 1),
    _conv("r50.l1_3x3", "resnet50", 64, 64, 64, 56, 3),
    _conv("r50.l1_expand", "resnet50", 64, 64, 256, 56, 1),
    _conv("r50.l1_reduce", "resnet50", 64, 256, 64, 56, 1),
    _conv("r50.l2_reduce0", "resnet50", 64, 256, 128, 56, 1),
    _conv("r50.l2_3x3_down", "resnet50", 64, 128, 128, 56, 3, stride=2),
    _conv("r50.l2_expand", "resnet50", 64, 128, 512, 28, 1),
    _conv("r50.l2_proj", "resnet50", 64, 256, 512, 56, 1, stride=2),
    _conv("r50.l2_reduce", "resnet50", 64, 512, 128, 28, 1),
    _conv("r50.l2_3x3", "resnet50", 64, 128, 128, 28, 3),
    _conv("r50.l3_reduce0", "resnet50", 64, 512, 256, 28, 1),
    _conv("r50.l3_3x3_down", "resnet50", 64, 256, 256, 28, 3, stride=2),
    _conv("r50.l3_expand", "resnet50", 64, 256, 1024, 14, 1),
    _conv("r50.l3_proj", "resnet50", 64, 512, 1024, 28, 1, stride=2),
    _conv("r50.l3_reduce", "resnet50", 64, 1024, 256, 14, 1),
    _conv("r50.l3_3x3", "resnet50", 64, 256, 256, 14, 3),
    _conv("r50.l4_reduce0", "resnet50", 64, 1024, 512, 14, 1),
    _conv("r50.l4_3x3_down", "resnet50", 64, 512, 512, 14, 3, stride=2),
    _conv("r50.l4_expand", "resnet50", 64, 512, 2048, 7, 1),
    _conv("r50.l4_proj", "resnet50", 64, 1024, 2048, 14, 1, stride=2),
    _conv("r50.l4_reduce", "resnet50", 64, 2048, 512, 7, 1),
    _conv("r50.l4_3x3", "resnet50", 64, 512, 512, 7, 3),
]

# Shapes that exercise other code paths than the networks above.
EDGE = [
    _conv("edge.cin3_5x5", "edge", 128, 3, 64, 32, 5),
    _conv("edge.1x1", "edge", 128, 256, 256, 16, 1),
    _conv("edge.s2_3x3", "edge", 128, 128, 128, 32, 3, stride=2),
    _conv("edge.depthwise", "edge", 64, 256, 256, 28, 3, groups=256),
    _conv("edge.grouped", "edge", 64, 256, 256, 28, 3, groups=8),
    _conv("edge.odd", "edge", 37, 29, 61, 33, 5, padding=4, dilation=2),
    _conv("edge.odd_nopad", "edge", 33, 17, 47, 19, 3, stride=3, padding=0),
]

FULL = SPHERENET9 + SPHERERESNET32 + RESNET18 + RESNET50 + EDGE

# The GPU quick suite: one or two layers per network plus the edge paths most likely to break a
# kernel (C_in = 3, 1x1, stride 2, depthwise, odd).  Chosen to time in ~2 minutes with all
# providers on an H100, torch.compile included.
QUICK_NAMES = (
    "sn9.conv1_x", "sn9.conv3_x", "srn32.s2_down", "srn32.s3", "r18.l1", "r18.l3",
    "r50.l1_reduce", "edge.cin3_5x5", "edge.depthwise", "edge.odd",
)

# Layers the secondary sweeps (operators, dtypes, layouts) run on: one large, one small.
SWEEP_NAMES = ("sn9.conv1_x", "srn32.s3")

BY_NAME = {s.name: s for s in FULL}
QUICK = [BY_NAME[name] for name in QUICK_NAMES]
SWEEP = [BY_NAME[name] for name in SWEEP_NAMES]

# CPU: same layers with a batch that keeps the reference path to ~0.1 s per call on 2 cores.
# ImageNet-size layers are left out of the CPU quick suite (one 224x224 stem alone takes seconds).
CPU_QUICK = [BY_NAME[name].with_batch(2) for name in ("sn9.conv1_x", "srn32.s3", "edge.odd")]
CPU_FULL = [s.with_batch(2) for s in FULL if s.net != "resnet50" and s.h <= 56]

# Issue 2's acceptance row: reference SphereConv2d fwd+bwd vs nn.Conv2d fwd+bwd on CPU.
CRITERION = ConvShape("criterion", "criterion", 32, 64, 64, 32, 32, 3, 3, 1, 1)
CRITERION_TARGET = 1.3
CRITERION_LONG_RUN = 1.15

# Tiny shapes for the unit tests (interpreter-friendly: one tile, one K iteration where possible).
TINY = [
    ConvShape("tiny.3x3", "tiny", 2, 4, 8, 6, 6, 3, 3, 1, 1),
    ConvShape("tiny.s2_g2", "tiny", 1, 4, 4, 7, 7, 3, 3, 2, 1, 1, 2),
]


@dataclass(frozen=True)
class LinearShape:
    """One SphereLinear layer: ``x [m, in_features]`` -> ``y [m, out_features]``."""

    name: str
    m: int
    in_features: int
    out_features: int

    def validate(self) -> None:
        for field in ("m", "in_features", "out_features"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {field} must be a positive int, got {value!r}")

    @property
    def gemm_flops(self) -> int:
        return 2 * self.m * self.in_features * self.out_features

    def flops(self, mode: str) -> int:
        return GEMMS_PER_MODE[mode] * self.gemm_flops

    def min_bytes(self, mode: str, itemsize: int) -> int:
        x, w, y = self.m * self.in_features, self.out_features * self.in_features, self.m * self.out_features
        fwd = x + w + y
        bwd = (y + x + w) + (x + w)
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode] * itemsize

    def label(self) -> str:
        return f"{self.m}x{self.in_features}->{self.out_features}"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["label"] = self.label()
        return d


LINEAR_FULL = [
    LinearShape("lin.fc_cifar", 128, 4096, 512),
    LinearShape("lin.square_4k", 8192, 4096, 4096),
    LinearShape("lin.mlp_up", 8192, 1024, 4096),
    LinearShape("lin.classifier", 4096, 2048, 1000),
]
LINEAR_QUICK = [LinearShape("lin.square_4k", 8192, 4096, 4096), LinearShape("lin.classifier", 4096, 2048, 1000)]
LINEAR_CPU = [LinearShape("lin.cpu", 256, 512, 256)]
LINEAR_TINY = [LinearShape("lin.tiny", 8, 16, 12)]


def all_shapes() -> list:
    """Every shape object defined here (for validation)."""
    return (FULL + CPU_FULL + CPU_QUICK + [CRITERION] + TINY
            + LINEAR_FULL + LINEAR_QUICK + LINEAR_CPU + LINEAR_TINY)


def validate_all() -> None:
    names = [s.name for s in FULL]
    if len(names) != len(set(names)):
        raise ValueError("duplicate shape names in FULL")
    for shape in all_shapes():
        shape.validate()
