// Attention on the CPU in float32 whatever the inputs' dtype (qsparse_kernels/attention.py):
//   s[t, l]   = scale * (q[b, h, t] . k[b, g, l]) + mask[b, h, t, l]  (g = h / (H / Hkv); a boolean
//               mask adds 0 where true, -inf where false; is_causal: -inf where l > t, torch's top-left
//               alignment)
//   out[b, h, t] = sum_l softmax(s[t])[l] * v[b, g, l], rounded once to q's dtype; 0 where every key
//               is masked
// torch's CPU SDPA on bf16 / fp16 inputs is slow (~4x float32 at 144 keys), and casting the whole
// key / value cache to float32 every step costs more than the attention itself at short contexts.
// Here bf16 / fp16 values are widened as they are read. One task per (batch, key-value head, chunk
// of query positions): the chunk's queries of the H / Hkv query heads sharing the key-value head
// ("lanes": up to kMaxGp of them, query position major) share each key and value row. A decode step
// is one chunk of one position; a causal prefill chunk reads only the keys its last position sees.
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
// contiguous) and of the mask expanded to [B, H, T, L] (0 on broadcast dims).
template <typename T>
struct Problem {
  const T *q, *k, *v;
  T* out;
  int64_t Hg, E, Ev;  // Hg = query heads per key-value head (a chunk holds its key count)
  int64_t qb, qh, qt, kb, kh, kl, vb, vh, vl, ob, oh, ot;
  const bool* mask_bool;
  const T* mask_same;      // an additive mask in q's dtype
  const float* mask_f32;   // an additive float32 mask (q bf16 / fp16)
  int64_t mb, mh, mt, ml;
  bool causal;
  float scale;

  float mask_at(int64_t b, int64_t h, int64_t t, int64_t l) const {
    if (causal && l > t) return kNegInf;
    const int64_t i = b * mb + h * mh + t * mt + l * ml;
    if (mask_bool) return mask_bool[i] ? 0.0f : kNegInf;
    if (mask_same) return to_f32(mask_same[i]);
    if (mask_f32) return mask_f32[i];
    return 0.0f;
  }
};

// One task: batch b, key-value head g, query positions [t0, t0 + nt). Lane j is query head
// g * Hg + j % Hg at position t0 + j / Hg (G = nt * Hg lanes); L keys are read (causal: those the
// last position sees).
struct Chunk {
  int64_t b, g, t0, nt, G, L;
  int64_t head(int64_t Hg, int64_t j) const { return g * Hg + j % Hg; }
  int64_t pos(int64_t Hg, int64_t j) const { return t0 + j / Hg; }
};

template <typename T>
const T* q_row(const Problem<T>& p, const Chunk& c, int64_t j) {
  return p.q + c.b * p.qb + c.head(p.Hg, j) * p.qh + c.pos(p.Hg, j) * p.qt;
}
template <typename T>
T* out_row(const Problem<T>& p, const Chunk& c, int64_t j) {
  return p.out + c.b * p.ob + c.head(p.Hg, j) * p.oh + c.pos(p.Hg, j) * p.ot;
}

