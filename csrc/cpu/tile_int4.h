/* int4 micro-kernel: fp32 x dot products with group-quantized 4-bit weights.
 *
 * Every path dequantizes each weight to fp32 as w = (float)(code - zero) * scale
 * (one rounding, the same value on every ISA) and accumulates x * w with FMA
 * into one fp32 sum per output; no per-group partial sums. */
#ifndef PQ_CPU_TILE_INT4_H
#define PQ_CPU_TILE_INT4_H
#include "common.h"

namespace PQ_NS {
namespace {

#if defined(PQ_SIMD_AVX2)
/* 16 codes (the 8 bytes at p, low nibble first) as (float)(code - zero) * scale, in k
 * order: w0 codes 0..7, w1 codes 8..15. The nibbles are split and interleaved back, widened
 * to int32 and the zero point subtracted there (any uint8: the ops take zero points past
 * 15, where an int8 difference would wrap), then converted and scaled. */
inline void u4_decode16(const uint8_t* p, uint8_t zero, float scale, __m256& w0, __m256& w1) {
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m128i b = _mm_loadl_epi64((const __m128i*)p);
  const __m128i c = _mm_unpacklo_epi8(_mm_and_si128(b, nib), _mm_and_si128(_mm_srli_epi16(b, 4), nib));
  const __m256i z = _mm256_set1_epi32(zero);
  const __m256 s = _mm256_set1_ps(scale);
  w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(c), z)), s);
  w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)), z)), s);
}
#endif

/* dot[r][t] = sum_k x[t*ldx + k] * w[r, k], with row r of the packed weights at
 * wp + r*K/2 and its group scales/zeros at sc/zp + r*(K/G). */
