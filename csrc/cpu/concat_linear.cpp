// concat_linear on CPU.
//
// The GEMMs go to ATen's BLAS (MKL/oneDNN/OpenBLAS): no hand-written CPU GEMM beats them. What
// this file adds is the structure around them:
//  - no concat: each segment's GEMM reads its own input and a column slice of the weight in place;
//  - a broadcast segment (leading shape smaller than the output's, such as a pooled (B, 1, d)
//    vector beside (B, L, d) tokens) is projected once at its own shape, then broadcast by a
//    row-parallel, vectorised pass that also adds the bias; the per-token segments then accumulate
//    on top with beta = 1, so bias and broadcast terms cost no extra pass;
//  - fp16 and bf16 accumulate in fp32 and round once, as a single GEMM over the concat would.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "concat_plan.h"

namespace mmkern {
namespace {

using at::Tensor;
using at::TensorList;
using namespace cpu;

at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// x as (rows, d) in the accumulation dtype; a view whenever the leading dims collapse.
Tensor as_matrix(const Tensor& x, at::ScalarType dtype) { return cpu::as_matrix(x).to(dtype); }

std::tuple<Tensor, Tensor> concat_linear_cpu(TensorList inputs, const Tensor& weight,
                                             const std::optional<Tensor>& bias,
                                             c10::string_view activation) {
  TORCH_CHECK(!inputs.empty(), "mmkern::concat_linear: inputs must not be empty");
  check_activation(activation, "concat_linear");
  const auto plan = make_plan(inputs);
  const auto dtype = weight.scalar_type();
  const auto acc = accumulate_type(dtype);
  const int64_t out_features = weight.size(0);
  const Tensor weight_acc = weight.to(acc);

  std::vector<Tensor> partials(plan.group_lead.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int g = plan.group[i];
    if (g < 0) continue;
    const Tensor x = as_matrix(inputs[i], acc);
    const Tensor w = weight_columns(weight_acc, plan.column_offset[i], inputs[i].size(-1), x.size(0)).t();
    partials[g] = partials[g].defined() ? partials[g].addmm_(x, w) : at::mm(x, w);
  }

  Tensor z = at::empty({plan.rows, out_features}, weight_acc.options());
  const Tensor bias_acc = bias.has_value() ? bias->to(acc).contiguous() : Tensor();
  bool z_written = bias_acc.defined() || !partials.empty();
  if (z_written) {
    AT_DISPATCH_FLOATING_TYPES(acc, "concat_linear_cpu", [&] {
      combine_rows<scalar_t>(z, /*accumulate=*/false, partials, plan, /*column_scale=*/Tensor(), bias_acc);
    });
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (plan.group[i] >= 0) continue;
    const Tensor x = as_matrix(inputs[i], acc);
    const Tensor w = weight_columns(weight_acc, plan.column_offset[i], inputs[i].size(-1), x.size(0)).t();
    if (z_written) {
      z.addmm_(x, w);
    } else {
      at::mm_out(z, x, w);
      z_written = true;
    }
  }
  if (!z_written) z.zero_();

  std::vector<int64_t> out_shape = plan.lead;
  out_shape.push_back(out_features);
  return finish_activation(z, activation, dtype, out_shape);
}

Tensor activation_backward(const Tensor& grad, const Tensor& saved, c10::string_view activation) {
  if (activation == "none") return grad;
  if (activation == "relu") return at::threshold_backward(grad, saved, 0);
  if (activation == "gelu") return at::gelu_backward(grad, saved, "none");
  if (activation == "gelu_tanh") return at::gelu_backward(grad, saved, "tanh");
  return at::silu_backward(grad, saved);
}

std::tuple<std::vector<Tensor>, Tensor, Tensor> concat_linear_backward_cpu(
    const Tensor& grad_out, TensorList inputs, const Tensor& weight, const Tensor& activation_saved,
    c10::string_view activation, const c10::List<bool>& input_needs_grad, bool weight_needs_grad,
    bool bias_needs_grad) {
  TORCH_CHECK(input_needs_grad.size() == inputs.size(),
              "mmkern::concat_linear_backward: input_needs_grad must have one entry per input");
  check_activation(activation, "concat_linear_backward");
  const auto plan = make_plan(inputs);
  const auto dtype = weight.scalar_type();
  const auto acc = accumulate_type(dtype);
  const int64_t out_features = weight.size(0);
  const auto empty = at::empty({0}, weight.options());

  const Tensor grad_2d = grad_out.reshape({plan.rows, out_features});
  const Tensor saved_2d = activation == "none" ? Tensor() : activation_saved.reshape({plan.rows, out_features});
  const Tensor dz = activation_backward(grad_2d, saved_2d, activation).to(acc);
  const Tensor weight_acc = weight.to(acc);

  // Broadcast dims of a group are summed out of dz once, so its GEMMs run at the group's size.
  std::vector<Tensor> group_dz(plan.group_lead.size());
  std::vector<int64_t> lead_and_features = plan.lead;
  lead_and_features.push_back(out_features);
  for (size_t g = 0; g < group_dz.size(); ++g) {
    std::vector<int64_t> dims;
    for (size_t d = 0; d < plan.lead.size(); ++d) {
      if (plan.group_lead[g][d] == 1 && plan.lead[d] != 1) dims.push_back(static_cast<int64_t>(d));
    }
    group_dz[g] = dz.reshape(lead_and_features).sum(dims, /*keepdim=*/true).reshape({plan.group_rows[g], out_features});
  }

  std::vector<Tensor> grad_inputs;
  Tensor grad_weight_acc = weight_needs_grad ? at::empty({out_features, weight.size(1)}, weight_acc.options()) : Tensor();
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int g = plan.group[i];
    const Tensor& a = g < 0 ? dz : group_dz[g];
    const int64_t width = inputs[i].size(-1);
    if (input_needs_grad.get(i)) {
      const Tensor w = weight_columns(weight_acc, plan.column_offset[i], width, a.size(0));
      grad_inputs.push_back(at::mm(a, w).to(dtype).view(inputs[i].sizes()));
    } else {
      grad_inputs.push_back(empty);
    }
    if (weight_needs_grad) {
      auto slice = grad_weight_acc.narrow(1, plan.column_offset[i], width);
      at::mm_out(slice, a.t(), as_matrix(inputs[i], acc));
    }
  }
  const Tensor grad_weight = weight_needs_grad ? grad_weight_acc.to(dtype) : empty;
  const Tensor grad_bias = bias_needs_grad ? dz.sum(0).to(dtype) : empty;
  return {grad_inputs, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkern, CPU, m) {
  m.impl("concat_linear", &concat_linear_cpu);
  m.impl("concat_linear_backward", &concat_linear_backward_cpu);
}

}  // namespace mmkern
