"""How mmkern's Triton kernels are launched, and what the installed Triton can run. Imports no Triton
itself, so the ops can ask before a kernel module is loaded."""

import importlib.metadata

import torch

from mmkern import _config


def traceable(kernel):
    """``kernel`` wrapped so that ``traceable(kernel)[grid](...)`` is seen by torch.compile as a Triton
    launch (wrap_triton). Interpreted kernels cannot be traced, and torch 2.6's wrap_triton refuses
    them, so under the interpreter switch the kernel comes back as it is."""
    if _config.TRITON_ON_CPU:
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def runs_on_triton(device: torch.device) -> bool:
    """Whether mmkern's ops run their Triton kernels for tensors on ``device``."""
    return device.type == "cuda" or (device.type == "cpu" and _config.TRITON_ON_CPU)


def triton_has_float64_dot() -> bool:
    # tl.dot takes float64 operands from Triton 3.5 (torch 2.9) on.
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(part) for part in version.split(".")[:2]) >= (3, 5)
