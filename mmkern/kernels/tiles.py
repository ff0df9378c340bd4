"""Every Triton launch's tile, in one place apart from the kernels.

A family's tile comes from the table the tuning sweep (``mmkern tune``) wrote for this GPU model,
``mmkern/kernels/tuned/<gpu>.json``, looked up by shape class (sizes rounded up to powers of 2, dtype
and padded head dims exact), and where the table has no entry (or there is no table) from the shape
alone. Nothing is autotuned at run time: the same inputs take the same tile, and so the same
summation order, in every process (results are bitwise reproducible), and a new shape costs no
benchmarking pass. ``override(family, choose)`` hands a family's choice to ``choose`` instead, for the
sweep or a test; ``choose`` returns a tile, or None to keep the table's or the default for that shape.
``use_table(table)`` puts a table in place of the GPU's own. A table changes speed and summation
order, not correctness: the sweep checked every entry against the reference before timing it.

Through Triton's interpreter every family takes its smallest tile, which keeps the CPU tests quick.
"""

import contextlib
import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

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
    # Operands read through TMA tensor descriptors (Hopper on; a launch whose operands TMA cannot address
    # takes the pointer path whatever this says).
    tma: bool = False
    # A persistent grid: a program per resident slot, each looping over output tiles.
    persistent: bool = False

    def launch_options(self) -> dict:
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_K": self.block_k,
            "GROUP_M": self.group_m,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }


@dataclass(frozen=True)
class AttentionTile:
    block_m: int  # query rows per program (the key-and-value backward: per step)
    block_n: int  # keys per step (the key-and-value backward: per program)
    num_warps: int
    num_stages: int

    def launch_options(self) -> dict:
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }


FAMILIES = ("gemm", "attention_forward", "attention_backward", "attention_backward_kv")
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
    """Whether some family's choice is overridden now, or a table put in place (cached launch plans are
    then bypassed)."""
    return bool(_overrides) or _installed is not None


def _overridden(family: str, *args):
    choose = _overrides.get(family)
    return None if choose is None else choose(*args)


TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")
_TILE_TYPES = {
    "gemm": GemmTile,
    "attention_forward": AttentionTile,
    "attention_backward": AttentionTile,
    "attention_backward_kv": AttentionTile,
}
# Shape classes round sizes up to powers of 2 in [16, LARGEST_CLASS].
LARGEST_CLASS = 8192


def gpu_slug(name: str) -> str:
    """A GPU model's table name: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_path(gpu_name: str) -> str:
    return os.path.join(TUNED_DIR, gpu_slug(gpu_name) + ".json")


def shape_class(family: str, *args):
    """The table key of a family's arguments (those its tile function takes), e.g.
    "bfloat16/m1024/n256/k512"; None where a size is symbolic (torch.compile's dynamic shapes keep the
    shape-only choice)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if family == "gemm":
        dtype, sizes = args[3], {"m": args[0], "n": args[1], "k": args[2]}
    elif family == "attention_forward":
        dtype, sizes = args[3], {"q": args[0], "d": args[1], "dv": args[2]}
    else:
        dtype, sizes = args[2], {"d": args[0], "dv": args[1]}
    if any(type(size) is not int for size in sizes.values()):
        return None
    rounded = {
        name: size if name in ("d", "dv") else power_of_2_at_least(size, 16, LARGEST_CLASS)
        for name, size in sizes.items()
    }
    return "/".join([str(dtype).replace("torch.", ""), *(f"{name}{size}" for name, size in rounded.items())])


class TunedTable:
    """A GPU model's tuned tiles: {"gpu": name, "families": {family: {shape class: {"tile": {...}, ...}}}}."""

    def __init__(self, table: dict):
        for family, entries in table.get("families", {}).items():
            if family not in _TILE_TYPES:
                raise ValueError(f"tuned table: unknown family {family!r}")
            for key, entry in entries.items():
                _TILE_TYPES[family](**entry["tile"])  # a malformed entry fails here, not mid-run
        self.table = table

    @functools.lru_cache(maxsize=4096)
    def tile(self, family: str, key: str):
        entry = self.table.get("families", {}).get(family, {}).get(key)
        return None if entry is None else _TILE_TYPES[family](**entry["tile"])

    @functools.lru_cache(maxsize=4096)
    def choice(self, family: str, *args):
        """The tile for a family's (concrete) arguments: their class looked up once per distinct call."""
        key = shape_class(family, *args)
        return None if key is None else self.tile(family, key)


def tile_entry(tile) -> dict:
    """A tile as a table stores it."""
    return asdict(tile)


def load_table(gpu_name: str):
    """The committed table of a GPU model, or None."""
    path = table_path(gpu_name)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return TunedTable(json.load(handle))


