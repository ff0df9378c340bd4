"""``python -m mmkern.bench.attention_experiments``: the discriminating experiments for the attention's
wrong answer at head dim 40 / value dim 24 (seen on an H100 with Triton 3.6: O, dQ and dK wrong, dV
right, at the forward's 64x64 tile, 4 warps, 3 stages), seconds each on a GPU. Each runs forward and
backward and prints, per output, its max error against float64 over eager PyTorch's in the same dtype
(a ratio above 2 is a wrong answer): the failing case; the same with the strides' multiple-of-8 hint
off (the layout the failure was seen in); head dims with the aliased and the unaliased shared-memory
layout; one stage (no pipelining); K and V read through padded strides."""

import argparse
import contextlib
import sys
from unittest import mock

import torch

from mmkern import ops, reference

# (B, Lq, Lk, Hq, Hkv, D, Dv), kv_lens: the failing case.
FAILING = ((2, 33, 70, 4, 1, 40, 24), [70, 31])
FAILING_TILE = (64, 64, 4, 3)  # the forward's block_m, block_n, warps, stages


def _inputs(shape, kv_lens, dtype, device, padded_strides=False, seed=0):
    batch, q_len, k_len, q_heads, kv_heads, head_dim, v_dim = shape
    generator = torch.Generator().manual_seed(seed)

    def randn(*size, width=None):
        x = torch.randn(size, generator=generator, dtype=torch.float64)
        if width is None:
            return x.to(device, dtype)
        # The same values, rows `width` elements apart: strides that are multiples of 16.
        wide = torch.zeros(*size[:-1], width, dtype=dtype, device=device)
        wide[..., : size[-1]] = x.to(device, dtype)
        return wide[..., : size[-1]]

    q = randn(batch, q_len, q_heads, head_dim)
    k = randn(batch, k_len, kv_heads, head_dim, width=48 if padded_strides else None)
    v = randn(batch, k_len, kv_heads, v_dim, width=32 if padded_strides else None)
    return q, k, v, torch.tensor(kv_lens, device=device)


def _with_lse(q, k, v, **kwargs):
    return ops.cross_modal_attention(q, k, v, return_lse=True, **kwargs)


def _outputs(fn, q, k, v, kv_lens, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, kv_lens=kv_lens)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    return {"O": out, "lse": lse, "dQ": grads[0], "dK": grads[1], "dV": grads[2]}


def error_ratios(shape, kv_lens, dtype, device, padded_strides=False) -> dict:
    """{output: (mmkern's max error against float64, eager's)} for one case."""
    q, k, v, lens = _inputs(shape, kv_lens, dtype, device, padded_strides)
    grad_out = torch.randn(*q.shape[:3], v.shape[3], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_out = grad_out.to(device)
    exact = _outputs(reference.cross_modal_attention, q.double(), k.double(), v.double(), lens, grad_out)
    eager = _outputs(reference.cross_modal_attention, q, k, v, lens, grad_out)
    ours = _outputs(_with_lse, q, k, v, lens, grad_out)
    result = {}
    for name in exact:
        valid = exact[name].isfinite()
        error = (ours[name].double() - exact[name])[valid].abs().max().item()
        eager_error = (eager[name].double() - exact[name])[valid].abs().max().item()
        result[name] = (error, eager_error)
    return result


def _forward_tile(block_m, block_n, warps, stages):
    from mmkern.kernels import tiles

    return tiles.override("attention_forward", lambda *args: tiles.AttentionTile(block_m, block_n, warps, stages))


def _no_stride_hint():
    from mmkern.kernels import cross_modal_attention

    return mock.patch.object(cross_modal_attention, "_strides_of_8", lambda *strides: False)


def experiments() -> list:
    """(name, shape, kv_lens, forward tile, padded strides, stride hint on)."""
    (batch, q_len, k_len, q_heads, kv_heads, _, _), kv_lens = FAILING

    def other(d, dv):
        return (batch, q_len, k_len, q_heads, kv_heads, d, dv)

    one_stage = FAILING_TILE[:3] + (1,)
    return [
        ("failing case (D40/Dv24, 64x64/4/3)", FAILING[0], kv_lens, FAILING_TILE, False, True),
        ("failing case, stride hint off (as first seen)", FAILING[0], kv_lens, FAILING_TILE, False, False),
        ("failing case, K/V through padded strides", FAILING[0], kv_lens, FAILING_TILE, True, False),
        ("failing case, one stage", FAILING[0], kv_lens, one_stage, False, False),
        ("D48/Dv32, one stage (aliased layout)", other(48, 32), kv_lens, one_stage, False, False),
        ("D40/Dv40", other(40, 40), kv_lens, FAILING_TILE, False, False),
        ("D56/Dv24 (aliased)", other(56, 24), kv_lens, FAILING_TILE, False, False),
        ("D48/Dv24 (not aliased)", other(48, 24), kv_lens, FAILING_TILE, False, False),
        ("D32/Dv24 (not aliased)", other(32, 24), kv_lens, FAILING_TILE, False, False),
    ]


def run(dtype: torch.dtype, device: torch.device) -> list:
    """A line per experiment: each output's error over eager's (wrong above 2)."""
    lines = []
    for name, shape, kv_lens, tile, padded, hint in experiments():
        with contextlib.ExitStack() as stack:
            stack.enter_context(_forward_tile(*tile))
            if not hint:
                stack.enter_context(_no_stride_hint())
            errors = error_ratios(shape, kv_lens, dtype, device, padded)
        ratios = {out: error / max(eager, torch.finfo(dtype).eps) for out, (error, eager) in errors.items()}
        verdict = "WRONG" if any(r > 2 for r in ratios.values()) else "right"
        lines.append(f"{name:<48} {verdict:<5} " + " ".join(f"{out} {r:6.2f}" for out, r in ratios.items()))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkern.bench.attention_experiments", description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    print("\n".join(run(getattr(torch, args.dtype), torch.device(args.device))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
