import pytest
import torch

from mmkern import ops, reference
from tests.numerics import DEVICES

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANTIZED_DTYPES = (torch.int8, torch.float8_e4m3fn)
# Odd widths, one-element rows, no rows, empty rows, and a width past the CUDA kernel's register
# cache (4096 bf16 values), which re-reads its tail.
SHAPES = [(7, 97), (3, 5, 1000), (1, 1), (0, 16), (4, 0), (2, 3, 1), (2, 5000), (16, 64)]


def features(shape, kind, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "heavy_tailed":
        # Outliers orders of magnitude above the bulk, as activations of large models have (within fp16).
        x = (x * torch.exp(2 * torch.randn(shape, generator=generator, dtype=torch.float64))).clamp(-6e4, 6e4)
    elif kind == "zero_rows":
        x[..., ::2, :] = 0
    return x.to(dtype=dtype, device=device)


def assert_same_quantization(actual, expected):
    (xq, scale), (rq, rs) = actual, expected
    assert xq.dtype == rq.dtype and scale.dtype == torch.float32
    assert xq.shape == rq.shape and scale.shape == rs.shape
    torch.testing.assert_close(scale, rs, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(xq.float(), rq.float(), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["random", "heavy_tailed", "zero_rows"])
@pytest.mark.parametrize("qdtype", QUANTIZED_DTYPES, ids=str)
def test_matches_reference_bit_for_bit(qdtype, kind, device):
    for shape in SHAPES:
        for dtype in FLOAT_DTYPES:
            x = features(shape, kind, dtype, device)
            assert_same_quantization(ops.quantize_per_token(x, qdtype), reference.quantize_per_token(x, qdtype))
            assert torch.equal(ops.fake_quantize_per_token(x, qdtype), reference.fake_quantize_per_token(x, qdtype))
            xq, scale = reference.quantize_per_token(x, qdtype)
            for out_dtype in (*FLOAT_DTYPES, torch.float64):
                assert torch.equal(
                    ops.dequantize_per_token(xq, scale, out_dtype), reference.dequantize_per_token(xq, scale, out_dtype)
                )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["random", "heavy_tailed", "zero_rows"])
def test_error_within_the_rounding_bound(kind, device):
    x = features((64, 257), kind, torch.float32, device).double()
    xq, scale = ops.quantize_per_token(x.float(), torch.int8)
    error = (xq.double() * scale.double() - x).abs()
    # Rounding to the nearest integer step: at most half a step, plus float32's division error.
    assert (error <= scale.double() * (0.5 + 1e-5)).all()
    assert xq.abs().max() <= 127 and (xq.abs().amax(-1) == 127)[x.abs().amax(-1) > 0].all()

    xq, scale = ops.quantize_per_token(x.float(), torch.float8_e4m3fn)
    error = (xq.double() * scale.double() - x).abs()
    # e4m3: 3 mantissa bits, so half a unit is 2^-4 of the value; subnormals step by 2^-9.
    assert (error <= x.abs() * 2**-4 + scale.double() * 2**-10 + 1e-30).all()


@pytest.mark.parametrize("device", DEVICES)
def test_zero_rows_get_a_finite_scale_and_dequantize_to_zero(device):
    x = torch.zeros(3, 8, device=device)
    for qdtype in QUANTIZED_DTYPES:
        xq, scale = ops.quantize_per_token(x, qdtype)
        assert torch.isfinite(scale).all() and (scale > 0).all()
        assert (xq.float() == 0).all()
        assert (ops.dequantize_per_token(xq, scale) == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_offset_inputs(device):
    base = features((6, 2, 130), "random", torch.bfloat16, device)
    for x in (base.transpose(0, 1), base[:, 1, 1:], base[1:, 0]):  # transposed, unaligned start, offset rows
        assert_same_quantization(ops.quantize_per_token(x), reference.quantize_per_token(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_is_refused_by_row(bad, device, value_checks):
    x = torch.randn(2, 3, 8, device=device)
    x[1, 2, 5] = bad
    with pytest.raises(ValueError, match=r"x holds NaN or inf in row \(1, 2\)"):
        ops.quantize_per_token(x)
    # fake quantization spreads it as a float op would
    assert torch.isnan(ops.fake_quantize_per_token(x)[1, 2]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_fake_quantize_gradient_is_straight_through(device):
    x = features((5, 33), "random", torch.float32, device).requires_grad_()
    grad = torch.randn(5, 33, device=device)
    (actual,) = torch.autograd.grad(ops.fake_quantize_per_token(x), x, grad)
    assert torch.equal(actual, grad)


def test_quantize_is_not_differentiable():
    x = torch.randn(3, 4, requires_grad=True)
    xq, scale = ops.quantize_per_token(x)
    assert not xq.requires_grad and not scale.requires_grad


# opcheck's schema test multiplies outputs, which torch does not implement for float8 tensors.
OPCHECK_TESTS = {
    torch.int8: ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    torch.float8_e4m3fn: ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
}


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for shape in [(3, 17), (2, 1, 8), (0, 4)]:
        for qdtype in QUANTIZED_DTYPES:
            x = features(shape, "random", torch.float32, device)
            torch.library.opcheck(
                torch.ops.mmkern.quantize_per_token.default, (x, qdtype), test_utils=OPCHECK_TESTS[qdtype]
            )
            xq, scale = ops.quantize_per_token(x, qdtype)
            torch.library.opcheck(
                torch.ops.mmkern.dequantize_per_token.default,
                (xq, scale, torch.bfloat16),
                test_utils=OPCHECK_TESTS[qdtype],
            )
            for requires_grad in (False, True):
                torch.library.opcheck(
                    torch.ops.mmkern.fake_quantize_per_token.default, (x.clone().requires_grad_(requires_grad), qdtype)
                )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    x = features((4, 9, 48), "heavy_tailed", torch.float32, device)

    def roundtrip(x):
        xq, scale = ops.quantize_per_token(x)
        return ops.dequantize_per_token(xq, scale, torch.float32), ops.fake_quantize_per_token(x).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x), roundtrip(x)):
        assert torch.equal(a, b)
    leaf = x.clone().requires_grad_()
    compiled(leaf)[1].backward()
    assert torch.equal(leaf.grad, 2 * ops.fake_quantize_per_token(x))


BAD_INPUTS = {
    "quantize int8": (
        lambda: ops.quantize_per_token(torch.zeros(2, 3, dtype=torch.int8)),
        TypeError,
        "x has dtype torch.int8; expected float16, bfloat16 or float32; it is already quantized",
    ),
    "quantize float64": (
        lambda: ops.quantize_per_token(torch.zeros(2, 3, dtype=torch.float64)),
        TypeError,
        "x has dtype torch.float64",
    ),
    "quantize 0-d": (lambda: ops.quantize_per_token(torch.tensor(1.0)), ValueError, "0-d"),
    "quantize to int16": (
        lambda: ops.quantize_per_token(torch.zeros(2, 3), torch.int16),
        TypeError,
        "dtype must be one of torch.int8",
    ),
    "quantize a list": (lambda: ops.quantize_per_token([1.0, 2.0]), TypeError, "x must be a tensor"),
    "dequantize float": (
        lambda: ops.dequantize_per_token(torch.zeros(2, 3), torch.ones(2, 1)),
        TypeError,
        "xq has dtype torch.float32; expected torch.int8 or torch.float8_e4m3fn",
    ),
    "dequantize float64 scale": (
        lambda: ops.dequantize_per_token(torch.zeros(2, 3, dtype=torch.int8), torch.ones(2, 1, dtype=torch.float64)),
        TypeError,
        "scale has dtype torch.float64; per-token scales are float32",
    ),
    "dequantize scale shape": (
        lambda: ops.dequantize_per_token(torch.zeros(2, 3, dtype=torch.int8), torch.ones(2)),
        ValueError,
        r"scale must have shape \(2, 1\)",
    ),
    "dequantize negative scale": (
        lambda: ops.dequantize_per_token(torch.zeros(2, 3, dtype=torch.int8), torch.tensor([[1.0], [-1.0]])),
        ValueError,
        "scale holds -1.0; scales must be finite and >= 0",
    ),
    "dequantize nan scale": (
        lambda: ops.dequantize_per_token(torch.zeros(2, 3, dtype=torch.int8), torch.tensor([[float("nan")], [1.0]])),
        ValueError,
        "scale holds nan",
    ),
    "dequantize to int": (
        lambda: ops.dequantize_per_token(torch.zeros(2, 3, dtype=torch.int8), torch.ones(2, 1), torch.int32),
        TypeError,
        "dtype must be one of",
    ),
    "dequantize devices": (
        lambda: ops.dequantize_per_token(torch.zeros(2, 3, dtype=torch.int8), torch.ones(2, 1, device="meta")),
        ValueError,
        "scale is on meta but xq is on cpu",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named(case, value_checks):
    call, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        call()
