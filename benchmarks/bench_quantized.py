"""Benchmark of the quantized feature fusion ops, forward (int8 features carry no gradient):

  quantized_concat_linear against the eager path (dequantize, cat, linear in the benchmark dtype),
      per-segment torch._int_mm with the scaling done in eager ops, and torch.compile of the eager path;
  quantize_per_token against its eager composition and torch.compile of it (GB/s: read x, write
      xq and the scales);
  quantized_fusion (sum of three) against dequantize-and-add in eager.

    python benchmarks/bench_quantized.py [--device cuda] [--dtype bfloat16] [--cases broadcast,...]

It also prints the memory of stored features: int8 with one float32 scale per token against bf16.
"""

import functools
import math
import os
import sys

import torch

from mmkern import ops, reference
from mmkern.bench import Case, describe_environment
from mmkern.bench.cli import benchmark_parser, chosen_cases, device_and_dtype, run_and_report

# name: (segment shapes, out_features). The first two are the CPU target's shapes.
CONCAT_CPU_CASES = {
    "broadcast": ([(8, 512, 768), (8, 1, 1024)], 768),
    "all_tokens": ([(8, 512, 768), (8, 512, 1024)], 768),
}
CONCAT_CUDA_CASES = {
    **CONCAT_CPU_CASES,
    # 16k tokens, widths 1024 to 4096: the compute-bound target.
    "compute_bound": ([(16, 1024, 2048), (16, 1024, 2048)], 4096),
    "compute_bound_pooled": ([(16, 1024, 1024), (16, 1, 1024)], 2048),
    # narrow projections of many tokens: the memory-bound target.
    "memory_bound": ([(64, 1024, 64), (64, 1024, 64), (64, 1, 128)], 256),
}
QUANTIZE_CASES = {"image_tokens": (64, 576, 1024), "text_tokens": (256, 512, 768), "wide": (16, 1024, 4096)}
FUSION_CASES = {"three_modalities": (3, (32, 576, 1024))}
SUBSETS = {"quantized_concat_linear": CONCAT_CUDA_CASES, "quantize_per_token": QUANTIZE_CASES, "quantized_fusion": FUSION_CASES}


def _quantized(shape, generator, device):
    return reference.quantize_per_token(torch.randn(shape, generator=generator).to(device))


def concat_case(name, shapes, out_features, element_size):
    lead = torch.broadcast_shapes(*(s[:-1] for s in shapes))
    rows, width = math.prod(lead), sum(s[-1] for s in shapes)
    useful = sum(math.prod(s[:-1]) * s[-1] for s in shapes)
    forward_bytes = useful + 4 * sum(math.prod(s[:-1]) for s in shapes) + out_features * (width + 4 + element_size) \
        + rows * out_features * element_size

    def make_args(device, dtype):
        generator = torch.Generator().manual_seed(0)
        pairs = [_quantized(s, generator, device) for s in shapes]
        weight_q, weight_scale = _quantized((out_features, width), generator, device)
        bias = torch.randn(out_features, generator=generator).to(device, dtype)
        return [q for q, _ in pairs], [s for _, s in pairs], weight_q, weight_scale[:, 0], bias

    return Case(name, make_args, 2 * out_features * useful, forward_bytes, 0, 0,
                {"shapes": shapes, "out_features": out_features})


def int_mm_path(inputs_q, scales, weight_q, weight_scale, bias, out_dtype):
    """What a user writes with torch._int_mm: one int8 GEMM per segment at its own shape, the scales
    applied by eager ops and the broadcast segments added by broadcasting."""
    offset, out = 0, None
    for x, s in zip(inputs_q, scales):
        width = x.shape[-1]
        products = torch._int_mm(x.reshape(-1, width), weight_q[:, offset:offset + width].t())
        term = products.view(*x.shape[:-1], -1).float() * s
        out = term if out is None else out + term
        offset += width
    return (out * weight_scale + bias).to(out_dtype)


def concat_providers(with_compile, dtype):
    providers = {
        "mmkern": lambda *a: ops.quantized_concat_linear(*a, out_dtype=dtype),
        "eager": lambda *a: reference.quantized_concat_linear(*a, out_dtype=dtype),
        "torch._int_mm": lambda *a: int_mm_path(*a, dtype),
    }
    if with_compile:
        compiled = torch.compile(functools.partial(reference.quantized_concat_linear, out_dtype=dtype), dynamic=False)
        providers["torch.compile"] = lambda *a: compiled(*a)
    return providers


