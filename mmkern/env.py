"""What is installed and what runs where: ``python -m mmkern.env``.

Prints mmkern's version and location; the torch, CUDA and archs it was built for, and what the
binary says nvcc compiled; the torch, CUDA, Triton and Python running; the kernel each op runs on CPU
and on CUDA; and the GPUs seen, each with whether this build has code for it.
"""

import os
import platform
import sys

import torch

import mmkern
from mmkern import _config
from mmkern._build_check import target_covers
from mmkern._extension import build_config
from mmkern._gpus import visible_gpus
from mmkern.ops._registration import TRITON_KERNELS


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _kernel(qualname: str, device: str) -> str:
    if device in TRITON_KERNELS.get(qualname, ()):
        return "Triton (interpreter)" if device == "cpu" else "Triton"
    if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, device.upper()):
        return "C++" if device == "cpu" else "CUDA C++"
    if any(
        torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
        for key in ("CompositeExplicitAutograd", "CompositeImplicitAutograd")
    ):
        return "C++ (any device)"
    return "none"


def report() -> list:
    """(label, value) rows."""
    location = os.path.dirname(mmkern.__file__)
    binary = mmkern.build_info()
    rows = [
        ("mmkern", f"{mmkern.__version__} at {location}"),
        (
            "built against",
            f"torch {build_config.TORCH}, "
            + (f"CUDA {build_config.CUDA} (nvcc {build_config.NVCC})" if build_config.CUDA else "no CUDA sources"),
        ),
    ]
    if build_config.CUDA:
        rows.append(
            (
                "CUDA archs",
                f"{build_config.CUDA_ARCH_LIST} -> {' '.join(build_config.CUDA_TARGETS)} "
                f"(nvcc compiled {binary.get('archs', '?')})",
            )
        )
    triton_version = _triton_version()
    rows += [
        (
            "running",
            f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
            f"Triton {triton_version or 'not installed'}, Python {platform.python_version()}",
        ),
        (
            "interpreter",
            "on: CPU tensors run the Triton kernels (MMKERN_TRITON_INTERPRET=1)"
            if _config.TRITON_ON_CPU
            else "off (MMKERN_TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors)",
        ),
    ]
    int8_gemm = {"int_mm": "oneDNN's int8 GEMM (VNNI)", "float32_chunks": "exact float32 GEMMs over K-chunks"}
    rows.append(
        (
            "CPU kernels",
            f"{mmkern.cpu_isa()} build of the hot loops (this host runs {torch.ops.mmkern.supported_cpu_isas()}; "
            f"MMKERN_CPU_ISA or mmkern.set_cpu_isa picks another), int8 products: "
            f"{int8_gemm[torch.ops.mmkern.cpu_int8_gemm()]}; on {torch.ops.mmkern.cpu_kernel_threads()} of "
            f"torch's {torch.get_num_threads()} threads",
        )
    )
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mmkern::"))
    for name in names:
        rows.append((f"op {name}", f"CPU: {_kernel(name, 'cpu')}, CUDA: {_kernel(name, 'cuda')}"))
    gpus = visible_gpus() if torch.version.cuda else []
    if not gpus:
        rows.append(("GPUs", "none seen"))
    for gpu in gpus:
        covering = [t for t in build_config.CUDA_TARGETS if target_covers(t, gpu.capability)]
        coverage = (
            f"runs {covering[0]}"
            if covering
            else ("no CUDA C++ built for it" if build_config.CUDA_TARGETS else "CPU-only build: Triton kernels only")
        )
        rows.append((f"GPU {gpu.index}", f"{gpu.name}, {gpu.sm}, {coverage}"))
    return rows


def main() -> int:
    rows = report()
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
