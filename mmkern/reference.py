"""The eager composition of every mmkern op in plain PyTorch: the ground truth for tests and the
baseline for benchmarks. Written for clarity, not speed."""

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mmkern.activations import activation_forward


def concat_linear(
    inputs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None, *, activation: str = "none"
) -> torch.Tensor:
    """act(F.linear(cat([x.expand(*lead, d_x) for x in inputs], -1), weight, bias))."""
    lead = torch.broadcast_shapes(*(x.shape[:-1] for x in inputs))
    concat = torch.cat([x.expand(*lead, x.shape[-1]) for x in inputs], dim=-1)
    return activation_forward(F.linear(concat, weight, bias), activation)


# Dropout masks come from a counter-based hash (splitmix64) of the seed and the element's index in
# the (B, Hq, Lq, Lk) probability matrix, so every kernel (C++, Triton) and this reference draw the
# same mask without storing it, and the backward redraws it.
_SEED_MULTIPLIER = 0xD1B54A32D192ED03
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values taken as uint64."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def dropout_keep_mask(seed: int, shape: tuple, p: float, device=None) -> torch.Tensor:
    """Which attention probabilities of a (B, Hq, Lq, Lk) matrix dropout keeps, for ``seed``."""
    offset = (seed * _SEED_MULTIPLIER + _GOLDEN_GAMMA) % 2**64
    index = torch.arange(math.prod(shape), dtype=torch.int64, device=device).reshape(shape)
    z = index + (offset - 2**64 if offset >= 2**63 else offset)  # int64 arithmetic wraps as uint64 would
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    uniform = _shift_right(z, 40).to(torch.float64) / 2**24  # the top 24 bits, in [0, 1)
    return uniform >= p


def visible_keys(q_len: int, k_len: int, q_lens, kv_lens, window: tuple, device, key_mask=None) -> torch.Tensor:
    """(B, 1, Lq, Lk) booleans: key j is visible to query i of sample b when it is one of the sample's
    kv_lens[b] keys, kept by ``key_mask[b, j]`` if given and, with a window (left, right) (-1: unbounded),
    i + d - left <= j <= i + d + right, where d = kv_lens[b] - q_lens[b] aligns the last query with the
    last key (bottom right, as FlashAttention and SDPA's lower-right causal mask do). causal is
    window (-1, 0)."""
    left, right = window
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(k_len, device=device)[None, :]
    visible = cols < kv_lens[:, None, None]
    if key_mask is not None:
        visible = visible & key_mask[:, None, :].to(device)
    diagonal = (kv_lens - q_lens)[:, None, None]
    offset = cols - rows - diagonal  # j - (i + d)
    if left >= 0:
        visible = visible & (offset >= -left)
    if right >= 0:
        visible = visible & (offset <= right)
    return visible[:, None]


