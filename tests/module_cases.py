"""A call of every mmkern.nn module, forward and backward, on tiny tensors: what the host-read count,
sync-debug and CUDA-graph tests run. Each case is (name, build), build(device) -> (module, inputs,
keyword arguments); float inputs that require grad get gradients in the backward."""

import torch

from mmkern import nn as mmnn
from mmkern import ops


def _randn(device, *shape, grad=False):
    generator = torch.Generator().manual_seed(sum(shape))
    return torch.randn(shape, generator=generator).to(device).requires_grad_(grad)


def _concat_linear(device):
    module = mmnn.ConcatLinear((16, 8), 12, activation="gelu").to(device)
    return module, (_randn(device, 2, 5, 16, grad=True), _randn(device, 2, 1, 8, grad=True)), {}


def _attention(kwargs_of):
    def build(device):
        module = mmnn.CrossModalAttention(16, 4, kdim=12, vdim=12, num_kv_heads=2).to(device)
        inputs = (
            _randn(device, 2, 5, 16, grad=True),
            _randn(device, 2, 7, 12, grad=True),
            _randn(device, 2, 7, 12, grad=True),
        )
        return module, inputs, kwargs_of(device)

    return build


def _gated_fusion(device):
    module = mmnn.GatedFusion((16, 8), 12).to(device)
    return module, (_randn(device, 2, 5, 16, grad=True), _randn(device, 2, 1, 8, grad=True)), {}


def _quantized_concat_linear(quantized_inputs):
    def build(device):
        module = mmnn.QuantizedConcatLinear((16, 8), 12, activation="silu", out_dtype=torch.float32).to(device)
        text, image = _randn(device, 2, 5, 16, grad=not quantized_inputs), _randn(device, 2, 1, 8)
        if quantized_inputs:
            text = ops.quantize_per_token(text)
        return module, (text, image), {}

    return build


def _quantized_fusion(mode):
    def build(device):
        module = mmnn.QuantizedFusion(
            2, mode=mode, features=16 if mode == "gated" else None, out_dtype=torch.float32
        ).to(device)
        pairs = tuple(ops.quantize_per_token(_randn(device, 2, 5, 16 + i)[..., :16].contiguous()) for i in range(2))
        return module, pairs, {}

    return build


MODULE_CASES = [
    ("ConcatLinear", _concat_linear),
    ("CrossModalAttention", _attention(lambda device: {})),
    (
        "CrossModalAttention kv_lens q_lens",
        _attention(
            lambda device: {
                "kv_lens": torch.tensor([7, 3], device=device),
                "q_lens": torch.tensor([5, 2], device=device),
            }
        ),
    ),
    ("GatedFusion", _gated_fusion),
    ("QuantizedConcatLinear float inputs", _quantized_concat_linear(False)),
    ("QuantizedConcatLinear quantized inputs", _quantized_concat_linear(True)),
    ("QuantizedFusion sum", _quantized_fusion("sum")),
    ("QuantizedFusion gated", _quantized_fusion("gated")),
]

# A key_padding_mask is read on the host today (to skip the gather for right padding, and to recognise
# an additive 0/-inf mask); key masks taken by the kernel itself (issue 17) remove both reads.
MASKED_ATTENTION = (
    "CrossModalAttention key_padding_mask",
    _attention(
        lambda device: {"key_padding_mask": torch.arange(7, device=device) >= torch.tensor([[7], [3]], device=device)}
    ),
)


def leaves(module, inputs) -> list:
    """The tensors a backward of the case gives gradients to: its parameters and its float inputs."""
    flat = torch.utils._pytree.tree_leaves(inputs)
    return [p for p in module.parameters() if p.requires_grad] + [x for x in flat if x.requires_grad]


def forward(module, inputs, kwargs) -> torch.Tensor:
    out = module(*inputs, **kwargs)
    return out[0] if isinstance(out, tuple) else out
