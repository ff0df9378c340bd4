"""Drop-in ``nn.Module``s backed by mmkern's ops."""

from mmkern.nn.concat_linear import ConcatLinear

__all__ = ["ConcatLinear"]
