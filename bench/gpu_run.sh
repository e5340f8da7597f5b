#!/usr/bin/env bash
# The GPU timing protocol in one command: every check and timing a GPU session needs, sized for a session's
# device time (about 15 minutes, start-up included): at most 350 s of steps on one H100, compiles included,
# so it can run twice in one session.
#
#   OUT=/path/to/out bash bench/gpu_run.sh          # on the GPU machine (PYTHON=... picks the interpreter)
#   OUT=/tmp/dry bash bench/gpu_run.sh --dry-run    # anywhere: the same plan on the CPU through Triton's
#                                                   # interpreter at tiny shapes (< 2 min on 2 cores; CI runs it)
#
# Steps, each under its own `timeout` (seconds; env overrides), a failed step never stopping the next:
#   setup             record the environment; `pip install --no-deps --no-build-isolation -e .` unless fusedad is
#                     already installed (editable) from this checkout. Installs nothing from the network.   10
#   pytest            the CUDA correctness subset: pytest -q -x -k "cuda or on_gpu or fuzz" (the [cuda]-parametrised
#                     cases, the GPU-only tests, the fuzz with 20 examples); -n 8 when pytest-xdist is there
#                     (compiles dominate: 8 workers compile in parallel). PYTEST_LIMIT                      65
#   backward          python -m bench --suite backward: fusedad's backward variants (variants.use), eager autograd
#                     and the GEMM floor; M=256 (4096->8192) and M=8192 (4096->14336) x gelu gelu_tanh silu
#                     relu none, bf16; CUDA-graph replays at M=256. BACKWARD_LIMIT                          65
#   forward           python -m bench --suite forward: every applicable forward variant (variants.use) vs F.linear
#                     and eager F.linear + act (gelu_tanh, none), bf16, no_grad; M=8192 (4096->4096,
#                     4096->14336, 14336->4096), M=256 (4096->8192), decode M=1 and 16 (8192->8192) with a
#                     device copy of the weight (decode GB/s as % of it). FORWARD_LIMIT                     55
#   train             python -m bench --suite layers --phase fwd+bwd: the Linear+act train step, fusedad vs eager
#                     vs torch.compile (default mode), M=256 and M=8192 as backward, gelu_tanh relu, graphs at
#                     M=256. TRAIN_LIMIT                                                                    55
#   mlp               python -m bench --suite mlp --impl fusedad: one MLP block's fwd+bwd (gated SwiGLU, plain GELU),
#                     fusedad.nn.GatedMLP / MLP vs eager nn.Linear+act(+mul), M=8192 and M=256 (Llama-8B: K=4096,
#                     I=14336), bf16, time and bytes saved for backward; torch.compile not run (its compiles
#                     would not fit). MLP_LIMIT                                                              40
#   memcheck          compute-sanitizer --tool memcheck of bench/sanitize_case.py (fwd+bwd+jvp, M=67 K=101 N=83,
#                     fp32/bf16 x relu/gelu_tanh), the default backward variant. MEMCHECK_LIMIT              30
#   memcheck-alt-bwd  the same with every non-default backward variant (--bwd-variant others). MEMCHECK_ALT_LIMIT 20
#   overhead          python -m bench.overhead: per-call host overhead vs nn.Linear. OVERHEAD_LIMIT           10
#   lm-head           python -m bench --suite lm-head --phase fwd fwd+bwd --impl fusedad: the LM head's loss
#                     (M=8192, K=4096, V=128256, bf16), fusedad vs eager (and PyTorch's chunked path where the
#                     torch has it), time and max_memory_allocated. LM_HEAD_LIMIT                           40
#   model             python -m bench --suite model --impl fusedad: one training step of a Llama-style causal LM
#                     built from a config (two Llama-8B layers: hidden 4096, intermediate 14336; vocab 128256;
#                     8192 tokens; bf16), fusedad.convert vs unconverted: fused fraction of linear FLOPs, bytes
#                     saved for backward, largest tensor, loss, time. MODEL_LIMIT                           45
# TOTAL_LIMIT (350) caps the sum (the step limits add up to 435: the last steps, lm-head and model, get what is
# left): a step gets at most what is left of it (minus 10 s), or is recorded as
# "skipped (no time left)". Timing: ROUNDS (5) interleaved rounds of triton.testing.do_bench medians over
# REP_MS (20) ms each; FUSEDAD_AUTOTUNE defaults to 0 here (heuristic tile configs: every variant on the same
# tiles, no timing search inside the limits; export FUSEDAD_AUTOTUNE=1 to tune, at ~4x the kernel compiles).
#
# Dry run (--dry-run, or no GPU): the same steps on the CPU at tiny shapes (1 round); pytest and both memcheck
# steps are recorded "skipped (no GPU)" (pytest's [cuda] cases exist only where CUDA is), torch.compile is not
# run in the train step (inductor's CPU compile takes ~60 s per case on 2 cores), and a `sanitize-cpu` step runs
# the sanitizer's case on the interpreter for both backward variants instead.
#
# Output: at most 9 flat files in $OUT (default <repo>/gpu-out, git-ignored): summary.md (printed last: figure
# tables, then the step table), summary.json, pytest.log, steps.log (setup, bench, overhead output),
# memcheck.log, backward.json, forward.json, train.json and lm_head.json (python -m bench's results.json). Exit status 1 if a step is
# neither PASS nor skipped. bench/NOTES.md, "GPU protocol (bench/gpu_run.sh)", lists every figure it prints.
set -u
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -u$/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/gpu_run.sh: unknown option $arg (--dry-run, --help)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$(dirname "$0")/../gpu-out}  # a relative OUT is the caller's; the default is <repo>/gpu-out (git-ignored)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.."
REPO=$(pwd)

