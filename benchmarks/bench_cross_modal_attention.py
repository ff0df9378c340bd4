"""Benchmark of mmkern.ops.cross_modal_attention against PyTorch's SDPA as a user would call it (a
boolean key-padding mask; on CUDA also each SDPA backend that accepts the case), flex_attention with
a block mask and flash-attn's varlen function (CUDA, where installed), and the eager reference.

    python benchmarks/bench_cross_modal_attention.py [--device cuda] [--dtype bfloat16] [--cases ...]

Speedups are against SDPA. FLOPs count the valid keys only (the work a padding-aware kernel does):
forward 2 * Hq * Lq * kv_len * (D + Dv) per sample, backward 2.5 times that, as flash-attention counts.
"""

import os
import sys

import torch
import torch.nn.functional as F

from mmkern import ops, reference
from mmkern.bench import Case, describe_environment
from mmkern.bench.cli import benchmark_parser, chosen_cases, device_and_dtype, run_and_report

# name: (B, Lq, Lk, Hq, Hkv, D, Dv, fraction of valid keys). The first three are the CPU targets.
CPU_CASES = {
    "dense": (4, 512, 1024, 8, 8, 64, 64, 1.0),
    "padded_50": (4, 512, 1024, 8, 8, 64, 64, 0.5),
    "few_queries_padded_50": (8, 32, 4096, 8, 8, 64, 64, 0.5),
    "text_over_image_gqa": (8, 64, 576, 16, 4, 64, 64, 0.7),
}
CUDA_CASES = {
    **{f"equal_{n // 1024}k_d{d}": (16384 // n, n, n, 2048 // d, 2048 // d, d, d, 1.0)
       for n in (1024, 4096, 16384) for d in (64, 128)},
    **{f"text_over_image_q{lq}_k{lk}_{round(100 * f)}": (32, lq, lk, 16, 16, 128, 128, f)
       for lq, lk in ((32, 256), (128, 1024), (512, 4096)) for f in (0.3, 0.5, 1.0)},
    **{f"few_queries_q{lq}_k{lk // 1024}k": (4, lq, lk, 16, 16, 128, 128, 1.0)
       for lq in (32, 64) for lk in (4096, 32768)},
    "few_queries_q32_k32k_gqa_d64": (4, 32, 32768, 32, 8, 64, 64, 1.0),
}
# The eager reference stores the (B, Hq, Lq, Lk) scores several times over; above this it is left out.
EAGER_SCORE_LIMIT_BYTES = 2 * 2**30


def key_lengths(batch, k_len, fraction):
    """Per-sample valid keys spread from 0.5x to 1.5x of fraction * Lk (clamped), so samples differ."""
    if fraction >= 1.0:
        return [k_len] * batch
    spread = [0.5 + i / max(batch - 1, 1) for i in range(batch)] if batch > 1 else [1.0]
    return [max(1, min(k_len, round(fraction * k_len * s))) for s in spread]


def make_case(name, batch, q_len, k_len, q_heads, kv_heads, head_dim, v_dim, fraction, element_size):
    lengths = key_lengths(batch, k_len, fraction)
    valid = sum(lengths)
    forward_flops = 2 * q_heads * q_len * valid * (head_dim + v_dim)
    moved = element_size * (batch * q_len * q_heads * (head_dim + v_dim) + valid * kv_heads * (head_dim + v_dim))

    def make_args(device, dtype):
        generator = torch.Generator().manual_seed(0)

        def randn(*shape):
            return torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()

        kv_lens = torch.tensor(lengths, device=device) if fraction < 1.0 else None
        # SDPA's mask: True where a key takes part, (B, 1, 1, Lk).
        mask = None if kv_lens is None else (torch.arange(k_len, device=device) < kv_lens[:, None])[:, None, None, :]
        return (randn(batch, q_len, q_heads, head_dim), randn(batch, k_len, kv_heads, head_dim),
                randn(batch, k_len, kv_heads, v_dim), kv_lens, mask)

    params = {"batch": batch, "q_len": q_len, "k_len": k_len, "q_heads": q_heads, "kv_heads": kv_heads,
              "head_dim": head_dim, "v_dim": v_dim, "kv_lens": lengths}
    return Case(name, make_args, forward_flops, moved, 2.5 * forward_flops, 2 * moved, params)


def _heads_first(*tensors):
    return [t.transpose(1, 2) for t in tensors]


def sdpa(q, k, v, kv_lens, mask):
    q, k, v = _heads_first(q, k, v)
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa).transpose(1, 2)


