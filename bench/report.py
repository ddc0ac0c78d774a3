"""Turn a results JSON into the Markdown summary and PNG plots, or compare two runs.

    python -m bench.report RESULTS.json                 # writes RESULTS.md and RESULTS.png
    python -m bench.report NEW.json --compare OLD.json  # prints (and writes) a comparison
    python -m bench.report RESULTS.json --out-dir DIR --no-plot

Ratios are ``time / baseline time`` (> 1: slower than the baseline); speed-ups are the inverse.
Geomeans run over the layers where both sides were timed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

MODES = ("fwd", "bwd", "fwd+bwd")
SPHERE_PROVIDERS = ("sphereops", "unfused_best", "unfused_official", "compiled_best")
PROVIDER_ORDER = ("sphereops", "unfused_best", "unfused_official", "compiled_best", "conv2d",
                  "linear")
TITLES = {
    "sphereops": "sphereops fused",
    "unfused_best": "unfused best (reference)",
    "unfused_official": "unfused official-style",
    "compiled_best": "torch.compile(best unfused)",
    "conv2d": "F.conv2d (cuDNN)",
    "linear": "F.linear",
}


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def titles_for(results: dict) -> dict:
    """Provider titles; on CPU the sphereops provider is the package's CPU (reference) path."""
    titles = dict(TITLES)
    if results.get("meta", {}).get("device_type") not in (None, "cuda"):
        titles["sphereops"] = "sphereops (CPU path = reference)"
        titles["conv2d"] = "F.conv2d (CPU)"
    return titles


def load(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def geomean(values: Iterable[float]) -> Optional[float]:
    vals = [v for v in values if isinstance(v, (int, float)) and v > 0 and math.isfinite(v)]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def _fmt(v, digits=2, suffix="") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:,.0f}{suffix}"
    if 0 < abs(v) < 10 ** -digits * 10:
        return f"{v:.2g}{suffix}"          # small CPU rates: keep two significant digits
    return f"{v:.{digits}f}{suffix}"


def _t(rec: dict) -> float:
    """The time a record is compared by: ``time_ms`` (the run's statistic: median on CUDA,
    minimum on a shared CPU) or, for older files, the median."""
    return rec.get("time_ms", rec.get("median_ms"))


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _table(header: list, rows: list) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _ok(records, **match) -> list:
    return [r for r in records if r.get("status") == "ok"
            and all(r.get(k) == v for k, v in match.items())]


def _recompute_ratios(results: dict) -> None:
    """Ratios are stored in the JSON, but recompute them so a hand-edited or merged file works."""
    try:
        from .runner import compute_ratios
    except ImportError:  # report.py run as a plain script: bench not importable as a package
        return
    compute_ratios(results.get("records", []))


def config_groups(records) -> list:
    """Distinct (kind, dtype, layout, operator) of timed SphereConv records, headline first."""
    seen = []
    for r in records:
        if r.get("status") == "ok" and r["provider"] in SPHERE_PROVIDERS:
            key = (r["kind"], r["dtype"], r["layout"], r["operator"])
            if key not in seen:
                seen.append(key)
    return seen


def headline_group(results: dict) -> Optional[tuple]:
    head = results.get("config", {}).get("headline") or {}
    want = ("conv", head.get("dtype"), head.get("layout"), head.get("operator"))
    groups = config_groups(results.get("records", []))
    if want in groups:
        return want
    conv = [g for g in groups if g[0] == "conv"]
    return conv[0] if conv else (groups[0] if groups else None)


def _group_records(records, group) -> list:
    kind, dtype, layout, op = group
    return [r for r in records if r["kind"] == kind and r["dtype"] == dtype
            and r["layout"] == layout and r["operator"] in (op, "-")]


def geomean_ratio(records, provider, baseline, mode, key: str = "ratio_to") -> tuple:
    """(geomean of provider/baseline time, number of layers); ``key`` "graph_ratio_to" compares
    device times (CUDA graph replay) instead of the eager ones."""
    vals = [r[key][baseline] for r in records
            if r.get("status") == "ok" and r["provider"] == provider and r["mode"] == mode
            and baseline in r.get(key, {})]
    return geomean(vals), len(vals)


