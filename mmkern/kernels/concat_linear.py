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
from dataclasses import dataclass

import torch

from mmkern.activations import SMOOTH_ACTIVATIONS, activation_backward
from mmkern.kernels.launch import accumulate_dtype, leading_shape_of, planned
from mmkern.kernels.segmented_matmul import MAX_SEGMENTS, segmented_matmul

IDENTITY_ROW_MAP = ((1, 2**62, 1), (1, 1, 0))


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


@dataclass(frozen=True)
class ProjectionPlan:
    """What a concat-projection's launches need from its inputs' shapes alone, planned once per shapes.

    ``per_token`` indexes the inputs whose leading shape is the output's; each of ``groups`` is a
    broadcast leading shape (padded to the output's rank) and the inputs that have it."""

    lead: tuple
    rows: int
    columns: tuple  # each input's slice of the weight's columns
    per_token: tuple
    groups: tuple  # ((own leading shape, input indices), ...)
    # The broadcast groups' summed addend: its leading shape, and its row map onto the output's
    # rows (None: more runs of kept dims than the kernel maps; the addend is then expanded).
    addend_lead: tuple
    row_map: tuple | None
    # The backward's: per input, the output dims its leading shape broadcasts over (summed out of dz).
    broadcast_dims: tuple


@planned
def projection_plan(shapes: tuple) -> ProjectionPlan:
    """The plan for inputs of ``shapes``; a RuntimeError if their leading shapes do not broadcast."""
    lead = leading_shape_of([shape[:-1] for shape in shapes])
    rank = len(lead)
    columns, total = [], 0
    per_token, groups = [], []
    for index, shape in enumerate(shapes):
        columns.append(slice(total, total + shape[-1]))
        total += shape[-1]
        own = (1,) * (rank - len(shape) + 1) + tuple(shape[:-1])
        if own == lead:
            per_token.append(index)
            continue
        group = next((members for key, members in groups if key == own), None)
        if group is None:
            group = []
            groups.append((own, group))
        group.append(index)
    addend_lead = leading_shape_of([own for own, _ in groups]) if groups else ()
    row_map = broadcast_row_map(lead, addend_lead) if groups else IDENTITY_ROW_MAP
    broadcast_dims = tuple(
        tuple(d for d in range(rank) if own[d] == 1 and lead[d] != 1)
        for own in ((1,) * (rank - len(shape) + 1) + tuple(shape[:-1]) for shape in shapes)
    )
    return ProjectionPlan(
        lead,
        math.prod(lead),
        tuple(columns),
        tuple(per_token),
        tuple((own, tuple(members)) for own, members in groups),
        addend_lead,
        row_map,
        broadcast_dims,
    )


def _gemm_operands(x, columns, weight, token_scale):
    operands = (as_matrix(x), weight[:, columns].t())
    return operands if token_scale is None else (*operands, token_scale.reshape(-1))


def _fused_gemm(segments, out, addend, row_map, bias, activation, saved, column_scale):
    """out = act(sum over segments (token_scale *) x @ W[:, cols].T, times column_scale, + addend[row_map]
    + bias), for (x, columns, weight, token_scale or None) segments whose leading shape is out's;
    launches past MAX_SEGMENTS chain through fp32 partial sums (each already column-scaled)."""
    chunks = [segments[i : i + MAX_SEGMENTS] for i in range(0, len(segments), MAX_SEGMENTS)] or [[]]
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        target = out if last else out.new_empty(out.shape, dtype=accumulate_dtype(out.dtype))
        segmented_matmul(
            target,
            [_gemm_operands(*segment) for segment in chunk],
            addend=addend,
            row_map=row_map,
            bias=bias if last else None,
            activation=activation if last else "none",
            saved=saved if last else None,
            column_scale=column_scale,
        )
        addend, row_map = target, IDENTITY_ROW_MAP


def _project(plan, inputs, scales, weight, out, bias, activation, saved, column_scale):
    """out (rows, N) = act(sum over inputs x @ W[:, cols].T + bias); see the module docstring."""
    out_features = out.shape[1]

    def segment(index):
        return inputs[index], plan.columns[index], weight, None if scales is None else scales[index]

    addend, row_map = None, IDENTITY_ROW_MAP
    if plan.groups:
        partials = []
        for own, members in plan.groups:
            partial = out.new_empty((math.prod(own), out_features), dtype=accumulate_dtype(out.dtype))
            _fused_gemm(
                [segment(i) for i in members], partial, None, IDENTITY_ROW_MAP, None, "none", None, column_scale
            )
            partials.append(partial.view(*own, out_features))
        # Several broadcast patterns at once are rare: their sum is materialised at its broadcast shape.
        addend, row_map = functools.reduce(torch.add, partials), plan.row_map
        if row_map is None:
            addend, row_map = addend.expand(*plan.lead, out_features), IDENTITY_ROW_MAP
        addend = addend.reshape(math.prod(addend.shape[:-1]), out_features)
    _fused_gemm([segment(i) for i in plan.per_token], out, addend, row_map, bias, activation, saved, column_scale)
    return out


def concat_linear_forward(inputs, weight, bias, activation, *, scales=None, weight_scale=None, out_dtype=None):
    """concat_linear, or with ``scales`` (one (*lead_i, 1) float32 per int8 input) and ``weight_scale``
    (N,) quantized_concat_linear into ``out_dtype``. Returns (out, activation_saved)."""
    plan = projection_plan(tuple(x.shape for x in inputs))
    out_features = weight.shape[0]
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    out = weight.new_empty((*plan.lead, out_features), dtype=out_dtype)
    smooth = activation in SMOOTH_ACTIVATIONS
    saved = weight.new_empty((*plan.lead, out_features) if smooth else (0,), dtype=out_dtype)
    _project(
        plan,
        inputs,
        scales,
        weight,
        out.view(plan.rows, out_features),
        bias,
        activation,
        saved.view(plan.rows, out_features) if smooth else None,
        weight_scale,
    )
    return out, saved


def quantized_concat_linear_forward(inputs, scales, weight, weight_scale, bias, activation, out_dtype):
    """mmkern::quantized_concat_linear: int8 inputs with per-token scales, an int8 weight with
    per-channel scales. Returns (out, activation_saved)."""
    return concat_linear_forward(
        inputs, weight, bias, activation, scales=scales, weight_scale=weight_scale, out_dtype=out_dtype
    )


def concat_linear_backward(
    grad_out, inputs, weight, activation_saved, activation, input_needs_grad, weight_needs_grad, bias_needs_grad
):
    plan = projection_plan(tuple(x.shape for x in inputs))
    rows, out_features = plan.rows, weight.shape[0]
    acc = accumulate_dtype(weight.dtype)
    empty = weight.new_empty((0,))
    saved = activation_saved.reshape(rows, out_features) if activation != "none" else None
    dz = activation_backward(grad_out.reshape(rows, out_features), saved, activation)

    # Broadcast dims of a leading shape are summed out of dz once per distinct shape.
    reduced = {(): dz}
    grad_inputs = []
    grad_weight = weight.new_empty(weight.shape) if weight_needs_grad else empty
    for x, columns, dims, needs_grad in zip(inputs, plan.columns, plan.broadcast_dims, input_needs_grad):
        a = reduced.get(dims)
        if a is None:
            summed = dz.reshape(*plan.lead, out_features).sum(dims, keepdim=True, dtype=acc)
            a = reduced[dims] = summed.to(weight.dtype).reshape(math.prod(summed.shape[:-1]), out_features)
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
