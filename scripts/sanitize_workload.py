"""Every mmkern GPU kernel once, at small shapes that reach each of its paths, checked against the
eager reference: what `make sanitize` runs under compute-sanitizer's memcheck, racecheck and
initcheck. Small, so that the sanitizers (tens of times slower per launch) finish in minutes.

Paths reached: concat_linear forward and backward with broadcast segments, odd widths and every
dtype; cross-modal attention with zero, one and all valid keys, GQA, Dv != D, head dim 256,
split-KV, dropout and the packed form, forward and backward; quantize_per_token into int8 and fp8;
quantized_concat_linear (int8 tensor cores) with a pooled segment; quantized_fusion sum and gated;
quantize_and_concat_linear's straight-through backward.

Exits 1 with a line per mismatch; prints `sanitize workload: N checks passed` otherwise."""

import sys
import time

import torch

from mmkern import ops, reference

# A device argument (cpu) runs the same checks on the C++ kernels, which is how the script is tested.
DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"
# Relative to the reference's largest magnitude: float32 (tf32 off), fp16 and bf16 accumulating in fp32.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
failures = []
checks = 0
started = time.perf_counter()


def check(name, actual, expected, dtype):
    global checks
    checks += 1
    expected = expected.double()
    error = (actual.double() - expected).abs().nan_to_num(float("inf")).max().item() if expected.numel() else 0.0
    allowed = TOLERANCE[dtype] * max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    if not error <= allowed:
        failures.append(f"{name}: max error {error:.3e} > {allowed:.1e}")
    # Progress on stderr: a run that stalls shows where.
    print(f"{time.perf_counter() - started:7.1f} s  {name}", file=sys.stderr, flush=True)


def randn(*shape, dtype, requires_grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=requires_grad)


def gradients_of(fn, tensors, grad_out):
    for t in tensors:
        t.grad = None
    out = fn(*tensors)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in tensors]


def compare_with_reference(name, op, ref, tensors, dtype):
    """Output and every gradient of op against ref on float64 copies of the same inputs."""
    exact_inputs = [t.detach().double().requires_grad_() for t in tensors]
    expected = ref(*exact_inputs)
    grad_out = torch.randn_like(expected)
    out, grads = gradients_of(op, tensors, grad_out.to(dtype))
    expected.backward(grad_out)
    check(f"{name} out", out, expected, dtype)
    for i, (grad, exact) in enumerate(zip(grads, exact_inputs)):
        check(f"{name} grad {i}", grad, exact.grad, dtype)


def concat_linear_paths():
    for dtype in TOLERANCE:
        tensors = [
            randn(3, 37, 40, dtype=dtype, requires_grad=True),
            randn(3, 1, 67, dtype=dtype, requires_grad=True),
            (randn(29, 107, dtype=dtype) / 10).requires_grad_(),
            randn(29, dtype=dtype, requires_grad=True),
        ]
        compare_with_reference(
            f"concat_linear {dtype}",
            lambda a, b, w, bias: ops.concat_linear([a, b], w, bias, activation="gelu"),
            lambda a, b, w, bias: reference.concat_linear([a, b], w, bias, activation="gelu"),
            tensors,
            dtype,
        )


def attention_paths():
    cases = {
        # name: (B, Lq, Lk, Hq, Hkv, D, Dv, kv_lens, q_lens)
        "lengths_0_1_full": (3, 17, 45, 4, 2, 64, 64, [0, 1, 45], [17, 5, 17]),
        "dv_ne_d_mqa": (2, 33, 70, 4, 1, 40, 24, [70, 31], None),
        "odd_head_dim": (1, 20, 50, 2, 2, 40, 40, None, None),
        "dv_ne_d": (2, 33, 70, 4, 1, 64, 24, [70, 31], None),
        "head_dim_256": (1, 16, 80, 2, 2, 256, 256, None, None),
        "split_kv": (1, 8, 2100, 2, 1, 64, 64, [1999], None),
    }
    for name, (batch, lq, lk, hq, hkv, d, dv, kv_lens, q_lens) in cases.items():
        kv = None if kv_lens is None else torch.tensor(kv_lens, device=DEVICE)
        ql = None if q_lens is None else torch.tensor(q_lens, device=DEVICE)
        for dtype in (torch.float16, torch.bfloat16):
            tensors = [
                randn(batch, lq, hq, d, dtype=dtype, requires_grad=True),
                randn(batch, lk, hkv, d, dtype=dtype, requires_grad=True),
                randn(batch, lk, hkv, dv, dtype=dtype, requires_grad=True),
            ]
            compare_with_reference(
                f"cross_modal_attention {name} {dtype}",
                lambda q, k, v: ops.cross_modal_attention(q, k, v, kv_lens=kv, q_lens=ql),
                lambda q, k, v: reference.cross_modal_attention(q, k, v, kv_lens=kv, q_lens=ql)[0],
                tensors,
                dtype,
            )
    dtype = torch.float16
    tensors = [randn(2, 24, 2, 32, dtype=dtype, requires_grad=True) for _ in range(3)]
    kv = torch.tensor([24, 9], device=DEVICE)
    # The op draws its dropout seed from the device's generator: reseeding replays the same draw.
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device=DEVICE))

    def dropout_attention(q, k, v):
        torch.manual_seed(1234)
        return ops.cross_modal_attention(q, k, v, kv_lens=kv, dropout_p=0.3)

    compare_with_reference(
        "cross_modal_attention dropout",
        dropout_attention,
        lambda q, k, v: reference.cross_modal_attention(q, k, v, kv_lens=kv, dropout_p=0.3, dropout_seed=seed)[0],
        tensors,
        dtype,
    )
    cu_q = torch.tensor([0, 5, 5, 30], device=DEVICE, dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 41, 41], device=DEVICE, dtype=torch.int32)
    tensors = [
        randn(30, 4, 64, dtype=dtype, requires_grad=True),
        randn(41, 2, 64, dtype=dtype, requires_grad=True),
        randn(41, 2, 64, dtype=dtype, requires_grad=True),
    ]
    compare_with_reference(
        "cross_modal_attention_packed",
        lambda q, k, v: ops.cross_modal_attention_packed(q, k, v, cu_q, cu_k, 25, 40),
        lambda q, k, v: reference.cross_modal_attention_packed(q, k, v, cu_q, cu_k, 25, 40)[0],
        tensors,
        dtype,
    )


