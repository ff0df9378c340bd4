import copy

import pytest
import torch
from torch import nn

import mmkern
from mmkern.nn import CrossModalAttention


def transformer(batch_first):
    torch.manual_seed(0)
    return nn.Transformer(
        d_model=32,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=48,
        dropout=0.0,
        batch_first=batch_first,
    ).double()


def transformer_inputs(batch_first):
    generator = torch.Generator().manual_seed(1)
    src = torch.randn(3, 7, 32, generator=generator, dtype=torch.float64)
    tgt = torch.randn(3, 5, 32, generator=generator, dtype=torch.float64)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    padding = torch.arange(7) >= torch.tensor([7, 4, 1])[:, None]
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    return (src, tgt), dict(
        src_key_padding_mask=padding, memory_key_padding_mask=padding, tgt_mask=causal, tgt_is_causal=True
    )


@pytest.fixture
def calls(monkeypatch):
    """One entry per call of the attention kernel by mmkern's modules."""
    calls = []
    kernel = mmkern.nn.backend.ops.cross_modal_attention
    monkeypatch.setattr(
        mmkern.nn.backend.ops, "cross_modal_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )
    return calls


@pytest.mark.parametrize("batch_first", [True, False])
def test_swapped_transformer_equals_the_original(batch_first):
    original = transformer(batch_first)
    swapped = copy.deepcopy(original)
    report = mmkern.swap(swapped)
    assert len(report.swapped) == 6 and not report.skipped
    assert all(isinstance(m, CrossModalAttention) for name, m in swapped.named_modules() if name in report.swapped)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in swapped.modules())
    args, kwargs = transformer_inputs(batch_first)
    expected = original(*args, **kwargs)
    out = swapped(*args, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    expected.sum().backward()
    out.sum().backward()
    for (name, a), b in zip(swapped.named_parameters(), original.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    # Eval without gradients: TransformerEncoderLayer may take PyTorch's fast path, still the same parameters.
    original.eval(), swapped.eval()
    with torch.no_grad():
        torch.testing.assert_close(swapped(*args, **kwargs), original(*args, **kwargs), rtol=1e-10, atol=1e-10)


def test_padding_masks_of_transformer_layers_run_the_kernel(calls):
    # nn.TransformerEncoderLayer hands attention an additive (0 / -inf) padding mask: it must still
    # reach mmkern's kernel; so does the decoder's causal self-attention (tgt_is_causal).
    model = transformer(True)
    mmkern.swap(model)
    args, kwargs = transformer_inputs(True)
    model(*args, **kwargs)
    assert len(calls) == 6  # 2 encoder self-attentions, 2 decoder causal self-attentions, 2 cross-attentions


def test_compiled_swapped_transformer_runs_the_kernel(calls):
    """Under torch.compile(fullgraph=True) too: the layers' additive padding masks reach the kernel as
    its bias, with no host read (which would break the graph)."""
    original = transformer(True)
    model = copy.deepcopy(original)
    mmkern.swap(model)
    args, kwargs = transformer_inputs(True)
    torch._dynamo.reset()
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(*args, **kwargs)
    torch.testing.assert_close(out, original(*args, **kwargs), rtol=1e-10, atol=1e-10)
    assert len(calls) == 6  # counted while tracing: every attention of the graph is the kernel


def test_state_dicts_load_both_ways_and_parameters_are_shared():
    original = transformer(True)
    swapped = copy.deepcopy(original)
    mmkern.swap(swapped)
    assert list(original.state_dict()) == list(swapped.state_dict())
    fresh = transformer(True)
    mmkern.swap(fresh)
    fresh.load_state_dict(original.state_dict())
    original.load_state_dict(swapped.state_dict())
    layer = swapped.encoder.layers[0]
    assert layer.self_attn.batch_first and layer.self_attn._qkv_same_embed_dim
    assert (
        layer.self_attn.in_proj_weight is dict(swapped.named_parameters())["encoder.layers.0.self_attn.in_proj_weight"]
    )


def test_cross_attention_with_kdim_vdim_shared_and_skipped_modules():
    torch.manual_seed(0)
    shared = nn.MultiheadAttention(16, 4, kdim=24, vdim=8, batch_first=True).double()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = shared, shared
            self.with_bias_kv = nn.MultiheadAttention(16, 2, add_bias_kv=True, batch_first=True).double()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16))])

        def forward(self, q, k, v, mask):
            a = self.first(q, k, v, key_padding_mask=mask, need_weights=False)[0]
            return a + self.second(a, k, v, need_weights=False)[0] + self.with_bias_kv(q, q, q)[0]

    model = Model()
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, 16, generator=generator, dtype=torch.float64)
    k = torch.randn(2, 6, 24, generator=generator, dtype=torch.float64)
    v = torch.randn(2, 6, 8, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[False] * 6, [False, True, False, True, True, True]])  # not right padding
    expected = model(q, k, v, mask)
    report = mmkern.swap(model)
    assert report.swapped == ["first", "second"]
    assert [name for name, _ in report.skipped] == ["with_bias_kv"] and "add_bias_kv" in report.skipped[0][1]
    assert model.first is model.second and isinstance(model.first, CrossModalAttention)
    torch.testing.assert_close(model(q, k, v, mask), expected, rtol=1e-10, atol=1e-10)
    assert "2 swapped, 1 left alone" in str(report)


def test_swap_arguments():
    model = transformer(True)
    assert mmkern.swap(model, attention=False).swapped == []
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        mmkern.swap("model")
