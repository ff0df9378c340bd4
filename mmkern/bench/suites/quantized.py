"""The quantized feature fusion ops, forward only (int8 features carry no gradient):

quantized_concat_linear against the eager path (dequantize, cat, linear in the benchmark dtype),
    per-segment torch._int_mm with the scaling done in eager ops, torchao's int_scaled_matmul
    where installed, and torch.compile of the eager path;
quantize_per_token against its eager composition and torch.compile of it (GB/s: read x, write
    xq and the scales);
quantized_fusion (a weighted sum of three) against dequantize-and-add in eager and compiled.
"""

import functools
import math

import torch

from mmkern import ops, reference
from mmkern.bench.runner import Case
from mmkern.bench.suite import Suite, cases_by_preset

# name: (segment shapes, out_features)
CONCAT_CPU = {
    "broadcast": ([(8, 512, 768), (8, 1, 1024)], 768),
    "all_tokens": ([(8, 512, 768), (8, 512, 1024)], 768),
}
CONCAT_QUICK_CPU = {"small_broadcast": ([(4, 256, 256), (4, 1, 384)], 256), "broadcast": CONCAT_CPU["broadcast"]}
CONCAT_CUDA = {
    **CONCAT_CPU,
    # 16k tokens, widths 1024 to 4096: compute-bound.
    "compute_bound": ([(16, 1024, 2048), (16, 1024, 2048)], 4096),
    "compute_bound_pooled": ([(16, 1024, 1024), (16, 1, 1024)], 2048),
    # narrow projections of many tokens: memory-bound.
    "memory_bound": ([(64, 1024, 64), (64, 1024, 64), (64, 1, 128)], 256),
}
# name: shape
QUANTIZE = {"image_tokens": (64, 576, 1024), "text_tokens": (256, 512, 768), "wide": (16, 1024, 4096)}
QUANTIZE_QUICK_CPU = {"small_tokens": (8, 256, 512), "image_tokens": QUANTIZE["image_tokens"]}
# name: (inputs, shape)
FUSION = {"three_modalities": (3, (32, 576, 1024))}
FUSION_QUICK_CPU = {"small_three_modalities": (3, (4, 256, 512)), "three_modalities": FUSION["three_modalities"]}


def _quantized(shape, generator, device):
    return reference.quantize_per_token(torch.randn(shape, generator=generator).to(device))


def concat_case(name, spec, dtype) -> Case:
    shapes, out_features = spec
    element_size = torch.empty((), dtype=dtype).element_size()
    lead = torch.broadcast_shapes(*(s[:-1] for s in shapes))
    rows, width = math.prod(lead), sum(s[-1] for s in shapes)
    useful = sum(math.prod(s[:-1]) * s[-1] for s in shapes)
    forward_bytes = (
        useful
        + 4 * sum(math.prod(s[:-1]) for s in shapes)
        + out_features * (width + 4 + element_size)
        + rows * out_features * element_size
    )

    def make_args(device, dtype, seed=0):
        generator = torch.Generator().manual_seed(seed)
        pairs = [_quantized(s, generator, device) for s in shapes]
        weight_q, weight_scale = _quantized((out_features, width), generator, device)
        bias = torch.randn(out_features, generator=generator).to(device, dtype)
        return [q for q, _ in pairs], [s for _, s in pairs], weight_q, weight_scale[:, 0], bias

    return Case(
        name,
        make_args,
        2 * out_features * useful,
        forward_bytes,
        0,
        0,
        {"shapes": shapes, "out_features": out_features},
    )


def per_segment_path(scaled_matmul):
    """What a user writes with an int8 GEMM: one call per segment at its own shape (``scaled_matmul(x,
    w, row_scales)``), the weight's scale and the bias applied by eager ops, and the broadcast segments
    added by broadcasting."""

    def path(inputs_q, scales, weight_q, weight_scale, bias, out_dtype):
        out, offset = None, 0
        for x, s in zip(inputs_q, scales):
            width = x.shape[-1]
            term = scaled_matmul(x.reshape(-1, width), weight_q[:, offset : offset + width].t(), s.reshape(-1, 1))
            term = term.view(*x.shape[:-1], -1).float()
            out = term if out is None else out + term
            offset += width
        return (out * weight_scale + bias).to(out_dtype)

    return path


