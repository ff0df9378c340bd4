#!/usr/bin/env bash
# compute-sanitizer's memcheck, racecheck and initcheck over scripts/sanitize_workload.py, which runs
# every mmkern GPU kernel once. Writes one log per tool and summary.md into the folder given
# (default: benchmarks/sanitizer/<UTC time>-<GPU>) and exits non-zero if any tool reports an error.
#
# PyTorch's caching allocator is switched off: with it, an access past a tensor's end lands in the
# same pooled block and memcheck cannot see it, and a reused block looks initialised to initcheck.
set -uo pipefail
PYTHON=${PYTHON:-python3}
SANITIZER=${COMPUTE_SANITIZER:-compute-sanitizer}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
out=${1:-benchmarks/sanitizer/$(date -u +%Y-%m-%dT%H%M%SZ)-$(echo "$gpu" | tr ' A-Z' '-a-z' | tr -cd 'a-z0-9-')}
mkdir -p "$out"

# A first run outside the sanitizer compiles the Triton kernels into the cache, so that the
# sanitized runs time launches, not compilation. Its mismatches fail the run, after the sanitizers.
"$PYTHON" scripts/sanitize_workload.py > "$out/workload.log" 2>&1
workload=$?
echo "workload: exit $workload, $(grep -h 'checks passed' "$out/workload.log")" | tee "$out/summary.txt"

for tool in memcheck racecheck initcheck; do
  extra=()
  [ "$tool" = memcheck ] && extra=(--leak-check full)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" "${extra[@]}" --error-exitcode 9 --print-limit 100 \
    "$PYTHON" scripts/sanitize_workload.py > "$out/$tool.log" 2>&1
  code=$?
  echo "$tool: exit $code, $(grep -h 'ERROR SUMMARY\|RACECHECK SUMMARY\|checks passed' "$out/$tool.log" | tr '\n' ' ')"
done | tee -a "$out/summary.txt"
status=$workload
grep -q "exit [^0]" "$out/summary.txt" && status=1

{
  echo "# compute-sanitizer over scripts/sanitize_workload.py"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- device: $gpu, driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
  echo "- $("$SANITIZER" --version | grep -i version | head -1)"
  echo "- $("$PYTHON" -c 'import torch, triton, mmkern; print(f"torch {torch.__version__}, Triton {triton.__version__}, mmkern {mmkern.__version__}")')"
  echo
  sed 's/^/- /' "$out/summary.txt"
} > "$out/summary.md"
rm "$out/summary.txt"
cat "$out/summary.md"
exit $status
