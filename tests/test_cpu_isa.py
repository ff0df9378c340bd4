"""The C++ CPU kernels' ISA variants (csrc/cpu/isa): every variant this host runs, forced in turn with
mmkern.set_cpu_isa (MMKERN_CPU_ISA at start-up), gives the baseline variant's bits, so CI runs them
all on one host; the int8 GEMM's float32 K-chunks are exact around and past the chunk limit; and the
AVX code stays inside the variants' own namespaces in the built library."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import mmkern
from mmkern import _config, env, ops, reference

# The variants are the C++ kernels'; under the interpreter switch CPU tensors run the Triton kernels.
pytestmark = pytest.mark.skipif(_config.TRITON_ON_CPU, reason="the C++ CPU kernels' ISA variants")
VARIANTS = torch.ops.mmkern.supported_cpu_isas().split(",")
CHUNK = 1024  # csrc/cpu/quantized_concat_linear.cpp's kExactFloatTerms


@pytest.fixture
def restore_variant():
    previous = mmkern.cpu_isa()
    yield
    mmkern.set_cpu_isa(previous)


def _run_every_variant(fn) -> dict:
    """variant: fn()'s tensors under it."""
    results = {}
    for variant in VARIANTS:
        mmkern.set_cpu_isa(variant)
        assert mmkern.cpu_isa() == variant
        results[variant] = torch.utils._pytree.tree_leaves(fn())
    return results


def _assert_same_bits(results: dict):
    baseline = results["baseline"]
    for variant, tensors in results.items():
        for actual, expected in zip(tensors, baseline, strict=True):
            assert actual.dtype == expected.dtype and actual.shape == expected.shape, variant
            assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8)), variant


