import os

import pytest
import torch

from mmkern import ops
from mmkern.data import QuantizedFeatureStore
from mmkern.nn import ConcatLinear, QuantizedConcatLinear, QuantizedFusion
from tests.numerics import DEVICES


def float_layer(device):
    torch.manual_seed(0)
    return ConcatLinear((48, 32), 40, activation="gelu").to(device)


def modalities(device, requires_grad=False):
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(2, 9, 48, generator=generator).to(device).requires_grad_(requires_grad)
    image = torch.randn(2, 1, 32, generator=generator).to(device).requires_grad_(requires_grad)
    return text, image


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
def test_from_float_is_close_to_the_float_layer(device):
    layer = float_layer(device)
    quantized = QuantizedConcatLinear.from_float(layer, out_dtype=torch.float32)
    assert quantized.weight_q.dtype == torch.int8 and quantized.weight_scale.shape == (40,)
    text, image = modalities(device)
    with torch.no_grad():
        out = quantized(text, image)
        assert out.dtype == torch.float32
        assert relative_error(out, layer(text, image)) < 1e-2
        # already quantized inputs (cached features) give the same result, in out_dtype
        pairs = ops.quantize_per_token(text), ops.quantize_per_token(image)
        torch.testing.assert_close(quantized(*pairs), out, rtol=0, atol=0)
        assert QuantizedConcatLinear.from_float(layer)(*pairs).dtype == torch.bfloat16
        mixed = quantized(text, ops.quantize_per_token(image))
        torch.testing.assert_close(mixed, out, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_training_gives_straight_through_gradients(device):
    layer = float_layer(device)
    quantized = QuantizedConcatLinear.from_float(layer)
    text, image = modalities(device, requires_grad=True)
    quantized(text, image).square().sum().backward()
    # the float layer at the dequantized weight and inputs
    reference_layer = ConcatLinear((48, 32), 40, activation="gelu").to(device)
    with torch.no_grad():
        reference_layer.weight.copy_(quantized.dequantized_weight())
        reference_layer.bias.copy_(quantized.bias)
    ref_text, ref_image = [ops.fake_quantize_per_token(x.detach()).requires_grad_() for x in (text, image)]
    reference_layer(ref_text, ref_image).square().sum().backward()
    for actual, expected in [
        (text.grad, ref_text.grad),
        (image.grad, ref_image.grad),
        (quantized.bias.grad, reference_layer.bias.grad),
    ]:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert not quantized.weight_q.requires_grad


def test_state_dict_and_init():
    module = QuantizedConcatLinear((16, 8), 12, activation="relu")
    state = module.state_dict()
    assert set(state) == {"weight_q", "weight_scale", "bias"}
    assert state["weight_q"].dtype == torch.int8 and state["weight_scale"].dtype == torch.float32
    clone = QuantizedConcatLinear((16, 8), 12, activation="relu")
    clone.load_state_dict(state)
    x = (torch.randn(3, 16), torch.randn(3, 8))
    torch.testing.assert_close(clone(*x), module(*x))
    assert "int8" in repr(module)


def test_module_input_errors():
    module = QuantizedConcatLinear((16, 8), 12)
    with pytest.raises(ValueError, match="expected 2 inputs"):
        module(torch.randn(3, 16))
    with pytest.raises(ValueError, match=r"inputs\[1\] must have last dim in_features\[1\] = 8"):
        module(torch.randn(3, 16), torch.randn(3, 9))
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a float tensor or an \(xq, scale\) pair"):
        module(torch.randn(3, 16), 3.0)
    with pytest.raises(TypeError, match="must be an mmkern.nn.ConcatLinear"):
        QuantizedConcatLinear.from_float(torch.nn.Linear(3, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_module(device):
    module = QuantizedConcatLinear.from_float(float_layer(device))
    text, image = modalities(device)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(text, image), module(text, image))


@pytest.mark.parametrize("device", DEVICES)
def test_sum_fusion_learns_its_weights(device):
    generator = torch.Generator().manual_seed(2)
    pairs = [ops.quantize_per_token(torch.randn(4, 7, 24, generator=generator).to(device)) for _ in range(3)]
    fusion = QuantizedFusion(3, out_dtype=torch.float32).to(device)
    out = fusion(*pairs)
    expected = sum(ops.dequantize_per_token(*pair) for pair in pairs)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    torch.testing.assert_close(fusion.weights.grad, torch.stack([ops.dequantize_per_token(*p).sum() for p in pairs]))


@pytest.mark.parametrize("device", DEVICES)
def test_gated_fusion_with_its_gate_projection(device):
    generator = torch.Generator().manual_seed(3)
    pairs = [ops.quantize_per_token(torch.randn(4, 7, 24, generator=generator).to(device)) for _ in range(2)]
    torch.manual_seed(0)
    fusion = QuantizedFusion(2, mode="gated", features=24, out_dtype=torch.float32).to(device)
    out = fusion(*pairs)
    features = [ops.dequantize_per_token(*pair) for pair in pairs]
    g = torch.sigmoid(fusion.gate(*features))
    torch.testing.assert_close(out, g * features[0] + (1 - g) * features[1])
    out.square().sum().backward()
    assert fusion.gate.weight.grad is not None and fusion.gate.weight.grad.abs().sum() > 0
    logits = torch.randn(4, 7, 24, device=device)
    torch.testing.assert_close(
        QuantizedFusion(2, mode="gated", out_dtype=torch.float32)(*pairs, gate_logits=logits),
        torch.sigmoid(logits) * features[0] + (1 - torch.sigmoid(logits)) * features[1],
    )


def test_fusion_module_errors():
    with pytest.raises(ValueError, match="exactly two inputs"):
        QuantizedFusion(3, mode="gated")
    with pytest.raises(ValueError, match="mode must be one of"):
        QuantizedFusion(2, mode="product")
    pair = ops.quantize_per_token(torch.randn(2, 4))
    with pytest.raises(ValueError, match="needs gate_logits"):
        QuantizedFusion(2, mode="gated")(pair, pair)
    with pytest.raises(ValueError, match="expected 2"):
        QuantizedFusion(2)(pair)
    with pytest.raises(TypeError, match=r"inputs\[1\] must be an \(xq, scale\) pair"):
        QuantizedFusion(2)(pair, torch.randn(2, 4))


def test_feature_store_round_trip_and_size(tmp_path):
    store = QuantizedFeatureStore(tmp_path / "clip")
    generator = torch.Generator().manual_seed(4)
    image = torch.randn(576, 1024, generator=generator).to(torch.bfloat16)
    audio = torch.randn(3, 50, 256, generator=generator)
    store.put("img_0", image)
    store.put("audio.clip-1", audio)
    assert store.keys() == ["audio.clip-1", "img_0"] and len(store) == 2 and "img_0" in store and "img_1" not in store
    xq, scale = store.get("img_0")
    expected_q, expected_scale = ops.quantize_per_token(image)
    assert torch.equal(xq, expected_q) and torch.equal(scale, expected_scale)
    restored = store.get("audio.clip-1", dequantize=True)
    assert restored.dtype == torch.float32 and relative_error(restored, audio) < 1e-2
    assert store.get("img_0", dequantize=True).dtype == torch.bfloat16
    bf16_bytes = image.numel() * 2
    assert os.path.getsize(tmp_path / "clip" / "img_0.pt") <= 0.51 * bf16_bytes
    store.put("img_0", image[:10])  # replacing a key
    assert store.get("img_0")[0].shape == (10, 1024)


def test_feature_store_errors(tmp_path):
    store = QuantizedFeatureStore(tmp_path)
    with pytest.raises(ValueError, match="key must be"):
        store.put("../escape", torch.randn(2, 3))
    with pytest.raises(KeyError):
        store.get("missing")
    with pytest.raises(ValueError, match="NaN or inf"):
        store.put("bad", torch.tensor([[1.0, float("nan")]]))
    assert "bad" not in store
    with pytest.raises(TypeError, match="dtype must be"):
        QuantizedFeatureStore(tmp_path, dtype=torch.int16)
