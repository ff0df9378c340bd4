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
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

namespace mmkern {
namespace {

using at::Tensor;
using at::TensorList;

// How the segments of one call broadcast against the output's leading shape.
struct BroadcastPlan {
  std::vector<int64_t> lead;                       // the output's leading shape
  int64_t rows = 1;                                // prod(lead)
  std::vector<int64_t> column_offset;              // where each segment's columns start in weight
  std::vector<int> group;                          // per segment: -1 if per-token, else its group
  std::vector<std::vector<int64_t>> group_lead;    // per group: leading shape padded to lead's rank
  std::vector<int64_t> group_rows;                 // per group: prod(group_lead)
};

std::vector<int64_t> leading_shape(const Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1);
}

BroadcastPlan make_plan(TensorList inputs) {
  BroadcastPlan plan;
  for (const auto& x : inputs) {
    plan.lead = at::infer_size(plan.lead, leading_shape(x));
  }
  for (auto size : plan.lead) plan.rows *= size;
  const auto rank = plan.lead.size();
  int64_t offset = 0;
  for (const auto& x : inputs) {
    plan.column_offset.push_back(offset);
    offset += x.size(-1);
    auto own = leading_shape(x);
    std::vector<int64_t> padded(rank - own.size(), 1);
    padded.insert(padded.end(), own.begin(), own.end());
    if (padded == plan.lead) {
      plan.group.push_back(-1);
      continue;
    }
    auto found = std::find(plan.group_lead.begin(), plan.group_lead.end(), padded);
    plan.group.push_back(static_cast<int>(found - plan.group_lead.begin()));
    if (found == plan.group_lead.end()) {
      plan.group_lead.push_back(padded);
      int64_t group_rows = 1;
      for (auto size : padded) group_rows *= size;
      plan.group_rows.push_back(group_rows);
    }
  }
  return plan;
}

at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// x as (rows, d) in the accumulation dtype; a view whenever the leading dims collapse.
Tensor as_matrix(const Tensor& x, at::ScalarType dtype) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows *= x.size(i);
  return x.reshape({rows, x.size(-1)}).to(dtype);
}

// One segment's column slice of the weight, for a GEMM with `rows` rows. MKL runs up to 20% slower
// (4096x768x768, AVX2) when the slice keeps the full weight's row stride; the copy costs N*d moves
// against rows*N*d multiply-adds, so it pays off once the GEMM has a few dozen rows.
Tensor weight_columns(const Tensor& weight, int64_t offset, int64_t width, int64_t rows) {
  const Tensor slice = weight.narrow(1, offset, width);
  return rows >= 64 ? slice.contiguous() : slice;
}

// z[m, :] = bias + sum_g partials[g][row of m in group g, :], rows in parallel.
template <typename scalar_t>
void write_bias_and_broadcast_terms(Tensor& z, const Tensor& bias, const std::vector<Tensor>& partials,
                                    const BroadcastPlan& plan) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t cols = z.size(1);
  const int64_t rank = static_cast<int64_t>(plan.lead.size());
  const int64_t groups = static_cast<int64_t>(partials.size());
  // A broadcast dim contributes nothing to the group's row index: its stride is 0.
  std::vector<std::vector<int64_t>> group_dim_stride(groups, std::vector<int64_t>(rank, 0));
  for (int64_t g = 0; g < groups; ++g) {
    int64_t stride = 1;
    for (int64_t d = rank - 1; d >= 0; --d) {
      if (plan.group_lead[g][d] != 1) group_dim_stride[g][d] = stride;
      stride *= plan.group_lead[g][d];
    }
  }
  const scalar_t* bias_data = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  std::vector<const scalar_t*> partial_data;
  for (const auto& p : partials) partial_data.push_back(p.const_data_ptr<scalar_t>());
  scalar_t* z_data = z.data_ptr<scalar_t>();

  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, plan.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> terms(groups);
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t g = 0; g < groups; ++g) {
        int64_t rest = m, row = 0;
        for (int64_t d = rank - 1; d >= 0; --d) {
          row += (rest % plan.lead[d]) * group_dim_stride[g][d];
          rest /= plan.lead[d];
        }
        terms[g] = partial_data[g] + row * cols;
      }
      scalar_t* out = z_data + m * cols;
      int64_t n = 0;
      for (; n + Vec::size() <= cols; n += Vec::size()) {
        Vec acc = bias_data ? Vec::loadu(bias_data + n) : Vec(scalar_t(0));
        for (const scalar_t* term : terms) acc = acc + Vec::loadu(term + n);
        acc.store(out + n);
      }
      for (; n < cols; ++n) {
        scalar_t acc = bias_data ? bias_data[n] : scalar_t(0);
        for (const scalar_t* term : terms) acc += term[n];
        out[n] = acc;
      }
    }
  });
}

void check_activation(c10::string_view activation) {
  TORCH_CHECK(activation == "none" || activation == "relu" || activation == "gelu" || activation == "gelu_tanh" ||
                  activation == "silu",
              "mmkern::concat_linear: unknown activation '", activation, "'");
}

// Only for the activations whose backward needs the pre-activation; relu runs in place.
Tensor apply_smooth_activation(const Tensor& z, c10::string_view activation) {
  if (activation == "gelu") return at::gelu(z, "none");
  if (activation == "gelu_tanh") return at::gelu(z, "tanh");
  return at::silu(z);
}

bool saves_preactivation(c10::string_view activation) {
  return activation == "gelu" || activation == "gelu_tanh" || activation == "silu";
}

std::tuple<Tensor, Tensor> concat_linear_cpu(TensorList inputs, const Tensor& weight,
                                             const std::optional<Tensor>& bias,
                                             c10::string_view activation) {
  TORCH_CHECK(!inputs.empty(), "mmkern::concat_linear: inputs must not be empty");
  check_activation(activation);
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
      write_bias_and_broadcast_terms<scalar_t>(z, bias_acc, partials, plan);
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
  if (saves_preactivation(activation)) {
    Tensor out = apply_smooth_activation(z, activation).to(dtype).view(out_shape);
    return {out, z.to(dtype).view(out_shape)};
  }
  if (activation == "relu") z.relu_();
  return {z.to(dtype).view(out_shape), at::empty({0}, weight.options())};
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
  check_activation(activation);
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
