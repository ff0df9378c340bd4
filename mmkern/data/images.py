"""Image preprocessing: resize and normalise batches on any device."""

import torch
import torch.nn.functional as F


def resize_and_normalize(
    images: torch.Tensor, size: int | tuple, mean=0.5, std=0.5, value_range: float | None = None
) -> torch.Tensor:
    """``(N, C, size_h, size_w)`` float32 images, bilinearly resized (antialiased when shrinking)
    and normalised per channel as ``(x / value_range - mean) / std``.

    ``images`` is ``(N, C, H, W)`` or ``(N, H, W)`` (one channel), of any real dtype; ``value_range``
    defaults to 255 for uint8 images and 1 otherwise. ``mean`` and ``std`` are a number or one per
    channel.
    """
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        raise ValueError(
            f"images must be an (N, C, H, W) or (N, H, W) tensor, got "
            f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
        )
    if images.is_complex() or images.dtype == torch.bool:
        raise TypeError(f"images must be real numbers, got {images.dtype}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"size must be a positive int or (height, width), got {size}")
    if value_range is None:
        value_range = 255.0 if images.dtype == torch.uint8 else 1.0
    x = images.unsqueeze(1) if images.dim() == 3 else images
    x = x.float() / value_range
    if tuple(x.shape[-2:]) != size:
        shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    channels = x.shape[1]
    mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(-1, 1, 1) for v in (mean, std))
    for name, v in (("mean", mean), ("std", std)):
        if v.shape[0] not in (1, channels):
            raise ValueError(f"{name} must be a number or have one value per channel ({channels}), got {v.shape[0]}")
    if (std == 0).any():
        raise ValueError("std must not be zero")
    return (x - mean) / std
