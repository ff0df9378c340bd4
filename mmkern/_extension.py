"""Loads the compiled extension, whose import registers every op schema and C++ kernel, once the
build is known to match the running torch, CUDA and GPUs (mmkern/_build_check.py)."""

import torch  # loads libc10 and libtorch, which mmkern._C links against

from mmkern._build_check import check_build_matches_runtime, load_error, not_built_error
from mmkern._gpus import visible_gpus

try:
    from mmkern import _build_config as build_config
except ImportError:
    raise not_built_error() from None

check_build_matches_runtime(
    build_config, torch.__version__, torch.version.cuda, visible_gpus() if build_config.CUDA_TARGETS else []
)

try:
    from mmkern import _C  # noqa: F401
except ImportError as error:
    raise load_error(build_config, error) from error


def build_info() -> dict:
    """What the extension was compiled against, as the binary reports it:
    {"torch": "2.14", "cuda": "13.0", "archs": "800,900"} (the archs nvcc compiled, PTX or not)."""
    return dict(item.split("=", 1) for item in torch.ops.mmkern.build_info().split(";"))


def cpu_isa() -> str:
    """The ISA variant the C++ CPU kernels' hot loops run: "baseline" (x86-64), "avx2" (AVX2 + FMA) or
    "avx512"; the host's best unless MMKERN_CPU_ISA or set_cpu_isa picked another. Every variant gives
    the same bits."""
    return torch.ops.mmkern.cpu_isa()


def set_cpu_isa(isa: str) -> str:
    """Runs the C++ CPU kernels' ``isa`` variant from now on ("baseline", "avx2", "avx512", or "best":
    the host's best) and returns the one it replaces. A ValueError names the variants this host runs
    if it cannot run ``isa``. The int8 GEMM follows: oneDNN's int8 kernels (``_int_mm``) in the avx512
    variant on a host with VNNI, exact float32 GEMMs over K-chunks otherwise."""
    if not isinstance(isa, str):
        raise TypeError(f"isa must be a str, got {type(isa).__name__}")
    return torch.ops.mmkern.set_cpu_isa(isa)
