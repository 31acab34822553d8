/* int8 micro-kernels: fp32 x int8 dot products, exact int8 x int8 dot
 * products, and per-row int8 quantization. Each has an AVX512, an AVX2 and a
 * portable body selected by the flags of the current build (see common.h). */
#ifndef PQ_CPU_TILE_INT8_H
#define PQ_CPU_TILE_INT8_H
#include <math.h>
#include "common.h"

namespace PQ_NS {
namespace {

/* dot[r][t] = sum_k x[t*ldx + k] * w[r*K + k] in fp32. */
template <int R, int T>
inline void dot_f32_i8(const float* x, int64_t ldx, const int8_t* w, int64_t K, float dot[R][T]) {
#if defined(PQ_SIMD_AVX512)
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  /* Inlined twice: full 16-wide steps, then one masked step for the K tail
   * (masked loads never touch memory past the row). */
  auto step = [&](int64_t k, bool full, __mmask16 m) {
    __m512 xv[T];
    for (int t = 0; t < T; ++t)
      xv[t] = full ? _mm512_loadu_ps(x + t * ldx + k) : _mm512_maskz_loadu_ps(m, x + t * ldx + k);
    for (int r = 0; r < R; ++r) {
      const int8_t* p = w + r * K + k;
      PQ_PREFETCH_NEXT_TILE(p + R * K);
      const __m128i b = full ? _mm_loadu_si128((const __m128i*)p) : _mm_maskz_loadu_epi8(m, p);
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(xv[t], wv, acc[r][t]);
    }
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) step(k, true, 0xFFFF);
  if (k < K) step(k, false, (__mmask16)((1u << (K - k)) - 1));
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) dot[r][t] = _mm512_reduce_add_ps(acc[r][t]);
#elif defined(PQ_SIMD_AVX2)
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + t * ldx + k);
    for (int r = 0; r < R; ++r) {
      if ((k & 63) == 0) PQ_PREFETCH_NEXT_TILE(w + (r + R) * K + k);
      const __m128i b = _mm_loadl_epi64((const __m128i*)(w + r * K + k));
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(xv[t], wv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float s = hsum256(acc[r][t]);
      for (int64_t j = k; j < K; ++j) s += x[t * ldx + j] * (float)w[r * K + j];
      dot[r][t] = s;
    }
#else
  /* Four independent partial sums per output let the compiler use SSE lanes
   * without reassociating a single serial sum. */
  float acc[R][T][4] = {};
  int64_t k = 0;
  for (; k + 4 <= K; k += 4)
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        for (int j = 0; j < 4; ++j) acc[r][t][j] += x[t * ldx + k + j] * (float)w[r * K + k + j];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      float s = (acc[r][t][0] + acc[r][t][1]) + (acc[r][t][2] + acc[r][t][3]);
      for (int64_t j = k; j < K; ++j) s += x[t * ldx + j] * (float)w[r * K + j];
      dot[r][t] = s;
    }
#endif
}

/* Bytes ahead in its own row that dot_i8_i8 also prefetches into L1, on top of the next
 * tile's line into L2 (common.h): at M = 1, int8 weight-only and dynamic, Llama-2-7B
 * shapes, 1.00-1.04x (geometric means of both orders, benchmarks/ab_inprocess.py, two runs
 * each; Granite Rapids, two threads), 0.98-1.04x at M = 4; 512 bytes ahead 0.99-1.05x in
 * one order. */
constexpr int kInt8RowPrefetchL1 = 1024;

/* dot[r][t] = sum_k x[t*K + k] * w[r*K + k], exact in int32 (wrapping mod 2^32
 * only if the true sum does not fit).
 *
 * AVX512-VNNI: vpdpbusd multiplies unsigned by signed bytes, so x is biased to
 * u8 (x ^ 0x80 == x + 128) and 128 * sum_k w[r,k] is subtracted. That row sum
 * is computed (with a second vpdpbusd against ones) only when kWithSum is set,
 * i.e. for the first activation tile of a weight-row tile; later tiles reuse
 * wsum. Exact for every int8 input, -128 included.
 *
 * AVX2: vpmaddubsw (u8 x s8 -> saturating int16 pair sums) on |w| and
 * x * sign(w). |w| <= 128 fits the unsigned operand, and x in [-127, 127] (every
 * activation code pyquant makes; int8_gemm_s32 checks its own) keeps x * sign(w)
 * in int8, so a pair sum is at most 2 * 128 * 127 and never saturates: exact for
 * every weight, -128 included. (The other way round, |x| and w * sign(x), a weight
 * of -128 against a negative x flipped the product's sign: -128 stays -128 when
 * negated in int8, and int8 checkpoints from other tools use -128.) vpmaddwd with
 * ones then widens the pairs to int32. */
