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
  // Dropout keeps probability (b, h, i, j) by a hash of dropout_seed and that index (the mask of
  // mmkern.reference.dropout_keep_mask), so the backward redraws it.
  m.def(
      "cross_modal_attention(Tensor q, Tensor k, Tensor v, Tensor? kv_lens, Tensor? q_lens, float scale, "
      "float dropout_p, Tensor? dropout_seed) -> (Tensor, Tensor)");
  m.def(
      "cross_modal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? kv_lens, Tensor? q_lens, float scale, float dropout_p, Tensor? dropout_seed) "
      "-> (Tensor, Tensor, Tensor)");
  // The packed form, as flash-attn's varlen API: q (total_q, Hq, D), k (total_k, Hkv, D),
  // v (total_k, Hkv, Dv); sample b owns rows [cu_seqlens[b], cu_seqlens[b + 1]). Returns
  // (out (total_q, Hq, Dv), lse (Hq, total_q)). Dropout indexes the (B, Hq, max_seqlen_q,
  // max_seqlen_k) matrix, so a packed batch draws the mask of the same batch padded.
  m.def(
      "cross_modal_attention_packed(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, float dropout_p, Tensor? dropout_seed) -> (Tensor, Tensor)");
  m.def(
      "cross_modal_attention_packed_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, float dropout_p, "
      "Tensor? dropout_seed) -> (Tensor, Tensor, Tensor)");
}

}  // namespace mmkern
