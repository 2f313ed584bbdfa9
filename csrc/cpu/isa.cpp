#include "qsk/isa.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

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

constexpr const char* kExpected = "scalar, avx2, avx512, avx512bf16 or amx";

// The cap is a level on one scale: the three Isa values, then the extensions above Avx512
// (kCapBf16: AVX512-BF16 dot products, kCapAmx: AMX-BF16 and AMX-INT8 tiles too). "avx512" caps
// below both, so the AVX-512 (VNNI) paths run, and are tested, on AMX machines too.
constexpr int kCapBf16 = 3, kCapAmx = 4;

std::optional<int> try_parse(const std::string& name) {
  if (name == "scalar") return static_cast<int>(Isa::Scalar);
  if (name == "avx2") return static_cast<int>(Isa::Avx2);
  if (name == "avx512") return static_cast<int>(Isa::Avx512);
  if (name == "avx512bf16") return kCapBf16;
  if (name == "amx") return kCapAmx;
  return std::nullopt;
}

int parse(const std::string& name) {
  if (auto cap = try_parse(name)) return *cap;
  throw std::invalid_argument("unknown CPU ISA '" + name + "' (expected " + kExpected + ")");
}

const Isa kDetected = detect();

bool detect_bf16() { return kDetected == Isa::Avx512 && __builtin_cpu_supports("avx512bf16"); }

// AMX needs the CPU flags and, on Linux, the kernel's permission for the tile data state
// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), once per process, before the first tile
// instruction: without it a tile instruction kills the process). Asked for once, on first use,
// by whichever AMX kernel (BF16 or INT8) comes first; no permission, no AMX.
bool tile_permission() {
  if (kDetected != Isa::Avx512 || !__builtin_cpu_supports("amx-tile")) return false;
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
#else
  return false;
#endif
}

bool detect_amx_bf16() { return detect_bf16() && __builtin_cpu_supports("amx-bf16") && tile_permission(); }

bool detect_amx_int8() {
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("amx-int8") && tile_permission();
}

// QSPARSE_CPU_ISA is read while the shared object loads, where a C++ exception cannot be caught
// (it would abort the process at `import qsparse_kernels`). So a value that is not an ISA name is
// ignored (the detected ISA is used) and the reason is kept for isa_env_error(); the Python layer
// turns it into a warning and reports it in backend_info().
std::string g_env_error;

int initial_cap() {
  const char* env = std::getenv("QSPARSE_CPU_ISA");
  if (!env || !*env) return kCapAmx;
  if (auto cap = try_parse(env)) return *cap;
  g_env_error = std::string("QSPARSE_CPU_ISA='") + env + "' is not a CPU ISA (expected " + kExpected +
                ", lower case, no spaces); ignored, the kernels use the detected ISA";
  return kCapAmx;
}

std::atomic<int> g_cap{initial_cap()};

}  // namespace

Isa isa() {
  int cap = g_cap.load(std::memory_order_relaxed);
  return static_cast<Isa>(cap < static_cast<int>(kDetected) ? cap : static_cast<int>(kDetected));
}

bool has_avx512_bf16() {
  static const bool bf16 = detect_bf16();
  return bf16 && g_cap.load(std::memory_order_relaxed) >= kCapBf16;
}

bool has_amx_bf16() {
  if (g_cap.load(std::memory_order_relaxed) < kCapAmx) return false;
  static const bool amx = detect_amx_bf16();  // thread-safe one-time request for the tile state
  return amx;
}

bool has_amx_int8() {
  if (g_cap.load(std::memory_order_relaxed) < kCapAmx) return false;
  static const bool amx = detect_amx_int8();
  return amx;
}

bool cpu_has_avx512_fp16() {
  static const bool fp16 = __builtin_cpu_supports("avx512fp16");
  return fp16;
}

bool cpu_has_avx512_bf16() {
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
  return bf16;
}

bool cpu_has_amx_bf16() {
  static const bool amx = __builtin_cpu_supports("amx-bf16");
  return amx;
}

bool cpu_fma512_at_256_bit_rate() {
  static const bool half_rate = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (kDetected != Isa::Avx512 || !__builtin_cpu_is("amd") || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
    const unsigned base = (eax >> 8) & 0xf, family = base == 0xf ? base + ((eax >> 20) & 0xff) : base;
    return family == 0x19;
  }();
  return half_rate;
}

int64_t l1d_bytes() {
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t{32 * 1024};
  }();
  return bytes;
}

const char* bf16_gemm_name() { return has_amx_bf16() ? "amx" : has_avx512_bf16() ? "avx512bf16" : "none"; }

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