_installed = None  # a table use_table put in place of the GPU's own
# The table of the GPU model the process first chooses a tile on (a process that mixes GPU models gets
# that model's tiles on every GPU: slower there, never wrong), loaded once; False before that.
_gpu_table = False


@contextlib.contextmanager
def use_table(table: dict):
    """Within the block, ``table`` (a dict as the sweep writes it) is the tuned table, on any device."""
    global _installed
    previous, _installed = _installed, TunedTable(table)
    try:
        yield
    finally:
        _installed = previous


def _table():
    global _gpu_table
    if _installed is not None:
        return _installed
    if _gpu_table is False:
        on_gpu = not _config.TRITON_ON_CPU and torch.cuda.is_available()
        _gpu_table = load_table(torch.cuda.get_device_name(torch.cuda.current_device())) if on_gpu else None
    return _gpu_table


def _chosen(family: str, *args):
    """The override's tile, else the table's for the shape class; None: the shape-only default."""
    tile = _overridden(family, *args)
    if tile is not None:
        return tile
    table = _table()
    if table is None or any(isinstance(arg, torch.SymInt) for arg in args):  # symbolic sizes: the default
        return None
    return table.choice(family, *args)


INTERPRETER_GEMM = GemmTile(16, 16, 16, 4, 1, 1)
INTERPRETER_ATTENTION = AttentionTile(16, 16, 1, 1)


def gemm_tile(M, N, K, operand_dtype: torch.dtype, multiprocessors: int, capability: int = 90) -> GemmTile:
    """The segmented GEMM's tile for an (M, N) output over segments of at most K, on a GPU of compute
    ``capability`` (90: Hopper). Each K step reads up to 128 bytes of a row (64 fp16/bf16, 32 fp32, 128
    int8 elements), fewer where K is shorter; rows and columns shrink while the output has fewer tiles
    than the GPU has multiprocessors, so small outputs still fill it, and on Hopper a large 16-bit output
    takes 128x256 tiles (half the operand traffic per FLOP of 128x128), and an output of a wave of tiles
    or more reads its operands through TMA.
    Ampere's MMA keeps its operand fragments in registers, where those tiles spill: it keeps 128x128
    (128x64 for int8, whose two accumulators fill the rest). float64 takes a small tile: its operands
    are 8 bytes and its dot has no wide tensor-core form."""
    tile = _chosen("gemm", M, N, K, operand_dtype, multiprocessors, capability)
    if tile is not None:
        return tile
    if all(type(size) is int for size in (M, N, K)):  # torch.compile's symbolic sizes cannot be cache keys
        return _default_gemm_tile(M, N, K, operand_dtype, multiprocessors, capability)
    return _default_gemm_tile.__wrapped__(M, N, K, operand_dtype, multiprocessors, capability)


# A 128x256 tile pays off once the output has this many of them per multiprocessor (its last, partial
# wave then costs little).
WIDE_TILE_WAVES = 4


