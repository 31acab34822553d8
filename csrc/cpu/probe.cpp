/* Memory read-bandwidth probe for the benchmarks: the ceiling that the "share of bandwidth"
 * of every memory-bound kernel is measured against.
 *
 * Why native: torch's sum over a large buffer is bound by its own float adds on a few cores,
 * so it understated the ceiling and the kernels' share came out above 100%. This loop does one
 * XOR per load. The load width matters: on a 2-core Xeon (Emerald Rapids) one thread read
 * 11.6 GB/s with 16-byte (SSE2) loads and 17.7 GB/s with 64-byte (AVX-512) loads, since a
 * core has a fixed number of misses in flight and wider loads issue them sooner. So the
 * widest vector the CPU has is picked at run time (GCC/Clang function targets).
 */
#include <omp.h>
#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PQ_PROBE_X86 1
#endif

#include "pq.h"

namespace {
/* Each thread splits its lines into kStreams equal parts and reads them in lock step, one
 * line of each in turn; the lines left over (fewer than kStreams) follow. One sequential
 * stream per thread read 21-30 GB/s on a 2-core Emerald Rapids VM where eight read 40-42
 * (and fp32 F.linear, an MKL GEMV over 2 GB of weights, 30-40): DRAM pages and the
 * prefetchers serve several streams at once, and the kernels read several weight rows at
 * once too. With one stream the "share of bandwidth" of the kernels came out ~1.35x too
 * high. */
constexpr int kStreams = 8;

/* The loop over lines [lo, hi) of p in kStreams streams, `q` naming each line in turn. A
 * macro, not a lambda: a lambda would not inherit the functions' target attributes. */
#define PQ_FOR_LINES(p, lo, hi, q, body)                                  \
  do {                                                                     \
    const int64_t per_ = ((hi) - (lo)) / kStreams;                         \
    for (int64_t l_ = 0; l_ < per_; ++l_)                                  \
      for (int s_ = 0; s_ < kStreams; ++s_) {                              \
        const uint64_t* q = (p) + ((lo) + s_ * per_ + l_) * 8;             \
        body;                                                              \
      }                                                                    \
    for (int64_t l_ = (lo) + kStreams * per_; l_ < (hi); ++l_) {           \
      const uint64_t* q = (p) + l_ * 8;                                    \
      body;                                                                \
    }                                                                      \
  } while (0)

/* lines: 64-byte cache lines, split evenly over the threads. Returns the XOR fold. */
uint64_t read_portable(const uint64_t* p, int64_t lines, int n_threads) {
  uint64_t total = 0;
#pragma omp parallel num_threads(n_threads) reduction(^ : total)
  {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    uint64_t a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t lo = lines * t / nt, hi = lines * (t + 1) / nt;
    PQ_FOR_LINES(p, lo, hi, q, for (int j = 0; j < 8; ++j) a[j] ^= q[j]);
    for (int j = 0; j < 8; ++j) total ^= a[j];
  }
  return total;
}
#ifdef PQ_PROBE_X86
__attribute__((target("avx2"))) uint64_t read_avx2(const uint64_t* p, int64_t lines,
                                                    int n_threads) {
  uint64_t total = 0;
#pragma omp parallel num_threads(n_threads) reduction(^ : total)
  {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    const int64_t lo = lines * t / nt, hi = lines * (t + 1) / nt;
    PQ_FOR_LINES(p, lo, hi, q, {
      a0 = _mm256_xor_si256(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
      a1 = _mm256_xor_si256(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 4)));
    });
    a0 = _mm256_xor_si256(a0, a1);
    alignas(32) uint64_t v[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(v), a0);
    total ^= v[0] ^ v[1] ^ v[2] ^ v[3];
  }
  return total;
}
__attribute__((target("avx512f"))) uint64_t read_avx512(const uint64_t* p, int64_t lines,
                                                        int n_threads) {
  uint64_t total = 0;
#pragma omp parallel num_threads(n_threads) reduction(^ : total)
  {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    __m512i a0 = _mm512_setzero_si512();
    const int64_t lo = lines * t / nt, hi = lines * (t + 1) / nt;
    PQ_FOR_LINES(p, lo, hi, q, a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(q)));
    alignas(64) uint64_t v[8];
    _mm512_store_si512(v, a0);
    for (int j = 0; j < 8; ++j) total ^= v[j];
  }
  return total;
}
#endif

}  // namespace

extern "C" int pq_stream_read(const void* data, int64_t bytes, int n_threads,
                              uint64_t* checksum) {
  if ((!data && bytes) || !checksum || bytes < 0 || n_threads < 1) return PQ_ERR_ARG;
  const uint64_t* p = static_cast<const uint64_t*>(data);
  const int64_t words = bytes / 8, lines = words / 8;
  uint64_t total;
#ifdef PQ_PROBE_X86
  if (__builtin_cpu_supports("avx512f"))
    total = read_avx512(p, lines, n_threads);
  else if (__builtin_cpu_supports("avx2"))
    total = read_avx2(p, lines, n_threads);
  else
#endif
    total = read_portable(p, lines, n_threads);
  for (int64_t w = lines * 8; w < words; ++w) total ^= p[w];
  *checksum = total;  // consumed by the caller, so the loads cannot be optimized away
  return PQ_OK;
}
