/* 2:4 weights against many rows of fp32 x (pq_sparse24_gemm, AVX512 builds): a GEMM whose
 * lanes run along 16 weight rows and that gathers x by each row's kept positions.
 *
 * Why: the outer-product GEMM (tile_sparse_outer.h) broadcasts each kept value and loads
 * eight zmm of transposed x per value: nine loads per eight FMAs, ~7.6 cycles per kept value
 * at M >= 128 where its FMAs need 4. That ran at about 45% of MKL's efficiency per product,
 * so at half the products it was only even with the dense path (decompress, fp32 F.linear),
 * and both were 0.86-0.99x fp32 F.linear on the dense weight from M = 512.
 *
 * How: a panel is 16 weight rows; per group g of 4 columns it holds the rows' first and
 * second kept values as two zmm (v0, v1) and their positions in the group as two zmm of
 * dwords (i0, i1: vpermilps reads bits 0-1 of each dword). For a row m of x, one 16-byte
 * broadcast puts x[m][4g .. 4g + 3] in every 128-bit lane, and vpermilps by i0 and by i1
 * gathers each row's two x values: per (m, g) one load, two shuffles and two FMAs do 32 of
 * the 64 products of a dense 16 x 4 step. The shuffles and FMAs share the two vector ports,
 * so the loop's floor is 2 cycles per (m, g), the speed of a dense FMA loop at its peak: in
 * L1 (T = 12 rows of x, one thread, Granite Rapids) it ran 2.01-2.06 cycles per (m, g).
 *
 * Tasks: up to kS24Mb rows of x (blocks as even as the tiles of 12 rows allow) x up to
 * kS24Nb weight rows (fewer, then smaller blocks of x, where that leaves under four tasks a
 * thread), x-block-major, so the threads read the same rows of x while their weights
 * stream. Per task and chunk of kS24Kc columns the task's panels are packed into the thread's
 * buffer (values converted to fp32, 16 x 16 transposes); then for each tile of T rows of x
 * (in L1 across the panels) every panel runs its T x 16 outputs, whose sums wait in out
 * between chunks. x is read where it lies.
 *
 * Measured (2 threads, Granite Rapids, against fp32 F.linear on the dense weight, pyquant
 * bench): 1.26-1.42x at M = 64, 1.16-1.23x at 128, 1.07-1.13x at 512, 1.01-1.08x at 1024;
 * in-process A/B against the outer-product GEMM it replaced, geometric
 * mean of both orders, 1.04-1.12x at M = 128 and 1.10-1.16x at 1024. One thread at M = 960:
 * the packing is ~8% of the call (a call without it: 93% of the in-L1 loop's speed). Tried
 * and not kept: chunks of 256 or 1024 columns (within noise), the panels outer and the tiles
 * of x inner (0.87-0.97x), 8 or 16 rows of x a tile (within noise), blocks of 240 rows of x
 * (more packing passes: 0.95-1.0x at M = 512-1024), prefetching the values in the packing
 * (slower: 0.8-0.9x of its time).
 *
 * Arithmetic: each output is the fused multiply-add chain over the groups in k order, the
 * first kept value of a group before the second, then + bias: the same bits at every M and
 * thread count. Meta that is not canonical adds up as the row kernels take it. No product
 * with a pruned weight is formed, so x with an Inf or NaN is not taken (status 2; the caller
 * runs the other path), as in tile_sparse_outer.h. */
#ifndef PQ_CPU_TILE_SPARSE24_GEMM_H
#define PQ_CPU_TILE_SPARSE24_GEMM_H
#include <omp.h>
#include "common.h"
#include "kernels.h"
#include "tile_sparse.h"

#if defined(PQ_SIMD_AVX512)
#define PQ_HAVE_SPARSE24_GEMM 1

namespace PQ_NS {
namespace {

using pq::kS24Kc;
using pq::kS24Mb;
using pq::kS24Nb;
constexpr int kS24T = 12;                  /* rows of x a tile: 12 accumulators */
constexpr int64_t kS24GroupFloats = 64;    /* v0, v1, i0, i1 of one group of a panel */

/* True when rows 0..M-1 of x hold no Inf or NaN. */
inline bool s24_x_finite(const float* x, int64_t M, int64_t K, int64_t ldx, int n_threads) {
  int bad = 0;
  const int threads = M < n_threads ? (int)M : n_threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1) \
    reduction(| : bad)
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * ldx;
    __mmask16 any = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 km = (__mmask16)(K - k >= 16 ? 0xFFFF : (1u << (K - k)) - 1);
      any |= _mm512_mask_fpclass_ps_mask(km, _mm512_maskz_loadu_ps(km, r + k), 0x99);
    }
    bad |= any != 0;
  }
  return !bad;
}

