#!/usr/bin/env bash
# make gpu-check: one prepared run on a GPU machine that has torch and triton preinstalled and no
# package registry.  Installs the project offline, runs the CUDA-marked tests, the quick
# benchmark suite and the profiler, and writes everything into $OUT (else bench/results/).
#
# Wall-time plan (H100/H200, total about 6.5 minutes: run it with a timeout of ~420 s):
#   install ~20 s | gpu tests <= GPU_TESTS_TIMEOUT (150 s) | host overhead <= 40 s | benchmark: what is left of
#   TOTAL_BUDGET_S minus a profiler reserve, enforced inside the benchmark (it stops starting
#   new measurements and says so) and by a hard timeout | opt-in kernel breakdown
#   (GPU_CHECK_BREAKDOWN s, reserved out of the benchmark's share) | profiler <= PROFILE_TIMEOUT (60 s).
#
# Files written (flat, at most 8, so they all come back from a lent machine):
#   <date>_<device>_<commit>.{json,md,png}, gpu_check.log (environment, install, summary),
#   gpu_tests.log, host_overhead.txt (bench.host_overhead: host time per call, cProfile),
#   profile.txt (stdout) and profile.md (the profiler's table; its Chrome traces
#   stay in $PROFILE_DIR, default /tmp/sphereops_profile, since they are usually too large);
#   opt-in: kernel_breakdown.md (GPU_CHECK_BREAKDOWN; with BREAKDOWN_AB_ENV one more run under
#   each of its ';'-separated environments appended), tile_sweep.md (GPU_CHECK_SWEEP),
#   wgrad_probe.txt (GPU_CHECK_PROBE). A lent machine returns 8 files and the default run
#   already writes 8 (with the profiler's two): each opt-in needs one freed --
#   GPU_CHECK_PROFILE=0 frees two, GPU_CHECK_HOST=0 one.
set -u
cd "$(dirname "$0")/.."
REPO="$(pwd)"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$REPO/bench/results}"
mkdir -p "$OUT_DIR"
TOTAL_BUDGET_S="${TOTAL_BUDGET_S:-365}"
GPU_TESTS_TIMEOUT="${GPU_TESTS_TIMEOUT:-150}"
PROFILE_TIMEOUT="${PROFILE_TIMEOUT:-60}"
# GPU_CHECK_BREAKDOWN=<seconds> adds bench.kernel_breakdown after the benchmark (count it in
# TOTAL_BUDGET_S: its seconds plus BREAKDOWN_SLACK_S are taken from the benchmark's budget).
# GPU_CHECK_SWEEP=<seconds> adds bench.tile_sweep after the benchmark (count it in TOTAL_BUDGET_S:
# its seconds plus SWEEP_SLACK_S are taken from the benchmark's budget, like the breakdown's).
# GPU_CHECK_PROBE=<seconds> adds bench.wgrad_probe after the tests (counted in TOTAL_BUDGET_S).
# GPU_CHECK_PROFILE=0 skips the profiler (its table is already committed for this commit's
# kernels, say) and gives its time to the benchmark.
GPU_CHECK_PROFILE="${GPU_CHECK_PROFILE:-1}"
GPU_CHECK_BREAKDOWN="${GPU_CHECK_BREAKDOWN:-0}"
# the layer running when its budget ends finishes (warm-up, autotuning, two profiled passes per
# provider), and the process starts CUDA first: the time it may take past --budget
BREAKDOWN_SLACK_S="${BREAKDOWN_SLACK_S:-30}"
BREAKDOWN_RESERVE=0
[ "$GPU_CHECK_BREAKDOWN" -gt 0 ] && BREAKDOWN_RESERVE=$(( GPU_CHECK_BREAKDOWN + BREAKDOWN_SLACK_S ))
GPU_CHECK_SWEEP="${GPU_CHECK_SWEEP:-0}"
SWEEP_SLACK_S="${SWEEP_SLACK_S:-30}"
SWEEP_RESERVE=0
[ "$GPU_CHECK_SWEEP" -gt 0 ] && SWEEP_RESERVE=$(( GPU_CHECK_SWEEP + SWEEP_SLACK_S ))
[ "$GPU_CHECK_PROFILE" = "0" ] && PROFILE_TIMEOUT=0
PROFILE_DIR="${PROFILE_DIR:-/tmp/sphereops_profile}"
START=$(date +%s)
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"

