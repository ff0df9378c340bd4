"""A GEMM over up to four (A_s, B_s) segment pairs with a fused epilogue, the building block of
concat_linear's forward and backward, and of quantized_concat_linear, on GPU:

    out[m, n] = act( (sum_s A_s[m, :] @ B_s[:, n]) * column_scale[n]  +  addend[row(m), n]  +  bias[n] )

Quantized segments are int8 with a token scale each, ``(A_s, B_s, token_scale_s)``: their products
sum in int32 on the integer tensor cores and are scaled by ``token_scale_s[m]`` before the segments
are added, so every segment keeps its own scales and the integer sums stay exact.

Every operand is addressed through its own strides, so weight column slices, transposed views and
sliced inputs are read in place. ``addend`` is an accumulation-dtype matrix whose row for output row
m is ``sum_t ((m // div_t) % mod_t) * mul_t`` over two terms: that is how a projection computed
once per sample (or per position) is broadcast over the other leading dims without materialising
it. The pre-activation can be stored beside the output for the backward of smooth activations.

Built for Hopper's register file (``make kernel-audit`` shows each launch's machine code): index
arithmetic is 32-bit unless an operand spans 2^31 elements; the main loop masks rows and columns with
loop-invariant predicates and K only where a segment's K is ragged; the epilogue runs on column pieces
of the tile so its operands do not double the register count; and an output too small to fill the GPU
splits K (split-K) into partial sums that are added in a fixed order, so results stay reproducible.
On Hopper, operands whose base and leading stride are 16-byte aligned are read through TMA tensor
descriptors (host-built, so torch.compile can trace them), which needs no index arithmetic or masks in
the main loop; the rest take pointer loads. A tile may ask for a persistent grid (off by default).
"""

import operator

import torch
import triton
import triton.language as tl

from mmkern.activations import ACTIVATION_CODES
from mmkern.kernels.launch import (
    accumulate_dtype,
    compute_capability,
    input_precision,
    multiprocessors,
    planned,
    tma_descriptor,
    traceable,
    triton_has_tensor_descriptors,
)
from mmkern.kernels.tiles import cdiv, epilogue_split, gemm_splits, gemm_tile
from mmkern.kernels.tiles import overridden as tiles_overridden

MAX_SEGMENTS = 4

# The epilogue's activations by name, codes from mmkern.activations' one list.
RELU: tl.constexpr = tl.constexpr(ACTIVATION_CODES["relu"])
GELU: tl.constexpr = tl.constexpr(ACTIVATION_CODES["gelu"])
GELU_TANH: tl.constexpr = tl.constexpr(ACTIVATION_CODES["gelu_tanh"])
SILU: tl.constexpr = tl.constexpr(ACTIVATION_CODES["silu"])


@triton.jit
def _tma_tile(descriptor, row, column, TRANSPOSED: tl.constexpr):
    """The operand's tile at (row, column), read through its TMA descriptor; TRANSPOSED: the descriptor is of
    the operand's transpose (its contiguous dim is the tile's first)."""
    if TRANSPOSED:
        tile = descriptor.load([column, row]).T
    else:
        tile = descriptor.load([row, column])
    return tile


