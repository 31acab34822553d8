/* int4 weight-only at M <= 4 on AVX512-VNNI: x rows in 24-bit fixed point
 * (split_row_fixed24: X = 65536 * hi + 256 * mid + lo, three int8 terms) against
 * group-quantized 4-bit weights, for K % 128 == 0 and G == 64 or G % 128 == 0.
 *
 * Why a kernel of its own: the W4A8 GEMV run on the three term rows spends, per
 * 64 bytes of codes, 6 vpdpbusd, 4 decoding uops and 6 epilogue uops (a convert
 * and an FMA per term and group). At 16 vector uops a cache line it ran 1.5-1.9x
 * slower on two threads than the same loop with one term. Here:
 *  - a whole 128-code block (64 bytes) is loaded at once and split into its even
 *    codes (low nibbles) and odd codes (high nibbles): 3 uops, no broadcast;
 *  - the three terms share one int32 accumulator: the hi term's dot products, a
 *    shift by 8, the mid term's, a shift by 8, the lo term's. Each dword lane
 *    sums 8 codes a block, so |lane| <= 8 * 15 * 128 per term and the combined
 *    65536 * hi + 256 * mid + lo sum stays below 1.003e9 < 2^31: exact;
 *  - one convert and one FMA per block then apply the group scale.
 * That is 13 vector uops a cache line of weights per x row. The convert rounds the block's sum once
 * to fp32 (2^-24 relative), the same as the float paths' accumulation.
 *
 * x layout (prepared once per call by fx24_prep_row): per 128-code block,
 * 384 bytes [hi even | hi odd | mid even | mid odd | lo even | lo odd], 64
 * bytes each, "even" holding the terms of codes k + 2j and "odd" those of
 * k + 2j + 1 (j = 0..63). Byte j of a block's 64 weight bytes holds exactly
 * codes k + 2j (low nibble) and k + 2j + 1 (high nibble), so lane j of the
 * masked bytes meets lane j of the even row. Dword lane L covers codes
 * k + 8L .. k + 8L + 7: lanes 0-7 lie in one 64-code half, lanes 8-15 in the
 * other, so G = 64 takes a scale vector of two halves. */
#ifndef PQ_CPU_TILE_INT4_FX24_H
#define PQ_CPU_TILE_INT4_FX24_H
#include "common.h"

namespace PQ_NS {
namespace {

#if defined(PQ_SIMD_AVX512)
constexpr int64_t kFx24Block = 128; /* codes a block (pq::int4wo_fx24_gemv_applies) */

/* The three term rows t0 (hi), t1 (mid), t2 (lo) of K bytes -> xp (3K bytes, the
 * block layout above) and xl (K/8 int32): per block, dword lane L's sum of X = 65536 hi +
 * 256 mid + lo over its 8 codes (|.| <= 8 * 8323072: exact), for the zero points. */
inline void fx24_prep_row(const int8_t* t0, const int8_t* t1, const int8_t* t2, int64_t K,
                          int8_t* xp, int32_t* xl) {
  const int8_t* terms[3] = {t0, t1, t2};
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t k = 0; k < K; k += kFx24Block) {
    int8_t* b = xp + 3 * k;
    for (int t = 0; t < 3; ++t)
      for (int h = 0; h < 2; ++h) { /* bytes k + 64h .. + 63: 32 even, 32 odd */
        const __m512i v = _mm512_loadu_si512(terms[t] + k + 64 * h);
        _mm256_storeu_si256((__m256i*)(b + 128 * t + 32 * h), _mm512_cvtepi16_epi8(v));
        _mm256_storeu_si256((__m256i*)(b + 128 * t + 64 + 32 * h),
                            _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8)));
      }
    /* the lanes of dot_fx24_u4's accumulator, with every code 1 */
    __m512i a = _mm512_setzero_si512();
    for (int t = 0; t < 3; ++t) {
      if (t) a = _mm512_slli_epi32(a, 8);
      a = _mm512_dpbusd_epi32(a, ones, _mm512_loadu_si512(b + 128 * t));
      a = _mm512_dpbusd_epi32(a, ones, _mm512_loadu_si512(b + 128 * t + 64));
    }
    _mm512_storeu_si512(xl + k / 8, a);
  }
}

