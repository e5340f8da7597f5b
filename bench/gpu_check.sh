#!/usr/bin/env bash
# One prepared GPU check, meant to finish in under 5 minutes on an H100/H200:
#   1. the CUDA cases of the test suite (-k "cuda or on_gpu or fuzz")  -> $OUT/pytest.log
#   2. the quick benchmark                                            -> $OUT/bench.log, $OUT/bench/
#   3. compute-sanitizer memcheck of a small fused fwd+bwd+jvp        -> $OUT/memcheck.log
# then prints a summary table (step, status, seconds) last. Without CUDA every step still runs on the
# CPU (interpreter) and the sanitizer step reports "skipped: no GPU".
#
#   OUT=./gpu-out bash bench/gpu_check.sh          # PYTHON=... picks the interpreter (default: python)
#
# Installs nothing from the network: if fusedad is not importable it is installed editable from this
# checkout with --no-deps (torch and triton must already be there). Step time limits (seconds) can be
# changed with PYTEST_TIMEOUT, BENCH_TIMEOUT, MEMCHECK_TIMEOUT.
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-100}
MEMCHECK_TIMEOUT=${MEMCHECK_TIMEOUT:-45}

steps=() statuses=() seconds=() details=()
record() { steps+=("$1"); statuses+=("$2"); seconds+=("$3"); details+=("$4"); }

status_of() {  # exit code -> PASS / TIMEOUT / FAIL(rc)
  case "$1" in 0) echo PASS ;; 124|137) echo TIMEOUT ;; *) echo "FAIL($1)" ;; esac
}

run_step() {  # name, limit (s), log file, command...
  local name=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  echo "$(status_of $rc) $((SECONDS - start))"
}

# Environment, for the record (card, driver, versions, commit).
{
  date -Is
  git rev-parse HEAD 2>/dev/null && git status --porcelain --untracked-files=no | head -20
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, torch.cuda.is_available())"
} >"$OUT/env.txt" 2>&1

start=$SECONDS
if "$PY" -c "import fusedad.kernels" >/dev/null 2>&1; then
  record install PASS 0 "fusedad importable"
else
  "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
  rc=$?
  record install "$(status_of $rc)" $((SECONDS - start)) "pip install --no-deps -e . ($OUT/install.log)"
fi

# The CUDA-parametrised tests (+ the >2^31-element test and the fuzz, which draws CUDA cases too): the
# CPU cases are CI's job, and every new constexpr specialisation costs a GPU compile here.
# Fewer fuzz examples than CI's 100: every new (dtype, activation, flags, alignment) draw is a compile.
read -r st sec < <(FUSEDAD_HYPOTHESIS_EXAMPLES=${FUSEDAD_HYPOTHESIS_EXAMPLES:-30} run_step pytest "$PYTEST_TIMEOUT" \
  "$OUT/pytest.log" "$PY" -m pytest -x -q -p no:cacheprovider -k "cuda or on_gpu or fuzz" tests)
summary=$(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -n 1)
[ -n "$summary" ] || summary="no pytest summary line (limit ${PYTEST_TIMEOUT}s: PYTEST_TIMEOUT); see $OUT/pytest.log"
record pytest "$st" "$sec" "$summary"

read -r st sec < <(run_step bench "$BENCH_TIMEOUT" "$OUT/bench.log" "$PY" -m bench --quick --out "$OUT/bench" --no-progress)
record bench "$st" "$sec" "$("$PY" - "$OUT/bench/results.json" <<'PYEOF' 2>/dev/null || echo "no results.json"
import collections, json, sys
rows = json.load(open(sys.argv[1]))["rows"]
count = collections.Counter(r["status"].split(":")[0] for r in rows)
bad = sum(1 for r in rows if r["impl"] == "fusedad" and r["status"] != "ok")
print(f"{len(rows)} rows: " + ", ".join(f"{n} {s}" for s, n in sorted(count.items())) + f"; fusedad not ok: {bad}")
PYEOF
)"

has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ "$has_cuda" != 1 ]; then
  read -r st sec < <(run_step memcheck "$MEMCHECK_TIMEOUT" "$OUT/memcheck.log" "$PY" bench/sanitize_case.py)
  record memcheck "skipped: no GPU" "$sec" "case on the CPU interpreter without sanitizer: $st"
elif [ -z "$sanitizer" ]; then
  record memcheck "skipped: no compute-sanitizer" 0 "not on PATH nor in /usr/local/cuda*/bin"
else
  # No caching allocator: memcheck then sees each tensor's own bounds, not a pooled block around it.
  read -r st sec < <(PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step memcheck "$MEMCHECK_TIMEOUT" "$OUT/memcheck.log" \
    "$sanitizer" --tool memcheck --error-exitcode 1 --leak-check no "$PY" bench/sanitize_case.py)
  record memcheck "$st" "$sec" "$(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -n 1)"
fi

echo
echo "== gpu_check summary ($(date -Is), logs in $OUT/)"
printf '%-9s %-30s %7s  %s\n' step status seconds detail
failed=0
for i in "${!steps[@]}"; do
  printf '%-9s %-30s %7s  %s\n' "${steps[$i]}" "${statuses[$i]}" "${seconds[$i]}" "${details[$i]}"
  case "${statuses[$i]}" in PASS|skipped*) ;; *) failed=1 ;; esac
done
exit $failed