FILES=(summary.md summary.json pytest.log steps.log memcheck.log backward.json forward.json train.json lm_head.json)
for f in "${FILES[@]}"; do rm -f "$OUT/$f"; done
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
# The script decides these per step (an inherited TRITON_INTERPRET would make CUDA timings meaningless).
unset TRITON_INTERPRET FUSEDAD_POISON_OUTPUTS
export FUSEDAD_AUTOTUNE=${FUSEDAD_AUTOTUNE:-0} PYTHONUNBUFFERED=1
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT

if nvidia-smi -L >/dev/null 2>&1; then HAS_GPU=1; else HAS_GPU=0; fi
if [ "$DRY" = 1 ] && [ "$HAS_GPU" = 1 ]; then SKIP="skipped (dry run)"; else SKIP="skipped (no GPU)"; fi
if [ "$DRY" = 0 ] && [ "$HAS_GPU" = 0 ]; then
  echo "bench/gpu_run.sh: no GPU (nvidia-smi -L fails): running the dry-run plan instead"
  DRY=1
fi

if [ "$DRY" = 1 ]; then  # CPU: the interpreter is slow and CI machines are shared; the 2-minute aim is not a limit
  TOTAL_LIMIT=${TOTAL_LIMIT:-750} SETUP_LIMIT=${SETUP_LIMIT:-60} BACKWARD_LIMIT=${BACKWARD_LIMIT:-200}
  FORWARD_LIMIT=${FORWARD_LIMIT:-150} TRAIN_LIMIT=${TRAIN_LIMIT:-150} SANITIZE_CPU_LIMIT=${SANITIZE_CPU_LIMIT:-120}
  OVERHEAD_LIMIT=${OVERHEAD_LIMIT:-60} LM_HEAD_LIMIT=${LM_HEAD_LIMIT:-120} MLP_LIMIT=${MLP_LIMIT:-120}
  MODEL_LIMIT=${MODEL_LIMIT:-120}
  DEV=cpu ROUNDS=${ROUNDS:-1} REP_MS=${REP_MS:-0}
  SHAPES="8x32x64 64x64x128" GRAPH_M=8 TRAIN_IMPLS="fusedad"
else
  # The step limits (435 s) exceed TOTAL_LIMIT: the last steps get what is left (estimates until a GPU run
  # measures them: bench/NOTES.md).
  TOTAL_LIMIT=${TOTAL_LIMIT:-350} SETUP_LIMIT=${SETUP_LIMIT:-10} PYTEST_LIMIT=${PYTEST_LIMIT:-65}
  BACKWARD_LIMIT=${BACKWARD_LIMIT:-65} FORWARD_LIMIT=${FORWARD_LIMIT:-55} TRAIN_LIMIT=${TRAIN_LIMIT:-55}
  MEMCHECK_LIMIT=${MEMCHECK_LIMIT:-30} MEMCHECK_ALT_LIMIT=${MEMCHECK_ALT_LIMIT:-20} OVERHEAD_LIMIT=${OVERHEAD_LIMIT:-10}
  LM_HEAD_LIMIT=${LM_HEAD_LIMIT:-40} MLP_LIMIT=${MLP_LIMIT:-40} MODEL_LIMIT=${MODEL_LIMIT:-45}
  DEV=cuda ROUNDS=${ROUNDS:-5} REP_MS=${REP_MS:-20}
  SHAPES="256x4096x8192 8192x4096x14336" GRAPH_M=256 TRAIN_IMPLS="fusedad compile"
