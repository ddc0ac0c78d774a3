"""Ahead-of-time compile check: every Triton kernel x config x dtype for Hopper and Ampere, no GPU.

Run as ``python -m sphereops_kernels.aot --out docs/aot_table.md`` (``make aot-check``).

Every kernel module listed in :data:`KERNEL_MODULES` exposes ``aot_specs() -> list[dict]``, one
entry per (kernel, config, dtype) to compile (contract in ``docs/ARCHITECTURE.md``)::

    {"name": str, "fn": JITFunction, "signature": {arg: "*fp16" | "i32" | ... | "constexpr"},
     "constexprs": {arg: value}, "num_warps": int, "num_stages": int, "dtype": str, "gemm": bool}

Each spec is compiled with ``triton.compile`` for every target in :data:`TARGETS`. The check
fails (exit status 1) when

* a kernel module exists but cannot be imported, or its ``aot_specs()`` raises or returns a
  malformed spec (a module that does not exist yet is reported as skipped);
* a compile fails;
* a kernel needs more shared memory per block than the target offers (dynamic + static);
* a ``gemm`` kernel emits no tensor-core instruction of the target's family (``wgmma`` on
  sm_90, ``mma`` on sm_80).

Registers and spills come from the bundled ``cuobjdump --dump-resource-usage``; the numbers
depend on the triton/ptxas version and are informational, the pass/fail rules above are not.

Specialisation: at launch the JIT turns every integer argument equal to 1 into a compile-time
constant and marks every pointer that is 16-byte aligned (all fresh torch allocations are) and
every integer divisible by 16 with ``tt.divisibility=16``. Those hints decide whether loads are
vectorised and pipelined through ``cp.async``/TMA, so they change shared memory, registers and
the instructions emitted. The check compiles the same way: pointers are marked 16-byte aligned,
and integer arguments get the launcher's rules applied to the values in the spec's optional
``"example_args": {arg: int}`` entry (a typical launch, e.g. unit strides of a contiguous
tensor); integers without an example value stay unspecialised.

The interpreter (``TRITON_INTERPRET=1``) turns ``triton.jit`` into an interpreted function that
cannot be compiled, so when the variable is set the check re-runs itself in a child process with a
clean environment. Compiles run in ``--jobs`` worker processes (spawned from that clean process).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Kernel modules whose ``aot_specs()`` are collected by default.
KERNEL_MODULES = (
    "sphereops_kernels.conv_fwd",
    "sphereops_kernels.conv_fwd_grid",
    "sphereops_kernels.conv_bwd_grid",
    "sphereops_kernels.conv_bwd",
    "sphereops_kernels.linear",
)

#: Compute capabilities compiled for: Hopper (H100/H200) and Ampere (A100).
TARGETS = (90, 80)

#: Largest shared memory one block may use (opt-in maximum), in bytes.
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

#: Tensor-core instruction family a GEMM kernel must emit on each target.
REQUIRED_TENSOR_CORE_FAMILY = {90: "wgmma", 80: "mma"}

REQUIRED_SPEC_KEYS = {
    "name": str,
    "fn": object,
    "signature": dict,
    "constexprs": dict,
    "num_warps": int,
    "num_stages": int,
    "dtype": object,  # a name ("fp16") or a torch.dtype; checked below
    "gemm": bool,
}

_CUDA_BIN = None  # resolved lazily: importing this module must not import triton


class AotSpecError(ValueError):
    """A kernel module's ``aot_specs()`` failed or returned a malformed spec."""


@dataclasses.dataclass
class SpecInfo:
    """The printable, picklable part of one spec (the JITFunction stays in the worker)."""

    module: str
    index: int
    name: str
    kernel: str  # the @triton.jit function's name
    config: str  # tile constexprs + warps/stages
    switches: str  # the other constexprs (operator, flags)
    dtype: str
    gemm: bool


