"""``make compare``: does a SphereNet converge in fewer iterations than the same CNN?

Trains SphereNet-9 with plain convolutions (the CNN baseline) and with each SphereConv operator
(linear, cosine, sigmoid, learnable) under the same budget -- same data, seeds, initial filters,
optimiser (Adam 1e-3, as the official runs), batch size and iterations -- and writes

* ``docs/compare.png``: test accuracy and training loss against iterations (mean over seeds, band
  from the worst to the best seed);
* ``docs/compare.md``: the setup, a table of iterations to reach each target test accuracy and
  the final accuracy, and the raw per-seed numbers.

The paper's claim under test (official CIFAR-10 logs): SphereNets reach 80 % test accuracy at
3-4.5k iterations where the CNN needs 11.5k. On a 2-core CPU the default budget is far smaller:
Fashion-MNIST (when Debian's ``dataset-fashion-mnist`` is installed, else scikit-learn's digits)
at 16x16, SphereNet-9 at 1/8 width. ``--iterations``, ``--seeds`` and ``--width-mult`` scale it.

``python -m sphereops.compare --throughput`` instead times CIFAR-shaped training steps of the
full-width SphereNet-9 (plain conv, SphereConv reference backend, SphereConv Triton backend) on a
GPU and writes a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from sphereops import data as sdata
from sphereops.train import TrainConfig, train

# A variant is "<operator>" (BatchNorm after every conv, as the official SphereNet-9) or
# "<operator>+spherenorm" (SphereNorm2d instead of BatchNorm: no batch statistics, which is what
# matters at small batch sizes, e.g. `make compare ARGS="--batch-size 4"`).
DEFAULT_VARIANTS = ("cnn", "linear", "cosine", "sigmoid", "learnable", "cnn+spherenorm",
                    "cosine+spherenorm")
VARIANTS = DEFAULT_VARIANTS + tuple(f"{v}+spherenorm" for v in ("linear", "sigmoid", "learnable"))


def _variant_model_args(variant: str):
    """``(operator, norm)`` of a variant name."""
    base, _, suffix = variant.partition("+")
    return (None if base == "cnn" else base), ("sphere" if suffix == "spherenorm" else "batch")
DEFAULT_TARGETS = {"fashion-mnist": (0.70, 0.75, 0.80, 0.85), "mnist": (0.90, 0.95, 0.97),
                   "digits": (0.80, 0.90, 0.95), "synthetic": (0.5, 0.8)}
_COLORS = {"cnn": "black", "linear": "tab:blue", "cosine": "tab:orange", "sigmoid": "tab:green",
           "learnable": "tab:red", "cnn+spherenorm": "tab:gray", "linear+spherenorm": "tab:cyan",
           "cosine+spherenorm": "tab:brown", "sigmoid+spherenorm": "tab:olive",
           "learnable+spherenorm": "tab:pink"}


def _pick_data(name: str, data_dir) -> str:
    if name != "auto":
        return name
    try:
        sdata.load_dataset("fashion-mnist", "test", data_dir)
        return "fashion-mnist"
    except sdata.DatasetNotFoundError:
        return "digits"


def _parse_list(text, cast=str):
    return tuple(cast(t.strip()) for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sphereops.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="auto", help="auto: fashion-mnist when installed, else digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, among {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width-mult", type=float, default=0.125)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--test-subset", type=int, default=2000, help="test images per evaluation (0: all)")
    p.add_argument("--targets", default=None, help="test accuracies, e.g. 0.8,0.85 (default per dataset)")
    p.add_argument("--orth", type=float, default=0.0, help="orthogonality penalty for every variant")
    p.add_argument("--budget-minutes", type=float, default=0.0,
                   help="start no further seed pass that would end past this (0: no limit)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--runs-dir", default=os.path.join("runs", "compare"))
    p.add_argument("--md", default=os.path.join("docs", "compare.md"))
    p.add_argument("--png", default=os.path.join("docs", "compare.png"))
    p.add_argument("--plot-only", action="store_true", help="redraw from <runs-dir>/results.json")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--throughput", action="store_true", help="GPU training-step throughput instead")
    p.add_argument("--throughput-out", default=os.path.join("docs", "compare.md"),
                   help="markdown file whose GPU throughput section is (re)written")
    p.add_argument("--throughput-steps", type=int, default=20)
    p.add_argument("--throughput-device", default="cuda")
    p.add_argument("--throughput-operators", default="cosine,linear,sigmoid,learnable")
    p.add_argument("--throughput-budget", type=float, default=400.0,
                   help="seconds after which remaining throughput cases are skipped")
    return p


# ----------------------------------------------------------------------------- convergence runs
def run_all(args) -> dict:
    data = _pick_data(args.data, args.data_dir)
    variants = _parse_list(args.variants)
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"variants must be among {VARIANTS}, got {variant!r}")
    seeds = _parse_list(args.seeds, int)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    os.makedirs(args.runs_dir, exist_ok=True)
    test_size = len(sdata.load_dataset(data, "test", args.data_dir))
    if args.test_subset:
        test_size = min(test_size, args.test_subset)
    results = {"setup": {
        "data": data, "model": "spherenet9", "width_mult": args.width_mult,
        "image_size": args.image_size, "batch_size": args.batch_size, "iterations": args.iterations,
        "lr": args.lr, "optimizer": "adam", "lr_schedule": "constant", "eval_every": args.eval_every,
        "orth": args.orth,
        "test_subset": test_size, "seeds": list(seeds), "device": args.device,
        "threads": torch.get_num_threads() if not args.threads else args.threads,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }, "runs": []}
    total_runs = len(seeds) * len(variants)
    started = time.perf_counter()
    passes_done = 0
    for seed in seeds:  # seed-major: after one pass every variant has a curve
        spent = time.perf_counter() - started
        if args.budget_minutes and passes_done and spent + spent / passes_done > 60 * args.budget_minutes:
            print(f"[compare] budget of {args.budget_minutes:g} min reached: seeds "
                  f"{list(seeds[passes_done:])} not run", file=sys.stderr, flush=True)
            break
        passes_done += 1
        for variant in variants:
            operator, norm = _variant_model_args(variant)
            config = TrainConfig(
                model="spherenet9", operator=operator, norm=norm, data=data,
                data_dir=args.data_dir, image_size=args.image_size, width_mult=args.width_mult,
                batch_size=args.batch_size, iterations=args.iterations, lr=args.lr,
                lr_schedule="constant", eval_every=args.eval_every, log_every=args.eval_every,
                test_subset=args.test_subset, seed=seed, device=args.device, backend=args.backend,
                orth=args.orth,
                threads=args.threads, progress=args.progress,
                out_dir=os.path.join(args.runs_dir, f"{variant}-s{seed}"))
            t0 = time.perf_counter()
            result = train(config)
            seconds = time.perf_counter() - t0
            curve = [(int(r["iteration"]), float(r["test_acc"])) for r in result.rows if r["test_acc"] != ""]
            losses = [(int(r["iteration"]), float(r["loss"])) for r in result.rows]
            results["runs"].append({"variant": variant, "seed": seed, "seconds": seconds,
                                    "test_acc": curve, "loss": losses,
                                    "final_test_acc": result.final_test_acc})
            done = len(results["runs"])
            print(f"[compare {done}/{total_runs}] {variant:9s} seed {seed}: final test acc "
                  f"{result.final_test_acc:.4f} in {seconds:.0f} s "
                  f"(total {time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
            with open(os.path.join(args.runs_dir, "results.json"), "w") as handle:
                json.dump(results, handle)
    results["setup"]["wall_seconds"] = time.perf_counter() - started
    results["setup"]["seeds"] = sorted({run["seed"] for run in results["runs"]})
    with open(os.path.join(args.runs_dir, "results.json"), "w") as handle:
        json.dump(results, handle)
    return results


def iterations_to_reach(curve, target):
    """The first evaluated iteration whose test accuracy is >= target, else None."""
    for iteration, acc in curve:
        if acc >= target:
            return iteration
    return None


def summarise(results: dict, targets) -> list:
    """One row per variant: final accuracy (mean, std over seeds) and, per target, the median
    iterations to reach it over the seeds that did and how many did."""
    by_variant = {}
    for run in results["runs"]:
        by_variant.setdefault(run["variant"], []).append(run)
    rows = []
    for variant in [v for v in VARIANTS if v in by_variant]:
        runs = by_variant[variant]
        finals = [r["final_test_acc"] for r in runs]
        reach = []
        for target in targets:
            its = [iterations_to_reach(r["test_acc"], target) for r in runs]
            got = [i for i in its if i is not None]
            reach.append({"median": statistics.median(got) if got else None,
                          "reached": len(got), "of": len(its)})
        rows.append({"variant": variant, "final_mean": statistics.fmean(finals),
                     "final_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
                     "seconds": statistics.fmean(r["seconds"] for r in runs), "reach": reach,
                     "seeds": len(runs)})
    return rows


def _mean_curve(runs, key):
    iterations = sorted({i for r in runs for i, _ in r[key]})
    mean, low, high = [], [], []
    for it in iterations:
        values = [v for r in runs for i, v in r[key] if i == it]
        mean.append(statistics.fmean(values))
        low.append(min(values))
        high.append(max(values))
    return iterations, mean, low, high


def plot(results: dict, png_path: str, targets) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = results["setup"]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.6))
    by_variant = {}
    for run in results["runs"]:
        by_variant.setdefault(run["variant"], []).append(run)
    for variant in [v for v in VARIANTS if v in by_variant]:
        runs = by_variant[variant]
        label = {"cnn": "CNN (plain conv)", "cnn+spherenorm": "CNN + SphereNorm2d"}.get(
            variant, f"SphereConv {variant}")
        style = dict(color=_COLORS[variant], lw=2.2 if variant == "cnn" else 1.6,
                     ls="--" if variant == "cnn" else "-")
        for ax, key in ((ax_acc, "test_acc"), (ax_loss, "loss")):
            its, mean, low, high = _mean_curve(runs, key)
            ax.plot(its, mean, label=label, **style)
            if len(runs) > 1:
                ax.fill_between(its, low, high, color=_COLORS[variant], alpha=0.12)
    for target in targets:
        ax_acc.axhline(target, color="grey", lw=0.6, ls=":")
    ax_acc.set_xlabel("iteration")
    ax_acc.set_ylabel(f"test accuracy ({setup['test_subset'] or 'all'} test images)")
    ax_acc.set_title("Test accuracy")
    lows = [a for r in results["runs"] for _, a in r["test_acc"]]
    if lows:
        ax_acc.set_ylim(max(0.0, min(0.5, min(lows)) - 0.02), 1.0)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("training loss (mean since the previous point)")
    ax_loss.set_title("Training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_acc.legend(loc="lower right")
    fig.suptitle(f"SphereNet-9 (width x{setup['width_mult']:g}) on {setup['data']} "
                 f"{setup['image_size']}x{setup['image_size']}: Adam {setup['lr']:g}, batch "
                 f"{setup['batch_size']}, {len(setup['seeds'])} seed(s), mean and min-max band")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


THROUGHPUT_MARKER = "<!-- gpu-throughput: written by `python -m sphereops.compare --throughput` -->"


def _kept_section(md_path: str) -> str:
    """The GPU throughput section of an existing compare.md (kept when the CPU part is redrawn)."""
    if not os.path.exists(md_path):
        return ""
    with open(md_path) as handle:
        text = handle.read()
    index = text.find(THROUGHPUT_MARKER)
    return "" if index < 0 else "\n" + text[index:]


def _write_throughput_section(md_path: str, section: str) -> None:
    text = ""
    if os.path.exists(md_path):
        with open(md_path) as handle:
            text = handle.read()
        index = text.find(THROUGHPUT_MARKER)
        if index >= 0:
            text = text[:index]
    text = text.rstrip("\n") + "\n\n" if text else ""
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    with open(md_path, "w") as handle:
        handle.write(text + THROUGHPUT_MARKER + "\n" + section)


def write_markdown(results: dict, rows: list, targets, md_path: str, png_path: str) -> str:
    setup = results["setup"]
    lines = [
        "# Convergence: SphereNet-9 vs the same CNN (`make compare`)",
        "",
        "Generated by `python -m sphereops.compare` (`make compare`); rerun to refresh.",
        "",
        f"* data: **{setup['data']}** resized to {setup['image_size']}x{setup['image_size']}, "
        f"test accuracy on {setup['test_subset'] or 'all'} fixed test images every "
        f"{setup['eval_every']} iterations",
        f"* model: SphereNet-9 (three stages of three 3x3 convs + BatchNorm + ReLU, max-pools, "
        f"fc6 SphereConv, plain classifier) at width x{setup['width_mult']:g}; the CNN is the "
        "same network with plain convolutions; all start from the same filters per seed",
        f"* training: Adam lr {setup['lr']:g} constant, batch {setup['batch_size']}, "
        f"{setup['iterations']} iterations, softmax loss, "
        + (f"orthogonality penalty {setup['orth']:g}" if setup.get("orth") else "no orthogonality penalty")
        + ", seeds "
        f"{', '.join(str(s) for s in setup['seeds'])}",
        f"* machine: {setup['device']} ({setup['machine']}, {setup['threads']} torch threads, "
        f"shared), torch {setup['torch']}, SphereConv reference backend"
        + (f"; whole comparison {setup['wall_seconds'] / 60:.1f} min" if "wall_seconds" in setup else ""),
        "",
        f"![test accuracy and loss curves]({os.path.relpath(png_path, os.path.dirname(os.path.abspath(md_path)))})",
        "",
        "## Iterations to reach a test accuracy, and final accuracy",
        "",
        "Median over the seeds that reached the target (in brackets when not all did); "
        "'-' = not reached within the budget.",
        "",
    ]
    header = "| variant | " + " | ".join(f"iters to {t:.0%}" for t in targets) + \
        f" | final test acc (mean ± std) | s / run |"
    lines += [header, "|" + " --- |" * (len(targets) + 3)]
    for row in rows:
        cells = []
        for reach in row["reach"]:
            if reach["median"] is None:
                cells.append("-")
            else:
                value = f"{reach['median']:g}"
                cells.append(value if reach["reached"] == reach["of"] else f"{value} ({reach['reached']}/{reach['of']})")
        name = "CNN (plain)" if row["variant"] == "cnn" else row["variant"]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {row['final_mean']:.2%} ± {row['final_std']:.2%} | {row['seconds']:.0f} |")
    lines += ["", "## Reading", ""]
    lines += _verdict(rows, targets, setup)
    lines += ["", "## Per seed", "", "| variant | seed | final test acc | " +
              " | ".join(f"iters to {t:.0%}" for t in targets) + " |",
              "|" + " --- |" * (len(targets) + 3)]
    for run in results["runs"]:
        its = [iterations_to_reach(run["test_acc"], t) for t in targets]
        lines.append(f"| {run['variant']} | {run['seed']} | {run['final_test_acc']:.2%} | " +
                     " | ".join("-" if i is None else str(i) for i in its) + " |")
    text = "\n".join(lines) + "\n" + _kept_section(md_path)
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    with open(md_path, "w") as handle:
        handle.write(text)
    return text


def _verdict(rows, targets, setup=None) -> list:
    """Plain statements computed from the table (no claim beyond what was measured)."""
    cnn = next((r for r in rows if r["variant"] == "cnn"), None)
    if cnn is None:
        return ["No CNN baseline in this run."]
    full = [i for i, reach in enumerate(cnn["reach"]) if reach["reached"] == reach["of"]]
    if not full:
        return ["The CNN did not reach any target on every seed within the budget."]
    index = full[-1]
    target, base = targets[index], cnn["reach"][index]["median"]
    resolution = f" (accuracy is measured every {setup['eval_every']} iterations)" if setup else ""
    out = ["The paper reports SphereNets reaching 80 % on CIFAR-10 at 3-4.5k iterations vs 11.5k "
           f"for the CNN. Here, iterations to {target:.0%}, the highest target the CNN reached on "
           f"every seed{resolution}:", ""]
    faster, ratios = 0, []
    for row in rows:
        if row["variant"] == "cnn":
            continue
        reach = row["reach"][index]
        if reach["median"] is None:
            out.append(f"* {row['variant']}: did not reach {target:.0%} (CNN: {base:g} iterations).")
            continue
        median = reach["median"]
        ratios.append(median / base)
        if median < base:
            faster += 1
            how = f"{base / median:.2f}x fewer than the CNN's {base:g}"
        elif median > base:
            how = f"{median / base:.2f}x more than the CNN's {base:g}"
        else:
            how = f"the same as the CNN's {base:g}"
        out.append(f"* {row['variant']}: {median:g} iterations, {how} ({reach['reached']}/"
                   f"{reach['of']} seeds); final accuracy {row['final_mean']:.2%} vs "
                   f"{cnn['final_mean']:.2%}.")
    out.append("")
    gap = max(abs(r["final_mean"] - cnn["final_mean"]) for r in rows)
    if faster == 0 and ratios:
        out.append(f"In this budget no SphereConv variant converged faster than the CNN: they "
                   f"needed {min(ratios):.2f}-{max(ratios):.2f}x the CNN's iterations to reach "
                   f"{target:.0%}, and the final accuracies agree within {gap * 100:.1f} percentage points. The "
                   "paper's speed-up is not reproduced at this scale; it was measured on CIFAR-10 "
                   "with full-width networks over thousands of iterations, which a shared 2-core "
                   "CPU cannot run.")
    else:
        out.append(f"{faster} of {len(rows) - 1} SphereConv variants reached {target:.0%} in fewer "
                   "iterations than the CNN (medians over the seeds; compare the spread in the "
                   "per-seed table before reading much into small differences).")
    return out


# ----------------------------------------------------------------------------- GPU throughput
def _throughput_markdown(rows, steps, device_name) -> str:
    plain_ms = rows[0]["ms"] if rows and rows[0]["operator"] is None else float("nan")
    lines = ["## Training throughput: SphereNet-9 on CIFAR-shaped batches (GPU)", "",
             f"Generated by `python -m sphereops.compare --throughput` on {device_name} "
             f"(torch {torch.__version__}); batch 128 x 3 x 32 x 32, full-width SphereNet-9 "
             f"(128/192/256 filters, 3.9 M parameters), fp32 weights and activations (TF32 off), "
             f"Adam, softmax loss; mean of {steps} training steps after 3 warm-up steps (the "
             "warm-up includes Triton compilation and autotuning), timed with CUDA events. "
             "'logits rel. err' compares the first forward with the reference backend from the "
             "same weights and batch.", "",
             "| variant | ms / step | images / s | vs plain conv | peak MiB | warm-up s | logits rel. err vs reference | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        ratio = row["ms"] / plain_ms if math.isfinite(plain_ms) and math.isfinite(row["ms"]) else float("nan")
        err = "" if row["rel_err"] is None else f"{row['rel_err']:.1e}"
        lines.append(f"| {row['label']} | {row['ms']:.2f} | {row['ips']:.0f} | {ratio:.2f}x | "
                     f"{row['mib']:.0f} | {row['warm']:.1f} | {err} | {row['note']} |")
    return "\n".join(lines) + "\n"


def throughput(args) -> str:
    """Training steps per second of full-width SphereNet-9 on CIFAR-shaped batches: plain conv vs
    SphereConv with the reference backend (unfused PyTorch) vs the Triton backend, for the
    operators of ``--throughput-operators``. Needs CUDA. Rows are written as they finish; cases
    left when ``--throughput-budget`` seconds have passed are reported as skipped."""
    from sphereops.models import build_model

    device = torch.device(args.throughput_device)
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise RuntimeError("--throughput needs a CUDA device (or --throughput-device cpu for a dry run)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    cases = [("plain conv (cuDNN)", None, "reference")]
    for operator in _parse_list(args.throughput_operators):
        cases.append((f"SphereConv {operator}, reference backend", operator, "reference"))
        cases.append((f"SphereConv {operator}, triton backend", operator, "triton"))
    generator = torch.Generator(device="cpu").manual_seed(0)
    batch = 128 if on_cuda else 8
    x = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    device_name = torch.cuda.get_device_name() if on_cuda else "cpu (dry run)"
    rows, started = [], time.perf_counter()
    for label, operator, backend in cases:
        row = {"label": label, "operator": operator, "ms": float("nan"), "ips": float("nan"),
               "mib": float("nan"), "warm": float("nan"), "rel_err": None, "note": ""}
        if time.perf_counter() - started > args.throughput_budget:
            row["note"] = "skipped (time budget)"
            rows.append(row)
            continue
        model = None
        try:
            torch.manual_seed(0)
            model = build_model("spherenet9", num_classes=10, operator=operator, backend=backend).to(device)
            if backend == "triton":
                initial = {k: v.clone() for k, v in model.state_dict().items()}
                reference_model = build_model("spherenet9", num_classes=10, operator=operator,
                                              backend="reference").to(device)
                reference_model.load_state_dict(initial)
                with torch.no_grad():
                    ref = reference_model(x)
                    out = model(x)
                row["rel_err"] = float((out - ref).norm() / ref.norm())
                model.load_state_dict(initial)  # undo the BatchNorm running-statistics update
                del reference_model
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

            def step():
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                return loss

            t0 = time.perf_counter()
            for _ in range(3):
                step()
            sync()
            row["warm"] = time.perf_counter() - t0
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(args.throughput_steps):
                loss = step()
            if on_cuda:
                end.record()
                sync()
                row["ms"] = start.elapsed_time(end) / args.throughput_steps
                row["mib"] = torch.cuda.max_memory_allocated() / 2**20
            else:
                row["ms"] = (time.perf_counter() - t0) * 1000 / args.throughput_steps
            row["ips"] = x.shape[0] * 1000 / row["ms"]
            if not math.isfinite(float(loss)):
                row["note"] = "non-finite loss"
        except Exception as exc:  # report and go on: one failing backend must not hide the rest
            row["note"] = f"{type(exc).__name__}: {str(exc)[:150]}".replace("|", "/").replace("\n", " ")
        rows.append(row)
        print(f"[throughput {time.perf_counter() - started:.0f}s] {row}", file=sys.stderr, flush=True)
        del model
        if on_cuda:
            torch.cuda.empty_cache()
        _write_throughput_section(args.throughput_out,
                                  _throughput_markdown(rows, args.throughput_steps, device_name))
    return _throughput_markdown(rows, args.throughput_steps, device_name)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.throughput:
        print(throughput(args))
        return 0
    if args.plot_only:
        with open(os.path.join(args.runs_dir, "results.json")) as handle:
            results = json.load(handle)
    else:
        results = run_all(args)
    data = results["setup"]["data"]
    targets = _parse_list(args.targets, float) if args.targets else DEFAULT_TARGETS.get(data, (0.8, 0.9))
    rows = summarise(results, targets)
    plot(results, args.png, targets)
    print(write_markdown(results, rows, targets, args.md, args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
