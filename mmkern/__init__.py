"""mmkern: fused kernels for multimodal models, as PyTorch custom ops under ``torch.ops.mmkern``.

``import mmkern`` loads the ops, their kernels' registration and the nn modules; the application layer
(``mmkern.data``, ``mmkern.models``, and the training and benchmark code behind them) loads on first
use, so a model that only takes the kernels pays nothing for it."""

import importlib

from mmkern import (
    _config,  # noqa: F401  (must run before anything imports triton)
    _extension,  # noqa: F401  (registers the op schemas and C++ kernels)
    nn,
    ops,
    reference,
)
from mmkern._config import set_value_checks
from mmkern._extension import build_info, cpu_isa, set_cpu_isa
from mmkern.swap import SwapReport, swap

__version__ = _extension.build_config.VERSION

_ON_FIRST_USE = ("data", "models")

__all__ = [
    "SwapReport",
    "build_info",
    "cpu_isa",
    "data",
    "models",
    "nn",
    "ops",
    "reference",
    "set_cpu_isa",
    "set_value_checks",
    "swap",
    "__version__",
]


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        module = importlib.import_module(f"mmkern.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'mmkern' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_ON_FIRST_USE))
