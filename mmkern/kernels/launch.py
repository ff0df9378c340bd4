"""How mmkern's Triton kernels are launched, and what the installed Triton can run. Imports no Triton
itself, so the ops can ask before a kernel module is loaded."""

import functools
import importlib.metadata

import torch

from mmkern import _config


def traceable(kernel):
    """``kernel`` wrapped so that ``traceable(kernel)[grid](...)`` is seen by torch.compile as a Triton
    launch (wrap_triton). Interpreted kernels cannot be traced, and torch 2.6's wrap_triton refuses
    them, so under the interpreter switch the kernel comes back as it is. A new wrapper each call: a
    wrapper holds the kernel's index in torch's side table, which tracing resets."""
    if _config.TRITON_ON_CPU:
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


# Without a GPU to ask (the interpreter, or tracing with fake CUDA tensors) launches are planned as
# for an H100, so the CPU tests take the GPU's paths (split-KV).
INTERPRETER_MULTIPROCESSORS = 132


def multiprocessors(device: torch.device) -> int:
    """The multiprocessor count launches are planned for."""
    if _config.TRITON_ON_CPU or not torch.cuda.is_available():
        return INTERPRETER_MULTIPROCESSORS
    return _cuda_multiprocessors(_cuda_index(device))


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ... and for its compute capability (sm_90: Hopper's paths, TMA and warpgroup MMA).
INTERPRETER_CAPABILITY = 90


def compute_capability(device: torch.device) -> int:
    """The compute capability launches are planned for, as major * 10 + minor (90: Hopper)."""
    if _config.TRITON_ON_CPU or not torch.cuda.is_available():
        return INTERPRETER_CAPABILITY
    return _cuda_capability(_cuda_index(device))


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def power_of_2_at_least(n, smallest: int, largest: int) -> int:
    """The smallest power of 2 in [smallest, largest] that is >= n, else largest. Decided by
    comparisons, so that a symbolic size under torch.compile's dynamic shapes gives a plain int (a
    tile size must be one) and guards on a range of sizes rather than on one size."""
    size = smallest
    while size < largest and n > size:
        size *= 2
    return size


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels sum in: float64 for float64, float32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _tensor_descriptor_class():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # Triton before 3.3 has no host-side tensor descriptors: launches read through pointers
        return None
    return TensorDescriptor


def triton_has_tensor_descriptors() -> bool:
    return _tensor_descriptor_class() is not None


def tma_descriptor(base: torch.Tensor, shape: list, strides: list, block: list, transposed: bool = False):
    """A TMA descriptor reading ``base``'s elements as a tensor of ``shape`` and ``strides`` (the last 1)
    in ``block`` boxes, or None where TMA cannot address it: an empty dim, or a base address or stride
    that is not a non-zero multiple of 16 bytes. Also None where the installed Triton has no host-side
    descriptors (before 3.3). ``transposed``: the shape and strides are those of ``base.T``."""
    TensorDescriptor = _tensor_descriptor_class()
    if TensorDescriptor is None:
        return None
    size = base.element_size()
    try:
        address, tracing = base.data_ptr(), False
    except RuntimeError:  # a fake tensor while tracing: its storage is allocated aligned, its offset is known
        address, tracing = base.storage_offset() * size, True
    if type(address) is not int or address % 16 or not all(shape) or strides[-1] != 1:
        return None
    if any(not stride or (stride * size) % 16 for stride in strides[:-1]):
        return None
    if tracing:
        # torch.compile rebuilds a descriptor from its base alone (from_tensor), so the base must be the
        # tensor the shape and strides are of.
        return TensorDescriptor.from_tensor(base.T if transposed else base, block)
    # TensorDescriptor(base, shape, strides, block) without its checks, made above: they cost a
    # microsecond a descriptor, and a transposed view as the base most of another.
    descriptor = object.__new__(TensorDescriptor)
    descriptor.base, descriptor.shape, descriptor.strides, descriptor.block_shape = base, shape, strides, block
    return descriptor


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision. fp32 follows torch's matmul setting, as F.linear would: TF32 only
    when the user allowed it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def leading_shape(tensors) -> tuple:
    """The shape the tensors' leading dims (all but the last) broadcast to; a RuntimeError if they do
    not."""
    return leading_shape_of([tensor.shape[:-1] for tensor in tensors])


def leading_shape_of(shapes) -> tuple:
    """The shape ``shapes`` broadcast to. Plain Python for plain sizes (torch.broadcast_shapes costs
    tens of microseconds a call); torch's own for torch.compile's symbolic ones, which it guards on."""
    if not all(type(size) is int for shape in shapes for size in shape):
        return tuple(torch.broadcast_shapes(*shapes))
    lead = [1] * max(map(len, shapes), default=0)
    for shape in shapes:
        offset = len(lead) - len(shape)
        for i, size in enumerate(shape):
            if size != 1:
                if lead[offset + i] not in (1, size):
                    raise RuntimeError(f"leading shapes {[tuple(s) for s in shapes]} do not broadcast")
                lead[offset + i] = size
    return tuple(lead)


def planned(plan):
    """``plan`` (a function of a launch's hashable facts: sizes, dtypes, flags) computed once per
    distinct arguments and cached. torch.compile's symbolic sizes cannot be hashed: a call holding
    one is planned afresh (that happens while tracing, not per step)."""
    cached = functools.lru_cache(maxsize=4096)(plan)

    @functools.wraps(plan)
    def lookup(*args):
        try:
            return cached(*args)
        except TypeError as error:
            if "unhashable" not in str(error):
                raise
            return plan(*args)

    lookup.cache_info, lookup.cache_clear = cached.cache_info, cached.cache_clear
    return lookup


def runs_on_triton(device: torch.device) -> bool:
    """Whether mmkern's ops run their Triton kernels for tensors on ``device``."""
    return device.type == "cuda" or (device.type == "cpu" and _config.TRITON_ON_CPU)


def _triton_version() -> tuple:
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return (0, 0)
    return tuple(int(part) for part in version.split(".")[:2])


# Read once at import: torch.compile cannot trace importlib.metadata inside an op's argument checks.
# tl.dot takes float64 operands from Triton 3.5 (torch 2.9) on.
_FLOAT64_DOT = _triton_version() >= (3, 5)


def triton_has_float64_dot() -> bool:
    return _FLOAT64_DOT
