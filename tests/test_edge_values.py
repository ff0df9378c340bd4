"""Inputs at the edges of what each op takes: magnitudes that overflow fp16 in a naive order of
operations, scores that all tie, one valid key, all-zero features, and NaN or inf, which must
propagate exactly as the eager reference propagates them or be rejected, never turn into a finite
wrong answer."""

import re

import pytest
import torch

from mmkern import _config, ops, reference
from tests.numerics import DEVICES, dtypes_for


def half_dtypes(device):
    return [d for d in dtypes_for(device) if d in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("device", DEVICES)
def test_attention_scores_past_fp16_range_stay_finite(device):
    # q . k reaches about 1e6, past fp16's 65504: scores must be accumulated in float32.
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 2, 64, generator=generator, dtype=torch.float64) * 120
    k = torch.randn(1, 9, 2, 64, generator=generator, dtype=torch.float64) * 120
    v = torch.randn(1, 9, 2, 16, generator=generator, dtype=torch.float64)
    exact = reference.cross_modal_attention(q, k, v, scale=1 / 8)[0]
    for dtype in half_dtypes(device):
        out = ops.cross_modal_attention(*(t.to(device, dtype) for t in (q, k, v)), scale=1 / 8)
        assert torch.isfinite(out).all()
        # The inputs' own rounding moves such large scores by whole units: compare with the exact
        # attention of the rounded inputs.
        rounded = reference.cross_modal_attention(*(t.to(dtype).double() for t in (q, k, v)), scale=1 / 8)[0]
        assert (out.double().cpu() - rounded).abs().max() <= 4 * torch.finfo(dtype).eps * v.abs().max()
        assert exact.isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