/* 16 values of a row from j, as fp32 (kn of them; zeros past). */
template <int Kind>
inline __m512 s24_values(const void* p, int64_t j, int kn) {
  const __mmask16 m = (__mmask16)(kn >= 16 ? 0xFFFF : (1u << kn) - 1);
  if constexpr (Kind == kF32) return _mm512_maskz_loadu_ps(m, (const float*)p + j);
  const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)p + j);
  if constexpr (Kind == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h); /* kF16 */
}

/* Packs rows n0 .. n0 + nr - 1 (nr <= 16; rows past are zeros), groups g0 .. g0 + ng - 1, into
 * dst: per group, v0[16], v1[16], i0[16], i1[16] (see above). vals [N][K/2] of Kind, meta
 * [N][ldm] (a row's group g is the nibble at bits 4 (g % 2) of byte g / 2). g0 % 16 == 0. */
template <int Kind>
inline void s24_pack_panel(const void* vals, const uint8_t* meta, int64_t ldm, int64_t K,
                           int64_t n0, int nr, int64_t g0, int64_t ng, float* dst) {
  const int64_t ldv = K / 2;
  for (int64_t gb = 0; gb < ng; gb += 8) { /* 8 groups: 16 kept values a row */
    const int kn = (int)min64(16, 2 * (ng - gb));
    __m512i r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = i < nr ? _mm512_castps_si512(s24_values<Kind>(vals, (n0 + i) * ldv + 2 * (g0 + gb), kn))
                    : _mm512_setzero_si512();
    transpose16x16(r); /* r[j]: kept value j of the 8 groups, 16 rows */
    for (int q = 0; q < kn / 2; ++q) {
      _mm512_store_si512(dst + (gb + q) * kS24GroupFloats, r[2 * q]);
      _mm512_store_si512(dst + (gb + q) * kS24GroupFloats + 16, r[2 * q + 1]);
    }
  }
  for (int64_t gb = 0; gb < ng; gb += 128) { /* 128 groups: 64 bytes of meta a row */
    const int64_t bytes = min64(64, ldm - (g0 + gb) / 2);
    const __mmask64 bm = bytes >= 64 ? ~0ull : (1ull << bytes) - 1;
    __m512i r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = i < nr ? _mm512_maskz_loadu_epi8(bm, meta + (n0 + i) * ldm + (g0 + gb) / 2)
                    : _mm512_setzero_si512();
    transpose16x16(r); /* r[d]: dword d of the 16 rows' meta, groups 8 d .. 8 d + 7 */
    for (int64_t d = 0; d < 16 && gb + 8 * d < ng; ++d)
      for (int q = 0; q < 8 && gb + 8 * d + q < ng; ++q) {
        float* g = dst + (gb + 8 * d + q) * kS24GroupFloats;
        _mm512_store_si512(g + 32, _mm512_srli_epi32(r[d], 4 * q));
        _mm512_store_si512(g + 48, _mm512_srli_epi32(r[d], 4 * q + 2));
      }
  }
}

/* T rows of x (from x, row stride ldx, at the chunk's first column) against one packed panel
 * chunk of ng groups: out[t][0..15] (+)= the products (nm: the panel's rows that exist). */
