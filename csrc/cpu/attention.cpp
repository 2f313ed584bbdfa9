// Attention for one query position (a decode step) on the CPU, in float32 whatever the inputs'
// dtype (qsparse_kernels/attention.py):
//   s[l]   = scale * (q[b, h] . k[b, g, l]) + mask[b, h, l]     (g = h / (H / Hkv); a boolean mask
//                                                               adds 0 where true, -inf where false)
//   out[b, h] = sum_l softmax(s)[l] * v[b, g, l], rounded once to q's dtype; 0 where every key is masked
// torch's CPU SDPA on bf16 / fp16 inputs is slow (~4x float32 at 144 keys), and casting the whole
// key / value cache to float32 every step costs more than the attention itself at short contexts.
// Here bf16 / fp16 values are widened as they are read. One task per (batch, key-value head): its
// H / Hkv query heads share each key and value row.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "qsk/avx2_lanes.h"
#include "qsk/avx512_lanes.h"
#include "qsk/checks.h"
#include "qsk/cpu_common.h"
#include "qsk/isa.h"

namespace qsk::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The arguments of one call, flattened: element strides of q / k / v / out (the last dim is
// contiguous) and of the mask expanded to [B, H, L] (0 on broadcast dims).
template <typename T>
struct Problem {
  const T *q, *k, *v;
  T* out;
  int64_t G, L, E, Ev;  // G = query heads per key-value head
  int64_t qb, qh, kb, kh, kl, vb, vh, vl, ob, oh;
  const bool* mask_bool;
  const T* mask_same;      // an additive mask in q's dtype
  const float* mask_f32;   // an additive float32 mask (q bf16 / fp16)
  int64_t mb, mh, ml;
  float scale;

  float mask_at(int64_t b, int64_t h, int64_t l) const {
    const int64_t i = b * mb + h * mh + l * ml;
    if (mask_bool) return mask_bool[i] ? 0.0f : kNegInf;
    if (mask_same) return to_f32(mask_same[i]);
    if (mask_f32) return mask_f32[i];
    return 0.0f;
  }
};

// ---- portable (the scalar ISA cap, and more than kMaxGp query heads per key-value head) ----
template <typename T>
void group_scalar(const Problem<T>& p, int64_t b, int64_t g, std::vector<float>& s, std::vector<float>& acc) {
  const T* kg = p.k + b * p.kb + g * p.kh;
  const T* vg = p.v + b * p.vb + g * p.vh;
  for (int64_t j = 0; j < p.G; ++j) {
    const int64_t h = g * p.G + j;
    const T* qh = p.q + b * p.qb + h * p.qh;
    float mx = kNegInf;
    for (int64_t l = 0; l < p.L; ++l) {
      const T* kr = kg + l * p.kl;
      float dot = 0.0f;
      for (int64_t e = 0; e < p.E; ++e) dot += to_f32(qh[e]) * to_f32(kr[e]);
      s[l] = dot * p.scale + p.mask_at(b, h, l);
      mx = s[l] > mx ? s[l] : mx;
    }
    T* o = p.out + b * p.ob + h * p.oh;
    if (mx == kNegInf) {  // every key masked: 0, as torch's SDPA on the CPU
      for (int64_t e = 0; e < p.Ev; ++e) o[e] = static_cast<T>(0.0f);
      continue;
    }
    float sum = 0.0f;
    for (int64_t e = 0; e < p.Ev; ++e) acc[e] = 0.0f;
    for (int64_t l = 0; l < p.L; ++l) {
      const float w = std::exp(s[l] - mx);
      sum += w;
      const T* vr = vg + l * p.vl;
      for (int64_t e = 0; e < p.Ev; ++e) acc[e] += w * to_f32(vr[e]);
    }
    const float inv = 1.0f / sum;
    for (int64_t e = 0; e < p.Ev; ++e) o[e] = static_cast<T>(acc[e] * inv);
  }
}

// ---- vector paths: scores and softmax on 8-lane vectors (AVX2 + FMA, so the AVX-512 path runs
// the same code), then the weighted sum of the value rows per ISA ----
// e^x for x <= 0 (s - max) on 8 lanes: 2^n * e^r, n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its
// Taylor polynomial to r^7 (relative error < 6e-9); 0 for x = -inf (a masked key), x clamped at
// -87 (2^n stays a normal float; e^-87 ~ 1.6e-38).
QSK_TARGET_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 masked = _mm256_cmp_ps(x, _mm256_set1_ps(kNegInf), _CMP_EQ_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln 2, split in two
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 y = _mm256_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(masked, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// row[0, n) widened to float32 into dst[0, n).
template <typename T>
QSK_TARGET_AVX2 inline void widen_row(const T* row, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(row + i));
  for (; i < n; ++i) dst[i] = to_f32(row[i]);
}

// Scratch of one task, in floats: the group's queries transposed and scaled (qt[e * Gp + j], Gp =
// G rounded up to 8 lanes), kKeyBatch key rows widened (kf; the AVX2 sum: 32 values of one value
// row), the scores / weights s[l * Gp + j].
inline int64_t lanes8(int64_t G) { return (G + 7) / 8 * 8; }
constexpr int64_t kMaxGp = 64;  // the vector paths' query heads per key-value head (mx / inv below)
constexpr int64_t kKeyBatch = 8;  // key rows widened at a time (softmax_weights)

// The group's softmax weights: s[l * Gp + j] = e^(score - max_j) (8 query heads a vector, each
// key's entries broadcast, 4 sums over e mod 4), mx[j] the max (-inf: every key masked), inv[j]
// 1 / sum_l of the weights.
template <typename T>
QSK_TARGET_AVX2 void softmax_weights(const Problem<T>& p, int64_t b, int64_t g, float* s, float* scratch, float* mx,
                                     float* inv) {
  const int64_t L = p.L, G = p.G, E = p.E, Gp = lanes8(G);
  const T* kg = p.k + b * p.kb + g * p.kh;
  float* qt = scratch;
  float* kf = qt + E * Gp;
  for (int64_t i = 0; i < E * Gp; ++i) qt[i] = 0.0f;
  for (int64_t j = 0; j < G; ++j) {
    const T* qh = p.q + b * p.qb + (g * G + j) * p.qh;
    for (int64_t e = 0; e < E; ++e) qt[e * Gp + j] = to_f32(qh[e]) * p.scale;
  }
  const bool head_mask = p.mh != 0;  // a mask that differs between heads: added lane by lane
  for (int64_t l = 0; l < L; ++l) {
    // Keys are widened kKeyBatch at a time, ahead of their use: broadcasting from a row stored just
    // before stalls on store-to-load forwarding (Zen 4: ~1.6x the time of the whole call).
    const int64_t slot = l % kKeyBatch;
    if (slot == 0)
      for (int64_t u = 0; u < kKeyBatch && l + u < L; ++u) widen_row(kg + (l + u) * p.kl, E, kf + u * E);
    const float* kr = kf + slot * E;
    const float shared = head_mask ? 0.0f : p.mask_at(b, g * G, l);
    for (int64_t c = 0; c < Gp; c += 8) {
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t e = 0;
      for (; e + 4 <= E; e += 4)
        for (int u = 0; u < 4; ++u)
          a[u] = _mm256_fmadd_ps(_mm256_loadu_ps(qt + (e + u) * Gp + c), _mm256_set1_ps(kr[e + u]), a[u]);
      for (; e < E; ++e) a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(qt + e * Gp + c), _mm256_set1_ps(kr[e]), a[0]);
      __m256 sc = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
      if (head_mask) {
        alignas(32) float mk[8];
        for (int u = 0; u < 8; ++u) mk[u] = c + u < G ? p.mask_at(b, g * G + c + u, l) : 0.0f;
        sc = _mm256_add_ps(sc, _mm256_load_ps(mk));
      } else {
        sc = _mm256_add_ps(sc, _mm256_set1_ps(shared));
      }
      _mm256_storeu_ps(s + l * Gp + c, sc);
    }
  }
  for (int64_t c = 0; c < Gp; c += 8) {
    __m256 m = _mm256_set1_ps(kNegInf), sum = _mm256_setzero_ps();
    for (int64_t l = 0; l < L; ++l) m = _mm256_max_ps(m, _mm256_loadu_ps(s + l * Gp + c));
    _mm256_storeu_ps(mx + c, m);
    for (int64_t l = 0; l < L; ++l) {
      const __m256 w = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + l * Gp + c), m));
      _mm256_storeu_ps(s + l * Gp + c, w);
      sum = _mm256_add_ps(sum, w);
    }
    _mm256_storeu_ps(inv + c, _mm256_div_ps(_mm256_set1_ps(1.0f), sum));
  }
}

