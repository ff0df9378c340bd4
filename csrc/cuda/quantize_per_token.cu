// Per-token quantization on CUDA: one warp per row. The row is read once, with 16-byte loads, and
// held in registers between the reduction (its largest magnitude) and the rounding; only rows longer
// than the register cache (4096 bf16 or 2048 fp32 values) read their tail a second time, from L2.
// (No ATen/cuda/CUDAContext.h: it pulls in cuSPARSE and cuBLAS headers, which a bare nvcc install
// lacks.) The rules are csrc/quantize_rules.h, shared with the CPU kernel, so both give the same bits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../quantize_rules.h"

namespace mmkern {
namespace {

using at::Tensor;

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kLoadBytes = 16;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// out is the quantized row (out_t == q_t) or, for fake quantization, the row dequantized.
template <typename scalar_t, typename q_t, typename out_t, int kVec, int kCached>
__global__ void __launch_bounds__(kWarpSize* kWarpsPerBlock)
    quantize_rows_kernel(const scalar_t* __restrict__ x, out_t* __restrict__ out, float* __restrict__ scale,
                         int64_t rows, int64_t cols) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  // A warp owns a row, so warps leave whole and every shuffle below sees all 32 lanes.
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarpSize;
  using InPack = Pack<scalar_t, kVec>;
  using OutPack = Pack<out_t, kVec>;
  const InPack* in = reinterpret_cast<const InPack*>(x + row * cols);
  OutPack* dst = reinterpret_cast<OutPack*>(out + row * cols);
  const int64_t packs = cols / kVec;

  InPack cached[kCached];
  float amax = 0.0f;
  bool finite = true;
  auto fold = [&](const InPack& p) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float v = static_cast<float>(p.v[j]);
      amax = fmaxf(amax, fabsf(v));
      finite = finite && isfinite(v);
    }
  };
#pragma unroll
  for (int i = 0; i < kCached; ++i) {
    const int64_t p = lane + i * kWarpSize;
    if (p < packs) {
      cached[i] = in[p];
      fold(cached[i]);
    }
  }
  for (int64_t p = lane + kCached * kWarpSize; p < packs; p += kWarpSize) fold(in[p]);
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  }
  finite = __all_sync(0xffffffffu, finite);
  const float s = per_token_scale(amax, finite, Quantized<q_t>::kMax);
  if (lane == 0) scale[row] = s;

  auto round_pack = [&](const InPack& p) {
    OutPack o;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const q_t q = finite ? Quantized<q_t>::from(static_cast<float>(p.v[j]) / s) : q_t(0);
      if constexpr (std::is_same<out_t, q_t>::value) {
        o.v[j] = q;
      } else {
        o.v[j] = static_cast<out_t>(static_cast<float>(q) * s);
      }
    }
    return o;
  };
#pragma unroll
  for (int i = 0; i < kCached; ++i) {
    const int64_t p = lane + i * kWarpSize;
    if (p < packs) dst[p] = round_pack(cached[i]);
  }
  for (int64_t p = lane + kCached * kWarpSize; p < packs; p += kWarpSize) dst[p] = round_pack(in[p]);
}

