#!/usr/bin/env bash
# The GPU run: one bounded command from a source checkout on PYTHONPATH (the project is not installed).
#
#   bash benchmarks/run_gpu.sh [--budget SECONDS]      on a GPU machine (default budget 480 s for everything)
#   bash benchmarks/run_gpu.sh --rehearse [--budget S]  the same steps on this CPU: small problems, Triton's
#                                                       interpreter, the CPU native build (default budget 210 s
#                                                       after the build, which may take minutes uncached)
#
# Steps, in order, each with its output in $OUT/logs/NN-<step>.log and its exit status in $OUT/steps.tsv; a step
# that fails or runs out of time never stops the next:
#   1 versions    the device and the stack (benchmarks/gpu_run.py versions)
#   2 build       the native extension as the package builds it on first use: seconds, or why it failed
#   3 tests       pytest -m gpu -rs, a time limit per test, never stopping at the first failure; junit XML
#   4 precompile  Triton's kernels of M and H (python -m ik_fast.tools.bench --precompile)
#   5 bench       M and H, training step, providers reference, torch, triton, native, escnn, IEEE then TF32
#   6 bench-3xtf32  M and H, training step, the fused providers (triton, native) in 3xTF32: what "highest" runs as
#   7 sweep       the edge sweeps of M and H (then P, which is skipped without its QM9 data), while time is left
#   8 table       a short table of everything above
# The budget is wall-clock from the start: each step has a deadline (a share of the budget, the rest to the next
# step when it ends early), and a benchmark case still running at its deadline is stopped (its process killed).
# Every results file (ik_fast.records: commit, versions, GPU name) is written to $OUT/results/ the moment it is
# written to the checkout's benchmarks/results/. $OUT defaults to build/gpu-run/<time>.
#
# Environment: OUT, IK_FAST_PYTHON (the interpreter; default python3, or in the rehearsal .venv/bin/python, else a
# venv of the dependencies only, made once in ~/.cache/ik_fast), IK_FAST_COMMIT / IK_FAST_DIRTY (the commit, where the
# tree has no .git), IK_FAST_CACHE (the first-use build's cache). On a lent GPU machine without a package index:
#   source .device-wheels/setup.sh .device-wheels && IK_FAST_COMMIT=<sha> bash benchmarks/run_gpu.sh
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

REHEARSE=0
BUDGET=
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) REHEARSE=1 ;;
    --budget) BUDGET=${2:?--budget needs a number of seconds}; shift ;;
    --budget=*) BUDGET=${1#--budget=} ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_gpu.sh: unknown argument '$1' (--rehearse, --budget SECONDS, --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$BUDGET" ]; then BUDGET=$([ $REHEARSE = 1 ] && echo 210 || echo 480); fi
case "$BUDGET" in ''|*[!0-9]*) echo "run_gpu.sh: --budget must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac

# ---- the interpreter -----------------------------------------------------------------------------------------------
# The rehearsal's dependencies (not the project): the CPU build of torch and the pins of scripts/run.sh
rehearsal_venv() {
  local base=${PYTHON:-python3} reqs key venv t0
  reqs='torch==2.13.0|numpy>=1.24,<2|scipy>=1.10,<1.15|autograd|joblib|pymanopt|requests|triton>=3.6,<3.10|pytest>=8|ninja|setuptools>=64|torch_geometric>=2.5,<2.9'
  key=$(printf '%s %s' "$reqs" "$("$base" -c 'import sys; print(sys.version)')" | sha256sum | cut -c1-12)
  venv=${IK_FAST_REHEARSAL_VENV:-$HOME/.cache/ik_fast/rehearsal-venv-$key}
  if [ ! -f "$venv/.complete" ]; then
    echo "run_gpu.sh: making a venv of the dependencies (not the project) in $venv" >&2
    t0=$(date +%s)
    rm -rf "$venv" && "$base" -m venv "$venv" >&2 || return 1
    local pip=("$venv/bin/python" -m pip --disable-pip-version-check -q) req
    IFS='|' read -r -a req <<< "$reqs"
    # torch first and pinned (an unpinned one pulls a multi-GB CUDA build); escnn without py3nj (a Fortran build)
    { "${pip[@]}" install "torch==2.13.0" && "${pip[@]}" install "${req[@]}" &&
      "${pip[@]}" install --no-deps "escnn==1.0.11" "lie_learn==0.0.2"; } >&2 || return 1
    touch "$venv/.complete"
    echo "run_gpu.sh: the venv took $(( $(date +%s) - t0 )) s" >&2
  fi
  echo "$venv/bin/python"
}
if [ -n "${IK_FAST_PYTHON:-}" ]; then
  PY=$IK_FAST_PYTHON