# The two time bases of a CUDA run: device time (the calls replayed from a CUDA graph: the
# kernels alone) and eager time (what a Python caller sees, host overhead included).
DEVICE_BASIS = ("graph_ratio_to", "device time, CUDA graph")
EAGER_BASIS = ("ratio_to", "eager, host included")


def time_bases(records) -> list:
    """[(ratio key, label)]: device time first where the run measured it, then eager time."""
    if any(r.get("graph_ratio_to") for r in records):
        return [DEVICE_BASIS, EAGER_BASIS]
    return [("ratio_to", "eager")]


# ---------------------------------------------------------------------------------------------
# Goals
# ---------------------------------------------------------------------------------------------

def goal_rows(results: dict) -> list:
    """[(goal, measured, target, verdict)] for the issue's stated goals."""
    records = results.get("records", [])
    rows = []
    is_cuda = results.get("meta", {}).get("device_type") == "cuda"
    group = headline_group(results)
    if group is not None and group[0] == "conv":
        recs = _group_records(records, group)

        def add(goal, provider, baseline, mode, target, invert=False, basis=("ratio_to", "")):
            key, basis_label = basis
            g, n = geomean_ratio(recs, provider, baseline, mode, key)
            if g is not None and invert:
                g = 1.0 / g
            if g is None:
                verdict = "not measured"
            else:
                verdict = "PASS" if ((g >= target) if invert else (g <= target)) else "FAIL"
            label = f"{group[1]}, {group[2]}, {group[3]}" + (f"; {basis_label}" if basis_label else "")
            rows.append((f"{goal} ({label}; geomean over {n} layers)", _fmt(g, 2, "x"),
                         ("≥ " if invert else "≤ ") + f"{target}x", verdict))

        if is_cuda:
            for basis in time_bases(recs):
                add("fused fwd+bwd time / cuDNN fwd+bwd", "sphereops", "conv2d", "fwd+bwd", 1.10,
                    basis=basis)
                add("fused fwd time / cuDNN fwd", "sphereops", "conv2d", "fwd", 1.05, basis=basis)
                add("fused bwd time / cuDNN bwd", "sphereops", "conv2d", "bwd", 1.15, basis=basis)
                add("speed-up over eager official-style unfused (fwd+bwd)", "sphereops",
                    "unfused_official", "fwd+bwd", 3.0, invert=True, basis=basis)
                add("speed-up over torch.compile(best unfused) (fwd+bwd)", "sphereops",
                    "compiled_best", "fwd+bwd", 1.5, invert=True, basis=basis)
        else:
            add("reference fwd+bwd time / nn.Conv2d (layer suite)", "sphereops", "conv2d",
                "fwd+bwd", 1.15)
    e2e = {r.get("variant"): r for r in results.get("e2e", []) if r.get("status") == "ok"}
    fused = e2e.get("sphereops")
    if fused is not None and is_cuda:
        t, m = fused.get("time_ratio_to_plain"), fused.get("mem_ratio_to_plain")
        g = fused.get("graph_time_ratio_to_plain")
        if g is not None:
            rows.append(("SphereResNet-32 step time / ResNet-32 (cuDNN) (device time, CUDA graph)",
                         _fmt(g, 2, "x"), "≤ 1.15x", "PASS" if g <= 1.15 else "FAIL"))
        rows.append(("SphereResNet-32 step time / ResNet-32 (cuDNN)"
                     + (" (eager, host included)" if g is not None else ""), _fmt(t, 2, "x"),
                     "≤ 1.15x", "not measured" if t is None else ("PASS" if t <= 1.15 else "FAIL")))
        rows.append(("SphereResNet-32 step peak memory / ResNet-32", _fmt(m, 2, "x"), "≤ 1.10x",
                     "not measured" if m is None else ("PASS" if m <= 1.10 else "FAIL")))
    for variant, label in (("sphereops", ""), ("sphereops_save_output", ", save_output")):
        r = e2e.get(variant)
        m = r.get("saved_ratio_to_plain") if r is not None else None
        if m is not None:
            rows.append((f"SphereResNet-32 activations saved for backward / ResNet-32{label} "
                         f"(the device-independent part of the peak-memory goal)", _fmt(m, 2, "x"),
                         "≤ 1.10x", "PASS" if m <= 1.10 else "FAIL"))
    saving = e2e.get("sphereops_save_output")
    if saving is not None and is_cuda:
        t, m = saving.get("time_ratio_to_plain"), saving.get("mem_ratio_to_plain")
        rows.append(("SphereResNet-32 step time / ResNet-32, save_output", _fmt(t, 2, "x"),
                     "≤ 1.15x", "not measured" if t is None else ("PASS" if t <= 1.15 else "FAIL")))
        rows.append(("SphereResNet-32 step peak memory / ResNet-32, save_output", _fmt(m, 2, "x"),
                     "≤ 1.10x", "not measured" if m is None else ("PASS" if m <= 1.10 else "FAIL")))
    for c in results.get("criterion", []):
        if c.get("status") == "ok":
            alloc = c.get("allocator", "default")
            rows.append((f"issue-2 criterion, {c['operator']} ({alloc} allocator): reference "
                         f"SphereConv2d fwd+bwd / nn.Conv2d on 32x64x32x32 3x3 64 filters fp32 CPU",
                         _fmt(c["ratio"], 2, "x"), f"≤ {c['target']}x (long run {c['long_run_target']}x)",
                         ("PASS" if c["passes"] else "FAIL")
                         + (" (long-run goal met)" if c.get("passes_long_run") else "")))
    return rows


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def _meta_lines(results: dict) -> list:
    m = results.get("meta", {})
    c = results.get("config", {})
    ce = results.get("ceilings", {})
    lines = [
        f"- device: **{m.get('device_name')}** (driver {m.get('driver')}, capability "
        f"{m.get('capability', '-')}, {m.get('sm_count', '-')} SMs, L2 {m.get('l2_mib', '-')} MiB)",
        f"- torch {m.get('torch')} (CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}), triton "
        f"{m.get('triton')}, python {m.get('python')}",
        f"- commit {m.get('commit')}{' (dirty tree)' if m.get('dirty') else ''}, date {m.get('date')}",
        f"- TF32 flags at start: {m.get('tf32_flags_at_start')}",
        f"- suite: {'full' if c.get('full') else 'quick'}; budget "
        f"{c.get('budget_s') or 'none'} s; elapsed {c.get('elapsed_s')} s; "
        f"{c.get('skipped_for_budget', 0)} measurements skipped for the budget; times compared "
        f"by their {c.get('statistic', 'median')}"
        + (f"; load average {m.get('loadavg_at_start')} at start, {m.get('loadavg_at_end')} at end "
           f"on {m.get('cpu_count')} CPUs" if m.get("loadavg_at_start") else "")
        + ("; **run interrupted**" if c.get("interrupted") else ""),
    ]
    parts = [f"{k.replace('matmul_tflops_', '')} matmul {v:.3g} TFLOP/s" for k, v in ce.items()
             if k.startswith("matmul_tflops_") and isinstance(v, (int, float))]
    if isinstance(ce.get("copy_gbs"), (int, float)):
        parts.append(f"copy {ce['copy_gbs']:.0f} GB/s (read+write)")
    lines.append("- measured ceilings: " + (", ".join(parts) if parts else "not measured"))
    return lines


