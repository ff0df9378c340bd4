// Compiled by nvcc, so it reports what nvcc actually built. The import-time check reads the targets
// setup.py asked for (mmkern/_build_config.py, readable before this binary loads); python -m
// mmkern.env shows both, and tests/test_build.py checks that they agree.
#include <cuda_runtime_api.h>

#include <string>

#include "../build_info.h"

namespace mmkern {

#define MMKERN_STRINGIFY_(...) #__VA_ARGS__
#define MMKERN_STRINGIFY(...) MMKERN_STRINGIFY_(__VA_ARGS__)

std::string cuda_build_info() {
  std::string info = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#ifdef __CUDA_ARCH_LIST__
  info += ";archs=" MMKERN_STRINGIFY(__CUDA_ARCH_LIST__);
#endif
  return info;
}

}  // namespace mmkern
