"""The benchmark harness: records, statistics, rotation of inputs, speedups, results files, and the
refusal to time a wrong provider."""

import csv
import json

import pytest
import torch

from mmkern import ops, reference
from mmkern.bench import (
    Case,
    TimingStats,
    describe_environment,
    format_table,
    load_records,
    run_cases,
    time_calls,
    write_records,
)
from mmkern.bench.ceilings import attach_fractions, measure_ceilings
from mmkern.bench.records import slower_than_baseline
from mmkern.bench.report import markdown_report
from mmkern.bench.runner import input_copies, last_level_cache_bytes

# Timing loops: through Triton's interpreter they would time the interpreter, for most of CI's time.
pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
FAST = dict(warmup=1, repeats=3, budget_s=0.2)


def _tiny_case():
    def make_args(device, dtype, seed=0):
        generator = torch.Generator().manual_seed(seed)
        inputs = [
            torch.randn(2, 5, 3, generator=generator).to(device, dtype).requires_grad_(),
            torch.randn(2, 1, 4, generator=generator).to(device, dtype).requires_grad_(),
        ]
        weight = torch.randn(6, 7, generator=generator).to(device, dtype).requires_grad_()
        return inputs, weight, None

    return Case("tiny", make_args, forward_flops=1e3, forward_bytes=1e3, backward_flops=2e3, backward_bytes=2e3)


def _providers(case):
    return {
        "mmkern": lambda xs, w, b: ops.concat_linear(xs, w, b),
        "eager": lambda xs, w, b: reference.concat_linear(xs, w, b),
    }


def test_run_cases_times_every_provider_and_mode():
    records = run_cases("concat_linear", [_tiny_case()], _providers, device=CPU, dtype=torch.float32, **FAST)
    assert {(r.provider, r.mode) for r in records} == {
        (p, m) for p in ("mmkern", "eager") for m in ("forward", "backward", "forward+backward")
    }
    for r in records:
        assert 0 < r.min_ms <= r.p20_ms <= r.median_ms <= r.p80_ms
        assert r.repeats == 3 and r.tflops > 0 and r.gbps > 0 and r.peak_memory_mb >= 0
        assert r.input_copies == input_copies(_tiny_case().make_args(CPU, torch.float32), CPU) > 1
        if r.provider == "eager":
            assert r.speedup == pytest.approx(1.0) and r.baseline == "eager"
    table = format_table(records)
    assert "forward+backward" in table and "mmkern" in table


def test_timing_statistics():
    stats = TimingStats.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (stats.median_ms, stats.min_ms, stats.repeats) == (3.0, 1.0, 5)
    assert stats.p20_ms == pytest.approx(1.8) and stats.p80_ms == pytest.approx(4.2)
    single = TimingStats.of([2.5])
    assert single.median_ms == single.p20_ms == single.p80_ms == 2.5


def test_timed_calls_take_the_input_copies_in_turn():
    taken = []
    steps = [lambda i=i: taken.append(i) for i in range(3)]
    stats = time_calls({"f": steps}, CPU, warmup=1, repeats=6, budget_s=10.0)
    assert stats["f"].repeats == 6
    assert taken == [0, 1, 2] + [0, 1, 2, 0, 1, 2]  # the warm-up round goes over every copy


def test_input_copies_fill_twice_the_last_level_cache():
    cache = last_level_cache_bytes(CPU)
    assert cache > 0
    small = (torch.empty(1024, dtype=torch.uint8),)
    assert input_copies(small, CPU) == 32  # capped
    assert input_copies((torch.empty(cache, dtype=torch.uint8),), CPU) == 2
    assert input_copies((torch.empty(4 * cache, dtype=torch.uint8),), CPU) == 1


def test_cpu_peak_memory_counts_temporaries():
    records = run_cases(
        "concat_linear", [_tiny_case()], _providers, device=CPU, dtype=torch.float32, modes=("forward",), **FAST
    )
    eager = next(r for r in records if r.provider == "eager")
    # cat (2*5*7 floats) and the output (2*5*6 floats) are both live at once in the eager composition.
    assert eager.peak_memory_mb * 2**20 >= 4 * (70 + 60)


def test_a_provider_that_disagrees_is_not_timed(capsys):
    def providers(case):
        return {**_providers(case), "wrong": lambda xs, w, b: 2 * reference.concat_linear(xs, w, b)}

    refusals = []
    records = run_cases(
        "concat_linear",
        [_tiny_case()],
        providers,
        device=CPU,
        dtype=torch.float32,
        modes=("forward",),
        refusals=refusals,
        **FAST,
    )
    assert "wrong" not in {r.provider for r in records}
    assert "'wrong' disagrees" in capsys.readouterr().err
    assert (
        refusals == [{"op": "concat_linear", "case": "tiny", "provider": "wrong", "reason": refusals[0]["reason"]}]
        and "output" in refusals[0]["reason"]
    )


