// Portable strip kernel of the ternary GEMV (contract: csrc/include/qsk/cpu_ternary.h): the
// definition the vector kernels are tested against, and the path for CPUs without AVX2.
#include <cstdint>
#include <cstring>

#include "qsk/cpu_ternary.h"

namespace qsk::cpu::ternary {

void strip_scalar(const RowPlan& p, int64_t b0, int64_t nbytes, int32_t* acc, int64_t ld) {
  for (int64_t m = 0; m < p.M; ++m) {
    // uint32 accumulators: the sums wrap modulo 2^32 like the vector kernels (no signed overflow).
    uint32_t a[4 * kStripScalar];
    std::memset(a, 0, sizeof a);
    const int32_t* xm = p.x4 + m * p.n_quads;
    for (int64_t q = 0; q < p.n_quads; ++q) {
      for (int r = 0; r < 4; ++r) {
        // Byte r of the quad's dword is the int8 activation of plan row 4q + r.
        const int8_t xv = static_cast<int8_t>(static_cast<uint32_t>(xm[q]) >> (8 * r));
        if (xv == 0) continue;
        const uint32_t xu = static_cast<uint32_t>(static_cast<int32_t>(xv));
        const uint8_t* src = p.packed + static_cast<int64_t>(p.rows[4 * q + r]) * p.stride + b0;
        for (int64_t b = 0; b < nbytes; ++b) {
          const uint32_t byte = src[b];
          // Output 4b + s has code (byte >> 2s) & 3.
          for (int s = 0; s < 4; ++s) a[4 * b + s] += ((byte >> (2 * s)) & 3u) * xu;
        }
      }
    }
    for (int64_t j = 0; j < 4 * nbytes; ++j) acc[m * ld + j] = static_cast<int32_t>(a[j]);
  }
}

}  // namespace qsk::cpu::ternary
