"""concat_linear against the eager composition (cat + linear + activation) and torch.compile of it.

FLOPs count the useful work (each segment projected at its own leading shape), the same figure for
every provider; bytes count each input, weight and output once.
"""

import functools
import math

import torch

from mmkern import ops, reference
from mmkern.bench.runner import MODES, Case
from mmkern.bench.suite import Suite, cases_by_preset

# name: (segment shapes, out_features, activation)
CPU = {
    "broadcast": ([(8, 512, 768), (8, 1, 1024)], 768, "none"),
    "all_tokens": ([(8, 512, 768), (8, 512, 1024)], 768, "none"),
    "narrow_three_modalities": ([(32, 512, 64), (32, 512, 64), (32, 1, 128)], 128, "gelu"),
}
CUDA = {
    **CPU,
    "memory_bound": ([(64, 1024, 64), (64, 1024, 64), (64, 1, 128)], 256, "silu"),
    "compute_bound": ([(16, 1024, 2048), (16, 1024, 2048)], 4096, "none"),
    "broadcast_large": ([(32, 1024, 1024), (32, 1, 1024)], 1024, "gelu"),
}


QUICK_CPU = {"small_broadcast": ([(4, 256, 256), (4, 1, 384)], 256, "gelu"), "broadcast": CPU["broadcast"]}


def make_case(name, spec, dtype) -> Case:
    shapes, out_features, activation = spec
    element_size = torch.empty((), dtype=dtype).element_size()
    lead = torch.broadcast_shapes(*(s[:-1] for s in shapes))
    rows, width = math.prod(lead), sum(s[-1] for s in shapes)
    useful = sum(math.prod(s[:-1]) * s[-1] for s in shapes)  # input elements, each projected once
    forward_flops = 2 * out_features * useful
    weight_elements = out_features * width
    forward_bytes = element_size * (useful + weight_elements + out_features + rows * out_features)
    backward_bytes = element_size * (rows * out_features + 2 * useful + 2 * weight_elements + out_features)

    def make_args(device, dtype, seed=0):
        generator = torch.Generator().manual_seed(seed)
        inputs = [torch.randn(s, generator=generator).to(device, dtype).requires_grad_() for s in shapes]
        weight = (torch.randn(out_features, width, generator=generator) / math.sqrt(width)).to(device, dtype)
        bias = torch.randn(out_features, generator=generator).to(device, dtype)
        return inputs, weight.requires_grad_(), bias.requires_grad_()

    params = {"shapes": shapes, "out_features": out_features, "activation": activation}
    return Case(name, make_args, forward_flops, forward_bytes, 2 * forward_flops, backward_bytes, params)


def make_providers(case, options) -> dict:
    activation = case.params["activation"]
    providers = {
        "mmkern": lambda xs, w, b: ops.concat_linear(xs, w, b, activation=activation),
        "eager": lambda xs, w, b: reference.concat_linear(xs, w, b, activation=activation),
    }
    if options.with_compile:
        # A fresh compiled function per case, so no case falls back to eager on dynamo's cache limit.
        compiled = torch.compile(functools.partial(reference.concat_linear, activation=activation), dynamic=False)
        providers["torch.compile"] = lambda xs, w, b: compiled(xs, w, b)
    options.notes.add(
        "concat_linear: no other library fuses a concat into a projection; Liger's and "
        "torchao's linears take one input, so the eager cat + linear is their path"
    )
    return providers


SUITES = [
    Suite(
        "concat_linear",
        "eager",
        MODES,
        ("quick", "full"),
        cases_by_preset(QUICK_CPU, CPU, CUDA, ("broadcast", "memory_bound")),
        make_case,
        make_providers,
    )
]
