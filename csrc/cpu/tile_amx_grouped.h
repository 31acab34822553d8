/* The AMX loop shared by the paths whose weights carry a scale per group of K
 * (int4 weight-only and W4A8) or per row (int8 weight-only: one group of K),
 * and whose weights must be converted per call to what the tiles multiply:
 * bf16 (tile_amx_bf16.h) or int8 (tile_amx_int4dyn.h). AMX build only.
 *
 * Per task: convert writes a 32-row weight strip (the A operand: 16 rows x 64
 * bytes a tile) once, then the task's activation rows (B tiles, 1 KiB each, packed per call by the caller as
 * [term][ceil(M/16)][row_bytes / 64][1 KiB]) are swept with it. Per weight
 * group the tiles accumulate the group's sums over every term; each C tile is
 * then scaled by its rows' group scales into fp32 accumulators, so the scale
 * multiplies a sum, never a product. Register blocking 2 x 2 as in
 * tile_amx.h: tiles 4, 5 hold weights, 6, 7 activations, 0..3 the sums.
 * The strip keeps its rows one after the other. Written in the tiles' order instead (per
 * 64 bytes of K, the 32 rows' 64 bytes, so that each A tile is 1 KiB in one piece, which an
 * in-cache tile loop ran 1.16x faster), W4A8 and the bf16 weight-only paths ran 0.92-1.01x
 * at M = 1024 (4096 x 4096, in-process A/B, both orders; Granite Rapids): not kept.
 *
 * Also tried, for int4 weight-only with bf16 activations: no groups at all, each weight
 * dequantized once per strip in fp32 and written as two bf16 terms (hi = bf16(w), lo =
 * bf16(w - hi), w to ~2^-17), both multiplied by the same activation tiles and the sums
 * flushed once per 512 k. It ran 0.66-0.69x as fast at M = 1024 (Llama-2-7B shapes,
 * benchmarks/ab_inprocess.py, two runs): per 64 bytes of K the block then loads 6 tiles for
 * 8 products where the grouped loop loads 4 for 4, and that is the ratio measured. So this
 * loop is bound by its tile loads from L2, not by the group flush (as a microbenchmark
 * whose tiles came from L1 had suggested), and that is where the bf16 path stands against
 * oneDNN's bf16 GEMM (0.83-0.91x at M = 1024). */
#ifndef PQ_CPU_TILE_AMX_GROUPED_H
#define PQ_CPU_TILE_AMX_GROUPED_H
#include <omp.h>

#include "kernels.h"
#include "tile_amx.h"

#if defined(PQ_AMX)

namespace PQ_NS {
namespace {

/* acc[r][:] (+)= float(C[r][:]) * sg[r] for the 16 rows of a C tile stored in cbuf
 * (fp32 sums, or int32 sums when Int is true); sg: the 16 rows' scales of the group,
 * contiguous, so each row's is one broadcast operand, or null: no scale (first: acc is
 * written, not read). */
template <bool Int>
inline void amx_scale_acc(const void* cbuf, float* acc, const float* sg, bool first) {
  for (int r = 0; r < 16; ++r) {
    const __m512 c = Int ? _mm512_cvtepi32_ps(_mm512_load_si512((const int32_t*)cbuf + r * 16))
                         : _mm512_load_ps((const float*)cbuf + r * 16);
    __m512 y;
    if (!sg)
      y = first ? c : _mm512_add_ps(c, _mm512_load_ps(acc + r * 16));
    else if (first)
      y = _mm512_mul_ps(c, _mm512_set1_ps(sg[r]));
    else
      y = _mm512_fmadd_ps(c, _mm512_set1_ps(sg[r]), _mm512_load_ps(acc + r * 16));
    _mm512_store_ps(acc + r * 16, y);
  }
}

/* Groups g0..g1-1 of one (32 weight rows) x (activation tiles mt, mt + 1 when
 * two) block: per group the tiles' int32/fp32 sums over every term, scaled by
 * the rows' group scales (sg_base: group-major [g - g0][32], or null) into the
 * block's fp32 accumulators acc[4][16][16] (written at g == 0). w0: the strip's
 * rows 0..15 indexed by kb * 64 (row stride ld), w1 rows 16..31. */
template <class Op>
inline void amx_grouped_block(const uint8_t* w0, const uint8_t* w1, int64_t ld,
                              const uint8_t* xp, int terms, int64_t term_bytes, int64_t KB,
                              int64_t gkb, int64_t mt, bool two, int64_t g0, int64_t g1,
                              const float* sg_base, float* acc, int32_t* cbuf) {
  for (int64_t g = g0; g < g1; ++g) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int t = 0; t < terms; ++t) {
      const uint8_t* b0 = xp + t * term_bytes + mt * KB * 1024;
      const uint8_t* b1 = b0 + KB * 1024;
      for (int64_t kb = g * gkb; kb < (g + 1) * gkb; ++kb) {
        _tile_loadd(4, w0 + kb * 64, ld);
        _tile_loadd(6, b0 + kb * 1024, 64);
        Op::dp046();
        if (two) {
          _tile_loadd(7, b1 + kb * 1024, 64);
          Op::dp147();
        }
        _tile_loadd(5, w1 + kb * 64, ld);
        Op::dp256();
        if (two) Op::dp357();
      }
    }
    const float* sg = sg_base ? sg_base + (g - g0) * 32 : nullptr;
    _tile_stored(0, cbuf, 64);
    amx_scale_acc<Op::kInt>(cbuf, acc, sg, g == 0);
    _tile_stored(2, cbuf, 64);
    amx_scale_acc<Op::kInt>(cbuf, acc + 512, sg ? sg + 16 : nullptr, g == 0);
    if (two) {
      _tile_stored(1, cbuf, 64);
      amx_scale_acc<Op::kInt>(cbuf, acc + 256, sg, g == 0);
      _tile_stored(3, cbuf, 64);
      amx_scale_acc<Op::kInt>(cbuf, acc + 768, sg ? sg + 16 : nullptr, g == 0);
    }
  }
}

