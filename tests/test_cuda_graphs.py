"""On a GPU: every op and module, forward and backward, runs with torch's sync debug mode set to
"error" (any device-to-host sync raises), and is captured in a CUDA graph whose replays give the eager
results, also after its inputs change in place. Without a GPU, tests/test_host_syncs.py holds the
same no-sync guarantee on fake CUDA tensors and under the interpreter."""

import contextlib

import pytest
import torch

from mmkern.bench.host import host_cases
from tests.module_cases import MODULE_CASES, forward, leaves

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and sync debug mode need a GPU")
DEVICE = torch.device("cuda")
HOST_OPS = [case.op for case in host_cases(torch.device("cpu"), torch.float32)]


@contextlib.contextmanager
def syncs_raise():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def op_step(op: str, dtype=torch.float32):
    """(step, inputs): step() runs the op's forward and, where it has one, its backward, returning
    every output and gradient; inputs are the tensors it reads (refilled in place between replays)."""
    case = next(c for c in host_cases(DEVICE, dtype) if c.op == op)
    leaves_of = None if case.leaves is None else case.leaves[0]

    def step():
        out = case.mmkern()
        outs = torch.utils._pytree.tree_leaves(out)
        if leaves_of is None:
            return outs
        return [*outs, *torch.autograd.grad(outs[0], leaves_of, torch.ones_like(outs[0]))]

    floats = [] if leaves_of is None else [t for t in leaves_of if t.is_floating_point()]
    return step, floats


def module_step(name: str):
    module, inputs, kwargs = dict(MODULE_CASES)[name](DEVICE)
    module.eval()  # no dropout: replays must reproduce the eager answer
    wrt = leaves(module, inputs)

    def step():
        out = forward(module, inputs, kwargs)
        return [out, *torch.autograd.grad(out, wrt, torch.ones_like(out))] if wrt else [out]

    return step, [x for x in torch.utils._pytree.tree_leaves(inputs) if x.is_floating_point() and x.requires_grad]


STEPS = [("op", op) for op in HOST_OPS] + [("module", name) for name, _ in MODULE_CASES]


def build(kind, name):
    return op_step(name) if kind == "op" else module_step(name)


@needs_cuda
@pytest.mark.parametrize("kind,name", STEPS)
def test_no_sync_forward_or_backward(kind, name):
    step, _ = build(kind, name)
    step()  # the first call compiles its kernels
    torch.cuda.synchronize()
    with syncs_raise():
        step()
        step()
    torch.cuda.synchronize()


@needs_cuda
@pytest.mark.parametrize("kind,name", STEPS)
def test_a_cuda_graph_replays_the_eager_results(kind, name):
    step, inputs = build(kind, name)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile, and let the caching allocator settle, off the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for round_ in range(2):
        if round_:
            with torch.no_grad():
                for x in inputs:
                    x.mul_(0.5).add_(0.25)
        expected = [t.clone() for t in step()]
        graph.replay()
        torch.cuda.synchronize()
        assert len(captured) == len(expected)
        for got, want in zip(captured, expected):
            assert torch.equal(got, want), f"{kind} {name}: replay {round_} differs from eager"