# The real compiler, never the interpreter; the same FMA contraction on every triton version.
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu-check $(elapsed)s] $*" | tee -a "$LOG"; }

# --- environment -------------------------------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)"
  # a lent machine's copy may carry a stale .git: SPHEREOPS_COMMIT=<hash> (set it in the run
  # command) wins over git
  echo "commit: ${SPHEREOPS_COMMIT:-$(git rev-parse --short=10 HEAD 2>/dev/null || echo "unknown (no .git; set SPHEREOPS_COMMIT)")}"
  git status --porcelain --untracked-files=no 2>/dev/null | head -20 | sed 's/^/dirty: /'
  nvidia-smi 2>&1 | head -25
  "$PY" - <<'EOF' 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", p.multi_processor_count, "mem GiB", round(p.total_memory / 2**30, 1))
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton import failed:", exc)
EOF
} > "$OUT_DIR/env.txt.tmp" 2>&1
grep -E "^(commit|torch|triton|device|cuda available)" "$OUT_DIR/env.txt.tmp"
cat "$OUT_DIR/env.txt.tmp" >> "$LOG"
rm -f "$OUT_DIR/env.txt.tmp"
say "environment written to gpu_check.log"

# --- offline install ---------------------------------------------------------------------
say "pip install --no-build-isolation --no-deps -e ."
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . >> "$LOG" 2>&1; then
  # Fall back to an import path that maps kernels/ to sphereops_kernels without installing.
  say "pip install failed (see log); using PYTHONPATH with a sphereops_kernels link instead"
  SHIM="$(mktemp -d)"
  ln -s "$REPO/kernels" "$SHIM/sphereops_kernels"
  export PYTHONPATH="$REPO:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import sphereops, sphereops_kernels" >> "$LOG" 2>&1; then
  say "WARNING: 'import sphereops, sphereops_kernels' fails (continuing: rows record errors)"
fi

# --- CUDA test tier ----------------------------------------------------------------------
# -rA: the log names every test that passed, not only the failures.
# Kernel compilation (CPU) dominates the tier: with pytest-xdist, GPU_TEST_WORKERS processes
# compile in parallel and share the one GPU (the tier's largest test needs ~10 GB).
GPU_TEST_WORKERS="${GPU_TEST_WORKERS:-4}"
XDIST=()
if [ "$GPU_TEST_WORKERS" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "$GPU_TEST_WORKERS")
fi
say "pytest -m gpu tests ${XDIST[*]} (timeout ${GPU_TESTS_TIMEOUT}s)"
# One fixed config per kernel for the tests (correctness, not speed): autotuning every test's
# specialisation would compile ~7 configs each and overrun the tier's budget.
SPHEREOPS_AUTOTUNE=0 timeout -s INT -k 10 "$GPU_TESTS_TIMEOUT" "$PY" -m pytest -m gpu tests "${XDIST[@]}" --maxfail=25 -q -rA -p no:cacheprovider \
    > "$OUT_DIR/gpu_tests.log" 2>&1
rc=$?
case $rc in
  0) say "gpu tests passed: $(grep -E '[0-9]+ (passed|skipped)' "$OUT_DIR/gpu_tests.log" | tail -1)" ;;
  5) say "no gpu-marked tests collected (tier absent): nothing to run" ;;
  124|130|137) say "gpu tests hit the ${GPU_TESTS_TIMEOUT}s limit (rc $rc)" ;;
  *) say "gpu tests FAILED (rc $rc)" ;;
esac
tail -5 "$OUT_DIR/gpu_tests.log" | tee -a "$LOG"

# --- wgrad probe (opt-in: GPU_CHECK_PROBE=<seconds>) ----------------------------------------
# bench.wgrad_probe: the conv backward's dw on the edge.odd geometry and variants, split into
# its parts against float64 (the GPU-only dw fault of 20261127-1403/1540 and its workaround).
GPU_CHECK_PROBE="${GPU_CHECK_PROBE:-0}"
if [ "$GPU_CHECK_PROBE" -gt 0 ]; then
  say "python -m bench.wgrad_probe --budget $GPU_CHECK_PROBE"
  timeout -s INT -k 5 $(( GPU_CHECK_PROBE + 20 )) "$PY" -m bench.wgrad_probe --budget "$GPU_CHECK_PROBE" \
      > "$OUT_DIR/wgrad_probe.txt" 2>&1
  say "wgrad probe exit code $? (wgrad_probe.txt)"
  cut -c1-120 "$OUT_DIR/wgrad_probe.txt" | tee -a "$LOG"