def cross_modal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_lens: torch.Tensor | None = None,
    q_lens: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    causal: bool = False,
    window: tuple | None = None,
    key_mask: torch.Tensor | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple:
    """softmax(q k^T * scale over each sample's visible keys) v, per head, with grouped heads (head h of
    q reads head h // (Hq / Hkv) of k and v). A sample's visible keys are its first kv_lens keys, those
    ``key_mask`` (B, Lk) keeps, within ``window`` (left, right) of each query's diagonal, and at or
    before it with ``causal`` (see visible_keys). ``softcap`` > 0 replaces each scaled score s by
    softcap * tanh(s / softcap); ``bias`` (broadcastable to (B, Hq, Lq, Lk)) is then added to the
    scores (-inf hides a key); ``sinks`` (Hq,) adds exp(sinks[h]) to every row's softmax
    denominator (a logit no value belongs to). Returns (out (B, Lq, Hq, Dv), lse (B, Hq, Lq) in float32,
    float64 for float64 inputs; the sink is part of it). Rows with no visible key are zero, with
    lse = -inf (the sink's logit with sinks); query rows past q_lens are zero with lse = -inf. Scores
    and the weighted sum run in the inputs' dtype and the softmax in float32, as eager attention does."""
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    left, right = (-1, -1) if window is None else window
    right = 0 if causal else right
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (
        (qh @ kh.transpose(-1, -2)).float() * scale if q.dtype != torch.float64 else (qh @ kh.transpose(-1, -2)) * scale
    )
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    kv_lens = torch.full((batch,), k_len, device=q.device) if kv_lens is None else kv_lens.to(q.device)
    all_rows = torch.full((batch,), q_len, device=q.device)
    valid = visible_keys(
        q_len, k_len, all_rows if q_lens is None else q_lens.to(q.device), kv_lens, (left, right), q.device, key_mask
    )
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
        valid = valid & ~torch.isneginf(scores)  # a bias of -inf hides the key
    empty = ~valid.any(-1, keepdim=True)
    # Rows without a visible key get finite scores and are zeroed after the softmax: no NaN, and no NaN
    # gradient either.
    scores = scores.masked_fill(~valid, float("-inf")).masked_fill(empty, 0.0)
    if sinks is None:
        probs = torch.softmax(scores, dim=-1) * ~empty
        lse = torch.logsumexp(scores, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    else:
        # The sink's logit joins each row's softmax as one more column, whose probability is dropped.
        sink_column = sinks.to(scores.dtype)[None, :, None, None].expand(batch, q_heads, q_len, 1)
        scores = torch.cat([scores.masked_fill(empty, float("-inf")), sink_column], -1)
        probs = torch.softmax(scores, dim=-1)[..., :-1]
        lse = torch.logsumexp(scores, dim=-1)
    if dropout_p > 0:
        keep = dropout_keep_mask(dropout_seed, tuple(probs.shape), dropout_p, q.device)
        probs = probs * keep / (1 - dropout_p)
    # Keys and values past kv_lens are padding, never read: NaN or inf there must not reach the output
    # (0 * NaN would).
    padding = torch.arange(k_len, device=q.device) >= kv_lens[:, None]
    vh = vh.masked_fill(padding[:, None, :, None], 0)
    out = (probs.to(v.dtype) @ vh).transpose(1, 2)
    if q_lens is not None:
        rows = torch.arange(q_len, device=q.device) < q_lens[:, None]
        out = out * rows[:, :, None, None]
        lse = lse.masked_fill(~rows[:, None, :], float("-inf"))
    return out, lse


def cross_modal_attention_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    causal: bool = False,
    window: tuple | None = None,
    key_mask: torch.Tensor | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple:
    """The packed form through the padded one: each sample's rows (and ``key_mask``'s, one entry per
    row of k) are copied into a (B, max_seqlen, ...) batch and back. Returns (out (total_q, Hq, Dv),
    zero on rows no sample owns, and lse (Hq, total_q), -inf there)."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    q_lens = torch.tensor([b - a for a, b in zip(starts_q, starts_q[1:])], dtype=torch.int64, device=q.device)
    kv_lens = torch.tensor([b - a for a, b in zip(starts_k, starts_k[1:])], dtype=torch.int64, device=q.device)

    def pad(x, starts, lengths, max_len):
        padded = x.new_zeros((len(lengths), max_len, *x.shape[1:]))
        for b, (start, length) in enumerate(zip(starts, lengths.tolist())):
            padded[b, :length] = x[start : start + length]
        return padded

    out_padded, lse_padded = cross_modal_attention(
        pad(q, starts_q, q_lens, max_seqlen_q),
        pad(k, starts_k, kv_lens, max_seqlen_k),
        pad(v, starts_k, kv_lens, max_seqlen_k),
        kv_lens=kv_lens,
        q_lens=q_lens,
        scale=scale,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        causal=causal,
        window=window,
        key_mask=None if key_mask is None else pad(key_mask, starts_k, kv_lens, max_seqlen_k),
        softcap=softcap,
        sinks=sinks,
    )
    out = q.new_zeros((q.shape[0], q.shape[1], v.shape[2]))
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_padded.dtype, device=q.device)
    for b, (start, length) in enumerate(zip(starts_q, q_lens.tolist())):
        out = out.index_put((torch.arange(start, start + length, device=q.device),), out_padded[b, :length])
        lse[:, start : start + length] = lse_padded[b, :, :length]
    return out, lse


QUANTIZED_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple:
    """(xq, scale): scale = max(amax / qmax, tiny) per row in float32, xq = round(x / scale) clamped
    to [-qmax, qmax]; a row holding NaN or inf gets a NaN scale and zeros."""
    qmax = QUANTIZED_MAX[dtype]
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True) if x.shape[-1] else xf.new_zeros((*x.shape[:-1], 1))
    finite = torch.isfinite(xf).all(-1, keepdim=True)
    # A tensor divisor: CUDA divides by a Python scalar as a product with its reciprocal, which can
    # be one ulp off the true quotient that the kernels compute.
    scale = (amax / torch.full_like(amax, qmax)).clamp(min=torch.finfo(torch.float32).tiny)
    scale = scale.masked_fill(~finite, float("nan"))
    q = (xf / scale).clamp(-qmax, qmax)
    q = torch.round(q) if dtype == torch.int8 else q
    return q.masked_fill(~finite, 0).to(dtype), scale


def dequantize_per_token(xq: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (xq.float() * scale).to(dtype)


def fake_quantize_per_token(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    return dequantize_per_token(*quantize_per_token(x, dtype), x.dtype)


def quantized_concat_linear(
    inputs_q: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    out_dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """concat_linear on the dequantized inputs and weight, computed in ``compute_dtype`` (out_dtype by
    default: the eager path; float64 makes every integer sum exact, the ground truth)."""
    compute_dtype = out_dtype if compute_dtype is None else compute_dtype
    inputs = [x.to(compute_dtype) * s.to(compute_dtype) for x, s in zip(inputs_q, scales)]
    weight = weight_q.to(compute_dtype) * weight_scale.to(compute_dtype)[:, None]
    bias = None if bias is None else bias.to(compute_dtype)
    return concat_linear(inputs, weight, bias, activation=activation).to(out_dtype)


def quantize_and_concat_linear(
    inputs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Inputs quantized to int8 per token and the weight per output channel, then
    quantized_concat_linear into the inputs' dtype."""
    quantized = [quantize_per_token(x) for x in inputs]
    weight_q, weight_scale = quantize_per_token(weight)
    return quantized_concat_linear(
        [q for q, _ in quantized],
        [s for _, s in quantized],
        weight_q,
        weight_scale[:, 0],
        bias,
        activation=activation,
        out_dtype=weight.dtype,
        compute_dtype=compute_dtype,
    )


def quantized_fusion(
    inputs_q: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    weights: torch.Tensor | None = None,
    *,
    mode: str = "sum",
    gate: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ "sum": sum_i weights[i] * dequant(x_i); "gated": g * dequant(x_0) + (1 - g) * dequant(x_1),
    g = sigmoid(gate); computed in ``compute_dtype``."""
    features = [dequantize_per_token(x, s, compute_dtype) for x, s in zip(inputs_q, scales)]
    if mode == "gated":
        g = torch.sigmoid(gate.to(compute_dtype))
        return (g * features[0] + (1 - g) * features[1]).to(out_dtype)
    weights = torch.ones(len(features), dtype=compute_dtype, device=features[0].device) if weights is None else weights
    out = functools.reduce(torch.add, [w * f for w, f in zip(weights.to(compute_dtype), features)])
    return out.to(out_dtype)
