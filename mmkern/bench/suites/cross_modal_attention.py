"""cross_modal_attention against PyTorch's SDPA as users call it (a boolean key-padding mask; on CUDA
also each SDPA backend that accepts the case), flex_attention with a block mask, flash-attn's and
xFormers' varlen attention (CUDA, where installed) and the eager reference.

Speedups are over SDPA. FLOPs count the visible (query, key) pairs only (the work a padding- and
mask-aware kernel does): forward 2 * Hq * pairs * (D + Dv), backward 2.5 times that, as flash-attention
counts. Causal and windowed cases give every provider the same mask: SDPA a boolean one (or
is_causal where it means the same, square and unpadded), flex_attention a mask_mod, flash-attn its
causal and window_size. Left-padded cases keep each sample's last keys (a key mask, as a left-padded
batch in a Hugging Face model has) instead of its first. With sinks (one learned logit per head, as
GPT-OSS), SDPA gets them the way a user can give them: one more key, of zeros, whose score is the sink
through an additive float mask; a learned position bias reaches SDPA as its float mask (with -inf where
the padding hides a key). SDPA cannot cap scores, so softcap cases (as Gemma 2) are measured
against the eager composition, and flex_attention and flash-attn get their own softcap.
"""

import torch
import torch.nn.functional as F

from mmkern import ops, reference
from mmkern.bench.runner import Case
from mmkern.bench.suite import Suite, cases_by_preset

