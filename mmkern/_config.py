"""Process-wide switches, read once at import.

MMKERN_TRITON_INTERPRET=1 runs mmkern's Triton kernels in Triton's interpreter and routes CPU tensors
to them instead of the C++ CPU kernels, so the GPU code path can be tested on a machine without a
GPU. It sets TRITON_INTERPRET, which Triton reads when a kernel is defined: set it in the
environment before mmkern is imported. The interpreter is slow and its bf16 tl.dot is wrong; test
bf16 on a GPU.

MMKERN_CHECK_SCALES=0 skips the quantized ops' check of their scales' values (see CHECK_SCALES).
"""

import os

TRITON_ON_CPU = os.environ.get("MMKERN_TRITON_INTERPRET", "0") == "1"

# The quantized ops check that their scales are finite and non-negative, which costs a device sync
# per call; MMKERN_CHECK_SCALES=0 skips it in hot loops whose scales are known to be good.
CHECK_SCALES = os.environ.get("MMKERN_CHECK_SCALES", "1") != "0"

if TRITON_ON_CPU:
    os.environ["TRITON_INTERPRET"] = "1"


def _check_interpreter_runs_with_numpy() -> None:
    # Triton before 3.7 reads kernel scalars in its interpreter with int(array), which numpy 2.4
    # refuses: every interpreted kernel would fail with "only 0-dimensional arrays can be converted".
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_version, numpy_version = version("triton"), version("numpy")
    except PackageNotFoundError:
        return
    if tuple(map(int, triton_version.split(".")[:2])) < (3, 7) and tuple(map(int, numpy_version.split(".")[:2])) >= (2, 4):
        raise RuntimeError(
            f"MMKERN_TRITON_INTERPRET=1 needs numpy < 2.4 with Triton {triton_version} (its interpreter "
            f"cannot read scalars under numpy {numpy_version}); run `pip install 'numpy<2.4'` or upgrade Triton"
        )


if TRITON_ON_CPU:
    _check_interpreter_runs_with_numpy()