@dataclasses.dataclass
class CompileResult:
    spec: SpecInfo
    target: int
    ok: bool = False
    error: str = ""
    shared_bytes: int = -1  # dynamic (triton) + static (cuobjdump) shared memory per block
    registers: int = -1
    stack_bytes: int = -1
    local_bytes: int = -1
    tensor_cores: str = ""  # e.g. "wgmma m64n128k16 f16" or "none"
    mma_overlap: str = "-"  # the K loop's wgmma overlap on sm_90 (mma_overlap)
    seconds: float = 0.0
    failures: list = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Collecting specs
# --------------------------------------------------------------------------------------------
def _import_kernel_module(module_name):
    """Import a kernel module; ``None`` when the module itself does not exist (yet)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only the module itself (or its package) missing means "not written yet"; a missing
        # dependency inside an existing module is a failure.
        missing = err.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            return None
        raise


def _validate_spec(module_name, index, spec):
    where = f"{module_name}.aot_specs()[{index}]"
    if not isinstance(spec, dict):
        raise AotSpecError(f"{where}: expected a dict, got {type(spec).__name__}")
    missing = sorted(set(REQUIRED_SPEC_KEYS) - set(spec))
    if missing:
        raise AotSpecError(f"{where}: missing keys {missing}")
    for key, expected in REQUIRED_SPEC_KEYS.items():
        value = spec[key]
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise AotSpecError(f"{where}: {key!r} must be an int, got {value!r}")
        if expected in (str, dict, bool) and not isinstance(value, expected):
            raise AotSpecError(f"{where}: {key!r} must be a {expected.__name__}, got {value!r}")
        if key == "dtype" and not (isinstance(value, str) or type(value).__name__ == "dtype"):
            raise AotSpecError(f"{where}: 'dtype' must be a str or torch.dtype, got {value!r}")
    fn = spec["fn"]
    arg_names = getattr(fn, "arg_names", None)
    if arg_names is None:
        raise AotSpecError(
            f"{where}: 'fn' must be a @triton.jit function, got {type(fn).__name__} "
            "(is TRITON_INTERPRET set in the compiling process?)")
    unknown = sorted((set(spec["signature"]) | set(spec["constexprs"])) - set(arg_names))
    if unknown:
        raise AotSpecError(f"{where}: {spec['name']!r}: arguments {unknown} are not parameters "
                           f"of {fn.__name__}{tuple(arg_names)}")
    untyped = [a for a in arg_names if a not in spec["signature"] and a not in spec["constexprs"]]
    if untyped:
        raise AotSpecError(f"{where}: {spec['name']!r}: no type or constexpr value for {untyped}")
    valueless = [a for a, ty in spec["signature"].items()
                 if ty == "constexpr" and a not in spec["constexprs"]]
    if valueless:
        raise AotSpecError(f"{where}: {spec['name']!r}: constexpr arguments without a value in "
                           f"'constexprs': {valueless}")
    examples = spec.get("example_args", {})
    if not isinstance(examples, dict):
        raise AotSpecError(f"{where}: 'example_args' must be a dict of int arguments")
    for arg, value in examples.items():
        if arg not in arg_names or arg in spec["constexprs"]:
            raise AotSpecError(f"{where}: example_args names {arg!r}, which is not a runtime "
                               f"argument of {fn.__name__}")
        if not spec["signature"].get(arg, "").startswith(("i", "u")) or \
                isinstance(value, bool) or not isinstance(value, int):
            raise AotSpecError(f"{where}: example_args[{arg!r}] = {value!r}: only integer "
                               "arguments take example values")


def _describe(module_name, index, spec):
    tile, switches = [], []
    for key, value in spec["constexprs"].items():
        # Tile sizes and launch-shape constants go in "config"; behaviour switches apart.
        is_tile = isinstance(value, int) and not isinstance(value, bool) and bool(
            re.match(r"(BLOCK|GROUP_|SPLIT)", key.upper()))
        (tile if is_tile else switches).append(f"{key}={value}")
    tile.append(f"w{spec['num_warps']} s{spec['num_stages']}")
    return SpecInfo(module=module_name, index=index, name=spec["name"], kernel=spec["fn"].__name__,
                    config=" ".join(tile), switches=" ".join(switches),
                    dtype=_DTYPE_NAMES.get(str(spec["dtype"]).replace("torch.", ""),
                                           str(spec["dtype"]).replace("torch.", "")),
                    gemm=spec["gemm"])


# One spelling in the table whether a module gives "fp16" or torch.float16.
_DTYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}

_SPEC_CACHE: dict = {}


def load_specs(module_name):
    """``(specs, infos)`` of one module, validated; ``None`` if the module does not exist.

    Raises :class:`AotSpecError` (wrapping the cause) when the module exists but fails.
    """
    if module_name in _SPEC_CACHE:
        return _SPEC_CACHE[module_name]
    try:
        module = _import_kernel_module(module_name)
    except Exception as err:  # an existing module that does not import is a failure
        raise AotSpecError(f"{module_name}: import failed: {type(err).__name__}: {err}") from err
    if module is None:
        _SPEC_CACHE[module_name] = None
        return None
    if not hasattr(module, "aot_specs"):
        raise AotSpecError(f"{module_name}: has no aot_specs() function")
    try:
        specs = list(module.aot_specs())
    except Exception as err:
        raise AotSpecError(f"{module_name}.aot_specs() raised {type(err).__name__}: {err}") from err
    if not specs:
        raise AotSpecError(f"{module_name}.aot_specs() returned no specs")
    for index, spec in enumerate(specs):
        _validate_spec(module_name, index, spec)
    infos = [_describe(module_name, index, spec) for index, spec in enumerate(specs)]
    _SPEC_CACHE[module_name] = (specs, infos)
    return specs, infos


# --------------------------------------------------------------------------------------------
# Compiling one spec
# --------------------------------------------------------------------------------------------
def _cuda_bin(tool):
    global _CUDA_BIN
    if _CUDA_BIN is None:
        import triton

        _CUDA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return _CUDA_BIN / tool


def _resource_usage(cubin: bytes, kernel_name: str):
    """``{"REG", "STACK", "SHARED", "LOCAL"}`` of ``kernel_name`` from cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(_cuda_bin("cuobjdump")), "--dump-resource-usage", str(path)],
                              check=True, capture_output=True, text=True).stdout
    usage, function = {}, None
    for line in text.splitlines():
        header = re.match(r"\s*Function (\S+):", line)
        if header:
            function = header.group(1)
        elif "REG:" in line and function == kernel_name:
            usage = {key: int(val) for key, val in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            break
    if not usage:
        raise RuntimeError(f"cuobjdump printed no resource usage for {kernel_name}:\n{text}")
    return usage


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,8})\*/\s+([^;]*);")


