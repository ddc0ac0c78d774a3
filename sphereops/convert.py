"""Model conversion: turn the convolutions (and optionally the linear layers) of any model into
SphereConv2d / SphereLinear, or turn Sphere layers back into plain ones.

    model, report = sphereops.convert(model, operator="cosine")
    print(report)
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

import torch
from torch import nn

from sphereops.models._layers import canonical_operator

SkipRule = Union[str, type, Callable[[str, nn.Module], bool]]


@dataclass(frozen=True)
class ReplacedLayer:
    """One replaced module: its qualified name, the classes before and after, and its groups
    (1 for linear layers); ``dropped`` lists state the new module cannot hold (a learned k when
    reverting to a plain conv)."""

    name: str
    source: str
    target: str
    groups: int = 1
    dropped: tuple = ()


@dataclass
class ConversionReport:
    """What ``convert`` did: ``replaced`` (``ReplacedLayer``s) and ``skipped`` ((name, reason))."""

    operator: object
    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    @property
    def replaced_names(self) -> list:
        return [layer.name for layer in self.replaced]

    @property
    def skipped_names(self) -> list:
        return [name for name, _ in self.skipped]

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        target = "plain" if self.operator is None else self.operator
        lines = [f"convert -> {target}: {len(self.replaced)} replaced, {len(self.skipped)} skipped"]
        for layer in self.replaced:
            extra = f" groups={layer.groups}" if layer.groups != 1 else ""
            dropped = f" (dropped {', '.join(layer.dropped)})" if layer.dropped else ""
            lines.append(f"  {layer.name}: {layer.source} -> {layer.target}{extra}{dropped}")
        for name, reason in self.skipped:
            lines.append(f"  {name}: skipped ({reason})")
        return "\n".join(lines)


def _sphere_classes():
    from sphereops import nn as sphere_nn

    return sphere_nn.SphereConv2d, sphere_nn.SphereLinear


def _make_skip_predicate(skip) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip) and not isinstance(skip, type):
        return skip
    if isinstance(skip, (str, type)):
        skip = (skip,)
    try:
        rules = tuple(skip)
    except TypeError:
        raise TypeError("skip must be a callable(name, module) -> bool, a name pattern, a module "
                        f"class, or an iterable of those; got {type(skip).__name__}") from None
    for rule in rules:
        if not isinstance(rule, (str, type)) and not callable(rule):
            raise TypeError(f"skip entries must be name patterns, module classes or callables; "
                            f"got {rule!r}")

    def predicate(name, module):
        for rule in rules:
            if isinstance(rule, str):
                if fnmatch.fnmatchcase(name, rule):
                    return True
            elif isinstance(rule, type):
                if isinstance(module, rule):
                    return True
            elif rule(name, module):
                return True
        return False

    return predicate


def _sphere_settings(module):
    """(operator, learnable) of a Sphere module as convert's ``operator`` would name it."""
    operator = getattr(module, "operator", None)
    learnable = bool(getattr(module, "learnable_k", False))
    return ("learnable" if operator == "sigmoid" and learnable else operator)


def _copy_parameter_flags(old: nn.Module, new: nn.Module) -> None:
    for pname in ("weight", "bias"):
        old_p, new_p = getattr(old, pname, None), getattr(new, pname, None)
        if isinstance(old_p, nn.Parameter) and isinstance(new_p, nn.Parameter):
            new_p.requires_grad_(old_p.requires_grad)


def _transfer_state(old: nn.Module, new: nn.Module, keep_all: bool) -> tuple:
    """Copy the weight and bias (and, for an unchanged Sphere operator, the k state too) of ``old``
    into ``new``; return the names of ``old``'s state that ``new`` has no place for."""
    old_state = old.state_dict()
    new_keys = set(new.state_dict().keys())
    wanted = {key: value for key, value in old_state.items()
              if key in new_keys and (keep_all or key in ("weight", "bias"))}
    new.load_state_dict(wanted, strict=False)
    return tuple(sorted(key for key in old_state if key not in new_keys))


