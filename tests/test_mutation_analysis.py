"""torch.compile's Triton mutation analysis sees only the true outputs of each kernel as written.

Under torch.compile every launch goes through ``wrap_triton``; AOTAutograd functionalizes it with
the tensors that torch's TTIR analysis finds stored through (``identify_accessed_tensors``, or
``identify_mutated_tensors`` before torch 2.13). An op input taken for written is copied back
into: for the weight (a leaf that requires grad) torch 2.11's compile fails with "a leaf Variable
that requires grad is being used in an in-place operation"; torch 2.13 compiles a weight-sized
``aten.copy_`` into w instead. The analysis needs no GPU: it runs here
on the TTIR for an sm_90 target, in a subprocess without TRITON_INTERPRET (interpreter functions
have no TTIR), over every launch the forward and backward launchers make (recorded, not run).
"""
import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import logging
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

class _Sm90:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
driver.set_active(_Sm90())

from torch._higher_order_ops import triton_kernel_wrap as tkw
if hasattr(tkw, "identify_accessed_tensors"):
    def written(kernel, kwargs):
        acc = tkw.identify_accessed_tensors(kernel, kwargs, {})
        return [d.name for d in acc.read_writes.writes if isinstance(kwargs.get(d.name), torch.Tensor)]
else:
    def written(kernel, kwargs):
        return tkw.identify_mutated_tensors(kernel, kwargs, {})

failures = []
class _Fail(logging.Handler):
    def emit(self, record):
        failures.append(record.getMessage())
logging.getLogger(tkw.__name__).addHandler(_Fail())

import sphereops_kernels.conv_fwd as conv_fwd
import sphereops_kernels.conv_bwd as conv_bwd
import sphereops_kernels.linear as linear

launches = []
def record(kernel, grid, args, kwargs, what, memo=None):
    kwargs = dict(kwargs)
    for flag in ("EMULATE_RTNE", "UPCAST_DOT"):  # interpreter-only: their GPU values
        if flag in kwargs:
            kwargs[flag] = False
    launches.append((kernel, {**dict(zip(kernel.arg_names, args)), **kwargs}))
for module in (conv_fwd, conv_bwd, linear):
    module.launch = record
import sphereops_kernels.launch as launch_module
launch_module.cpu_launches = lambda: True  # accept CPU tensors (nothing runs)

problems = []
def check(case, inputs):
    inputs = {t.untyped_storage().data_ptr(): name for name, t in inputs.items() if t is not None}
    for kernel, kwargs in launches:
        name = getattr(kernel, "fn", kernel).__name__
        del failures[:]
        out = written(kernel, dict(kwargs))
        if failures:
            problems.append(f"{case}: {name}: the analysis failed: {failures[0]}")
        for arg in out:
            owner = inputs.get(kwargs[arg].untyped_storage().data_ptr())
            if owner is not None:
                problems.append(f"{case}: {name} is taken to write {arg} (the op input {owner})")
    del launches[:]

dt = torch.bfloat16
# (operator, groups, save_output, w channels_last, channels, x channels_last); 20 channels
# (channels_last) and 40 in two groups (NCHW): the staged input and the padded Hn / w_hat rows;
# pure depthwise in channels_last (flat tiles) and NCHW (row tiles)
for operator, groups, save_output, w_cl, ch, x_cl in (
        ("cosine", 1, False, False, 8, True), ("cosine", 1, False, True, 8, True),
        ("sigmoid", 2, False, False, 8, True), ("linear", 1, True, False, 8, True),
        ("cosine", 8, True, False, 8, True), ("sigmoid", 8, False, False, 8, True),
        ("cosine", 1, False, True, 20, True), ("sigmoid", 2, False, False, 40, False),
        ("linear", 8, False, False, 8, False)):
    case = (f"conv {operator} groups={groups} save_output={save_output} w_channels_last={w_cl} "
            f"channels={ch} x_channels_last={x_cl}")
    x = torch.randn(2, ch, 6, 6, dtype=dt)
    x = x.contiguous(memory_format=torch.channels_last) if x_cl else x
    w = torch.randn(ch, ch // groups, 3, 3, dtype=dt)
    w = w.contiguous(memory_format=torch.channels_last) if w_cl else w
    b = torch.randn(ch, dtype=dt)
    k = torch.rand(ch, dtype=dt) + 0.2 if operator == "sigmoid" else None
    y, c, r_x = conv_fwd.sphere_conv2d_fwd(x, w, b, k, (1, 1), (1, 1), (1, 1), groups, operator,
                                           1e-4, store_c=not save_output)
    check(case + " fwd", dict(x=x, w=w, b=b, k=k))
    saved = y if save_output else c
    dy = torch.randn_like(y)
    conv_bwd.sphere_conv2d_bwd(dy, x, w, k, saved, r_x, (1, 1), (1, 1), (1, 1), groups, operator,
                               1e-4, saved="output" if save_output else "cosine",
                               bias=b if save_output else None)
    check(case + " bwd", dict(x=x, w=w, b=b, k=k, dy=dy, saved=saved, r_x=r_x))
    # db (and dk) alone: the prep launch has no filter programs and gets read-only stand-ins
    # (r_x, w) for r_w / w_hat, whose stores NORM_FILTERS compiles away
    conv_bwd.sphere_conv2d_bwd(dy, x, w, k, saved, r_x, (1, 1), (1, 1), (1, 1), groups, operator,
                               1e-4, (False, False, True, True),
                               saved="output" if save_output else "cosine",
                               bias=b if save_output else None)
    check(case + " bwd db/dk only", dict(x=x, w=w, b=b, k=k, dy=dy, saved=saved, r_x=r_x))

for operator, save_output in (("cosine", False), ("sigmoid", False), ("linear", True)):
    case = f"linear {operator} save_output={save_output}"
    x, w, b = torch.randn(16, 32, dtype=dt), torch.randn(24, 32, dtype=dt), torch.randn(24, dtype=dt)
    k = torch.rand(24, dtype=dt) + 0.2 if operator == "sigmoid" else None
    y, c, r_x = linear.sphere_linear_fwd(x, w, b, k, operator, 1e-4, store_c=not save_output)
    check(case + " fwd", dict(x=x, w=w, b=b, k=k))
    saved = y if save_output else c
    dy = torch.randn_like(y)
    linear.sphere_linear_bwd(dy, x, w, k, saved, r_x, operator, 1e-4,
                             saved="output" if save_output else "cosine",
                             bias=b if save_output else None)
    check(case + " bwd", dict(x=x, w=w, b=b, k=k, dy=dy, saved=saved, r_x=r_x))

print("\n".join(problems) if problems else "OK")
'''


def test_kernels_write_only_their_outputs():
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == "OK", run.stdout
