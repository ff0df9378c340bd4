"""The attention kernels' TMA paths, which Hopper takes and Triton's interpreter runs on CPU tensors
(planned as for sm_90): where every key is valid (no kv_lens, not packed) the forward and the query
gradient read K and V through tensor descriptors; where every query is valid the key-and-value
gradient reads Q and dO so. Each test checks which path its launches took, so a plan that quietly
fell back to pointers fails."""

import pytest
import torch

from mmkern import ops
from mmkern.kernels import cross_modal_attention as attention
from mmkern.kernels.launch import runs_on_triton
from tests.numerics import DEVICES, dtypes_for
from tests.test_attention_variants import materialise
from tests.test_cross_modal_attention import check_against_reference, forward_and_grads, make_case, mmkern_attention

# name: (B, Lq, Lk, Hq, Hkv, D, Dv, kv_lens, q_lens), every key valid.
DENSE = {
    # Odd head dims (boxes padded to 64 and 32 columns, zero-filled past D and Dv), one key head.
    "odd_dims_one_key_head": (2, 33, 70, 4, 1, 40, 24, None, None),
    # Query lengths do not stop TMA (it reads only K and V); keys not a multiple of the block.
    "query_lengths_head_dim_128": (2, 97, 130, 2, 2, 128, 64, None, [97, 50]),
    # Few queries over many keys: split-KV, with a group's query heads packed into one tile's rows.
    "few_queries_split_keys": (2, 3, 700, 4, 2, 32, 32, None, None),
}
VARIANTS = {
    "plain": {},
    # A block's keys past the window's end, read by the box, get zero weight.
    "two_sided_window": {"window": (20, 3)},
    # The kept range ends inside a block: the box reads masked keys past it.
    "causal_key_holes_softcap_sinks_bias": {
        "causal": True,
        "key_mask": "holes",
        "softcap": 2.0,
        "sinks": True,
        "bias": "full",
    },
}


def _skip_off_triton(device):
    if not runs_on_triton(torch.device(device)):
        pytest.skip("TMA is the Triton kernels'")


# The constexpr that says a kernel reads through descriptors.
TMA_FLAGS = {"_forward_kernel": "KV_TMA", "_grad_q_kernel": "KV_TMA", "_grad_kv_kernel": "Q_TMA"}


def _forward_reads(launches) -> list:
    return _reads(launches)["_forward_kernel"]


def _reads(launches) -> dict:
    """kernel name: whether each of its launches read through descriptors."""
    reads = {name: [] for name in TMA_FLAGS}
    for name, _, kwargs in launches:
        if name in TMA_FLAGS:
            reads[name].append(kwargs[TMA_FLAGS[name]])
    return reads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(DENSE))
