"""``TriModalClassifier``: image, audio and text encoders whose features are fused as int8."""

import torch
from torch import nn

from mmkern.models.encoders import ConvImageEncoder, RecurrentTextEncoder, SpectrogramEncoder
from mmkern.models.fusion import QuantizedConcatProjection
from mmkern.nn.backend import set_backend


class TriModalClassifier(nn.Module):
    """Classifies an (image, audio clip, text) triple through int8 feature fusion.

    Each modality is encoded to one vector per sample; the three are quantized per token to int8 and
    projected together by an int8 concat-projection (``QuantizedConcatProjection``: trained with
    quantization in the loop, gradients straight through the rounding), then classified.

    The features can be cached: ``encode(...)`` returns the three ``(xq, scale)`` int8 pairs (what
    ``mmkern.data.QuantizedFeatureStore`` keeps on disk) and ``classify(pairs)`` fuses them straight
    from int8 (``mmkern.ops.quantized_concat_linear``): ``classify(encode(...))`` equals ``forward``.

    ``forward(images (B, C, H, W), audio (B, T, bins), audio_lens (B,), text_ids (B, L), text_lens (B,))``
    returns logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int,
        vocab_size: int,
        audio_bins: int,
        *,
        dim: int = 128,
        in_channels: int = 1,
        heads: int = 4,
        backend: str = "mmkern",
    ):
        super().__init__()
        self.image_encoder = ConvImageEncoder(dim, in_channels)
        self.audio_encoder = SpectrogramEncoder(audio_bins, dim, heads=heads)
        self.text_encoder = RecurrentTextEncoder(vocab_size, dim)
        self.fusion = QuantizedConcatProjection([dim, dim, dim], dim, activation="gelu")
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        set_backend(self, backend)

    def features(self, images, audio, audio_lens, text_ids, text_lens) -> list:
        return [
            self.image_encoder(images)[2],
            self.audio_encoder(audio, audio_lens)[2],
            self.text_encoder(text_ids, text_lens)[2],
        ]

    def forward(self, images, audio, audio_lens, text_ids, text_lens) -> torch.Tensor:
        return self.head(self.fusion(*self.features(images, audio, audio_lens, text_ids, text_lens)))

    @torch.no_grad()
    def encode(self, images, audio, audio_lens, text_ids, text_lens) -> list:
        """The three modalities' features as int8 ``(xq, scale)`` pairs, ready to cache."""
        return [
            self.fusion._ops.quantize_per_token(x)
            for x in self.features(images, audio, audio_lens, text_ids, text_lens)
        ]

    def classify(self, pairs) -> torch.Tensor:
        """Logits from cached int8 features (``encode``'s pairs), never dequantized."""
        ops = self.fusion._ops
        weight = self.fusion.weight.detach()
        weight_q, weight_scale = ops.quantize_per_token(weight)
        fused = ops.quantized_concat_linear(
            [q for q, _ in pairs],
            [s for _, s in pairs],
            weight_q,
            weight_scale[:, 0],
            self.fusion.bias,
            activation="gelu",
            out_dtype=weight.dtype,
        )
        return self.head(fused)
