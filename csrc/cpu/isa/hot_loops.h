#pragma once
// The CPU kernels' hot loops, one build per ISA variant (csrc/cpu/isa/isa.h), and MMKERN_ISA_CALL,
// which runs the active variant's. The ops keep their checks and allocation; the loops take tensors
// already contiguous and allocated.
#include <ATen/core/Tensor.h>

#include <vector>

#include "isa.h"

#define MMKERN_DECLARE_HOT_LOOPS(variant)                                                                     \
  namespace variant {                                                                                         \
  /* Per-token quantization of x's rows into out (q_t, or x's dtype when fake) and scale. */                  \
  void quantize_rows(const at::Tensor& x, at::Tensor& out, at::Tensor& scale, at::ScalarType quantized,      \
                     bool fake);                                                                              \
  /* out[r, :] = xq[r, :] * scale[r], in out's dtype. */                                                     \
  void dequantize_rows(const at::Tensor& xq, const at::Tensor& scale, at::Tensor& out);                       \
  /* quantized_fusion's rows: a weighted sum of the dequantized inputs, or a gated pair. */                  \
  void fuse_rows(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& scales,                 \
                 const at::Tensor& weights, const at::Tensor& gate, bool gated, at::Tensor& out);             \
  /* target[m, :] (= or +=) token_scale[m] * products[m, :], products int32 or float32 (exact integers). */ \
  void add_scaled_products(at::Tensor& target, const at::Tensor& products, const at::Tensor& token_scale,     \
                           bool accumulate);                                                                  \
  }

namespace mmkern {
namespace cpu {
MMKERN_DECLARE_HOT_LOOPS(baseline)
MMKERN_DECLARE_HOT_LOOPS(avx2)
MMKERN_DECLARE_HOT_LOOPS(avx512)
}  // namespace cpu
}  // namespace mmkern

#undef MMKERN_DECLARE_HOT_LOOPS

#define MMKERN_ISA_CALL(function, ...)                         \
  do {                                                         \
    switch (::mmkern::cpu::active_isa()) {                     \
      case ::mmkern::cpu::Isa::kAvx512:                        \
        ::mmkern::cpu::avx512::function(__VA_ARGS__);          \
        break;                                                 \
      case ::mmkern::cpu::Isa::kAvx2:                          \
        ::mmkern::cpu::avx2::function(__VA_ARGS__);            \
        break;                                                 \
      default:                                                 \
        ::mmkern::cpu::baseline::function(__VA_ARGS__);        \
    }                                                          \
  } while (0)
