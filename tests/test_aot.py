"""The ahead-of-time compile check (``sphereops_kernels.aot``, ``make aot-check``).

The harness is tested on small kernel modules written here (a GEMM that must emit tensor-core
instructions, and modules that must make the check fail: a "GEMM" without ``tl.dot``, a tile
over the shared-memory limit, a compile error, an ``aot_specs()`` that raises, a malformed spec).
The project's kernel modules are compiled as a representative subset (every kernel and dtype
once on sm_90, every kernel once on sm_80: ``--subset``); the full matrix is ``make aot-check``,
whose committed table ``docs/aot_table.md`` must list every current spec.

Every compile runs in a child process without ``TRITON_INTERPRET`` (set by conftest for the
interpreter tests): under the interpreter ``triton.jit`` yields functions that cannot be compiled.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sphereops_kernels import aot

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "docs" / "aot_table.md"

# ---------------------------------------------------------------------------------------------
# Fixture kernel modules (written to tmp_path, imported by the child process via PYTHONPATH)
# ---------------------------------------------------------------------------------------------
_GEMM_MODULE = '''
import triton
import triton.language as tl


@triton.jit
def _fixture_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk,
                         stride_bn, stride_cm, stride_cn, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[M, N] = a[M, K] @ b[K, N]; each pointer with its two strides (elements)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rows[:, None] * stride_am + (k0 + ks)[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & ((k0 + ks)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k0 + ks)[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=((k0 + ks)[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _fixture_row_sumsq_kernel(x_ptr, out_ptr, R, C, stride_r, BLOCK_R: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    """out[R] (fp32) = sum over C of x[R, C]^2; x row stride stride_r, unit column stride."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :],
                    mask=(rows[:, None] < R) & (cols[None, :] < C), other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows, acc, mask=rows < R)


def gemm_signature(ty):
    sig = {"a_ptr": ty, "b_ptr": ty, "c_ptr": ty}
    sig.update({n: "i32" for n in ("M", "N", "K", "stride_am", "stride_ak", "stride_bk",
                                    "stride_bn", "stride_cm", "stride_cn")})
    return sig


# A contiguous 512^3 launch: unit strides become constants, the rest multiples of 16.
GEMM_EXAMPLE = dict(M=512, N=512, K=512, stride_am=512, stride_ak=1, stride_bk=512,
                    stride_bn=1, stride_cm=512, stride_cn=1)


def gemm_spec(name, ty, dtype, block_m, block_n, block_k, num_warps, num_stages, gemm=True):
    return {"name": name, "fn": _fixture_gemm_kernel, "signature": gemm_signature(ty),
            "constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
            "num_warps": num_warps, "num_stages": num_stages, "dtype": dtype, "gemm": gemm,
            "example_args": GEMM_EXAMPLE}


def sumsq_spec(name, gemm):
    return {"name": name, "fn": _fixture_row_sumsq_kernel,
            "signature": {"x_ptr": "*fp16", "out_ptr": "*fp32", "R": "i32", "C": "i32",
                          "stride_r": "i32"},
            "constexprs": {"BLOCK_R": 32, "BLOCK_C": 64}, "num_warps": 4, "num_stages": 1,
            "dtype": "fp16", "gemm": gemm}


def aot_specs():
    return [gemm_spec("fixture_gemm_fp16", "*fp16", "fp16", 64, 64, 32, 4, 3),
            gemm_spec("fixture_gemm_bf16", "*bf16", "bf16", 64, 64, 32, 4, 3),
            sumsq_spec("fixture_row_sumsq", gemm=False)]
'''

_BAD_MODULE = '''
import triton
import triton.language as tl

from aot_fixture_gemm import gemm_spec, sumsq_spec


@triton.jit
def _fixture_shape_error_kernel(x_ptr, BLOCK: tl.constexpr):
    """x[2 * BLOCK]; adds blocks of different lengths on purpose: the compiler must refuse."""
    offs = tl.arange(0, BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs))


