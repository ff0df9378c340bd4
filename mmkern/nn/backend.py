"""Which ops ``mmkern.nn`` modules call: mmkern's kernels, or the eager reference compositions with the
same parameters (for comparing models, and as the baseline of the end-to-end benchmarks)."""

import types

import torch
from torch import nn

from mmkern import ops, reference

BACKENDS = ("mmkern", "eager")


def _straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    return x + (rounded - x).detach()


def _eager_cross_modal_attention(
    q,
    k,
    v,
    *,
    kv_lens=None,
    q_lens=None,
    scale=None,
    dropout_p=0.0,
    causal=False,
    window=None,
    key_mask=None,
    softcap=None,
    sinks=None,
    bias=None,
):
    # The reference draws its dropout mask from an integer seed; reading one from the global generator
    # is a host sync (and a graph break under torch.compile), paid only when dropout is on.
    seed = int(torch.randint(2**62, ())) if dropout_p > 0 else None
    return reference.cross_modal_attention(
        q,
        k,
        v,
        kv_lens=kv_lens,
        q_lens=q_lens,
        scale=scale,
        dropout_p=dropout_p,
        dropout_seed=seed,
        causal=causal,
        window=window,
        key_mask=key_mask,
        softcap=softcap or 0.0,
        sinks=sinks,
        bias=bias,
    )[0]


def _eager_quantize_and_concat_linear(inputs, weight, bias=None, *, activation="none"):
    # The op's forward (int8-rounded inputs and weight) with its straight-through gradients.
    inputs = [_straight_through(x, reference.fake_quantize_per_token(x.detach())) for x in inputs]
    weight = _straight_through(weight, reference.fake_quantize_per_token(weight.detach()))
    return reference.concat_linear(inputs, weight, bias, activation=activation)


EAGER_OPS = types.SimpleNamespace(
    concat_linear=reference.concat_linear,
    cross_modal_attention=_eager_cross_modal_attention,
    quantize_per_token=reference.quantize_per_token,
    dequantize_per_token=reference.dequantize_per_token,
    fake_quantize_per_token=reference.fake_quantize_per_token,
    quantized_concat_linear=reference.quantized_concat_linear,
    quantize_and_concat_linear=_eager_quantize_and_concat_linear,
    quantized_fusion=reference.quantized_fusion,
)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


class UsesBackend:
    """For modules whose forward calls mmkern's ops through ``self._ops``: ``backend`` picks them."""

    backend = "mmkern"

    @property
    def _ops(self):
        return ops if self.backend == "mmkern" else EAGER_OPS


def set_backend(module: nn.Module, backend: str) -> nn.Module:
    """Points every mmkern module inside ``module`` at ``backend`` ("mmkern" or "eager"); returns ``module``."""
    check_backend(backend)
    for child in module.modules():
        if isinstance(child, UsesBackend):
            child.backend = backend
    return module
