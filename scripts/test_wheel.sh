#!/usr/bin/env bash
# What CI checks of the distributions: the wheel, built here (nvcc, maybe no GPU), installed into a
# fresh virtualenv, imports, reports itself and passes the CPU tests, run from outside the source tree
# so that they see the installed package; the sdist compiles nothing and builds a wheel.
#
#   PYTHON=python3 BUILD_PYTHON=.venv/bin/python scripts/test_wheel.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
build_python=${BUILD_PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

PYTHON=$build_python "$root/scripts/build_wheel.sh" "$work/dist"
wheel=$(ls "$work"/dist/mmkern-*.whl)
case "$(basename "$wheel")" in
  mmkern-*+cu*torch*-cp310-abi3-*.whl|mmkern-*+cputorch*-cp310-abi3-*.whl) ;;
  *) echo "unexpected wheel name: $(basename "$wheel")"; exit 1 ;;
esac

echo "== installing $(basename "$wheel") into a fresh virtualenv"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "$wheel" pytest hypothesis numpy tqdm scikit-learn  # digits, properties
cp -r "$root/tests" "$root/pyproject.toml" "$work/"  # the tests and their pytest settings, no package
cd "$work"
"$work/venv/bin/python" -m mmkern.env
"$work/venv/bin/python" - <<'PY'
import os, sys
import mmkern
assert "site-packages" in mmkern.__file__, f"imported {mmkern.__file__}, not the installed wheel"
assert not os.path.exists(os.path.join(os.path.dirname(mmkern.__file__), "..", "setup.py"))
print("import check: ok,", mmkern.__version__, "from", os.path.dirname(mmkern.__file__))
PY
"$work/venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider tests

echo "== sdist"
"$work/venv/bin/python" -m pip install --quiet build setuptools wheel ninja
# From the working tree itself, whose built extension and build config the sdist must leave out.
start=$(date +%s)
"$work/venv/bin/python" -m build --sdist --no-isolation --outdir "$work/sdist" "$root" > "$work/sdist.log" 2>&1
sdist=$(ls "$work"/sdist/mmkern-*.tar.gz)
echo "built $(basename "$sdist") in $(( $(date +%s) - start ))s"
listing=$(tar -tzf "$sdist")
if grep -E '\.so$|_build_config\.py$|\.o$' <<< "$listing"; then
  echo "the sdist holds build outputs"; exit 1
fi
grep -q 'csrc/cpu/concat_linear.cpp' <<< "$listing" || { echo "the sdist lacks csrc"; exit 1; }
"$work/venv/bin/python" -m pip wheel --quiet --no-build-isolation --no-deps --wheel-dir "$work/from-sdist" "$sdist"
echo "wheel from the sdist: $(basename "$(ls "$work"/from-sdist/*.whl)")"
