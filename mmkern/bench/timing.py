"""Wall time and peak memory of one call, on CUDA or CPU."""

import contextlib
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class TimingStats:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    repeats: int

    @classmethod
    def of(cls, samples_ms: list) -> "TimingStats":
        quantiles = statistics.quantiles(samples_ms, n=5, method="inclusive") if len(samples_ms) > 1 else samples_ms * 4
        return cls(statistics.median(samples_ms), quantiles[0], quantiles[3], min(samples_ms), len(samples_ms))


def _time_one(fn, device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def time_calls(calls: dict, device: torch.device, *, warmup: int, repeats: int, budget_s: float) -> dict:
    """Times each of ``calls`` (name: fn) ``repeats`` times after ``warmup`` calls, in interleaved
    rounds, so that drift in the machine's speed (clocks, neighbours, thermals) lands on every
    call alike instead of on whichever ran last. Stops early, after 3 rounds, once ``budget_s`` per
    call is spent. CUDA calls are timed with events on the current stream."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples = {name: [] for name in calls}
    start = time.perf_counter()
    for round_index in range(repeats):
        for name, fn in calls.items():
            samples[name].append(_time_one(fn, device))
        if round_index >= 2 and time.perf_counter() - start > budget_s * len(calls):
            break
    return {name: TimingStats.of(times) for name, times in samples.items()}


@contextlib.contextmanager
def _quiet_stderr():
    # Kineto prints a line to fd 2 at every profiler start and stop, with no setting to turn it
    # off; silence just those two calls, never the timed function.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profiled_cpu_peak(fn) -> int:
    # With profile_memory, torch's CPU allocator reports each allocation made during the profile with
    # its running total of live bytes, so the largest total is the call's peak, temporaries inside
    # C++ kernels included.
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    peak, pending = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation:
            peak = max(peak, event.extra_fields.total_allocated)
        pending.extend(event.children)
    return peak


def peak_memory_bytes(fn, device: torch.device) -> int:
    """Peak memory that one call of ``fn`` allocates above what was in use before it: the CUDA
    caching allocator's peak on GPU, the CPU allocator's as the profiler sees it on CPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _profiled_cpu_peak(fn)
