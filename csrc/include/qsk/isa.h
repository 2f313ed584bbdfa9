// Run-time CPU ISA selection. The library is compiled for baseline x86-64; kernels that use
// AVX2 or AVX-512 carry __attribute__((target(...))) and are chosen here at run time.
#pragma once

#include <cstdint>
#include <string>

namespace qsk::cpu {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// Best ISA this CPU supports, capped by the environment variable QSPARSE_CPU_ISA
// (scalar | avx2 | avx512 | avx512bf16 | amx; the last two are Avx512 plus extensions, see
// has_avx512_bf16 / has_amx_bf16 / has_amx_int8, and "avx512" turns them off) read once (an
// invalid value is ignored, see isa_env_error()), or by set_isa_cap() (tests reach every path).
Isa isa();
// Whether AVX-512 VNNI (vpdpbusd) can be used; false whenever isa() is below Avx512.
bool has_avx512_vnni();
// Whether AVX512-BF16 (vdpbf16ps) can be used: the CPU has it and the cap is avx512bf16 or amx.
bool has_avx512_bf16();
// Whether AMX-BF16 tiles can be used: the CPU has them, the OS granted the tile state, and the
// cap is amx (the default). Implies has_avx512_bf16().
bool has_amx_bf16();
// "amx", "avx512bf16" or "none": the bf16 batched kernel sparse_linear uses (for tests, reports).
const char* bf16_gemm_name();
// Whether the AMX-INT8 kernels can run: the CPU has AMX-TILE and AMX-INT8, Linux granted the tile
// state (requested once), and the cap is "amx" (the default).
bool has_amx_int8();
// Whether the CPU has AVX512-FP16 (and the OS its state). Not capped: it says which of torch's
// kernels are fast (oneDNN's fp16 GEMM), not which of the library's may run.
bool cpu_has_avx512_fp16();
// Whether the CPU has AVX512-BF16 (vdpbf16ps). Not capped, as cpu_has_avx512_fp16: whether torch's
// bf16 GEMM (oneDNN) is fast.
bool cpu_has_avx512_bf16();
// Whether the CPU has AMX-BF16. Not capped, as cpu_has_avx512_bf16: whether torch's bf16 GEMM
// (oneDNN, which requests the tile state itself) runs on AMX tiles.
bool cpu_has_amx_bf16();
// Whether the CPU executes 512-bit FMAs at its 256-bit rate (two 256-bit halves): AMD family 0x19
// with AVX-512, i.e. Zen 4. Not capped. There an AVX2 kernel's FMAs match an AVX-512 GEMM's.
bool cpu_fma512_at_256_bit_rate();
// The L1 data cache of one core in bytes (sysconf; 32 KB when the OS does not say). A CPU fact,
// not capped: it sizes the sparse GEMV's accumulator panels (sparse_gemv.h, panel_cols).
int64_t l1d_bytes();
const char* isa_name(Isa isa);
// Caps the ISA; "" restores the detected one. Throws on an unknown name.
void set_isa_cap(const std::string& name);
// Why QSPARSE_CPU_ISA was ignored ("" when it was unset, empty or valid). An invalid value never
// throws at load time: the detected ISA is used and this message says so.
const std::string& isa_env_error();

}  // namespace qsk::cpu

// Target attribute strings, one place for each ISA level.
#define QSK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))
#define QSK_TARGET_AMX_BF16 \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi2")))
#define QSK_TARGET_AMX_INT8 \
  __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")))
#define QSK_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c,bmi2")))
