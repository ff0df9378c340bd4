"""scripts/gpu_check.sh, the GPU kit, run here with every program it calls stood in for (python,
nvidia-smi, compute-sanitizer, timeout): a mistake in it would otherwise cost a GPU session's
minutes. Checks the stages' order and switches, that every limit fits the budget, and the pack."""

import os
import re
import subprocess
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The script is a repository file: the wheel check, which copies the tests alone, leaves these out with the slow ones.
pytestmark = pytest.mark.slow


def _stub(folder, name, body):
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(0o755)


@pytest.fixture
def kit(tmp_path):
    bin_dir, calls, clock = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "clock"
    bin_dir.mkdir()
    clock.write_text("0\n")
    # python: answers the capability query, logs every other call; the sweep's call leaves a table.
    _stub(
        bin_dir,
        "python3",
        f"""\
        if [ "$1" = -c ]; then echo 9.0; exit 0; fi
        echo "python $*" >> {calls}
        case "$*" in *mmkern.bench.tune*) mkdir -p mmkern/kernels/tuned; ;; esac
        """,
    )
    _stub(bin_dir, "nvidia-smi", 'echo "NVIDIA H200, 570.00, 143771 MiB"\n')
    _stub(bin_dir, "compute-sanitizer", f'echo "sanitizer $*" >> {calls}\n')
    # timeout: logs its limit and, where KIT_STAGES_TAKE_THEIR_LIMIT is set, advances the kit's clock
    # (KIT_CLOCK) by it, as if the command had run it out; then runs the command.
    _stub(
        bin_dir,
        "timeout",
        f"""\
        args=("$@")
        while [[ "${{args[0]}}" == -* ]]; do
            [[ "${{args[0]}}" == -[sk] ]] && args=("${{args[@]:2}}") || args=("${{args[@]:1}}")
        done
        echo "timeout ${{args[0]}}" >> {calls}
        if [ -n "${{KIT_STAGES_TAKE_THEIR_LIMIT:-}}" ]; then echo $(($(cat {clock}) + args[0])) > {clock}; fi
        exec "${{args[@]:1}}"
        """,
    )

    def run(**env):
        environment = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PYTHON": str(bin_dir / "python3"),
            "OUT": str(tmp_path),
            "KIT_CLOCK": str(clock),
            **env,
        }
        result = subprocess.run(
            ["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=environment, capture_output=True, text=True
        )
        return result, calls.read_text().splitlines()

    return run


def _limits(calls):
    return [int(line.split()[1]) for line in calls if line.startswith("timeout")]


def test_every_stage_runs_in_order(kit, tmp_path):
    result, calls = kit()
    assert result.returncode == 0, result.stderr
    stages = [line for line in calls if line.startswith("python")]
    expected = [
        "pip install",
        "mmkern.bench.attention_experiments",
        "pytest",
        "sanitize_workload.py",
        "mmkern.bench.tune --preset quick --budget 90",
        "mmkern.bench --preset quick",
        "mmkern.bench.profile_ops",
        "mmkern.bench --preset models",
    ]
    order = [next(i for i, line in enumerate(stages) if part in line) for part in expected]
    assert order == sorted(order)
    assert all(limit <= 530 - 15 for limit in _limits(calls))
    summary = next(line for line in result.stdout.splitlines() if line.startswith("build:"))
    stages_run = ("build", "experiments", "tests and sanitizer", "tune", "bench", "models")
    assert all(f"{stage}:" in summary for stage in stages_run)
    with tarfile.open(tmp_path / "gpu-check.tar.gz") as pack:
        names = pack.getnames()
    assert "./pytest.log" in names and "./gpu.txt" in names and "./tune.log" in names


def test_switches_leave_stages_out(kit):
    result, calls = kit(EXPERIMENTS="0", SANITIZE="0", TUNE="0", MODELS="0")
    assert result.returncode == 0, result.stderr
    assert not any(re.search("tune|models|sanitize|experiments", line) for line in calls)
    assert "bench:" in result.stdout and "tune:" not in result.stdout


def test_stages_that_find_the_budget_spent_are_skipped(kit):
    # Each stage runs out its limit on the kit's clock: the build takes 2 s, the tests the 3 s left, the rest none.
    result, calls = kit(
        KIT_STAGES_TAKE_THEIR_LIMIT="1",
        KIT_BUDGET="6",
        KIT_RESERVE="1",
        BUILD_TIMEOUT="2",
        EXPERIMENTS="0",
        SANITIZE="0",
    )
    assert result.returncode == 0, result.stderr
    assert _limits(calls) == [2, 3]
    summary = next(line for line in result.stdout.splitlines() if line.startswith("build:"))
    assert "tune: skipped, budget spent" in summary and "models: skipped, budget spent" in summary
