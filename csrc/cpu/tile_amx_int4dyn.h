/* AMX int8 tiles for int4_dynamic_mm (W4A8) at prefill sizes (AMX build only).
 *
 * Why: the VNNI kernel (tile_int4dyn.h) ran at 0.36-0.45x of FBGEMM's int8
 * GEMM at M = 128; tdpbssd does 16 x 16 x 64 int8 multiply-adds at once.
 *
 * The int4 codes minus their zero points (-15..15) are int8 values, so each
 * task converts its 32-row weight strip once to int8 [32][K] (the A operand,
 * loaded with row stride K) and sweeps its activation rows with it. The
 * activation codes are the B operand, packed by amx_pack_x (tile_amx.h). Per
 * weight group, the tiles accumulate exact int32 sums over the group's K; the
 * sums are then scaled by the group scale into fp32 accumulators:
 *   out[m, n] = x_scale[m] * sum_g scales[n, g] * acc[m, n, g] + bias[n],
 * the arithmetic of pq.h, with the fp32 sum over groups in group order. */
#ifndef PQ_CPU_TILE_AMX_INT4DYN_H
#define PQ_CPU_TILE_AMX_INT4DYN_H
#include "tile_amx_grouped.h"

#if defined(PQ_AMX)
#define PQ_AMX_INT4DYN 1

namespace PQ_NS {
namespace {

/* Groups g0..g1-1 of 32 weight rows of packed int4 [.., K/2] -> int8 (code - zero),
 * row r at wb + r * ld. */
inline void amx_int4dyn_convert(const uint8_t* wp, const uint8_t* zp, int64_t K, int64_t G,
                                int64_t g0, int64_t g1, int8_t* wb, int64_t ld) {
  const int64_t ng = K / G;
  for (int r = 0; r < 32; ++r)
    for (int64_t g = g0; g < g1; ++g) {
      const __m512i z = _mm512_set1_epi16(zp[r * ng + g]);
      for (int64_t k = g * G; k < (g + 1) * G; k += 32)
        _mm256_storeu_si256((__m256i*)(wb + r * ld + k - g0 * G),
                            _mm512_cvtepi16_epi8(u4_codes_minus_zero(wp + r * (K / 2) + k / 2, z)));
    }
}

/* As amx_int4dyn_convert, from the int4 panel layout (pyquant/panels.py): panel holds the
 * 32 rows' codes as [K/8][2][16][4] bytes, byte c of (j, h, i) = code[16h + i][8j + c] |
 * code[16h + i][8j + 4 + c] << 4; pz the panel's zero points [K/G][32], all <= 15 (the
 * caller checked). Per half panel and 32 k (4 j), panel_half_rows gives row 4l + q its 4
 * dwords in lane l of u[q] (as in amx_bf16_convert_u4_panels). Split into low and high nibbles, the dword
 * interleave of the two puts each row's codes in k order (dword j: its 4 low nibbles are
 * codes 8j .. 8j + 3, its 4 high ones 8j + 4 .. 8j + 7): 16 in lane l of one vector, the
 * next 16 in the other. The same strip as from the rows, so the same products bit for bit. */
inline void amx_int4dyn_convert_panels(const uint8_t* panel, const uint8_t* pz, int64_t K,
                                       int64_t G, int64_t g0, int64_t g1, int8_t* wb,
                                       int64_t ld) {
  /* zero point of row 4l + q broadcast over lane l: vpermb of the half's 16 zero points */
  alignas(64) uint8_t lanes[4][64];
  for (int q = 0; q < 4; ++q)
    for (int b = 0; b < 64; ++b) lanes[q][b] = (uint8_t)(4 * (b / 16) + q);
  const __m512i nib = _mm512_set1_epi8(0x0F);
  for (int h = 0; h < 2; ++h)
    for (int64_t g = g0; g < g1; ++g) {
      const __m512i zh = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(pz + g * 32 + 16 * h)));
      __m512i zq[4];
      for (int q = 0; q < 4; ++q) zq[q] = _mm512_permutexvar_epi8(_mm512_load_si512(lanes[q]), zh);
      int8_t* dst = wb + 16 * h * ld - g0 * G;
      for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
        __m512i u[4];
        panel_half_rows(panel + (k / 8 * 2 + h) * 64, u);
        for (int q = 0; q < 4; ++q) {
          const __m512i lo = _mm512_and_si512(u[q], nib);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(u[q], 4), nib);
          const __m512i c0 = _mm512_sub_epi8(_mm512_unpacklo_epi32(lo, hi), zq[q]);
          const __m512i c1 = _mm512_sub_epi8(_mm512_unpackhi_epi32(lo, hi), zq[q]);
          int8_t* row = dst + (int64_t)q * ld + k;
          _mm_storeu_si128((__m128i*)row, _mm512_castsi512_si128(c0));
          _mm_storeu_si128((__m128i*)(row + 16), _mm512_castsi512_si128(c1));
          _mm_storeu_si128((__m128i*)(row + 4 * ld), _mm512_extracti32x4_epi32(c0, 1));
          _mm_storeu_si128((__m128i*)(row + 4 * ld + 16), _mm512_extracti32x4_epi32(c1, 1));
          _mm_storeu_si128((__m128i*)(row + 8 * ld), _mm512_extracti32x4_epi32(c0, 2));
          _mm_storeu_si128((__m128i*)(row + 8 * ld + 16), _mm512_extracti32x4_epi32(c1, 2));
          _mm_storeu_si128((__m128i*)(row + 12 * ld), _mm512_extracti32x4_epi32(c0, 3));
          _mm_storeu_si128((__m128i*)(row + 12 * ld + 16), _mm512_extracti32x4_epi32(c1, 3));
        }
      }
    }
}

