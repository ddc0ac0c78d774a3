"""Launch plans: what a launcher derives from its arguments' metadata, cached per signature.

A launcher's work splits in two. The *plan* -- output shapes, the path taken, tile choices,
constexpr flags, the integer launch arguments -- is a pure function of the arguments' shapes,
strides, dtypes and devices, the options, and the module switches. The *run* is the rest:
allocations, reading data pointers, launches. In eager training every layer is called with
the same shapes step after step, so the plan is worth keeping: deriving it was most of the
Python sphereops spends a call (``python -m bench.host_overhead --stub-launches``).

A :class:`PlanCache` maps a key to a plan. The key must name everything the plan reads --
each tensor through :func:`tensor_key`, the validated options, and every module switch or
replaceable helper the builder consults (tests switch them with monkeypatch). A plan is a
``types.SimpleNamespace`` of plain values (ints, bools, tuples, dicts of constexprs), which
compare by value.

``SPHEREOPS_CHECK_PLANS=1`` (the test suite sets it): every cache hit builds the plan again and
raises if it differs from the kept one, so a key that misses something a test switches fails
that test instead of silently running a stale plan.
"""
from __future__ import annotations

import torch

from .launch import env_switch

CHECK_PLANS = env_switch("SPHEREOPS_CHECK_PLANS", False)

# a model has a few dozen distinct layer signatures; past this many (shapes that keep
# changing) the cache starts over rather than grow without bound
MAX_PLANS = 1024


def tensor_key(t):
    """The part of a tensor a plan may depend on: shape, strides, storage offset (alignment),
    dtype and device (None for None)."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.storage_offset(), t.dtype, t.device)


def dense_strides(shape, memory_format=torch.contiguous_format):
    """The strides ``torch.empty(shape, memory_format=...)`` gives, without allocating."""
    return torch.empty(shape, device="meta", memory_format=memory_format).stride()


def meta_like(t, shape=None, strides=None):
    """A meta tensor of ``t``'s dtype with ``t``'s (or the given) shape and strides: what a
    plan inspects in place of a tensor that is allocated only when the plan runs."""
    return torch.empty_strided(t.shape if shape is None else shape,
                               t.stride() if strides is None else strides, dtype=t.dtype,
                               device="meta")


class PlanCache:
    """Plans of one launcher by key (see the module docstring)."""

    def __init__(self, name: str):
        self.name = name
        self._plans = {}

    def get(self, key, build, *args):
        """The plan kept for ``key``, else ``build(*args)`` (kept for next time). A build that
        raises (invalid arguments) keeps nothing; a key that cannot be hashed -- symbolic sizes
        while torch.compile traces with dynamic shapes -- plans afresh and keeps nothing."""
        try:
            plan = self._plans.get(key)
        except TypeError:
            return build(*args)
        if plan is None:
            plan = build(*args)
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        elif CHECK_PLANS:
            fresh = build(*args)
            if fresh != plan:
                raise AssertionError(
                    f"stale {self.name} launch plan: the key {key!r} misses something the "
                    f"plan depends on (kept {vars(plan)}, rebuilt {vars(fresh)})")
        return plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)
