// SPEC 7 on the CPU: ternary_linear_kernel = optional per-row top-K, int8 absmax quantization of
// the kept entries, and the exact int32 ternary GEMV over only the kept rows of the canonical
// packed weight, then the float32 epilogue; one native call.
//
//   1. per batch row m: the kept indices (select_topk, qsk/cpu_select.h; all of them when k is
//      None or d), the absmax of the kept entries, x_q[m] (int8 [d], 0 where dropped), x_scale[m],
//      sum(x_q[m]);
//   2. the row plan (qsk/cpu_ternary.h): the packed rows with a nonzero x_q in some batch row
//      (for M > 1 the union of the rows' kept sets; a row's x_q is 0 where it dropped a feature),
//      in quads, and each quad's 4 activations per batch row packed in a dword;
//   3. in parallel over strips of output columns (at::parallel_for; for M == 1 on AVX-512 / AVX2 over
//      parts of the rows instead, row_split_m1, each thread reading whole rows; for batches of
//      kAmxMinM rows and more on CPUs with AMX-INT8 the tile kernel, batch_amx): the strip kernel
//      of the ISA gives sum_i x_q * code, minus sum(x_q) turns codes (t + 1) back into t, then
//      y = acc * x_scale * scale (+ bias) in float32, NaN in rows whose x_scale is not finite,
//      cast to x.dtype: the same float operations in the same order as reference.ternary_epilogue.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "qsk/avx2_lanes.h"
#include "qsk/checks.h"
#include "qsk/cpu_common.h"
#include "qsk/cpu_select.h"
#include "qsk/cpu_ternary.h"
#include "qsk/isa.h"
#include "fused_linear.h"

