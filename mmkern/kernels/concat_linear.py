"""concat_linear's forward and backward, and quantized_concat_linear's forward, built from
segmented_matmul (the CUDA implementation, and the CPU one under the interpreter switch).

Forward: the segments whose leading shape is the output's ("per-token") go through one fused GEMM;
the others ("broadcast", e.g. a pooled (B, 1, d) vector) are first projected at their own, smaller
leading shape into an fp32 addend, which the fused GEMM's epilogue broadcasts. The same split
applies recursively to the broadcast segments themselves.
Backward: dz = grad * act'(z) once; per-token segments get dz @ W_i and dz^T @ x_i; broadcast
segments get dz summed over their broadcast dims first, so their GEMMs run at their own size.
"""

import functools
import math

import torch

from mmkern.activations import SMOOTH_ACTIVATIONS, activation_backward
from mmkern.kernels.launch import accumulate_dtype, leading_shape
from mmkern.kernels.segmented_matmul import MAX_SEGMENTS, segmented_matmul

IDENTITY_ROW_MAP = ((1, 2**62, 1), (1, 1, 0))


def padded_lead(x: torch.Tensor, rank: int) -> tuple:
    return (1,) * (rank - x.dim() + 1) + tuple(x.shape[:-1])


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def broadcast_row_map(lead: tuple, sub_lead: tuple):
    """(div, mod, mul) terms with row(m) = sum((m // div) % mod * mul) mapping a row of the
    contiguous ``lead`` to a row of the contiguous ``sub_lead`` (same rank; each dim equal or 1).
    Each run of kept dims gives one term; None when there are more runs than the kernel takes."""
    terms, run = [], None
    div = mul = 1
    for size, sub in zip(reversed(lead), reversed(sub_lead)):
        if size == 1:
            continue
        if sub == size:
            if run is None:
                run = [div, 1, mul]
                terms.append(run)
            run[1] *= size
            mul *= size
        else:
            run = None
        div *= size
    if len(terms) > 2:
        return None
    return tuple(tuple(t) for t in terms) + ((1, 1, 0),) * (2 - len(terms))


def _lookup(pairs: list, shape: tuple):
    """The value stored under ``shape`` in a list of (shape, value) pairs, or None. A list, not a
    dict: under dynamic shapes the shapes hold SymInts, which cannot be hashed."""
    return next((value for key, value in pairs if key == shape), None)


def _gemm_operands(x, offset, weight, token_scale):
    operands = (as_matrix(x), weight[:, offset:offset + x.shape[-1]].t())
    return operands if token_scale is None else (*operands, token_scale.reshape(-1))


def _fused_gemm(segments, out, addend, row_map, bias, activation, saved, column_scale):
    """out = act(sum over segments (token_scale *) x @ W[:, cols].T, times column_scale, + addend[row_map]
    + bias), for (x, offset, weight, token_scale or None) segments whose leading shape is out's;
    launches past MAX_SEGMENTS chain through fp32 partial sums (each already column-scaled)."""
    chunks = [segments[i:i + MAX_SEGMENTS] for i in range(0, len(segments), MAX_SEGMENTS)] or [[]]
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        target = out if last else out.new_empty(out.shape, dtype=accumulate_dtype(out.dtype))
        segmented_matmul(
            target, [_gemm_operands(*segment) for segment in chunk], addend=addend, row_map=row_map,
            bias=bias if last else None,
            activation=activation if last else "none",
            saved=saved if last else None,
            column_scale=column_scale,
        )
        addend, row_map = target, IDENTITY_ROW_MAP


