"""``ConcatLinear``: the drop-in for ``nn.Linear`` applied to ``torch.cat(features, -1)``."""

import math
from collections.abc import Sequence

import torch
from torch import nn

from mmkern.activations import ACTIVATIONS
from mmkern.nn.backend import UsesBackend


class ConcatLinear(UsesBackend, nn.Module):
    """Projects several modalities' features as ``Linear(sum(in_features), out_features)`` over their
    concat, without building it; an optional activation is fused into the kernel.

    ``forward(*inputs)`` takes one tensor per entry of ``in_features``, ``(*lead_i, in_features[i])``,
    leading shapes broadcasting (a pooled ``(B, 1, d)`` vector beside ``(B, L, d)`` tokens is
    projected once per sample). Parameters are ``weight (out_features, sum(in_features))`` and
    ``bias (out_features,)``, named and initialised as in ``nn.Linear``, so state dicts move between
    the two.
    """

    def __init__(
        self,
        in_features: Sequence[int],
        out_features: int,
        bias: bool = True,
        activation: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._set_features(in_features, out_features, activation)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, sum(self.in_features), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def _set_features(self, in_features, out_features, activation):
        in_features = tuple(int(d) for d in in_features)
        if not in_features or any(d < 0 for d in in_features):
            raise ValueError(f"in_features must be a non-empty sequence of widths >= 0, got {in_features}")
        activation = "none" if activation is None else activation
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be None or one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}"
            )
        self.in_features, self.out_features, self.activation = in_features, int(out_features), activation

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, over the whole concatenated fan-in.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, in_features: Sequence[int], activation: str | None = None
    ) -> "ConcatLinear":
        """A ConcatLinear that shares ``linear``'s weight and bias (the same Parameter objects), so
        ``ConcatLinear.from_linear(linear, sizes)(*xs)`` equals ``linear(torch.cat(xs, -1))`` and
        training either trains both."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if sum(in_features) != linear.in_features:
            raise ValueError(
                f"in_features {tuple(in_features)} sum to {sum(in_features)}, "
                f"but linear.in_features is {linear.in_features}"
            )
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._set_features(in_features, linear.out_features, activation)
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.in_features):
            raise ValueError(
                f"expected {len(self.in_features)} inputs (in_features={self.in_features}), got {len(inputs)}"
            )
        for i, (x, width) in enumerate(zip(inputs, self.in_features)):
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[-1] != width:
                raise ValueError(
                    f"inputs[{i}] must have last dim in_features[{i}] = {width}, got shape {tuple(x.shape)}"
                )
        return self._ops.concat_linear(inputs, self.weight, self.bias, activation=self.activation)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation={self.activation!r}"
        )