// Dispatches over the three float dtypes the op accepts (the checks already rejected the rest).
#define QSK_TERNARY_DISPATCH(type, name, ...)                                      \
  AT_DISPATCH_SWITCH(type, name, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace qsk::cpu::ternary {

// Only the bytes of a row need to be contiguous: the kernels address row i at packed + i * stride.
int64_t packed_stride(const at::Tensor& packed) {
  return packed.size(1) <= 1 || packed.stride(1) == 1 ? packed.stride(0) : -1;
}

int64_t merge_max_bytes() {
  const Isa level = isa();
  return level == Isa::Avx512 ? kMaxBlockAvx512
                              : (level == Isa::Avx2 ? kMaxBlockAvx2 : std::numeric_limits<int64_t>::max());
}

// The end of the run of weights from packed[s0] on that are stored side by side: each continues
// the one before it in every row (column ranges of one buffer, in order), each is read in place and
// not empty, and the run is at most max_bytes wide; such a run is read as one wider weight. d > 1:
// with one row the stride says nothing, and nothing is gained.
static int64_t side_by_side_end(at::TensorList packed, int64_t s0, int64_t d, int64_t max_bytes) {
  const auto in_place = [&](const at::Tensor& p) {
    return p.device().is_cpu() && p.scalar_type() == at::kByte && p.dim() == 2 && p.size(1) > 0 &&
           packed_stride(p) >= 0;
  };
  const auto n = static_cast<int64_t>(packed.size());
  int64_t s1 = s0 + 1;
  if (d <= 1 || !in_place(packed[s0])) return s1;
  for (int64_t width = packed[s0].size(1); s1 < n && in_place(packed[s1]); ++s1) {
    const at::Tensor &a = packed[s1 - 1], &b = packed[s1];
    width += b.size(1);
    if (width > max_bytes || packed_stride(a) != packed_stride(b) ||
        a.data_ptr<uint8_t>() + a.size(1) != b.data_ptr<uint8_t>())
      break;
  }
  return s1;
}

namespace {

// Fewest plan quads per part of the row-split M == 1 path (fewer rows: fewer parts).
constexpr int64_t kMinPartQuads = 16;

// ---- 1. top-K + quantization of one batch row (SPEC 4 applied to topk_sparsify(x, k)) ----

struct RowQuant {
  float x_scale;
  int32_t sum;  // sum of the row's x_q
};

// Quantizes the entries kept[0..n) of x (every entry when kept is null) into xq, which is zero on
// entry. The absmax over the kept entries is the absmax of the sparsified row (dropped entries
// are 0); it is a max over magnitude keys, so NaN wins over Inf and propagates to x_scale.
template <typename T>
inline __attribute__((always_inline)) RowQuant quantize_kept(const T* x, int64_t d, const int32_t* kept, int64_t n,
                                                             int8_t* xq) {
  uint32_t key = 0;
  if (kept) {
    for (int64_t j = 0; j < n; ++j) key = std::max(key, mag_key(to_f32(x[kept[j]])));
  } else {
    key = absmax_key(x, d);
  }
  float a = key_to_float(key);
  a = a < 1e-5f ? 1e-5f : a;            // NaN stays NaN
  const float s = (1.0f / a) * 127.0f;  // as torch evaluates `127.0 / a` (quantize_act.cpp)
  int32_t sum = 0;
  if (kept) {
    for (int64_t j = 0; j < n; ++j) {
      const int8_t q = quantize_i8(to_f32(x[kept[j]]) * s);
      xq[kept[j]] = q;
      sum += q;
    }
  } else {
    for (int64_t i = 0; i < d; ++i) {
      const int8_t q = quantize_i8(to_f32(x[i]) * s);
      xq[i] = q;
      sum += q;
    }
  }
  return {a / 127.0f, sum};
}

// k < 0: dense (no top-K). idx: room for k entries; sel: select_scratch_words(d) words.
template <typename T>
inline __attribute__((always_inline)) RowQuant prepare_row(const T* x, int64_t d, int64_t k, int8_t* xq, int32_t* idx,
                                                            uint32_t* sel, Isa level) {
  if (k < 0 || k >= d) return quantize_kept(x, d, nullptr, d, xq);
  select_topk(x, d, k, idx, sel, level);
  return quantize_kept(x, d, idx, k, xq);
}

template <typename T>
QSK_TARGET_AVX512 RowQuant prepare_row_avx512(const T* x, int64_t d, int64_t k, int8_t* xq, int32_t* idx,
                                              uint32_t* sel) {
  return prepare_row(x, d, k, xq, idx, sel, Isa::Avx512);
}
// quantize_kept for AVX2, 8 entries per step, the same bytes. With kept entries (n >= 1) the absmax
// is the whole row's, since the largest magnitude is always kept (up to the payload of a NaN,
// which makes every output of the row NaN either way), and the dropped entries are masked out of a
// dense pass by `mask` (d bytes of scratch). Nothing kept: the scalar code (the empty set's scale).
template <typename T>
QSK_TARGET_AVX2 RowQuant quantize_kept_avx2(const T* x, int64_t d, const int32_t* kept, int64_t n, int8_t* xq,
                                            uint8_t* mask) {
  if (kept && n == 0) return quantize_kept(x, d, kept, n, xq);
  float a = key_to_float(absmax_key(x, d));
  a = a < 1e-5f ? 1e-5f : a;            // NaN stays NaN
  const float s = (1.0f / a) * 127.0f;  // as quantize_kept
  if (kept) {
    std::memset(mask, 0, static_cast<size_t>(d));
    for (int64_t j = 0; j < n; ++j) mask[kept[j]] = 0xff;
  }
  return {a / 127.0f, quantize_row8(x, d, s, xq, kept ? mask : nullptr)};
}

template <typename T>
QSK_TARGET_AVX2 RowQuant prepare_row_avx2(const T* x, int64_t d, int64_t k, int8_t* xq, int32_t* idx, uint32_t* sel) {
  if (k < 0 || k >= d) return quantize_kept_avx2(x, d, nullptr, d, xq, nullptr);
  select_topk(x, d, k, idx, sel, Isa::Avx2);
  return quantize_kept_avx2(x, d, idx, k, xq, reinterpret_cast<uint8_t*>(sel));  // sel is free again: 8 d bytes
}

// Every row's top-K + int8 quantization: xq [M][d] (zero where dropped), rq [M]. Independent of the
// weight, so sibling projections share it (ternary_linear_multi_rows).
struct Prepared {
  std::vector<int8_t> xq;
  std::vector<RowQuant> rq;
};

template <typename T>
Prepared prepare_rows(const T* xp, int64_t M, int64_t d, int64_t k, Isa level) {
  Prepared pre{std::vector<int8_t>(M * d, 0), std::vector<RowQuant>(M)};
  const bool select = k >= 0 && k < d;
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<uint32_t> sel(select ? select_scratch_words(d) : 0);
    std::vector<int32_t> idx(select ? std::max<int64_t>(k, 1) : 0);
    for (int64_t m = m0; m < m1; ++m) {
      const T* xm = xp + m * d;
      int8_t* qm = pre.xq.data() + m * d;
      if (level == Isa::Avx512)
        pre.rq[m] = prepare_row_avx512(xm, d, k, qm, idx.data(), sel.data());
      else if (level == Isa::Avx2)
        pre.rq[m] = prepare_row_avx2(xm, d, k, qm, idx.data(), sel.data());
      else
        pre.rq[m] = prepare_row(xm, d, k, qm, idx.data(), sel.data(), Isa::Scalar);
    }
  });
  return pre;
}

// ---- 3. epilogue of one strip: y = (acc * x_scale) * scale (+ bias), as reference.ternary_epilogue ----

// GCC contracts `a * b + c` into an FMA (one rounding) in C++ even under -std=c++20 whenever the
// target has FMA; PyTorch rounds the product and the sum separately. The empty asm makes the
// rounded product a value the compiler cannot look through, so the add stays a separate add.
inline __attribute__((always_inline)) float rounded(float v) {
  __asm__("" : "+x"(v));
  return v;
}

template <typename T>
inline __attribute__((always_inline)) void epilogue(const int32_t* code_dot, int64_t ld, const RowQuant* rq, float ws,
                                                     const T* bias, T* out, int64_t out_f, int64_t M, int64_t j0,
                                                     int64_t nj) {
  for (int64_t m = 0; m < M; ++m) {
    const int32_t* a = code_dot + m * ld;
    T* o = out + m * out_f + j0;
    const float xs = rq[m].x_scale;
    if (!std::isfinite(xs)) {  // a kept entry was NaN or +-Inf: the whole row is NaN (SPEC 7)
      std::fill(o, o + nj, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
      continue;
    }
    // code_dot - sum(x_q) = x_q @ t^T (t = code - 1), modulo 2^32 like the kernels' sums.
    const uint32_t sum = static_cast<uint32_t>(rq[m].sum);
    for (int64_t j = 0; j < nj; ++j) {
      const int32_t acc = static_cast<int32_t>(static_cast<uint32_t>(a[j]) - sum);
      float y = static_cast<float>(acc) * xs * ws;
      if (bias) y = rounded(y) + to_f32(bias[j0 + j]);
      o[j] = static_cast<T>(y);
    }
  }
}

template <typename T>
QSK_TARGET_AVX512 void epilogue_avx512(const int32_t* a, int64_t ld, const RowQuant* rq, float ws, const T* bias, T* out,
                                       int64_t out_f, int64_t M, int64_t j0, int64_t nj) {
  epilogue(a, ld, rq, ws, bias, out, out_f, M, j0, nj);
}
template <typename T>
QSK_TARGET_AVX2 void epilogue_avx2(const int32_t* a, int64_t ld, const RowQuant* rq, float ws, const T* bias, T* out,
                                   int64_t out_f, int64_t M, int64_t j0, int64_t nj) {
  epilogue(a, ld, rq, ws, bias, out, out_f, M, j0, nj);
}
// The epilogue compiled for the CPU's ISA level.
template <typename T>
void epilogue_at(Isa level, const int32_t* a, int64_t ld, const RowQuant* rq, float ws, const T* bias, T* out,
                 int64_t out_f, int64_t M, int64_t j0, int64_t nj) {
  if (level == Isa::Avx512)
    epilogue_avx512(a, ld, rq, ws, bias, out, out_f, M, j0, nj);
  else if (level == Isa::Avx2)
    epilogue_avx2(a, ld, rq, ws, bias, out, out_f, M, j0, nj);
  else
    epilogue(a, ld, rq, ws, bias, out, out_f, M, j0, nj);
}

// ---- 2. the row plan ----

// Crossover between the two ways to run a batch (M > 1) in which every row has its own kept set:
//   per-row: each batch row runs the M == 1 kernel over its own nonzero rows, all of them strip by
//            strip, so the weight lines a strip brings into L2 serve every batch row and DRAM
//            still reads each union row once; but every row decodes its quads again:
//            sum_m n_m quads x kRowQuadCost.
//   union:   the batch kernel decodes each quad of the union once, stores the codes, and every
//            batch row runs only its dot blocks: |union| quads x (kUnionQuadCost + M).
// Measured costs, in units of one dot block (16 vpdpbusd with their broadcast operand): a quad of
// the M == 1 kernel (decode in registers + 1 dot block) ~= 2; a quad of the union kernel ~= 3
// (decode + store of the codes + loop overhead) + 1 per batch row (its dot block reads the codes
// from L1). Fitted on 4096 x 11008, AVX-512 VNNI, 1 thread, DRAM-resident weights (median us,
// per-row vs union): dense M=2 1346 vs 1432, M=4 2306 vs 2014; s=0.5 M=4 1408 vs 1895, M=8 2457
// vs 3010; s=0.6125 M=2 555 vs 898, M=8 1977 vs 2786. So per-row wins for sparse batches up to
// M ~ 16 and the union for dense batches from M ~ 3-4. (Fitted with the one-strip M == 1 kernel;
// the block kernel since made per-row cheaper in DRAM, e.g. dense M=2 per-row 1022 us vs union
// ~1430, which only moves the crossover further towards per-row.) The one place that decides it.
constexpr int64_t kRowQuadCost = 2;
constexpr int64_t kUnionQuadCost = 3;
// On AVX2 the per-row kernel is block_avx2_m1 (row pairs, int16 sums), and a union quad costs
// more next to it: ~7. Measured 2026-12-04 (AMD EPYC Zen 3, AVX2 only, 2 threads, bf16, weights
// rotated past the LLC, 3 interleaved rounds, bf16 F.linear time / time, union vs per-row):
// 2048 x 5632 dense M=2 4.98 vs 6.96, M=4 6.14 vs 7.61, M=8 6.30 vs 5.74, M=16 9.12 vs 7.34;
// s=0.5 M=16 9.64 vs 14.43; s=0.6125 M=2 6.72 vs 11.56, M=16 9.88 vs 17.67; 5632 x 2048 dense
// M=2 3.27 vs 6.31, M=8 5.74 vs 5.38, M=16 6.37 vs 5.35; s=0.6125 M=16 7.91 vs 13.88.
constexpr int64_t kUnionQuadCostAvx2 = 7;
// With AVX512-VNNI from kTiledMinRows rows the union runs strip_tiled (register tiles of batch
// rows), where a batch row's dot block costs ~0.85 and the decode ~6 (the codes go through
// scratch in planes). Fitted 2026-12-04 (AMD EPYC Zen 4, 2 threads, bf16, weights rotated past
// the LLC, 4 interleaved processes, per-row time / union time, median [min, max]): 2048 x 5632
// dense M=2 0.71 [0.64, 0.77], M=4 0.83 [0.81, 0.95], M=8 1.11 [1.04, 1.16]; s=0.6125 M=16 0.63,
// M=32 0.78, M=64 0.87 [0.70, 1.26] (the previous union kernel: 0.69, 0.70); 5632 x 2048
// s=0.6125 M=16 0.74, M=64 0.86 [0.79, 1.03].
constexpr int64_t kTiledUnionQuadCost20 = 120;  // 20 x the decode's ~6
constexpr int64_t kTiledRowCost20 = 17;         // 20 x a batch row's ~0.85

// Also returns the union size in *n_union.
bool prefer_per_row(const int8_t* xq, int64_t M, int64_t d, Isa level, int64_t* n_union) {
  std::vector<uint8_t> any(d, 0);
  int64_t own = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < d; ++i) {
      const bool nz = xq[m * d + i] != 0;
      own += nz;
      any[i] |= nz;
    }
  int64_t uni = 0;
  for (int64_t i = 0; i < d; ++i) uni += any[i];
  *n_union = uni;
  if (level == Isa::Avx512 && runs_tiled(has_avx512_vnni(), M))
    return 20 * own * kRowQuadCost < uni * (kTiledUnionQuadCost20 + kTiledRowCost20 * M);
  return own * kRowQuadCost < uni * ((level == Isa::Avx2 ? kUnionQuadCostAvx2 : kUnionQuadCost) + M);
}

struct Plan {
  std::vector<int32_t> rows;  // 4 * n_quads
  std::vector<int32_t> x4;    // [M, n_quads]
  RowPlan view;
  int64_t m0 = 0;  // first batch row of the plan
};

// Rows with a nonzero x_q in at least one batch row, ascending, padded to whole quads (the padding
// repeats a valid row with activation 0). Skipping the other rows never changes the result.
// For M > 1 this is the union of the rows' kept sets; each row's x_q is 0 where it dropped a feature.
void build_plan(const int8_t* xq, int64_t M, int64_t d, const uint8_t* packed, int64_t cols, int64_t stride,
                Plan& plan) {
  auto& rows = plan.rows;
  rows.resize(d + 3);
  int64_t n = 0;
  if (M == 1) {
    // Branch-free compaction: the slot is kept only when x_q != 0.
    for (int64_t i = 0; i < d; ++i) {
      rows[n] = static_cast<int32_t>(i);
      n += xq[i] != 0;
    }
  } else {
    std::vector<uint8_t> any(d, 0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < d; ++i) any[i] |= xq[m * d + i] != 0;
    for (int64_t i = 0; i < d; ++i) {
      rows[n] = static_cast<int32_t>(i);
      n += any[i];
    }
  }
  const int64_t n_quads = (n + 3) / 4;
  for (int64_t i = n; i < 4 * n_quads; ++i) rows[i] = rows[0];  // n > 0 here, so rows[0] is valid
  rows.resize(4 * n_quads);
  // Byte r of dword q is the activation of plan row 4q + r (0 for padding): on a little-endian
  // CPU the dwords of batch row m are the bytes xm[rows[i]] in plan order, a byte gather (a copy
  // when every feature is a plan row). Building each dword from four shifted bytes took ~100 us
  // of a 16-row call at d = 5632, serially.
  auto& x4 = plan.x4;
  x4.assign(M * n_quads, 0);
  for (int64_t m = 0; m < M && n > 0; ++m) {  // n == 0: no plan rows, x4 is empty (and may be null)
    const int8_t* xm = xq + m * d;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    auto* dst = reinterpret_cast<int8_t*>(x4.data() + m * n_quads);  // char-type access: no aliasing issue
    if (n == d) {
      std::memcpy(dst, xm, d);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = xm[rows[i]];
    }
#else
    for (int64_t i = 0; i < n; ++i)
      x4[m * n_quads + i / 4] |= static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint8_t>(xm[rows[i]])) << (8 * (i % 4)));
#endif
  }
  plan.view = RowPlan{packed, cols, stride, rows.data(), n_quads, x4.data(), M};
}