def sass_summary(cubin: bytes) -> dict:
    """Instruction counts of a kernel's SASS (``cuobjdump -sass``; no GPU needed):
    ``{"total", "loop", "loop_mma", "mufu"}`` -- ``loop`` is the body of the main K loop of a
    GEMM kernel: the shortest backward branch's body that holds an HGMMA/HMMA (an enclosing
    loop -- a persistent or epilogue loop around it -- would count its prologue too), or in a
    kernel without one the longest backward branch's body; ``loop_mma`` its HGMMA/HMMA count,
    ``mufu`` the special-function-unit instructions (reciprocals, square roots, exponentials:
    a quarter of the FMA rate), ``overlap`` the loop's wgmma overlap (:func:`mma_overlap`). A
    GPU-free measure of how much a kernel issues per K step and outside it."""
    ins = _sass_instructions(cubin)
    loop = _k_loop(ins)
    return {"total": len(ins), "loop": len(loop), "loop_mma": _mma_count(loop),
            "mufu": sum(_opcode(t) == "MUFU" for _, t in ins), "overlap": mma_overlap(loop)}


def _sass_instructions(cubin: bytes):
    """``[(address, instruction text)]`` of a cubin's SASS (``cuobjdump -sass``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(_cuda_bin("cuobjdump")), "-sass", str(path)], check=True,
                              capture_output=True, text=True).stdout
    return [(int(addr, 16), op.strip()) for addr, op in _SASS_LINE.findall(text)]


def _opcode(t):
    return (t.split()[1] if t.startswith("@") and len(t.split()) > 1 else t.split()[0]).split(".")[0]


def _mma_count(body):
    return sum(_opcode(t) in ("HGMMA", "HMMA") for t in body)


def _k_loop(ins):
    """The K loop's instructions (:func:`sass_summary`): the shortest backward branch's body
    holding an HGMMA/HMMA, else the longest backward branch's body, else []."""
    loops = []
    for addr, t in ins:
        target = re.search(r"\bBRA\s+(0x[0-9a-f]+)", t)
        if target and int(target.group(1), 16) < addr:
            loops.append([x for a, x in ins if int(target.group(1), 16) <= a <= addr])
    with_mma = [body for body in loops if _mma_count(body)]
    return (min(with_mma, key=len) if with_mma
            else max(loops, key=len) if loops else [])


