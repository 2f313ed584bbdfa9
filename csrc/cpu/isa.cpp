#include "qsk/isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace qsk::cpu {
namespace {

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return Isa::Avx2;
  return Isa::Scalar;
}

Isa parse(const std::string& name) {
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512") return Isa::Avx512;
  throw std::invalid_argument("unknown CPU ISA '" + name + "' (expected scalar, avx2 or avx512)");
}

const Isa kDetected = detect();

Isa initial_cap() {
  const char* env = std::getenv("QSPARSE_CPU_ISA");
  return (env && *env) ? parse(env) : Isa::Avx512;
}

std::atomic<int> g_cap{static_cast<int>(initial_cap())};

}  // namespace

Isa isa() {
  int cap = g_cap.load(std::memory_order_relaxed);
  return static_cast<Isa>(cap < static_cast<int>(kDetected) ? cap : static_cast<int>(kDetected));
}

bool has_avx512_vnni() {
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  return isa() == Isa::Avx512 && vnni;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

void set_isa_cap(const std::string& name) {
  g_cap.store(static_cast<int>(name.empty() ? Isa::Avx512 : parse(name)), std::memory_order_relaxed);
}

}  // namespace qsk::cpu
