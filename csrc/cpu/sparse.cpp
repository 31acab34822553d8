/* The sparse kernels (2:4 float / int8 / int4 and unstructured), compiled
 * once per ISA like kernels.cpp; the SIMD bodies are in tile_sparse.h. The
 * thread partition is the dense kernels' (common.h: for_each_tile): tasks of
 * whole weight rows, so each thread streams its own slice of the compressed
 * weights, the dominant traffic at decode sizes. */
#include <stdlib.h>
#include <string.h>

#include "../pq.h"
#include "kernels.h"
#include "sparse_decompress.h"
#include "tile_int8.h"
#include "tile_sparse.h"
#include "tile_sparse_bf16_panel.h"
#include "tile_sparse24_fx_panel.h"
#include "tile_sparse_outer.h"
#include "tile_sparse24_gemm.h"

namespace PQ_NS {
namespace {

/* out[m, n] = dot * (row_scale ? row_scale[n] : 1) + (bias ? bias[n] : 0),
 * multiply and add rounded separately (-ffp-contract=off, as kernels.cpp). */
inline float epilogue(float dot, const float* row_scale, const float* bias, int64_t n) {
  const float v = row_scale ? dot * row_scale[n] : dot;
  return bias ? v + bias[n] : v;
}

template <int Kind>
void run24(const float* x, int64_t M, int64_t K, int64_t ldx, const Vals<Kind>& vals,
           const uint8_t* meta, int64_t N, const float* row_scale, const float* bias, float* out,
           int n_threads) {
  const int64_t ldm = (K + 7) / 8;
  const bool simd = simd24(vals);
  for_each_tile(M, N, n_threads, [&](int64_t n, int nr, int64_t m, int mt, bool, int32_t*) {
    dispatch_tile<kTileN>(nr, mt, [&](auto R_, auto T_) {
      constexpr int R = decltype(R_)::value, T = decltype(T_)::value;
      float dot[R][T] = {};
#if defined(PQ_SIMD_AVX512) || defined(PQ_SIMD_AVX2)
      if (simd)
        dot24<R, T>(vals, n, meta, ldm, x + m * ldx, ldx, K, dot);
      else
#endif
        dot24_scalar<R, T>(vals, n, meta, ldm, x + m * ldx, ldx, 0, K / 2, dot);
      (void)simd;
      for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r)
          out[(m + t) * N + n + r] = epilogue(dot[r][t], row_scale, bias, n + r);
    });
  });
}

void sparse24_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const void* values,
                 int values_dtype, const uint8_t* meta, int64_t N, const float* bias, float* out,
                 int n_threads) {
  const int64_t ld = K / 2;
  if (values_dtype == PQ_DTYPE_BF16)
    run24(x, M, K, ldx, Vals<kBF16>{values, ld}, meta, N, nullptr, bias, out, n_threads);
  else if (values_dtype == PQ_DTYPE_F16)
    run24(x, M, K, ldx, Vals<kF16>{values, ld}, meta, N, nullptr, bias, out, n_threads);
  else
    run24(x, M, K, ldx, Vals<kF32>{values, ld}, meta, N, nullptr, bias, out, n_threads);
}

#if defined(PQ_SIMD_AVX512)
/* x row 0 in 24-bit fixed point as three u8 term rows, padded to whole 128-column
 * steps (the padding is x = 0), into the caller's 3 * Kp bytes; false when x is not
 * finite or too small for fixed point (split_row_fixed24). Each balanced term + 128 (the
 * int8 kernels, which take 128 sum(w) off each term's sum), or with offset_digits the
 * digits of X + 2^23 (the int4 kernels, which take it off the hi term's alone). */
bool fixed24_u8(const float* x, int64_t K, int64_t Kp, uint8_t* xu, float s3[3],
                bool offset_digits) {
  int8_t* t[3] = {(int8_t*)xu, (int8_t*)xu + Kp, (int8_t*)xu + 2 * Kp};
  if (offset_digits) {
    if (!split_row_fixed24<true>(x, K, t[0], t[1], t[2], s3)) return false;
    memset(xu + K, 128, (size_t)(Kp - K)); /* X + 2^23 = 128 * 65536 */
    for (int j = 1; j < 3; ++j) memset(xu + j * Kp + K, 0, (size_t)(Kp - K));
    return true;
  }
  if (!split_row_fixed24(x, K, t[0], t[1], t[2], s3)) return false;
  for (int j = 0; j < 3; ++j) memset(xu + j * Kp + K, 0, (size_t)(Kp - K)); /* the padding */
  const __m512i bias8 = _mm512_set1_epi8((char)0x80);
  for (int64_t i = 0; i < 3 * Kp; i += 64)
    _mm512_store_si512(xu + i, _mm512_xor_si512(_mm512_load_si512(xu + i), bias8));
  return true;
}
#endif

