"""mmkern's ops as plain Python functions; each is also ``torch.ops.mmkern.<name>``."""

from mmkern.ops.concat_linear import concat_linear
from mmkern.ops.cross_modal_attention import cross_modal_attention, cross_modal_attention_packed

__all__ = ["concat_linear", "cross_modal_attention", "cross_modal_attention_packed"]
