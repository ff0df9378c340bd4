"""Builds mmkern._C: the op schemas, the C++ CPU kernels and, when a CUDA toolkit is found, the CUDA sources.

Build knobs (environment variables, all optional):
  MMKERN_CUDA_ARCH_LIST   archs to compile for, e.g. "8.0;9.0+PTX" (default); TORCH_CUDA_ARCH_LIST is
                          honoured when MMKERN_CUDA_ARCH_LIST is unset.
  MMKERN_SKIP_CUDA_BUILD  "1" builds the CPU-only extension even where nvcc exists.
  MAX_JOBS                parallel compile jobs (ninja); default: cores, at most one per 2 GiB of memory.
  NVCC_THREADS            threads per nvcc invocation; default: what MAX_JOBS leaves of that budget.
  CUDA_HOME               the CUDA toolkit root; found from nvcc when unset.

The version carries a local tag naming what the binary was built against, 0.1.0+cu130torch2.14 or
0.1.0+cputorch2.14, and the wheel requires that torch minor release: the extension uses torch's C++
API, whose ABI changes between releases. An sdist (and a wheel built from one) keeps the plain
version; building an sdist compiles nothing. Every build writes mmkern/_build_config.py, which
mmkern checks at import against the running torch and GPU.
"""

import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

import torch
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
BUILD_CONFIG = os.path.join(ROOT, "mmkern", "_build_config.py")
# The extension calls no Python API beyond creating its empty module: one binary serves every
# CPython from this one on (an abi3 wheel).
LIMITED_API_PYTHON = "cp310"


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
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


@functools.lru_cache(maxsize=None)
def _nvcc_release(root):
    try:
        out = subprocess.run(
            [os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
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
    root = next(
        (
            os.path.realpath(r)
            for r in candidates
            if r and os.path.isfile(os.path.join(r, "bin", "nvcc")) and _has_cudart(r)
        ),
        None,
    )
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


def _parallel_budget():
    """Compile processes the machine can take at once: one per core, and no more than one per
    2 GiB of memory, since an nvcc or cc1plus process on torch's headers takes 1-2 GiB."""
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gib = 8
    return max(1, min(os.cpu_count() or 1, int(memory_gib // 2)))


def _read_base_version():
    with open(os.path.join(ROOT, "mmkern", "_version.py")) as handle:
        return re.search(r'^BASE_VERSION = "([^"]+)"', handle.read(), re.MULTILINE).group(1)


def _torch_minor():
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def package_version(cuda_home):
    """0.1.0+cu130torch2.14 (CUDA sources built) or 0.1.0+cputorch2.14; the plain version for an sdist
    and for a build from one, whose metadata must keep the version the sdist was published with."""
    base = _read_base_version()
    if BUILDING_SDIST or os.path.exists(os.path.join(ROOT, "PKG-INFO")):
        return base
    device = "cu" + torch.version.cuda.replace(".", "") if cuda_home else "cpu"
    return f"{base}+{device}torch{_torch_minor()}"


def torch_requirement():
    """A binary build needs the torch minor release it was compiled against."""
    if BUILDING_SDIST:
        return "torch>=2.6"
    major, minor = (int(part) for part in _torch_minor().split("."))
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


def cuda_targets():
    """What nvcc is asked to emit, as torch turns the arch list into -gencode flags: ("sm_80", "sm_90",
    "compute_90") for "8.0;9.0+PTX". Named archs ("Hopper") and odd spellings come out resolved."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    targets = []
    for flag in _get_cuda_arch_flags():
        for code in re.findall(r",code=\[?([\w,]+)", flag):
            targets += [t for t in code.split(",") if t not in targets]
    return tuple(targets)


def write_build_config(version, cuda_home, arch_list):
    content = f'''"""What mmkern._C was built against; written by setup.py, checked at import
(mmkern/_build_check.py)."""

VERSION = {version!r}
TORCH = {torch.__version__.split("+")[0]!r}
CUDA = {torch.version.cuda if cuda_home else None!r}
NVCC = {_nvcc_release(cuda_home) if cuda_home else None!r}
CUDA_ARCH_LIST = {arch_list!r}
CUDA_TARGETS = {cuda_targets() if cuda_home else ()!r}
'''
    with open(BUILD_CONFIG, "w") as handle:
        handle.write(content)


BUILDING_SDIST = "sdist" in sys.argv[1:]
# Commands that compile mmkern._C, and so record what it is built against. Metadata-only runs
# (egg_info, dist_info) must not overwrite the record of the binary already in the tree.
BUILDING_BINARY = any(
    c in sys.argv[1:] for c in ("build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install")
)
CUDA_HOME = None if BUILDING_SDIST else find_cuda_home()
CUDA_ARCH_LIST = None
if CUDA_HOME:
    CUDA_ARCH_LIST = os.environ.get(
        "MMKERN_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    )
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, the arch list when it compiles.
    os.environ["CUDA_HOME"] = CUDA_HOME
    os.environ["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCH_LIST
os.environ.setdefault("MAX_JOBS", str(_parallel_budget()))
NVCC_THREADS = os.environ.get("NVCC_THREADS", str(max(1, _parallel_budget() // int(os.environ["MAX_JOBS"]))))

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


class BuildExtensionWithoutStaleBinaries(BuildExtension):
    """An in-place build first removes binaries of mmkern._C left by earlier builds: Python looks for
    _C.cpython-3XX-*.so before _C.abi3.so, so an old one would shadow the new build."""

    def run(self):
        if self.inplace or getattr(self, "editable_mode", False):
            for stale in glob.glob(os.path.join(ROOT, "mmkern", "_C.*.so")):
                os.remove(stale)
        super().run()


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/cpu/isa/*.cpp"))
    # No -std flag: torch.utils.cpp_extension adds the standard the installed torch needs (C++17 for
    # torch 2.6-2.9, C++20 for newer).
    # -ffp-contract=off: the CPU kernels' AVX2 and AVX-512 builds (csrc/cpu/isa) may not fuse a multiply
    # and an add into an FMA, so that every ISA variant rounds as the baseline one does.
    # -fopenmp: at::parallel_for is inline code over `#pragma omp parallel` (torch's OpenMP backend);
    # built without it the pragma is dropped and every CPU kernel ran on one thread. Linked so, _C
    # names libgomp.so.1, which resolves to the copy torch has already loaded.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp", "-fdiagnostics-color=always"]
    link_flags = ["-fopenmp"]
    if not CUDA_HOME:
        return CppExtension(
            "mmkern._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags, py_limited_api=True
        )
    nvcc_flags = ["-O3", "--threads", NVCC_THREADS, "-lineinfo"]
    return CUDAExtension(
        "mmkern._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=[("MMKERN_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
        py_limited_api=True,
    )


VERSION = package_version(CUDA_HOME)
if BUILDING_BINARY:
    write_build_config(VERSION, CUDA_HOME, CUDA_ARCH_LIST)

setup(
    version=VERSION,
    install_requires=[torch_requirement()],
    ext_modules=[] if BUILDING_SDIST else [extension()],
    cmdclass={"build_ext": BuildExtensionWithoutStaleBinaries.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": LIMITED_API_PYTHON}},
)