def quantize_case(name, shape, element_size):
    numel, rows = math.prod(shape), math.prod(shape[:-1])

    def make_args(device, dtype):
        return (torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype),)

    return Case(name, make_args, 0, numel * (element_size + 1) + 4 * rows, 0, 0, {"shape": shape})


def quantize_providers(with_compile):
    providers = {"mmkern": lambda x: ops.quantize_per_token(x)[0], "eager": lambda x: reference.quantize_per_token(x)[0]}
    if with_compile:
        compiled = torch.compile(reference.quantize_per_token, dynamic=False)
        providers["torch.compile"] = lambda x: compiled(x)[0]
    return providers


def fusion_case(name, count, shape, element_size):
    numel, rows = math.prod(shape), math.prod(shape[:-1])

    def make_args(device, dtype):
        generator = torch.Generator().manual_seed(0)
        pairs = [_quantized(shape, generator, device) for _ in range(count)]
        return [q for q, _ in pairs], [s for _, s in pairs], torch.linspace(0.5, 1.5, count, device=device)

    return Case(name, make_args, 0, count * (numel + 4 * rows) + numel * element_size, 0, 0,
                {"inputs": count, "shape": shape})


def fusion_providers(dtype):
    return {"mmkern": lambda xs, ss, w: ops.quantized_fusion(xs, ss, w, out_dtype=dtype),
            "eager": lambda xs, ss, w: reference.quantized_fusion(xs, ss, w, out_dtype=dtype)}


def stored_feature_memory(shape=(576, 1024)) -> str:
    xq, scale = ops.quantize_per_token(torch.randn(shape, dtype=torch.bfloat16))
    stored = xq.numel() * xq.element_size() + scale.numel() * scale.element_size()
    bf16 = math.prod(shape) * 2
    return (f"stored features {shape}: int8 + float32 scale per token {stored} bytes, bf16 {bf16} bytes: "
            f"{stored / bf16:.3f}x")


def main(argv=None):
    parser = benchmark_parser(__doc__, os.path.join(os.path.dirname(__file__), "results"), default_modes=("forward",))
    parser.add_argument("--ops", default=",".join(SUBSETS), help=f"comma-separated, of {', '.join(SUBSETS)}")
    args = parser.parse_args(argv)
    if args.modes != "forward":
        parser.error("quantized features carry no gradient: only --modes forward")
    device, dtype = device_and_dtype(args)
    element_size = torch.empty((), dtype=dtype).element_size()
    environment = describe_environment(device)
    print(f"quantized ops on {environment['device']}, {dtype}, torch {environment['torch']}", file=sys.stderr)
    with_compile = not args.no_compile
    for op in args.ops.split(","):
        if op == "quantized_concat_linear":
            default = CONCAT_CUDA_CASES if device.type == "cuda" else CONCAT_CPU_CASES
            cases = [concat_case(n, *CONCAT_CUDA_CASES[n], element_size)
                     for n in chosen_cases(parser, args, {**CONCAT_CUDA_CASES, **QUANTIZE_CASES, **FUSION_CASES}, default)
                     if n in CONCAT_CUDA_CASES]
            make = lambda case: concat_providers(with_compile, dtype)  # noqa: E731
        elif op == "quantize_per_token":
            cases = [quantize_case(n, QUANTIZE_CASES[n], element_size) for n in (args.cases or "").split(",")
                     if n in QUANTIZE_CASES] or [quantize_case(n, s, element_size) for n, s in QUANTIZE_CASES.items()]
            make = lambda case: quantize_providers(with_compile)  # noqa: E731
        elif op == "quantized_fusion":
            cases = [fusion_case(n, *FUSION_CASES[n], element_size) for n in FUSION_CASES]
            make = lambda case: fusion_providers(dtype)  # noqa: E731
        else:
            parser.error(f"unknown op {op!r}; known: {', '.join(SUBSETS)}")
        if not cases:
            continue
        run_and_report(op, cases, make, args, device, dtype, environment, modes=["forward"])
    print("\n" + stored_feature_memory())


if __name__ == "__main__":
    main()
