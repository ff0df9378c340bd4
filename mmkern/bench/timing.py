"""Device time and host time of a call, and its peak memory, on CUDA or CPU.

Device time (what speedups compare) is the GPU's time per call, never the host's latency around it:
each sample is the time between two CUDA events enqueued while the GPU is held busy (a sleep kernel
first, long enough for the host to enqueue the whole batch of samples, so the stream never waits for
the host), with the L2 cache flushed before each sample. A sample is one replay of a CUDA graph of
several rotated calls where the call can be captured ("cuda-graph"), else one call ("events"). On a
CPU, device time is wall time per call ("cpu-wall").

Host time (CUDA only) is the host's wall time per call in a loop that enqueues calls back to back,
the GPU left to catch up after: what a call costs the host when nothing waits for the GPU; a call
that syncs shows its wait there.
"""

import contextlib
import gc
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

# How each record was timed.
METHODS = ("cuda-graph", "events", "cpu-wall")


@dataclass
class TimingStats:
    median_ms: float  # device time per call, as are the quantiles and the minimum
    p20_ms: float
    p80_ms: float
    min_ms: float
    repeats: int
    method: str = "cpu-wall"
    host_ms: float | None = None  # host time per call (CUDA only)

    @classmethod
    def of(cls, samples_ms: list, method: str = "cpu-wall", host_ms: float | None = None) -> "TimingStats":
        quantiles = statistics.quantiles(samples_ms, n=5, method="inclusive") if len(samples_ms) > 1 else samples_ms * 4
        return cls(
            statistics.median(samples_ms), quantiles[0], quantiles[3], min(samples_ms), len(samples_ms), method, host_ms
        )


# A CUDA-graph sample replays enough calls to take about this much device time, at most GRAPH_CALLS:
# the replay's own launch and events are then spread thin.
GRAPH_SAMPLE_MS = 1.0
GRAPH_CALLS = 20
SAMPLES_PER_ROUND = 5
HOST_CALLS = 10  # calls of the host-time loop
# The sleep before a batch covers this many times the host's time to enqueue it, plus SLEEP_MARGIN_MS,
# up to MAX_SLEEP_MS (a batch of slower calls is split).
SLEEP_FACTOR = 2.0
SLEEP_MARGIN_MS = 0.5
MAX_SLEEP_MS = 200.0


class CudaClock:
    """The CUDA calls the timing makes, in one place, so that a test can stand a simulated GPU in."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.current_stream(device)
        props = torch.cuda.get_device_properties(device)
        # Twice the L2, zeroed before each sample, leaves none of the last sample's data in it.
        self._flush = torch.empty(2 * max(getattr(props, "L2_cache_size", 0), 2**20), dtype=torch.uint8, device=device)
        self._cycles_per_ms = None

    now = staticmethod(time.perf_counter)

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def flush_l2(self) -> None:
        self._flush.zero_()

    def sleep(self, ms: float) -> None:
        if self._cycles_per_ms is None:  # the sleep kernel counts clock cycles: measure how many make a ms
            begin, end = self.event(), self.event()
            begin.record()
            torch.cuda._sleep(10**7)
            end.record()
            end.synchronize()
            self._cycles_per_ms = 10**7 / max(begin.elapsed_time(end), 1e-3)
        torch.cuda._sleep(int(ms * self._cycles_per_ms))

    def graph(self, rotation, calls: int):
        """A callable replaying ``calls`` rotated calls captured in one CUDA graph; RuntimeError if the
        call cannot be captured (a host sync, a CPU-side check)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(self.stream)
        with torch.cuda.stream(side):  # capture needs its warm-up (cuBLAS handles, autograd) off the default stream
            for _ in range(len(rotation.steps)):
                rotation()
        self.stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                rotation()
        return graph.replay


class _Rotation:
    """One call a sample: each takes the next of the steps (the same work on separate copies of the
    inputs), so that no call finds its inputs still in cache from the one before."""

    def __init__(self, steps: list):
        self.steps, self.next = steps, 0

    def __call__(self):
        step = self.steps[self.next]
        self.next = (self.next + 1) % len(self.steps)
        return step()


@dataclass
class _Timed:
    """What one sample runs: ``run`` makes ``calls`` calls in ``host_ms`` of the host's time (which sizes
    the sleep ahead of a batch); ``call_host_ms``: the host's time per call of the call itself."""

    run: object
    calls: int
    method: str
    host_ms: float
    call_host_ms: float


