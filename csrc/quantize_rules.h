// The rules of per-token quantization, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels so
// that both produce the same bits: the scale of a row, and the rounding of a value into each dtype.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Float8_e4m3fn.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

namespace mmkern {

// The largest magnitude a quantized dtype takes, and how a value already divided by the scale is
// rounded into it. int8 is symmetric: -128 is never produced, so negating a row stays exact.
template <typename q_t>
struct Quantized;

template <>
struct Quantized<int8_t> {
  static constexpr float kMax = 127.0f;
  // rintf rounds half to even, as torch.round does.
  C10_HOST_DEVICE static int8_t from(float v) { return static_cast<int8_t>(rintf(fminf(fmaxf(v, -kMax), kMax))); }
};

template <>
struct Quantized<c10::Float8_e4m3fn> {
  static constexpr float kMax = 448.0f;
  // Clamped first: e4m3fn has no infinity, so a value past 448 would round to NaN.
  C10_HOST_DEVICE static c10::Float8_e4m3fn from(float v) {
    return c10::Float8_e4m3fn(fminf(fmaxf(v, -kMax), kMax));
  }
};

// The scale of a row whose largest magnitude is amax. A row of zeros gets the smallest normal
// float, so it stays finite and dequantizes to zeros; a row holding NaN or inf (finite == false)
// gets NaN, which mmkern.ops.quantize_per_token reports by name.
C10_HOST_DEVICE inline float per_token_scale(float amax, bool finite, float qmax) {
  return finite ? fmaxf(amax / qmax, FLT_MIN) : NAN;
}

// The float dtypes features come in: float32, float16, bfloat16. Features are never float64 (the
// scales are float32), so the kernels instantiate nothing for it.
#define MMKERN_DISPATCH_FEATURE_TYPES(TYPE, NAME, ...)                                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The shape of the scales of x: one per row, (*lead, 1).
inline std::vector<int64_t> scale_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = 1;
  return shape;
}

// Calls body(q_t{}) for the quantized dtype q_t (a tag argument: templated lambdas need C++20, and
// torch before 2.10 builds extensions as C++17).
template <typename Body>
void dispatch_quantized(at::ScalarType dtype, const char* op, Body body) {
  if (dtype == at::kChar) {
    body(int8_t{});
  } else if (dtype == at::kFloat8_e4m3fn) {
    body(c10::Float8_e4m3fn{});
  } else {
    TORCH_CHECK(false, "mmkern::", op, ": the quantized dtype must be int8 or float8_e4m3fn, got ", dtype);
  }
}

}  // namespace mmkern
