"""No op reads tensor values on the host on its default path, forward or backward. On a GPU each read
is a device sync: the host waits for the device instead of running ahead of it, and the call cannot
be captured in a CUDA graph. Value checks (mmkern.set_value_checks) are the one exception, asked for.

Two tests hold it on a machine with no GPU:
  - fake CUDA tensors: every op's public function, and its backward op, traced as torch.compile's
    AOTDispatcher traces them but eagerly (not compiling, so the public checks run too); a
    data-dependent read raises there;
  - under the interpreter switch, the Python calls that read tensor data are counted during whole
    calls, autograd's backward included (Triton's launches stubbed, since the interpreter itself
    reads the tensors it runs on).
"""

import pytest
import torch

from mmkern import _config, ops
from mmkern.bench.host import count_host_reads, host_cases, stubbed_launches
from tests.module_cases import MASKED_ATTENTION, MODULE_CASES, forward, leaves
from tests.tracing import needs_fake_cuda_tracing

F32, I8, I32, I64 = torch.float32, torch.int8, torch.int32, torch.int64


def calls_on(t: dict) -> dict:
    """name: a call of each op's public function, or backward op, on the tensors ``t`` (named as in SPECS)."""
    return {
        "concat_linear": (
            lambda: ops.concat_linear([t["text"], t["image"]], t["weight"], t["bias"], activation="gelu")
        ),
        "concat_linear_backward": (
            lambda: torch.ops.mmkern.concat_linear_backward.default(
                t["grad"], [t["text"], t["image"]], t["weight"], t["grad"], "gelu", [True, True], True, True
            )
        ),
        "cross_modal_attention": (
            lambda: ops.cross_modal_attention(
                t["q"], t["k"], t["v"], kv_lens=t["kv_lens"], q_lens=t["q_lens"], dropout_p=0.1, return_lse=True
            )
        ),
        "cross_modal_attention_backward": (
            lambda: torch.ops.mmkern.cross_modal_attention_backward.default(
                t["out"], t["q"], t["k"], t["v"], t["out"], t["lse"], t["kv_lens"], t["q_lens"], 0.3, 0.1, t["seed"]
            )
        ),
        "cross_modal_attention_windowed": (
            lambda: ops.cross_modal_attention(
                t["q"],
                t["k"],
                t["v"],
                kv_lens=t["kv_lens"],
                q_lens=t["q_lens"],
                causal=True,
                window=(3, -1),
                return_lse=True,
            )
        ),
        "cross_modal_attention_windowed_backward": (
            lambda: torch.ops.mmkern.cross_modal_attention_backward.default(
                t["out"], t["q"], t["k"], t["v"], t["out"], t["lse"], t["kv_lens"], t["q_lens"], 0.3, 0.0, None, 2, 1
            )
        ),
        "cross_modal_attention_packed": (
            lambda: ops.cross_modal_attention_packed(
                t["packed_q"], t["packed_k"], t["packed_v"], t["cu_q"], t["cu_k"], 5, 7, dropout_p=0.1, return_lse=True
            )
        ),
        "cross_modal_attention_packed_backward": (
            lambda: torch.ops.mmkern.cross_modal_attention_packed_backward.default(
                t["packed_out"],
                t["packed_q"],
                t["packed_k"],
                t["packed_v"],
                t["packed_out"],
                t["packed_lse"],
                t["cu_q"],
                t["cu_k"],
                5,
                7,
                0.3,
                0.1,
                t["seed"],
            )
        ),
        "quantize_per_token": (lambda: ops.quantize_per_token(t["text"])),
        "dequantize_per_token": (lambda: ops.dequantize_per_token(t["text_q"], t["text_scale"])),
        "fake_quantize_per_token": (lambda: ops.fake_quantize_per_token(t["text"])),
        "quantized_concat_linear": (
            lambda: ops.quantized_concat_linear(
                [t["text_q"], t["image_q"]],
                [t["text_scale"], t["image_scale"]],
                t["weight_q"],
                t["weight_scale"],
                t["bias"],
                activation="silu",
            )
        ),
        "quantize_and_concat_linear": (
            lambda: ops.quantize_and_concat_linear([t["text"], t["image"]], t["weight"], t["bias"])
        ),
        "quantized_fusion": (
            lambda: ops.quantized_fusion(
                [t["text_q"], t["text_q"]], [t["text_scale"], t["text_scale"]], t["fusion_weights"], out_dtype=F32
            )
        ),
    }


