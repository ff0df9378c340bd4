"""Property-based tests: hypothesis draws shapes, broadcast patterns, lengths, head counts, views and
dtypes for every op, and each draw is checked against the eager reference in float64 by the same
checks (and tolerances) as the op's own tests.

How many draws: the `ci` profile (the default) runs a few hundred per op on the C++ CPU kernels and
a few dozen through Triton's interpreter, the same ones on every run; `make fuzz` runs the `long`
profile, 1000 new ones per op, and saves a failing draw in .hypothesis/ to replay first on the next
run. Hypothesis also prints a `@reproduce_failure` line that replays a failing draw anywhere.

Every draw runs with poisoned memory (the ``poisoned_memory`` fixture: buffers from ``empty`` start as
NaN), so a shape or length that leaves an output or gradient element unwritten fails on every run.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmkern import _config, ops, reference
from tests.numerics import DEVICES, INTERPRETER_DTYPES, assert_close_to_reference, dtypes_for
from tests.test_concat_linear import check_against_reference as check_concat_linear
from tests.test_cross_modal_attention import check_against_reference as check_attention
from tests.test_quantize_per_token import assert_same_quantization
from tests.test_quantized_concat_linear import check_case as check_quantized_concat_linear

EXAMPLES = {"ci": 40 if _config.TRITON_ON_CPU else 300, "long": 1000}
for name, examples in EXAMPLES.items():
    # The ci profile draws the same examples on every run, so that CI passes or fails on the code, not
    # on the draw; the long one draws new ones each time, to find what ci's do not.
    settings.register_profile(
        name,
        max_examples=examples,
        derandomize=name == "ci",
        deadline=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            # poisoned_memory is a mode that holds for every draw
            HealthCheck.function_scoped_fixture,
        ],
    )
settings.load_profile(os.environ.get("MMKERN_HYPOTHESIS_PROFILE", "ci"))

ACTIVATIONS = ["none", "relu", "gelu", "gelu_tanh", "silu"]
seeds = st.integers(0, 2**31 - 1)


@st.composite
def concat_linear_cases(draw):
    """1 to 5 segments whose leading shapes broadcast to one of rank 0 to 3 (each segment keeps or
    drops each dim, or has a lower rank), widths 0 to 40, 1 to 40 output features."""
    lead = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
    shapes = []
    for _ in range(draw(st.integers(1, 5))):
        rank = draw(st.integers(0, len(lead)))
        own = [size if draw(st.booleans()) else 1 for size in lead[len(lead) - rank :]]
        shapes.append((*own, draw(st.integers(0, 40))))
    # The leading shapes must broadcast to `lead` itself: one segment carries it whole.
    shapes[draw(st.integers(0, len(shapes) - 1))] = (*lead, draw(st.integers(1, 40)))
    return shapes, draw(st.integers(1, 40)), draw(st.booleans()), draw(st.sampled_from(ACTIVATIONS))


@pytest.mark.parametrize("device", DEVICES)
@given(case=concat_linear_cases(), dtype_index=st.integers(0, 3), seed=seeds)
def test_concat_linear(device, case, dtype_index, seed, poisoned_memory):
    dtypes = dtypes_for(device)
    check_concat_linear(*case, dtypes[dtype_index % len(dtypes)], device, seed=seed)


@st.composite
def attention_cases(draw):
    """Batch 1 to 3, 1 to 20 queries over 0 to 300 keys (past 256, the GPU's split-KV path), 1 to 3 kv
    heads with groups of 1 to 3, head dims 1 to 72, per-sample lengths (0 and 1 included) or none."""
    batch, q_len, k_len = draw(st.integers(1, 3)), draw(st.integers(1, 20)), draw(st.integers(0, 300))
    kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    head_dim, v_dim = draw(st.integers(1, 72)), draw(st.integers(1, 72))
    lengths = st.one_of(st.none(), st.lists(st.integers(0, k_len), min_size=batch, max_size=batch))
    kv_lens = draw(lengths)
    q_lens = draw(st.one_of(st.none(), st.lists(st.integers(0, q_len), min_size=batch, max_size=batch)))
    return batch, q_len, k_len, kv_heads * group, kv_heads, head_dim, v_dim, kv_lens, q_lens


@pytest.mark.parametrize("device", DEVICES)
@given(case=attention_cases(), dtype_index=st.integers(0, 3), seed=seeds)
def test_cross_modal_attention(device, case, dtype_index, seed, poisoned_memory):
    dtypes = dtypes_for(device)
    check_attention(case, dtypes[dtype_index % len(dtypes)], device, seed=seed)


@st.composite
def attention_variants(draw):
    """causal and window drawn over an attention case: either side of the window -1 (unbounded) to 30,
    causal with right -1 or 0."""
    causal = draw(st.booleans())
    left = draw(st.integers(-1, 30))
    right = draw(st.integers(-1, 0)) if causal else draw(st.integers(-1, 30))
    return {"causal": causal, "window": draw(st.one_of(st.none(), st.just((left, right))))}


@pytest.mark.parametrize("device", DEVICES)
@given(case=attention_cases(), variant=attention_variants(), dtype_index=st.integers(0, 3), seed=seeds)
def test_cross_modal_attention_variants(device, case, variant, dtype_index, seed, poisoned_memory):
    dtypes = dtypes_for(device)
    check_attention(case, dtypes[dtype_index % len(dtypes)], device, seed=seed, **variant)


@pytest.mark.parametrize("device", DEVICES)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=2).map(tuple),
    width=st.integers(0, 300),
    qdtype=st.sampled_from([torch.int8, torch.float8_e4m3fn]),
    dtype_index=st.integers(0, 2),
    scale_exponent=st.integers(-20, 10),
    seed=seeds,
)
def test_quantize_per_token(device, shape, width, qdtype, dtype_index, scale_exponent, seed, poisoned_memory):
    dtype = (torch.float32, torch.float16, torch.bfloat16)[dtype_index]
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn((*shape, width), generator=generator) * 2.0**scale_exponent).to(device, dtype)
    assert_same_quantization(ops.quantize_per_token(x, qdtype), reference.quantize_per_token(x, qdtype))


@pytest.mark.parametrize("device", DEVICES)
@given(case=concat_linear_cases(), seed=seeds)
def test_quantized_concat_linear(device, case, seed, poisoned_memory):
    shapes, out_features, with_bias, activation = case
    check_quantized_concat_linear(shapes, out_features, with_bias, activation, device, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
@given(
    shape=st.lists(st.integers(0, 7), min_size=1, max_size=3).map(tuple),
    count=st.integers(1, 6),
    gated=st.booleans(),
    qdtype=st.sampled_from([torch.int8, torch.float8_e4m3fn]),
    out_dtype=st.sampled_from(INTERPRETER_DTYPES[1:]),
    seed=seeds,
)
def test_quantized_fusion(device, shape, count, gated, qdtype, out_dtype, seed, poisoned_memory):
    generator = torch.Generator().manual_seed(seed)
    count = 2 if gated else count
    pairs = [
        reference.quantize_per_token(torch.randn(shape, generator=generator).to(device), qdtype) for _ in range(count)
    ]
    inputs_q, scales = [q for q, _ in pairs], [s for _, s in pairs]
    kwargs = (
        dict(mode="gated", gate=torch.randn(shape, generator=generator).to(device))
        if gated
        else dict(weights=torch.randn(count, generator=generator).to(device))
    )
    actual = ops.quantized_fusion(inputs_q, scales, out_dtype=out_dtype, **kwargs)
    exact = reference.quantized_fusion(inputs_q, scales, out_dtype=torch.float64, compute_dtype=torch.float64, **kwargs)
    eager = reference.quantized_fusion(inputs_q, scales, out_dtype=out_dtype, **kwargs)
    assert_close_to_reference(actual, exact, eager, f"quantized_fusion ({out_dtype})", terms=count)