template <int R, int T, bool kWithSum>
inline void dot_i8_i8(const int8_t* x, const int8_t* w, int64_t K, int32_t dot[R][T],
                      int32_t wsum[R]) {
#if defined(PQ_SIMD_AVX512)
  __m512i acc[R][T], sacc[R];
  for (int r = 0; r < R; ++r) {
    sacc[r] = _mm512_setzero_si512();
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  }
  const __m512i bias = _mm512_set1_epi8((char)0x80), ones = _mm512_set1_epi8(1);
  /* In the masked tail step w is zero-filled, which zeroes those products
   * whatever the biased x lanes hold. */
  auto step = [&](int64_t k, bool full, __mmask64 m) {
    __m512i xu[T];
    for (int t = 0; t < T; ++t) {
      const int8_t* p = x + t * K + k;
      xu[t] = _mm512_xor_si512(full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(m, p), bias);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* p = w + r * K + k;
      PQ_PREFETCH_NEXT_TILE(p + R * K);
      PQ_PREFETCH_NEXT_TILE_L1(p + kInt8RowPrefetchL1);
      const __m512i wv = full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(m, p);
      if (kWithSum) sacc[r] = _mm512_dpbusd_epi32(sacc[r], ones, wv);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], xu[t], wv);
    }
  };
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) step(k, true, ~0ULL);
  if (k < K) step(k, false, (1ULL << (K - k)) - 1);
  for (int r = 0; r < R; ++r) {
    if (kWithSum) wsum[r] = _mm512_reduce_add_epi32(sacc[r]);
    for (int t = 0; t < T; ++t)  // unsigned arithmetic: wraps instead of overflowing
      dot[r][t] = (int32_t)((uint32_t)_mm512_reduce_add_epi32(acc[r][t]) - 128u * (uint32_t)wsum[r]);
  }
#elif defined(PQ_SIMD_AVX2)
  (void)wsum;
  __m256i acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
  const __m256i ones16 = _mm256_set1_epi16(1);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_si256((const __m256i*)(x + t * K + k));
    for (int r = 0; r < R; ++r) {
      PQ_PREFETCH_NEXT_TILE(w + (r + R) * K + k);
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + r * K + k));
      const __m256i wa = _mm256_abs_epi8(wv); /* -128 -> 0x80, read as the u8 128 */
      for (int t = 0; t < T; ++t) {
        const __m256i p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xv[t], wv));
        acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(p, ones16));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc[r][t]), _mm256_extracti128_si256(acc[r][t], 1));
      h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
      h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
      uint32_t s = (uint32_t)_mm_cvtsi128_si32(h);
      for (int64_t j = k; j < K; ++j) s += (uint32_t)((int32_t)x[t * K + j] * w[r * K + j]);
      dot[r][t] = (int32_t)s;
    }
#else
  (void)wsum;
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      uint32_t s = 0; /* unsigned: wraps instead of overflowing */
      for (int64_t j = 0; j < K; ++j) s += (uint32_t)((int32_t)x[t * K + j] * w[r * K + j]);
      dot[r][t] = (int32_t)s;
    }
#endif
}

/* False when x[0..K) holds an Inf or NaN: x * 0 is NaN exactly for those, and a NaN
 * survives a sum (where max and fmaxf may drop it). */
inline bool row_is_finite(const float* x, int64_t K) {
  int64_t k = 0;
  float probe = 0.0f;
#if defined(PQ_SIMD_AVX512)
  __m512 acc = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(x + k), zero));
  probe = _mm512_reduce_add_ps(acc);
#elif defined(PQ_SIMD_AVX2)
  __m256 acc = _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(x + k), zero));
  alignas(32) float v[8];
  _mm256_store_ps(v, acc);
  for (int i = 0; i < 8; ++i) probe += v[i];
#endif
  for (; k < K; ++k) probe += x[k] * 0.0f;
  return probe == 0.0f;
}

