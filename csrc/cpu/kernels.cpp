/* The CPU kernels, compiled once per ISA (see CMakeLists.txt): the drivers
 * here are shared; the SIMD bodies are in tile_int8.h / tile_int4.h. */
#include "kernels.h"
#include "tile_int4.h"
#include "tile_int4dyn.h"
#include "tile_int4_fx24.h"
#include "tile_int8.h"
#include "tile_amx.h"
#include "tile_amx_bf16.h"
#include "tile_amx_int4dyn.h"
#include "tile_vnni_panel.h"
#include "tile_bf16_panel.h"

namespace PQ_NS {
namespace {

#if defined(PQ_AMX)
constexpr bool kAmxBuild = true;
#else
constexpr bool kAmxBuild = false;
#endif

/* Epilogues are written as separate multiply and add; the build uses
 * -ffp-contract=off so the compiler does not fuse them into an FMA, keeping
 * the rounding order documented in pq.h on every ISA. */
inline float scale_bias(float dot, float scale, const float* bias, int64_t n) {
  const float v = dot * scale;
  return bias ? v + bias[n] : v;
}

#if defined(PQ_SIMD_AVX512) || defined(PQ_SIMD_AVX2)
/* The 24-bit fixed-point paths (pq.h) of int4 and int8 weight-only share these two
 * steps around their exact int8-activation kernel.
 * Rows x[0..M) -> term rows xq[3m + t] (t: hi, mid, lo) with scales xs[3m + t];
 * false when a row cannot be written in fixed point. */
inline bool split_rows_fixed24(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* xq,
                               float* xs, int n_threads) {
  const int threads = M < n_threads ? (int)M : n_threads;
  bool ok = true;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(&& : ok) if (threads > 1)
  for (int64_t m = 0; m < M; ++m) {
    int8_t* t = xq + 3 * m * K;
    ok = split_row_fixed24(x + m * ldx, K, t, t + K, t + 2 * K, xs + 3 * m) && ok;
  }
  return ok;
}

/* out[m, n] = the three term rows' results o3[3m + t][n] summed, smallest first, + bias. */
inline void sum_fixed24_terms(const float* o3, int64_t M, int64_t N, const float* bias,
                              float* out, int n_threads) {
  const int threads = M < n_threads ? (int)M : n_threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t m = 0; m < M; ++m) {
    const float* hi = o3 + 3 * m * N;
    for (int64_t n = 0; n < N; ++n) {
      const float v = hi[n] + (hi[N + n] + hi[2 * N + n]);
      out[m * N + n] = bias ? v + bias[n] : v;
    }
  }
}
#endif

#if defined(PQ_AMX)
/* int8 weight-only at prefill on AMX, activations that are not bf16 values: each
 * row in 24-bit fixed point (pq.h; split_row_fixed24), the three term rows through
 * the exact int8 tiles, out = the fp32 sum of the terms' results (smallest first)
 * + bias. Where the bf16 path multiplies three bf16 terms on bf16 tiles, this is
 * one pass on int8 tiles, which retire twice the products a cycle. Slices of rows
 * keep the scratch bounded (kernels.h). Returns false when a row cannot be written
 * in fixed point; out is then rewritten by the caller's other path. */
bool int8_weight_only_fixed(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* w,
                            int64_t N, const float* w_scale, const float* bias, float* out,
                            int n_threads, void* work) {
  const int64_t S = pq::int8wo_fixed_slice(M, K, N), R = 3 * S;
  int8_t* xq = (int8_t*)work;
  float* xs = (float*)(xq + pq::align64(R * K));
  float* o3 = xs + pq::align64(R * 4) / 4;
  int8_t* xp = (int8_t*)(o3 + pq::align64(R * N * 4) / 4);
  for (int64_t m0 = 0; m0 < M; m0 += S) {
    const int64_t ms = min64(S, M - m0), rows = 3 * ms;
    if (!split_rows_fixed24(x + m0 * ldx, ms, K, ldx, xq, xs, n_threads)) return false;
    amx_pack_x(xq, rows, K, xp, n_threads);
    amx_gemm(rows, K, w, N, xp, (int32_t*)o3, N, n_threads,
             AmxStoreDyn{o3, N, xs, w_scale, nullptr});
    sum_fixed24_terms(o3, ms, N, bias, out + m0 * N, n_threads);
  }
  return true;
}
#endif

void int8_dynamic_mm(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                     const int8_t* w, int64_t N, const float* w_scale, const float* bias,
                     float* out, void* work, int64_t work_bytes, int n_threads);

#if defined(PQ_SIMD_AVX512) && !defined(PQ_AMX)
/* int8 weight-only at prefill without AMX, activations that are not bf16 values: each row
 * in 24-bit fixed point, its three term rows on the W8A8 panels, summed in registers
 * (tile_vnni_panel.h). Slices of rows keep the scratch bounded (kernels.h). Returns false
 * when a row cannot be written in fixed point; out is then rewritten by the caller's other
 * path. */
bool int8_weight_only_panel(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* w,
                            int64_t N, const float* w_scale, const float* bias, float* out,
                            int n_threads, void* work) {
  const int64_t S = pq::int8wo_panel_slice(M, K);
  int8_t* xq = (int8_t*)work;
  float* xs = (float*)(xq + pq::align64(3 * S * K));
  void* panels = (uint8_t*)xs + pq::align64(3 * S * 4);
  for (int64_t m0 = 0; m0 < M; m0 += S) {
    const int64_t ms = min64(S, M - m0);
    if (!split_rows_fixed24(x + m0 * ldx, ms, K, ldx, xq, xs, n_threads)) return false;
    w8a8_fx24_panel_mm(xq, xs, ms, K, w, nullptr, N, w_scale, bias, out + m0 * N, panels,
                       n_threads);
  }
  return true;
}
#endif

void int8_weight_only_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* w,
                         int64_t N, const float* w_scale, const float* bias, float* out,
                         int n_threads, void* work) {
#if defined(PQ_SIMD_AVX512)
  /* M = 1 with its scratch (kernels.h): the three fixed-point term rows through the W8A8
   * GEMV (no AMX at 3 rows), then out = their fp32 sum, smallest first, + bias */
  if (work && M == 1) {
    int8_t* xq = (int8_t*)work;
    float* xs = (float*)(xq + pq::align64(3 * K));
    float* o3 = xs + pq::align64(3 * 4) / 4;
    if (split_rows_fixed24(x, 1, K, ldx, xq, xs, 1)) {
      int8_dynamic_mm(xq, xs, 3, K, w, N, w_scale, nullptr, o3, nullptr, 0, n_threads);
      sum_fixed24_terms(o3, 1, N, bias, out, n_threads);
      return;
    }
    work = nullptr; /* sized for this path only: the AMX paths below must not take it */
  }
#endif
#if defined(PQ_SIMD_AVX512) && defined(__AVX512BF16__) && !defined(PQ_AMX_BF16)
  /* bf16 activations on the AVX512-BF16 build (dispatch.cpp sized work for this path) */
  if (work && pq::bf16_panel_applies(M, K, K) && rows_are_bf16(x, M, K, ldx))
    return bf16_panel_int8_wo(x, M, K, ldx, w, N, w_scale, bias, out, work, n_threads);
#endif
#if defined(PQ_SIMD_AVX512) && !defined(PQ_AMX)
  /* the other activations from kInt8WoPanelMinM rows (dispatch.cpp sized work for both) */
  if (work && pq::int8wo_panel_applies(M, K) &&
      int8_weight_only_panel(x, M, K, ldx, w, N, w_scale, bias, out, n_threads, work))
    return;
#endif
#if defined(PQ_AMX)
  /* work non-null: dispatch.cpp sized it for both AMX paths; bf16 activations keep the
   * bf16 path (one exact term), the others take the fixed-point int8 one */
  if (work && pq::int8wo_fixed_applies(M, K, N) && !rows_are_bf16(x, M, K, ldx) &&
      int8_weight_only_fixed(x, M, K, ldx, w, N, w_scale, bias, out, n_threads, work))
    return;
#endif
#if defined(PQ_AMX_BF16)
  /* unscaled groups of int8wo_bf16_group(K) k, then out = sum * w_scale + bias, the
   * order of scale_bias */
  const int64_t Gb = pq::int8wo_bf16_group(K);
  if (work && amx_bf16_wo(x, M, K, ldx, N, nullptr, Gb, w_scale, bias, out, n_threads, work,
                          [&](int64_t n0, int64_t g0, int64_t g1, uint16_t* wb, int64_t ld) {
                            amx_bf16_convert_i8(w + n0 * K, K, g0 * Gb, g1 * Gb, wb, ld);
                          }))
    return;
#else
  (void)work;
#endif
  for_each_tile(M, N, n_threads, [&](int64_t n, int nr, int64_t m, int mt, bool, int32_t*) {
    dispatch_tile<kTileN>(nr, mt, [&](auto R_, auto T_) {
      constexpr int R = decltype(R_)::value, T = decltype(T_)::value;
      float dot[R][T];
      dot_f32_i8<R, T>(x + m * ldx, ldx, w + n * K, K, dot);
      for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r)
          out[(m + t) * N + n + r] = scale_bias(dot[r][t], w_scale[n + r], bias, n + r);
    });
  });
}