enum class Path { Avx512, Avx2, Scalar };

// Batches of at least kAmxMinM rows run the AMX-INT8 kernel where the CPU has it (has_amx_int8),
// and of at least kAmxMinMPerRow rows where the VNNI batch would run per row (sparse batches,
// prefer_per_row): the tile kernel's cost is one 16-row block whatever M <= 16, the VNNI kernels'
// grows with M. Measured on 4096 x 11008, bf16, 1 thread, ratio to dense bf16 F.linear (a heavily
// shared 2-core Sapphire Rapids: noisy), AMX vs VNNI: dense M=4 2.09x vs 2.78x, M=8 2.26x vs
// 2.17x, M=16 2.27x vs 1.77x; s=0.6125 M=4 2.75x vs 5.06x, M=8 2.23x vs 2.47x, M=16 2.51x vs 2.14x.
constexpr int64_t kAmxMinM = 8;
constexpr int64_t kAmxMinMPerRow = 16;

// M > 1 with AMX-INT8: the union plan padded to whole K-blocks of 16 quads, the activations as
// A tiles, then tasks of (strip of 64 packed bytes, group of batch row blocks) in parallel; each
// task decodes its strip once per chunk for all its batch rows. epi(acc, ld, m0, m1, j0, nj)
// gets the exact x_q @ t^T of batch rows [m0, m1), outputs [j0, j0 + nj).
template <typename Epilogue>
void batch_amx(const RowPlan& plan, int64_t cols, const Epilogue& epi) {
  const int64_t M = plan.M, nq = (plan.n_quads + 15) / 16 * 16, lda = 4 * nq, Mb = (M + 15) / 16;
  std::vector<int32_t> rows(4 * nq, plan.n_quads > 0 ? plan.rows[0] : 0);
  std::copy(plan.rows, plan.rows + 4 * plan.n_quads, rows.begin());
  std::vector<int8_t> xa(16 * Mb * lda, 0);
  for (int64_t m = 0; m < M && plan.n_quads > 0; ++m)  // k = 0: no quads, plan.x4 may be null
    std::memcpy(xa.data() + m * lda, plan.x4 + m * plan.n_quads, 4 * plan.n_quads);
  AmxOperands o{plan, xa.data(), lda};
  o.plan.rows = rows.data();
  o.plan.n_quads = nq;
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  // Blocks of up to kAmxBlockStrips strips, at least T of them where the columns allow.
  const int64_t strips = (cols + kStripAvx512 - 1) / kStripAvx512;
  const int64_t bw = kStripAvx512 * std::clamp<int64_t>(strips / T, 1, kAmxBlockStrips);  // block bytes
  const int64_t blocks = (cols + bw - 1) / bw;
  // Few blocks: split the batch too (in pairs of row blocks, the tile kernel's unit), so every
  // thread has work; each extra group decodes the block again.
  const int64_t groups = std::clamp<int64_t>((2 * T + blocks - 1) / blocks, 1, (Mb + 1) / 2);
  const int64_t max_nmb = (Mb + groups - 1) / groups;
  at::parallel_for(0, blocks * groups, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> scratch(amx_scratch_bytes(max_nmb));
    std::vector<int32_t> acc(16 * max_nmb * 4 * bw);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t s = task / groups, g = task % groups;
      const int64_t mb0 = Mb * g / groups, mb1 = Mb * (g + 1) / groups;
      const int64_t b0 = s * bw, nb = std::min(bw, cols - b0);
      if (mb1 == mb0) continue;
      tiles_amx(o, mb0, mb1 - mb0, b0, nb, acc.data(), 4 * bw, scratch.data());
      epi(acc.data(), 4 * bw, 16 * mb0, std::min(M, 16 * mb1), 4 * b0, 4 * nb);
    }
  });
}

