/* Unstructured sparse weights against many rows of fp32 x: a GEMM that does only the kept
 * multiply-adds (AVX512 builds). 2:4 weights ran this way too (one meta word a chunk, 32 kept
 * values, no branch on the data) until the panel GEMM of tile_sparse24_gemm.h replaced it:
 * that one is 1.04-1.12x as fast at M = 128 and 1.10-1.16x at 1024 (in-process A/B), where
 * this one was only even with the dense path.
 *
 * Why: the row kernels of tile_sparse.h place the kept values at their columns and multiply
 * them with x as a dense row would, so their cost grows with M like a dense FMA loop's, and
 * from M = 32 on the layer decompressed its weight and ran fp32 F.linear: at M = 128 and
 * 1024 that took 0.74-0.98x the time of F.linear on the dense weight, the decompression being
 * the difference. At 70% pruned only 30% of the products are needed.
 *
 * How: x is packed transposed, xt[block][k][j] = x[128 block + j][k] (blocks of 128 rows,
 * the last one's width rounded up to 16, zeros past M). A kept value w[n][k] then adds
 * w * xt[k][0..127] to row n of the block's output, held in 8 zmm: one broadcast, eight FMAs
 * with their x operand from memory. K is walked in chunks of 64 (one 64-bit word of a row's
 * bitmask; 64 x 128 floats of xt, 32 KiB, stay in L1) and, per chunk, every weight row of
 * the task: the row's sums wait in the thread's buffer acc[row][128] (L2) between chunks,
 * and its value offset in off[row]. The set bits of the word are walked with tzcnt/blsr.
 * Tasks: a block of activation rows x kOuterRows weight rows, block-major, so that both
 * threads sweep the same packed block while their weights stream.
 *
 * Arithmetic: each output is the sum over kept k of w * x by fused multiply-add in fp32, then
 * + bias: in k order in blocks wider than 64 rows, else (two sets of sums, outer_chunk) as two
 * interleaved partial sums per 64 columns, added at the chunk's end. A product that the row
 * kernels or a dense GEMM would form with a pruned weight is 0 * x, which is NaN for an
 * infinite or NaN x; these kernels form no such product, so x with an Inf or NaN is not taken
 * (the packing says so; the caller runs the other path). */
#ifndef PQ_CPU_TILE_SPARSE_OUTER_H
#define PQ_CPU_TILE_SPARSE_OUTER_H
#include <omp.h>
#include "common.h"
#include "kernels.h"
#include "sparse_decompress.h"
#include "tile_sparse.h"

#if defined(PQ_SIMD_AVX512)
#define PQ_HAVE_SPARSE_OUTER 1

namespace PQ_NS {
namespace {

using pq::kOuterMb;
using pq::kOuterRows;
using pq::outer_thread_bytes;
using pq::outer_xt_floats;
constexpr int64_t kOuterKc = 64; /* columns per chunk: one bitmask word */

/* xt (see above) from rows of x; false when x holds an Inf or NaN. */
inline bool outer_pack_x(const float* x, int64_t M, int64_t K, int64_t ldx, float* xt,
                         int n_threads) {
  const int64_t groups = ceil_div(M, 16), kt = ceil_div(K, 16), tasks = groups * kt;
  int bad = 0;
  const int threads = tasks < n_threads ? (int)tasks : n_threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1) \
    reduction(| : bad)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t g = t / kt, k0 = t % kt * 16, m0 = g * 16;
    const int64_t b = m0 / kOuterMb, j0 = m0 % kOuterMb;
    const int64_t w = min64(kOuterMb, ceil_div(M - b * kOuterMb, 16) * 16);
    const int kn = (int)min64(16, K - k0);
    const __mmask16 kmask = (__mmask16)((1u << kn) - 1);
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
      if (m0 + i < M) {
        const __m512 v = _mm512_maskz_loadu_ps(kmask, x + (m0 + i) * ldx + k0);
        bad |= _mm512_fpclass_ps_mask(v, 0x99) != 0; /* NaN, +-Inf */
        r[i] = _mm512_castps_si512(v);
      } else {
        r[i] = _mm512_setzero_si512();
      }
    }
    transpose16x16(r); /* r[i]: column k0 + i of the 16 rows */
    float* dst = xt + b * kOuterMb * K + k0 * w + j0;
    for (int i = 0; i < kn; ++i) _mm512_storeu_si512(dst + i * w, r[i]);
  }
  return !bad;
}

template <int Kind>
inline __m512 outer_value(const void* p, int64_t o) {
  if constexpr (Kind == kF32) return _mm512_set1_ps(((const float*)p)[o]);
  if constexpr (Kind == kBF16)
    return _mm512_castsi512_ps(_mm512_set1_epi32((int)((uint32_t)((const uint16_t*)p)[o] << 16)));
  return _mm512_cvtph_ps(_mm256_set1_epi16((short)((const uint16_t*)p)[o])); /* kF16 */
}

