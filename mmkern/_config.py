"""Process-wide switches, read once at import.

MMKERN_TRITON_INTERPRET=1 runs mmkern's Triton kernels in Triton's interpreter and routes CPU tensors
to them instead of the C++ CPU kernels, so the GPU code path can be tested on a machine without a
GPU. It sets TRITON_INTERPRET, which Triton reads when a kernel is defined: set it in the
environment before mmkern is imported. The interpreter is slow and its bf16 tl.dot is wrong; test
bf16 on a GPU.
"""

import os

TRITON_ON_CPU = os.environ.get("MMKERN_TRITON_INTERPRET", "0") == "1"

if TRITON_ON_CPU:
    os.environ["TRITON_INTERPRET"] = "1"
