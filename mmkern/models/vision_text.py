"""``VisionTextClassifier``: an image encoder, a text encoder, a fusion and a classification head."""

import torch
from torch import nn

from mmkern.models.encoders import ConvImageEncoder, PatchImageEncoder, RecurrentTextEncoder, TransformerTextEncoder
from mmkern.models.fusion import PairFusion
from mmkern.nn.backend import set_backend

IMAGE_ENCODERS = ("cnn", "vit")
TEXT_ENCODERS = ("gru", "transformer")


class VisionTextClassifier(nn.Module):
    """Classifies an (image, text) pair, e.g. answers a question about a picture.

    ``image_encoder`` is ``"cnn"`` or ``"vit"``; ``text_encoder`` is ``"gru"`` or ``"transformer"``;
    ``fusion`` is one of ``mmkern.models.FUSIONS`` (``"attention"``: text tokens attend to image
    patches). ``backend="mmkern"`` runs the fused kernels, ``"eager"`` the reference ops with the same
    parameters (``mmkern.nn.set_backend`` switches an existing model).

    ``forward(images (B, C, H, W), text_ids (B, L), text_lens (B,))`` returns logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int,
        vocab_size: int,
        *,
        image_encoder: str = "cnn",
        text_encoder: str = "gru",
        fusion: str = "concat",
        dim: int = 128,
        image_size: int = 16,
        in_channels: int = 1,
        patch_size: int = 4,
        depth: int = 2,
        heads: int = 4,
        max_text_length: int = 64,
        backend: str = "mmkern",
    ):
        super().__init__()
        if image_encoder not in IMAGE_ENCODERS:
            raise ValueError(f"image_encoder must be one of {IMAGE_ENCODERS}, got {image_encoder!r}")
        if text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder must be one of {TEXT_ENCODERS}, got {text_encoder!r}")
        self.image_encoder = (
            ConvImageEncoder(dim, in_channels)
            if image_encoder == "cnn"
            else PatchImageEncoder(dim, image_size, patch_size, in_channels, depth, heads)
        )
        self.text_encoder = (
            RecurrentTextEncoder(vocab_size, dim)
            if text_encoder == "gru"
            else TransformerTextEncoder(vocab_size, dim, max_text_length, depth, heads)
        )
        self.fusion = PairFusion(fusion, dim, heads)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        set_backend(self, backend)

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor, text_lens: torch.Tensor) -> torch.Tensor:
        return self.head(self.fusion(self.image_encoder(images), self.text_encoder(text_ids, text_lens)))