/* A finished block's accumulators (amx_grouped_block) through the epilogue. */
template <class Epi>
inline void amx_grouped_store(const float* acc, int64_t n0, int64_t mt, bool two, int64_t M,
                              const Epi& epi) {
  amx_store_tile((const int32_t*)acc, n0, mt * 16, M, epi);
  amx_store_tile((const int32_t*)(acc + 512), n0 + 16, mt * 16, M, epi);
  if (two) {
    amx_store_tile((const int32_t*)(acc + 256), n0, (mt + 1) * 16, M, epi);
    amx_store_tile((const int32_t*)(acc + 768), n0 + 16, (mt + 1) * 16, M, epi);
  }
}

/* Short rows (MiniLM's K = 384), as in amx_gemm (tile_amx.h, kAmxRowsFirstMaxK): writing
 * the float outputs is most of the work there, and a strip swept over all of M wrote two
 * lines of each of thousands of rows at a time. So when a thread's share of the strips,
 * converted, fits in its scratch's chunk-sum space (unused when K is not chunked), each
 * thread converts its share once and sweeps all activation rows over it 32 at a time,
 * filling its part of each output row in order. W4A8 g64 (benchmarks/ab_builds.py, calls
 * alternated with the strip order): 2560 x 1536 x 384 1.3-1.9x at two threads (at one its
 * 48 strips do not fit: unchanged), 2560 x 384 x 384 1.2x at one. Longer rows keep the
 * strip order (the int8 GEMM lost 5-20% with this order at K = 1536). */
constexpr int64_t kAmxGroupedRowsFirstMaxBytes = 512;

/* Op: the tile products dp046() (C0 += A4 B6), dp147(), dp256(), dp357(), and
 * `static constexpr bool kInt` (int32 sums). Epi: as amx_store_tile's, given
 * the fp32 accumulators' bits. group_bytes: the group size in bytes of a weight
 * row. scales [N][ng], or null: the groups' sums are added unscaled (a scale per row,
 * the same for every group, is then the epilogue's to apply, once, to their sum);
 * scales_panels: scales in the panel layout (group_scale).
 * convert(n0, g0, g1, wb, ld) writes groups g0..g1-1 of the 32 weight rows
 * from n0 to wb (row stride ld bytes). strips: n_threads x pq::amx_strip_bytes
 * (row_bytes, ng) bytes, 64-byte aligned: each thread's converted strip (chunk),
 * its scales and its fp32 accumulators (the caller's scratch).
 *
 * Cache blocking as in amx_gemm (tile_amx.h): while the packed activations fit in
 * L2 a task is one strip x every activation row (pq::kAmxGroupedMc rows when there
 * are too few strips for the threads) over the whole K; past that (and when a group
 * fits in a chunk) a task is pq::kAmxGroupedNc weight rows x pq::kAmxGroupedMc
 * activation rows with K in chunks of whole groups (pq::kAmxGroupedKcBytes of a
 * row): per chunk the task's activation tiles stay in L2 while each strip's
 * converted chunk (32 rows, in L1) meets all of them, and the fp32 sums of the
 * task's blocks wait in the thread's accumulators. Short rows: see above. */
