"""Run-to-run guarantees: bitwise-identical results under torch.use_deterministic_algorithms, the same
answers from several threads at once as from one, and memory that stays flat over many steps."""

import os
import threading

import pytest
import torch

from mmkern import _config, nn, ops, reference
from tests.numerics import DEVICES


def attention_step(device, dtype, dropout_p=0.0):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()
        for shape in ((3, 17, 4, 32), (3, 300, 2, 32), (3, 300, 2, 24))
    )
    kv_lens = torch.tensor([300, 41, 1], device=device)

    def step():
        torch.manual_seed(5)  # the dropout seed
        out = ops.cross_modal_attention(q, k, v, kv_lens=kv_lens, dropout_p=dropout_p)
        return [out.detach(), *torch.autograd.grad(out.square().sum(), (q, k, v))]

    return step


def concat_linear_step(device, dtype):
    generator = torch.Generator().manual_seed(1)
    text, image, weight, bias = (
        torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()
        for shape in ((4, 33, 48), (4, 1, 80), (40, 128), (40,))
    )

    def step():
        out = ops.concat_linear([text, image], weight, bias, activation="gelu")
        return [out.detach(), *torch.autograd.grad(out.square().sum(), (text, image, weight, bias))]

    return step


def quantized_step(device, dtype):
    generator = torch.Generator().manual_seed(2)
    text, image = (
        torch.randn(4, 33, 48, generator=generator).to(device),
        torch.randn(4, 1, 80, generator=generator).to(device),
    )
    weight = torch.randn(40, 128, generator=generator).to(device).requires_grad_()

    def step():
        pairs = [ops.quantize_per_token(x) for x in (text, image)]
        weight_q, weight_scale = ops.quantize_per_token(weight.detach())
        projected = ops.quantized_concat_linear(
            [q for q, _ in pairs], [s for _, s in pairs], weight_q, weight_scale[:, 0], out_dtype=dtype
        )
        fused = ops.quantized_fusion([pairs[1][0], pairs[1][0]], [pairs[1][1], pairs[1][1]], out_dtype=dtype)
        out = ops.quantize_and_concat_linear([text, image], weight)
        return [projected, fused, out.detach(), torch.autograd.grad(out.square().sum(), weight)[0]]

    return step


STEPS = {
    "cross_modal_attention": attention_step,
    "cross_modal_attention_dropout": lambda device, dtype: attention_step(device, dtype, dropout_p=0.25),
    "concat_linear": concat_linear_step,
    "quantized": quantized_step,
}


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(STEPS))
def test_deterministic_algorithms_give_bitwise_identical_runs(op, device, deterministic):
    """Every kernel has a deterministic path (no atomics; split-KV partials and weight gradients are
    reduced in a fixed order; GEMM tiles follow the shape, not timing), so nothing raises."""
    step = STEPS[op](device, torch.float32)
    first, second = step(), step()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(
    _config.TRITON_ON_CPU,
    reason="Triton's interpreter patches triton.language while it runs a "
    "kernel, so interpreted kernels cannot run in two threads at once; GPU launches can",
)
@pytest.mark.parametrize("device", DEVICES)
# Not dropout: its seed comes from torch's global generator, which threads share, so two threads'
# draws interleave (as torch's own dropout's do).
@pytest.mark.parametrize("op", [op for op in STEPS if "dropout" not in op])
def test_threads_get_the_answers_of_one_thread(op, device):
    step = STEPS[op](device, torch.float32)
    expected = step()
    results, errors = [None] * 4, []

    def work(index):
        try:
            if device == "cuda":  # each thread on its own stream, sharing the compiled-kernel cache
                with torch.cuda.stream(torch.cuda.Stream()):
                    results[index] = step()
                torch.cuda.synchronize()
            else:
                results[index] = step()
        except Exception as error:  # re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for result in results:
        for a, b in zip(result, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def module_steps(device):
    attention = nn.CrossModalAttention(64, 4, kdim=48, vdim=48, batch_first=True, device=device)
    concat = nn.ConcatLinear((32, 48), 64, activation="gelu", device=device)
    gated = nn.GatedFusion((32, 48), 64, device=device)
    quantized = nn.QuantizedConcatLinear((32, 48), 64, device=device)
    fusion = nn.QuantizedFusion(2, out_dtype=torch.float32, device=device)
    text = torch.randn(2, 9, 32, device=device, requires_grad=True)
    image = torch.randn(2, 9, 48, device=device, requires_grad=True)
    query = torch.randn(2, 5, 64, device=device, requires_grad=True)
    kv_lens = torch.tensor([9, 4], device=device)

    def step():
        pairs = [ops.quantize_per_token(x.detach()) for x in (image, image)]
        loss = (
            attention(query, image, image, kv_lens=kv_lens)[0].sum()
            + concat(text, image).sum()
            + gated(text, image).sum()
            + quantized(text, image).float().sum()
            + fusion(*pairs).sum()
        )
        loss.backward()

    return step


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
@pytest.mark.parametrize("device", DEVICES)
def test_memory_stays_flat_over_1000_steps(device):
    step = module_steps(device)
    for _ in range(50):  # caches, allocator pools and lazy initialisation settle first
        step()
    before = resident_bytes()
    allocated = torch.cuda.memory_allocated() if device == "cuda" else 0
    for _ in range(1000):
        step()
    grown = resident_bytes() - before
    # A leak of one small tensor per step would be 1000 tensors: several MB at these shapes.
    assert grown < 4 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 1000 steps"
    if device == "cuda":
        # Gradients accumulate in place: the same tensors, so the same bytes.
        assert torch.cuda.memory_allocated() == allocated


def test_reference_is_what_the_step_helpers_compare_with():
    # The steps above are checked against each other; their ops are checked against the reference in
    # the ops' own tests. One spot check that a step computes attention at all:
    step = attention_step("cpu", torch.float64)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(shape, generator=generator).double() for shape in ((3, 17, 4, 32), (3, 300, 2, 32), (3, 300, 2, 24))
    )
    expected = reference.cross_modal_attention(q, k, v, kv_lens=torch.tensor([300, 41, 1]))[0]
    torch.testing.assert_close(step()[0], expected)
