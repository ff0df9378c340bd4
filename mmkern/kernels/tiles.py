"""Every Triton launch's tile, in one place apart from the kernels, chosen from the shape alone.

Nothing is autotuned at run time: the same inputs take the same tile, and so the same summation order,
in every process (results are bitwise reproducible), and a new shape costs no benchmarking pass.
``override(family, choose)`` hands a family's choice to ``choose`` instead, for a tuning sweep or a
test; ``choose`` returns a tile, or None to keep the default for that shape.

Through Triton's interpreter every family takes its smallest tile, which keeps the CPU tests quick.
"""

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmkern import _config
from mmkern.kernels.launch import power_of_2_at_least


def cdiv(a, b):
    """ceil(a / b) for non-negative ints (and torch.compile's symbolic ones)."""
    return -(-a // b)


@dataclass(frozen=True)
class GemmTile:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def launch_options(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": self.group_m,
                "num_warps": self.num_warps, "num_stages": self.num_stages}


@dataclass(frozen=True)
class AttentionTile:
    block_m: int  # query rows per program
    block_n: int  # keys per step
    num_warps: int
    num_stages: int


FAMILIES = ("gemm", "attention_forward", "attention_backward")
_overrides: dict = {}


@contextlib.contextmanager
def override(family: str, choose: Callable):
    """Within the block, ``choose`` (taking the family's arguments, as the functions below do) picks
    the family's tiles; where it returns None, the default does."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    previous = _overrides.get(family)
    _overrides[family] = choose
    try:
        yield
    finally:
        if previous is None:
            del _overrides[family]
        else:
            _overrides[family] = previous


def overridden() -> bool:
    """Whether some family's choice is overridden now (cached launch plans are then bypassed)."""
    return bool(_overrides)


def _overridden(family: str, *args):
    choose = _overrides.get(family)
    return None if choose is None else choose(*args)


INTERPRETER_GEMM = GemmTile(16, 16, 16, 4, 1, 1)
INTERPRETER_ATTENTION = AttentionTile(16, 16, 1, 1)


def gemm_tile(M, N, operand_dtype: torch.dtype, multiprocessors: int) -> GemmTile:
    """The segmented GEMM's tile for an (M, N) output. Each K step reads 128 bytes of a row (64
    fp16/bf16, 32 fp32, 128 int8 elements); rows and columns shrink while the output has fewer tiles
    than the GPU has multiprocessors, so small outputs still fill it. float64 takes a small tile: its
    operands are 8 bytes and its dot has no wide tensor-core form."""
    tile = _overridden("gemm", M, N, operand_dtype, multiprocessors)
    if tile is not None:
        return tile
    if type(M) is int and type(N) is int:  # torch.compile's symbolic sizes cannot be cache keys
        return _default_gemm_tile(M, N, operand_dtype, multiprocessors)
    return _default_gemm_tile.__wrapped__(M, N, operand_dtype, multiprocessors)


@functools.lru_cache(maxsize=4096)
def _default_gemm_tile(M, N, operand_dtype, multiprocessors) -> GemmTile:
    if _config.TRITON_ON_CPU:
        return INTERPRETER_GEMM
    if operand_dtype == torch.float64:
        return GemmTile(32, 32, 16, 8, 4, 3)
    block_k = 128 // operand_dtype.itemsize
    block_m = power_of_2_at_least(M, 16, 128)
    block_n = power_of_2_at_least(N, 32, 128)
    while block_n > 64 and cdiv(M, block_m) * cdiv(N, block_n) < multiprocessors:
        block_n //= 2
    while block_m > 64 and cdiv(M, block_m) * cdiv(N, block_n) < multiprocessors:
        block_m //= 2
    large = block_m * block_n >= 128 * 128
    return GemmTile(block_m, block_n, block_k, 8, 8 if large else 4, 3 if large else 4)


def attention_forward_tile(q_len, d_pad: int, dv_pad: int, dtype: torch.dtype) -> AttentionTile:
    """The forward's tile for padded head dims ``d_pad``, ``dv_pad``; a short query side takes a
    short tile, and fp32/fp64 operands half the rows and keys (twice the bytes, and no wide MMA)."""
    tile = _overridden("attention_forward", q_len, d_pad, dv_pad, dtype)
    if tile is not None:
        return tile
    if _config.TRITON_ON_CPU:
        return INTERPRETER_ATTENTION
    widest = max(d_pad, dv_pad)
    block_m, block_n, warps = (128, 64, 4) if widest <= 64 else (128, 64, 8) if widest <= 128 else (64, 32, 8)
    if dtype in (torch.float32, torch.float64):
        block_m, block_n = block_m // 2, block_n // 2
    return AttentionTile(power_of_2_at_least(q_len, 16, block_m), block_n, warps, 2 if widest > 128 else 3)


def attention_backward_tile(d_pad: int, dv_pad: int, dtype: torch.dtype) -> AttentionTile:
    """The backward's tile (square: one block of queries and one of keys per step)."""
    tile = _overridden("attention_backward", d_pad, dv_pad, dtype)
    if tile is not None:
        return tile
    if _config.TRITON_ON_CPU:
        return INTERPRETER_ATTENTION
    widest = max(d_pad, dv_pad)
    block = 64 if widest <= 128 else 32
    if dtype in (torch.float32, torch.float64):
        block //= 2
    return AttentionTile(block, block, 4 if widest <= 64 else 8, 2)


# Split-KV is worth it only while programs are few; each split keeps at least this many keys.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64


def key_splits(programs, k_len, block_n: int, multiprocessors: int) -> tuple:
    """(splits, keys per split) for a forward of ``programs`` (sample, head, query block) programs:
    enough to fill the GPU twice over, each split at least MIN_KEYS_PER_SPLIT keys and a whole number
    of key blocks."""
    splits = min(cdiv(2 * multiprocessors, max(programs, 1)), k_len // MIN_KEYS_PER_SPLIT, MAX_SPLITS)
    if splits < 2:
        return 1, max(k_len, 1)
    keys_per_split = cdiv(cdiv(k_len, splits), block_n) * block_n
    return cdiv(k_len, keys_per_split), keys_per_split


def combine_block_m() -> int:
    """Query rows per program of the split-KV combine kernel."""
    return 16 if _config.TRITON_ON_CPU else 32


# Elements per program of quantized_fusion's elementwise kernel.
FUSION_BLOCK = 1024
