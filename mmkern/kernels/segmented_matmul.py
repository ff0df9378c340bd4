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
"""

import torch
import triton
import triton.language as tl

from mmkern.kernels.launch import accumulate_dtype, input_precision, multiprocessors, planned, traceable
from mmkern.kernels.tiles import cdiv, gemm_tile, overridden as tiles_overridden

MAX_SEGMENTS = 4

ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


@triton.jit
def _accumulate_segment(acc, a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, K,
                        offs_m, offs_n, mask_m, mask_n,
                        BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _add_segment(acc, a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, K, scale_ptr, stride_scale,
                 offs_m, offs_n, mask_m, mask_n,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, QUANTIZED: tl.constexpr):
    if QUANTIZED:
        products = _accumulate_segment(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32), a_ptr, stride_am, stride_ak,
                                       b_ptr, stride_bk, stride_bn, K, offs_m, offs_n, mask_m, mask_n,
                                       BLOCK_K, INPUT_PRECISION)
        token_scale = tl.load(scale_ptr + offs_m * stride_scale, mask=mask_m, other=0.0)
        acc += products.to(acc.dtype) * token_scale[:, None]
    else:
        acc = _accumulate_segment(acc, a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, K,
                                  offs_m, offs_n, mask_m, mask_n, BLOCK_K, INPUT_PRECISION)
    return acc


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 3:
        # tanh(u) = 2 sigmoid(2u) - 1, written so that large |u| saturates instead of overflowing.
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = z * tl.sigmoid(2.0 * u)
    elif ACTIVATION == 4:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def segmented_matmul_kernel(
    out_ptr, stride_om, stride_on,
    saved_ptr, stride_sm, stride_sn,
    addend_ptr, stride_pm, stride_pn, div0, mod0, mul0, div1, mod1, mul1,
    bias_ptr, stride_bias,
    column_scale_ptr, stride_column_scale,
    a0_ptr, stride_a0m, stride_a0k, b0_ptr, stride_b0k, stride_b0n, K0, s0_ptr, stride_s0,
    a1_ptr, stride_a1m, stride_a1k, b1_ptr, stride_b1k, stride_b1n, K1, s1_ptr, stride_s1,
    a2_ptr, stride_a2m, stride_a2k, b2_ptr, stride_b2k, stride_b2n, K2, s2_ptr, stride_s2,
    a3_ptr, stride_a3m, stride_a3k, b3_ptr, stride_b3k, stride_b3n, K3, s3_ptr, stride_s3,
    M, N,
    NUM_SEGMENTS: tl.constexpr, QUANTIZED: tl.constexpr, HAS_COLUMN_SCALE: tl.constexpr,
    HAS_ADDEND: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_PREACTIVATION: tl.constexpr, ACTIVATION: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row blocks share each column block of B while it sits in L2.
    pid = tl.program_id(0).to(tl.int64)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if NUM_SEGMENTS > 0:
        acc = _add_segment(acc, a0_ptr, stride_a0m, stride_a0k, b0_ptr, stride_b0k, stride_b0n, K0,
                           s0_ptr, stride_s0, offs_m, offs_n, mask_m, mask_n,
                           BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, QUANTIZED)
    if NUM_SEGMENTS > 1:
        acc = _add_segment(acc, a1_ptr, stride_a1m, stride_a1k, b1_ptr, stride_b1k, stride_b1n, K1,
                           s1_ptr, stride_s1, offs_m, offs_n, mask_m, mask_n,
                           BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, QUANTIZED)
    if NUM_SEGMENTS > 2:
        acc = _add_segment(acc, a2_ptr, stride_a2m, stride_a2k, b2_ptr, stride_b2k, stride_b2n, K2,
                           s2_ptr, stride_s2, offs_m, offs_n, mask_m, mask_n,
                           BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, QUANTIZED)
    if NUM_SEGMENTS > 3:
        acc = _add_segment(acc, a3_ptr, stride_a3m, stride_a3k, b3_ptr, stride_b3k, stride_b3n, K3,
                           s3_ptr, stride_s3, offs_m, offs_n, mask_m, mask_n,
                           BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, QUANTIZED)

    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_COLUMN_SCALE:
        acc *= tl.load(column_scale_ptr + offs_n * stride_column_scale, mask=mask_n, other=0.0)[None, :]
    if HAS_ADDEND:
        rows = ((offs_m // div0) % mod0) * mul0 + ((offs_m // div1) % mod1) * mul1
        acc += tl.load(addend_ptr + rows[:, None] * stride_pm + offs_n[None, :] * stride_pn, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    if STORE_PREACTIVATION:
        tl.store(saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
                 acc.to(saved_ptr.dtype.element_ty), mask=mask)
    acc = _activation(acc, ACTIVATION)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _operand(tensor, dims: int) -> tuple:
    """(tensor, its strides), or Nones for an absent operand."""
    return (None,) * (dims + 1) if tensor is None else (tensor, *tensor.stride())


@planned
def _launch_plan(M, N, num_segments: int, quantized: bool, operand_dtype, out_dtype, has_column_scale: bool,
                 has_addend: bool, has_bias: bool, stores_preactivation: bool, activation: str, multiprocessors: int,
                 precision: str) -> tuple:
    """(grid, constexprs) of one launch; cached while no tile override is active (tiles.override)."""
    tile = gemm_tile(M, N, operand_dtype, multiprocessors)
    grid = (cdiv(M, tile.block_m) * cdiv(N, tile.block_n),)
    return grid, {
        "NUM_SEGMENTS": num_segments, "QUANTIZED": quantized, "HAS_COLUMN_SCALE": has_column_scale,
        "HAS_ADDEND": has_addend, "HAS_BIAS": has_bias, "STORE_PREACTIVATION": stores_preactivation,
        "ACTIVATION": ACTIVATION_CODES[activation],
        "ACC_DTYPE": tl.float64 if accumulate_dtype(out_dtype) == torch.float64 else tl.float32,
        "INPUT_PRECISION": precision, **tile.launch_options(),
    }


def segmented_matmul(out, segments, *, addend=None, row_map=((1, 1, 0), (1, 1, 0)), bias=None,
                     activation="none", saved=None, column_scale=None):
    """Writes act((sum_s a_s @ b_s) * column_scale + addend[row_map] + bias) into ``out`` (M, N), and
    the pre-activation into ``saved`` when given. ``segments`` is a list of at most MAX_SEGMENTS
    (a (M, K_s), b (K_s, N)) pairs, or (a, b, token_scale (M,)) triples of int8 operands, possibly
    empty (then only the epilogue runs)."""
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    assert len(segments) <= MAX_SEGMENTS
    quantized = bool(segments) and len(segments[0]) == 3
    segment_args = []
    for segment in segments:
        a, b = segment[0], segment[1]
        token_scale = segment[2] if quantized else None
        segment_args += [a, *a.stride(), b, *b.stride(), a.shape[1], token_scale,
                         token_scale.stride(0) if quantized else None]
    # The segments a launch does not have, and absent epilogue operands, are None: constants the
    # kernel never reads (its flags leave their code out), and nothing for the launcher to bind.
    segment_args += [None] * (9 * (MAX_SEGMENTS - len(segments)))
    (div0, mod0, mul0), (div1, mod1, mul1) = row_map
    operand_dtype = segments[0][0].dtype if segments else out.dtype
    plan = _launch_plan if not tiles_overridden() else _launch_plan.__wrapped__
    grid, constexprs = plan(M, N, len(segments), quantized, operand_dtype, out.dtype, column_scale is not None,
                            addend is not None, bias is not None, saved is not None, activation,
                            multiprocessors(out.device), input_precision(operand_dtype))
    traceable(segmented_matmul_kernel)[grid](
        out, *out.stride(), *_operand(saved, 2), *_operand(addend, 2), div0, mod0, mul0, div1, mod1, mul1,
        *_operand(bias, 1), *_operand(column_scale, 1), *segment_args, M, N, **constexprs,
    )
    return out
