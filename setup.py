"""Builds mmkern._C: the op schemas, the C++ CPU kernels and, when a CUDA toolkit is found, the CUDA sources.

Build knobs (environment variables, all optional):
  MMKERN_CUDA_ARCH_LIST   archs to compile for, e.g. "8.0;9.0+PTX" (default); TORCH_CUDA_ARCH_LIST is
                          honoured when MMKERN_CUDA_ARCH_LIST is unset.
  MMKERN_SKIP_CUDA_BUILD  "1" builds the CPU-only extension even where nvcc exists.
  MAX_JOBS                parallel compile jobs (ninja); default bounded by cores and memory.
  NVCC_THREADS            threads per nvcc invocation (default 2).
  CUDA_HOME               the CUDA toolkit root; found from nvcc when unset.
"""

import glob
import os
import re
import shutil
import subprocess
import tempfile
import warnings

import torch
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _has_cudart(root):
    patterns = ("lib64/libcudart*", "lib/libcudart*", "targets/*/lib/libcudart*")
    return any(glob.glob(os.path.join(root, p)) for p in patterns)


def _toolkit_root_from_nvcc(nvcc):
    """Asks nvcc for its real root: nvcc on PATH is often a wrapper script in /usr/local/bin, and
    torch's guess (the folder above the wrapper) then has no headers or libcudart."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        open(source, "w").close()
        try:
            dryrun = subprocess.run(
                [nvcc, "-v", "--dryrun", "-c", source, "-o", os.path.join(tmp, "probe.o")],
                capture_output=True, text=True, timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def _nvcc_release(root):
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def find_cuda_home():
    """The CUDA toolkit root to build against, or None for a CPU-only build."""
    if os.environ.get("MMKERN_SKIP_CUDA_BUILD", "0") == "1":
        return None
    if not torch.version.cuda:
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), _toolkit_root_from_nvcc(nvcc)]
    candidates.append("/usr/local/cuda")
    root = next((os.path.realpath(r) for r in candidates
                 if r and os.path.isfile(os.path.join(r, "bin", "nvcc")) and _has_cudart(r)), None)
    if root is None:
        return None
    release = _nvcc_release(root)
    # CUDA code built by one major release cannot link against a torch built with another.
    if release is None or release.split(".")[0] != torch.version.cuda.split(".")[0]:
        warnings.warn(
            f"mmkern: the CUDA toolkit at {root} (nvcc {release}) does not match torch's CUDA "
            f"{torch.version.cuda}; building the CPU-only extension. Point CUDA_HOME at a CUDA "
            f"{torch.version.cuda.split('.')[0]}.x toolkit to compile the CUDA sources.",
            stacklevel=1,
        )
        return None
    return root


def default_max_jobs():
    """One job per core, but no more than one per 2 GiB of memory: nvcc jobs take 1-2 GiB each."""
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gib = 8
    return max(1, min(os.cpu_count() or 1, int(memory_gib // 2)))


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get(
        "MMKERN_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    )
os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: torch.utils.cpp_extension adds the standard the installed torch needs (C++17 for
    # torch 2.6-2.9, C++20 for newer).
    cxx_flags = ["-O3", "-Wno-unknown-pragmas", "-fdiagnostics-color=always"]
    if not CUDA_HOME:
        return CppExtension("mmkern._C", sources, extra_compile_args={"cxx": cxx_flags})
    nvcc_flags = ["-O3", "--threads", os.environ.get("NVCC_THREADS", "2"), "-lineinfo"]
    return CUDAExtension(
        "mmkern._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=[("MMKERN_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
