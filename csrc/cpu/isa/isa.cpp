// The CPU kernels' variant: the host's best unless MMKERN_CPU_ISA (or set_cpu_isa) names another.
#include "isa.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <vector>

namespace mmkern {
namespace cpu {
namespace {

bool host_runs(Isa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  switch (isa) {
    case Isa::kBaseline:
      return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      return host_runs(Isa::kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == Isa::kBaseline;  // the other variants are built as baseline code off x86-64
#endif
}

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (host_runs(isa)) return isa;
  }
  return Isa::kBaseline;
}

Isa parse(const std::string& name, const char* source) {
  Isa isa;
  if (name == "best") {
    isa = best_isa();
  } else if (name == "baseline") {
    isa = Isa::kBaseline;
  } else if (name == "avx2") {
    isa = Isa::kAvx2;
  } else if (name == "avx512") {
    isa = Isa::kAvx512;
  } else {
    TORCH_CHECK_VALUE(false, source, " must be one of best, baseline, avx2, avx512; got '", name, "'");
  }
  TORCH_CHECK_VALUE(host_runs(isa), source, "='", name, "': this CPU runs only ", supported_isas());
  return isa;
}

Isa initial_isa() {
  const char* forced = std::getenv("MMKERN_CPU_ISA");
  return forced && *forced ? parse(forced, "MMKERN_CPU_ISA") : best_isa();
}

std::atomic<int>& active() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

std::string set_active_isa(const std::string& name) {
  const Isa isa = parse(name, "set_cpu_isa");
  return isa_name(static_cast<Isa>(active().exchange(static_cast<int>(isa))));
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    default:
      return "baseline";
  }
}

std::string supported_isas() {
  std::string names = "baseline";
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (host_runs(isa)) names += "," + isa_name(isa);
  }
  return names;
}

bool int8_gemm_uses_int_mm() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return active_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

int64_t parallel_threads() {
  const int64_t threads = at::get_num_threads();
  std::vector<std::atomic<bool>> ran(threads);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { ran[at::get_thread_num()] = true; });
  int64_t count = 0;
  for (const auto& flag : ran) count += flag.load();
  return count;
}

}  // namespace cpu
}  // namespace mmkern
