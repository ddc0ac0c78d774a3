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

from types import SimpleNamespace

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


def launch_memos(*sites):
    """A namespace of fresh :class:`LaunchMemo` objects, one per launch site named: what a
    launcher without a plan keeps per call signature (``PlanCache.get(key, launch_memos,
    "prep", "grad")``)."""
    return SimpleNamespace(**{site: LaunchMemo() for site in sites})


def _aligned(t) -> bool:
    """Whether ``t``'s data pointer is 16-byte aligned: triton specialises pointer arguments on
    it (and vectorises accesses through the ones that are)."""
    return t.data_ptr() % 16 == 0


def _fingerprint(value):
    """What of a launch argument a plan must keep fixed: a tensor's dtype (its alignment is
    checked at each direct launch), a float's type (triton does not specialise floats), any
    other value itself."""
    if hasattr(value, "data_ptr"):   # what triton takes for a pointer
        return ("tensor", value.dtype)
    if isinstance(value, float):
        return float
    return value


class LaunchMemo:
    """One launch site of one kept plan: the compiled kernel its first launch ran, so that its
    later launches call that kernel directly (``launch.launch(..., memo=...)``).

    Triton's ``JITFunction.run`` re-derives on every launch what a plan fixes: it binds the
    arguments to the signature, specialises each one (dtypes, 16-byte alignment of pointers,
    integers equal to 1 or divisible by 16), hashes a cache key and looks the compiled kernel up
    -- ~45-60 us of host time a launch on this project's CPU machine (triton 3.6 and 3.9,
    ``python -m bench.host_overhead --stand-in-gpu``), more than a small layer's kernel runs.
    Within a plan everything but the tensors' addresses is fixed: constexprs, launch options,
    grids and integers are derived from the key's metadata, tensors' dtypes are in the key. So
    the memo keeps the compiled kernel, the canonical grid and the signature's trailing
    arguments (keyword constexprs and defaults), and a launch checks only what a key cannot fix:
    that the pointers which were 16-byte aligned at the first launch still are (a kernel built
    for unaligned ones runs on any). A trailing argument that is a tensor, launch hooks or a
    kernel with pre-run hooks keep the site on triton's path.

    Under ``SPHEREOPS_CHECK_PLANS=1`` (the test suite, interpreter included) every launch also
    compares its arguments' fingerprints (tensor dtypes, every other value but floats), its
    keywords and its grid with the first launch's: a launch site whose arguments
    vary within one plan fails the test instead of reusing a kernel specialised for others.
    Memos compare equal to one another: what a launch found is not part of what a plan says.
    """

    __slots__ = ("compiled", "device", "grid", "tail", "aligned", "first")

    def __init__(self):
        self.compiled = None   # the compiled kernel (triton's CompiledKernel) to call directly
        self.device = None     # the device it is loaded on
        self.grid = None       # (x, y, z)
        self.tail = ()         # the signature's arguments after the positional ones
        self.aligned = ()      # the positional tensors that were 16-byte aligned
        self.first = None      # the first launch's fingerprint (CHECK_PLANS)

    def __eq__(self, other):
        return isinstance(other, LaunchMemo)

    __hash__ = None

    def __repr__(self):
        return f"LaunchMemo({'kept' if self.compiled is not None else 'empty'})"

    def still_specialised(self, args) -> bool:
        """Whether the kept kernel's pointer specialisation holds for ``args``."""
        for i in self.aligned:
            if args[i].data_ptr() % 16:
                return False
        return True

    def check(self, kernel, grid, args, kwargs) -> None:
        """Under CHECK_PLANS: the first launch's fingerprint is kept, later ones must match."""
        if not CHECK_PLANS:
            return
        grid_now = grid if not callable(grid) else ("callable", getattr(grid, "__code__", grid))
        print_now = (getattr(kernel, "__name__", None) or repr(kernel), grid_now,
                     tuple(_fingerprint(a) for a in args),
                     tuple(sorted((k, _fingerprint(v)) for k, v in kwargs.items())))
        if self.first is None:
            self.first = print_now
        elif print_now != self.first:
            raise AssertionError(
                "a kept plan's launch site was called with other arguments than at its first "
                f"launch (a plan key misses what they depend on): first {self.first}, now "
                f"{print_now}")

    def keep(self, kernel, compiled, grid, args, kwargs, device) -> None:
        """Keep what the first launch through triton's JITFunction.run ran (``compiled``, its
        return value), if the site qualifies (see the class docstring)."""
        params = getattr(kernel, "signature", None)
        if (params is None or getattr(kernel, "pre_run_hooks", True)
                or not all(hasattr(compiled, a) for a in ("function", "packed_metadata", "run"))):
            return      # not a plain JITFunction launch (an autotuner, a pending compile)
        import inspect
        tail = []
        for param in list(params.parameters.values())[len(args):]:
            value = kwargs.get(param.name, param.default)
            if value is inspect.Parameter.empty or hasattr(value, "data_ptr"):
                return
            tail.append(value)
        if callable(grid):
            grid = grid(dict(zip(params.parameters, (*args, *tail))))
        self.grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.tail = tuple(tail)
        self.aligned = tuple(i for i, a in enumerate(args)
                             if hasattr(a, "data_ptr") and _aligned(a))
        self.device = device
        self.compiled = compiled