/* x / s rounded as an IEEE division rounds it, from y = 1 / s (one true division a row, so
 * correctly rounded) and two FMAs (Markstein's correction): q = x * y is within about an ulp
 * of x / s, the remainder x - q * s is exact in one FMA, and q + remainder * y rounds to the
 * correctly rounded quotient. That needs the remainder normal: where s >= kQuantMulMinScale
 * (else the caller divides) it is whenever |x / s| >= 0.5, and below that both round to the
 * integer 0. Checked against vdivps on 9.6e8 (x, s) pairs (s over 2^-100 .. 2^100; x within
 * 4 ulps of integer and half-integer multiples of s, uniform, and random bits): the integers
 * agreed every time, the quotients everywhere but at subnormal x. Against vdivps the
 * quantizer ran 1.20-1.63x faster on the AVX512 levels and 1.05-1.18x on AVX2
 * (benchmarks/quantizer_ab.py, M x K = 2560 x 384 .. 128 x 11008, two threads, Granite
 * Rapids), about what a plain multiply by 1/s gave (1.25-1.6x). */
constexpr float kQuantMulMinScale = 0x1p-100f;
#if defined(PQ_SIMD_AVX512)
inline __m512 div_by_reciprocal(__m512 x, __m512 s, __m512 y) {
  const __m512 q = _mm512_mul_ps(x, y);
  return _mm512_fmadd_ps(_mm512_fnmadd_ps(q, s, x), y, q);
}
#elif defined(PQ_SIMD_AVX2)
inline __m256 div_by_reciprocal(__m256 x, __m256 s, __m256 y) {
  const __m256 q = _mm256_mul_ps(x, y);
  return _mm256_fmadd_ps(_mm256_fnmadd_ps(q, s, x), y, q);
}
#endif

/* Per-row symmetric quantization (see pq.h). The quotient is that of a true IEEE division
 * (div_by_reciprocal, or a division where s is tiny), and rounding is to nearest-even (the
 * MXCSR default for cvtps2dq, nearbyint in the default mode), so results match
 * torch.round(x / s) bit for bit. */
inline void quantize_row(const float* x, int64_t K, int8_t* q, float* scale,
                         const float* given_amax) {
  int64_t k = 0;
  float amax = 0.0f;
  bool finite = true; /* no Inf or NaN in the row: checked in the max loop where there is one */
#if defined(PQ_SIMD_AVX512)
  const __mmask16 tail = (__mmask16)((1u << (K % 16)) - 1);
  __mmask16 bad = 0; /* lanes that met an Inf or NaN (fpclass 0x99), which max_ps may drop */
#endif
  /* given_amax: the whole row's max |x| when x is a slice of it (a row-parallel shard) */
  if (given_amax) {
    amax = *given_amax;
    k = K;
  }
#if defined(PQ_SIMD_AVX512)
  __m512 mx = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    bad |= _mm512_fpclass_ps_mask(v, 0x99);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
  }
  if (k < K) {
    const __m512 v = _mm512_maskz_loadu_ps(tail, x + k);
    bad |= _mm512_fpclass_ps_mask(v, 0x99);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
  }
  if (!given_amax) {
    amax = _mm512_reduce_max_ps(mx);
    finite = bad == 0;
  } else {
    finite = row_is_finite(x, K);
  }
  k = K;
#elif defined(PQ_SIMD_AVX2)
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 mx = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(absmask, _mm256_loadu_ps(x + k)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  if (!given_amax) amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#endif
  for (; k < K; ++k) amax = fmaxf(amax, fabsf(x[k]));
#if !defined(PQ_SIMD_AVX512)
  finite = row_is_finite(x, K);
#endif
  /* s == 0 covers amax == 0 and a subnormal amax whose amax / 127 underflows;
   * either way s = 1 avoids dividing by zero (and matches pyquant.formats). */
  float s = amax / 127.0f;
  if (s == 0.0f) s = 1.0f;
  /* An Inf or NaN in the row (or in the given maximum): scale NaN and codes 0, so that
   * every output of the row is NaN, as the reference (and float arithmetic) gives. */
  if (!(s <= 3.4e38f) || !finite) {
    *scale = __builtin_nanf("");
    for (int64_t j = 0; j < K; ++j) q[j] = 0;
    return;
  }
  *scale = s;

  k = 0;
#if defined(PQ_SIMD_AVX512)
  const __m512 sv = _mm512_set1_ps(s), yv = _mm512_set1_ps(1.0f / s);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  if (s >= kQuantMulMinScale) {
    for (; k + 16 <= K; k += 16) {
      const __m512i v = _mm512_cvtps_epi32(div_by_reciprocal(_mm512_loadu_ps(x + k), sv, yv));
      _mm_storeu_si128((__m128i*)(q + k), _mm512_cvtepi32_epi8(_mm512_max_epi32(_mm512_min_epi32(v, hi), lo)));
    }
  }
  for (; k + 16 <= K; k += 16) {
    const __m512i v = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(x + k), sv));
    _mm_storeu_si128((__m128i*)(q + k), _mm512_cvtepi32_epi8(_mm512_max_epi32(_mm512_min_epi32(v, hi), lo)));
  }
  if (k < K) {
    const __m512i v = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(tail, x + k), sv));
    _mm512_mask_cvtepi32_storeu_epi8(q + k, tail, _mm512_max_epi32(_mm512_min_epi32(v, hi), lo));
    k = K;
  }
