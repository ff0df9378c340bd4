"""Boolean masks in the form the attention kernel adds to its scores."""

import torch


def hiding_bias(hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive bias for a boolean mask that is True where a key is hidden: -inf there, 0 elsewhere,
    at the mask's own (broadcastable) shape, in ``dtype``; built on the mask's device, nothing read."""
    return torch.zeros((), dtype=dtype, device=hidden.device).masked_fill(hidden, float("-inf"))
