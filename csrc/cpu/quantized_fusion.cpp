// quantized_fusion on CPU: rows in parallel; each row's features are dequantized and combined in a
// float32 row buffer (the same order of operations as the eager reference) and written once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../quantize_rules.h"

namespace mmkern {
namespace {

using at::Tensor;
using at::TensorList;

template <typename q_t, typename out_t>
void fuse_rows(const std::vector<Tensor>& inputs, const std::vector<Tensor>& scales, const Tensor& weights,
               const Tensor& gate, bool gated, Tensor& out) {
  const int64_t cols = out.size(-1);
  const int64_t rows = scales[0].numel();
  std::vector<const q_t*> x_data;
  std::vector<const float*> scale_data;
  for (size_t i = 0; i < inputs.size(); ++i) {
    x_data.push_back(inputs[i].const_data_ptr<q_t>());
    scale_data.push_back(scales[i].const_data_ptr<float>());
  }
  const float* weight_data = weights.defined() ? weights.const_data_ptr<float>() : nullptr;
  const float* gate_data = gated ? gate.const_data_ptr<float>() : nullptr;
  out_t* out_data = out.data_ptr<out_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(cols);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = r * cols;
      if (gated) {
        const float s0 = scale_data[0][r], s1 = scale_data[1][r];
        for (int64_t c = 0; c < cols; ++c) {
          const float g = 1.0f / (1.0f + std::exp(-gate_data[base + c]));
          const float d0 = static_cast<float>(x_data[0][base + c]) * s0;
          const float d1 = static_cast<float>(x_data[1][base + c]) * s1;
          acc[c] = g * d0 + (1.0f - g) * d1;
        }
      } else {
        for (size_t i = 0; i < x_data.size(); ++i) {
          const float w = weight_data ? weight_data[i] : 1.0f;
          const float s = scale_data[i][r];
          const q_t* x = x_data[i] + base;
          if (i == 0) {
            for (int64_t c = 0; c < cols; ++c) acc[c] = w * (static_cast<float>(x[c]) * s);
          } else {
            for (int64_t c = 0; c < cols; ++c) acc[c] += w * (static_cast<float>(x[c]) * s);
          }
        }
      }
      for (int64_t c = 0; c < cols; ++c) out_data[base + c] = static_cast<out_t>(acc[c]);
    }
  });
}

Tensor quantized_fusion_cpu(TensorList inputs, TensorList scales, const std::optional<Tensor>& weights,
                            const std::optional<Tensor>& gate, c10::string_view mode, at::ScalarType out_dtype) {
  TORCH_CHECK(!inputs.empty() && scales.size() == inputs.size(),
              "mmkern::quantized_fusion: one scale per input, at least one input");
  const bool gated = mode == "gated";
  TORCH_CHECK(gated || mode == "sum", "mmkern::quantized_fusion: unknown mode '", mode, "'");
  TORCH_CHECK(!gated || (inputs.size() == 2 && gate.has_value()), "mmkern::quantized_fusion: gated takes two inputs and a gate");
  std::vector<Tensor> xs, ss;
  for (size_t i = 0; i < inputs.size(); ++i) {
    xs.push_back(inputs[i].contiguous());
    ss.push_back(scales[i].contiguous());
  }
  const Tensor weight_values = weights.has_value() ? weights->to(at::kFloat).contiguous() : Tensor();
  const Tensor gate_values = gated ? gate->to(at::kFloat).contiguous() : Tensor();
  Tensor out = at::empty(inputs[0].sizes(), inputs[0].options().dtype(out_dtype));
  MMKERN_DISPATCH_FEATURE_TYPES(out_dtype, "quantized_fusion", [&] {
    dispatch_quantized(inputs[0].scalar_type(), "quantized_fusion", [&](auto tag) {
      using q_t = decltype(tag);
      fuse_rows<q_t, scalar_t>(xs, ss, weight_values, gate_values, gated, out);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkern, CPU, m) { m.impl("quantized_fusion", &quantized_fusion_cpu); }

}  // namespace mmkern