def test_dense_keys_are_read_through_tma(case, variant, device, attention_launches):
    """Outputs, lse and gradients against the float64 reference, every dtype, with the forward and the
    query gradient through descriptors, and the key-and-value gradient too where every query is valid
    (float64 through pointers: it has no tensor-core dot to feed)."""
    _skip_off_triton(device)
    params = DENSE[case]
    dense_queries = params[8] is None
    for dtype in dtypes_for(device):
        attention_launches.clear()
        check_against_reference(params, dtype, device, **materialise(params, VARIANTS[variant], device))
        reads, tma = _reads(attention_launches), dtype != torch.float64
        assert reads["_forward_kernel"] and set(reads["_forward_kernel"]) == {tma}, (dtype, reads)
        assert reads["_grad_q_kernel"] and set(reads["_grad_q_kernel"]) == {tma}, (dtype, reads)
        assert reads["_grad_kv_kernel"] == [tma and dense_queries], (dtype, reads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tma_gives_the_pointer_paths_bits(variant, device, attention_launches, monkeypatch):
    """The keys a box reads past a block's end (past the window, or the last kept key) get zero weight,
    and rows past the tensor's come in as the pointer path's zeros, so output, lse and gradients
    through descriptors equal the pointer path's bit for bit on a GPU. Under the interpreter the dots
    are numpy's, whose BLAS may order a product's sums by the operands' layouts (OpenBLAS's small
    kernels on an AVX-512 Xeon do, by up to 7 float32 ulps of the largest value), which the two paths
    lay out differently: there they must agree to a few ulps, where a key given weight it should not
    have, or a row read as anything but zeros, moves the results by far more."""
    _skip_off_triton(device)
    params = DENSE["odd_dims_one_key_head"]
    q, k, v, lengths = make_case(*params, torch.float32, device)
    options = materialise(params, VARIANTS[variant], device, torch.float32)
    grad_out = torch.randn(*q.shape[:3], v.shape[3], device=device)
    through_tma = forward_and_grads(mmkern_attention, q, k, v, grad_out, **lengths, **options)
    assert _reads(attention_launches) == {name: [True] for name in TMA_FLAGS}
    attention_launches.clear()
    monkeypatch.setattr(attention, "_row_descriptors", lambda *args: None)
    through_pointers = forward_and_grads(mmkern_attention, q, k, v, grad_out, **lengths, **options)
    assert _reads(attention_launches) == {name: [False] for name in TMA_FLAGS}
    for tma, pointers in zip((*through_tma[:2], *through_tma[2]), (*through_pointers[:2], *through_pointers[2])):
        if device == "cuda":
            assert torch.equal(tma, pointers)
        else:
            ulps = 32 * torch.finfo(torch.float32).eps * pointers.abs().max().item()
            torch.testing.assert_close(tma, pointers, rtol=0, atol=ulps)


def _misaligned(t):
    """``t``'s values in a tensor whose base is one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    return flat.view(t.shape).copy_(t)


def _odd_row_stride(t):
    """``t``'s values with a row stride of D + 1 elements (not a multiple of 16 bytes)."""
    wide = torch.empty(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)[..., : t.shape[-1]]
    return wide.copy_(t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["key_lengths", "packed", "misaligned_base", "odd_row_stride", "no_keys", "float64"])
def test_keys_tma_cannot_read_safely_take_pointers(case, device, attention_launches):
    """Key lengths (a box would read padding that is never to be read) and packed samples (the next
    sample's keys) keep the pointer path, as do bases and strides TMA cannot address, empty keys and
    float64; each still matches the reference."""
    _skip_off_triton(device)
    params = list(DENSE["odd_dims_one_key_head"])
    dtype = torch.float64 if case == "float64" else torch.float32
    if case == "key_lengths":
        params[7] = [70, 31]
    if case == "no_keys":
        params[2] = 0
    if case == "packed":
        q, k, v, _ = make_case(*params, dtype, device)
        cu = torch.tensor([0, 33, 66], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 70, 140], dtype=torch.int32, device=device)
        packed = ops.cross_modal_attention_packed(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu_k, 33, 70)
        padded = ops.cross_modal_attention(q, k, v)
        torch.testing.assert_close(packed.view_as(padded), padded, rtol=1e-6, atol=1e-6)
        assert _forward_reads(attention_launches) == [False, True]
        return
    if case in ("misaligned_base", "odd_row_stride"):
        layout = _misaligned if case == "misaligned_base" else _odd_row_stride
        q, k, v, lengths = make_case(*params, dtype, device)
        expected = ops.cross_modal_attention(q, k, v, **lengths)
        out = ops.cross_modal_attention(q, layout(k), layout(v), **lengths)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        assert _forward_reads(attention_launches) == [True, False]
        return
    check_against_reference(params, dtype, device)
    reads = _reads(attention_launches)
    assert not any(reads["_forward_kernel"] + reads["_grad_q_kernel"]), reads
    # Every query is valid: the key-and-value gradient still reads Q and dO through descriptors, where
    # it runs (keys to take gradients of) and the dtype has them.
    assert reads["_grad_kv_kernel"] == ([] if case == "no_keys" else [case == "key_lengths"]), reads
