"""One list of activations (mmkern/activations.py): the C++ CPU kernels' list (csrc/cpu/concat_plan.h)
and the Triton epilogue's named codes must equal it, in order, so a new activation added in one
place and not the others fails here rather than as a wrong answer."""

import re

import pytest
import torch

from mmkern import _config, ops, reference
from mmkern.activations import ACTIVATION_CODES, ACTIVATIONS, SMOOTH_ACTIVATIONS, activation_forward

cpp_only = pytest.mark.skipif(
    _config.TRITON_ON_CPU, reason="the interpreter switch puts Triton's kernels in C++'s place"
)


def _cpp_concat_linear(activation):
    """(x, weight, (out, activation_saved)) of the C++ kernel for one small input."""
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 4, generator=generator), torch.randn(5, 4, generator=generator)
    return x, weight, torch.ops.mmkern.concat_linear([x], weight, None, activation)


@cpp_only
def test_the_cpp_kernels_list_the_same_activations_in_the_same_order():
    with pytest.raises(RuntimeError, match="unknown activation 'tanh'") as refused:
        _cpp_concat_linear("tanh")
    listed = re.search(r"expected one of: ([\w, ]+)", str(refused.value)).group(1)
    assert tuple(listed.split(", ")) == ACTIVATIONS


@cpp_only
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_cpp_kernels_save_the_pre_activation_of_the_smooth_ones_alone(activation):
    x, weight, (out, saved) = _cpp_concat_linear(activation)
    assert (saved.numel() > 0) == (activation in SMOOTH_ACTIVATIONS)
    torch.testing.assert_close(out, activation_forward(x @ weight.t(), activation))


def test_the_triton_epilogue_names_each_code_of_the_list():
    segmented_matmul = pytest.importorskip("mmkern.kernels.segmented_matmul")
    assert ACTIVATION_CODES == {name: code for code, name in enumerate(ACTIVATIONS)}
    for name in ACTIVATIONS[1:]:
        assert getattr(segmented_matmul, name.upper()).value == ACTIVATION_CODES[name]


def test_the_reference_and_the_public_ops_take_the_list():
    z = torch.linspace(-3, 3, 7, dtype=torch.float64)
    for activation in ACTIVATIONS:
        out = reference.concat_linear([z[:, None]], torch.ones(1, 1, dtype=torch.float64), activation=activation)
        torch.testing.assert_close(out[:, 0], activation_forward(z, activation))
    with pytest.raises(ValueError, match="activation"):
        ops.concat_linear([z[:, None]], torch.ones(1, 1, dtype=torch.float64), activation="tanh")
