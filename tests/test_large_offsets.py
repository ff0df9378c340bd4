"""Element offsets past 2^31: every kernel must widen its index arithmetic to int64 before an offset
can pass int32's range. Rows here lie 2^30 elements apart in one large storage, so the third row
starts past 2^31. The storage is allocated but never touched beyond the rows, so it costs address
space, not memory. On CPU this checks the C++ kernels and, under MMKERN_TRITON_INTERPRET=1, the
Triton kernels' index arithmetic (an int32 offset there wraps and reads outside the storage)."""

import pytest
import torch

from mmkern import ops, reference
from tests.numerics import DEVICES

ROW_STRIDE = 2**30


@pytest.fixture(scope="module")
def storage_by_device():
    storages = {}

    def storage(device):
        if device not in storages:
            storages[device] = torch.empty(4 * ROW_STRIDE + 4096, dtype=torch.float16, device=device)
        return storages[device]

    yield storage
    storages.clear()


def spread_rows(storage, shape, first, seed):
    """A (*shape) view of ``storage`` whose dim -2 steps ROW_STRIDE elements, filled with randn."""
    strides = [0] * (len(shape) - 2) + [ROW_STRIDE, 1]
    view = storage.as_strided(shape, strides, storage_offset=first)
    view.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    return view


def leaves(*tensors):
    return [t.detach().double().cpu().requires_grad_() for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
def test_attention_reads_rows_past_2_31_elements(storage_by_device, device):
    storage = storage_by_device(device)
    # (B, L, H, D) with one head: the length dim steps ROW_STRIDE.
    q = spread_rows(storage, (1, 4, 16), 0, 0).unsqueeze(2).requires_grad_()
    k = spread_rows(storage, (1, 4, 16), 16, 1).unsqueeze(2).requires_grad_()
    v = spread_rows(storage, (1, 4, 8), 32, 2).unsqueeze(2).requires_grad_()
    assert q.storage_offset() + 3 * q.stride(1) >= 2**31
    out = ops.cross_modal_attention(q, k, v)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    exact_inputs = leaves(q, k, v)
    exact = reference.cross_modal_attention(*exact_inputs)[0]
    exact_grads = torch.autograd.grad(exact.square().sum(), exact_inputs)
    torch.testing.assert_close(out.double().cpu(), exact, rtol=0, atol=2e-3)
    for grad, exact_grad in zip(grads, exact_grads):
        torch.testing.assert_close(grad.double().cpu(), exact_grad, rtol=0, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_concat_linear_reads_rows_past_2_31_elements(storage_by_device, device):
    storage = storage_by_device(device)
    text = spread_rows(storage, (4, 24), 64, 3).requires_grad_()
    image = spread_rows(storage, (4, 8), 96, 4).requires_grad_()
    weight = torch.randn(5, 32, dtype=torch.float16, device=device, requires_grad=True)
    out = ops.concat_linear([text, image], weight)
    grads = torch.autograd.grad(out.float().square().sum(), (text, image, weight))
    exact_inputs = leaves(text, image, weight)
    exact = reference.concat_linear(exact_inputs[:2], exact_inputs[2])
    exact_grads = torch.autograd.grad(exact.square().sum(), exact_inputs)
    torch.testing.assert_close(out.double().cpu(), exact, rtol=0, atol=2e-2)
    for grad, exact_grad in zip(grads, exact_grads):
        torch.testing.assert_close(grad.double().cpu(), exact_grad, rtol=2e-2, atol=2e-1)
