"""mmkern bench --preset host: its logic on a CPU, with few and short rounds (the figures are benchmarks,
not assertions)."""

import json
import os

import pytest
import torch

from mmkern import _config
from mmkern.bench import command, host


@pytest.mark.skipif(not _config.TRITON_ON_CPU, reason="the host preset runs the GPU path: the interpreter run has it")
def test_host_preset_writes_every_op_and_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "ROUNDS", 2)
    monkeypatch.setattr(host, "ROUND_S", 0.001)
    assert command.main(["--preset", "host", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (run_dir,) = os.listdir(tmp_path)
    with open(tmp_path / run_dir / "results.json") as handle:
        saved = json.load(handle)
    assert saved["preset"] == "host" and "no-op" in saved["method"]
    modes = {(r["op"], r["mode"]) for r in saved["records"]}
    assert {
        ("concat_linear", "backward"),
        ("cross_modal_attention_packed", "backward"),
        ("quantized_fusion", "forward"),
    } <= modes
    assert all(r["mmkern_us"] > 0 and r["baseline_us"] > 0 and r["reads"] >= 0 for r in saved["records"])
    assert "| op | mode |" in (tmp_path / run_dir / "report.md").read_text()


@pytest.mark.skipif(_config.TRITON_ON_CPU, reason="without the interpreter switch")
def test_host_preset_needs_the_gpu_path():
    with pytest.raises(RuntimeError, match="MMKERN_TRITON_INTERPRET=1"):
        host.run(torch.device("cpu"), torch.float32)


def test_count_host_reads_sees_each_kind_of_read():
    x = torch.tensor([1.0, 2.0])
    assert host.count_host_reads(lambda: (x.sum().item(), x.tolist(), bool(x[0]), torch.equal(x, x))) == 4
    assert host.count_host_reads(lambda: x * 2) == 0
