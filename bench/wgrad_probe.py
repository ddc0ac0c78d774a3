"""Probe of the conv backward's dw path on one GPU: ``python -m bench.wgrad_probe``.

Written for the ``edge.odd`` fault (H200, 20261127-1403: dw relative error 1.4 on 37x29x33x33
-> 61, 5x5, padding 4, dilation 2, bf16 channels_last, while y, dx and db were right and the
interpreter gets dw right). For that geometry and variants of it (layout, dtype, batch, channel
counts, filter, wgrad tile, split count) it runs ``sphere_conv2d_bwd`` and splits dw's error
into its parts, each against float64:

* ``gemm``: the wgrad partials summed over the splits vs ``sum_m Hn[m, o] x_patch[m, ci, tap]``;
* ``S`` (the reduction of the prep pass's partials) and ``r_w`` (the filter norms);
* ``dw``: the finalize pass's result;

and, for the GEMM, where the error sits (worst tap, output channel, input channel, split).
One line per variant. Needs CUDA.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

EPS = 1e-4
BASE = dict(n=37, cin=29, cout=61, hw=33, k=5, pad=4, dil=2, dtype="bf16", cl_x=True, cl_w=True,
            c_scratch=False, tile=None, split=None, runtime_div="auto")
# The first H200 run (20261127-1540, before _wgrad_runtime_div) found every variant with C_out
# and C_in both off a multiple of 16, channels_last x, and a 64x32 tile wrong; the 32x32 image,
# NCHW x, C_out=64, C_in=32 and the 128x128 and 16x16 tiles right. "constexpr divisors" re-runs
# the old build to show the fault is still there and the runtime divisors are what avoid it.
VARIANTS = [
    ("base (edge.odd)", {}),
    ("constexpr divisors (old build)", dict(runtime_div=False)),
    ("c_scratch (autograd's path)", dict(c_scratch=True)),
    ("x NCHW", dict(cl_x=False)),
    ("fp16", dict(dtype="fp16")),
    ("fp32", dict(dtype="fp32")),
    ("n=2", dict(n=2)),
    ("cin=32", dict(cin=32)),
    ("cout=64 (constexpr divisors)", dict(cout=64)),
    ("pad=2 dil=1", dict(pad=2, dil=1)),
    ("k=3 pad=1 dil=1", dict(k=3, pad=1, dil=1)),
    ("hw=32", dict(hw=32)),
    ("split=1", dict(split=1)),
    ("tile 64x64xBM64 s3", dict(tile=(64, 64, 64, 3))),
    ("tile 128x128xBM64 s3", dict(tile=(128, 128, 64, 3))),
    ("constexpr, tile 128x128xBM64", dict(runtime_div=False, tile=(128, 128, 64, 3))),
    ("constexpr, x NCHW", dict(runtime_div=False, cl_x=False)),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


def probe(cfg: dict, seed: int = 0, device: str = "cuda") -> dict:
    from sphereops import reference as R
    import sphereops_kernels.conv_bwd as CB

    dev = torch.device(device)
    dtype = DTYPES[cfg["dtype"]]
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, cin, cout, hw, k, pad, dil = (cfg[key] for key in
                                     ("n", "cin", "cout", "hw", "k", "pad", "dil"))
    x = torch.randn(n, cin, hw, hw, generator=g).to(dev, dtype)
    w = torch.randn(cout, cin, k, k, generator=g).to(dev, dtype)
    if cfg["cl_x"]:
        x = x.contiguous(memory_format=torch.channels_last)
    if cfg["cl_w"]:
        w = w.contiguous(memory_format=torch.channels_last)
    geo = ((1, 1), (pad, pad), (dil, dil))
    x64, w64 = x.double(), w.double()
    _, c64, rx64 = R.conv2d_forward(x64, w64, None, None, *geo, 1, "linear", EPS)
    c = c64.to(dtype).contiguous(memory_format=torch.channels_last)
    r_x = rx64.float()
    dy = torch.randn(c.shape, generator=g).to(dev, dtype)
    dy = dy.contiguous(memory_format=torch.channels_last)

    captured = {}
    orig_finalize, orig_config, orig_split = CB._finalize_dw, CB.wgrad_config, CB._wgrad_split
    orig_div, orig_writes = CB._WGRAD_RUNTIME_DIV, CB.WGRAD_WRITES_DW

    def finalize(w_part, w_, r_w, s_sum, split, rtne):
        captured.update(w_part=w_part.clone(), r_w=r_w.clone(), s_sum=s_sum.clone(), split=split)
        return orig_finalize(w_part, w_, r_w, s_sum, split, rtne)

    try:
        CB._finalize_dw = finalize
        CB.WGRAD_WRITES_DW = False   # the partials go through _finalize_dw, which keeps them
        CB._WGRAD_RUNTIME_DIV = cfg["runtime_div"]
        if cfg["tile"] is not None:
            bo, bci, bm, st = cfg["tile"]
            CB.wgrad_config = lambda *a, **kw: dict(orig_config(*a, **kw), BLOCK_O=bo,
                                                    BLOCK_CI=bci, BLOCK_M=bm, num_warps=4,
                                                    num_stages=st)
        if cfg["split"] is not None:
            CB._wgrad_split = lambda *a, **kw: cfg["split"]
        c_arg = c.clone()
        dx, dw, db, _ = CB.sphere_conv2d_bwd(dy, x, w, None, c_arg, r_x, *geo, 1, "linear", EPS,
                                             c_scratch=cfg["c_scratch"])
        if dev.type == "cuda":
            torch.cuda.synchronize()
    finally:
        CB._finalize_dw, CB.wgrad_config, CB._wgrad_split = orig_finalize, orig_config, orig_split
        CB._WGRAD_RUNTIME_DIV, CB.WGRAD_WRITES_DW = orig_div, orig_writes

    # float64 truth from the same c and r_x
    dy64, c64s = dy.double(), c.double()
    rx = r_x.double()
    dx_ref, dw_ref, db_ref, _ = R.conv2d_backward(dy64, x64, w64, None, c64s, rx, *geo, 1,
                                                  "linear", EPS)
    h_unit, _, s_ref, _ = R._grad_terms(dy64, c64s.clone(), rx, 1, "linear", None, False, True,
                                        False, None)
    rw_ref = R.filter_norms(w64, EPS)
    # im2col: X [M, cin*k*k] (ci-major, tap-minor as unfold gives), Hn [M, cout]
    cols = F.unfold(x64, k, dilation=dil, padding=pad)            # [n, cin*k*k, L]
    xm = cols.transpose(1, 2).reshape(-1, cin * k * k)
    hm = h_unit.permute(0, 2, 3, 1).reshape(-1, cout)
    gemm_ref = (hm.t() @ xm).reshape(cout, cin, k * k).permute(2, 0, 1)   # [taps, cout, cin]
    part = captured["w_part"].double()                              # [split, taps, cout, cin]
    gemm = part.sum(0)
    err = (gemm - gemm_ref).abs()
    scale = gemm_ref.abs().max().clamp_min(1e-30)
    split = captured["split"]
    m_total = hm.shape[0]
    per_split = -(-m_total // split)
    bm = (cfg["tile"] or (0, 0, 32 if dtype == torch.float32 else 64, 0))[2]
    per_split = -(-per_split // bm) * bm
    split_err = []
    for s in range(split):
        rows = slice(s * per_split, min((s + 1) * per_split, m_total))
        ref_s = (hm[rows].t() @ xm[rows]).reshape(cout, cin, k * k).permute(2, 0, 1)
        split_err.append(float((part[s] - ref_s).abs().max() / scale))
    return dict(
        runtime_div=(CB._wgrad_runtime_div(cout) if cfg["runtime_div"] == "auto"
                     else cfg["runtime_div"]),
        dw=_rel(dw, dw_ref), dx=_rel(dx, dx_ref), db=_rel(db, db_ref),
        gemm=_rel(gemm, gemm_ref), S=_rel(captured["s_sum"], s_ref),
        r_w=_rel(captured["r_w"], rw_ref),
        split=split,
        worst_tap=int(err.amax(dim=(1, 2)).argmax()), worst_o=int(err.amax(dim=(0, 2)).argmax()),
        worst_ci=int(err.amax(dim=(0, 1)).argmax()),
        bad_taps=int((err.amax(dim=(1, 2)) / scale > 0.05).sum()),
        bad_o=int((err.amax(dim=(0, 2)) / scale > 0.05).sum()),
        bad_ci=int((err.amax(dim=(0, 1)) / scale > 0.05).sum()),
        bad_splits=[i for i, e in enumerate(split_err) if e > 0.05][:12],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated variant-name prefixes")
    ap.add_argument("--budget", type=float, default=120.0)
    ap.add_argument("--device", default="cuda",
                    help="cuda, or cpu under TRITON_INTERPRET=1 (small variants)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("wgrad_probe needs CUDA (or --device cpu with TRITON_INTERPRET=1)")
        return 2
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {name} torch {torch.__version__}")
    start = time.time()
    for name, change in VARIANTS:
        if args.only and not any(name.startswith(p) for p in args.only.split(",")):
            continue
        if time.time() - start > args.budget:
            print(f"{name}: skipped (budget)")
            continue
        cfg = dict(BASE, **change)
        try:
            r = probe(cfg, device=args.device)
            print(f"{name:30s} rtdiv {int(r['runtime_div'])} dw {r['dw']:.2e} gemm {r['gemm']:.2e} S {r['S']:.2e} r_w {r['r_w']:.2e} "
                  f"dx {r['dx']:.2e} db {r['db']:.2e} | split {r['split']} worst tap/o/ci "
                  f"{r['worst_tap']}/{r['worst_o']}/{r['worst_ci']} bad taps/o/ci "
                  f"{r['bad_taps']}/{r['bad_o']}/{r['bad_ci']} bad splits {r['bad_splits']}", flush=True)
        except Exception as exc:  # one variant's failure must not hide the others
            print(f"{name:30s} ERROR {type(exc).__name__}: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
