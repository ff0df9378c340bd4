// Per-token quantization on CPU: rows in parallel, each widened once to float and then reduced and
// rounded in cache (csrc/cpu/isa/hot_loops.inc, in the host's ISA variant). The rules are
// csrc/quantize_rules.h, shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../quantize_rules.h"
#include "isa/hot_loops.h"
#include "scale_values.h"

namespace mmkern {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> quantize_per_token_cpu(const Tensor& x, at::ScalarType dtype) {
  const Tensor input = x.contiguous();
  Tensor xq = at::empty(x.sizes(), x.options().dtype(dtype));
  Tensor scale = at::empty(scale_shape(x), x.options().dtype(at::kFloat));
  MMKERN_ISA_CALL(quantize_rows, input, xq, scale, dtype, /*fake=*/false);
  return {xq, scale};
}

Tensor fake_quantize_per_token_cpu(const Tensor& x, at::ScalarType dtype) {
  const Tensor input = x.contiguous();
  Tensor out = at::empty(x.sizes(), x.options());
  Tensor scale = at::empty(scale_shape(x), x.options().dtype(at::kFloat));
  MMKERN_ISA_CALL(quantize_rows, input, out, scale, dtype, /*fake=*/true);
  return out;
}

Tensor dequantize_per_token_cpu(const Tensor& xq, const Tensor& scale, at::ScalarType dtype) {
  const Tensor input = xq.contiguous();
  const Tensor scales = scale.contiguous();
  check_scale_values(scales, "scale");
  Tensor out = at::empty(xq.sizes(), xq.options().dtype(dtype));
  MMKERN_ISA_CALL(dequantize_rows, input, scales, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkern, CPU, m) {
  m.impl("quantize_per_token", &quantize_per_token_cpu);
  m.impl("dequantize_per_token", &dequantize_per_token_cpu);
  m.impl("fake_quantize_per_token", &fake_quantize_per_token_cpu);
}

}  // namespace mmkern