/* dot[r][t] = sum_k X_t[k] * (code[r, k] - zp[r, k / G]) * sc[r, k / G], in units of
 * row t's scale s (the caller multiplies by it); row t of xp at xp + 3K t, its lane sums
 * at xl + (K/8) t. The block's x vectors are read where used (memory operands of
 * vpdpbusd): the R weight rows share them from L1. Each lane takes zero * its sum of X off
 * in int32 (|sum X (code - zero)| <= 8 * 8323072 * 15 < 2^31) before the convert: taken
 * off in fp32 after the sum over groups, as before, the rounding was relative to the code
 * term, which activations far from zero mean make much larger than the result (1.1e-5 of
 * max|y| at x = randn + 10, against 1.5e-7 now). */
template <int R, int T>
inline void dot_fx24_u4(const int8_t* xp, const int32_t* xl, const uint8_t* wp, const float* sc,
                        const uint8_t* zp, int64_t K, int64_t G, float dot[R][T]) {
  const int64_t ng = K / G, ldw = K / 2;
  prefetch_next_groups<R>(sc, zp, ng);
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 facc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) facc[r][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kFx24Block) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = wp + r * ldw + k / 2;
      PQ_PREFETCH_NEXT_TILE(p + R * ldw);
      const __m512i w = _mm512_loadu_si512(p);
      const __m512i ce = _mm512_and_si512(w, nib);
      const __m512i co = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
      const float* s = sc + r * ng + k / G;
      const __m512 sv = G == 64 ? _mm512_insertf32x8(_mm512_set1_ps(s[0]), _mm256_set1_ps(s[1]), 1)
                                : _mm512_set1_ps(s[0]);
      const uint8_t* z = zp + r * ng + k / G;
      const __m512i zv = G == 64 ? _mm512_inserti32x8(_mm512_set1_epi32(z[0]), _mm256_set1_epi32(z[1]), 1)
                                 : _mm512_set1_epi32(z[0]);
      for (int t = 0; t < T; ++t) {
        const int8_t* b = xp + 3 * K * t + 3 * k;
        __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ce, _mm512_loadu_si512(b));
        a = _mm512_dpbusd_epi32(a, co, _mm512_loadu_si512(b + 64));
        a = _mm512_slli_epi32(a, 8);
        a = _mm512_dpbusd_epi32(a, ce, _mm512_loadu_si512(b + 128));
        a = _mm512_dpbusd_epi32(a, co, _mm512_loadu_si512(b + 192));
        a = _mm512_slli_epi32(a, 8);
        a = _mm512_dpbusd_epi32(a, ce, _mm512_loadu_si512(b + 256));
        a = _mm512_dpbusd_epi32(a, co, _mm512_loadu_si512(b + 320));
        a = _mm512_sub_epi32(a, _mm512_mullo_epi32(zv, _mm512_loadu_si512(xl + K / 8 * t + k / 8)));
        facc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sv, facc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) dot[r][t] = _mm512_reduce_add_ps(facc[r][t]);
}
#elif defined(PQ_SIMD_AVX2)
/* The same GEMV in 32-byte halves of a block, on vpmaddubsw (codes 0..15 as the unsigned
 * operand) and vpmaddwd: the even and odd codes' int16 pair sums of a term (each at most
 * 2 * 15 * 128 in magnitude) are added in int16, then widened, so a dword lane again sums
 * 8 codes and lane L of half h is the AVX512 kernel's lane 8h + L: the same xp and xl
 * layouts, the same exact int32 lanes, the same converts. Against the float GEMV
 * (dot_f32_u4), the AVX2 path forced on a Xeon, 2 threads, G = 128, Llama-2-7B shapes
 * (benchmarks/ab_inprocess.py, both orders, two runs each): 1.40-1.68x at M = 1,
 * 1.25-1.33x at M = 4. */
constexpr int64_t kFx24Block = 128;