/* Out: float, or uint16_t for bf16 outputs (store16, tile_amx.h). */
template <class Out>
struct AmxStoreInt4DynTo {
  Out* out;
  int64_t N;
  const float* xs;
  const float* bias;
  inline void operator()(int64_t m, int64_t n0, __m512i v) const {
    __m512 y = _mm512_mul_ps(_mm512_castsi512_ps(v), _mm512_set1_ps(xs[m]));
    if (bias) y = _mm512_add_ps(y, _mm512_loadu_ps(bias + n0));
    store16(out + m * N + n0, y);
  }
};
using AmxStoreInt4Dyn = AmxStoreInt4DynTo<float>;
using AmxStoreInt4DynBf16 = AmxStoreInt4DynTo<uint16_t>;

struct AmxInt8Op {
  static constexpr bool kInt = true;
  /* tile numbers are literals: GCC's tile intrinsics paste them into the asm */
  static void dp046() { _tile_dpbssd(0, 4, 6); }
  static void dp147() { _tile_dpbssd(1, 4, 7); }
  static void dp256() { _tile_dpbssd(2, 5, 6); }
  static void dp357() { _tile_dpbssd(3, 5, 7); }
};

/* Returns false (nothing done) when a zero point is above 15 (code - zero would
 * leave int8). The caller checked pq::amx_int4dyn_applies; work: 64-byte aligned
 * pq::amx_int4dyn_work_bytes(M, K, G, n_threads) (the packed activations, then
 * the threads' strips). panels: wp, scales and zeros in the panel layout (pq.h,
 * pq_int4_dynamic_mm_panels), the strips converted from it. */
template <class Epi>
inline bool amx_int4_dynamic(const int8_t* xq, int64_t M, int64_t K, const uint8_t* wp,
                             int64_t N, const float* scales, const uint8_t* zeros, int64_t G,
                             const Epi& epi, void* work, int n_threads, bool panels = false) {
  for (int64_t i = 0; i < N * (K / G); ++i)
    if (zeros[i] > 15) return false; /* the VNNI kernel takes any uint8 zero point */
  int8_t* xp = (int8_t*)work;
  amx_pack_x(xq, M, K, xp, n_threads);
  const int64_t ng = K / G;
  amx_grouped_gemm<AmxInt8Op>(
      M, N, K, G, (const uint8_t*)xp, 1, 0, scales,
      (uint8_t*)work + pq::align64(ceil_div(M, 16) * 16 * K),
      [&](int64_t n0, int64_t g0, int64_t g1, uint8_t* wb, int64_t ld) {
        /* a panel is the strip's 32 rows: the same offsets in either layout */
        if (panels)
          amx_int4dyn_convert_panels(wp + n0 * (K / 2), zeros + n0 * ng, K, G, g0, g1,
                                     (int8_t*)wb, ld);
        else
          amx_int4dyn_convert(wp + n0 * (K / 2), zeros + n0 * ng, K, G, g0, g1, (int8_t*)wb,
                              ld);
      },
      epi, n_threads, panels);
  return true;
}

}  // namespace
}  // namespace PQ_NS
#endif
#endif /* PQ_CPU_TILE_AMX_INT4DYN_H */