// M == 1 on AVX-512 (block_avx512_m1) and AVX2 (block_avx2_m1), split by rows: the plan's quads
// are cut into one part per thread, each thread reads its rows whole (runs of up to
// kMaxBlockAvx512 / kMaxBlockAvx2 contiguous bytes per row, and for
// dense activations one sequential stream) into its own int32 code_dot, then the parts are summed
// per column block (exact integers: the result does not depend on the split) and handed to
// epi(e, a, j0, nj) with a = code_dot of outputs [j0, j0 + nj) of output segment e.
// The read segments `segs` are packed weights that share the plan's rows and activations (sibling
// projections of one input, ternary_linear_multi_m1); each is read whole by every part, in one
// parallel region, and their outputs, in order, are those of the output segments, of out_cols[e]
// packed bytes each (the same total): a read segment may hold several output segments side by side.
template <typename Epilogue>
void row_split_m1(const RowPlan& plan, const Segment* segs, int64_t nseg, const std::vector<int64_t>& out_cols,
                  Isa level, const Epilogue& epi) {
  const bool vnni = has_avx512_vnni(), zen4 = cpu_fma512_at_256_bit_rate();
  const int64_t max_blk = level == Isa::Avx512 ? kMaxBlockAvx512 : kMaxBlockAvx2;
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  const int64_t parts = std::clamp<int64_t>(plan.n_quads / kMinPartQuads, 1, T);
  std::vector<int64_t> off(nseg + 1, 0);  // read segment s's outputs are [off[s], off[s + 1]) of a part
  for (int64_t s = 0; s < nseg; ++s) off[s + 1] = off[s] + 4 * segs[s].cols;
  const int64_t width = off[nseg];
  // Uninitialised: the block kernels write every output of their block (an empty part is zeroed).
  std::unique_ptr<int32_t[]> partial(new int32_t[std::max<int64_t>(1, parts * width)]);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part) {
      const int64_t q0 = plan.n_quads * part / parts, q1 = plan.n_quads * (part + 1) / parts;
      if (q1 == q0) {
        std::fill(partial.get() + part * width, partial.get() + (part + 1) * width, 0);
        continue;
      }
      for (int64_t s = 0; s < nseg; ++s) {
        const int64_t cols = segs[s].cols;
        RowPlan sub = plan;
        sub.packed = segs[s].packed;
        sub.cols = cols;
        sub.stride = segs[s].stride;
        sub.rows += 4 * q0;
        sub.x4 += q0;
        sub.n_quads = q1 - q0;
        int32_t* out = partial.get() + part * width + off[s];
        const int64_t blk = std::min(cols, max_blk);
        const int64_t chunk = row_split_chunk_quads(blk, zen4);
        for (int64_t b0 = 0; b0 < cols; b0 += blk) {
          const int64_t nb = std::min(blk, cols - b0);
          if (level == Isa::Avx512)
            block_avx512_m1(sub, b0, nb, vnni, out + 4 * b0, chunk, blk < kRowMajorBelow);
          else
            block_avx2_m1(sub, b0, nb, out + 4 * b0, chunk);
        }
      }
    }
  });
  const int64_t outs = 1024;  // outputs per epilogue task
  const auto n_out = static_cast<int64_t>(out_cols.size());
  std::vector<int64_t> at_out(n_out + 1, 0);  // output segment e's outputs are [at_out[e], at_out[e + 1])
  for (int64_t e = 0; e < n_out; ++e) at_out[e + 1] = at_out[e] + 4 * out_cols[e];
  TORCH_INTERNAL_ASSERT(at_out[n_out] == width, "row_split_m1: output segments do not cover the read segments");
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (output segment, first output)
  for (int64_t e = 0; e < n_out; ++e)
    for (int64_t j0 = 0; j0 < 4 * out_cols[e]; j0 += outs) tasks.emplace_back(e, j0);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t c0, int64_t c1) {
    std::vector<int32_t> sum(outs);
    for (int64_t c = c0; c < c1; ++c) {
      const auto [e, j0] = tasks[c];
      const int64_t nj = std::min(outs, 4 * out_cols[e] - j0), at = at_out[e] + j0;
      std::copy(partial.get() + at, partial.get() + at + nj, sum.begin());
      for (int64_t part = 1; part < parts; ++part) {
        const int32_t* src = partial.get() + part * width + at;
        for (int64_t j = 0; j < nj; ++j)
          sum[j] = static_cast<int32_t>(static_cast<uint32_t>(sum[j]) + static_cast<uint32_t>(src[j]));
      }
      epi(e, sum.data(), j0, nj);
    }
  });
}