void quantize_rows_int8(const float* x, int64_t M, int64_t K, int64_t ldx, const float* amax,
                        int8_t* xq, float* x_scale, int n_threads) {
  const int threads = M < n_threads ? (int)M : n_threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x + m * ldx, K, xq + m * K, x_scale + m, amax ? amax + m : nullptr);
}

/* bf16 values are fp32's top halves: widening them is exact. One row of K into d (a row of
 * ~16 KiB at K = 4096 stays in L1 for the quantizer's two passes). The baseline build's
 * loop (pq_bf16_to_f32_rows: SSE2) into a block of rows took 4% of an int8 dynamic call at
 * M = 1024 (4096 x 4096, bf16 x, AMX) and its quantizer 3%. */
inline void widen_bf16_row(const uint16_t* s, int64_t K, float* d) {
  int64_t k = 0;
#if defined(PQ_SIMD_AVX512)
  for (; k + 16 <= K; k += 16)
    _mm512_storeu_si512(d + k, _mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(s + k))), 16));
#elif defined(PQ_SIMD_AVX2)
  for (; k + 8 <= K; k += 8)
    _mm256_storeu_si256((__m256i*)(d + k), _mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(s + k))), 16));
#endif
  for (; k < K; ++k) {
    const uint32_t u = (uint32_t)s[k] << 16;
    memcpy(d + k, &u, 4);
  }
}

void quantize_rows_int8_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, int8_t* xq,
                             float* x_scale, float* buf) {
  for (int64_t m = 0; m < M; ++m) {
    widen_bf16_row(x + m * ldx, K, buf);
    quantize_row(buf, K, xq + m * K, x_scale + m, nullptr);
  }
}

