// What concat_linear and quantized_concat_linear share on CPU: how the segments broadcast against
// the output's leading shape, the row pass that adds the broadcast segments' projections, bias and
// a per-column scale, and the activation epilogue.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace mmkern {
namespace cpu {

// How the segments of one call broadcast against the output's leading shape.
struct BroadcastPlan {
  std::vector<int64_t> lead;                     // the output's leading shape
  int64_t rows = 1;                              // prod(lead)
  std::vector<int64_t> column_offset;            // where each segment's columns start in weight
  std::vector<int> group;                        // per segment: -1 if per-token, else its group
  std::vector<std::vector<int64_t>> group_lead;  // per group: leading shape padded to lead's rank
  std::vector<int64_t> group_rows;               // per group: prod(group_lead)
};

inline std::vector<int64_t> leading_shape(const at::Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1);
}

inline BroadcastPlan make_plan(at::TensorList inputs) {
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

// x as (rows, d), a view whenever the leading dims collapse.
inline at::Tensor as_matrix(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows *= x.size(i);
  return x.reshape({rows, x.size(-1)});
}

// One segment's column slice of the weight, for a GEMM with `rows` rows. MKL runs up to 20% slower
// (4096x768x768, AVX2) when the slice keeps the full weight's row stride; the copy costs N*d moves
// against rows*N*d multiply-adds, so it pays off once the GEMM has a few dozen rows.
inline at::Tensor weight_columns(const at::Tensor& weight, int64_t offset, int64_t width, int64_t rows) {
  const at::Tensor slice = weight.narrow(1, offset, width);
  return rows >= 64 ? slice.contiguous() : slice;
}

// z[m, :] = ((accumulate ? z[m, :] : 0) + sum_g partials[g][row of m in group g, :]) * column_scale
//           + bias, rows in parallel; column_scale and bias may be undefined (1 and 0).
template <typename scalar_t>
void combine_rows(at::Tensor& z, bool accumulate, const std::vector<at::Tensor>& partials, const BroadcastPlan& plan,
                  const at::Tensor& column_scale, const at::Tensor& bias) {
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
  const scalar_t* scale_data = column_scale.defined() ? column_scale.const_data_ptr<scalar_t>() : nullptr;
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
        Vec acc = accumulate ? Vec::loadu(out + n) : Vec(scalar_t(0));
        for (const scalar_t* term : terms) acc = acc + Vec::loadu(term + n);
        if (scale_data) acc = acc * Vec::loadu(scale_data + n);
        if (bias_data) acc = acc + Vec::loadu(bias_data + n);
        acc.store(out + n);
      }
      for (; n < cols; ++n) {
        scalar_t acc = accumulate ? out[n] : scalar_t(0);
        for (const scalar_t* term : terms) acc += term[n];
        if (scale_data) acc *= scale_data[n];
        if (bias_data) acc += bias_data[n];
        out[n] = acc;
      }
    }
  });
}

// The activations, in mmkern/activations.py's order (tests/test_activations.py holds the two equal,
// through check_activation's message and which activations save their pre-activation).
constexpr std::array<c10::string_view, 5> kActivations = {"none", "relu", "gelu", "gelu_tanh", "silu"};
// Those whose derivative reads the pre-activation, which the forward saves.
constexpr std::array<c10::string_view, 3> kSmoothActivations = {"gelu", "gelu_tanh", "silu"};

inline void check_activation(c10::string_view activation, const char* op) {
  if (std::find(kActivations.begin(), kActivations.end(), activation) != kActivations.end()) return;
  std::string known;
  for (const auto name : kActivations) known += (known.empty() ? "" : ", ") + std::string(name);
  TORCH_CHECK(false, "mmkern::", op, ": unknown activation '", activation, "'; expected one of: ", known);
}

inline bool saves_preactivation(c10::string_view activation) {
  return std::find(kSmoothActivations.begin(), kSmoothActivations.end(), activation) != kSmoothActivations.end();
}

// (act(z), activation_saved) in out_dtype, shaped out_shape, from the pre-activation z (rows, N) in
// the accumulation dtype: the smooth activations keep z for their backward; relu runs in place (its
// backward reads the output).
inline std::tuple<at::Tensor, at::Tensor> finish_activation(at::Tensor& z, c10::string_view activation,
                                                            at::ScalarType out_dtype, at::IntArrayRef out_shape) {
  if (saves_preactivation(activation)) {
    const at::Tensor activated = activation == "gelu"        ? at::gelu(z, "none")
                                 : activation == "gelu_tanh" ? at::gelu(z, "tanh")
                                                             : at::silu(z);
    return {activated.to(out_dtype).view(out_shape), z.to(out_dtype).view(out_shape)};
  }
  if (activation == "relu") z.relu_();
  return {z.to(out_dtype).view(out_shape), at::empty({0}, z.options().dtype(out_dtype))};
}

}  // namespace cpu
}  // namespace mmkern