def convert(model: nn.Module, *, operator="linear", k: float = 0.3, learnable_k: bool = False,
            k_init: float = 0.5, include_linear: bool = False, skip: Union[SkipRule, Iterable[SkipRule], None] = None,
            inplace: bool = False, backend: str = "auto", eps: float = 1e-4):
    """Replace every ``nn.Conv2d`` (and, with ``include_linear``, every ``nn.Linear``) of ``model``
    by ``SphereConv2d`` / ``SphereLinear`` with the same arguments, weights and bias.

    Args:
        model: any module. With ``inplace=False`` (default) a deep copy is converted and the
            original is untouched.
        operator: "linear", "cosine", "sigmoid", "learnable" (sigmoid with learned per-channel
            k, the same as ``learnable_k=True``), or None to turn Sphere layers back into plain
            ``nn.Conv2d`` / ``nn.Linear`` (the weights and bias carry over, a learned k is
            dropped and reported). Sphere layers already present are re-created with the new
            operator; one already using the requested operator is left alone.
        k: sigmoid's k (fixed). k_init: initial k of a learnable sigmoid.
        include_linear: also convert ``nn.Linear`` layers (off by default: the classifier of a
            SphereNet stays plain).
        skip: modules to leave alone: a qualified-name glob pattern ("fc", "layer4.*"), a module
            class, a callable ``(name, module) -> bool``, or an iterable of those.
        inplace: convert ``model`` itself instead of a copy.
        backend, eps: handed to every new Sphere module.

    Grouped and depthwise convolutions keep their ``groups`` (SphereConv2d normalises each
    group's patch separately). Subclasses of ``nn.Conv2d`` / ``nn.Linear`` other than the Sphere
    ones (quantised, LoRA, ...), lazy modules and modules with parametrizations are skipped with a
    reason, as are modules whose arguments SphereConv2d rejects.

    Returns:
        ``(converted_model, ConversionReport)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    operator = canonical_operator(operator)
    if learnable_k and operator not in ("sigmoid", "learnable"):
        raise ValueError("learnable_k=True needs operator='sigmoid' (or 'learnable')")
    if operator == "sigmoid" and learnable_k:
        operator = "learnable"
    if not (isinstance(k, (int, float)) and k > 0):
        raise ValueError(f"k must be a positive number, got {k!r}")
    if not (isinstance(k_init, (int, float)) and k_init > 0.05):
        raise ValueError(f"k_init must be a number > 0.05, got {k_init!r}")
    if not isinstance(include_linear, bool):
        raise TypeError("include_linear must be a bool")
    should_skip = _make_skip_predicate(skip)
    sphere_conv2d, sphere_linear = _sphere_classes()
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport(operator=operator)

    targets = []
    for name, module in model.named_modules():
        kind = None
        if type(module) in (nn.Conv2d, sphere_conv2d):
            kind = "conv"
        elif type(module) in (nn.Linear, sphere_linear):
            kind = "linear" if include_linear or isinstance(module, sphere_linear) else None
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            if isinstance(module, nn.Linear) and not include_linear:
                continue
            if isinstance(module, (nn.modules.lazy.LazyModuleMixin,)):
                report.skipped.append((name, "lazy module not initialised yet"))
            else:
                report.skipped.append((name, f"subclass {type(module).__name__} is not converted"))
            continue
        if kind is None:
            continue
        if should_skip(name, module):
            report.skipped.append((name, "matched skip"))
            continue
        if getattr(module, "parametrizations", None):
            report.skipped.append((name, "has parametrizations"))
            continue
        targets.append((name, module, kind))

    for name, old, kind in targets:
        is_sphere = isinstance(old, (sphere_conv2d, sphere_linear))
        current = _sphere_settings(old) if is_sphere else None
        if current == operator and (operator != "sigmoid" or float(_fixed_k(old)) == float(k)):
            continue  # already what was asked for
        weight = old.weight
        factory = dict(device=weight.device, dtype=weight.dtype)
        has_bias = old.bias is not None
        try:
            if kind == "conv":
                args = (old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                        old.dilation, old.groups, has_bias, old.padding_mode)
                if operator is None:
                    new = nn.Conv2d(*args, **factory)
                else:
                    new = sphere_conv2d(*args, **_sphere_kwargs(operator, k, k_init, eps, backend),
                                        **factory)
            else:
                args = (old.in_features, old.out_features, has_bias)
                if operator is None:
                    new = nn.Linear(*args, **factory)
                else:
                    new = sphere_linear(*args, **_sphere_kwargs(operator, k, k_init, eps, backend),
                                        **factory)
        except (ValueError, TypeError, NotImplementedError) as exc:
            report.skipped.append((name, f"rejected by {('SphereConv2d' if kind == 'conv' else 'SphereLinear') if operator else 'nn'}: {exc}"))
            continue
        keep_all = is_sphere and current == operator
        dropped = _transfer_state(old, new, keep_all)
        _copy_parameter_flags(old, new)
        new.train(old.training)
        _set_submodule(model, name, new)
        report.replaced.append(ReplacedLayer(name=name, source=type(old).__name__,
                                             target=type(new).__name__,
                                             groups=getattr(old, "groups", 1), dropped=dropped))
    return model, report


def _fixed_k(module):
    k = getattr(module, "k", None)
    if isinstance(k, torch.Tensor) and k.numel() > 0:
        return k.reshape(-1)[0].item()
    return k if k is not None else float("nan")


def _sphere_kwargs(operator, k, k_init, eps, backend):
    if operator == "learnable":
        return dict(operator="sigmoid", learnable_k=True, k_init=k_init, eps=eps, backend=backend)
    return dict(operator=operator, k=k, eps=eps, backend=backend)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    if name == "":
        raise ValueError("convert cannot replace the root module itself; wrap it in a container")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