def _fake_cuda(mode, shape, dtype):
    tensor = mode.from_tensor(torch.empty(shape, dtype=dtype, device="meta"))
    tensor.fake_device = torch.device("cuda", 0)  # a meta tensor stands in for CUDA storage
    return tensor


SPECS = {
    "text": ((2, 9, 24), F32),
    "image": ((2, 1, 40), F32),
    "weight": ((31, 64), F32),
    "bias": ((31,), F32),
    "grad": ((2, 9, 31), F32),
    "q": ((2, 5, 4, 8), F32),
    "k": ((2, 7, 2, 8), F32),
    "v": ((2, 7, 2, 8), F32),
    "out": ((2, 5, 4, 8), F32),
    "lse": ((2, 4, 5), F32),
    "kv_lens": ((2,), I64),
    "q_lens": ((2,), I64),
    "seed": ((), I64),
    "packed_q": ((8, 4, 8), F32),
    "packed_k": ((11, 2, 8), F32),
    "packed_v": ((11, 2, 8), F32),
    "packed_out": ((8, 4, 8), F32),
    "packed_lse": ((4, 8), F32),
    "cu_q": ((3,), I32),
    "cu_k": ((3,), I32),
    "text_q": ((2, 9, 24), I8),
    "image_q": ((2, 1, 40), I8),
    "text_scale": ((2, 9, 1), F32),
    "image_scale": ((2, 1, 1), F32),
    "weight_q": ((31, 64), I8),
    "weight_scale": ((31,), F32),
    "fusion_weights": ((2,), F32),
}
CALLS = [
    "concat_linear",
    "concat_linear_backward",
    "cross_modal_attention",
    "cross_modal_attention_backward",
    "cross_modal_attention_windowed",
    "cross_modal_attention_windowed_backward",
    "cross_modal_attention_packed",
    "cross_modal_attention_packed_backward",
    "quantize_per_token",
    "dequantize_per_token",
    "fake_quantize_per_token",
    "quantized_concat_linear",
    "quantize_and_concat_linear",
    "quantized_fusion",
]


@needs_fake_cuda_tracing
@pytest.mark.parametrize("call", CALLS)
def test_no_host_read_of_cuda_tensors(call, sm90_compile_target):
    from functorch.compile import aot_function, nop
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    names = list(SPECS)
    with mode:
        tensors = [_fake_cuda(mode, *SPECS[name]) for name in names]
        # Inputs the kernels are thought to write (torch's analysis counts pointers a helper function
        # reads as written) are copied back: aot_function, unlike an export, takes that.
        traced = aot_function(
            lambda *t: tuple(torch.utils._pytree.tree_leaves(calls_on(dict(zip(names, t)))[call]())), fw_compiler=nop
        )
        traced(*tensors)


interpreter_only = pytest.mark.skipif(
    not _config.TRITON_ON_CPU, reason="counts the GPU path's reads: runs under MMKERN_TRITON_INTERPRET=1"
)


@interpreter_only
def test_no_host_read_in_any_call_forward_or_backward():
    reads = {}
    with stubbed_launches():
        for case in host_cases(torch.device("cpu"), torch.float32):
            for mode, fn in case.mmkern_calls().items():
                reads[f"{case.op} {mode}"] = count_host_reads(fn)
    assert reads and all(count == 0 for count in reads.values()), reads


@interpreter_only
def test_value_checks_read_the_device(value_checks):
    """With the checks asked for, the reads happen (and the counting above sees them)."""
    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    with stubbed_launches():
        assert count_host_reads(lambda: ops.cross_modal_attention(q, k, v, kv_lens=torch.tensor([7, 3]))) > 0


@interpreter_only
@pytest.mark.parametrize("name", [name for name, _ in MODULE_CASES])
def test_no_host_read_in_any_module_forward_or_backward(name):
    build = dict(MODULE_CASES)[name]
    with stubbed_launches():
        module, inputs, kwargs = build("cpu")
        out = forward(module, inputs, kwargs)
        grad = torch.ones_like(out)
        wrt = leaves(module, inputs)
        reads = count_host_reads(lambda: forward(module, inputs, kwargs))
        if wrt:
            reads += count_host_reads(lambda: torch.autograd.grad(out, wrt, grad, retain_graph=True))
    assert reads == 0


@interpreter_only
def test_a_key_padding_mask_is_not_read_on_the_host():
    module, inputs, kwargs = MASKED_ATTENTION[1]("cpu")
    with stubbed_launches():
        assert count_host_reads(lambda: forward(module, inputs, kwargs)) == 0
