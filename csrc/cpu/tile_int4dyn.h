/* W4A8 micro-kernel: exact per-group int8 x int4 dot products, combined in fp32.
 *
 * AVX512-VNNI: vpdpbusd multiplies unsigned by signed bytes. The int4 codes
 * (0..15) are the unsigned operand as they are and xq the signed one, so no
 * bias or saturation arises; the zero point enters once per group through the
 * per-group sums of xq:  sum_k x*(c - z) = sum_k x*c - z * sum_k x.
 *
 * Decoding without shuffles: the S = min(G, 64) codes of a step sit in S/2
 * bytes, code 2j in the low and 2j+1 in the high nibble of byte j. Those bytes
 * are broadcast to both 256-bit halves (a load, no shuffle), shifted right by 0
 * (low half) or 4 (high half) and masked to 0..15: the low half holds the even
 * codes, the high half the odd ones. xq is reordered once per call into the
 * same order ([even k | odd k] per step, see pq.h), so one vpdpbusd does the
 * step. Dword lane L covers codes of one 8-aligned span, so of one group. */
#ifndef PQ_CPU_TILE_INT4DYN_H
#define PQ_CPU_TILE_INT4DYN_H
#include "common.h"

namespace PQ_NS {
namespace {

/* Reorders row xq[K] into xp[K] (steps of S codes: [even | odd]) and stores the
 * per-group sums of xq in gsum[K/G]. */
inline void int4dyn_prep_row(const int8_t* xq, int64_t K, int64_t G, int8_t* xp, int32_t* gsum) {
  const int64_t S = G < 64 ? G : 64;
  for (int64_t k0 = 0; k0 < K; k0 += S)
    for (int64_t i = 0; i < S / 2; ++i) {
      xp[k0 + i] = xq[k0 + 2 * i];
      xp[k0 + S / 2 + i] = xq[k0 + 2 * i + 1];
    }
  for (int64_t g = 0; g < K / G; ++g) {
    int32_t s = 0;
    for (int64_t k = g * G; k < (g + 1) * G; ++k) s += xq[k];
    gsum[g] = s;
  }
}

/* dot[r][t] = sum_g sc[r,g] * sum_{k in g} x[t,k] * (code[r,k] - zp[r,g]) in
 * fp32, the inner sums exact. x: xq rows (natural order, generic path) or xp
 * rows (reordered, AVX512 and AVX2 paths), row stride K; gsum rows of K/G. */
template <int R, int T>
inline void dot_i8_u4(const int8_t* x, const int32_t* gsum, const uint8_t* wp, const float* sc,
                      const uint8_t* zp, int64_t K, int64_t G, float dot[R][T]) {
  const int64_t ng = K / G, ldw = K / 2;
#if defined(PQ_SIMD_AVX512)
  prefetch_next_groups<R>(sc, zp, ng);
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  __m512 facc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) facc[r][t] = _mm512_setzero_ps();
  if (G >= 64) {
    for (int64_t g = 0; g < ng; ++g) {
      __m512i iacc[R][T];
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) iacc[r][t] = _mm512_setzero_si512();
      for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
        __m512i xv[T];
        for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_si512(x + t * K + k);
        for (int r = 0; r < R; ++r) {
          const __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(wp + r * ldw + k / 2)));
          PQ_PREFETCH_NEXT_TILE(wp + (r + R) * ldw + k / 2);
          const __m512i c = _mm512_and_si512(_mm512_srlv_epi16(b, shift), nib);
          for (int t = 0; t < T; ++t) iacc[r][t] = _mm512_dpbusd_epi32(iacc[r][t], c, xv[t]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_set1_ps(sc[r * ng + g]);
        for (int t = 0; t < T; ++t)
          facc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][t]), s, facc[r][t]);
      }
    }
  } else { /* G == 32: 16 bytes a step, lanes 0..7 used */
    const __m512i shift32 = _mm512_setr_epi64(0, 0, 0x0004000400040004LL, 0x0004000400040004LL, 0, 0, 0, 0);
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t k = g * 32;
      __m512i xv[T];
      for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_epi8(0xFFFFFFFFULL, x + t * K + k);
      for (int r = 0; r < R; ++r) {
        const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(wp + r * ldw + k / 2)));
        const __m512i c = _mm512_and_si512(_mm512_srlv_epi16(b, shift32), nib);
        const __m512 s = _mm512_set1_ps(sc[r * ng + g]);
        for (int t = 0; t < T; ++t) {
          const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, xv[t]);
          facc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, facc[r][t]);
        }
      }
    }
  }
  /* Zero points: sum_g sc * zp * gsum, 16 groups a vector. */
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      __m512 corr = _mm512_setzero_ps();
      for (int64_t g = 0; g < ng; g += 16) {
        const __mmask16 m = ng - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (ng - g)) - 1);
        const __m512 s = _mm512_maskz_loadu_ps(m, sc + r * ng + g);
        const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, zp + r * ng + g)));
        const __m512 xs = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, gsum + t * ng + g));
        corr = _mm512_fmadd_ps(_mm512_mul_ps(s, z), xs, corr);
      }
      dot[r][t] = _mm512_reduce_add_ps(facc[r][t]) - _mm512_reduce_add_ps(corr);
    }
