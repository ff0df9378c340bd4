"""What was built, and the checks that refuse to load a build that cannot run here."""

import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import mmkern
from mmkern import _config, env
from mmkern._build_check import check_build_matches_runtime, target_covers
from mmkern._extension import build_config
from mmkern._gpus import GPU, visible_indices

PACKAGE = os.path.dirname(mmkern.__file__)


def _nvcc_major():
    if not shutil.which("nvcc"):
        return None
    match = re.search(r"release (\d+)\.", subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout)
    return match and match.group(1)


def test_cuda_sources_are_compiled_where_a_matching_nvcc_exists():
    info = mmkern.build_info()
    matching_toolkit = torch.version.cuda and _nvcc_major() == torch.version.cuda.split(".")[0]
    if matching_toolkit and os.environ.get("MMKERN_SKIP_CUDA_BUILD", "0") != "1":
        assert info["cuda"] != "none", info
        assert build_config.CUDA == torch.version.cuda
    assert info["torch"] == ".".join(torch.__version__.split(".")[:2])


def test_version_names_what_it_was_built_against():
    torch_minor = ".".join(torch.__version__.split(".")[:2])
    device = "cu" + torch.version.cuda.replace(".", "") if build_config.CUDA else "cpu"
    assert mmkern.__version__ == f"0.1.0+{device}torch{torch_minor}"


def test_recorded_targets_are_what_nvcc_compiled():
    if not build_config.CUDA:
        pytest.skip("CPU-only build")
    compiled = {int(arch) // 10 for arch in mmkern.build_info()["archs"].split(",")}
    recorded = {int(re.search(r"_(\d+)", target).group(1)) for target in build_config.CUDA_TARGETS}
    assert compiled == recorded, (build_config.CUDA_TARGETS, mmkern.build_info())


@pytest.mark.parametrize(
    "target, capability, runs",
    [
        ("sm_80", (8, 0), True),
        ("sm_80", (8, 6), True),
        ("sm_80", (8, 9), True),
        ("sm_80", (9, 0), False),
        ("sm_80", (7, 5), False),
        ("compute_90", (9, 0), True),
        ("compute_90", (10, 0), True),
        ("compute_90", (12, 0), True),
        ("compute_90", (8, 9), False),
        ("sm_90a", (9, 0), True),
        ("sm_90a", (10, 0), False),
        ("sm_100", (10, 3), True),
        ("sm_120", (10, 0), False),
        ("sm_120", (12, 1), True),
    ],
)
def test_which_gpus_a_target_runs_on(target, capability, runs):
    assert target_covers(target, capability) is runs


@pytest.mark.parametrize(
    "setting, visible",
    [
        (None, [0, 1, 2]),
        ("", []),
        ("1,0", [1, 0]),
        ("2", [2]),
        ("0,7,1", [0]),
        ("-1", []),
        ("0,0,1", [0]),
        ("GPU-8a0f2b", [0, 1, 2]),
        (" 1 , 2 ", [1, 2]),
    ],
)
def test_cuda_visible_devices(setting, visible):
    assert visible_indices(setting, 3) == visible


def _fake_config(**changes):
    fields = dict(
        VERSION="0.1.0+cu130torch2.14",
        TORCH="2.14.1",
        CUDA="13.0",
        NVCC="13.0",
        CUDA_ARCH_LIST="8.0;9.0+PTX",
        CUDA_TARGETS=("sm_80", "compute_90", "sm_90"),
    )
    return SimpleNamespace(**{**fields, **changes})


H100, A10, T4, B200 = GPU(0, "H100", (9, 0)), GPU(1, "A10", (8, 6)), GPU(2, "T4", (7, 5)), GPU(3, "B200", (10, 0))


def test_a_matching_build_loads():
    check_build_matches_runtime(_fake_config(), "2.14.0+cu130", "13.0", [H100, A10, B200])
    check_build_matches_runtime(_fake_config(), "2.14.1+cu130", "13.2", [])
    cpu_only = _fake_config(VERSION="0.1.0+cputorch2.14", CUDA=None, NVCC=None, CUDA_ARCH_LIST=None, CUDA_TARGETS=())
    check_build_matches_runtime(cpu_only, "2.14.1+cu130", "13.0", [T4])
    check_build_matches_runtime(cpu_only, "2.14.1+cpu", None, [])


@pytest.mark.parametrize(
    "running, expected",
    [
        (
            ("2.11.0+cu130", "13.0", [H100]),
            r"built against torch 2\.14\.1 with CUDA 13\.0, but torch 2\.11\.0\+cu130 is "
            r"running.*build for torch 2\.11.*pip install --no-build-isolation",
        ),
        (("2.14.1+cpu", None, []), r"has no CUDA.*MMKERN_SKIP_CUDA_BUILD=1 pip install --no-build-isolation"),
        (("2.14.1+cu126", "12.6", [H100]), r"uses CUDA 12\.6\. Rebuild with a CUDA 12\.x toolkit"),
        (
            ("2.14.1+cu130", "13.0", [H100, T4]),
            r"for sm_80, compute_90, sm_90 .*but GPU 2 \(T4\) is sm_75.*no kernel image"
            r".*MMKERN_CUDA_ARCH_LIST=7\.5;8\.0;9\.0\+PTX pip install.*CUDA_VISIBLE_DEVICES",
        ),
    ],
)
def test_a_mismatch_says_what_was_built_what_runs_and_the_fix(running, expected):
    with pytest.raises(ImportError, match=expected):
        check_build_matches_runtime(_fake_config(), *running)


def _import_copy(tmp_path, build_config_text):
    """Imports a copy of the mmkern package whose compiled extension is absent, with the given
    _build_config.py (None: none), in a fresh interpreter; returns its stderr."""
    copy = tmp_path / "mmkern"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "_build_config.py", "__pycache__"))
    if build_config_text is not None:
        (copy / "_build_config.py").write_text(build_config_text)
    # An editable install maps `mmkern` to its source tree ahead of sys.path; drop that mapping.
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in f.__module__]; import mmkern"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode != 0
    return result.stderr


