// The CPU ternary GEMV/GEMM over the canonical packed layout (SPEC 6): the interface between the op
// (csrc/cpu/ternary_linear.cpp) and the per-ISA strip kernels (csrc/cpu/ternary_strip_*.cpp).
//
// Layout recap: packed is uint8 [d, cols], cols = ceil(out / 4); byte [i, p] holds the codes
// c = t + 1 in {0, 1, 2} of outputs 4p + s (s = 0..3) of input feature i, at bits 2s and 2s + 1.
//
// What a strip kernel computes. The op reduces every call to a row plan: the packed rows it must
// read (the kept input features, in quads of 4) and, per batch row m, the int8 activations that
// multiply them. A strip kernel takes a strip of packed bytes [b0, b0 + nbytes) (4 * nbytes outputs)
// and writes, for every batch row m and output j of the strip,
//     code_dot[m][j] = sum over plan rows i of  x_q[m][i] * code(i, j)          (exact, int32)
// The op subtracts sum_i x_q[m][i] afterwards, which turns codes back into t = code - 1:
//     acc[m][j] = sum_i x_q[m][i] * (code(i, j) - 1)  ==  (x_q @ t^T)[m][j].
// Working with the unsigned codes is what lets vpdpbusd / pmaddubsw (u8 x s8) do the products.
// All sums wrap modulo 2^32 (vector adds wrap; the scalar path uses uint32), so the result is
// exact whenever the true accumulator fits in int32 (|acc| <= 128 * d), for any code 3 too.
#pragma once

#include <xmmintrin.h>

#include <algorithm>
#include <cstdint>