#if defined(PQ_SIMD_AVX512) && defined(__AVX512VBMI__)
/* The M = 1 decode path's driver: x into the scratch in fixed point, then
 * tile(n, R-tag, xu, Kp, s3) over the weight-row tiles of for_each_tile.
 * False (nothing written) when x cannot be written in fixed point. */
template <class Tile>
bool run_fx(const float* x, int64_t K, int64_t N, int n_threads, void* work, bool offset_digits,
            Tile tile) {
  const int64_t Kp = (K + 127) / 128 * 128;
  float s3[3];
  uint8_t* xu = (uint8_t*)work;
  if (!fixed24_u8(x, K, Kp, xu, s3, offset_digits)) return false;
  for_each_tile(1, N, n_threads, [&](int64_t n, int nr, int64_t, int, bool, int32_t*) {
    dispatch_tile<kTileN>(nr, 1, [&](auto R_, auto) { tile(n, R_, xu, Kp, s3); });
  });
  return true;
}

/* sparse24_int8_mm at M = 1 through dot24_i8_fx2 (or dot24_i8_fx). The result is the fp32 sum of
 * the three terms' exact dot products (smallest first), times the row scale,
 * plus bias. Returns false (nothing written) when x cannot be written in fixed
 * point (non-finite, or max |x| below 2^-100) or the scratch is not had. */
bool sparse24_int8_fx(const float* x, int64_t K, const int8_t* values_q, const uint8_t* meta,
                      int64_t N, const float* scale, const float* bias, float* out,
                      int n_threads, void* work) {
  const int64_t H = K / 2, ldm = (K + 7) / 8;
  const bool pairs = H % 32 == 0; /* dot24_i8_fx2's whole steps */
  return run_fx(x, K, N, n_threads, work, false, [&](int64_t n, auto R_, const uint8_t* xu,
                                                     int64_t Kp, const float* s3) {
    constexpr int R = decltype(R_)::value;
    int32_t d[R][3];
    if (pairs)
      dot24_i8_fx2<R>(values_q + n * H, H, meta + n * ldm, ldm, xu, Kp, H, d);
    else
      dot24_i8_fx<R>(values_q + n * H, H, meta + n * ldm, ldm, xu, Kp, H, d);
    for (int r = 0; r < R; ++r) {
      const float v = (float)d[r][0] * s3[0] + ((float)d[r][1] * s3[1] + (float)d[r][2] * s3[2]);
      out[n + r] = epilogue(v, scale, bias, n + r);
    }
  });
}
#endif

void sparse24_int8_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* values_q,
                      const uint8_t* meta, int64_t N, const float* scale, const float* bias,
                      float* out, int n_threads, void* work) {
#if defined(PQ_SIMD_AVX512) && defined(__AVX512VBMI__)
  /* work is non-null only at M = 1 with enough of it (dispatch_sparse.cpp) */
  if (work && sparse24_int8_fx(x, K, values_q, meta, N, scale, bias, out, n_threads, work))
    return;
#else
  (void)work;
#endif
  run24(x, M, K, ldx, Vals<kI8>{values_q, K / 2}, meta, N, scale, bias, out, n_threads);
}

#if defined(PQ_SIMD_AVX512) && defined(__AVX512VBMI__)
/* sparse24_int4_mm at M = 1 through dot24_i4_fx2 (G % 32 == 0). */
bool sparse24_int4_fx(const float* x, int64_t K, const uint8_t* packed, const uint8_t* meta,
                      int64_t N, const float* scales, const uint8_t* zeros, int64_t G,
                      const float* bias, float* out, int n_threads, void* work) {
  const int64_t ldm = (K + 7) / 8, ldp = K / 4, ng = K / 2 / G;
  return run_fx(x, K, N, n_threads, work, true, [&](int64_t n, auto R_, const uint8_t* xu,
                                                    int64_t Kp, const float* s3) {
    constexpr int R = decltype(R_)::value;
    float d[R];
    dot24_i4_fx2<R>(packed + n * ldp, ldp, meta + n * ldm, ldm, scales + n * ng, zeros + n * ng,
                    ng, G, xu, Kp, d);
    for (int r = 0; r < R; ++r) out[n + r] = epilogue(d[r] * s3[2], nullptr, bias, n + r);
  });
}
#endif

