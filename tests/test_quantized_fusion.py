import pytest
import torch

from mmkern import _config, ops, reference
from tests.numerics import DEVICES, assert_close_to_reference

SHAPES = [(3, 7, 97), (1, 1), (0, 8), (5, 0), (2, 1500)]
OUT_DTYPES = (torch.float32, torch.float16) if _config.TRITON_ON_CPU else (torch.float32, torch.float16, torch.bfloat16)


def quantized_features(count, shape, qdtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pairs = [
        reference.quantize_per_token(torch.randn(shape, generator=generator).to(device), qdtype) for _ in range(count)
    ]
    return [q for q, _ in pairs], [s for _, s in pairs]


def check(inputs_q, scales, weights, mode, gate, device):
    for out_dtype in OUT_DTYPES:
        actual = ops.quantized_fusion(inputs_q, scales, weights, mode=mode, gate=gate, out_dtype=out_dtype)
        exact = reference.quantized_fusion(
            inputs_q, scales, weights, mode=mode, gate=gate, out_dtype=torch.float64, compute_dtype=torch.float64
        )
        eager = reference.quantized_fusion(inputs_q, scales, weights, mode=mode, gate=gate, out_dtype=out_dtype)
        assert_close_to_reference(actual, exact, eager, f"{mode} ({out_dtype})", terms=len(inputs_q))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("count", [1, 3, 6])  # six: more than one launch takes (4)
def test_sum_matches_reference(count, qdtype, device):
    for shape in SHAPES:
        inputs_q, scales = quantized_features(count, shape, qdtype, device)
        check(inputs_q, scales, None, "sum", None, device)
        weights = torch.linspace(-1.5, 2.0, count, device=device)
        check(inputs_q, scales, weights, "sum", None, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn], ids=str)
def test_gated_matches_reference(qdtype, device):
    for shape in SHAPES:
        inputs_q, scales = quantized_features(2, shape, qdtype, device)
        for gate_dtype in (torch.float32, torch.float16):
            gate = (4 * torch.randn(shape, generator=torch.Generator().manual_seed(1))).to(device, gate_dtype)
            check(inputs_q, scales, None, "gated", gate, device)


@pytest.mark.parametrize("device", DEVICES)
def test_gated_at_extreme_gates(device):
    # Every gate the sigmoid's range reduction treats apart (past -87 its exp is 0, NaN stays NaN), and
    # a sweep of a row that ends in a part register.
    edges = [-float("inf"), -1e30, -100, -87.5, -87, -86.9, -50, -20, -1, -1e-30, 0, 1e-30, 1, 20, 50, 87, 88, 100]
    edges += [1e30, float("inf"), float("nan")]
    gate = torch.cat([torch.tensor(edges), torch.linspace(-90, 90, 1001)]).reshape(2, -1).to(device)
    inputs_q, scales = quantized_features(2, tuple(gate.shape), torch.int8, device)
    actual = ops.quantized_fusion(inputs_q, scales, mode="gated", gate=gate, out_dtype=torch.float32)
    options = {"mode": "gated", "gate": gate}
    exact = reference.quantized_fusion(
        inputs_q, scales, **options, out_dtype=torch.float64, compute_dtype=torch.float64
    )
    eager = reference.quantized_fusion(inputs_q, scales, **options, out_dtype=torch.float32)
    nan = exact.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert_close_to_reference(actual[~nan], exact[~nan], eager[~nan], "gated at extreme gates", terms=2)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    inputs_q, scales = quantized_features(2, (6, 4, 40), torch.int8, device)
    views = [x.transpose(0, 1) for x in inputs_q], [s.transpose(0, 1) for s in scales]
    gate = torch.randn(6, 4, 40, device=device).transpose(0, 1)
    check(*views, torch.tensor([0.5, 2.0], device=device), "sum", None, device)
    check(*views, None, "gated", gate, device)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_of_weights_and_gate(device):
    inputs_q, scales = quantized_features(2, (3, 5, 16), torch.int8, device)
    grad_out = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2)).to(device)
    weights = torch.tensor([0.7, -1.2], device=device, requires_grad=True)
    gate = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3)).to(device).requires_grad_()
    for mode, leaf, kwargs in [("sum", weights, {"weights": weights}), ("gated", gate, {"gate": gate})]:
        out = ops.quantized_fusion(inputs_q, scales, mode=mode, out_dtype=torch.float32, **kwargs)
        (actual,) = torch.autograd.grad(out, leaf, grad_out)
        exact_leaf = leaf.detach().double().requires_grad_()
        exact_kwargs = {"weights" if mode == "sum" else "gate": exact_leaf}
        exact = reference.quantized_fusion(
            inputs_q, scales, mode=mode, out_dtype=torch.float64, compute_dtype=torch.float64, **exact_kwargs
        )
        (expected,) = torch.autograd.grad(exact, exact_leaf, grad_out.double())
        assert actual.dtype == leaf.dtype
        assert (actual.double() - expected).abs().max() <= 1e-5 * (expected.abs().max() + 1), mode


