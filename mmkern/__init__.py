"""mmkern: fused kernels for multimodal models, as PyTorch custom ops under ``torch.ops.mmkern``."""

from mmkern import (
    _config,  # noqa: F401  (must run before anything imports triton)
    _extension,  # noqa: F401  (registers the op schemas and C++ kernels)
    data,
    models,
    nn,
    ops,
    reference,
)
from mmkern._config import set_value_checks
from mmkern._extension import build_info
from mmkern.swap import SwapReport, swap

__version__ = _extension.build_config.VERSION

__all__ = [
    "SwapReport",
    "build_info",
    "data",
    "models",
    "nn",
    "ops",
    "reference",
    "set_value_checks",
    "swap",
    "__version__",
]