// Output, AVX-512: 4 query heads x 64 values in registers, each value row widened once per 4 heads.
template <typename T>
QSK_TARGET_AVX512 void group_avx512(const Problem<T>& p, int64_t b, int64_t g, std::vector<float>& s,
                                    std::vector<float>& scratch) {
  const int64_t L = p.L, G = p.G, Ev = p.Ev, Gp = lanes8(G);
  alignas(32) float mx[kMaxGp], inv[kMaxGp];
  softmax_weights(p, b, g, s.data(), scratch.data(), mx, inv);
  const T* vg = p.v + b * p.vb + g * p.vh;
  for (int64_t j0 = 0; j0 < G; j0 += 4) {
    for (int64_t e0 = 0; e0 < Ev; e0 += 64) {
      __m512 acc[4][4];
      for (auto& row : acc)
        for (auto& x : row) x = _mm512_setzero_ps();
      __mmask16 vm[4];
      for (int c = 0; c < 4; ++c) vm[c] = mask16(Ev - e0 - 16 * c);
      for (int64_t l = 0; l < L; ++l) {
        const T* vr = vg + l * p.vl + e0;
        const float* wl = s.data() + l * Gp + j0;  // lanes past G: finite, unused
        __m512 vv[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) vv[c] = load16(vr + 16 * c, vm[c]);
#pragma GCC unroll 4
        for (int jj = 0; jj < 4; ++jj) {
          const __m512 w = _mm512_set1_ps(wl[jj]);
#pragma GCC unroll 4
          for (int c = 0; c < 4; ++c) acc[jj][c] = _mm512_fmadd_ps(w, vv[c], acc[jj][c]);
        }
      }
      // Every index constant (unrolled), so the accumulators stay in registers in the loop above.
#pragma GCC unroll 4
      for (int jj = 0; jj < 4; ++jj) {
        const int64_t j = j0 + jj;
        if (j >= G) continue;
        T* out = p.out + b * p.ob + (g * G + j) * p.oh + e0;
        const __m512 f = _mm512_set1_ps(mx[j] == kNegInf ? 0.0f : inv[j]);  // all masked: 0, as torch
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c)
          if (vm[c]) store16(out + 16 * c, _mm512_mul_ps(acc[jj][c], f), vm[c]);
      }
    }
  }
}

