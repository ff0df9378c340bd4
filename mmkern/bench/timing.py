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
    graphed: bool = False  # timed as CUDA-graph replays (a call too short for launch overhead to hide)

    @classmethod
    def of(cls, samples_ms: list, graphed: bool = False) -> "TimingStats":
        quantiles = statistics.quantiles(samples_ms, n=5, method="inclusive") if len(samples_ms) > 1 else samples_ms * 4
        return cls(statistics.median(samples_ms), quantiles[0], quantiles[3], min(samples_ms), len(samples_ms),
                   graphed)


# Calls shorter than this on a GPU are timed as CUDA-graph replays: at a few microseconds, the host's
# launch overhead, not the kernel, would be what events measure.
GRAPH_BELOW_MS = 0.05
# Calls captured in one graph, so that one replay's own launch is spread thin.
GRAPH_CALLS = 20


class _Rotation:
    """One call a sample: each takes the next of the steps (the same work on separate copies of the
    inputs), so that no call finds its inputs still in cache from the one before."""

    def __init__(self, steps: list):
        self.steps, self.next = steps, 0
        self.calls_per_sample = 1

    def __call__(self):
        step = self.steps[self.next]
        self.next = (self.next + 1) % len(self.steps)
        return step()


class _GraphReplay:
    """GRAPH_CALLS rotated calls captured in one CUDA graph; a sample is one replay."""

    def __init__(self, rotation: _Rotation, device: torch.device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # capture needs its warm-up (cuBLAS handles, autograd) off the default stream
            for _ in range(len(rotation.steps)):
                rotation()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(GRAPH_CALLS):
                rotation()
        self.calls_per_sample = GRAPH_CALLS

    def __call__(self):
        self.graph.replay()


def _time_one(fn, device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / fn.calls_per_sample
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def _graphed_if_short(name: str, rotation: _Rotation, device: torch.device, graphable: bool):
    if device.type != "cuda" or not graphable:
        return rotation
    if statistics.median(_time_one(rotation, device) for _ in range(5)) >= GRAPH_BELOW_MS:
        return rotation
    try:
        return _GraphReplay(rotation, device)
    except RuntimeError as refusal:  # a host sync or a CPU-side check in the call: events it is
        torch.cuda.synchronize(device)
        print(f"\n{name}: short, but cannot be captured in a CUDA graph ({str(refusal).splitlines()[0][:120]}); "
              "timed with events", file=sys.stderr)
        return rotation


def time_calls(calls: dict, device: torch.device, *, warmup: int, repeats: int, budget_s: float,
               graphable: bool = True) -> dict:
    """Times each of ``calls`` (name: list of steps, the same work on separate copies of the inputs;
    each sample runs the next step) ``repeats`` times after ``warmup`` rounds, in interleaved rounds,
    so that drift in the machine's speed (clocks, neighbours, thermals) lands on every call alike
    instead of on whichever ran last. Stops early, after 3 rounds, once ``budget_s`` per call is
    spent. CUDA calls are timed with events on the current stream, and those under GRAPH_BELOW_MS as
    CUDA-graph replays where ``graphable`` and the call can be captured."""
    rotations = {name: _Rotation(steps) for name, steps in calls.items()}
    for rotation in rotations.values():
        for _ in range(warmup * len(rotation.steps)):
            rotation()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timed = {name: _graphed_if_short(name, rotation, device, graphable) for name, rotation in rotations.items()}
    samples = {name: [] for name in calls}
    start = time.perf_counter()
    for round_index in range(repeats):
        for name, fn in timed.items():
            samples[name].append(_time_one(fn, device))
        if round_index >= 2 and time.perf_counter() - start > budget_s * len(calls):
            break
    return {name: TimingStats.of(times, isinstance(timed[name], _GraphReplay)) for name, times in samples.items()}


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
