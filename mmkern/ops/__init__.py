"""mmkern's ops as plain Python functions; each is also ``torch.ops.mmkern.<name>``."""

from mmkern.ops.concat_linear import concat_linear
from mmkern.ops.cross_modal_attention import cross_modal_attention, cross_modal_attention_packed
from mmkern.ops.quantize_per_token import dequantize_per_token, fake_quantize_per_token, quantize_per_token
from mmkern.ops.quantized_concat_linear import quantize_and_concat_linear, quantized_concat_linear
from mmkern.ops.quantized_fusion import quantized_fusion

__all__ = [
    "concat_linear",
    "cross_modal_attention",
    "cross_modal_attention_packed",
    "dequantize_per_token",
    "fake_quantize_per_token",
    "quantize_and_concat_linear",
    "quantize_per_token",
    "quantized_concat_linear",
    "quantized_fusion",
]
