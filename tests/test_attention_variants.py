"""Attention variants in every kernel: causal and sliding-window attention (``causal``, ``window``),
per-sample key masks (``key_mask``: left padding, holes), ``softcap`` and attention ``sinks``. The C++
CPU kernel (ATen's flash kernel, whole or in masked chunks; its tiled path for dropout, softcap and
sinks), the Triton forward, split-KV and backward, padded and packed, against the float64
reference, composed with each other, lengths, grouped heads, Dv != D and dropout. Windows align to
the bottom right: query i of a sample with Lq_b queries and Lk_b keys has its diagonal at key
i + Lk_b - Lq_b."""

import pytest
import torch

from mmkern import _config, ops, reference
from mmkern.kernels import tiles
from mmkern.kernels.launch import runs_on_triton
from mmkern.kernels.tiles import AttentionTile
from mmkern.ops import _eager as mmkern_eager
from tests.numerics import DEVICES, dtypes_for
from tests.test_cross_modal_attention import (
    check_against_reference,
    check_packed_equals_padded,
    forward_and_grads,
    make_case,
    mmkern_attention,
    pack,
    packed_case,
)

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
    # Key masks (made by key_mask_for): left padding, and random holes with one sample seeing nothing.
    "left_padding_causal": ((3, 12, 12, 4, 2, 16, 16, None, None), {"causal": True, "key_mask": "left_padding"}),
    "key_holes_lengths": ((3, 7, 33, 6, 2, 16, 24, [0, 33, 9], [7, 1, 4]), {"key_mask": "holes"}),
    "key_holes_window": (
        (2, 70, 70, 2, 2, 32, 32, [70, 45], [70, 45]),
        {"causal": True, "window": (8, -1), "key_mask": "holes"},
    ),
    "key_holes_split_keys": ((2, 9, 700, 4, 2, 32, 32, [700, 290], [9, 4]), {"key_mask": "holes"}),
    "softcap": ((2, 33, 40, 4, 2, 16, 16, [40, 7], None), {"softcap": 1.5}),
    "softcap_causal_holes": (
        (3, 12, 12, 4, 2, 16, 16, None, None),
        {"causal": True, "key_mask": "left_padding", "softcap": 3.0},
    ),
    # Sinks (made by sinks_for), also over rows that see no key and over split keys (the combine).
    "sinks": ((3, 7, 33, 6, 2, 16, 24, [0, 33, 9], [7, 1, 4]), {"sinks": True}),
    "sinks_causal_more_queries": ((2, 40, 17, 2, 1, 8, 8, [17, 5], [40, 30]), {"causal": True, "sinks": True}),
    "sinks_split_keys_holes": ((2, 9, 700, 4, 2, 32, 32, [700, 290], [9, 4]), {"sinks": True, "key_mask": "holes"}),
    # Additive biases (made by bias_for): per sample and head, shared by the batch (T5), ALiBi's
    # per-head slopes, and a 0 / -inf mask that hides whole rows; over split keys too.
    "bias_full": ((3, 7, 33, 6, 2, 16, 24, [0, 33, 9], [7, 1, 4]), {"bias": "full"}),
    "bias_shared_by_the_batch": ((2, 33, 40, 4, 2, 16, 16, [40, 7], None), {"bias": "heads", "causal": True}),
    "bias_alibi_split_keys": ((2, 9, 700, 4, 2, 32, 32, [700, 290], [9, 4]), {"bias": "alibi", "causal": True}),
    "bias_mask_hides_rows": ((2, 20, 37, 4, 1, 16, 8, [37, 20], None), {"bias": "mask", "sinks": True}),
    "everything": (
        (2, 20, 37, 4, 1, 16, 8, [37, 20], None),
        {"window": (3, 2), "key_mask": "holes", "softcap": 2.0, "sinks": True, "bias": "full"},
    ),
}


