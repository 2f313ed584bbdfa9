#include "qsk/isa.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
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

constexpr const char* kExpected = "scalar, avx2, avx512 or amx";
// The cap is an Isa value, or kCapAmx: AVX-512 and the AMX kernels too (the default). Capping at
// "avx512" turns AMX off, so the AVX-512 VNNI paths run (and are tested) on AMX machines too.
constexpr int kCapAmx = static_cast<int>(Isa::Avx512) + 1;

std::optional<int> try_parse(const std::string& name) {
  if (name == "scalar") return static_cast<int>(Isa::Scalar);
  if (name == "avx2") return static_cast<int>(Isa::Avx2);
  if (name == "avx512") return static_cast<int>(Isa::Avx512);
  if (name == "amx") return kCapAmx;
  return std::nullopt;
}

int parse(const std::string& name) {
  if (auto isa = try_parse(name)) return *isa;
  throw std::invalid_argument("unknown CPU ISA '" + name + "' (expected " + kExpected + ")");
}

const Isa kDetected = detect();

// QSPARSE_CPU_ISA is read while the shared object loads, where a C++ exception cannot be caught
// (it would abort the process at `import qsparse_kernels`). So a value that is not an ISA name is
// ignored (the detected ISA is used) and the reason is kept for isa_env_error(); the Python layer
// turns it into a warning and reports it in backend_info().
std::string g_env_error;

int initial_cap() {
  const char* env = std::getenv("QSPARSE_CPU_ISA");
  if (!env || !*env) return kCapAmx;
  if (auto isa = try_parse(env)) return *isa;
  g_env_error = std::string("QSPARSE_CPU_ISA='") + env + "' is not a CPU ISA (expected " + kExpected +
                ", lower case, no spaces); ignored, the kernels use the detected ISA";
  return kCapAmx;
}

std::atomic<int> g_cap{initial_cap()};

// AMX-TILE + AMX-INT8 in the CPU, and the kernel's permission to use the tile data state: Linux
// hands it out per process on request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), and a
// tile instruction without it kills the process. Asked once, at the first has_amx_int8().
bool amx_int8_usable() {
  if (!__builtin_cpu_supports("avx512f")) return false;
  unsigned a, b, c, d;
  __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  const bool tile = (d >> 24) & 1, int8 = (d >> 25) & 1;  // CPUID.(7,0):EDX AMX-TILE, AMX-INT8
  if (!tile || !int8) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

}  // namespace

Isa isa() {
  const int cap = std::min(g_cap.load(std::memory_order_relaxed), static_cast<int>(Isa::Avx512));
  return static_cast<Isa>(cap < static_cast<int>(kDetected) ? cap : static_cast<int>(kDetected));
}

bool has_amx_int8() {
  static const bool usable = amx_int8_usable();
  return usable && isa() == Isa::Avx512 && g_cap.load(std::memory_order_relaxed) >= kCapAmx;
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
  g_cap.store(name.empty() ? kCapAmx : parse(name), std::memory_order_relaxed);
}

}  // namespace qsk::cpu
