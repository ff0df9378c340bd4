"""Fused concat-projection: ``mmkern.ops.concat_linear``.

The schema is in csrc/registration.cpp, the CPU kernel in csrc/cpu/concat_linear.cpp, the CUDA
kernel (Triton) in mmkern/kernels/concat_linear.py; this file holds the public function, its
argument checks, the fake kernels and the autograd registration.
"""

from collections.abc import Sequence

import torch

from mmkern.activations import ACTIVATIONS, SMOOTH_ACTIVATIONS
from mmkern.kernels.launch import leading_shape, runs_on_triton, triton_has_float64_dot
from mmkern.ops._checks import check_choice, check_concat_shapes, check_same_device, check_tensor, tensor_list
from mmkern.ops._eager import autocast_inputs, call_op, needs_gradient, takes_eager_path, without_autocast
from mmkern.ops._registration import (
    dtype_after_autocast,
    register_autocast,
    register_triton_kernel,
    triton_implementation,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def concat_linear(
    inputs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "none",
) -> torch.Tensor:
    """``act(F.linear(torch.cat([x.expand(*lead, x.shape[-1]) for x in inputs], -1), weight, bias))``
    without building the concat.

    Args:
        inputs: one tensor per segment (modality), ``(*lead_i, d_i)``; the leading shapes broadcast
            to one ``lead``. A segment with a smaller leading shape, such as a pooled image vector
            ``(B, 1, d)`` beside text tokens ``(B, L, d)``, is projected once per sample, not per
            token. Views are read in place when their leading dims collapse to one stride.
        weight: ``(N, sum(d_i))``; segment i uses the columns of its own slice.
        bias: ``(N,)`` or None.
        activation: ``"none"`` (or None), ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.

    Returns:
        ``(*lead, N)`` in the inputs' dtype (float16, bfloat16, float32 or float64; fp16 and bf16
        accumulate in fp32). Under autocast, fp32 tensors are cast to the autocast dtype first.
        Differentiable in every input, weight and bias.

    Raises:
        TypeError: ``inputs`` not a sequence of tensors, non-floating or mismatched dtypes.
        ValueError: empty ``inputs``, mismatched devices, ``weight.shape[1] != sum(d_i)``, a bias
            that is not ``(N,)``, leading shapes that do not broadcast, an unknown activation.
    """
    activation = "none" if activation is None else activation
    inputs = check_concat_linear_arguments(inputs, weight, bias, activation)
    check_same_dtype(inputs, weight, bias)
    tensors = [*inputs, weight, bias]
    if takes_eager_path(tensors):
        return eager_projection(_EagerConcatLinear, launch_forward, inputs, weight, bias, activation)
    out, _ = call_op(torch.ops.mmkern.concat_linear.default, tensors, inputs, weight, bias, activation)
    return out


def check_concat_linear_arguments(inputs, weight, bias, activation) -> list:
    inputs = tensor_list(inputs, "inputs")
    check_tensor(weight, "weight")
    check_tensor(bias, "bias", optional=True)
    check_choice(activation, "activation", ACTIVATIONS)
    named = [(f"inputs[{i}]", x) for i, x in enumerate(inputs)] + [("weight", weight)]
    if bias is not None:
        named.append(("bias", bias))
    for name, tensor in named:
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} has dtype {tensor.dtype}; concat_linear takes float16, bfloat16, float32 or float64"
            )
        if tensor.dtype == torch.float64 and runs_on_triton(tensor.device) and not triton_has_float64_dot():
            raise TypeError(
                f"{name} is float64, which mmkern's Triton kernels need Triton >= 3.5 for; use float32, "
                "or CPU tensors for float64"
            )
    check_same_device(named, weight.device, "weight", "concat_linear")
    check_concat_shapes(inputs, weight, bias, "inputs", "weight")
    return inputs


def check_same_dtype(inputs, weight, bias) -> None:
    """All tensors share one dtype, after autocast's casts where it is on (the op's autocast kernel
    casts them)."""
    tensors = [*inputs, bias] if bias is not None else inputs
    if all(t.dtype == weight.dtype for t in tensors):
        return
    named = [(f"inputs[{i}]", x) for i, x in enumerate(inputs)] + ([("bias", bias)] if bias is not None else [])
    for name, tensor in named:
        if dtype_after_autocast(tensor) != dtype_after_autocast(weight):
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but weight has {weight.dtype}; all tensors must share one "
                "dtype (or run under torch.autocast)"
            )


