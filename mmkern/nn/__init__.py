"""Drop-in ``nn.Module``s backed by mmkern's ops."""

from mmkern.nn.concat_linear import ConcatLinear
from mmkern.nn.cross_modal_attention import CrossModalAttention
from mmkern.nn.quantized_concat_linear import QuantizedConcatLinear
from mmkern.nn.quantized_fusion import QuantizedFusion

__all__ = ["ConcatLinear", "CrossModalAttention", "QuantizedConcatLinear", "QuantizedFusion"]