def key_mask_for(kind, batch, k_len, device):
    """(B, Lk) key masks: "left_padding" hides the first b * 3 keys of sample b; "holes" hides keys at
    random, and all of sample 1's."""
    if kind == "left_padding":
        return torch.arange(k_len) >= 3 * torch.arange(batch)[:, None]
    mask = torch.rand(batch, k_len, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[1] = False
    return mask.to(device)


def sinks_for(q_heads, device, dtype=torch.float64):
    return torch.linspace(-1.0, 2.0, q_heads, dtype=dtype).to(device)


def bias_for(kind, batch, q_len, k_len, q_heads, device, dtype=torch.float64):
    """Biases broadcastable to (B, Hq, Lq, Lk): "full" per sample and head, "heads" (1, Hq, Lq, Lk),
    "alibi" (Hq, 1, Lk) slopes times key positions, "mask" (B, 1, Lq, Lk) of 0 and -inf with query
    row 2 of every sample hidden entirely."""
    generator = torch.Generator().manual_seed(4)
    if kind == "full":
        bias = torch.randn(batch, q_heads, q_len, k_len, generator=generator, dtype=dtype)
    elif kind == "heads":
        bias = torch.randn(1, q_heads, q_len, k_len, generator=generator, dtype=dtype)
    elif kind == "alibi":
        # Slopes that keep the scores within tens: the backward recomputes probabilities as
        # exp2(s - lse), whose roundoff grows with |lse| (as flash-attention's does).
        slopes = 2.0 ** -torch.arange(6, q_heads + 6, dtype=dtype)
        bias = slopes[:, None, None] * torch.arange(k_len, dtype=dtype)
    else:
        hidden = torch.rand(batch, 1, q_len, k_len, generator=generator) < 0.3
        hidden[:, :, 2] = True
        bias = torch.zeros(batch, 1, q_len, k_len, dtype=dtype).masked_fill(hidden, float("-inf"))
    return bias.to(device)


def materialise(params, options, device, dtype=torch.float64):
    """``options`` with key_mask, sinks and bias as tensors on ``device``."""
    batch, q_len, k_len, q_heads = params[:4]
    options = dict(options)
    if "bias" in options:
        options["bias"] = bias_for(options["bias"], batch, q_len, k_len, q_heads, device, dtype)
    if "key_mask" in options:
        options["key_mask"] = key_mask_for(options["key_mask"], batch, k_len, "cpu").to(device)
    if options.get("sinks"):
        options["sinks"] = sinks_for(q_heads, device, dtype)
    return options


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(variant, device):
    params, options = VARIANTS[variant]
    for dtype in dtypes_for(device):
        check_against_reference(params, dtype, device, **materialise(params, options, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["sinks", "sinks_split_keys_holes", "everything"])
def test_sinks_gradient_matches_reference(variant, device):
    params, options = VARIANTS[variant]
    for dtype in (torch.float32, torch.float64):
        q, k, v, lengths = make_case(*params, dtype, device)
        options_ = materialise(params, options, device, dtype)
        sinks = options_.pop("sinks").requires_grad_()
        grad_out = torch.randn(*q.shape[:3], v.shape[3], dtype=dtype, device=device)
        out = ops.cross_modal_attention(q, k, v, sinks=sinks, **lengths, **options_)
        (actual,) = torch.autograd.grad(out, sinks, grad_out)
        exact_sinks = sinks.detach().double().requires_grad_()
        expected_out, _ = reference.cross_modal_attention(
            q.double(), k.double(), v.double(), sinks=exact_sinks, **lengths, **options_
        )
        (expected,) = torch.autograd.grad(expected_out, exact_sinks, grad_out.double())
        assert actual.dtype == dtype
        tolerance = 1e-11 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(actual.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "variant", ["bias_full", "bias_shared_by_the_batch", "bias_alibi_split_keys", "bias_mask_hides_rows", "everything"]
)
def test_bias_gradient_matches_reference(variant, device):
    """The bias's gradient (summed over the dims it broadcasts), and q's, k's and v's with it, against
    float64, in the bias's shape and dtype."""
    params, options = VARIANTS[variant]
    for dtype in (torch.float32, torch.float64):
        q, k, v, lengths = make_case(*params, dtype, device)
        options_ = materialise(params, options, device, dtype)
        bias = options_.pop("bias").requires_grad_()
        inputs = [t.requires_grad_() for t in (q, k, v)] + [bias]
        grad_out = torch.randn(*q.shape[:3], v.shape[3], dtype=dtype, device=device)
        out = ops.cross_modal_attention(q, k, v, bias=bias, **lengths, **options_)
        actual = torch.autograd.grad(out, inputs, grad_out)
        exact = [t.detach().double().requires_grad_() for t in inputs]
        expected_out, _ = reference.cross_modal_attention(*exact[:3], bias=exact[3], **lengths, **options_)
        expected = torch.autograd.grad(expected_out, exact, grad_out.double())
        assert actual[3].shape == bias.shape and actual[3].dtype == dtype
        tolerance = 1e-10 if dtype == torch.float64 else 1e-4
        for name, a, e in zip("qkvb", actual, expected):
            scale = max(e.abs().max().item(), 1.0)
            torch.testing.assert_close(a.double() / scale, e / scale, rtol=tolerance, atol=tolerance, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_bias_with_dropout_is_the_reference_mask(device):
    q, k, v, lengths = make_case(2, 9, 21, 4, 2, 16, 8, [21, 13], [9, 4], torch.float64, device)
    bias = bias_for("heads", 2, 9, 21, 4, device).requires_grad_()
    grad_out = torch.randn(2, 9, 4, 8, dtype=torch.float64, device=device)
    torch.manual_seed(5)
    out = ops.cross_modal_attention(q, k, v, dropout_p=0.3, causal=True, bias=bias, **lengths)
    actual = torch.autograd.grad(out, bias, grad_out)[0]
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device=device))
    expected_out, _ = reference.cross_modal_attention(
        q, k, v, dropout_p=0.3, dropout_seed=seed, causal=True, bias=bias, **lengths
    )
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(actual, torch.autograd.grad(expected_out, bias, grad_out)[0], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
def test_left_padding_is_the_same_as_the_unpadded_samples(device):
    """A left-padded causal batch (as Hugging Face generate() builds it) gives each sample what the
    sample alone, unpadded, gives."""
    q, k, v, _ = make_case(3, 10, 10, 4, 2, 16, 16, None, None, torch.float64, device)
    key_mask = key_mask_for("left_padding", 3, 10, device)
    out = ops.cross_modal_attention(q, k, v, causal=True, key_mask=key_mask, sinks=sinks_for(4, device), softcap=4.0)
    for b in range(3):
        pad = 3 * b
        alone = ops.cross_modal_attention(
            q[b : b + 1, pad:],
            k[b : b + 1, pad:],
            v[b : b + 1, pad:],
            causal=True,
            sinks=sinks_for(4, device),
            softcap=4.0,
        )
        torch.testing.assert_close(out[b : b + 1, pad:], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_key_masks_hiding_whole_blocks(device, causal):
    """Runs of hidden keys longer than any key block (the kernels skip such blocks): left padding of
    200 keys, a hidden middle, hidden runs of 64 alternating, one key kept at the very end."""
    q, k, v, _ = make_case(4, 37, 300, 4, 2, 16, 8, None, None, torch.float64, device)
    keys = torch.arange(300)
    key_mask = torch.stack([keys >= 200, (keys < 64) | (keys >= 256), (keys // 64) % 2 == 0, keys == 299]).to(device)
    grad_out = torch.randn(4, 37, 4, 8, dtype=torch.float64, device=device)
    actual = forward_and_grads(mmkern_attention, q, k, v, grad_out, key_mask=key_mask, causal=causal)
    expected = forward_and_grads(reference.cross_modal_attention, q, k, v, grad_out, key_mask=key_mask, causal=causal)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_within_a_window_is_the_reference_mask(device):
    q, k, v, lengths = make_case(2, 9, 21, 4, 2, 16, 8, [21, 13], [9, 4], torch.float64, device)
    grad_out = torch.randn(2, 9, 4, 8, dtype=torch.float64, device=device)
    torch.manual_seed(5)
    actual = forward_and_grads(
        mmkern_attention, q, k, v, grad_out, dropout_p=0.3, causal=True, window=(4, 0), **lengths
    )
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device=device))
    expected = forward_and_grads(
        reference.cross_modal_attention,
        q,
        k,
        v,
        grad_out,
        dropout_p=0.3,
        dropout_seed=seed,
        causal=True,
        window=(4, 0),
        **lengths,
    )
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-12, atol=1e-12)
    for a, e in zip(actual[2], expected[2]):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_causal_is_sdpas_lower_right_causal(device):
    from torch.nn.attention.bias import causal_lower_right

    q, k, v, _ = make_case(2, 6, 11, 4, 4, 16, 16, None, None, torch.float32, device)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(6, 11))
    torch.testing.assert_close(
        ops.cross_modal_attention(q, k, v, causal=True), expected.transpose(1, 2), rtol=2e-5, atol=2e-5
    )


@pytest.mark.parametrize("device", DEVICES)
def test_a_query_that_sees_no_key_gets_zeros_and_zero_gradients(device):
    q, k, v, lengths = make_case(1, 6, 3, 2, 1, 8, 8, None, None, torch.float32, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ops.cross_modal_attention(q, k, v, causal=True, return_lse=True)  # queries 0-2 see no key
    assert torch.all(out[:, :3] == 0) and torch.all(lse[:, :, :3] == float("-inf"))
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 3:]).all()
    (grad_q,) = torch.autograd.grad(out.sum(), q)
    assert torch.all(grad_q[:, :3] == 0) and torch.isfinite(grad_q).all()


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize(
    "window,key_mask,softcap,sinks,bias",
    [
        ((-1, 0), False, 0.0, False, None),
        ((2, 1), False, 0.0, False, None),
        ((-1, -1), True, 0.0, False, None),
        ((-1, -1), False, 1.5, False, None),
        ((-1, 0), False, 0.0, True, None),
        ((-1, -1), False, 0.0, False, "heads"),
        ((2, 1), True, 2.0, True, "full"),
    ],
)
def test_gradcheck_float64(window, key_mask, softcap, sinks, bias, dropout):
    q, k, v, lengths = make_case(2, 5, 7, 4, 2, 6, 3, [7, 2], [5, 3], torch.float64, "cpu")
    mask = key_mask_for("holes", 2, 7, "cpu") if key_mask else None
    mask = None if mask is None else mask.index_fill(0, torch.tensor([1]), True).index_fill(1, torch.tensor([0]), False)

    def attend(q, k, v, sinks=None, bias=None):
        return ops.cross_modal_attention(
            q,
            k,
            v,
            **lengths,
            scale=0.25,
            dropout_p=0.2 if dropout else 0.0,
            window=window,
            key_mask=mask,
            softcap=softcap or None,
            sinks=sinks,
            bias=bias,
        )

    inputs = [t.requires_grad_() for t in (q, k, v)]
    inputs.append(sinks_for(4, "cpu").requires_grad_() if sinks else None)
    inputs.append(bias_for(bias, 2, 5, 7, 4, "cpu").requires_grad_() if bias else None)
    torch.manual_seed(11)  # the same dropout seed for every call gradcheck makes
    with torch.random.fork_rng():
        assert torch.autograd.gradcheck(lambda *x: _seeded(attend, *x), inputs, fast_mode=_config.TRITON_ON_CPU)


def _seeded(fn, *args):
    """fn(*args) with the global generator at one state, so each call draws the same dropout seed."""
    torch.manual_seed(11)
    return fn(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for window, variants in (((-1, 0), ()), ((3, 1), ()), ((-1, 0), ("holes", 2.0, True, "heads"))):
        q, k, v, lengths = make_case(2, 5, 7, 4, 2, 8, 4, [7, 3], [5, 2], torch.float32, device)
        if variants:
            bias = bias_for("heads", 2, 5, 7, 4, device, torch.float32).expand(2, 4, 5, 7).requires_grad_()
            variants = (
                key_mask_for("holes", 2, 7, device),
                2.0,
                sinks_for(4, device, torch.float32).requires_grad_(),
                bias,
            )
        sample = (
            q.requires_grad_(),
            k.requires_grad_(),
            v.requires_grad_(),
            lengths["kv_lens"],
            lengths["q_lens"],
            0.3,
            0.0,
            None,
            *window,
            *variants,
        )
        torch.library.opcheck(torch.ops.mmkern.cross_modal_attention.default, sample)
        with torch.no_grad():
            out, lse = torch.ops.mmkern.cross_modal_attention.default(*sample)
        # All but sinks, then bias and its gradient asked for.
        backward_sample = (torch.randn_like(out), *(t.detach() for t in sample[:3]), out, lse, *sample[3:12])
        if variants:
            backward_sample += (bias.detach(), True)
        torch.library.opcheck(torch.ops.mmkern.cross_modal_attention_backward.default, backward_sample)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", ["everything", "no_sinks_or_bias", "causal_only"])
def test_torch_compile_fullgraph(device, options):
    """Compiled, with trailing arguments at their defaults (bias, sinks, and for a plain causal call the
    key mask and softcap too) or not."""
    q, k, v, lengths = make_case(2, 9, 12, 4, 2, 16, 8, [12, 5], None, torch.float32, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    learned = options == "everything"
    variant = {"causal": True}
    if options != "causal_only":
        variant.update(window=(4, -1), key_mask=key_mask_for("holes", 2, 12, device), softcap=3.0)
    sinks = sinks_for(4, device, torch.float32).requires_grad_() if learned else None
    bias = bias_for("alibi", 2, 9, 12, 4, device, torch.float32).requires_grad_() if learned else None

    def attend(q, k, v, kv_lens, sinks, bias):
        return ops.cross_modal_attention(q, k, v, kv_lens=kv_lens, sinks=sinks, bias=bias, **variant).square().sum()

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    arguments = (q, k, v, lengths["kv_lens"], sinks, bias)
    wrt = (q, k, v, sinks, bias) if learned else (q, k, v)
    actual = torch.autograd.grad(compiled(*arguments), wrt)
    expected = torch.autograd.grad(attend(*arguments), wrt)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "options",
    [
        {"causal": True},
        {"causal": True, "softcap": 2.0},
        {"causal": True, "sinks": True},
        {"window": (2, 1), "bias": "heads"},
    ],
)
def test_the_registered_autograd_is_the_fast_paths(device, options, monkeypatch):
    """The op's registered autograd (what CPU tensors, tensor subclasses and tracing get) gives the fast
    path's gradients, also where trailing arguments are at their defaults (its needs_input_grad then
    leaves them out)."""
    q, k, v, lengths = make_case(2, 9, 12, 4, 2, 16, 8, [12, 5], None, torch.float64, device)
    options = materialise((2, 9, 12, 4), options, device)
    learned = [options[name].requires_grad_() for name in ("sinks", "bias") if name in options]
    inputs = [t.requires_grad_() for t in (q, k, v)] + learned
    grad_out = torch.randn(2, 9, 4, 8, dtype=torch.float64, device=device)
    fast = torch.autograd.grad(ops.cross_modal_attention(q, k, v, **lengths, **options), inputs, grad_out)
    monkeypatch.setattr(mmkern_eager, "enabled", False)
    registered = torch.autograd.grad(ops.cross_modal_attention(q, k, v, **lengths, **options), inputs, grad_out)
    for a, e in zip(registered, fast):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    if list(options) == ["causal"]:
        # The op called as its schema allows, the trailing defaults left out.
        out = torch.ops.mmkern.cross_modal_attention.default(q, k, v, lengths["kv_lens"], None, 0.25, 0.0, None, -1, 0)[
            0
        ]
        expected = ops.cross_modal_attention(q, k, v, **lengths, scale=0.25, causal=True)
        for a, e in zip(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "options",
    [
        {"causal": True},
        {"window": (2, 3)},
        {"causal": True, "window": (1, 0)},
        {"softcap": 2.0, "sinks": True},
        {"causal": True, "sinks": True, "dropout_p": 0.3},
    ],
)
def test_packed_equals_padded(device, options):
    options = dict(options)
    if options.pop("sinks", False):
        options["sinks"] = sinks_for(4, device)
    check_packed_equals_padded(device, **options)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_key_mask_is_the_padded_one(device):
    """The packed key mask holds one entry per row of k: the padded (B, Lk) mask's valid entries, packed."""
    (q, k, v, lengths), (pq, pk, pv, cu_q, cu_k, max_q, max_k), q_lens = packed_case(device)
    kv_lens = lengths["kv_lens"].tolist()
    mask = key_mask_for("holes", 4, 21, device)
    padded = ops.cross_modal_attention(q, k, v, key_mask=mask, causal=True, **lengths)
    packed = ops.cross_modal_attention_packed(
        pq, pk, pv, cu_q, cu_k, max_q, max_k, causal=True, key_mask=pack(mask, kv_lens)
    )
    torch.testing.assert_close(packed, pack(padded, q_lens), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_matches_reference(device):
    for dtype in dtypes_for(device):
        _, (q, k, v, cu_q, cu_k, max_q, max_k), _ = packed_case(device, dtype, unowned_rows=2)
        out = ops.cross_modal_attention_packed(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, window=(2, -1))
        expected, _ = reference.cross_modal_attention_packed(
            q.double(), k.double(), v.double(), cu_q, cu_k, max_q, max_k, causal=True, window=(2, -1)
        )
        tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
        torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "bad,error,match",
    [
        ({"window": (-2, 0)}, ValueError, "window sides must be >= -1"),
        ({"window": (3,)}, ValueError, r"window must be a \(left, right\) pair"),
        ({"window": (1.5, 0)}, ValueError, r"window must be a \(left, right\) pair"),
        ({"window": 4}, ValueError, r"window must be a \(left, right\) pair"),
        ({"causal": "yes"}, TypeError, "causal must be a bool"),
        ({"causal": True, "window": (4, 2)}, ValueError, "causal=True bounds the window's right side at 0"),
        ({"softcap": 0.0}, ValueError, "softcap must be a positive finite float"),
        ({"softcap": -1.0}, ValueError, "softcap must be a positive finite float"),
        ({"softcap": float("inf")}, ValueError, "softcap must be a positive finite float"),
        ({"softcap": "2"}, ValueError, "softcap must be a positive finite float"),
        ({"key_mask": "mask"}, TypeError, "key_mask must be a bool tensor"),
        ({"key_mask": torch.ones(2, 7)}, TypeError, "key_mask must have dtype torch.bool"),
        ({"key_mask": torch.ones(2, 6, dtype=torch.bool)}, ValueError, "key_mask must have shape"),
        ({"sinks": [0.0, 1.0]}, TypeError, "sinks must be a float tensor"),
        ({"sinks": torch.zeros(2, dtype=torch.int64)}, TypeError, "sinks must be a floating-point tensor"),
        ({"sinks": torch.zeros(3)}, ValueError, r"sinks must have shape \(2,\)"),
        ({"bias": [[0.0]]}, TypeError, "bias must be a float tensor"),
        ({"bias": torch.zeros(5, 7, dtype=torch.int64)}, TypeError, "bias must be a floating-point tensor"),
        ({"bias": torch.zeros(3, 5, 7)}, ValueError, r"bias must be broadcastable to \(batch, q_heads, q_len, k_len\)"),
    ],
)
@pytest.mark.parametrize("packed", [False, True])
def test_bad_variants_are_named(bad, error, match, packed):
    q, k, v = torch.randn(2, 5, 2, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    if packed and isinstance(bad.get("key_mask"), torch.Tensor):
        bad = {"key_mask": bad["key_mask"].flatten()}  # (total_k,) = (14,): still of the wrong dtype or size
    if packed and "bias" in bad:
        error, match = TypeError, "unexpected keyword argument 'bias'"  # the packed form takes none
    with pytest.raises(error, match=match):
        if packed:
            cu = torch.tensor([0, 5, 10]), torch.tensor([0, 7, 14])
            ops.cross_modal_attention_packed(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), *cu, 5, 7, **bad)
        else:
            ops.cross_modal_attention(q, k, v, **bad)


# Key-gradient tiles of other shapes than the interpreter's square one: more keys a program than
# queries a step and the other way round (the GPU's default is 32 queries by 128 keys).
KV_TILES = {"wide": AttentionTile(16, 32, 1, 1), "tall": AttentionTile(32, 16, 1, 1)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(KV_TILES))
@pytest.mark.parametrize("variant", ["causal_bottom_right_lengths", "key_holes_window", "everything"])
def test_key_gradients_with_rectangular_tiles(variant, shape, device):
    """The key-and-value backward (S^T = K Q^T) with block_m queries a step and block_n keys a program
    unequal, over lengths, windows, key masks, a softcap, sinks and a bias."""
    if not runs_on_triton(torch.device(device)):
        pytest.skip("the C++ CPU kernels take no tiles")
    params, options = VARIANTS[variant]
    with tiles.override("attention_backward_kv", lambda *args: KV_TILES[shape]):
        check_against_reference(params, torch.float32, device, **materialise(params, options, device))
