import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("sklearn", reason="the digits task reads scikit-learn's bundled images")

from mmkern import cli, train  # noqa: E402

TINY = ["--dim", "16", "--questions-per-image", "1", "--batch-size", "32", "--accumulate", "2", "--no-progress"]


# Whole epochs of the digits task: through Triton's interpreter they would take most of CI's time.
@pytest.mark.slow
@pytest.mark.parametrize("model", train.MODELS)
def test_train_writes_metrics_and_resumes(tmp_path, model):
    out = str(tmp_path / model)
    assert cli.main(["train", "--model", model, "--epochs", "1", "--out", out, *TINY]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["model"] == model and len(metrics["history"]) == 1
    for name in ("accuracy", "macro_recall", "macro_f1"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["test_samples"] > 300 and os.path.exists(os.path.join(out, "checkpoint.pt"))
    train.main(["--model", model, "--epochs", "2", "--resume", "--out", out, *TINY])
    history = json.load(open(os.path.join(out, "metrics.json")))["history"]
    assert [h["epoch"] for h in history] == [0, 1]


def test_train_arguments(tmp_path):
    with pytest.raises(SystemExit, match="multiple of --accumulate"):
        train.main(["--batch-size", "10", "--accumulate", "3", "--out", str(tmp_path)])
    assert cli.main([]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("model", train.MODELS)
def test_default_run_reaches_95_percent(tmp_path, model):
    # The command users run, as they run it: a fresh process, the default schedule. How long it takes
    # is the command's own report (and a benchmark figure), never an assertion: a loaded machine is slow.
    out = str(tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "-m", "mmkern.train", "--model", model, "--out", out, "--no-progress"],
        capture_output=True,
        text=True,
        env={**os.environ, "MMKERN_TRITON_INTERPRET": "0"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    print(done.stdout.splitlines()[-1])
    assert metrics["accuracy"] >= 0.95


@pytest.mark.slow
def test_torchrun_trains_data_parallel(tmp_path):
    out = str(tmp_path / "ddp")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "mmkern.train",
            "--epochs",
            "1",
            "--out",
            out,
            *TINY,
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["processes"] == 2 and len(metrics["history"]) == 1
    assert done.stdout.count("held-out accuracy") == 2  # one epoch line and one summary, from rank 0 alone
