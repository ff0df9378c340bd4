import math

import pytest
import torch

from mmkern import _config, ops, reference
from tests.numerics import DEVICES, assert_close_to_reference

# (input shapes, out_features, bias, activation): per-token and broadcast segments, more segments
# than one GEMM launch takes (4), odd widths, lower-rank inputs, no rows, a zero-width segment, and a
# width whose int32 sums would not be exact in float32.
CASES = {
    "one_segment": ([(7, 97)], 33, True, "none"),
    "pooled_vector": ([(4, 37, 64), (4, 1, 100)], 97, True, "gelu"),
    "lower_rank": ([(3, 7, 16), (7, 5), (1,)], 24, False, "gelu_tanh"),
    "six_segments": ([(3, 4, 5 + i) for i in range(6)], 17, True, "relu"),
    "one_row": ([(1, 1, 16), (1, 1, 3)], 1, True, "silu"),
    "no_rows": ([(0, 5, 8), (1, 1, 3)], 9, True, "gelu"),
    "zero_width": ([(3, 4, 0), (3, 4, 5)], 6, True, "none"),
    "wide": ([(5, 2000), (5, 1200)], 8, True, "none"),
    # One input column: its weight slice is a (1, N) view with strides (1, 1), which torch._int_mm
    # misreads on CPU (found by the property tests).
    "one_column": ([(3, 1)], 2, False, "none"),
}
OUT_DTYPES = (torch.float32, torch.float16) if _config.TRITON_ON_CPU else (torch.float32, torch.float16, torch.bfloat16)


def quantized_case(shapes, out_features, with_bias, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(shape, generator=generator).to(device) for shape in shapes]
    width = sum(shape[-1] for shape in shapes)
    weight = (torch.randn(out_features, width, generator=generator) / math.sqrt(max(width, 1))).to(device)
    bias = torch.randn(out_features, generator=generator).to(device) if with_bias else None
    quantized = [reference.quantize_per_token(x) for x in inputs]
    weight_q, weight_scale = reference.quantize_per_token(weight)
    return [q for q, _ in quantized], [s for _, s in quantized], weight_q, weight_scale[:, 0], bias