void sparse24_int4_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed,
                      const uint8_t* meta, int64_t N, const float* scales, const uint8_t* zeros,
                      int64_t G, const float* bias, float* out, int n_threads, void* work) {
#if defined(PQ_SIMD_AVX512) && defined(__AVX512VBMI__)
  if (work && G % 32 == 0 &&
      sparse24_int4_fx(x, K, packed, meta, N, scales, zeros, G, bias, out, n_threads, work))
    return;
#else
  (void)work;
#endif
  const Vals<kI4> v{packed, K / 2, scales, zeros, G, K / 2 / G};
  run24(x, M, K, ldx, v, meta, N, nullptr, bias, out, n_threads);
}

#if defined(PQ_HAVE_SPARSE24_FX_PANELS)
/* Each quad of a whole 2:4 + int8 (bits 8) or + int4 (4) weight into its panel, or back
 * (pq_pack_sparse24_panels). */
void pack_sparse24_panels(int bits, bool unpack, uint8_t* vals, uint8_t* meta, int64_t N,
                          int64_t K, uint8_t* panel_vals, uint8_t* panel_meta, int n_threads) {
  const int64_t quads = N / 4, ldv = K * bits / 16;
  const int threads = quads < n_threads ? (int)quads : n_threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t q = 0; q < quads; ++q)
    panel24_quad(bits, unpack, vals + 4 * q * ldv, ldv, meta + q * K / 2, K / 8, K,
                 panel_vals + 4 * q * ldv, panel_meta + q * K / 2);
}

/* The panels ops' driver. With the workspace (M <= kPanel24FxMaxM, pq.h) and every row of x
 * in fixed point: fx(q, xu, Kp, s3) for each quad q (the x rows' terms at xu, their scales
 * s3[3 m ..]), the quads split evenly over the threads (one stream each, as for_each_tile
 * gives at M = 1). Otherwise each quad goes back into canonical rows on the thread's stack
 * (kPanel24MaxK bounds K) and rows(q, vals, meta) runs the float loop of the canonical op on
 * them: the same arithmetic, for a reorder of L1-sized data a quad. */
constexpr int64_t kPanel24MaxK = 32768;

/* Each quad q of a panel weight back into canonical rows (values [4][K bits / 16], meta
 * [4][K/8]) on the thread's stack (kPanel24MaxK bounds K), then each(q, values, meta), whose
 * int results are or'ed into the return value. Contiguous quads a thread, and the next one's
 * panel prefetched while each() runs on this one's rows: the copy is a burst of reads that
 * does not otherwise overlap the work (without it, 4096 x 4096 int4 at M = 2-8 took ~0.6 ms a
 * call more than the canonical op on one thread; the copy alone, in cache, 0.19 ms). */
template <class Each>
int for_each_quad_rows(int bits, const uint8_t* vals, const uint8_t* meta, int64_t N, int64_t K,
                       int n_threads, Each each) {
  const int64_t quads = N / 4, ldv = K * bits / 16;
  const int threads = quads < n_threads ? (int)quads : n_threads;
  int bad = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : bad)
  {
    alignas(64) uint8_t buf[4 * (kPanel24MaxK / 2 + kPanel24MaxK / 8)]; /* 80 KiB */
    uint8_t* bmeta = buf + 4 * ldv;
#pragma omp for schedule(static)
    for (int64_t q = 0; q < quads; ++q) {
      panel24_quad(bits, true, buf, ldv, bmeta, K / 8, K, (uint8_t*)vals + 4 * q * ldv,
                   (uint8_t*)meta + q * K / 2);
      if (q + 1 < quads) {
        const char* nv = (const char*)vals + 4 * (q + 1) * ldv;
        const char* nm = (const char*)meta + (q + 1) * K / 2;
        for (int64_t b = 0; b < 4 * ldv; b += 64) PQ_PREFETCH_NEXT_TILE(nv + b);
        for (int64_t b = 0; b < K / 2; b += 64) PQ_PREFETCH_NEXT_TILE(nm + b);
      }
      bad |= each(q, (const uint8_t*)buf, (const uint8_t*)bmeta);
    }
  }
  return bad;
}

