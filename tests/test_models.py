import itertools

import pytest
import torch

from mmkern.models import FUSIONS, IMAGE_ENCODERS, TEXT_ENCODERS, TriModalClassifier, VisionTextClassifier
from mmkern.nn import set_backend
from tests.numerics import DEVICES

NUM_CLASSES, VOCAB, BINS, DIM = 5, 11, 9, 16


def vision_text_batch(device, generator):
    images = torch.randn(4, 1, 8, 8, generator=generator).to(device)
    text_lens = torch.tensor([3, 1, 0, 6], device=device)
    text_ids = torch.randint(1, VOCAB, (4, 6), generator=generator).to(device)
    text_ids = text_ids * (torch.arange(6, device=device) < text_lens[:, None])
    return images, text_ids, text_lens


def trimodal_batch(device, generator):
    images, text_ids, text_lens = vision_text_batch(device, generator)
    audio_lens = torch.tensor([5, 2, 1, 3], device=device)
    audio = torch.randn(4, 5, BINS, generator=generator).to(device)
    return images, audio, audio_lens, text_ids, text_lens


def vision_text(image_encoder, text_encoder, fusion, backend="mmkern"):
    return VisionTextClassifier(
        NUM_CLASSES,
        VOCAB,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        fusion=fusion,
        dim=DIM,
        image_size=8,
        patch_size=4,
        depth=1,
        heads=2,
        max_text_length=8,
        backend=backend,
    )


def outputs_and_gradients(model, inputs):
    logits = model(*inputs)
    weights = torch.linspace(-1, 1, logits.numel(), device=logits.device).reshape(logits.shape)
    gradients = torch.autograd.grad((logits * weights).sum(), list(model.parameters()))
    return logits, gradients


def assert_backends_agree(model, inputs, tolerance):
    """The same parameters on mmkern's kernels and on the eager reference ops give the same logits and
    parameter gradients, within float32 roundoff (int8 features can round the other way where the
    two float32 results straddle a rounding boundary, hence the quantized models' wider tolerance)."""
    logits, gradients = outputs_and_gradients(set_backend(model, "mmkern"), inputs)
    eager_logits, eager_gradients = outputs_and_gradients(set_backend(model, "eager"), inputs)
    scale = eager_logits.abs().max().item()
    torch.testing.assert_close(logits, eager_logits, rtol=tolerance, atol=tolerance * scale)
    for (name, _), a, e in zip(model.named_parameters(), gradients, eager_gradients):
        torch.testing.assert_close(
            a,
            e,
            rtol=tolerance,
            atol=tolerance * max(e.abs().max().item(), 1e-3),
            msg=lambda m, name=name: f"gradient of {name}: {m}",
        )
    assert torch.isfinite(logits).all()
    return logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("image_encoder,text_encoder", list(itertools.product(IMAGE_ENCODERS, TEXT_ENCODERS)))
@pytest.mark.parametrize("fusion", FUSIONS)
def test_vision_text_backends_agree(device, image_encoder, text_encoder, fusion):
    torch.manual_seed(0)
    model = vision_text(image_encoder, text_encoder, fusion).to(device)
    inputs = vision_text_batch(device, torch.Generator().manual_seed(1))
    logits = assert_backends_agree(model, inputs, 2e-2 if fusion == "quantized" else 2e-4)
    assert logits.shape == (4, NUM_CLASSES)


@pytest.mark.parametrize("device", DEVICES)
def test_trimodal_backends_agree_and_cached_features_classify_the_same(device):
    torch.manual_seed(0)
    model = TriModalClassifier(NUM_CLASSES, VOCAB, BINS, dim=DIM, heads=2).to(device)
    inputs = trimodal_batch(device, torch.Generator().manual_seed(1))
    assert_backends_agree(model, inputs, 2e-2)
    for backend in ("mmkern", "eager"):
        set_backend(model, backend)
        pairs = model.encode(*inputs)
        assert all(q.dtype == torch.int8 and s.shape == (4, 1) for q, s in pairs)
        torch.testing.assert_close(model.classify(pairs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_padding_never_reaches_the_answer():
    # Whatever the ids past a sample's length, its logits are the same: lengths, not pad ids, decide.
    torch.manual_seed(0)
    for text_encoder in TEXT_ENCODERS:
        model = vision_text("cnn", text_encoder, "attention").eval()
        images, text_ids, text_lens = vision_text_batch("cpu", torch.Generator().manual_seed(2))
        noisy = torch.where(torch.arange(6) < text_lens[:, None], text_ids, torch.randint_like(text_ids, 1, VOCAB))
        torch.testing.assert_close(model(images, noisy, text_lens), model(images, text_ids, text_lens))


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_encoder must be one of"):
        vision_text("resnet", "gru", "concat")
    with pytest.raises(ValueError, match="text_encoder must be one of"):
        vision_text("cnn", "lstm", "concat")
    with pytest.raises(ValueError, match="fusion must be one of"):
        vision_text("cnn", "gru", "bilinear")
    with pytest.raises(ValueError, match="backend must be one of"):
        vision_text("cnn", "gru", "concat", backend="cuda")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionTextClassifier(2, 5, image_encoder="vit", image_size=10, patch_size=4)
    model = vision_text("cnn", "transformer", "concat")
    with pytest.raises(ValueError, match="longer than max_length"):
        model(torch.randn(1, 1, 8, 8), torch.ones(1, 9, dtype=torch.long), torch.tensor([9]))


COMPILED_MODELS = {
    **{f"cnn_gru_{fusion}": lambda fusion=fusion: vision_text("cnn", "gru", fusion) for fusion in FUSIONS},
    "vit_transformer_attention": lambda: vision_text("vit", "transformer", "attention"),
    "trimodal": lambda: TriModalClassifier(NUM_CLASSES, VOCAB, BINS, dim=DIM, heads=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mmkern", "eager"])
@pytest.mark.parametrize("name", list(COMPILED_MODELS))
def test_compiles_whole_for_forward_and_backward(name, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = set_backend(COMPILED_MODELS[name](), backend)
    generator = torch.Generator().manual_seed(1)
    inputs = trimodal_batch("cpu", generator) if name == "trimodal" else vision_text_batch("cpu", generator)
    expected, expected_gradients = outputs_and_gradients(model, inputs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    logits, gradients = outputs_and_gradients(compiled, inputs)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for a, e in zip(gradients, expected_gradients):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiles_with_inductor():
    # aot_eager above proves every model traces whole; inductor, the default backend, also generates code for it.
    torch._dynamo.reset()
    model = COMPILED_MODELS["vit_transformer_attention"]()
    inputs = vision_text_batch("cpu", torch.Generator().manual_seed(1))
    expected, expected_gradients = outputs_and_gradients(model, inputs)
    logits, gradients = outputs_and_gradients(torch.compile(model, fullgraph=True), inputs)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    for a, e in zip(gradients, expected_gradients):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-5)