/* The exact int8 GEMM shared by int8_gemm_s32 and int8_dynamic_mm; epi(m, n,
 * acc) stores one output. The per-weight-row sums the VNNI path needs are
 * computed with the first activation tile and cached in the tile scratch. */
template <class Epi>
void int8_gemm(const int8_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t N, int n_threads,
               Epi epi) {
  for_each_tile(M, N, n_threads, [&](int64_t n, int nr, int64_t m, int mt, bool first, int32_t* wsum) {
    dispatch_tile<kTileN>(nr, mt, [&](auto R_, auto T_) {
      constexpr int R = decltype(R_)::value, T = decltype(T_)::value;
      int32_t dot[R][T];
      if (first)
        dot_i8_i8<R, T, true>(xq + m * K, w + n * K, K, dot, wsum);
      else
        dot_i8_i8<R, T, false>(xq + m * K, w + n * K, K, dot, wsum);
      for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) epi(m + t, n + r, dot[r][t]);
    });
  });
}

#if defined(PQ_SIMD_AVX512)
/* The W8A8 panel GEMM when its scratch is all there (dispatch.cpp sizes it). */
inline bool w8a8_panel_usable(int64_t M, int64_t K, const void* work, int64_t work_bytes,
                              int n_threads) {
  return pq::w8a8_panel_applies(M, K) && work && !((uintptr_t)work & 63) &&
         work_bytes >= pq::w8a8_panel_work_bytes(M, K, n_threads);
}
#endif

void int8_gemm_s32(const int8_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t N,
                   int32_t* acc, void* work, int64_t work_bytes, int n_threads) {
#if defined(PQ_AMX)
  if (amx_usable(M, K, N, work, work_bytes)) {
    amx_pack_x(xq, M, K, (int8_t*)work, n_threads);
    amx_gemm(M, K, w, N, (const int8_t*)work, acc, N, n_threads, AmxStoreS32{acc, N});
    return;
  }
#endif
#if defined(PQ_SIMD_AVX512)
  if (w8a8_panel_usable(M, K, work, work_bytes, n_threads))
    return w8a8_panel_gemm(xq, M, K, w, nullptr, N, work, n_threads,
                           [&](int64_t m, int64_t n, __mmask16 mask, __m512i v) {
                             _mm512_mask_storeu_epi32(acc + m * N + n, mask, v);
                           });
#endif
  (void)work, (void)work_bytes;
  int8_gemm(xq, M, K, w, N, n_threads, [=](int64_t m, int64_t n, int32_t v) { acc[m * N + n] = v; });
}

#if defined(PQ_SIMD_AVX512)
/* int8_dynamic_mm's epilogue on 16 int32 sums of a row: scale_bias's order,
 * v * (x_scale * w_scale), then + bias. */
struct W8a8Epilogue {
  const float *x_scale, *w_scale, *bias;
  float* out;
  int64_t N;
  void operator()(int64_t m, int64_t n, __mmask16 mask, __m512i v) const {
    const __m512 s = _mm512_mul_ps(_mm512_set1_ps(x_scale[m]), _mm512_maskz_loadu_ps(mask, w_scale + n));
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(v), s);
    if (bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, bias + n));
    _mm512_mask_storeu_ps(out + m * N + n, mask, y);
  }
};

/* int8_dynamic_mm on the weight's panels converted at swap time (pq.h), at every M: the
 * panel GEMM without its per-call conversion. work: 64-byte aligned, the x row sums. */
void int8_dynamic_mm_panels(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                            const uint8_t* panels, int64_t N, const float* w_scale,
                            const float* bias, float* out, void* work, int n_threads) {
  w8a8_panel_gemm(xq, M, K, nullptr, panels, N, work, n_threads,
                  W8a8Epilogue{x_scale, w_scale, bias, out, N});
}
#endif

#if defined(PQ_SIMD_AVX512)
/* int4_dynamic_mm on panels packed at swap time (pq.h), at every M. work: 64-byte aligned,
 * the x rows' group sums; with amx (AMX build, prefill sizes) the AMX tiles' scratch, their
 * strips converted from the panels (amx_int4dyn_convert_panels), unless a zero point is
 * above 15. */
void int4_dynamic_mm_panels(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                            const uint8_t* panels, int64_t N, const float* scales,
                            const uint8_t* zeros, int64_t G, const float* bias, float* out,
                            void* work, bool amx, int n_threads) {
#if defined(PQ_AMX_INT4DYN)
  if (amx && amx_int4_dynamic(xq, M, K, panels, N, scales, zeros, G,
                              AmxStoreInt4Dyn{out, N, x_scale, bias}, work, n_threads, true))
    return;
#else
  (void)amx;
#endif
  w4a8_panels_mm(xq, x_scale, M, K, panels, N, scales, zeros, G, bias, out, work, n_threads);
}

/* int8 weight-only on the W8A8 panels converted at swap time, at every M: each x row in
 * 24-bit fixed point, its three term rows in one tile (w8a8_fx24_panel_tile). work: 64-byte
 * aligned, int8wo_panels_work_bytes(M, K). False when a row cannot be written in fixed
 * point (out is then incomplete; the caller runs the canonical weights). */