def summary_markdown(results: dict) -> str:
    """The short summary printed at the end of a run (and the top of the .md file)."""
    TITLES = titles_for(results)  # noqa: N806 - shadows the module table on purpose
    _recompute_ratios(results)
    records = results.get("records", [])
    out = [f"# sphereops benchmark — {results.get('meta', {}).get('device_name', '?')}", ""]
    out += _meta_lines(results) + [""]

    crit = [c for c in results.get("criterion", [])]
    if crit:
        out += ["## Issue-2 criterion (CPU): reference SphereConv2d vs nn.Conv2d, fwd+bwd", ""]
        out += ["```"]
        for c in crit:
            label = f"{c['operator']:9s}  {c.get('allocator', 'default'):7s}"
            if c.get("status") == "ok":
                other = ("median" if c.get("statistic") == "min" else "min")
                other_ratio = c.get(f"ratio_{other}")
                faults = ("" if c.get("sphere_faults") is None else
                          f"   page faults/call {c['sphere_faults']:.0f} vs {c['conv_faults']:.0f}")
                out.append(f"  {label}  SphereConv2d {c['sphere_ms']:6.1f} ms   "
                           f"nn.Conv2d {c['conv_ms']:6.1f} ms   ratio {c['ratio']:.2f}x   "
                           f"<= {c['target']}x: {'PASS' if c['passes'] else 'FAIL'}   "
                           f"(long-run {c['long_run_target']}x: "
                           f"{'met' if c['passes_long_run'] else 'not yet'})"
                           + (f"   [{other} {other_ratio:.2f}x]" if other_ratio else "") + faults)
            else:
                out.append(f"  {label}  ERROR {c.get('error')}")
        stat = next((c.get("statistic") for c in crit if c.get("statistic")), "median")
        out.append(f"  ({stat} of {crit[0].get('rounds', '?')} interleaved fwd+bwd calls each; "
                   "x is a leaf that needs its gradient, as in a hidden layer. 'default': glibc "
                   "as the process found it, whose page faulting depends on allocation history; "
                   "'steady': the benchmark set mallopt so neither side re-faults its "
                   "temporaries -- the arithmetic alone)")
        out += ["```", ""]

    goals = goal_rows(results)
    if goals:
        out += ["## Goals", ""] + _table(["goal", "measured", "target", "verdict"], goals) + [""]

    groups = config_groups(records)
    for key, basis_label in (time_bases(records) if groups else []):
        suffix = f" -- {basis_label}" if basis_label else ""
        out += [f"## Geomean time ratio to the plain conv (lower is better){suffix}", ""]
        header = ["config", "provider"] + [f"{m} (n)" for m in MODES]
        rows = []
        for group in groups:
            recs = _group_records(records, group)
            plain = "conv2d" if group[0] == "conv" else "linear"
            for prov in PROVIDER_ORDER:
                if prov in (plain, "conv2d", "linear"):
                    continue
                cells = []
                for mode in MODES:
                    g, n = geomean_ratio(recs, prov, plain, mode, key)
                    cells.append(f"{_fmt(g)}x ({n})" if g is not None else "-")
                if any(c != "-" for c in cells):
                    rows.append([f"{group[0]} {group[1]} {group[2]} {group[3]}", TITLES[prov]] + cells)
        out += _table(header, rows) + [""]
        if key == DEVICE_BASIS[0]:
            out += ["(device time: the calls captured in a CUDA graph and replayed, so the GPU "
                    "runs them back to back -- the kernels' cost without the host's; bwd = "
                    "fwd+bwd minus fwd)", ""]

        out += ["## sphereops speed-up over each SphereConv baseline (geomean, higher is better)"
                f"{suffix}", ""]
        rows = []
        for group in groups:
            recs = _group_records(records, group)
            for base in ("unfused_official", "unfused_best", "compiled_best"):
                cells = []
                for mode in MODES:
                    g, n = geomean_ratio(recs, "sphereops", base, mode, key)
                    cells.append(f"{_fmt(1 / g)}x ({n})" if g else "-")
                if any(c != "-" for c in cells):
                    rows.append([f"{group[0]} {group[1]} {group[2]} {group[3]}", TITLES[base]] + cells)
        if rows:
            out += _table(["config", "baseline"] + [f"{m} (n)" for m in MODES], rows) + [""]
        else:
            out += ["(no layer has both sphereops and a SphereConv baseline timed)", ""]

    head = headline_group(results)
    if head is not None:
        recs = [r for r in _group_records(records, head) if r["provider"] == "sphereops"
                and r["mode"] == "fwd+bwd" and r.get("status") == "ok"
                and "conv2d" in r.get("ratio_to", {})]
        # worst first by the device-time ratio where the run measured it (the kernels' share),
        # else by the eager one
        recs.sort(key=lambda r: -r.get("graph_ratio_to", {}).get("conv2d", r["ratio_to"]["conv2d"]))
        if recs:
            out += [f"## Worst layers (sphereops fwd+bwd vs plain conv, {head[1]} {head[2]} {head[3]})", ""]
            out += _table(["layer", "shape", "ratio to conv", "ms", "host ms to issue",
                           "device ms", "device ratio to conv", "TFLOP/s (device)",
                           "% of floor (device)"],
                          [[r["shape"], r["label"], _fmt(r["ratio_to"]["conv2d"], 2, "x"),
                            _ms(_t(r)), _ms(r.get("host_ms")), _ms(r.get("graph_ms")),
                            _fmt(r.get("graph_ratio_to", {}).get("conv2d"), 2, "x"),
                            _fmt(r.get("graph_tflops", r.get("tflops")), 1),
                            _fmt(r.get("graph_pct_floor", r.get("pct_floor")), 0, "%")]
                           for r in recs[:5]])
            out += ["", "(host ms close to ms: the eager call is bound by Python/dispatch/launch "
                    "overhead, not by the kernels; device ms: the same call replayed from a CUDA "
                    "graph)", ""]

    e2e = results.get("e2e", [])
    if e2e:
        out += ["## End-to-end training step", ""]
        rows = []
        for r in e2e:
            rows.append([r.get("variant", "-"), r.get("model", "-"), r.get("batch", "-"),
                         r.get("precision", "-"), r.get("layout", "-"), r.get("status"),
                         _ms(_t(r)), _fmt(r.get("time_ratio_to_plain"), 2, "x"),
                         _ms(r.get("graph_ms")), _fmt(r.get("graph_time_ratio_to_plain"), 2, "x"),
                         _fmt(r.get("peak_mem_mb"), 0), _fmt(r.get("mem_ratio_to_plain"), 2, "x"),
                         _fmt(r.get("saved_mb"), 1), _fmt(r.get("saved_ratio_to_plain"), 2, "x"),
                         ",".join(r.get("sphere_layer_dtype", [])) or "-",
                         r.get("error", r.get("reason", r.get("graph_error", "")))])
        out += _table(["variant", "model", "batch", "precision", "layout", "status", "ms/step",
                       "x plain", "device ms/step", "device x plain", "peak MiB", "mem x plain", "saved for bwd MiB", "saved x plain",
                       "sphere out dtype", "note"], rows)
        out += ["", "(saved for bwd: the distinct tensors autograd keeps between the forward and "
                "the backward, parameters excluded -- the activation memory, on any device; "
                "device ms/step: whole steps replayed from a CUDA graph)", ""]

    problems = _problem_lines(records)
    if problems:
        out += ["## Failures (never timed)", ""] + problems + [""]
    notes = results.get("notes", [])
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def _problem_lines(records) -> list:
    seen, lines = set(), []
    for r in records:
        if r.get("status") not in ("error", "wrong"):
            continue
        msg = r.get("error", "")
        if r.get("status") == "wrong":
            msg += f" (rel. errors {r.get('check')})"
        key = (r["provider"], r["shape"], r["dtype"], r["layout"], r["operator"], r.get("stage"), msg)
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"- **{r['status']}** {r['provider']} on {r['kind']} {r['shape']} "
                     f"{r['dtype']} {r['layout']} {r['operator']}"
                     f"{' [' + r['stage'] + ']' if r.get('stage') else ''}: {msg}")
    unsupported = sorted({(r["provider"], r.get("reason", "")) for r in records
                          if r.get("status") == "unsupported"})
    lines += [f"- not run: {p}: {reason}" for p, reason in unsupported]
    return lines