template <class Fx, class Rows>
void run_panels24(int bits, const float* x, int64_t M, int64_t K, int64_t ldx,
                  const uint8_t* vals, const uint8_t* meta, int64_t N, int n_threads, void* work,
                  Fx fx, Rows rows) {
  const int64_t quads = N / 4;
  const int threads = quads < n_threads ? (int)quads : n_threads;
  if (work) {
    /* The x term rows one line past whole steps apart: at a multiple of 4 KiB the 3 M rows
     * that a block of x rows reads each step share one L1 set (8 ways), and 4 rows of x took
     * 1.5x longer (one quad, in L1: 5.4-5.9 against 3.5-3.7 cycles per 64 columns of a weight
     * row and a row of x). */
    const int64_t Kp = pq::panel24_x_stride(K);
    float s3[3 * pq::kPanel24FxMaxM];
    uint8_t* xu = (uint8_t*)work;
    bool ok = M <= pq::kPanel24FxMaxM;
    for (int64_t m = 0; ok && m < M; ++m)
      ok = fixed24_u8(x + m * ldx, K, Kp, xu + 3 * m * Kp, s3 + 3 * m, bits == 4);
    if (ok) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
      for (int64_t q = 0; q < quads; ++q) fx(q, (const uint8_t*)xu, Kp, (const float*)s3);
      return;
    }
  }
  for_each_quad_rows(bits, vals, meta, N, K, n_threads,
                     [&](int64_t q, const uint8_t* rv, const uint8_t* rm) {
                       rows(q, rv, rm);
                       return 0;
                     });
}

/* fx's loops over a quad: both pairs at once, against blocks of up to 2 rows of x
 * (dot(Int<T>, xu + 3 m0 Kp, m0); at M = 1 the quad loops). A pair alone reads every other
 * line of the quad: the two passes at M = 1 took 1.7x as long from memory (one thread, int8,
 * 4096 x 4096). At M > 1 a pair a pass, 2 (int8) or 4 (int4) rows of x at a time with their
 * accumulators in arrays, then both pairs and 2 rows, named (a 2-core Zen 5, 2 threads,
 * in-process A/B of the builds, geometric mean of both orders, 4096 x 4096 / 4096 x 11008):
 *   int8: 1.70x / 1.54x at M = 2, 1.24x / 1.46x at 4, 1.48x / 1.44x at 8, 1.55x / 1.39x at 16
 *   int4 group 128: 1.40x / 1.42x at 2, 1.32x / 1.28x at 4, 1.37x / 1.27x at 8, 1.57x / 1.47x
 *   at 16.
 * int8 blocks of 1 row (the quad loop for each) were within the noise of 2 at 4096 x 4096 and
 * 0.7-1.0x at 11008. */
template <class Dot>
inline void panel24_fx_quad(int64_t M, int64_t Kp, const uint8_t* xu, Dot dot) {
  for (int64_t m = 0; m < M; m += 2) {
    if (M - m >= 2)
      dot(Int<2>{}, xu + 3 * m * Kp, m);
    else
      dot(Int<1>{}, xu + 3 * m * Kp, m);
  }
}

/* pq_sparse24_panels_decompress: each quad back into canonical rows on the thread's stack,
 * then each row decompressed into out as pq_sparse24_decompress (int8: dense int8 [N, K]) or
 * pq_sparse24_int4_decompress (int4: dense codes [N, K/2]) would from the canonical weight;
 * the same bytes, without a pass of the canonical copy through memory. */
int sparse24_panels_decompress(int bits, const uint8_t* vals, const uint8_t* meta, int64_t N,
                               int64_t K, const uint8_t* zeros, int64_t G, uint8_t* out,
                               int n_threads) {
  const int64_t ldv = K * bits / 16;
  return for_each_quad_rows(bits, vals, meta, N, K, n_threads,
                            [&](int64_t q, const uint8_t* rv, const uint8_t* rm) {
                              int bad = 0;
                              for (int r = 0; r < 4; ++r) {
                                const int64_t n = 4 * q + r;
                                bad |= bits == 8 ? decompress_24_row(rv + r * ldv, rm + r * K / 8,
                                                                     K, (uint8_t*)out + n * K)
                                                 : decompress_24_int4_row(
                                                       rv + r * ldv, rm + r * K / 8,
                                                       zeros + n * (K / 2 / G), K, G,
                                                       out + n * K / 2);
                              }
                              return bad;
                            });
}

