"""The suite's cases for pytest-benchmark users: ``pytest benchmarks/ --benchmark-only``.

The same cases, providers, modes and correctness check as ``mmkern bench`` (the preset in
MMKERN_BENCH_PRESET, default quick, on CUDA where there is a GPU); pytest-benchmark does the timing,
with the device synchronised inside the timed function so that it times the work, not its launch.
A provider that disagrees with the op's reference fails; one that cannot run a case is skipped.
"""

import functools
import os

import pytest
import torch

from mmkern.bench.command import QUICK_MODES
from mmkern.bench.runner import agreeing_providers, mode_steps
from mmkern.bench.suite import ProviderOptions, default_dtypes, suites

PRESET = os.environ.get("MMKERN_BENCH_PRESET", "quick")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Entry:
    """One (op, case, dtype): its inputs and providers, built once and checked once."""

    def __init__(self, suite, name, spec, dtype):
        self.suite, self.dtype = suite, dtype
        self.case = suite.make_case(name, spec, dtype)
        self.args = self.case.make_args(DEVICE, dtype)
        self.options = ProviderOptions(DEVICE, dtype)
        self.providers = suite.make_providers(self.case, self.options)
        self.modes = [m for m in suite.modes if PRESET != "quick" or m in QUICK_MODES]

    @functools.cached_property
    def checked(self) -> tuple:
        refusals = []
        agreeing = agreeing_providers(
            self.suite.op,
            self.case,
            self.providers,
            self.args,
            self.dtype,
            self.suite.reference,
            any(m != "forward" for m in self.modes),
            refusals,
        )
        return agreeing, {r["provider"]: r["reason"] for r in refusals}


def _entries():
    for suite in suites():
        if PRESET not in suite.presets:
            continue
        for dtype in default_dtypes(PRESET, DEVICE):
            for name, spec in suite.cases(PRESET, DEVICE.type).items():
                yield Entry(suite, name, spec, dtype)


def _params():
    for entry in _entries():
        dtype = str(entry.dtype).replace("torch.", "")
        for mode in entry.modes:
            for provider in entry.providers:
                yield pytest.param(
                    entry, mode, provider, id=f"{entry.suite.op}-{entry.case.name}-{dtype}-{mode}-{provider}"
                )


def _synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("entry,mode,provider", list(_params()))
def test_benchmark(benchmark, entry, mode, provider):
    agreeing, refusals = entry.checked
    if provider not in agreeing:
        reason = refusals[provider]
        if reason.startswith("disagrees"):
            pytest.fail(f"{provider} {reason}")
        pytest.skip(f"{provider} {reason}")
    step = mode_steps(agreeing[provider], [entry.args], mode)[0]
    benchmark.group = f"{entry.suite.op} {entry.case.name} {mode}"
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(entry.dtype), reference=entry.suite.reference)

    def timed():
        step()
        _synchronize()

    benchmark(timed)
