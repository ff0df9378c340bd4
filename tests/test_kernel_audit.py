"""The kernel audit's invariants (mmkern.bench.audit.violations) over every production launch of the quick
preset's cases, compiled for sm_90 here with no GPU: each compiles, none spills, shared memory fits, and
dot tiles of 64 rows or more take warpgroup MMA. The launches that break one today are named below,
with the issue that mends them; one that stops breaking fails the test too, so the list stays true."""

import pytest
import torch

from mmkern import _config
from mmkern.bench import audit

pytestmark = [
    pytest.mark.slow,  # about a minute of compiling
    pytest.mark.skipif(_config.TRITON_ON_CPU, reason="compiles Triton's JIT kernels, not interpreted ones"),
]

# (op, case, mode, kernel): why, and what mends it. None today: the quick preset's launches, and the
# full preset's (benchmarks/audit/sm90.md), all keep the invariants.
KNOWN: dict = {}


@pytest.fixture(scope="module")
def rows():
    return audit.audit(audit.capture_in_child("quick", torch.bfloat16), capability=90)


def test_every_production_launch_keeps_the_invariants_but_the_known_ones(rows):
    assert len(rows) > 20 and {r.op for r in rows} == set(audit.AUDITED_OPS) - {"quantize_per_token"}
    breaking = {(r.op, r.case, r.mode, r.kernel): audit.violations(r) for r in rows if audit.violations(r)}
    assert set(breaking) == set(KNOWN), breaking


def test_the_big_dot_tiles_take_warpgroup_mma_and_fit_the_sm(rows):
    big = [r for r in rows if r.dot_rows >= 64]
    assert big and all(r.warpgroup_mma > 0 and r.ctas_per_sm >= 1 for r in big)


def test_the_gemm_keeps_two_ctas_per_sm_for_its_128x128_tiles(rows):
    """The register diet of the segmented GEMM: a 128x128 16-bit tile, with the addend and bias epilogue
    or without, stays within 128 registers a thread (two CTAs per SM hide each other's epilogue)."""
    gemm = [r for r in rows if r.kernel == "segmented_matmul_kernel" and r.tile.startswith("128x128x64")]
    assert gemm and all(r.ctas_per_sm >= 2 for r in gemm), [(r.op, r.case, r.mode, r.registers) for r in gemm]


def test_the_gemm_reads_through_tma_on_hopper(rows):
    """Every GEMM launch of the quick preset has 16-byte aligned operands, so on sm_90 each one of a wave
    of tiles or more (the launches TMA's host cost pays off in) loads through TMA, none through the older
    async copies."""
    gemm = [r for r in rows if r.kernel == "segmented_matmul_kernel" and r.grid_ctas >= audit.MULTIPROCESSORS]
    assert gemm and all(r.tma > 0 and r.async_copy == 0 for r in gemm), [(r.op, r.case, r.tile, r.tma) for r in gemm]


def test_every_attention_forward_takes_warpgroup_mma_on_hopper(rows):
    """Few queries included: on sm_90 their tiles have 64 rows or more (32-row tiles ran the older
    mma.sync), and their launches fill whole waves (split-KV planned from the SM's resident CTAs)."""
    forward = [r for r in rows if r.kernel == "_forward_kernel"]
    assert forward and all(r.warpgroup_mma > 0 and r.mma == 0 for r in forward), [
        (r.case, r.tile, r.warpgroup_mma, r.mma) for r in forward
    ]
    few = [r for r in forward if r.case.startswith("few_queries")]
    assert few and all(r.waves is not None and r.waves <= 1.0 for r in few), [(r.case, r.waves) for r in few]


def test_attention_reads_every_valid_side_through_tma_on_hopper(rows):
    """On sm_90 the quick preset's attention cases whose samples keep every key (no kv_lens) read K and V
    through TMA in the forward and the query gradient, none through async copies; those with key
    lengths keep the pointer path there (a box would read the padding past a sample's keys). Every
    case's queries are valid (the suite has no q_lens), so every key-and-value gradient reads Q and dO
    through TMA."""
    from mmkern.bench.suites.cross_modal_attention import CUDA

    key_loops = [r for r in rows if r.kernel in ("_forward_kernel", "_grad_q_kernel")]
    dense = [r for r in key_loops if CUDA[r.case][7] >= 1.0]
    assert dense and all(r.tma > 0 and r.async_copy == 0 for r in dense), [(r.case, r.kernel, r.tma) for r in dense]
    padded = [r for r in key_loops if CUDA[r.case][7] < 1.0]
    assert padded and all(r.tma == 0 for r in padded), [(r.case, r.kernel, r.tma) for r in padded]
    query_loops = [r for r in rows if r.kernel == "_grad_kv_kernel"]
    assert query_loops and all(r.tma > 0 for r in query_loops), [(r.case, r.tma) for r in query_loops]
