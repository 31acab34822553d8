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
 * the threads' strips). */
template <class Epi>
inline bool amx_int4_dynamic(const int8_t* xq, int64_t M, int64_t K, const uint8_t* wp,
                             int64_t N, const float* scales, const uint8_t* zeros, int64_t G,
                             const Epi& epi, void* work, int n_threads) {
  for (int64_t i = 0; i < N * (K / G); ++i)
    if (zeros[i] > 15) return false; /* the VNNI kernel takes any uint8 zero point */
  int8_t* xp = (int8_t*)work;
  amx_pack_x(xq, M, K, xp, n_threads);
  const int64_t ng = K / G;
  amx_grouped_gemm<AmxInt8Op>(
      M, N, K, G, (const uint8_t*)xp, 1, 0, scales,
      (uint8_t*)work + pq::align64(ceil_div(M, 16) * 16 * K),
      [&](int64_t n0, int64_t g0, int64_t g1, uint8_t* wb, int64_t ld) {
        amx_int4dyn_convert(wp + n0 * (K / 2), zeros + n0 * ng, K, G, g0, g1, (int8_t*)wb, ld);
      },
      epi, n_threads);
  return true;
}

}  // namespace
}  // namespace PQ_NS
#endif
#endif /* PQ_CPU_TILE_AMX_INT4DYN_H */