/* The float loop of the canonical 2:4 ops over quad q's rows (values v, meta bm), all of x. */
template <int Kind>
void rows24(const Vals<Kind>& v, const uint8_t* bm, int64_t q, const float* x, int64_t M,
            int64_t K, int64_t ldx, int64_t N, const float* scale, const float* bias, float* out) {
  for (int64_t m = 0; m < M; m += kTileM)
    dispatch_tile<4>(4, (int)min64(kTileM, M - m), [&](auto, auto T_) {
      constexpr int T = decltype(T_)::value;
      float dot[4][T] = {};
      dot24<4, T>(v, 0, bm, K / 8, x + m * ldx, ldx, K, dot);
      for (int t = 0; t < T; ++t)
        for (int r = 0; r < 4; ++r)
          out[(m + t) * N + 4 * q + r] = epilogue(dot[r][t], scale, bias, 4 * q + r);
    });
}

void sparse24_int8_panels_mm(const float* x, int64_t M, int64_t K, int64_t ldx,
                             const int8_t* values_q, const uint8_t* meta, int64_t N,
                             const float* scale, const float* bias, float* out, int n_threads,
                             void* work) {
  const uint8_t* pv = (const uint8_t*)values_q;
  run_panels24(
      8, x, M, K, ldx, pv, meta, N, n_threads, work,
      [&](int64_t q, const uint8_t* xu, int64_t Kp, const float* s3) {
        panel24_fx_quad(M, Kp, xu, [&](auto T_, const uint8_t* xb, int64_t m0) {
          constexpr int T = decltype(T_)::value;
          int32_t d[4][T][3];
          dot24_i8_panel<T>(pv + 2 * q * K, meta + q * K / 2, K, xb, Kp, d);
          for (int r = 0; r < 4; ++r)
            for (int t = 0; t < T; ++t) { /* as sparse24_int8_fx */
              const float* s = s3 + 3 * (m0 + t);
              const int64_t n = 4 * q + r;
              const float v = (float)d[r][t][0] * s[0] + ((float)d[r][t][1] * s[1] + (float)d[r][t][2] * s[2]);
              out[(m0 + t) * N + n] = epilogue(v, scale, bias, n);
            }
        });
      },
      [&](int64_t q, const uint8_t* rv, const uint8_t* rm) {
        rows24(Vals<kI8>{rv, K / 2}, rm, q, x, M, K, ldx, N, scale, bias, out);
      });
}

void sparse24_int4_panels_mm(const float* x, int64_t M, int64_t K, int64_t ldx,
                             const uint8_t* codes, const uint8_t* meta, int64_t N,
                             const float* scales, const uint8_t* zeros, int64_t G,
                             const float* bias, float* out, int n_threads, void* work) {
  const int64_t ng = K / 2 / G;
  run_panels24(
      4, x, M, K, ldx, codes, meta, N, n_threads, work,
      [&](int64_t q, const uint8_t* xu, int64_t Kp, const float* s3) {
        panel24_fx_quad(M, Kp, xu, [&](auto T_, const uint8_t* xb, int64_t m0) {
          constexpr int T = decltype(T_)::value;
          float d[4][T];
          dot24_i4_panel<T>(codes + q * K, meta + q * K / 2, K, scales + 4 * q * ng,
                            zeros + 4 * q * ng, ng, G, xb, Kp, d);
          for (int r = 0; r < 4; ++r)
            for (int t = 0; t < T; ++t) {
              const int64_t n = 4 * q + r;
              out[(m0 + t) * N + n] = epilogue(d[r][t] * s3[3 * (m0 + t) + 2], nullptr, bias, n);
            }
        });
      },
      [&](int64_t q, const uint8_t* rc, const uint8_t* rm) {
        rows24(Vals<kI4>{rc, K / 2, scales + 4 * q * ng, zeros + 4 * q * ng, G, ng}, rm, q, x,
               M, K, ldx, N, nullptr, bias, out);
      });
}
#endif

