"""quantized_fusion's Triton kernel (the CUDA implementation, and the CPU one under the interpreter
switch): one pass over the quantized features, dequantizing and combining them in float32.

Up to MAX_INPUTS features per launch; more chain through a float32 partial sum, read back as the
next launch's addend.
"""

import torch
import triton
import triton.language as tl

from mmkern.kernels.launch import traceable
from mmkern.kernels.tiles import FUSION_BLOCK, cdiv

MAX_INPUTS = 4


@triton.jit
def _dequantized(x_ptr, scale_ptr, offs, rows, mask):
    # No `other` for the features: masked lanes are never stored, and no constant casts to float8.
    return tl.load(x_ptr + offs, mask=mask).to(tl.float32) * tl.load(scale_ptr + rows, mask=mask, other=0.0)


@triton.jit
def quantized_fusion_kernel(
    out_ptr,
    addend_ptr,
    gate_ptr,
    weights_ptr,
    first_weight,
    x0_ptr,
    s0_ptr,
    x1_ptr,
    s1_ptr,
    x2_ptr,
    s2_ptr,
    x3_ptr,
    s3_ptr,
    numel,
    cols,
    NUM_INPUTS: tl.constexpr,
    GATED: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_ADDEND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    rows = offs // cols
    if GATED:
        g = tl.sigmoid(tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        acc = g * _dequantized(x0_ptr, s0_ptr, offs, rows, mask) + (1.0 - g) * _dequantized(
            x1_ptr, s1_ptr, offs, rows, mask
        )
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        if HAS_ADDEND:
            acc = tl.load(addend_ptr + offs, mask=mask, other=0.0)
        for i in tl.static_range(NUM_INPUTS):
            if i == 0:
                x_ptr, s_ptr = x0_ptr, s0_ptr
            elif i == 1:
                x_ptr, s_ptr = x1_ptr, s1_ptr
            elif i == 2:
                x_ptr, s_ptr = x2_ptr, s2_ptr
            else:
                x_ptr, s_ptr = x3_ptr, s3_ptr
            term = _dequantized(x_ptr, s_ptr, offs, rows, mask)
            if HAS_WEIGHTS:
                term = tl.load(weights_ptr + first_weight + i).to(tl.float32) * term
            acc += term
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def quantized_fusion_forward(inputs, scales, weights, gate, mode, out_dtype):
    inputs = [x.contiguous() for x in inputs]
    scales = [s.contiguous() for s in scales]
    out = torch.empty(inputs[0].shape, dtype=out_dtype, device=inputs[0].device)
    numel, cols = out.numel(), out.shape[-1]
    if numel == 0:
        return out
    gated = mode == "gated"
    gate = gate.contiguous() if gated else None
    chunks = (
        [[0, 1]]
        if gated
        else [list(range(i, min(i + MAX_INPUTS, len(inputs)))) for i in range(0, len(inputs), MAX_INPUTS)]
    )
    addend = None
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        target = out if last else torch.empty(out.shape, dtype=torch.float32, device=out.device)
        pointers = []
        for i in chunk:
            pointers += [inputs[i], scales[i]]
        pointers += [None, None] * (MAX_INPUTS - len(chunk))  # constants the kernel never reads
        traceable(quantized_fusion_kernel)[(cdiv(numel, FUSION_BLOCK),)](
            target,
            addend,
            gate,
            weights,
            chunk[0],
            *pointers,
            numel,
            cols,
            NUM_INPUTS=len(chunk),
            GATED=gated,
            HAS_WEIGHTS=weights is not None,
            HAS_ADDEND=addend is not None,
            BLOCK=FUSION_BLOCK,
        )
        addend = target
    return out
