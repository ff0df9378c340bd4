#!/usr/bin/env bash
# One call on a GPU machine: build for its arch, run the CUDA tests and compute-sanitizer side by
# side, then (with BENCH=1) a benchmark preset. The last lines printed are the summary; every log
# and result is packed into $OUT/gpu-check.tar.gz ($OUT defaults to the current folder). For
# offline GPU machines that already hold torch: no virtualenv, nothing from pip.
set -uo pipefail
PACK=${OUT:-.}
OUT=$(mktemp -d)
PYTHON=${PYTHON:-python3}
trap 'tar czf "$PACK/gpu-check.tar.gz" -C "$OUT" .' EXIT
export PYTHONUNBUFFERED=1
arch=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

start=$SECONDS
MMKERN_CUDA_ARCH_LIST=$arch MAX_JOBS=16 timeout ${BUILD_TIMEOUT:-300} \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - start)) s"

start=$SECONDS
# SIGINT at the limit: pytest still prints the failures it has seen.
timeout -s INT -k 20 ${TEST_TIMEOUT:-420} "$PYTHON" -m pytest -q -rf --tb=line -n ${TEST_WORKERS:-8} \
  -p no:cacheprovider --timeout 240 -k "${TEST_SELECT:-cuda}" tests > "$OUT/pytest.log" 2>&1 &
tests=$!
# SIGABRT at the limit: Python's fault handler prints where each thread was.
PYTHONFAULTHANDLER=1 timeout -s ABRT -k 20 ${SANITIZE_TIMEOUT:-400} scripts/sanitize.sh "$OUT/sanitizer" \
  > "$OUT/sanitize.out" 2>&1
wait $tests
echo "tests: $((SECONDS - start)) s"

if [ "${BENCH:-0}" = 1 ]; then
  timeout ${BENCH_TIMEOUT:-300} "$PYTHON" -m mmkern.bench --preset "${BENCH_PRESET:-quick}" --out "$OUT/bench" \
    --no-plots ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  tail -30 "$OUT/bench.log"
fi

grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | cut -c1-220 | head -${FAILURE_LINES:-40}
tail -2 "$OUT/pytest.log"
tail -5 "$OUT/sanitizer/workload.log"
tail -8 "$OUT/sanitize.out"
