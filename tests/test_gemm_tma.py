"""The segmented GEMM's TMA path (tensor descriptors on a persistent grid), which Hopper's default tiles
take: forced here through Triton's interpreter, which runs descriptors on CPU tensors. Each test checks
that the path it means was taken, so a plan that quietly fell back to pointers would fail it."""

import pytest
import torch

from mmkern.kernels import segmented_matmul, tiles
from mmkern.kernels.launch import runs_on_triton
from mmkern.kernels.tiles import GemmTile
from tests.numerics import DEVICES, dtypes_for
from tests.test_concat_linear import check_against_reference
from tests.test_quantized_concat_linear import check_case

# Every segment's K and the concatenated width are multiples of 16 elements, so every base and leading
# stride is 16-byte aligned for each dtype TMA takes (the weight's column slices included).
ALIGNED = [(2, 21, 48), (2, 1, 32), (21, 16)]
TMA_TILES = {
    "plain": GemmTile(16, 32, 16, 4, 4, 2, tma=True),
    "halves": GemmTile(16, 64, 16, 4, 4, 2, tma=True),
    "quarters": GemmTile(16, 256, 16, 4, 4, 2, tma=True),
    "long_k_step": GemmTile(32, 32, 64, 4, 4, 2, tma=True),  # steps past the end of K: zero-filled
}


def _skip_off_triton(device):
    if not runs_on_triton(torch.device(device)):
        pytest.skip("TMA is the Triton GEMM's")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", list(TMA_TILES))
def test_tma_matches_the_reference_in_every_layout(path, device, tma_launches):
    """Forward (A row-major, B the weight's transposed column slices), input gradients (B row-major) and
    weight gradients (A the output gradient's transpose), with the broadcast addend, bias and a smooth
    activation's saved pre-activation."""
    _skip_off_triton(device)
    with tiles.override("gemm", lambda *shape: TMA_TILES[path]):
        for dtype in dtypes_for(device):
            if dtype == torch.float64:
                continue  # no TMA for float64 (its dot has no tensor-core form to feed)
            tma_launches.clear()
            check_against_reference(ALIGNED, 40, True, "gelu", dtype, device)
            assert None not in tma_launches
            assert {(False, True), (False, False), (True, False)} <= set(tma_launches), tma_launches


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tma", [True, False])
def test_persistent_programs_take_every_tile(tma, device, tma_launches, monkeypatch):
    """A persistent grid planned for one multiprocessor: two programs loop over 9 to 30 output tiles each
    (through TMA or pointers)."""
    _skip_off_triton(device)
    monkeypatch.setattr(segmented_matmul, "multiprocessors", lambda device: 1)
    grids = []
    launch = segmented_matmul.segmented_matmul_kernel

    class Recording:
        def __getitem__(self, grid):
            grids.append(grid)
            return launch[grid]

    monkeypatch.setattr(segmented_matmul, "traceable", lambda kernel: Recording())
    segmented_matmul._launch_plan.cache_clear()
    tile = GemmTile(16, 32, 16, 4, 4, 2, tma=tma, persistent=True)
    try:
        with tiles.override("gemm", lambda *shape: tile):
            check_against_reference([(3, 37, 48), (3, 1, 32)], 136, True, "silu", torch.float32, device)
    finally:
        segmented_matmul._launch_plan.cache_clear()
    assert grids and all(grid[0] <= 2 for grid in grids), grids
    assert (None not in tma_launches) if tma else not tma_launches


@pytest.mark.parametrize("device", DEVICES)
def test_tma_with_split_k(device, tma_launches, short_k_splits):
    """Weight gradients with K split across programs: no step reads into the next split's K."""
    _skip_off_triton(device)
    with tiles.override("gemm", lambda *shape: TMA_TILES["plain"]):
        check_against_reference([(2, 40, 48), (2, 1, 32)], 24, True, "none", torch.float32, device)
    assert tma_launches and None not in tma_launches


@pytest.mark.parametrize("device", DEVICES)
def test_int8_through_tma_keeps_the_integer_sums_exact(device, tma_launches):
    _skip_off_triton(device)
    with tiles.override("gemm", lambda *shape: GemmTile(16, 32, 32, 4, 4, 2, tma=True)):
        check_case([(4, 37, 64), (4, 1, 96)], 48, True, "gelu", device)
    assert tma_launches and None not in tma_launches


@pytest.mark.parametrize("device", DEVICES)
def test_operands_tma_cannot_address_take_the_pointer_path(device, tma_launches):
    """Leading strides of 40 or 14 bytes and a weight sliced at odd columns: the launches that read them
    are planned for TMA, read through pointers, and still right."""
    _skip_off_triton(device)
    with tiles.override("gemm", lambda *shape: TMA_TILES["plain"]):
        check_against_reference([(2, 21, 20), (2, 1, 7), (21, 5)], 24, True, "gelu", torch.float16, device)
    assert None in tma_launches


def test_only_hopper_reads_through_tma():
    """The default tiles ask for TMA on sm_90; Ampere (whose Triton would turn descriptor loads into plain
    ones) never takes it, nor does float64."""
    plan = segmented_matmul._launch_plan.__wrapped__
    common = (1024, 768, (768,), False, torch.bfloat16, torch.bfloat16, False, None, False, False, "none", 132)
    with tiles.override("gemm", lambda *shape: GemmTile(128, 128, 64, 8, 8, 3, tma=True)):
        hopper = plan(*common, 90, "ieee", False)
        ampere = plan(*common, 80, "ieee", False)
        double = plan(*common[:4], torch.float64, torch.float64, *common[6:], 90, "ieee", False)
    assert hopper[4] and not ampere[4] and not double[4]


def test_what_tma_can_address():
    """A 16-byte aligned base and leading stride, a contiguous last dim (of the operand or its transpose),
    no empty or repeated (stride-0) dim."""
    x = torch.randn(32, 64, dtype=torch.float16)
    descriptor, transposed = segmented_matmul._tma_operand(x, (16, 32))
    assert not transposed and list(descriptor.shape) == [32, 64] and list(descriptor.block_shape) == [16, 32]
    descriptor, transposed = segmented_matmul._tma_operand(x.T, (32, 16))
    assert transposed and list(descriptor.shape) == [32, 64] and list(descriptor.strides) == [64, 1]
    assert list(descriptor.block_shape) == [16, 32]
    assert segmented_matmul._tma_operand(x[:, 8:40], (16, 16)) is not None  # offset 16 bytes
    for unaddressable in (
        x[:, 1:33],  # base 2 bytes past alignment
        x[:, :36].contiguous()[:, :33],  # leading stride 72 bytes
        torch.randn(1, 64, dtype=torch.float16).expand(32, 64),  # every row the same memory
        x[::2, ::2],  # no contiguous dim
        x[:0],  # no rows
    ):
        assert segmented_matmul._tma_operand(unaddressable, (16, 16)) is None
