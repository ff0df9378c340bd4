"""Causal and sliding-window attention (``causal``, ``window``) in every kernel: the C++ CPU kernel
(ATen's flash kernel for causal over square samples, its tiled path otherwise), the Triton forward,
split-KV and backward, padded and packed, against the float64 reference, composed with lengths,
grouped heads, Dv != D and dropout. Windows align to the bottom right: query i of a sample with Lq_b
queries and Lk_b keys has its diagonal at key i + Lk_b - Lq_b."""

import pytest
import torch

from mmkern import _config, ops, reference
from tests.numerics import DEVICES, dtypes_for
from tests.test_cross_modal_attention import (check_against_reference, check_packed_equals_padded, forward_and_grads,
                                              make_case, mmkern_attention, packed_case)

# name: (CASES-style params, options)
VARIANTS = {
    # Square samples, every row valid: ATen's causal flash kernel on CPU.
    "causal_square": ((2, 33, 33, 4, 2, 16, 16, None, None), {"causal": True}),
    # Fewer queries than keys, per-sample lengths: the diagonal sits at i + Lk_b - Lq_b.
    "causal_bottom_right_lengths": ((3, 7, 33, 6, 2, 16, 24, [0, 33, 9], [7, 1, 4]), {"causal": True}),
    # More queries than keys: the first Lq_b - Lk_b queries see no key (zeros, lse -inf).
    "causal_more_queries_than_keys": ((2, 40, 17, 2, 1, 8, 8, [17, 5], [40, 30]), {"causal": True}),
    "sliding_window_causal": ((2, 70, 70, 2, 2, 32, 32, [70, 45], [70, 45]), {"causal": True, "window": (8, -1)}),
    "two_sided_window": ((2, 20, 37, 4, 1, 16, 16, [37, 20], None), {"window": (3, 2)}),
    "only_the_diagonal_key": ((2, 9, 12, 2, 2, 8, 8, [12, 3], [9, 6]), {"window": (0, 0)}),
    "left_unbounded_right_window": ((1, 17, 17, 2, 1, 8, 8, None, None), {"window": (-1, 4)}),
    # Few queries over long keys: split-KV, with whole splits outside the window.
    "causal_split_keys": ((2, 9, 700, 4, 2, 32, 32, [700, 290], [9, 4]), {"causal": True}),
    "window_split_keys": ((2, 3, 900, 2, 1, 16, 16, [900, 600], None), {"window": (300, 0)}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(variant, device):
    params, options = VARIANTS[variant]
    for dtype in dtypes_for(device):
        check_against_reference(params, dtype, device, **options)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_within_a_window_is_the_reference_mask(device):
    q, k, v, lengths = make_case(2, 9, 21, 4, 2, 16, 8, [21, 13], [9, 4], torch.float64, device)
    grad_out = torch.randn(2, 9, 4, 8, dtype=torch.float64, device=device)
    torch.manual_seed(5)
    actual = forward_and_grads(mmkern_attention, q, k, v, grad_out, dropout_p=0.3, causal=True, window=(4, 0),
                               **lengths)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device=device))
    expected = forward_and_grads(reference.cross_modal_attention, q, k, v, grad_out, dropout_p=0.3, dropout_seed=seed,
                                 causal=True, window=(4, 0), **lengths)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-12, atol=1e-12)
    for a, e in zip(actual[2], expected[2]):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_causal_is_sdpas_lower_right_causal(device):
    from torch.nn.attention.bias import causal_lower_right

    q, k, v, _ = make_case(2, 6, 11, 4, 4, 16, 16, None, None, torch.float32, device)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(6, 11))
    torch.testing.assert_close(ops.cross_modal_attention(q, k, v, causal=True), expected.transpose(1, 2),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_a_query_that_sees_no_key_gets_zeros_and_zero_gradients(device):
    q, k, v, lengths = make_case(1, 6, 3, 2, 1, 8, 8, None, None, torch.float32, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ops.cross_modal_attention(q, k, v, causal=True, return_lse=True)  # queries 0-2 see no key
    assert torch.all(out[:, :3] == 0) and torch.all(lse[:, :, :3] == float("-inf"))
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 3:]).all()
    grad_q, = torch.autograd.grad(out.sum(), q)
    assert torch.all(grad_q[:, :3] == 0) and torch.isfinite(grad_q).all()


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("window", [(-1, 0), (2, 1)])
def test_gradcheck_float64(window, dropout):
    q, k, v, lengths = make_case(2, 5, 7, 4, 2, 6, 3, [7, 2], [5, 3], torch.float64, "cpu")
    seed = torch.tensor(11) if dropout else None

    def attend(q, k, v):
        return torch.ops.mmkern.cross_modal_attention.default(q, k, v, lengths["kv_lens"], lengths["q_lens"], 0.25,
                                                              0.2 if dropout else 0.0, seed, *window)[0]

    inputs = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(attend, inputs, fast_mode=_config.TRITON_ON_CPU)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for window in ((-1, 0), (3, 1)):
        q, k, v, lengths = make_case(2, 5, 7, 4, 2, 8, 4, [7, 3], [5, 2], torch.float32, device)
        sample = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), lengths["kv_lens"], lengths["q_lens"],
                  0.3, 0.0, None, *window)
        torch.library.opcheck(torch.ops.mmkern.cross_modal_attention.default, sample)
        out, lse = torch.ops.mmkern.cross_modal_attention.default(*(t.detach() for t in sample[:3]), *sample[3:])
        torch.library.opcheck(torch.ops.mmkern.cross_modal_attention_backward.default,
                              (torch.randn_like(out), *(t.detach() for t in sample[:3]), out, lse, *sample[3:]))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    q, k, v, lengths = make_case(2, 9, 12, 4, 2, 16, 8, [12, 5], None, torch.float32, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def attend(q, k, v, kv_lens):
        return ops.cross_modal_attention(q, k, v, kv_lens=kv_lens, causal=True, window=(4, -1)).square().sum()

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    actual = torch.autograd.grad(compiled(q, k, v, lengths["kv_lens"]), (q, k, v))
    expected = torch.autograd.grad(attend(q, k, v, lengths["kv_lens"]), (q, k, v))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [{"causal": True}, {"window": (2, 3)}, {"causal": True, "window": (1, 0)}])