def mma_overlap(loop) -> str:
    """How a K loop's Hopper wgmma (SASS ``HGMMA``) overlap, from its instructions:

    * ``"pipelined"``: a step's HGMMAs form one group (only its last carries ``gsb0``, the
      group's commit) and the wait leaves a group in flight (``WARPGROUP.DEPBAR.LE gsb0, 0x1``):
      the MMAs of one step run while the next step's operands arrive;
    * ``"waits"``: the loop waits for its own group every step (``DEPBAR.LE gsb0, 0x0``):
      Triton did not pipeline the dot, the MMA latency is exposed once a step;
    * ``"serialized"``: every HGMMA is a group of its own, waited for before the next --
      ptxas's fallback (info C7515, "wgmma.mma_async instructions are serialized") when other
      instructions define accumulator registers inside the pipeline; the tile then runs at a
      fraction of its MMA rate, with no error and no warning from Triton;
    * ``"-"``: no HGMMA in the loop (sm_80's HMMA are synchronous, or no dot)."""
    hgmma = [t for t in loop if _opcode(t) == "HGMMA"]
    if not hgmma:
        return "-"
    if len(hgmma) > 1 and all("gsb0" in t for t in hgmma):
        return "serialized"
    if any(re.search(r"DEPBAR\.LE\s+gsb0,\s*0x0\b", t) for t in loop):
        return "waits"
    return "pipelined"


def print_sass_summaries(pattern: str, modules=KERNEL_MODULES, capability: int = 90) -> int:
    """``--sass PATTERN``: compile the specs whose name contains PATTERN for one target and
    print their SASS instruction counts (sass_summary)."""
    import triton
    from triton.backends.compiler import GPUTarget

    _worker_init()
    found = 0
    for module_name in modules:
        loaded = load_specs(module_name)
        if loaded is None:
            continue
        for spec in loaded[0]:
            if pattern not in spec["name"]:
                continue
            found += 1
            signature, constexprs, attrs = _specialise(spec)
            compiled = triton.compile(triton.compiler.ASTSource(spec["fn"], signature, constexprs, attrs),
                                      target=GPUTarget("cuda", capability, 32),
                                      options={"num_warps": spec["num_warps"],
                                               "num_stages": spec["num_stages"]})
            counts = sass_summary(compiled.asm["cubin"])
            print(f"{spec['name']} sm_{capability}: " + " ".join(f"{k} {v}" for k, v in counts.items()))
    if not found:
        print(f"aot: no spec name contains {pattern!r}")
    return 0 if found else 1


