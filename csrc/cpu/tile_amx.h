/* AMX int8 GEMM (only in the build compiled with -mamx-tile -mamx-int8).
 *
 * The weights stay in the canonical int8 [N, K] layout: they are the A operand
 * (16 rows n x 64 bytes of k, loaded with row stride K), so no weight packing
 * is needed. The activations are the B operand, which AMX wants "VNNI
 * transposed": B[r][4j + i] = x[m0 + j, k0 + 4r + i]. amx_pack_x writes that
 * once per call into the caller's scratch, one 1 KiB tile per (16 rows of M,
 * 64 of K), zero rows past M:  xp[ceil(M/16)][K/64][16][16][4].
 * tdpbssd then gives C[n][m] = sum_k w[n,k] x[m,k] (s8 x s8, exact, no bias
 * trick needed), i.e. the output transposed; the epilogue transposes it back.
 *
 * Register blocking 2 x 2: tiles 4,5 hold two 16-row weight slices, 6,7 two
 * 16-row activation slices, 0..3 the four 16x16 int32 accumulators, so every
 * tile loaded feeds two tdpbssd. Tasks are (32 weight rows) x (64 activation
 * rows): the 32 x K weight strip stays in L2 while its M block is swept.
 *
 * Tried, not kept: the roles swapped, the weights kept in the int8 panels of
 * pyquant/panels.py (already B tiles: 16 rows of 64 bytes at a stride of 128),
 * the activation rows loaded as A as they are, tdpbsud with 128 * sum(x) taken
 * off in the epilogue: no pack and no transposes, results bit for bit these.
 * In one process against this (benchmarks/panel_layout_ab.py, Llama-2-7B shapes,
 * Granite Rapids, two threads) it ran 0.81-0.97x at M = 9-128 and 0.97-1.01x at
 * M = 1024; with the panel prefetched 4 KiB ahead (one stream that crosses a
 * page every two steps, where 32 weight rows are 32 streams) 0.89-1.04x. The
 * loop is bound by its tile loads from L2 either way (the pack took ~1% of a
 * call at M = 1024), so the int8 layers keep rows on AMX. */
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

/* Every AMX path here uses 8 tiles of 16 rows x 64 bytes. ldtilecfg is written out with the
 * whole 64-byte config as its operand: GCC 12's _tile_loadconfig tells the compiler that it
 * reads 8 bytes, so where this function was not inlined GCC dropped the stores of the tile
 * shapes as dead, and the first tile instruction raised SIGILL (tiles left unconfigured). */
inline void amx_config_tiles() {
  TileCfg cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

inline bool amx_usable(int64_t M, int64_t K, int64_t N, const void* work, int64_t work_bytes) {
  return M >= kAmxMinM && K % 64 == 0 && N % 32 == 0 && work != nullptr &&
         work_bytes >= ceil_div(M, 16) * 16 * K;
}

/* Rows of M x KB * 64 bytes (row m at x + m * ld bytes) -> B tiles, one 1 KiB tile per (16
 * rows, 64 bytes): tile (mt, kb) at xp + (mt * KB + kb) * 1024, dword (r, j) = bytes 4r ..
 * 4r + 3 of row 16 mt + j's 64 (the transpose of 16 rows of 16 dwords), zero rows past M.
 * bad(v) is called with every loaded 64 bytes; false if it returned true for any of them. */
template <class Bad>
inline bool amx_pack_tiles(const uint8_t* x, int64_t M, int64_t KB, int64_t ld, uint8_t* xp,
                           int n_threads, Bad bad) {
  const int64_t Mt = ceil_div(M, 16), tiles = Mt * KB;
  const int threads = tiles < n_threads ? (int)tiles : n_threads;
  int any = 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1) \
    reduction(| : any)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t mt = tile / KB, kb = tile % KB;
    __m512i rows[16];
    for (int j = 0; j < 16; ++j) {
      const int64_t m = mt * 16 + j;
      rows[j] = m < M ? _mm512_loadu_si512(x + m * ld + kb * 64) : _mm512_setzero_si512();
      any |= bad(rows[j]);
    }
    transpose16x16(rows);
    uint8_t* dst = xp + tile * 1024;
    for (int r = 0; r < 16; ++r) _mm512_storeu_si512(dst + r * 64, rows[r]);
  }
  return !any;
}

