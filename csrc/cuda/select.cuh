// Row-wise top-K selection inside a thread block: MSB-first radix select over magnitude keys, then
// an ordered walk that keeps every key above the threshold and the lowest-index ties at it, so
// exactly k are kept, deterministically (SPEC 1). Used as the prologue of the GEMV kernels (each
// block re-derives the kept set of its row: one launch per call) and by the standalone top-K.
//
// Keys are the magnitude bits in the input's own width: |x| bits with the sign cleared, so integer
// order == magnitude order and NaN ranks above +Inf; every NaN payload gets one key (the quiet
// NaN's), so NaNs tie and the lowest index wins among them. bf16 / fp16 keys have 15 bits: two
// 8-bit radix passes; fp32 keys four. The order equals that of the fp32 keys of the converted
// values (the conversion is exact and monotone).
#pragma once

#include <cstdint>

#include "runtime.cuh"

namespace qsk::cuda {

template <typename T>
struct KeyTraits;  // bits: radix width; key(v): magnitude key; value(key): |v| as float

template <>
struct KeyTraits<float> {
  static constexpr int bits = 32;
  __device__ __forceinline__ static unsigned int key(float v) {
    const unsigned int k = __float_as_uint(v) & 0x7fffffffu;
    return k > 0x7f800000u ? 0x7fc00000u : k;
  }
  __device__ __forceinline__ static float value(unsigned int k) { return __uint_as_float(k); }
};

template <>
struct KeyTraits<c10::BFloat16> {
  static constexpr int bits = 16;
  __device__ __forceinline__ static unsigned int key(c10::BFloat16 v) {
    const unsigned int k = v.x & 0x7fffu;
    return k > 0x7f80u ? 0x7fc0u : k;
  }
  __device__ __forceinline__ static float value(unsigned int k) { return __uint_as_float(k << 16); }
};

template <>
struct KeyTraits<c10::Half> {
  static constexpr int bits = 16;
  __device__ __forceinline__ static unsigned int key(c10::Half v) {
    const unsigned int k = v.x & 0x7fffu;
    return k > 0x7c00u ? 0x7e00u : k;
  }
  __device__ __forceinline__ static float value(unsigned int k) {
    return static_cast<float>(c10::Half(static_cast<unsigned short>(k), c10::Half::from_bits()));
  }
};

// SPEC 4: clamp(round_half_even(v), -128, 127), a non-finite product giving 0.
__device__ __forceinline__ int8_t quantize_i8(float v) {
  float r = rintf(v);
  r = (fabsf(r) <= 3.0e38f) ? fminf(fmaxf(r, -128.f), 127.f) : 0.f;
  return static_cast<int8_t>(r);
}

constexpr int kSelectThreads = 256;  // every block that selects has exactly this many threads

struct SelectSmem {
  typename cub::BlockScan<long long, kSelectThreads>::TempStorage scan;
  unsigned int hist[kSelectThreads / 32][256];  // one histogram per warp: fewer atomic collisions
  unsigned int maxkey, prefix;
  long long remaining;
};

// A row of x up to this many bytes is copied into shared memory before the selection passes, which
// then read it from there: one coalesced pass of 16-byte loads instead of 2-4 radix passes plus the
// kept-set walk over global memory (H200, d = 4096 bf16, M = 1, same lease: top-K 12-13.6 us staged
// against 16.4-17.3 us not; ternary_linear 25 us against 29).
constexpr int64_t kStageBytes = 32 * 1024;

// The staging buffer: declare one per block, `__shared__ StageBuf stage;`.
struct alignas(16) StageBuf {
  unsigned char bytes[kStageBytes];
};

// x[0:d] copied into `stage` when it fits (16-byte loads when x is 16-byte aligned), then a block
// barrier; returns the copy, or x itself when the row is larger than the buffer. Every thread of the
// block calls it.
template <typename T>
__device__ __forceinline__ const T* stage_row(const T* __restrict__ x, int64_t d, StageBuf& stage) {
  if (d * static_cast<int64_t>(sizeof(T)) > kStageBytes) return x;
  T* dst = reinterpret_cast<T*>(stage.bytes);
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  int64_t head = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    head = d / V * V;
    const uint4* src4 = reinterpret_cast<const uint4*>(x);
    uint4* dst4 = reinterpret_cast<uint4*>(stage.bytes);
#pragma unroll 8
    for (int64_t i = threadIdx.x; i < head / V; i += kSelectThreads) dst4[i] = src4[i];
  }
#pragma unroll 4
  for (int64_t i = head + threadIdx.x; i < d; i += kSelectThreads) dst[i] = x[i];
  __syncthreads();
  return dst;
}