// One projection's outputs in a packed weight that may hold several side by side (sibling
// projections stored as column ranges of one buffer): the weight's outputs [4 * byte0,
// 4 * byte0 + out_features), with their own scale and bias, written to out.
struct OutSegment {
  int64_t byte0;  // the segment's first packed byte in each row
  int64_t out_features;
  float ws;          // weight scale
  const void* bias;  // [out_features] in x's dtype, or nullptr
  void* out;         // [M, out_features] in x's dtype, contiguous
};

// The epilogue of the weight's outputs [j0, j0 + nj) for batch rows [m0, m0 + rows) (a: their
// code_dot, rows ld apart), segment by segment; padding outputs between segments are skipped.
template <typename T>
void epilogue_segments(Isa level, const int32_t* a, int64_t ld, const RowQuant* rq, const std::vector<OutSegment>& segs,
                       int64_t m0, int64_t rows, int64_t j0, int64_t nj) {
  for (const OutSegment& sg : segs) {
    const int64_t lo = std::max(j0, 4 * sg.byte0), hi = std::min(j0 + nj, 4 * sg.byte0 + sg.out_features);
    if (hi <= lo) continue;
    epilogue_at(level, a + (lo - j0), ld, rq + m0, sg.ws, static_cast<const T*>(sg.bias),
                static_cast<T*>(sg.out) + m0 * sg.out_features, sg.out_features, rows, lo - 4 * sg.byte0, hi - lo);
  }
}

}  // namespace

