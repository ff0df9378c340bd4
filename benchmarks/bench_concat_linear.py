"""Benchmark of mmkern.ops.concat_linear against the eager composition (cat + linear + activation)
and torch.compile of it, forward, backward and forward+backward.

    python benchmarks/bench_concat_linear.py [--device cuda] [--dtype bfloat16] [--cases broadcast,...]

FLOPs count the useful work (each segment projected at its own leading shape), the same figure for
every provider; bytes count each input, weight and output once.
"""

import functools
import math
import os
import sys

import torch

from mmkern import ops, reference
from mmkern.bench import Case, describe_environment
from mmkern.bench.cli import benchmark_parser, chosen_cases, device_and_dtype, run_and_report

# name: (segment shapes, out_features, activation). The first two are the CPU targets.
CPU_CASES = {
    "broadcast": ([(8, 512, 768), (8, 1, 1024)], 768, "none"),
    "all_tokens": ([(8, 512, 768), (8, 512, 1024)], 768, "none"),
    "narrow_three_modalities": ([(32, 512, 64), (32, 512, 64), (32, 1, 128)], 128, "gelu"),
}
CUDA_CASES = {
    **CPU_CASES,
    "memory_bound": ([(64, 1024, 64), (64, 1024, 64), (64, 1, 128)], 256, "silu"),
    "compute_bound": ([(16, 1024, 2048), (16, 1024, 2048)], 4096, "none"),
    "broadcast_large": ([(32, 1024, 1024), (32, 1, 1024)], 1024, "gelu"),
}


def make_case(name, shapes, out_features, activation, element_size):
    lead = torch.broadcast_shapes(*(s[:-1] for s in shapes))
    rows, width = math.prod(lead), sum(s[-1] for s in shapes)
    useful = sum(math.prod(s[:-1]) * s[-1] for s in shapes)  # input elements, each projected once
    forward_flops = 2 * out_features * useful
    weight_elements = out_features * width
    forward_bytes = element_size * (useful + weight_elements + out_features + rows * out_features)
    backward_bytes = element_size * (rows * out_features + 2 * useful + 2 * weight_elements + out_features)

    def make_args(device, dtype):
        generator = torch.Generator().manual_seed(0)
        inputs = [torch.randn(s, generator=generator).to(device, dtype).requires_grad_() for s in shapes]
        weight = (torch.randn(out_features, width, generator=generator) / math.sqrt(width)).to(device, dtype)
        bias = torch.randn(out_features, generator=generator).to(device, dtype)
        return inputs, weight.requires_grad_(), bias.requires_grad_()

    params = {"shapes": shapes, "out_features": out_features, "activation": activation}
    return Case(name, make_args, forward_flops, forward_bytes, 2 * forward_flops, backward_bytes, params)


def make_providers(case, with_compile):
    activation = case.params["activation"]
    providers = {
        "mmkern": lambda xs, w, b: ops.concat_linear(xs, w, b, activation=activation),
        "eager": lambda xs, w, b: reference.concat_linear(xs, w, b, activation=activation),
    }
    if with_compile:
        # A fresh compiled function per case, so no case falls back to eager on dynamo's cache limit.
        compiled = torch.compile(functools.partial(reference.concat_linear, activation=activation), dynamic=False)
        providers["torch.compile"] = lambda xs, w, b: compiled(xs, w, b)
    return providers


def main(argv=None):
    parser = benchmark_parser(__doc__, os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args)
    names = chosen_cases(parser, args, CUDA_CASES, CUDA_CASES if device.type == "cuda" else CPU_CASES)
    element_size = torch.empty((), dtype=dtype).element_size()
    cases = [make_case(n, *CUDA_CASES[n], element_size) for n in names]

    environment = describe_environment(device)
    print(f"concat_linear on {environment['device']}, {dtype}, torch {environment['torch']}", file=sys.stderr)
    run_and_report("concat_linear", cases, lambda case: make_providers(case, not args.no_compile), args, device,
                   dtype, environment)

if __name__ == "__main__":
    main()