bool int8_weight_only_mm_panels(const float* x, int64_t M, int64_t K, int64_t ldx,
                                const uint8_t* panels, int64_t N, const float* w_scale,
                                const float* bias, float* out, void* work, int n_threads) {
#if defined(__AVX512BF16__) && !defined(PQ_AMX_BF16)
  /* bf16 activations: one exact bf16 term, each panel converted from its bytes */
  if (M >= pq::kInt8WoPanelsBf16MinM && rows_are_bf16(x, M, K, ldx)) {
    bf16_panel_wo(x, M, K, ldx, N, K, bias, out, work, n_threads,
                  [&](uint16_t* pb, float* sp, int64_t n0, int64_t) {
                    bf16_pack_panel_u8(panels + n0 * K, K, pb);
                    memcpy(sp, w_scale + n0, kBf16PanelRows * sizeof(float));
                  });
    return true;
  }
#endif
  int8_t* xq = (int8_t*)work;
  float* xs = (float*)(xq + pq::align64(3 * M * K));
  void* xsum = (uint8_t*)xs + pq::align64(3 * M * 4);
  if (!split_rows_fixed24(x, M, K, ldx, xq, xs, n_threads)) return false;
  w8a8_fx24_panel_mm(xq, xs, M, K, nullptr, panels, N, w_scale, bias, out, xsum, n_threads);
  return true;
}

/* int4 weight-only on the same panels, at every M: each x row in 24-bit fixed point, its
 * three term rows in one tile (fx24_panel_store). work: 64-byte aligned,
 * int4wo_panels_work_bytes(M, K, G). False when a row cannot be written in fixed point
 * (out is then incomplete; the caller runs the canonical weights). */
bool int4_weight_only_mm_panels(const float* x, int64_t M, int64_t K, int64_t ldx,
                                const uint8_t* panels, int64_t N, const float* scales,
                                const uint8_t* zeros, int64_t G, const float* bias, float* out,
                                void* work, int n_threads) {
#if defined(PQ_AMX_BF16)
  /* from M = 16 the AMX-BF16 tiles, each strip converted from its panel (dispatch.cpp sized
   * work for them); x with Inf/NaN takes the fixed-point path below, which refuses it */
  if (pq::amx_bf16_applies(M, K, N, G)) {
    const int64_t ng = K / G;
    if (amx_bf16_wo(x, M, K, ldx, N, scales, G, nullptr, bias, out, n_threads, work,
                    [&](int64_t n0, int64_t g0, int64_t g1, uint16_t* wb, int64_t ld) {
                      amx_bf16_convert_u4_panels(panels + n0 * (K / 2), zeros + n0 * ng, K, G,
                                                 g0, g1, wb, ld);
                    },
                    true))
      return true;
  }
#endif
#if defined(__AVX512BF16__) && !defined(PQ_AMX_BF16)
  /* bf16 activations: one exact bf16 term, each panel converted from its nibbles */
  if (pq::bf16_panel_applies(M, K, G) && rows_are_bf16(x, M, K, ldx)) {
    const int64_t ng = K / G;
    bf16_panel_wo(x, M, K, ldx, N, G, bias, out, work, n_threads,
                  [&](uint16_t* pb, float* sp, int64_t n0, int64_t) {
                    bf16_pack_panel_nibbles(panels + n0 * (K / 2), zeros + n0 * ng, K, G, pb);
                    memcpy(sp, scales + n0 * ng, ng * kBf16PanelRows * sizeof(float));
                  });
    return true;
  }
#endif
  int8_t* xq = (int8_t*)work;
  float* xs = (float*)(xq + pq::align64(3 * M * K));
  void* gsum = (uint8_t*)xs + pq::align64(3 * M * 4);
  if (!split_rows_fixed24(x, M, K, ldx, xq, xs, n_threads)) return false;
  w4a8_panels_mm<true>(xq, xs, M, K, panels, N, scales, zeros, G, bias, out, gsum, n_threads);
  return true;
}
#endif

#if defined(PQ_AMX_BF16)
/* int8 weight-only for bf16 rows x into bf16 outputs (pq.h, pq_int8_weight_only_mm_bf16; the
 * caller checked that the AMX-BF16 path applies): unscaled groups, then the row scale, as
 * int8_weight_only_mm's AMX-BF16 path. False, out untouched, when x holds an Inf or NaN. */
bool int8_weight_only_mm_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx,
                              const int8_t* w, int64_t N, const float* w_scale, const float* bias,
                              uint16_t* out, void* work, int n_threads) {
  const int64_t Gb = pq::int8wo_bf16_group(K);
  return amx_bf16_wo_bf16(x, M, K, ldx, N, nullptr, Gb, w_scale, bias, out, n_threads, work,
                          [&](int64_t n0, int64_t g0, int64_t g1, uint16_t* wb, int64_t ld) {
                            amx_bf16_convert_i8(w + n0 * K, K, g0 * Gb, g1 * Gb, wb, ld);
                          });
}

/* int4 weight-only on the panels for bf16 rows x into bf16 outputs (pq.h,
 * pq_int4_weight_only_mm_panels_bf16; the caller checked amx_bf16_applies). False, out
 * untouched, when x holds an Inf or NaN. */
bool int4_weight_only_mm_panels_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx,
                                     const uint8_t* panels, int64_t N, const float* scales,
                                     const uint8_t* zeros, int64_t G, const float* bias,
                                     uint16_t* out, void* work, int n_threads) {
  const int64_t ng = K / G;
  return amx_bf16_wo_bf16(x, M, K, ldx, N, scales, G, nullptr, bias, out, n_threads, work,
                          [&](int64_t n0, int64_t g0, int64_t g1, uint16_t* wb, int64_t ld) {
                            amx_bf16_convert_u4_panels(panels + n0 * (K / 2), zeros + n0 * ng,
                                                       K, G, g0, g1, wb, ld);
                          },
                          true);
}
#endif