def detail_markdown(results: dict) -> str:
    """Every timed row, one line per (layer, config, mode), providers side by side."""
    TITLES = titles_for(results)  # noqa: N806 - shadows the module table on purpose
    _recompute_ratios(results)
    records = results.get("records", [])
    providers = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in records)]
    cells = defaultdict(dict)
    order = []
    for r in records:
        if r["mode"] not in MODES:
            continue
        op = r["operator"]
        key = (r["kind"], r["shape"], r["label"], r["dtype"], r["layout"], r["mode"])
        if op == "-":
            # A plain-conv record belongs to every operator row of its layer/config.
            for other in {x["operator"] for x in records if x["operator"] != "-"} or {"-"}:
                cells[key + (other,)][r["provider"]] = r
            continue
        if key + (op,) not in order:
            order.append(key + (op,))
        cells[key + (op,)][r["provider"]] = r
    out = ["## All rows", "",
           "Time in ms (ratio to the plain conv), eager. TFLOP/s, % of floor and peak memory are "
           "sphereops's; FLOPs count the convolution GEMMs only. Last column: device time (CUDA "
           "graph replay), where measured.", ""]
    header = ["kind", "layer", "shape", "dtype", "layout", "op", "mode"] + \
             [TITLES[p] for p in providers] + ["TFLOP/s", "% floor", "peak MiB (sphereops / plain)",
                                               "device ms, sphereops / plain (ratio)"]
    rows = []
    for key in order:
        kind, shape, label, dtype, layout, mode, op = key
        row = [kind, shape, label, dtype, layout, op, mode]
        plain_rec = cells[key].get("conv2d") or cells[key].get("linear")
        for p in providers:
            r = cells[key].get(p)
            if r is None:
                row.append("")
            elif r.get("status") == "ok":
                ratio = r.get("ratio_to", {}).get("conv2d" if kind == "conv" else "linear")
                row.append(_ms(_t(r)) + (f" ({ratio:.2f}x)" if ratio else ""))
            else:
                row.append(r.get("status"))
        s = cells[key].get("sphereops")
        ok = s is not None and s.get("status") == "ok"
        row.append(_fmt(s.get("tflops"), 1) if ok else "-")
        row.append(_fmt(s.get("pct_floor"), 0, "%") if ok else "-")
        mem_s = s.get("peak_mem_mb") if ok else None
        mem_p = plain_rec.get("peak_mem_mb") if plain_rec is not None else None
        row.append(f"{_fmt(mem_s, 0)} / {_fmt(mem_p, 0)}" if (mem_s or mem_p) else "-")
        dev_s = s.get("graph_ms") if ok else None
        dev_p = plain_rec.get("graph_ms") if plain_rec is not None else None
        dev_ratio = s.get("graph_ratio_to", {}).get("conv2d" if kind == "conv" else "linear") if ok else None
        row.append(f"{_ms(dev_s)} / {_ms(dev_p)}" + (f" ({dev_ratio:.2f}x)" if dev_ratio else "")
                   if (dev_s or dev_p) else "-")
        rows.append(row)
    return "\n".join(out + _table(header, rows) + [""])