inline void fx24_prep_row(const int8_t* t0, const int8_t* t1, const int8_t* t2, int64_t K,
                          int8_t* xp, int32_t* xl) {
  const int8_t* terms[3] = {t0, t1, t2};
  /* per 128-bit lane: the 8 even bytes, then the 8 odd ones; then the lanes' evens together */
  const __m256i deint = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < K; k += kFx24Block) {
    int8_t* b = xp + 3 * k;
    for (int t = 0; t < 3; ++t)
      for (int q = 0; q < 4; ++q) { /* bytes k + 32q .. + 31: 16 even, 16 odd */
        const __m256i v = _mm256_loadu_si256((const __m256i*)(terms[t] + k + 32 * q));
        const __m256i e = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, deint), 0xD8);
        _mm_storeu_si128((__m128i*)(b + 128 * t + 16 * q), _mm256_castsi256_si128(e));
        _mm_storeu_si128((__m128i*)(b + 128 * t + 64 + 16 * q), _mm256_extracti128_si256(e, 1));
      }
    for (int h = 0; h < 2; ++h) { /* dot_fx24_u4's lanes of this half, with every code 1 */
      __m256i a = _mm256_setzero_si256();
      for (int t = 0; t < 3; ++t) {
        const int8_t* e = b + 128 * t + 32 * h;
        const __m256i p = _mm256_add_epi16(
            _mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i*)e)),
            _mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i*)(e + 64))));
        a = _mm256_add_epi32(t ? _mm256_slli_epi32(a, 8) : a, _mm256_madd_epi16(p, ones16));
      }
      _mm256_storeu_si256((__m256i*)(xl + k / 8 + 8 * h), a);
    }
  }
}

/* G % 128 == 0: a block lies in one group, so its two halves' int16 pair sums of a term are
 * added in int16 too (each at most 4 * 15 * 128 = 7680, the two 15360), then widened once:
 * a dword lane sums 16 codes, the codes of lanes L and 8 + L of the AVX512 kernel, whose xl
 * lanes are added for the zero point (|sum X (code - zero)| <= 16 * 8323072 * 15 < 2^31: still
 * exact). One widening, combine, zero point, convert and FMA a block of a row instead of two:
 * in-process A/B against the two-half loop (the avx2 build on a Zen 4, 2 threads, G = 128,
 * both orders, geometric mean), 4096 x 4096 / 11008 x 4096 / 4096 x 11008: 1.25x / 1.20x /
 * 1.19x at M = 1, 1.24x / 1.29x / 1.29x at M = 4. An L1 hint 512 or 1024 bytes on in the row
 * read 0.95-0.97x at M = 1, not kept. */
template <int R, int T>
inline void fx24_u4_blocks_g128(const int8_t* xp, const int32_t* xl, const uint8_t* wp,
                                const float* sc, const uint8_t* zp, int64_t K, int64_t G,
                                __m256 facc[R][T]) {
  const int64_t ng = K / G, ldw = K / 2;
  const __m256i nib = _mm256_set1_epi8(0x0F), ones16 = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < K; k += kFx24Block) {
    const int64_t g = k / G;
#pragma GCC unroll 4 /* the rows then load the block's x vectors once */
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = wp + r * ldw + k / 2;
      PQ_PREFETCH_NEXT_TILE(p + R * ldw);
      const __m256i w0 = _mm256_loadu_si256((const __m256i*)p);
      const __m256i w1 = _mm256_loadu_si256((const __m256i*)(p + 32));
      const __m256i ce0 = _mm256_and_si256(w0, nib), co0 = _mm256_and_si256(_mm256_srli_epi16(w0, 4), nib);
      const __m256i ce1 = _mm256_and_si256(w1, nib), co1 = _mm256_and_si256(_mm256_srli_epi16(w1, 4), nib);
      const __m256 sv = _mm256_set1_ps(sc[r * ng + g]);
      const __m256i zv = _mm256_set1_epi32(zp[r * ng + g]);
      for (int t = 0; t < T; ++t) {
        const int8_t* b = xp + 3 * K * t + 3 * k;
        auto term = [&](int u) PQ_ALWAYS_INLINE { /* both halves' pair sums of term u, widened */
          const int8_t* e = b + 128 * u;
          const __m256i h0 = _mm256_add_epi16(
              _mm256_maddubs_epi16(ce0, _mm256_loadu_si256((const __m256i*)e)),
              _mm256_maddubs_epi16(co0, _mm256_loadu_si256((const __m256i*)(e + 64))));
          const __m256i h1 = _mm256_add_epi16(
              _mm256_maddubs_epi16(ce1, _mm256_loadu_si256((const __m256i*)(e + 32))),
              _mm256_maddubs_epi16(co1, _mm256_loadu_si256((const __m256i*)(e + 96))));
          return _mm256_madd_epi16(_mm256_add_epi16(h0, h1), ones16);
        };
        __m256i a = term(0);
        a = _mm256_add_epi32(_mm256_slli_epi32(a, 8), term(1));
        a = _mm256_add_epi32(_mm256_slli_epi32(a, 8), term(2));
        const int32_t* l = xl + K / 8 * t + k / 8;
        const __m256i xs = _mm256_add_epi32(_mm256_loadu_si256((const __m256i*)l),
                                            _mm256_loadu_si256((const __m256i*)(l + 8)));
        a = _mm256_sub_epi32(a, _mm256_mullo_epi32(zv, xs));
        facc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), sv, facc[r][t]);
      }
    }
  }
}

