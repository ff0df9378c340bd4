"""Batches of multimodal samples: stacked images, padded token ids and spectrograms, and lengths."""

from collections.abc import Sequence

import torch

from mmkern.data.text import WordTokenizer, pad_sequences


class MultimodalCollate:
    """Turns a list of sample dicts into one batch dict, for ``torch.utils.data.DataLoader``.

    A sample may hold ``"image"`` (a ``(C, H, W)`` tensor), ``"text"`` (a string, tokenized here),
    ``"audio"`` (a ``(frames, bins)`` spectrogram) and ``"label"`` (an int); every sample of a
    batch holds the same keys. The batch holds ``images (B, C, H, W)``, ``text_ids (B, L)`` and
    ``text_lens (B,)``, ``audio (B, T, bins)`` and ``audio_lens (B,)`` (right-padded, lengths ready
    to be ``kv_lens``), and ``labels (B,)``.
    """

    def __init__(self, tokenizer: WordTokenizer | None = None):
        self.tokenizer = tokenizer

    def __call__(self, samples: Sequence[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        keys = set(samples[0])
        if any(set(s) != keys for s in samples):
            raise ValueError("every sample of a batch must hold the same keys")
        batch = {}
        if "image" in keys:
            batch["images"] = torch.stack([s["image"] for s in samples])
        if "text" in keys:
            if self.tokenizer is None:
                raise ValueError("samples hold text, but MultimodalCollate was built without a tokenizer")
            batch["text_ids"], batch["text_lens"] = self.tokenizer([s["text"] for s in samples])
        if "audio" in keys:
            batch["audio"], batch["audio_lens"] = pad_sequences([s["audio"] for s in samples])
        if "label" in keys:
            batch["labels"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        return batch


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}