// ---- portable (the scalar ISA cap, and more than kMaxGp query heads per key-value head) ----
template <typename T>
void group_scalar(const Problem<T>& p, const Chunk& c, std::vector<float>& s, std::vector<float>& acc) {
  const T* kg = p.k + c.b * p.kb + c.g * p.kh;
  const T* vg = p.v + c.b * p.vb + c.g * p.vh;
  for (int64_t j = 0; j < c.G; ++j) {
    const int64_t h = c.head(p.Hg, j), t = c.pos(p.Hg, j);
    const T* qh = q_row(p, c, j);
    float mx = kNegInf;
    for (int64_t l = 0; l < c.L; ++l) {
      const T* kr = kg + l * p.kl;
      float dot = 0.0f;
      for (int64_t e = 0; e < p.E; ++e) dot += to_f32(qh[e]) * to_f32(kr[e]);
      s[l] = dot * p.scale + p.mask_at(c.b, h, t, l);
      mx = s[l] > mx ? s[l] : mx;
    }
    T* o = out_row(p, c, j);
    if (mx == kNegInf) {  // every key masked: 0, as torch's SDPA on the CPU
      for (int64_t e = 0; e < p.Ev; ++e) o[e] = static_cast<T>(0.0f);
      continue;
    }
    float sum = 0.0f;
    for (int64_t e = 0; e < p.Ev; ++e) acc[e] = 0.0f;
    for (int64_t l = 0; l < c.L; ++l) {
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

// Scores of NK keys (rows of kr, E apart) against NC x 8 lanes of the transposed queries (qt, rows
// Gp apart): out[u * Gp + n * 8 + i] = sum over e in order of qt[e][8n + i] * kr[u][e], by FMA.
template <int NK, int NC>
QSK_TARGET_AVX2 inline __attribute__((always_inline)) void score_tile(const float* qt, int64_t Gp, const float* kr,
                                                                      int64_t E, float* out) {
  __m256 a[NK][NC];
#pragma GCC unroll 4
  for (int u = 0; u < NK; ++u)
#pragma GCC unroll 2
    for (int n = 0; n < NC; ++n) a[u][n] = _mm256_setzero_ps();
  for (int64_t e = 0; e < E; ++e) {
    __m256 q[NC];
#pragma GCC unroll 2
    for (int n = 0; n < NC; ++n) q[n] = _mm256_loadu_ps(qt + e * Gp + 8 * n);
#pragma GCC unroll 4
    for (int u = 0; u < NK; ++u) {
      const __m256 kb = _mm256_set1_ps(kr[u * E + e]);
#pragma GCC unroll 2
      for (int n = 0; n < NC; ++n) a[u][n] = _mm256_fmadd_ps(q[n], kb, a[u][n]);
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < NK; ++u)
#pragma GCC unroll 2
    for (int n = 0; n < NC; ++n) _mm256_storeu_ps(out + u * Gp + 8 * n, a[u][n]);
}

// The chunk's softmax weights: s[l * Gp + j] = e^(score - max_j) (score_tile, then the masks), mx[j]
// the max (-inf: every key masked), inv[j] 1 / sum_l of the weights.
template <typename T>
QSK_TARGET_AVX2 void softmax_weights(const Problem<T>& p, const Chunk& ch, float* s, float* scratch, float* mx,
                                     float* inv) {
  const int64_t L = ch.L, G = ch.G, E = p.E, Gp = lanes8(G);
  const T* kg = p.k + ch.b * p.kb + ch.g * p.kh;
  float* qt = scratch;
  float* kf = qt + E * Gp;
  for (int64_t i = 0; i < E * Gp; ++i) qt[i] = 0.0f;
  for (int64_t j = 0; j < G; ++j) {
    const T* qh = q_row(p, ch, j);
    for (int64_t e = 0; e < E; ++e) qt[e * Gp + j] = to_f32(qh[e]) * p.scale;
  }
  // A mask that differs between lanes is added lane by lane; a causal mask alone is a comparison
  // of the key with each lane's position (pos; lanes past G: never masked).
  const bool several = ch.nt > 1;
  const bool lane_mask = p.mh != 0 || (several && p.mt != 0);
  const bool causal_lanes = p.causal && several && !lane_mask;
  alignas(32) int32_t pos[kMaxGp];  // L < 2^31 (checked)
  for (int64_t j = 0; j < Gp; ++j) pos[j] = j < G ? static_cast<int32_t>(ch.pos(p.Hg, j)) : INT32_MAX;
  // Raw scores, kKeyBatch keys widened at a time (ahead of their use: broadcasting from a row stored
  // just before stalls on store-to-load forwarding; Zen 4: ~1.6x the time of the whole call), in
  // tiles of up to 4 keys x 16 lanes.
  for (int64_t l0 = 0; l0 < L; l0 += kKeyBatch) {
    const int64_t nk = std::min(kKeyBatch, L - l0);
    for (int64_t u = 0; u < nk; ++u) widen_row(kg + (l0 + u) * p.kl, E, kf + u * E);
    for (int64_t u = 0; u < nk; u += 4)
      for (int64_t c = 0; c < Gp; c += 16) {
        float* out = s + (l0 + u) * Gp + c;
        const float* kr = kf + u * E;
        if (nk - u >= 4)
          c + 16 <= Gp ? score_tile<4, 2>(qt + c, Gp, kr, E, out) : score_tile<4, 1>(qt + c, Gp, kr, E, out);
        else
          for (int64_t w = 0; w < nk - u; ++w)
            c + 16 <= Gp ? score_tile<1, 2>(qt + c, Gp, kr + w * E, E, out + w * Gp)
                         : score_tile<1, 1>(qt + c, Gp, kr + w * E, E, out + w * Gp);
      }
  }
  // Masks. (is_causal comes without a mask: causal_lanes adds nothing else.)
  if (lane_mask || causal_lanes || p.mask_bool || p.mask_same || p.mask_f32)
    for (int64_t l = 0; l < L; ++l) {
      const float shared = lane_mask || causal_lanes ? 0.0f : p.mask_at(ch.b, ch.g * p.Hg, ch.t0, l);
      const __m256i li = _mm256_set1_epi32(static_cast<int32_t>(l));
      for (int64_t c = 0; c < Gp; c += 8) {
        __m256 sc = _mm256_loadu_ps(s + l * Gp + c);
        if (lane_mask) {
          alignas(32) float mk[8];
          for (int u = 0; u < 8; ++u)
            mk[u] = c + u < G ? p.mask_at(ch.b, ch.head(p.Hg, c + u), ch.pos(p.Hg, c + u), l) : 0.0f;
          sc = _mm256_add_ps(sc, _mm256_load_ps(mk));
        } else if (causal_lanes) {
          const __m256i later = _mm256_cmpgt_epi32(li, _mm256_load_si256(reinterpret_cast<const __m256i*>(pos + c)));
          sc = _mm256_blendv_ps(sc, _mm256_set1_ps(kNegInf), _mm256_castsi256_ps(later));
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
QSK_TARGET_AVX512 void group_avx512(const Problem<T>& p, const Chunk& ch, std::vector<float>& s,
                                    std::vector<float>& scratch) {
  const int64_t L = ch.L, G = ch.G, Ev = p.Ev, Gp = lanes8(G);
  alignas(32) float mx[kMaxGp], inv[kMaxGp];
  softmax_weights(p, ch, s.data(), scratch.data(), mx, inv);
  const T* vg = p.v + ch.b * p.vb + ch.g * p.vh;
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
        T* out = out_row(p, ch, j) + e0;
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
QSK_TARGET_AVX2 void group_avx2(const Problem<T>& p, const Chunk& ch, std::vector<float>& s,
                                std::vector<float>& scratch) {
  const int64_t L = ch.L, G = ch.G, Ev = p.Ev, Gp = lanes8(G);
  alignas(32) float mx[kMaxGp], inv[kMaxGp];
  softmax_weights(p, ch, s.data(), scratch.data(), mx, inv);
  const T* vg = p.v + ch.b * p.vb + ch.g * p.vh;
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
        T* out = out_row(p, ch, j) + e0;
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(o[jj][i]);
      }
    }
  }
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                bool is_causal) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    QSK_CHECK_DEVICE((*t), at::kCPU);
    QSK_CHECK_DIM((*t), 4);
  }
  QSK_CHECK_FLOAT(q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention_kernel: q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "attention_kernel: q, k and v must have one batch size");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0 && v.size(1) == k.size(1),
              "attention_kernel: q's heads must be a multiple of k's and v's (equal) heads, got ", q.size(1), ", ",
              k.size(1), ", ", v.size(1));
  TORCH_CHECK(k.size(3) == q.size(3), "attention_kernel: q and k must have one head dim, got ", q.size(3), " and ",
              k.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), "attention_kernel: k and v must have one key count, got ", k.size(2), " and ",
              v.size(2));
  TORCH_CHECK(k.size(2) < (int64_t{1} << 31), "attention_kernel: at most 2^31 - 1 keys, got ", k.size(2));
  if (!mask) return;
  TORCH_CHECK(!is_causal, "attention_kernel: pass a mask or is_causal, not both (as torch's SDPA)");
  const at::Tensor& m = *mask;
  QSK_CHECK_DEVICE(m, at::kCPU);
  TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type() || m.scalar_type() == at::kFloat,
              "attention_kernel: mask must be bool, float32 or q's dtype, got ", m.scalar_type());
  TORCH_CHECK(m.dim() <= 4, "attention_kernel: mask must have at most 4 dims, got ", m.dim());
  const int64_t want[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
  for (int64_t i = 0; i < m.dim(); ++i) {
    const int64_t d = m.size(m.dim() - 1 - i), w = want[3 - i];
    TORCH_CHECK(d == 1 || d == w, "attention_kernel: mask of shape ", m.sizes(), " does not broadcast to [", want[0],
                ", ", want[1], ", ", want[2], ", ", want[3], "]");
  }
}

at::Tensor attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         const std::optional<at::Tensor>& mask, double scale, bool is_causal) {
  check_args(q_in, k_in, v_in, mask, is_causal);
  TORCH_CHECK(std::isfinite(scale), "attention_kernel: scale must be finite, got ", scale);
  const auto last_contiguous = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor q = last_contiguous(q_in), k = last_contiguous(k_in), v = last_contiguous(v_in);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Hkv = k.size(1), L = k.size(2), E = q.size(3),
                Ev = v.size(3);
  auto out = at::empty({B, H, T, Ev}, q.options());
  if (out.numel() == 0) return out;
  at::Tensor m;
  if (mask) m = mask->expand({B, H, T, L});
  const Isa level = isa();
  const int64_t Hg = H / Hkv;
  // Positions per chunk: as many as fill kMaxGp lanes (the vector paths' limit); one for the
  // portable path's more than kMaxGp heads per key-value head.
  const int64_t per_chunk = std::max<int64_t>(1, kMaxGp / Hg);
  const int64_t chunks = (T + per_chunk - 1) / per_chunk;
  QSK_DISPATCH_FLOAT(q.scalar_type(), "attention_cpu", [&] {
    Problem<scalar_t> p{};
    p.q = q.data_ptr<scalar_t>();
    p.k = k.data_ptr<scalar_t>();
    p.v = v.data_ptr<scalar_t>();
    p.out = out.data_ptr<scalar_t>();
    p.Hg = Hg, p.E = E, p.Ev = Ev;
    p.qb = q.stride(0), p.qh = q.stride(1), p.qt = q.stride(2), p.kb = k.stride(0), p.kh = k.stride(1);
    p.kl = k.stride(2), p.vb = v.stride(0), p.vh = v.stride(1), p.vl = v.stride(2);
    p.ob = out.stride(0), p.oh = out.stride(1), p.ot = out.stride(2);
    p.causal = is_causal;
    p.scale = static_cast<float>(scale);
    if (m.defined()) {
      if (m.scalar_type() == at::kBool)
        p.mask_bool = m.data_ptr<bool>();
      else if (m.scalar_type() == at::kFloat)
        p.mask_f32 = m.data_ptr<float>();
      else
        p.mask_same = m.data_ptr<scalar_t>();
      p.mb = m.stride(0), p.mh = m.stride(1), p.mt = m.stride(2), p.ml = m.stride(3);
    }
    const auto chunk_of = [&](int64_t task) {
      const int64_t b = task / (Hkv * chunks), g = task / chunks % Hkv, t0 = task % chunks * per_chunk;
      const int64_t nt = std::min(per_chunk, T - t0);
      return Chunk{b, g, t0, nt, nt * Hg, is_causal ? std::min(L, t0 + nt) : L};
    };
    // Enough tasks per thread to be worth an OpenMP fork (~64K multiply-adds).
    const int64_t work = std::max<int64_t>(1, per_chunk * Hg * L * (E + Ev));
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / work);
    at::parallel_for(0, B * Hkv * chunks, grain, [&](int64_t t0, int64_t t1) {
      const int64_t Gp = lanes8(std::min(T, per_chunk) * Hg);
      std::vector<float> s(static_cast<size_t>(Gp * std::max<int64_t>(L, 1)));
      std::vector<float> scratch(static_cast<size_t>(std::max(Gp * E + kKeyBatch * E, std::max<int64_t>(Ev, 32))));
      for (int64_t t = t0; t < t1; ++t) {
        const Chunk ch = chunk_of(t);
        if (level == Isa::Avx512 && lanes8(ch.G) <= kMaxGp)
          group_avx512(p, ch, s, scratch);
        else if (level == Isa::Avx2 && lanes8(ch.G) <= kMaxGp)
          group_avx2(p, ch, s, scratch);
        else
          group_scalar(p, ch, s, scratch);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace qsk::cpu

TORCH_LIBRARY_IMPL(qsparse, CPU, m) { m.impl("attention_kernel", &qsk::cpu::attention_cpu); }
