"""What one op's benchmark is: its cases for each preset and device, its providers, its modes, and
the provider the others are checked and compared against. ``suites()`` lists every op's."""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

PRESETS = ("quick", "full", "models")

# The modules under mmkern.bench.suites, each with a SUITES list, in the order a run goes through them.
_SUITE_MODULES = ("concat_linear", "cross_modal_attention", "quantized", "models")


@dataclass
class ProviderOptions:
    device: torch.device
    dtype: torch.dtype
    with_compile: bool = True
    notes: set = field(default_factory=set)  # why a provider is left out, printed once under the table


@dataclass(frozen=True)
class Suite:
    op: str
    reference: str  # every provider's output is checked against it, and speedups are over it
    modes: tuple  # the modes the op has (quantized features carry no gradient: forward only)
    presets: tuple  # the presets that run it
    # (preset, device type) -> {case name: spec}; make_case(name, spec, dtype) -> Case
    cases: Callable[[str, str], dict]
    make_case: Callable
    make_providers: Callable  # (case, ProviderOptions) -> {provider name: fn(*case args)}
    compute: str | None = None  # the dtype its FLOPs run in where not the run's ("int8": an int8 GEMM)


def cases_by_preset(quick_cpu: dict, cpu: dict, cuda: dict, quick_cuda: tuple):
    """A Suite's ``cases``: ``full`` takes every case of the device, ``quick`` a few (on CUDA, the named
    ones of ``cuda``)."""

    def cases(preset: str, device_type: str) -> dict:
        if device_type == "cuda":
            return cuda if preset == "full" else {n: cuda[n] for n in quick_cuda}
        return cpu if preset == "full" else quick_cpu

    return cases


def suites() -> list:
    suites = []
    for module in _SUITE_MODULES:
        suites.extend(importlib.import_module(f"mmkern.bench.suites.{module}").SUITES)
    return suites


def default_dtypes(preset: str, device: torch.device) -> tuple:
    """quick and models time the dtype models train in there; full times every dtype the device runs fast."""
    if device.type == "cuda":
        return (torch.bfloat16, torch.float16, torch.float32) if preset == "full" else (torch.bfloat16,)
    return (torch.float32, torch.bfloat16) if preset == "full" else (torch.float32,)
