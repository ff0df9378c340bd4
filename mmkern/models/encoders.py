"""Per-modality encoders. Each returns ``(tokens (B, L, dim), lengths (B,) or None, pooled (B, dim))``:
tokens for attention-based fusion, lengths ready to be ``kv_lens``, a pooled vector for the rest."""

import torch
from torch import nn

from mmkern.models.blocks import TransformerBlock, mean_over_lengths


class ConvImageEncoder(nn.Module):
    """Three 3x3 convolutions (the last two with stride 2); the final feature map's cells are the tokens."""

    def __init__(self, dim: int, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * width, dim, 3, stride=2, padding=1),
            nn.GELU(),
        )

    def forward(self, images: torch.Tensor) -> tuple:
        tokens = self.layers(images).flatten(2).transpose(1, 2)
        return tokens, None, tokens.mean(1)


class PatchImageEncoder(nn.Module):
    """A vision transformer: non-overlapping patches, learned positions, transformer blocks."""

    def __init__(
        self, dim: int, image_size: int, patch_size: int, in_channels: int = 1, depth: int = 2, heads: int = 4
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.patches = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.positions = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> tuple:
        x = self.patches(images).flatten(2).transpose(1, 2) + self.positions
        for block in self.blocks:
            x = block(x)
        tokens = self.norm(x)
        return tokens, None, tokens.mean(1)


class RecurrentTextEncoder(nn.Module):
    """Token embeddings through a GRU, written out step by step (so ``torch.compile`` traces it whole);
    right padding never reaches a valid step, and the pooled vector is the state after the last
    valid token."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.cell = nn.GRUCell(dim, dim)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple:
        x = self.embedding(ids)
        h = x.new_zeros(x.shape[0], x.shape[2])
        states = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            states.append(h)
        tokens = torch.stack(states, 1)
        last = (lengths - 1).clamp(min=0)
        pooled = tokens.gather(1, last[:, None, None].expand(-1, 1, tokens.shape[2]))[:, 0]
        return tokens, lengths, pooled * (lengths > 0)[:, None].to(pooled.dtype)


class TransformerTextEncoder(nn.Module):
    """Token embeddings, learned positions and transformer blocks attending over each sample's
    ``lengths`` tokens (passed to the kernel as ``kv_lens``, never turned into a mask)."""

    def __init__(self, vocab_size: int, dim: int, max_length: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(1, max_length, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple:
        if ids.shape[1] > self.positions.shape[1]:
            raise ValueError(f"text of {ids.shape[1]} tokens is longer than max_length ({self.positions.shape[1]})")
        x = self.embedding(ids) + self.positions[:, : ids.shape[1]]
        for block in self.blocks:
            x = block(x, lengths)
        tokens = self.norm(x)
        return tokens, lengths, mean_over_lengths(tokens, lengths)


class SpectrogramEncoder(nn.Module):
    """Log-spectrogram frames projected, mixed over time by a width-3 convolution, and attended over
    by transformer blocks within each clip's ``lengths`` frames."""

    def __init__(self, bins: int, dim: int, depth: int = 1, heads: int = 4):
        super().__init__()
        self.input_norm = nn.LayerNorm(bins)
        self.projection = nn.Linear(bins, dim)
        self.mixing = nn.Conv1d(dim, dim, 3, padding=1)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> tuple:
        valid = (torch.arange(frames.shape[1], device=frames.device) < lengths[:, None])[..., None]
        x = self.projection(self.input_norm(frames)) * valid.to(frames.dtype)
        x = x + torch.nn.functional.gelu(self.mixing(x.transpose(1, 2)).transpose(1, 2))
        for block in self.blocks:
            x = block(x, lengths)
        tokens = self.norm(x)
        return tokens, lengths, mean_over_lengths(tokens, lengths)
