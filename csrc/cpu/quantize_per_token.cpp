// Per-token quantization on CPU: rows in parallel, each widened once to float and then reduced and
// rounded in cache. The rules are csrc/quantize_rules.h, shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>
#include <type_traits>

#include "../quantize_rules.h"

namespace mmkern {
namespace {

using at::Tensor;

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// out holds the quantized row (q_t) or, for fake quantization, the row dequantized (scalar_t). Each
// row is widened once into a float buffer, then reduced and rounded in loops the compiler vectorises
// (the same division, clamp and round-half-to-even as csrc/quantize_rules.h, so the bits match CUDA's).
template <typename scalar_t, typename q_t, typename out_t>
void quantize_rows(const Tensor& x, Tensor& out, Tensor& scale) {
  constexpr float kMax = Quantized<q_t>::kMax;
  const int64_t cols = x.size(-1);
  const int64_t rows = scale.numel();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  out_t* out_data = out.data_ptr<out_t>();
  float* scale_data = scale.data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(cols);
    float* row = buffer.data();
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* in = x_data + r * cols;
      for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<float>(in[c]);
      // Eight independent lanes, so the compiler vectorises the reduction without reassociating.
      // v - v is 0 for finite v and NaN for NaN or inf, and NaN sticks in the sum: that flags a row.
      constexpr int kLanes = 8;
      float lane_max[kLanes] = {}, lane_nonfinite[kLanes] = {};
      int64_t c = 0;
      for (; c + kLanes <= cols; c += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          const float v = row[c + j], a = std::fabs(v);
          lane_max[j] = a > lane_max[j] ? a : lane_max[j];
          lane_nonfinite[j] += v - v;
        }
      }
      float amax = 0.0f, nonfinite = 0.0f;
      for (; c < cols; ++c) {
        amax = std::max(amax, std::fabs(row[c]));
        nonfinite += row[c] - row[c];
      }
      for (int j = 0; j < kLanes; ++j) {
        amax = std::max(amax, lane_max[j]);
        nonfinite += lane_nonfinite[j];
      }
      const bool finite = nonfinite == 0.0f;
      const float s = per_token_scale(amax, finite, kMax);
      scale_data[r] = s;
      out_t* out_row = out_data + r * cols;
      if (!finite) {
        // Zeros, or for fake quantization NaN (0 times the NaN scale), as a float op would spread it.
        for (int64_t c = 0; c < cols; ++c) {
          if constexpr (std::is_same_v<out_t, q_t>) {
            out_row[c] = q_t(0);
          } else {
            out_row[c] = static_cast<out_t>(0.0f * s);
          }
        }
        continue;
      }
      // Divided and clamped (and, for int8, rounded) in place, in a loop the compiler vectorises; then
      // narrowed. Adding and subtracting 1.5 * 2^23 rounds half to even under the default rounding
      // mode, as rintf does, for every |v| <= 127; rintf itself is a libm call on baseline x86-64.
      constexpr float kRoundHalfEven = 12582912.0f;
      for (int64_t c = 0; c < cols; ++c) {
        float v = row[c] / s;
        v = v < -kMax ? -kMax : v;
        v = v > kMax ? kMax : v;
        if constexpr (std::is_same_v<q_t, int8_t>) v = (v + kRoundHalfEven) - kRoundHalfEven;
        row[c] = v;
      }
      for (int64_t c = 0; c < cols; ++c) {
        if constexpr (!std::is_same_v<out_t, q_t>) {
          out_row[c] = static_cast<out_t>(static_cast<float>(Quantized<q_t>::from(row[c])) * s);
        } else if constexpr (std::is_same_v<q_t, int8_t>) {
          out_row[c] = static_cast<int8_t>(row[c]);  // already rounded and clamped
        } else {
          out_row[c] = Quantized<q_t>::from(row[c]);  // float8's own rounding of the clamped quotient
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> quantize_per_token_cpu(const Tensor& x, at::ScalarType dtype) {
  const Tensor input = x.contiguous();
  Tensor xq = at::empty(x.sizes(), x.options().dtype(dtype));
  Tensor scale = at::empty(scale_shape(x), x.options().dtype(at::kFloat));
  MMKERN_DISPATCH_FEATURE_TYPES(x.scalar_type(), "quantize_per_token", [&] {
    dispatch_quantized(dtype, "quantize_per_token", [&](auto tag) {
      using q_t = decltype(tag);
      quantize_rows<scalar_t, q_t, q_t>(input, xq, scale);
    });
  });
  return {xq, scale};
}

Tensor fake_quantize_per_token_cpu(const Tensor& x, at::ScalarType dtype) {
  const Tensor input = x.contiguous();
  Tensor out = at::empty(x.sizes(), x.options());
  Tensor scale = at::empty(scale_shape(x), x.options().dtype(at::kFloat));
  MMKERN_DISPATCH_FEATURE_TYPES(x.scalar_type(), "fake_quantize_per_token", [&] {
    dispatch_quantized(dtype, "fake_quantize_per_token", [&](auto tag) {
      using q_t = decltype(tag);
      quantize_rows<scalar_t, q_t, scalar_t>(input, out, scale);
    });
  });
  return out;
}

Tensor dequantize_per_token_cpu(const Tensor& xq, const Tensor& scale, at::ScalarType dtype) {
  const Tensor input = xq.contiguous();
  const Tensor scales = scale.contiguous();
  Tensor out = at::empty(xq.sizes(), xq.options().dtype(dtype));
  const int64_t cols = xq.size(-1);
  const int64_t rows = scales.numel();
  const float* scale_data = scales.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_per_token", [&] {
    dispatch_quantized(xq.scalar_type(), "dequantize_per_token", [&](auto tag) {
      using q_t = decltype(tag);
      const q_t* q_data = input.const_data_ptr<q_t>();
      scalar_t* out_data = out.data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          for (int64_t c = 0; c < cols; ++c) {
            out_data[r * cols + c] = static_cast<scalar_t>(static_cast<float>(q_data[r * cols + c]) * scale_data[r]);
          }
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkern, CPU, m) {
  m.impl("quantize_per_token", &quantize_per_token_cpu);
  m.impl("dequantize_per_token", &dequantize_per_token_cpu);
  m.impl("fake_quantize_per_token", &fake_quantize_per_token_cpu);
}

}  // namespace mmkern
