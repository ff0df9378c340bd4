"""``GatedFusion``: the gated multimodal unit, its gate and projections on concat_linear."""

from collections.abc import Sequence

import torch
from torch import nn

from mmkern.nn.concat_linear import ConcatLinear


class GatedFusion(nn.Module):
    """The gated multimodal unit (Arevalo et al., 2017), for any number of modalities:
    ``h_i = tanh(W_i x_i + b_i)``, gates ``z = softmax_i(W_z [x_1, ..., x_n] + b_z)`` per output
    channel (for two modalities, ``z_1 = sigmoid`` of the logits' difference, the paper's unit),
    and ``out = sum_i z_i * h_i``.

    The gate reads the concat of every modality's features through one ``ConcatLinear`` (never built
    in memory); each projection is a one-input ``ConcatLinear``. ``forward(*inputs)`` takes
    ``(*lead_i, in_features[i])`` tensors whose leading shapes broadcast and returns
    ``(*lead, out_features)``.
    """

    def __init__(self, in_features: Sequence[int], out_features: int, device=None, dtype=None):
        super().__init__()
        in_features = tuple(int(d) for d in in_features)
        if len(in_features) < 2:
            raise ValueError(f"GatedFusion fuses at least two modalities, got in_features={in_features}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.projections = nn.ModuleList(ConcatLinear([d], out_features, **factory) for d in in_features)
        self.gate = ConcatLinear(in_features, len(in_features) * out_features, **factory)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.in_features):
            raise ValueError(
                f"expected {len(self.in_features)} inputs (in_features={self.in_features}), got {len(inputs)}"
            )
        gates = torch.softmax(self.gate(*inputs).unflatten(-1, (len(inputs), self.out_features)), dim=-2)
        projected = torch.stack(
            torch.broadcast_tensors(*(torch.tanh(p(x)) for p, x in zip(self.projections, inputs))), dim=-2
        )
        return (gates * projected).sum(-2)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