std::string weight_problem(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                           int64_t out_features, std::optional<int64_t> k_opt, const std::optional<at::Tensor>& bias) {
  if (packed.device().type() != at::kCPU) return c10::str("packed must be on ", at::kCPU, ", got ", packed.device());
  if (packed.scalar_type() != at::kByte) return c10::str("packed must be ", at::kByte, ", got ", packed.scalar_type());
  if (packed.dim() != 2) return c10::str("packed must be 2-D, got ", packed.dim(), "-D");
  if (scale.device().type() != at::kCPU) return c10::str("scale must be on ", at::kCPU, ", got ", scale.device());
  if (scale.scalar_type() != at::kFloat) return c10::str("scale must be ", at::kFloat, ", got ", scale.scalar_type());
  const int64_t d = x.size(1);
  if (d > kMaxTernaryD)
    return c10::str("ternary_linear_kernel: d = ", d, " is above ", kMaxTernaryD,
                    ", the largest in_features whose int32 accumulator cannot overflow");
  if (out_features < 0) return c10::str("ternary_linear_kernel: out_features must be >= 0, got ", out_features);
  const int64_t cols = packed_cols(out_features);
  if (packed.size(0) != d || packed.size(1) != cols)
    return c10::str("ternary_linear_kernel: packed must have shape [in_features, ceil(out_features / 4)] = [", d, ", ",
                    cols, "], got ", packed.sizes());
  if (scale.numel() != 1 || scale.dim() > 1)
    return c10::str("ternary_linear_kernel: scale must be a scalar tensor (shape () or (1,)), got shape ",
                    scale.sizes());
  if (k_opt && (*k_opt < 0 || *k_opt > d))
    return c10::str("ternary_linear_kernel: k must be in [0, d = ", d, "], got ", *k_opt);
  if (bias) {
    const at::Tensor& b = *bias;
    if (b.device().type() != at::kCPU)
      return c10::str("ternary_linear_kernel: bias must be on ", at::kCPU, ", got ", b.device());
    if (b.scalar_type() != x.scalar_type())
      return c10::str("ternary_linear_kernel: bias must have the dtype of x (", x.scalar_type(), "), got ",
                      b.scalar_type());
    if (b.dim() != 1 || b.size(0) != out_features)
      return c10::str("ternary_linear_kernel: bias must have shape [", out_features, "], got ", b.sizes());
  }
  return {};
}

namespace {

// The single op's checks of a weight for the rows x [M, d] (weight_problem), on arguments whose
// layout the kernels read (rows of contiguous bytes, a contiguous bias); returns the packed row width.
// The value of a scale check_weight accepted (a one-element float32 CPU tensor), read in place:
// Tensor::item() goes through the dispatcher (aten::item, ~1.5 us a call).
inline float scale_value(const at::Tensor& scale) { return *scale.const_data_ptr<float>(); }

int64_t check_weight(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t out_features,
                     std::optional<int64_t> k_opt, const std::optional<at::Tensor>& bias_opt) {
  const std::string problem = weight_problem(x, packed, scale, out_features, k_opt, bias_opt);
  TORCH_CHECK(problem.empty(), problem);
  if (bias_opt) QSK_CHECK_CONTIGUOUS(*bias_opt);
  TORCH_INTERNAL_ASSERT(packed_stride(packed) >= 0, "ternary_linear_kernel: packed rows must be contiguous bytes");
  return packed_cols(out_features);
}

// x [M, d] contiguous, M >= 1, over one packed weight of `cols` bytes per row, rows `stride`
// bytes apart (pk: row 0), whose outputs are those of segs (one projection, or siblings side by
// side), each written with its own scale and bias. shared: the rows already prepared by
// prepare_rows(x, k) (sibling projections), or nullptr.
void ternary_rows(const at::Tensor& x, const uint8_t* pk, int64_t cols, int64_t stride, int64_t k,
                  const std::vector<OutSegment>& segs, const Prepared* shared) {
  const int64_t M = x.size(0), d = x.size(1);
  const Isa level = isa();
  const bool vnni = has_avx512_vnni();
  Path path = level == Isa::Avx512 ? Path::Avx512 : (level == Isa::Avx2 ? Path::Avx2 : Path::Scalar);
  if (path == Path::Avx2 && cols < kStripAvx2) path = Path::Scalar;  // too narrow to overlap a strip
  const int64_t W = path == Path::Avx512 ? kStripAvx512 : (path == Path::Avx2 ? kStripAvx2 : kStripScalar);

  QSK_TERNARY_DISPATCH(x.scalar_type(), "ternary_linear_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const auto epi = [&](const int32_t* a, int64_t ld, const RowQuant* r, int64_t m0, int64_t rows, int64_t j0,
                         int64_t nj) { epilogue_segments<scalar_t>(level, a, ld, r, segs, m0, rows, j0, nj); };

    // 1. top-K + quantization, per batch row.
    Prepared own;
    if (shared == nullptr) own = prepare_rows(xp, M, d, k, level);
    const std::vector<int8_t>& xq = shared ? shared->xq : own.xq;
    const std::vector<RowQuant>& rq = shared ? shared->rq : own.rq;

    // 2. the rows to read: one plan over the union, or one plan per batch row (prefer_per_row).
    int64_t n_union = d;
    bool per_row = M > 1 && prefer_per_row(xq.data(), M, d, level, &n_union);
    const bool amx = M >= (per_row ? kAmxMinMPerRow : kAmxMinM) && path == Path::Avx512 && has_amx_int8();
    if (amx) per_row = false;
    std::vector<Plan> plans(per_row ? M : 1);  // sized once: the views point into the vectors
    int64_t plan_bytes = 0;
    for (int64_t i = 0; i < static_cast<int64_t>(plans.size()); ++i) {
      plans[i].m0 = per_row ? i : 0;
      build_plan(xq.data() + plans[i].m0 * d, per_row ? 1 : M, d, pk, cols, stride, plans[i]);
      plan_bytes += 4 * plans[i].view.n_quads * W;
    }

    if (M == 1 && (level == Isa::Avx512 || level == Isa::Avx2)) {
      const Segment seg{pk, cols, stride};
      row_split_m1(plans[0].view, &seg, 1, {cols}, level,
                   [&](int64_t, const int32_t* a, int64_t j0, int64_t nj) { epi(a, 0, rq.data(), 0, 1, j0, nj); });
      return;
    }
    if (amx) {
      std::vector<RowQuant> rq0(rq);  // the AMX kernel gives x_q @ t^T itself: nothing to subtract
      for (RowQuant& r : rq0) r.sum = 0;
      batch_amx(plans[0].view, cols, [&](const int32_t* a, int64_t ld, int64_t m0, int64_t m1, int64_t j0, int64_t nj) {
        epi(a, ld, rq0.data(), m0, m1 - m0, j0, nj);
      });
      return;
    }
    // 3. blocks of output columns in parallel; each output is written by exactly one task, with a
    // fixed summation order, so results do not depend on the thread count. AVX-512 blocks are
    // several strips wide (row runs for DRAM, see block_avx512_m1), at most `cap`, and as equal
    // as whole strips allow, in a multiple of the thread count so every thread gets the same share
    // (at::parallel_for hands each thread one contiguous range); the other paths use one strip.
    // Per-row batches on AVX2 run block_avx2_m1 per batch row, in blocks of its 32 B strips.
    const bool avx2_rows = level == Isa::Avx2 && per_row;
    int64_t B = W;
    if (path == Path::Avx512 || avx2_rows) {
      const int64_t U = avx2_rows ? kStripAvx2M1 : W, max_b = avx2_rows ? kBlockAvx2Rows : kBlockAvx512;
      const int64_t T = std::max<int64_t>(1, at::get_num_threads());
      // Per-row batches re-read each block once per batch row: keep the block of the union rows
      // within L2 (kL2BudgetLines) so that those re-reads hit L2.
      const int64_t cap_bytes = per_row ? kL2BudgetLines * 64 / std::max<int64_t>(1, n_union) : kBlockAvx512;
      const int64_t cap = std::clamp<int64_t>(cap_bytes / U, 1, max_b / U);  // in strips
      const int64_t strips = (cols + U - 1) / U;
      const int64_t n = T * ((strips + T * cap - 1) / (T * cap));  // blocks wanted: a multiple of T
      B = U * ((strips + n - 1) / n);
    }
    const int64_t n_blocks = (cols + B - 1) / B;
    const int64_t grain = std::max<int64_t>(1, kMinTaskBytes / std::max<int64_t>(1, plan_bytes * (B / W)));
    const int64_t ld = 4 * B;
    // A batch on the union plan runs strip by strip, each strip's epilogue right after it, so its
    // code_dot stays in L2 (M x 4W int32 per thread instead of M x 4B).
    const bool strip_epilogue = path == Path::Avx512 && !per_row && M > 1;
    at::parallel_for(0, n_blocks, grain, [&](int64_t k0, int64_t k1) {
      std::vector<int32_t> scratch(path == Path::Scalar ? 0 : strip_scratch_words(W, M));
      std::vector<int32_t> acc(M * (strip_epilogue ? 4 * W : ld));
      for (int64_t blk = k0; blk < k1; ++blk) {
        if (strip_epilogue) {
          for (int64_t s = blk * B; s < std::min(cols, (blk + 1) * B); s += W) {
            const int64_t ns = std::min(W, cols - s);
            strip_avx512(plans[0].view, s, ns, vnni, acc.data(), 4 * W, scratch.data());
            epi(acc.data(), 4 * W, rq.data(), 0, M, 4 * s, 4 * ns);
          }
          continue;
        }
        const int64_t b0 = blk * B, nb = std::min(B, cols - b0);
        // A short last AVX2 strip is recomputed as the full strip ending at the last byte
        // (cols >= kStripAvx2 on that path); only its own outputs are written below.
        const int64_t bb = (path == Path::Avx2 && !avx2_rows && nb < W) ? cols - W : b0;
        for (const Plan& pl : plans) {
          int32_t* a = acc.data() + pl.m0 * ld;
          if (avx2_rows) {
            block_avx2_m1(pl.view, b0, nb, a, row_split_chunk_quads(B, false));
          } else if (path == Path::Avx512 && pl.view.M == 1) {
            block_avx512_m1(pl.view, b0, nb, vnni, a);
          } else if (path == Path::Avx512) {
            for (int64_t s = 0; s < nb; s += W) strip_avx512(pl.view, b0 + s, std::min(W, nb - s), vnni, a + 4 * s, ld,
                                                             scratch.data());
          } else if (path == Path::Avx2) {
            strip_avx2(pl.view, bb, W, a, ld, scratch.data());
          } else {
            strip_scalar(pl.view, b0, nb, a, ld);
          }
        }
        const int32_t* a = acc.data() + 4 * (b0 - bb);
        epi(a, ld, rq.data(), 0, M, 4 * b0, 4 * nb);
      }
    });
  });
}

