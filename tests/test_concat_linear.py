import importlib
import math

import pytest
import torch

from mmkern import _config, ops, reference
from mmkern.kernels import tiles
from mmkern.kernels.launch import runs_on_triton
from mmkern.kernels.tiles import GemmTile
from tests.numerics import DEVICES, assert_close_to_reference, dtypes_for, skip_unless_float64_runs_on
from tests.tracing import needs_fake_cuda_tracing, traced_calls

# (input shapes, out_features, bias, activation): per-token and broadcast segments, 1 to 6 segments,
# odd widths (1, 7, 97, 1000), lower-rank inputs, and edge sizes (no rows, a zero-width segment).
CASES = {
    "one_segment": ([(7, 97)], 33, True, "none"),
    "two_tokens": ([(2, 7, 33), (2, 7, 97)], 61, True, "relu"),
    "pooled_vector": ([(4, 97, 64), (4, 1, 100)], 97, True, "gelu"),
    "lower_rank": ([(3, 7, 16), (7, 5), (1,)], 24, False, "gelu_tanh"),
    "four_mixed": ([(2, 5, 1), (2, 1, 7), (1, 5, 33), (2, 5, 16)], 19, True, "silu"),
    "wide_segment": ([(1, 3, 1000), (1, 1, 24)], 7, True, "gelu"),
    "six_segments": ([(3, 4, 5 + i) for i in range(6)], 17, True, "relu"),
    "one_row": ([(1, 1, 16), (1, 1, 3)], 1, True, "silu"),
    "no_rows": ([(0, 5, 8), (1, 1, 3)], 9, True, "gelu"),
    "zero_width": ([(3, 4, 0), (3, 4, 5)], 6, True, "none"),
    "three_kept_runs": ([(2, 4, 3, 5, 2, 6), (2, 1, 3, 1, 2, 4)], 7, True, "silu"),
}


