"""The host-side plans of the Triton launches: tiles chosen from shapes alone, and scalars that keep
float64's precision. These run without a GPU in every test mode."""

import importlib

import pytest
import torch

from mmkern import _config, ops
from mmkern.kernels import tiles
from mmkern.kernels.concat_linear import projection_plan
from mmkern.kernels.cross_modal_attention import float_halves
from mmkern.kernels.launch import power_of_2_at_least
from mmkern.kernels.tiles import (
    MIN_K_PER_SPLIT,
    AttentionTile,
    GemmTile,
    attention_residency,
    cdiv,
    epilogue_split,
    gemm_splits,
    gemm_tile,
    key_splits,
)

segmented_matmul = importlib.import_module("mmkern.kernels.segmented_matmul")
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
    big = gemm_tile(8192, 8192, 8192, torch.bfloat16, H100_MULTIPROCESSORS)
    # A large 16-bit output takes 128x256 tiles; fewer than 4 waves of them stay at 128x128.
    assert (big.block_m, big.block_n, big.block_k, big.num_warps) == (128, 256, 64, 8)
    mid = gemm_tile(4096, 768, 768, torch.bfloat16, H100_MULTIPROCESSORS)
    assert (mid.block_m, mid.block_n, mid.block_k, mid.num_warps, mid.num_stages) == (128, 128, 64, 8, 3)
    # Each K step reads 128 bytes of a row, whatever the dtype, or all of a shorter K.
    assert gemm_tile(8192, 8192, 8192, torch.float32, H100_MULTIPROCESSORS).block_k == 32
    assert gemm_tile(8192, 8192, 8192, torch.int8, H100_MULTIPROCESSORS).block_k == 128
    assert gemm_tile(8192, 8192, 64, torch.int8, H100_MULTIPROCESSORS).block_k == 64
    assert gemm_tile(8192, 8192, 20, torch.bfloat16, H100_MULTIPROCESSORS).block_k == 32
    assert gemm_tile(8192, 8192, 8, torch.bfloat16, H100_MULTIPROCESSORS).block_k == 16
    # A per-sample projection (8 rows) takes a short tile rather than wasting 120 of 128 rows.
    assert gemm_tile(8, 4096, 1024, torch.float16, H100_MULTIPROCESSORS).block_m == 16
    # An output of few 128-wide tiles is cut into more, smaller ones to reach every multiprocessor.
    small = gemm_tile(512, 1024, 1024, torch.float16, H100_MULTIPROCESSORS)
    assert (small.block_m, small.block_n) == (64, 64)
    # The same shape gives the same tile every time: no timing decides it.
    assert all(
        gemm_tile(1000, 777, 300, torch.float16, H100_MULTIPROCESSORS)
        == gemm_tile(1000, 777, 300, torch.float16, H100_MULTIPROCESSORS)
        for _ in range(3)
    )
    assert gemm_tile(64, 64, 64, torch.float64, H100_MULTIPROCESSORS).block_k == 16


