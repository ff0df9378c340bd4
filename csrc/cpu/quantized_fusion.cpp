// quantized_fusion on CPU: rows in parallel; each row's features are dequantized and combined in a
// float32 row buffer (the same order of operations as the eager reference) and written once
// (csrc/cpu/isa/hot_loops.inc, in the host's ISA variant).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "isa/hot_loops.h"
#include "scale_values.h"

namespace mmkern {
namespace {

using at::Tensor;
using at::TensorList;

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
    check_scale_values(ss.back(), "scales", static_cast<int64_t>(i));
  }
  const Tensor weight_values = weights.has_value() ? weights->to(at::kFloat).contiguous() : Tensor();
  const Tensor gate_values = gated ? gate->to(at::kFloat).contiguous() : Tensor();
  Tensor out = at::empty(inputs[0].sizes(), inputs[0].options().dtype(out_dtype));
  MMKERN_ISA_CALL(fuse_rows, xs, ss, weight_values, gate_values, gated, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkern, CPU, m) { m.impl("quantized_fusion", &quantized_fusion_cpu); }

}  // namespace mmkern
