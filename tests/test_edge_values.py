"""Inputs at the edges of what each op takes: magnitudes that overflow fp16 in a naive order of
operations, scores that all tie, one valid key, all-zero features, and NaN or inf, which must
propagate exactly as the eager reference propagates them or be rejected, never turn into a finite
wrong answer."""

import pytest
import torch

from mmkern import ops, reference
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
