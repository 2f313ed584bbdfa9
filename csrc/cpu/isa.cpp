#include "qsk/isa.h"

#include <atomic>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>

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

constexpr const char* kExpected = "scalar, avx2 or avx512";

std::optional<Isa> try_parse(const std::string& name) {
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512") return Isa::Avx512;
  return std::nullopt;
}

Isa parse(const std::string& name) {
  if (auto isa = try_parse(name)) return *isa;
  throw std::invalid_argument("unknown CPU ISA '" + name + "' (expected " + kExpected + ")");
}

const Isa kDetected = detect();

// QSPARSE_CPU_ISA is read while the shared object loads, where a C++ exception cannot be caught
// (it would abort the process at `import qsparse_kernels`). So a value that is not an ISA name is
// ignored (the detected ISA is used) and the reason is kept for isa_env_error(); the Python layer
// turns it into a warning and reports it in backend_info().
std::string g_env_error;

Isa initial_cap() {
  const char* env = std::getenv("QSPARSE_CPU_ISA");
  if (!env || !*env) return Isa::Avx512;
  if (auto isa = try_parse(env)) return *isa;
  g_env_error = std::string("QSPARSE_CPU_ISA='") + env + "' is not a CPU ISA (expected " + kExpected +
                ", lower case, no spaces); ignored, the kernels use the detected ISA";
  return Isa::Avx512;
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

const std::string& isa_env_error() { return g_env_error; }

void set_isa_cap(const std::string& name) {
  g_cap.store(static_cast<int>(name.empty() ? Isa::Avx512 : parse(name)), std::memory_order_relaxed);
}

}  // namespace qsk::cpu