# The output is float32 at most, so gradcheck runs in float32 with a step and tolerances to match.
@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
def test_gradcheck():
    inputs_q, scales = quantized_features(2, (2, 3, 8), torch.int8, "cpu")
    weights = torch.tensor([0.7, -1.2], requires_grad=True)
    gate = torch.randn(2, 3, 8, requires_grad=True)
    tolerances = dict(eps=1e-2, atol=1e-3, rtol=1e-2)
    assert torch.autograd.gradcheck(
        lambda w: ops.quantized_fusion(inputs_q, scales, w, out_dtype=torch.float32), [weights], **tolerances
    )
    assert torch.autograd.gradcheck(
        lambda g: ops.quantized_fusion(inputs_q, scales, mode="gated", gate=g, out_dtype=torch.float32),
        [gate],
        **tolerances,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for shape in [(3, 17), (2, 1, 8)]:
        inputs_q, scales = quantized_features(3, shape, torch.int8, device)
        for requires_grad in (False, True):
            weights = torch.tensor([0.5, 1.0, -2.0], device=device, requires_grad=requires_grad)
            gate = torch.randn(shape, device=device, requires_grad=requires_grad)
            torch.library.opcheck(
                torch.ops.mmkern.quantized_fusion.default, (inputs_q, scales, weights, None, "sum", torch.float32)
            )
            torch.library.opcheck(
                torch.ops.mmkern.quantized_fusion.default,
                (inputs_q[:2], scales[:2], None, gate, "gated", torch.float32),
            )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    inputs_q, scales = quantized_features(3, (4, 9, 48), torch.int8, device)
    weights = torch.tensor([0.5, 1.0, -2.0], device=device)
    gate = torch.randn(4, 9, 48, device=device)

    def step(weights, gate):
        summed = ops.quantized_fusion(inputs_q, scales, weights, out_dtype=torch.float32)
        gated = ops.quantized_fusion(inputs_q[:2], scales[:2], mode="gated", gate=gate, out_dtype=torch.float32)
        return (summed * gated).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_leaves = [weights.clone().requires_grad_(), gate.clone().requires_grad_()]
    compiled_leaves = [weights.clone().requires_grad_(), gate.clone().requires_grad_()]
    step(*eager_leaves).backward()
    compiled(*compiled_leaves).backward()
    for e, c in zip(eager_leaves, compiled_leaves):
        torch.testing.assert_close(c.grad, e.grad)


def bad_input_cases():
    inputs_q, scales = quantized_features(2, (2, 3, 5), torch.int8, "cpu")
    gate = torch.randn(2, 3, 5)

    def fuse(inputs=inputs_q, scales=scales, weights=None, **kwargs):
        return lambda: ops.quantized_fusion(inputs, scales, weights, **kwargs)

    return {
        "float input": (
            fuse([inputs_q[0].float(), inputs_q[1]]),
            TypeError,
            r"inputs_q\[0\] has dtype torch.float32; expected torch.int8 or torch.float8_e4m3fn",
        ),
        "mixed dtypes": (
            fuse([inputs_q[0], inputs_q[1].to(torch.float8_e4m3fn)]),
            TypeError,
            r"inputs_q\[1\] has dtype torch.float8_e4m3fn but inputs_q\[0\] has torch.int8",
        ),
        "mixed shapes": (
            fuse([inputs_q[0], inputs_q[1][:, :2]], [scales[0], scales[1][:, :2]]),
            ValueError,
            r"inputs_q\[1\] has shape \(2, 2, 5\)",
        ),
        "scale shape": (
            fuse(scales=[scales[0], scales[1][..., 0]]),
            ValueError,
            r"scales\[1\] must have shape \(2, 3, 1\)",
        ),
        "negative scale": (fuse(scales=[scales[0], -scales[1]]), ValueError, r"scales\[1\] holds -"),
        "weights shape": (fuse(weights=torch.ones(3)), ValueError, r"weights must have shape \(2,\)"),
        "int weights": (fuse(weights=torch.ones(2, dtype=torch.int64)), TypeError, "weights has dtype torch.int64"),
        "unknown mode": (fuse(mode="product"), ValueError, "mode must be one of 'sum', 'gated'"),
        "gated without gate": (fuse(mode="gated"), ValueError, "needs a gate"),
        "gated with three": (fuse(inputs_q * 2, scales * 2, mode="gated", gate=gate), ValueError, "exactly two inputs"),
        "gate shape": (
            fuse(mode="gated", gate=gate[:, :1]),
            ValueError,
            r"gate must have the inputs' shape \(2, 3, 5\)",
        ),
        "gate with sum": (fuse(gate=gate), ValueError, 'gate is only taken with mode="gated"'),
        "weights with gated": (
            fuse(weights=torch.ones(2), mode="gated", gate=gate),
            ValueError,
            'weights are only taken with mode="sum"',
        ),
        "gate devices": (fuse(mode="gated", gate=gate.to("meta")), ValueError, "gate is on meta but inputs_q"),
        "out dtype": (fuse(out_dtype=torch.int8), TypeError, "out_dtype must be one of"),
        "scale count": (fuse(scales=scales[:1]), ValueError, "one tensor per input"),
    }


BAD_INPUTS = bad_input_cases()


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named(case, value_checks):
    call, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        call()
