"""Process-wide switches, read once at import.

MMKERN_TRITON_INTERPRET=1 runs mmkern's Triton kernels in Triton's interpreter and routes CPU tensors
to them instead of the C++ CPU kernels, so the GPU code path can be tested on a machine without a
GPU. It sets TRITON_INTERPRET, which Triton reads when a kernel is defined: set it in the
environment before mmkern is imported. The interpreter is slow and its bf16 tl.dot is wrong; test
bf16 on a GPU.

MMKERN_CHECK_VALUES=1 turns on the ops' checks of their arguments' values on the GPU path (see
value_checks); mmkern.set_value_checks changes it at run time.
"""

import os

TRITON_ON_CPU = os.environ.get("MMKERN_TRITON_INTERPRET", "0") == "1"

# Whether the ops check the values of lengths, offsets and scales, and quantization's input for NaN
# and inf, on the GPU path too: each such check reads the device (a sync), so by default only the C++
# CPU kernels' callers, whose values are on the host already, get them (mmkern.ops._checks.checks_values).
_value_checks = os.environ.get("MMKERN_CHECK_VALUES", "0") == "1"


def value_checks() -> bool:
    return _value_checks


def set_value_checks(enabled: bool) -> bool:
    """Turns the ops' value checks on the GPU path on or off (the MMKERN_CHECK_VALUES switch, at run
    time); returns the previous setting. Checked, a bad length, offset or scale raises a ValueError
    naming it, at the cost of a device sync per check; unchecked, the kernels clamp lengths and
    offsets into the tensors (see the README) and never read outside them."""
    global _value_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous, _value_checks = _value_checks, enabled
    return previous


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
    if tuple(map(int, triton_version.split(".")[:2])) < (3, 7) and tuple(map(int, numpy_version.split(".")[:2])) >= (
        2,
        4,
    ):
        raise RuntimeError(
            f"MMKERN_TRITON_INTERPRET=1 needs numpy < 2.4 with Triton {triton_version} (its interpreter "
            f"cannot read scalars under numpy {numpy_version}); run `pip install 'numpy<2.4'` or upgrade Triton"
        )


if TRITON_ON_CPU:
    _check_interpreter_runs_with_numpy()
