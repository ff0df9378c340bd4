"""cross_modal_attention on GPU (and on CPU under the interpreter switch): flash-style Triton kernels.

Forward: one program per (query block, sample, query head, key split) streams the sample's valid
keys through an online softmax in base 2, so no Lq x Lk matrix is ever stored and keys past
kv_lens cost nothing. When the (sample, head, query block) programs alone cannot fill the GPU
(few queries over long keys), the keys are split across programs (split-KV) and a second kernel
combines the partial results by their log-sum-exps.
Backward (recomputing the probabilities from the saved log-sum-exp): a small kernel forms
delta = rowsum(dO * O); one kernel per key block accumulates dK and dV over every query of every
query head that reads that kv head (so grouped heads are summed in registers, without atomics);
one kernel per query block accumulates dQ.

Both the padded form (B, L, H, D) with per-sample lengths and the packed form (total, H, D) with
cu_seqlens run the same kernels: a sample's rows start at b * stride_b + start_b * stride_l, with
stride_b = 0 and start_b = cu_seqlens[b] when packed. Every row of the output the grid covers is
written (zeros past a sample's length), so outputs need no memset; the packed form writes only a
sample's own rows.

Dropout redraws the mask of mmkern.reference.dropout_keep_mask from the seed and each element's
index in the (B, Hq, Lq, Lk) matrix (Lq, Lk the max lengths when packed).

Variants: a window (causal is (-1, 0)) skips the key blocks outside it; a key mask is read per key
block next to the keys; a softcap turns the scores into softcap * tanh(s / softcap) (the backward
multiplies dS by the slope 1 - tanh^2); sinks join the softmax's denominator when a row is finished
(in the combine kernel when the keys are split), so the saved lse holds them and the backward needs
nothing more (their own gradient, -sum exp(sink - lse) * delta, is taken by mmkern.ops).

Tile sizes are per head dim and have not been tuned on a GPU yet.
"""

import math
import struct

import torch
import triton
import triton.language as tl

from mmkern.kernels.launch import (
    accumulate_dtype,
    compute_capability,
    input_precision,
    multiprocessors,
    power_of_2_at_least,
    tma_descriptor,
    traceable,
)
from mmkern.kernels.tiles import (
    attention_backward_kv_tile,
    attention_backward_tile,
    attention_forward_tile,
    attention_residency,
    cdiv,
    combine_block_m,
    key_splits,
    packs_query_heads,
)

# Offsets a program reads at once to take their running maximum (one load for batches up to it).
OFFSETS_BLOCK: tl.constexpr = tl.constexpr(256)


@triton.jit
def _ln2(ACC_DTYPE: tl.constexpr):
    """ln 2 in the accumulation dtype: a float literal in a kernel is a float32 constant, a few
    ulps of float64 off."""
    return tl.log(tl.full((), 2.0, ACC_DTYPE))


@triton.jit
def _wide(hi, lo, ACC_DTYPE: tl.constexpr):
    """A host float passed as two float32 halves (see float_halves), rejoined in the accumulation dtype."""
    return tl.cast(hi, ACC_DTYPE) + tl.cast(lo, ACC_DTYPE)


@triton.jit
def _scalars(scale_hi, scale_lo, dropout_scale_hi, dropout_scale_lo, softcap_hi, softcap_lo, ACC_DTYPE: tl.constexpr):
    """(ln 2, scale, scale / ln 2, dropout scale, scale / softcap, softcap / ln 2) in the accumulation
    dtype: float64 kernels keep float64's precision in every constant."""
    ln2 = _ln2(ACC_DTYPE)
    scale = _wide(scale_hi, scale_lo, ACC_DTYPE)
    softcap = _wide(softcap_hi, softcap_lo, ACC_DTYPE)
    return (
        ln2,
        scale,
        scale / ln2,
        _wide(dropout_scale_hi, dropout_scale_lo, ACC_DTYPE),
        scale / softcap,
        softcap / ln2,
    )


@triton.jit
def _running_max_offset(starts_ptr, i, rows):
    """max(starts[0], ..., starts[i]) clamped into [0, rows]: the offsets made non-decreasing, and inside
    the tensor, whatever values they hold."""
    offset = tl.zeros((), tl.int64)
    for chunk in range(0, i + 1, OFFSETS_BLOCK):
        index = chunk + tl.arange(0, OFFSETS_BLOCK)
        offset = tl.maximum(offset, tl.max(tl.load(starts_ptr + index, mask=index <= i, other=0).to(tl.int64), 0))
    return tl.minimum(offset, rows)


@triton.jit
def _span(b, starts_ptr, lens_ptr, full_len, rows, PACKED: tl.constexpr, HAS_LENS: tl.constexpr):
    """(first row, number of rows) of sample b, such that no value of the lengths or offsets, checked
    or not, makes a kernel read outside its tensor (of ``rows`` rows when packed) or two samples
    share a row: lengths are clamped into [0, full_len]; offsets are read as their running maximum
    clamped into [0, rows] (so well-formed ones are read as they are), a sample keeping at most
    full_len rows."""
    if PACKED:
        start = _running_max_offset(starts_ptr, b, rows)
        length = _running_max_offset(starts_ptr, b + 1, rows) - start
    else:
        start = tl.zeros((), tl.int64)
        length = tl.zeros((), tl.int64) + full_len
        if HAS_LENS:
            length = tl.load(lens_ptr + b).to(tl.int64)
    return start, tl.minimum(tl.maximum(length, 0), full_len)


@triton.jit
def _write_limit(length, full_len, OWN_ROWS_ONLY: tl.constexpr):
    """The rows a program may write: only the sample's own when packed (the next sample's rows follow
    them), else every padded row, so that rows past the length get their defined zeros."""
    return length if OWN_ROWS_ONLY else full_len


