"""attn_implementation="mmkern" on transformers' own model classes, built from tiny random configs:
logits (at the positions that are not padding) within 2e-5 of attn_implementation="eager" in float32,
generate() giving eager's tokens and scores (dynamic and static caches, greedy and beam search), how
many attention calls ran the kernel, and the models and keywords that are refused."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mmkern.integrations import huggingface  # noqa: E402
from tests.numerics import assert_close_to_reference  # noqa: E402

huggingface.register()
TOLERANCE = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture
def calls(monkeypatch):
    """{"attention": calls of the mmkern attention function, "kernel": those that ran the kernel}."""
    counts = {"attention": 0, "kernel": 0}
    kernel, attention = huggingface.ops.cross_modal_attention, huggingface.mmkern_attention_forward

    def counted_kernel(*args, **kwargs):
        counts["kernel"] += 1
        return kernel(*args, **kwargs)

    def counted_attention(*args, **kwargs):
        counts["attention"] += 1
        return attention(*args, **kwargs)

    monkeypatch.setattr(huggingface.ops, "cross_modal_attention", counted_kernel)
    transformers.AttentionInterface.register(huggingface.NAME, counted_attention)
    yield counts
    transformers.AttentionInterface.register(huggingface.NAME, attention)


def logits_with(model, implementation, calls=None, **inputs):
    model.set_attn_implementation(implementation)
    if calls is not None:
        calls.update(attention=0, kernel=0)
    with torch.no_grad():
        return model(**inputs).logits


def assert_logits_match_eager(model, calls, valid, **inputs):
    """mmkern's logits at the ``valid`` positions within TOLERANCE of eager's; ``calls`` counts mmkern's run."""
    expected = logits_with(model, "eager", **inputs)
    actual = logits_with(model, "mmkern", calls, **inputs)
    torch.testing.assert_close(actual[valid], expected[valid], **TOLERANCE)


def generated(model, calls, *args, **options) -> dict:
    """{implementation: model.generate(...)} for eager then mmkern; ``calls`` counts mmkern's run."""
    results = {}
    for implementation in ("eager", "mmkern"):
        model.set_attn_implementation(implementation)
        calls.update(attention=0, kernel=0)
        results[implementation] = model.generate(*args, **options)
    return results


def lengths_mask(lengths, width):
    return (torch.arange(width) < torch.tensor(lengths)[:, None]).long()


def left_padding_mask(lengths, width):
    return (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()


SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
CAUSAL_LMS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL)),
    "mistral_sliding_window": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**SMALL, sliding_window=3)
    ),
    "gemma2_softcap": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(
            **SMALL,
            sliding_window=4,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=8,
        )
    ),
    "gpt_oss_sinks": lambda: transformers.GptOssForCausalLM(
        transformers.GptOssConfig(
            **{**SMALL, "intermediate_size": 32}, num_local_experts=4, num_experts_per_tok=2, sliding_window=4
        )
    ),
}


def causal_lm(name):
    torch.manual_seed(0)
    model = CAUSAL_LMS[name]().eval()
    if name == "gpt_oss_sinks":
        # Learned sinks large enough to matter (the init is small).
        torch.nn.init.normal_(model.model.layers[0].self_attn.sinks, std=2.0)
    return model


PADDING = {"none": None, "right": lengths_mask([9, 5, 1], 9), "left": left_padding_mask([9, 4, 2], 9)}


@pytest.mark.parametrize("padding", PADDING)
@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_causal_language_models_run_the_kernel(name, padding, calls):
    model = causal_lm(name)
    inputs = dict(input_ids=torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(1)))
    if PADDING[padding] is not None:
        inputs["attention_mask"] = PADDING[padding]
    expected = logits_with(model, "eager", **inputs)
    actual = logits_with(model, "mmkern", calls, **inputs)
    valid = torch.ones(3, 9, dtype=torch.bool) if padding == "none" else PADDING[padding].bool()
    torch.testing.assert_close(actual[valid], expected[valid], **TOLERANCE)
    assert calls == {"attention": 2, "kernel": 2}


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_head_dims_over_the_kernels_take_every_variant_exactly(name, calls, monkeypatch):
    # Head dim 288: the reference runs the call, with the layer's window, softcap and sinks and the padding.
    monkeypatch.setitem(SMALL, "head_dim", 288)
    model = causal_lm(name)
    inputs = dict(
        input_ids=torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(1)),
        attention_mask=PADDING["left"],
    )
    expected = logits_with(model, "eager", **inputs)
    actual = logits_with(model, "mmkern", calls, **inputs)
    valid = PADDING["left"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], **TOLERANCE)
    assert calls == {"attention": 2, "kernel": 0}