def aot_specs():
    return [
        sumsq_spec("fixture_gemm_without_dot", gemm=True),
        # 256x256x64 fp16 tiles in 4 stages: ~256 KiB of shared memory on sm_90, 192 on sm_80.
        gemm_spec("fixture_gemm_over_smem", "*fp16", "fp16", 256, 256, 64, 8, 4),
        {"name": "fixture_shape_error", "fn": _fixture_shape_error_kernel,
         "signature": {"x_ptr": "*fp32"}, "constexprs": {"BLOCK": 64}, "num_warps": 4,
         "num_stages": 1, "dtype": "fp32", "gemm": False},
    ]
'''

_RAISING_MODULE = '''
def aot_specs():
    raise RuntimeError("config table out of date")
'''

_MALFORMED_MODULE = '''
from aot_fixture_gemm import gemm_spec


def aot_specs():
    spec = gemm_spec("fixture_no_gemm_key", "*fp16", "fp16", 64, 64, 32, 4, 3)
    del spec["gemm"]
    return [spec]
'''

_VALUELESS_MODULE = '''
from aot_fixture_gemm import gemm_spec


def aot_specs():
    spec = gemm_spec("fixture_valueless", "*fp16", "fp16", 64, 64, 32, 4, 3)
    spec["signature"]["BLOCK_K"] = "constexpr"
    del spec["constexprs"]["BLOCK_K"]
    return [spec]
'''

_NOT_JIT_MODULE = '''
def plain_python(x_ptr):
    return x_ptr


def aot_specs():
    return [{"name": "fixture_not_jit", "fn": plain_python, "signature": {"x_ptr": "*fp32"},
             "constexprs": {}, "num_warps": 4, "num_stages": 1, "dtype": "fp32", "gemm": False}]
