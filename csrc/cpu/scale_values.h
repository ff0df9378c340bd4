#pragma once
// The CPU kernels' check of the scales they are given: finite and non-negative, else a ValueError
// that names the argument and the first bad value. It runs in the kernel, over the values it reads
// anyway, rather than in mmkern/ops/_checks.py, whose check built a handful of small tensors per call;
// those allocations cost a small quantized_fusion (3 x (4, 256, 512)) as much as its kernel.
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace mmkern {

// `scale` float32; `name` as the public function calls the argument, with `[index]` appended when
// index >= 0 (one of a list).
void check_scale_values(const at::Tensor& scale, const char* name, int64_t index = -1);

}  // namespace mmkern
