"""How a Triton implementation is attached to an op whose schema lives in csrc/registration.cpp.

torch.library.triton_op would define the schema itself, which clashes with defining it once in
C++ beside the C++ CPU kernel. So this does what triton_op does, for an existing op:
  - eagerly, the implementation runs as the op's CUDA kernel, launching Triton kernels directly;
  - under AOTDispatcher (torch.compile), a FunctionalTensorMode rule decomposes the op into its
    implementation for CUDA tensors, so the compiler sees the wrap_triton'd kernels and calls them
    from its own generated code instead of going through an opaque op;
  - with MMKERN_TRITON_INTERPRET=1 the same implementation is also the CPU kernel (in Triton's
    interpreter), replacing the C++ one, so the GPU code path runs under the CPU test suite.

It also gives ops their autocast behaviour (register_autocast).
"""

import functools
import importlib
from collections.abc import Callable

import torch
import torch.utils._pytree as pytree

from mmkern import _config


def _wrap_triton_disabled():
    # Outside of tracing, wrap_triton would route every launch through a higher-order op;
    # launching the kernels directly is what triton_op does for eager calls too.
    from torch._library.triton import set_wrap_triton_enabled

    return set_wrap_triton_enabled(False)


def _any_cuda_tensor(args) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in pytree.tree_leaves(args))


def _export_keeps_triton_ops_whole() -> bool:
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:  # torch 2.6 has no such switch: export decomposes as compile does
        return False
    return custom_triton_ops_decomposition_disabled()


# qualname -> the devices whose kernel is the Triton implementation (python -m mmkern.env lists them).
TRITON_KERNELS: dict = {}


def triton_implementation(path: str) -> Callable:
    """The function at ``path`` ("module:function", a launcher in mmkern.kernels), imported on its first
    call: importing a kernel module imports Triton, which a CPU-only install may lack."""

    @functools.cache
    def resolve():
        module, name = path.split(":")
        return getattr(importlib.import_module(module), name)

    return lambda *args, **kwargs: resolve()(*args, **kwargs)


def register_triton_kernel(qualname: str, implementation) -> None:
    """``implementation`` (a launcher taking the op's arguments and returning its outputs, or its
    "module:function" path) becomes the op's CUDA kernel (and its CPU one under the interpreter switch)."""
    TRITON_KERNELS[qualname] = ("cuda", "cpu") if _config.TRITON_ON_CPU else ("cuda",)
    if isinstance(implementation, str):
        implementation = triton_implementation(implementation)

    def eager_kernel(*args, **kwargs):
        with _wrap_triton_disabled():
            return implementation(*args, **kwargs)

    torch.library.register_kernel(qualname, "cuda", eager_kernel)
    if _config.TRITON_ON_CPU:
        # Interpreted kernels are not traceable (wrap_triton hands them back untouched), so the
        # op stays opaque to torch.compile in this mode.
        torch.library.register_kernel(qualname, "cpu", eager_kernel)
        return

    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def decompose_for_compile(mode, op, types, args, kwargs):
        known_types = all(issubclass(t, (FakeTensor, FunctionalTensor)) or t is torch.Tensor for t in types)
        if not known_types:
            return NotImplemented
        # torch.export keeps the op whole (a serialisable graph); CPU tensors keep the C++ kernel.
        if _export_keeps_triton_ops_whole() or not _any_cuda_tensor((args, kwargs)):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return implementation(*args, **kwargs)

    torch.library.register_torch_dispatch(qualname, FunctionalTensorMode, decompose_for_compile)


AUTOCAST_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU) | torch._C.DispatchKeySet(
    torch._C.DispatchKey.AutocastCUDA
)
_AUTOCAST_LIBRARY = torch.library.Library("mmkern", "IMPL")


def autocast_dtype_of(tensor: torch.Tensor, autocast_dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast gives a tensor: lower-precision floats go to the autocast dtype; float64
    and non-floating tensors are left alone, as torch's own autocast does."""
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        return autocast_dtype
    return tensor.dtype


def dtype_after_autocast(tensor: torch.Tensor) -> torch.dtype:
    """The dtype an op's autocast kernel gives ``tensor``: its own outside autocast."""
    device_type = tensor.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return autocast_dtype_of(tensor, torch.get_autocast_dtype(device_type))
    return tensor.dtype


def register_autocast(qualname: str, cast_inputs: bool) -> None:
    """Under autocast, casts the op's floating inputs to the autocast dtype (when ``cast_inputs``)
    and runs it with autocast off, so the kernels' own internal matmuls are never re-cast. A backward
    op takes ``cast_inputs=False``: its gradients must keep the forward's dtypes."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default

    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):

        def kernel(*args, _device_type=device_type, **kwargs):
            if cast_inputs:
                dtype = torch.get_autocast_dtype(_device_type)
                args, kwargs = pytree.tree_map_only(
                    torch.Tensor, lambda t: t.to(autocast_dtype_of(t, dtype)), (args, kwargs)
                )
            with torch._C._ExcludeDispatchKeyGuard(AUTOCAST_KEYS):
                return op(*args, **kwargs)

        _AUTOCAST_LIBRARY.impl(name, kernel, key)
