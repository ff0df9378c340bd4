"""The eager fast paths: the ops' GPU path, and their C++ CPU kernels.

Outside torch.compile, a call on CUDA tensors (or CPU ones under the interpreter switch) runs the op's
Triton launcher directly, inside a ``torch.autograd.Function`` when something needs a gradient: no
dispatcher round trip, no torch.library Python autograd wrapper (which fills defaults and redispatches
on every call). Everything a graph or a mode must see still goes through the registered op: under
torch.compile and export, inside a dispatch mode (fake tensors, FlopCounterMode, ...), under functorch
transforms, and for tensor subclasses. Both paths launch the same kernels with the same arguments,
so their results are bitwise equal (tests/test_eager_path.py holds them together).

On the C++ CPU path, ``call_op`` does the same for calls that need no gradient: it goes to the op's CPU
kernel past the dispatcher's autograd layer, under the same conditions.
"""

import contextlib

import torch

from mmkern.kernels.launch import runs_on_triton
from mmkern.ops._registration import AUTOCAST_KEYS, autocast_dtype_of

_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Off, every call takes the registered op: tests compare the two paths (tests/test_eager_path.py).
enabled = True


def _uncaptured_device(tensors):
    """The device of a call on ``tensors`` (the op's tensor arguments, None for an absent one) when they
    are plain tensors and nothing traces or intercepts the call, else None."""
    if not enabled:
        return None
    device = None
    for tensor in tensors:
        if tensor is None:
            continue
        if type(tensor) not in _PLAIN:
            return None
        device = tensor.device
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() != 0
        or torch._C._are_functorch_transforms_active()
    ):
        return None
    return device


def takes_eager_path(tensors) -> bool:
    """Whether a call on ``tensors`` takes the fast path: plain tensors on the GPU path, and nothing
    tracing or intercepting the call."""
    device = _uncaptured_device(tensors)
    return device is not None and runs_on_triton(device)


_CPU_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def call_op(op, tensors, *args):
    """``op(*args)``; straight to its C++ CPU kernel, past the dispatcher's autograd and autocast layers,
    for plain CPU tensors of which none needs a gradient, autocast off, no profiler (which sees an op
    only as the dispatcher enters it) and nothing tracing: the autograd layer is torch.library's Python
    wrapper, which cost a small call (quantized_fusion of three (1, 1, 16)) 7 us of its 11. The same
    kernel either way, so the same bits."""
    device = _uncaptured_device(tensors)
    if (
        device is not None
        and device.type == "cpu"
        and not runs_on_triton(device)
        and not needs_gradient(tensors)
        and not torch.is_autocast_enabled("cpu")
        and not torch.autograd._profiler_enabled()
    ):
        return op.redispatch(_CPU_KERNEL, *args)
    return op(*args)


def autocast_inputs(tensors, device_type: str) -> list:
    """``tensors`` as the op's autocast kernel casts them (lower-precision floats to the autocast
    dtype; None, float64 and integer tensors as they are), or as they are outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return [t if t is None or not t.is_floating_point() else t.to(autocast_dtype_of(t, dtype)) for t in tensors]


def without_autocast(device_type: str):
    """What the op's autocast kernel runs its kernel under: autocast off, so nothing inside is re-cast."""
    if torch.is_autocast_enabled(device_type):
        return torch._C._ExcludeDispatchKeyGuard(AUTOCAST_KEYS)
    return contextlib.nullcontext()


def needs_gradient(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def eager_function(launcher, setup_context, backward):
    """An autograd.Function running ``launcher`` with an op's registered formulas (``setup_context``
    and ``backward``, as given to torch.library.register_autograd), for ops whose differentiable
    arguments are all top-level tensors and whose backward has no launcher of its own. List arguments
    pass through as they are (they carry no gradient); their gradients, lists of None, become None."""

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = launcher(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return tuple(None if isinstance(g, list) else g for g in backward(ctx, *grads))

    return EagerFunction
