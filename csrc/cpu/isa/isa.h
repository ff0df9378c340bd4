#pragma once
// Which build of the CPU kernels' hot loops runs. The loops (csrc/cpu/isa/hot_loops.inc) are compiled
// three times, for baseline x86-64, for AVX2 + FMA and for AVX-512, each into its own namespace; each
// op calls the variant chosen once per process from the host's CPU (or MMKERN_CPU_ISA), or since the
// last set_cpu_isa. Every variant gives the same bits: the build turns off FMA contraction, and the
// loops sum in one order whatever the vector width.
#include <cstdint>
#include <string>

namespace mmkern {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The variant the ops run now.
Isa active_isa();
// Runs `name` ("baseline", "avx2", "avx512", or "best": the host's best) from now on and returns the
// name of the one it replaces; a ValueError for an unknown name or one the host cannot run.
std::string set_active_isa(const std::string& name);
std::string isa_name(Isa isa);
// The variants this host can run, best last: "baseline,avx2,avx512".
std::string supported_isas();
// Whether int8 GEMMs go to oneDNN's s8s8s32 kernels (at::_int_mm): in the AVX-512 variant on a host
// with 8-bit dot products (AVX512-VNNI), where they run about 4x a float32 GEMM. Elsewhere _int_mm was
// measured 10-100x slower than a float32 GEMM, and the products are exact float32 GEMMs over K-chunks.
bool int8_gemm_uses_int_mm();
// How many threads at::parallel_for runs the CPU kernels' loops on: torch's intra-op thread count,
// where the library was built with OpenMP as torch was; 1 where the build dropped the pragma.
int64_t parallel_threads();

}  // namespace cpu
}  // namespace mmkern
