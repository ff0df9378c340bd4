"""mmkern: fused kernels for multimodal models, as PyTorch custom ops under ``torch.ops.mmkern``."""

from mmkern import _config  # noqa: F401  (must run before anything imports triton)
from mmkern import _extension  # noqa: F401  (registers the op schemas and C++ kernels)
from mmkern import data, nn, ops, reference
from mmkern._extension import build_info

__version__ = _extension.build_config.VERSION

__all__ = ["build_info", "data", "nn", "ops", "reference", "__version__"]
