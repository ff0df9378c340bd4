// quantized_concat_linear on CPU.
//
// Each segment's int8 GEMM goes to ATen's _int_mm (oneDNN's s8s8s32 kernels: VNNI where the CPU has
// it, about 4x fp32 BLAS on AVX-512), reading the segment and its weight column slice in place;
// its int32 products are scaled by the segment's token scales into a float32 sum, per-token
// segments into the output and broadcast ones (a pooled (B, 1, d) vector) into a partial at their
// own, smaller shape. One row pass then adds the broadcast partials and applies weight_scale and
// bias; the activation follows, as in concat_linear.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "concat_plan.h"

namespace mmkern {
namespace {

using at::Tensor;
using at::TensorList;
using namespace cpu;

// target[m, :] (= or +=) token_scale[m] * products[m, :].
void add_scaled_products(Tensor& target, const Tensor& products, const Tensor& token_scale, bool accumulate) {
  const int64_t rows = target.size(0), cols = target.size(1);
  float* target_data = target.data_ptr<float>();
  const int32_t* product_data = products.const_data_ptr<int32_t>();
  const float* scale_data = token_scale.const_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float* out = target_data + m * cols;
      const int32_t* in = product_data + m * cols;
      const float s = scale_data[m];
      if (accumulate) {
        for (int64_t n = 0; n < cols; ++n) out[n] += s * static_cast<float>(in[n]);
      } else {
        for (int64_t n = 0; n < cols; ++n) out[n] = s * static_cast<float>(in[n]);
      }
    }
  });
}

std::tuple<Tensor, Tensor> quantized_concat_linear_cpu(TensorList inputs, TensorList scales, const Tensor& weight,
                                                       const Tensor& weight_scale, const std::optional<Tensor>& bias,
                                                       c10::string_view activation, at::ScalarType out_dtype) {
  TORCH_CHECK(!inputs.empty(), "mmkern::quantized_concat_linear: inputs must not be empty");
  TORCH_CHECK(scales.size() == inputs.size(), "mmkern::quantized_concat_linear: one scale per input");
  check_activation(activation, "quantized_concat_linear");
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
    Tensor w = weight_columns(weight, plan.column_offset[i], inputs[i].size(-1), x.size(0)).t();
    // A one-column slice transposes to a (1, N) view with strides (1, 1), which _int_mm reads wrongly
    // (garbage products); a fresh (1, N) tensor has strides (N, 1).
    if (w.size(0) == 1) w = at::empty(w.sizes(), w.options()).copy_(w);
    products = at::_int_mm(x, w);
    const Tensor token_scale = scales[i].reshape({x.size(0)}).contiguous();
    const int g = plan.group[i];
    if (g < 0) {
      add_scaled_products(z, products, token_scale, z_written);
      z_written = true;
    } else {
      if (!partials[g].defined()) partials[g] = at::empty({plan.group_rows[g], out_features}, float_options);
      add_scaled_products(partials[g], products, token_scale, written[g]);
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
