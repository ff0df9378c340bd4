import pytest
import torch

from mmkern.models import FlamingoLM
from mmkern.nn import set_backend
from tests.test_models import assert_backends_agree, outputs_and_gradients

VOCAB = 20


def flamingo(image_encoder="cnn"):
    torch.manual_seed(0)
    # Open gates, so that the cross-attention and everything behind it shape the logits and gradients.
    return FlamingoLM(
        VOCAB,
        image_encoder=image_encoder,
        dim=16,
        depth=2,
        heads=2,
        num_latents=4,
        resampler_depth=1,
        image_size=8,
        patch_size=4,
        max_frames=3,
        max_text_length=10,
        gate_init=0.5,
    )


def video_batch(device="cpu"):
    generator = torch.Generator().manual_seed(1)
    frames = torch.randn(3, 3, 1, 8, 8, generator=generator).to(device)
    frame_lens = torch.tensor([3, 1, 2], device=device)
    text_lens = torch.tensor([6, 1, 4], device=device)
    ids = torch.randint(1, VOCAB, (3, 6), generator=generator).to(device) * (
        torch.arange(6, device=device) < text_lens[:, None]
    )
    return frames, ids, text_lens, frame_lens


@pytest.mark.parametrize("image_encoder", ["cnn", "vit"])
def test_backends_agree(image_encoder):
    logits = assert_backends_agree(flamingo(image_encoder), video_batch(), 2e-4)
    assert logits.shape == (3, 6, VOCAB)


def test_padding_frames_and_tokens_change_nothing_valid():
    model = flamingo().eval()
    frames, ids, text_lens, frame_lens = video_batch()
    logits = model(frames, ids, text_lens, frame_lens)
    noisy_frames = torch.where(
        (torch.arange(3) < frame_lens[:, None])[:, :, None, None, None], frames, torch.randn_like(frames)
    )
    noisy_ids = torch.where(torch.arange(6) < text_lens[:, None], ids, torch.randint_like(ids, 1, VOCAB))
    valid = torch.arange(6) < text_lens[:, None]
    torch.testing.assert_close(model(noisy_frames, noisy_ids, text_lens, frame_lens)[valid], logits[valid])
    # One image is one frame.
    torch.testing.assert_close(model(frames[:, 0], ids, text_lens), model(frames[:, :1], ids, text_lens))


def test_causal_decoder_sees_no_future_tokens():
    model = flamingo().eval()
    frames, ids, text_lens, frame_lens = video_batch()
    changed = ids.clone()
    changed[:, 3:] = (changed[:, 3:] + 1) % VOCAB
    torch.testing.assert_close(
        model(frames, changed, None, frame_lens)[:, :3], model(frames, ids, None, frame_lens)[:, :3]
    )


def test_zero_gates_leave_the_language_model_alone():
    torch.manual_seed(0)
    model = FlamingoLM(VOCAB, dim=16, heads=2, num_latents=4, image_size=8)
    frames, ids, text_lens, _ = video_batch()
    first = model(frames[:, 0], ids, text_lens)
    torch.testing.assert_close(model(torch.randn_like(frames[:, 0]), ids, text_lens), first)


def test_generate_is_greedy_decoding_of_forward():
    model = flamingo().eval()
    frames, ids, text_lens, frame_lens = video_batch()
    generated = model.generate(frames, ids, text_lens, max_new_tokens=3, frame_lens=frame_lens)
    assert [len(g) for g in generated] == [3, 3, 3]
    for b in range(3):
        sequence = ids[b, : text_lens[b]].tolist()
        for token in generated[b]:
            logits = model(frames[b : b + 1], torch.tensor([sequence]), None, frame_lens[b : b + 1])
            assert logits[0, -1].argmax().item() == token
            sequence.append(token)
    # A sample stops at end_id, which is not returned.
    first_tokens = [g[0] for g in generated]
    stopped = model.generate(frames, ids, text_lens, max_new_tokens=3, end_id=first_tokens[0], frame_lens=frame_lens)
    assert stopped[0] == []


def test_bad_arguments():
    model = flamingo()
    with pytest.raises(ValueError, match="more than max_frames"):
        model(torch.randn(1, 4, 1, 8, 8), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="must be"):
        model(torch.randn(8, 8), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than max_text_length"):
        model(torch.randn(1, 1, 8, 8), torch.ones(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="image_encoder must be"):
        FlamingoLM(VOCAB, image_encoder="resnet")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mmkern", "eager"])
def test_compiles_whole_for_forward_and_backward(backend):
    torch._dynamo.reset()
    model = set_backend(flamingo(), backend)
    inputs = video_batch()
    expected, expected_gradients = outputs_and_gradients(model, inputs)
    logits, gradients = outputs_and_gradients(torch.compile(model, backend="aot_eager", fullgraph=True), inputs)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for a, e in zip(gradients, expected_gradients):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