#elif defined(PQ_SIMD_AVX2)
  /* vpmaddubsw multiplies the codes (0..15, the unsigned operand as they are) by
   * the reordered xq (signed) into int16 pair sums of at most 2 * 15 * 128 =
   * 3840 in magnitude, so a lane can add four 64-code steps' two products
   * (30720) before vpmaddwd widens it to int32: no saturation for any int8 x.
   * The zero point is taken off each group's exact int32 sum as z * gsum, in
   * integers, so acc is formed exactly as pq.h writes it. S = 64 codes a step
   * (32 bytes: low nibbles the even codes, high the odd, as xp is ordered), or,
   * for G == 32, 16 bytes broadcast to both halves, the high half shifted by 4. */
  prefetch_next_groups<R>(sc, zp, ng);
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i half_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  __m256 facc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) facc[r][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t k0 = g * G, k1 = k0 + G;
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = wp + r * ldw;
      __m256i acc32[T];
      for (int t = 0; t < T; ++t) acc32[t] = _mm256_setzero_si256();
      if (G == 32) {
        PQ_PREFETCH_NEXT_TILE(wr + R * ldw + k0 / 2);
        const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(wr + k0 / 2)));
        const __m256i c = _mm256_and_si256(_mm256_srlv_epi32(b, half_shift), nib);
        for (int t = 0; t < T; ++t) {
          const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + t * K + k0));
          acc32[t] = _mm256_madd_epi16(_mm256_maddubs_epi16(c, xv), ones);
        }
      } else {
        for (int64_t k = k0; k < k1;) {
          __m256i acc16[T];
          for (int t = 0; t < T; ++t) acc16[t] = _mm256_setzero_si256();
          for (int s = 0; s < 4 && k < k1; ++s, k += 64) {
            PQ_PREFETCH_NEXT_TILE(wr + R * ldw + k / 2);
            const __m256i b = _mm256_loadu_si256((const __m256i*)(wr + k / 2));
            const __m256i lo = _mm256_and_si256(b, nib);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
            for (int t = 0; t < T; ++t) {
              const int8_t* xr = x + t * K + k;
              acc16[t] = _mm256_add_epi16(acc16[t], _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)xr)));
              acc16[t] = _mm256_add_epi16(acc16[t], _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xr + 32))));
            }
          }
          for (int t = 0; t < T; ++t) acc32[t] = _mm256_add_epi32(acc32[t], _mm256_madd_epi16(acc16[t], ones));
        }
      }
      const __m256 s = _mm256_set1_ps(sc[r * ng + g]);
      const int32_t z = zp[r * ng + g];
      for (int t = 0; t < T; ++t) {
        const __m256i zs = _mm256_setr_epi32(z * gsum[t * ng + g], 0, 0, 0, 0, 0, 0, 0);
        facc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc32[t], zs)), s, facc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) dot[r][t] = hsum256(facc[r][t]);
#else
  (void)gsum;
  /* Exact int32 per group (|sum| <= G * 15 * 128), then one fp32 multiply-add
   * per group; the compiler vectorizes the inner integer loop. */
  float acc[R][T] = {};
  for (int64_t g = 0; g < ng; ++g)
    for (int r = 0; r < R; ++r) {
      const int z = zp[r * ng + g];
      const uint8_t* p = wp + r * ldw;
      for (int t = 0; t < T; ++t) {
        const int8_t* xr = x + t * K;
        int32_t s = 0;
        for (int64_t k = g * G; k < (g + 1) * G; k += 2)
          s += xr[k] * ((p[k / 2] & 15) - z) + xr[k + 1] * ((p[k / 2] >> 4) - z);
        acc[r][t] += sc[r * ng + g] * (float)s;
      }
    }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) dot[r][t] = acc[r][t];
#endif
}

}  // namespace
}  // namespace PQ_NS
#endif /* PQ_CPU_TILE_INT4DYN_H */