fi
TRAIN_ACTS=${TRAIN_ACTS:-gelu_tanh relu}
PYTEST_K=${PYTEST_K:-cuda or on_gpu or fuzz}

STEPS=$SCRATCH/steps.tsv
: >"$STEPS"
T0=$SECONDS

record() {  # name status seconds limit log note
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$STEPS"
  printf '  %-17s %-26s %4s s\n' "$1" "$2" "$3"
}

run_step() {  # name limit log note -- command...: runs it under `timeout`, appends its output to $OUT/log
  local name=$1 limit=$2 log=$3 note=$4
  shift 4
  local left=$((TOTAL_LIMIT - (SECONDS - T0) - 10))
  if [ "$left" -lt 5 ]; then
    echo "---- $name: skipped, no time left of TOTAL_LIMIT=${TOTAL_LIMIT}s" >>"$OUT/$log"
    record "$name" "skipped (no time left)" 0 "$limit" "$log" "$note"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  { printf '==== %s (limit %s s, %s)\n$' "$name" "$limit" "$(date -Is)"; printf ' %q' "$@"; echo; } >>"$OUT/$log"
  local start=$SECONDS
  # SIGTERM first (python -m bench and the pytest wrapper turn it into KeyboardInterrupt: what finished is
  # kept and the traceback shows where it was), SIGKILL 10 s later.
  timeout -k 10 "$limit" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  local status
  case $rc in 0) status=PASS ;; 124|137) status="TIMEOUT (${limit} s)" ;; *) status="FAIL (rc $rc)" ;; esac
  echo "---- $name: $status after $((SECONDS - start)) s" >>"$OUT/$log"
  record "$name" "$status" $((SECONDS - start)) "$limit" "$log" "$note"
}