'''


@pytest.fixture(scope="module")
def fixture_modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("aot_modules")
    for name, text in {"aot_fixture_gemm": _GEMM_MODULE, "aot_fixture_bad": _BAD_MODULE,
                       "aot_fixture_raises": _RAISING_MODULE,
                       "aot_fixture_malformed": _MALFORMED_MODULE,
                       "aot_fixture_valueless": _VALUELESS_MODULE,
                       "aot_fixture_not_jit": _NOT_JIT_MODULE}.items():
        (root / f"{name}.py").write_text(textwrap.dedent(text))
    return root


def _run_aot(*args, extra_path=None, interpreter=False, timeout=600):
    """Run ``python -m sphereops_kernels.aot`` in a child process, one compile process."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpreter:  # the CLI must notice and re-run itself without the interpreter
        env["TRITON_INTERPRET"] = "1"
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path),
                                                          env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "sphereops_kernels.aot", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _rows(table_text):
    """Table rows as dicts keyed by the header names."""
    lines = [ln for ln in table_text.splitlines() if ln.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def _by_name_target(rows):
    return {(r["kernel"], r["target"]): r for r in rows}


# ---------------------------------------------------------------------------------------------
# Harness on fixture modules
# ---------------------------------------------------------------------------------------------
def test_fixture_gemm_passes_with_tensor_cores(fixture_modules, tmp_path):
    out = tmp_path / "table.md"
    proc = _run_aot("--modules", "aot_fixture_gemm", "aot_fixture_not_written", "--jobs", "1",
                    "--out", str(out), extra_path=fixture_modules, interpreter=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert "**Result: PASS**" in text
    assert "`aot_fixture_not_written`" in text  # reported as not present, not an error
    rows = _by_name_target(_rows(text))
    assert len(rows) == 6, text
    for dtype, ptx_type in (("fp16", "f16"), ("bf16", "bf16")):
        hopper = rows[(f"fixture_gemm_{dtype}", "sm_90")]
        ampere = rows[(f"fixture_gemm_{dtype}", "sm_80")]
        assert re.fullmatch(rf"wgmma m64n\d+k16 {ptx_type}", hopper["tensor cores"]), hopper
        assert re.fullmatch(rf"mma m16n8k16 {ptx_type}", ampere["tensor cores"]), ampere
        assert hopper["K-loop wgmma"] == "pipelined" and ampere["K-loop wgmma"] == "-"
        for row in (hopper, ampere):
            assert row["status"] == "ok" and row["gemm"] == "yes"
            assert int(row["regs"]) > 0 and int(row["stack B"]) >= 0
            # 3 pipeline stages of a 64x32 and a 32x64 fp16 tile need at least 2 * 8 KiB.
            assert float(row["shared KiB"]) >= 16.0, row
            assert row["config"] == "BLOCK_M=64 BLOCK_N=64 BLOCK_K=32 w4 s3"
    for target in ("sm_90", "sm_80"):
        row = rows[("fixture_row_sumsq", target)]
        assert row["status"] == "ok" and row["tensor cores"] == "none" and row["gemm"] == "no"


def test_sass_counts_the_k_loop(fixture_modules):
    """``--sass``: the fixture GEMM's SASS has a K loop holding its tensor-core instructions
    (sm_90: HGMMA) and a total above it; a pattern matching nothing fails."""
    proc = _run_aot("--modules", "aot_fixture_gemm", "--sass", "fixture_gemm_bf16",
                    extra_path=fixture_modules, interpreter=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"fixture_gemm_bf16 sm_90: total (\d+) loop (\d+) loop_mma (\d+) mufu (\d+)",
                  proc.stdout)
    assert m, proc.stdout
    total, loop, loop_mma, _ = (int(v) for v in m.groups())
    assert 0 < loop < total and loop_mma >= 1
    proc = _run_aot("--modules", "aot_fixture_gemm", "--sass", "no_such_kernel",
                    extra_path=fixture_modules)
    assert proc.returncode == 1 and "no spec name contains" in proc.stdout


# K-loop bodies as cuobjdump prints them (operands shortened): a pipelined step (one commit, a
# group left in flight), a step that waits for its own MMAs, and ptxas's C7515 serialisation
_PIPELINED = ["WARPGROUP.ARRIVE", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24",
              "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0", "IADD3 R3, R3, 0x1, RZ",
              "WARPGROUP.DEPBAR.LE gsb0, 0x1", "@P0 BRA 0x3c0"]
_WAITS = [t.replace("0x1", "0x0") if "DEPBAR" in t else t for t in _PIPELINED]
_SERIALIZED = ["WARPGROUP.ARRIVE", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0",
               "WARPGROUP.DEPBAR.LE gsb0, 0x0", "WARPGROUP.ARRIVE",
               "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0",
               "WARPGROUP.DEPBAR.LE gsb0, 0x0", "@P0 BRA 0x3c0"]


@pytest.mark.parametrize("loop, expected", [
    (_PIPELINED, "pipelined"), (_WAITS, "waits"), (_SERIALIZED, "serialized"),
    (["HMMA.16816.F32.BF16 R4, R8, R12, R4", "@P0 BRA 0x100"], "-"), ([], "-")])
def test_mma_overlap_reads_the_k_loop(loop, expected):
    assert aot.mma_overlap(loop) == expected


def test_check_fails_on_each_rule(fixture_modules, tmp_path):
    out = tmp_path / "table.md"
    proc = _run_aot("--modules", "aot_fixture_gemm", "aot_fixture_bad", "aot_fixture_raises",
                    "aot_fixture_malformed", "aot_fixture_valueless", "aot_fixture_not_jit",
                    "--jobs", "1", "--out", str(out),
                    extra_path=fixture_modules)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = out.read_text()
    assert "**Result: FAIL**" in text
    rows = _by_name_target(_rows(text))
    for target, family, limit_kib in (("sm_90", "wgmma", 227), ("sm_80", "mma", 163)):
        assert rows[("fixture_gemm_fp16", target)]["status"] == "ok"  # the good one still passes
        no_dot = rows[("fixture_gemm_without_dot", target)]["status"]
        assert no_dot.startswith("FAIL") and f"emits no {family} on {target}" in no_dot
        smem = rows[("fixture_gemm_over_smem", target)]
        assert smem["status"].startswith("FAIL") and "shared memory" in smem["status"]
        assert float(smem["shared KiB"]) > limit_kib
        broken = rows[("fixture_shape_error", target)]["status"]
        assert broken.startswith("FAIL: compile error"), broken
    assert "aot_fixture_raises.aot_specs() raised RuntimeError: config table out of date" in text
    assert "aot_fixture_malformed.aot_specs()[0]: missing keys ['gemm']" in text
    assert ("aot_fixture_valueless.aot_specs()[0]: 'fixture_valueless': constexpr arguments "
            "without a value in 'constexprs': ['BLOCK_K']") in text
    assert "aot_fixture_not_jit.aot_specs()[0]: 'fn' must be a @triton.jit function" in text
    assert "MODULE ERROR" in proc.stdout


def test_list_reports_specs_and_missing_modules(fixture_modules):
    proc = _run_aot("--list", "--modules", "aot_fixture_gemm", "aot_fixture_not_written",
                    extra_path=fixture_modules, interpreter=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r.get("name") for r in records[:3]] == [
        "fixture_gemm_fp16", "fixture_gemm_bf16", "fixture_row_sumsq"]
    assert records[0]["kernel"] == "_fixture_gemm_kernel" and records[0]["gemm"] is True
    assert records[3] == {"module": "aot_fixture_not_written", "skipped": True}


@pytest.mark.parametrize("args, message", [
    (("--targets", "75"), "--targets: unsupported capability 75"),
    (("--jobs", "0"), "--jobs must be >= 1"),
])
def test_cli_rejects_bad_arguments(args, message):
    proc = _run_aot(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("ptx, expected", [
    ("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...}", {"wgmma m64n128k16 bf16"}),
    ("wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {...}", {"wgmma m64n64k8 tf32"}),
    ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {...}", {"mma m16n8k16 f16"}),
    ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {...}", {"mma m16n8k8 tf32"}),
    ("fma.rn.f32 %f1, %f2, %f3, %f4;\n// wgmma is mentioned in a comment only", set()),
])
def test_tensor_core_families_from_ptx(ptx, expected):
    assert aot.tensor_core_families(ptx) == expected


# ---------------------------------------------------------------------------------------------
# The project's kernel modules
# ---------------------------------------------------------------------------------------------
def _project_specs():
    proc = _run_aot("--list")
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, records


def test_kernel_modules_compile_representative_subset(tmp_path):
    listing, records = _project_specs()
    assert listing.returncode == 0, listing.stdout + listing.stderr
    if all(r.get("skipped") for r in records):
        pytest.skip("no kernel module with aot_specs() exists yet")
    out = tmp_path / "subset.md"
    proc = _run_aot("--subset", "--jobs", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = _rows(out.read_text())
    present = {r["module"] for r in records if not r.get("skipped")}
    kernels = {(r["module"], r["kernel"]) for r in records if "kernel" in r}
    # every kernel of every present module was compiled on both targets
    assert present and len(rows) >= 2 * len(kernels)
    assert {r["target"] for r in rows} == {"sm_90", "sm_80"}


def test_committed_table_lists_every_spec():
    """``docs/aot_table.md`` is regenerated by ``make aot-check`` whenever specs change."""
    listing, records = _project_specs()
    assert listing.returncode == 0, listing.stdout + listing.stderr
    specs = [r for r in records if "kernel" in r]
    if not specs:
        pytest.skip("no kernel module with aot_specs() exists yet")
    assert TABLE.exists(), "docs/aot_table.md missing: run `make aot-check`"
    rows = {(r["kernel"], r["config"], r["switches"], r["dtype"], r["target"])
            for r in _rows(TABLE.read_text())}
    missing = [(s["name"], s["config"], s["switches"] or "-", s["dtype"], f"sm_{t}")
               for s in specs for t in aot.TARGETS
               if (s["name"], s["config"], s["switches"] or "-", s["dtype"], f"sm_{t}") not in rows]
    assert not missing, (f"{len(missing)} spec(s) not in docs/aot_table.md (run `make aot-check`)"
                         f", e.g. {missing[:3]}")
