"""Loads the compiled extension, whose import registers every op schema and C++ kernel."""

import torch  # loads libc10 and libtorch, which mmkern._C links against

try:
    from mmkern import _C  # noqa: F401
except ImportError as error:
    raise ImportError(
        "mmkern's compiled extension (mmkern._C) is missing or does not load: "
        f"{error}. Build it from the source tree with `pip install --no-build-isolation -e .` "
        "(needs torch installed first), or run `make test` to set everything up."
    ) from error


def build_info() -> dict:
    """What the extension was compiled against: {"torch": "2.14", "cuda": "13.0", "archs": "800,900"}."""
    return dict(item.split("=", 1) for item in torch.ops.mmkern.build_info().split(";"))
