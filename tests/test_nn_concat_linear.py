import pytest
import torch
from torch import nn

from mmkern.nn import ConcatLinear
from tests.numerics import DEVICES, skip_unless_float64_runs_on


@pytest.mark.parametrize("device", DEVICES)
def test_from_linear_equals_linear_over_the_concat(device):
    skip_unless_float64_runs_on(device)
    torch.manual_seed(0)
    linear = nn.Linear(64 + 40, 33, device=device, dtype=torch.float64)
    text, image = (
        torch.randn(3, 7, 64, device=device, dtype=torch.float64),
        torch.randn(3, 7, 40, device=device, dtype=torch.float64),
    )
    fused = ConcatLinear.from_linear(linear, [64, 40])
    assert fused.weight is linear.weight and fused.bias is linear.bias
    torch.testing.assert_close(fused(text, image), linear(torch.cat([text, image], -1)))

    fused(text, image).square().sum().backward()
    fused_grads = [linear.weight.grad.clone(), linear.bias.grad.clone()]
    linear.zero_grad()
    linear(torch.cat([text, image], -1)).square().sum().backward()
    torch.testing.assert_close(fused_grads, [linear.weight.grad, linear.bias.grad])


def test_pooled_vector_broadcasts_like_an_expanded_concat():
    skip_unless_float64_runs_on("cpu")
    torch.manual_seed(0)
    module = ConcatLinear([16, 8], 12, activation="gelu", dtype=torch.float64)
    tokens, pooled = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 1, 8, dtype=torch.float64)
    expected = nn.functional.gelu(
        nn.functional.linear(torch.cat([tokens, pooled.expand(2, 5, 8)], -1), module.weight, module.bias)
    )
    torch.testing.assert_close(module(tokens, pooled), expected)


def test_parameters_and_state_dict_match_linear():
    torch.manual_seed(0)
    module = ConcatLinear([5, 6], 4, bias=False)
    assert [name for name, _ in module.named_parameters()] == ["weight"]
    linear = nn.Linear(11, 4, bias=False)
    linear.load_state_dict(module.state_dict())
    torch.testing.assert_close(linear.weight, module.weight)
    bound = 1 / 11**0.5
    assert module.weight.abs().max() <= bound  # nn.Linear's init over the full fan-in
    assert "in_features=(5, 6)" in repr(module)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: ConcatLinear([], 4), ValueError, "in_features"),
        (lambda: ConcatLinear([3], 4, activation="tanh"), ValueError, "activation"),
        (lambda: ConcatLinear.from_linear(nn.Linear(5, 2), [2, 2]), ValueError, "sum to 4"),
        (lambda: ConcatLinear.from_linear(nn.Conv1d(1, 1, 1), [1]), TypeError, "nn.Linear"),
        (lambda: ConcatLinear([3, 2], 4)(torch.randn(1, 3)), ValueError, "expected 2 inputs"),
        (
            lambda: ConcatLinear([3, 2], 4)(torch.randn(1, 3), torch.randn(1, 5)),
            ValueError,
            r"inputs\[1\] must have last dim",
        ),
    ],
)
def test_bad_arguments_are_named(make, error, message):
    with pytest.raises(error, match=message):
        make()
