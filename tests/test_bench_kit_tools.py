"""The GPU kit's profiler summary (mmkern.bench.profile_ops) and its last table (mmkern.bench.summary),
run here on CPU and on a committed run."""

import glob
import json
import os

import pytest
import torch

from mmkern.bench import profile_ops, summary
from mmkern.bench.suite import suites

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Repository files (the committed runs, the scripts): the wheel check, which copies the tests alone, leaves these
# tests out with the slow ones.
pytestmark = pytest.mark.slow


def _committed_gpu_run() -> str:
    return sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*nvidia*", "results.json")))[-1]


def test_the_profiler_summary_names_each_ops_kernels_and_host_time(tmp_path):
    lines = []
    chosen = [s for s in suites() if s.op == "quantize_per_token"]
    summaries = profile_ops.profile_suites(chosen, torch.device("cpu"), log=lines.append)
    (only,) = summaries
    assert only["op"] == "quantize_per_token" and only["mode"] == "forward" and only["host_ms"] > 0
    assert any("mmkern::quantize_per_token" in name for name, us, launches in only["kernels"])
    assert lines[0].startswith("quantize_per_token small_tokens forward: host ") and len(lines) <= 1 + profile_ops.TOP
    assert profile_ops.main(["--device", "cpu", "--ops", "quantize_per_token", "--out", str(tmp_path)]) == 0
    assert "mmkern::quantize_per_token" in (tmp_path / "quantize_per_token-forward.txt").read_text()


def test_the_last_table_fits_its_lines_and_says_what_it_left_out(tmp_path):
    table = tmp_path / "table.json"
    table.write_text(
        json.dumps(
            {
                "families": {"gemm": {"bfloat16/m16/n16": {}}, "attention_forward": {}},
                "kept_default": {"x": {}},
                "left_out": ["y", "z"],
            }
        )
    )
    gpu_run = _committed_gpu_run()
    lines = summary.summary_lines(gpu_run, str(table), max_lines=8)
    assert len(lines) == 8 and lines[1].split()[:3] == ["op", "case", "mode"]
    assert lines[-2].startswith("... ") and "more rows in the run's report.md" in lines[-2]
    assert lines[-1] == "tuned: {'gemm': 1, 'attention_forward': 0}; kept default 1; left out 2"
    # The committed run predates the method field: its rows say how they were timed.
    assert "(events-idle)" in lines[2]
    everything = summary.summary_lines(gpu_run, max_lines=100)
    assert not any(line.startswith("... ") for line in everything)
