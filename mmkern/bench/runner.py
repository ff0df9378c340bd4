"""Runs an op's benchmark cases over providers and modes.

A case builds its arguments (fresh random tensors, never zeros); every floating tensor in them is a
leaf that requires grad, as in training. Before timing, each provider's forward output is compared
with the reference provider's, and a provider that disagrees is reported as wrong and not timed.
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch._inductor.config
import torch.utils._pytree as pytree

from mmkern.bench.records import Record
from mmkern.bench.timing import peak_memory_bytes, time_calls

MODES = ("forward", "backward", "forward+backward")

# Largest error relative to the output's scale that still counts as the same answer.
AGREEMENT = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass
class Case:
    name: str
    make_args: Callable[[torch.device, torch.dtype], tuple]
    forward_flops: float
    forward_bytes: float
    backward_flops: float
    backward_bytes: float
    params: dict = field(default_factory=dict)

    def work(self, mode: str) -> tuple:
        flops = {"forward": self.forward_flops, "backward": self.backward_flops,
                 "forward+backward": self.forward_flops + self.backward_flops}[mode]
        moved = {"forward": self.forward_bytes, "backward": self.backward_bytes,
                 "forward+backward": self.forward_bytes + self.backward_bytes}[mode]
        return flops, moved


def _mode_call(fn, args, leaves, mode):
    if mode == "forward":
        return lambda: fn(*args)
    out = fn(*args)
    grad = torch.randn_like(out)
    if mode == "backward":
        return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*args), leaves, grad)


def _disagreement(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().clamp_min(1e-6)
    return ((actual.float() - expected.float()).abs().max() / scale).item()


def _agreeing_providers(op, case, providers, args, dtype, reference) -> dict:
    """The providers whose forward output matches the reference's; the others are reported and left out."""
    expected = providers[reference](*args).detach()
    agreeing = {}
    for provider, fn in providers.items():
        try:
            actual = fn(*args).detach()
        except (RuntimeError, NotImplementedError) as refusal:  # e.g. an SDPA backend that rejects the case
            print(f"\n{op} {case.name}: provider {provider!r} cannot run this case "
                  f"({str(refusal).splitlines()[0][:160]}); not timed", file=sys.stderr)
            continue
        error = _disagreement(actual, expected)
        if error > AGREEMENT[dtype]:
            print(f"\n{op} {case.name}: provider {provider!r} disagrees with {reference!r} "
                  f"(relative error {error:.2e}); not timed", file=sys.stderr)
        else:
            agreeing[provider] = fn
    return agreeing


def _progress(total: int, description: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True)
    except ImportError:
        return None


def run_cases(op: str, cases: list, make_providers: Callable[[Case], dict], *, device: torch.device,
              dtype: torch.dtype, modes=MODES, reference: str = "eager", warmup: int = 2, repeats: int = 20,
              budget_s: float = 2.0) -> list:
    """Times every (case, provider, mode), the providers of one (case, mode) interleaved, and
    measures each one's peak memory; returns Records, with speedups against ``reference``."""
    # Inductor otherwise compiles in a pool of worker processes that keep warming up in the
    # background, taking cores from whatever is timed next.
    torch._inductor.config.compile_threads = 1
    records = []
    bar = _progress(len(cases), op)
    for case in cases:
        args = case.make_args(device, dtype)
        leaves = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.requires_grad]
        providers = _agreeing_providers(op, case, make_providers(case), args, dtype, reference)
        for mode in modes:
            if bar is not None:
                bar.set_postfix_str(f"{case.name} {mode}")
            calls = {provider: _mode_call(fn, args, leaves, mode) for provider, fn in providers.items()}
            timings = time_calls(calls, device, warmup=warmup, repeats=repeats, budget_s=budget_s)
            flops, moved = case.work(mode)
            for provider, call in calls.items():
                stats = timings[provider]
                seconds = stats.median_ms / 1e3
                records.append(Record(
                    op=op, case=case.name, provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""),
                    median_ms=stats.median_ms, p20_ms=stats.p20_ms, p80_ms=stats.p80_ms, min_ms=stats.min_ms,
                    repeats=stats.repeats, tflops=flops / seconds / 1e12 if flops else None,
                    gbps=moved / seconds / 1e9 if moved else None,
                    peak_memory_mb=peak_memory_bytes(call, device) / 2**20, params=case.params,
                ))
            del calls  # frees retained backward graphs before the next case allocates
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    baseline = {(r.case, r.mode): r.median_ms for r in records if r.provider == reference}
    for r in records:
        if (r.case, r.mode) in baseline:
            r.speedup, r.baseline = baseline[(r.case, r.mode)] / r.median_ms, reference
    return records
