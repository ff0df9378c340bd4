"""The eager composition of every mmkern op in plain PyTorch: the ground truth for tests and the
baseline for benchmarks. Written for clarity, not speed."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "none": lambda z: z,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}


def concat_linear(inputs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None,
                  *, activation: str = "none") -> torch.Tensor:
    """act(F.linear(cat([x.expand(*lead, d_x) for x in inputs], -1), weight, bias))."""
    lead = torch.broadcast_shapes(*(x.shape[:-1] for x in inputs))
    concat = torch.cat([x.expand(*lead, x.shape[-1]) for x in inputs], dim=-1)
    return ACTIVATIONS[activation](F.linear(concat, weight, bias))