template <int T>
inline void s24_tile(const float* panel, int64_t ng, const float* x, int64_t ldx, float* out,
                     int64_t ldo, __mmask16 nm, bool first, const float* bias) {
  __m512 acc[T];
  for (int t = 0; t < T; ++t)
    acc[t] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(nm, out + t * ldo);
  for (int64_t g = 0; g < ng; ++g) {
    const float* p = panel + g * kS24GroupFloats;
    const __m512 v0 = _mm512_load_ps(p), v1 = _mm512_load_ps(p + 16);
    const __m512i i0 = _mm512_load_si512(p + 32), i1 = _mm512_load_si512(p + 48);
    for (int t = 0; t < T; ++t) {
      const __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(x + t * ldx + 4 * g));
      acc[t] = _mm512_fmadd_ps(_mm512_permutevar_ps(xb, i0), v0, acc[t]);
      acc[t] = _mm512_fmadd_ps(_mm512_permutevar_ps(xb, i1), v1, acc[t]);
    }
  }
  const __m512 b = bias ? _mm512_maskz_loadu_ps(nm, bias) : _mm512_setzero_ps();
  for (int t = 0; t < T; ++t)
    _mm512_mask_storeu_ps(out + t * ldo, nm, bias ? _mm512_add_ps(acc[t], b) : acc[t]);
}

/* out[M][N] = x[M][K] (row stride ldx) times the 2:4 weight (values [N][K/2] of Kind, meta
 * [N][ceil(K/8)]) transposed, + bias. work: n_threads x pq::s24_thread_bytes(), 64-byte
 * aligned. 0, or 2 for x with an Inf or NaN (nothing written). K % 4 == 0. */
template <int Kind>
int s24_gemm(const float* x, int64_t M, int64_t K, int64_t ldx, const void* vals,
             const uint8_t* meta, int64_t N, const float* bias, float* out, void* work,
             int n_threads) {
  if (!s24_x_finite(x, M, K, ldx, n_threads)) return 2;
  const int64_t ldm = (K + 7) / 8, G = K / 4;
  /* About four tasks a thread where the shape allows: weight rows a task down to one panel,
   * then more blocks of x rows (two threads keep 256 rows and blocks of up to 960 rows). The
   * blocks of x rows are as even as tiles allow: 1024 rows run as 2 x 512, not 960 + 64. The
   * sums do not depend on the split. */
  const int64_t want = 4 * (int64_t)n_threads;
  const int64_t nb = max64(16, min64(kS24Nb, ceil_div(ceil_div(N, want), (int64_t)16) * 16));
  const int64_t n_tasks = ceil_div(N, nb);
  const int64_t m_blocks = max64(ceil_div(M, kS24Mb),
                                 min64(ceil_div(M, (int64_t)kS24T), ceil_div(want, n_tasks)));
  const int64_t mb = ceil_div(ceil_div(M, m_blocks), (int64_t)kS24T) * kS24T;
  const int64_t tasks = ceil_div(M, mb) * n_tasks;
  const int threads = tasks < n_threads ? (int)tasks : n_threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    float* buf = (float*)((uint8_t*)work +
                          (threads > 1 ? omp_get_thread_num() : 0) * pq::s24_thread_bytes());
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t m_lo = task / n_tasks * mb, m_hi = min64(m_lo + mb, M);
      const int64_t n_lo = task % n_tasks * nb, n_hi = min64(n_lo + nb, N);
      const int64_t panels = ceil_div(n_hi - n_lo, 16);
      for (int64_t g0 = 0; g0 < G; g0 += kS24Kc / 4) {
        const int64_t ng = min64(kS24Kc / 4, G - g0);
        const bool first = g0 == 0, last = g0 + ng == G;
        for (int64_t p = 0; p < panels; ++p)
          s24_pack_panel<Kind>(vals, meta, ldm, K, n_lo + 16 * p,
                               (int)min64(16, n_hi - n_lo - 16 * p), g0, ng,
                               buf + p * (kS24Kc / 4) * kS24GroupFloats);
        for (int64_t m = m_lo; m < m_hi; m += kS24T) {
          auto run = [&](auto, auto T_) {
            constexpr int T = decltype(T_)::value;
            for (int64_t p = 0; p < panels; ++p) {
              const int64_t n0 = n_lo + 16 * p;
              const int nr = (int)min64(16, n_hi - n0);
              s24_tile<T>(buf + p * (kS24Kc / 4) * kS24GroupFloats, ng, x + m * ldx + 4 * g0,
                          ldx, out + m * N + n0, N, (__mmask16)((1u << nr) - 1), first,
                          last && bias ? bias + n0 : nullptr);
            }
          };
          dispatch_t<1, kS24T>((int)min64(kS24T, m_hi - m), run);
        }
      }
    }
  }
  return 0;
}

}  // namespace
}  // namespace PQ_NS
#endif
#endif /* PQ_CPU_TILE_SPARSE24_GEMM_H */