/* One chunk of one weight row: the kept values of bits `word` (columns kc + bit) into the row's
 * W x 16 sums at acc; o: the row's next value. Up to kOuterTwoSetsMaxW zmm of sums, two kept
 * values a step, into two sets of sums: with one set each sum waits on its previous FMA (4
 * cycles), and at M = 16 (4096 x 4096, 70% pruned, 2 threads) the GEMM took 7.4 ms where two
 * sets take 4.4. An odd count pairs its last value with a zero, whose products are zeros: x is
 * finite here. With 8 zmm the eight FMAs of a value keep the FMA units busy; two sets there
 * ran 1.04-1.11x slower (M = 128 to 1024). Also measured and not kept, against this one
 * (in-process A/B, both shapes, M = 16 to 1024): chunks of 32 columns 1.04-1.31x slower (the
 * per-row cost of a chunk), and chunks of 8 / W words, so 32 KiB of xt each, with the sums in
 * registers across a row's words, 1.06-1.67x slower (the larger L1 footprint at small M);
 * 64 weight rows a task 1.05-1.11x slower, 512 or 1024 no faster (0.98-1.08x); blocks of 64
 * activation rows with 64 weight rows a task (x chunk and sums both in L1) 1.33-1.40x slower at
 * M = 128 and 1024; an L1 prefetch of the next row's sums no faster (0.95-1.07x). With a
 * bitmask word that repeats (predictable trip counts) the loop runs 0.92-0.95x the time at
 * M = 128 and 0.77x at M = 16: the exit mispredicts are not what is left at eight zmm. */
constexpr int kOuterTwoSetsMaxW = 4;

template <int W, int Kind>
PQ_ALWAYS_INLINE inline void outer_chunk(uint64_t word, const void* vals, int64_t& o,
                                         const float* xc, float* acc) {
  constexpr int64_t w = W * 16;
  __m512 a[W];
  for (int j = 0; j < W; ++j) a[j] = _mm512_load_ps(acc + 16 * j);
  int64_t oo = o;
  if constexpr (W <= kOuterTwoSetsMaxW) {
    __m512 b[W];
    for (int j = 0; j < W; ++j) b[j] = _mm512_setzero_ps();
    do {
      const int k0 = __builtin_ctzll(word);
      word &= word - 1;
      const bool two = word != 0;
      const int k1 = two ? __builtin_ctzll(word) : k0;
      word &= word - 1;
      const __m512 v0 = outer_value<Kind>(vals, oo);
      const __m512 v1 = _mm512_maskz_mov_ps(two ? 0xFFFF : 0, outer_value<Kind>(vals, oo + two));
      oo += 1 + two;
      const float* x0 = xc + k0 * w;
      const float* x1 = xc + k1 * w;
      for (int j = 0; j < W; ++j) {
        a[j] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x0 + 16 * j), a[j]);
        b[j] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x1 + 16 * j), b[j]);
      }
    } while (word);
    for (int j = 0; j < W; ++j) a[j] = _mm512_add_ps(a[j], b[j]);
  } else {
    do {
      const int k = __builtin_ctzll(word);
      word &= word - 1;
      const __m512 v = outer_value<Kind>(vals, oo++);
      const float* xr = xc + k * w;
      for (int j = 0; j < W; ++j) a[j] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + 16 * j), a[j]);
    } while (word);
  }
  o = oo;
  for (int j = 0; j < W; ++j) _mm512_store_ps(acc + 16 * j, a[j]);
}

/* Rows n_lo..n_hi-1 of the output for activation block b (rows m0.. of width w = 16 W): per
 * chunk of kOuterKc columns, chunk(r, kc, xc, acc + r * w) adds row n_lo + r's kept products
 * of the chunk (xc: its xt rows) to the row's sums; then out = sum + bias, transposed back
 * 16 x 16. */
