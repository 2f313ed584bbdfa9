// Cache eviction for the benchmark harness (csrc/cpu/cache_flush.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace qsk::cpu {

// Flushes every cache line of t's storage from all cache levels (CPU tensors, x86-64).
void flush_cache(const at::Tensor& t);

}  // namespace qsk::cpu