@pytest.mark.parametrize("beams", [1, 2])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_generate_gives_eager_tokens(name, cache, beams, calls):
    model = causal_lm(name)
    ids = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    options = dict(
        attention_mask=left_padding_mask([7, 4, 2], 7),
        max_new_tokens=5,
        do_sample=False,
        num_beams=beams,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
        cache_implementation=cache,
    )
    results = generated(model, calls, ids, **options)
    assert torch.equal(results["mmkern"].sequences, results["eager"].sequences)
    for actual, expected in zip(results["mmkern"].scores, results["eager"].scores):
        finite = expected.isfinite()
        torch.testing.assert_close(actual[finite], expected[finite], **TOLERANCE)
    # A prefill and four decode steps, two layers each.
    assert calls == {"attention": 10, "kernel": 10}


def test_encoder_decoder_with_padded_batches(calls):
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=50,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=32,
        dropout=0.0,
    )
    model = transformers.BartForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        input_ids=torch.randint(3, 50, (3, 9), generator=generator),
        attention_mask=lengths_mask([9, 5, 1], 9),
        decoder_input_ids=torch.randint(3, 50, (3, 6), generator=generator),
        decoder_attention_mask=lengths_mask([6, 3, 6], 6),
    )
    assert_logits_match_eager(model, calls, inputs["decoder_attention_mask"].bool(), **inputs)
    # Encoder self-attention, the decoder's causal self-attention and its cross-attention.
    assert calls == {"attention": 6, "kernel": 6}


def test_speech_encoder_decoder(calls):
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=60,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=16,
        pad_token_id=0,
        decoder_start_token_id=1,
    )
    model = transformers.WhisperForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        input_features=torch.randn(2, 8, 32, generator=generator),
        decoder_input_ids=torch.randint(2, 60, (2, 5), generator=generator),
    )
    expected = logits_with(model, "eager", **inputs)
    actual = logits_with(model, "mmkern", calls, **inputs)
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert calls == {"attention": 6, "kernel": 6}


def test_vision_language_model_with_cross_attention(calls):
    torch.manual_seed(0)
    vision = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=16,
        patch_size=4,
        num_channels=3,
    )
    text = transformers.BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        is_decoder=True,
        add_cross_attention=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vision, text)
    model = transformers.VisionEncoderDecoderModel(config=config).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        pixel_values=torch.randn(3, 3, 16, 16, generator=generator),
        decoder_input_ids=torch.randint(1, 40, (3, 7), generator=generator),
        decoder_attention_mask=lengths_mask([7, 4, 2], 7),
    )
    assert_logits_match_eager(model, calls, inputs["decoder_attention_mask"].bool(), **inputs)
    # The ViT's self-attention, the text decoder's causal self-attention and its cross-attention.
    assert calls == {"attention": 6, "kernel": 6}


def llava():
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=transformers.LlamaConfig(**SMALL),
        image_token_index=63,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=16,
    )
    return transformers.LlavaForConditionalGeneration(config).eval()


def llava_inputs():
    """Three left-padded prompts of 24, 22 and 20 tokens, each a text token, an image's 16 patch tokens, then text."""
    generator = torch.Generator().manual_seed(1)
    mask = left_padding_mask([24, 22, 20], 24)
    ids = torch.randint(3, 60, (3, 24), generator=generator) * mask
    for sample, start in enumerate([0, 2, 4]):
        ids[sample, start + 1 : start + 17] = 63
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 16, 16, generator=generator))


def test_llava_runs_the_kernel_in_both_towers(calls):
    model, inputs = llava(), llava_inputs()
    assert_logits_match_eager(model, calls, inputs["attention_mask"].bool(), **inputs)
    # The CLIP vision tower's two layers and the left-padded causal Llama's two.
    assert calls == {"attention": 4, "kernel": 4}


