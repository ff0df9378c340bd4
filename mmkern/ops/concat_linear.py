"""Fused concat-projection: ``mmkern.ops.concat_linear``.

The schema is in csrc/registration.cpp, the CPU kernel in csrc/cpu/concat_linear.cpp, the CUDA
kernel (Triton) in mmkern/kernels/concat_linear.py; this file holds the public function, its
argument checks, the fake kernels and the autograd registration.
"""

from collections.abc import Sequence

import torch

from mmkern.activations import ACTIVATIONS, SMOOTH_ACTIVATIONS
from mmkern.kernels.launch import runs_on_triton, triton_has_float64_dot
from mmkern.ops._checks import check_choice, check_concat_shapes, check_same_device, check_tensor, tensor_list
from mmkern.ops._registration import dtype_after_autocast, register_autocast, register_triton_kernel

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def concat_linear(inputs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None,
                  *, activation: str | None = "none") -> torch.Tensor:
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
    out, _ = torch.ops.mmkern.concat_linear.default(inputs, weight, bias, activation)
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
            raise TypeError(f"{name} has dtype {tensor.dtype}; concat_linear takes float16, bfloat16, float32 or float64")
        if tensor.dtype == torch.float64 and runs_on_triton(tensor.device) and not triton_has_float64_dot():
            raise TypeError(f"{name} is float64, which mmkern's Triton kernels need Triton >= 3.5 for; use float32, "
                            "or CPU tensors for float64")
    check_same_device(named, weight.device, "weight", "concat_linear")
    check_concat_shapes(inputs, weight, bias, "inputs", "weight")
    return inputs


def check_same_dtype(inputs, weight, bias) -> None:
    """All tensors share one dtype, after autocast's casts where it is on (the op's autocast kernel
    casts them)."""
    named = [(f"inputs[{i}]", x) for i, x in enumerate(inputs)] + ([("bias", bias)] if bias is not None else [])
    for name, tensor in named:
        if dtype_after_autocast(tensor) != dtype_after_autocast(weight):
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but weight has {weight.dtype}; all tensors must share one "
                "dtype (or run under torch.autocast)"
            )


def lead_shape(inputs) -> tuple:
    return tuple(torch.broadcast_shapes(*(x.shape[:-1] for x in inputs)))


@torch.library.register_fake("mmkern::concat_linear")
def _concat_linear_fake(inputs, weight, bias, activation):
    out_shape = (*lead_shape(inputs), weight.shape[0])
    return weight.new_empty(out_shape), weight.new_empty(out_shape if activation in SMOOTH_ACTIVATIONS else (0,))


@torch.library.register_fake("mmkern::concat_linear_backward")
def _concat_linear_backward_fake(grad_out, inputs, weight, activation_saved, activation,
                                 input_needs_grad, weight_needs_grad, bias_needs_grad):
    grad_inputs = [x.new_empty(x.shape if needed else (0,)) for x, needed in zip(inputs, input_needs_grad)]
    grad_weight = weight.new_empty(weight.shape if weight_needs_grad else (0,))
    grad_bias = weight.new_empty((weight.shape[0],) if bias_needs_grad else (0,))
    return grad_inputs, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    xs, weight, bias, activation = inputs
    out, preactivation = output
    ctx.activation = activation
    ctx.has_bias = bias is not None
    # relu's derivative reads off the output; the smooth ones need the pre-activation.
    ctx.save_for_backward(weight, out if activation == "relu" else preactivation, *xs)
    ctx.mark_non_differentiable(preactivation)


def gradients(ctx, grad_out, inputs, weight, activation_saved) -> tuple:
    """The gradients of an op whose inputs are (inputs, weight, bias, activation), by
    concat_linear_backward, for what ``ctx.needs_input_grad`` asks (None elsewhere)."""
    inputs_need_grad, weight_needs_grad, bias_needs_grad, _ = ctx.needs_input_grad
    bias_needs_grad = bias_needs_grad and ctx.has_bias
    grad_inputs, grad_weight, grad_bias = torch.ops.mmkern.concat_linear_backward.default(
        grad_out, inputs, weight, activation_saved, ctx.activation,
        list(inputs_need_grad), weight_needs_grad, bias_needs_grad,
    )
    return (
        [g if needed else None for g, needed in zip(grad_inputs, inputs_need_grad)],
        grad_weight if weight_needs_grad else None,
        grad_bias if bias_needs_grad else None,
        None,
    )


def _backward(ctx, grad_out, _grad_preactivation):
    weight, activation_saved, *xs = ctx.saved_tensors
    return gradients(ctx, grad_out, xs, weight, activation_saved)


torch.library.register_autograd("mmkern::concat_linear", _backward, setup_context=_setup_context)


register_triton_kernel("mmkern::concat_linear", "mmkern.kernels.concat_linear:concat_linear_forward")
register_triton_kernel("mmkern::concat_linear_backward", "mmkern.kernels.concat_linear:concat_linear_backward")
register_autocast("mmkern::concat_linear", cast_inputs=True)
register_autocast("mmkern::concat_linear_backward", cast_inputs=False)
