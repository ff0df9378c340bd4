"""The eager fast path (mmkern.ops._eager): outside torch.compile, calls on the GPU path skip the
dispatcher and torch.library's autograd wrapper. It must give the registered op's results bit for bit,
gradients included, and must step aside wherever a graph or a mode has to see the op."""

import pytest
import torch

from mmkern import _config, ops
from mmkern.bench.host import host_cases
from mmkern.ops import _eager
from tests.numerics import DEVICES

gpu_path = [d for d in DEVICES if d == "cuda" or _config.TRITON_ON_CPU]
needs_gpu_path = pytest.mark.skipif(not gpu_path, reason="the fast path is the GPU path's: CUDA or the interpreter")


def outputs_and_gradients(case, seed=0):
    torch.manual_seed(seed)
    out = case.mmkern()
    if case.leaves is None:
        return torch.utils._pytree.tree_leaves(out)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
    return [out, *torch.autograd.grad(out, case.leaves[0], grad)]


def both_paths(fn, monkeypatch):
    fast = fn()
    monkeypatch.setattr(_eager, "enabled", False)
    slow = fn()
    monkeypatch.setattr(_eager, "enabled", True)
    return fast, slow


@needs_gpu_path
@pytest.mark.parametrize("device", gpu_path)
@pytest.mark.parametrize("op", [case.op for case in host_cases(torch.device("cpu"), torch.float32)])
def test_fast_path_is_bitwise_the_op(op, device, monkeypatch):
    case = next(c for c in host_cases(torch.device(device), torch.float32) if c.op == op)
    fast, slow = both_paths(lambda: outputs_and_gradients(case), monkeypatch)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


@needs_gpu_path
@pytest.mark.parametrize("device", gpu_path)
@pytest.mark.parametrize("packed", [False, True])
def test_fast_path_draws_the_ops_dropout(device, packed, monkeypatch):
    generator = torch.Generator().manual_seed(4)
    q, k, v = (
        torch.randn(shape, generator=generator).to(device).requires_grad_()
        for shape in ((2, 6, 4, 8), (2, 9, 2, 8), (2, 9, 2, 8))
    )
    kv_lens = torch.tensor([9, 4], device=device)
    cu = torch.tensor([0, 6, 12], device=device), torch.tensor([0, 9, 13], device=device)

    def attend():
        torch.manual_seed(11)
        if packed:
            out = ops.cross_modal_attention_packed(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), *cu, 6, 9, dropout_p=0.3
            )
        else:
            out = ops.cross_modal_attention(q, k, v, kv_lens=kv_lens, dropout_p=0.3)
        return [out, *torch.autograd.grad(out.square().sum(), (q, k, v))]

    for a, b in zip(*both_paths(attend, monkeypatch)):
        assert torch.equal(a, b)


@needs_gpu_path
@pytest.mark.parametrize("device", gpu_path)
def test_fast_path_under_autocast_is_the_op(device, monkeypatch):
    generator = torch.Generator().manual_seed(5)
    text, image = torch.randn(2, 7, 16, generator=generator).to(device), torch.randn(2, 1, 8, generator=generator)
    weight = torch.randn(12, 24, generator=generator).to(device).requires_grad_()
    image = image.to(device).requires_grad_()

    def project():
        with torch.autocast(device, dtype=torch.float16):
            out = ops.concat_linear([text, image], weight, activation="silu")
        return [out, *torch.autograd.grad(out.float().sum(), (image, weight))]

    fast, slow = both_paths(project, monkeypatch)
    assert fast[0].dtype == torch.float16 and fast[2].dtype == torch.float32
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


@needs_gpu_path
@pytest.mark.parametrize("device", gpu_path)
def test_a_gradient_of_part_of_the_outputs(device):
    """An unused output's gradient stays None (set_materialize_grads(False)): no zeros are filled."""
    q, k, v = (torch.randn(2, 5, 2, 8, device=device, requires_grad=True) for _ in range(3))
    out, lse = ops.cross_modal_attention(q, k, v, return_lse=True)
    (grad_q,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(grad_q).all()


def test_the_fast_path_steps_aside_for_graphs_modes_and_subclasses():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(3, 4)
    runs = _config.TRITON_ON_CPU  # CPU tensors take the GPU path only under the interpreter switch
    assert _eager.takes_eager_path([x, None]) is runs
    with FlopCounterMode(display=False):
        assert not _eager.takes_eager_path([x])
    with FakeTensorMode() as mode:
        assert not _eager.takes_eager_path([mode.from_tensor(x)])
    assert not _eager.takes_eager_path([None])
    seen = []
    torch.func.vmap(lambda row: seen.append(_eager.takes_eager_path([row])) or row)(x)
    compiled = torch.compile(lambda t: seen.append(_eager.takes_eager_path([t])) or t, backend="eager", fullgraph=False)
    compiled(x)
    assert seen and not any(seen)


cpp_kernels = pytest.mark.skipif(_config.TRITON_ON_CPU, reason="the interpreter switch sends CPU tensors to Triton")


@cpp_kernels
@pytest.mark.parametrize("op", [case.op for case in host_cases(torch.device("cpu"), torch.float32)])
def test_a_cpu_call_past_the_dispatcher_is_bitwise_the_op(op, monkeypatch):
    """Without gradients a CPU call goes straight to the C++ kernel (mmkern.ops._eager.call_op); with
    them it takes the registered op. Either way the results are the op's, bit for bit."""
    case = next(c for c in host_cases(torch.device("cpu"), torch.float32) if c.op == op)
    with torch.no_grad():
        past, through = both_paths(lambda: torch.utils._pytree.tree_leaves(case.mmkern()), monkeypatch)
    for a, b in zip(past, through, strict=True):
        assert torch.equal(a, b)
    with_gradients, registered = both_paths(lambda: outputs_and_gradients(case), monkeypatch)
    for a, b in zip(with_gradients, registered, strict=True):
        assert torch.equal(a, b)


class _RecordingOp:
    """Stands in for an OpOverload: records whether call_op redispatched past the dispatcher."""

    def __init__(self):
        self.paths = []

    def __call__(self, x):
        self.paths.append("dispatcher")
        return x

    def redispatch(self, keys, x):
        assert keys.has(torch._C.DispatchKey.CPU)
        self.paths.append("cpu kernel")
        return x


@cpp_kernels
def test_a_cpu_call_takes_the_dispatcher_where_something_needs_it():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, leaf = torch.randn(3, 4), torch.randn(3, 4, requires_grad=True)
    op = _RecordingOp()
    _eager.call_op(op, [x, None], x)
    assert op.paths == ["cpu kernel"]
    cases = {
        "a gradient": lambda: _eager.call_op(op, [x, leaf], x),
        "autocast": lambda: _eager.call_op(op, [x], x),
        "a profiler": lambda: _eager.call_op(op, [x], x),
        "fake tensors": lambda: _eager.call_op(op, [fake], fake),
        "compile": lambda: torch.compile(lambda t: _eager.call_op(op, [t], t), backend="eager", fullgraph=True)(x),
        "vmap": lambda: torch.func.vmap(lambda row: _eager.call_op(op, [row], row))(x),
    }
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    for name, call in cases.items():
        op.paths.clear()
        if name == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                call()
        elif name == "a profiler":
            with torch.profiler.profile():
                call()
        elif name == "fake tensors":
            with mode:
                call()
        else:
            call()
        assert op.paths and set(op.paths) == {"dispatcher"}, name
    with torch.no_grad():
        op.paths.clear()
        _eager.call_op(op, [leaf], leaf)
        assert op.paths == ["cpu kernel"]