@triton.jit
def _accumulate_segment(
    acc,
    a_ptr,
    stride_am,
    stride_ak,
    b_ptr,
    stride_bk,
    stride_bn,
    K,
    split,
    splits,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    first_row,
    first_column,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    EVEN_K: tl.constexpr,
    TMA: tl.constexpr,
    A_TRANSPOSED: tl.constexpr,
    B_TRANSPOSED: tl.constexpr,
):
    # This program's share of K: whole BLOCK_K steps of a split (all of K without split-K).
    chunk = tl.cdiv(tl.cdiv(K, splits), BLOCK_K) * BLOCK_K
    k_start = split * chunk
    k_len = tl.maximum(tl.minimum(K - k_start, chunk), 0)
    if TMA:
        # a_ptr and b_ptr are tensor descriptors: the copy engine fetches each tile into shared memory and
        # fills what lies past the operand's rows, columns or K with zeros, so nothing is masked. A split
        # ends on a whole step, so no step reads into the next split's K.
        for k0 in range(0, k_len, BLOCK_K):
            a = _tma_tile(a_ptr, first_row, k_start + k0, A_TRANSPOSED)
            b = _tma_tile(b_ptr, k_start + k0, first_column, B_TRANSPOSED)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        if INDEX_64:
            offs_k = offs_k.to(tl.int64)
            k_start = k_start.to(tl.int64)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
        b_ptrs = b_ptr + (k_start + offs_k)[:, None] * stride_bk + offs_n[None, :] * stride_bn
        # Rows and columns are masked by loop-invariant predicates; K only where some segment's K is not a
        # whole number of steps (EVEN_K: every step is full, and the loop reads unmasked along K).
        for k0 in range(0, k_len, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                mask_k = offs_k < k_len - k0
                a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _add_segment(
    acc,
    a_ptr,
    stride_am,
    stride_ak,
    b_ptr,
    stride_bk,
    stride_bn,
    K,
    scale_ptr,
    stride_scale,
    split,
    splits,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    first_row,
    first_column,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    EVEN_K: tl.constexpr,
    TMA: tl.constexpr,
    A_TRANSPOSED: tl.constexpr,
    B_TRANSPOSED: tl.constexpr,
    QUANTIZED: tl.constexpr,
    FIRST: tl.constexpr,
):
    if QUANTIZED:
        # The first segment's int32 sum becomes the fp32 accumulator, so two accumulators are live only
        # from the second segment on.
        products = _accumulate_segment(
            tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32),
            a_ptr,
            stride_am,
            stride_ak,
            b_ptr,
            stride_bk,
            stride_bn,
            K,
            split,
            splits,
            offs_m,
            offs_n,
            mask_m,
            mask_n,
            first_row,
            first_column,
            BLOCK_K,
            INPUT_PRECISION,
            INDEX_64,
            EVEN_K,
            TMA,
            A_TRANSPOSED,
            B_TRANSPOSED,
        )
        token_scale = tl.load(scale_ptr + offs_m * stride_scale, mask=mask_m, other=0.0)
        if FIRST:
            acc = products.to(acc.dtype) * token_scale[:, None]
        else:
            acc += products.to(acc.dtype) * token_scale[:, None]
    else:
        acc = _accumulate_segment(
            acc,
            a_ptr,
            stride_am,
            stride_ak,
            b_ptr,
            stride_bk,
            stride_bn,
            K,
            split,
            splits,
            offs_m,
            offs_n,
            mask_m,
            mask_n,
            first_row,
            first_column,
            BLOCK_K,
            INPUT_PRECISION,
            INDEX_64,
            EVEN_K,
            TMA,
            A_TRANSPOSED,
            B_TRANSPOSED,
        )
    return acc


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == RELU:
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == GELU:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == GELU_TANH:
        # tanh(u) = 2 sigmoid(2u) - 1, written so that large |u| saturates instead of overflowing.
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = z * tl.sigmoid(2.0 * u)
    elif ACTIVATION == SILU:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _column_half(acc, UPPER: tl.constexpr):
    """The left (UPPER 0) or right (1) half of a tile's columns."""
    left, right = tl.split(tl.permute(tl.reshape(acc, (acc.shape[0], 2, acc.shape[1] // 2)), (0, 2, 1)))
    if UPPER:
        left = right
    return left


@triton.jit
def _epilogue(
    acc,
    offs_m,
    rows,
    mask_m,
    first_column,
    N,
    out_ptr,
    stride_om,
    stride_on,
    saved_ptr,
    stride_sm,
    stride_sn,
    addend_ptr,
    stride_pm,
    stride_pn,
    bias_ptr,
    stride_bias,
    column_scale_ptr,
    stride_column_scale,
    HAS_COLUMN_SCALE: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PREACTIVATION: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    WIDTH: tl.constexpr,
):
    """act(acc * column_scale + addend[rows] + bias) stored for the WIDTH columns from first_column."""
    offs_n = first_column + tl.arange(0, WIDTH)
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_COLUMN_SCALE:
        acc *= tl.load(column_scale_ptr + offs_n * stride_column_scale, mask=mask_n, other=0.0)[None, :]
    if HAS_ADDEND:
        acc += tl.load(addend_ptr + rows[:, None] * stride_pm + offs_n[None, :] * stride_pn, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    if STORE_PREACTIVATION:
        tl.store(
            saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
            acc.to(saved_ptr.dtype.element_ty),
            mask=mask,
        )
    acc = _activation(acc, ACTIVATION)
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def segmented_matmul_kernel(
    out_ptr,
    stride_om,
    stride_on,
    stride_osplit,
    saved_ptr,
    stride_sm,
    stride_sn,
    addend_ptr,
    stride_pm,
    stride_pn,
    div0,
    mod0,
    mul0,
    div1,
    mod1,
    mul1,
    bias_ptr,
    stride_bias,
    column_scale_ptr,
    stride_column_scale,
    a0_ptr,
    stride_a0m,
    stride_a0k,
    b0_ptr,
    stride_b0k,
    stride_b0n,
    K0,
    s0_ptr,
    stride_s0,
    a1_ptr,
    stride_a1m,
    stride_a1k,
    b1_ptr,
    stride_b1k,
    stride_b1n,
    K1,
    s1_ptr,
    stride_s1,
    a2_ptr,
    stride_a2m,
    stride_a2k,
    b2_ptr,
    stride_b2k,
    stride_b2n,
    K2,
    s2_ptr,
    stride_s2,
    a3_ptr,
    stride_a3m,
    stride_a3k,
    b3_ptr,
    stride_b3k,
    stride_b3n,
    K3,
    s3_ptr,
    stride_s3,
    M,
    N,
    splits,
    NUM_SEGMENTS: tl.constexpr,
    QUANTIZED: tl.constexpr,
    HAS_COLUMN_SCALE: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    ADDEND_TERMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PREACTIVATION: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    EVEN_K: tl.constexpr,
    TMA: tl.constexpr,
    A_TRANSPOSED: tl.constexpr,
    B_TRANSPOSED: tl.constexpr,
    PERSISTENT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    split = tl.program_id(1)
    # A split-K program writes its partial sum to its own slice of the workspace.
    out_ptr += split * stride_osplit
    # A persistent launch has a program per resident slot, each taking output tiles pid, pid + programs, ...
    # The loop of one trip a launch with a program per tile runs folds away at compile time: the two
    # compile to the same code but for the loop (which the audit shows holding 18-65 registers more).
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        last, step = blocks_m * blocks_n, tl.num_programs(0)
    else:
        last, step = tl.program_id(0) + 1, 1
    for pid in range(tl.program_id(0), last, step):
        # Grouped ordering: GROUP_M row blocks share each column block of B while it sits in L2.
        per_group = GROUP_M * blocks_n
        first_m = (pid // per_group) * GROUP_M
        group_size = tl.minimum(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_size
        pid_n = (pid % per_group) // group_size
        first_row = pid_m * BLOCK_M  # 32-bit: TMA's coordinates
        first_column = pid_n * BLOCK_N

        # 32-bit index arithmetic unless some operand spans 2^31 elements (the host decides INDEX_64).
        if INDEX_64:
            pid_m = pid_m.to(tl.int64)
            pid_n = pid_n.to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        if NUM_SEGMENTS > 0:
            acc = _add_segment(
                acc,
                a0_ptr,
                stride_a0m,
                stride_a0k,
                b0_ptr,
                stride_b0k,
                stride_b0n,
                K0,
                s0_ptr,
                stride_s0,
                split,
                splits,
                offs_m,
                offs_n,
                mask_m,
                mask_n,
                first_row,
                first_column,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                INPUT_PRECISION,
                INDEX_64,
                EVEN_K,
                TMA,
                A_TRANSPOSED,
                B_TRANSPOSED,
                QUANTIZED,
                True,
            )
        if NUM_SEGMENTS > 1:
            acc = _add_segment(
                acc,
                a1_ptr,
                stride_a1m,
                stride_a1k,
                b1_ptr,
                stride_b1k,
                stride_b1n,
                K1,
                s1_ptr,
                stride_s1,
                split,
                splits,
                offs_m,
                offs_n,
                mask_m,
                mask_n,
                first_row,
                first_column,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                INPUT_PRECISION,
                INDEX_64,
                EVEN_K,
                TMA,
                A_TRANSPOSED,
                B_TRANSPOSED,
                QUANTIZED,
                False,
            )
        if NUM_SEGMENTS > 2:
            acc = _add_segment(
                acc,
                a2_ptr,
                stride_a2m,
                stride_a2k,
                b2_ptr,
                stride_b2k,
                stride_b2n,
                K2,
                s2_ptr,
                stride_s2,
                split,
                splits,
                offs_m,
                offs_n,
                mask_m,
                mask_n,
                first_row,
                first_column,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                INPUT_PRECISION,
                INDEX_64,
                EVEN_K,
                TMA,
                A_TRANSPOSED,
                B_TRANSPOSED,
                QUANTIZED,
                False,
            )
        if NUM_SEGMENTS > 3:
            acc = _add_segment(
                acc,
                a3_ptr,
                stride_a3m,
                stride_a3k,
                b3_ptr,
                stride_b3k,
                stride_b3n,
                K3,
                s3_ptr,
                stride_s3,
                split,
                splits,
                offs_m,
                offs_n,
                mask_m,
                mask_n,
                first_row,
                first_column,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                INPUT_PRECISION,
                INDEX_64,
                EVEN_K,
                TMA,
                A_TRANSPOSED,
                B_TRANSPOSED,
                QUANTIZED,
                False,
            )

        # The addend's row for each output row: sum_t ((m // div_t) % mod_t) * mul_t over ADDEND_TERMS terms
        # (-1 terms: the identity; 0: every row reads row 0).
        if ADDEND_TERMS < 0:
            rows = offs_m
        else:
            rows = tl.zeros_like(offs_m)
            if ADDEND_TERMS > 0:
                rows += ((offs_m // div0) % mod0) * mul0
            if ADDEND_TERMS > 1:
                rows += ((offs_m // div1) % mod1) * mul1
        # The epilogue runs on EPILOGUE_SPLIT column pieces of the tile in turn (halves, or quarters of a
        # 256-wide one): only a piece's addend, pointers and output are live at a time, so the epilogue does
        # not set the kernel's register count.
        for piece in tl.static_range(EPILOGUE_SPLIT):
            columns = acc
            if EPILOGUE_SPLIT > 1:
                columns = _column_half(columns, piece // (EPILOGUE_SPLIT // 2))
            if EPILOGUE_SPLIT > 2:
                columns = _column_half(columns, piece % 2)
            _epilogue(
                columns,
                offs_m,
                rows,
                mask_m,
                pid_n * BLOCK_N + piece * (BLOCK_N // EPILOGUE_SPLIT),
                N,
                out_ptr,
                stride_om,
                stride_on,
                saved_ptr,
                stride_sm,
                stride_sn,
                addend_ptr,
                stride_pm,
                stride_pn,
                bias_ptr,
                stride_bias,
                column_scale_ptr,
                stride_column_scale,
                HAS_COLUMN_SCALE,
                HAS_ADDEND,
                HAS_BIAS,
                STORE_PREACTIVATION,
                ACTIVATION,
                ACC_DTYPE,
                BLOCK_N // EPILOGUE_SPLIT,
            )


def _operand(tensor, dims: int) -> tuple:
    """(tensor, its strides), or Nones for an absent operand."""
    return (None,) * (dims + 1) if tensor is None else (tensor, *tensor.stride())


def _needs_64_bit_indices(tensors) -> bool:
    """Whether an element offset into one of ``tensors`` can reach 2^31, where int32 index arithmetic
    would wrap. sum(size * stride) bounds the largest offset from above (strides are non-negative),
    and costs a fraction of a microsecond per tensor."""
    for tensor in tensors:
        if tensor is not None and sum(map(operator.mul, tensor.shape, tensor.stride())) >= 2**31:
            return True
    return False


def _addend_terms(row_map, M) -> tuple:
    """The row map as the kernel evaluates it: None for the identity on M rows, else its (div, mod, mul)
    terms with a non-zero mul (none: every row reads row 0)."""
    terms = tuple(term for term in row_map if term[2] != 0)
    if len(terms) == 1 and terms[0][0] == 1 and terms[0][2] == 1 and terms[0][1] >= M:
        return None
    return terms


def _tma_operand(operand, block: tuple):
    """(a TMA descriptor of the 2-D operand, or of its transpose, whichever has a contiguous last dim, for
    ``block`` = (rows, columns) tiles of the operand, and whether it is of the transpose) where TMA can
    address it (a 16-byte aligned base, a leading stride of a non-zero multiple of 16 bytes, no empty
    dim); else None."""
    (rows, columns), (row_stride, column_stride) = operand.shape, operand.stride()
    if column_stride == 1:
        transposed, shape, strides, block = False, [rows, columns], [row_stride, 1], list(block)
    elif row_stride == 1:
        transposed, shape, strides, block = (
            True,
            [columns, rows],
            [column_stride, 1],
            block[::-1],
        )
    else:
        return None
    descriptor = tma_descriptor(operand, shape, strides, block, transposed)
    return None if descriptor is None else (descriptor, transposed)


def _tma_segments(segments, constexprs) -> tuple:
    """(the segments' arguments with a and b as TMA descriptors, A_TRANSPOSED, B_TRANSPOSED), or None
    where TMA cannot read some operand, or the segments' a (or b) operands differ in which dim is
    contiguous (the kernel reads them all the one way)."""
    block_m, block_n, block_k = constexprs["BLOCK_M"], constexprs["BLOCK_N"], constexprs["BLOCK_K"]
    args, layouts = [], set()
    for segment in segments:
        a, b = _tma_operand(segment[0], (block_m, block_k)), _tma_operand(segment[1], (block_k, block_n))
        if a is None or b is None:
            return None
        layouts.add((a[1], b[1]))
        scale = segment[2] if len(segment) == 3 else None
        args += [a[0], *segment[0].stride(), b[0], *segment[1].stride(), segment[0].shape[1]]
        args += [scale, None if scale is None else scale.stride(0)]
    if len(layouts) != 1:
        return None
    a_transposed, b_transposed = layouts.pop()
    return args, a_transposed, b_transposed


# How many programs a persistent launch runs per multiprocessor: as many of its tiles as fit in one at
# once by the audit (a 128x128 tile's registers and shared memory allow two, a 128x256 tile's one).
def _resident_tiles(block_m: int, block_n: int) -> int:
    return 1 if block_m * block_n >= 128 * 256 else 2


@planned
def _launch_plan(
    M,
    N,
    Ks: tuple,
    quantized: bool,
    operand_dtype,
    out_dtype,
    has_column_scale: bool,
    row_map,
    has_bias: bool,
    stores_preactivation: bool,
    activation: str,
    multiprocessors: int,
    capability: int,
    precision: str,
    index_64: bool,
) -> tuple:
    """(grid, K splits, the row map's six scalars, constexprs, whether to read the operands through TMA)
    of one launch; cached while no tile override is active (tiles.override). ``Ks`` are the segments'
    K; ``row_map`` is None without an addend. Only a launch whose epilogue is linear (no addend, bias,
    activation or saved pre-activation) splits K: its partial sums are added afterwards. TMA needs
    Hopper (sm_90 on): on Ampere Triton turns descriptor loads into plain loads without async copies,
    which spill."""
    K = max(Ks, default=0)
    tile = gemm_tile(M, N, K, operand_dtype, multiprocessors, capability)
    blocks = cdiv(M, tile.block_m) * cdiv(N, tile.block_n)
    has_addend = row_map is not None
    linear = not (has_addend or has_bias or stores_preactivation or activation != "none")
    splits = gemm_splits(blocks, K, multiprocessors) if linear else 1
    index_64 = index_64 or splits * M * N >= 2**31  # the split-K workspace's offsets
    terms = _addend_terms(row_map, M) if has_addend else None
    row_args = sum((*(terms or ()), (1, 1, 0), (1, 1, 0))[:2], ())
    tma = (
        tile.tma
        and capability >= 90
        and operand_dtype != torch.float64
        and bool(Ks)
        and triton_has_tensor_descriptors()
    )
    programs = min(blocks, multiprocessors * _resident_tiles(tile.block_m, tile.block_n))
    return (
        (programs if tile.persistent else blocks, splits),
        splits,
        row_args,
        {
            "NUM_SEGMENTS": len(Ks),
            "QUANTIZED": quantized,
            "HAS_COLUMN_SCALE": has_column_scale,
            "HAS_ADDEND": has_addend,
            "ADDEND_TERMS": -1 if terms is None else len(terms),
            "HAS_BIAS": has_bias,
            "STORE_PREACTIVATION": stores_preactivation,
            "ACTIVATION": ACTIVATION_CODES[activation],
            "ACC_DTYPE": tl.float64 if accumulate_dtype(out_dtype) == torch.float64 else tl.float32,
            "INPUT_PRECISION": precision,
            "INDEX_64": index_64,
            "EVEN_K": all(k % tile.block_k == 0 for k in Ks),
            "TMA": False,
            "A_TRANSPOSED": False,
            "B_TRANSPOSED": False,
            "PERSISTENT": tile.persistent,
            "EPILOGUE_SPLIT": epilogue_split(tile, has_addend or stores_preactivation),
            **tile.launch_options(),
        },
        tma,
    )


def segmented_matmul(
    out,
    segments,
    *,
    addend=None,
    row_map=((1, 1, 0), (1, 1, 0)),
    bias=None,
    activation="none",
    saved=None,
    column_scale=None,
):
    """Writes act((sum_s a_s @ b_s) * column_scale + addend[row_map] + bias) into ``out`` (M, N), and
    the pre-activation into ``saved`` when given. ``segments`` is a list of at most MAX_SEGMENTS
    (a (M, K_s), b (K_s, N)) pairs, or (a, b, token_scale (M,)) triples of int8 operands, possibly
    empty (then only the epilogue runs). ``row_map`` maps output rows to ``addend`` rows as
    ``sum_t ((m // div_t) % mod_t) * mul_t``."""
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    assert len(segments) <= MAX_SEGMENTS
    quantized = bool(segments) and len(segments[0]) == 3
    segment_args, operands, Ks = [], [out, saved, addend, bias, column_scale], []
    for segment in segments:
        a, b = segment[0], segment[1]
        token_scale = segment[2] if quantized else None
        segment_args += [
            a,
            *a.stride(),
            b,
            *b.stride(),
            a.shape[1],
            token_scale,
            token_scale.stride(0) if quantized else None,
        ]
        operands += [a, b, token_scale]
        Ks.append(a.shape[1])
    # The segments a launch does not have, and absent epilogue operands, are None: constants the
    # kernel never reads (its flags leave their code out), and nothing for the launcher to bind.
    segment_args += [None] * (9 * (MAX_SEGMENTS - len(segments)))
    operand_dtype = segments[0][0].dtype if segments else out.dtype
    plan = _launch_plan if not tiles_overridden() else _launch_plan.__wrapped__
    grid, splits, row_args, constexprs, tma = plan(
        M,
        N,
        tuple(Ks),
        quantized,
        operand_dtype,
        out.dtype,
        column_scale is not None,
        None if addend is None else row_map,
        bias is not None,
        saved is not None,
        activation,
        multiprocessors(out.device),
        compute_capability(out.device),
        input_precision(operand_dtype),
        _needs_64_bit_indices(operands),
    )
    descriptors = _tma_segments(segments, constexprs) if tma else None
    if descriptors is not None:
        segment_args[: len(descriptors[0])] = descriptors[0]
        constexprs = {**constexprs, "TMA": True, "A_TRANSPOSED": descriptors[1], "B_TRANSPOSED": descriptors[2]}
    target = out if splits == 1 else out.new_empty((splits, M, N), dtype=accumulate_dtype(out.dtype))
    traceable(segmented_matmul_kernel)[grid](
        target,
        *target.stride()[-2:],
        target.stride(0) if splits > 1 else 0,
        *_operand(saved, 2),
        *_operand(addend, 2),
        *row_args,
        *_operand(bias, 1),
        *_operand(column_scale, 1),
        *segment_args,
        M,
        N,
        splits,
        **constexprs,
    )
    if splits > 1:
        # Split-K's partial sums, added in a fixed order: the same shapes give the same bits every run.
        # An fp32 output (the per-sample projections) takes the sum directly, a narrower one a cast copy.
        if out.dtype == target.dtype:
            torch.sum(target, 0, out=out)
        else:
            out.copy_(target.sum(0))
    return out