#elif defined(PQ_SIMD_AVX2)
  const __m256 sv = _mm256_set1_ps(s), yv = _mm256_set1_ps(1.0f / s);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  const bool by_mul = s >= kQuantMulMinScale;
  for (; k + 8 <= K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    __m256i v = _mm256_cvtps_epi32(by_mul ? div_by_reciprocal(xv, sv, yv) : _mm256_div_ps(xv, sv));
    v = _mm256_max_epi32(_mm256_min_epi32(v, hi), lo);
    const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i*)(q + k), _mm_packs_epi16(p16, p16));
  }
#endif
  for (; k < K; ++k) {
    /* fmaxf/fminf return the non-NaN operand, so NaN clamps to -127 instead of
     * reaching an undefined float -> int conversion. */
    const float v = fminf(fmaxf(nearbyintf(x[k] / s), -127.0f), 127.0f);
    q[k] = (int8_t)(int)v;
  }
}

#if defined(PQ_SIMD_AVX512)
/* One row of x in 24-bit fixed point as three int8 terms (pq.h, the int4
 * weight-only decode path): X = round(x / s), s = amax / 8323072 (127 * 2^16,
 * so |X| <= 8323072), then X = 65536 * hi + 256 * mid + lo with lo, mid in
 * [-128, 127] and hi in [-127, 127], by rounding shifts in int32 (exact).
 * Writes the terms to t0 (hi), t1 (mid), t2 (lo) and their scales s * 65536,
 * s * 256, s (exact: powers of two). Returns false, writing nothing useful,
 * when the row is not finite or its max is below 2^-100 (s would lose bits
 * to subnormals): the caller then takes the float path.
 *
 * kOffsetDigits: the bytes are instead the base-256 digits of X + 2^23 (in
 * [65536, 16711680]: hi in [1, 255], mid and lo in [0, 255]), read as uint8:
 * X = 65536 * (hi - 128) + 256 * mid + lo, the same scales. Their dot products
 * with signed weights w then carry 2^23 sum(w) = 65536 * 128 sum(w) in all,
 * taken off the hi term's alone (the 2:4 + int4 kernels, tile_sparse24_fx_panel.h). */
