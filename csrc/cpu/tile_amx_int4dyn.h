/* AMX int8 tiles for int4_dynamic_mm (W4A8) at prefill sizes (AMX build only).
 *
 * Why: the VNNI kernel (tile_int4dyn.h) ran at 0.36-0.45x of FBGEMM's int8
 * GEMM at M = 128; tdpbssd does 16 x 16 x 64 int8 multiply-adds at once.
 *
 * The int4 codes minus their zero points (-15..15) are int8 values, so each
 * task converts its 32-row weight strip once to int8 [32][K] (the A operand,
 * loaded with row stride K) and sweeps up to 256 activation rows with it. The
 * activation codes are the B operand, packed by amx_pack_x (tile_amx.h). Per
 * weight group, the tiles accumulate exact int32 sums over the group's K; the
 * sums are then scaled by the group scale into fp32 accumulators:
 *   out[m, n] = x_scale[m] * sum_g scales[n, g] * acc[m, n, g] + bias[n],
 * the arithmetic of pq.h, with the fp32 sum over groups in group order. */
#ifndef PQ_CPU_TILE_AMX_INT4DYN_H
#define PQ_CPU_TILE_AMX_INT4DYN_H
#include <stdlib.h>

#include "tile_amx.h"

#if defined(PQ_AMX)
#define PQ_AMX_INT4DYN 1

namespace PQ_NS {
namespace {

inline bool amx_int4dyn_usable(int64_t M, int64_t K, int64_t N, int64_t G) {
  return M >= kAmxMinM && G % 64 == 0 && K % G == 0 && N % 32 == 0;
}

/* 32 weight rows of packed int4 [.., K/2] -> int8 (code - zero) [32][K]. */
inline void amx_int4dyn_convert(const uint8_t* wp, const uint8_t* zp, int64_t K, int64_t G,
                                int8_t* wb) {
  const int64_t ng = K / G;
  alignas(64) int16_t order[32]; /* word 2j <- low nibble of byte j, 2j + 1 <- high */
  for (int j = 0; j < 16; ++j) {
    order[2 * j] = (int16_t)j;
    order[2 * j + 1] = (int16_t)(32 + j);
  }
  const __m512i inter = _mm512_load_si512(order);
  const __m512i nib = _mm512_set1_epi16(0x0F);
  for (int r = 0; r < 32; ++r)
    for (int64_t g = 0; g < ng; ++g) {
      const __m512i z = _mm512_set1_epi16(zp[r * ng + g]);
      for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
        const __m512i b = _mm512_cvtepu8_epi16(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(wp + r * (K / 2) + k / 2))));
        const __m512i v = _mm512_sub_epi16(
            _mm512_permutex2var_epi16(_mm512_and_si512(b, nib), inter, _mm512_srli_epi16(b, 4)), z);
        _mm256_storeu_si256((__m256i*)(wb + r * K + k), _mm512_cvtepi16_epi8(v));
      }
    }
}

/* acc[r][:] (+)= float(C[r][:]) * scales[(n0 + r) * ng + g] */
inline void amx_int4dyn_scale_acc(const int32_t* cbuf, float* acc, const float* scales,
                                  int64_t n0, int64_t ng, int64_t g) {
  for (int r = 0; r < 16; ++r) {
    const __m512 s = _mm512_set1_ps(scales[(n0 + r) * ng + g]);
    const __m512 c = _mm512_cvtepi32_ps(_mm512_load_si512(cbuf + r * 16));
    const __m512 y = g == 0 ? _mm512_mul_ps(c, s)
                            : _mm512_fmadd_ps(c, s, _mm512_load_ps(acc + r * 16));
    _mm512_store_ps(acc + r * 16, y);
  }
}

struct AmxStoreInt4Dyn {
  float* out;
  int64_t N;
  const float* xs;
  const float* bias;
  inline void operator()(int64_t n, int64_t m0, __mmask16 mask, __m512i v, __m512i vidx) const {
    __m512 y = _mm512_mul_ps(_mm512_castsi512_ps(v), _mm512_maskz_loadu_ps(mask, xs + m0));
    if (bias) y = _mm512_add_ps(y, _mm512_set1_ps(bias[n]));
    _mm512_mask_i32scatter_ps(out + m0 * N + n, mask, vidx, y, 4);
  }
};