def make_case(shapes, out_features, with_bias, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    width = sum(shape[-1] for shape in shapes)
    # Scaled so outputs stay O(1) and fp16 cannot overflow.
    weight = torch.randn(out_features, width, generator=generator, dtype=torch.float64) / math.sqrt(max(width, 1))
    bias = torch.randn(out_features, generator=generator, dtype=torch.float64) if with_bias else None
    to = dict(dtype=dtype, device=device)
    return [x.to(**to) for x in inputs], weight.to(**to), None if bias is None else bias.to(**to)


def leaves(inputs, weight, bias):
    return [t.detach().clone().requires_grad_() for t in [*inputs, weight] + ([bias] if bias is not None else [])]


def forward_and_grads(fn, tensors, num_inputs, has_bias, activation, grad_out):
    inputs, weight = tensors[:num_inputs], tensors[num_inputs]
    bias = tensors[num_inputs + 1] if has_bias else None
    out = fn(inputs, weight, bias, activation=activation)
    grads = (
        torch.autograd.grad(out, tensors, grad_out.to(out.dtype))
        if out.numel()
        else [torch.zeros_like(t) for t in tensors]
    )
    return out, grads


def check_against_reference(shapes, out_features, with_bias, activation, dtype, device, seed=0):
    inputs, weight, bias = make_case(shapes, out_features, with_bias, dtype, device, seed=seed)
    exact_leaves = [t.double() for t in leaves(inputs, weight, bias)]
    exact_leaves = [t.detach().requires_grad_() for t in exact_leaves]
    exact, exact_grads = forward_and_grads(
        reference.concat_linear,
        exact_leaves,
        len(shapes),
        with_bias,
        activation,
        grad_out := torch.randn(
            *torch.broadcast_shapes(*(s[:-1] for s in shapes)), out_features, dtype=torch.float64, device=device
        ),
    )
    eager, eager_grads = forward_and_grads(
        reference.concat_linear, leaves(inputs, weight, bias), len(shapes), with_bias, activation, grad_out
    )
    actual, actual_grads = forward_and_grads(
        ops.concat_linear, leaves(inputs, weight, bias), len(shapes), with_bias, activation, grad_out
    )
    assert_close_to_reference(actual, exact.detach(), eager.detach(), "out")
    names = [f"grad inputs[{i}]" for i in range(len(shapes))] + ["grad weight", "grad bias"]
    # Each gradient element sums over the outputs it fed: out_features per row it was broadcast to,
    # or every row for the weight and bias.
    rows = math.prod(torch.broadcast_shapes(*(s[:-1] for s in shapes)))
    terms = [out_features * rows // max(math.prod(s[:-1]), 1) for s in shapes] + [rows, rows]
    for name, a, x, e, n in zip(names, actual_grads, exact_grads, eager_grads, terms):
        assert_close_to_reference(a, x, e, name, terms=n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, device):
    shapes, out_features, with_bias, activation = CASES[case]
    for dtype in dtypes_for(device):
        check_against_reference(shapes, out_features, with_bias, activation, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh", "silu"])
def test_every_activation_and_dtype(activation, device):
    for dtype in dtypes_for(device):
        check_against_reference([(2, 9, 24), (2, 1, 40)], 31, True, activation, dtype, device)


# Tiles that take each of the GEMM's paths on small shapes: the epilogue in halves (64 wide) and in
# quarters (256 wide), a K step longer than some segments (masked K) and one that divides them all.
PATH_TILES = {
    "halves": GemmTile(16, 64, 16, 4, 4, 2),
    "quarters": GemmTile(16, 256, 16, 4, 4, 2),
    "long_k_step": GemmTile(32, 32, 64, 4, 4, 2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", list(PATH_TILES))
def test_every_gemm_path_matches_the_reference(path, device):
    """Forward (addend broadcast through the row map, bias, a smooth activation's saved pre-activation)
    and backward with each path's tile forced; the interpreter's own tile is 16 wide, which takes none
    of the epilogue's pieces."""
    if not runs_on_triton(torch.device(device)):
        pytest.skip("the C++ CPU kernels take no tiles")
    with tiles.override("gemm", lambda *shape: PATH_TILES[path]):
        for dtype in dtypes_for(device):
            check_against_reference([(2, 21, 48), (2, 1, 20), (21, 7)], 200, True, "gelu", dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["pooled_vector", "four_mixed", "three_kept_runs"])
def test_split_k_matches_the_reference_and_repeats_bitwise(case, device, short_k_splits):
    """The weight gradients, input gradients and per-sample projections with K split (ragged K, several
    segments), each result the same bits on a second run: the splits are added in a fixed order."""
    if not runs_on_triton(torch.device(device)):
        pytest.skip("split-K is the Triton GEMM's")
    shapes, out_features, with_bias, activation = CASES[case]
    for dtype in dtypes_for(device):
        check_against_reference(shapes, out_features, with_bias, activation, dtype, device)
    inputs, weight, bias = make_case(shapes, out_features, with_bias, torch.float32, device)
    runs = [
        forward_and_grads(
            ops.concat_linear,
            leaves(inputs, weight, bias),
            len(shapes),
            with_bias,
            activation,
            torch.ones(*torch.broadcast_shapes(*(s[:-1] for s in shapes)), out_features, device=device),
        )
        for _ in range(2)
    ]
    for first, second in zip([runs[0][0], *runs[0][1]], [runs[1][0], *runs[1][1]]):
        assert torch.equal(first, second)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_and_weight_are_read_in_place(device):
    skip_unless_float64_runs_on(device)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(5, 2, 64, generator=generator, dtype=torch.float64).to(device)
    pooled = torch.randn(2, 1, 3, 40, generator=generator, dtype=torch.float64).to(device)
    inputs = [
        tokens.transpose(0, 1)[..., 3:35],  # non-contiguous leading dims and a feature slice
        pooled[:, :, 1, 7:27],  # (2, 1, 20) taken out of a larger tensor
        torch.randn(3, generator=generator, dtype=torch.float64).to(device).expand(2, 5, 3),  # stride-0 dims
    ]
    weight = torch.randn(55, 23, generator=generator, dtype=torch.float64).to(device).t()  # column-major (23, 55)
    bias = torch.randn(46, generator=generator, dtype=torch.float64).to(device)[::2]  # strided bias
    actual = ops.concat_linear(inputs, weight, bias, activation="gelu")
    expected = reference.concat_linear(inputs, weight, bias, activation="gelu")
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    skip_unless_float64_runs_on("cpu")
    generator = torch.Generator().manual_seed(2)
    tensors = [
        torch.randn(2, 3, 4, generator=generator, dtype=torch.float64),
        torch.randn(2, 1, 5, generator=generator, dtype=torch.float64),
        torch.randn(3, 2, generator=generator, dtype=torch.float64),
        torch.randn(6, 11, generator=generator, dtype=torch.float64),
        torch.randn(6, generator=generator, dtype=torch.float64),
    ]
    tensors = [t.requires_grad_() for t in tensors]
    # Through the interpreter (about a thousand launches per activation) the smooth-activation path
    # stands for the rest; the main run checks every activation.
    for activation in ["silu"] if _config.TRITON_ON_CPU else ["none", "relu", "gelu", "gelu_tanh", "silu"]:
        assert torch.autograd.gradcheck(
            lambda a, b, c, w, bias: ops.concat_linear([a, b, c], w, bias, activation=activation), tensors
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leaf", ["inputs[0]", "inputs[1]", "weight", "bias"])
def test_gradient_only_for_what_needs_it(leaf, device):
    """One leaf needs a gradient: the backward computes that one alone (the others come back as empty
    tensors, never read) and gets it right."""
    inputs, weight, bias = make_case([(2, 3, 4), (2, 1, 5)], 6, True, torch.float32, device)
    tensor = {"inputs[0]": inputs[0], "inputs[1]": inputs[1], "weight": weight, "bias": bias}[leaf].requires_grad_()
    grad_out = torch.randn(2, 3, 6, device=device)
    (actual,) = torch.autograd.grad(ops.concat_linear(inputs, weight, bias, activation="gelu"), tensor, grad_out)
    (expected,) = torch.autograd.grad(
        reference.concat_linear(inputs, weight, bias, activation="gelu"), tensor, grad_out
    )
    torch.testing.assert_close(actual, expected)


def opcheck_samples(device):
    samples = []
    small_pooled = ([(2, 3, 8), (2, 1, 5)], 6, True, "gelu")
    for shapes, out_features, with_bias, activation in [small_pooled, CASES["lower_rank"], CASES["one_row"]]:
        for requires_grad in (False, True):
            inputs, weight, bias = make_case(shapes, out_features, with_bias, torch.float32, device)
            tensors = [*inputs, weight] + ([bias] if bias is not None else [])
            for t in tensors:
                t.requires_grad_(requires_grad)
            samples.append((inputs, weight, bias, activation))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for inputs, weight, bias, activation in opcheck_samples(device):
        torch.library.opcheck(torch.ops.mmkern.concat_linear.default, (inputs, weight, bias, activation))
        out, saved = torch.ops.mmkern.concat_linear.default(
            [x.detach() for x in inputs], weight.detach(), None if bias is None else bias.detach(), activation
        )
        grad_out = torch.randn_like(out)
        activation_saved = out if activation == "relu" else saved
        torch.library.opcheck(
            torch.ops.mmkern.concat_linear_backward.default,
            (
                grad_out,
                [x.detach() for x in inputs],
                weight.detach(),
                activation_saved,
                activation,
                [True] * len(inputs),
                True,
                bias is not None,
            ),
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, device):
    if backend == "inductor" and _config.TRITON_ON_CPU:
        pytest.skip("the interpreter run checks the kernels; inductor's own codegen is checked in the main run")
    inputs, weight, bias = make_case([(2, 9, 24), (2, 1, 40)], 31, True, torch.float32, device)

    def step(text, image, weight, bias):
        return ops.concat_linear([text, image], weight, bias, activation="gelu").square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    eager_leaves, compiled_leaves = leaves(inputs, weight, bias), leaves(inputs, weight, bias)
    eager_loss, compiled_loss = step(*eager_leaves), compiled(*compiled_leaves)
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for e, c in zip(eager_leaves, compiled_leaves):
        torch.testing.assert_close(c.grad, e.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_in_the_autocast_dtype(device):
    dtype = torch.bfloat16 if torch.bfloat16 in dtypes_for(device) else torch.float16
    inputs, weight, bias = make_case([(2, 9, 24), (2, 1, 40)], 31, True, torch.float32, device)
    with torch.autocast(device, dtype=dtype):
        actual = ops.concat_linear(inputs, weight, bias, activation="silu")
        eager = reference.concat_linear(inputs, weight, bias, activation="silu")
    assert actual.dtype == eager.dtype == dtype
    exact = reference.concat_linear(
        [x.to(dtype).double() for x in inputs], weight.to(dtype).double(), bias.to(dtype).double(), activation="silu"
    )
    assert_close_to_reference(actual, exact, eager, "autocast out")


@needs_fake_cuda_tracing
def test_compile_sees_the_triton_kernels_for_cuda_tensors(sm90_compile_target, tma_launches):
    """Under AOTDispatcher both ops decompose into their Triton launches for CUDA tensors (as a
    triton_op would), so the compiler calls the kernels from its own code. Traced with fake CUDA
    tensors, so it runs on a machine with no GPU. With a TMA tile (as an output of a wave of tiles
    takes on sm_90) the descriptors are built over the operands (transposed views included), which
    torch rebuilds when it runs the graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def forward(text, image, weight, bias):
        return (ops.concat_linear([text, image], weight, bias, activation="gelu"),)

    def backward(grad_out, text, image, weight, preactivation):
        grad_inputs, grad_weight, grad_bias = torch.ops.mmkern.concat_linear_backward.default(
            grad_out, [text, image], weight, preactivation, "gelu", [True, True], True, True
        )
        return (*grad_inputs, grad_weight, grad_bias)

    with FakeTensorMode(), tiles.override("gemm", lambda *shape: GemmTile(16, 32, 16, 4, 4, 2, tma=True)):
        text, image = torch.empty(2, 9, 24, device="cuda"), torch.empty(2, 1, 40, device="cuda")
        weight, bias, grad_out = (
            torch.empty(32, 64, device="cuda"),
            torch.empty(32, device="cuda"),
            torch.empty(2, 9, 32, device="cuda"),
        )
        for calls in (
            traced_calls(forward, text, image, weight, bias),
            traced_calls(backward, grad_out, text, image, weight, grad_out),
        ):
            assert "triton_kernel_wrapper_functional" in calls, calls
            assert not any("mmkern" in call for call in calls), calls
    assert tma_launches and None not in tma_launches, tma_launches
    assert {(False, True), (False, False), (True, False)} <= set(tma_launches), tma_launches


BAD_INPUTS = {
    "not a sequence": (lambda x, w, b: (x[0], w, b, "none"), TypeError, "sequence of tensors"),
    "empty inputs": (lambda x, w, b: ([], w, b, "none"), ValueError, "at least one tensor"),
    "integer input": (
        lambda x, w, b: ([x[0].long(), x[1]], w, b, "none"),
        TypeError,
        r"inputs\[0\] has dtype torch.int64",
    ),
    "integer weight": (lambda x, w, b: (x, w.int(), b, "none"), TypeError, "weight has dtype torch.int32"),
    "mixed dtypes": (
        lambda x, w, b: ([x[0], x[1].half()], w, b, "none"),
        TypeError,
        r"inputs\[1\] has dtype torch.float16",
    ),
    "mixed devices": (lambda x, w, b: ([x[0], x[1].to("meta")], w, b, "none"), ValueError, r"inputs\[1\] is on meta"),
    "wrong width": (lambda x, w, b: (x, w[:, 1:], b, "none"), ValueError, r"weight.shape\[1\] must equal"),
    "weight not 2-D": (lambda x, w, b: (x, w[None], b, "none"), ValueError, "weight must be 2-D"),
    "wrong bias": (lambda x, w, b: (x, w, b[1:], "none"), ValueError, "bias must have shape"),
    "no broadcast": (
        lambda x, w, b: ([x[0], x[1].expand(2, 3, 4)[:, :2]], w, b, "none"),
        ValueError,
        "do not broadcast",
    ),
    "0-d input": (lambda x, w, b: ([torch.tensor(1.0), *x], w, b, "none"), ValueError, "0-d tensor"),
    "unknown activation": (lambda x, w, b: (x, w, b, "tanh"), ValueError, "activation must be one of"),
    "tensor-like list item": (
        lambda x, w, b: ([x[0], [1.0]], w, b, "none"),
        TypeError,
        r"inputs\[1\] must be a tensor",
    ),
}


@pytest.mark.parametrize("device", DEVICES)
def test_float64_without_triton_float64_dot_is_refused(device, monkeypatch):
    if not runs_on_triton(torch.device(device)):
        pytest.skip("float64 runs on the C++ kernels here")
    # The module, not the function of the same name that mmkern.ops exports.
    monkeypatch.setattr(importlib.import_module("mmkern.ops.concat_linear"), "triton_has_float64_dot", lambda: False)
    inputs, weight, bias = make_case([(2, 3, 5), (2, 1, 4)], 6, True, torch.float64, device)
    with pytest.raises(TypeError, match=r"inputs\[0\] is float64, which mmkern's Triton kernels need Triton >= 3.5"):
        ops.concat_linear(inputs, weight, bias)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named(case):
    make, error, message = BAD_INPUTS[case]
    inputs = [torch.randn(2, 3, 5), torch.randn(2, 1, 4)]
    weight, bias = torch.randn(6, 9), torch.randn(6)
    with pytest.raises(error, match=message):
        inputs, weight, bias, activation = make(inputs, weight, bias)
        ops.concat_linear(inputs, weight, bias, activation=activation)
