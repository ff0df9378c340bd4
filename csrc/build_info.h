#pragma once
#include <string>

namespace mmkern {

#ifdef MMKERN_WITH_CUDA
// "13.0;archs=800,900": the CUDA runtime and the archs nvcc compiled, as nvcc itself saw them.
std::string cuda_build_info();
#endif

}  // namespace mmkern
