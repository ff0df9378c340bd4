// The schema of every mmkern op, defined once. Kernels register per device in csrc/cpu and
// csrc/cuda (C++) or from mmkern/ops (Triton); fake kernels and autograd live in mmkern/ops.
// Only the limited C API (one binary for every CPython >= 3.10, an abi3 wheel). torch's build adds
// its own Py_LIMITED_API flag in newer releases; this covers the older ones.
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "build_info.h"
#include "cpu/isa/isa.h"

extern "C" {
// An empty module: importing mmkern._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace mmkern {

std::string build_info() {
  std::string info = "torch=" + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
#ifdef MMKERN_WITH_CUDA
  info += ";cuda=" + cuda_build_info();
#else
  info += ";cuda=none";
#endif
  return info;
}

TORCH_LIBRARY(mmkern, m) {
  // What this binary was compiled against: "torch=2.14;cuda=13.0;archs=800,900" or "...;cuda=none".
  m.def("build_info() -> str", &build_info);
  // The CPU kernels' ISA variant (csrc/cpu/isa/isa.h): the one running, "baseline", "avx2" or
  // "avx512"; those this host runs, comma-separated; and a switch to another ("best": the host's
  // best), which returns the one it replaces.
  m.def("cpu_isa() -> str", [] { return cpu::isa_name(cpu::active_isa()); });
  m.def("supported_cpu_isas() -> str", [] { return cpu::supported_isas(); });
  m.def("set_cpu_isa(str isa) -> str", [](c10::string_view isa) { return cpu::set_active_isa(std::string(isa)); });
  // How the CPU kernels multiply int8 matrices under the running variant: "int_mm" (oneDNN's int8
  // GEMM) or "float32_chunks" (exact float32 GEMMs over K-chunks).
  m.def("cpu_int8_gemm() -> str", [] { return std::string(cpu::int8_gemm_uses_int_mm() ? "int_mm" : "float32_chunks"); });
  // How many threads the CPU kernels' parallel loops run on (torch.get_num_threads(), unless the build
  // lacked OpenMP).
  m.def("cpu_kernel_threads() -> int", [] { return cpu::parallel_threads(); });

  // act(cat([x.expand(*lead, d) for x in inputs], -1) @ weight.T + bias) without building the
  // concat. Returns (out, activation_saved): the pre-activation for gelu, gelu_tanh and silu
  // (whose derivative needs it), an empty tensor otherwise (relu's backward reads out).
  m.def(
      "concat_linear(Tensor[] inputs, Tensor weight, Tensor? bias, str activation) "
      "-> (Tensor, Tensor)");
  // Gradients of concat_linear. activation_saved is the pre-activation for gelu, gelu_tanh and
  // silu, the output for relu, unused for none. Gradients not asked for come back empty.
  m.def(
      "concat_linear_backward(Tensor grad_out, Tensor[] inputs, Tensor weight, Tensor activation_saved, "
      "str activation, bool[] input_needs_grad, bool weight_needs_grad, bool bias_needs_grad) "
      "-> (Tensor[], Tensor, Tensor)");

  // softmax(q k^T * scale) v per head over each sample's first kv_lens[b] keys, for the first
  // q_lens[b] queries (other rows are zero, lse -inf); q (B, Lq, Hq, D), k (B, Lk, Hkv, D),
  // v (B, Lk, Hkv, Dv), Hq a multiple of Hkv. Returns (out (B, Lq, Hq, Dv), lse (B, Hq, Lq)), lse in float32 (float64 for
  // float64 inputs).
  // window_left, window_right (-1: unbounded) limit query i of sample b to keys j with
  // i + d - window_left <= j <= i + d + window_right, d = kv_len_b - q_len_b (aligned bottom right, as
  // FlashAttention); causal attention is (-1, 0). A query with no visible key gets zeros, lse -inf.
  // Dropout keeps probability (b, h, i, j) by a hash of dropout_seed and that index (the mask of
  // mmkern.reference.dropout_keep_mask), so the backward redraws it.
  // key_mask (B, Lk) bool (packed: (total_k,), one per row of k) hides the keys it holds False for.
  // softcap > 0 turns each scaled score s into softcap * tanh(s / softcap); 0 leaves it. sinks (Hq,)
  // adds exp(sinks[h]) to the softmax denominator of every row of head h, and to its lse (a row with
  // no visible key then has lse sinks[h]); the backward needs only the lse, which holds it. bias
  // (padded form only), a view of shape (B, Hq, Lq, Lk) (broadcast dims of stride 0), is added to the
  // scores after the softcap; -inf there hides a key.
  m.def(
      "cross_modal_attention(Tensor q, Tensor k, Tensor v, Tensor? kv_lens, Tensor? q_lens, float scale, "
      "float dropout_p, Tensor? dropout_seed, int window_left=-1, int window_right=-1, Tensor? key_mask=None, "
      "float softcap=0., Tensor? sinks=None, Tensor? bias=None) -> (Tensor, Tensor)");
  // bias_grad: also return the bias's gradient, (B, Hq, Lq, Lk) in the accumulation dtype (the score
  // gradient, zero where no key is seen); else an empty tensor in its place.
  m.def(
      "cross_modal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? kv_lens, Tensor? q_lens, float scale, float dropout_p, Tensor? dropout_seed, int window_left=-1, "
      "int window_right=-1, Tensor? key_mask=None, float softcap=0., Tensor? bias=None, bool bias_grad=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // The packed form, as flash-attn's varlen API: q (total_q, Hq, D), k (total_k, Hkv, D),
  // v (total_k, Hkv, Dv); sample b owns rows [cu_seqlens[b], cu_seqlens[b + 1]). Returns
  // (out (total_q, Hq, Dv), lse (Hq, total_q)). Dropout indexes the (B, Hq, max_seqlen_q,
  // max_seqlen_k) matrix, so a packed batch draws the mask of the same batch padded.
  m.def(
      "cross_modal_attention_packed(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, float dropout_p, Tensor? dropout_seed, int window_left=-1, "
      "int window_right=-1, Tensor? key_mask=None, float softcap=0., Tensor? sinks=None) -> (Tensor, Tensor)");
  m.def(
      "cross_modal_attention_packed_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, float dropout_p, "
      "Tensor? dropout_seed, int window_left=-1, int window_right=-1, Tensor? key_mask=None, float softcap=0.) "
      "-> (Tensor, Tensor, Tensor)");

  // Symmetric per-token (per-row over the last dim) quantization to int8 or float8_e4m3fn:
  // scale = max(amax / qmax, FLT_MIN) in float32, shape (*lead, 1); xq = round(x / scale) clamped to
  // [-qmax, qmax] (qmax 127, or 448 for fp8). A row holding NaN or inf gets a NaN scale and zero xq.
  m.def("quantize_per_token(Tensor x, ScalarType dtype) -> (Tensor, Tensor)");
  // xq * scale in dtype.
  m.def("dequantize_per_token(Tensor xq, Tensor scale, ScalarType dtype) -> Tensor");
  // dequantize_per_token(*quantize_per_token(x, dtype), x.dtype) in one pass.
  m.def("fake_quantize_per_token(Tensor x, ScalarType dtype) -> Tensor");

  // concat_linear over int8 segments with per-token scales (scales[i] (*lead_i, 1) float32) and an
  // int8 weight with per-output-channel weight_scale (N,) float32: each segment's products sum in
  // int32, are scaled by its token scales, summed over segments, then scaled by weight_scale, with
  // bias and activation in the epilogue. Returns (out, activation_saved) in out_dtype, the latter as
  // in concat_linear.
  m.def(
      "quantized_concat_linear(Tensor[] inputs, Tensor[] scales, Tensor weight, Tensor weight_scale, Tensor? bias, "
      "str activation, ScalarType out_dtype) -> (Tensor, Tensor)");
  // Quantization in the training loop: quantizes float inputs per token and the float weight per
  // output channel to int8, then runs quantized_concat_linear into the inputs' dtype. Returns the
  // output, the activation_saved of concat_linear, and the quantized operands, which the backward
  // (the unquantized op's gradient at the dequantized values, straight-through) reads instead of
  // keeping float copies. A composite of the two ops above, one kernel for every device.
  m.def(
      "quantize_and_concat_linear(Tensor[] inputs, Tensor weight, Tensor? bias, str activation) "
      "-> (Tensor, Tensor, Tensor[], Tensor[], Tensor, Tensor)");

  // Elementwise fusion of same-shape quantized features (*lead, d) with scales (*lead, 1):
  // "sum": sum_i weights[i] * dequant(x_i) (weights (n,) float32, all ones when absent);
  // "gated": g * dequant(x_0) + (1 - g) * dequant(x_1), g = sigmoid(gate), gate (*lead, d).
  m.def(
      "quantized_fusion(Tensor[] inputs, Tensor[] scales, Tensor? weights, Tensor? gate, str mode, "
      "ScalarType out_dtype) -> Tensor");
}

}  // namespace mmkern