template <int R, int T>
inline void dot_f32_u4(const float* x, int64_t ldx, const uint8_t* wp, const float* sc,
                       const uint8_t* zp, int64_t K, int64_t G, float dot[R][T]) {
  const int64_t ng = K / G, ldw = K / 2;
#if defined(PQ_SIMD_AVX512)
  prefetch_next_groups<R>(sc, zp, ng);
  /* Decoding by table lookup: vpermps picks lane (index & 15) of a 16-float
   * table, so with the table holding the 16 dequantized values of the current
   * group, one permute turns 16 codes into 16 fp32 weights, with no nibble
   * masking or int->float conversion.
   *
   * Cross-lane shuffles limit this loop (Zen4 double-pumps 512-bit shuffles),
   * so the 16 code bytes of a 32-code step are not spread to dwords with
   * vpmovzxbd (measured 1.3x slower): they are broadcast to the four
   * 128-bit lanes (a load, no shuffle), and a per-lane variable shift brings
   * byte 4m + L of the block into dword lane 4L + m, low nibble first (its high
   * nibble after a further shift by 4). Lane 4L + m therefore holds code
   * k = 8m + 2L (even) or 8m + 2L + 1 (odd); x is permuted to the same order,
   * once per x row and step, shared by the R weight rows. */
  const __m512i even = _mm512_setr_epi32(0, 8, 16, 24, 2, 10, 18, 26, 4, 12, 20, 28, 6, 14, 22, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i lane_shift = _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24);
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  __m512 tab[R];
  /* 32 codes (16 bytes) per step; the masked variant handles a group length
   * n that is not a multiple of 32, zeroing both the x and the weight lanes
   * of codes k >= n (odd codes share the mask of the even code before them). */
  auto step = [&](int64_t k, bool full, int64_t n) {
    const __mmask16 mx0 = full ? 0xFFFF : (__mmask16)(n >= 16 ? 0xFFFF : (1u << n) - 1);
    const __mmask16 mx1 = full ? 0xFFFF : (__mmask16)(n > 16 ? (1u << (n - 16)) - 1 : 0);
    const __mmask16 mw = full ? 0xFFFF : _mm512_cmplt_epi32_mask(even, _mm512_set1_epi32((int)n));
    __m512 xe[T], xo[T];
    for (int t = 0; t < T; ++t) {
      const float* p = x + t * ldx + k;
      const __m512 a = full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mx0, p);
      const __m512 b = full ? _mm512_loadu_ps(p + 16) : _mm512_maskz_loadu_ps(mx1, p + 16);
      xe[t] = _mm512_permutex2var_ps(a, even, b);
      xo[t] = _mm512_permutex2var_ps(a, odd, b);
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = wp + r * ldw + k / 2;
      PQ_PREFETCH_NEXT_TILE(p + R * ldw);
      const __m128i bytes = full ? _mm_loadu_si128((const __m128i*)p)
                                 : _mm_maskz_loadu_epi8((__mmask16)((1u << (n / 2)) - 1), p);
      const __m512i q = _mm512_srlv_epi32(_mm512_broadcast_i32x4(bytes), lane_shift);
      const __m512i qh = _mm512_srli_epi32(q, 4);
      const __m512 we = full ? _mm512_permutexvar_ps(q, tab[r]) : _mm512_maskz_permutexvar_ps(mw, q, tab[r]);
      const __m512 wo = full ? _mm512_permutexvar_ps(qh, tab[r]) : _mm512_maskz_permutexvar_ps(mw, qh, tab[r]);
      for (int t = 0; t < T; ++t) {
        acc[r][t] = _mm512_fmadd_ps(xe[t], we, acc[r][t]);
        acc[r][t] = _mm512_fmadd_ps(xo[t], wo, acc[r][t]);
      }
    }
  };
  for (int64_t g = 0; g < ng; ++g) {
    for (int r = 0; r < R; ++r)
      tab[r] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps((float)zp[r * ng + g])),
                             _mm512_set1_ps(sc[r * ng + g]));
    int64_t k = g * G;
    const int64_t k1 = k + G;
    for (; k + 32 <= k1; k += 32) step(k, true, 32);
    if (k < k1) step(k, false, k1 - k);
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) dot[r][t] = _mm512_reduce_add_ps(acc[r][t]);
#elif defined(PQ_SIMD_AVX2)
  /* 16 codes (8 bytes) per step (u4_decode16). Group tails are scalar. */
  prefetch_next_groups<R>(sc, zp, ng);
  __m256 acc[R][T];
  float tail[R][T] = {};
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    int64_t k = g * G;
    const int64_t k1 = k + G;
    for (; k + 16 <= k1; k += 16) {
      __m256 xa[T], xb[T];
      for (int t = 0; t < T; ++t) {
        xa[t] = _mm256_loadu_ps(x + t * ldx + k);
        xb[t] = _mm256_loadu_ps(x + t * ldx + k + 8);
      }
      for (int r = 0; r < R; ++r) {
        if ((k & 127) == 0) PQ_PREFETCH_NEXT_TILE(wp + (r + R) * ldw + k / 2);
        __m256 w0, w1;
        u4_decode16(wp + r * ldw + k / 2, zp[r * ng + g], sc[r * ng + g], w0, w1);
        for (int t = 0; t < T; ++t) {
          acc[r][t] = _mm256_fmadd_ps(xa[t], w0, acc[r][t]);
          acc[r][t] = _mm256_fmadd_ps(xb[t], w1, acc[r][t]);
        }
      }
    }
    for (; k < k1; ++k)
      for (int r = 0; r < R; ++r) {
        const int code = (wp[r * ldw + k / 2] >> ((k & 1) * 4)) & 15;
        const float wv = (float)(code - (int)zp[r * ng + g]) * sc[r * ng + g];
        for (int t = 0; t < T; ++t) tail[r][t] += x[t * ldx + k] * wv;
      }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      dot[r][t] = hsum256(acc[r][t]) + tail[r][t];
    }
#else
  /* One byte = two codes (low nibble first), so k advances in pairs and the
   * nibble selection needs no per-element branch. Even/odd k accumulate into
   * separate sums, which also gives the compiler two independent chains. */
  float acc[R][T][2] = {};
  for (int64_t g = 0; g < ng; ++g)
    for (int r = 0; r < R; ++r) {
      const int z = zp[r * ng + g];
      const float s = sc[r * ng + g];
      const uint8_t* p = wp + r * ldw;
      for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
        const float w0 = (float)((p[k / 2] & 15) - z) * s, w1 = (float)((p[k / 2] >> 4) - z) * s;
        for (int t = 0; t < T; ++t) {
          acc[r][t][0] += x[t * ldx + k] * w0;
          acc[r][t][1] += x[t * ldx + k + 1] * w1;
        }
      }
    }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) dot[r][t] = acc[r][t][0] + acc[r][t][1];
#endif
}

}  // namespace
}  // namespace PQ_NS
#endif /* PQ_CPU_TILE_INT4_H */
