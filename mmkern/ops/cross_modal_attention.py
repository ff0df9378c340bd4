"""Cross-modal attention: ``mmkern.ops.cross_modal_attention`` and its packed (varlen) form
``mmkern.ops.cross_modal_attention_packed``.

The schemas are in csrc/registration.cpp, the CPU kernels in csrc/cpu/cross_modal_attention.cpp and
the CUDA kernels (Triton) in mmkern/kernels/cross_modal_attention.py; this file holds the public
functions, their argument checks, the fake kernels and the autograd registration.
"""

import torch

from mmkern.kernels.launch import accumulate_dtype, runs_on_triton, triton_has_float64_dot
from mmkern.ops._checks import checks_values
from mmkern.ops._eager import autocast_inputs, call_op, needs_gradient, takes_eager_path, without_autocast
from mmkern.ops._registration import (
    dtype_after_autocast,
    register_autocast,
    register_triton_kernel,
    triton_implementation,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256


def cross_modal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_lens: torch.Tensor | None = None,
    q_lens: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    causal: bool = False,
    window: tuple | None = None,
    key_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Attention of one modality's queries over another's keys and values, each sample with its own
    lengths: ``softmax(q k^T * scale) v`` per head, over the first ``kv_lens[b]`` keys of sample b.

    Args:
        q: ``(B, Lq, Hq, D)``.
        k: ``(B, Lk, Hkv, D)``; ``Hq`` must be a multiple of ``Hkv`` (grouped and multi-query
            attention: query head h reads kv head ``h // (Hq // Hkv)``).
        v: ``(B, Lk, Hkv, Dv)``; ``Dv`` may differ from ``D``. Head dims up to 256. Strided views
            (q, k, v sliced out of one fused projection) are read in place when their last dim is
            contiguous.
        kv_lens: optional integer ``(B,)``, valid keys per sample, in ``[0, Lk]``. Keys past it are
            ignored and cost no work; a sample with no valid key gets zeros and zero gradients.
        q_lens: optional integer ``(B,)``, valid queries per sample, in ``[0, Lq]``; later rows are
            zero and get zero gradient. Lengths outside their range raise on CPU, and on CUDA with
            ``mmkern.set_value_checks(True)`` (a device sync); unchecked, the kernels clamp them.
        scale: the score scale, ``D ** -0.5`` by default.
        dropout_p: dropout on the attention probabilities, drawn in the kernel from a seed taken from
            the device's default generator (so ``torch.manual_seed`` makes it reproducible).
        causal: each query sees only the keys up to its own position, aligned to the bottom right
            when a sample's query and key counts differ (query i of a sample with ``Lq_b`` valid
            queries and ``Lk_b`` valid keys sees keys ``j <= i + Lk_b - Lq_b``), as FlashAttention
            and SDPA's lower-right causal mask do. Key blocks past the diagonal cost no work.
        window: ``(left, right)``, a sliding window: query i sees keys ``j`` with
            ``i + d - left <= j <= i + d + right``, ``d = Lk_b - Lq_b``; ``-1`` leaves a side
            unbounded (FlashAttention's convention). With ``causal`` the right side is 0, and
            ``right`` must be -1 or 0. A query that sees no key gets zeros (lse ``-inf``).
        key_mask: optional bool ``(B, Lk)``: the keys each sample's queries may see (True) or not
            (left padding, holes), read in the kernel; it composes with kv_lens and the window (the
            window's diagonal stays aligned by the lengths). Queries that see no key get zeros.
        softcap: optional float > 0: each scaled score ``s`` becomes ``softcap * tanh(s / softcap)``
            (Gemma 2's attention logit softcapping).
        sinks: optional float ``(Hq,)``, one learned logit per query head that joins every row's
            softmax denominator with no value of its own (GPT-OSS's attention sinks): rows sum to less
            than one, and a row that sees no key gets zeros with lse ``sinks[h]``. It gets a gradient
            when it requires one.
        bias: optional float tensor broadcastable to ``(B, Hq, Lq, Lk)``, added to the scores after
            the softcap (T5's relative position bias, ALiBi, an additive 0 / -inf mask; -inf hides a
            key). It is read through its broadcast strides, never expanded in memory; when it requires
            grad, the backward builds its ``(B, Hq, Lq, Lk)`` float32 gradient and sums it to the
            bias's shape. Padded form only.
        return_lse: also return the log-sum-exp of each row's scaled scores (the sink included),
            ``(B, Hq, Lq)``, float32 (float64 for float64 inputs), ``-inf`` for rows with no valid key;
            it carries no gradient.

    Returns:
        ``out (B, Lq, Hq, Dv)`` in q's dtype, or ``(out, lse)`` with ``return_lse``.

    Raises:
        TypeError: a non-tensor, non-floating or mismatched q/k/v dtypes, non-integer lengths.
        ValueError: wrong ranks or shapes, ``Hq % Hkv != 0``, head dims over 256, mismatched
            devices, lengths of the wrong shape or (where checked) outside their range, a bad scale,
            dropout_p, window, softcap, or a key mask or sinks of the wrong shape or device.
    """
    q, k, v = _check_qkv(q, k, v, packed=False)
    window = _check_window(causal, window)
    batch, q_len, q_heads, head_dim = q.shape
    kv_lens = _check_lengths(kv_lens, "kv_lens", batch, k.shape[1], q.device)
    q_lens = _check_lengths(q_lens, "q_lens", batch, q_len, q.device)
    scale = _check_scale(scale, head_dim)
    dropout_p, seed = _dropout(dropout_p, q.device)
    variants = _check_variants(key_mask, (batch, k.shape[1]), "(batch, k_len)", softcap, sinks, q_heads, q.device)
    bias = _check_bias(bias, (batch, q_heads, q_len, k.shape[1]), q.device)
    arguments = (q, k, v, kv_lens, q_lens, scale, dropout_p, seed, *window, *variants, bias)
    tensors = (q, k, v, kv_lens, q_lens, variants[0], variants[2], bias)
    if takes_eager_path(tensors):
        out, lse = _eager_attention("", *arguments)
    else:
        out, lse = call_op(torch.ops.mmkern.cross_modal_attention.default, tensors, *arguments)
    return (out, lse) if return_lse else out


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
    causal: bool = False,
    window: tuple | None = None,
    key_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """``cross_modal_attention`` over packed sequences, as flash-attn's varlen API: the samples' rows
    lie one after another, sample b owning rows ``[cu_seqlens[b], cu_seqlens[b + 1])``.

    Args:
        q: ``(total_q, Hq, D)``.
        k: ``(total_k, Hkv, D)``, ``Hq`` a multiple of ``Hkv``.
        v: ``(total_k, Hkv, Dv)``.
        cu_seqlens_q, cu_seqlens_k: integer ``(B + 1,)`` row offsets on q's device, non-decreasing,
            starting at 0 or more and ending at most at ``total``. Checked as lengths are; unchecked,
            the kernels read them as their running maximum clamped into ``[0, total]``, and keep at
            most ``max_seqlen`` rows of a sample (a bad offset can give an empty or short sample,
            never a read outside the tensors or two samples on one row).
        max_seqlen_q, max_seqlen_k: the longest sample of each side (sizes the launch grid).
        scale, dropout_p: as in ``cross_modal_attention``. Dropout draws the mask of the same batch
            padded to ``(B, max_seqlen_q, ...)``, so packed and padded runs agree for one seed.
        causal, window: as in ``cross_modal_attention``, over each sample's own rows.
        key_mask: optional bool ``(total_k,)``, one entry per row of k: whether that key may be seen.
        softcap, sinks: as in ``cross_modal_attention``.
        return_lse: also return the float32 log-sum-exp ``(Hq, total_q)`` (float64 for float64).

    Returns:
        ``out (total_q, Hq, Dv)``, zero on rows no sample owns, or ``(out, lse)``.

    Raises:
        TypeError, ValueError: as ``cross_modal_attention``, and for cu_seqlens of the wrong dtype,
            shape, device or values, and max lengths that are not non-negative ints or are exceeded.
    """
    q, k, v = _check_qkv(q, k, v, packed=True)
    window = _check_window(causal, window)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    cu_seqlens_q = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", None, q.shape[0], max_seqlen_q, q.device)
    cu_seqlens_k = _check_cu_seqlens(
        cu_seqlens_k, "cu_seqlens_k", cu_seqlens_q.shape[0], k.shape[0], max_seqlen_k, q.device
    )
    scale = _check_scale(scale, q.shape[2])
    dropout_p, seed = _dropout(dropout_p, q.device)
    variants = _check_variants(key_mask, (k.shape[0],), "(total_k,)", softcap, sinks, q.shape[1], q.device)
    arguments = (
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale,
        dropout_p,
        seed,
        *window,
        *variants,
    )
    tensors = (q, k, v, cu_seqlens_q, cu_seqlens_k, variants[0], variants[2])
    if takes_eager_path(tensors):
        out, lse = _eager_attention("packed_", *arguments)
    else:
        out, lse = call_op(torch.ops.mmkern.cross_modal_attention_packed.default, tensors, *arguments)
    return (out, lse) if return_lse else out


def _dropout(dropout_p, device) -> tuple:
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    # Drawn on the device, from its generator: no copy to the device (a sync), capturable in a CUDA
    # graph, and torch.compile traces it.
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=device) if dropout_p > 0 else None
    return float(dropout_p), seed


def _check_qkv(q, k, v, packed: bool) -> tuple:
    """q, k, v checked as (B, L, H, D) tensors, or (total, H, D) ones when packed."""
    rank, layout = (3, "(total, heads, head_dim)") if packed else (4, "(batch, length, heads, head_dim)")
    named = (("q", q), ("k", k), ("v", v))
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} has dtype {tensor.dtype}; cross_modal_attention takes float16, bfloat16, float32 or float64"
            )
        if tensor.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(tensor.shape)}")
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}; q, k and v must share one device")
        if tensor.dtype == torch.float64 and runs_on_triton(tensor.device) and not triton_has_float64_dot():
            raise TypeError(
                f"{name} is float64, which mmkern's Triton kernels need Triton >= 3.5 for; use float32, "
                "or CPU tensors for float64"
            )
    for name, tensor in named[1:]:
        if dtype_after_autocast(tensor) != dtype_after_autocast(q):
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but q has {q.dtype}; q, k and v must share one "
                "dtype (or run under torch.autocast)"
            )
    (q_heads, head_dim), (kv_heads, k_dim), v_dim = q.shape[-2:], k.shape[-2:], v.shape[-1]
    if not packed and not k.shape[0] == v.shape[0] == q.shape[0]:
        raise ValueError(f"q, k and v must have the same batch size, got {q.shape[0]}, {k.shape[0]} and {v.shape[0]}")
    if v.shape[-3] != k.shape[-3] or v.shape[-2] != kv_heads:
        raise ValueError(f"v must have k's length and heads {(k.shape[-3], kv_heads)}, got {tuple(v.shape[-3:-1])}")
    if k_dim != head_dim:
        raise ValueError(f"q and k must have the same head dim, got {head_dim} and {k_dim}")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"the query heads ({q_heads}) must be a multiple of the key/value heads ({kv_heads})")
    for name, dim in (("q and k", head_dim), ("v", v_dim)):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"the head dim of {name} must be at most {MAX_HEAD_DIM}, got {dim}")
    # Any strides are read in place but the last: a view with a strided last dim is copied once.
    return tuple(t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in (q, k, v))


def _check_lengths(lengths, name, batch, limit, device):
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape ({batch},) or None, got {type(lengths).__name__}")
    if lengths.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {lengths.dtype}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), one length per sample, got {tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"{name} is on {lengths.device} but q is on {device}")
    # Unchecked, the kernels clamp each length into [0, limit].
    if batch and checks_values(device):
        low, high = torch.stack(torch.aminmax(lengths)).tolist()  # one device sync, not two
        if low < 0 or high > limit:
            raise ValueError(f"{name} must lie in [0, {limit}], got values from {low} to {high}")
    return lengths


def _check_cu_seqlens(cu_seqlens, name, entries, total, max_len, device):
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of row offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D with batch + 1 offsets, got shape {tuple(cu_seqlens.shape)}")
    if entries is not None and cu_seqlens.shape[0] != entries:
        raise ValueError(f"{name} must have as many offsets as cu_seqlens_q ({entries}), got {cu_seqlens.shape[0]}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but q is on {device}")
    # Unchecked, the kernels read the offsets as their running maximum clamped into [0, total] and
    # keep at most max_len rows of a sample.
    if checks_values(device):
        # first, last, shortest and longest step in one device sync
        steps = torch.cat([cu_seqlens.diff(), cu_seqlens.new_zeros(1)])
        first, last, shortest, longest = torch.stack([cu_seqlens[0], cu_seqlens[-1], *torch.aminmax(steps)]).tolist()
        if first < 0 or last > total or shortest < 0:
            raise ValueError(
                f"{name} must be non-decreasing offsets from 0 or more to at most {total} rows, "
                f"got {cu_seqlens.tolist()}"
            )
        if longest > max_len:
            raise ValueError(f"{name} holds a sample of {longest} rows, longer than max_seqlen {max_len}")
    return cu_seqlens


def _check_window(causal, window) -> tuple:
    """(left, right) for the kernels, -1 for an unbounded side; causal is (left, 0)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is None:
        left, right = -1, -1
    else:
        if (
            not isinstance(window, (tuple, list))
            or len(window) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in window)
        ):
            raise ValueError(f"window must be a (left, right) pair of ints, -1 for unbounded, got {window!r}")
        left, right = window
        if left < -1 or right < -1:
            raise ValueError(f"window sides must be >= -1 (-1: unbounded), got {tuple(window)}")
    if causal:
        if right > 0:
            raise ValueError(
                f"causal=True bounds the window's right side at 0, got window={tuple(window)}; pass right = -1 or 0"
            )
        right = 0
    return left, right


def _check_variants(key_mask, mask_shape, mask_layout, softcap, sinks, q_heads, device) -> tuple:
    """(key_mask, softcap as a float, 0 for none, sinks) checked."""
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor):
            raise TypeError(f"key_mask must be a bool tensor {mask_layout} or None, got {type(key_mask).__name__}")
        if key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must have dtype torch.bool (True: the key may be seen), got {key_mask.dtype}")
        if tuple(key_mask.shape) != mask_shape:
            raise ValueError(f"key_mask must have shape {mask_layout} = {mask_shape}, got {tuple(key_mask.shape)}")
        if key_mask.device != device:
            raise ValueError(f"key_mask is on {key_mask.device} but q is on {device}")
    if softcap is None:
        softcap = 0.0
    elif not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not 0 < float(softcap) < float("inf"):
        raise ValueError(f"softcap must be a positive finite float or None, got {softcap!r}")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor):
            raise TypeError(f"sinks must be a float tensor of shape ({q_heads},) or None, got {type(sinks).__name__}")
        if not sinks.is_floating_point():
            raise TypeError(f"sinks must be a floating-point tensor, got {sinks.dtype}")
        if tuple(sinks.shape) != (q_heads,):
            raise ValueError(f"sinks must have shape ({q_heads},), one logit per query head, got {tuple(sinks.shape)}")
        if sinks.device != device:
            raise ValueError(f"sinks is on {sinks.device} but q is on {device}")
    return key_mask, float(softcap), sinks


def _check_bias(bias, scores_shape, device):
    """The bias as a (B, Hq, Lq, Lk) view of itself (broadcast dims of stride 0), or None."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(
            f"bias must be a float tensor broadcastable to {scores_shape} or None, got {type(bias).__name__}"
        )
    if not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    if bias.device != device:
        raise ValueError(f"bias is on {bias.device} but q is on {device}")
    try:
        return bias.expand(scores_shape)
    except RuntimeError:
        raise ValueError(
            f"bias must be broadcastable to (batch, q_heads, q_len, k_len) = {scores_shape}, got shape "
            f"{tuple(bias.shape)}"
        ) from None


def _check_scale(scale, head_dim) -> float:
    if scale is None:
        return head_dim**-0.5 if head_dim else 1.0
    if (
        not isinstance(scale, (int, float))
        or isinstance(scale, bool)
        or not float(scale) == float(scale)
        or abs(float(scale)) == float("inf")
    ):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


@torch.library.register_fake("mmkern::cross_modal_attention")
def _cross_modal_attention_fake(
    q,
    k,
    v,
    kv_lens,
    q_lens,
    scale,
    dropout_p,
    dropout_seed,
    window_left=-1,
    window_right=-1,
    key_mask=None,
    softcap=0.0,
    sinks=None,
    bias=None,
):
    batch, q_len, q_heads, _ = q.shape
    lse = q.new_empty((batch, q_heads, q_len), dtype=accumulate_dtype(q.dtype))
    return q.new_empty((batch, q_len, q_heads, v.shape[3])), lse


@torch.library.register_fake("mmkern::cross_modal_attention_backward")
def _cross_modal_attention_backward_fake(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    kv_lens,
    q_lens,
    scale,
    dropout_p,
    dropout_seed,
    window_left=-1,
    window_right=-1,
    key_mask=None,
    softcap=0.0,
    bias=None,
    bias_grad=False,
):
    scores = (q.shape[0], q.shape[2], q.shape[1], k.shape[1]) if bias_grad else (0,)
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty(scores, dtype=accumulate_dtype(q.dtype)),
    )


@torch.library.register_fake("mmkern::cross_modal_attention_packed")
def _cross_modal_attention_packed_fake(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    dropout_p,
    dropout_seed,
    window_left=-1,
    window_right=-1,
    key_mask=None,
    softcap=0.0,
    sinks=None,
):
    total, q_heads, _ = q.shape
    return q.new_empty((total, q_heads, v.shape[2])), q.new_empty((q_heads, total), dtype=accumulate_dtype(q.dtype))


@torch.library.register_fake("mmkern::cross_modal_attention_packed_backward")
def _cross_modal_attention_packed_backward_fake(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    dropout_p,
    dropout_seed,
    window_left=-1,
    window_right=-1,
    key_mask=None,
    softcap=0.0,
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save(ctx, q, k, v, rest, out, lse, has_bias: bool) -> None:
    """What both forms' backward needs: q, k, v, out, lse and the forward's arguments after v (tensors
    saved, the others kept; they end with sinks, then, in the padded form, bias)."""
    ctx.has_bias = has_bias
    ctx.is_tensor = [isinstance(x, torch.Tensor) for x in rest]
    ctx.constants = [None if is_tensor else x for x, is_tensor in zip(rest, ctx.is_tensor)]
    ctx.save_for_backward(q, k, v, out, lse, *(x for x in rest if isinstance(x, torch.Tensor)))
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse's gradient stays None, not a zeros fill


def _gradients(ctx, grad_out, backward) -> tuple:
    """(grad q, grad k, grad v, None for each argument after v but sinks and bias, grad sinks[, grad
    bias]) by ``backward`` (the backward op, or on the eager path its launcher), which takes (grad_out,
    q, k, v, out, lse), the forward's arguments after v but sinks and, in the padded form, bias and
    whether its gradient is wanted."""
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    tensors = iter(tensors)
    rest = [next(tensors) if is_tensor else x for x, is_tensor in zip(ctx.constants, ctx.is_tensor)]
    if grad_out is None:
        return (None,) * len(ctx.needs_input_grad)
    # The registered autograd's needs_input_grad leaves out trailing arguments at their defaults (a bias
    # of None, say): read it by position, and return no more gradients than it has entries.
    wanted = lambda i: i < len(ctx.needs_input_grad) and ctx.needs_input_grad[i]  # noqa: E731
    if ctx.has_bias:
        *rest, sinks, bias = rest
        bias_grad = bias is not None and wanted(3 + len(rest) + 1)
        grad_q, grad_k, grad_v, grad_bias = backward(grad_out, q, k, v, out, lse, *rest, bias, bias_grad)
        last = (grad_bias.to(bias.dtype) if bias_grad else None,)
    else:
        *rest, sinks = rest
        grad_q, grad_k, grad_v = backward(grad_out, q, k, v, out, lse, *rest)
        last = ()
    grad_sinks = _sinks_gradient(grad_out, out, lse, sinks) if sinks is not None and wanted(3 + len(rest)) else None
    grads = (grad_q, grad_k, grad_v, *(None for _ in rest), grad_sinks, *last)
    return grads[: len(ctx.needs_input_grad)]


def _sinks_gradient(grad_out, out, lse, sinks) -> torch.Tensor:
    """d loss / d sinks = -sum over a head's rows of p_sink * rowsum(dO * O), p_sink = exp(sink - lse):
    the sink takes its share of each row's probability from every key alike. Both forms hold heads at
    lse's dim -2 ((B, Hq, Lq) or (Hq, total)) and out's dim -2; rows with lse -inf (past q_lens,
    unowned) have none."""
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1).transpose(-1, -2)
    share = torch.exp(sinks.to(lse.dtype)[:, None] - lse).masked_fill(lse == float("-inf"), 0.0)
    grad = -(share * delta).sum(-1)
    return (grad.sum(0) if grad.dim() == 2 else grad).to(sinks.dtype)


def _register_autograd(qualname: str, backward_op, has_bias: bool) -> None:
    def setup_context(ctx, inputs, output):
        q, k, v, *rest = inputs
        _save(ctx, q, k, v, rest, *output, has_bias)

    def backward(ctx, grad_out, _grad_lse):
        return _gradients(ctx, grad_out, backward_op)

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def _eager_function(forward, backward, has_bias: bool):
    """The eager fast path's autograd for one form (see mmkern.ops._eager): its launchers, with the
    registered autograd's math."""

    class EagerAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, *rest):
            out, lse = forward(q, k, v, *rest)
            _save(ctx, q, k, v, rest, out, lse, has_bias)
            return out, lse

        @staticmethod
        def backward(ctx, grad_out, _grad_lse):
            return _gradients(ctx, grad_out, backward)

    return EagerAttention


def _eager_attention(form: str, q, k, v, *rest) -> tuple:
    """The fast path of one form; rest ends with sinks, and in the padded form bias, cast as the op's
    autocast kernel casts every floating input."""
    device_type = q.device.type
    learned = 2 if not form else 1  # sinks and bias, or sinks
    rest = list(rest)
    q, k, v, *tail = autocast_inputs((q, k, v, *rest[-learned:]), device_type)
    rest[-learned:] = tail
    with without_autocast(device_type):
        if needs_gradient((q, k, v, *tail)):
            return _EAGER_FUNCTIONS[form].apply(q, k, v, *rest)
        return _LAUNCHERS[f"{form}forward"](q, k, v, *rest)


_LAUNCHERS = {
    name: triton_implementation(f"mmkern.kernels.cross_modal_attention:{name}")
    for name in ("forward", "backward", "packed_forward", "packed_backward")
}
_EAGER_FUNCTIONS = {
    form: _eager_function(_LAUNCHERS[f"{form}forward"], _LAUNCHERS[f"{form}backward"], not form)
    for form in ("", "packed_")
}
_register_autograd("mmkern::cross_modal_attention", torch.ops.mmkern.cross_modal_attention_backward.default, True)
_register_autograd(
    "mmkern::cross_modal_attention_packed", torch.ops.mmkern.cross_modal_attention_packed_backward.default, False
)
for _op, _launcher in (
    ("cross_modal_attention", "forward"),
    ("cross_modal_attention_backward", "backward"),
    ("cross_modal_attention_packed", "packed_forward"),
    ("cross_modal_attention_packed_backward", "packed_backward"),
):
    register_triton_kernel(f"mmkern::{_op}", _LAUNCHERS[_launcher])
for _name in ("cross_modal_attention", "cross_modal_attention_packed"):
    register_autocast(f"mmkern::{_name}", cast_inputs=True)
    register_autocast(f"mmkern::{_name}_backward", cast_inputs=False)
