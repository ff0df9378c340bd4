import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_sanitize_workload_passes_on_the_cpu_kernels():
    """`make sanitize` runs this workload under compute-sanitizer on a GPU; its checks against the
    reference must hold on the C++ kernels too, so that a failure there is the GPU's."""
    run = subprocess.run(
        [sys.executable, "scripts/sanitize_workload.py", "cpu"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "checks passed" in run.stdout