/* int8 codes [M][K]: B[r][j] (4 bytes) = x[m0 + j, k0 + 4r .. 4r + 3]. */
inline void amx_pack_x(const int8_t* xq, int64_t M, int64_t K, int8_t* xp, int n_threads) {
  amx_pack_tiles((const uint8_t*)xq, M, K / 64, K, (uint8_t*)xp, n_threads,
                 [](__m512i) { return false; });
}

/* Epilogues get one output row m and the 16 outputs n0..n0+15 of the C tile
 * (N % 32 == 0 on every AMX path, so they are all in range). */
struct AmxStoreS32 {
  int32_t* acc;
  int64_t N;
  inline void operator()(int64_t m, int64_t n0, __m512i v) const {
    _mm512_storeu_si512(acc + m * N + n0, v);
  }
};
/* 16 floats rounded to bf16 as torch rounds (nearest, ties to even; a NaN becomes 0x7FC0:
 * pq_f32_to_bf16). Not vcvtneps2bf16, which flushes subnormal inputs and outputs to zero
 * where torch keeps them. */
inline __m256i bf16_round_like_torch(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0)));
}

/* 16 outputs stored as float32, or as bf16 (bf16_round_like_torch): the epilogues below take
 * the output's type (Out: float or uint16_t), so a bf16 model's calls write bf16 themselves. */
inline void store16(float* p, __m512 y) { _mm512_storeu_ps(p, y); }
inline void store16(uint16_t* p, __m512 y) {
  _mm256_storeu_si256((__m256i*)p, bf16_round_like_torch(y));
}

template <class Out>
struct AmxStoreDynTo {
  Out* out;
  int64_t N;
  const float* xs;
  const float* ws;
  const float* bias;
  /* (float)acc * (x_scale[m] * w_scale[n]) + bias[n]: the order of pq.h. */
  inline void operator()(int64_t m, int64_t n0, __m512i v) const {
    const __m512 s = _mm512_mul_ps(_mm512_set1_ps(xs[m]), _mm512_loadu_ps(ws + n0));
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(v), s);
    if (bias) y = _mm512_add_ps(y, _mm512_loadu_ps(bias + n0));
    store16(out + m * N + n0, y);
  }
};
using AmxStoreDyn = AmxStoreDynTo<float>;
using AmxStoreDynBf16 = AmxStoreDynTo<uint16_t>;

/* A stored C tile (rows n0.., lanes m0..) -> the epilogue, one output row at a time. */
template <class Epi>
inline void amx_store_tile(const int32_t* buf, int64_t n0, int64_t m0, int64_t M, const Epi& epi) {
  __m512i rows[16];
  for (int r = 0; r < 16; ++r) rows[r] = _mm512_load_si512(buf + r * 16);
  transpose16x16(rows);
  const int left = (int)min64(16, M - m0);
  for (int j = 0; j < left; ++j) epi(m0 + j, n0, rows[j]);
}

/* The four C tiles of the (mt, mt + 1) x (n0, n0 + 16) block through the epilogue. */
template <class Epi>
inline void amx_finish_block(int32_t* buf, int64_t n0, int64_t mt, bool two, int64_t M,
                             const Epi& epi) {
  _tile_stored(0, buf, 64);
  amx_store_tile(buf, n0, mt * 16, M, epi);
  _tile_stored(2, buf, 64);
  amx_store_tile(buf, n0 + 16, mt * 16, M, epi);
  if (two) {
    _tile_stored(1, buf, 64);
    amx_store_tile(buf, n0, (mt + 1) * 16, M, epi);
    _tile_stored(3, buf, 64);
    amx_store_tile(buf, n0 + 16, (mt + 1) * 16, M, epi);
  }
}