/* The vdpbf16ps loop (tile_sparse.h) takes bf16 values with activations that are bf16
 * values, narrowed once into a copy that every thread reads: on the calling thread's stack
 * up to kXbStackElems (64 KiB), on the heap up to kXbElems (256 KiB). Rows are then split
 * evenly over the threads, as for_each_tile does at M = 1. The copy lived on each thread's
 * stack and held 32768 values at most, so at K = 11008 only M <= 2 took this loop: M = 4
 * ran the float loop at 6.1 ms (4096 x 11008, two threads) where this loop takes 2.6 ms
 * and the dense path 4.5 ms. */
constexpr int64_t kXbStackElems = 32768, kXbElems = 131072;

/* One weight row at a time, against up to kTileM rows of x. A row's consistency is checked
 * before its values are read where a wrong bitmask could take a loop past the values
 * (unstructured_row_ok), else after the loop, from the offset its values ended at
 * (unstructured_row_bounded); an inconsistent row fails the op either way. */
template <int Kind>
bool run_unstructured(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* bitmask,
                      const Vals<Kind>& vals, int64_t nnz, const int64_t* off, int64_t N,
                      const float* bias, float* out, int n_threads) {
  const int64_t ldb = (K + 7) / 8;
  int bad = 0;
  /* Row n against activation rows m..m+mt-1: dot(T_, bm, dot) fills dot[T] and returns the
   * offset the row's values ended at. */
  auto row = [&](int64_t n, int64_t m, int mt, auto&& dot_of) {
    const uint8_t* bm = bitmask + n * ldb;
    if (!unstructured_row_bounded(bm, K, off[n], off[n + 1], nnz) &&
        !unstructured_row_ok(bm, K, off[n], off[n + 1], nnz)) { /* sparse_decompress.h */
      __atomic_store_n(&bad, 1, __ATOMIC_RELAXED);
      return;
    }
    dispatch_tile<1>(1, mt, [&](auto, auto T_) {
      constexpr int T = decltype(T_)::value;
      float dot[T];
      if (dot_of(T_, bm, dot) != off[n + 1]) {
        __atomic_store_n(&bad, 1, __ATOMIC_RELAXED);
        return;
      }
      for (int t = 0; t < T; ++t) out[(m + t) * N + n] = epilogue(dot[t], nullptr, bias, n);
    });
  };
#if defined(PQ_UNSTRUCTURED_BF16_DOT)
  const int64_t ldxb = ceil_div(K, (int64_t)32) * 32;
  if constexpr (Kind == kBF16)
  if (M * ldxb <= kXbElems && rows_are_bf16(x, M, K, ldx)) {
    alignas(64) uint16_t on_stack[kXbStackElems];
    uint16_t* heap = M * ldxb > kXbStackElems
                         ? (uint16_t*)aligned_alloc(64, (size_t)ceil_div(M * ldxb * 2, 64) * 64)
                         : nullptr;
    const uint16_t* xb = heap ? heap : on_stack;
    if (heap || M * ldxb <= kXbStackElems) { /* else no memory: the float loop below */
      narrow_rows_bf16(x, M, K, ldx, heap ? heap : on_stack, ldxb);
      const int threads = N < n_threads ? (int)N : n_threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t m = 0; m < M; m += kTileM)
          row(n, m, (int)min64(kTileM, M - m), [&](auto T_, const uint8_t* bm, float* dot) {
            return dot_unstructured_bf16<decltype(T_)::value>(
                vals, nnz, bm, K, off[n], off[n + 1] - off[n], xb + m * ldxb, ldxb, dot);
          });
      free(heap);
      return !bad;
    }
  }
#endif
  for_each_tile(M, N, n_threads, [&](int64_t n0, int nr, int64_t m, int mt, bool, int32_t*) {
    for (int64_t n = n0; n < n0 + nr; ++n)
      row(n, m, mt, [&](auto T_, const uint8_t* bm, float* dot) {
        return dot_unstructured<decltype(T_)::value>(vals, nnz, bm, K, off[n],
                                                     off[n + 1] - off[n], x + m * ldx, ldx, dot);
      });
  });
  return !bad;
}