/* Returns false (nothing done) when scratch cannot be allocated. The caller
 * checked amx_int4dyn_usable. */
inline bool amx_int4_dynamic(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                             const uint8_t* wp, int64_t N, const float* scales,
                             const uint8_t* zeros, int64_t G, const float* bias, float* out,
                             int n_threads) {
  const int64_t Mt = ceil_div(M, 16), KB = K / 64, ng = K / G, gkb = G / 64;
  int8_t* xp = (int8_t*)aligned_alloc(64, (size_t)Mt * 16 * K);
  if (!xp) return false;
  amx_pack_x(xq, M, K, xp, n_threads);
  const int64_t kMtBlock = 16; /* 256 activation rows per weight-strip conversion */
  const int64_t n_mblk = ceil_div(Mt, kMtBlock), n_nblk = N / 32;
  const int64_t tasks = n_nblk * n_mblk;
  const int threads = tasks < n_threads ? (int)tasks : n_threads;
  const __m512i vidx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32((int)N));
  const AmxStoreInt4Dyn epi{out, N, x_scale, bias};
  bool ok = true;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int8_t* wb = (int8_t*)aligned_alloc(64, (size_t)32 * K);
    if (!wb) {
#pragma omp atomic write
      ok = false;
    }
#pragma omp barrier
    if (ok) {
      TileCfg cfg;
      memset(&cfg, 0, sizeof cfg);
      cfg.palette = 1;
      for (int i = 0; i < 8; ++i) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
      }
      _tile_loadconfig(&cfg);
      alignas(64) int32_t cbuf[16 * 16];
      alignas(64) float acc[4][16 * 16]; /* (n half, m half) blocks of the 32 x 32 output */
#pragma omp for schedule(dynamic)
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t n0 = task / n_mblk * 32, mt_lo = task % n_mblk * kMtBlock;
        const int64_t mt_hi = min64(mt_lo + kMtBlock, Mt);
        amx_int4dyn_convert(wp + n0 * (K / 2), zeros + n0 * ng, K, G, wb);
        const int8_t* w0 = wb;
        const int8_t* w1 = wb + 16 * K;
        for (int64_t mt = mt_lo; mt < mt_hi; mt += 2) {
          const bool two = mt + 1 < mt_hi;
          const int8_t* b0 = xp + mt * KB * 1024;
          const int8_t* b1 = b0 + KB * 1024;
          for (int64_t g = 0; g < ng; ++g) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t kb = g * gkb; kb < (g + 1) * gkb; ++kb) {
              _tile_loadd(4, w0 + kb * 64, K);
              _tile_loadd(6, b0 + kb * 1024, 64);
              _tile_dpbssd(0, 4, 6);
              if (two) {
                _tile_loadd(7, b1 + kb * 1024, 64);
                _tile_dpbssd(1, 4, 7);
              }
              _tile_loadd(5, w1 + kb * 64, K);
              _tile_dpbssd(2, 5, 6);
              if (two) _tile_dpbssd(3, 5, 7);
            }
            _tile_stored(0, cbuf, 64);
            amx_int4dyn_scale_acc(cbuf, acc[0], scales, n0, ng, g);
            _tile_stored(2, cbuf, 64);
            amx_int4dyn_scale_acc(cbuf, acc[2], scales, n0 + 16, ng, g);
            if (two) {
              _tile_stored(1, cbuf, 64);
              amx_int4dyn_scale_acc(cbuf, acc[1], scales, n0, ng, g);
              _tile_stored(3, cbuf, 64);
              amx_int4dyn_scale_acc(cbuf, acc[3], scales, n0 + 16, ng, g);
            }
          }
          amx_store_tile((int32_t*)acc[0], n0, mt * 16, M, epi, vidx);
          amx_store_tile((int32_t*)acc[2], n0 + 16, mt * 16, M, epi, vidx);
          if (two) {
            amx_store_tile((int32_t*)acc[1], n0, (mt + 1) * 16, M, epi, vidx);
            amx_store_tile((int32_t*)acc[3], n0 + 16, (mt + 1) * 16, M, epi, vidx);
          }
        }
      }
      _tile_release();
    }
    free(wb);
  }
  free(xp);
  return ok;
}

}  // namespace
}  // namespace PQ_NS
#endif
#endif /* PQ_CPU_TILE_AMX_INT4DYN_H */