int_mm_path = per_segment_path(lambda x, w, s: torch._int_mm(x, w).float() * s)


def concat_providers(case, options) -> dict:
    dtype = options.dtype
    providers = {
        "mmkern": lambda *a: ops.quantized_concat_linear(*a, out_dtype=dtype),
        "eager": lambda *a: reference.quantized_concat_linear(*a, out_dtype=dtype),
        "torch._int_mm": lambda *a: int_mm_path(*a, dtype),
    }
    try:
        from torchao.kernel.intmm import int_scaled_matmul

        torchao_path = per_segment_path(int_scaled_matmul)  # the row scales fused into the GEMM
        providers["torchao"] = lambda *a: torchao_path(*a, dtype)
    except ImportError:
        options.notes.add("torchao: not installed; left out")
    if options.with_compile:
        compiled = torch.compile(functools.partial(reference.quantized_concat_linear, out_dtype=dtype), dynamic=False)
        providers["torch.compile"] = lambda *a: compiled(*a)
    return providers


def quantize_case(name, shape, dtype) -> Case:
    element_size = torch.empty((), dtype=dtype).element_size()
    numel, rows = math.prod(shape), math.prod(shape[:-1])

    def make_args(device, dtype, seed=0):
        return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype),)

    return Case(name, make_args, 0, numel * (element_size + 1) + 4 * rows, 0, 0, {"shape": shape})


def quantize_providers(case, options) -> dict:
    providers = {
        "mmkern": lambda x: ops.quantize_per_token(x)[0],
        "eager": lambda x: reference.quantize_per_token(x)[0],
    }
    if options.with_compile:
        compiled = torch.compile(reference.quantize_per_token, dynamic=False)
        providers["torch.compile"] = lambda x: compiled(x)[0]
    return providers


def fusion_case(name, spec, dtype) -> Case:
    count, shape = spec
    element_size = torch.empty((), dtype=dtype).element_size()
    numel, rows = math.prod(shape), math.prod(shape[:-1])

    def make_args(device, dtype, seed=0):
        generator = torch.Generator().manual_seed(seed)
        pairs = [_quantized(shape, generator, device) for _ in range(count)]
        return [q for q, _ in pairs], [s for _, s in pairs], torch.linspace(0.5, 1.5, count, device=device)

    return Case(
        name, make_args, 0, count * (numel + 4 * rows) + numel * element_size, 0, 0, {"inputs": count, "shape": shape}
    )


def fusion_providers(case, options) -> dict:
    dtype = options.dtype
    providers = {
        "mmkern": lambda xs, ss, w: ops.quantized_fusion(xs, ss, w, out_dtype=dtype),
        "eager": lambda xs, ss, w: reference.quantized_fusion(xs, ss, w, out_dtype=dtype),
    }
    if options.with_compile:
        compiled = torch.compile(functools.partial(reference.quantized_fusion, out_dtype=dtype), dynamic=False)
        providers["torch.compile"] = lambda xs, ss, w: compiled(xs, ss, w)
    return providers


FORWARD = ("forward",)
SUITES = [
    Suite(
        "quantized_concat_linear",
        "eager",
        FORWARD,
        ("quick", "full"),
        cases_by_preset(CONCAT_QUICK_CPU, CONCAT_CPU, CONCAT_CUDA, ("all_tokens", "compute_bound")),
        concat_case,
        concat_providers,
        compute="int8",
    ),
    Suite(
        "quantize_per_token",
        "eager",
        FORWARD,
        ("quick", "full"),
        cases_by_preset(QUANTIZE_QUICK_CPU, QUANTIZE, QUANTIZE, ("image_tokens",)),
        quantize_case,
        quantize_providers,
    ),
    Suite(
        "quantized_fusion",
        "eager",
        FORWARD,
        ("quick", "full"),
        cases_by_preset(FUSION_QUICK_CPU, FUSION, FUSION, ("three_modalities",)),
        fusion_case,
        fusion_providers,
    ),
]
