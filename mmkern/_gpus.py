"""The GPUs this process can see, found without initialising CUDA.

mmkern checks them at import. Initialising CUDA there would break every program that forks workers
afterwards (DataLoader, multiprocessing), so the GPUs are read through NVML, as torch does for
PYTORCH_NVML_BASED_CUDA_CHECK, unless CUDA is initialised already.
"""

import ctypes
import os
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    capability: tuple  # (major, minor)

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


def visible_indices(cuda_visible_devices: str | None, count: int) -> list:
    """The physical indices CUDA_VISIBLE_DEVICES leaves visible, in order. CUDA reads the list up to
    its first invalid entry; UUID or MIG entries are not resolved here, so they leave every GPU."""
    if cuda_visible_devices is None:
        return list(range(count))
    indices = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if re.fullmatch(r"-?\d+", entry) is None:
            # A UUID or MIG name only the driver resolves: check every GPU rather than none.
            return list(range(count)) if entry and not indices else indices
        index = int(entry)
        if not 0 <= index < count or index in indices:
            break
        indices.append(index)
    return indices


def _nvml_gpus() -> list:
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return []  # no NVIDIA driver: no GPU CUDA could use either
    if nvml.nvmlInit_v2() != 0:
        return []
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return []
        gpus = []
        for index in visible_indices(os.environ.get("CUDA_VISIBLE_DEVICES"), count.value):
            handle, name = ctypes.c_void_p(), ctypes.create_string_buffer(96)
            major, minor = ctypes.c_int(), ctypes.c_int()
            if (
                nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0
                or nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0
            ):
                continue
            nvml.nvmlDeviceGetName(handle, name, len(name))
            gpus.append(GPU(len(gpus), name.value.decode(errors="replace"), (major.value, minor.value)))
        return gpus
    finally:
        nvml.nvmlShutdown()


def visible_gpus() -> list:
    if torch.version.cuda and torch.cuda.is_initialized():
        return [
            GPU(i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())
        ]
    return _nvml_gpus()
