"""``python -m bench`` (``make bench``): the benchmark suite on the present device.

Quick suite by default (``--full`` for every layer and config).  Prints the summary table and
writes ``bench/results/<date>_<device>_<commit>.{json,md,png}`` (``--out DIR`` elsewhere).
The same providers, inputs and checks are available to pytest-benchmark through
``pytest bench/`` (``--benchmark-json``, ``--benchmark-compare``, saved runs).

On CUDA: the fused kernels vs cuDNN, eager unfused (official style and best), and
torch.compile of the best unfused, in bf16 channels_last first, then the operator, dtype and
layout sweeps, the SphereResNet-32 training step and SphereLinear rows.  On CPU: the reference
path vs nn.Conv2d, including issue 2's criterion layer, printed first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_BUDGET_S = {"cuda": 200.0, "cpu": 150.0}


def _parse_configs(text: str):
    configs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(
                f"--configs items are dtype:layout:operator (e.g. bf16:channels_last:linear), got {item!r}")
        configs.append(tuple(parts))
    return configs


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the whole layer suite and every config")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no new measurement starts (default: "
                         f"{DEFAULT_BUDGET_S['cuda']:.0f} on CUDA, {DEFAULT_BUDGET_S['cpu']:.0f} on "
                         "CPU for the quick suite, none for --full; 0 or less: no limit)")
    ap.add_argument("--out", default=None,
                    help="output directory (default: bench/results/)")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated layer names from bench/shapes.py (overrides the suite)")
    ap.add_argument("--providers", default=None, help="comma-separated conv providers")
    ap.add_argument("--modes", default=None, help="comma-separated modes: fwd,bwd,fwd+bwd")
    ap.add_argument("--configs", type=_parse_configs, default=None,
                    help="dtype:layout:operator,... (dtype bf16/fp16/tf32/fp32, layout "
                         "channels_last/nchw, operator linear/cosine/sigmoid/learnable)")
    ap.add_argument("--backend", default=None, choices=("auto", "triton", "reference"),
                    help="backend of the sphereops provider (default: triton on CUDA, auto on CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--no-e2e", action="store_true", help="skip the training-step rows")
    ap.add_argument("--no-linear", action="store_true", help="skip the SphereLinear rows")
    ap.add_argument("--no-criterion", action="store_true", help="skip issue 2's CPU criterion")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--no-graphs", action="store_true",
                    help="CUDA: skip the device-time measurement (calls replayed from a CUDA graph)")
    ap.add_argument("--e2e-graphs", action="store_true",
                    help="CUDA: also capture whole training steps for their device time "
                         "(experimental: failed on torch 2.11, see bench/README.md)")
    ap.add_argument("--target-ms", type=float, default=None,
                    help="wall time per measurement (repeats are chosen to fill it)")
    ap.add_argument("--quiet", action="store_true", help="no per-row progress on stderr")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from . import providers as P
    from . import report
    from . import runner as RN
    from . import shapes as S

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available", file=sys.stderr)
            return 2
        device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())

    budget = args.budget
    if budget is None:
        budget = None if args.full else DEFAULT_BUDGET_S[device.type]
    elif budget <= 0:
        budget = None

    conv_shapes = None
    if args.shapes:
        names = [n.strip() for n in args.shapes.split(",") if n.strip()]
        unknown = [n for n in names if n not in S.BY_NAME]
        if unknown:
            print(f"--shapes: unknown layer(s) {unknown}; known: {sorted(S.BY_NAME)}", file=sys.stderr)
            return 2
        conv_shapes = [S.BY_NAME[n] for n in names]
        if device.type == "cpu":
            conv_shapes = [s.with_batch(min(s.n, 2)) for s in conv_shapes]
    providers = tuple(args.providers.split(",")) if args.providers else P.CONV_PROVIDERS
    bad = [p for p in providers if p not in P.CONV_PROVIDERS]
    if bad:
        print(f"--providers: unknown {bad}; known {P.CONV_PROVIDERS}", file=sys.stderr)
        return 2
    modes = tuple(args.modes.split(",")) if args.modes else S.MODES
    if any(m not in S.MODES for m in modes):
        print(f"--modes: each must be one of {S.MODES}", file=sys.stderr)
        return 2
    if args.configs:
        for dtype, layout, op in args.configs:
            if dtype not in RN.DTYPES or layout not in RN.LAYOUTS or op not in P.BENCH_OPERATORS:
                print(f"--configs: bad item {dtype}:{layout}:{op}", file=sys.stderr)
                return 2

    cfg = RN.RunConfig(device=device, full=args.full, budget_s=budget, providers=providers,
                       modes=modes, compile=not args.no_compile, e2e=not args.no_e2e,
                       linear=not args.no_linear, criterion=not args.no_criterion,
                       conv_shapes=conv_shapes, configs=args.configs,
                       sphereops_backend=args.backend, graphs=not args.no_graphs,
                       e2e_graphs=args.e2e_graphs,
                       target_s=(args.target_ms / 1e3) if args.target_ms else None,
                       verbose=not args.quiet)
    out_dir = Path(args.out) if args.out else RN.REPO_ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {"json": None}

    def save(results):
        if state["json"] is None:
            state["json"] = out_dir / f"{RN.output_stem(results)}.json"
        RN.write_json(results, state["json"])

    run = RN.Runner(cfg, on_progress=save)
    results = run.run()
    save(results)
    paths = report.write_report(results, state["json"], out_dir, make_plot=not args.no_plot)
    print(report.summary_markdown(results))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
