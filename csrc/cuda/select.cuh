// Row-wise top-K selection on the GPU: one thread block per row, MSB-first radix select over
// magnitude keys (|x| as float32 bits with the sign cleared: integer order == magnitude order and
// NaN ranks above +Inf, as SPEC requires; every NaN payload the same key), then an ordered
// compaction that keeps every key above the threshold and the lowest-index ties at it, so exactly
// k are kept, deterministically.
#pragma once

#include <cstdint>

#include "runtime.cuh"

namespace qsk::cuda {

// Every NaN, whatever its payload, gets one key (the quiet NaN's bits), so NaNs tie and the
// lowest index wins among them (SPEC 1); as a float it is still NaN (the quantization scale).
__device__ __forceinline__ unsigned int mag_key(float v) {
  const unsigned int k = __float_as_uint(v) & 0x7fffffffu;
  return k > 0x7f800000u ? 0x7fc00000u : k;
}

// SPEC 4: clamp(round_half_even(v), -128, 127), a non-finite product giving 0.
__device__ __forceinline__ int8_t quantize_i8(float v) {
  float r = rintf(v);
  r = (fabsf(r) <= 3.0e38f) ? fminf(fmaxf(r, -128.f), 127.f) : 0.f;
  return static_cast<int8_t>(r);
}

// What a selection writes; any pointer may be null.
struct SelectOut {
  int32_t* idx;       // [rows, k] kept feature indices, ascending
  float* val;         // [rows, k] kept values (as float)
  int8_t* xq;         // [rows, k] kept values quantized to int8 (SPEC 4, over the kept entries)
  float* x_scale;     // [rows] absmax(kept) / 127 (SPEC 4)
  int32_t* xq_sum;    // [rows] sum of the kept int8 values
};

template <int THREADS>
struct SelectSmem {
  typename cub::BlockScan<int, THREADS>::TempStorage scan;
  typename cub::BlockReduce<int, THREADS>::TempStorage reduce;
  unsigned int hist[256];
  unsigned int prefix, remaining, maxkey;
};

// Selects the k largest-magnitude entries of row x[0:d] (d >= 1, 0 <= k <= d) and writes `out`
// at row `row`; `dense` (nullable, [d]) receives the sparsified row (kept entries, +0 elsewhere).
template <typename T, int THREADS>
__device__ void select_row(const T* __restrict__ x, int64_t d, int64_t k, int64_t row, SelectOut out,
                           T* __restrict__ dense, SelectSmem<THREADS>& sm) {
  const int tid = threadIdx.x;
  unsigned int prefix = 0, mask = 0, remaining = static_cast<unsigned int>(k);
  if (tid == 0) sm.maxkey = 0;
  __syncthreads();
  // Radix passes over 8-bit digits, most significant first. Skipped when all or none are kept.
  const bool partial = k > 0 && k < d;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (!partial && shift < 24) break;
    for (int b = tid; b < 256; b += THREADS) sm.hist[b] = 0;
    __syncthreads();
    unsigned int local_max = 0;
    for (int64_t i = tid; i < d; i += THREADS) {
      const unsigned int key = mag_key(static_cast<float>(x[i]));
      local_max = max(local_max, key);
      if (partial && (key & mask) == prefix) atomicAdd(&sm.hist[(key >> shift) & 255u], 1u);
    }
    if (shift == 24) atomicMax(&sm.maxkey, local_max);
    __syncthreads();
    if (!partial) break;
    if (tid == 0) {
      unsigned int cum = 0;
      for (int dg = 255; dg >= 0; --dg) {  // the digit at which the k-th largest key sits
        const unsigned int h = sm.hist[dg];
        if (cum + h >= remaining) {
          sm.prefix = prefix | (static_cast<unsigned int>(dg) << shift);
          sm.remaining = remaining - cum;
          break;
        }
        cum += h;
      }
    }
    __syncthreads();
    prefix = sm.prefix;
    remaining = sm.remaining;
    mask |= 255u << shift;
  }
  // Threshold key and how many of the keys equal to it to keep (the lowest indices).
  const unsigned int thresh = partial ? prefix : (k == 0 ? 0xffffffffu : 0u);
  const unsigned int take_eq = partial ? remaining : (k == 0 ? 0u : 0xffffffffu);

  // Quantization scale over the kept entries: their absmax is the row's (the max is always kept).
  float a = k > 0 ? __uint_as_float(sm.maxkey) : 0.f;
  a = a < 1e-5f ? 1e-5f : a;                        // NaN stays NaN
  const float s = __fmul_rn(__frcp_rn(a), 127.0f);  // torch's `127.0 / a`: reciprocal, then scale

  int eq_before = 0, kept_before = 0, qsum = 0;
  for (int64_t base = 0; base < d; base += THREADS) {
    const int64_t i = base + tid;
    float v = 0.f;
    unsigned int key = 0;
    if (i < d) {
      v = static_cast<float>(x[i]);
      key = mag_key(v);
    }
    const int eq = (i < d && key == thresh) ? 1 : 0;
    int eq_rank, eq_total;
    cub::BlockScan<int, THREADS>(sm.scan).ExclusiveSum(eq, eq_rank, eq_total);
    __syncthreads();
    const bool take = i < d && (key > thresh || (eq && static_cast<unsigned int>(eq_before + eq_rank) < take_eq));
    int pos, kept_total;
    cub::BlockScan<int, THREADS>(sm.scan).ExclusiveSum(take ? 1 : 0, pos, kept_total);
    __syncthreads();
    if (take) {
      const int64_t o = row * k + kept_before + pos;
      if (out.idx) out.idx[o] = static_cast<int32_t>(i);
      if (out.val) out.val[o] = v;
      if (out.xq) {
        const int8_t q = quantize_i8(__fmul_rn(v, s));
        out.xq[o] = q;
        qsum += q;
      }
    }
    if (dense && i < d) dense[i] = take ? x[i] : T(0.f);
    eq_before += eq_total;
    kept_before += kept_total;
  }
  if (out.xq_sum) {
    const int total = cub::BlockReduce<int, THREADS>(sm.reduce).Sum(qsum);
    if (tid == 0) out.xq_sum[row] = total;
  }
  if (out.x_scale && tid == 0) out.x_scale[row] = __fdiv_rn(a, 127.0f);
}

}  // namespace qsk::cuda
