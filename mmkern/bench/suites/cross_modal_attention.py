"""cross_modal_attention against PyTorch's SDPA as users call it (a boolean key-padding mask; on CUDA
also each SDPA backend that accepts the case), flex_attention with a block mask, flash-attn's and
xFormers' varlen attention (CUDA, where installed) and the eager reference.

Speedups are over SDPA. FLOPs count the visible (query, key) pairs only (the work a padding- and
mask-aware kernel does): forward 2 * Hq * pairs * (D + Dv), backward 2.5 times that, as flash-attention
counts. Causal and windowed cases give every provider the same mask: SDPA a boolean one (or
is_causal where it means the same, square and unpadded), flex_attention a mask_mod, flash-attn its
causal and window_size.
"""

import torch
import torch.nn.functional as F

from mmkern import ops, reference
from mmkern.bench.runner import Case
from mmkern.bench.suite import Suite, cases_by_preset

# name: (B, Lq, Lk, Hq, Hkv, D, Dv, fraction of valid keys[, variant: causal / window keywords])
CAUSAL = {"causal": True}
CPU = {
    "dense": (4, 512, 1024, 8, 8, 64, 64, 1.0),
    "padded_50": (4, 512, 1024, 8, 8, 64, 64, 0.5),
    "few_queries_padded_50": (8, 32, 4096, 8, 8, 64, 64, 0.5),
    "text_over_image_gqa": (8, 64, 576, 16, 4, 64, 64, 0.7),
    "causal_1k": (4, 1024, 1024, 8, 8, 64, 64, 1.0, CAUSAL),
    # Queries over a longer padded key side (a prefix before them): every query sees a key.
    "causal_q128_k512_padded_70": (4, 128, 512, 8, 8, 64, 64, 0.7, CAUSAL),
    "sliding_window_2k_256": (2, 2048, 2048, 8, 8, 64, 64, 1.0, {"causal": True, "window": (256, -1)}),
}
CUDA = {
    **{f"equal_{n // 1024}k_d{d}": (16384 // n, n, n, 2048 // d, 2048 // d, d, d, 1.0)
       for n in (1024, 4096, 16384) for d in (64, 128)},
    **{f"text_over_image_q{lq}_k{lk}_{round(100 * f)}": (32, lq, lk, 16, 16, 128, 128, f)
       for lq, lk in ((32, 256), (128, 1024), (512, 4096)) for f in (0.3, 0.5, 1.0)},
    **{f"few_queries_q{lq}_k{lk // 1024}k": (4, lq, lk, 16, 16, 128, 128, 1.0)
       for lq in (32, 64) for lk in (4096, 32768)},
    "few_queries_q32_k32k_gqa_d64": (4, 32, 32768, 32, 8, 64, 64, 1.0),
    **{f"causal_{n // 1024}k_d{d}": (16384 // n, n, n, 2048 // d, 2048 // d, d, d, 1.0, CAUSAL)
       for n in (1024, 4096) for d in (64, 128)},
    "causal_q512_k2k_padded_70_d128": (8, 512, 2048, 16, 16, 128, 128, 0.7, CAUSAL),
    "sliding_window_8k_1k_d128": (2, 8192, 8192, 16, 16, 128, 128, 1.0, {"causal": True, "window": (1024, -1)}),
}
QUICK_CPU = {"small_padded_50": (2, 128, 256, 4, 4, 64, 64, 0.5), "padded_50": CPU["padded_50"],
             "small_causal": (2, 256, 256, 4, 4, 64, 64, 1.0, CAUSAL)}
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


def visible_pairs(q_len, k_len, lengths, variant) -> int:
    """How many (query, key) pairs a sample batch of these lengths attends over, every query valid."""
    if not variant:
        return q_len * sum(lengths)
    kv_lens = torch.tensor(lengths)
    visible = reference.visible_keys(q_len, k_len, torch.full_like(kv_lens, q_len), kv_lens, _window(variant), "cpu")
    return int(visible.sum())


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

        kv_lens = torch.tensor(lengths, device=device) if fraction < 1.0 else None
        # SDPA's mask: True where a key takes part, (B, 1, 1, Lk), or (B, 1, Lq, Lk) for a variant.
        if variant and not (kv_lens is None and q_len == k_len and _window(variant) == (-1, 0)):
            all_keys = torch.tensor(lengths, device=device)
            mask = reference.visible_keys(q_len, k_len, torch.full_like(all_keys, q_len), all_keys, _window(variant),
                                          device)
        else:
            mask = None if kv_lens is None else (torch.arange(k_len, device=device) < kv_lens[:, None])[:, None, None, :]
        return (randn(batch, q_len, q_heads, head_dim), randn(batch, k_len, kv_heads, head_dim),
                randn(batch, k_len, kv_heads, v_dim), kv_lens, mask)

    params = {"batch": batch, "q_len": q_len, "k_len": k_len, "q_heads": q_heads, "kv_heads": kv_heads,
              "head_dim": head_dim, "v_dim": v_dim, "kv_lens": lengths, "variant": variant}
    return Case(name, make_args, forward_flops, moved, 2.5 * forward_flops, 2 * moved, params)


def _heads_first(*tensors):
    return [t.transpose(1, 2) for t in tensors]


def sdpa_provider(case):
    """SDPA as users call it: the case's boolean mask, or is_causal where that is the same mask."""
    causal = bool(case.params["variant"])

    def call(q, k, v, kv_lens, mask):
        q, k, v = _heads_first(q, k, v)
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              **gqa).transpose(1, 2)

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

    def visible(b, h, q_idx, kv_idx):
        offset = kv_idx - q_idx - (lengths[b] - p["q_len"])
        return (kv_idx < lengths[b]) & ((left < 0) | (offset >= -left)) & ((right < 0) | (offset <= right))

    block_mask = create_block_mask(visible, p["batch"], None, p["q_len"], p["k_len"], device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)

    def call(q, k, v, kv_lens, mask):
        q, k, v = _heads_first(q, k, v)
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        return compiled(q, k, v, block_mask=block_mask, **gqa).transpose(1, 2)

    return call


def _unpadding(case):
    """The varlen libraries' inputs as their users build them from a padded batch: the valid keys
    gathered into one sequence (the gather is part of the cost), and cumulative lengths."""
    p = case.params
    lengths = torch.tensor(p["kv_lens"], device="cuda")
    keep = (torch.arange(p["k_len"], device="cuda") < lengths[:, None]).flatten().nonzero().squeeze(1)
    cu_k = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
    cu_q = torch.arange(0, (p["batch"] + 1) * p["q_len"], p["q_len"], device="cuda", dtype=torch.int32)
    return (lambda x: x.flatten(0, 1).index_select(0, keep)), cu_q, cu_k


def flash_attn_varlen_provider(case):
    from flash_attn import flash_attn_varlen_func

    p = case.params
    unpad, cu_q, cu_k = _unpadding(case)

    left, right = _window(p["variant"])
    # flash-attn's causal is the bottom-right one, and its window (left, right) has our convention.
    window = {"causal": right == 0, "window_size": (left, -1 if right == 0 else right)} if p["variant"] else {}

    def call(q, k, v, kv_lens, mask):
        out = flash_attn_varlen_func(q.flatten(0, 1), unpad(k), unpad(v), cu_q, cu_k, p["q_len"], p["k_len"], **window)
        return out.view(q.shape[0], q.shape[1], q.shape[2], v.shape[3])

    return call


def xformers_provider(case):
    from xformers.ops import fmha

    p = case.params
    if p["variant"]:
        raise ImportError("xformers: causal and windowed cases are not set up for it; left out")
    unpad, _, _ = _unpadding(case)
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens([p["q_len"]] * p["batch"], p["kv_lens"])

    def call(q, k, v, kv_lens, mask):
        group = q.shape[2] // k.shape[2]
        # xFormers takes (1, tokens, heads, dim), each query head with its own key head.
        k, v = (unpad(x).repeat_interleave(group, dim=1).unsqueeze(0) for x in (k, v))
        out = fmha.memory_efficient_attention(q.flatten(0, 1).unsqueeze(0), k, v, attn_bias=bias)
        return out.view(q.shape[0], q.shape[1], q.shape[2], v.shape[3])

    return call


def make_providers(case, options) -> dict:
    p = case.params
    variant = p["variant"]
    providers = {
        "mmkern": lambda q, k, v, kv_lens, mask: ops.cross_modal_attention(q, k, v, kv_lens=kv_lens, **variant),
        "sdpa": sdpa_provider(case),
    }
    if options.device.type == "cuda":
        from torch.nn.attention import SDPBackend

        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            if hasattr(SDPBackend, backend):
                providers[f"sdpa[{backend.lower()}]"] = sdpa_with_backend(case, getattr(SDPBackend, backend))
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
        providers["eager"] = lambda q, k, v, kv_lens, mask: reference.cross_modal_attention(q, k, v, kv_lens=kv_lens,
                                                                                             **variant)[0]
    else:
        options.notes.add(f"eager attention: left out where its score matrix passes "
                          f"{EAGER_SCORE_LIMIT_BYTES / 2**30:.0f} GiB")
    return providers


SUITES = [Suite("cross_modal_attention", "sdpa", ("forward", "forward+backward"), ("quick", "full"),
                cases_by_preset(QUICK_CPU, CPU, CUDA, QUICK_CUDA), make_case, make_providers)]