# name: (B, Lq, Lk, Hq, Hkv, D, Dv, fraction of valid keys[, variant]), the variant a dict of
# cross_modal_attention's causal / window / softcap keywords, "sinks": True for random per-head sinks
# "left_padding": True for the valid keys at the end of each sample, and "bias": True for a learned
# (1, Hq, Lq, Lk) position bias shared by the batch, as T5's.
CAUSAL = {"causal": True}
LEFT_PADDED_CAUSAL = {"causal": True, "left_padding": True}
# Gemma 2's cap on attention logits.
SOFTCAP = {"causal": True, "softcap": 50.0}
SINKS = {"causal": True, "sinks": True}
POSITION_BIAS = {"bias": True}
CPU = {
    "dense": (4, 512, 1024, 8, 8, 64, 64, 1.0),
    "padded_50": (4, 512, 1024, 8, 8, 64, 64, 0.5),
    "few_queries_padded_50": (8, 32, 4096, 8, 8, 64, 64, 0.5),
    "text_over_image_gqa": (8, 64, 576, 16, 4, 64, 64, 0.7),
    "causal_1k": (4, 1024, 1024, 8, 8, 64, 64, 1.0, CAUSAL),
    # Queries over a longer padded key side (a prefix before them): every query sees a key.
    "causal_q128_k512_padded_70": (4, 128, 512, 8, 8, 64, 64, 0.7, CAUSAL),
    "sliding_window_2k_256": (2, 2048, 2048, 8, 8, 64, 64, 1.0, {"causal": True, "window": (256, -1)}),
    "causal_q128_k512_left_padded_70": (4, 128, 512, 8, 8, 64, 64, 0.7, LEFT_PADDED_CAUSAL),
    "softcap_causal_1k": (4, 1024, 1024, 8, 8, 64, 64, 1.0, SOFTCAP),
    "sinks_causal_1k": (4, 1024, 1024, 8, 8, 64, 64, 1.0, SINKS),
    "position_bias_512_padded_70": (4, 512, 512, 8, 8, 64, 64, 0.7, POSITION_BIAS),
}
CUDA = {
    **{
        f"equal_{n // 1024}k_d{d}": (16384 // n, n, n, 2048 // d, 2048 // d, d, d, 1.0)
        for n in (1024, 4096, 16384)
        for d in (64, 128)
    },
    **{
        f"text_over_image_q{lq}_k{lk}_{round(100 * f)}": (32, lq, lk, 16, 16, 128, 128, f)
        for lq, lk in ((32, 256), (128, 1024), (512, 4096))
        for f in (0.3, 0.5, 1.0)
    },
    **{
        f"few_queries_q{lq}_k{lk // 1024}k": (4, lq, lk, 16, 16, 128, 128, 1.0)
        for lq in (32, 64)
        for lk in (4096, 32768)
    },
    "few_queries_q32_k32k_gqa_d64": (4, 32, 32768, 32, 8, 64, 64, 1.0),
    **{
        f"causal_{n // 1024}k_d{d}": (16384 // n, n, n, 2048 // d, 2048 // d, d, d, 1.0, CAUSAL)
        for n in (1024, 4096)
        for d in (64, 128)
    },
    "causal_q512_k2k_padded_70_d128": (8, 512, 2048, 16, 16, 128, 128, 0.7, CAUSAL),
    "sliding_window_8k_1k_d128": (2, 8192, 8192, 16, 16, 128, 128, 1.0, {"causal": True, "window": (1024, -1)}),
    "causal_q512_k2k_left_padded_70_d128": (8, 512, 2048, 16, 16, 128, 128, 0.7, LEFT_PADDED_CAUSAL),
    "softcap_causal_2k_gqa_d128": (4, 2048, 2048, 16, 8, 128, 128, 1.0, SOFTCAP),
    "sinks_causal_4k_gqa_d64": (2, 4096, 4096, 64, 8, 64, 64, 1.0, SINKS),
    "position_bias_1k_padded_70_d64": (16, 1024, 1024, 8, 8, 64, 64, 0.7, POSITION_BIAS),
    # Head dims that are multiples of 8 but not 16 (strides the JIT cannot see are 16-byte aligned).
    "odd_head_dims_1k_padded_70_d40_dv24_gqa": (8, 1024, 1024, 16, 2, 40, 24, 0.7),
}
QUICK_CPU = {
    "small_padded_50": (2, 128, 256, 4, 4, 64, 64, 0.5),
    "padded_50": CPU["padded_50"],
    "small_causal": (2, 256, 256, 4, 4, 64, 64, 1.0, CAUSAL),
}
QUICK_CUDA = ("equal_4k_d128", "text_over_image_q128_k1024_50", "few_queries_q32_k32k", "causal_4k_d128")
# The eager reference stores the (B, Hq, Lq, Lk) scores several times over; above this it is left out.
EAGER_SCORE_LIMIT_BYTES = 2 * 2**30


def key_lengths(batch, k_len, fraction):
    """Per-sample valid keys spread from 0.5x to 1.5x of fraction * Lk (clamped), so samples differ."""
    if fraction >= 1.0:
        return [k_len] * batch
    spread = [0.5 + i / max(batch - 1, 1) for i in range(batch)] if batch > 1 else [1.0]
    return [max(1, min(k_len, round(fraction * k_len * s))) for s in spread]


def _window(variant: dict) -> tuple:
    left, right = variant.get("window", (-1, -1))
    return left, 0 if variant.get("causal") else right


def kernel_keywords(variant: dict) -> dict:
    """The variant's cross_modal_attention keywords (sinks and key masks are arguments of the case)."""
    return {name: variant[name] for name in ("causal", "window", "softcap") if name in variant}


def left_padding_mask(k_len, lengths, device) -> torch.Tensor:
    """(B, Lk) True on each sample's last lengths[b] keys."""
    return torch.arange(k_len, device=device) >= k_len - torch.tensor(lengths, device=device)[:, None]


def sdpa_mask(q_len, k_len, lengths, variant, device):
    """SDPA's boolean mask for the case: (B, 1, 1, Lk) for padding alone, (B, 1, Lq, Lk) for a
    variant; None where there is no mask or is_causal means the same (square, unpadded, causal)."""
    full = all(n == k_len for n in lengths)
    if variant.get("left_padding"):
        key_mask, lengths = left_padding_mask(k_len, lengths, device), [k_len] * len(lengths)
    else:
        key_mask = None
    window = _window(variant)
    if window == (-1, -1) and key_mask is None:
        return (
            None
            if full
            else (torch.arange(k_len, device=device) < torch.tensor(lengths, device=device)[:, None])[:, None, None, :]
        )
    if full and key_mask is None and q_len == k_len and window == (-1, 0):
        return None
    kv_lens = torch.tensor(lengths, device=device)
    return reference.visible_keys(q_len, k_len, torch.full_like(kv_lens, q_len), kv_lens, window, device, key_mask)


def visible_pairs(q_len, k_len, lengths, variant) -> int:
    """How many (query, key) pairs a sample batch of these lengths attends over, every query valid."""
    mask = sdpa_mask(q_len, k_len, lengths, variant, "cpu")
    if mask is None:
        return q_len * sum(lengths) if _window(variant) == (-1, -1) else len(lengths) * q_len * (q_len + 1) // 2
    return int(mask.expand(-1, -1, q_len, -1).sum())


def make_case(name, spec, dtype) -> Case:
    batch, q_len, k_len, q_heads, kv_heads, head_dim, v_dim, fraction, *variant = spec
    variant = variant[0] if variant else {}
    element_size = torch.empty((), dtype=dtype).element_size()
    lengths = key_lengths(batch, k_len, fraction)
    valid = sum(lengths)
    forward_flops = 2 * q_heads * visible_pairs(q_len, k_len, lengths, variant) * (head_dim + v_dim)
    moved = element_size * (batch * q_len * q_heads * (head_dim + v_dim) + valid * kv_heads * (head_dim + v_dim))

    def make_args(device, dtype, seed=0):
        generator = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()

        left_padded = variant.get("left_padding", False)
        kv_lens = torch.tensor(lengths, device=device) if fraction < 1.0 and not left_padded else None
        key_mask = left_padding_mask(k_len, lengths, device) if left_padded else None
        sinks = randn(q_heads).detach().float().requires_grad_() if variant.get("sinks") else None
        bias = randn(1, q_heads, q_len, k_len) if variant.get("bias") else None
        return (
            randn(batch, q_len, q_heads, head_dim),
            randn(batch, k_len, kv_heads, head_dim),
            randn(batch, k_len, kv_heads, v_dim),
            kv_lens,
            sdpa_mask(q_len, k_len, lengths, variant, device),
            key_mask,
            sinks,
            bias,
        )

    params = {
        "batch": batch,
        "q_len": q_len,
        "k_len": k_len,
        "q_heads": q_heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "v_dim": v_dim,
        "kv_lens": lengths,
        "variant": variant,
    }
    if variant.get("softcap"):
        params["reference"] = "eager"  # SDPA has no softcap
    return Case(name, make_args, forward_flops, moved, 2.5 * forward_flops, 2 * moved, params)


def _heads_first(*tensors):
    return [t.transpose(1, 2) for t in tensors]


def _with_sinks(q, k, v, mask, sinks, causal):
    """SDPA's arguments for attention with sinks: one more key and value of zeros, and an additive float
    mask (B, Hq, Lq, Lk + 1) whose last column is each head's sink (its gradient reaches the sinks)."""
    batch, heads, q_len, k_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if mask is None:
        mask = (
            torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
            if causal
            else torch.ones(q_len, k_len, dtype=torch.bool, device=q.device)
        )
    scores = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    sink_column = sinks.to(q.dtype)[None, :, None, None].expand(batch, heads, q_len, 1)
    mask = torch.cat([scores.expand(batch, heads, q_len, k_len), sink_column], -1)
    zeros = k.new_zeros(batch, k.shape[1], 1, k.shape[3]), v.new_zeros(batch, v.shape[1], 1, v.shape[3])
    return torch.cat([k, zeros[0]], 2), torch.cat([v, zeros[1]], 2), mask


def sdpa_provider(case):
    """SDPA as users call it: the case's boolean mask, or is_causal where that is the same mask; with
    sinks, an extra key whose score the mask sets to the sink."""
    causal = bool(case.params["variant"].get("causal"))

    def call(q, k, v, kv_lens, mask, key_mask, sinks, bias):
        q, k, v = _heads_first(q, k, v)
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        if sinks is not None:
            k, v, mask = _with_sinks(q, k, v, mask, sinks, causal)
        if bias is not None:  # a float mask: the bias, -inf where the boolean mask hides a key
            mask = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, **gqa
        ).transpose(1, 2)

    return call


def sdpa_with_backend(case, backend):
    from torch.nn.attention import sdpa_kernel

    sdpa = sdpa_provider(case)

    def call(*args):
        with sdpa_kernel(backend):
            return sdpa(*args)

    return call


def flex_attention_provider(case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = case.params
    lengths = torch.tensor(p["kv_lens"], device="cuda")
    left, right = _window(p["variant"])
    variant = p["variant"]
    if variant.get("sinks"):
        raise ImportError("flex_attention: no sinks (it has no extra softmax column); left out")
    if variant.get("bias"):
        raise ImportError("flex_attention: a learned bias is a captured buffer with a gradient; left out")
    if variant.get("left_padding"):
        lengths = torch.full_like(lengths, p["k_len"])
        first = p["k_len"] - torch.tensor(p["kv_lens"], device="cuda")
    else:
        first = torch.zeros_like(lengths)

    def visible(b, h, q_idx, kv_idx):
        offset = kv_idx - q_idx - (lengths[b] - p["q_len"])
        return (
            (kv_idx < lengths[b])
            & (kv_idx >= first[b])
            & ((left < 0) | (offset >= -left))
            & ((right < 0) | (offset <= right))
        )

    cap = variant.get("softcap", 0.0)
    score_mod = (lambda score, b, h, q_idx, kv_idx: cap * torch.tanh(score / cap)) if cap else None
    block_mask = create_block_mask(visible, p["batch"], None, p["q_len"], p["k_len"], device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)

    def call(q, k, v, kv_lens, mask, key_mask, sinks, bias):
        q, k, v = _heads_first(q, k, v)
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, **gqa).transpose(1, 2)

    return call


def _unpadding(case):
    """The varlen libraries' inputs as their users build them from a padded batch: the valid keys
    gathered into one sequence (the gather is part of the cost), and cumulative lengths."""
    p = case.params
    lengths = torch.tensor(p["kv_lens"], device="cuda")
    if p["variant"].get("left_padding"):
        kept = left_padding_mask(p["k_len"], p["kv_lens"], "cuda")
    else:
        kept = torch.arange(p["k_len"], device="cuda") < lengths[:, None]
    keep = kept.flatten().nonzero().squeeze(1)
    cu_k = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
    cu_q = torch.arange(0, (p["batch"] + 1) * p["q_len"], p["q_len"], device="cuda", dtype=torch.int32)
    return (lambda x: x.flatten(0, 1).index_select(0, keep)), cu_q, cu_k


def flash_attn_varlen_provider(case):
    from flash_attn import flash_attn_varlen_func

    p = case.params
    if p["variant"].get("sinks") or p["variant"].get("bias"):
        raise ImportError("flash_attn_varlen: no sinks or bias in flash-attn 2; left out")
    unpad, cu_q, cu_k = _unpadding(case)

    left, right = _window(p["variant"])
    # flash-attn's causal is the bottom-right one, and its window (left, right) has our convention.
    window = {"causal": right == 0, "window_size": (left, -1 if right == 0 else right)} if p["variant"] else {}
    if p["variant"].get("softcap"):
        window["softcap"] = p["variant"]["softcap"]

    def call(q, k, v, kv_lens, mask, key_mask, sinks, bias):
        out = flash_attn_varlen_func(q.flatten(0, 1), unpad(k), unpad(v), cu_q, cu_k, p["q_len"], p["k_len"], **window)
        return out.view(q.shape[0], q.shape[1], q.shape[2], v.shape[3])

    return call


def xformers_provider(case):
    from xformers.ops import fmha

    p = case.params
    if p["variant"]:
        raise ImportError("xformers: the variant cases are not set up for it; left out")
    unpad, _, _ = _unpadding(case)
    # The samples' own lengths; the case's (absent) bias argument is not xFormers' attention bias.
    block_diagonal = fmha.attn_bias.BlockDiagonalMask.from_seqlens([p["q_len"]] * p["batch"], p["kv_lens"])

    def call(q, k, v, kv_lens, mask, key_mask, sinks, bias):
        group = q.shape[2] // k.shape[2]
        # xFormers takes (1, tokens, heads, dim), each query head with its own key head.
        k, v = (unpad(x).repeat_interleave(group, dim=1).unsqueeze(0) for x in (k, v))
        out = fmha.memory_efficient_attention(q.flatten(0, 1).unsqueeze(0), k, v, attn_bias=block_diagonal)
        return out.view(q.shape[0], q.shape[1], q.shape[2], v.shape[3])

    return call


def make_providers(case, options) -> dict:
    p = case.params
    keywords = kernel_keywords(p["variant"])
    providers = {
        "mmkern": lambda q, k, v, kv_lens, mask, key_mask, sinks, bias: ops.cross_modal_attention(
            q, k, v, kv_lens=kv_lens, key_mask=key_mask, sinks=sinks, bias=bias, **keywords
        )
    }
    if "softcap" in keywords:
        options.notes.add("sdpa: cannot cap scores, so softcap cases are measured against eager attention")
    else:
        providers["sdpa"] = sdpa_provider(case)
    if options.device.type == "cuda" and "sdpa" in providers:
        from torch.nn.attention import SDPBackend

        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            if hasattr(SDPBackend, backend):
                providers[f"sdpa[{backend.lower()}]"] = sdpa_with_backend(case, getattr(SDPBackend, backend))
    if options.device.type == "cuda":
        if not options.with_compile:
            options.notes.add("flex_attention: compiled, so --no-compile leaves it out")
        else:
            try:
                providers["flex_attention"] = flex_attention_provider(case)
            except ImportError:
                options.notes.add("flex_attention: not in this torch; left out")
        for name, make in (("flash_attn_varlen", flash_attn_varlen_provider), ("xformers", xformers_provider)):
            try:
                providers[name] = make(case)
            except ImportError as error:
                options.notes.add(str(error) if str(error).startswith(name) else f"{name}: not installed; left out")
    else:
        options.notes.add("flex_attention, flash_attn_varlen and xformers: CUDA only; left out on CPU")
    score_bytes = 4 * p["batch"] * p["q_heads"] * p["q_len"] * p["k_len"]
    if score_bytes <= EAGER_SCORE_LIMIT_BYTES:
        providers["eager"] = lambda q, k, v, kv_lens, mask, key_mask, sinks, bias: reference.cross_modal_attention(
            q, k, v, kv_lens=kv_lens, key_mask=key_mask, sinks=sinks, bias=bias, **keywords
        )[0]
    else:
        options.notes.add(
            f"eager attention: left out where its score matrix passes {EAGER_SCORE_LIMIT_BYTES / 2**30:.0f} GiB"
        )
    return providers


SUITES = [
    Suite(
        "cross_modal_attention",
        "sdpa",
        ("forward", "forward+backward"),
        ("quick", "full"),
        cases_by_preset(QUICK_CPU, CPU, CUDA, QUICK_CUDA),
        make_case,
        make_providers,
    )
]