def test_packed_equals_padded(device, options):
    check_packed_equals_padded(device, **options)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_matches_reference(device):
    for dtype in dtypes_for(device):
        _, (q, k, v, cu_q, cu_k, max_q, max_k), _ = packed_case(device, dtype, unowned_rows=2)
        out = ops.cross_modal_attention_packed(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, window=(2, -1))
        expected, _ = reference.cross_modal_attention_packed(q.double(), k.double(), v.double(), cu_q, cu_k, max_q,
                                                             max_k, causal=True, window=(2, -1))
        tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
        torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("bad,error,match", [
    ({"window": (-2, 0)}, ValueError, "window sides must be >= -1"),
    ({"window": (3,)}, ValueError, r"window must be a \(left, right\) pair"),
    ({"window": (1.5, 0)}, ValueError, r"window must be a \(left, right\) pair"),
    ({"window": 4}, ValueError, r"window must be a \(left, right\) pair"),
    ({"causal": "yes"}, TypeError, "causal must be a bool"),
    ({"causal": True, "window": (4, 2)}, ValueError, "causal=True bounds the window's right side at 0"),
])
@pytest.mark.parametrize("packed", [False, True])
def test_bad_variants_are_named(bad, error, match, packed):
    q, k, v = torch.randn(2, 5, 2, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    with pytest.raises(error, match=match):
        if packed:
            cu = torch.tensor([0, 5, 10]), torch.tensor([0, 7, 14])
            ops.cross_modal_attention_packed(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), *cu, 5, 7, **bad)
        else:
            ops.cross_modal_attention(q, k, v, **bad)