fi

# --- host overhead (one layer: host time to issue a call, and where it goes) ---------------
# GPU_CHECK_HOST=0 skips it (its numbers are committed for the kernels' launch sequence)
if [ "${GPU_CHECK_HOST:-1}" = "0" ]; then
  say "host overhead skipped (GPU_CHECK_HOST=0)"
else
  say "SPHEREOPS_AUTOTUNE=0 python -m bench.host_overhead (timeout 40s)"
  SPHEREOPS_AUTOTUNE=0 timeout -s INT -k 5 40 "$PY" -m bench.host_overhead > "$OUT_DIR/host_overhead.txt" 2>&1
  say "host overhead exit code $? (host_overhead.txt)"
  head -9 "$OUT_DIR/host_overhead.txt" | tee -a "$LOG"
fi

# --- benchmark (quick suite) -------------------------------------------------------------
left=$(( TOTAL_BUDGET_S - $(elapsed) - PROFILE_TIMEOUT - BREAKDOWN_RESERVE - SWEEP_RESERVE ))
(( left < 60 )) && left=60
bench_budget=$(( left - 25 ))        # measurements stop here; the rest writes the report
say "benchmark: quick suite ${BENCH_ARGS:-}, budget ${bench_budget}s (hard limit ${left}s)"
# BENCH_ARGS: extra benchmark flags (e.g. "--no-e2e" when the e2e rows are already measured)
# shellcheck disable=SC2086
timeout -s INT -k 20 "$left" "$PY" -m bench --budget "$bench_budget" --out "$OUT_DIR" ${BENCH_ARGS:-} \
    > "$OUT_DIR/bench_stdout.txt" 2>> "$LOG"
rc=$?
say "benchmark exit code $rc"
# The summary goes to the log (and the tail of this script's output).
cat "$OUT_DIR/bench_stdout.txt" >> "$LOG"
rm -f "$OUT_DIR/bench_stdout.txt"