// Output, AVX2: 2 query heads x 32 values in registers, each value row widened once per 2 heads.
template <typename T>
QSK_TARGET_AVX2 void group_avx2(const Problem<T>& p, int64_t b, int64_t g, std::vector<float>& s,
                                std::vector<float>& scratch) {
  const int64_t L = p.L, G = p.G, Ev = p.Ev, Gp = lanes8(G);
  alignas(32) float mx[kMaxGp], inv[kMaxGp];
  softmax_weights(p, b, g, s.data(), scratch.data(), mx, inv);
  const T* vg = p.v + b * p.vb + g * p.vh;
  float* vf = scratch.data();  // the queries are no longer needed: 32 widened values of a row
  alignas(32) float o[2][32];
  for (int64_t j0 = 0; j0 < G; j0 += 2) {
    for (int64_t e0 = 0; e0 < Ev; e0 += 32) {
      const int64_t n = std::min<int64_t>(32, Ev - e0);
      for (int64_t i = n; i < 32; ++i) vf[i] = 0.0f;
      __m256 acc[2][4];
      for (auto& row : acc)
        for (auto& x : row) x = _mm256_setzero_ps();
      for (int64_t l = 0; l < L; ++l) {
        const T* vr = vg + l * p.vl + e0;
        __m256 vv[4];
        if (n == 32) {  // widened in registers; a short chunk goes through vf (zero-padded)
#pragma GCC unroll 4
          for (int c = 0; c < 4; ++c) vv[c] = load8(vr + 8 * c);
        } else {
          widen_row(vr, n, vf);
#pragma GCC unroll 4
          for (int c = 0; c < 4; ++c) vv[c] = _mm256_loadu_ps(vf + 8 * c);
        }
#pragma GCC unroll 2
        for (int jj = 0; jj < 2; ++jj) {
          const __m256 w = _mm256_set1_ps(s[l * Gp + j0 + jj]);  // lanes past G: finite, unused
#pragma GCC unroll 4
          for (int c = 0; c < 4; ++c) acc[jj][c] = _mm256_fmadd_ps(w, vv[c], acc[jj][c]);
        }
      }
      // Every index constant (unrolled), so the accumulators stay in registers in the loop above.
#pragma GCC unroll 2
      for (int jj = 0; jj < 2; ++jj) {
        const int64_t j = j0 + jj;
        if (j >= G) continue;
        const __m256 f = _mm256_set1_ps(mx[j] == kNegInf ? 0.0f : inv[j]);  // all masked: 0, as torch
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) _mm256_store_ps(o[jj] + 8 * c, _mm256_mul_ps(acc[jj][c], f));
        T* out = p.out + b * p.ob + (g * G + j) * p.oh + e0;
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(o[jj][i]);
      }
    }
  }
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    QSK_CHECK_DEVICE((*t), at::kCPU);
    QSK_CHECK_DIM((*t), 4);
  }
  QSK_CHECK_FLOAT(q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "decode_attention: q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(q.size(2) == 1, "decode_attention: q must have one query position (q.size(2) == 1), got ", q.size(2));
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
              "decode_attention: q, k and v must have one batch size");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0 && v.size(1) == k.size(1),
              "decode_attention: q's heads must be a multiple of k's and v's (equal) heads, got ", q.size(1), ", ",
              k.size(1), ", ", v.size(1));
  TORCH_CHECK(k.size(3) == q.size(3), "decode_attention: q and k must have one head dim, got ", q.size(3), " and ",
              k.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), "decode_attention: k and v must have one key count, got ", k.size(2), " and ",
              v.size(2));
  if (!mask) return;
  const at::Tensor& m = *mask;
  QSK_CHECK_DEVICE(m, at::kCPU);
  TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type() || m.scalar_type() == at::kFloat,
              "decode_attention: mask must be bool, float32 or q's dtype, got ", m.scalar_type());
  TORCH_CHECK(m.dim() <= 4, "decode_attention: mask must have at most 4 dims, got ", m.dim());
  const int64_t want[4] = {q.size(0), q.size(1), 1, k.size(2)};
  for (int64_t i = 0; i < m.dim(); ++i) {
    const int64_t d = m.size(m.dim() - 1 - i), w = want[3 - i];
    TORCH_CHECK(d == 1 || d == w, "decode_attention: mask of shape ", m.sizes(), " does not broadcast to [",
                want[0], ", ", want[1], ", 1, ", want[3], "]");
  }
}