def _config_text(**changes):
    return "".join(f"{name} = {value!r}\n" for name, value in vars(_fake_config(**changes)).items())


def test_an_unbuilt_tree_says_how_to_build(tmp_path):
    stderr = _import_copy(tmp_path, None)
    assert "ImportError: mmkern's compiled extension has not been built" in stderr
    assert "pip install --no-build-isolation" in stderr


def test_the_check_runs_before_the_extension_is_loaded(tmp_path):
    stderr = _import_copy(tmp_path, _config_text(TORCH="2.5.1", CUDA_TARGETS=()))
    assert f"built against torch 2.5.1 with CUDA 13.0, but torch {torch.__version__} is running" in stderr


def test_a_missing_binary_is_named(tmp_path):
    torch_version = torch.__version__.split("+")[0]
    stderr = _import_copy(tmp_path, _config_text(TORCH=torch_version, CUDA=torch.version.cuda, CUDA_TARGETS=()))
    assert "could not load its compiled extension mmkern._C" in stderr


def test_env_reports_builds_backends_and_gpus(capsys):
    assert env.main() == 0
    out = capsys.readouterr().out
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert rows["mmkern"].startswith(mmkern.__version__)
    assert rows["running"].startswith(f"torch {torch.__version__}")
    cpu_kernel = "Triton (interpreter)" if _config.TRITON_ON_CPU else "C++"
    assert rows["op mmkern::concat_linear"] == f"CPU: {cpu_kernel}, CUDA: Triton"
    assert "GPUs" in rows or "GPU 0" in rows


def test_env_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "mmkern.env"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "built against" in result.stdout and "op mmkern::concat_linear" in result.stdout