def test_llava_generate_gives_eager_tokens(calls):
    model, inputs = llava(), llava_inputs()
    results = generated(model, calls, **inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(results["mmkern"], results["eager"])
    # The prefill runs both towers; three decode steps run the text tower's two layers.
    assert calls == {"attention": 10, "kernel": 10}


def test_clip_text_and_vision_towers(calls):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
        ),
        projection_dim=16,
    )
    model = transformers.CLIPModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    mask = lengths_mask([9, 5, 2], 9)
    inputs = dict(
        input_ids=torch.randint(3, 50, (3, 9), generator=generator),
        attention_mask=mask,
        pixel_values=torch.randn(3, 3, 16, 16, generator=generator),
    )
    outputs = {}
    for implementation in ("eager", "mmkern"):
        model.set_attn_implementation(implementation)
        calls.update(attention=0, kernel=0)
        with torch.no_grad():
            outputs[implementation] = model(**inputs)
    actual, expected = outputs["mmkern"], outputs["eager"]
    # The text tower is causal and right-padded; its padded positions are not compared.
    torch.testing.assert_close(
        actual.text_model_output.last_hidden_state[mask.bool()],
        expected.text_model_output.last_hidden_state[mask.bool()],
        **TOLERANCE,
    )
    torch.testing.assert_close(
        actual.vision_model_output.last_hidden_state, expected.vision_model_output.last_hidden_state, **TOLERANCE
    )
    torch.testing.assert_close(actual.logits_per_image, expected.logits_per_image, **TOLERANCE)
    assert calls == {"attention": 4, "kernel": 4}


def test_left_padded_encoder_runs_the_kernel(calls):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    model = transformers.BertModel(config).eval()
    ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    hidden = {}
    for implementation in ("eager", "mmkern"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            hidden[implementation] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden["mmkern"][mask.bool()], hidden["eager"][mask.bool()], **TOLERANCE)
    assert calls == {"attention": 1, "kernel": 1}


