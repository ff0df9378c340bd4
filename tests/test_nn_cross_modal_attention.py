import pytest
import torch
from torch import nn

from mmkern import reference
from mmkern.nn import CrossModalAttention
from tests.numerics import DEVICES


def make_mha(device, kdim=None, vdim=None, batch_first=True, bias=True):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(
        32, 4, kdim=kdim, vdim=vdim, batch_first=batch_first, bias=bias, device=device, dtype=torch.float64
    )
    if bias:  # torch initialises the biases to zero; non-zero ones make the check meaningful
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha.eval()


def inputs(device, kdim=32, vdim=32, batch_first=True, self_attention=False):
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        shape = shape if batch_first else (shape[1], shape[0], *shape[2:])
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(device)

    query = randn(3, 7, 32)
    if self_attention:
        return query, query, query
    return query, randn(3, 11, kdim), randn(3, 11, vdim)


def right_padding(device, lengths=(11, 4, 1), k_len=11):
    return torch.arange(k_len, device=device) >= torch.tensor(lengths, device=device)[:, None]


def assert_same(module, mha, args, **kwargs):
    expected, expected_weights = mha(*args, **kwargs)
    actual, actual_weights = module(*args, **kwargs)
    torch.testing.assert_close(actual, expected)
    if kwargs.get("need_weights"):
        torch.testing.assert_close(actual_weights, expected_weights)
    else:
        assert actual_weights is None
    grads = torch.autograd.grad(actual.square().sum(), list(module.parameters()))
    expected_grads = torch.autograd.grad(expected.square().sum(), list(mha.parameters()))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_from_torch_self_attention_with_packed_weights(device, batch_first):
    mha = make_mha(device, batch_first=batch_first)
    module = CrossModalAttention.from_torch(mha)
    assert module.in_proj_weight is mha.in_proj_weight and module.out_proj is mha.out_proj
    args = inputs(device, batch_first=batch_first, self_attention=True)
    assert_same(module, mha, args, need_weights=False)
    assert_same(module, mha, args, key_padding_mask=right_padding(device, (7, 3, 1), 7), need_weights=False)


@pytest.mark.parametrize("device", DEVICES)
def test_from_torch_cross_attention_with_kdim_vdim(device):
    mha = make_mha(device, kdim=24, vdim=40)
    module = CrossModalAttention.from_torch(mha)
    assert module.in_proj_weight is None and module.k_proj_weight is mha.k_proj_weight
    args = inputs(device, kdim=24, vdim=40)
    assert_same(module, mha, args, need_weights=False)
    assert_same(module, mha, args, key_padding_mask=right_padding(device), need_weights=False)


@pytest.mark.parametrize("device", DEVICES)
def test_a_mask_that_is_not_right_padding_is_exact(device):
    mha = make_mha(device)
    module = CrossModalAttention.from_torch(mha)
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(2)).to(device) < 0.5
    mask[:, 3] = False  # every sample keeps a key
    assert_same(module, mha, inputs(device), key_padding_mask=mask, need_weights=False)


@pytest.mark.parametrize("device", DEVICES)
def test_weights_attn_mask_and_float_padding_give_torchs_answer(device):
    mha = make_mha(device)
    module = CrossModalAttention.from_torch(mha)
    args = inputs(device)
    assert_same(module, mha, args, key_padding_mask=right_padding(device), need_weights=True)
    assert_same(module, mha, args, need_weights=True, average_attn_weights=False)
    attn_mask = torch.randn(7, 11, dtype=torch.float64, device=device)
    assert_same(module, mha, args, attn_mask=attn_mask, need_weights=False)
    bool_mask = torch.rand(3 * 4, 7, 11, generator=torch.Generator().manual_seed(3)).to(device) < 0.3
    bool_mask[..., 0] = False  # no row loses every key (torch's answer would be NaN)
    assert_same(module, mha, args, attn_mask=bool_mask, key_padding_mask=right_padding(device), need_weights=False)
    float_padding = torch.zeros(3, 11, dtype=torch.float64, device=device).masked_fill(right_padding(device), -1e4)
    assert_same(module, mha, args, key_padding_mask=float_padding, need_weights=False)