#if defined(PQ_SIMD_AVX512)
/* The panel layouts (pq.h: pq_pack_panels) of a whole weight, a panel a task: int8 rows
 * (bits 8, w + 128) or canonical int4 codes (bits 4, K % 128 == 0), or back (unpack).
 * N % 32 == 0. */
void pack_panels(int bits, bool unpack, const uint8_t* w, int64_t N, int64_t K, uint8_t* out,
                 int n_threads) {
  const int64_t panels = N / kPanelRows, bytes = kPanelRows * K * bits / 8;
  const int threads = panels < n_threads ? (int)panels : n_threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t p = 0; p < panels; ++p) {
    const uint8_t* src = w + p * bytes;
    uint8_t* dst = out + p * bytes;
    if (bits == 8 && !unpack)
      w8a8_pack_panel((const int8_t*)w, p * kPanelRows, kPanelRows, K, dst);
    else if (bits == 8)
      w8a8_unpack_panel(src, K, (int8_t*)dst);
    else if (!unpack)
      w4a8_pack_nibble_panel(src, K, dst);
    else
      w4a8_unpack_nibble_panel(src, K, dst);
  }
}
#endif

void int8_dynamic_mm(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                     const int8_t* w, int64_t N, const float* w_scale, const float* bias,
                     float* out, void* work, int64_t work_bytes, int n_threads) {
#if defined(PQ_AMX)
  if (amx_usable(M, K, N, work, work_bytes)) {
    amx_pack_x(xq, M, K, (int8_t*)work, n_threads);
    /* out doubles as the int32 partial sums of K chunks (tile_amx.h) */
    amx_gemm(M, K, w, N, (const int8_t*)work, (int32_t*)out, N, n_threads,
             AmxStoreDyn{out, N, x_scale, w_scale, bias});
    return;
  }
#endif
#if defined(PQ_SIMD_AVX512)
  if (w8a8_panel_usable(M, K, work, work_bytes, n_threads))
    return w8a8_panel_gemm(xq, M, K, w, nullptr, N, work, n_threads,
                           W8a8Epilogue{x_scale, w_scale, bias, out, N});
#endif
  (void)work, (void)work_bytes;
  int8_gemm(xq, M, K, w, N, n_threads, [=](int64_t m, int64_t n, int32_t v) {
    out[m * N + n] = scale_bias((float)v, x_scale[m] * w_scale[n], bias, n);
  });
}

#if defined(PQ_AMX_INT4DYN)
/* int4_dynamic_mm on the AMX tiles into bf16 outputs (pq.h, pq_int4_dynamic_mm_bf16; the
 * caller checked amx_int4dyn_applies). False, out untouched, when a zero point is above 15. */
bool int4_dynamic_mm_bf16(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                          const uint8_t* wp, int64_t N, const float* scales, const uint8_t* zeros,
                          int64_t G, const float* bias, uint16_t* out, void* work, int n_threads,
                          bool panels) {
  return amx_int4_dynamic(xq, M, K, wp, N, scales, zeros, G,
                          AmxStoreInt4DynBf16{out, N, x_scale, bias}, work, n_threads, panels);
}
#endif

#if defined(PQ_AMX)
/* int8_dynamic_mm on the AMX tiles into bf16 outputs (the caller checked amx_usable's sizes).
 * work: the packed activations, then the K chunks' int32 sums (kernels.h). */
void int8_dynamic_mm_bf16(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                          const int8_t* w, int64_t N, const float* w_scale, const float* bias,
                          uint16_t* out, void* work, int n_threads) {
  amx_pack_x(xq, M, K, (int8_t*)work, n_threads);
  int32_t* cpart = (int32_t*)((uint8_t*)work + pq::align64(ceil_div(M, 16) * 16 * K));
  amx_gemm(M, K, w, N, (const int8_t*)work, cpart, N, n_threads,
           AmxStoreDynBf16{out, N, x_scale, w_scale, bias});
}
#endif

/* work: gsum int32 [M, K/G], then (AVX512, AVX2) xq reordered [M, K] (see tile_int4dyn.h). */
void int4_dynamic_mm(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                     const uint8_t* wp, int64_t N, const float* scales, const uint8_t* zeros,
                     int64_t G, const float* bias, float* out, void* work, bool amx,
                     bool panel, int n_threads) {
#if defined(PQ_AMX_INT4DYN)
  if (amx && amx_int4_dynamic(xq, M, K, wp, N, scales, zeros, G,
                              AmxStoreInt4Dyn{out, N, x_scale, bias}, work, n_threads))
    return;
#else
  (void)amx;
#endif
#if defined(PQ_SIMD_AVX512)
  if (panel && pq::w4a8_panel_applies(M, K))
    return w4a8_panel_mm(xq, x_scale, M, K, wp, N, scales, zeros, G, bias, out, work, n_threads);
#else
  (void)panel;
#endif
  const int64_t ng = K / G;
  int32_t* gsum = (int32_t*)work;
  const int8_t* xk = xq;
#if defined(PQ_SIMD_AVX512) || defined(PQ_SIMD_AVX2)
  int8_t* xp = (int8_t*)(gsum + M * ng);
  {
    const int threads = M < n_threads ? (int)M : n_threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t m = 0; m < M; ++m) int4dyn_prep_row(xq + m * K, K, G, xp + m * K, gsum + m * ng);
  }
  xk = xp;