def test_a_provider_with_wrong_gradients_is_not_timed_for_backward_modes():
    def wrong_backward(xs, w, b):
        out = reference.concat_linear(xs, w, b)
        return out.detach() + (out - out.detach()) * 3  # right values, gradients 3 times too large

    def providers(case):
        return {**_providers(case), "wrong_backward": wrong_backward}

    forward_only = run_cases(
        "concat_linear", [_tiny_case()], providers, device=CPU, dtype=torch.float32, modes=("forward",), **FAST
    )
    assert "wrong_backward" in {r.provider for r in forward_only}
    refusals = []
    with_backward = run_cases(
        "concat_linear",
        [_tiny_case()],
        providers,
        device=CPU,
        dtype=torch.float32,
        modes=("forward", "forward+backward"),
        refusals=refusals,
        **FAST,
    )
    assert "wrong_backward" not in {r.provider for r in with_backward}
    assert "gradient" in refusals[0]["reason"]


def test_a_provider_that_cannot_run_the_case_is_left_out():
    def refuses(xs, w, b):
        raise RuntimeError("No available kernel. Aborting execution.")

    refusals = []
    records = run_cases(
        "concat_linear",
        [_tiny_case()],
        lambda case: {**_providers(case), "picky": refuses},
        device=CPU,
        dtype=torch.float32,
        modes=("forward",),
        refusals=refusals,
        **FAST,
    )
    assert {r.provider for r in records} == {"mmkern", "eager"}
    assert refusals[0]["provider"] == "picky" and "cannot run" in refusals[0]["reason"]


def test_only_times_the_chosen_providers_but_checks_against_the_reference():
    records = run_cases(
        "concat_linear",
        [_tiny_case()],
        _providers,
        device=CPU,
        dtype=torch.float32,
        modes=("forward",),
        only=["mmkern"],
        **FAST,
    )
    assert {r.provider for r in records} == {"mmkern"}


def test_ceilings_and_fractions():
    ceilings = measure_ceilings(CPU, [torch.float32, "int8"], repeats=3)
    assert ceilings["copy_gbps"] > 0 and set(ceilings["matmul_tflops"]) == {"float32", "int8"}
    records = run_cases(
        "concat_linear", [_tiny_case()], _providers, device=CPU, dtype=torch.float32, modes=("forward",), **FAST
    )
    attach_fractions(records, ceilings)
    for r in records:
        assert r.flops_fraction == pytest.approx(r.tflops / ceilings["matmul_tflops"]["float32"])
        assert r.bandwidth_fraction == pytest.approx(r.gbps / ceilings["copy_gbps"])
    attach_fractions(records, ceilings, compute_dtype="int8")
    assert records[0].flops_fraction == pytest.approx(records[0].tflops / ceilings["matmul_tflops"]["int8"])
    assert "%" in format_table(records)


def test_records_are_written_with_the_environment(tmp_path):
    records = run_cases(
        "concat_linear", [_tiny_case()], _providers, device=CPU, dtype=torch.float32, modes=("forward",), **FAST
    )
    environment = describe_environment(CPU)
    csv_path, json_path = write_records(records, str(tmp_path / "results"), {"environment": environment})
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(records)
    assert rows[0]["device"] == environment["device"] and rows[0]["torch"] == torch.__version__
    assert json.loads(rows[0]["params"]) == {}
    saved, loaded = load_records(json_path)
    assert saved["environment"]["timestamp"] == environment["timestamp"]
    assert [r["median_ms"] for r in loaded] == [r.median_ms for r in records]


def test_figures_below_the_baseline_are_flagged_in_the_report(tmp_path):
    """A run names each mmkern figure under 1.0x of its baseline (as an AVX2 host's int8 product once
    was, at 0.09x, with nothing noticing), and records the host's vector ISA beside it."""
    records = run_cases(
        "concat_linear", [_tiny_case()], _providers, device=CPU, dtype=torch.float32, modes=("forward",), **FAST
    )
    environment = describe_environment(CPU)
    assert environment["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    _, json_path = write_records(records, str(tmp_path / "results"), {"environment": environment})
    _, loaded = load_records(json_path)
    ours = next(r for r in loaded if r["provider"] == "mmkern")
    ours.update(speedup=0.09, baseline="eager")
    assert slower_than_baseline(loaded) == [f"concat_linear {ours['case']} forward float32: 0.09x of eager"]
    report = markdown_report({"environment": environment, "records": loaded}, [], str(tmp_path))
    assert f"- cpu_isa: {environment['cpu_isa']}" in report
    assert f"## Slower than the baseline\n\n- concat_linear {ours['case']} forward float32: 0.09x of eager" in report
    ours["speedup"] = 1.5
    assert not slower_than_baseline(loaded) and "Slower than" not in markdown_report(
        {"environment": environment, "records": loaded}, [], str(tmp_path)
    )
