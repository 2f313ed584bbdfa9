// Per-row top-k selection by magnitude on the CPU: the routine every CPU top-K kernel calls
// (topk_sparsify, sparse_linear, the fused ternary kernel).
//
// Ordering (SPEC 1): entries are ranked by their magnitude key, the float32 bits of |x| with the
// sign cleared (`mag_key` in cpu_common.h). Integer order of the key is magnitude order and puts
// NaN above +Inf, as torch.topk does. bf16 / fp16 inputs are widened to float32 first, which is
// exact and keeps the order (NaN stays NaN). Every NaN, whatever its payload, has the same key.
// Ties: exactly k entries are kept; among the entries whose key equals the k-th largest key (equal
// magnitudes, or NaNs of any payload), the lowest indices are kept. The result is a deterministic function of (x, k), identical for every
// ISA path and thread count.
//
// Algorithm (no sort, O(d)): radix select over the keys, most significant 8-bit digit first.
// Each round histograms one digit of the current set (the first round's digit is the float
// exponent), keeps the bin holding the target rank and compacts it in one vectorised pass; the
// rounds end when every key bit is fixed (2 rounds for bf16 / fp16, at most 4 for fp32) or a few
// dozen keys are left for std::nth_element. A last vectorised pass writes the kept indices in
// ascending order. At d = 2048 this costs ~1-2 us per row (AVX-512). Rows of at least 64 entries
// find the k-th key by bisection on 16-bit keys instead (a count of the keys >= t per step, 16 or
// 32 per compare): half types on AVX-512 and AVX2 over their own 15-bit keys; float32 on AVX2 over
// the top 15 key bits, then radix rounds on the low 16 bits of the keys sharing those.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "qsk/isa.h"

namespace qsk::cpu {

// uint32 words of scratch that select_topk needs for a row of d entries (two band buffers). Allocate once per thread and reuse it across rows.
inline int64_t select_scratch_words(int64_t d) { return 2 * d; }

// Writes the indices of the k largest-magnitude entries of x[0..d) to kept_idx[0..k), ascending.
//   x         d entries, contiguous; any values (NaN and +-Inf included); not modified.
//   d         0 <= d <= INT32_MAX (indices are int32).
//   k         0 <= k <= d. k == 0 writes nothing; k == d writes 0..d-1.
//   kept_idx  room for k int32 entries.
//   scratch   select_scratch_words(d) uint32 words, clobbered; must not alias x or kept_idx.
//   isa       which implementation runs (default: qsk::cpu::isa(), the run-time detected level).
//             A caller already inside a kernel compiled for one ISA passes that level.
// Thread-safe (no global state): call it concurrently on different rows with different scratch.
// The caller validates the arguments (the ops do, with TORCH_CHECK); this routine only asserts.
void select_topk(const float* x, int64_t d, int64_t k, int32_t* kept_idx, uint32_t* scratch, Isa isa);
void select_topk(const c10::BFloat16* x, int64_t d, int64_t k, int32_t* kept_idx, uint32_t* scratch, Isa isa);
void select_topk(const c10::Half* x, int64_t d, int64_t k, int32_t* kept_idx, uint32_t* scratch, Isa isa);

template <typename T>
inline void select_topk(const T* x, int64_t d, int64_t k, int32_t* kept_idx, uint32_t* scratch) {
  select_topk(x, d, k, kept_idx, scratch, isa());
}

}  // namespace qsk::cpu
