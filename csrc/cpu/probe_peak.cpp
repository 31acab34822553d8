/* Instruction-peak probe for the benchmarks: the ceiling that the "share of the instruction
 * peak" of every compute-bound kernel is measured against (pq_probe_peak in pq.h).
 *
 * Why measured, not computed from a datasheet: the peak is units x width x clock, and neither
 * the sustained all-core clock of a (virtual) machine nor how many of its units take a given
 * instruction is something the library can read. On a 2-core Zen 4 VM this loop gave one
 * 512-bit VPDPBUSD a cycle per core (64 int8 multiply-adds) at 3.66 GHz, where a datasheet
 * reading of "two 256-bit pipes" could have meant two.
 *
 * Each thread runs kChains independent accumulator chains on register operands (no loads),
 * so the latency of one instruction is hidden by the others and only the issue rate counts:
 * 12 chains cover a 5-cycle latency on 2 units. The operands pass through an empty asm
 * statement each iteration so the compiler cannot fold the loop. */
#include <omp.h>
#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PQ_PEAK_X86 1
#endif

#include "pq.h"

namespace {
constexpr int kChains = 12;
volatile int64_t g_sink;  // the loops' folded results land here, so they are not dead code

#ifdef PQ_PEAK_X86
/* Each function returns a value folded from its accumulators, so the chains stay live. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) int64_t int8_avx512vnni(int64_t iters) {
  __m512i a[kChains], x = _mm512_set1_epi8(3), y = _mm512_set1_epi8(5);
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_epi32(i);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm512_dpbusd_epi32(a[i], x, y);
    __asm__ volatile("" : "+v"(x), "+v"(y));
  }
  for (int i = 1; i < kChains; ++i) a[0] = _mm512_add_epi32(a[0], a[i]);
  return _mm512_reduce_add_epi32(a[0]);
}

/* AVX2 has no int8 dot product: the kernels' sequence is VPMADDUBSW (u8 x s8 pairs -> s16),
 * VPMADDWD by ones (s16 pairs -> s32) and VPADDD, 32 multiply-adds per three instructions.
 * Every chain multiplies its own operand: with one shared operand the compiler would compute
 * the product once per iteration and count it twelve times. The products do not depend on
 * the accumulators, so six chains (16 ymm registers) hide the latency. */
__attribute__((target("avx2"))) int64_t int8_avx2(int64_t iters) {
  constexpr int kAvx2Chains = 6;
  __m256i a[kAvx2Chains], x[kAvx2Chains], y = _mm256_set1_epi8(5),
                          ones = _mm256_set1_epi16(1);
  for (int i = 0; i < kAvx2Chains; ++i) {
    a[i] = _mm256_set1_epi32(i);
    x[i] = _mm256_set1_epi8(static_cast<char>(i + 1));
  }
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 6
    for (int i = 0; i < kAvx2Chains; ++i)
      a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(_mm256_maddubs_epi16(x[i], y), ones));
    __asm__ volatile("" : "+v"(x[0]), "+v"(x[1]), "+v"(x[2]), "+v"(x[3]), "+v"(x[4]),
                     "+v"(x[5]), "+v"(y));
  }
  for (int i = 1; i < kAvx2Chains; ++i) a[0] = _mm256_add_epi32(a[0], a[i]);
  return _mm256_extract_epi32(a[0], 0);
}

__attribute__((target("avx512f,avx512bf16"))) int64_t bf16_avx512(int64_t iters) {
  __m512 a[kChains];
  __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = x;  // bf16 1.0
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, y);
    __asm__ volatile("" : "+v"(x), "+v"(y));
  }
  for (int i = 1; i < kChains; ++i) a[0] = _mm512_add_ps(a[0], a[i]);
  return static_cast<int64_t>(_mm512_reduce_add_ps(a[0]));
}

__attribute__((target("avx512f"))) int64_t fp32_avx512(int64_t iters) {
  __m512 a[kChains], x = _mm512_set1_ps(1.0f), y = _mm512_set1_ps(0.0f);
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm512_fmadd_ps(a[i], x, y);
    __asm__ volatile("" : "+v"(x), "+v"(y));
  }
  for (int i = 1; i < kChains; ++i) a[0] = _mm512_add_ps(a[0], a[i]);
  return static_cast<int64_t>(_mm512_reduce_add_ps(a[0]));
}

__attribute__((target("avx2,fma"))) int64_t fp32_avx2(int64_t iters) {
  __m256 a[kChains], x = _mm256_set1_ps(1.0f), y = _mm256_set1_ps(0.0f);
  for (int i = 0; i < kChains; ++i) a[i] = _mm256_set1_ps(static_cast<float>(i));
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm256_fmadd_ps(a[i], x, y);
    __asm__ volatile("" : "+v"(x), "+v"(y));
  }
  for (int i = 1; i < kChains; ++i) a[0] = _mm256_add_ps(a[0], a[i]);
  alignas(32) float v[8];
  _mm256_store_ps(v, a[0]);
  return static_cast<int64_t>(v[0]);
}
#endif

/* The loop for `unit` on this CPU and the multiply-adds one of its iterations does per
 * thread; null when the CPU has no vector instruction for it. */
using Loop = int64_t (*)(int64_t);
Loop pick(int unit, double* macs_per_iter) {
#ifdef PQ_PEAK_X86
  switch (unit) {
    case PQ_PEAK_INT8:
      if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) {
        *macs_per_iter = kChains * 64.0;
        return int8_avx512vnni;
      }
      if (__builtin_cpu_supports("avx2")) {
        *macs_per_iter = 6 * 32.0;  // int8_avx2's chains
        return int8_avx2;
      }
      break;
    case PQ_PEAK_BF16:
      if (__builtin_cpu_supports("avx512bf16")) {
        *macs_per_iter = kChains * 32.0;
        return bf16_avx512;
      }
      break;
    case PQ_PEAK_FP32:
      if (__builtin_cpu_supports("avx512f")) {
        *macs_per_iter = kChains * 16.0;
        return fp32_avx512;
      }
      if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        *macs_per_iter = kChains * 8.0;
        return fp32_avx2;
      }
      break;
  }
#else
  (void)unit;
  (void)macs_per_iter;
#endif
  return nullptr;
}
}  // namespace

extern "C" int pq_probe_peak(int unit, int64_t iters, int n_threads, double* ops_per_s) {
  if (!ops_per_s || iters < 1 || n_threads < 1 ||
      (unit != PQ_PEAK_FP32 && unit != PQ_PEAK_BF16 && unit != PQ_PEAK_INT8))
    return PQ_ERR_ARG;
  double macs = 0;
  const Loop loop = pick(unit, &macs);
  if (!loop) return PQ_ERR_ISA;
  int64_t fold = 0;
  double t0 = 0, t1 = 0;
  int threads_run = 1;
#pragma omp parallel num_threads(n_threads) reduction(+ : fold)
  {
    // every thread starts and ends between the two barriers, so the wall time between them
    // is the time of the slowest thread: a peak all the threads reach together
#pragma omp barrier
#pragma omp master
    {
      threads_run = omp_get_num_threads();
      t0 = omp_get_wtime();
    }
    fold += loop(iters);
#pragma omp barrier
#pragma omp master
    t1 = omp_get_wtime();
  }
  if (t1 <= t0) return PQ_ERR_ARG;
  // an operation is a multiply or an add, as in the GOP/s of the benchmark rows
  g_sink = fold;
  *ops_per_s = 2.0 * macs * static_cast<double>(iters) * threads_run / (t1 - t0);
  return PQ_OK;
}
