"""``QuantizedFusion``: sum or gated fusion of quantized modality features, with learnable weights
or gate."""

import torch
from torch import nn

from mmkern.nn.backend import UsesBackend
from mmkern.nn.concat_linear import ConcatLinear
from mmkern.ops.quantized_fusion import MODES


class QuantizedFusion(UsesBackend, nn.Module):
    """Fuses ``num_inputs`` same-shape quantized features ``(xq, scale)`` in one pass.

    ``mode="sum"``: ``sum_i weights[i] * dequant(x_i)`` with learnable ``weights`` (initialised to
    ones). ``mode="gated"`` (two inputs): ``g * dequant(x_0) + (1 - g) * dequant(x_1)``,
    ``g = sigmoid(gate_logits)`` per token and channel; the logits are passed to ``forward`` or, when
    ``features`` is given, computed by a learnable ``gate`` projection ``ConcatLinear((features,
    features), features)`` of the two dequantized features (which that float layer needs for its
    own gradients).

    ``forward(*pairs, gate_logits=None)`` takes one ``(xq, scale)`` pair per input (as
    ``mmkern.ops.quantize_per_token`` returns them) and returns ``(*lead, d)`` in ``out_dtype``.
    """

    def __init__(
        self,
        num_inputs: int,
        mode: str = "sum",
        features: int | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if mode == "gated" and num_inputs != 2:
            raise ValueError(f'mode="gated" fuses exactly two inputs, got num_inputs={num_inputs}')
        if num_inputs < 1:
            raise ValueError(f"num_inputs must be at least 1, got {num_inputs}")
        self.num_inputs, self.mode, self.out_dtype = num_inputs, mode, out_dtype
        factory = {"device": device, "dtype": dtype}
        self.weights = nn.Parameter(torch.ones(num_inputs, **factory)) if mode == "sum" else None
        self.gate = ConcatLinear((features, features), features, **factory) if mode == "gated" and features else None

    def forward(self, *pairs, gate_logits: torch.Tensor | None = None) -> torch.Tensor:
        if len(pairs) != self.num_inputs:
            raise ValueError(f"expected {self.num_inputs} (xq, scale) pairs, got {len(pairs)}")
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"inputs[{i}] must be an (xq, scale) pair, got {type(pair).__name__}")
        inputs_q, scales = [q for q, _ in pairs], [s for _, s in pairs]
        if self.mode == "sum":
            if gate_logits is not None:
                raise ValueError('gate_logits are only taken with mode="gated"')
            return self._ops.quantized_fusion(inputs_q, scales, self.weights, out_dtype=self.out_dtype)
        if gate_logits is None:
            if self.gate is None:
                raise ValueError("gated fusion without a gate projection (features=None) needs gate_logits")
            dtype = self.gate.weight.dtype
            gate_logits = self.gate(*(self._ops.dequantize_per_token(q, s, dtype) for q, s in pairs))
        return self._ops.quantized_fusion(inputs_q, scales, mode="gated", gate=gate_logits, out_dtype=self.out_dtype)

    def extra_repr(self) -> str:
        return f"num_inputs={self.num_inputs}, mode={self.mode!r}, out_dtype={self.out_dtype}"
