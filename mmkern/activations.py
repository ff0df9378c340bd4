"""The activations the projection ops fuse into their epilogue, their eager forms and derivatives: the
one list of them. Imports no Triton, so the ops' autograd formulas can use it on machines without one.

The Triton GEMM's epilogue takes an activation by its index here (``ACTIVATION_CODES``, named constexprs
in mmkern/kernels/segmented_matmul.py); the C++ CPU kernels keep the same list in the same order
(``kActivations`` in csrc/cpu/concat_plan.h), which tests/test_activations.py holds equal to this one."""

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
# Their derivatives read the pre-activation, which the forward saves; relu's reads the output.
SMOOTH_ACTIVATIONS = ("gelu", "gelu_tanh", "silu")


def activation_forward(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act(z) in eager PyTorch."""
    if activation == "none":
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "silu":
        return F.silu(z)
    return F.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")


def activation_backward(grad: torch.Tensor, saved: torch.Tensor, activation: str) -> torch.Tensor:
    """grad * act'(z), from the pre-activation (smooth activations) or the output (relu) in ``saved``."""
    if activation == "none":
        return grad
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, saved, 0)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, saved)
    return torch.ops.aten.gelu_backward(grad, saved, approximate="tanh" if activation == "gelu_tanh" else "none")
