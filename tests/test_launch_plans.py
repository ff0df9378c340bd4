"""The host-side plans of the Triton launches: tiles chosen from shapes alone, and scalars that keep
float64's precision. These run without a GPU in every test mode."""

import pytest
import torch

from mmkern import _config
from mmkern.kernels.cross_modal_attention import float_halves
from mmkern.kernels.launch import power_of_2_at_least
from mmkern.kernels.segmented_matmul import gemm_tile

H100_MULTIPROCESSORS = 132


@pytest.mark.parametrize("n, expected", [(0, 16), (1, 16), (16, 16), (17, 32), (100, 128), (129, 128), (10**9, 128)])
def test_power_of_2_at_least(n, expected):
    assert power_of_2_at_least(n, 16, 128) == expected


@pytest.mark.parametrize("x", [0.125, 1 / 3, 0.08838834764831845, 1 / 0.7, 1e-30, 3e38])
def test_float_halves_keep_float64_precision(x):
    hi, lo = float_halves(x)
    # Both halves survive Triton's float32 argument, and their float64 sum is x to 2^-48.
    as_float32 = torch.tensor([hi, lo], dtype=torch.float32).double()
    assert as_float32[0].item() == hi
    assert abs(as_float32.sum().item() - x) <= 2**-48 * abs(x)


@pytest.mark.skipif(_config.TRITON_ON_CPU, reason="the interpreter always takes its one small tile")
def test_gemm_tiles_follow_the_shape_alone():
    big = gemm_tile(8192, 8192, torch.bfloat16, H100_MULTIPROCESSORS)
    assert (big["BLOCK_M"], big["BLOCK_N"], big["BLOCK_K"], big["num_warps"]) == (128, 128, 64, 8)
    # Each K step reads 128 bytes of a row, whatever the dtype.
    assert gemm_tile(8192, 8192, torch.float32, H100_MULTIPROCESSORS)["BLOCK_K"] == 32
    assert gemm_tile(8192, 8192, torch.int8, H100_MULTIPROCESSORS)["BLOCK_K"] == 128
    # A per-sample projection (8 rows) takes a short tile rather than wasting 120 of 128 rows.
    assert gemm_tile(8, 4096, torch.float16, H100_MULTIPROCESSORS)["BLOCK_M"] == 16
    # An output of few 128-wide tiles is cut into more, smaller ones to reach every multiprocessor.
    small = gemm_tile(512, 1024, torch.float16, H100_MULTIPROCESSORS)
    assert (small["BLOCK_M"], small["BLOCK_N"]) == (64, 64)
    # The same shape gives the same tile every time: no timing decides it.
    assert all(gemm_tile(1000, 777, torch.float16, H100_MULTIPROCESSORS) == gemm_tile(1000, 777, torch.float16,
                                                                                     H100_MULTIPROCESSORS)
               for _ in range(3))
    assert gemm_tile(64, 64, torch.float64, H100_MULTIPROCESSORS)["BLOCK_K"] == 16