/* C (+)= the products over weight blocks kb_lo..kb_hi of rows n0..n0+31 (w0, w1) and
 * activation tiles mt (b0), mt + 1 (b1, when two). Prefetching the activation tiles of block
 * kb + 1 or kb + 2 into L1 (16 lines each), or the weight rows' lines two blocks ahead, here
 * and in amx_grouped_block measured 0.86-1.02x at M = 1024 (4096 x 4096, int8 and int4
 * dynamic, int4 weight-only on bf16 tiles; Granite Rapids, two threads): not kept.
 *
 * Where this loop stands (standalone loops of this shape with random data, one core of that
 * machine): a tile product takes 16 cycles, 5.3 ns, whatever its inputs. With both operands'
 * tiles coming from L2 the loop ran at 9.2 ns a product; with the weight tiles in L1 and the
 * activation tiles from L2, 7.1; as amx_gemm runs it at M = 1024 (strips from L3, 128
 * activation rows a task) 12, which is what a profile of int8 dynamic at 4096 x 4096 gives
 * (the loop: 71% of the call). So the tiles' path from L2 and L3 bounds it, not the TMUL.
 * Measured and not kept: weights packed so that a strip's tiles are contiguous (1.00-1.07x
 * in the standalone loop); K chunks of 512 or 1024 so that a strip's chunk stays in L1, the
 * C tiles stored and reloaded between chunks (0.93-1.03x there); tileloaddt1 (no L1 fill) for
 * the activation tiles in amx_grouped_block (W4A8 and int4 weight-only with bf16 x at
 * M = 1024: 0.95-1.06x, benchmarks/ab_inprocess.py, both orders). */