// x [M, d] contiguous, packed with rows of contiguous bytes (ternary_linear_segment makes it so),
// bias contiguous: the single op's checks, then ternary_rows. shared: as ternary_rows.
at::Tensor ternary_linear_rows(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               int64_t out_features, std::optional<int64_t> k_opt,
                               const std::optional<at::Tensor>& bias, const Prepared* shared) {
  const int64_t cols = check_weight(x, packed, scale, out_features, k_opt, bias);
  auto out = at::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0 || out_features == 0) return out;
  const std::vector<OutSegment> segs{
      {0, out_features, scale_value(scale), bias ? bias->data_ptr() : nullptr, out.data_ptr()}};
  ternary_rows(x, packed.data_ptr<uint8_t>(), cols, packed_stride(packed), k_opt ? *k_opt : -1, segs, shared);
  return out;
}

// One weight over x as a contiguous [M, d] float matrix, with every check of the single op.
at::Tensor ternary_linear_segment(const at::Tensor& xr, const at::Tensor& packed, const at::Tensor& scale,
                                  int64_t out_features, std::optional<int64_t> k_opt,
                                  const std::optional<at::Tensor>& bias_opt, const Prepared* shared) {
  const std::string problem = weight_problem(xr, packed, scale, out_features, k_opt, bias_opt);
  TORCH_CHECK(problem.empty(), problem);
  std::optional<at::Tensor> bias;
  if (bias_opt) bias = bias_opt->contiguous();
  // A column range of a wider buffer (sibling weights side by side) is read in place.
  return ternary_linear_rows(xr, packed_stride(packed) >= 0 ? packed : packed.contiguous(), scale, out_features, k_opt,
                             bias, shared);
}

// x [..., d] (any strides) -> [..., out_features].
at::Tensor ternary_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                              int64_t out_features, std::optional<int64_t> k_opt,
                              const std::optional<at::Tensor>& bias_opt) {
  QSK_CHECK_DEVICE(x, at::kCPU);
  QSK_CHECK_FLOAT(x);
  return unrows(ternary_linear_segment(as_rows(x, "ternary_linear_kernel"), packed, scale, out_features, k_opt,
                                       bias_opt, nullptr),
                x);
}

}  // namespace