def full_markdown(results: dict) -> str:
    return summary_markdown(results) + "\n" + detail_markdown(results)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def plot(results: dict, path) -> Path:
    """Ratio to the plain conv per layer and mode (headline config) + a time breakdown."""
    TITLES = titles_for(results)  # noqa: N806 - shadows the module table on purpose
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _recompute_ratios(results)
    path = Path(path)
    records = results.get("records", [])
    group = headline_group(results)
    fig, axes = plt.subplots(2, 2, figsize=(16, 10))
    title = f"sphereops benchmark — {results.get('meta', {}).get('device_name', '?')}"
    if group is None:
        for ax in axes.flat:
            ax.axis("off")
        axes[0][0].text(0.1, 0.5, "no timed SphereConv rows in this run", fontsize=14)
        fig.suptitle(title)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path
    recs = _group_records(records, group)
    plain = "conv2d" if group[0] == "conv" else "linear"
    layers = []
    for r in recs:
        if r["shape"] not in layers and r.get("status") == "ok":
            layers.append(r["shape"])
    providers = [p for p in PROVIDER_ORDER if p != plain and any(
        r["provider"] == p and r.get("status") == "ok" for r in recs)]
    width = 0.8 / max(1, len(providers))
    for ax, mode in zip([axes[0][0], axes[0][1], axes[1][0]], MODES):
        for j, prov in enumerate(providers):
            vals = []
            for layer in layers:
                r = next((x for x in recs if x["shape"] == layer and x["provider"] == prov
                          and x["mode"] == mode and x.get("status") == "ok"), None)
                vals.append(r["ratio_to"].get(plain, float("nan")) if r else float("nan"))
            xs = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(layers))]
            ax.bar(xs, vals, width=width, label=TITLES.get(prov, prov))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(f"time / {TITLES[plain]}")
        ax.set_title(f"{mode}: ratio to {TITLES[plain]} ({group[1]}, {group[2]}, {group[3]})")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    # Time breakdown: forward and backward time summed over the layers each provider ran.
    ax = axes[1][1]
    names, fwd, bwd = [], [], []
    for prov in providers + [plain]:
        f = sum(_t(r) for r in recs if r["provider"] == prov and r["mode"] == "fwd"
                and r.get("status") == "ok")
        b = sum(_t(r) for r in recs if r["provider"] == prov and r["mode"] == "bwd"
                and r.get("status") == "ok")
        if f or b:
            names.append(TITLES.get(prov, prov))
            fwd.append(f)
            bwd.append(b)
    ax.bar(range(len(names)), fwd, label="forward")
    ax.bar(range(len(names)), bwd, bottom=fwd, label="backward")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("ms, summed over the layers timed")
    ax.set_title("time breakdown (forward + backward)")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Comparing two runs