#endif
  for_each_tile(M, N, n_threads, [&](int64_t n, int nr, int64_t m, int mt, bool, int32_t*) {
    dispatch_tile<kTileN>(nr, mt, [&](auto R_, auto T_) {
      constexpr int R = decltype(R_)::value, T = decltype(T_)::value;
      float dot[R][T];
      dot_i8_u4<R, T>(xk + m * K, gsum + m * ng, wp + n * (K / 2), scales + n * ng, zeros + n * ng,
                      K, G, dot);
      for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r)
          out[(m + t) * N + n + r] = scale_bias(dot[r][t], x_scale[m + t], bias, n + r);
    });
  });
}

#if defined(PQ_SIMD_AVX512) || defined(PQ_SIMD_AVX2)
/* int4 weight-only for larger M (AVX512 and AVX2, G % 32 == 0): each kTileN-row weight
 * tile is dequantized once per activation block and K chunk into fp32 (on the
 * stack, in k order), then every activation tile of the block runs plain fp32
 * FMAs against it, so the decoding is amortized over up to kBlockM rows of x.
 * The weights are the same values as dot_f32_u4's ((code - zero) * scale); the
 * fp32 sums run in another order (per chunk, then over chunks, then + bias). */
constexpr int64_t kU4Chunk = 1024; /* codes per dequantized chunk of a weight row */
/* Below this M the decoding in the dot loop (dot_f32_u4) is cheaper than
 * dequantizing to memory (measured crossover: M ~ 10 at K = 4096; on AVX2, 4096 x 4096,
 * 2 threads: 0.94-0.96x at M = 5-6, 1.13x at M = 8, 1.16x at M = 10).
 * Weight rows a dequantized tile: AVX2 has 16 registers, and 6 rows x 2 activation rows
 * keep 12 accumulators in flight where 4 x 2 keeps 8, as many as two FMA ports of 4-cycle
 * latency need, with no slack (1.03-1.05x at M = 16 and 128).
 * The AVX2 path against the float dot loop it replaced there (4096 x 4096, 2 threads, the
 * AVX2 path forced on a Xeon): 1.34x at M = 12, 1.46x at M = 16, 1.92x at M = 128. */
#if defined(PQ_SIMD_AVX2)
constexpr int64_t kU4DequantMinM = 8;
constexpr int kU4DqTileN = 6;
#else
constexpr int64_t kU4DequantMinM = 12;
constexpr int kU4DqTileN = kTileN;
#endif

#if defined(PQ_SIMD_AVX2)
/* 16 codes a step, decoded as dot_f32_u4's AVX2 body decodes them (u4_decode16). */
template <int R>
inline void u4_dequant(const uint8_t* wp, const float* sc, const uint8_t* zp, int64_t K, int64_t G,
                       int64_t k0, int64_t len, float* w) {
  const int64_t ng = K / G, ldw = K / 2;
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < len; j += 16) {
      const int64_t k = k0 + j, g = k / G;
      __m256 w0, w1;
      u4_decode16(wp + r * ldw + k / 2, zp[r * ng + g], sc[r * ng + g], w0, w1);
      _mm256_store_ps(w + r * kU4Chunk + j, w0);
      _mm256_store_ps(w + r * kU4Chunk + j + 8, w1);
    }
}
#else
template <int R>
inline void u4_dequant(const uint8_t* wp, const float* sc, const uint8_t* zp, int64_t K, int64_t G,
                       int64_t k0, int64_t len, float* w) {
  const int64_t ng = K / G, ldw = K / 2;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  for (int r = 0; r < R; ++r) {
    int64_t g = -1;
    __m512 tab = iota;
    for (int64_t j = 0; j < len; j += 32) {
      const int64_t k = k0 + j;
      if (k / G != g) {
        g = k / G;
        tab = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps((float)zp[r * ng + g])),
                            _mm512_set1_ps(sc[r * ng + g]));
      }
      /* vpermps reads the low 4 bits of each index: byte b gives its even code, b >> 4 its odd one. */
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wp + r * ldw + k / 2)));
      const __m512 we = _mm512_permutexvar_ps(d, tab);
      const __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), tab);
      _mm512_storeu_ps(w + r * kU4Chunk + j, _mm512_permutex2var_ps(we, lo, wo));
      _mm512_storeu_ps(w + r * kU4Chunk + j + 16, _mm512_permutex2var_ps(we, hi, wo));
    }
  }
}
#endif

