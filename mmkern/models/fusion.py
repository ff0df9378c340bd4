"""Fusion of two modalities into one vector per sample, by name."""

import torch
from torch import nn

from mmkern.models.blocks import TransformerBlock, mean_over_lengths
from mmkern.nn import ConcatLinear, GatedFusion

FUSIONS = ("concat", "sum", "product", "gated", "attention", "quantized")


class QuantizedConcatProjection(ConcatLinear):
    """A ``ConcatLinear`` trained with quantization in the loop: features per token and weight per
    output channel are rounded to int8 and multiplied on int8 units
    (``mmkern.ops.quantize_and_concat_linear``), gradients passing straight through the rounding."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._ops.quantize_and_concat_linear(inputs, self.weight, self.bias, activation=self.activation)


class PairFusion(nn.Module):
    """``forward(first, second)`` of two encoders' outputs ``(tokens, lengths, pooled)`` -> ``(B, dim)``.

    - ``concat``: ``gelu(W [p1, p2] + b)``, the concat never built.
    - ``sum``: ``gelu(W1 p1 + b1) + gelu(W2 p2 + b2)``.
    - ``product``: ``(W1 p1 + b1) * (W2 p2 + b2)``.
    - ``gated``: the gated multimodal unit (``mmkern.nn.GatedFusion``).
    - ``attention``: the second modality's tokens attend to the first's (within their lengths),
      are averaged over the second's valid tokens, and are projected with the first's pooled vector.
    - ``quantized``: ``concat`` with int8 features and weight (``QuantizedConcatProjection``).
    """

    def __init__(self, kind: str, dim: int, heads: int = 4):
        super().__init__()
        if kind not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(map(repr, FUSIONS))}, got {kind!r}")
        self.kind = kind
        if kind in ("concat", "attention"):
            self.project = ConcatLinear([dim, dim], dim, activation="gelu")
        elif kind == "quantized":
            self.project = QuantizedConcatProjection([dim, dim], dim, activation="gelu")
        elif kind == "gated":
            self.project = GatedFusion([dim, dim], dim)
        else:
            activation = "gelu" if kind == "sum" else "none"
            self.first = ConcatLinear([dim], dim, activation=activation)
            self.second = ConcatLinear([dim], dim, activation=activation)
        if kind == "attention":
            self.cross_attention = TransformerBlock(dim, heads, context_dim=dim)

    def forward(self, first: tuple, second: tuple) -> torch.Tensor:
        first_tokens, first_lens, first_pooled = first
        second_tokens, second_lens, second_pooled = second
        if self.kind == "sum":
            return self.first(first_pooled) + self.second(second_pooled)
        if self.kind == "product":
            return self.first(first_pooled) * self.second(second_pooled)
        if self.kind == "attention":
            attended = self.cross_attention(second_tokens, second_lens, first_tokens, first_lens)
            second_pooled = mean_over_lengths(attended, second_lens)
        return self.project(first_pooled, second_pooled)
