// SPEC 3: sparse_linear(x, weight, k, bias) = linear(topk_sparsify(x, k), weight, bias) on the CPU.
//
// Small batches with a column-major weight (weight.stride(0) == 1) take the sparse path: select
// each row's k features, group the rows in blocks of <= 16 that share the union of their kept
// features, and stream only those weight rows (sparse_gemv.h), parallel over output columns.
// On AVX2 (and fp32 on Zen 4) larger batches take the row-sparse GEMM, each row multiplying only
// its own kept features (sparse_gemm_rows_avx2.cpp, row_gemm_wins), and bf16 batches on AMX the batched
// kernel (sparse_gemm_bf16.cpp); with AVX512-BF16 but no AMX the blocks take vdpbf16ps panels.
// Larger batches, or other weight layouts, take the dense path: the top-K-masked activations
// through at::linear (oneDNN / BLAS), so a sparse layer is never much slower than a dense one;
// except a row-major weight at k = d and M <= 2 or 4 (a dense head): dense_gemv.cpp.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

#include "qsk/checks.h"
#include "qsk/cpu_common.h"
#include "qsk/cpu_select.h"
#include "qsk/isa.h"
#include "dense_gemv.h"
#include "fused_linear.h"
#include "sparse_gemv.h"

#define QSK_DISPATCH_HALF_FLOAT(type, name, ...)                                   \
  AT_DISPATCH_SWITCH(type, name, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace qsk::cpu {

// Batch rows up to which the sparse path runs; above it the dense path (at::linear on the
// top-K-masked activations). Measured at 4096 -> 11008, sparsity 0.5, 1 thread (thread CPU time,
// the 2-core machine being shared), sparse path forced at every M vs the dense path:
//   bf16  M = 1: 0.33x, 2: 0.61x, 4: 0.89x, 6: 1.01x, 8: 1.31x, 16: 1.69x (sparse / dense time)
//   fp32  M = 1: 0.47x, 2: 0.37x, 4: 0.29x, 8: 0.50x, 16: 0.75x, 32: 1.03x (torch's fp32 GEMM is
//         slow at 2 <= M <= 16 here)
// bf16 crosses at M ~ 6 and fp32 at M ~ 32, hence 4 and 16. Since blocks of up to 16 rows share
// one pass over the weight (sparse_gemv.h, kMaxBlockRows), bf16 takes the sparse path up to 12
// rows where the CPU has AMX-BF16: against the batched AMX kernel (F.linear time / time) 0.63-0.92x
// vs 0.54-0.68x at 9 rows, 0.63-0.88x vs 0.55-0.72x at 12, even at 13-14, and 0.46-0.67x vs
// 0.56-0.81x at 16, where the 16 x 2 FMAs per weight element cost more than AMX's tiles
// (2026-12-03, Sapphire Rapids, both threads, s = 0.5, TinyLlama's 2048 -> 2048 / 5632 and
// 5632 -> 2048, DRAM-resident, interleaved). With AVX512-BF16 but no AMX (Zen 4), the blocks of
// 2 or more rows take the vdpbf16ps panels (bf16_dp_panels), up to 16 rows: see there. With 16 for fp32, `python -m
// qsparse_kernels.bench --shapes llama2-7b.up --batches 4 8 16 64 --sparsities 0.5 --dtypes fp32`
// gives vs dense F.linear: M=8 1.95x, M=16 1.22x (both 0.65-0.7x through the dense path before).
// Re-measured for fp32 on the 2-core Sapphire Rapids (both threads, s = 0.5, TinyLlama's 2048 ->
// 2560 / 2048 / 11264 and 5632 -> 2048, DRAM-resident, F.linear time on the row-major weight /
// time): sparse path M = 8: 1.33-1.62, 12: 1.09-1.44, 16: 0.70-0.76; dense path 0.77-0.95,
// 0.83-1.15, 0.64-0.70. Both lose at 16, where MKL's row-major kernel is at its best; the sparse
// path still loses less, so 16 stays.
// fp16 depends on torch's fp16 GEMM, which is fast only where the CPU has AVX512-FP16 and torch
// runs oneDNN (torch.backends.mkldnn enabled, the default). An earlier stop (2026-11-29; the CPU
// is not on record, and Zen 4 has no AVX512-FP16) measured torch's fp16 GEMM on the column-major
// weight at 3.1 s for 4096 -> 11008, M = 8 (~100x the row-major one), and the sparse path faster
// than F.linear at every M (s = 0 / 0.5: M = 8 2.2x / 2.4x, M = 64 2.8x / 3.0x), so without them
// fp16 never takes the dense path. On this AVX512-FP16 machine with torch 2.14 the same GEMM
// takes 16 ms (row-major: 12 ms). With AVX512-FP16
// (Sapphire Rapids, torch 2.14, both threads, s = 0.5, TinyLlama's 2048 -> 2560 / 2048 / 11264 and
// 5632 -> 2048 with DRAM-resident weights, F.linear time on the row-major weight / time):
//   sparse path  M = 4: 1.71-1.91, 8: 1.06-1.22, 12: 0.89-1.02, 16: 0.81-0.90, 32: 0.67-0.75
//   dense path   M = 4: 0.74-0.82, 8: 0.73-0.83, 12: 0.75-0.84, 16: 0.77-0.82, 32: 0.82-0.88
// (at M = 64 / 128 the sparse path was 0.50x / 0.51x of F.linear on 2560 -> 6912), hence 16.
// bf16 likewise depends on torch's bf16 GEMM, which has native kernels only where the CPU has
// AVX512-BF16 (or AMX). On an AVX2-only Zen 3 (2026-12-03, torch 2.14, both threads, s = 0.5,
// TinyLlama's 2048 -> 5632 and 5632 -> 2048, DRAM-resident) F.linear in bf16 and fp16 costs
// ~1.1 ms per row at every M (a GEMV per row), the GEMM on the column-major weight 0.01-0.04x of
// that, and the sparse path (AVX2 GEMV, blocks of 16 rows) is 1.9-3.7x faster than F.linear from
// M = 1 to 512 in both dtypes; so without those kernels bf16 never takes the dense path either.
// fp32 there (MKL): sparse path at M = 16 1.02-3.48x, at 32 0.82-1.79x vs the dense path's
// 0.92-2.28x, so 16 holds there too.
// Re-measure with `benchmarks/bench_cpu_sparse_batch.py` after changing the kernels. The one
// place that decides it.
// (torch_fp16_gemm_fast, torch_bf16_gemm_fast: dense_gemv.h.)
int64_t sparse_max_rows(at::ScalarType dtype) {
  constexpr int64_t kAlways = std::numeric_limits<int64_t>::max();
  if (dtype == at::kHalf) return torch_fp16_gemm_fast() ? 16 : kAlways;
  if (dtype == at::kBFloat16)
    return !torch_bf16_gemm_fast() ? kAlways : has_amx_bf16() ? 12 : has_avx512_bf16() ? 16 : 8;
  return 16;
}

// bf16 blocks of two or more rows take the vdpbf16ps panels (sparse_gemv_avx512bf16.cpp) where the
// CPU has AVX512-BF16 but no AMX-BF16: half the instructions of the float32 FMA panels. Measured on
// an AMD EPYC Zen 4 (2026-12-04, 2 threads, torch 2.14, s = 0.5, TinyLlama's 2048 -> 5632 /
// 2048 and 5632 -> 2048, DRAM-resident, 2 x 5 interleaved rounds, F.linear time / time, the
// float32 panels -> these): M = 2 1.77-2.37 -> 1.77-2.25, 4 1.38-1.77 -> 1.49-1.95,
// 8 0.76-1.01 -> 1.01-1.37, 12 0.69-0.82 -> 0.94-1.31, 16 0.57-0.63 -> 0.83-1.01 (the AVX512-BF16
// batched kernel that ran from 9 rows before: 0.66-0.72 at 16). Above 16 rows at::linear on the
// masked activations (0.73-0.95 against the row-major F.linear: oneDNN's bf16 GEMM is slower on
// the column-major weight) beats both: the panels reached 0.62-0.78 at 32 rows.
bool bf16_dp_panels(int64_t M) {
  return M >= 2 && M <= sparse_max_rows(at::kBFloat16) && has_avx512_bf16() && !has_amx_bf16();
}

// bf16 rows above sparse_max_rows take the batched kernel (sparse_gemm_bf16.cpp) up to this many
// rows, where the CPU has AMX-BF16; above it at::linear on the masked activations.
// Measured on the 2-core Sapphire Rapids (both threads, sparsity 0.5, TinyLlama's q, k, gate,
// down and head shapes summed, median of 3 x 7 calls, time / F.linear on the row-major weight;
// `python benchmarks/bench_cpu_sparse_batch.py` measures the kernel alone):
//   M =  8: AMX 1.67, at::linear on the column-major weight 2.26
//   M = 16: AMX 1.52, 1.68;   M = 32: AMX 1.43, 1.11;   M = 64: AMX 1.00, 0.85
// so AMX up to 16 rows. Neither reaches torch's own GEMM on its row-major weight below ~48 rows
// here: the batched kernel packs each weight block and then multiplies it, one after the other
// per thread (see sparse_gemm_bf16.cpp).
constexpr int64_t kBf16BatchMaxRows = 16;

// The largest batch for which a column-major weight runs the library's kernels (above it torch's
// GEMM on the masked activations, except where row_gemm_wins).
int64_t sparse_kernel_max_rows(at::ScalarType dtype) {
  if (dtype == at::kBFloat16 && has_amx_bf16()) return kBf16BatchMaxRows;
  return sparse_max_rows(dtype);
}

// Batches on a column-major weight take the row-sparse GEMM (sparse_gemm_rows_avx2.cpp) where this
// says so, instead of the GEMV blocks or torch's GEMM on the masked activations. That kernel does
// k / d of a dense GEMM's FMAs, but at one weight load per FMA (a GEMM's register tile reuses each
// load across rows, and the GEMV blocks multiply the union of 16 rows' kept features, about all of
// them), so it wins while k / d stays below its rate relative to the other path's. Measured on an
// AVX2-only AMD EPYC (Zen 3), 2 threads, TinyLlama's 2048 -> 5632 / 5632 -> 2048, s = 0.5,
// DRAM-resident, 5 interleaved rounds, F.linear time / time, median, the previous path -> this
// kernel (benchmarks/bench_cpu_sparse_batch.py, the two builds run back to back, 2026-12-04):
//   fp32 (previously MKL on the masked activations): M = 32 1.12 / 0.85 -> 1.55 / 1.21,
//        64 1.09 / 1.00 -> 1.47 / 1.13, 128 1.04 / 0.96 -> 1.37 / 0.99; other runs at 128 rows
//        gave 0.96-1.39, and at 192 / 256 / 384 / 512 rows 1.02-1.25 / 0.96-1.04 / 0.91-1.18 /
//        0.76-1.15, where MKL (on its row-major tiles) is at its best;
//   bf16 (previously the GEMV blocks): M = 16 the blocks' 2.77-3.27 either way (this kernel alone,
//        another run: 1.91-3.17), 32 4.23 / 4.01 -> 4.31 / 4.11, 64 4.51 / 3.60 -> 6.15 / 5.55,
//        128 4.68 / 3.83 -> 7.39 / 6.99, 512 4.48 / 3.76 -> 8.61 / 7.13;
//   fp16: M = 16 (this kernel alone, another run) 1.92-1.95 against the blocks' 2.56-3.08,
//        32 3.44 / 3.15 -> 4.09 / 4.13, 128 3.74 / 2.97 -> 6.18 / 4.78, 512 3.22 / 2.82 -> 6.48 / 3.74.
// Hence fp32 from 17 rows up to 64 for k <= 0.7 d and up to 128 for k <= 0.55 d (Q-Sparse's s = 0.5
// is k = d / 2), half types from 32 rows for k <= 0.7 d.
// fp32 takes it on AVX-512 CPUs too where 512-bit FMAs run at the 256-bit rate (Zen 4,
// cpu_fma512_at_256_bit_rate): MKL's AVX-512 GEMM then does no more FMAs per cycle than this AVX2
// kernel. Measured there (AMD EPYC Zen 4, 2026-12-04, same shapes and method, 2 x 5 rounds, MKL on
// the masked activations -> this kernel): M = 32 1.04 / 0.86 -> 1.40-1.47 / 1.26-1.40, 64 0.91-1.05
// / 0.86-0.89 -> 1.64 / 1.20-1.33, 128 0.99-1.01 / 0.92-0.95 -> 1.85-2.02 / 1.13-1.26 (512 rows:
// 0.92-1.01 / 0.99-1.01 -> 1.24-1.33 / 0.84-1.05, outside the rule, as on Zen 3). bf16 there fell
// to 0.37-0.62 against oneDNN's vdpbf16ps GEMM (twice the multiply-adds per instruction): bf16
// keeps its paths on AVX-512, and other AVX-512 CPUs (two 512-bit FMA ports on Intel) keep MKL.
// fp16 there has no fast torch GEMM (no AVX512-FP16) and ran the GEMV blocks at every M; this
// kernel beats them from 32 rows (Zen 4, 2026-12-04, 2 threads, s = 0.5, DRAM-resident, 4
// alternating processes, blocks time / this kernel's, median [min, max]): 2048 -> 5632 M = 32 1.33
// [0.92, 1.60], 64 1.73, 128 1.81, 512 1.41; 5632 -> 2048 M = 32 1.76, 128 1.62, 512 1.12 [1.00, 1.44].
constexpr int64_t kRowGemmMinHalfRows = 32;
bool row_gemm_wins(at::ScalarType dtype, int64_t M, int64_t d, int64_t k) {
  const bool on_zen4 = isa() == Isa::Avx512 && cpu_fma512_at_256_bit_rate() &&
                       (dtype == at::kFloat || (dtype == at::kHalf && !torch_fp16_gemm_fast()));
  if ((isa() != Isa::Avx2 && !on_zen4) || k <= 0 || 10 * k > 7 * d) return false;
  if (dtype != at::kFloat) return M >= kRowGemmMinHalfRows;
  if (M <= sparse_max_rows(dtype)) return false;
  return M <= 64 || (M <= 128 && 20 * k <= 11 * d);
}

namespace {

// The batched kernel's dot products (vdpbf16ps, AMX's tdpbf16ps) treat subnormal inputs as zero
// and flush subnormal results, whatever MXCSR says, where the float32 FMA paths and torch's GEMM
// keep them. So it runs only on activations without subnormals, and its result is kept only when
// the flushes cannot show in it: per output and kept feature they change the float32 sum by less
// than FLT_MIN * (max|x| + 3) (a weight read as 0, a product or a partial sum flushed), so the
// result is kept when its Frobenius norm is 2^12 x above that bound summed over every output.
// Real activations and weights never come near; the fuzz tests' tiny inputs do.
struct Bf16Range {
  float max_abs = 0.0f;  // NaN when a NaN is present
  bool subnormal = false;
};

Bf16Range bf16_range(const c10::BFloat16* x, int64_t n) {
  uint32_t top = 0;  // the largest magnitude key (NaN above Inf, so a NaN gives a NaN max_abs)
  bool subnormal = false;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = mag_key(to_f32(x[i]));
    top = std::max(top, key);
    subnormal |= key != 0 && key < 0x00800000u;  // below FLT_MIN, not zero
  }
  return {key_to_float(top), subnormal};
}

bool flushes_invisible(const c10::BFloat16* y, int64_t M, int64_t N, int64_t k, float x_max) {
  const double per_output = static_cast<double>(k) * std::numeric_limits<float>::min() * (double{x_max} + 3.0);
  const double bound = 4096.0 * per_output * std::sqrt(static_cast<double>(M * N));
  // Inf / NaN outputs (or activations): flushing cannot matter, and !(a < b) keeps them. One
  // output at or above the bound decides it (the norm is at least that), which real data reaches
  // at the first output; only tiny results take the whole sum.
  if (!(bound > 0.0)) return true;
  double ss = 0.0;
  for (int64_t i = 0; i < M * N; ++i) {
    const double v = static_cast<float>(y[i]);
    if (!(std::fabs(v) < bound)) return true;
    ss += v * v;
  }
  return !(std::sqrt(ss) < bound);
}

// bf16 -> float by shifting (vectorises in the portable kernel); the others as c10 converts them.
inline __attribute__((always_inline)) float widen(float v) { return v; }
inline __attribute__((always_inline)) float widen(c10::Half v) { return static_cast<float>(v); }
inline __attribute__((always_inline)) float widen(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Portable panel (CPUs without AVX2): same contract as the vector ones.
template <typename T>
void panel_portable(const T* wt, int64_t ld, const SparseRows& r, int64_t j0, int64_t ncols, float* out, int64_t os) {
  for (int m = 0; m < r.mb; ++m) std::memset(out + m * os, 0, ncols * sizeof(float));
  for (int64_t u = 0; u < r.n; ++u) {
    const T* row = wt + static_cast<int64_t>(r.idx[u]) * ld + j0;
    for (int m = 0; m < r.mb; ++m) {
      const float xv = r.vals[u * r.mb + m];
      float* acc = out + m * os;
      for (int64_t j = 0; j < ncols; ++j) acc[j] += xv * widen(row[j]);
    }
  }
}

template <typename T>
void gemv_panel(Isa level, const T* wt, int64_t ld, const SparseRows& r, int64_t j0, int64_t ncols, float* out,
                int64_t os) {
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    if (r.pairs) return sparse_gemv_panel_avx512bf16(wt, ld, r, j0, ncols, out, os);
  if (level == Isa::Avx512) return sparse_gemv_panel_avx512(wt, ld, r, j0, ncols, out, os);
  if (level == Isa::Avx2) return sparse_gemv_panel_avx2(wt, ld, r, j0, ncols, out, os);
  panel_portable(wt, ld, r, j0, ncols, out, os);
}

// One block of rows and the weight rows it reads (see SparseRows).
struct Block {
  int64_t row0;
  int mb;
  std::vector<int32_t> idx;
  std::vector<float> vals;
  std::vector<uint32_t> pairs;  // for the vdpbf16ps panels (build_pair_blocks), else empty
  SparseRows rows() const {
    return {idx.data(), vals.data(), static_cast<int64_t>(idx.size()), mb, pairs.empty() ? nullptr : pairs.data()};
  }
};

// ceil(M / kMaxBlockRows) blocks of near-equal size over rows 0 .. M (row0 and mb set, no lists).
std::vector<Block> split_rows(int64_t M) {
  const int64_t nblocks = (M + kMaxBlockRows - 1) / kMaxBlockRows;
  std::vector<Block> blocks(nblocks);
  for (int64_t b = 0, row0 = 0; b < nblocks; ++b) {
    blocks[b].row0 = row0;
    blocks[b].mb = static_cast<int>((M - row0) / (nblocks - b));
    row0 += blocks[b].mb;
  }
  return blocks;
}

// The blocks of build_blocks for the vdpbf16ps panels, M >= 2 (so every block has >= 2 rows): idx
// and pairs (SparseRows::pairs, built straight from the bf16 activations), no vals. Sets x_max to
// the largest kept |activation| (NaN if one is NaN); returns false if a kept activation is
// subnormal (vdpbf16ps would read it as 0: the caller takes the float32 panels).
bool build_pair_blocks(const c10::BFloat16* x, int64_t M, int64_t d, int64_t k, const int32_t* kept,
                       std::vector<Block>& blocks, float& x_max) {
  blocks = split_rows(M);
  std::vector<int32_t> pos;  // [d] a listed feature's place in the block's list, else -1
  uint32_t top = 0;          // the largest bf16 magnitude (NaN above Inf)
  for (Block& blk : blocks) {
    const int64_t mb = blk.mb;
    const int32_t* kr = kept + blk.row0 * k;
    const uint16_t* xr = reinterpret_cast<const uint16_t*>(x) + blk.row0 * d;
    pos.assign(static_cast<size_t>(d), -1);
    for (int64_t j = 0; j < mb * k; ++j) pos[kr[j]] = 0;
    for (int64_t i = 0; i < d; ++i)
      if (pos[i] >= 0) {  // listed
        pos[i] = static_cast<int32_t>(blk.idx.size());
        blk.idx.push_back(static_cast<int32_t>(i));
      }
    blk.pairs.assign(static_cast<size_t>((blk.idx.size() + 1) / 2 * mb), 0u);
    for (int64_t m = 0; m < mb; ++m)
      for (int64_t j = 0; j < k; ++j) {
        const int32_t i = kr[m * k + j];
        const uint32_t bits = xr[m * d + i], mag = bits & 0x7fffu, u = static_cast<uint32_t>(pos[i]);
        if (mag != 0 && mag < 0x0080u) return false;  // subnormal
        top = std::max(top, mag);
        blk.pairs[(u / 2) * mb + m] |= bits << (16 * (u % 2));
      }
  }
  x_max = key_to_float(top << 16);
  return true;
}

// Builds the blocks from each row's k kept features (select_rows): ceil(M / kMaxBlockRows) blocks of
// near-equal size.
template <typename T>
std::vector<Block> build_blocks(const T* x, int64_t M, int64_t d, int64_t k, const int32_t* kept) {
  std::vector<Block> blocks = split_rows(M);
  std::vector<float> dense;     // [d][mb] values of the block's rows, 0 where dropped
  std::vector<uint8_t> listed;  // [d] whether some row of the block kept feature i
  for (Block& blk : blocks) {
    const int mb = blk.mb;
    if (mb == 1) {  // a lone row reads exactly its own kept features
      const int32_t* kr = kept + blk.row0 * k;
      blk.idx.assign(kr, kr + k);
      blk.vals.resize(k);
      for (int64_t j = 0; j < k; ++j) blk.vals[j] = static_cast<float>(x[blk.row0 * d + kr[j]]);
      continue;
    }
    dense.assign(static_cast<size_t>(d * mb), 0.0f);
    listed.assign(static_cast<size_t>(d), 0);
    for (int m = 0; m < mb; ++m) {
      const int64_t r = blk.row0 + m;
      for (int64_t j = 0; j < k; ++j) {
        const int32_t i = kept[r * k + j];
        dense[i * mb + m] = static_cast<float>(x[r * d + i]);
        listed[i] = 1;
      }
    }
    for (int64_t i = 0; i < d; ++i) {
      if (!listed[i]) continue;
      blk.idx.push_back(static_cast<int32_t>(i));
      blk.vals.insert(blk.vals.end(), dense.begin() + i * mb, dense.begin() + (i + 1) * mb);
    }
  }
  return blocks;
}

// Output columns per parallel task: at most a panel, and a whole number of tasks per thread so
// that every thread streams the same share of the weight (at::parallel_for hands each thread one
// contiguous run of tasks).
inline int64_t span_cols(int64_t N) {
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t rounds = std::max<int64_t>(1, (N + threads * panel_cols(1) - 1) / (threads * panel_cols(1)));
  const int64_t tasks = threads * rounds;
  return std::max<int64_t>(32, ((N + tasks - 1) / tasks + 31) / 32 * 32);
}

// y[M, N] for a column-major weight: wt = weight's storage as [d][ld] rows, ld = weight.stride(1).
// With dp (bf16 only) the blocks of more than one row take the vdpbf16ps panels; then it returns
// false when their subnormal flushing could show (see Bf16Range): the caller runs it again
// without dp.
template <typename T>
bool sparse_path(const T* x, const T* wt, int64_t ld, const T* bias, T* y, int64_t M, int64_t d, int64_t N,
                 int64_t k, const int32_t* kept, Isa level, bool dp) {
  std::vector<Block> blocks;
  float x_max = 0.0f;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (dp && !build_pair_blocks(x, M, d, k, kept, blocks, x_max)) return false;
  }
  if (!dp) blocks = build_blocks(x, M, d, k, kept);
  const int64_t span = span_cols(N);
  const int64_t nspans = (N + span - 1) / span;
  int64_t span_bytes = 0;  // weight bytes one span reads over every block
  for (const Block& blk : blocks) span_bytes += static_cast<int64_t>(blk.idx.size()) * span * sizeof(T);
  const int64_t grain = std::max<int64_t>(1, kMinTaskBytes / std::max<int64_t>(1, span_bytes));
  at::parallel_for(0, nspans, grain, [&](int64_t s0, int64_t s1) {
    std::vector<float> acc(kMaxPanelFloats);  // [mb][panel_cols(mb)] accumulators, L1-resident
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t end = std::min(N, (s + 1) * span);
      // Every block over this span: the span's weight rows are re-read from cache, not DRAM.
      for (const Block& blk : blocks) {
        const SparseRows rows = blk.rows();
        const int64_t pc = panel_cols(blk.mb);
        for (int64_t j0 = s * span; j0 < end; j0 += pc) {
          const int64_t nc = std::min(pc, end - j0);
          gemv_panel(level, wt, ld, rows, j0, nc, acc.data(), pc);
          for (int m = 0; m < blk.mb; ++m) {
            T* yr = y + (blk.row0 + m) * N + j0;
            const float* ar = acc.data() + m * pc;
            for (int64_t j = 0; j < nc; ++j)
              yr[j] = static_cast<T>(bias ? ar[j] + static_cast<float>(bias[j0 + j]) : ar[j]);
          }
        }
      }
    }
  });
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    if (dp) return flushes_invisible(y, M, N, k, x_max);
  return true;
}

}  // namespace