def quantized_paths():
    for qdtype in (torch.int8, torch.float8_e4m3fn):
        x = randn(5, 33, 1000, dtype=torch.float32)
        x[1, 2] = 0.0  # an all-zero row: the scale's floor
        xq, scale = ops.quantize_per_token(x, qdtype)
        xq_ref, scale_ref = reference.quantize_per_token(x, qdtype)
        check(f"quantize_per_token {qdtype} scale", scale, scale_ref, torch.float32)
        check(f"quantize_per_token {qdtype} values", xq.float(), xq_ref.float(), torch.float32)
        features = [reference.quantize_per_token(randn(4, 19, 130, dtype=torch.float32), qdtype) for _ in range(3)]
        inputs_q, scales = [f[0] for f in features], [f[1] for f in features]
        weights = torch.tensor([0.5, -1.0, 2.0], device=DEVICE)
        check(
            f"quantized_fusion sum {qdtype}",
            ops.quantized_fusion(inputs_q, scales, weights, out_dtype=torch.float32),
            reference.quantized_fusion(inputs_q, scales, weights, out_dtype=torch.float64, compute_dtype=torch.float64),
            torch.float32,
        )
        gate = randn(4, 19, 130, dtype=torch.float32)
        check(
            f"quantized_fusion gated {qdtype}",
            ops.quantized_fusion(inputs_q[:2], scales[:2], mode="gated", gate=gate, out_dtype=torch.float32),
            reference.quantized_fusion(
                inputs_q[:2], scales[:2], mode="gated", gate=gate, out_dtype=torch.float64, compute_dtype=torch.float64
            ),
            torch.float32,
        )
    inputs = [randn(3, 45, 96, dtype=torch.float32), randn(3, 1, 72, dtype=torch.float32)]
    quantized = [reference.quantize_per_token(x) for x in inputs]
    weight_q, weight_scale = reference.quantize_per_token(randn(50, 168, dtype=torch.float32) / 13)
    bias = randn(50, dtype=torch.float32)
    args = ([q for q, _ in quantized], [s for _, s in quantized], weight_q, weight_scale[:, 0], bias)
    for out_dtype in TOLERANCE:
        check(
            f"quantized_concat_linear {out_dtype}",
            ops.quantized_concat_linear(*args, activation="silu", out_dtype=out_dtype),
            reference.quantized_concat_linear(
                *args, activation="silu", out_dtype=torch.float64, compute_dtype=torch.float64
            ),
            out_dtype,
        )
    tensors = [x.clone().requires_grad_() for x in inputs] + [
        (randn(50, 168, dtype=torch.float32) / 13).requires_grad_()
    ]
    out = ops.quantize_and_concat_linear(tensors[:2], tensors[2], bias)
    out.backward(torch.randn_like(out))
    check(
        "quantize_and_concat_linear out",
        out.detach(),
        reference.quantize_and_concat_linear(
            [t.detach() for t in tensors[:2]], tensors[2].detach(), bias, compute_dtype=torch.float64
        ),
        torch.float32,
    )
    checks_finite = all(t.grad is not None and torch.isfinite(t.grad).all() for t in tensors)
    if not checks_finite:
        failures.append("quantize_and_concat_linear: missing or non-finite gradients")


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("sanitize workload: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    concat_linear_paths()
    attention_paths()
    quantized_paths()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    for line in failures:
        print(f"MISMATCH {line}")
    print(f"sanitize workload: {checks - len(failures)} of {checks} checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