std::vector<at::Tensor> ternary_linear_multi_rows(const at::Tensor& x, at::TensorList packed, at::TensorList scales,
                                                  at::IntArrayRef out_features, std::optional<int64_t> k_opt,
                                                  const c10::List<std::optional<at::Tensor>>& biases) {
  const at::Tensor xr = as_rows(x, "ternary_linear_multi_kernel");
  const int64_t M = xr.size(0), d = xr.size(1);
  TORCH_INTERNAL_ASSERT(d <= kMaxTernaryD && (!k_opt || (0 <= *k_opt && *k_opt <= d)));
  Prepared pre;
  QSK_TERNARY_DISPATCH(xr.scalar_type(), "ternary_linear_multi_rows", [&] {
    pre = prepare_rows(xr.data_ptr<scalar_t>(), M, d, k_opt ? *k_opt : -1, isa());
  });
  // Segments stored side by side (column ranges of one buffer, in order, each in a layout the
  // single op reads in place) are computed as one wider weight: one plan, one pass; the others
  // each take the single op's path.
  const auto n = static_cast<int64_t>(packed.size());
  std::vector<at::Tensor> out(n);
  std::vector<std::optional<at::Tensor>> bias(n);
  for (int64_t s0 = 0, s1; s0 < n; s0 = s1) {
    s1 = side_by_side_end(packed, s0, d, std::numeric_limits<int64_t>::max());
    if (s1 == s0 + 1 || M == 0) {
      for (int64_t s = s0; s < s1; ++s)
        out[s] = unrows(ternary_linear_segment(xr, packed[s], scales[s], out_features[s], k_opt, biases.get(s), &pre), x);
      continue;
    }
    std::vector<OutSegment> segs;
    int64_t cols = 0;
    for (int64_t s = s0; s < s1; ++s) {
      if (biases.get(s)) bias[s] = biases.get(s)->contiguous();
      const int64_t c = check_weight(xr, packed[s], scales[s], out_features[s], k_opt, bias[s]);
      out[s] = at::empty({M, out_features[s]}, xr.options());
      segs.push_back({cols, out_features[s], scale_value(scales[s]), bias[s] ? bias[s]->data_ptr() : nullptr,
                      out[s].data_ptr()});
      cols += c;
    }
    ternary_rows(xr, packed[s0].data_ptr<uint8_t>(), cols, packed_stride(packed[s0]), k_opt ? *k_opt : -1, segs, &pre);
    for (int64_t s = s0; s < s1; ++s) out[s] = unrows(out[s], x);
  }
  return out;
}

std::vector<at::Tensor> ternary_linear_multi_m1(const at::Tensor& x, const std::vector<at::Tensor>& packed,
                                                const std::vector<float>& scale, const std::vector<int64_t>& out_features,
                                                int64_t k, const std::vector<const at::Tensor*>& bias) {
  const int64_t d = x.size(1), nseg = static_cast<int64_t>(packed.size());
  const Isa level = isa();
  // Segments side by side are read as one while the merged row fits one block of the row-split
  // pass (merge_max_bytes).
  const int64_t max_blk = merge_max_bytes();
  std::vector<at::Tensor> out(nseg);
  std::vector<int64_t> out_cols(nseg);
  for (int64_t s = 0; s < nseg; ++s) {
    out[s] = at::empty({1, out_features[s]}, x.options());
    out_cols[s] = packed_cols(out_features[s]);
  }
  std::vector<Segment> segs;  // what to read: runs of segments side by side merged into one
  for (int64_t s0 = 0, s1; s0 < nseg; s0 = s1) {
    s1 = side_by_side_end(packed, s0, d, max_blk);
    int64_t cols = 0;
    for (int64_t s = s0; s < s1; ++s) cols += out_cols[s];
    segs.push_back({packed[s0].data_ptr<uint8_t>(), cols, packed_stride(packed[s0])});
  }
  QSK_TERNARY_DISPATCH(x.scalar_type(), "ternary_linear_multi_cpu", [&] {
    // 1. one top-K + quantization (prepare_row, as ternary_linear_rows does for M == 1).
    std::vector<int8_t> xq(d, 0);
    const bool select = k >= 0 && k < d;
    std::vector<uint32_t> sel(select ? select_scratch_words(d) : 0);
    std::vector<int32_t> idx(select ? std::max<int64_t>(k, 1) : 0);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const RowQuant rq = level == Isa::Avx512 ? prepare_row_avx512(xp, d, k, xq.data(), idx.data(), sel.data())
                                             : prepare_row_avx2(xp, d, k, xq.data(), idx.data(), sel.data());
    // 2. one plan; its packed / cols are each segment's (row_split_m1 sets them).
    Plan plan;
    build_plan(xq.data(), 1, d, nullptr, 0, 0, plan);  // row_split_m1 sets each segment's packed, cols, stride
    // 3. one row-split pass over every segment; each segment's own epilogue (scale, bias).
    std::vector<const scalar_t*> bp(nseg);
    std::vector<scalar_t*> op(nseg);
    for (int64_t s = 0; s < nseg; ++s) {
      bp[s] = bias[s] ? bias[s]->data_ptr<scalar_t>() : nullptr;
      op[s] = out[s].data_ptr<scalar_t>();
    }
    row_split_m1(plan.view, segs.data(), static_cast<int64_t>(segs.size()), out_cols, level,
                 [&](int64_t s, const int32_t* a, int64_t j0, int64_t nj) {
      nj = std::min(nj, out_features[s] - j0);  // the last packed byte may hold padding outputs
      if (nj > 0) epilogue_at(level, a, 0, &rq, scale[s], bp[s], op[s], out_features[s], 1, j0, nj);
    });
  });
  return out;
}

}  // namespace qsk::cpu::ternary

TORCH_LIBRARY_IMPL(qsparse, CPU, m) { m.impl("ternary_linear_kernel", &qsk::cpu::ternary::ternary_linear_cpu); }
