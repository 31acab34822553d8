/* AMX int8 GEMM (only in the build compiled with -mamx-tile -mamx-int8).
 *
 * The weights stay in the canonical int8 [N, K] layout: they are the A operand
 * (16 rows n x 64 bytes of k, loaded with row stride K), so no weight packing
 * is needed. The activations are the B operand, which AMX wants "VNNI
 * transposed": B[r][4j + i] = x[m0 + j, k0 + 4r + i]. amx_pack_x writes that
 * once per call into the caller's scratch, one 1 KiB tile per (16 rows of M,
 * 64 of K), zero rows past M:  xp[ceil(M/16)][K/64][16][16][4].
 * tdpbssd then gives C[n][m] = sum_k w[n,k] x[m,k] (s8 x s8, exact, no bias
 * trick needed), i.e. the output transposed; the epilogue scatters it.
 *
 * Register blocking 2 x 2: tiles 4,5 hold two 16-row weight slices, 6,7 two
 * 16-row activation slices, 0..3 the four 16x16 int32 accumulators, so every
 * tile loaded feeds two tdpbssd. Tasks are (32 weight rows) x (64 activation
 * rows): the 32 x K weight strip stays in L2 while its M block is swept. */
#ifndef PQ_CPU_TILE_AMX_H
#define PQ_CPU_TILE_AMX_H
#include "common.h"

#if defined(PQ_SIMD_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define PQ_AMX 1
#include <string.h>

namespace PQ_NS {
namespace {

constexpr int64_t kAmxMinM = 9; /* below this the VNNI GEMV streams weights better */

struct alignas(64) TileCfg {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

/* Every AMX path here uses 8 tiles of 16 rows x 64 bytes. */
inline void amx_config_tiles() {
  TileCfg cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}

inline bool amx_usable(int64_t M, int64_t K, int64_t N, const void* work, int64_t work_bytes) {
  return M >= kAmxMinM && K % 64 == 0 && N % 32 == 0 && work != nullptr &&
         work_bytes >= ceil_div(M, 16) * 16 * K;
}

inline void amx_pack_x(const int8_t* xq, int64_t M, int64_t K, int8_t* xp, int n_threads) {
  const int64_t Mt = ceil_div(M, 16), KB = K / 64, tiles = Mt * KB;
  const int threads = tiles < n_threads ? (int)tiles : n_threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t mt = tile / KB, kb = tile % KB;
    int32_t* dst = (int32_t*)(xp + tile * 1024);
    for (int j = 0; j < 16; ++j) {
      const int64_t m = mt * 16 + j;
      if (m < M) {
        int32_t row[16];
        memcpy(row, xq + m * K + kb * 64, 64);
        for (int r = 0; r < 16; ++r) dst[r * 16 + j] = row[r];
      } else {
        for (int r = 0; r < 16; ++r) dst[r * 16 + j] = 0;
      }
    }
  }
}

/* Epilogues: C tile rows are output columns n, lanes are rows m0..m0+15. */
struct AmxStoreS32 {
  int32_t* acc;
  int64_t N;
  inline void operator()(int64_t n, int64_t m0, __mmask16 mask, __m512i v, __m512i vidx) const {
    _mm512_mask_i32scatter_epi32(acc + m0 * N + n, mask, vidx, v, 4);
  }
};
struct AmxStoreDyn {
  float* out;
  int64_t N;
  const float* xs;
  const float* ws;
  const float* bias;
  /* (float)acc * (x_scale[m] * w_scale[n]) + bias[n]: the order of pq.h. */
  inline void operator()(int64_t n, int64_t m0, __mmask16 mask, __m512i v, __m512i vidx) const {
    const __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xs + m0), _mm512_set1_ps(ws[n]));
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(v), s);
    if (bias) y = _mm512_add_ps(y, _mm512_set1_ps(bias[n]));
    _mm512_mask_i32scatter_ps(out + m0 * N + n, mask, vidx, y, 4);
  }
};

template <class Epi>
inline void amx_store_tile(int32_t* buf, int64_t n0, int64_t m0, int64_t M, const Epi& epi,
                           __m512i vidx) {
  const int64_t left = M - m0;
  const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
  for (int r = 0; r < 16; ++r) epi(n0 + r, m0, mask, _mm512_load_si512(buf + r * 16), vidx);
}

template <class Epi>
void amx_gemm(int64_t M, int64_t K, const int8_t* w, int64_t N, const int8_t* xp, int n_threads,
              Epi epi) {
  const int64_t Mt = ceil_div(M, 16), KB = K / 64;
  const int64_t kMtBlock = 4; /* 64 activation rows per task */
  const int64_t n_mblk = ceil_div(Mt, kMtBlock), n_nblk = N / 32;
  const int64_t tasks = n_nblk * n_mblk;
  const int threads = tasks < n_threads ? (int)tasks : n_threads;
  const __m512i vidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int)N));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    amx_config_tiles();
    alignas(64) int32_t buf[16 * 16];
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n0 = task / n_mblk * 32, mt_lo = task % n_mblk * kMtBlock;
      const int64_t mt_hi = min64(mt_lo + kMtBlock, Mt);
      const int8_t* w0 = w + n0 * K;
      const int8_t* w1 = w0 + 16 * K;
      for (int64_t mt = mt_lo; mt < mt_hi; mt += 2) {
        const bool two = mt + 1 < mt_hi;
        const int8_t* b0 = xp + mt * KB * 1024;
        const int8_t* b1 = b0 + KB * 1024;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        if (two) {
          for (int64_t kb = 0; kb < KB; ++kb) {
            _tile_loadd(4, w0 + kb * 64, K);
            _tile_loadd(6, b0 + kb * 1024, 64);
            _tile_dpbssd(0, 4, 6);
            _tile_loadd(7, b1 + kb * 1024, 64);
            _tile_dpbssd(1, 4, 7);
            _tile_loadd(5, w1 + kb * 64, K);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
          }
        } else {
          for (int64_t kb = 0; kb < KB; ++kb) {
            _tile_loadd(4, w0 + kb * 64, K);
            _tile_loadd(6, b0 + kb * 1024, 64);
            _tile_dpbssd(0, 4, 6);
            _tile_loadd(5, w1 + kb * 64, K);
            _tile_dpbssd(2, 5, 6);
          }
        }
        _tile_stored(0, buf, 64);
        amx_store_tile(buf, n0, mt * 16, M, epi, vidx);
        _tile_stored(2, buf, 64);
        amx_store_tile(buf, n0 + 16, mt * 16, M, epi, vidx);
        if (two) {
          _tile_stored(1, buf, 64);
          amx_store_tile(buf, n0, (mt + 1) * 16, M, epi, vidx);
          _tile_stored(3, buf, 64);
          amx_store_tile(buf, n0 + 16, (mt + 1) * 16, M, epi, vidx);
        }
      }
    }
    _tile_release();
  }
}

}  // namespace
}  // namespace PQ_NS
#endif
#endif /* PQ_CPU_TILE_AMX_H */