/* The scale of row n0 + r (n0 a multiple of 32), group g: scales [N][ng], or, with panels,
 * the panel layout's [N/32][ng][32] (pyquant/panels.py). */
inline float group_scale(const float* scales, int64_t n0, int r, int64_t g, int64_t ng,
                         bool panels) {
  return panels ? scales[(n0 / 32 * ng + g) * 32 + r] : scales[(n0 + r) * ng + g];
}

template <class Op, class Convert, class Epi>
void amx_grouped_gemm(int64_t M, int64_t N, int64_t row_bytes, int64_t group_bytes,
                      const uint8_t* xp, int terms, int64_t term_bytes, const float* scales,
                      uint8_t* strips, Convert convert, const Epi& epi, int n_threads,
                      bool scales_panels = false) {
  const int64_t Mt = ceil_div(M, 16), KB = row_bytes / 64, gkb = group_bytes / 64;
  const int64_t ng = row_bytes / group_bytes;
  const bool fits_l2 = terms * Mt * 16 * row_bytes <= pq::kAmxGroupedL2Bytes;
  const bool chunk = group_bytes <= pq::kAmxGroupedKcBytes && !fits_l2;
  const int64_t strip_bytes = pq::amx_strip_bytes(row_bytes, ng);
  const int64_t conv_off = pq::align64(32 * (row_bytes + pq::kAmxStripPad));
  const int64_t acc_off = conv_off + pq::align64(128 * ng);

  /* short rows: each thread's share of the strips, converted, after its first 4 KiB of
   * accumulators (those of one block) */
  const int64_t all_strips = N / 32;
  const int rf_threads = all_strips < n_threads ? (int)all_strips : n_threads;
  const int64_t share = ceil_div(all_strips, rf_threads > 0 ? rf_threads : 1);
  const int64_t conv_bytes = pq::align64(32 * row_bytes), sc_bytes = pq::align64(128 * ng);
  if (!chunk && row_bytes <= kAmxGroupedRowsFirstMaxBytes && Mt >= 4 &&
      share * (conv_bytes + sc_bytes) <= strip_bytes - acc_off - 4096) {
#pragma omp parallel num_threads(rf_threads) if (rf_threads > 1)
    {
      /* shares by index, not by thread: OpenMP may start fewer threads than asked
       * (OMP_THREAD_LIMIT, nested regions), and then a thread takes several shares, each
       * in its own scratch (sized for n_threads) */
      const int tid = omp_get_thread_num(), team = omp_get_num_threads();
      amx_config_tiles();
      alignas(64) int32_t cbuf[16 * 16];
      for (int t = tid; t < rf_threads; t += team) {
        float* acc = (float*)(strips + t * strip_bytes + acc_off);
        uint8_t* mine = (uint8_t*)acc + 4096;
        const int64_t s_lo = t * share, s_hi = min64(s_lo + share, all_strips);
        for (int64_t s = s_lo; s < s_hi; ++s) {
          uint8_t* wb = mine + (s - s_lo) * (conv_bytes + sc_bytes);
          float* sb = (float*)(wb + conv_bytes);
          convert(s * 32, 0, ng, wb, row_bytes);
          if (scales)
            for (int r = 0; r < 32; ++r)
              for (int64_t g = 0; g < ng; ++g) sb[g * 32 + r] = group_scale(scales, s * 32, r, g, ng, scales_panels);
        }
        for (int64_t mt = 0; mt < Mt; mt += 2) {
          const bool two = mt + 1 < Mt;
          for (int64_t s = s_lo; s < s_hi; ++s) {
            const uint8_t* w0 = mine + (s - s_lo) * (conv_bytes + sc_bytes);
            amx_grouped_block<Op>(w0, w0 + 16 * row_bytes, row_bytes, xp, terms, term_bytes,
                                  KB, gkb, mt, two, 0, ng,
                                  scales ? (const float*)(w0 + conv_bytes) : nullptr, acc, cbuf);
            amx_grouped_store(acc, s * 32, mt, two, M, epi);
          }
        }
      }
      _tile_release();
    }
    return;
  }

  const int64_t kc_groups = chunk ? pq::kAmxGroupedKcBytes / group_bytes : ng;
  const int64_t nc = chunk ? pq::kAmxGroupedNc : 32, n_strips = nc / 32;
  /* Activation rows per task, so per strip conversion: all of them when they fit
   * in L2 (then unchunked), so that each strip is converted once per call, unless
   * that leaves a thread without two strips to work on; else kAmxGroupedMc rows
   * (whose fp32 sums the per-thread accumulators hold when chunked). */
  const int64_t n_nblk = ceil_div(N, nc);
  const int64_t kMtBlock =
      fits_l2 && n_nblk >= 2 * n_threads ? Mt : pq::kAmxGroupedMc / 16;
  const int64_t n_mblk = ceil_div(Mt, kMtBlock);
  const int64_t tasks = n_nblk * n_mblk;
  const int threads = tasks < n_threads ? (int)tasks : n_threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    /* the strip (chunk), its scales group-major sb[g - g0][32], the accumulators */
    uint8_t* wb = strips + (threads > 1 ? omp_get_thread_num() : 0) * strip_bytes;
    float* sb = (float*)(wb + conv_off);
    float* accs = (float*)(wb + acc_off);
    amx_config_tiles();
    alignas(64) int32_t cbuf[16 * 16];
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n_lo = task / n_mblk * nc, n_hi = min64(n_lo + nc, N);
      const int64_t mt_lo = task % n_mblk * kMtBlock, mt_hi = min64(mt_lo + kMtBlock, Mt);
      for (int64_t g0 = 0; g0 < ng; g0 += kc_groups) {
        const int64_t g1 = min64(g0 + kc_groups, ng);
        const int64_t ld = (g1 - g0) * group_bytes + pq::kAmxStripPad;
        for (int64_t n0 = n_lo; n0 < n_hi; n0 += 32) {
          convert(n0, g0, g1, wb, ld);
          if (scales)
            for (int r = 0; r < 32; ++r)
              for (int64_t g = g0; g < g1; ++g)
                sb[(g - g0) * 32 + r] = group_scale(scales, n0, r, g, ng, scales_panels);
          const uint8_t* w0 = wb - g0 * group_bytes; /* indexed by kb * 64 from here */
          const uint8_t* w1 = w0 + 16 * ld;
          for (int64_t mt = mt_lo; mt < mt_hi; mt += 2) {
            const bool two = mt + 1 < mt_hi;
            /* (n half, m half) blocks of the 32 x 32 output: 4 x [16][16] */
            float* acc = accs + (chunk ? ((mt - mt_lo) / 2 * n_strips + (n0 - n_lo) / 32) * 1024
                                       : 0);
            amx_grouped_block<Op>(w0, w1, ld, xp, terms, term_bytes, KB, gkb, mt, two, g0, g1,
                                  scales ? sb : nullptr, acc, cbuf);
            if (g1 < ng) continue;
            amx_grouped_store(acc, n0, mt, two, M, epi);
          }
        }
      }
    }
    _tile_release();
  }
}