@triton.jit
def _box(descriptor, b, start, h, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """The (ROWS, WIDTH) tile of rows start.. of sample b, head h, read through a TMA descriptor of a
    (B, L, H, D) tensor in (1, ROWS, 1, WIDTH) boxes (rows past L and dims past D come in as zeros)."""
    return tl.reshape(descriptor.load([b.to(tl.int32), tl.cast(start, tl.int32), h.to(tl.int32), 0]), (ROWS, WIDTH))


@triton.jit
def _sample_and_head(pid, heads):
    """(sample, head) of a program over the (sample, head) pairs of ``heads`` heads a sample, in 64 bits
    (offsets past 2^31 elements)."""
    pair = pid.to(tl.int64)
    return pair // heads, pair % heads


@triton.jit
def _dropout_keep(seed_ptr, b, h, rows, cols, Q_HEADS, Q_LEN, K_LEN, threshold):
    """The keep mask of mmkern.reference.dropout_keep_mask for query ``rows`` and key ``cols``, index
    tiles that broadcast to the tile's shape (rows[:, None] and cols[None, :], or transposed): splitmix64
    of the element index offset by the seed, kept when its top 24 bits are >= threshold."""
    seed = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    offset = seed * 0xD1B54A32D192ED03 + 0x9E3779B97F4A7C15
    base = (b * Q_HEADS + h).to(tl.uint64) * Q_LEN
    z = ((base + rows.to(tl.uint64)) * K_LEN + cols.to(tl.uint64)) + offset
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return (z >> 40).to(tl.int32) >= threshold


@triton.jit
def _ratio(numerator: tl.constexpr, denominator: tl.constexpr, DTYPE: tl.constexpr):
    """numerator / denominator in DTYPE, exact to its precision (the integers are exact float32 values)."""
    return tl.full((), numerator, DTYPE) / denominator


@triton.jit
def _tanh(x):
    """tanh to x's precision, float64 included (Triton's libdevice tanh runs on CUDA only, not under the
    interpreter): (1 - e) / (1 + e), e = exp(-2|x|), where that does not cancel, and the odd series
    up to x^11 below |x| = 1/16 (its next term is 1e-17 of x there)."""
    DTYPE: tl.constexpr = x.dtype
    ax = tl.abs(x)
    e = tl.exp(-2 * ax)
    far = (1 - e) / (1 + e)
    x2 = ax * ax
    series = _ratio(1382, 155925, DTYPE)
    series = _ratio(62, 2835, DTYPE) - x2 * series
    series = _ratio(17, 315, DTYPE) - x2 * series
    series = _ratio(2, 15, DTYPE) - x2 * series
    series = _ratio(1, 3, DTYPE) - x2 * series
    near = ax - ax * x2 * series
    t = tl.where(ax < 0.0625, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores_log2(qk, scale_log2, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """(base-2 scores, slope) of the q.k dot products: qk * scale / ln 2, or with a softcap c,
    c * tanh(qk * scale / c) / ln 2 (cap_in = scale / c, cap_out = c / ln 2) and its slope 1 - tanh^2
    (1 without a softcap)."""
    # One return after a constexpr if/else: Triton's compiler types every return of a function alike,
    # pruned branch or not, and the slope is a tile with a softcap, a scalar without.
    if SOFTCAP:
        t = _tanh(qk * cap_in)
        scores, slope = t * cap_out, 1 - t * t
    else:
        scores, slope = qk * scale_log2, 1.0
    return scores, slope


@triton.jit
def _keys_kept(key_mask_ptr, b, stride_mb, stride_ml, k_start, cols, col_valid):
    """Whether key_mask keeps each of a sample's keys cols (False past the valid ones)."""
    return tl.load(key_mask_ptr + b * stride_mb + (k_start + cols) * stride_ml, mask=col_valid, other=0) != 0


@triton.jit
def _bias_log2(
    bias_ptr, b, h, rows, cols, stride_bb, stride_bh, stride_bq, stride_bk, valid, ln2, ACC_DTYPE: tl.constexpr
):
    """Head h's bias for query ``rows`` and key ``cols`` (index tiles that broadcast to the tile's shape)
    in base-2 units (the scores' own), 0 outside ``valid``. Broadcast dims have stride 0: a bias shared
    by the batch or the heads is read where it lies."""
    bias = tl.load(
        bias_ptr + b * stride_bb + h * stride_bh + rows * stride_bq + cols * stride_bk,
        mask=valid,
        other=0.0,
    )
    return bias.to(ACC_DTYPE) / ln2


@triton.jit
def _kept_range(key_mask_ptr, b, stride_mb, stride_ml, k_start, kv_len, BLOCK_N: tl.constexpr):
    """[lo, hi): the key blocks from the one holding a sample's first kept key to the one after its last
    (empty if it keeps none), so a left- or right-padded sample's loop skips its padding with no branch
    in the loop. Scans the sample's key mask, kv_len bytes, 1024 at a time."""
    first = tl.zeros((), tl.int64) + kv_len
    last = tl.full((), -1, tl.int64)
    for start in range(0, kv_len, 1024):
        cols = start + tl.arange(0, 1024).to(tl.int64)
        kept = _keys_kept(key_mask_ptr, b, stride_mb, stride_ml, k_start, cols, cols < kv_len)
        first = tl.minimum(first, tl.min(tl.where(kept, cols, kv_len), 0))
        last = tl.maximum(last, tl.max(tl.where(kept, cols, -1), 0))
    return (first // BLOCK_N) * BLOCK_N, last + 1


@triton.jit
def _any_kept(seen, HAS_KEY_MASK: tl.constexpr):
    """Whether a block of keys has one the key mask keeps; without a key mask, statically true (a check
    per block, outside any loop over the other side)."""
    if HAS_KEY_MASK:
        return tl.max(seen.to(tl.int32), 0) > 0
    return True


@triton.jit
def _window_mask(rows, cols, diagonal, window_left, window_right):
    """Whether query i sees key j under the window, i + d - left <= j <= i + d + right (a negative bound
    is unbounded), d = kv_len - q_len aligning the last query with the last key, for query ``rows`` and
    key ``cols``: index tiles that broadcast to the tile's shape."""
    # In 32 bits (positions and lengths fit): a tile of 64-bit offsets would take twice the registers.
    offset = cols.to(tl.int32) - rows.to(tl.int32) - diagonal.to(tl.int32)
    return ((window_left < 0) | (offset >= -window_left)) & ((window_right < 0) | (offset <= window_right))


@triton.jit
def _key_range(first_row, end_row, q_len, kv_len, window_left, window_right, BLOCK_N: tl.constexpr):
    """[lo, hi) holding every key that queries first_row to end_row - 1 see, lo a multiple of BLOCK_N:
    the key blocks wholly outside the window are never visited."""
    last_row = tl.minimum(end_row, q_len) - 1
    diagonal = kv_len - q_len
    lo = tl.where(window_left >= 0, tl.maximum(first_row + diagonal - window_left, 0), 0)
    hi = tl.where(window_right >= 0, tl.minimum(last_row + diagonal + window_right + 1, kv_len), kv_len)
    return lo // BLOCK_N * BLOCK_N, hi


@triton.jit
def _query_range(pid_n, q_len, kv_len, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) holding every query that sees a key of key block pid_n, lo a multiple of BLOCK_M."""
    first_col = pid_n * BLOCK_N
    last_col = tl.minimum(first_col + BLOCK_N, kv_len) - 1
    diagonal = kv_len - q_len
    lo = tl.where(window_right >= 0, tl.maximum(first_col - diagonal - window_right, 0), 0)
    hi = tl.where(window_left >= 0, tl.minimum(last_col - diagonal + window_left + 1, q_len), q_len)
    return lo // BLOCK_M * BLOCK_M, hi


@triton.jit
def _store_rows(ptr, values, rows, cols, stride_row, stride_col, length, write_limit, n_cols):
    """Stores a (rows, cols) tile, zero past the sample's `length` rows, for rows below write_limit."""
    values = tl.where((rows < length)[:, None], values, 0.0)
    mask = (rows < write_limit)[:, None] & (cols < n_cols)[None, :]
    tl.store(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, values.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _multiples_of_8(stride_b, stride_l, stride_h, STRIDES_8: tl.constexpr):
    """A tensor's batch, row and head strides, known to the compiler as multiples of 8 elements (16 bytes
    of a 16-bit dtype) where the launcher found them so. The JIT marks only multiples of 16: a head dim
    of 40, 24 or 56 (its head stride) would otherwise leave every load of the tensor unvectorised and
    the key loop unpipelined. Written as (s // 8) * 8, which the compiler's alignment analysis follows
    (it drops tl.multiple_of on a scalar), for two shifts a program."""
    if STRIDES_8:
        stride_b = (stride_b // 8) * 8
        stride_l = (stride_l // 8) * 8
        stride_h = (stride_h // 8) * 8
    return stride_b, stride_l, stride_h


@triton.jit
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    seed_ptr,
    q_starts_ptr,
    k_starts_ptr,
    q_lens_ptr,
    kv_lens_ptr,
    key_mask_ptr,
    sinks_ptr,
    bias_ptr,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kl,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vl,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_od,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ll,
    stride_ls,
    stride_mb,
    stride_ml,
    stride_bb,
    stride_bh,
    stride_bq,
    stride_bk,
    Q_LEN,
    K_LEN,
    Q_ROWS,
    K_ROWS,
    Q_HEADS,
    GROUP,
    HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    KEYS_PER_SPLIT,
    scale_hi,
    scale_lo,
    dropout_threshold,
    dropout_scale_hi,
    dropout_scale_lo,
    window_left,
    window_right,
    softcap_hi,
    softcap_lo,
    PACKED: tl.constexpr,
    HAS_Q_LENS: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    DROPOUT: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    PACK_GQA: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
    STRIDES_8: tl.constexpr,
    KV_TMA: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    stride_qb, stride_ql, stride_qh = _multiples_of_8(stride_qb, stride_ql, stride_qh, STRIDES_8)
    stride_kb, stride_kl, stride_kh = _multiples_of_8(stride_kb, stride_kl, stride_kh, STRIDES_8)
    stride_vb, stride_vl, stride_vh = _multiples_of_8(stride_vb, stride_vl, stride_vh, STRIDES_8)
    stride_ob, stride_ol, stride_oh = _multiples_of_8(stride_ob, stride_ol, stride_oh, STRIDES_8)
    pid_m = tl.program_id(0)
    split = tl.program_id(2)
    # A program's rows: BLOCK_M queries of one head, or with PACK_GQA, rows of a key head's GROUP query
    # heads, query-major (row r is query r // GROUP of head r % GROUP of the group), so that the group
    # reads each K/V block once and a few queries still fill a tile. `heads` is then a row vector
    # (`row_heads` its column, for tiles), else the program's one head.
    if PACK_GQA:
        b, kv_head = _sample_and_head(tl.program_id(1), Q_HEADS // GROUP)
        # In 32 bits (a key head's rows number far fewer than 2^31): 64-bit division is a long
        # sequence, and its results are live across the key loop.
        tile_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = (tile_rows // GROUP).to(tl.int64)
        heads = kv_head * GROUP + tile_rows % GROUP
        row_heads = heads[:, None]
        first_row = pid_m * BLOCK_M // GROUP
        end_row = (pid_m * BLOCK_M + BLOCK_M - 1) // GROUP + 1
    else:
        b, heads = _sample_and_head(tl.program_id(1), Q_HEADS)
        kv_head = heads // GROUP
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_heads = heads
        first_row = pid_m * BLOCK_M
        end_row = first_row + BLOCK_M
    q_start, q_len = _span(b, q_starts_ptr, q_lens_ptr, Q_LEN, Q_ROWS, PACKED, HAS_Q_LENS)
    k_start, kv_len = _span(b, k_starts_ptr, kv_lens_ptr, K_LEN, K_ROWS, PACKED, HAS_KV_LENS)
    # Split partials are written over every row (the combine kernel reads them); outputs over the
    # padded rows, or only the sample's own rows when packed.
    write_limit = _write_limit(q_len, Q_LEN, PACKED and not SPLIT)
    if first_row >= write_limit:
        return

    dims = tl.arange(0, D_PAD)
    v_dims = tl.arange(0, DV_PAD)
    cols0 = tl.arange(0, BLOCK_N).to(tl.int64)
    q_base = q_ptr + b * stride_qb + q_start * stride_ql + row_heads * stride_qh
    if not KV_TMA:
        k_base = k_ptr + b * stride_kb + k_start * stride_kl + kv_head * stride_kh
        v_base = v_ptr + b * stride_vb + k_start * stride_vl + kv_head * stride_vh
    row_valid = rows < q_len
    q = tl.load(
        q_base + rows[:, None] * stride_ql + dims[None, :] * stride_qd,
        mask=row_valid[:, None] & (dims < HEAD_DIM)[None, :],
        other=0.0,
    )

    ln2, _, scale_log2, dropout_scale, cap_in, cap_out = _scalars(
        scale_hi, scale_lo, dropout_scale_hi, dropout_scale_lo, softcap_hi, softcap_lo, ACC_DTYPE
    )
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, DV_PAD), ACC_DTYPE)
    lo = split * KEYS_PER_SPLIT
    hi = tl.minimum(lo + KEYS_PER_SPLIT, kv_len)
    diagonal = kv_len - q_len
    if WINDOWED:
        window_lo, window_hi = _key_range(first_row, end_row, q_len, kv_len, window_left, window_right, BLOCK_N)
        lo = tl.maximum(lo, window_lo)
        hi = tl.minimum(hi, window_hi)
    if HAS_KEY_MASK:
        kept_lo, kept_hi = _kept_range(key_mask_ptr, b, stride_mb, stride_ml, k_start, kv_len, BLOCK_N)
        lo = tl.maximum(lo, kept_lo)
        hi = tl.minimum(hi, kept_hi)
    for start in range(lo, hi, BLOCK_N):
        cols = start + cols0
        col_valid = cols < hi
        if KV_TMA:
            # (1, BLOCK_N, 1, D_PAD) boxes of the (B, Lk, Hkv, D) tensor: dims past D and keys past Lk
            # come in as zeros; keys in [hi, Lk) are the sample's own, read as the pointer path reads
            # masked keys inside [lo, hi): their scores are masked below.
            k = _box(k_ptr, b, start, kv_head, BLOCK_N, D_PAD)
            k = tl.trans(k)
        else:
            k = tl.load(
                k_base + cols[None, :] * stride_kl + dims[:, None] * stride_kd,
                mask=col_valid[None, :] & (dims < HEAD_DIM)[:, None],
                other=0.0,
            )
        qk = tl.dot(q, k, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if FOLD_SCALE:
            # A positive scale and no bias or softcap: the maximum is taken of the raw products, and the
            # scale and the shift fold into one FMA per score below (one multiply a score fewer).
            s = qk
        else:
            # Not unpacked into `_`: the unused scale above is `_` too, and Triton would carry it round the loop.
            s = _scores_log2(qk, scale_log2, cap_in, cap_out, SOFTCAP)[0]
        if HAS_BIAS:
            s = s + _bias_log2(
                bias_ptr,
                b,
                row_heads,
                rows[:, None],
                cols[None, :],
                stride_bb,
                stride_bh,
                stride_bq,
                stride_bk,
                row_valid[:, None] & col_valid[None, :],
                ln2,
                ACC_DTYPE,
            )
        seen = col_valid
        if HAS_KEY_MASK:
            seen = seen & _keys_kept(key_mask_ptr, b, stride_mb, stride_ml, k_start, cols, col_valid)
        s = tl.where(seen[None, :], s, float("-inf"))
        if WINDOWED:
            s = tl.where(
                _window_mask(rows[:, None], cols[None, :], diagonal, window_left, window_right), s, float("-inf")
            )
        if FOLD_SCALE:
            m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = m_new
        if WINDOWED or HAS_KEY_MASK or HAS_BIAS:
            # A row may have seen no key yet: its maximum stays -inf, and its terms are shifted by 0
            # instead, so they come out exp2(-inf) = 0 rather than NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        if FOLD_SCALE:
            p = tl.exp2(s * scale_log2 - m_shift[:, None])
        else:
            p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(
                seed_ptr, b, row_heads, rows[:, None], cols[None, :], Q_HEADS, Q_LEN, K_LEN, dropout_threshold
            )
            p = tl.where(keep, p, 0.0)
        if KV_TMA:
            v = _box(v_ptr, b, start, kv_head, BLOCK_N, DV_PAD)
        else:
            v = tl.load(
                v_base + cols[:, None] * stride_vl + v_dims[None, :] * stride_vd,
                mask=col_valid[:, None] & (v_dims < V_DIM)[None, :],
                other=0.0,
            )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        m_i = m_new

    if HAS_SINKS and not SPLIT:  # split partials leave the sink to the combine kernel
        m_i, l_i, acc = _add_sink(sinks_ptr, heads, m_i, l_i, acc, ln2, ACC_DTYPE)
    has_keys = l_i > 0
    out = acc * (dropout_scale / tl.where(has_keys, l_i, 1.0))[:, None]
    # Stored in base 2 for the combine kernel; in natural log for the caller.
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    if not SPLIT:
        lse = lse * ln2
    # Split partials are indexed by the sample's own rows; outputs by the (packed) tensor's rows.
    out_start = 0 if SPLIT else q_start
    out_base = out_ptr + b * stride_ob + out_start * stride_ol + row_heads * stride_oh + split * stride_os
    _store_rows(out_base, out, rows, v_dims, stride_ol, stride_od, q_len, write_limit, V_DIM)
    lse = tl.where(row_valid, lse, float("-inf"))
    tl.store(
        lse_ptr + b * stride_lb + heads * stride_lh + (out_start + rows) * stride_ll + split * stride_ls,
        lse,
        mask=rows < write_limit,
    )


@triton.jit
def _add_sink(sinks_ptr, h, m, total, acc, ln2, ACC_DTYPE: tl.constexpr):
    """A row's base-2 running maximum, sum of exponentials and (optionally) weighted values with head h's
    sink logit joined to the sum: the maximum becomes max(m, sink), the others are rescaled to it."""
    sink = tl.load(sinks_ptr + h).to(ACC_DTYPE) / ln2
    m_new = tl.maximum(m, sink)
    alpha = tl.exp2(m - m_new)  # 0 for a row that saw no key (m = -inf)
    return m_new, total * alpha + tl.exp2(sink - m_new), acc * alpha[:, None]


@triton.jit
def _combine_splits_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    lse_ptr,
    q_starts_ptr,
    q_lens_ptr,
    sinks_ptr,
    stride_pb,
    stride_pl,
    stride_ph,
    stride_pd,
    stride_ps,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qs,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_od,
    stride_lb,
    stride_lh,
    stride_ll,
    Q_LEN,
    Q_ROWS,
    Q_HEADS,
    V_DIM: tl.constexpr,
    SPLITS,
    PACKED: tl.constexpr,
    HAS_Q_LENS: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, h = _sample_and_head(tl.program_id(1), Q_HEADS)
    q_start, q_len = _span(b, q_starts_ptr, q_lens_ptr, Q_LEN, Q_ROWS, PACKED, HAS_Q_LENS)
    write_limit = _write_limit(q_len, Q_LEN, PACKED)
    if pid_m * BLOCK_M >= write_limit:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    v_dims = tl.arange(0, DV_PAD)
    lse_base = part_lse_ptr + b * stride_qb + h * stride_qh + rows * stride_ql
    out_base = part_out_ptr + b * stride_pb + h * stride_ph + rows[:, None] * stride_pl + v_dims[None, :] * stride_pd
    row_mask = rows < write_limit
    tile_mask = row_mask[:, None] & (v_dims < V_DIM)[None, :]

    m = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    for s in range(SPLITS):
        m = tl.maximum(m, tl.load(lse_base + s * stride_qs, mask=row_mask, other=float("-inf")))
    has_keys = m > float("-inf")
    m_safe = tl.where(has_keys, m, 0.0)
    total = tl.zeros((BLOCK_M,), ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, DV_PAD), ACC_DTYPE)
    for s in range(SPLITS):
        weight = tl.exp2(tl.load(lse_base + s * stride_qs, mask=row_mask, other=float("-inf")) - m_safe)
        total += weight
        acc += weight[:, None] * tl.load(out_base + s * stride_ps, mask=tile_mask, other=0.0)
    if HAS_SINKS:
        m_safe, total, acc = _add_sink(sinks_ptr, h, m, total, acc, _ln2(ACC_DTYPE), ACC_DTYPE)
        has_keys = total > 0
    out = acc / tl.where(has_keys, total, 1.0)[:, None]
    lse = tl.where(has_keys, (m_safe + tl.log2(tl.where(has_keys, total, 1.0))) * _ln2(ACC_DTYPE), float("-inf"))
    lse = tl.where(rows < q_len, lse, float("-inf"))
    _store_rows(
        out_ptr + b * stride_ob + q_start * stride_ol + h * stride_oh,
        out,
        rows,
        v_dims,
        stride_ol,
        stride_od,
        q_len,
        write_limit,
        V_DIM,
    )
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + (q_start + rows) * stride_ll, lse, mask=row_mask)


@triton.jit
def _delta_kernel(
    grad_ptr,
    out_ptr,
    delta_ptr,
    q_starts_ptr,
    q_lens_ptr,
    stride_gb,
    stride_gl,
    stride_gh,
    stride_gd,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_od,
    stride_db,
    stride_dh,
    stride_dl,
    Q_LEN,
    Q_ROWS,
    Q_HEADS,
    V_DIM: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_Q_LENS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O), the softmax backward's correction (dropout included, as O holds it)."""
    pid_m = tl.program_id(0)
    b, h = _sample_and_head(tl.program_id(1), Q_HEADS)
    q_start, q_len = _span(b, q_starts_ptr, q_lens_ptr, Q_LEN, Q_ROWS, PACKED, HAS_Q_LENS)
    write_limit = _write_limit(q_len, Q_LEN, PACKED)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    v_dims = tl.arange(0, DV_PAD)
    mask = (rows < q_len)[:, None] & (v_dims < V_DIM)[None, :]
    grad = tl.load(
        grad_ptr + b * stride_gb + h * stride_gh + (q_start + rows)[:, None] * stride_gl + v_dims[None, :] * stride_gd,
        mask=mask,
        other=0.0,
    )
    out = tl.load(
        out_ptr + b * stride_ob + h * stride_oh + (q_start + rows)[:, None] * stride_ol + v_dims[None, :] * stride_od,
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(grad.to(ACC_DTYPE) * out.to(ACC_DTYPE), 1)
    tl.store(delta_ptr + b * stride_db + h * stride_dh + (q_start + rows) * stride_dl, delta, mask=rows < write_limit)


@triton.jit
def _probabilities(
    first,
    second,
    lse_log2,
    bias_log2,
    rows,
    cols,
    row_valid,
    col_seen,
    scale_log2,
    cap_in,
    cap_out,
    diagonal,
    window_left,
    window_right,
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The softmax probabilities of the scores first @ second (Q K^T, or its transpose K Q^T), recomputed
    from the base-2 log-sum-exp (with the bias's tile added to the scores), zero outside the valid rows
    and seen keys and outside the window; and the softcap's slope (see _scores_log2). ``lse_log2``,
    ``rows``, ``cols``, ``row_valid`` and ``col_seen`` broadcast to the tile's shape ([:, None] for the
    queries and [None, :] for the keys, or the other way round)."""
    s, slope = _scores_log2(
        tl.dot(first, second, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE),
        scale_log2,
        cap_in,
        cap_out,
        SOFTCAP,
    )
    if HAS_BIAS:
        s = s + bias_log2
    p = tl.exp2(s - lse_log2)
    valid = row_valid & col_seen
    if WINDOWED:
        valid = valid & _window_mask(rows, cols, diagonal, window_left, window_right)
    return tl.where(valid, p, 0.0), slope


@triton.jit
def _finite_lse(lse_log2, HAS_BIAS: tl.constexpr):
    """A row's lse for recomputing its probabilities: a row a bias of -inf left with no key has lse -inf,
    and +inf in its place makes every exp2(s - lse) 0 (-inf - -inf would be NaN)."""
    if HAS_BIAS:
        lse_log2 = tl.where(lse_log2 == float("-inf"), float("inf"), lse_log2)
    return lse_log2


@triton.jit
def _grad_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    grad_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    seed_ptr,
    q_starts_ptr,
    k_starts_ptr,
    q_lens_ptr,
    kv_lens_ptr,
    key_mask_ptr,
    bias_ptr,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kl,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vl,
    stride_vh,
    stride_vd,
    stride_gb,
    stride_gl,
    stride_gh,
    stride_gd,
    stride_lb,
    stride_lh,
    stride_ll,
    stride_dkb,
    stride_dkl,
    stride_dkh,
    stride_dkd,
    stride_dvb,
    stride_dvl,
    stride_dvh,
    stride_dvd,
    stride_mb,
    stride_ml,
    stride_bb,
    stride_bh,
    stride_bq,
    stride_bk,
    Q_LEN,
    K_LEN,
    Q_ROWS,
    K_ROWS,
    Q_HEADS,
    KV_HEADS,
    GROUP,
    HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    scale_hi,
    scale_lo,
    dropout_threshold,
    dropout_scale_hi,
    dropout_scale_lo,
    window_left,
    window_right,
    softcap_hi,
    softcap_lo,
    PACKED: tl.constexpr,
    HAS_Q_LENS: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    DROPOUT: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STRIDES_8: tl.constexpr,
    Q_TMA: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    stride_qb, stride_ql, stride_qh = _multiples_of_8(stride_qb, stride_ql, stride_qh, STRIDES_8)
    stride_kb, stride_kl, stride_kh = _multiples_of_8(stride_kb, stride_kl, stride_kh, STRIDES_8)
    stride_vb, stride_vl, stride_vh = _multiples_of_8(stride_vb, stride_vl, stride_vh, STRIDES_8)
    stride_gb, stride_gl, stride_gh = _multiples_of_8(stride_gb, stride_gl, stride_gh, STRIDES_8)
    stride_dkb, stride_dkl, stride_dkh = _multiples_of_8(stride_dkb, stride_dkl, stride_dkh, STRIDES_8)
    stride_dvb, stride_dvl, stride_dvh = _multiples_of_8(stride_dvb, stride_dvl, stride_dvh, STRIDES_8)
    pid_n = tl.program_id(0)
    ln2, scale, scale_log2, dropout_scale, cap_in, cap_out = _scalars(
        scale_hi, scale_lo, dropout_scale_hi, dropout_scale_lo, softcap_hi, softcap_lo, ACC_DTYPE
    )
    b, kv_h = _sample_and_head(tl.program_id(1), KV_HEADS)
    q_start, q_len = _span(b, q_starts_ptr, q_lens_ptr, Q_LEN, Q_ROWS, PACKED, HAS_Q_LENS)
    k_start, kv_len = _span(b, k_starts_ptr, kv_lens_ptr, K_LEN, K_ROWS, PACKED, HAS_KV_LENS)
    write_limit = _write_limit(kv_len, K_LEN, PACKED)
    if pid_n * BLOCK_N >= write_limit:
        return

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    dims = tl.arange(0, D_PAD)
    v_dims = tl.arange(0, DV_PAD)
    rows0 = tl.arange(0, BLOCK_M).to(tl.int64)
    col_valid = cols < kv_len
    col_seen = col_valid
    if HAS_KEY_MASK:
        col_seen = col_seen & _keys_kept(key_mask_ptr, b, stride_mb, stride_ml, k_start, cols, col_valid)
    # K (BLOCK_N, D) and V (BLOCK_N, Dv), read once for every query of every head in the group. The
    # scores are computed transposed, S^T = K Q^T (keys down, queries across), as FlashAttention 2 does:
    # P^T and dS^T then come out of their dots in the accumulator's layout, which is the layout the dots
    # into dV and dK take them in, so neither goes through shared memory to be transposed.
    k = tl.load(
        k_ptr + b * stride_kb + kv_h * stride_kh + (k_start + cols)[:, None] * stride_kl + dims[None, :] * stride_kd,
        mask=col_valid[:, None] & (dims < HEAD_DIM)[None, :],
        other=0.0,
    )
    v = tl.load(
        v_ptr + b * stride_vb + kv_h * stride_vh + (k_start + cols)[:, None] * stride_vl + v_dims[None, :] * stride_vd,
        mask=col_valid[:, None] & (v_dims < V_DIM)[None, :],
        other=0.0,
    )
    dk = tl.zeros((BLOCK_N, D_PAD), ACC_DTYPE)
    dv = tl.zeros((BLOCK_N, DV_PAD), ACC_DTYPE)
    # A block past kv_len, or all hidden by the key mask, still writes its zeros; only blocks with keys
    # visit the queries (within the window, those that see one of the block's keys).
    q_end = tl.where((pid_n * BLOCK_N < kv_len) & _any_kept(col_seen, HAS_KEY_MASK), q_len, 0)
    q_begin = 0
    diagonal = kv_len - q_len
    if WINDOWED:
        q_begin, window_end = _query_range(pid_n, q_len, kv_len, window_left, window_right, BLOCK_M, BLOCK_N)
        q_end = tl.minimum(q_end, window_end)
    for g in range(GROUP):
        h = kv_h * GROUP + g
        if not Q_TMA:
            q_base = q_ptr + b * stride_qb + h * stride_qh + q_start * stride_ql
            g_base = grad_ptr + b * stride_gb + h * stride_gh + q_start * stride_gl
        l_base = lse_ptr + b * stride_lb + h * stride_lh + q_start * stride_ll
        d_base = delta_ptr + b * stride_lb + h * stride_lh + q_start * stride_ll
        for start in range(q_begin, q_end, BLOCK_M):
            rows = start + rows0
            row_valid = rows < q_len
            if Q_TMA:
                # (1, BLOCK_M, 1, D_PAD) boxes of the (B, Lq, Hq, D) tensors, every query valid: rows past
                # Lq and dims past D come in as zeros.
                q = _box(q_ptr, b, start, h, BLOCK_M, D_PAD)
                grad = _box(grad_ptr, b, start, h, BLOCK_M, DV_PAD)
            else:
                q = tl.load(
                    q_base + rows[:, None] * stride_ql + dims[None, :] * stride_qd,
                    mask=row_valid[:, None] & (dims < HEAD_DIM)[None, :],
                    other=0.0,
                )
                grad = tl.load(
                    g_base + rows[:, None] * stride_gl + v_dims[None, :] * stride_gd,
                    mask=row_valid[:, None] & (v_dims < V_DIM)[None, :],
                    other=0.0,
                )
            lse_log2 = _finite_lse(tl.load(l_base + rows * stride_ll, mask=row_valid, other=0.0) / ln2, HAS_BIAS)
            delta = tl.load(d_base + rows * stride_ll, mask=row_valid, other=0.0)
            bias_log2 = 0.0
            if HAS_BIAS:
                bias_log2 = _bias_log2(
                    bias_ptr,
                    b,
                    h,
                    rows[None, :],
                    cols[:, None],
                    stride_bb,
                    stride_bh,
                    stride_bq,
                    stride_bk,
                    col_valid[:, None] & row_valid[None, :],
                    ln2,
                    ACC_DTYPE,
                )
            p_t, slope = _probabilities(
                k,
                tl.trans(q),
                lse_log2[None, :],
                bias_log2,
                rows[None, :],
                cols[:, None],
                row_valid[None, :],
                col_seen[:, None],
                scale_log2,
                cap_in,
                cap_out,
                diagonal,
                window_left,
                window_right,
                WINDOWED,
                SOFTCAP,
                HAS_BIAS,
                ACC_DTYPE,
                INPUT_PRECISION,
            )
            dp_t = tl.dot(v, tl.trans(grad), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            kept_t = p_t
            if DROPOUT:
                keep = _dropout_keep(
                    seed_ptr, b, h, rows[None, :], cols[:, None], Q_HEADS, Q_LEN, K_LEN, dropout_threshold
                )
                kept_t = tl.where(keep, p_t * dropout_scale, 0.0)
                dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)
            dv = tl.dot(kept_t.to(grad.dtype), grad, dv, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            ds_t = p_t * (dp_t - delta[None, :]) * slope
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    _store_rows(
        dk_ptr + b * stride_dkb + kv_h * stride_dkh + k_start * stride_dkl,
        dk * scale,
        cols,
        dims,
        stride_dkl,
        stride_dkd,
        kv_len,
        write_limit,
        HEAD_DIM,
    )
    _store_rows(
        dv_ptr + b * stride_dvb + kv_h * stride_dvh + k_start * stride_dvl,
        dv,
        cols,
        v_dims,
        stride_dvl,
        stride_dvd,
        kv_len,
        write_limit,
        V_DIM,
    )


@triton.jit
def _grad_q_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    grad_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    seed_ptr,
    q_starts_ptr,
    k_starts_ptr,
    q_lens_ptr,
    kv_lens_ptr,
    key_mask_ptr,
    bias_ptr,
    dbias_ptr,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kl,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vl,
    stride_vh,
    stride_vd,
    stride_gb,
    stride_gl,
    stride_gh,
    stride_gd,
    stride_lb,
    stride_lh,
    stride_ll,
    stride_dqb,
    stride_dql,
    stride_dqh,
    stride_dqd,
    stride_dqs,
    stride_mb,
    stride_ml,
    stride_bb,
    stride_bh,
    stride_bq,
    stride_bk,
    stride_dbb,
    stride_dbh,
    stride_dbq,
    stride_dbk,
    Q_LEN,
    K_LEN,
    Q_ROWS,
    K_ROWS,
    Q_HEADS,
    GROUP,
    HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    KEYS_PER_SPLIT,
    scale_hi,
    scale_lo,
    dropout_threshold,
    dropout_scale_hi,
    dropout_scale_lo,
    window_left,
    window_right,
    softcap_hi,
    softcap_lo,
    PACKED: tl.constexpr,
    HAS_Q_LENS: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    DROPOUT: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    SPLIT: tl.constexpr,
    STRIDES_8: tl.constexpr,
    KV_TMA: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    stride_qb, stride_ql, stride_qh = _multiples_of_8(stride_qb, stride_ql, stride_qh, STRIDES_8)
    stride_kb, stride_kl, stride_kh = _multiples_of_8(stride_kb, stride_kl, stride_kh, STRIDES_8)
    stride_vb, stride_vl, stride_vh = _multiples_of_8(stride_vb, stride_vl, stride_vh, STRIDES_8)
    stride_gb, stride_gl, stride_gh = _multiples_of_8(stride_gb, stride_gl, stride_gh, STRIDES_8)
    stride_dqb, stride_dql, stride_dqh = _multiples_of_8(stride_dqb, stride_dql, stride_dqh, STRIDES_8)
    pid_m = tl.program_id(0)
    ln2, scale, scale_log2, dropout_scale, cap_in, cap_out = _scalars(
        scale_hi, scale_lo, dropout_scale_hi, dropout_scale_lo, softcap_hi, softcap_lo, ACC_DTYPE
    )
    b, h = _sample_and_head(tl.program_id(1), Q_HEADS)
    # With few queries the keys are split across programs (program_id(2)), each writing its partial
    # dQ to its own slice (stride_dqs) of a buffer the launcher sums; one split otherwise.
    split = tl.program_id(2)
    q_start, q_len = _span(b, q_starts_ptr, q_lens_ptr, Q_LEN, Q_ROWS, PACKED, HAS_Q_LENS)
    k_start, kv_len = _span(b, k_starts_ptr, kv_lens_ptr, K_LEN, K_ROWS, PACKED, HAS_KV_LENS)
    write_limit = _write_limit(q_len, Q_LEN, PACKED)
    if pid_m * BLOCK_M >= write_limit:
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    dims = tl.arange(0, D_PAD)
    v_dims = tl.arange(0, DV_PAD)
    cols0 = tl.arange(0, BLOCK_N).to(tl.int64)
    row_valid = rows < q_len
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + (q_start + rows)[:, None] * stride_ql + dims[None, :] * stride_qd,
        mask=row_valid[:, None] & (dims < HEAD_DIM)[None, :],
        other=0.0,
    )
    grad = tl.load(
        grad_ptr + b * stride_gb + h * stride_gh + (q_start + rows)[:, None] * stride_gl + v_dims[None, :] * stride_gd,
        mask=row_valid[:, None] & (v_dims < V_DIM)[None, :],
        other=0.0,
    )
    row_offsets = b * stride_lb + h * stride_lh + (q_start + rows) * stride_ll  # lse and delta share a layout
    lse_log2 = _finite_lse(tl.load(lse_ptr + row_offsets, mask=row_valid, other=0.0) / ln2, HAS_BIAS)
    delta = tl.load(delta_ptr + row_offsets, mask=row_valid, other=0.0)
    if not KV_TMA:
        k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh + k_start * stride_kl
        v_base = v_ptr + b * stride_vb + (h // GROUP) * stride_vh + k_start * stride_vl
    dq = tl.zeros((BLOCK_M, D_PAD), ACC_DTYPE)
    keys_begin = 0
    keys_end = kv_len
    if SPLIT:  # (a constexpr: one split keeps the loop's bounds simple, 29 registers fewer with a window)
        keys_begin = split * KEYS_PER_SPLIT
        keys_end = tl.minimum(keys_begin + KEYS_PER_SPLIT, kv_len)
    keys_end = tl.where(pid_m * BLOCK_M < q_len, keys_end, 0)
    diagonal = kv_len - q_len
    if WINDOWED:
        window_begin, window_end = _key_range(
            pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M, q_len, kv_len, window_left, window_right, BLOCK_N
        )
        keys_begin = tl.maximum(keys_begin, window_begin) if SPLIT else window_begin
        keys_end = tl.minimum(keys_end, window_end)
    if HAS_KEY_MASK:
        kept_lo, kept_hi = _kept_range(key_mask_ptr, b, stride_mb, stride_ml, k_start, kv_len, BLOCK_N)
        keys_begin = tl.maximum(keys_begin, kept_lo)
        keys_end = tl.minimum(keys_end, kept_hi)
    for start in range(keys_begin, keys_end, BLOCK_N):
        cols = start + cols0
        col_valid = cols < kv_len
        if KV_TMA:  # as in the forward; keys past the block's range are the sample's own, of zero weight
            k = _box(k_ptr, b, start, h // GROUP, BLOCK_N, D_PAD)
            v_t = tl.trans(_box(v_ptr, b, start, h // GROUP, BLOCK_N, DV_PAD))
        else:
            k = tl.load(
                k_base + cols[:, None] * stride_kl + dims[None, :] * stride_kd,
                mask=col_valid[:, None] & (dims < HEAD_DIM)[None, :],
                other=0.0,
            )
            v_t = tl.load(
                v_base + cols[None, :] * stride_vl + v_dims[:, None] * stride_vd,
                mask=col_valid[None, :] & (v_dims < V_DIM)[:, None],
                other=0.0,
            )
        col_seen = col_valid
        if HAS_KEY_MASK:
            col_seen = col_seen & _keys_kept(key_mask_ptr, b, stride_mb, stride_ml, k_start, cols, col_valid)
        tile_valid = row_valid[:, None] & col_valid[None, :]
        bias_log2 = 0.0
        if HAS_BIAS:
            bias_log2 = _bias_log2(
                bias_ptr,
                b,
                h,
                rows[:, None],
                cols[None, :],
                stride_bb,
                stride_bh,
                stride_bq,
                stride_bk,
                tile_valid,
                ln2,
                ACC_DTYPE,
            )
        p, slope = _probabilities(
            q,
            tl.trans(k),
            lse_log2[:, None],
            bias_log2,
            rows[:, None],
            cols[None, :],
            row_valid[:, None],
            col_seen[None, :],
            scale_log2,
            cap_in,
            cap_out,
            diagonal,
            window_left,
            window_right,
            WINDOWED,
            SOFTCAP,
            HAS_BIAS,
            ACC_DTYPE,
            INPUT_PRECISION,
        )
        dp = tl.dot(grad, v_t, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if DROPOUT:
            keep = _dropout_keep(seed_ptr, b, h, rows[:, None], cols[None, :], Q_HEADS, Q_LEN, K_LEN, dropout_threshold)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        # The gradient of the scores after the softcap (the bias's own), then before it.
        d_scores = p * (dp - delta[:, None])
        if BIAS_GRAD:
            tl.store(
                dbias_ptr + b * stride_dbb + h * stride_dbh + rows[:, None] * stride_dbq + cols[None, :] * stride_dbk,
                d_scores,
                mask=tile_valid,
            )
        ds = d_scores * slope
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    _store_rows(
        dq_ptr + b * stride_dqb + h * stride_dqh + q_start * stride_dql + split * stride_dqs,
        dq * scale,
        rows,
        dims,
        stride_dql,
        stride_dqd,
        q_len,
        write_limit,
        HEAD_DIM,
    )


def float_halves(x: float) -> tuple:
    """(hi, lo), float32 values whose sum is x to within float64's precision (2^-48 relative)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


class Problem:
    """What the kernels are told about one call: shapes, per-sample spans, dropout, tiles.

    Padded tensors are (B, L, H, D) with optional per-sample lengths; packed ones are (total, H, D)
    viewed as (1, total, H, D) with batch stride 0 and cu_seqlens giving each sample's rows."""

    def __init__(
        self,
        q,
        k,
        v,
        *,
        kv_lens=None,
        q_lens=None,
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        max_seqlen_q=None,
        max_seqlen_k=None,
        scale,
        dropout_p,
        dropout_seed,
        window=(-1, -1),
        key_mask=None,
        softcap=0.0,
        sinks=None,
        bias=None,
    ):
        self.packed = cu_seqlens_q is not None
        if self.packed:
            self.batch = cu_seqlens_q.shape[0] - 1
            self.q_len, self.k_len = max_seqlen_q, max_seqlen_k
            q, k, v = (t.unsqueeze(0) for t in (q, k, v))
        else:
            self.batch, self.q_len = q.shape[0], q.shape[1]
            self.k_len = k.shape[1]
        self.q, self.k, self.v = q, k, v
        # The rows of q's and k's storage (the packed total), which no span may pass.
        self.q_rows, self.k_rows = q.shape[1], k.shape[1]
        # Head dims are kernel constants (int() specialises a symbolic one under torch.compile).
        self.q_heads, self.head_dim = q.shape[2], int(q.shape[3])
        self.kv_heads, self.v_dim = k.shape[2], int(v.shape[3])
        self.group = self.q_heads // self.kv_heads
        self.spans = (cu_seqlens_q, cu_seqlens_k, q_lens, kv_lens)
        self.scale = scale
        self.window = window
        self.dropout = dropout_p > 0
        # Stands in for absent pointer arguments (no lengths, no dropout seed). Not q itself: torch's
        # analysis of which arguments a kernel writes counts the span pointers of the combine kernel
        # as written, and an input written under torch.compile is copied and written back.
        self.placeholder = torch.empty(0, dtype=torch.int32, device=q.device)
        self.dropout_seed = dropout_seed.to(q.device) if self.dropout else self.placeholder
        # Bytes, which Triton loads as integers (a bool pointer is not one it takes everywhere).
        self.key_mask = self.placeholder if key_mask is None else key_mask.view(torch.uint8)
        self.has_key_mask = key_mask is not None
        self.softcap = softcap
        self.sinks = self.placeholder if sinks is None else sinks
        self.has_sinks = sinks is not None
        # (B, Hq, Lq, Lk), broadcast dims of stride 0 (padded form only).
        self.bias = self.placeholder if bias is None else bias
        self.has_bias = bias is not None
        self.dropout_threshold = math.ceil(dropout_p * 2**24)
        self.dropout_scale = 1.0 / (1.0 - dropout_p)
        self.acc_dtype = accumulate_dtype(q.dtype)
        self.acc_tl_dtype = tl.float64 if self.acc_dtype == torch.float64 else tl.float32
        self.capability = compute_capability(q.device)
        self.d_pad = power_of_2_at_least(self.head_dim, 16, 256)
        self.dv_pad = power_of_2_at_least(self.v_dim, 16, 256)

    def scalars(self):
        """(scale as float32 halves, dropout threshold, dropout scale as float32 halves, window left,
        window right, softcap as float32 halves (1 for none, never read)): Triton passes a Python
        float as float32, which float64 kernels cannot afford."""
        return (
            *float_halves(self.scale),
            self.dropout_threshold,
            *float_halves(self.dropout_scale),
            *self.window,
            *float_halves(self.softcap or 1.0),
        )

    def key_mask_strides(self):
        """(sample, key) strides of the key mask: (B, Lk), or (total_k,) with sample stride 0 when packed."""
        if not self.has_key_mask:
            return 0, 0
        return (0, self.key_mask.stride(0)) if self.packed else self.key_mask.stride()

    def bias_strides(self):
        return self.bias.stride() if self.has_bias else (0, 0, 0, 0)

    def batch_stride(self, t):
        return 0 if self.packed else t.stride(0)

    def strides(self, t):
        """(batch, length, head, dim) strides of a q/k/v-shaped tensor."""
        return (self.batch_stride(t), *t.stride()[1:])

    def lse_strides(self, lse):
        """(batch, head, length) strides of a (B, H, L) or, packed, (H, total) tensor."""
        return (0, *lse.stride()) if self.packed else lse.stride()

    def span_args(self):
        cu_q, cu_k, q_lens, kv_lens = (self.placeholder if t is None else t for t in self.spans)
        return cu_q, cu_k, q_lens, kv_lens

    def span_flags(self, with_keys=True):
        flags = {"PACKED": self.packed, "HAS_Q_LENS": self.spans[2] is not None}
        if with_keys:
            flags["HAS_KV_LENS"] = self.spans[3] is not None
        return flags

    def common_flags(self):
        return {
            **self.span_flags(),
            "DROPOUT": self.dropout,
            "WINDOWED": self.window != (-1, -1),
            "HAS_KEY_MASK": self.has_key_mask,
            "SOFTCAP": self.softcap > 0,
            "HAS_BIAS": self.has_bias,
            "ACC_DTYPE": self.acc_tl_dtype,
            "INPUT_PRECISION": input_precision(self.q.dtype),
            "D_PAD": self.d_pad,
            "DV_PAD": self.dv_pad,
        }

    def packs_query_heads(self):
        return packs_query_heads(self.q_len, self.group)

    def forward_tile(self):
        """The forward's tile, for a head's queries or, packed, a key head's group of them."""
        rows = self.q_len * self.group if self.packs_query_heads() else self.q_len
        return attention_forward_tile(rows, self.d_pad, self.dv_pad, self.q.dtype, self.capability, self.has_bias)

    def backward_tile(self):
        return attention_backward_tile(self.d_pad, self.dv_pad, self.q.dtype)

    def backward_kv_tile(self):
        return attention_backward_kv_tile(self.d_pad, self.dv_pad, self.q.dtype, self.capability)


def _launch_forward(p: Problem, out: torch.Tensor, lse: torch.Tensor):
    """Writes out (B, Lq, Hq, Dv) or packed (total_q, Hq, Dv), and lse (B, Hq, Lq) or (Hq, total_q)."""
    tile = p.forward_tile()
    block_m, block_n = tile.block_m, tile.block_n
    pack = p.packs_query_heads()
    # Programs: (query block, sample and head) pairs, a key head's packed query heads sharing one.
    query_blocks = cdiv(p.q_len * p.group, block_m) if pack else cdiv(p.q_len, block_m)
    head_programs = p.batch * (p.kv_heads if pack else p.q_heads)
    slots = multiprocessors(p.q.device) * attention_residency(tile, p.d_pad, p.dv_pad, p.q.element_size(), p.capability)
    splits, keys_per_split = key_splits(query_blocks * head_programs, p.k_len, block_n, slots)
    out4 = out.unsqueeze(0) if p.packed else out
    qkv_strides = (p.strides(p.q), p.strides(p.k), p.strides(p.v))
    if splits > 1:
        # Partials (B, Lq, Hq, splits, Dv) and base-2 lse (B, Hq, Lq, splits) in the accumulation
        # dtype, every row written.
        part_out = out.new_empty((p.batch, p.q_len, p.q_heads, splits, p.v_dim), dtype=p.acc_dtype)
        part_lse = out.new_empty((p.batch, p.q_heads, p.q_len, splits), dtype=p.acc_dtype)
        target, target_lse = part_out, part_lse
        out_strides = (*part_out.stride()[:3], part_out.stride(4), part_out.stride(3))
        lse_strides = part_lse.stride()
    else:
        target, target_lse = out4, lse
        out_strides = (*p.strides(out4), 0)
        lse_strides = (*p.lse_strides(lse), 0)
    grid = (query_blocks, head_programs, splits)
    if grid[0] == 0 or grid[1] == 0:
        return
    key_values = _key_value_descriptors(p, block_n)
    traceable(_forward_kernel)[grid](
        p.q,
        *(key_values or (p.k, p.v)),
        target,
        target_lse,
        p.dropout_seed,
        *p.span_args(),
        p.key_mask,
        p.sinks,
        p.bias,
        *qkv_strides[0],
        *qkv_strides[1],
        *qkv_strides[2],
        *out_strides,
        *lse_strides,
        *p.key_mask_strides(),
        *p.bias_strides(),
        p.q_len,
        p.k_len,
        p.q_rows,
        p.k_rows,
        p.q_heads,
        p.group,
        p.head_dim,
        p.v_dim,
        keys_per_split,
        *p.scalars(),
        HAS_SINKS=p.has_sinks,
        SPLIT=splits > 1,
        PACK_GQA=pack,
        # Folding the scale into the exponent's FMA needs its sign (a max of raw products) and no other
        # terms in the scores.
        FOLD_SCALE=p.scale > 0 and p.softcap == 0 and not p.has_bias,
        STRIDES_8=_strides_of_8(*qkv_strides, out_strides),
        KV_TMA=key_values is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
        **p.common_flags(),
    )
    if splits > 1:
        cu_q, _, q_lens, _ = p.span_args()
        combine_block = combine_block_m()
        traceable(_combine_splits_kernel)[(cdiv(p.q_len, combine_block), p.batch * p.q_heads)](
            part_out,
            part_lse,
            out4,
            lse,
            cu_q,
            q_lens,
            p.sinks,
            part_out.stride(0),
            part_out.stride(1),
            part_out.stride(2),
            part_out.stride(4),
            part_out.stride(3),
            *part_lse.stride(),
            *p.strides(out4),
            *p.lse_strides(lse),
            p.q_len,
            p.q_rows,
            p.q_heads,
            p.v_dim,
            splits,
            **p.span_flags(with_keys=False),
            HAS_SINKS=p.has_sinks,
            ACC_DTYPE=p.acc_tl_dtype,
            DV_PAD=p.dv_pad,
            BLOCK_M=combine_block,
        )


def _row_descriptors(p: Problem, lengths, rows: int, *operands) -> tuple | None:
    """``operands``, (tensor, padded width) pairs of one side's (B, L, H, D) tensors, as TMA descriptors
    read in (1, rows, 1, width) boxes; or None for the pointer path: before Hopper, for float64 (no
    tensor-core dot to feed), where a base or stride is not 16-byte aligned, and where the side has
    ``lengths`` or the samples are packed, since a box running past a sample's last row would read its
    padding, which is never to be read, or the next sample's rows."""
    if p.capability < 90 or p.packed or lengths is not None or p.q.dtype == torch.float64:
        return None
    descriptors = tuple(
        tma_descriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, width]) for t, width in operands
    )
    return None if any(descriptor is None for descriptor in descriptors) else descriptors


def _key_value_descriptors(p: Problem, block_n: int) -> tuple | None:
    """K and V in boxes of block_n keys where every key is valid (`_row_descriptors`)."""
    return _row_descriptors(p, p.spans[3], block_n, (p.k, p.d_pad), (p.v, p.dv_pad))


def _strides_of_8(*strides) -> bool:
    """Whether every batch, row and head stride (the first three of each of ``strides``, as the kernels
    take them) is a multiple of 8."""
    return all(stride % 8 == 0 for each in strides for stride in each[:3])


def _launch_backward(p: Problem, grad_out, out, lse, grad_q, grad_k, grad_v, grad_bias=None):
    """Writes grad_q, grad_k, grad_v (shaped as q, k, v; packed ones (total, H, D)), and grad_bias
    ((B, Hq, Lq, Lk), zeros, in the accumulation dtype) where given."""
    unsqueeze = (lambda t: t.unsqueeze(0)) if p.packed else (lambda t: t)
    grad_out, out, grad_q, grad_k, grad_v = (unsqueeze(t) for t in (grad_out, out, grad_q, grad_k, grad_v))
    tile = p.backward_tile()
    block_m = tile.block_m
    delta = torch.empty(lse.shape, dtype=p.acc_dtype, device=lse.device)  # lse is contiguous too
    cu_q, cu_k, q_lens, kv_lens = p.span_args()
    if p.batch * p.q_heads and p.q_len:
        traceable(_delta_kernel)[(cdiv(p.q_len, block_m), p.batch * p.q_heads)](
            grad_out,
            out,
            delta,
            cu_q,
            q_lens,
            *p.strides(grad_out),
            *p.strides(out),
            *p.lse_strides(delta),
            p.q_len,
            p.q_rows,
            p.q_heads,
            p.v_dim,
            **p.span_flags(with_keys=False),
            ACC_DTYPE=p.acc_tl_dtype,
            DV_PAD=p.dv_pad,
            BLOCK_M=block_m,
        )
    scalars = p.scalars()
    # The query gradient's programs split the keys when they are too few to fill the GPU (few queries
    # over long keys), each split's partial dQ written, in the accumulation dtype, to its own slice of
    # (B, Lq, Hq, splits, D) (zeros first where rows belong to no sample) and summed in a fixed order.
    slots = multiprocessors(p.q.device) * attention_residency(
        tile, p.d_pad, p.dv_pad, p.q.element_size(), p.capability, query_gradient=True
    )
    splits, keys_per_split = key_splits(cdiv(p.q_len, block_m) * p.batch * p.q_heads, p.k_len, tile.block_n, slots)
    if splits > 1:
        allocate = torch.zeros if p.packed else torch.empty
        dq_target = allocate((*grad_q.shape[:3], splits, p.head_dim), dtype=p.acc_dtype, device=grad_q.device)
        dq_s = (p.batch_stride(dq_target), dq_target.stride(1), dq_target.stride(2), dq_target.stride(4))
        dq_split_stride = dq_target.stride(3)
    else:
        dq_target, dq_s, dq_split_stride = grad_q, p.strides(grad_q), 0
    # (batch, length, head, dim) strides of q, k, v, grad_out, grad_k, grad_v, taken once.
    q_s, k_s, v_s, g_s, dk_s, dv_s = (p.strides(t) for t in (p.q, p.k, p.v, grad_out, grad_k, grad_v))
    operand_strides = (*q_s, *k_s, *v_s, *g_s, *p.lse_strides(lse))
    strides_8 = _strides_of_8(q_s, k_s, v_s, g_s, dq_s, dk_s, dv_s)
    flags = {**p.common_flags(), "STRIDES_8": strides_8}
    if p.batch * p.kv_heads and p.k_len:
        kv_tile = p.backward_kv_tile()
        # Q and dO in boxes of the query step's rows where every query is valid.
        queries = _row_descriptors(p, p.spans[2], kv_tile.block_m, (p.q, p.d_pad), (grad_out, p.dv_pad))
        q_arg, grad_arg = queries or (p.q, grad_out)
        traceable(_grad_kv_kernel)[(cdiv(p.k_len, kv_tile.block_n), p.batch * p.kv_heads)](
            q_arg,
            p.k,
            p.v,
            grad_arg,
            lse,
            delta,
            grad_k,
            grad_v,
            p.dropout_seed,
            cu_q,
            cu_k,
            q_lens,
            kv_lens,
            p.key_mask,
            p.bias,
            *operand_strides,
            *dk_s,
            *dv_s,
            *p.key_mask_strides(),
            *p.bias_strides(),
            p.q_len,
            p.k_len,
            p.q_rows,
            p.k_rows,
            p.q_heads,
            p.kv_heads,
            p.group,
            p.head_dim,
            p.v_dim,
            *scalars,
            Q_TMA=queries is not None,
            **kv_tile.launch_options(),
            **flags,
        )
    if p.batch * p.q_heads and p.q_len:
        key_values = _key_value_descriptors(p, tile.block_n)
        k_arg, v_arg = key_values or (p.k, p.v)
        traceable(_grad_q_kernel)[(cdiv(p.q_len, block_m), p.batch * p.q_heads, splits)](
            p.q,
            k_arg,
            v_arg,
            grad_out,
            lse,
            delta,
            dq_target,
            p.dropout_seed,
            cu_q,
            cu_k,
            q_lens,
            kv_lens,
            p.key_mask,
            p.bias,
            p.placeholder if grad_bias is None else grad_bias,
            *operand_strides,
            *dq_s,
            dq_split_stride,
            *p.key_mask_strides(),
            *p.bias_strides(),
            *((0, 0, 0, 0) if grad_bias is None else grad_bias.stride()),
            p.q_len,
            p.k_len,
            p.q_rows,
            p.k_rows,
            p.q_heads,
            p.group,
            p.head_dim,
            p.v_dim,
            keys_per_split,
            *scalars,
            BIAS_GRAD=grad_bias is not None,
            SPLIT=splits > 1,
            KV_TMA=key_values is not None,
            **tile.launch_options(),
            **flags,
        )
        if splits > 1:
            grad_q.copy_(dq_target.sum(3))


def forward(
    q,
    k,
    v,
    kv_lens,
    q_lens,
    scale,
    dropout_p,
    dropout_seed,
    window_left=-1,
    window_right=-1,
    key_mask=None,
    softcap=0.0,
    sinks=None,
    bias=None,
) -> tuple:
    """mmkern::cross_modal_attention: (out (B, Lq, Hq, Dv), lse (B, Hq, Lq)); every row is written."""
    batch, q_len, q_heads, _ = q.shape
    out = q.new_empty((batch, q_len, q_heads, v.shape[3]))
    lse = q.new_empty((batch, q_heads, q_len), dtype=accumulate_dtype(q.dtype))
    _launch_forward(
        Problem(
            q,
            k,
            v,
            kv_lens=kv_lens,
            q_lens=q_lens,
            scale=scale,
            dropout_p=dropout_p,
            dropout_seed=dropout_seed,
            window=(window_left, window_right),
            key_mask=key_mask,
            softcap=softcap,
            sinks=sinks,
            bias=bias,
        ),
        out,
        lse,
    )
    return out, lse


def backward(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    kv_lens,
    q_lens,
    scale,
    dropout_p,
    dropout_seed,
    window_left=-1,
    window_right=-1,
    key_mask=None,
    softcap=0.0,
    bias=None,
    bias_grad=False,
) -> tuple:
    """mmkern::cross_modal_attention_backward: (grad q, grad k, grad v, grad bias (B, Hq, Lq, Lk) in the
    accumulation dtype, or an empty tensor without bias_grad); every row is written."""
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)]
    batch, q_len, q_heads, _ = q.shape
    acc = accumulate_dtype(q.dtype)
    # Written only where a query sees a key: zeros first.
    grad_bias = q.new_zeros((batch, q_heads, q_len, k.shape[1]) if bias_grad else (0,), dtype=acc)
    problem = Problem(
        q,
        k,
        v,
        kv_lens=kv_lens,
        q_lens=q_lens,
        scale=scale,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        window=(window_left, window_right),
        key_mask=key_mask,
        softcap=softcap,
        bias=bias,
    )
    _launch_backward(problem, grad_out, out, lse.contiguous(), *grads, grad_bias if bias_grad else None)
    return (*grads, grad_bias)


def packed_forward(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    dropout_p,
    dropout_seed,
    window_left=-1,
    window_right=-1,
    key_mask=None,
    softcap=0.0,
    sinks=None,
) -> tuple:
    """mmkern::cross_modal_attention_packed: (out (total_q, Hq, Dv), lse (Hq, total_q))."""
    total, q_heads, _ = q.shape
    # Rows no sample owns are never visited: they start as zeros and -inf.
    out = q.new_zeros((total, q_heads, v.shape[2]))
    lse = q.new_full((q_heads, total), float("-inf"), dtype=accumulate_dtype(q.dtype))
    _launch_forward(
        Problem(
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            scale=scale,
            dropout_p=dropout_p,
            dropout_seed=dropout_seed,
            window=(window_left, window_right),
            key_mask=key_mask,
            softcap=softcap,
            sinks=sinks,
        ),
        out,
        lse,
    )
    return out, lse


def packed_backward(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    dropout_p,
    dropout_seed,
    window_left=-1,
    window_right=-1,
    key_mask=None,
    softcap=0.0,
) -> tuple:
    """mmkern::cross_modal_attention_packed_backward: (grad q, grad k, grad v), zero on unowned rows."""
    grads = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)]
    problem = Problem(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        scale=scale,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        window=(window_left, window_right),
        key_mask=key_mask,
        softcap=softcap,
    )
    _launch_backward(problem, grad_out, out, lse.contiguous(), *grads)
    return tuple(grads)