@functools.lru_cache(maxsize=4096)
def _default_gemm_tile(M, N, K, operand_dtype, multiprocessors, capability) -> GemmTile:
    if _config.TRITON_ON_CPU:
        return INTERPRETER_GEMM
    if operand_dtype == torch.float64:
        return GemmTile(32, 32, 16, 8, 4, 3)
    hopper = capability >= 90
    # The tensor cores' K step is 32 bytes (16 fp16/bf16, 32 int8): the shortest block_k.
    block_k = power_of_2_at_least(K, 32 // operand_dtype.itemsize, 128 // operand_dtype.itemsize)
    if hopper and operand_dtype.itemsize == 2 and cdiv(M, 128) * cdiv(N, 256) >= WIDE_TILE_WAVES * multiprocessors:
        return GemmTile(128, 256, block_k, 8, 8, 3, tma=True)
    if not hopper and operand_dtype == torch.int8:
        block_k = min(block_k, 64)
    block_m = power_of_2_at_least(M, 16, 128)
    block_n = power_of_2_at_least(N, 32, 128 if hopper or operand_dtype != torch.int8 else 64)
    while block_n > 64 and cdiv(M, block_m) * cdiv(N, block_n) < multiprocessors:
        block_n //= 2
    while block_m > 64 and cdiv(M, block_m) * cdiv(N, block_n) < multiprocessors:
        block_m //= 2
    large = block_m * block_n >= (128 * 128 if hopper or operand_dtype != torch.int8 else 128 * 64)
    # TMA where the launch fills the GPU: its descriptors cost the host about a microsecond each to build
    # and Triton's launcher more to encode, on every launch, which a launch of fewer tiles (a per-sample
    # projection, a split-K weight gradient), over in a few microseconds, would not earn back.
    tma = hopper and cdiv(M, block_m) * cdiv(N, block_n) >= multiprocessors
    return GemmTile(block_m, block_n, block_k, 8, 8 if large else 4, 3 if large else 4, tma=tma)


# Split-K: a GEMM whose output has too few tiles to fill the GPU splits K, each split at least
# MIN_K_PER_SPLIT long (so its pipeline fills), at most MAX_K_SPLITS ways. The interpreter plans as the
# GPU does (the tests that take the split path on small shapes lower MIN_K_PER_SPLIT).
MIN_K_PER_SPLIT = 512
MAX_K_SPLITS = 32


def gemm_splits(blocks, K, multiprocessors: int) -> int:
    """How many ways a launch of ``blocks`` output tiles over K splits its K: a fixed function of the
    shape, so that the partial sums (added in a fixed order) give the same bits every run."""
    return max(1, min(multiprocessors // max(blocks, 1), K // MIN_K_PER_SPLIT, MAX_K_SPLITS))


def epilogue_split(tile: GemmTile, wide_epilogue: bool) -> int:
    """In how many column pieces the GEMM's epilogue runs (1 or 2): halves when it reads the addend or
    stores the pre-activation of a wide tile, so those operands' registers are not all live at once."""
    return (4 if tile.block_n >= 256 else 2) if wide_epilogue and tile.block_n >= 64 else 1


# The forward packs a key head's group of query heads into one program's rows (grouped-query attention)
# while a head's queries alone are fewer than the widest tile's rows: decoding, a few text tokens over
# an image. The group then reads each K/V block once where each of its heads read it, and its rows
# fill the tile that one head's queries would leave mostly empty.
PACK_QUERY_HEADS_BELOW = 128


def packs_query_heads(q_len, group: int) -> bool:
    """Whether the forward packs each key head's ``group`` query heads into its programs' rows."""
    below = INTERPRETER_ATTENTION.block_m if _config.TRITON_ON_CPU else PACK_QUERY_HEADS_BELOW
    return group > 1 and q_len < below


def attention_forward_tile(
    rows, d_pad: int, dv_pad: int, dtype: torch.dtype, capability: int = 90, bias: bool = False
) -> AttentionTile:
    """The forward's tile for ``rows`` query rows a (sample, head) program (a key head's group of query
    heads when packed) and padded head dims ``d_pad``, ``dv_pad``. Few rows take a short tile, but on
    Hopper at least 64 (4 warps of warpgroup MMA; fewer rows run the older mma.sync path); fp32/fp64
    operands half the rows and keys (twice the bytes, and no wide MMA). With a ``bias`` the 128-row
    tile runs 8 warps at hd64 too: the bias tile's addresses (64 bits a score) took one warpgroup to
    255 registers and an 8-byte spill on sm_90, two warpgroups to 179 and none."""
    tile = _chosen("attention_forward", rows, d_pad, dv_pad, dtype, capability)
    if tile is not None:
        return tile
    if _config.TRITON_ON_CPU:
        return INTERPRETER_ATTENTION
    widest = max(d_pad, dv_pad)
    block_m, block_n, warps = (128, 64, 4) if widest <= 64 else (128, 64, 8) if widest <= 128 else (64, 32, 8)
    if dtype in (torch.float32, torch.float64):
        block_m, block_n = block_m // 2, block_n // 2
    block_m = power_of_2_at_least(rows, min(64, block_m) if capability >= 90 else 16, block_m)
    if block_m <= 64 and widest <= 128:
        warps = 4
    elif bias and block_m == 128:
        warps = 8
    return AttentionTile(block_m, block_n, warps, 2 if widest > 128 else 3)


def attention_backward_tile(d_pad: int, dv_pad: int, dtype: torch.dtype) -> AttentionTile:
    """The query gradient's tile (block_m queries a program, block_n keys a step; square), which the
    delta kernel's rows follow too."""
    tile = _chosen("attention_backward", d_pad, dv_pad, dtype)
    if tile is not None:
        return tile
    if _config.TRITON_ON_CPU:
        return INTERPRETER_ATTENTION
    widest = max(d_pad, dv_pad)
    block = 64 if widest <= 128 else 32
    if dtype in (torch.float32, torch.float64):
        block //= 2
    return AttentionTile(block, block, 4 if widest <= 64 else 8, 2)


def attention_backward_kv_tile(d_pad: int, dv_pad: int, dtype: torch.dtype, capability: int = 90) -> AttentionTile:
    """The key and value gradients' tile: block_n keys a program (their dK and dV accumulate in it),
    block_m queries a step. The kernel computes S^T = K Q^T, keys on the MMA's rows: on Hopper 128 keys
    over 8 warps take warpgroup MMA, and 32 queries a step keep small the per-query vectors (lse, delta,
    positions), which lie along the accumulator's columns, where each thread holds many of them. The
    audit (sm_90, bf16): 136-255 registers, no spills at hd64-hd128 (a softcap spilled 8 B until Q and
    dO came through TMA), where 64 queries by 64 keys took 211-255 and spilled with lengths, grouped
    heads, sinks or a softcap.
    Ampere's MMA holds its operands in registers: 16x128 at hd64 and 32x64 at hd128, over 8 warps, are
    the audit's spill-free tiles there (32x128 spilled 8-352 B at hd128)."""
    tile = _chosen("attention_backward_kv", d_pad, dv_pad, dtype, capability)
    if tile is not None:
        return tile
    if _config.TRITON_ON_CPU:
        return INTERPRETER_ATTENTION
    widest = max(d_pad, dv_pad)
    if widest > 128:
        block_m, block_n = 16, 64
    elif capability >= 90:
        block_m, block_n = 32, 128
    else:
        block_m, block_n = (16, 128) if widest <= 64 else (32, 64)
    if dtype in (torch.float32, torch.float64):
        block_m, block_n = block_m // 2, block_n // 2
    return AttentionTile(block_m, block_n, 8 if block_n >= 128 or widest > 64 or capability < 90 else 4, 2)


# Split-KV is worth it only while programs are few; each split keeps at least this many keys.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64
# Programs that fill this share of the resident slots are left whole (the tail of a wave costs less
# than the combine), and a split count is taken at this share of the best one's wave efficiency.
SPLIT_WHEN_BELOW = 0.8
SPLIT_EFFICIENCY = 0.85
# Shared memory a CTA may take on one SM: Hopper 227 KiB, Ampere (A100) 163 KiB.
SHARED_PER_SM = {90: 227 * 1024, 80: 163 * 1024}


def attention_residency(
    tile: AttentionTile, d_pad: int, dv_pad: int, element_size: int, capability: int = 90, query_gradient=False
) -> int:
    """How many CTAs of an attention tile (the forward's, or with ``query_gradient`` the query
    gradient's) one SM holds at once, as the audit finds them: shared memory holds Q's tile (and dO's
    for the gradient) and ``num_stages`` K and V blocks on Hopper (warpgroup MMA takes P from
    registers), one stage fewer and P's tile on Ampere; registers two CTAs of 4 warps or one of 8 (the
    audit's launches take 128-255 registers a thread)."""
    rows = tile.block_m * (d_pad + (dv_pad if query_gradient else 0))
    kv_block = tile.block_n * (d_pad + dv_pad)
    if capability >= 90:
        shared = rows + tile.num_stages * kv_block
    else:
        shared = rows + (tile.num_stages - 1) * kv_block + tile.block_m * tile.block_n
    by_shared = SHARED_PER_SM[90 if capability >= 90 else 80] // max(shared * element_size, 1)
    return max(1, min(by_shared, 8 // tile.num_warps))


@functools.lru_cache(maxsize=1024)
def _fullest_splits(programs: int, most: int, slots: int) -> int:
    """The fewest splits, up to ``most``, within SPLIT_EFFICIENCY of the fullest waves of ``slots``
    that ``programs`` programs split any number of times up to ``most`` make (cached: a scan of up
    to MAX_SPLITS counts, on every forward's host path)."""

    def fullness(splits):
        return programs * splits / (cdiv(programs * splits, slots) * slots)

    best = max(fullness(splits) for splits in range(1, most + 1))
    return next(splits for splits in range(1, most + 1) if fullness(splits) >= SPLIT_EFFICIENCY * best)


def key_splits(programs, k_len, block_n: int, slots: int) -> tuple:
    """(splits, keys per split) for a forward of ``programs`` (sample, head, query block) programs on a
    GPU that holds ``slots`` of them at once: each split at least MIN_KEYS_PER_SPLIT keys and a whole
    number of key blocks. The time is that of the waves the CTAs take, ceil(programs * splits / slots)
    waves each 1/splits as long, so the count is chosen by how full its waves are (320 CTAs on 264
    slots take two waves, the second a fifth full, where 256 take one): the fewest splits within
    SPLIT_EFFICIENCY of the fullest waves any count reaches."""
    most = min(k_len // MIN_KEYS_PER_SPLIT, MAX_SPLITS)
    if most < 2 or programs >= SPLIT_WHEN_BELOW * slots:
        return 1, max(k_len, 1)
    if type(programs) is int and type(k_len) is int:
        splits = _fullest_splits(programs, most, slots)
    else:  # torch.compile's symbolic sizes: one wave, decided by a comparison or two rather than a scan
        splits = min(max(slots // max(programs, 1), 1), most)
    if splits < 2:
        return 1, max(k_len, 1)
    keys_per_split = cdiv(cdiv(k_len, splits), block_n) * block_n
    return cdiv(k_len, keys_per_split), keys_per_split


def combine_block_m() -> int:
    """Query rows per program of the split-KV combine kernel."""
    return 16 if _config.TRITON_ON_CPU else 32


# Elements per program of quantized_fusion's elementwise kernel.
FUSION_BLOCK = 1024