def test_concat_linear_past_fp16_range_in_the_sum_stays_finite_where_the_result_does(device):
    # Each product is 300 * 300 = 9e4 (past fp16), the sum cancels to a small number.
    x = torch.tensor([[300.0, 300.0]], dtype=torch.float64)
    weight = torch.tensor([[300.0, -300.0], [1.0, 1.0]], dtype=torch.float64)
    for dtype in half_dtypes(device):
        out = ops.concat_linear([x.to(device, dtype)], weight.to(device, dtype))
        torch.testing.assert_close(out.double().cpu(), torch.tensor([[0.0, 600.0]], dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_all_equal_scores_average_the_valid_values(device):
    generator = torch.Generator().manual_seed(1)
    for dtype in dtypes_for(device):
        q = torch.zeros(2, 3, 2, 16, dtype=dtype, device=device)
        k = torch.randn(2, 7, 1, 16, generator=generator).to(device, dtype)
        v = torch.randn(2, 7, 1, 8, generator=generator).to(device, dtype)
        kv_lens = torch.tensor([7, 3], device=device)
        out = ops.cross_modal_attention(q, k, v, kv_lens=kv_lens).double()
        for b, n in enumerate((7, 3)):
            mean = v[b, :n, 0].double().mean(0)
            torch.testing.assert_close(out[b], mean.expand(3, 2, 8), rtol=0, atol=4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("device", DEVICES)
def test_one_valid_key_returns_its_value_and_no_key_gradient(device):
    generator = torch.Generator().manual_seed(2)
    for dtype in dtypes_for(device):
        q, k = (torch.randn(1, 4, 2, 16, generator=generator).to(device, dtype).requires_grad_() for _ in range(2))
        v = torch.randn(1, 4, 2, 8, generator=generator).to(device, dtype).requires_grad_()
        out = ops.cross_modal_attention(q, k, v, kv_lens=torch.tensor([1], device=device))
        torch.testing.assert_close(out, v[:, :1].expand(1, 4, 2, 8), rtol=0, atol=2 * torch.finfo(dtype).eps)
        grad_q, grad_k, grad_v = torch.autograd.grad(out.sum(), (q, k, v))
        # softmax over one key is 1 whatever the score: q and k get (roundoff) zero gradients.
        assert grad_q.abs().max() <= 1e-2 and grad_k.abs().max() <= 1e-2
        assert torch.all(grad_v[:, 1:] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn], ids=str)
def test_all_zero_features_quantize_and_fuse_to_zeros(device, qdtype):
    x = torch.zeros(3, 5, 16, device=device)
    xq, scale = ops.quantize_per_token(x, qdtype)
    assert torch.all(xq.float() == 0) and torch.isfinite(scale).all() and torch.all(scale > 0)
    fused = ops.quantized_fusion([xq, xq], [scale, scale], out_dtype=torch.float32)
    assert torch.all(fused == 0)


def poisoned(shape, index, value, device, dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    x[index] = value
    return x.to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_in_concat_linear_reach_exactly_the_outputs_they_reach_in_eager(device, value):
    for dtype in dtypes_for(device):
        text = poisoned((2, 3, 8), (1, 2, 5), value, device, dtype)
        image = poisoned((2, 1, 4), (0, 0, 1), value, device, dtype)
        weight = poisoned((6, 12), (0, 0), 0.5, device, dtype)
        out = ops.concat_linear([text, image], weight)
        expected = reference.concat_linear([text, image], weight)
        assert torch.equal(out.isnan(), expected.isnan())
        assert torch.equal(out.isinf(), expected.isinf())


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_attention_reaches_exactly_the_rows_it_reaches_in_eager(device):
    for dtype in dtypes_for(device):
        q = poisoned((2, 4, 2, 8), (0, 1, 0, 3), float("nan"), device, dtype)  # one query row of one head
        k = poisoned((2, 6, 1, 8), (1, 2, 0, 0), float("nan"), device, dtype)  # a valid key of sample 1
        v = poisoned((2, 6, 1, 8), (0, 5, 0, 0), float("nan"), device, dtype)  # padding: past kv_lens
        kv_lens = torch.tensor([5, 6], device=device)
        out = ops.cross_modal_attention(q, k, v, kv_lens=kv_lens)
        expected = reference.cross_modal_attention(q, k, v, kv_lens=kv_lens)[0]
        assert torch.equal(out.isnan(), expected.isnan())
        # What reaches where: the poisoned query row, every row of sample 1, and nothing from padding.
        assert out[0, 1, 0].isnan().all() and out[1].isnan().all()
        assert not out[0, :, 1].isnan().any() and not out[0, [0, 2, 3]].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_features_are_rejected_by_quantization(device, value_checks):
    x = poisoned((3, 16), (1, 4), float("nan"), device, torch.float32)
    with pytest.raises(ValueError, match="NaN or inf"):
        ops.quantize_per_token(x)


def _poisoned_scale_calls(value):
    """For each quantized op, a call whose one scale argument holds ``value`` in its second entry, and
    the argument's name."""
    xq, scale = ops.quantize_per_token(torch.randn(2, 3, 8))
    bad = scale.clone().view(-1).index_fill(0, torch.tensor([1]), value).view_as(scale)
    weight_q, weight_scale = ops.quantize_per_token(torch.randn(4, 16))
    weight_scale = weight_scale.view(-1)
    bad_weight_scale = weight_scale.index_fill(0, torch.tensor([1]), value)
    return {
        "dequantize_per_token": (lambda: ops.dequantize_per_token(xq, bad), "scale"),
        "quantized_fusion": (lambda: ops.quantized_fusion([xq, xq], [scale, bad]), "scales[1]"),
        "quantized_concat_linear scales": (
            lambda: ops.quantized_concat_linear([xq, xq], [scale, bad], weight_q, weight_scale),
            "scales[1]",
        ),
        "quantized_concat_linear weight_scale": (
            lambda: ops.quantized_concat_linear([xq, xq], [scale, scale], weight_q, bad_weight_scale),
            "weight_scale",
        ),
    }


@pytest.mark.skipif(_config.TRITON_ON_CPU, reason="the interpreter switch puts Triton's kernels in C++'s place")
@pytest.mark.parametrize("value", [-1.0, -1e-45, -1e-4, -3e38, float("nan"), float("inf"), float("-inf")])
def test_cpu_kernels_refuse_bad_scales_by_name(value):
    """The C++ kernels check the scales they read, with no value-checks switch, and name the argument
    and the value as the GPU path's check does (Python's repr of the float32 value)."""
    shown = repr(torch.tensor(value, dtype=torch.float32).item())
    for call, name in _poisoned_scale_calls(value).values():
        with pytest.raises(ValueError, match=re.escape(f"{name} holds {shown}; scales must be finite and >= 0")):
            call()


@pytest.mark.skipif(_config.TRITON_ON_CPU, reason="the interpreter switch puts Triton's kernels in C++'s place")
def test_cpu_kernels_refuse_bad_scales_under_compile():
    """A compiled graph cannot check values on the host, but on CPU it runs the C++ kernels, which do."""
    for call, name in _poisoned_scale_calls(-2.0).values():
        torch._dynamo.reset()
        with pytest.raises(ValueError, match=re.escape(f"{name} holds -2.0")):
            torch.compile(call, fullgraph=True)()
