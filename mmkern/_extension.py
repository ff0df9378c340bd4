"""Loads the compiled extension, whose import registers every op schema and C++ kernel, once the
build is known to match the running torch, CUDA and GPUs (mmkern/_build_check.py)."""

import torch  # loads libc10 and libtorch, which mmkern._C links against

from mmkern._build_check import check_build_matches_runtime, load_error, not_built_error
from mmkern._gpus import visible_gpus

try:
    from mmkern import _build_config as build_config
except ImportError:
    raise not_built_error() from None

check_build_matches_runtime(
    build_config, torch.__version__, torch.version.cuda, visible_gpus() if build_config.CUDA_TARGETS else []
)

try:
    from mmkern import _C  # noqa: F401
except ImportError as error:
    raise load_error(build_config, error) from error


def build_info() -> dict:
    """What the extension was compiled against, as the binary reports it:
    {"torch": "2.14", "cuda": "13.0", "archs": "800,900"} (the archs nvcc compiled, PTX or not)."""
    return dict(item.split("=", 1) for item in torch.ops.mmkern.build_info().split(";"))
