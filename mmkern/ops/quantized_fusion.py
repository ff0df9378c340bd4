"""Quantized elementwise fusion: ``mmkern.ops.quantized_fusion``, a weighted sum or a gated mix of
same-shape quantized features, dequantized inside the one pass that combines them.

The schema is in csrc/registration.cpp, the CPU kernel in csrc/cpu/quantized_fusion.cpp, the CUDA
kernel (Triton) in mmkern/kernels/quantized_fusion.py; this file holds the public function, its
argument checks, the fake kernel and the autograd registration (for the float weights and gate).
"""

from collections.abc import Sequence

import torch

from mmkern.ops._checks import check_choice, check_same_device, check_scale_values, check_tensor, tensor_list
from mmkern.ops._eager import call_op, eager_function, needs_gradient, takes_eager_path
from mmkern.ops._registration import register_triton_kernel, triton_implementation
from mmkern.ops.quantize_per_token import FLOAT_DTYPES, check_quantized_pair

MODES = ("sum", "gated")
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quantized_fusion(
    inputs_q: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    weights: torch.Tensor | None = None,
    *,
    mode: str = "sum",
    gate: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Fuses same-shape quantized features in one pass, dequantizing them on the way.

    Args:
        inputs_q: ``(*lead, d)`` tensors of one quantized dtype, int8 or float8_e4m3fn, one shape.
        scales: one float32 ``(*lead, 1)`` per input, finite and non-negative.
        weights: for ``mode="sum"``: a float ``(len(inputs_q),)`` tensor, or None for all ones.
        mode: ``"sum"``: ``sum_i weights[i] * dequant(x_i)``; ``"gated"``: two inputs,
            ``g * dequant(x_0) + (1 - g) * dequant(x_1)`` with ``g = sigmoid(gate)``.
        gate: for ``mode="gated"``: float ``(*lead, d)`` logits, per token and channel.
        out_dtype: float16, bfloat16 (default) or float32.

    Returns:
        ``(*lead, d)`` in ``out_dtype``, computed in float32. Differentiable in ``weights`` and
        ``gate``; the quantized features carry no gradient.

    Raises:
        TypeError: float features where quantized ones are expected, mixed quantized dtypes, scales
            not float32, non-float weights or gate, an unsupported out_dtype.
        ValueError: an unknown mode, inputs of different shapes, scales, weights or gate of the wrong
            shape or device, gated with other than two inputs or without a gate, weights given with
            "gated" or a gate with "sum", negative or non-finite scales (checked on CPU, and on
            CUDA with ``mmkern.set_value_checks(True)``, a device sync).
    """
    inputs_q, scales = _check_fusion_arguments(inputs_q, scales, weights, mode, gate, out_dtype)
    arguments = (inputs_q, scales, weights, gate, mode, out_dtype)
    tensors = [*inputs_q, *scales, weights, gate]
    if takes_eager_path(tensors):
        if needs_gradient([weights, gate]):
            return _EagerQuantizedFusion.apply(*arguments)
        return _launch(*arguments)
    return call_op(torch.ops.mmkern.quantized_fusion.default, tensors, *arguments)


def _check_fusion_arguments(inputs_q, scales, weights, mode, gate, out_dtype):
    # One pass over the inputs, with each argument's name built only for its error: a small CPU call's
    # checks cost about as much as its kernel.
    inputs_q = tensor_list(inputs_q, "inputs_q")
    scales = tensor_list(scales, "scales")
    check_choice(mode, "mode", MODES)
    check_tensor(weights, "weights", optional=True)
    check_tensor(gate, "gate", optional=True)
    if len(scales) != len(inputs_q):
        raise ValueError(f"scales must hold one tensor per input, {len(inputs_q)}, got {len(scales)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {', '.join(map(str, OUT_DTYPES))}, got {out_dtype}")
    first = inputs_q[0]
    device = first.device
    for i, (x, scale) in enumerate(zip(inputs_q, scales)):
        check_quantized_pair(x, scale, f"inputs_q[{i}]", f"scales[{i}]")
        if i == 0:
            continue
        if x.dtype != first.dtype:
            raise TypeError(
                f"inputs_q[{i}] has dtype {x.dtype} but inputs_q[0] has {first.dtype}; "
                "fused features share one quantized dtype"
            )
        if x.shape != first.shape:
            raise ValueError(
                f"inputs_q[{i}] has shape {tuple(x.shape)} but inputs_q[0] has {tuple(first.shape)}; "
                "fused features share one shape"
            )
        if x.device != device:
            check_same_device([(f"inputs_q[{i}]", x)], device, "inputs_q[0]", "quantized_fusion")
    if mode == "sum":
        if gate is not None:
            raise ValueError('gate is only taken with mode="gated"')
        if weights is not None:
            if weights.dtype not in FLOAT_DTYPES:
                raise TypeError(f"weights has dtype {weights.dtype}; expected float16, bfloat16 or float32")
            if tuple(weights.shape) != (len(inputs_q),):
                raise ValueError(
                    f"weights must have shape ({len(inputs_q)},), one per input, got {tuple(weights.shape)}"
                )
    else:
        if len(inputs_q) != 2:
            raise ValueError(f'mode="gated" fuses exactly two inputs, got {len(inputs_q)}')
        if weights is not None:
            raise ValueError('weights are only taken with mode="sum"; the gate weighs the two inputs')
        if gate is None:
            raise ValueError('mode="gated" needs a gate (*lead, d) of logits')
        if gate.dtype not in FLOAT_DTYPES:
            raise TypeError(f"gate has dtype {gate.dtype}; expected float16, bfloat16 or float32")
        if gate.shape != first.shape:
            raise ValueError(f"gate must have the inputs' shape {tuple(first.shape)}, got {tuple(gate.shape)}")
    # Each scale is on its input's device (check_quantized_pair), each input on inputs_q[0]'s.
    named = [(name, t) for name, t in (("weights", weights), ("gate", gate)) if t is not None]
    check_same_device(named, device, "inputs_q[0]", "quantized_fusion")
    check_scale_values(scales, lambda i: f"scales[{i}]")
    return inputs_q, scales


@torch.library.register_fake("mmkern::quantized_fusion")
def _quantized_fusion_fake(inputs, scales, weights, gate, mode, out_dtype):
    return inputs[0].new_empty(inputs[0].shape, dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    xs, scales, weights, gate, mode, _ = inputs
    ctx.num_inputs = len(xs)
    ctx.save_for_backward(weights, gate, *xs, *scales)


def _backward(ctx, grad_out):
    weights, gate, *quantized = ctx.saved_tensors
    inputs_q, scales = quantized[: ctx.num_inputs], quantized[ctx.num_inputs :]
    weights_need_grad, gate_needs_grad = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    grad = grad_out.float()
    features = [torch.ops.mmkern.dequantize_per_token.default(x, s, torch.float32) for x, s in zip(inputs_q, scales)]
    grad_weights = grad_gate = None
    if weights_need_grad:
        grad_weights = torch.stack([(grad * f).sum() for f in features]).to(weights.dtype)
    if gate_needs_grad:
        g = torch.sigmoid(gate.float())
        grad_gate = (grad * (features[0] - features[1]) * g * (1 - g)).to(gate.dtype)
    no_gradients = [None] * ctx.num_inputs
    return no_gradients, no_gradients, grad_weights, grad_gate, None, None


torch.library.register_autograd("mmkern::quantized_fusion", _backward, setup_context=_setup_context)


_launch = triton_implementation("mmkern.kernels.quantized_fusion:quantized_fusion_forward")
_EagerQuantizedFusion = eager_function(_launch, _setup_context, _backward)
register_triton_kernel("mmkern::quantized_fusion", _launch)
