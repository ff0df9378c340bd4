"""Training steps (forward and backward of every parameter) of mmkern's complete models: the model on
mmkern's kernels against the same parameters on the eager reference ops, and against torch.compile of
that eager model, with each one's peak memory.

The CUDA cases are realistic sizes (a ViT-B/16-like 196 image tokens 768 wide with 128 text tokens; a
perceiver of 64 latents over 2048 video tokens); the CPU cases are the same models narrower and
shorter, sized for a few cores. Text lengths are random (50-100% of the longest, right-padded).
"""

import copy
import functools

import torch

from mmkern.bench.runner import Case
from mmkern.bench.suite import Suite
from mmkern.models import FlamingoLM, TriModalClassifier, VisionTextClassifier
from mmkern.nn import set_backend

VOCAB, CLASSES, BINS = 1000, 100, 128

# name: (model class, model keyword arguments, input sizes)
CPU = {
    "vision_text": (
        VisionTextClassifier,
        dict(
            num_classes=CLASSES,
            vocab_size=VOCAB,
            image_encoder="vit",
            text_encoder="transformer",
            fusion="attention",
            dim=256,
            heads=4,
            depth=2,
            image_size=64,
            patch_size=8,
            in_channels=3,
            max_text_length=64,
        ),
        dict(batch=8, text=64),
    ),
    "flamingo": (
        FlamingoLM,
        dict(
            vocab_size=VOCAB,
            image_encoder="vit",
            dim=256,
            heads=4,
            depth=2,
            num_latents=64,
            image_size=64,
            patch_size=4,
            in_channels=3,
            max_text_length=64,
        ),
        dict(batch=4, frames=2, text=64),
    ),
    "trimodal": (
        TriModalClassifier,
        dict(num_classes=CLASSES, vocab_size=VOCAB, audio_bins=BINS, dim=256, heads=4, in_channels=3),
        dict(batch=32, image_size=32, text=32, audio=100),
    ),
}
CUDA = {
    "vision_text": (
        VisionTextClassifier,
        dict(
            num_classes=CLASSES,
            vocab_size=VOCAB,
            image_encoder="vit",
            text_encoder="transformer",
            fusion="attention",
            dim=768,
            heads=12,
            depth=12,
            image_size=224,
            patch_size=16,
            in_channels=3,
            max_text_length=128,
        ),
        dict(batch=32, text=128),
    ),
    "flamingo": (
        FlamingoLM,
        dict(
            vocab_size=VOCAB,
            image_encoder="vit",
            dim=768,
            heads=12,
            depth=4,
            num_latents=64,
            image_size=256,
            patch_size=16,
            in_channels=3,
            max_frames=8,
            max_text_length=64,
        ),
        dict(batch=8, frames=8, text=64),
    ),
    "trimodal": (
        TriModalClassifier,
        dict(num_classes=CLASSES, vocab_size=VOCAB, audio_bins=BINS, dim=768, heads=12, in_channels=3),
        dict(batch=256, image_size=64, text=64, audio=400),
    ),
}


def cases(preset: str, device_type: str) -> dict:
    return CUDA if device_type == "cuda" else CPU


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
    return (
        randn(batch, 3, sizes["image_size"], sizes["image_size"]),
        randn(batch, sizes["audio"], BINS),
        audio_lens,
        text_ids,
        text_lens,
    )


def make_case(name, spec, dtype) -> Case:
    model_class, kwargs, sizes = spec

    def make_args(device, dtype, seed=0):
        if getattr(make_args, "model", None) is None:
            torch.manual_seed(0)
            make_args.model = model_class(**kwargs).to(device, dtype)
        # The arguments are the parameters (leaves that require grad: the step's backward reaches all
        # of them) and the inputs; each provider runs its own copy of the model on them.
        generator = torch.Generator().manual_seed(seed)
        params = {
            n: (p.detach() + 0.01 * torch.randn(p.shape, generator=generator).to(p)).requires_grad_()
            for n, p in make_args.model.named_parameters()
        }
        return (params, *model_inputs(model_class, kwargs, sizes, device, dtype, generator))

    return Case(name, make_args, 0, 0, 0, 0, {"model": model_class.__name__, **kwargs, **sizes})


def make_providers(case, options) -> dict:
    model = case.make_args.model
    eager = set_backend(copy.deepcopy(model), "eager")
    step = torch.func.functional_call
    providers = {
        "mmkern": lambda params, *x: step(model, params, x),
        "eager": lambda params, *x: step(eager, params, x),
    }
    if options.with_compile:
        compiled = torch.compile(functools.partial(step, eager), dynamic=False)
        providers["torch.compile"] = lambda params, *x: compiled(params, x)
    return providers


SUITES = [Suite("models", "eager", ("forward+backward",), ("models",), cases, make_case, make_providers)]
