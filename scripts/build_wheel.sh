#!/usr/bin/env bash
# Builds mmkern's wheel against the torch of $PYTHON and the CUDA toolkit found (see setup.py), from a
# clean copy of the sources so that the build leaves the working tree alone, and says how long it took.
#
#   scripts/build_wheel.sh [OUT_DIR]          (default: dist/)
#   PYTHON=.venv/bin/python MMKERN_CUDA_ARCH_LIST="8.0;9.0+PTX" MAX_JOBS=4 scripts/build_wheel.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
out=$(mkdir -p "${1:-$root/dist}" && cd "${1:-$root/dist}" && pwd)

sources=$(mktemp -d)
trap 'rm -rf "$sources"' EXIT
tar -C "$root" -cf - --exclude='*.so' --exclude='__pycache__' --exclude='mmkern/_build_config.py' \
    setup.py pyproject.toml MANIFEST.in README.md csrc mmkern | tar -C "$sources" -xf -

echo "building mmkern with $("$python" -c 'import torch; print("torch", torch.__version__)'), " \
     "MMKERN_CUDA_ARCH_LIST=${MMKERN_CUDA_ARCH_LIST:-default}, MAX_JOBS=${MAX_JOBS:-default}"
start=$(date +%s)
"$python" -m pip wheel --quiet --no-build-isolation --no-deps --wheel-dir "$sources/dist" "$sources"
seconds=$(( $(date +%s) - start ))
wheel=$(ls "$sources"/dist/mmkern-*.whl)
mv "$wheel" "$out/"
echo "built $out/$(basename "$wheel") in ${seconds}s"
