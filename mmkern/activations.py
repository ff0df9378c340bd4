"""The activations the projection ops fuse into their epilogue, and their derivatives. Imports no
Triton, so the ops' autograd formulas can use it on machines without one."""

import torch

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
# Their derivatives read the pre-activation, which the forward saves; relu's reads the output.
SMOOTH_ACTIVATIONS = ("gelu", "gelu_tanh", "silu")


def activation_backward(grad: torch.Tensor, saved: torch.Tensor, activation: str) -> torch.Tensor:
    """grad * act'(z), from the pre-activation (smooth activations) or the output (relu) in ``saved``."""
    if activation == "none":
        return grad
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, saved, 0)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, saved)
    return torch.ops.aten.gelu_backward(grad, saved, approximate="tanh" if activation == "gelu_tanh" else "none")