_WGMMA = re.compile(r"\bwgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.\w+\.(\w+)")
_MMA = re.compile(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col\.\w+\.(\w+)")


def tensor_core_families(ptx: str):
    """Distinct tensor-core instructions in ``ptx``: ``{"wgmma m64n128k16 f16", ...}``."""
    found = set()
    for family, pattern in (("wgmma", _WGMMA), ("mma", _MMA)):
        for shape, operand in pattern.findall(ptx):
            found.add(f"{family} {shape} {operand}")
    if re.search(r"\btcgen05\.mma", ptx):
        found.add("tcgen05")
    return found


def _specialise(spec):
    """``(signature, constexprs, attrs)`` as the JIT launcher would build them for a launch with
    16-byte aligned tensors and the integer values of ``example_args``."""
    fn = spec["fn"]
    examples = spec.get("example_args", {})
    constexprs = dict(spec["constexprs"])
    for arg, value in examples.items():
        if value == 1:  # the launcher makes an integer equal to 1 a constant
            constexprs[arg] = 1
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"  # triton >= 3.3 wants constexprs in the signature too
            continue
        signature[name] = spec["signature"][name]
        if signature[name].startswith("*") or examples.get(name, 1) % 16 == 0:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_spec(spec, info: SpecInfo, capability: int) -> CompileResult:
    """Compile one spec for ``GPUTarget("cuda", capability, 32)`` and apply the pass rules."""
    import triton
    from triton.backends.compiler import GPUTarget

    result = CompileResult(spec=info, target=capability)
    start = time.perf_counter()
    try:
        signature, constexprs, attrs = _specialise(spec)
        source = triton.compiler.ASTSource(spec["fn"], signature, constexprs, attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": spec["num_warps"],
                                           "num_stages": spec["num_stages"]})
        usage = _resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    except Exception as err:  # report every compile failure, keep going with the others
        result.seconds = time.perf_counter() - start
        message = f"{type(err).__name__}: {err}".strip()
        result.error = message.splitlines()[0][:300] if message else type(err).__name__
        result.failures.append(f"compile error: {result.error}")
        return result
    result.seconds = time.perf_counter() - start
    result.ok = True
    result.shared_bytes = int(compiled.metadata.shared) + usage.get("SHARED", 0)
    result.registers = usage.get("REG", -1)
    result.stack_bytes = usage.get("STACK", -1)
    result.local_bytes = usage.get("LOCAL", -1)
    families = tensor_core_families(compiled.asm["ptx"])
    result.tensor_cores = ", ".join(sorted(families)) if families else "none"
    if any(f.split()[0] == "wgmma" for f in families):
        result.mma_overlap = mma_overlap(_k_loop(_sass_instructions(compiled.asm["cubin"])))
    if result.mma_overlap == "serialized":
        result.failures.append("ptxas serialized the K loop's wgmma (C7515: each waited for "
                               "before the next)")

    limit = SHARED_MEMORY_LIMIT.get(capability)
    if limit is not None and result.shared_bytes > limit:
        result.failures.append(
            f"shared memory {result.shared_bytes} B > sm_{capability} limit {limit} B")
    required = REQUIRED_TENSOR_CORE_FAMILY.get(capability)
    if info.gemm and required and not any(f.split()[0] == required for f in families):
        result.failures.append(f"GEMM kernel emits no {required} on sm_{capability} "
                               f"(found: {result.tensor_cores})")
    result.ok = not result.failures
    return result


def _compile_job(job):
    """Worker entry: ``job = (module_name, index, capability)``; specs are re-collected here."""
    module_name, index, capability = job
    loaded = load_specs(module_name)
    specs, infos = loaded
    return compile_spec(specs[index], infos[index], capability)


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


# --------------------------------------------------------------------------------------------
# The whole check
# --------------------------------------------------------------------------------------------
def _tile_volume(info):
    volume = 1
    for item in info.config.split():
        key, _, value = item.partition("=")
        if value.isdigit() and "GROUP" not in key:
            volume *= int(value)
    return volume


def representative_subset(infos, targets):
    """A small, cheap set of jobs that still covers every kernel and dtype: for each
    (module, kernel, dtype) its smallest-tile spec on the first target, and for each
    (module, kernel) its smallest-tile spec on the other targets. Small tiles compile fastest
    (large ones with spills take ptxas minutes); the full matrix is ``make aot-check``."""
    cheapest = {}
    for info in infos:
        for key in ((info.module, info.kernel, info.dtype), (info.module, info.kernel)):
            if key not in cheapest or _tile_volume(info) < _tile_volume(cheapest[key]):
                cheapest[key] = info
    jobs = []
    for key, info in cheapest.items():
        for capability in (targets[:1] if len(key) == 3 else targets[1:]):
            jobs.append((info, capability))
    return jobs


