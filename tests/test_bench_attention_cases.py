"""The attention benchmark's variants (causal, windows, left padding, softcap, sinks) on small shapes:
every provider that runs here agrees with the case's reference, output and gradients (sinks' too), so a
GPU run does not find a mis-built baseline late, and each case is compared against the reference it names."""

import pytest
import torch

from mmkern.bench.runner import agreeing_providers, run_cases
from mmkern.bench.suite import ProviderOptions
from mmkern.bench.suites import cross_modal_attention as suite


def _variants() -> list:
    variants = {}
    for spec in (*suite.CPU.values(), *suite.CUDA.values()):
        variant = spec[8] if len(spec) > 8 else {}
        variants[repr(sorted(variant.items()))] = variant
    return list(variants.values())


@pytest.mark.parametrize("variant", _variants(), ids=lambda v: "-".join(sorted(v)) or "plain")
@pytest.mark.parametrize("fraction", [1.0, 0.7])
def test_every_provider_agrees_with_the_reference(variant, fraction):
    # Eight queries and at least 14 valid keys per sample: every row sees a key, so SDPA gives no NaN.
    case = suite.make_case("tiny", (3, 8, 40, 4, 2, 16, 12, fraction, variant), torch.float32)
    options = ProviderOptions(torch.device("cpu"), torch.float32, with_compile=False)
    providers = suite.make_providers(case, options)
    reference = case.params.get("reference", "sdpa")
    assert reference in providers and "mmkern" in providers and "eager" in providers
    args = case.make_args(torch.device("cpu"), torch.float32)
    refusals = []
    agreeing = agreeing_providers(
        "cross_modal_attention", case, providers, args, torch.float32, reference, True, refusals
    )
    assert not refusals and set(agreeing) == set(providers)


def test_a_case_is_compared_against_the_reference_it_names():
    cases = [
        suite.make_case(name, (2, 8, 16, 2, 2, 8, 8, 1.0, variant), torch.float32)
        for name, variant in (("softcap", suite.SOFTCAP), ("sinks", suite.SINKS))
    ]
    options = ProviderOptions(torch.device("cpu"), torch.float32, with_compile=False)
    records = run_cases(
        "cross_modal_attention",
        cases,
        lambda case: suite.make_providers(case, options),
        device=torch.device("cpu"),
        dtype=torch.float32,
        modes=("forward",),
        reference="sdpa",
        warmup=1,
        repeats=2,
        budget_s=0.01,
        rotate=False,
    )
    baselines = {r.case: r.baseline for r in records if r.provider == "mmkern"}
    assert baselines == {"softcap": "eager", "sinks": "sdpa"}
    assert not any(r.provider == "sdpa" for r in records if r.case == "softcap")


def test_visible_pairs_count_the_mask():
    lengths = suite.key_lengths(3, 40, 0.7)
    for variant in _variants():
        mask = suite.sdpa_mask(8, 40, lengths, variant, "cpu")
        expected = (
            suite.reference.visible_keys(
                8,
                40,
                torch.full((3,), 8),
                torch.tensor(lengths if not variant.get("left_padding") else [40] * 3),
                suite._window(variant),
                "cpu",
                suite.left_padding_mask(40, lengths, "cpu") if variant.get("left_padding") else None,
            )
            .expand(-1, -1, 8, -1)
            .sum()
        )
        assert suite.visible_pairs(8, 40, lengths, variant) == expected, variant
        if mask is not None:
            assert mask.expand(-1, -1, 8, -1).sum() == expected
