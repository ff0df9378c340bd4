"""mmkern as a Hugging Face transformers attention implementation: ``attn_implementation="mmkern"``.

``register()`` adds it to transformers' ``AttentionInterface`` (with SDPA's boolean masks from
``AttentionMaskInterface``), so every model that calls attention through that interface (BERT,
BART, ViT, CLIP, Whisper, Llama, ...) can run on ``mmkern.ops.cross_modal_attention``:

- no mask (full attention, e.g. over image patches or unpadded encoder states): the kernel;
- a padding mask that keeps each sample's first keys, the same for every query (encoders and
  cross-attention over right-padded batches): the kernel, with the mask read as ``kv_lens``;
- anything else (a causal mask, left padding, sliding windows, position biases): SDPA with the
  model's mask, exactly as ``attn_implementation="sdpa"`` would run it.

Reading a mask as lengths costs one device sync; under ``torch.compile`` masked calls stay on SDPA
(there is no sync-free way to know a mask is right padding).
"""

import torch

from mmkern import ops

NAME = "mmkern"


def _right_padding_lengths(mask: torch.Tensor, batch: int, q_length: int) -> torch.Tensor | None:
    """kv_lens if ``mask`` (True = attend, (B or 1, 1, Lq or 1, Lk)) keeps each sample's first keys for
    every query, else None."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or torch.compiler.is_compiling():
        return None
    rows = mask[:, 0].expand(batch, q_length, mask.shape[-1])
    kv_lens = rows[:, 0].sum(-1)
    expected = torch.arange(mask.shape[-1], device=mask.device) < kv_lens[:, None]
    return kv_lens if torch.equal(rows, expected[:, None, :].expand_as(rows)) else None


def mmkern_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs) -> tuple:
    """transformers' attention signature: query ``(B, H, Lq, D)``, key and value ``(B, Hkv, Lk, D)``;
    returns ``((B, Lq, H, Dv), None)``."""
    batch, _, q_length, _ = query.shape
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    causal = bool(is_causal) and q_length > 1 and attention_mask is None
    needs_sdpa = causal or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None \
        or kwargs.get("sliding_window") is not None or query.shape[-1] > 256 or value.shape[-1] > 256
    kv_lens = None
    if attention_mask is not None and not needs_sdpa:
        kv_lens = _right_padding_lengths(attention_mask, batch, q_length)
        needs_sdpa = kv_lens is None
    if needs_sdpa:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = ops.cross_modal_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    kv_lens=kv_lens, scale=scaling, dropout_p=dropout if module.training else 0.0)
    return out, None


def register() -> None:
    """Makes ``attn_implementation="mmkern"`` available to every transformers model (idempotent)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:
        raise ImportError("mmkern.integrations.huggingface needs transformers with AttentionInterface "
                          "(4.48 or newer): pip install -U transformers") from error
    AttentionInterface.register(NAME, mmkern_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