def test_position_bias_runs_the_kernel(calls):
    """T5 adds a learned relative position bias to the scores: the kernel's bias, with SDPA's boolean
    masks (T5 takes no compact ones) folded into it."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=40,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        input_ids=torch.randint(1, 40, (2, 7), generator=generator),
        attention_mask=lengths_mask([7, 3], 7),
        decoder_input_ids=torch.randint(1, 40, (2, 5), generator=generator),
    )
    expected = logits_with(model, "eager", **inputs)
    actual = logits_with(model, "mmkern", calls, **inputs)
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert calls == {"attention": 6, "kernel": 6}


@pytest.mark.parametrize("name", ["gpt_oss_sinks", "gemma2_softcap"])
def test_a_users_4d_mask_runs_the_kernel_as_a_bias(name, calls):
    """A 4-D float mask of the user's (here three packed causal sequences) goes to the attention as it
    is, and into the kernel as a bias, with the sinks or the softcap."""
    model = causal_lm(name)
    ids = torch.randint(3, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    sequence = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    allowed = (sequence[:, None] == sequence[None, :]) & torch.ones(10, 10, dtype=torch.bool).tril()
    mask = torch.zeros(1, 1, 10, 10).masked_fill(~allowed, torch.finfo(torch.float32).min)
    expected = logits_with(model, "eager", input_ids=ids, attention_mask=mask)
    actual = logits_with(model, "mmkern", calls, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    assert calls == {"attention": 2, "kernel": 2}


@pytest.mark.parametrize(
    "build",
    [
        lambda: transformers.BloomForCausalLM(
            transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, attn_implementation="mmkern")
        ),
        lambda: transformers.GPTNeoForCausalLM(
            transformers.GPTNeoConfig(
                vocab_size=64,
                hidden_size=32,
                num_layers=2,
                num_heads=4,
                attention_types=[[["global", "local"], 1]],
                attn_implementation="mmkern",
            )
        ),
        lambda: transformers.GitForCausalLM(
            transformers.GitConfig(
                vision_config=dict(
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    intermediate_size=48,
                    image_size=16,
                    patch_size=4,
                ),
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=48,
                attn_implementation="mmkern",
            )
        ),
        lambda: transformers.BlipForConditionalGeneration(
            transformers.BlipConfig(
                text_config=dict(
                    vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48
                ),
                vision_config=dict(
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    intermediate_size=48,
                    image_size=16,
                    patch_size=4,
                ),
                attn_implementation="mmkern",
            )
        ),
    ],
    ids=["bloom", "gpt_neo", "git", "blip"],
)
def test_models_that_do_not_call_the_interface_are_refused(build):
    with pytest.raises(ValueError, match="does not call attention through transformers' AttentionInterface"):
        build()


def test_output_attentions_is_refused():
    model = causal_lm("llama")
    model.set_attn_implementation("mmkern")
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=torch.randint(3, 64, (1, 4)), output_attentions=True)


def test_compiled_fullgraph_with_left_padding(calls):
    model = causal_lm("llama")
    ids = torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = left_padding_mask([9, 4, 2], 9)
    expected = logits_with(model, "eager", input_ids=ids, attention_mask=mask)
    model.set_attn_implementation("mmkern")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        actual = compiled(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], **TOLERANCE)
    assert calls["kernel"] >= 2  # counted while tracing: both layers reached the kernel


def test_training_gradients_match_eager():
    """Parameter gradients through the kernel against float64, within 4x eager float32's own error
    (test_cross_modal_attention's criterion for the CPU kernel's backward)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertModel(config)
    ids = torch.randint(1, 40, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = lengths_mask([8, 3, 5], 8)
    gradients = {}
    for implementation, dtype in (("eager", torch.float64), ("eager", torch.float32), ("mmkern", torch.float32)):
        model.to(dtype).set_attn_implementation(implementation)
        model.zero_grad()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        (hidden * mask[..., None]).square().sum().backward()
        gradients[implementation, dtype] = {
            name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None
        }
    exact = gradients["eager", torch.float64]
    for name, actual in gradients["mmkern", torch.float32].items():
        assert_close_to_reference(actual, exact[name], gradients["eager", torch.float32][name], name, factor=4.0)


def test_sink_and_softcap_gradients_match_eager():
    """GPT-OSS's learned sinks and Gemma 2's capped scores train through the kernel: every parameter's
    gradient against float64 eager, within 4x float32 eager's own error."""
    for name in ("gpt_oss_sinks", "gemma2_softcap"):
        model = causal_lm(name).train()
        if name == "gpt_oss_sinks":
            model.set_experts_implementation("eager")  # grouped_mm has no float64
        ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))
        mask = lengths_mask([8, 5], 8)
        gradients = {}
        for implementation, dtype in (("eager", torch.float64), ("eager", torch.float32), ("mmkern", torch.float32)):
            model.to(dtype).set_attn_implementation(implementation)
            model.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits
            (logits * mask[..., None]).square().sum().backward()
            gradients[implementation, dtype] = {
                n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
            }
        exact = gradients["eager", torch.float64]
        assert any("sinks" in n for n in exact) == (name == "gpt_oss_sinks")
        for parameter, actual in gradients["mmkern", torch.float32].items():
            assert_close_to_reference(
                actual,
                exact[parameter],
                gradients["eager", torch.float32][parameter],
                f"{name} {parameter}",
                factor=4.0,
            )


def test_position_bias_gradients_match_eager():
    """T5's relative attention bias learns through the kernel's bias gradient: every parameter's
    gradient against float64 eager, within 4x float32 eager's own error."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=40,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        input_ids=torch.randint(1, 40, (2, 7), generator=generator),
        attention_mask=lengths_mask([7, 3], 7),
        decoder_input_ids=torch.randint(1, 40, (2, 5), generator=generator),
    )
    gradients = {}
    for implementation, dtype in (("eager", torch.float64), ("eager", torch.float32), ("mmkern", torch.float32)):
        model.to(dtype).set_attn_implementation(implementation)
        model.zero_grad()
        model(**inputs).logits.square().sum().backward()
        gradients[implementation, dtype] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
    exact = gradients["eager", torch.float64]
    assert any("relative_attention_bias" in n for n in exact)
    for name, actual in gradients["mmkern", torch.float32].items():
        assert_close_to_reference(actual, exact[name], gradients["eager", torch.float32][name], name, factor=4.0)