// The kept set of a row: every key above `thresh`, and the first `take_eq` keys equal to it.
struct Threshold {
  unsigned int thresh;
  long long take_eq;
  unsigned int maxkey;  // the row's largest key (its absmax; the max is always kept when k > 0)
};

// Radix select of the k-th largest key of x[0:d] (0 <= k <= d), and the row's max key. No radix
// pass when k == 0 or k == d (one pass for the max). Every thread of the block calls it.
template <typename T>
__device__ __forceinline__ Threshold select_threshold(const T* __restrict__ x, int64_t d, int64_t k,
                                                      SelectSmem& sm) {
  using K = KeyTraits<T>;
  const int tid = threadIdx.x, warp = tid / 32;
  const bool partial = k > 0 && k < d;
  unsigned int prefix = 0, mask = 0;
  long long remaining = k;
  if (tid == 0) sm.maxkey = 0;
  for (int shift = K::bits - 8; shift >= 0; shift -= 8) {
    const bool first = shift == K::bits - 8;
    if (partial)
      for (int b = tid; b < kSelectThreads / 32 * 256; b += kSelectThreads) (&sm.hist[0][0])[b] = 0;
    __syncthreads();
    unsigned int local_max = 0;
    for (int64_t i = tid; i < d; i += kSelectThreads) {
      const unsigned int key = K::key(x[i]);
      if (first) local_max = max(local_max, key);
      if (partial && (key & mask) == prefix) atomicAdd(&sm.hist[warp][(key >> shift) & 255u], 1u);
    }
    if (first) {
      for (int off = 16; off > 0; off >>= 1) local_max = max(local_max, __shfl_xor_sync(0xffffffffu, local_max, off));
      if ((tid & 31) == 0) atomicMax(&sm.maxkey, local_max);
    }
    __syncthreads();
    if (!partial) break;
    // Parallel bin search: thread t holds bin 255 - t; an exclusive scan from the top bin finds
    // the one bin in which the remaining-th largest key sits.
    const int bin = 255 - tid;
    unsigned int h = 0;
#pragma unroll
    for (int w = 0; w < kSelectThreads / 32; ++w) h += sm.hist[w][bin];
    long long above, all;
    cub::BlockScan<long long, kSelectThreads>(sm.scan).ExclusiveSum(static_cast<long long>(h), above, all);
    if (h > 0 && above < remaining && remaining <= above + h) {
      sm.prefix = prefix | (static_cast<unsigned int>(bin) << shift);
      sm.remaining = remaining - above;
    }
    __syncthreads();
    prefix = sm.prefix;
    remaining = sm.remaining;
    mask |= 255u << shift;
  }
  const unsigned int maxkey = sm.maxkey;
  __syncthreads();  // sm is reused by the caller
  if (partial) return {prefix, remaining, maxkey};
  return k == 0 ? Threshold{0xffffffffu, 0, maxkey} : Threshold{0u, static_cast<long long>(d), maxkey};
}

// Calls f(rank, i, x[i]) for each kept entry whose rank (its position among the kept entries in
// index order) is in [j0, j1), in the thread that owns it; with `dense` non-null every entry of
// dense[0:d] is written (the kept value, or +0). Thread t owns the segment [t * seg, (t + 1) * seg):
// one block scan of the (above, equal) counts gives every thread its first rank.
template <typename T, class F>
__device__ __forceinline__ void for_each_kept(const T* __restrict__ x, int64_t d, const Threshold& th, int64_t j0,
                                              int64_t j1, SelectSmem& sm, T* __restrict__ dense, F&& f) {
  using K = KeyTraits<T>;
  const int64_t seg = (d + kSelectThreads - 1) / kSelectThreads;
  const int64_t b = threadIdx.x * seg, e = min(d, b + seg);
  long long gt = 0, eq = 0;
  for (int64_t i = b; i < e; ++i) {
    const unsigned int key = K::key(x[i]);
    gt += key > th.thresh;
    eq += key == th.thresh;
  }
  long long before, all;
  cub::BlockScan<long long, kSelectThreads>(sm.scan).ExclusiveSum((gt << 32) | eq, before, all);
  __syncthreads();  // the scan storage is free again
  long long eq_seen = before & 0xffffffffLL;
  long long rank = (before >> 32) + min(th.take_eq, eq_seen);
  const long long takes = gt + max(0LL, min(eq, th.take_eq - eq_seen));
  if (!dense && (rank >= j1 || rank + takes <= j0)) return;
  for (int64_t i = b; i < e; ++i) {
    const T v = x[i];
    const unsigned int key = K::key(v);
    bool take = key > th.thresh;
    if (key == th.thresh) take = eq_seen++ < th.take_eq;
    if (dense) dense[i] = take ? v : T(0.f);
    if (take) {
      if (rank >= j0 && rank < j1) f(rank, i, v);
      ++rank;
    }
  }
}

}  // namespace qsk::cuda