@pytest.mark.skipif(_config.TRITON_ON_CPU, reason="the interpreter always takes its one small tile")
def test_hopper_reads_through_tma_and_ampere_keeps_tiles_it_does_not_spill():
    """The audit's findings as tile rules: on sm_90 a launch of a wave of tiles or more reads through TMA
    (fewer registers than pointer loads, 90-159 against 118-214 for the GEMM's 128-row tiles); on sm_80, where
    the MMA's operand fragments live in registers, no 128x256 tiles and int8 at most 64 columns over 8
    warps (128x128 spilled 152-248 bytes a thread, 128x64 over 4 warps 176)."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.int8):
        assert gemm_tile(4096, 768, 768, dtype, H100_MULTIPROCESSORS).tma
        assert not gemm_tile(4096, 768, 768, dtype, 108, 80).tma
    assert not gemm_tile(64, 64, 64, torch.float64, H100_MULTIPROCESSORS).tma
    # A launch of fewer tiles than multiprocessors keeps pointer loads: no descriptors to build per launch.
    assert not gemm_tile(8, 4096, 1024, torch.bfloat16, H100_MULTIPROCESSORS).tma
    assert not gemm_tile(4096, 768, 768, torch.bfloat16, H100_MULTIPROCESSORS).persistent
    ampere = gemm_tile(8192, 8192, 8192, torch.bfloat16, 108, 80)
    assert (ampere.block_m, ampere.block_n) == (128, 128)
    int8 = gemm_tile(8192, 8192, 8192, torch.int8, 108, 80)
    assert (int8.block_m, int8.block_n, int8.block_k, int8.num_warps) == (128, 64, 64, 8)


@pytest.mark.skipif(_config.TRITON_ON_CPU, reason="the interpreter always takes its one small tile")
def test_a_bias_spreads_the_forwards_widest_tile_over_two_warpgroups():
    """At hd64 the 128-row forward runs one warpgroup, but with a bias (its tile of 64-bit addresses) it
    spilled on sm_90 and sm_80: two warpgroups then share the rows; tiles of 64 rows keep one."""
    assert tiles.attention_forward_tile(1024, 64, 64, torch.bfloat16) == tiles.AttentionTile(128, 64, 4, 3)
    assert tiles.attention_forward_tile(1024, 64, 64, torch.bfloat16, bias=True) == tiles.AttentionTile(128, 64, 8, 3)
    assert tiles.attention_forward_tile(1024, 64, 64, torch.bfloat16, 80, True).num_warps == 8
    assert tiles.attention_forward_tile(48, 64, 64, torch.bfloat16, bias=True) == tiles.AttentionTile(64, 64, 4, 3)
    assert tiles.attention_forward_tile(1024, 128, 128, torch.bfloat16, bias=True).num_warps == 8


@pytest.mark.skipif(_config.TRITON_ON_CPU, reason="the interpreter always takes its one small tile")
def test_key_gradients_take_the_audits_spill_free_tiles():
    """S^T = K Q^T puts keys on the MMA's rows: on Hopper 128 of them over 8 warps and 32 queries a step;
    on Ampere, whose MMA holds operands in registers, 16x128 at hd64 and 32x64 at hd128."""
    for d in (64, 128):
        assert tiles.attention_backward_kv_tile(d, d, torch.bfloat16) == tiles.AttentionTile(32, 128, 8, 2)
    assert tiles.attention_backward_kv_tile(64, 64, torch.bfloat16, 80) == tiles.AttentionTile(16, 128, 8, 2)
    assert tiles.attention_backward_kv_tile(128, 128, torch.float16, 80) == tiles.AttentionTile(32, 64, 8, 2)
    assert tiles.attention_backward_kv_tile(256, 256, torch.bfloat16).block_n == 64
    assert tiles.attention_backward_kv_tile(64, 64, torch.float32) == tiles.AttentionTile(16, 64, 4, 2)


def test_skinny_products_split_k_to_fill_the_gpu():
    # A weight gradient of 4 output tiles over 65536 tokens: 32 splits of 2048 (128 CTAs on 132 SMs).
    assert gemm_splits(4, 65536, H100_MULTIPROCESSORS) == 32
    # Each split keeps at least MIN_K_PER_SPLIT of K; an output that fills the GPU is not split.
    assert gemm_splits(4, 1024, H100_MULTIPROCESSORS) == 1024 // MIN_K_PER_SPLIT
    assert gemm_splits(4, 500, H100_MULTIPROCESSORS) == 1
    assert gemm_splits(132, 65536, H100_MULTIPROCESSORS) == 1
    assert gemm_splits(50, 65536, H100_MULTIPROCESSORS) == 2


@pytest.mark.parametrize(
    "epilogue, block_n, pieces", [(True, 256, 4), (True, 128, 2), (True, 64, 2), (True, 32, 1), (False, 256, 1)]
)
def test_a_wide_epilogue_runs_in_column_pieces(epilogue, block_n, pieces):
    assert epilogue_split(GemmTile(128, block_n, 64, 8, 8, 3), epilogue) == pieces


def test_few_queries_over_long_keys_split_the_keys():
    # 16 (sample, head) programs cannot fill 264 slots (2 CTAs on each of 132 multiprocessors), so
    # 1000 keys are split as far as 256 keys a split allows; 2048 query rows can, so they are not.
    def plan(batch, q_len, k_len, slots=2 * H100_MULTIPROCESSORS):
        return key_splits(batch * 8 * cdiv(q_len, 16), k_len, 64, slots)

    assert plan(2, 1, 1000) == (3, 384)
    assert plan(16, 2048, 4096) == (1, 4096)
    assert plan(2, 1, 300) == (1, 300)
    # The few-query forward of the benchmark (64 programs over 4k or 32k keys): 4 splits fill one wave
    # (256 of 264 slots), where 5 (the old rule's "twice the multiprocessors") took 1.21 waves.
    assert key_splits(64, 32768, 64, 264) == (4, 8192)
    assert key_splits(64, 4096, 64, 264) == (4, 1024)
    # 200 programs: 5 splits, 1000 CTAs in 4 waves (0.95 full) of a fifth of the keys each, 0.8 of
    # the time of one wave three quarters full; from 0.8 of a wave on programs are left whole.
    assert key_splits(200, 32768, 64, 264) == (5, 6592)
    assert key_splits(220, 32768, 64, 264) == (1, 32768)


@pytest.mark.parametrize(
    "tile, d_pad, capability, resident",
    [
        # The audit's sm_90 figures (bf16): 128x64 over 4 warps at hd64 two a SM (registers), over 8
        # warps at hd128 one (registers and 128 KiB of shared memory); 64x64 at hd128 over 4 warps two
        # (112 KiB). sm_80: 32x64 at hd128 two (76 KiB), 64x64 one (88 KiB of its 163).
        (AttentionTile(128, 64, 4, 3), 64, 90, 2),
        (AttentionTile(128, 64, 8, 3), 128, 90, 1),
        (AttentionTile(64, 64, 4, 3), 128, 90, 2),
        (AttentionTile(64, 32, 8, 2), 256, 90, 1),
        (AttentionTile(32, 64, 4, 3), 128, 80, 2),
        (AttentionTile(64, 64, 4, 3), 128, 80, 1),
    ],
)
def test_attention_residency_is_the_audits(tile, d_pad, capability, resident):
    assert attention_residency(tile, d_pad, d_pad, 2, capability) == resident


def test_query_gradient_residency_is_the_audits():
    # sm_90, bf16: 64x64 over 8 warps at hd128 one a SM (96 KiB, registers), over 4 warps at hd64 two
    # (48 KiB; registers allow three there, which the estimate leaves out).
    assert attention_residency(AttentionTile(64, 64, 8, 2), 128, 128, 2, query_gradient=True) == 1
    assert attention_residency(AttentionTile(64, 64, 4, 2), 64, 64, 2, query_gradient=True) == 2


def test_an_override_picks_the_tiles_and_the_result_stays_right():
    """What a tuning sweep does: every GEMM launch of a call takes the overriding tile (here one of
    another shape than the default), and the answer is the same to roundoff."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(3, 20, 40, generator=generator), torch.randn(3, 1, 24, generator=generator)]
    weight, bias = torch.randn(36, 64, generator=generator), torch.randn(36, generator=generator)
    expected = ops.concat_linear(inputs, weight, bias, activation="gelu")
    chosen = []
    tile = GemmTile(32, 16, 16, 2, 2, 1)
    with tiles.override("gemm", lambda *shape: chosen.append(shape) or tile):
        actual = ops.concat_linear(inputs, weight, bias, activation="gelu")
    torch.testing.assert_close(actual, expected)
    if _config.TRITON_ON_CPU:  # the C++ kernels take no tiles
        assert [shape[:2] for shape in chosen] == [(3, 36), (60, 36)]  # the image vector, then the tokens
    assert gemm_tile(60, 36, 40, torch.float32, 132) != tile  # and ends with the block