template <bool kOffsetDigits = false>
inline bool split_row_fixed24(const float* x, int64_t K, int8_t* t0, int8_t* t1, int8_t* t2,
                              float* s3) {
  const __mmask16 tail = (__mmask16)((1u << (K % 16)) - 1);
  __m512 mx = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  if (k < K) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, x + k)));
  /* a NaN lane: max_ps returns its second operand, so NaN may be dropped; check the sum */
  const float amax = _mm512_reduce_max_ps(mx);
  if (!(amax >= 0x1p-100f && amax <= 3.0e38f)) return false;
  __m512 nan_probe = _mm512_setzero_ps();
  const float s = amax / 8323072.0f;
  const __m512 sv = _mm512_set1_ps(s);
  const __m512i r128 = _mm512_set1_epi32(128);
  auto split = [&](__m512 v, __m512i& hi, __m512i& mid, __m512i& lo) {
    nan_probe = _mm512_add_ps(nan_probe, _mm512_mul_ps(v, _mm512_setzero_ps()));
    const __m512i X = _mm512_cvtps_epi32(_mm512_div_ps(v, sv));
    if constexpr (kOffsetDigits) { /* the stores below keep each dword's low byte */
      lo = _mm512_add_epi32(X, _mm512_set1_epi32(1 << 23));
      mid = _mm512_srli_epi32(lo, 8);
      hi = _mm512_srli_epi32(lo, 16);
      return;
    }
    const __m512i q = _mm512_srai_epi32(_mm512_add_epi32(X, r128), 8);
    lo = _mm512_sub_epi32(X, _mm512_slli_epi32(q, 8));
    hi = _mm512_srai_epi32(_mm512_add_epi32(q, r128), 8);
    mid = _mm512_sub_epi32(q, _mm512_slli_epi32(hi, 8));
  };
  __m512i hi, mid, lo;
  for (k = 0; k + 16 <= K; k += 16) {
    split(_mm512_loadu_ps(x + k), hi, mid, lo);
    _mm_storeu_si128((__m128i*)(t0 + k), _mm512_cvtepi32_epi8(hi));
    _mm_storeu_si128((__m128i*)(t1 + k), _mm512_cvtepi32_epi8(mid));
    _mm_storeu_si128((__m128i*)(t2 + k), _mm512_cvtepi32_epi8(lo));
  }
  if (k < K) {
    split(_mm512_maskz_loadu_ps(tail, x + k), hi, mid, lo);
    _mm512_mask_cvtepi32_storeu_epi8(t0 + k, tail, hi);
    _mm512_mask_cvtepi32_storeu_epi8(t1 + k, tail, mid);
    _mm512_mask_cvtepi32_storeu_epi8(t2 + k, tail, lo);
  }
  if (_mm512_reduce_add_ps(nan_probe) != 0.0f) return false; /* 0 * NaN is NaN */
  s3[0] = s * 65536.0f;
  s3[1] = s * 256.0f;
  s3[2] = s;
  return true;
}
#elif defined(PQ_SIMD_AVX2)
/* split_row_fixed24 above (the plain digits only), 8 entries a step and a scalar
 * tail, with the same arithmetic: the IEEE quotient x / s rounded to nearest even, split
 * by the same integer shifts, so each row's terms and scales are the AVX512 ISAs'. */
inline bool split_row_fixed24(const float* x, int64_t K, int8_t* t0, int8_t* t1, int8_t* t2,
                              float* s3) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 mx = _mm256_setzero_ps();
  float amax_tail = 0.0f, nan_tail = 0.0f;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask));
  for (int64_t j = k; j < K; ++j) amax_tail = fabsf(x[j]) > amax_tail ? fabsf(x[j]) : amax_tail;
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float amax = _mm_cvtss_f32(m4) > amax_tail ? _mm_cvtss_f32(m4) : amax_tail;
  if (!(amax >= 0x1p-100f && amax <= 3.0e38f)) return false; /* a NaN may be dropped: below */
  const float s = amax / 8323072.0f;
  const __m256 sv = _mm256_set1_ps(s);
  const __m256i r128 = _mm256_set1_epi32(128);
  /* byte 0 of each dword to the low 4 bytes of each 128-bit lane, then both lanes' together */
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i join = _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1);
  auto store8 = [&](int8_t* dst, __m256i v) {
    v = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, pick), join);
    _mm_storel_epi64((__m128i*)dst, _mm256_castsi256_si128(v));
  };
  __m256 nan_probe = _mm256_setzero_ps();
  for (k = 0; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    nan_probe = _mm256_add_ps(nan_probe, _mm256_mul_ps(v, _mm256_setzero_ps()));
    const __m256i X = _mm256_cvtps_epi32(_mm256_div_ps(v, sv));
    const __m256i q = _mm256_srai_epi32(_mm256_add_epi32(X, r128), 8);
    const __m256i lo = _mm256_sub_epi32(X, _mm256_slli_epi32(q, 8));
    const __m256i hi = _mm256_srai_epi32(_mm256_add_epi32(q, r128), 8);
    const __m256i mid = _mm256_sub_epi32(q, _mm256_slli_epi32(hi, 8));
    store8(t0 + k, hi);
    store8(t1 + k, mid);
    store8(t2 + k, lo);
  }
  for (; k < K; ++k) {
    nan_tail += x[k] * 0.0f;
    const int32_t X = (int32_t)nearbyintf(x[k] / s); /* the default mode: to nearest even */
    const int32_t q = (X + 128) >> 8, hi = (q + 128) >> 8;
    t0[k] = (int8_t)hi;
    t1[k] = (int8_t)(q - hi * 256);
    t2[k] = (int8_t)(X - q * 256);
  }
  if (hsum256(nan_probe) + nan_tail != 0.0f) return false; /* 0 * NaN is NaN */
  s3[0] = s * 65536.0f;
  s3[1] = s * 256.0f;
  s3[2] = s;
  return true;
}
#endif

}  // namespace
}  // namespace PQ_NS
#endif /* PQ_CPU_TILE_INT8_H */