# ---------------------------------------------------------------------------------------------

def compare_markdown(new: dict, old: dict, top: int = 10) -> str:
    """Time ratio new/old for every record timed in both runs (< 1: the new run is faster)."""
    TITLES = titles_for(new)  # noqa: N806 - shadows the module table on purpose
    def index(res):
        return {(r["kind"], r["shape"], r["dtype"], r["layout"], r["operator"], r["provider"],
                 r["mode"]): r for r in res.get("records", []) if r.get("status") == "ok"}
    a, b = index(new), index(old)
    common = sorted(set(a) & set(b))
    out = ["# Comparison of two benchmark runs", "",
           f"- new: {new.get('meta', {}).get('device_name')} commit {new.get('meta', {}).get('commit')} "
           f"{new.get('meta', {}).get('date')}",
           f"- old: {old.get('meta', {}).get('device_name')} commit {old.get('meta', {}).get('commit')} "
           f"{old.get('meta', {}).get('date')}",
           f"- {len(common)} rows timed in both runs; ratio = new time / old time (< 1: faster now)",
           ""]
    if new.get("meta", {}).get("device_name") != old.get("meta", {}).get("device_name"):
        out += ["**Warning: different devices — the ratios compare cards, not code.**", ""]
    by = defaultdict(list)
    for key in common:
        by[(key[5], key[6])].append(_t(a[key]) / _t(b[key]))
    rows = [[TITLES.get(p, p), m, _fmt(geomean(v), 3, "x"), len(v)]
            for (p, m), v in sorted(by.items())]
    out += _table(["provider", "mode", "geomean new/old", "rows"], rows) + [""]
    changes = sorted(((_t(a[k]) / _t(b[k]), k) for k in common), reverse=True)
    if changes:
        out += [f"Largest slow-downs (top {top}):", ""]
        out += _table(["ratio", "provider", "layer", "dtype", "layout", "op", "mode", "new ms", "old ms"],
                      [[_fmt(r, 3, "x"), k[5], k[1], k[2], k[3], k[4], k[6],
                        _ms(_t(a[k])), _ms(_t(b[k]))] for r, k in changes[:top]])
        out += [""]
    e_new = {r.get("variant"): r for r in new.get("e2e", []) if r.get("status") == "ok"}
    e_old = {r.get("variant"): r for r in old.get("e2e", []) if r.get("status") == "ok"}
    both = sorted(set(e_new) & set(e_old))
    if both:
        out += ["End-to-end step:", ""]
        out += _table(["variant", "new ms", "old ms", "new/old"],
                      [[v, _ms(_t(e_new[v])), _ms(_t(e_old[v])),
                        _fmt(_t(e_new[v]) / _t(e_old[v]), 3, "x")] for v in both])
        out += [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Files and CLI
# ---------------------------------------------------------------------------------------------

def write_report(results: dict, json_path, out_dir=None, make_plot: bool = True) -> dict:
    """Write ``<stem>.md`` (and ``<stem>.png``) next to ``json_path`` or into ``out_dir``."""
    json_path = Path(json_path)
    out_dir = Path(out_dir) if out_dir is not None else json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = json_path.stem
    paths = {"json": json_path}
    md = out_dir / f"{stem}.md"
    md.write_text(full_markdown(results))
    paths["md"] = md
    if make_plot:
        try:
            paths["png"] = plot(results, out_dir / f"{stem}.png")
        except Exception as exc:  # noqa: BLE001 - a missing matplotlib must not lose the report
            print(f"plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a results JSON written by `python -m bench`")
    ap.add_argument("--compare", metavar="OLD.json", help="compare with an earlier run")
    ap.add_argument("--out-dir", help="where to write the .md/.png (default: next to the JSON)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = ap.parse_args(argv)
    results = load(args.results)
    if args.compare:
        text = compare_markdown(results, load(args.compare))
        print(text)
        out_dir = Path(args.out_dir) if args.out_dir else Path(args.results).parent
        out = out_dir / f"{Path(args.results).stem}_vs_{Path(args.compare).stem}.md"
        out.write_text(text)
        print(f"\nwrote {out}")
        return 0
    paths = write_report(results, args.results, args.out_dir, make_plot=not args.no_plot)
    print(summary_markdown(results))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