at::Tensor sparse_linear_rows(const at::Tensor& x, const at::Tensor& weight, int64_t k,
                              const std::optional<at::Tensor>& bias, const int32_t* kept) {
  QSK_CHECK_DEVICE(weight, at::kCPU);
  QSK_CHECK_DTYPE(weight, x.scalar_type());
  QSK_CHECK_DIM(weight, 2);
  const int64_t M = x.size(0), d = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == d, "sparse_linear_kernel: weight.size(1) = ", weight.size(1), " must equal d = ", d);
  TORCH_CHECK(d <= INT32_MAX, "sparse_linear_kernel: d = ", d, " exceeds INT32_MAX");
  TORCH_CHECK(0 <= k && k <= d, "sparse_linear_kernel: k must be in [0, d = ", d, "], got ", k);
  TORCH_CHECK(weight.stride(0) >= 0 && weight.stride(1) >= 0, "sparse_linear_kernel: weight strides must be >= 0");
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.device().type() == at::kCPU, "sparse_linear_kernel: bias must be on CPU, got ", b.device());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "sparse_linear_kernel: bias must be ", x.scalar_type(), ", got ",
                b.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, "sparse_linear_kernel: bias must have shape [", N, "], got ",
                b.sizes());
  }
  // Column-major (or a single output): input feature i's outputs are the contiguous row
  // storage[i * stride(1) .. + N).
  if (k == 0) {  // nothing kept: bias or +0 (a GEMM on all-zero activations can give -0)
    return b.defined() ? b.unsqueeze(0).expand({M, N}).contiguous() : at::zeros({M, N}, x.options());
  }
  const bool colmajor = weight.stride(0) == 1 || N == 1;
  const bool bf16_batch = colmajor && x.scalar_type() == at::kBFloat16 && M > sparse_max_rows(at::kBFloat16) &&
                          M <= kBf16BatchMaxRows && has_amx_bf16() && M > 0 && N > 0;
  if (bf16_batch) {  // else (subnormals: see Bf16Range) at::linear below, as M > sparse_max_rows
    const Bf16Range range = bf16_range(x.data_ptr<c10::BFloat16>(), M * d);
    if (!range.subnormal) {
      auto y = at::empty({M, N}, x.options());
      sparse_linear_bf16_batch(x.data_ptr<c10::BFloat16>(), M, d, k, weight.data_ptr<c10::BFloat16>(),
                               weight.stride(1), b.defined() ? b.data_ptr<c10::BFloat16>() : nullptr,
                               y.data_ptr<c10::BFloat16>(), N, kept);
      if (flushes_invisible(y.data_ptr<c10::BFloat16>(), M, N, k, range.max_abs)) return y;
    }
  }
  if (k == d && !colmajor && weight.stride(1) == 1 && M <= row_gemv_max_rows(x.scalar_type()) && M > 0) {  // a head
    auto y = at::empty({M, N}, x.options());
    QSK_DISPATCH_HALF_FLOAT(x.scalar_type(), "dense_gemv_rowmajor", [&] {
      dense_gemv_rowmajor<scalar_t>(x.data_ptr<scalar_t>(), M, d, weight.data_ptr<scalar_t>(), weight.stride(0),
                                    b.defined() ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), N);
    });
    return y;
  }
  const bool row_gemm = colmajor && row_gemm_wins(x.scalar_type(), M, d, k);
  if (!colmajor || (M > sparse_max_rows(x.scalar_type()) && !row_gemm)) {
    const at::Tensor xs = k == d ? x : kept ? sparsify_kept(x, kept, k) : topk_sparsify_cpu(x, k);
    return at::linear(xs, weight, bias.has_value() ? std::optional<at::Tensor>(b) : std::nullopt);
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const bool dp = x.scalar_type() == at::kBFloat16 && bf16_dp_panels(M);
  std::vector<int32_t> own;  // the selection, when the caller has none
  if (kept == nullptr) {
    own = select_rows(x, k);
    kept = own.data();
  }
  QSK_DISPATCH_HALF_FLOAT(x.scalar_type(), "sparse_linear_cpu", [&] {
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    if (row_gemm)
      sparse_gemm_rows_avx2<scalar_t>(x.data_ptr<scalar_t>(), M, d, k, kept, weight.data_ptr<scalar_t>(),
                                      weight.stride(1), bp, y.data_ptr<scalar_t>(), N);
    else if (!sparse_path<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), weight.stride(1), bp,
                                    y.data_ptr<scalar_t>(), M, d, N, k, kept, isa(), dp))
      sparse_path<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), weight.stride(1), bp,
                            y.data_ptr<scalar_t>(), M, d, N, k, kept, isa(), false);
  });
  return y;
}