def check_case(shapes, out_features, with_bias, activation, device, seed=0):
    inputs_q, scales, weight_q, weight_scale, bias = quantized_case(shapes, out_features, with_bias, device, seed=seed)
    args = (inputs_q, scales, weight_q, weight_scale, bias)
    for out_dtype in OUT_DTYPES:
        actual = ops.quantized_concat_linear(*args, activation=activation, out_dtype=out_dtype)
        exact = reference.quantized_concat_linear(
            *args, activation=activation, out_dtype=torch.float64, compute_dtype=torch.float64
        )
        # The eager path in float32: its sums of integer products round once they pass 2^24.
        eager = reference.quantized_concat_linear(
            *args, activation=activation, out_dtype=out_dtype, compute_dtype=torch.float32
        )
        assert_close_to_reference(actual, exact, eager, f"out ({out_dtype})")
        if out_dtype == torch.float32 and exact.numel():
            # int32 sums are exact: what is left is the float32 epilogue, a few roundings.
            scale = exact.abs().max().item() + 1
            assert (actual.double() - exact).abs().max().item() <= 8 * torch.finfo(torch.float32).eps * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, device):
    check_case(*CASES[case], device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", [[(4, 37, 64), (4, 1, 100)], [(4, 5, 16), (4, 1, 300), (4, 1, 45)]])
def test_split_k_keeps_the_int32_sums_exact(shapes, device, short_k_splits):
    """Per-sample projections (one and two segments, ragged K) with K split: each split's int32 sum is
    scaled by its token scale, and the fp32 partials add to within the same few roundings."""
    check_case(shapes, 9, True, "gelu", device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh", "silu"])
def test_every_activation(activation, device):
    check_case([(2, 9, 24), (2, 1, 40)], 31, True, activation, device)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_are_read_in_place(device):
    inputs_q, scales, weight_q, weight_scale, bias = quantized_case([(6, 2, 64), (2, 1, 20)], 15, True, device)
    text, text_scale = inputs_q[0].transpose(0, 1)[..., 3:35], scales[0].transpose(0, 1)
    weight = torch.cat([weight_q[:, 3:35], weight_q[:, 64:]], 1).t().contiguous().t()  # column-major
    args = ([text, inputs_q[1]], [text_scale, scales[1]], weight, weight_scale, bias)
    actual = ops.quantized_concat_linear(*args, out_dtype=torch.float32)
    exact = reference.quantized_concat_linear(*args, out_dtype=torch.float64, compute_dtype=torch.float64)
    assert (actual.double() - exact).abs().max() <= 1e-5 * (exact.abs().max() + 1)


@pytest.mark.parametrize("device", DEVICES)
def test_int8_path_within_one_percent_of_the_float_path(device):
    generator = torch.Generator().manual_seed(3)
    inputs = [
        torch.randn(4, 64, 96, generator=generator).to(device),
        torch.randn(4, 1, 160, generator=generator).to(device),
    ]
    weight = (torch.randn(80, 256, generator=generator) / 16).to(device)
    bias = torch.randn(80, generator=generator).to(device)
    quantized = ops.quantize_and_concat_linear(inputs, weight, bias, activation="gelu")
    exact = reference.concat_linear([x.double() for x in inputs], weight.double(), bias.double(), activation="gelu")
    assert ((quantized.double() - exact).norm() / exact.norm()).item() < 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["none", "relu", "silu"])
def test_straight_through_gradients(activation, device):
    """quantize_and_concat_linear's gradients are the unquantized op's at the dequantized values."""
    generator = torch.Generator().manual_seed(4)
    inputs = [
        torch.randn(2, 7, 24, generator=generator).to(device),
        torch.randn(2, 1, 12, generator=generator).to(device),
    ]
    weight = (torch.randn(10, 36, generator=generator) / 6).to(device)
    bias = torch.randn(10, generator=generator).to(device)
    leaves = [t.clone().requires_grad_() for t in (*inputs, weight, bias)]
    out = ops.quantize_and_concat_linear(leaves[:2], leaves[2], leaves[3], activation=activation)
    grad_out = torch.randn(out.shape, generator=generator).to(device)
    actual = torch.autograd.grad(out, leaves, grad_out)

    dequantized = [reference.fake_quantize_per_token(t).double().requires_grad_() for t in (*inputs, weight)]
    bias64 = bias.double().requires_grad_()
    expected_out = reference.concat_linear(dequantized[:2], dequantized[2], bias64, activation=activation)
    expected = torch.autograd.grad(expected_out, [*dequantized, bias64], grad_out.double())
    assert (out.double() - expected_out).abs().max() <= 1e-5 * (expected_out.abs().max() + 1)
    for name, a, e in zip(["text", "image", "weight", "bias"], actual, expected):
        assert a.shape == e.shape and a.dtype == torch.float32, name
        assert (a.double() - e).abs().max() <= 1e-5 * (e.abs().max() + 1), name


def test_straight_through_keeps_int8_for_the_backward():
    inputs = [torch.randn(2, 64, 48, requires_grad=True), torch.randn(2, 1, 16, requires_grad=True)]
    weight = torch.randn(32, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.quantize_and_concat_linear(inputs, weight, activation="gelu")
    float_elements = sum(t.numel() for t in saved if t.is_floating_point() and t.shape[-1] != 1 and t.dim() > 1)
    int8_elements = sum(t.numel() for t in saved if t.dtype == torch.int8)
    assert int8_elements == sum(x.numel() for x in inputs) + weight.numel()
    assert float_elements == 2 * 64 * 32  # only the pre-activation its gelu backward needs


# The output is float32 at most, so gradcheck runs in float32 with a step and tolerances to match.
@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
@pytest.mark.parametrize("device", DEVICES)
def test_bias_gradient(device):
    inputs_q, scales, weight_q, weight_scale, bias = quantized_case([(3, 5, 16), (3, 1, 8)], 7, True, device)
    bias = bias.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda b: ops.quantized_concat_linear(
            inputs_q, scales, weight_q, weight_scale, b, activation="silu", out_dtype=torch.float32
        ),
        [bias],
        eps=1e-2,
        atol=1e-3,
        rtol=1e-2,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for shapes, out_features, with_bias, activation in [CASES["pooled_vector"], CASES["lower_rank"], CASES["one_row"]]:
        inputs_q, scales, weight_q, weight_scale, bias = quantized_case(shapes, out_features, with_bias, device)
        for requires_grad in (False, True):
            b = None if bias is None else bias.clone().requires_grad_(requires_grad)
            torch.library.opcheck(
                torch.ops.mmkern.quantized_concat_linear.default,
                (inputs_q, scales, weight_q, weight_scale, b, activation, torch.float32),
            )
        generator = torch.Generator().manual_seed(5)
        floats = [torch.randn(s, generator=generator).to(device).requires_grad_() for s in shapes]
        weight = torch.randn(out_features, sum(s[-1] for s in shapes), generator=generator).to(device).requires_grad_()
        torch.library.opcheck(torch.ops.mmkern.quantize_and_concat_linear.default, (floats, weight, bias, activation))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, device):
    if backend == "inductor" and _config.TRITON_ON_CPU:
        pytest.skip("the interpreter run checks the kernels; inductor's own codegen is checked in the main run")
    inputs_q, scales, weight_q, weight_scale, bias = quantized_case([(2, 9, 24), (2, 1, 40)], 31, True, device)
    generator = torch.Generator().manual_seed(6)
    floats = [
        torch.randn(2, 9, 24, generator=generator).to(device),
        torch.randn(2, 1, 40, generator=generator).to(device),
    ]
    weight = torch.randn(31, 64, generator=generator).to(device)

    def step(inputs_q, scales, floats, weight):
        stored = ops.quantized_concat_linear(
            inputs_q, scales, weight_q, weight_scale, bias, activation="gelu", out_dtype=torch.float32
        )
        trained = ops.quantize_and_concat_linear(floats, weight, bias, activation="silu")
        return stored.sum() + trained.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    eager_leaves = [t.clone().requires_grad_() for t in (*floats, weight)]
    compiled_leaves = [t.clone().requires_grad_() for t in (*floats, weight)]
    eager_loss = step(inputs_q, scales, eager_leaves[:2], eager_leaves[2])
    compiled_loss = compiled(inputs_q, scales, compiled_leaves[:2], compiled_leaves[2])
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for e, c in zip(eager_leaves, compiled_leaves):
        torch.testing.assert_close(c.grad, e.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_quantizes_in_the_autocast_dtype(device):
    generator = torch.Generator().manual_seed(7)
    inputs = [
        torch.randn(2, 9, 24, generator=generator).to(device),
        torch.randn(2, 1, 40, generator=generator).to(device),
    ]
    weight = (torch.randn(31, 64, generator=generator) / 8).to(device)
    dtype = torch.float16 if _config.TRITON_ON_CPU else torch.bfloat16
    with torch.autocast(device, dtype=dtype):
        out = ops.quantize_and_concat_linear(inputs, weight)
    assert out.dtype == dtype
    expected = reference.quantize_and_concat_linear(
        [x.to(dtype) for x in inputs], weight.to(dtype), compute_dtype=torch.float64
    )
    assert (out.double() - expected.double()).abs().max() <= 2 * torch.finfo(dtype).eps * expected.abs().max()


def bad_input_cases():
    def call(**changes):
        inputs_q, scales, weight_q, weight_scale, bias = quantized_case([(2, 3, 5), (2, 1, 4)], 6, True, "cpu")
        args = dict(inputs_q=inputs_q, scales=scales, weight_q=weight_q, weight_scale=weight_scale, bias=bias)
        args.update({k: v(args) if callable(v) else v for k, v in changes.items()})
        kwargs = {k: args.pop(k) for k in ("activation", "out_dtype") if k in args}
        return lambda: ops.quantized_concat_linear(*args.values(), **kwargs)

    return {
        "float input": (
            call(inputs_q=lambda a: [a["inputs_q"][0].float(), a["inputs_q"][1]]),
            TypeError,
            r"inputs_q\[0\] has dtype torch.float32; expected torch.int8 \(quantize it",
        ),
        "float weight": (call(weight_q=lambda a: a["weight_q"].float()), TypeError, "weight_q has dtype torch.float32"),
        "int8 bias": (call(bias=lambda a: a["bias"].to(torch.int8)), TypeError, "bias has dtype torch.int8"),
        "fp16 scale": (
            call(scales=lambda a: [a["scales"][0].half(), a["scales"][1]]),
            TypeError,
            r"scales\[0\] has dtype torch.float16; per-token scales are float32",
        ),
        "scale shape": (
            call(scales=lambda a: [a["scales"][0][..., 0], a["scales"][1]]),
            ValueError,
            r"scales\[0\] must have shape \(2, 3, 1\)",
        ),
        "scale count": (call(scales=lambda a: a["scales"][:1]), ValueError, "one tensor per input, 2, got 1"),
        "negative scale": (
            call(scales=lambda a: [-a["scales"][0], a["scales"][1]]),
            ValueError,
            r"scales\[0\] holds -[0-9.e-]+; scales must be finite and >= 0",
        ),
        "inf weight scale": (
            call(weight_scale=lambda a: a["weight_scale"].index_fill(0, torch.tensor([2]), float("inf"))),
            ValueError,
            "weight_scale holds inf",
        ),
        "weight scale shape": (
            call(weight_scale=lambda a: a["weight_scale"][:, None]),
            ValueError,
            r"weight_scale must have shape \(6,\)",
        ),
        "weight scale dtype": (
            call(weight_scale=lambda a: a["weight_scale"].double()),
            TypeError,
            "weight_scale has dtype torch.float64",
        ),
        "scale requires grad": (
            call(scales=lambda a: [a["scales"][0].requires_grad_(), a["scales"][1]]),
            ValueError,
            r"scales\[0\] requires grad",
        ),
        "width mismatch": (
            call(weight_q=lambda a: a["weight_q"][:, 1:]),
            ValueError,
            r"weight_q.shape\[1\] must equal",
        ),
        "bias shape": (call(bias=lambda a: a["bias"][1:]), ValueError, "bias must have shape"),
        "no broadcast": (
            call(
                inputs_q=lambda a: [a["inputs_q"][0], a["inputs_q"][1].expand(2, 2, 4)],
                scales=lambda a: [a["scales"][0], a["scales"][1].expand(2, 2, 1)],
            ),
            ValueError,
            "do not broadcast",
        ),
        "devices": (call(bias=lambda a: a["bias"].to("meta")), ValueError, "bias is on meta but weight_q is on cpu"),
        "activation": (call(activation="tanh"), ValueError, "activation must be one of"),
        "out dtype": (call(out_dtype=torch.int32), TypeError, "out_dtype must be one of"),
        "not a list": (call(inputs_q=lambda a: a["inputs_q"][0]), TypeError, "inputs_q must be a sequence of tensors"),
        "float64 straight-through": (
            lambda: ops.quantize_and_concat_linear(
                [torch.randn(2, 3, dtype=torch.float64)], torch.randn(4, 3, dtype=torch.float64)
            ),
            TypeError,
            "weight is float64",
        ),
        "int8 straight-through": (
            lambda: ops.quantize_and_concat_linear([torch.zeros(2, 3, dtype=torch.int8)], torch.randn(4, 3)),
            TypeError,
            r"inputs\[0\] has dtype torch.int8",
        ),
    }


BAD_INPUTS = bad_input_cases()


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named(case, value_checks):
    call, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        call()
