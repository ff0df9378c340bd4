"""End-to-end training steps (forward and backward of every parameter) of mmkern's complete models:
the model on mmkern's kernels against the same parameters on the eager reference ops, and against
torch.compile of that eager model. Reports the step time and peak memory of each.

    python benchmarks/bench_models.py [--device cuda] [--dtype bfloat16] [--cases vision_text,...]

The CUDA cases are the realistic sizes (a ViT-B/16-like 196 image tokens 768 wide with 128 text
tokens; a perceiver of 64 latents over 2048 video tokens); the CPU cases are the same models narrower
and shorter, sized for a few cores. Text lengths are random (50-100% of the longest, right-padded).
"""

import copy
import functools
import os
import sys

import torch

from mmkern.bench import Case, describe_environment
from mmkern.bench.cli import benchmark_parser, chosen_cases, device_and_dtype, run_and_report
from mmkern.models import FlamingoLM, TriModalClassifier, VisionTextClassifier
from mmkern.nn import set_backend

VOCAB, CLASSES, BINS = 1000, 100, 128

# name: (model class, model keyword arguments, input sizes)
CPU_CASES = {
    "vision_text": (VisionTextClassifier, dict(num_classes=CLASSES, vocab_size=VOCAB, image_encoder="vit",
                                               text_encoder="transformer", fusion="attention", dim=256, heads=4,
                                               depth=2, image_size=64, patch_size=8, in_channels=3,
                                               max_text_length=64), dict(batch=8, text=64)),
    "flamingo": (FlamingoLM, dict(vocab_size=VOCAB, image_encoder="vit", dim=256, heads=4, depth=2, num_latents=64,
                                  image_size=64, patch_size=4, in_channels=3, max_text_length=64),
                 dict(batch=4, frames=2, text=64)),
    "trimodal": (TriModalClassifier, dict(num_classes=CLASSES, vocab_size=VOCAB, audio_bins=BINS, dim=256, heads=4,
                                          in_channels=3), dict(batch=32, image_size=32, text=32, audio=100)),
}
CUDA_CASES = {
    "vision_text": (VisionTextClassifier, dict(num_classes=CLASSES, vocab_size=VOCAB, image_encoder="vit",
                                               text_encoder="transformer", fusion="attention", dim=768, heads=12,
                                               depth=12, image_size=224, patch_size=16, in_channels=3,
                                               max_text_length=128), dict(batch=32, text=128)),
    "flamingo": (FlamingoLM, dict(vocab_size=VOCAB, image_encoder="vit", dim=768, heads=12, depth=4, num_latents=64,
                                  image_size=256, patch_size=16, in_channels=3, max_frames=8, max_text_length=64),
                 dict(batch=8, frames=8, text=64)),
    "trimodal": (TriModalClassifier, dict(num_classes=CLASSES, vocab_size=VOCAB, audio_bins=BINS, dim=768, heads=12,
                                          in_channels=3), dict(batch=256, image_size=64, text=64, audio=400)),
}


def model_inputs(model_class, kwargs, sizes, device, dtype, generator):
    batch = sizes["batch"]

    def randn(*shape):
        return torch.randn(shape, generator=generator).to(device, dtype)

    def lengths(longest):
        return torch.randint(longest // 2, longest + 1, (batch,), generator=generator).to(device)

    text_lens = lengths(sizes["text"])
    text_ids = torch.randint(1, VOCAB, (batch, sizes["text"]), generator=generator).to(device)
    text_ids = text_ids * (torch.arange(sizes["text"], device=device) < text_lens[:, None])
    if model_class is VisionTextClassifier:
        return randn(batch, 3, kwargs["image_size"], kwargs["image_size"]), text_ids, text_lens
    if model_class is FlamingoLM:
        return randn(batch, sizes["frames"], 3, kwargs["image_size"], kwargs["image_size"]), text_ids, text_lens
    audio_lens = lengths(sizes["audio"])
    return (randn(batch, 3, sizes["image_size"], sizes["image_size"]), randn(batch, sizes["audio"], BINS), audio_lens,
            text_ids, text_lens)


def make_case(name, model_class, kwargs, sizes):
    def make_args(device, dtype):
        torch.manual_seed(0)
        model = model_class(**kwargs).to(device, dtype)
        # The arguments are the parameters (leaves that require grad: the step's backward reaches all
        # of them) and the inputs; each provider runs its own copy of the model on them.
        params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        make_args.model = model
        return (params, *model_inputs(model_class, kwargs, sizes, device, dtype, torch.Generator().manual_seed(1)))

    return Case(name, make_args, 0, 0, 0, 0, {"model": model_class.__name__, **kwargs, **sizes})


def make_providers(case, with_compile):
    model = case.make_args.model
    eager = set_backend(copy.deepcopy(model), "eager")
    step = torch.func.functional_call
    providers = {"mmkern": lambda params, *x: step(model, params, x),
                 "eager": lambda params, *x: step(eager, params, x)}
    if with_compile:
        compiled = torch.compile(functools.partial(step, eager), dynamic=False)
        providers["torch.compile"] = lambda params, *x: compiled(params, x)
    return providers


def main(argv=None):
    parser = benchmark_parser(__doc__, os.path.join(os.path.dirname(__file__), "results"),
                              default_modes=("forward+backward",))
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args)
    table = CUDA_CASES if device.type == "cuda" else CPU_CASES
    names = chosen_cases(parser, args, table, table)
    cases = [make_case(n, *table[n]) for n in names]
    environment = describe_environment(device)
    print(f"models on {environment['device']}, {dtype}, torch {environment['torch']}", file=sys.stderr)
    run_and_report("models", cases, lambda case: make_providers(case, not args.no_compile), args, device, dtype,
                   environment)


if __name__ == "__main__":
    main()
