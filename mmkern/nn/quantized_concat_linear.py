"""``QuantizedConcatLinear``: ``ConcatLinear`` with an int8 weight, fed float or int8 features."""

from collections.abc import Sequence

import torch
from torch import nn

from mmkern.nn.backend import UsesBackend
from mmkern.nn.concat_linear import ConcatLinear


class QuantizedConcatLinear(UsesBackend, nn.Module):
    """``Linear(sum(in_features), out_features)`` over the concat of several modalities' features,
    with the weight stored as int8 with one scale per output channel (``weight_q``, ``weight_scale``
    buffers: a quarter of float32's memory) and the product on int8 tensor cores.

    ``forward(*inputs)`` takes one entry per segment, each either a float tensor
    ``(*lead_i, in_features[i])``, quantized per token on the way in, or an already quantized
    ``(xq, scale)`` pair as ``mmkern.ops.quantize_per_token`` returns it (cached encoder features);
    leading shapes broadcast as in ``ConcatLinear``. While gradients are being recorded and a float
    input requires grad, the inputs go through ``mmkern.ops.quantize_and_concat_linear``: the same
    int8 forward, with straight-through gradients for the float inputs and the bias (the int8
    weight is frozen). The output is in the float inputs' dtype, or ``out_dtype`` when every input
    comes quantized.
    """

    def __init__(
        self,
        in_features: Sequence[int],
        out_features: int,
        bias: bool = True,
        activation: str | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        super().__init__()
        # nn.Linear's initialisation, through ConcatLinear, then quantized.
        self._copy_from(
            ConcatLinear(in_features, out_features, bias=bias, activation=activation, device=device), out_dtype
        )

    def _copy_from(self, concat_linear: ConcatLinear, out_dtype: torch.dtype) -> None:
        self.in_features, self.out_features = concat_linear.in_features, concat_linear.out_features
        self.activation, self.out_dtype = concat_linear.activation, out_dtype
        weight = concat_linear.weight.detach()
        weight_q, weight_scale = self._ops.quantize_per_token(
            weight.float() if weight.dtype == torch.float64 else weight
        )
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale.view(-1))
        bias = concat_linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())

    @classmethod
    def from_float(
        cls, concat_linear: ConcatLinear, out_dtype: torch.dtype = torch.bfloat16
    ) -> "QuantizedConcatLinear":
        """A copy of ``concat_linear`` with its weight quantized per output channel."""
        if not isinstance(concat_linear, ConcatLinear):
            raise TypeError(f"concat_linear must be an mmkern.nn.ConcatLinear, got {type(concat_linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._copy_from(concat_linear, out_dtype)
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._ops.dequantize_per_token(self.weight_q, self.weight_scale[:, None], dtype)

    def forward(self, *inputs) -> torch.Tensor:
        if len(inputs) != len(self.in_features):
            raise ValueError(
                f"expected {len(self.in_features)} inputs (in_features={self.in_features}), got {len(inputs)}"
            )
        floats = [x for x in inputs if isinstance(x, torch.Tensor)]
        for i, (x, width) in enumerate(zip(inputs, self.in_features)):
            if not isinstance(x, torch.Tensor) and not (isinstance(x, (tuple, list)) and len(x) == 2):
                raise TypeError(f"inputs[{i}] must be a float tensor or an (xq, scale) pair, got {type(x).__name__}")
            shape = x.shape if isinstance(x, torch.Tensor) else x[0].shape
            if len(shape) > 0 and shape[-1] != width:
                raise ValueError(f"inputs[{i}] must have last dim in_features[{i}] = {width}, got shape {tuple(shape)}")
        out_dtype = floats[0].dtype if floats else self.out_dtype
        if torch.is_grad_enabled() and any(x.requires_grad for x in floats):
            features = [
                x if isinstance(x, torch.Tensor) else self._ops.dequantize_per_token(*x, out_dtype) for x in inputs
            ]
            bias = None if self.bias is None else self.bias.to(out_dtype)
            return self._ops.quantize_and_concat_linear(
                features, self.dequantized_weight(out_dtype), bias, activation=self.activation
            )
        pairs = [self._ops.quantize_per_token(x) if isinstance(x, torch.Tensor) else tuple(x) for x in inputs]
        return self._ops.quantized_concat_linear(
            [q for q, _ in pairs],
            [s for _, s in pairs],
            self.weight_q,
            self.weight_scale,
            self.bias,
            activation=self.activation,
            out_dtype=out_dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"activation={self.activation!r}, weight=int8 per output channel"
        )