/* The fp32 vector of this build for the FMA loop below. */
struct DqVec {
#if defined(PQ_SIMD_AVX2)
  using Reg = __m256;
  static constexpr int kLanes = 8;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg load(const float* p) { return _mm256_load_ps(p); }
  static Reg loadu(const float* p) { return _mm256_loadu_ps(p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(Reg a) { return hsum256(a); }
#else
  using Reg = __m512;
  static constexpr int kLanes = 16;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg load(const float* p) { return _mm512_load_ps(p); }
  static Reg loadu(const float* p) { return _mm512_loadu_ps(p); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(Reg a) { return _mm512_reduce_add_ps(a); }
#endif
};

void int4_weight_only_dequant(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* wp,
                              int64_t N, const float* scales, const uint8_t* zeros, int64_t G,
                              const float* bias, float* out, int n_threads) {
  const int64_t ng = K / G;
  /* The task partition of for_each_tile. Within a task the K chunk is the
   * outer loop, so only one chunk of the activation block (kBlockM x kU4Chunk
   * floats, 256 KiB) is live in L2 while the task's weight tiles sweep it;
   * per chunk the partial sums are reduced and added to out. */
  int64_t nb = ceil_div(ceil_div(N, (int64_t)n_threads * 4), kTileN) * kTileN;
  nb = nb > kMaxBlockN ? kMaxBlockN : nb;
  const int64_t mb = min64(M, kBlockM);
  const int64_t n_mblk = ceil_div(M, mb);
  const int64_t tasks = ceil_div(N, nb) * n_mblk;
  const int threads = tasks < n_threads ? (int)tasks : n_threads;
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (threads > 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t n0 = task / n_mblk * nb, m0 = task % n_mblk * mb;
    const int64_t n1 = min64(n0 + nb, N), m1 = min64(m0 + mb, M);
    alignas(64) float w[kU4DqTileN * kU4Chunk];
    for (int64_t k0 = 0; k0 < K; k0 += kU4Chunk) {
      const int64_t len = min64(kU4Chunk, K - k0);
      const bool first = k0 == 0, last = k0 + len == K;
      for (int64_t n = n0; n < n1; n += kU4DqTileN) {
        const int nr = (int)min64(kU4DqTileN, n1 - n);
        dispatch_tile<kU4DqTileN>(nr, 1, [&](auto R_, auto) {
          constexpr int R = decltype(R_)::value;
          u4_dequant<R>(wp + n * (K / 2), scales + n * ng, zeros + n * ng, K, G, k0, len, w);
        });
        for (int64_t m = m0; m < m1; m += kTileM) {
          dispatch_tile<kU4DqTileN>(nr, (int)min64(kTileM, m1 - m), [&](auto R_, auto T_) {
            constexpr int R = decltype(R_)::value, T = decltype(T_)::value;
            using V = DqVec;
            typename V::Reg acc[R][T];
            for (int r = 0; r < R; ++r)
              for (int t = 0; t < T; ++t) acc[r][t] = V::zero();
            const float* xk = x + m * ldx + k0;
            for (int64_t j = 0; j < len; j += V::kLanes) {
              typename V::Reg wv[R];
              for (int r = 0; r < R; ++r) wv[r] = V::load(w + r * kU4Chunk + j);
              for (int t = 0; t < T; ++t) {
                const typename V::Reg xv = V::loadu(xk + t * ldx + j);
                for (int r = 0; r < R; ++r) acc[r][t] = V::fma(xv, wv[r], acc[r][t]);
              }
            }
            for (int t = 0; t < T; ++t)
              for (int r = 0; r < R; ++r) {
                float* o = out + (m + t) * N + n + r;
                float v = V::sum(acc[r][t]);
                if (!first) v = *o + v;
                if (last && bias) v = v + bias[n + r];
                *o = v;
              }
          });
        }
      }
    }
  }
}
#endif

#if defined(PQ_SIMD_AVX512) || defined(PQ_SIMD_AVX2)
/* The decode-size path of pq.h: x in 24-bit fixed point (three int8 terms per
 * row), each term through the exact W4A8 kernel. At M = 1 the float path is
 * bound by decoding (a table permute and an FMA per 16 weights, ~15 cycles per
 * 64 bytes of codes, half the memory speed); here one decode serves three
 * vpdpbusd of 64 products each. Returns false when a row cannot be written in
 * fixed point (out is then incomplete: the caller's float path writes all of it).
 * AVX2 has only the M <= 4 GEMV (dispatch.cpp says so; other zero points than
 * nibbles return false there): its float GEMV spends ~13 uops per 8 bytes of codes
 * (two widens and an interleave on the shuffle port, then a zero subtract, a convert
 * and a scale per 8 weights), where this one spends ~12 per 16 bytes. */
bool int4_weight_only_fixed(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* wp,
                            int64_t N, const float* scales, const uint8_t* zeros, int64_t G,
                            const float* bias, float* out, int n_threads, void* work) {
  const int64_t S = pq::int4wo_fixed_slice(K);
  if (M > S) { /* slices of rows: the workspace holds one (dispatch.cpp) */
    for (int64_t m = 0; m < M; m += S)
      if (!int4_weight_only_fixed(x + m * ldx, min64(S, M - m), K, ldx, wp,
                                  N, scales, zeros, G, bias, out + m * N, n_threads, work))
        return false; /* the caller's other path then writes all of out */
    return true;
  }
  const int64_t rows = 3 * M;
  int8_t* xq = (int8_t*)work;
  float* xs = (float*)(xq + pq::align64(rows * K));
  float* o3 = xs + pq::align64(rows * 4) / 4; /* sized 0 for the panels (kernels.h) */
  void* dyn = (uint8_t*)o3 + pq::int4wo_fixed_outputs_bytes(rows, K, N, G, kAmxBuild);
  if (!split_rows_fixed24(x, M, K, ldx, xq, xs, n_threads)) return false;
  /* the GEMV's lanes take zero * sum X off in int32, which a nibble zero point keeps in range
   * (tile_int4_fx24.h); the op takes any uint8 one, and those run W4A8 on the term rows */
  if (pq::int4wo_fx24_gemv_applies(M, K, G) && pq::zeros_fit_nibble(zeros, N * (K / G))) {
    /* dyn has room for xp (3K bytes a row) and xl (K/8 int32 a row): see dispatch.cpp */
    const int64_t ng = K / G;
    int8_t* xp = (int8_t*)dyn;
    int32_t* xl = (int32_t*)(xp + pq::align64(3 * K * M));
    for (int64_t m = 0; m < M; ++m)
      fx24_prep_row(xq + 3 * m * K, xq + (3 * m + 1) * K, xq + (3 * m + 2) * K, K,
                    xp + 3 * K * m, xl + K / 8 * m);
    for_each_tile(M, N, n_threads, [&](int64_t n, int nr, int64_t m, int mt, bool, int32_t*) {
      dispatch_tile<kTileN>(nr, mt, [&](auto R_, auto T_) {
        constexpr int R = decltype(R_)::value, T = decltype(T_)::value;
        float dot[R][T];
        dot_fx24_u4<R, T>(xp + 3 * K * m, xl + K / 8 * m, wp + n * (K / 2), scales + n * ng,
                          zeros + n * ng, K, G, dot);
        for (int t = 0; t < T; ++t) /* the lo term's scale is X's unit */
          for (int r = 0; r < R; ++r)
            out[(m + t) * N + n + r] = scale_bias(dot[r][t], xs[3 * (m + t) + 2], bias, n + r);
      });
    });
    return true;
  }
#if defined(PQ_SIMD_AVX2)
  return false;
#else
  /* dyn holds the W4A8 workspace for these rows (dispatch.cpp): the AMX or the panel one;
   * the panels take the three term rows of each x row in one tile */
  if (pq::int4wo_fixed_on_panels(rows, K, N, G, kAmxBuild)) {
    w4a8_panel_mm<true>(xq, xs, M, K, wp, N, scales, zeros, G, bias, out, dyn, n_threads);
    return true;
  }
  const bool amx = kAmxBuild && pq::amx_int4dyn_applies(rows, K, N, G);
  int4_dynamic_mm(xq, xs, rows, K, wp, N, scales, zeros, G, nullptr, o3, dyn, amx, false,
                  n_threads);
  sum_fixed24_terms(o3, M, N, bias, out, n_threads);
  return true;
#endif
}
#endif

void int4_weight_only_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* wp,
                         int64_t N, const float* scales, const uint8_t* zeros, int64_t G,
                         const float* bias, float* out, int n_threads, void* work) {
#if defined(PQ_SIMD_AVX512) && defined(__AVX512BF16__) && !defined(PQ_AMX_BF16)
  /* bf16 activations on the AVX512-BF16 build: one exact bf16 term (dispatch.cpp sized
   * work for this path too) */
  if (work && pq::bf16_panel_applies(M, K, G) && rows_are_bf16(x, M, K, ldx))
    return bf16_panel_int4_wo(x, M, K, ldx, wp, N, scales, zeros, G, bias, out, work, n_threads);
#endif
#if defined(PQ_SIMD_AVX512) || defined(PQ_SIMD_AVX2)
  /* work is non-null only when dispatch.cpp sized it for the path that applies: this
   * one (M, G) or, from M = 16 on AMX, the AMX-BF16 one below */
  if (work && pq::int4wo_fixed_applies(M, K, G, kAmxBuild) &&
      int4_weight_only_fixed(x, M, K, ldx, wp, N, scales, zeros, G, bias, out, n_threads, work))
    return;
#else
  (void)work;
#endif
#if defined(PQ_AMX_BF16)
  /* work is the AMX-BF16 path's only when dispatch.cpp found that path applies */
  if (work && pq::amx_bf16_applies(M, K, N, G) &&
      amx_bf16_wo(x, M, K, ldx, N, scales, G, nullptr, bias, out, n_threads, work,
                  [&](int64_t n0, int64_t g0, int64_t g1, uint16_t* wb, int64_t ld) {
                    amx_bf16_convert_u4(wp + n0 * (K / 2), zeros + n0 * (K / G), K, G, g0, g1,
                                        wb, ld);
                  }))
    return;
#endif
#if defined(PQ_SIMD_AVX512) || defined(PQ_SIMD_AVX2)
  if (M >= kU4DequantMinM && G % 32 == 0)
    return int4_weight_only_dequant(x, M, K, ldx, wp, N, scales, zeros, G, bias, out, n_threads);
#endif
  const int64_t ng = K / G;
  for_each_tile(M, N, n_threads, [&](int64_t n, int nr, int64_t m, int mt, bool, int32_t*) {
    dispatch_tile<kTileN>(nr, mt, [&](auto R_, auto T_) {
      constexpr int R = decltype(R_)::value, T = decltype(T_)::value;
      float dot[R][T];
      dot_f32_u4<R, T>(x + m * ldx, ldx, wp + n * (K / 2), scales + n * ng, zeros + n * ng, K, G, dot);
      for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) {
          const float v = dot[r][t];
          out[(m + t) * N + n + r] = bias ? v + bias[n + r] : v;
        }
    });
  });
}

}  // namespace

extern const pq::KernelTable kKernels = {
    int8_weight_only_mm, quantize_rows_int8, int8_gemm_s32, int8_dynamic_mm, int4_weight_only_mm,
    int4_dynamic_mm,
#if defined(PQ_SIMD_AVX512)
    int8_dynamic_mm_panels, int4_dynamic_mm_panels, int4_weight_only_mm_panels,
    int8_weight_only_mm_panels, pack_panels,
#else
    nullptr, nullptr, nullptr, nullptr, nullptr,
#endif
#if defined(PQ_AMX)
    int8_dynamic_mm_bf16,
#else
    nullptr,
#endif
#if defined(PQ_AMX_BF16)
    int4_weight_only_mm_panels_bf16, int8_weight_only_mm_bf16,
#else
    nullptr, nullptr,
#endif
#if defined(PQ_AMX_INT4DYN)
    int4_dynamic_mm_bf16,
#else
    nullptr,
#endif
    quantize_rows_int8_bf16,
};

}  // namespace PQ_NS
