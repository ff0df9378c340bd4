"""The benchmark harness: records, speedups, results files, and the refusal to time a wrong provider."""

import csv
import json
import os
import runpy

import pytest
import torch

from mmkern import ops, reference
from mmkern.bench import Case, describe_environment, format_table, run_cases, write_results

CPU = torch.device("cpu")


def _tiny_case():
    def make_args(device, dtype):
        inputs = [torch.randn(2, 5, 3, device=device, dtype=dtype).requires_grad_(),
                  torch.randn(2, 1, 4, device=device, dtype=dtype).requires_grad_()]
        weight = torch.randn(6, 7, device=device, dtype=dtype).requires_grad_()
        return inputs, weight, None

    return Case("tiny", make_args, forward_flops=1e3, forward_bytes=1e3, backward_flops=2e3, backward_bytes=2e3)


def _providers(case):
    return {"mmkern": lambda xs, w, b: ops.concat_linear(xs, w, b),
            "eager": lambda xs, w, b: reference.concat_linear(xs, w, b)}


def test_run_cases_times_every_provider_and_mode():
    records = run_cases("concat_linear", [_tiny_case()], _providers, device=CPU, dtype=torch.float32,
                        warmup=1, repeats=3, budget_s=0.5)
    assert {(r.provider, r.mode) for r in records} == {
        (p, m) for p in ("mmkern", "eager") for m in ("forward", "backward", "forward+backward")}
    for r in records:
        assert 0 < r.min_ms <= r.p20_ms <= r.median_ms <= r.p80_ms
        assert r.repeats == 3 and r.tflops > 0 and r.gbps > 0 and r.peak_memory_mb >= 0
        if r.provider == "eager":
            assert r.speedup == pytest.approx(1.0) and r.baseline == "eager"
    table = format_table(records)
    assert "forward+backward" in table and "mmkern" in table


def test_cpu_peak_memory_counts_temporaries():
    records = run_cases("concat_linear", [_tiny_case()], _providers, device=CPU, dtype=torch.float32,
                        modes=("forward",), warmup=1, repeats=3, budget_s=0.5)
    eager = next(r for r in records if r.provider == "eager")
    # cat (2*5*7 floats) and the output (2*5*6 floats) are both live at once in the eager composition.
    assert eager.peak_memory_mb * 2**20 >= 4 * (70 + 60)


def test_a_provider_that_disagrees_is_not_timed(capsys):
    def providers(case):
        return {**_providers(case), "wrong": lambda xs, w, b: 2 * reference.concat_linear(xs, w, b)}

    records = run_cases("concat_linear", [_tiny_case()], providers, device=CPU, dtype=torch.float32,
                        modes=("forward",), warmup=1, repeats=3, budget_s=0.5)
    assert "wrong" not in {r.provider for r in records}
    assert "'wrong' disagrees" in capsys.readouterr().err


def test_results_are_appended_with_the_environment(tmp_path):
    records = run_cases("concat_linear", [_tiny_case()], _providers, device=CPU, dtype=torch.float32,
                        modes=("forward",), warmup=1, repeats=3, budget_s=0.5)
    environment = describe_environment(CPU)
    for _ in range(2):
        csv_path, json_path = write_results(records, environment, str(tmp_path), "concat_linear")
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(records)
    assert rows[0]["device"] == environment["device"] and rows[0]["torch"] == torch.__version__
    with open(json_path) as handle:
        saved = json.load(handle)
    assert saved["environment"]["timestamp"] == environment["timestamp"]
    assert len(saved["records"]) == len(records)


@pytest.mark.slow
def test_benchmark_script_runs_end_to_end(tmp_path, capsys):
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_concat_linear.py")
    main = runpy.run_path(script)["main"]
    main(["--cases", "narrow_three_modalities", "--modes", "forward", "--no-compile", "--repeats", "3",
          "--budget", "0.5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "narrow_three_modalities" in out and "vs eager" in out
    assert os.path.exists(tmp_path / "concat_linear.csv")
