import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmkern.integrations import huggingface  # noqa: E402
from tests.numerics import assert_close_to_reference  # noqa: E402

huggingface.register()


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    kernel = huggingface.ops.cross_modal_attention
    monkeypatch.setattr(huggingface.ops, "cross_modal_attention", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    return calls


def logits_with(model, implementation, **inputs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**inputs).logits


def lengths_mask(lengths, width):
    return (torch.arange(width) < torch.tensor(lengths)[:, None]).long()


def test_encoder_decoder_with_padded_batches(kernel_calls):
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=50, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                     decoder_ffn_dim=48, max_position_embeddings=32, dropout=0.0)
    model = transformers.BartForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = dict(input_ids=torch.randint(3, 50, (3, 9), generator=generator), attention_mask=lengths_mask([9, 5, 1], 9),
                  decoder_input_ids=torch.randint(3, 50, (3, 6), generator=generator),
                  decoder_attention_mask=lengths_mask([6, 3, 6], 6))
    expected = logits_with(model, "eager", **inputs)
    actual = logits_with(model, "mmkern", **inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # Encoder self-attention and decoder cross-attention over the right-padded source take the kernel,
    # reading the mask as lengths; the decoder's causal self-attention stays on SDPA.
    assert len(kernel_calls) == 4
    assert all(call["kv_lens"].tolist() == [9, 5, 1] for call in kernel_calls)


def test_vision_language_model_with_cross_attention(kernel_calls):
    torch.manual_seed(0)
    vision = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                    image_size=16, patch_size=4, num_channels=3)
    text = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=32, is_decoder=True,
                                   add_cross_attention=True, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vision, text)
    model = transformers.VisionEncoderDecoderModel(config=config).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = dict(pixel_values=torch.randn(3, 3, 16, 16, generator=generator),
                  decoder_input_ids=torch.randint(1, 40, (3, 7), generator=generator),
                  decoder_attention_mask=lengths_mask([7, 4, 2], 7))
    expected = logits_with(model, "eager", **inputs)
    actual = logits_with(model, "mmkern", **inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # The ViT's self-attention and the text decoder's cross-attention over the image run the kernel.
    assert len(kernel_calls) == 4


def test_left_padding_falls_back_to_sdpa_with_the_same_answer(kernel_calls):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.set_attn_implementation("mmkern")
    with torch.no_grad():
        actual = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert kernel_calls == []


def test_training_gradients_match_eager():
    """Parameter gradients through the kernel against float64, within 4x eager float32's own error
    (test_cross_modal_attention's criterion for the CPU kernel's backward)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(config)
    ids = torch.randint(1, 40, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = lengths_mask([8, 3, 5], 8)
    gradients = {}
    for implementation, dtype in (("eager", torch.float64), ("eager", torch.float32), ("mmkern", torch.float32)):
        model.to(dtype).set_attn_implementation(implementation)
        model.zero_grad()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        (hidden * mask[..., None]).square().sum().backward()
        gradients[implementation, dtype] = {name: p.grad.clone() for name, p in model.named_parameters()
                                            if p.grad is not None}
    exact = gradients["eager", torch.float64]
    for name, actual in gradients["mmkern", torch.float32].items():
        assert_close_to_reference(actual, exact[name], gradients["eager", torch.float32][name], name, factor=4.0)
