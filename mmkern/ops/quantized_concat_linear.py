"""Quantized concat-projection: ``mmkern.ops.quantized_concat_linear`` over int8 features with
per-token scales, and ``mmkern.ops.quantize_and_concat_linear``, its float-input form for training
with quantization in the loop (straight-through gradients).

The schemas are in csrc/registration.cpp, the CPU kernel in csrc/cpu/quantized_concat_linear.cpp,
the CUDA kernel (Triton, int8 tensor cores) in mmkern/kernels/concat_linear.py; the float-input
form is a composite of quantize_per_token and quantized_concat_linear, registered here.
"""

from collections.abc import Sequence

import torch

from mmkern.activations import ACTIVATIONS, SMOOTH_ACTIVATIONS, activation_backward
from mmkern.kernels.launch import leading_shape
from mmkern.ops._checks import (
    check_choice,
    check_concat_shapes,
    check_same_device,
    check_scale_values,
    check_tensor,
    tensor_list,
)
from mmkern.ops._eager import call_op, eager_function, needs_gradient, takes_eager_path
from mmkern.ops._registration import register_autocast, register_triton_kernel, triton_implementation
from mmkern.ops.concat_linear import (
    check_concat_linear_arguments,
    check_same_dtype,
    eager_projection,
    gradients,
    launch_backward,
)
from mmkern.ops.quantize_per_token import FLOAT_DTYPES, check_quantized_pair

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quantized_concat_linear(
    inputs_q: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "none",
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``concat_linear`` over int8 features, without dequantizing them: segment i's products with
    its weight columns sum exactly in int32, are scaled by its own token scales, and the segments'
    sums are added, then scaled by ``weight_scale``, with bias and activation in the epilogue.

    Args:
        inputs_q: one int8 tensor per segment, ``(*lead_i, d_i)``, leading shapes broadcasting as in
            ``concat_linear`` (a pooled ``(B, 1, d)`` vector is projected once per sample).
        scales: one float32 ``(*lead_i, 1)`` per segment, finite and non-negative (as
            ``quantize_per_token`` returns them).
        weight_q: int8 ``(N, sum(d_i))``.
        weight_scale: float32 ``(N,)``, one scale per output channel.
        bias: ``(N,)`` float, or None.
        activation: ``"none"`` (or None), ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        out_dtype: float16, bfloat16 (default) or float32.

    Returns:
        ``(*lead, N)`` in ``out_dtype``, equal to ``concat_linear`` on the dequantized inputs and
        weight up to the float32 epilogue. Differentiable in ``bias`` only: int8 tensors carry no
        gradient; train through quantization with ``quantize_and_concat_linear``.

    Raises:
        TypeError: float features where int8 is expected (or the reverse for bias), scales not
            float32, an unsupported out_dtype.
        ValueError: a scale of the wrong shape, negative or non-finite scales (checked on CPU, and on
            CUDA with ``mmkern.set_value_checks(True)``, a device sync), scales that require grad,
            width or bias mismatches, leading shapes that do not broadcast, mismatched devices, an
            unknown activation.
    """
    activation = "none" if activation is None else activation
    inputs_q, scales = _check_quantized_arguments(inputs_q, scales, weight_q, weight_scale, bias, activation, out_dtype)
    arguments = (inputs_q, scales, weight_q, weight_scale, bias, activation, out_dtype)
    tensors = [*inputs_q, *scales, weight_q, weight_scale, bias]
    if takes_eager_path(tensors):
        if needs_gradient([bias]):
            return _EagerQuantizedConcatLinear.apply(*arguments)[0]
        return _launch_quantized(*arguments)[0]
    return call_op(torch.ops.mmkern.quantized_concat_linear.default, tensors, *arguments)[0]


def _check_quantized_arguments(inputs_q, scales, weight_q, weight_scale, bias, activation, out_dtype):
    inputs_q = tensor_list(inputs_q, "inputs_q")
    scales = tensor_list(scales, "scales")
    if len(scales) != len(inputs_q):
        raise ValueError(f"scales must hold one tensor per input, {len(inputs_q)}, got {len(scales)}")
    check_tensor(weight_q, "weight_q")
    check_tensor(weight_scale, "weight_scale")
    check_tensor(bias, "bias", optional=True)
    check_choice(activation, "activation", ACTIVATIONS)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {', '.join(map(str, OUT_DTYPES))}, got {out_dtype}")
    for name, tensor in [(f"inputs_q[{i}]", x) for i, x in enumerate(inputs_q)] + [("weight_q", weight_q)]:
        if tensor.dtype != torch.int8:
            hint = (
                " (quantize it with mmkern.ops.quantize_per_token, or pass float features to "
                "mmkern.ops.quantize_and_concat_linear)"
                if tensor.dtype.is_floating_point
                else ""
            )
            raise TypeError(f"{name} has dtype {tensor.dtype}; expected torch.int8{hint}")
    for i, (x, scale) in enumerate(zip(inputs_q, scales)):
        check_quantized_pair(x, scale, f"inputs_q[{i}]", f"scales[{i}]")
    if weight_scale.dtype != torch.float32:
        raise TypeError(f"weight_scale has dtype {weight_scale.dtype}; per-channel scales are float32")
    if weight_q.dim() == 2 and tuple(weight_scale.shape) != (weight_q.shape[0],):
        raise ValueError(
            f"weight_scale must have shape ({weight_q.shape[0]},), one per output channel, "
            f"got {tuple(weight_scale.shape)}"
        )
    if bias is not None and bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"bias has dtype {bias.dtype}; expected float16, bfloat16 or float32")
    named_scales = [(f"scales[{i}]", s) for i, s in enumerate(scales)] + [("weight_scale", weight_scale)]
    for name, scale in named_scales:
        if scale.requires_grad:
            raise ValueError(f"{name} requires grad, but quantized_concat_linear is differentiable only in bias")
    named = (
        [(f"inputs_q[{i}]", x) for i, x in enumerate(inputs_q)]
        + named_scales
        + ([("bias", bias)] if bias is not None else [])
    )
    check_same_device(named, weight_q.device, "weight_q", "quantized_concat_linear")
    check_concat_shapes(inputs_q, weight_q, bias, "inputs_q", "weight_q")
    check_scale_values([scale for _, scale in named_scales], lambda i: named_scales[i][0])
    return inputs_q, scales


def quantize_and_concat_linear(
    inputs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "none",
) -> torch.Tensor:
    """``concat_linear`` with quantization in the loop: the float inputs are quantized to int8 per
    token and the float weight per output channel, and the product runs as
    ``quantized_concat_linear``. The backward is straight-through: every input, the weight and the
    bias get the gradient of the unquantized op at the dequantized values. It keeps only the int8
    operands and their scales for that, a quarter of the float32 activations concat_linear keeps.

    Args:
        inputs, weight, bias, activation: as in ``concat_linear``, in float16, bfloat16 or float32
            (one dtype, or any under torch.autocast, which casts them to its dtype).

    Returns:
        ``(*lead, N)`` in the inputs' dtype. Inputs holding NaN or inf give NaN rows, as float ops do.

    Raises:
        As ``concat_linear``; float64 is refused with a TypeError (the scales are float32).
    """
    activation = "none" if activation is None else activation
    inputs = check_concat_linear_arguments(inputs, weight, bias, activation)
    check_same_dtype(inputs, weight, bias)
    if weight.dtype == torch.float64:
        raise TypeError("weight is float64; quantize_and_concat_linear takes float16, bfloat16 or float32")
    tensors = [*inputs, weight, bias]
    if takes_eager_path(tensors):
        return eager_projection(
            _EagerQuantizeAndConcatLinear, _eager_quantize_and_project, inputs, weight, bias, activation
        )
    out, *_ = call_op(torch.ops.mmkern.quantize_and_concat_linear.default, tensors, inputs, weight, bias, activation)
    return out


@torch.library.register_fake("mmkern::quantized_concat_linear")
def _quantized_concat_linear_fake(inputs, scales, weight, weight_scale, bias, activation, out_dtype):
    out_shape = (*leading_shape(inputs), weight.shape[0])
    saved_shape = out_shape if activation in SMOOTH_ACTIVATIONS else (0,)
    return weight.new_empty(out_shape, dtype=out_dtype), weight.new_empty(saved_shape, dtype=out_dtype)


def _bias_setup_context(ctx, inputs, output):
    *_, bias, activation, _ = inputs
    out, preactivation = output
    ctx.activation = activation
    ctx.num_inputs = len(inputs[0])
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(out if activation == "relu" else preactivation)
    ctx.mark_non_differentiable(preactivation)


def _bias_backward(ctx, grad_out, _grad_preactivation):
    (activation_saved,) = ctx.saved_tensors
    grad_bias = None
    if ctx.needs_input_grad[4]:
        dz = activation_backward(grad_out, activation_saved, ctx.activation)
        grad_bias = dz.reshape(-1, dz.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    no_gradients = [None] * ctx.num_inputs
    return no_gradients, no_gradients, None, None, grad_bias, None, None


torch.library.register_autograd("mmkern::quantized_concat_linear", _bias_backward, setup_context=_bias_setup_context)


_launch_quantized = triton_implementation("mmkern.kernels.concat_linear:quantized_concat_linear_forward")
_EagerQuantizedConcatLinear = eager_function(_launch_quantized, _bias_setup_context, _bias_backward)
register_triton_kernel("mmkern::quantized_concat_linear", _launch_quantized)


@torch.library.register_fake("mmkern::quantize_and_concat_linear")
def _quantize_and_concat_linear_fake(inputs, weight, bias, activation):
    out, saved = _quantized_concat_linear_fake(inputs, [], weight, None, bias, activation, weight.dtype)
    inputs_q = [x.new_empty(x.shape, dtype=torch.int8) for x in inputs]
    scales = [x.new_empty((*x.shape[:-1], 1), dtype=torch.float32) for x in inputs]
    weight_scale = weight.new_empty((weight.shape[0],), dtype=torch.float32)
    return out, saved, inputs_q, scales, weight.new_empty(weight.shape, dtype=torch.int8), weight_scale


def _quantize_and_project(inputs, weight, bias, activation, project=torch.ops.mmkern.quantized_concat_linear.default):
    """The int8 forward: ``project`` is the quantized projection op, or on the eager path its launcher."""
    quantized = [torch.ops.mmkern.quantize_per_token.default(x, torch.int8) for x in inputs]
    inputs_q, scales = [q for q, _ in quantized], [s for _, s in quantized]
    weight_q, weight_scale = torch.ops.mmkern.quantize_per_token.default(weight, torch.int8)
    weight_scale = weight_scale.view(-1)
    out, saved = project(inputs_q, scales, weight_q, weight_scale, bias, activation, weight.dtype)
    return out, saved, inputs_q, scales, weight_q, weight_scale


# One composite kernel for every device: its parts dispatch to their own CPU and CUDA kernels.
torch.library.register_kernel("mmkern::quantize_and_concat_linear", ("cpu", "cuda"), _quantize_and_project)


def _straight_through_save(
    ctx, xs, weight, bias, activation, out, preactivation, inputs_q, scales, weight_q, weight_scale
) -> None:
    ctx.activation = activation
    ctx.num_inputs = len(xs)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(out if activation == "relu" else preactivation, weight_q, weight_scale, *inputs_q, *scales)
    ctx.set_materialize_grads(False)  # no zeros for the gradients of the non-differentiable outputs


def _straight_through_setup_context(ctx, inputs, output):
    _straight_through_save(ctx, *inputs, *output)
    _, preactivation, inputs_q, scales, weight_q, weight_scale = output
    ctx.mark_non_differentiable(preactivation, *inputs_q, *scales, weight_q, weight_scale)


def _straight_through_gradients(
    ctx,
    grad_out,
    inputs_need_grad,
    weight_needs_grad,
    bias_needs_grad,
    backward=torch.ops.mmkern.concat_linear_backward.default,
) -> tuple:
    """(grad inputs, grad weight, grad bias): concat_linear's at the dequantized operands."""
    if grad_out is None:
        return [None] * ctx.num_inputs, None, None
    activation_saved, weight_q, weight_scale, *quantized = ctx.saved_tensors
    inputs_q, scales = quantized[: ctx.num_inputs], quantized[ctx.num_inputs :]
    dtype = grad_out.dtype
    inputs = [torch.ops.mmkern.dequantize_per_token.default(q, s, dtype) for q, s in zip(inputs_q, scales)]
    weight = torch.ops.mmkern.dequantize_per_token.default(weight_q, weight_scale[:, None], dtype)
    return gradients(
        ctx,
        grad_out,
        inputs,
        weight,
        activation_saved,
        inputs_need_grad,
        weight_needs_grad,
        bias_needs_grad,
        backward=backward,
    )


def _straight_through_backward(ctx, grad_out, *_grads_of_non_differentiable):
    return (*_straight_through_gradients(ctx, grad_out, *ctx.needs_input_grad[:3]), None)


class _EagerQuantizeAndConcatLinear(torch.autograd.Function):
    """The eager fast path's autograd (see mmkern.ops._eager): the launchers, with the op's math."""

    @staticmethod
    def forward(ctx, weight, bias, activation, *xs):
        output = _eager_quantize_and_project(list(xs), weight, bias, activation)
        _straight_through_save(ctx, xs, weight, bias, activation, *output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_out):
        weight_needs_grad, bias_needs_grad, _, *inputs_need_grad = ctx.needs_input_grad
        grad_inputs, grad_weight, grad_bias = _straight_through_gradients(
            ctx, grad_out, inputs_need_grad, weight_needs_grad, bias_needs_grad, backward=launch_backward
        )
        return grad_weight, grad_bias, None, *grad_inputs


def _eager_quantize_and_project(inputs, weight, bias, activation):
    return _quantize_and_project(inputs, weight, bias, activation, project=_launch_quantized)


torch.library.register_autograd(
    "mmkern::quantize_and_concat_linear", _straight_through_backward, setup_context=_straight_through_setup_context
)
register_autocast("mmkern::quantize_and_concat_linear", cast_inputs=True)
