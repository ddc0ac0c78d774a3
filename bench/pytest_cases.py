"""The case lists behind ``pytest bench/`` (kept out of conftest so they can be imported)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import providers as P
from . import shapes as S


@dataclass(frozen=True)
class Case:
    kind: str
    shape: object
    dtype: str
    layout: str
    operator: str
    provider: str
    mode: str

    @property
    def id(self) -> str:
        return f"{self.shape.name}-{self.dtype}-{self.layout}-{self.operator}-{self.provider}-{self.mode}"

    @property
    def group(self) -> str:
        return f"{self.kind} {self.shape.name} {self.dtype} {self.layout} {self.operator} {self.mode}"


def _device(config) -> str:
    choice = config.getoption("--bench-device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def conv_cases(config) -> list:
    suite = config.getoption("--bench-suite")
    cuda = _device(config) == "cuda"
    if suite == "tiny":
        shapes = S.TINY[:1]
    elif cuda:
        shapes = S.FULL if suite == "full" else S.QUICK
    else:
        shapes = S.CPU_FULL if suite == "full" else S.CPU_QUICK
    dtype, layout = ("bf16", "channels_last") if cuda else ("fp32", "nchw")
    providers = [p for p in P.CONV_PROVIDERS
                 if p != "compiled_best" or config.getoption("--bench-compile")]
    cases = []
    for shape in shapes:
        for provider in providers:
            operator = "-" if provider == "conv2d" else "linear"
            for mode in S.MODES:
                cases.append(Case("conv", shape, dtype, layout, operator, provider, mode))
    return cases


def linear_cases(config) -> list:
    suite = config.getoption("--bench-suite")
    cuda = _device(config) == "cuda"
    if suite == "tiny":
        shapes = S.LINEAR_TINY
    elif cuda:
        shapes = S.LINEAR_FULL if suite == "full" else S.LINEAR_QUICK
    else:
        shapes = S.LINEAR_CPU
    dtype = "bf16" if cuda else "fp32"
    cases = []
    for shape in shapes:
        for provider in P.LINEAR_PROVIDERS:
            operator = "-" if provider == "linear" else "linear"
            for mode in S.MODES:
                cases.append(Case("linear", shape, dtype, "-", operator, provider, mode))
    return cases