inline void amx_kb_loop(const int8_t* w0, const int8_t* w1, int64_t K, const int8_t* b0,
                        const int8_t* b1, bool two, int64_t kb_lo, int64_t kb_hi) {
  if (two) {
    for (int64_t kb = kb_lo; kb < kb_hi; ++kb) {
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
    for (int64_t kb = kb_lo; kb < kb_hi; ++kb) {
      _tile_loadd(4, w0 + kb * 64, K);
      _tile_loadd(6, b0 + kb * 1024, 64);
      _tile_dpbssd(0, 4, 6);
      _tile_loadd(5, w1 + kb * 64, K);
      _tile_dpbssd(2, 5, 6);
    }
  }
}

/* Cache blocking. While the packed activations (ceil(M/16) * 16 * K bytes) fit in L2
 * (kAmxL2Bytes), a task is one 32-row weight strip x all activation rows over the whole K
 * (x 64 rows where there are fewer than two strips a thread): the strip stays in L1/L2
 * while the rows stream from L2, and comes from memory once. With 64 rows a task the two
 * threads took the two halves of one strip at once, each from memory: at M = 128 one strip
 * a task ran 1.13-1.17x faster (4096 x 4096, 11008 x 4096; in-process A/B, both orders,
 * Granite Rapids, two threads), 1.09x at M = 256, the same at M = 32. Past L2, sweeping
 * every strip over all the activations re-read them from L3 once per strip (512 x 11008:
 * 5.6 MB a strip, 344 strips), so a task becomes (kAmxMc activation rows) x (kAmxNc weight rows)
 * with K in chunks of kAmxKc: per chunk the task's activation tiles stay in L2
 * while each weight strip's chunk (128 KiB) meets all of them. Between chunks the int32
 * sums of each 32 x 32 block wait in the caller's output block of that place (cpart:
 * int32 [M][ldc], the C tiles stored as they are, n-major). Two threads, int8 MACs a
 * cycle a core at M = 512: 4096 x 11008 250-300 -> 380-390; 11008 x 4096 330-350 ->
 * 380-410 (no chunk at K = 4096: chunks of 2048 there ran at 160, the partial sums'
 * round trip through the output costing more than it saved). The L2 bound was 1 MiB; at
 * 1.5 MiB (every AMX CPU has 2 MiB of L2 a core) M = 96 and 128 at K = 11008 take the
 * unchunked order: 1.21x and 1.06x (int8 dynamic, 4096 x 11008, in-process A/B, both
 * orders; Granite Rapids, two threads). Tasks of 128 activation rows (512 KiB of tiles a
 * chunk) x 512 weight rows instead of 256 x 256: each activation chunk is then read from L3
 * half as often and each weight strip twice as often; at M = 1024, Llama-2-7B shapes, fp32
 * and bf16 x, 1.04-1.10x (geometric means of both orders, benchmarks/ab_inprocess.py, two
 * runs each); at M = 256 and 512 0.97-1.03x, noise. 128 x 1024 was no different, 64 x 512
 * 0.83-0.97x, 512 x 128 0.72-0.89x, K chunks of 2048 0.86-0.94x and of 16384 0.74-1.04x. */
constexpr int64_t kAmxL2Bytes = pq::kAmxInt8L2Bytes, kAmxMc = 128, kAmxNc = 512,
                  kAmxKc = pq::kAmxInt8Kc; /* kernels.h: the bf16 output sizes by them */

/* Short K (MiniLM's 384): an output gets only K MACs, and writing the float outputs is
 * most of the work; with 32-row weight strips swept over all of M, each thread wrote two
 * lines of each of thousands of rows at a time. When the whole weight fits in L2, a task
 * is instead 32 activation rows x all N, so that a thread fills its rows' lines in order.
 * Measured (M = 2560, two threads, one process, alternated with the strip order): N x K
 * 1536 x 384 1.6-1.8x, 384 x 384 1.2-1.4x; at K = 768 no change either way, and at
 * K = 1536 or 4096 (Llama) 0.8-0.95x, so it stops at 512 (and at a weight of 1 MiB, where
 * it was measured). */
constexpr int64_t kAmxRowsFirstMaxK = 512, kAmxRowsFirstMaxWeightBytes = 1 << 20;

template <class Epi>
void amx_gemm(int64_t M, int64_t K, const int8_t* w, int64_t N, const int8_t* xp,
              int32_t* cpart, int64_t ldc, int n_threads, Epi epi) {
  const int64_t Mt = ceil_div(M, 16), KB = K / 64;
  const bool chunk = cpart && Mt * 16 * K > kAmxL2Bytes;
  const bool rows_first = !chunk && K <= kAmxRowsFirstMaxK &&
                          N * K <= kAmxRowsFirstMaxWeightBytes &&
                          ceil_div(Mt, 2) >= 2 * n_threads;
  const int64_t kc_kb = chunk ? kAmxKc / 64 : KB;
  const int64_t nc = chunk ? kAmxNc : rows_first ? N : 32;
  const int64_t n_nblk = ceil_div(N, nc);
  const bool sweep_all = !chunk && !rows_first && n_nblk >= 2 * n_threads;
  const int64_t mt_blk = chunk ? kAmxMc / 16 : rows_first ? 2 : sweep_all ? Mt : 4;
  const int64_t n_mblk = ceil_div(Mt, mt_blk);
  const int64_t tasks = n_nblk * n_mblk;
  const int threads = tasks < n_threads ? (int)tasks : n_threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    amx_config_tiles();
    alignas(64) int32_t buf[16 * 16];
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n_lo = task / n_mblk * nc, n_hi = min64(n_lo + nc, N);
      const int64_t mt_lo = task % n_mblk * mt_blk, mt_hi = min64(mt_lo + mt_blk, Mt);
      /* pairs of activation tiles whose 32 rows all exist: these may chunk K */
      const int64_t full_hi = mt_lo + (min64(mt_hi * 16, M) / 16 - mt_lo) / 2 * 2;
      for (int64_t kb0 = 0; kb0 < KB; kb0 += kc_kb) {
        const int64_t kb1 = min64(kb0 + kc_kb, KB);
        for (int64_t n0 = n_lo; n0 < n_hi; n0 += 32) {
          const int8_t* w0 = w + n0 * K;
          const int8_t* w1 = w0 + 16 * K;
          for (int64_t mt = mt_lo; mt < full_hi; mt += 2) {
            const int8_t* b0 = xp + mt * KB * 1024;
            int32_t* c0 = cpart + mt * 16 * ldc + n0; /* only used when chunking */
            int32_t* c1 = c0 + 16 * ldc;
            const int64_t lc = ldc * 4;
            if (kb0 == 0) {
              _tile_zero(0);
              _tile_zero(1);
              _tile_zero(2);
              _tile_zero(3);
            } else {
              _tile_loadd(0, c0, lc);
              _tile_loadd(1, c1, lc);
              _tile_loadd(2, c0 + 16, lc);
              _tile_loadd(3, c1 + 16, lc);
            }
            amx_kb_loop(w0, w1, K, b0, b0 + KB * 1024, true, kb0, kb1);
            if (kb1 == KB) {
              amx_finish_block(buf, n0, mt, true, M, epi);
            } else {
              _tile_stored(0, c0, lc);
              _tile_stored(1, c1, lc);
              _tile_stored(2, c0 + 16, lc);
              _tile_stored(3, c1 + 16, lc);
            }
          }
          if (kb1 < KB) continue;
          /* the rest (rows past M, or one tile left over): the whole K at once */
          for (int64_t mt = full_hi; mt < mt_hi; mt += 2) {
            const bool two = mt + 1 < mt_hi;
            const int8_t* b0 = xp + mt * KB * 1024;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            amx_kb_loop(w0, w1, K, b0, b0 + KB * 1024, two, 0, KB);
            amx_finish_block(buf, n0, mt, two, M, epi);
          }
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
