"""Drop-in ``nn.Module``s backed by mmkern's ops."""

from mmkern.nn.backend import BACKENDS, set_backend
from mmkern.nn.concat_linear import ConcatLinear
from mmkern.nn.cross_modal_attention import CrossModalAttention
from mmkern.nn.gated_fusion import GatedFusion
from mmkern.nn.quantized_concat_linear import QuantizedConcatLinear
from mmkern.nn.quantized_fusion import QuantizedFusion

__all__ = [
    "BACKENDS",
    "ConcatLinear",
    "CrossModalAttention",
    "GatedFusion",
    "QuantizedConcatLinear",
    "QuantizedFusion",
    "set_backend",
]
