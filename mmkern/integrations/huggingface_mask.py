"""The attention masks transformers builds for ``attn_implementation="mmkern"``.

Where the model hands its mask straight to the attention interface (the models that support
flash-attention, which pass its 2-D masks on untouched) and the mask is a plain pattern (causal,
sliding-window causal or bidirectional, over padding), the mask is a compact one: which of the first
W keys each sample may see, as a (B, 1, 1, W) uint8 tensor (see COMPACT_DTYPE), where W ends at the
last query's position; None where that is every key, none is padding and SDPA would read None the
same way. Causality and the window come with the call (``is_causal``, ``sliding_window``), as for
flash-attention. The kernel reads the mask itself: no (B, 1, Lq, Lk) mask is built and nothing is
read on the host. Every other mask (patterns with overlays, packed sequences, a static cache's offset
in a tensor for more than one query, other models) is SDPA's boolean mask, which the attention
function runs exactly.
"""

import torch

# A compact mask is (B, 1, 1, W) in this dtype, which no other mask has: 4-D, so transformers hands it
# on as it is (it re-processes 2-D masks, as those from generate() with a static cache would be), and
# recognisable in the attention function.
COMPACT_DTYPE = torch.uint8


def calls_the_interface(model: type) -> bool:
    """Whether a model class's layers call attention through transformers' AttentionInterface (with the
    interface's masks): those that support SDPA or flex_attention through it, or say they do."""
    return any(
        getattr(model, flag, False) for flag in ("_supports_sdpa", "_supports_flex_attn", "_supports_attention_backend")
    )


@torch.compiler.assume_constant_result  # a lookup in transformers' registry: not traced
def _takes_compact_masks(config_type: type) -> bool:
    """Whether the model class of this config hands 2-D masks to the attention interface untouched: it
    calls the interface and supports flash-attention, whose masks are 2-D."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        model = MODEL_MAPPING[config_type]
    except (KeyError, ValueError):
        return False
    models = model if isinstance(model, (tuple, list)) else (model,)
    return all(getattr(m, "_supports_flash_attn", False) and calls_the_interface(m) for m in models)


def _pattern(mask_function) -> str | None:
    """ "causal", "sliding_causal" or "bidirectional" for transformers' own mask functions, None for
    any other (an overlay, packed sequences, a user's function)."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return "causal"
    if mask_function is mu.bidirectional_mask_function:
        return "bidirectional"
    # sliding_window_causal_mask_function(w) is and_masks(sliding_window_overlay(w), causal_mask_function).
    code = getattr(mask_function, "__code__", None)
    if (
        code is None
        or code.co_freevars != ("mask_functions",)
        or not mask_function.__qualname__.startswith("and_masks")
    ):
        return None
    parts = mask_function.__closure__[0].cell_contents
    if (
        len(parts) == 2
        and parts[1] is mu.causal_mask_function
        and getattr(parts[0], "__qualname__", "").startswith("sliding_window_overlay.")
    ):
        return "sliding_causal"
    return None


def is_compact(mask) -> bool:
    """Whether an attention mask is one of mmkern_mask's compact ones."""
    return isinstance(mask, torch.Tensor) and mask.dtype == COMPACT_DTYPE and mask.dim() == 4 and mask.shape[2] == 1


def mmkern_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    config=None,
    use_vmap: bool = False,
    device="cpu",
    **kwargs,
):
    """transformers' mask-interface signature; see the module's docstring."""
    from transformers import masking_utils as mu

    mask_function = mu.causal_mask_function if mask_function is None else mask_function
    pattern = _pattern(mask_function)
    compact = (
        pattern is not None
        and not use_vmap
        and config is not None
        and _takes_compact_masks(type(config))
        and isinstance(kv_offset, int)
        and isinstance(kv_length, int)
    )
    if compact and not isinstance(q_offset, int):
        # A static cache's offset, held in a tensor: a decode step's one query sees every key up to its
        # own position (the rest of the cache is empty), with no causal offset to know on the host.
        compact = pattern == "causal" and q_length == 1
        width = kv_length
    else:
        # The keys the queries may see: under a causal pattern, the absolute positions up to the last
        # query's, the first W of the key tensor (the rest of a static cache is empty).
        width = q_offset - kv_offset + q_length if compact and pattern != "bidirectional" else kv_length
    if not compact or not 0 < width <= kv_length:
        return mu.sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            local_size=local_size,
            use_vmap=use_vmap,
            device=device,
            config=config,
            **kwargs,
        )
    if attention_mask is None:
        # None means what it does to SDPA (a causal None is top left over the first Lq keys): only where
        # that is this mask.
        if width == kv_length and isinstance(q_offset, int) and (pattern == "bidirectional" or kv_length == q_length):
            return None
        keep = torch.ones(batch_size, width, dtype=torch.bool, device=device)
    else:
        padding = mu.prepare_padding_mask(attention_mask.to(device=device, dtype=torch.bool), kv_length, kv_offset)
        keep = padding[:, kv_offset : kv_offset + width]
    if not isinstance(q_offset, int):
        keep = keep & (torch.arange(kv_offset, kv_offset + width, device=device) <= q_offset)
    return keep.to(COMPACT_DTYPE)[:, None, None, :]