def run_check(modules=KERNEL_MODULES, targets=TARGETS, jobs=None, subset=False, log=print):
    """Collect and compile. Returns ``(results, skipped_modules, spec_errors)``."""
    _worker_init()
    infos, skipped, errors = [], [], []
    for module_name in modules:
        try:
            loaded = load_specs(module_name)
        except AotSpecError as err:
            errors.append(str(err))
            continue
        if loaded is None:
            skipped.append(module_name)
            continue
        infos.extend(loaded[1])
    if subset:
        work = representative_subset(infos, targets)
    else:
        work = [(info, capability) for info in infos for capability in targets]
    jobs = max(1, jobs or os.cpu_count() or 1)
    log(f"aot: {len(infos)} specs from {len(modules) - len(skipped) - len(errors)} module(s), "
        f"{len(work)} compiles, {min(jobs, max(1, len(work)))} process(es)")
    results = []
    if jobs == 1 or len(work) <= 1:
        for info, capability in work:
            results.append(_compile_job((info.module, info.index, capability)))
            _log_result(results[-1], log)
    else:
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                                    initializer=_worker_init) as pool:
            futures = [pool.submit(_compile_job, (info.module, info.index, capability))
                       for info, capability in work]
            for future in concurrent.futures.as_completed(futures):
                results.append(future.result())
                _log_result(results[-1], log)
    results.sort(key=lambda r: (r.spec.module, r.spec.index, -r.target))
    return results, skipped, errors


def _log_result(result, log):
    status = "ok  " if result.ok else "FAIL"
    log(f"  {status} sm_{result.target} {result.spec.name} [{result.spec.config}] "
        f"{result.spec.dtype} {result.seconds:.1f}s" +
        ("" if result.ok else "  <- " + "; ".join(result.failures)))


def _kib(nbytes):
    return "-" if nbytes < 0 else f"{nbytes / 1024:.1f}"


def _tool_versions():
    import triton

    try:
        ptxas = subprocess.run([str(_cuda_bin("ptxas")), "--version"], capture_output=True,
                               text=True, check=True).stdout.strip().splitlines()[-1]
    except Exception:  # informational only
        ptxas = "unknown"
    return triton.__version__, ptxas


