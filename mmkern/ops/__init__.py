"""mmkern's ops as plain Python functions; each is also ``torch.ops.mmkern.<name>``."""

from mmkern.ops.concat_linear import concat_linear

__all__ = ["concat_linear"]