/* The int4 panel layout (pyquant/panels.py) read for the tiles' strips: from src, the
 * 64-byte vectors of 4 consecutive j of one half panel (128 bytes apart, 16 rows' dwords
 * each), transposed 4 x 4 by dwords in each 128-bit lane, so that u[q], lane l, holds the 4
 * dwords (codes 8j .. 8j + 31) of row 4 l + q of the half. */
inline void panel_half_rows(const uint8_t* src, __m512i u[4]) {
  const __m512i a0 = _mm512_load_si512(src), a1 = _mm512_load_si512(src + 128);
  const __m512i a2 = _mm512_load_si512(src + 256), a3 = _mm512_load_si512(src + 384);
  const __m512i t0 = _mm512_unpacklo_epi32(a0, a1), t1 = _mm512_unpackhi_epi32(a0, a1);
  const __m512i t2 = _mm512_unpacklo_epi32(a2, a3), t3 = _mm512_unpackhi_epi32(a2, a3);
  u[0] = _mm512_unpacklo_epi64(t0, t2);
  u[1] = _mm512_unpackhi_epi64(t0, t2);
  u[2] = _mm512_unpacklo_epi64(t1, t3);
  u[3] = _mm512_unpackhi_epi64(t1, t3);
}

/* The 32 int4 codes of 16 packed bytes at p, in k order, minus the zero point
 * z, as 16-bit lanes (-255..15: exact in int8 when z < 16, and in bf16). */
inline __m512i u4_codes_minus_zero(const uint8_t* p, __m512i z) {
  /* lane 2j <- low nibble of byte j, 2j + 1 <- its high nibble */
  static const int16_t order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i inter = _mm512_loadu_si512(order);
  const __m512i nib = _mm512_set1_epi16(0x0F);
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)p)));
  return _mm512_sub_epi16(
      _mm512_permutex2var_epi16(_mm512_and_si512(b, nib), inter, _mm512_srli_epi16(b, 4)), z);
}

}  // namespace
}  // namespace PQ_NS
#endif
#endif /* PQ_CPU_TILE_AMX_GROUPED_H */