@pytest.mark.parametrize("device", DEVICES)
def test_unbatched_inputs(device):
    mha = make_mha(device)
    module = CrossModalAttention.from_torch(mha)
    query, key, value = (x[0] for x in inputs(device))
    assert_same(module, mha, (query, key, value), need_weights=False)


def test_state_dicts_move_between_the_two():
    mha = make_mha("cpu", kdim=24, vdim=40)
    module = CrossModalAttention(32, 4, kdim=24, vdim=40, dtype=torch.float64)
    assert set(module.state_dict()) == set(mha.state_dict())
    module.load_state_dict(mha.state_dict())
    args = inputs("cpu", kdim=24, vdim=40)
    torch.testing.assert_close(module(*args)[0], mha(*args, need_weights=False)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_query_attention(device):
    module = CrossModalAttention(32, 8, kdim=24, vdim=16, num_kv_heads=2, device=device, dtype=torch.float64)
    assert module.k_proj_weight.shape == (8, 24) and module.in_proj_bias.shape == (32 + 2 * 8,)
    query, key, value = inputs(device, kdim=24, vdim=16)
    with torch.no_grad():
        module.in_proj_bias.normal_()
    out, _ = module(query, key, value, key_padding_mask=right_padding(device))
    bq, bk, bv = module.in_proj_bias.split((32, 8, 8))
    q = (query @ module.q_proj_weight.T + bq).unflatten(-1, (8, 4))
    k = (key @ module.k_proj_weight.T + bk).unflatten(-1, (2, 4))
    v = (value @ module.v_proj_weight.T + bv).unflatten(-1, (2, 4))
    attended, _ = reference.cross_modal_attention(q, k, v, kv_lens=torch.tensor([11, 4, 1], device=device))
    torch.testing.assert_close(out, module.out_proj(attended.flatten(-2)))


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_without_graph_breaks(device):
    mha = make_mha(device)
    module = CrossModalAttention.from_torch(mha)
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(2)).to(device) < 0.5
    mask[:, 0] = False
    args = inputs(device)
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(*args, key_padding_mask=mask)[0], mha(*args, key_padding_mask=mask)[0])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(embed_dim=30, num_heads=4), r"embed_dim \(30\) must be a positive multiple of num_heads \(4\)"),
        (dict(embed_dim=32, num_heads=4, num_kv_heads=3), r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
        (dict(embed_dim=32, num_heads=4, dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_configuration_is_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        CrossModalAttention(**arguments)


def test_bad_inputs_are_named():
    module = CrossModalAttention(32, 4)
    query, key = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    with pytest.raises(ValueError, match=r"key must be \(batch, length, 32\)"):
        module(query, torch.randn(2, 6, 31), key)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, key length\) \(2, 6\)"):
        module(query, key, key, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mha must be an nn.MultiheadAttention"):
        CrossModalAttention.from_torch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="add_bias_kv"):
        CrossModalAttention.from_torch(nn.MultiheadAttention(32, 4, add_bias_kv=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_lengths_equal_the_padding_mask_they_stand_for(device, batch_first):
    mha = make_mha(device, kdim=24, vdim=16, batch_first=batch_first)
    module = CrossModalAttention.from_torch(mha)
    args = inputs(device, kdim=24, vdim=16, batch_first=batch_first)
    kv_lens = torch.tensor([11, 4, 1], device=device)
    expected, _ = mha(*args, key_padding_mask=right_padding(device))
    actual, weights = module(*args, kv_lens=kv_lens)
    assert weights is None
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    # Query rows past q_lens carry out_proj's bias alone; the valid rows are unchanged.
    q_lens = torch.tensor([7, 2, 0], device=device)
    with_q_lens, _ = module(*args, kv_lens=kv_lens, q_lens=q_lens)
    rows = torch.arange(7, device=device) < q_lens[:, None]
    rows = rows if batch_first else rows.t()
    torch.testing.assert_close(with_q_lens[rows], expected[rows], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(with_q_lens[~rows], mha.out_proj.bias.expand(int((~rows).sum()), -1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["key_padding_mask", "kv_lens"])
def test_a_sample_with_every_key_masked_gets_the_bias_alone(device, how):
    """nn.MultiheadAttention gives NaN there; the module gives out_proj's bias, and its keys and values
    get zero gradient. The other samples are nn.MultiheadAttention's."""
    mha = make_mha(device)
    module = CrossModalAttention.from_torch(mha)
    query, key, value = (x.requires_grad_() for x in inputs(device))
    lengths = (11, 0, 4)
    masking = (
        {"key_padding_mask": right_padding(device, lengths)}
        if how == "key_padding_mask"
        else {"kv_lens": torch.tensor(lengths, device=device)}
    )
    out, _ = module(query, key, value, **masking)
    expected, _ = mha(query, key, value, key_padding_mask=right_padding(device, lengths))
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]])
    torch.testing.assert_close(out[1], mha.out_proj.bias.expand(7, -1))
    grads = torch.autograd.grad(out.square().sum(), (query, key, value, *module.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[1][1] == 0) and torch.all(grads[2][1] == 0)


def test_additive_masks_run_the_kernel_as_its_bias(monkeypatch):
    """Additive padding masks (nn.Transformer*Layer's 0 / -inf, or genuine weights) and attn_masks
    (boolean or additive, shared or per head) take the kernel, with nothing read on the host."""
    mha = make_mha("cpu")
    module = CrossModalAttention.from_torch(mha)
    args = inputs("cpu")
    mask = right_padding("cpu")
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, float("-inf"))
    exact_calls = []
    import mmkern.nn.cross_modal_attention as module_file

    exact = module_file._exact_attention
    monkeypatch.setattr(module_file, "_exact_attention", lambda *a: exact_calls.append(1) or exact(*a))
    torch.testing.assert_close(
        module(*args, key_padding_mask=additive)[0], mha(*args, key_padding_mask=mask)[0], rtol=1e-10, atol=1e-10
    )
    soft = additive.masked_fill(~mask, -0.5)
    assert_same(module, mha, args, key_padding_mask=soft, need_weights=False)
    q_len, k_len = args[0].shape[1], args[1].shape[1]
    generator = torch.Generator().manual_seed(3)
    boolean = torch.rand(q_len, k_len, generator=generator) < 0.3
    boolean[:, 0] = False
    per_head = torch.randn(args[0].shape[0] * mha.num_heads, q_len, k_len, generator=generator, dtype=torch.float64)
    for attn_mask in (boolean, per_head):
        assert_same(module, mha, args, attn_mask=attn_mask, key_padding_mask=mask, need_weights=False)
    assert exact_calls == []


def test_lengths_refuse_masks_and_unbatched_inputs():
    module = CrossModalAttention(32, 4)
    query, key, value = inputs("cpu")
    kv_lens = torch.tensor([11, 4, 1])
    with pytest.raises(ValueError, match="do not combine with attn_mask"):
        module(query.float(), key.float(), value.float(), key_padding_mask=right_padding("cpu"), kv_lens=kv_lens)
    with pytest.raises(ValueError, match="need batched inputs"):
        module(query[0].float(), key[0].float(), value[0].float(), kv_lens=kv_lens)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_causal_self_attention_runs_the_kernel_and_gives_torchs_answer(device, batch_first, monkeypatch):
    mha = make_mha(device, batch_first=batch_first)
    module = CrossModalAttention.from_torch(mha)
    args = inputs(device, batch_first=batch_first, self_attention=True)
    causal_mask = nn.Transformer.generate_square_subsequent_mask(7, device=device, dtype=torch.float64)
    import mmkern.nn.cross_modal_attention as attention_module

    exact = []
    monkeypatch.setattr(
        attention_module,
        "_exact_attention",
        lambda *a, _exact=attention_module._exact_attention: exact.append(1) or _exact(*a),
    )
    assert_same(module, mha, args, attn_mask=causal_mask, is_causal=True, need_weights=False)
    # With a key padding mask too (every query keeps its first key, so torch gives no NaN rows).
    padding = torch.rand(3, 7, generator=torch.Generator().manual_seed(2)).to(device) < 0.4
    padding[:, 0] = False
    assert_same(module, mha, args, attn_mask=causal_mask, is_causal=True, key_padding_mask=padding, need_weights=False)
    assert not exact  # the kernel ran
    # With the weights asked for, the exact path keeps torch's answer.
    assert_same(module, mha, args, attn_mask=causal_mask, is_causal=True, need_weights=True)
    assert exact