/* G = 64: each half of a block is a group of its own, widened, scaled and added alone. */
template <int R, int T>
inline void fx24_u4_blocks_g64(const int8_t* xp, const int32_t* xl, const uint8_t* wp,
                               const float* sc, const uint8_t* zp, int64_t K, int64_t G,
                               __m256 facc[R][T]) {
  const int64_t ng = K / G, ldw = K / 2;
  const __m256i nib = _mm256_set1_epi8(0x0F), ones16 = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < K; k += kFx24Block) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = wp + r * ldw + k / 2;
      PQ_PREFETCH_NEXT_TILE(p + R * ldw);
      for (int h = 0; h < 2; ++h) {
        const __m256i w = _mm256_loadu_si256((const __m256i*)(p + 32 * h));
        const __m256i ce = _mm256_and_si256(w, nib);
        const __m256i co = _mm256_and_si256(_mm256_srli_epi16(w, 4), nib);
        const int64_t g = (k + 64 * h) / G;
        const __m256 sv = _mm256_set1_ps(sc[r * ng + g]);
        const __m256i zv = _mm256_set1_epi32(zp[r * ng + g]);
        for (int t = 0; t < T; ++t) {
          const int8_t* b = xp + 3 * K * t + 3 * k + 32 * h;
          __m256i a = _mm256_setzero_si256();
          for (int u = 0; u < 3; ++u) { /* hi, mid, lo: a = 256 * a + this term's lanes */
            const __m256i pr = _mm256_add_epi16(
                _mm256_maddubs_epi16(ce, _mm256_loadu_si256((const __m256i*)(b + 128 * u))),
                _mm256_maddubs_epi16(co, _mm256_loadu_si256((const __m256i*)(b + 128 * u + 64))));
            a = _mm256_add_epi32(u ? _mm256_slli_epi32(a, 8) : a, _mm256_madd_epi16(pr, ones16));
          }
          a = _mm256_sub_epi32(
              a, _mm256_mullo_epi32(zv, _mm256_loadu_si256((const __m256i*)(xl + K / 8 * t + k / 8 + 8 * h))));
          facc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), sv, facc[r][t]);
        }
      }
    }
  }
}

template <int R, int T>
inline void dot_fx24_u4(const int8_t* xp, const int32_t* xl, const uint8_t* wp, const float* sc,
                        const uint8_t* zp, int64_t K, int64_t G, float dot[R][T]) {
  prefetch_next_groups<R>(sc, zp, K / G);
  __m256 facc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) facc[r][t] = _mm256_setzero_ps();
  if (G % 128 == 0)
    fx24_u4_blocks_g128<R, T>(xp, xl, wp, sc, zp, K, G, facc);
  else
    fx24_u4_blocks_g64<R, T>(xp, xl, wp, sc, zp, K, G, facc);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) dot[r][t] = hsum256(facc[r][t]);
}
#endif

}  // namespace
}  // namespace PQ_NS
#endif /* PQ_CPU_TILE_INT4_FX24_H */
