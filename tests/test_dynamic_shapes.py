"""torch.compile(dynamic=True) of every op with a Triton CUDA kernel: traced with every size a symbol,
each op must decompose into its Triton launches. Host code that hashed a size, or made a tile size
of one, broke here on a GPU (a symbolic size cannot be a dict key or a kernel constant)."""

import pytest
import torch

from tests.tracing import needs_fake_cuda_tracing, symbolic_cuda_tensors, traced_calls

pytestmark = needs_fake_cuda_tracing

F32, I8, I64 = torch.float32, torch.int8, torch.int64


def flat(outputs) -> tuple:
    """An op's outputs as the flat tuple of tensors a traced function must return."""
    return tuple(torch.utils._pytree.tree_leaves(outputs))


def assert_decomposes_into_triton(fn, *inputs):
    with inputs[0].fake_mode:
        calls = traced_calls(lambda *args: flat(fn(*args)), *inputs)
    assert "triton_kernel_wrapper_functional" in calls, calls
    assert not any("mmkern" in call for call in calls), calls


@pytest.fixture
def fake_mode(sm90_compile_target):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv())


def test_concat_linear(fake_mode):
    text, image, weight, bias, grad_out = symbolic_cuda_tensors(
        fake_mode, ((2, 9, 24), F32), ((2, 1, 40), F32), ((31, 64), F32), ((31,), F32), ((2, 9, 31), F32)
    )
    assert_decomposes_into_triton(
        lambda t, i, w, b: torch.ops.mmkern.concat_linear.default([t, i], w, b, "gelu"), text, image, weight, bias
    )
    assert_decomposes_into_triton(
        lambda g, t, i, w, s: flat(
            torch.ops.mmkern.concat_linear_backward.default(g, [t, i], w, s, "gelu", [True, True], True, True)
        ),
        grad_out,
        text,
        image,
        weight,
        grad_out,
    )


def test_quantized_concat_linear(fake_mode):
    text, image, text_scale, image_scale, weight, weight_scale, bias = symbolic_cuda_tensors(
        fake_mode,
        ((2, 9, 24), I8),
        ((2, 1, 40), I8),
        ((2, 9, 1), F32),
        ((2, 1, 1), F32),
        ((31, 64), I8),
        ((31,), F32),
        ((31,), F32),
    )
    assert_decomposes_into_triton(
        lambda t, i, ts, its, w, ws, b: torch.ops.mmkern.quantized_concat_linear.default(
            [t, i], [ts, its], w, ws, b, "silu", torch.bfloat16
        ),
        text,
        image,
        text_scale,
        image_scale,
        weight,
        weight_scale,
        bias,
    )


def test_quantized_fusion(fake_mode):
    a, b, scale_a, scale_b, weights, gate = symbolic_cuda_tensors(
        fake_mode,
        ((3, 7, 40), I8),
        ((3, 7, 40), I8),
        ((3, 7, 1), F32),
        ((3, 7, 1), F32),
        ((2,), F32),
        ((3, 7, 40), F32),
    )
    assert_decomposes_into_triton(
        lambda a, b, sa, sb, w: torch.ops.mmkern.quantized_fusion.default([a, b], [sa, sb], w, None, "sum", F32),
        a,
        b,
        scale_a,
        scale_b,
        weights,
    )
    assert_decomposes_into_triton(
        lambda a, b, sa, sb, g: torch.ops.mmkern.quantized_fusion.default([a, b], [sa, sb], None, g, "gated", F32),
        a,
        b,
        scale_a,
        scale_b,
        gate,
    )


def test_cross_modal_attention(fake_mode, attention_launches):
    q, k, v, grad_out, out, lse = symbolic_cuda_tensors(
        fake_mode,
        ((2, 9, 4, 32), F32),
        ((2, 700, 2, 32), F32),
        ((2, 700, 2, 24), F32),
        ((2, 9, 4, 24), F32),
        ((2, 9, 4, 24), F32),
        ((2, 4, 9), F32),
    )

    # The lengths are made inside the traced function: torch's analysis of which arguments a Triton
    # kernel writes counts the length pointers as written (they are only read), and
    # aot_export_joint_simple refuses a function that writes its inputs.
    def kv_lens(k):
        return torch.full((k.shape[0],), k.shape[1] - 1, dtype=I64, device=k.device)

    assert_decomposes_into_triton(
        lambda q, k, v: torch.ops.mmkern.cross_modal_attention.default(q, k, v, kv_lens(k), None, 0.2, 0.0, None),
        q,
        k,
        v,
    )
    assert_decomposes_into_triton(
        lambda g, q, k, v, o, lse: torch.ops.mmkern.cross_modal_attention_backward.default(
            g, q, k, v, o, lse, kv_lens(k), None, 0.2, 0.0, None
        ),
        grad_out,
        q,
        k,
        v,
        out,
        lse,
    )
    # Every key valid: K and V are read through TMA descriptors, built from symbolic sizes and strides.
    attention_launches.clear()
    assert_decomposes_into_triton(
        lambda q, k, v: torch.ops.mmkern.cross_modal_attention.default(q, k, v, None, None, 0.2, 0.0, None), q, k, v
    )
    assert {kwargs["KV_TMA"] for name, _, kwargs in attention_launches if name == "_forward_kernel"} == {True}