def _project(segments, lead, weight, out, bias, activation, saved, column_scale):
    """out (prod(lead), N) = act(sum over segments x @ W[:, cols].T + bias); see the module docstring.
    ``segments`` holds (x, column offset, token scale or None) triples whose leading shapes
    broadcast to ``lead``."""
    rank = len(lead)
    rows, out_features = out.shape
    per_token, groups = [], []
    for x, offset, token_scale in segments:
        own = padded_lead(x, rank)
        if own == lead:
            per_token.append((x, offset, weight, token_scale))
            continue
        group = _lookup(groups, own)
        if group is None:
            group = []
            groups.append((own, group))
        group.append((x, offset, weight, token_scale))

    addend, row_map = None, IDENTITY_ROW_MAP
    if groups:
        partials = []
        for own, group in groups:
            partial = out.new_empty((math.prod(own), out_features), dtype=accumulate_dtype(out.dtype))
            _fused_gemm(group, partial, None, IDENTITY_ROW_MAP, None, "none", None, column_scale)
            partials.append(partial.view(*own, out_features))
        # Several broadcast patterns at once are rare: their sum is materialised at its broadcast shape.
        addend = functools.reduce(torch.add, partials)
        sub_lead = tuple(addend.shape[:-1])
        row_map = broadcast_row_map(lead, sub_lead)
        if row_map is None:
            addend, row_map = addend.expand(*lead, out_features), IDENTITY_ROW_MAP
        addend = addend.reshape(math.prod(addend.shape[:-1]), out_features)
    _fused_gemm(per_token, out, addend, row_map, bias, activation, saved, column_scale)
    return out


def _column_offsets(inputs):
    offsets, total = [], 0
    for x in inputs:
        offsets.append(total)
        total += x.shape[-1]
    return offsets


def concat_linear_forward(inputs, weight, bias, activation, *, scales=None, weight_scale=None, out_dtype=None):
    """concat_linear, or with ``scales`` (one (*lead_i, 1) float32 per int8 input) and ``weight_scale``
    (N,) quantized_concat_linear into ``out_dtype``. Returns (out, activation_saved)."""
    lead = leading_shape(inputs)
    rows, out_features = math.prod(lead), weight.shape[0]
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    out = weight.new_empty((*lead, out_features), dtype=out_dtype)
    saved = weight.new_empty((*lead, out_features) if activation in SMOOTH_ACTIVATIONS else (0,), dtype=out_dtype)
    segments = list(zip(inputs, _column_offsets(inputs), scales if scales is not None else [None] * len(inputs)))
    _project(
        segments, lead, weight, out.view(rows, out_features), bias, activation,
        saved.view(rows, out_features) if activation in SMOOTH_ACTIVATIONS else None,
        weight_scale,
    )
    return out, saved


def quantized_concat_linear_forward(inputs, scales, weight, weight_scale, bias, activation, out_dtype):
    """mmkern::quantized_concat_linear: int8 inputs with per-token scales, an int8 weight with
    per-channel scales. Returns (out, activation_saved)."""
    return concat_linear_forward(inputs, weight, bias, activation, scales=scales, weight_scale=weight_scale,
                                 out_dtype=out_dtype)


def concat_linear_backward(grad_out, inputs, weight, activation_saved, activation,
                           input_needs_grad, weight_needs_grad, bias_needs_grad):
    lead = leading_shape(inputs)
    rank, rows, out_features = len(lead), math.prod(lead), weight.shape[0]
    acc = accumulate_dtype(weight.dtype)
    empty = weight.new_empty((0,))
    saved = activation_saved.reshape(rows, out_features) if activation != "none" else None
    dz = activation_backward(grad_out.reshape(rows, out_features), saved, activation)

    # Broadcast dims of a leading shape are summed out of dz once per distinct shape.
    reduced = []
    for x in inputs:
        own = padded_lead(x, rank)
        if own != lead and _lookup(reduced, own) is None:
            dims = [d for d in range(rank) if own[d] == 1 and lead[d] != 1]
            summed = dz.reshape(*lead, out_features).sum(dims, keepdim=True, dtype=acc)
            reduced.append((own, summed.to(weight.dtype).reshape(math.prod(own), out_features)))

    grad_inputs = []
    grad_weight = weight.new_empty(weight.shape) if weight_needs_grad else empty
    for x, offset, needs_grad in zip(inputs, _column_offsets(inputs), input_needs_grad):
        a = _lookup(reduced, padded_lead(x, rank))
        a = dz if a is None else a
        columns = slice(offset, offset + x.shape[-1])
        if needs_grad:
            grad_x = x.new_empty((math.prod(x.shape[:-1]), x.shape[-1]))
            segmented_matmul(grad_x, [(a, weight[:, columns])])
            grad_inputs.append(grad_x.view(x.shape))
        else:
            grad_inputs.append(empty)
        if weight_needs_grad:
            segmented_matmul(grad_weight[:, columns], [(a.t(), as_matrix(x))])
    grad_bias = dz.sum(0, dtype=acc).to(weight.dtype) if bias_needs_grad else empty
    return grad_inputs, grad_weight, grad_bias