@torch.library.register_fake("mmkern::concat_linear")
def _concat_linear_fake(inputs, weight, bias, activation):
    out_shape = (*leading_shape(inputs), weight.shape[0])
    return weight.new_empty(out_shape), weight.new_empty(out_shape if activation in SMOOTH_ACTIVATIONS else (0,))


@torch.library.register_fake("mmkern::concat_linear_backward")
def _concat_linear_backward_fake(
    grad_out, inputs, weight, activation_saved, activation, input_needs_grad, weight_needs_grad, bias_needs_grad
):
    grad_inputs = [x.new_empty(x.shape if needed else (0,)) for x, needed in zip(inputs, input_needs_grad)]
    grad_weight = weight.new_empty(weight.shape if weight_needs_grad else (0,))
    grad_bias = weight.new_empty((weight.shape[0],) if bias_needs_grad else (0,))
    return grad_inputs, grad_weight, grad_bias


def _save(ctx, xs, weight, bias, activation, out, preactivation) -> None:
    ctx.activation = activation
    ctx.has_bias = bias is not None
    # relu's derivative reads off the output; the smooth ones need the pre-activation.
    ctx.save_for_backward(weight, out if activation == "relu" else preactivation, *xs)
    # A gradient that is absent stays None rather than a zeros tensor of its output's size.
    ctx.set_materialize_grads(False)


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, *output)
    ctx.mark_non_differentiable(output[1])


def gradients(
    ctx,
    grad_out,
    inputs,
    weight,
    activation_saved,
    inputs_need_grad,
    weight_needs_grad,
    bias_needs_grad,
    backward=torch.ops.mmkern.concat_linear_backward.default,
) -> tuple:
    """(grad inputs, grad weight, grad bias) of a concat-projection, by ``backward`` (the backward op,
    or on the eager path its launcher), each None where it is not needed (all of them without a
    ``grad_out``)."""
    bias_needs_grad = bias_needs_grad and ctx.has_bias
    if grad_out is None:
        return [None] * len(inputs), None, None
    grad_inputs, grad_weight, grad_bias = backward(
        grad_out,
        inputs,
        weight,
        activation_saved,
        ctx.activation,
        list(inputs_need_grad),
        weight_needs_grad,
        bias_needs_grad,
    )
    return (
        [g if needed else None for g, needed in zip(grad_inputs, inputs_need_grad)],
        grad_weight if weight_needs_grad else None,
        grad_bias if bias_needs_grad else None,
    )


def _backward(ctx, grad_out, _grad_preactivation):
    weight, activation_saved, *xs = ctx.saved_tensors
    return (*gradients(ctx, grad_out, xs, weight, activation_saved, *ctx.needs_input_grad[:3]), None)


class _EagerConcatLinear(torch.autograd.Function):
    """The eager fast path's autograd (see mmkern.ops._eager): the launchers, with _backward's math."""

    @staticmethod
    def forward(ctx, weight, bias, activation, *xs):
        out, preactivation = launch_forward(list(xs), weight, bias, activation)
        _save(ctx, xs, weight, bias, activation, out, preactivation)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, activation_saved, *xs = ctx.saved_tensors
        weight_needs_grad, bias_needs_grad, _, *inputs_need_grad = ctx.needs_input_grad
        grad_inputs, grad_weight, grad_bias = gradients(
            ctx,
            grad_out,
            xs,
            weight,
            activation_saved,
            inputs_need_grad,
            weight_needs_grad,
            bias_needs_grad,
            backward=launch_backward,
        )
        return grad_weight, grad_bias, None, *grad_inputs


def eager_projection(function, forward, inputs, weight, bias, activation):
    """A concat-projection's eager fast path: autocast's casts, then ``function`` (its
    autograd.Function, applied to weight, bias, activation, *inputs) if anything needs a gradient,
    else ``forward(inputs, weight, bias, activation)``'s output."""
    device_type = weight.device.type
    *inputs, weight, bias = autocast_inputs([*inputs, weight, bias], device_type)
    with without_autocast(device_type):
        if needs_gradient([*inputs, weight, bias]):
            return function.apply(weight, bias, activation, *inputs)
        return forward(inputs, weight, bias, activation)[0]


launch_forward = triton_implementation("mmkern.kernels.concat_linear:concat_linear_forward")
launch_backward = triton_implementation("mmkern.kernels.concat_linear:concat_linear_backward")
torch.library.register_autograd("mmkern::concat_linear", _backward, setup_context=_setup_context)


register_triton_kernel("mmkern::concat_linear", launch_forward)
register_triton_kernel("mmkern::concat_linear_backward", launch_backward)
register_autocast("mmkern::concat_linear", cast_inputs=True)
register_autocast("mmkern::concat_linear_backward", cast_inputs=False)