at::Tensor decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const std::optional<at::Tensor>& mask, double scale) {
  check_args(q_in, k_in, v_in, mask);
  TORCH_CHECK(std::isfinite(scale), "decode_attention: scale must be finite, got ", scale);
  const auto last_contiguous = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor q = last_contiguous(q_in), k = last_contiguous(k_in), v = last_contiguous(v_in);
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), L = k.size(2), E = q.size(3), Ev = v.size(3);
  auto out = at::empty({B, H, 1, Ev}, q.options());
  if (out.numel() == 0) return out;
  at::Tensor m;
  if (mask) m = mask->expand({B, H, 1, L});
  const Isa level = isa();
  QSK_DISPATCH_FLOAT(q.scalar_type(), "decode_attention_cpu", [&] {
    Problem<scalar_t> p{};
    p.q = q.data_ptr<scalar_t>();
    p.k = k.data_ptr<scalar_t>();
    p.v = v.data_ptr<scalar_t>();
    p.out = out.data_ptr<scalar_t>();
    p.G = H / Hkv, p.L = L, p.E = E, p.Ev = Ev;
    p.qb = q.stride(0), p.qh = q.stride(1), p.kb = k.stride(0), p.kh = k.stride(1), p.kl = k.stride(2);
    p.vb = v.stride(0), p.vh = v.stride(1), p.vl = v.stride(2), p.ob = out.stride(0), p.oh = out.stride(1);
    p.scale = static_cast<float>(scale);
    if (m.defined()) {
      if (m.scalar_type() == at::kBool)
        p.mask_bool = m.data_ptr<bool>();
      else if (m.scalar_type() == at::kFloat)
        p.mask_f32 = m.data_ptr<float>();
      else
        p.mask_same = m.data_ptr<scalar_t>();
      p.mb = m.stride(0), p.mh = m.stride(1), p.ml = m.stride(3);
    }
    // Enough (batch, key-value head) tasks per thread to be worth an OpenMP fork (~64K multiply-adds).
    const int64_t work = std::max<int64_t>(1, p.G * L * (E + Ev));
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / work);
    at::parallel_for(0, B * Hkv, grain, [&](int64_t t0, int64_t t1) {
      const int64_t Gp = lanes8(p.G);
      std::vector<float> s(static_cast<size_t>(Gp * std::max<int64_t>(L, 1)));
      std::vector<float> scratch(static_cast<size_t>(std::max(Gp * E + kKeyBatch * E, std::max<int64_t>(Ev, 32))));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / Hkv, g = t % Hkv;
        if (level == Isa::Avx512 && Gp <= kMaxGp)
          group_avx512(p, b, g, s, scratch);
        else if (level == Isa::Avx2 && Gp <= kMaxGp)
          group_avx2(p, b, g, s, scratch);
        else
          group_scalar(p, b, g, s, scratch);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace qsk::cpu

TORCH_LIBRARY_IMPL(qsparse, CPU, m) { m.impl("decode_attention_kernel", &qsk::cpu::decode_attention_cpu); }
