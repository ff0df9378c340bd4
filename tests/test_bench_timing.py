"""Device time and host time on CUDA, checked on a simulated GPU: a timeline on which every launch
starts once the GPU is free and the host has enqueued it, so host-bound and device-bound calls, graph
capture and its refusal, and calls that sync behave as they would on a real one."""

import json

import pytest
import torch

from mmkern.bench import command, time_calls
from mmkern.bench.records import timing_method

CUDA = torch.device("cuda")  # never touched: the simulated clock stands in for every CUDA call


class SimulatedGpu:
    """Times in ms. ``host`` is the host's clock, ``free`` when the GPU finishes what it was given."""

    def __init__(self, capturable=True):
        self.host = self.free = 0.0
        self.capturable, self.capturing, self.flushes = capturable, None, 0

    def now(self) -> float:  # seconds, as time.perf_counter
        return self.host / 1e3

    def launch(self, device_ms: float, host_ms: float = 0.0) -> None:
        if self.capturing is not None:
            self.capturing.append(device_ms)
            return
        self.host += host_ms
        self.free = max(self.free, self.host) + device_ms

    def event(self):
        return SimulatedEvent(self)

    def synchronize(self) -> None:
        self.host = max(self.host, self.free)

    def flush_l2(self) -> None:
        self.flushes += 1
        self.launch(0.03, 0.004)

    def sleep(self, ms: float) -> None:
        self.launch(ms, 0.003)

    def graph(self, rotation, calls: int):
        if not self.capturable:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        self.capturing = []
        for _ in range(calls):
            rotation()
        work, self.capturing = sum(self.capturing), None
        return lambda: self.launch(work, 0.008)


class SimulatedEvent:
    def __init__(self, gpu):
        self.gpu, self.at = gpu, None

    def record(self):
        self.gpu.launch(0.0, 0.001)
        self.at = self.gpu.free  # when the stream reaches it

    def elapsed_time(self, other) -> float:
        return other.at - self.at


def _time(gpu, steps, graphable=True, repeats=12):
    return time_calls({"f": steps}, CUDA, warmup=1, repeats=repeats, budget_s=100.0, graphable=graphable, clock=gpu)[
        "f"
    ]


@pytest.mark.parametrize("capturable", [True, False])
def test_a_host_bound_call_gets_its_device_time_not_the_hosts(capturable):
    # 200 us of Python around 20 us of GPU work: one call between events on an idle GPU would read 200.
    gpu = SimulatedGpu(capturable)
    stats = _time(gpu, [lambda: gpu.launch(0.02, 0.2)] * 3)
    assert stats.median_ms == pytest.approx(0.02) and stats.min_ms == pytest.approx(0.02)
    assert stats.p80_ms == pytest.approx(0.02)
    assert stats.host_ms == pytest.approx(0.2)
    assert stats.method == ("cuda-graph" if capturable else "events") and stats.repeats == 12


def test_a_device_bound_call_and_the_l2_flush_before_each_sample():
    gpu = SimulatedGpu()
    stats = _time(gpu, [lambda: gpu.launch(5.0, 0.05)], graphable=False, repeats=7)
    assert stats.median_ms == pytest.approx(5.0) and stats.host_ms == pytest.approx(0.05)
    assert stats.method == "events"
    assert gpu.flushes == 7


def test_slow_hosts_split_the_samples_into_batches_each_behind_its_own_sleep():
    # 60 ms of host per call: one sleep cannot cover twelve samples' enqueueing, a batch at a time can.
    gpu = SimulatedGpu(capturable=False)
    stats = _time(gpu, [lambda: gpu.launch(1.0, 60.0)])
    assert stats.median_ms == pytest.approx(1.0) and stats.host_ms == pytest.approx(60.0)


def test_a_call_that_syncs_shows_its_wait_in_host_time():
    gpu = SimulatedGpu(capturable=False)

    def syncing():
        gpu.launch(1.0, 0.05)
        gpu.synchronize()  # say, a .item() on a device tensor

    stats = _time(gpu, [syncing])
    assert stats.host_ms == pytest.approx(1.05)
    # Its sync drains the queue, so the next sample's events start from an idle GPU: within the host's
    # few microseconds of flush and event, no more.
    assert 1.0 <= stats.median_ms < 1.03


def test_cpu_calls_are_wall_timed():
    stats = time_calls({"f": [lambda: None]}, torch.device("cpu"), warmup=1, repeats=3, budget_s=1.0)["f"]
    assert stats.method == "cpu-wall" and stats.host_ms is None and stats.repeats == 3


def test_records_of_the_old_format_say_how_they_were_timed():
    assert timing_method({"graphed": True}, "cuda") == "cuda-graph"
    assert timing_method({"graphed": False}, "cuda") == "events-idle"
    assert timing_method({}, "cpu") == "cpu-wall"
    assert timing_method({"timing": "events", "graphed": False}, "cuda") == "events"


def _run(path, record, device_type):
    path.write_text(
        json.dumps(
            {
                "environment": {"device": "gpu", "device_type": device_type, "timestamp": "2026-01-01T00:00:00+00:00"},
                "records": [
                    {"op": "op", "case": "c", "provider": "mmkern", "mode": "forward", "dtype": "bfloat16", **record}
                ],
            }
        )
    )
    return str(path)


def test_compare_marks_a_row_whose_timing_method_changed(tmp_path, capsys):
    old = _run(tmp_path / "old.json", {"median_ms": 0.2, "graphed": False}, "cuda")
    new = _run(tmp_path / "new.json", {"median_ms": 0.02, "timing": "cuda-graph", "host_ms": 0.2}, "cuda")
    assert command.main(["--compare", old, new, "--fail-if-regression", "5"]) == 0
    out = capsys.readouterr().out
    assert "-90.0% (timing: events-idle -> cuda-graph)" in out