namespace qsk::cpu::ternary {

// The rows to read and the activations that multiply them.
struct RowPlan {
  // [d, cols], canonical layout, cols = ceil(out / 4) bytes per row, rows `stride` bytes apart:
  // stride == cols for a contiguous weight, more for a column range of a wider buffer (sibling
  // projections stored side by side, ternary_linear_multi_m1). Kernels read only [b0, b0 + nbytes)
  // of a row, within its cols bytes.
  const uint8_t* packed;
  int64_t cols;
  int64_t stride;
  const int32_t* rows;    // 4 * n_quads packed-row indices, each in [0, d) (padding repeats a valid row)
  int64_t n_quads;
  // [M, n_quads]: quad q of batch row m as one little-endian dword whose byte r is the int8
  // x_q[m][rows[4q + r]] (0 for padding, and for features that row m dropped). This is exactly
  // the signed operand vpdpbusd wants broadcast to every lane.
  const int32_t* x4;
  int64_t M;
};

// Strip widths in packed bytes (4 outputs per byte): one zmm (64 B) or one xmm (16 B) per row.
constexpr int64_t kStripAvx512 = 64;
constexpr int64_t kStripAvx2 = 16;
// block_avx2_m1's strip (32 B of each of a pair of rows per step).
constexpr int64_t kStripAvx2M1 = 32;
constexpr int64_t kStripScalar = 64;
// The AVX-512 M == 1 kernel works on blocks of up to kBlockAvx512 bytes per row (see
// block_avx512_m1), visiting the rows in chunks of kBlockRowQuads quads. Tuned on 4096 x 11008,
// 1 thread, DRAM-resident weights (median us, dense / s = 0.6125): one 64 B strip at a time
// 1005 / 434; blocks of 512 B with 8-quad chunks 681 / 341, 1024 B 626 / 312; 1024 B with
// 4-, 16-, 32-quad chunks 731 / 332, 521 / 265, 618 / 307.
constexpr int64_t kBlockAvx512 = 1024;
// The widest block block_avx512_m1 accepts (the row-split M == 1 path runs whole rows; its
// accumulators live on the stack: 16 KB per KB of block, 128 KB here). 8192 rather than 4096 reads
// Llama-2-7B's gate / up side by side (5504-byte rows) whole: AMD EPYC Zen 4, M = 1, separate
// buffers / side by side 0.95 [0.94, 0.98] dense, 1.09 s = 0.6125 with 4096; 1.07 [1.05, 1.12] /
// 1.11 with 8192. Single weights, 4096 / 8192, alternating processes: 2048 x 28672 (7168-byte rows)
// dense 1.06-1.17, s = 0.6125 1.00-1.12 (one 0.70); 1024 x 24576 dense 1.03-1.14, s = 0.6125 0.96-1.06.
constexpr int64_t kMaxBlockAvx512 = 8192;
constexpr int64_t kBlockRowQuads = 16;
// The widest block block_avx2_m1 accepts (its int16 and int32 sums live on the stack: 24 KB per KB
// of block, 72 KB here). 3072 rather than 2048 reads TinyLlama's gate / up side by side (2816-byte
// rows) and Llama-2-7B's gate / up (2752) whole. AVX2 path forced on AMD EPYC Zen 4, M = 1, 2048 /
// 3072, 4 alternating processes: 4096 x 11008 dense 1.22 [1.20, 1.40], s = 0.6125 1.07 [1.04, 1.15];
// gate/up 2048 -> 2 x 5632 side by side / separate buffers: dense 1.03-1.06, s = 0.6125 1.09-1.11
// (0.91-0.93 and 1.06 with 2048-byte blocks). Not yet measured on an AVX2-only CPU.
constexpr int64_t kMaxBlockAvx2 = 3072;
// The widest block of the per-row AVX2 batch path (block_avx2_m1 per batch row): its setting
// before kMaxBlockAvx2 grew for merged rows (tuned on AMD EPYC Zen 3, acda7a9).
constexpr int64_t kBlockAvx2Rows = 2048;
// The row-split M == 1 path (csrc/cpu/ternary_linear.cpp, row_split_m1) reads whole rows (up to
// kMaxBlockAvx512 bytes) in chunks of this many quads, prefetching the next chunk into L2.
// Measured on 4096 x 11008, AVX-512 VNNI, 2 threads, DRAM-resident, interleaved A/B (median us,
// dense / s = 0.5 / s = 0.6125): 16-quad chunks 690 / 429 / 428, 8 quads 665 / 392 / 319,
// 4 quads 681 / 425 / 322, 32 quads 1424 / 806 / 603; and against the column-split blocks
// (1024 B, 16 quads) 756 / 625 / 499 -> 603 / 534 / 443 with 16-quad whole-row chunks.
// Chunks of about this many bytes (8 quads of 2752-byte rows) for rows of kRowSplitShortRow bytes
// and more; narrower rows take chunks of kRowSplitShortChunk quads (row_split_chunk_quads).
constexpr int64_t kRowSplitChunkBytes = 8 * 4 * 2752;
// The byte rule gave rows of 1408 B (TinyLlama's gate / up) 15-quad chunks, which read them
// slowly. Measured 2026-12-03 (Intel Xeon AMX, AVX-512 VNNI, 2 threads, weights rotated past the
// LLC, 7-9 interleaved rounds in one process, median time ratio to the byte rule [min, max]):
//   2048 x 5632 (1408 B rows): 4 quads 0.82-0.91 dense, 0.76-0.81 at s = 0.6125 (2 or 3: alike);
//   2560 x 6912 (1728 B rows, the rule's 12): 4 quads 0.97 / 0.90;
//   4096 x 11008 (2752 B rows, the rule's 8): 4 quads 1.03-1.10, so these keep the rule;
//   2048 x 2048 (512 B rows, row-major prefetch, the rule's 43): 1-4 quads 0.94-1.05, alike.
constexpr int64_t kRowSplitShortRow = 2048;
constexpr int64_t kRowSplitShortChunk = 4;
// Quads per chunk of the row-split path for blocks of blk bytes per row.
// On AMD Zen 4 (zen4: cpu_fma512_at_256_bit_rate(), AMD family 0x19 with AVX-512) short chunks win
// at every width. Measured 2026-12-05 (AMD EPYC Zen 4, 2 threads, bf16, weights rotated past the
// LLC, 7 interleaved rounds in one process, time ratio rule / 4 quads, median [min, max], dense /
// s = 0.6125): 4096 x 11008 1.10 [1.04, 1.24] / 0.99 [0.95, 1.06]; 2048 x 11264 (2816 B rows, the
// fused gate / up) 1.12 [1.00, 1.14] / 1.03 [0.98, 1.05].
inline int64_t row_split_chunk_quads(int64_t blk, bool zen4) {
  if (blk < kRowSplitShortRow || zen4) return kRowSplitShortChunk;
  return std::clamp<int64_t>(kRowSplitChunkBytes / (4 * blk), 4, 64);
}
// Whole rows narrower than this (row-split path) prefetch the chunk after next row by row (whole spans in address
// order) instead of one line of each row of the next chunk per strip: bitnet-2b.down (640-byte
// rows), DRAM-resident, interleaved A/B, dense / s = 0.5 / s = 0.6125: 439-457 / 285-288 /
// 228-248 us -> 321-371 / 249-277 / 187-223 us; at 1024-byte rows the two are even, at
// 2752-byte rows row-major is 1.7x slower. On AVX2 (block_avx2_m1) strip-major wins at every width:
// AMD Zen 3, 2 threads, DRAM-resident, 7-9 interleaved rounds, row-major time / strip-major time,
// median: 64-byte rows 1.45-1.58, 256 B 1.14, 512 B 0.97-1.18, 640 B 1.00, 1408 B 0.93-1.12.
constexpr int64_t kRowMajorBelow = 1024;

// Quads decoded at once into scratch by the batch (M > 1) kernels before every batch row consumes them.
constexpr int64_t kChunkQuads = 8;
// The AVX-512 VNNI batch kernel (strip_avx512, M >= kTiledMinRows: strip_tiled) decodes this many
// quads of a strip at once (64 KB of codes), then runs register tiles of batch rows over them.
// Against the one-row-at-a-time kernel below it (AMD EPYC Zen 4, 2 threads, bf16, dense
// activations, weights rotated past the LLC, 4 alternating processes, time ratio median [min, max]):
// 2048 x 5632 M=2 0.69-0.79, M=4 0.87-0.97, M=8 1.02-1.09, M=16 1.16, M=64 1.27, M=128 1.31
// [0.85, 1.57]; 5632 x 2048 M=16 1.15 [1.01, 1.26], M=128 1.34 [1.17, 1.47].
constexpr int64_t kTiledChunkQuads = 64;
constexpr int64_t kTiledMinRows = 8;
// Whether a batch of M rows on the union plan runs strip_tiled (AVX-512 with VNNI).
inline bool runs_tiled(bool vnni, int64_t M) { return vnni && M >= kTiledMinRows; }

// ---- prefetching, shared by the vector kernels (_mm_prefetch is baseline x86-64) ----

// Plan rows are arbitrary (the kept features), so the hardware prefetchers cannot guess the next
// row: a kernel prefetches the strip of the quad this many quads ahead (64 rows in flight).
constexpr int64_t kPrefetchQuads = 16;
// A strip reads one line of each plan row, and the next line of the same row is only read a whole
// pass over the other rows later: DRAM would see isolated lines. So the first strip of every
// group of lines also prefetches the next group - 1 lines of each row into L2, where they wait
// for the next strips, and DRAM sees runs of group adjacent lines per row. group is as large as
// keeps the waiting lines within kL2BudgetLines (768 KB; L2 is 1-2 MB per core on AVX-512 parts),
// at most kMaxGroup. Measured on 4096 x 11008, AVX-512, 1 thread, DRAM-resident weights:
// dense 1.28 -> 0.95 ms, s = 0.6125 0.50 -> 0.36 ms.
constexpr int64_t kL2BudgetLines = 12288;
constexpr int64_t kMaxGroup = 8;

struct Prefetch {
  int64_t ahead;  // extra lines of each row to bring into L2 at this strip (0 or group - 1)
  bool split;     // a row's strip may span two lines (the row stride or the strip start is not line aligned)
  int64_t width;  // strip width in bytes
};

inline Prefetch strip_prefetch(const RowPlan& p, int64_t b0, int64_t width) {
  const int64_t rows = std::max<int64_t>(1, 4 * p.n_quads);
  const int64_t group = std::clamp<int64_t>(1 + kL2BudgetLines / rows, 1, kMaxGroup);
  const bool split =
      (p.stride % 64) != 0 || (reinterpret_cast<uintptr_t>(p.packed + b0) % 64) + static_cast<uintptr_t>(width) > 64;
  return {b0 % (64 * group) == 0 ? group - 1 : 0, split, width};
}

inline __attribute__((always_inline)) void prefetch_quad(const RowPlan& p, int64_t q, int64_t b0, const Prefetch& pf) {
  if (q >= p.n_quads) return;
  for (int r = 0; r < 4; ++r) {
    const char* a = reinterpret_cast<const char*>(p.packed + static_cast<int64_t>(p.rows[4 * q + r]) * p.stride + b0);
    _mm_prefetch(a, _MM_HINT_T0);
    if (pf.split) _mm_prefetch(a + pf.width - 1, _MM_HINT_T0);
    for (int64_t l = 1; l <= pf.ahead && b0 + 64 * l < p.cols; ++l) _mm_prefetch(a + 64 * l, _MM_HINT_T1);
  }
}

// int32 words of per-thread scratch a strip kernel of width `strip` needs for M batch rows.
inline int64_t strip_scratch_words(int64_t strip, int64_t M) {
  // decoded codes of a chunk (1 byte per output per row -> strip * 4 outputs * 4 rows / 4 B per word)
  // + one permuted int32 accumulator block per batch row, + 16 words of slack for 64 B alignment.
  return std::max(kChunkQuads, kTiledChunkQuads) * strip * 4 + M * strip * 4 + 16;
}

// Each writes code_dot (see above) for packed bytes [b0, b0 + nbytes) of every batch row m to
// acc + m * ld + (j - 4 * b0), in natural output order.
//   strip_avx512: 1 <= nbytes <= 64 (a short last strip uses masked loads); vnni selects vpdpbusd
//                 (else pmaddubsw + pmaddwd). Needs isa() == Avx512 (and has_avx512_vnni() for vnni).
//   strip_avx2:   nbytes == 16 exactly (the caller overlaps the last strip instead). Needs Avx2.
//   strip_scalar: 1 <= nbytes <= 64. Portable.
// scratch: strip_scratch_words(width, M) int32 words, private to the calling thread.
void strip_avx512(const RowPlan& plan, int64_t b0, int64_t nbytes, bool vnni, int32_t* acc, int64_t ld,
                  int32_t* scratch);
// block_avx512_m1: plan.M == 1, 1 <= nbytes <= kMaxBlockAvx512; the same code_dot as strip_avx512 for
// packed bytes [b0, b0 + nbytes), rows read as runs of nbytes contiguous bytes (better for DRAM).
// row_major_prefetch: prefetch the chunk after next row by row (whole rows: the row-split path,
// kRowMajorBelow) instead of one line of each next-chunk row per strip.
void block_avx512_m1(const RowPlan& plan, int64_t b0, int64_t nbytes, bool vnni, int32_t* acc,
                     int64_t chunk_quads = kBlockRowQuads, bool row_major_prefetch = false);
// ---- AMX-INT8 (csrc/cpu/ternary_amx.cpp): batch rows in blocks of 16, one strip at a time ----

// K-blocks (16 quads = 64 plan rows each) decoded per chunk: kAmxChunkBlocks x 16 KB of B tiles
// per strip.
constexpr int64_t kAmxChunkBlocks = 4;
// Strips per block of tiles_amx (rows read as runs of up to 64 x this many bytes). Measured
// 2026-12-03 against one strip at a time with the group prefetch into L2 (Intel Xeon AMX, 2
// threads, weights rotated past the LLC, 7 interleaved rounds in one process, time ratio median
// [min, max]), 2048 x 5632 / 5632 x 2048: M = 8 2 strips 0.93 [0.79, 1.19] / 0.85 [0.79, 0.86],
// 4 strips 0.90 / 0.83; M = 16 2 strips 0.93 / 0.80, 4 strips 0.94 / 0.83; M = 64 2 strips
// 1.00 / 0.91, 4 strips 1.04 / 1.01; one strip with only this prefetch 1.20-1.26 at 2048 x 5632.
// With the weight in the LLC, 2 strips are 0.97-1.11.
constexpr int64_t kAmxBlockStrips = 2;

struct AmxOperands {
  // plan.n_quads a multiple of 16 (padding quads repeat a valid row; their activations are 0).
  RowPlan plan;
  // int8 activations [16 * ceil(M / 16), 4 * plan.n_quads], row stride lda bytes: x_q of batch row
  // m at plan row i (0 in padding rows and columns); the A tiles.
  const int8_t* xa;
  int64_t lda;
};
// Bytes of scratch tiles_amx needs for nmb batch row blocks (64 B alignment slack included).
int64_t amx_scratch_bytes(int64_t nmb);
// acc[m][j] = (x_q @ t^T)[m][j] exactly (t = code - 1: not code_dot, nothing to subtract), for
// batch rows [16 * mb0, 16 * (mb0 + nmb)) (padding rows included) and packed bytes
// [b0, b0 + nbytes), 1 <= nbytes <= kAmxBlockStrips * kStripAvx512, written to
// out + (m - 16 * mb0) * ld + (j - 4 * b0).
// Needs has_amx_int8(); loads its tile configuration and releases the tiles before returning.
void tiles_amx(const AmxOperands& o, int64_t mb0, int64_t nmb, int64_t b0, int64_t nbytes, int32_t* out, int64_t ld,
               int8_t* scratch);

void strip_avx2(const RowPlan& plan, int64_t b0, int64_t nbytes, int32_t* acc, int64_t ld, int32_t* scratch);
// block_avx2_m1: block_avx512_m1 on AVX2 (pairs of rows, int16 sums), 1 <= nbytes <= kMaxBlockAvx2,
// always with the strip-major prefetch (kRowMajorBelow).
void block_avx2_m1(const RowPlan& plan, int64_t b0, int64_t nbytes, int32_t* acc, int64_t chunk_quads);
void strip_scalar(const RowPlan& plan, int64_t b0, int64_t nbytes, int32_t* acc, int64_t ld);

}  // namespace qsk::cpu::ternary
