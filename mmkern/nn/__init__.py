"""Drop-in ``nn.Module``s backed by mmkern's ops."""

from mmkern.nn.concat_linear import ConcatLinear
from mmkern.nn.cross_modal_attention import CrossModalAttention

__all__ = ["ConcatLinear", "CrossModalAttention"]