def _features(rows, cols, dtype):
    x = torch.randn(rows, cols, dtype=torch.float64) * torch.logspace(-3, 3, rows, dtype=torch.float64)[:, None]
    x = x.to(dtype)
    if rows > 2:
        x[1, cols // 2] = float("nan")  # a non-finite row: NaN scale, zeros
        x[2] = 0  # an all-zero row
    return x


def test_the_host_runs_the_baseline_and_the_best_variant_by_default():
    assert VARIANTS[0] == "baseline"
    assert set(VARIANTS) <= {"baseline", "avx2", "avx512"}
    previous = mmkern.set_cpu_isa("best")
    try:
        assert mmkern.cpu_isa() == VARIANTS[-1]
    finally:
        mmkern.set_cpu_isa(previous)


@pytest.mark.parametrize("cols", [1, 7, 33, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quantized", [torch.int8, torch.float8_e4m3fn])
def test_quantization_gives_the_same_bits_in_every_variant(cols, dtype, quantized, restore_variant):
    x = _features(37, cols, dtype)

    # The ops themselves (the public functions refuse a NaN row on CPU): a NaN row's scale and zeros,
    # dequantized with that scale made finite, since the dequantize kernel refuses a NaN scale.
    def run():
        xq, scale = torch.ops.mmkern.quantize_per_token(x, quantized)
        fake = torch.ops.mmkern.fake_quantize_per_token(x, quantized)
        return xq, scale, fake, torch.ops.mmkern.dequantize_per_token(xq, scale.nan_to_num(1.0), dtype)

    _assert_same_bits(_run_every_variant(run))


@pytest.mark.parametrize("mode", ["sum", "weighted", "gated"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fusion_gives_the_same_bits_in_every_variant(mode, out_dtype, restore_variant):
    pairs = [ops.quantize_per_token(torch.randn(5, 9, 67)) for _ in range(2 if mode == "gated" else 3)]
    inputs, scales = [p[0] for p in pairs], [p[1] for p in pairs]
    options = {"weights": torch.tensor([0.25, 1.5, -0.75])} if mode == "weighted" else {}
    if mode == "gated":
        options = {"mode": "gated", "gate": torch.randn(5, 9, 67)}

    _assert_same_bits(_run_every_variant(lambda: ops.quantized_fusion(inputs, scales, out_dtype=out_dtype, **options)))


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6])  # 1-4 unrolled at compile time, more at run time
@pytest.mark.parametrize("quantized", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("cols", [1, 15, 67, 1000])
def test_fused_sum_gives_the_eager_references_bits_in_every_variant(count, quantized, cols, restore_variant):
    """The sum adds w_i * (x_i * s_i) in input order, as the eager reference does: the same bits, not
    merely close, whatever the count of inputs and the columns left over past the vector width."""
    generator = torch.Generator().manual_seed(cols)
    pairs = [ops.quantize_per_token(torch.randn(3, 5, cols, generator=generator), quantized) for _ in range(count)]
    inputs, scales = [p[0] for p in pairs], [p[1] for p in pairs]
    weights = torch.randn(count, generator=generator)
    for variant in VARIANTS:
        mmkern.set_cpu_isa(variant)
        for w in (None, weights):
            for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
                actual = ops.quantized_fusion(inputs, scales, w, out_dtype=out_dtype)
                expected = reference.quantized_fusion(inputs, scales, w, out_dtype=out_dtype)
                assert torch.equal(actual, expected), (variant, w is None, out_dtype)


def _extreme_int8(*shape, generator):
    """int8 values at and near the range's ends (-128 included), so partial sums reach 2^24."""
    values = torch.tensor([-128, -127, 127, 126, -1, 0, 1], dtype=torch.int8)
    return values[torch.randint(0, len(values), shape, generator=generator)]


def _exact_quantized_concat_linear(inputs, scales, weight, weight_scale, bias):
    """The op's float32 epilogue over int64 products: sum_i s_i * float(x_i @ w_i^T), then * weight
    scale + bias, in the kernel's order (per-token segments, then the broadcast partials)."""
    lead = torch.broadcast_shapes(*(x.shape[:-1] for x in inputs))
    per_token = torch.zeros(*lead, weight.shape[0])
    broadcast = torch.zeros(*lead, weight.shape[0])
    start = 0
    written = False
    for x, s in zip(inputs, scales, strict=True):
        w = weight[:, start : start + x.shape[-1]]
        start += x.shape[-1]
        products = (x.long() @ w.long().T).to(torch.float32)
        if x.shape[:-1] == lead:
            per_token = s * products if not written else per_token + s * products
            written = True
        else:
            broadcast = broadcast + (s * products).expand_as(broadcast)
    return (per_token + broadcast) * weight_scale + bias


@pytest.mark.parametrize("k", [1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1, 3000])
def test_int8_products_are_exact_around_and_past_the_chunk_limit(k, restore_variant):
    """Each segment's products sum to the exact integers in every variant (float32 chunks in all but
    avx512 on a VNNI host, where oneDNN's int8 GEMM runs), so the output is the exact products'
    epilogue bit for bit, a per-token segment of K = k beside a broadcast one of K = k + 3."""
    generator = torch.Generator().manual_seed(k)
    tokens = _extreme_int8(2, 5, k, generator=generator)
    pooled = _extreme_int8(2, 1, k + 3, generator=generator)
    weight = _extreme_int8(11, 2 * k + 3, generator=generator)
    scales = [torch.rand(2, 5, 1, generator=generator), torch.rand(2, 1, 1, generator=generator)]
    weight_scale, bias = torch.rand(11, generator=generator), torch.randn(11, generator=generator)
    expected = _exact_quantized_concat_linear([tokens, pooled], scales, weight, weight_scale, bias)
    gemms = set()
    for variant in VARIANTS:
        mmkern.set_cpu_isa(variant)
        gemms.add(torch.ops.mmkern.cpu_int8_gemm())
        out = ops.quantized_concat_linear([tokens, pooled], scales, weight, weight_scale, bias, out_dtype=torch.float32)
        assert torch.equal(out, expected), (variant, (out - expected).abs().max())
    assert "float32_chunks" in gemms


def test_unknown_or_unrunnable_variants_are_refused(restore_variant):
    with pytest.raises(ValueError, match="one of best, baseline, avx2, avx512; got 'sse9'"):
        mmkern.set_cpu_isa("sse9")
    with pytest.raises(TypeError, match="isa must be a str"):
        mmkern.set_cpu_isa(2)
    for variant in {"avx2", "avx512"} - set(VARIANTS):
        with pytest.raises(ValueError, match="this CPU runs only"):
            mmkern.set_cpu_isa(variant)


def test_the_start_up_switch_picks_the_variant():
    for variant in VARIANTS:
        env = {**os.environ, "MMKERN_CPU_ISA": variant}
        code = "import mmkern; print(mmkern.cpu_isa())"
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert result.stdout.strip() == variant
    env = {**os.environ, "MMKERN_CPU_ISA": "sse9"}
    result = subprocess.run(
        [sys.executable, "-c", "import mmkern; mmkern.cpu_isa()"], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and "MMKERN_CPU_ISA must be one of" in result.stderr


@pytest.mark.skipif(not shutil.which("objdump"), reason="needs binutils' objdump")
def test_avx_code_stays_in_the_variants_namespaces():
    """Headers come before each variant's target pragma, so no inline function or template shared with
    the baseline build is compiled with AVX: every function holding a VEX or EVEX instruction belongs
    to the avx2 or avx512 variant (its name says so), and the avx512 one uses 512-bit registers."""
    disassembly = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", mmkern._extension._C.__file__],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    functions, current = {}, None
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            current = functions.setdefault(header.group(1), [])
        elif current is not None and "\t" in line:
            current.append(line.split("\t")[1])
    vector = {name for name, code in functions.items() if any(re.match(r"v[a-z]", op) for op in code)}
    outside = [name for name in vector if "mmkern::cpu::avx2" not in name and "mmkern::cpu::avx512" not in name]
    assert not outside, outside[:10]
    if "avx512" in VARIANTS:
        assert any("avx512" in name and any("zmm" in op for op in functions[name]) for name in vector)
    assert any("mmkern::cpu::avx2" in name for name in vector)


def test_the_environment_report_names_the_running_variant(restore_variant):
    for variant in VARIANTS:
        mmkern.set_cpu_isa(variant)
        row = dict(env.report())["CPU kernels"]
        assert row.startswith(f"{variant} build") and torch.ops.mmkern.supported_cpu_isas() in row, row
        gemm = "oneDNN's int8 GEMM" if torch.ops.mmkern.cpu_int8_gemm() == "int_mm" else "exact float32 GEMMs"
        assert gemm in row, row


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_kernels_parallel_loops_run_on_every_thread(threads):
    # Built without OpenMP, at::parallel_for's pragma is compiled out and every loop runs on one thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.ops.mmkern.cpu_kernel_threads() == threads
        row = dict(env.report())["CPU kernels"]
        assert row.endswith(f"on {threads} of torch's {threads} threads"), row
    finally:
        torch.set_num_threads(previous)
