"""Runs an op's benchmark cases over providers and modes.

A case builds its arguments (fresh random tensors, never zeros); every floating tensor in them is a
leaf that requires grad, as in training. It builds several copies, with different values, where one
is small enough to stay in the last-level cache between calls, and the timed calls take them in
turn. Before timing, each provider's output (and, when a mode has a backward, its gradients) is
compared with the reference provider's, and a provider that disagrees is reported as wrong and not
timed.
"""

import math
import os
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
    make_args: Callable  # (device, dtype, seed=0) -> the provider's positional arguments
    forward_flops: float
    forward_bytes: float
    backward_flops: float
    backward_bytes: float
    params: dict = field(default_factory=dict)

    def work(self, mode: str) -> tuple:
        flops = {
            "forward": self.forward_flops,
            "backward": self.backward_flops,
            "forward+backward": self.forward_flops + self.backward_flops,
        }[mode]
        moved = {
            "forward": self.forward_bytes,
            "backward": self.backward_bytes,
            "forward+backward": self.forward_bytes + self.backward_bytes,
        }[mode]
        return flops, moved


def _leaves(args) -> list:
    return [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.requires_grad]


def mode_steps(fn, arg_sets, mode) -> list:
    """One step per copy of the arguments; a backward step replays the graph its forward left."""
    steps = []
    for args in arg_sets:
        leaves = _leaves(args)
        if mode == "forward":
            steps.append(lambda args=args: fn(*args))
            continue
        out = fn(*args)
        grad = torch.randn_like(out)
        if mode == "backward":
            steps.append(
                lambda out=out, grad=grad, leaves=leaves: torch.autograd.grad(out, leaves, grad, retain_graph=True)
            )
        else:
            del out
            steps.append(lambda args=args, grad=grad, leaves=leaves: torch.autograd.grad(fn(*args), leaves, grad))
    return steps


MAX_COPIES = 32


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    cache_dir = "/sys/devices/system/cpu/cpu0/cache"
    for index in os.listdir(cache_dir) if os.path.isdir(cache_dir) else []:
        try:
            with open(os.path.join(cache_dir, index, "size")) as handle:
                text = handle.read().strip()
            sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError, KeyError):
            continue
    return max(sizes, default=32 * 2**20)


def input_copies(args, device: torch.device) -> int:
    """How many copies of the inputs fill twice the last-level cache (at most MAX_COPIES)."""
    tensors = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return max(1, min(MAX_COPIES, math.ceil(2 * last_level_cache_bytes(device) / max(nbytes, 1))))


