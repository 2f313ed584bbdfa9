// Evicts a tensor's bytes from every cache level (clflush each 64-byte line), for the benchmark
// harness: a weight flushed before a timed call is read from DRAM, while the code, the
// interpreter's state and the activations stay as warm as in a real decode step.
#include "qsk/cache_flush.h"

#include <c10/util/Exception.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#endif

namespace qsk::cpu {

void flush_cache(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "flush_cache: t must be a CPU tensor, got ", t.device());
  if (!t.has_storage()) return;
  const auto& st = t.storage();
  const char* p = static_cast<const char*>(st.data());
  const size_t n = st.nbytes();
  if (p == nullptr || n == 0) return;
#if defined(__x86_64__) || defined(_M_X64)
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + n;
  for (uintptr_t a = first; a < end; a += 64) _mm_clflush(reinterpret_cast<const void*>(a));  // SSE2: baseline
  _mm_mfence();
#else
  TORCH_CHECK(false, "flush_cache: only implemented on x86-64");
#endif
}

}  // namespace qsk::cpu