def format_table(results, skipped, errors):
    """The markdown written to ``docs/aot_table.md`` (no timestamps: diffs show real changes)."""
    triton_version, ptxas_version = _tool_versions()
    failed = [r for r in results if not r.ok]
    lines = [
        "# AOT compile table",
        "",
        "Generated by `make aot-check` (`python -m sphereops_kernels.aot --out docs/aot_table.md`)",
        f"with triton {triton_version}, ptxas `{ptxas_version}`, no GPU. Every kernel x config x",
        "dtype from the kernel modules' `aot_specs()`, compiled for sm_90 (Hopper) and sm_80",
        "(Ampere). Pass rules: compiles; shared memory per block (dynamic + static) within the",
        "target's limit (sm_90 227 KiB, sm_80 163 KiB); a GEMM kernel emits `wgmma` (sm_90) /",
        "`mma` (sm_80); no K loop whose wgmma ptxas serialized (`K-loop wgmma`: `pipelined`, one",
        "group in flight; `waits`, the loop waits for its own MMAs each step; `serialized`, ptxas's",
        "C7515 fallback, fails). Registers and stack (spills) come from `cuobjdump --dump-resource-usage`",
        "and change with the triton/ptxas version (the GPU machines run triton 3.6): they are for",
        "information, watch them in diffs. Specialised like a launch: pointers 16-byte aligned;",
        "integers as in the spec's `example_args` (1 -> constant, multiple of 16 -> divisibility",
        "hint), unspecialised without one.",
        "",
        f"**Result: {'FAIL' if failed or errors else 'PASS'}** — {len(results)} compiles, "
        f"{len(failed)} failed; module errors: {len(errors)}; modules not present: "
        f"{', '.join(f'`{m}`' for m in skipped) or 'none'}.",
        "",
    ]
    stacked = [r for r in results if r.stack_bytes > 0]
    if stacked:
        worst = max(stacked, key=lambda r: r.stack_bytes)
        lines += [f"Stack (register spills or local arrays, informational): {len(stacked)} of "
                  f"{len(results)} compiles; largest {worst.stack_bytes} B per thread in "
                  f"`{worst.spec.name}` on sm_{worst.target}.", ""]
    if errors:
        lines += ["## Module errors", ""] + [f"* {e}" for e in errors] + [""]
    lines += [
        "| kernel | config | switches | dtype | target | shared KiB | regs | stack B | "
        "tensor cores | K-loop wgmma | gemm | status |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for r in results:
        status = "ok" if r.ok else "FAIL: " + "; ".join(r.failures).replace("|", "/")
        lines.append(
            f"| {r.spec.name} | {r.spec.config} | {r.spec.switches or '-'} | {r.spec.dtype} | "
            f"sm_{r.target} | {_kib(r.shared_bytes)} | {r.registers if r.registers >= 0 else '-'} "
            f"| {r.stack_bytes if r.stack_bytes >= 0 else '-'} | {r.tensor_cores or '-'} | "
            f"{r.mma_overlap} | {'yes' if r.spec.gemm else 'no'} | {status} |")
    return "\n".join(lines) + "\n"


def _list_specs(modules):
    import json

    _worker_init()
    status = 0
    for module_name in modules:
        try:
            loaded = load_specs(module_name)
        except AotSpecError as err:
            print(json.dumps({"module": module_name, "error": str(err)}))
            status = 1
            continue
        if loaded is None:
            print(json.dumps({"module": module_name, "skipped": True}))
            continue
        for info in loaded[1]:
            print(json.dumps(dataclasses.asdict(info)))
    return status


def _clean_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _interpreter_on():
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sphereops_kernels.aot",
        description="Compile every Triton kernel x config x dtype for sm_90 and sm_80 without a "
                    "GPU and write the resource table.")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown table to write (e.g. docs/aot_table.md)")
    parser.add_argument("--modules", nargs="+", default=list(KERNEL_MODULES),
                        help="kernel modules to collect aot_specs() from")
    parser.add_argument("--targets", type=lambda s: [int(t) for t in s.split(",")],
                        default=list(TARGETS), help="compute capabilities, e.g. 90,80")
    parser.add_argument("--jobs", type=int, default=None,
                        help="compile processes (default: number of CPUs)")
    parser.add_argument("--subset", action="store_true",
                        help="compile a representative subset (every kernel and dtype once) "
                             "instead of everything")
    parser.add_argument("--list", action="store_true",
                        help="print the collected specs as JSON lines and exit (no compiling)")
    parser.add_argument("--sass", metavar="PATTERN", default=None,
                        help="compile the specs whose name contains PATTERN for the first "
                             "target and print SASS instruction counts (total, K loop, MUFU)")
    args = parser.parse_args(argv)
    for capability in args.targets:
        if capability not in SHARED_MEMORY_LIMIT:
            parser.error(f"--targets: unsupported capability {capability} "
                         f"(known: {sorted(SHARED_MEMORY_LIMIT)})")
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be >= 1")

    if _interpreter_on():
        # Under the interpreter triton.jit yields uncompilable functions: redo it all cleanly.
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "sphereops_kernels.aot", *argv],
                              env=_clean_env()).returncode

    if args.list:
        return _list_specs(args.modules)
    if args.sass is not None:
        return print_sass_summaries(args.sass, args.modules, args.targets[0])

    start = time.perf_counter()
    results, skipped, errors = run_check(args.modules, args.targets, args.jobs, args.subset)
    table = format_table(results, skipped, errors)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    failed = [r for r in results if not r.ok]
    for module_name in skipped:
        print(f"aot: skipped {module_name} (module does not exist yet)")
    for error in errors:
        print(f"aot: MODULE ERROR {error}")
    print(f"aot: {len(results)} compiles, {len(failed)} failed, {len(errors)} module error(s), "
          f"{time.perf_counter() - start:.0f} s" + (f"; table: {args.out}" if args.out else ""))
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