def _disagreement(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        return math.inf
    scale = expected.abs().max().clamp_min(1e-6)
    return ((actual.float() - expected.float()).abs().max() / scale).item()


def _results(fn, args, with_grads: bool, grad_out=None) -> tuple:
    """The output, and the gradients of every leaf for ``grad_out`` (random if not given) when asked."""
    out = fn(*args)
    if not with_grads:
        return [out.detach()], None
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    return [out.detach(), *torch.autograd.grad(out, _leaves(args), grad_out, allow_unused=True)], grad_out


def agreeing_providers(op, case, providers, args, dtype, reference, with_grads, refusals) -> dict:
    """The providers whose output (and gradients) match the reference's; the others are reported (and
    appended to ``refusals`` as dicts) and left out."""
    expected, grad_out = _results(providers[reference], args, with_grads)
    agreeing = {}
    for provider, fn in providers.items():
        try:
            actual, _ = _results(fn, args, with_grads, grad_out)
        except (RuntimeError, NotImplementedError, ValueError) as refusal:  # e.g. an SDPA backend that rejects the case
            reason = f"cannot run this case ({str(refusal).splitlines()[0][:160]})"
            refusals.append({"op": op, "case": case.name, "provider": provider, "reason": reason})
            print(f"\n{op} {case.name}: provider {provider!r} {reason}; not timed", file=sys.stderr)
            continue
        names = ["output"] + [f"gradient {i}" for i in range(len(actual) - 1)]
        errors = [
            (name, math.inf if (a is None) != (e is None) else 0.0 if a is None else _disagreement(a, e))
            for name, a, e in zip(names, actual, expected)
        ]
        name, error = max(errors, key=lambda item: item[1])
        if error > AGREEMENT[dtype]:
            reason = f"disagrees with {reference!r} ({name}: relative error {error:.2e})"
            refusals.append({"op": op, "case": case.name, "provider": provider, "reason": reason})
            print(f"\n{op} {case.name}: provider {provider!r} {reason}; not timed", file=sys.stderr)
        else:
            agreeing[provider] = fn
    return agreeing


def _progress(total: int, description: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True)
    except ImportError:
        return None


def run_cases(
    op: str,
    cases: list,
    make_providers: Callable[[Case], dict],
    *,
    device: torch.device,
    dtype: torch.dtype,
    modes=MODES,
    reference: str = "eager",
    only=None,
    warmup: int = 2,
    repeats: int = 20,
    budget_s: float = 2.0,
    rotate: bool = True,
    refusals=None,
) -> list:
    """Times every (case, provider, mode), the providers of one (case, mode) interleaved, and
    measures each one's peak memory; returns Records, with speedups against ``reference``.
    ``only``: the provider names to time (the reference still runs, to check them against). A case
    whose params name a "reference" (a case the usual one cannot run) is checked and compared against it.
    ``refusals``: a list that gets the providers left out, and why."""
    refusals = [] if refusals is None else refusals
    # Inductor otherwise compiles in a pool of worker processes that keep warming up in the
    # background, taking cores from whatever is timed next.
    torch._inductor.config.compile_threads = 1
    records = []
    bar = _progress(len(cases), op)
    for case in cases:
        first = case.make_args(device, dtype)
        copies = input_copies(first, device) if rotate else 1
        arg_sets = [first] + [case.make_args(device, dtype, seed=seed) for seed in range(1, copies)]
        case_reference = case.params.get("reference", reference)
        providers = {
            name: fn
            for name, fn in make_providers(case).items()
            if only is None or name in only or name == case_reference
        }
        providers = agreeing_providers(
            op, case, providers, first, dtype, case_reference, any(m != "forward" for m in modes), refusals
        )
        providers = {name: fn for name, fn in providers.items() if only is None or name in only}
        for mode in modes:
            if bar is not None:
                bar.set_postfix_str(f"{case.name} {mode}")
            calls = {provider: mode_steps(fn, arg_sets, mode) for provider, fn in providers.items()}
            # A backward alone replays a graph recorded outside the capture stream: never graphed.
            timings = time_calls(
                calls, device, warmup=warmup, repeats=repeats, budget_s=budget_s, graphable=mode != "backward"
            )
            flops, moved = case.work(mode)
            for provider, steps in calls.items():
                stats = timings[provider]
                seconds = stats.median_ms / 1e3
                records.append(
                    Record(
                        op=op,
                        case=case.name,
                        provider=provider,
                        mode=mode,
                        dtype=str(dtype).replace("torch.", ""),
                        median_ms=stats.median_ms,
                        p20_ms=stats.p20_ms,
                        p80_ms=stats.p80_ms,
                        min_ms=stats.min_ms,
                        repeats=stats.repeats,
                        tflops=flops / seconds / 1e12 if flops else None,
                        gbps=moved / seconds / 1e9 if moved else None,
                        peak_memory_mb=peak_memory_bytes(steps[0], device) / 2**20,
                        timing=stats.method,
                        host_ms=stats.host_ms,
                        input_copies=len(arg_sets),
                        params=case.params,
                    )
                )
            del calls  # frees retained backward graphs before the next case allocates
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    references = {case.name: case.params.get("reference", reference) for case in cases}
    baseline = {(r.case, r.mode): r.median_ms for r in records if r.provider == references[r.case]}
    for r in records:
        if (r.case, r.mode) in baseline:
            r.speedup, r.baseline = baseline[(r.case, r.mode)] / r.median_ms, references[r.case]
    return records