template <typename scalar_t, typename q_t, typename out_t, int kVec>
void launch_with_vector(const Tensor& x, Tensor& out, Tensor& scale, int64_t rows, int64_t cols) {
  const int64_t packs_per_lane = (cols / kVec + kWarpSize - 1) / kWarpSize;
  const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarpSize * kWarpsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  out_t* out_data = out.data_ptr<out_t>();
  float* scale_data = scale.data_ptr<float>();
  if (packs_per_lane <= 4) {
    quantize_rows_kernel<scalar_t, q_t, out_t, kVec, 4><<<grid, block, 0, stream>>>(x_data, out_data, scale_data, rows, cols);
  } else {
    quantize_rows_kernel<scalar_t, q_t, out_t, kVec, 16><<<grid, block, 0, stream>>>(x_data, out_data, scale_data, rows, cols);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename q_t, typename out_t>
void launch_quantize_rows(const Tensor& x, Tensor& out, Tensor& scale) {
  const int64_t cols = x.size(-1);
  const int64_t rows = scale.numel();
  if (rows == 0) return;
  constexpr int kVec = kLoadBytes / sizeof(scalar_t);
  // 16-byte loads need every row to start on a 16-byte boundary: a contiguous view can begin at any
  // element of its storage.
  const bool aligned = reinterpret_cast<uintptr_t>(x.const_data_ptr()) % kLoadBytes == 0 && cols % kVec == 0;
  if (aligned) {
    launch_with_vector<scalar_t, q_t, out_t, kVec>(x, out, scale, rows, cols);
  } else {
    launch_with_vector<scalar_t, q_t, out_t, 1>(x, out, scale, rows, cols);
  }
}

std::tuple<Tensor, Tensor> quantize_per_token_cuda(const Tensor& x, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor input = x.contiguous();
  Tensor xq = at::empty(x.sizes(), x.options().dtype(dtype));
  Tensor scale = at::empty(scale_shape(x), x.options().dtype(at::kFloat));
  MMKERN_DISPATCH_FEATURE_TYPES(x.scalar_type(), "quantize_per_token", [&] {
    dispatch_quantized(dtype, "quantize_per_token", [&](auto tag) {
      using q_t = decltype(tag);
      launch_quantize_rows<scalar_t, q_t, q_t>(input, xq, scale);
    });
  });
  return {xq, scale};
}

Tensor fake_quantize_per_token_cuda(const Tensor& x, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor input = x.contiguous();
  Tensor out = at::empty(x.sizes(), x.options());
  Tensor scale = at::empty(scale_shape(x), x.options().dtype(at::kFloat));
  MMKERN_DISPATCH_FEATURE_TYPES(x.scalar_type(), "fake_quantize_per_token", [&] {
    dispatch_quantized(dtype, "fake_quantize_per_token", [&](auto tag) {
      using q_t = decltype(tag);
      launch_quantize_rows<scalar_t, q_t, scalar_t>(input, out, scale);
    });
  });
  return out;
}

template <typename q_t, typename out_t>
__global__ void dequantize_kernel(const q_t* __restrict__ xq, const float* __restrict__ scale, out_t* __restrict__ out,
                                  int64_t numel, int64_t cols) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    out[i] = static_cast<out_t>(static_cast<float>(xq[i]) * scale[i / cols]);
  }
}

Tensor dequantize_per_token_cuda(const Tensor& xq, const Tensor& scale, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(xq.device());
  const Tensor input = xq.contiguous();
  const Tensor scales = scale.contiguous();
  Tensor out = at::empty(xq.sizes(), xq.options().dtype(dtype));
  const int64_t numel = input.numel();
  if (numel == 0) return out;
  constexpr int kThreads = 256;
  const int64_t wanted = (numel + kThreads - 1) / kThreads;
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, xq.device().index()));
  const int64_t resident = static_cast<int64_t>(multiprocessors) * 16;
  const dim3 grid(static_cast<unsigned>(std::min(wanted, resident)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_per_token", [&] {
    dispatch_quantized(xq.scalar_type(), "dequantize_per_token", [&](auto tag) {
      using q_t = decltype(tag);
      dequantize_kernel<q_t, scalar_t><<<grid, kThreads, 0, stream>>>(
          input.const_data_ptr<q_t>(), scales.const_data_ptr<float>(), out.data_ptr<scalar_t>(), numel, input.size(-1));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkern, CUDA, m) {
  m.impl("quantize_per_token", &quantize_per_token_cuda);
  m.impl("dequantize_per_token", &dequantize_per_token_cuda);
  m.impl("fake_quantize_per_token", &fake_quantize_per_token_cuda);
}

}  // namespace mmkern
