// quantized_concat_linear on CPU.
//
// Each segment's int8 GEMM (int8_products: oneDNN's s8s8s32 kernels where the CPU has VNNI, exact
// float32 GEMMs over K-chunks elsewhere) reads the segment and its weight column slice in place; its
// integer products are scaled by the segment's token scales into a float32 sum, per-token
// segments into the output and broadcast ones (a pooled (B, 1, d) vector) into a partial at their
// own, smaller shape. One row pass then adds the broadcast partials and applies weight_scale and
// bias; the activation follows, as in concat_linear.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "concat_plan.h"
#include "isa/hot_loops.h"
#include "scale_values.h"

namespace mmkern {
namespace {

using at::Tensor;
using at::TensorList;
using namespace cpu;

// Every partial sum of this many int8 products (each of magnitude <= 128 * 128 = 2^14) is an integer of
// magnitude <= 2^24, so exact in float32 in whatever order a GEMM sums.
constexpr int64_t kExactFloatTerms = 1024;

// x (M, K) @ w (K, N) of int8 matrices, as exact integers: int32 from oneDNN's s8s8s32 GEMM
// (at::_int_mm) where int8_gemm_uses_int_mm (csrc/cpu/isa/isa.h); elsewhere float32 GEMMs over chunks
// of at most kExactFloatTerms of K: one chunk's float32 result is exact, and several are added in int32.
Tensor int8_products(const Tensor& x, Tensor w) {
  if (int8_gemm_uses_int_mm()) {
    // A one-column slice transposes to a (1, N) view with strides (1, 1), which _int_mm reads wrongly
    // (garbage products); a fresh (1, N) tensor has strides (N, 1).
    if (w.size(0) == 1) w = at::empty(w.sizes(), w.options()).copy_(w);
    return at::_int_mm(x, w);
  }
  const int64_t terms = x.size(1);
  if (terms <= kExactFloatTerms) return at::mm(x.to(at::kFloat), w.to(at::kFloat));
  Tensor sum;
  for (int64_t start = 0; start < terms; start += kExactFloatTerms) {
    const int64_t length = std::min(kExactFloatTerms, terms - start);
    Tensor part = at::mm(x.narrow(1, start, length).to(at::kFloat), w.narrow(0, start, length).to(at::kFloat));
    sum = sum.defined() ? sum.add_(part.to(at::kInt)) : part.to(at::kInt);
  }
  return sum;
}

std::tuple<Tensor, Tensor> quantized_concat_linear_cpu(TensorList inputs, TensorList scales, const Tensor& weight,
                                                       const Tensor& weight_scale, const std::optional<Tensor>& bias,
                                                       c10::string_view activation, at::ScalarType out_dtype) {
  TORCH_CHECK(!inputs.empty(), "mmkern::quantized_concat_linear: inputs must not be empty");
  TORCH_CHECK(scales.size() == inputs.size(), "mmkern::quantized_concat_linear: one scale per input");
  check_activation(activation, "quantized_concat_linear");
  for (size_t i = 0; i < scales.size(); ++i) check_scale_values(scales[i], "scales", static_cast<int64_t>(i));
  check_scale_values(weight_scale, "weight_scale");
  const auto plan = make_plan(inputs);
  const int64_t out_features = weight.size(0);
  const auto float_options = weight.options().dtype(at::kFloat);

  Tensor z = at::empty({plan.rows, out_features}, float_options);
  std::vector<Tensor> partials(plan.group_lead.size());
  std::vector<bool> written(plan.group_lead.size(), false);
  bool z_written = false;
  Tensor products;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor x = as_matrix(inputs[i]);
    products = int8_products(x, weight_columns(weight, plan.column_offset[i], inputs[i].size(-1), x.size(0)).t());
    const Tensor token_scale = scales[i].reshape({x.size(0)}).contiguous();
    const int g = plan.group[i];
    if (g < 0) {
      MMKERN_ISA_CALL(add_scaled_products, z, products, token_scale, z_written);
      z_written = true;
    } else {
      if (!partials[g].defined()) partials[g] = at::empty({plan.group_rows[g], out_features}, float_options);
      MMKERN_ISA_CALL(add_scaled_products, partials[g], products, token_scale, written[g]);
      written[g] = true;
    }
  }
  const Tensor bias_float = bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
  combine_rows<float>(z, z_written, partials, plan, weight_scale.contiguous(), bias_float);

  std::vector<int64_t> out_shape = plan.lead;
  out_shape.push_back(out_features);
  return finish_activation(z, activation, out_dtype, out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkern, CPU, m) { m.impl("quantized_concat_linear", &quantized_concat_linear_cpu); }

}  // namespace mmkern
