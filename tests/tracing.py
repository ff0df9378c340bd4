"""Tracing the ops' CUDA paths with fake CUDA tensors, on a machine with no GPU: what torch.compile's
AOTDispatcher sees, static or with every size symbolic (dynamic shapes)."""

import pytest
import torch

from mmkern import _config

needs_fake_cuda_tracing = pytest.mark.skipif(
    _config.TRITON_ON_CPU or not torch.version.cuda or (torch.__version__ < "2.7" and not torch.cuda.is_available()),
    reason="needs a CUDA build of torch (fake CUDA tensors) from 2.7 on, and traceable (not interpreted) kernels",
)


def traced_calls(fn, *args):
    """The call targets of the graph AOTDispatcher traces from ``fn(*args)``."""
    from torch._functorch.aot_autograd import aot_export_joint_simple

    graph = aot_export_joint_simple(fn, list(args), trace_joint=False)
    return [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]


def symbolic_cuda_tensors(mode, *specs):
    """Fake CUDA tensors of ``mode`` (a FakeTensorMode with a ShapeEnv) whose every size is a
    symbol, as under torch.compile(dynamic=True); ``specs`` are (shape, dtype) pairs."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    tensors = []
    for shape, dtype in specs:
        context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * len(shape))
        tensor = mode.from_tensor(torch.empty(shape, dtype=dtype, device="meta"), symbolic_context=context)
        # A meta tensor stands in for CUDA storage; the fake tensor reports the device it fakes.
        tensor.fake_device = torch.device("cuda", 0)
        tensors.append(tensor)
    return tensors