template <int W, class Chunk>
void outer_rows(const float* xt_b, int64_t m0, int64_t M, int64_t K, int64_t n_lo, int64_t n_hi,
                int64_t N, const float* bias, float* out, float* acc, Chunk&& chunk) {
  constexpr int64_t w = W * 16;
  const int64_t rows = n_hi - n_lo;
  for (int64_t i = 0; i < rows * w; i += 16) _mm512_store_ps(acc + i, _mm512_setzero_ps());
  for (int64_t kc = 0; kc < K; kc += kOuterKc) {
    const float* xc = xt_b + kc * w;
    for (int64_t r = 0; r < rows; ++r) chunk(r, kc, xc, acc + r * w);
  }
  /* 16 weight rows x 16 activation rows at a time: rows of acc -> rows of out */
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int nr = (int)min64(16, rows - r0);
    const __mmask16 nmask = (__mmask16)((1u << nr) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(nmask, bias + n_lo + r0) : _mm512_setzero_ps();
    for (int j = 0; j < W; ++j) {
      __m512i t[16];
      for (int i = 0; i < 16; ++i)
        t[i] = i < nr ? _mm512_load_si512(acc + (r0 + i) * w + 16 * j) : _mm512_setzero_si512();
      transpose16x16(t); /* t[i]: activation row m0 + 16 j + i, 16 weight rows */
      for (int i = 0; i < 16 && m0 + 16 * j + i < M; ++i) {
        __m512 y = _mm512_castsi512_ps(t[i]);
        if (bias) y = _mm512_add_ps(y, bv);
        _mm512_mask_storeu_ps(out + (m0 + 16 * j + i) * N + n_lo + r0, nmask, y);
      }
    }
  }
}

/* Packs x, then runs task(Int<W>, xt_b, m0, n_lo, n_hi, acc, o) -> bool over (activation
 * block, kOuterRows weight rows) in block-major order. work: 64-byte aligned,
 * outer_work_bytes(M, K, n_threads). Returns 0, 1 when a task returned false, 2 for x with an
 * Inf or NaN (nothing written). */
template <class Task>
int outer_gemm(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t N, void* work,
               int n_threads, Task&& task) {
  float* xt = (float*)work;
  if (!outer_pack_x(x, M, K, ldx, xt, n_threads)) return 2;
  uint8_t* per_thread = (uint8_t*)work + pq::align64(outer_xt_floats(M, K) * 4);
  const int64_t blocks = ceil_div(M, kOuterMb), row_tasks = ceil_div(N, kOuterRows);
  const int64_t tasks = blocks * row_tasks;
  const int threads = tasks < n_threads ? (int)tasks : n_threads;
  int bad = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : bad)
  {
    uint8_t* mine = per_thread + (threads > 1 ? omp_get_thread_num() : 0) * outer_thread_bytes();
    float* acc = (float*)mine;
    int64_t* o = (int64_t*)(mine + kOuterRows * kOuterMb * 4);
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / row_tasks, n_lo = t % row_tasks * kOuterRows;
      const int64_t n_hi = min64(n_lo + kOuterRows, N), m0 = b * kOuterMb;
      const int W = (int)min64(kOuterMb / 16, ceil_div(M - m0, 16));
      bool ok = true;
      auto run = [&](auto, auto W_) { ok = task(W_, xt + m0 * K, m0, n_lo, n_hi, acc, o); };
      dispatch_t<1, kOuterMb / 16>(W, run);
      bad |= !ok;
    }
  }
  return bad ? 1 : 0;
}

/* Unstructured weights (see above). */
template <int Kind>
int outer_unstructured(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* bitmask,
                       const void* vals, int64_t nnz, const int64_t* off, int64_t N,
                       const float* bias, float* out, void* work, int n_threads) {
  const int64_t ldb = (K + 7) / 8;
  return outer_gemm(x, M, K, ldx, N, work, n_threads,
                    [&](auto W_, const float* xt_b, int64_t m0, int64_t n_lo, int64_t n_hi,
                        float* acc, int64_t* o) {
    constexpr int W = decltype(W_)::value;
    for (int64_t n = n_lo; n < n_hi; ++n)
      if (!unstructured_row_ok(bitmask + n * ldb, K, off[n], off[n + 1], nnz)) return false;
    for (int64_t n = n_lo; n < n_hi; ++n) o[n - n_lo] = off[n];
    outer_rows<W>(xt_b, m0, M, K, n_lo, n_hi, N, bias, out, acc,
                  [&](int64_t r, int64_t kc, const float* xc, float* ar) PQ_ALWAYS_INLINE {
      const int64_t byte = kc / 8, left = ldb - byte;
      const uint8_t* bm = bitmask + (n_lo + r) * ldb + byte;
      const uint64_t word = left >= 8 ? load_u64(bm) : load_tail_u64(bm, left);
      if (word) outer_chunk<W, Kind>(word, vals, o[r], xc, ar);
      /* the row's values a line on, into L2: a task walks 256 rows' values at once, more
       * streams than the prefetchers follow (0.93-0.96x the time at M = 128 and 1024) */
      _mm_prefetch((const char*)vals + (o[r] + 16) * (Kind == kF32 ? 4 : 2), _MM_HINT_T1);
    });
    return true;
  });
}

}  // namespace
}  // namespace PQ_NS
#endif
#endif /* PQ_CPU_TILE_SPARSE_OUTER_H */