elif [ $REHEARSE = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then
  PY=$ROOT/.venv/bin/python
elif [ $REHEARSE = 1 ]; then
  PY=$(rehearsal_venv) || { echo "run_gpu.sh: could not make the rehearsal's venv" >&2; exit 1; }
else
  PY=python3
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export PYTHONWARNINGS=${PYTHONWARNINGS:-"ignore::UserWarning:escnn.group.groups.so3group"}

# ---- what runs where ----------------------------------------------------------------------------------------------
if [ $REHEARSE = 1 ]; then
  DEVICE=cpu
  export TRITON_INTERPRET=1 IK_FAST_TEST_DEVICE=cpu
  OUT=${OUT:-$ROOT/build/gpu-rehearsal/$(date -u +%Y%m%dT%H%M%SZ)}
  # the results root stands in for the checkout's benchmarks/results (rehearsal numbers are not measurements)
  export IK_FAST_RESULTS_DIR=$OUT/checkout-results
  MAIN=tiny@16,tiny@24          # stand-ins for M and H: their code paths on graphs the interpreter runs in seconds
  SWEEP=tiny@12,tiny@20
  PRECOMPILE=tiny
  PER_TEST=60 PER_CASE=60 REPEATS=1
  # percent of the budget at which build, tests and precompile must have ended; in the rehearsal the budget counts
  # from the build's end (a first-use build with no cache takes minutes on 2 cores: it gets up to 10 minutes)
  SHARES="10 65 72"
else
  DEVICE=cuda
  export IK_FAST_TEST_DEVICE=cuda   # the gpu-marked tests fail, not skip, where CUDA does not work
  OUT=${OUT:-$ROOT/build/gpu-run/$(date -u +%Y%m%dT%H%M%SZ)}
  MAIN=M,H
  SWEEP=$("$PY" -c 'from ik_fast.tools.problems import sweep_problems; print(",".join(sweep_problems("gpu")))' || echo M@313),P
  PRECOMPILE=M,H
  PER_TEST=60 PER_CASE=90 REPEATS=5
  # the first-use CPU+CUDA build took 674 s on 2 busy cores here (16 there, 7 files in parallel); the tests end by
  # half the budget, so that the build and test records are on $OUT within 4 minutes of the default budget
  SHARES="40 50 55"
fi
PROVIDERS=reference,torch,triton,native,escnn
mkdir -p "$OUT/logs" "$OUT/results" || exit 1
START=$(date +%s)
T_BEGIN=$START
read -r BUILD_END TESTS_END PRE_END <<< "$(for s in $SHARES; do echo -n "$(( START + BUDGET * s / 100 )) "; done)"
END=$(( START + BUDGET - 20 ))   # the last 20 s: the table, and the grace of a killed step
printf 'step\tstatus\tseconds\tlimit_s\n' > "$OUT/steps.tsv"
echo "run_gpu.sh: $([ $REHEARSE = 1 ] && echo rehearsal || echo GPU run), budget ${BUDGET} s, python $PY, out $OUT"

# seconds left until a deadline, less 5 (the process's own start and end), at least 1
until_() { local s=$(( $1 - $(date +%s) - 5 )); [ $s -lt 1 ] && s=1; echo $s; }

n=0
# step NAME DEADLINE CMD...: run CMD until DEADLINE (Unix time; at least 10 s) with its output on the terminal and in
# its log, and record its status (124: stopped at its deadline)
step() {
  local name=$1 deadline=$2 t0 limit rc
  shift 2
  n=$((n + 1))
  t0=$(date +%s)
  limit=$(( deadline - t0 )); [ $limit -lt 10 ] && limit=10
  local log
  log=$OUT/logs/$(printf '%02d' $n)-$name.log
  echo
  echo "== $n $name (until +$(( t0 + limit - START )) s of ${BUDGET} s) : $*"
  { echo "\$ $*"; timeout -k 15 "$limit" "$@" 2>&1; echo "$?" > "$log.rc"; } | tee "$log"
  rc=$(cat "$log.rc" 2>/dev/null) && rm -f "$log.rc"
  echo "== $name: exit status ${rc:-?} after $(( $(date +%s) - t0 )) s" | tee -a "$log"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "== $name: stopped at its time limit (${limit} s)" | tee -a "$log"
  printf '%s\t%s\t%s\t%s\n' "$name" "${rc:-?}" "$(( $(date +%s) - t0 ))" "$limit" >> "$OUT/steps.tsv"
  return "${rc:-1}"
}

step versions $(( START + 60 )) "$PY" benchmarks/gpu_run.py versions --device $DEVICE
[ $REHEARSE = 1 ] && BUILD_END=$(( START + 600 ))
step build "$BUILD_END" "$PY" benchmarks/gpu_run.py build --device $DEVICE --copy-to "$OUT/results"
BUILD_RC=$?
if [ $REHEARSE = 1 ]; then  # the budget from here
  START=$(date +%s)
  read -r _ TESTS_END PRE_END <<< "$(for s in $SHARES; do echo -n "$(( START + BUDGET * s / 100 )) "; done)"
  END=$(( START + BUDGET - 20 ))
fi
SELECT=(-m gpu)
if [ $BUILD_RC != 0 ]; then
  # a failed build would be tried again by every process that asks for the native backend: leave it out
  PROVIDERS=reference,torch,triton,escnn
  SELECT=(-m gpu -k "not native")
  echo "== the native build failed: native left out of the tests and the benchmarks (see logs/02-build.log)"
fi
step tests "$TESTS_END" "$PY" benchmarks/gpu_run.py tests --device $DEVICE --per-test $PER_TEST \
  --deadline "$TESTS_END" --out-dir "$OUT/tests" --copy-to "$OUT/results" -- tests "${SELECT[@]}" -rs -v
step precompile "$PRE_END" "$PY" -m ik_fast.tools.bench --precompile --problems $PRECOMPILE --device $DEVICE \
  --precision ieee,high,tf32x3 --budget-s "$(until_ "$PRE_END")" --copy-to "$OUT/results"
step bench "$END" "$PY" -m ik_fast.tools.bench --problems "$MAIN" --providers $PROVIDERS --modes train --device $DEVICE \
  --precision ieee,high --repeats $REPEATS --timeout $PER_CASE --budget-s "$(until_ "$END")" \
  --name gpu --copy-to "$OUT/results"
FUSED_PROVIDERS=$(echo "$PROVIDERS" | tr ',' '\n' | grep -E '^(triton|native)$' | paste -sd, -)
step bench-3xtf32 "$END" "$PY" -m ik_fast.tools.bench --problems "$MAIN" --providers "$FUSED_PROVIDERS" --modes train \
  --device $DEVICE --precision tf32x3 --repeats $REPEATS --timeout $PER_CASE --budget-s "$(until_ "$END")" \
  --name gpu-3xtf32 --copy-to "$OUT/results"
step sweep "$END" "$PY" -m ik_fast.tools.bench --problems "$SWEEP" --providers $PROVIDERS --modes train --device $DEVICE \
  --repeats $REPEATS --timeout $PER_CASE --budget-s "$(until_ "$END")" --name gpu-sweep \
  --copy-to "$OUT/results"
step table $(( START + BUDGET + 30 )) "$PY" benchmarks/gpu_run.py table "$OUT/results"

echo
echo "== steps: $(( $(date +%s) - T_BEGIN )) s in all, budget ${BUDGET} s$([ $REHEARSE = 1 ] && echo " after the build"); logs in $OUT/logs"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
# the files every run must leave (a step that wrote none failed before its first result)
missing=0
for f in "compile/*/*-native-build.json" "test/*/*-gpu-tests.json" "compile/*/*-precompile.json" \
         "timing/*/*-gpu.json"; do
  # shellcheck disable=SC2086
  ls "$OUT"/results/$f > /dev/null 2>&1 || { echo "== missing: \$OUT/results/$f"; missing=1; }
done
[ -f "$OUT/tests/gpu-tests.xml" ] || { echo "== missing: \$OUT/tests/gpu-tests.xml"; missing=1; }
# exit status 0 only when every step ended by itself with status 0 (a failed test, a failed build or a step stopped
# at its deadline make it 1; their results are on $OUT all the same) and every file above is there
awk -F'\t' 'NR > 1 && $2 != 0 { bad = 1 } END { exit bad }' "$OUT/steps.tsv" && [ $missing = 0 ]