def sdpa_with_backend(backend):
    from torch.nn.attention import sdpa_kernel

    def call(*args):
        with sdpa_kernel(backend):
            return sdpa(*args)

    return call


def flex_attention_provider(case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = case.params
    lengths = torch.tensor(p["kv_lens"], device="cuda")
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < lengths[b], p["batch"], None, p["q_len"],
                                   p["k_len"], device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)

    def call(q, k, v, kv_lens, mask):
        q, k, v = _heads_first(q, k, v)
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        return compiled(q, k, v, block_mask=block_mask, **gqa).transpose(1, 2)

    return call


def flash_attn_varlen_provider(case):
    from flash_attn import flash_attn_varlen_func

    p = case.params
    lengths = torch.tensor(p["kv_lens"], device="cuda")
    keep = (torch.arange(p["k_len"], device="cuda") < lengths[:, None]).flatten().nonzero().squeeze(1)
    cu_k = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
    cu_q = torch.arange(0, (p["batch"] + 1) * p["q_len"], p["q_len"], device="cuda", dtype=torch.int32)

    def call(q, k, v, kv_lens, mask):
        # A padded batch, unpadded for flash-attn as its users do; the gather is part of the cost.
        unpad = lambda x: x.flatten(0, 1).index_select(0, keep)  # noqa: E731
        out = flash_attn_varlen_func(q.flatten(0, 1), unpad(k), unpad(v), cu_q, cu_k, p["q_len"], p["k_len"])
        return out.view(q.shape[0], q.shape[1], q.shape[2], v.shape[3])

    return call


def make_providers(case, device, with_compile, notes):
    p = case.params
    providers = {
        "mmkern": lambda q, k, v, kv_lens, mask: ops.cross_modal_attention(q, k, v, kv_lens=kv_lens),
        "sdpa": sdpa,
    }
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            if hasattr(SDPBackend, backend):
                providers[f"sdpa[{backend.lower()}]"] = sdpa_with_backend(getattr(SDPBackend, backend))
        if not with_compile:
            notes.add("flex_attention: compiled, so --no-compile leaves it out")
        else:
            try:
                providers["flex_attention"] = flex_attention_provider(case)
            except ImportError:
                notes.add("flex_attention: not in this torch; left out")
        try:
            providers["flash_attn_varlen"] = flash_attn_varlen_provider(case)
        except ImportError:
            notes.add("flash_attn_varlen: flash-attn is not installed; left out")
    else:
        notes.add("flex_attention and flash_attn_varlen: CUDA only; left out on CPU")
    score_bytes = 4 * p["batch"] * p["q_heads"] * p["q_len"] * p["k_len"]
    if score_bytes <= EAGER_SCORE_LIMIT_BYTES:
        providers["eager"] = lambda q, k, v, kv_lens, mask: reference.cross_modal_attention(q, k, v, kv_lens=kv_lens)[0]
    else:
        notes.add(f"eager: left out where its score matrix passes {EAGER_SCORE_LIMIT_BYTES / 2**30:.0f} GiB")
    return providers


def main(argv=None):
    parser = benchmark_parser(__doc__, os.path.join(os.path.dirname(__file__), "results"),
                              default_modes=("forward", "forward+backward"))
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args)
    known = {**CPU_CASES, **CUDA_CASES}
    names = chosen_cases(parser, args, known, CUDA_CASES if device.type == "cuda" else CPU_CASES)
    element_size = torch.empty((), dtype=dtype).element_size()
    cases = [make_case(n, *known[n], element_size) for n in names]

    environment = describe_environment(device)
    print(f"cross_modal_attention on {environment['device']}, {dtype}, torch {environment['torch']}", file=sys.stderr)
    notes = set()
    run_and_report("cross_modal_attention", cases, lambda case: make_providers(case, device, not args.no_compile, notes),
                   args, device, dtype, environment, notes, reference="sdpa")

if __name__ == "__main__":
    main()
