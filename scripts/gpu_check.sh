#!/usr/bin/env bash
# The GPU kit: one call on a GPU machine, within KIT_BUDGET seconds (default 530, under 9 minutes),
# that builds for the device's arch only, runs the attention's D=40/Dv=24 experiments, the CUDA tests
# and compute-sanitizer side by side, the tuning sweep (its table then used by what follows), the
# quick preset with device and host time, a profiler summary per op, and the models preset's training
# steps. Each stage has a switch (0 leaves
# it out) and a time limit, cut to what is left of the budget; the last lines printed are a table of
# at most 40 lines. Every log and result is packed into $OUT/gpu-check.tar.gz ($OUT defaults to the
# current folder): bench/ and bench-models/ hold runs for benchmarks/results/, tuned/ the table for
# mmkern/kernels/tuned/. For offline GPU machines that already hold torch: nothing from pip.
#
#   switches: EXPERIMENTS SANITIZE TUNE BENCH PROFILE MODELS (1 by default)
#   limits (s): BUILD_TIMEOUT EXPERIMENTS_TIMEOUT TEST_TIMEOUT SANITIZE_TIMEOUT TUNE_BUDGET BENCH_TIMEOUT
#   PROFILE_TIMEOUT MODELS_TIMEOUT; KIT_RESERVE (15) is kept back for the summary. A stage that finds no time left
#   is skipped, and the summary says so.
set -uo pipefail
PACK=${OUT:-.}
OUT=$(mktemp -d)
PYTHON=${PYTHON:-python3}
trap 'tar czf "$PACK/gpu-check.tar.gz" -C "$OUT" .' EXIT
export PYTHONUNBUFFERED=1
# now: the kit's clock in seconds. KIT_CLOCK names a file whose number stands in for it: the kit's
# tests advance it by each stage's limit, so that their budget arithmetic never waits on a real clock.
now() { if [ -n "${KIT_CLOCK:-}" ]; then cat "$KIT_CLOCK"; else echo "$SECONDS"; fi; }
deadline=$(($(now) + ${KIT_BUDGET:-530}))
summary=()

# limit SECONDS: a stage's limit, cut to what is left of the budget less a reserve for the summary;
# 0 when nothing is left (the stage is then skipped).
limit() {
  local left=$((deadline - $(now) - ${KIT_RESERVE:-15}))
  if [ "$left" -lt 1 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
# run_stage NAME SECONDS LOG COMMAND...: COMMAND under that limit, its output in LOG, its time noted.
run_stage() {
  local name=$1 seconds=$2 log=$3 begin=$(now) code
  shift 3
  if [ "$seconds" = 0 ]; then summary+=("$name: skipped, budget spent"); return 0; fi
  timeout -s INT -k 20 "$seconds" "$@" > "$log" 2>&1
  code=$?
  summary+=("$name: $(($(now) - begin)) s$([ "$code" = 0 ] || echo " (exit $code)")")
  return "$code"
}

arch=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"

MMKERN_CUDA_ARCH_LIST=$arch MAX_JOBS=16 run_stage build "$(limit ${BUILD_TIMEOUT:-200})" "$OUT/build.log" \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . \
  || { tail -40 "$OUT/build.log"; echo "${summary[@]}"; exit 1; }

if [ "${EXPERIMENTS:-1}" = 1 ]; then
  # The attention's D=40/Dv=24 wrong answer: its discriminating experiments, seconds in all.
  run_stage experiments "$(limit ${EXPERIMENTS_TIMEOUT:-60})" "$OUT/experiments.log" \
    "$PYTHON" -m mmkern.bench.attention_experiments
  cat "$OUT/experiments.log"
fi

begin=$(now)
tests_limit=$(limit ${TEST_TIMEOUT:-170})
if [ "$tests_limit" != 0 ]; then
  # SIGINT at the limit: pytest still prints the failures it has seen.
  timeout -s INT -k 20 "$tests_limit" "$PYTHON" -m pytest -q -rf --tb=line -n ${TEST_WORKERS:-8} \
    -p no:cacheprovider --timeout 240 -k "${TEST_SELECT:-cuda}" tests > "$OUT/pytest.log" 2>&1 &
  tests=$!
  if [ "${SANITIZE:-1}" = 1 ]; then
    # SIGABRT at the limit: Python's fault handler prints where each thread was.
    PYTHONFAULTHANDLER=1 timeout -s ABRT -k 20 "$(limit ${SANITIZE_TIMEOUT:-170})" scripts/sanitize.sh \
      "$OUT/sanitizer" > "$OUT/sanitize.out" 2>&1
  fi
  wait $tests
  summary+=("tests$([ "${SANITIZE:-1}" = 1 ] && echo ' and sanitizer'): $(($(now) - begin)) s")
fi

if [ "${TUNE:-1}" = 1 ]; then
  # The sweep stops starting shape classes at its budget; the limit's extra 30 s only catches a hang.
  tune_limit=$(limit $((${TUNE_BUDGET:-90} + 30)))
  run_stage tune "$tune_limit" "$OUT/tune.log" \
    "$PYTHON" -m mmkern.bench.tune --preset "${TUNE_PRESET:-quick}" --budget $((tune_limit > 30 ? tune_limit - 30 : tune_limit / 2))
  mkdir -p "$OUT/tuned" && cp mmkern/kernels/tuned/*.json "$OUT/tuned/" 2>/dev/null
fi
if [ "${BENCH:-1}" = 1 ]; then
  run_stage bench "$(limit ${BENCH_TIMEOUT:-100})" "$OUT/bench.log" \
    "$PYTHON" -m mmkern.bench --preset "${BENCH_PRESET:-quick}" --out "$OUT/bench" --no-plots ${BENCH_ARGS:-}
fi
if [ "${PROFILE:-1}" = 1 ]; then
  run_stage profile "$(limit ${PROFILE_TIMEOUT:-40})" "$OUT/profile.log" \
    "$PYTHON" -m mmkern.bench.profile_ops --out "$OUT/profile"
fi
if [ "${MODELS:-1}" = 1 ]; then
  run_stage models "$(limit ${MODELS_TIMEOUT:-60})" "$OUT/bench-models.log" \
    "$PYTHON" -m mmkern.bench --preset models --out "$OUT/bench-models" --no-plots
fi

# The table: stage times, test failures and tallies, then the benchmark rows and the tuned counts.
(IFS=';'; echo "${summary[*]}")
if [ -f "$OUT/pytest.log" ]; then
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | cut -c1-160 | head -${FAILURE_LINES:-6}
  tail -1 "$OUT/pytest.log"
fi
[ -f "$OUT/sanitize.out" ] && tail -2 "$OUT/sanitize.out"
run=$(ls -d "$OUT"/bench/*/results.json 2>/dev/null | head -1)
table=$(ls "$OUT"/tuned/*.json 2>/dev/null | head -1)
if [ -n "$run" ]; then
  "$PYTHON" -m mmkern.bench.summary "$run" ${table:+--table "$table"} --lines ${SUMMARY_LINES:-28}
elif [ -n "$table" ]; then
  tail -3 "$OUT/tune.log"
fi
