#include "scale_values.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cfloat>
#include <charconv>
#include <cmath>
#include <string>

namespace mmkern {
namespace {

// `value` as Python's repr prints it (-1.0, 0.0001, 1e-05, 1e+16, nan, inf), so a CPU call's message
// reads as the GPU path's: the shortest digits that round-trip, fixed where the decimal exponent is in
// [-4, 16), scientific elsewhere.
std::string python_repr(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value < 0 ? "-inf" : "inf";
  char buffer[40];
  char* end = std::to_chars(buffer, buffer + sizeof(buffer), value, std::chars_format::scientific).ptr;
  const std::string scientific(buffer, end);  // -d.ddde+XX
  const size_t e = scientific.find('e');
  const int exponent = std::stoi(scientific.substr(e + 1));
  if (exponent < -4 || exponent >= 16) return scientific;
  const bool negative = scientific[0] == '-';
  std::string digits = scientific.substr(negative, e - negative);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  std::string text;
  if (exponent < 0) {
    text = "0." + std::string(-exponent - 1, '0') + digits;
  } else {
    const size_t whole = static_cast<size_t>(exponent) + 1;  // digits before the point
    if (digits.size() < whole) digits.append(whole - digits.size(), '0');
    text = digits.substr(0, whole) + "." + (digits.size() > whole ? digits.substr(whole) : "0");
  }
  return negative ? "-" + text : text;
}

}  // namespace

void check_scale_values(const at::Tensor& scale, const char* name, int64_t index) {
  const at::Tensor values = scale.contiguous();
  const float* data = values.const_data_ptr<float>();
  const int64_t n = values.numel();
  // One branch-free pass (NaN fails both comparisons), then a second only to name the bad value.
  bool finite_and_non_negative = true;
  for (int64_t i = 0; i < n; ++i) finite_and_non_negative &= (data[i] >= 0.0f) & (data[i] <= FLT_MAX);
  if (finite_and_non_negative) return;
  int64_t bad = 0;
  while (data[bad] >= 0.0f && data[bad] <= FLT_MAX) ++bad;
  const std::string argument = index >= 0 ? std::string(name) + "[" + std::to_string(index) + "]" : name;
  TORCH_CHECK_VALUE(false, argument, " holds ", python_repr(data[bad]), "; scales must be finite and >= 0");
}

}  // namespace mmkern
