"""Layers the complete models share: transformer blocks on CrossModalAttention and ConcatLinear,
and pooling by lengths."""

import torch
from torch import nn

from mmkern.nn import ConcatLinear, CrossModalAttention


def mean_over_lengths(tokens: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``(B, d)`` mean of each sample's first ``lengths[b]`` tokens (zeros for a length of 0)."""
    if lengths is None:
        return tokens.mean(1)
    valid = torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
    total = (tokens * valid[..., None].to(tokens.dtype)).sum(1)
    return total / lengths.clamp(min=1)[:, None].to(tokens.dtype)


class FeedForward(nn.Module):
    """``Linear(hidden -> dim)(gelu(Linear(dim -> hidden)(x)))``, the first with its GELU fused."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = ConcatLinear([dim], hidden, activation="gelu")
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x))


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: ``x + attention(norm(x))`` then ``x + feed_forward(norm(x))``.
    Without ``context`` the attention is self-attention over ``x`` (``lengths`` valid tokens per
    sample); with it, ``x`` attends to ``context`` (``context_lens`` valid tokens, normed by
    ``context_norm``)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, context_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = CrossModalAttention(dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.context_norm = nn.LayerNorm(context_dim) if context_dim is not None else None
        self.feed_forward_norm = nn.LayerNorm(dim)
        self.feed_forward = FeedForward(dim, mlp_ratio * dim)

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.norm(x)
        if context is None:
            attended, _ = self.attention(h, h, h, kv_lens=lengths, q_lens=lengths)
        else:
            c = self.context_norm(context)
            attended, _ = self.attention(h, c, c, kv_lens=context_lens, q_lens=lengths)
        x = x + attended
        return x + self.feed_forward(self.feed_forward_norm(x))