# -- environment ---------------------------------------------------------------------------------------
{
  echo "date: $(date -Is)"
  if [ "$DRY" = 1 ]; then echo "mode: dry run (CPU, Triton interpreter, tiny shapes; CUDA-only steps $SKIP)"
  else echo "mode: GPU"; fi
  echo "command: OUT=$OUT bash bench/gpu_run.sh $*"
  echo "FUSEDAD_AUTOTUNE=$FUSEDAD_AUTOTUNE (0: heuristic tile configs)"
  echo "limits: total ${TOTAL_LIMIT}s; rounds $ROUNDS x do_bench ${REP_MS} ms"
  echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified"
  echo "host: $(uname -srm), $(nproc 2>/dev/null) CPUs, python $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1)"
  if [ "$HAS_GPU" = 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
      --format=csv 2>&1 | sed 's/^/gpu: /'
  fi
  command -v compute-sanitizer 2>/dev/null
} >"$SCRATCH/env.txt" 2>&1
{ echo "==== env"; cat "$SCRATCH/env.txt"; } >>"$OUT/steps.log"
echo "bench/gpu_run.sh: $(sed -n 's/^mode: //p' "$SCRATCH/env.txt"); output in $OUT"

# -- setup: fusedad importable from this checkout (no network) -----------------------------------------
# (Asked from outside the checkout: its own fusedad.egg-info would answer otherwise.)
if (cd "$SCRATCH" && "$PY" - "$REPO" >/dev/null 2>&1) <<'PYEOF'
import importlib.metadata as md, json, pathlib, sys
url = json.loads(md.distribution("fusedad").read_text("direct_url.json") or "{}")
editable = url.get("dir_info", {}).get("editable")
sys.exit(0 if editable and url.get("url") == pathlib.Path(sys.argv[1]).resolve().as_uri() else 1)
PYEOF
then
  echo "==== setup: fusedad is installed (editable) from this checkout" >>"$OUT/steps.log"
  record setup PASS 0 "$SETUP_LIMIT" steps.log "fusedad installed (editable) from this checkout"
else
  run_step setup "$SETUP_LIMIT" steps.log "pip install --no-deps --no-build-isolation -e ." \
    "$PY" -m pip install --no-deps --no-build-isolation --no-input -e .
fi

# -- 1. the CUDA correctness subset of the test suite --------------------------------------------------
PYTEST_MAIN='import signal, sys, pytest; signal.signal(signal.SIGTERM, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))'
if [ "$DRY" = 1 ]; then
  echo "==== pytest: $SKIP: would run pytest -q -x -k \"$PYTEST_K\" tests" >"$OUT/pytest.log"
  record pytest "$SKIP" 0 0 pytest.log "the [cuda] cases exist only where CUDA is; CI runs the CPU ones"
else
  WORKERS=${PYTEST_WORKERS:-8}
  "$PY" -c "import xdist" >/dev/null 2>&1 || WORKERS=0
  XDIST=()
  [ "$WORKERS" -gt 0 ] && XDIST=(-n "$WORKERS")
  run_step pytest "$PYTEST_LIMIT" pytest.log "workers ${WORKERS}" \
    env FUSEDAD_HYPOTHESIS_EXAMPLES="${FUSEDAD_HYPOTHESIS_EXAMPLES:-20}" \
    "$PY" -c "$PYTEST_MAIN" -q -x -p no:cacheprovider -k "$PYTEST_K" --durations=15 -rfE "${XDIST[@]}" tests
fi

# -- 2. the backward suite -----------------------------------------------------------------------------
# shellcheck disable=SC2086  # word splitting of SHAPES / TRAIN_* is intended
run_step backward "$BACKWARD_LIMIT" steps.log "" \
  "$PY" -m bench --suite backward --device "$DEV" --rounds "$ROUNDS" --rep-ms "$REP_MS" \
  --out "$SCRATCH/backward" --no-plots --no-progress
[ -f "$SCRATCH/backward/results.json" ] && cp "$SCRATCH/backward/results.json" "$OUT/backward.json"

# -- 3. the forward variants: fusedad's forward kernel variants vs F.linear and eager Linear+act ---------
run_step forward "$FORWARD_LIMIT" steps.log "" \
  "$PY" -m bench --suite forward --device "$DEV" --rounds "$ROUNDS" --rep-ms "$REP_MS" \
  --out "$SCRATCH/forward" --no-plots --no-progress
[ -f "$SCRATCH/forward/results.json" ] && cp "$SCRATCH/forward/results.json" "$OUT/forward.json"

# -- 4. the Linear+act train step: fusedad vs eager vs torch.compile ------------------------------------
TRAIN_NOTE=""
[ "$DRY" = 1 ] && TRAIN_NOTE="torch.compile not run in the dry run (inductor's CPU compile: ~60 s per case)"
# shellcheck disable=SC2086
run_step train "$TRAIN_LIMIT" steps.log "$TRAIN_NOTE" \
  "$PY" -m bench --suite layers --phase fwd+bwd --dtype bf16 --device "$DEV" --activation $TRAIN_ACTS \
  --shape $SHAPES --impl $TRAIN_IMPLS --graph-max-m "$GRAPH_M" --rounds "$ROUNDS" --rep-ms "$REP_MS" \
  --out "$SCRATCH/train" --no-plots --no-progress
[ -f "$SCRATCH/train/results.json" ] && cp "$SCRATCH/train/results.json" "$OUT/train.json"

# -- 4b. one MLP block's training step: fusedad's fused blocks vs eager (time, bytes saved for backward) ----
run_step mlp "$MLP_LIMIT" steps.log "torch.compile not run (its compiles would not fit the limit)" \
  "$PY" -m bench --suite mlp --impl fusedad --device "$DEV" --rounds "$ROUNDS" --rep-ms "$REP_MS" \
  --out "$SCRATCH/mlp" --no-plots --no-progress

# -- 5. compute-sanitizer memcheck, the default and the other backward variants -------------------------
if [ "$DRY" = 1 ]; then
  echo "==== memcheck: $SKIP" >>"$OUT/memcheck.log"
  record memcheck "$SKIP" 0 0 memcheck.log "compute-sanitizer needs a GPU; see sanitize-cpu"
  record memcheck-alt-bwd "$SKIP" 0 0 memcheck.log "compute-sanitizer needs a GPU; see sanitize-cpu"
  run_step sanitize-cpu "$SANITIZE_CPU_LIMIT" memcheck.log "the memcheck case without a sanitizer: both bwd variants, bf16 gelu_tanh" \
    "$PY" bench/sanitize_case.py --device cpu --smoke --bwd-variant default others
else
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
    /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  if [ -z "$SANITIZER" ]; then
    echo "==== memcheck: no compute-sanitizer on PATH nor in /usr/local/cuda*/bin" >>"$OUT/memcheck.log"
    record memcheck "skipped (no compute-sanitizer)" 0 0 memcheck.log ""
    record memcheck-alt-bwd "skipped (no compute-sanitizer)" 0 0 memcheck.log ""
  else
    # No caching allocator: memcheck then sees each tensor's own bounds, not a pooled block around it.
    for which in default others; do
      if [ "$which" = default ]; then name=memcheck limit=$MEMCHECK_LIMIT; else name=memcheck-alt-bwd limit=$MEMCHECK_ALT_LIMIT; fi
      run_step "$name" "$limit" memcheck.log "" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool memcheck --error-exitcode 1 --leak-check no \
        "$PY" bench/sanitize_case.py --device cuda --bwd-variant "$which"
    done
  fi
fi

# -- 6. per-call overhead -------------------------------------------------------------------------------
OVERHEAD_ARGS=()
[ "$DRY" = 1 ] && OVERHEAD_ARGS=(--rounds 3 --calls 20)  # the CPU's eager path: exercised, not measured
run_step overhead "$OVERHEAD_LIMIT" steps.log "" \
  "$PY" -m bench.overhead --device "$DEV" "${OVERHEAD_ARGS[@]}" --json "$SCRATCH/overhead.json"

# -- 7. the LM head's loss: fused linear + cross-entropy vs eager (last: the largest allocations) ---------
run_step lm-head "$LM_HEAD_LIMIT" steps.log "" \
  "$PY" -m bench --suite lm-head --phase fwd fwd+bwd --impl fusedad --device "$DEV" --rounds "$ROUNDS" \
  --rep-ms "$REP_MS" --out "$SCRATCH/lm_head" --no-plots --no-progress
[ -f "$SCRATCH/lm_head/results.json" ] && cp "$SCRATCH/lm_head/results.json" "$OUT/lm_head.json"

# -- 8. a Llama-style model's training step: fusedad.convert vs unconverted (the console table in steps.log) --
run_step model "$MODEL_LIMIT" steps.log "torch.compile not run" \
  "$PY" -m bench --suite model --impl fusedad --device "$DEV" --rounds "$ROUNDS" --rep-ms "$REP_MS" \
  --out "$SCRATCH/model" --no-plots --no-progress

# -- summary --------------------------------------------------------------------------------------------
for f in "${FILES[@]}"; do  # the device tool takes back files of at most 16 MiB: keep a log's head and tail
  p="$OUT/$f"
  if [ -f "$p" ] && [ "$(wc -c <"$p")" -gt 15000000 ]; then
    { head -c 1000000 "$p"; printf '\n\n[... cut by bench/gpu_run.sh: the file was over 15 MB ...]\n\n'
      tail -c 13000000 "$p"; } >"$SCRATCH/cut" && mv "$SCRATCH/cut" "$p"
  fi
done
echo
DRY_FLAG=()
[ "$DRY" = 1 ] && DRY_FLAG=(--dry-run)
"$PY" -m bench.protocol report --out "$OUT" --steps "$STEPS" --env "$SCRATCH/env.txt" \
  --overhead "$SCRATCH/overhead.json" "${DRY_FLAG[@]}"
rc=$?
if [ "$rc" -gt 1 ] || [ ! -f "$OUT/summary.md" ]; then  # the report itself failed: the bare step table
  echo "bench.protocol report failed (rc $rc); the steps:"
  printf '%-17s %-26s %6s %6s  %s\n' step status s limit note
  while IFS=$'\t' read -r name status sec limit log note; do
    printf '%-17s %-26s %6s %6s  %s (%s)\n' "$name" "$status" "$sec" "$limit" "$note" "$log"
  done <"$STEPS"
  rc=1
fi
exit "$rc"