namespace {

at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t k,
                             const std::optional<at::Tensor>& bias) {
  QSK_CHECK_DEVICE(x, at::kCPU);
  QSK_CHECK_FLOAT(x);
  return unrows(sparse_linear_rows(as_rows(x, "sparse_linear_kernel"), weight, k, bias, nullptr), x);
}

}  // namespace

template <typename T>
void sparse_gemv_panel(Isa level, const T* wt, int64_t ld, const SparseRows& rows, int64_t j0, int64_t ncols,
                       float* out, int64_t out_stride) {
  gemv_panel(level, wt, ld, rows, j0, ncols, out, out_stride);
}
template void sparse_gemv_panel<float>(Isa, const float*, int64_t, const SparseRows&, int64_t, int64_t, float*, int64_t);
template void sparse_gemv_panel<c10::BFloat16>(Isa, const c10::BFloat16*, int64_t, const SparseRows&, int64_t, int64_t,
                                               float*, int64_t);
template void sparse_gemv_panel<c10::Half>(Isa, const c10::Half*, int64_t, const SparseRows&, int64_t, int64_t, float*,
                                           int64_t);
}  // namespace qsk::cpu

TORCH_LIBRARY_IMPL(qsparse, CPU, m) { m.impl("sparse_linear_kernel", &qsk::cpu::sparse_linear_cpu); }
