"""mmkern as a Hugging Face transformers attention implementation: ``attn_implementation="mmkern"``.

``register()`` adds it to transformers' ``AttentionInterface`` and its masks to
``AttentionMaskInterface`` (see ``huggingface_mask``). Every model that calls attention through the
interface (BERT, BART, ViT, CLIP, Whisper, Llama, Qwen2, Mistral, Gemma 2, GPT-OSS, ...) then runs on
``mmkern.ops.cross_modal_attention``:

- no mask, or the compact (B, 1, 1, W) key mask: causal (bottom right, so a decode step or a chunk
  of queries after a cache lines up with its keys) where the layer is causal, with the layer's
  sliding window;
- any other mask (SDPA's (B, 1, Lq, Lk) boolean masks of models that do not take compact ones,
  patterns with overlays, a user's 4-D mask, boolean or additive): added to the scores as a bias,
  read through its broadcast strides;

each with the layer's softcap (Gemma 2), sinks (GPT-OSS's ``s_aux``), position bias (T5), scaling
and dropout, and no host read. Only head dims over 256 take an exact path: mmkern's eager reference, on the
arguments the kernel would have had.

A model whose attention does not go through the interface (it supports neither
``attn_implementation="sdpa"`` nor ``"flex_attention"``: BLIP, Bloom, GIT, GPT-Neo, ...) is refused when it is built
with ``"mmkern"``, with an error that says so, rather than given masks its own code would misread.
"""

import torch

from mmkern import ops, reference
from mmkern.integrations.huggingface_mask import calls_the_interface, is_compact, mmkern_mask
from mmkern.ops.masks import hiding_bias

NAME = "mmkern"
MAX_HEAD_DIM = 256
# flash-attention's packed-sequence keywords: without a mask they would be the only thing keeping
# the sequences apart.
_PACKED_KEYWORDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _reference_attention(q, k, v, *, dropout_p=0.0, softcap=None, **keywords):
    """The kernel's arguments on the eager reference, for the head dims the kernel does not take: every
    mask, window, softcap, sink and bias as the kernel would apply them, at eager attention's cost."""
    seed = int(torch.randint(0, 2**62, ())) if dropout_p > 0 else None
    return reference.cross_modal_attention(
        q, k, v, dropout_p=dropout_p, dropout_seed=seed, softcap=softcap or 0.0, **keywords
    )[0]


def _refuse_unsupported(kwargs) -> None:
    if kwargs.get("output_attentions"):
        raise ValueError(
            'attn_implementation="mmkern" returns no attention weights (output_attentions=True); '
            'use attn_implementation="eager" to get them'
        )


def mmkern_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple:
    """transformers' attention signature: query ``(B, H, Lq, D)``, key and value ``(B, Hkv, Lk, D)``;
    returns ``((B, Lq, H, Dv), None)``."""
    _refuse_unsupported(kwargs)
    q_length = query.shape[2]
    is_causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    dropout = dropout if module.training else 0.0
    # T5's learned relative position bias (shared by the batch), added to the scores in the kernel.
    bias = kwargs.get("position_bias")
    variant = dict(softcap=softcap, sinks=s_aux)
    key_mask = None
    if attention_mask is None:
        if any(kwargs.get(name) is not None for name in _PACKED_KEYWORDS):
            raise ValueError(
                'attn_implementation="mmkern" does not take packed sequences as cu_seq_lens_* '
                "keywords; pass position_ids (or an attention mask) so the mask keeps them apart"
            )
        causal = is_causal and q_length > 1
        if causal and key.shape[2] > q_length:
            # SDPA's causal None: the first Lq keys, top left (transformers' prefill into a static cache).
            key, value = key[:, :, :q_length], value[:, :, :q_length]
            bias = None if bias is None else bias[..., :q_length]
        variant.update(causal=causal, window=(sliding_window - 1, -1) if causal and sliding_window else None)
    elif is_compact(attention_mask):
        # huggingface_mask's compact mask: the first W keys, each sample's padding among them.
        width = attention_mask.shape[-1]
        key, value, key_mask = key[:, :, :width], value[:, :, :width], attention_mask[:, 0, 0].bool()
        bias = None if bias is None else bias[..., :width]
        variant.update(causal=is_causal, window=(sliding_window - 1, -1) if is_causal and sliding_window else None)
    else:
        # A 4-D mask (SDPA's, or the user's) holds the whole pattern, as it does for SDPA: it joins the bias
        # (0 / -inf for a boolean one), kept at its own (B or 1, 1 or H, Lq, Lk) shape; nothing is read on
        # the host.
        if attention_mask.dtype == torch.bool:
            attention_mask = hiding_bias(~attention_mask, query.dtype)
        bias = attention_mask if bias is None else bias + attention_mask
    fits = query.shape[-1] <= MAX_HEAD_DIM and value.shape[-1] <= MAX_HEAD_DIM
    attention = ops.cross_modal_attention if fits else _reference_attention
    out = attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        key_mask=key_mask,
        bias=bias,
        scale=scaling,
        dropout_p=dropout,
        **variant,
    )
    return out, None


def _check_model_takes_the_interface(model, requested) -> None:
    if requested == NAME and not calls_the_interface(type(model)):
        raise ValueError(
            f"{type(model).__name__} does not call attention through transformers' AttentionInterface "
            f'(it supports neither attn_implementation="sdpa" nor "flex_attention"), so '
            f'attn_implementation="{NAME}" cannot run it; use attn_implementation="eager" for this '
            "model (or for its sub-config in a composite model)"
        )


def register() -> None:
    """Makes ``attn_implementation="mmkern"`` available to every transformers model (idempotent)."""
    try:
        from transformers import AttentionInterface, PreTrainedModel
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as error:
        raise ImportError(
            "mmkern.integrations.huggingface needs transformers with AttentionInterface "
            "(4.48 or newer): pip install -U transformers"
        ) from error
    AttentionInterface.register(NAME, mmkern_attention_forward)
    AttentionMaskInterface.register(NAME, mmkern_mask)
    check = PreTrainedModel.get_correct_attn_implementation
    if getattr(check, "_mmkern_checked", False):
        return

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        _check_model_takes_the_interface(self, requested_attention)
        return check(self, requested_attention, is_init_check)

    get_correct_attn_implementation._mmkern_checked = True
    PreTrainedModel.get_correct_attn_implementation = get_correct_attn_implementation