def host_time_ms(run, clock) -> float:
    """The host's wall time per call of ``run`` enqueued HOST_CALLS times back to back, the GPU idle at the start."""
    clock.synchronize()
    begin = clock.now()
    for _ in range(HOST_CALLS):
        run()
    elapsed = clock.now() - begin
    clock.synchronize()
    return elapsed * 1e3 / HOST_CALLS


def device_samples_ms(timed: _Timed, clock, samples: int) -> list:
    """``samples`` device times per call of ``timed``, enqueued behind a sleep that outlasts their enqueueing."""
    per_batch = max(1, int((MAX_SLEEP_MS - SLEEP_MARGIN_MS) / (SLEEP_FACTOR * max(timed.host_ms, 1e-3))))
    times = []
    while len(times) < samples:
        batch = min(per_batch, samples - len(times))
        clock.synchronize()
        clock.sleep(min(MAX_SLEEP_MS, SLEEP_FACTOR * batch * timed.host_ms + SLEEP_MARGIN_MS))
        pairs = []
        for _ in range(batch):
            clock.flush_l2()
            begin, end = clock.event(), clock.event()
            begin.record()
            timed.run()
            end.record()
            pairs.append((begin, end))
        clock.synchronize()
        times += [begin.elapsed_time(end) / timed.calls for begin, end in pairs]
    return times


def _cuda_timed(name: str, rotation: _Rotation, clock, graphable: bool) -> _Timed:
    host_ms = host_time_ms(rotation, clock)
    plain = _Timed(rotation, 1, "events", host_ms, host_ms)
    if not graphable:
        return plain
    estimate = statistics.median(device_samples_ms(plain, clock, 3))
    calls = max(1, min(GRAPH_CALLS, math.ceil(GRAPH_SAMPLE_MS / max(estimate, 1e-4))))
    try:
        replay = clock.graph(rotation, calls)
    except RuntimeError as refusal:
        clock.synchronize()
        print(
            f"\n{name}: cannot be captured in a CUDA graph ({str(refusal).splitlines()[0][:120]}); "
            "its device time is from events",
            file=sys.stderr,
        )
        return plain
    return _Timed(replay, calls, "cuda-graph", host_time_ms(replay, clock), host_ms)


def time_calls(
    calls: dict, device: torch.device, *, warmup: int, repeats: int, budget_s: float, graphable: bool = True, clock=None
) -> dict:
    """Times each of ``calls`` (name: list of steps, the same work on separate copies of the inputs;
    each call runs the next step) ``repeats`` times after ``warmup`` rounds, in interleaved rounds,
    so that drift in the machine's speed (clocks, neighbours, thermals) lands on every call alike
    instead of on whichever ran last. Stops early, after 3 rounds, once ``budget_s`` per call is
    spent. On CUDA: device time per call (CUDA-graph replays where ``graphable`` and the call can be
    captured, else events) and host time per call, both as the module says; ``clock`` stands in for
    CUDA in tests. On CPU: wall time per call."""
    rotations = {name: _Rotation(steps) for name, steps in calls.items()}
    for rotation in rotations.values():
        for _ in range(warmup * len(rotation.steps)):
            rotation()
    if device.type != "cuda" and clock is None:
        return _time_on_cpu(rotations, repeats, budget_s)
    clock = CudaClock(device) if clock is None else clock
    clock.synchronize()
    timed = {name: _cuda_timed(name, rotation, clock, graphable) for name, rotation in rotations.items()}
    samples = {name: [] for name in calls}
    start = time.perf_counter()
    for round_index in range(math.ceil(repeats / SAMPLES_PER_ROUND)):
        for name, one in timed.items():
            samples[name] += device_samples_ms(one, clock, min(SAMPLES_PER_ROUND, repeats - len(samples[name])))
        if round_index >= 2 and time.perf_counter() - start > budget_s * len(calls):
            break
    return {
        name: TimingStats.of(times, timed[name].method, timed[name].call_host_ms) for name, times in samples.items()
    }


def _time_on_cpu(rotations: dict, repeats: int, budget_s: float) -> dict:
    samples = {name: [] for name in rotations}
    start = time.perf_counter()
    for round_index in range(repeats):
        for name, rotation in rotations.items():
            begin = time.perf_counter()
            rotation()
            samples[name].append((time.perf_counter() - begin) * 1e3)
        if round_index >= 2 and time.perf_counter() - start > budget_s * len(rotations):
            break
    return {name: TimingStats.of(times) for name, times in samples.items()}


@contextlib.contextmanager
def quiet_stderr():
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
    with quiet_stderr():
        prof.start()
    try:
        fn()
    finally:
        with quiet_stderr():
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