# --- kernel breakdown (opt-in: GPU_CHECK_BREAKDOWN=<seconds>) -----------------------------
# Device time of every kernel of the fused SphereConv fwd / bwd next to cuDNN's, per quick-suite
# layer (bench/kernel_breakdown.py): which launch eats the gap the benchmark's ratio shows.
if [ "$GPU_CHECK_BREAKDOWN" -gt 0 ]; then
  # BREAKDOWN_AB_ENV (e.g. "SPHEREOPS_STAGE_INPUT=0"): a second breakdown with that environment,
  # appended to the same file (same layers, same process setup), so one run compares a switch's
  # two sides on the same card. Several environments separated by ';' (e.g.
  # "SPHEREOPS_WGRAD_WRITES_DW=0; SPHEREOPS_FWD_GRID=1"): one more run each, so that switches
  # touching the same kernels are compared one at a time. GPU_CHECK_BREAKDOWN is shared evenly.
  ab_envs=()
  IFS=';' read -r -a ab_split <<< "${BREAKDOWN_AB_ENV:-}"
  for ab in "${ab_split[@]}"; do
    ab="$(echo "$ab" | xargs)"
    [ -n "$ab" ] && ab_envs+=("$ab")
  done
  breakdown_s=$(( GPU_CHECK_BREAKDOWN / (1 + ${#ab_envs[@]}) ))
  say "python -m bench.kernel_breakdown --budget $breakdown_s ${BREAKDOWN_ARGS:-}"
  # BREAKDOWN_ARGS: e.g. "--layers sn9.conv1_x,r18.l1,edge.depthwise --iters 10"
  # shellcheck disable=SC2086
  timeout -s INT -k 10 $(( breakdown_s + 60 )) "$PY" -m bench.kernel_breakdown \
      --budget "$breakdown_s" --out "$OUT_DIR/kernel_breakdown.md" ${BREAKDOWN_ARGS:-} \
      > /dev/null 2>> "$LOG"
  say "kernel breakdown exit code $? (kernel_breakdown.md)"
  for ab in "${ab_envs[@]}"; do
    say "env $ab python -m bench.kernel_breakdown --budget $breakdown_s ${BREAKDOWN_ARGS:-}"
    # shellcheck disable=SC2086
    env $ab timeout -s INT -k 10 $(( breakdown_s + 60 )) "$PY" -m bench.kernel_breakdown \
        --budget "$breakdown_s" --out "$OUT_DIR/kernel_breakdown_ab.md" ${BREAKDOWN_ARGS:-} \
        > /dev/null 2>> "$LOG"
    say "kernel breakdown ($ab) exit code $?"
    if [ -f "$OUT_DIR/kernel_breakdown_ab.md" ]; then
      { echo; echo "# The same with $ab"; echo; cat "$OUT_DIR/kernel_breakdown_ab.md"; } \
        >> "$OUT_DIR/kernel_breakdown.md"
      rm -f "$OUT_DIR/kernel_breakdown_ab.md"
    fi
  done
  # its summary tables into the log (the per-layer tables stay in the file)
  [ -f "$OUT_DIR/kernel_breakdown.md" ] && \
    awk '/^# The same with/ {print; next} /^## Summary/ {p = 1; print; next} /^## / {p = 0} p' \
      "$OUT_DIR/kernel_breakdown.md" | cut -c1-250 | tee -a "$LOG"
fi

# --- tile sweep (opt-in: GPU_CHECK_SWEEP=<seconds>) ---------------------------------------
# Other tiles than the autotuner's, each checked against float64 and timed from CUDA-graph
# replay (bench/tile_sweep.py): for kernel tuning sessions.
if [ "$GPU_CHECK_SWEEP" -gt 0 ]; then
  say "python -m bench.tile_sweep --budget $GPU_CHECK_SWEEP"
  # SWEEP_ARGS: e.g. "--layers r50.l1_reduce,r18.l1 --kernels fwd,fwd_prepass"
  # shellcheck disable=SC2086
  timeout -s INT -k 10 $(( GPU_CHECK_SWEEP + 60 )) "$PY" -m bench.tile_sweep --budget "$GPU_CHECK_SWEEP" \
      --out "$OUT_DIR/tile_sweep.md" ${SWEEP_ARGS:-} > /dev/null 2>> "$LOG"
  say "tile sweep exit code $? (tile_sweep.md)"
fi

# --- profiler ----------------------------------------------------------------------------
if [ "$GPU_CHECK_PROFILE" = "0" ]; then
  say "profiler skipped (GPU_CHECK_PROFILE=0)"
elif "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('sphereops.profile') else 1)" 2>/dev/null; then
  # Same precision/layout/operator as the benchmark's training step, so most Triton kernels it
  # needs are already in triton's on-disk cache; one fixed config per kernel
  # (SPHEREOPS_AUTOTUNE=0): autotuning every new layer shape compiled ~8 configs each and ran
  # past the limit on the first H200 run. The table shows where the step's time goes, with the
  # default tiles (the benchmark rows are the autotuned timings).
  say "SPHEREOPS_AUTOTUNE=0 python -m sphereops.profile --precision bf16 --channels-last --operator linear (timeout ${PROFILE_TIMEOUT}s)"
  mkdir -p "$PROFILE_DIR"
  SPHEREOPS_AUTOTUNE=0 timeout -s INT -k 5 "$PROFILE_TIMEOUT" "$PY" -m sphereops.profile --precision bf16 \
      --channels-last --operator linear --out "$PROFILE_DIR" > "$OUT_DIR/profile.txt" 2>&1
  say "profile exit code $? (profile.txt; traces in $PROFILE_DIR)"
  [ -f "$PROFILE_DIR/profile.md" ] && cp "$PROFILE_DIR/profile.md" "$OUT_DIR/profile.md"
  if [ -n "${OUT:-}" ]; then
    # On a lent machine files over 16 MB do not come back: say so instead of failing silently.
    find "$OUT_DIR" -mindepth 1 -size +15M -print 2>/dev/null | sed 's/^/too large to return: /' | tee -a "$LOG"
  fi
else
  say "sphereops.profile does not exist: skipped"
fi

say "done in $(elapsed)s; files in $OUT_DIR:"
ls -la "$OUT_DIR" | tee -a "$LOG"
# Print the benchmark summary last so it ends up in the visible tail.
json=$(ls -t "$OUT_DIR"/*_*_*.json 2>/dev/null | head -1)
md="${json%.json}.md"
[ -n "$json" ] && [ -f "$md" ] && sed -n '1,80p' "$md"
exit 0
