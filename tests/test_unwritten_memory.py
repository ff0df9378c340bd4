"""Every element of every output and gradient of every op and module is written on every path: samples
with no valid key or query, rows past q_lens, packed rows that no sample owns, empty batches, no query
rows, zero-width segments, gradients not asked for, dropout, the modules' masks and lengths.

The tests below that reach those paths run again here with poisoned memory (the ``poisoned_memory``
fixture): every buffer ``empty`` allocates starts as NaN, so an element that a path leaves unwritten
fails the test's comparison with the reference on every run. Without the poison it would hold whatever
the allocator last held: a test that passes on a fresh page and fails now and then on a reused one.
Through Triton's interpreter (``make test-interpreter``) the same list runs the Triton kernels'
launchers and buffers; on a GPU, the CUDA ones too.
"""

import itertools

import pytest

from tests import (
    test_concat_linear,
    test_cross_modal_attention,
    test_nn_concat_linear,
    test_nn_cross_modal_attention,
    test_nn_gated_fusion,
    test_nn_quantized,
    test_quantize_per_token,
    test_quantized_concat_linear,
    test_quantized_fusion,
    test_swap,
)

# Each test runs with every combination of its own parameters, or of those given beside it.
POISONED_RERUNS = [
    (test_cross_modal_attention.test_matches_reference, {}),
    (test_cross_modal_attention.test_no_valid_key_or_query_gives_zeros_and_zero_gradients, {}),
    (test_cross_modal_attention.test_dropout_is_the_reference_mask_for_the_generators_seed, {}),
    (test_cross_modal_attention.test_packed_equals_padded, {}),
    (test_cross_modal_attention.test_packed_matches_reference_in_every_dtype, {}),
    (test_concat_linear.test_matches_reference, {}),
    (test_concat_linear.test_every_activation_and_dtype, {}),
    (test_concat_linear.test_gradient_only_for_what_needs_it, {}),
    (test_quantized_concat_linear.test_matches_reference, {}),
    (test_quantized_concat_linear.test_straight_through_gradients, {}),
    (test_quantized_concat_linear.test_bias_gradient, {}),
    (test_quantize_per_token.test_matches_reference_bit_for_bit, {"kind": ["random", "zero_rows"]}),
    (test_quantize_per_token.test_zero_rows_get_a_finite_scale_and_dequantize_to_zero, {}),
    (test_quantize_per_token.test_fake_quantize_gradient_is_straight_through, {}),
    (test_quantized_fusion.test_sum_matches_reference, {"count": [1, 6]}),
    (test_quantized_fusion.test_gated_matches_reference, {}),
    (test_quantized_fusion.test_gradients_of_weights_and_gate, {}),
    (test_nn_cross_modal_attention.test_a_sample_with_every_key_masked_gets_the_bias_alone, {}),
    (test_nn_cross_modal_attention.test_lengths_equal_the_padding_mask_they_stand_for, {}),
    (test_nn_cross_modal_attention.test_a_mask_that_is_not_right_padding_is_exact, {}),
    (test_nn_cross_modal_attention.test_weights_attn_mask_and_float_padding_give_torchs_answer, {}),
    (test_nn_cross_modal_attention.test_grouped_query_attention, {}),
    (test_nn_concat_linear.test_from_linear_equals_linear_over_the_concat, {}),
    (test_nn_gated_fusion.test_gated_fusion_matches_the_unit, {}),
    (test_nn_quantized.test_training_gives_straight_through_gradients, {}),
    (test_nn_quantized.test_sum_fusion_learns_its_weights, {}),
    (test_nn_quantized.test_gated_fusion_with_its_gate_projection, {}),
    (test_swap.test_swapped_transformer_equals_the_original, {}),
]


def _parameters(test) -> dict:
    """A test's own @pytest.mark.parametrize values, by argument name."""
    values = {}
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            names, argvalues = mark.args[0], list(mark.args[1])
            values[names] = argvalues
    return values


def _reruns():
    for test, narrowed in POISONED_RERUNS:
        values = {**_parameters(test), **narrowed}
        for combination in itertools.product(*values.values()):
            kwargs = {}
            for names, value in zip(values, combination):
                names = [name.strip() for name in names.split(",")]
                kwargs.update(zip(names, value if len(names) > 1 else [value]))
            label = ",".join(str(value) for value in kwargs.values())
            yield pytest.param(test, kwargs, id=f"{test.__module__.split('.')[-1]}.{test.__name__}[{label}]")


@pytest.mark.parametrize("test, kwargs", list(_reruns()))
def test_passes_with_poisoned_memory(test, kwargs, poisoned_memory):
    test(**kwargs)
