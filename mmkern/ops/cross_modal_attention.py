"""Cross-modal attention: ``mmkern.ops.cross_modal_attention``.

The schema is in csrc/registration.cpp and the CPU kernel in csrc/cpu/cross_modal_attention.cpp;
this file holds the public function, its argument checks, the fake kernels and the autograd
registration.
"""

import torch

from mmkern.kernels.launch import runs_on_triton, triton_has_float64_dot
from mmkern.ops._registration import dtype_after_autocast, register_autocast

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256


def cross_modal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kv_lens: torch.Tensor | None = None,
                          q_lens: torch.Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0,
                          return_lse: bool = False):
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
            zero and get zero gradient.
        scale: the score scale, ``D ** -0.5`` by default.
        dropout_p: dropout on the attention probabilities, drawn in the kernel from a seed taken from
            torch's default generator (so ``torch.manual_seed`` makes it reproducible).
        return_lse: also return the log-sum-exp of each row's scaled scores, ``(B, Hq, Lq)``, float32
            (float64 for float64 inputs), ``-inf`` for rows with no valid key; it carries no gradient.

    Returns:
        ``out (B, Lq, Hq, Dv)`` in q's dtype, or ``(out, lse)`` with ``return_lse``.

    Raises:
        TypeError: a non-tensor, non-floating or mismatched q/k/v dtypes, non-integer lengths.
        ValueError: wrong ranks or shapes, ``Hq % Hkv != 0``, head dims over 256, mismatched
            devices, lengths of the wrong shape or outside their range, a bad scale or dropout_p.
    """
    q, k, v = _check_qkv(q, k, v)
    batch, q_len, _, head_dim = q.shape
    kv_lens = _check_lengths(kv_lens, "kv_lens", batch, k.shape[1], q.device)
    q_lens = _check_lengths(q_lens, "q_lens", batch, q_len, q.device)
    scale = _check_scale(scale, head_dim)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    # A CPU int64 scalar: the kernels read it without a device sync, and torch.compile traces it.
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0 else None
    out, lse = torch.ops.mmkern.cross_modal_attention.default(q, k, v, kv_lens, q_lens, scale, float(dropout_p), seed)
    return (out, lse) if return_lse else out


def _check_qkv(q, k, v) -> tuple:
    named = (("q", q), ("k", k), ("v", v))
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {tensor.dtype}; cross_modal_attention takes float16, bfloat16, "
                            "float32 or float64")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, length, heads, head_dim), got shape {tuple(tensor.shape)}")
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}; q, k and v must share one device")
        if tensor.dtype == torch.float64 and runs_on_triton(tensor.device) and not triton_has_float64_dot():
            raise TypeError(f"{name} is float64, which mmkern's Triton kernels need Triton >= 3.5 for; use float32, "
                            "or CPU tensors for float64")
    for name, tensor in named[1:]:
        if dtype_after_autocast(tensor) != dtype_after_autocast(q):
            raise TypeError(f"{name} has dtype {tensor.dtype} but q has {q.dtype}; q, k and v must share one "
                            "dtype (or run under torch.autocast)")
    (batch, _, q_heads, head_dim), (_, k_len, kv_heads, k_dim), v_dim = q.shape, k.shape, v.shape[3]
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"q, k and v must have the same batch size, got {batch}, {k.shape[0]} and {v.shape[0]}")
    if v.shape[1] != k_len or v.shape[2] != kv_heads:
        raise ValueError(f"v must have k's length and heads {(k_len, kv_heads)}, got {tuple(v.shape[1:3])}")
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
    # Reading the values costs a device sync on GPU; under torch.compile the kernels check them.
    if batch and not torch.compiler.is_compiling():
        low, high = int(lengths.min()), int(lengths.max())
        if low < 0 or high > limit:
            raise ValueError(f"{name} must lie in [0, {limit}], got values from {low} to {high}")
    return lengths


def _check_scale(scale, head_dim) -> float:
    if scale is None:
        return head_dim ** -0.5 if head_dim else 1.0
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not float(scale) == float(scale) \
            or abs(float(scale)) == float("inf"):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("mmkern::cross_modal_attention")
def _cross_modal_attention_fake(q, k, v, kv_lens, q_lens, scale, dropout_p, dropout_seed):
    batch, q_len, q_heads, _ = q.shape
    return q.new_empty((batch, q_len, q_heads, v.shape[3])), q.new_empty((batch, q_heads, q_len), dtype=_lse_dtype(q))


@torch.library.register_fake("mmkern::cross_modal_attention_backward")
def _cross_modal_attention_backward_fake(grad_out, q, k, v, out, lse, kv_lens, q_lens, scale, dropout_p,
                                         dropout_seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lens, q_lens, scale, dropout_p, dropout_seed = inputs
    out, lse = output
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.save_for_backward(q, k, v, out, lse, kv_lens, q_lens, dropout_seed)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, kv_lens, q_lens, dropout_seed = ctx.saved_tensors
    grad_q, grad_k, grad_v = torch.ops.mmkern.cross_modal_attention_backward.default(
        grad_out, q, k, v, out, lse, kv_lens, q_lens, ctx.scale, ctx.dropout_p, dropout_seed)
    return grad_q, grad_k, grad_v, None, None, None, None, None


torch.library.register_autograd("mmkern::cross_modal_attention", _backward, setup_context=_setup_context)
register_autocast("mmkern::cross_modal_attention", cast_inputs=True)
register_autocast("mmkern::cross_modal_attention_backward", cast_inputs=False)