bool sparse_unstructured_mm(const float* x, int64_t M, int64_t K, int64_t ldx,
                            const uint8_t* bitmask, const void* values, int values_dtype,
                            int64_t nnz, const int64_t* off, int64_t N, const float* bias,
                            float* out, int n_threads) {
  if (values_dtype == PQ_DTYPE_BF16)
    return run_unstructured(x, M, K, ldx, bitmask, Vals<kBF16>{values, 0}, nnz, off, N, bias, out,
                            n_threads);
  if (values_dtype == PQ_DTYPE_F16)
    return run_unstructured(x, M, K, ldx, bitmask, Vals<kF16>{values, 0}, nnz, off, N, bias, out,
                            n_threads);
  return run_unstructured(x, M, K, ldx, bitmask, Vals<kF32>{values, 0}, nnz, off, N, bias, out,
                          n_threads);
}

#if defined(PQ_HAVE_SPARSE_OUTER)
int sparse_unstructured_gemm(const float* x, int64_t M, int64_t K, int64_t ldx,
                             const uint8_t* bitmask, const void* values, int values_dtype,
                             int64_t nnz, const int64_t* off, int64_t N, const float* bias,
                             float* out, void* work, int n_threads) {
  if (values_dtype == PQ_DTYPE_BF16)
    return outer_unstructured<kBF16>(x, M, K, ldx, bitmask, values, nnz, off, N, bias, out, work,
                                     n_threads);
  if (values_dtype == PQ_DTYPE_F16)
    return outer_unstructured<kF16>(x, M, K, ldx, bitmask, values, nnz, off, N, bias, out, work,
                                    n_threads);
  return outer_unstructured<kF32>(x, M, K, ldx, bitmask, values, nnz, off, N, bias, out, work,
                                  n_threads);
}
#endif

#if defined(PQ_HAVE_SPARSE24_GEMM)
int sparse24_gemm(const float* x, int64_t M, int64_t K, int64_t ldx, const void* values,
                  int values_dtype, const uint8_t* meta, int64_t N, const float* bias, float* out,
                  void* work, int n_threads) {
  if (values_dtype == PQ_DTYPE_BF16)
    return s24_gemm<kBF16>(x, M, K, ldx, values, meta, N, bias, out, work, n_threads);
  if (values_dtype == PQ_DTYPE_F16)
    return s24_gemm<kF16>(x, M, K, ldx, values, meta, N, bias, out, work, n_threads);
  return s24_gemm<kF32>(x, M, K, ldx, values, meta, N, bias, out, work, n_threads);
}
#endif

int sparse24_decompress(const void* values, int elem_bytes, const uint8_t* meta, int64_t N,
                         int64_t K, void* out, int n_threads) {
  if (elem_bytes == 1)
    return decompress_24((const uint8_t*)values, meta, N, K, (uint8_t*)out, n_threads);
  if (elem_bytes == 2)
    return decompress_24((const uint16_t*)values, meta, N, K, (uint16_t*)out, n_threads);
  return decompress_24((const uint32_t*)values, meta, N, K, (uint32_t*)out, n_threads);
}

int sparse_unstructured_decompress(const uint8_t* bitmask, const void* values, int elem_bytes,
                                   int64_t nnz, const int64_t* off, int64_t N, int64_t K,
                                   void* out, int n_threads) {
  if (elem_bytes == 2)
    return decompress_unstructured(bitmask, (const uint16_t*)values, nnz, off, N, K,
                                   (uint16_t*)out, n_threads);
  return decompress_unstructured(bitmask, (const uint32_t*)values, nnz, off, N, K,
                                 (uint32_t*)out, n_threads);
}

}  // namespace

extern const pq::SparseKernelTable kSparseKernels = {
    sparse24_mm,          sparse24_int8_mm,    sparse24_int4_mm,
    sparse_unstructured_mm, sparse24_decompress, sparse_unstructured_decompress,
    decompress_24_int4,
#ifdef PQ_HAVE_SPARSE24_BF16_PANELS
    sparse24_bf16_panel_mm, sparse_unstructured_bf16_panel_mm,
#else
    nullptr, nullptr,
#endif
#ifdef PQ_HAVE_SPARSE24_FX_PANELS
    sparse24_int8_panels_mm, sparse24_int4_panels_mm, pack_sparse24_panels,
    sparse24_panels_decompress,
#else
    nullptr, nullptr, nullptr, nullptr,
#endif
#if defined(PQ_HAVE_SPARSE_OUTER)
    sparse_unstructured_gemm,
#else
    nullptr,
#endif
#if defined(PQ_HAVE_SPARSE24_GEMM)
    sparse24_gemm,
#else
    nullptr,
#endif
};

}  // namespace PQ_NS