def test_override_refuses_an_unknown_family():
    with pytest.raises(ValueError, match="family must be one of"):
        with tiles.override("gemmm", lambda *args: None):
            pass


def test_a_projection_is_planned_from_its_input_shapes():
    """Tokens (2, 5, 8), a per-sample vector (2, 1, 4) and a per-position one (5, 3): one fused GEMM
    over the tokens, two broadcast groups summed into one addend, and what the backward sums over."""
    plan = projection_plan((torch.Size([2, 5, 8]), torch.Size([2, 1, 4]), torch.Size([5, 3])))
    assert plan.lead == (2, 5) and plan.rows == 10
    assert plan.columns == (slice(0, 8), slice(8, 12), slice(12, 15))
    assert plan.per_token == (0,)
    assert plan.groups == (((2, 1), (1,)), ((1, 5), (2,)))
    assert plan.addend_lead == (2, 5) and plan.row_map == ((1, 10, 1), (1, 1, 0))
    assert plan.broadcast_dims == ((), (1,), (0,))
    with pytest.raises(RuntimeError, match="do not broadcast"):
        projection_plan((torch.Size([2, 5, 8]), torch.Size([3, 1, 4])))


@pytest.mark.skipif(not _config.TRITON_ON_CPU, reason="the launch plans are the Triton path's")
def test_a_second_call_of_the_same_shapes_plans_nothing():
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(3, 7, 10, generator=generator), torch.randn(3, 1, 6, generator=generator)]
    weight = torch.randn(9, 16, generator=generator, requires_grad=True)
    caches = (projection_plan, segmented_matmul._launch_plan)

    def call():
        ops.concat_linear(inputs, weight, activation="silu").sum().backward()
        return [cache.cache_info().misses for cache in caches]

    first = call()
    assert call() == first
    inputs[0] = torch.randn(3, 8, 10, generator=generator)  # new shapes are planned
    assert all(after > before for after, before in zip(call(), first))
