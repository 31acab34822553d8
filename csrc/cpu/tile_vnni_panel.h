/* W4A8 (int4_dynamic_mm) and W8A8 (int8_dynamic_mm, int8_gemm_s32) at prefill
 * sizes on AVX512-VNNI without AMX tiles.
 *
 * Why: the GEMV-shaped kernel (tile_int4dyn.h) keeps its dword lanes along K, so
 * every (weight row, x row) pair converts and scales its int32 sum once per
 * group: at G = 64 that is one cvt and one FMA per vpdpbusd, and its 4 x 4 tile
 * needs 32 accumulators, more than the register file. At M = 128 on a Zen 4 it
 * ran at ~37% of the VNNI peak, half the speed of int8 dynamic.
 *
 * Here the lanes run along N, as in a GEMM: each thread expands a panel of 32
 * weight rows once per call into u8 codes in VNNI order, [K/4][2][16][4]
 * (k / 4, 16-row half, row, k % 4), with its group scales and zero points
 * group-major, and then sweeps every row of x over it. A step of 4 k is
 * two 64-byte loads and, per x row, one 4-byte broadcast and two vpdpbusd
 * (u8 codes x s8 activations: no bias, no saturation). Each group's int32 sum
 * of x (code - zero) is exact (|sum| <= G * 15 * 128) and enters fp32 once:
 *   acc += float(isum - zero * gsum) * scale
 * (gsum: the group's sum of the x codes), G / 4 vpdpbusd per conversion.
 *
 * W8A8 takes the same panels of s8 weights stored as u8 (w + 128): the sum over
 * all K is then sum (w + 128) x - 128 sum x, in wrapping int32 arithmetic like
 * the GEMV-shaped kernel (tile_int8.h), so the result is the same integer. Its
 * 4 x 4 tile with lanes along K reduces 16 accumulators at the end and reached
 * ~75% of the VNNI peak at M = 128 on a Zen 4. */
#ifndef PQ_CPU_TILE_VNNI_PANEL_H
#define PQ_CPU_TILE_VNNI_PANEL_H
#include <omp.h>
#include <string.h>
#include "common.h"
#include "kernels.h"

namespace PQ_NS {
namespace {

#if defined(PQ_SIMD_AVX512)
constexpr int kPanelRows = 32;
/* Bytes ahead that the decode-size W4A8 panel sweep prefetches (w4a8_nibble_panel_acc): into
 * L1 (T0) a little ahead, into L2 (T1) further on. First measured alone, M = 1 on panels packed
 * at swap time, in-process against the GEMV on canonical rows (Zen 4, 2 threads, Llama-2-7B
 * shapes, two runs each): no prefetch 0.88-0.99x, T0 at 1024 B 0.85-1.05x, 2048 B 0.96-1.13x,
 * 4096 B 0.97-1.21x. Then, in one process with the hint chosen per call (seeded random order
 * among fp32 F.linear, int4pack and the read probe, weights rotated; 21 runs of the three
 * shapes on a noisy VM), against T0 at 4096 B: T0 at 1024 B plus T1 at 8192 B 0.97-1.17x,
 * median 1.05 (17 of 21 above 1); T1 instead of T0 at 4096 B 0.96-1.04x; T1 at 8192 B 0.95-1.09x;
 * none 0.85-0.94x; NTA 0.89-1.21x. The two builds against each other in one process
 * (benchmarks/ab_inprocess.py, geometric means of both orders, four sets of 4-6 runs at
 * different times): int4 weight-only (three code rows) 1.00-1.06x on 4096x4096, 0.99-1.11x on
 * 11008x4096 and 1.00-1.10x on 4096x11008; W4A8 at M = 1 (one code row, a third of the work
 * a byte) 0.99-1.04x, one set. (The int8 panel sweep, whose bytes take half the work
 * each, read 0.82-1.03x with these, 16 of 18 runs below 1: it keeps the hardware prefetcher
 * alone.) */
constexpr int kPanelPrefetchL1 = 1024;
constexpr int kPanelPrefetchL2 = 8192;
constexpr int kPanelMaxT = 6; /* x rows a tile: 12 int32 + 12 fp32 accumulators */

/* sums[g] = the sum of the codes x[g * G .. (g + 1) * G), K / G groups; G % 32 == 0. One
 * vpdpbusd of ones per 64 codes (a scalar loop cost ~15% of a whole call at K = 384). */
inline void code_group_sums(const int8_t* x, int64_t K, int64_t G, int32_t* sums) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t g = 0; g < K / G; ++g) {
    __m512i acc = _mm512_setzero_si512();
    int64_t k = g * G;
    for (; k + 64 <= (g + 1) * G; k += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(x + k));
    if (k < (g + 1) * G) /* 32 codes left */
      acc = _mm512_dpbusd_epi32(acc, ones, _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(x + k))));
    sums[g] = _mm512_reduce_add_epi32(acc);
  }
}

/* The driver of the panel GEMMs (here and tile_bf16_panel.h): prep(m) for every x row,
 * then the 32-row weight panels spread over the threads. pack(scratch, n0, nr) returns the
 * panel of rows n0 .. n0 + nr - 1 (written into its thread's scratch, or one packed at
 * swap time), which tile(panel, n0, nr, m, Int<T>) sweeps over the x rows in tiles of up
 * to kMaxT. With fewer panels than threads, the x rows of a panel are
 * split between threads too (each packs the panel it sweeps), so that none sits idle. */
template <int kMaxT, class Prep, class Pack, class Tile>
inline void for_each_panel(int64_t M, int64_t N, int n_threads, uint8_t* scratch,
                           int64_t per_thread, Prep prep, Pack pack, Tile tile) {
  const int64_t panels = (N + kPanelRows - 1) / kPanelRows;
  const int64_t mtiles = (M + kMaxT - 1) / kMaxT;
  const int64_t parts = panels >= n_threads ? 1 : min64((n_threads + panels - 1) / panels, mtiles);
  const int64_t tasks = panels * parts, per_part = (mtiles + parts - 1) / parts * kMaxT;
  const int threads = tasks < n_threads ? (int)tasks : n_threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) prep(m);
    uint8_t* own = scratch + omp_get_thread_num() * per_thread;
    const uint8_t* panel = nullptr;
    int64_t packed = -1; /* the panel's index */
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t p = task / parts, m0 = task % parts * per_part, m1 = min64(M, m0 + per_part);
      const int64_t n0 = p * kPanelRows, nr = min64(kPanelRows, N - n0);
      if (p != packed) panel = pack(own, n0, nr), packed = p;
      for (int64_t m = m0; m < m1; m += kMaxT) {
        auto run = [&](auto, auto T_) { tile(panel, n0, nr, m, T_); };
        dispatch_t<1, kMaxT>((int)min64(kMaxT, m1 - m), run);
      }
    }
  }
}

/* A panel of 32 weight rows in dword-column order: row(n, c) gives the 16 dwords of chunk
 * c (64 bytes) of row n < nr (rows past nr are zeros); dword j of every row's chunk c goes
 * to the 64 bytes at dst + ((16 c + j) * 2 + n / 16) * 64, lane n % 16. */
template <class Row>
inline void pack_panel_dwords(int64_t nr, int64_t chunks, uint8_t* dst, Row row) {
  for (int h = 0; h < 2; ++h)
    for (int64_t c = 0; c < chunks; ++c) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = 16 * h + i < nr ? row(16 * h + i, c) : _mm512_setzero_si512();
      transpose16x16(r); /* r[j], lane i: dword j of row 16h + i */
      for (int j = 0; j < 16; ++j) _mm512_store_si512(dst + ((16 * c + j) * 2 + h) * 64, r[j]);
    }
}

/* The inverse of pack_panel_dwords for a whole panel: store(n, c, v) gets the 16 dwords of
 * chunk c of row n (the transpose is its own inverse). */
template <class Store>
inline void unpack_panel_dwords(int64_t chunks, const uint8_t* src, Store store) {
  for (int h = 0; h < 2; ++h)
    for (int64_t c = 0; c < chunks; ++c) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) r[j] = _mm512_load_si512(src + ((16 * c + j) * 2 + h) * 64);
      transpose16x16(r); /* r[i]: the 16 dwords of chunk c of row 16h + i */
      for (int i = 0; i < 16; ++i) store(16 * h + i, c, r[i]);
    }
}

/* The panel's codes pc (K * 32 bytes, 64-byte aligned, order above) from row(n, k0): the
 * u8 codes k0..k0+63 of weight row n < nr. K % 64 == 0. */
template <class Row>
inline void pack_panel_codes(int64_t nr, int64_t K, uint8_t* pc, Row row) {
  pack_panel_dwords(nr, K / 64, pc, [&](int64_t n, int64_t c) { return row(n, 64 * c); });
}

/* Weight rows [0, nr) of wp (nr <= 32; rows past nr read as code 0, scale 0) -> the
 * panel: codes pc, scales sp[g][32] and zero points as int32 zi[g][32]. */
inline void w4a8_pack_panel(const uint8_t* wp, const float* sc, const uint8_t* zp, int64_t nr,
                            int64_t K, int64_t G, uint8_t* pc, float* sp, int32_t* zi) {
  const int64_t ldw = K / 2, ng = K / G;
  const __m512i lo = _mm512_set1_epi16(0x000F), hi = _mm512_set1_epi16(0x0F00);
  pack_panel_codes(nr, K, pc, [&](int64_t n, int64_t k0) {
    /* 32 bytes = 64 codes -> one byte a code, in k order: byte 2j+1 of a word takes
     * the high nibble of byte j, shifted into place */
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wp + n * ldw + k0 / 2)));
    return _mm512_or_si512(_mm512_and_si512(w, lo), _mm512_and_si512(_mm512_slli_epi16(w, 4), hi));
  });
  for (int64_t g = 0; g < ng; ++g)
    for (int n = 0; n < kPanelRows; ++n) {
      const float s = n < nr ? sc[n * ng + g] : 0.0f;
      sp[g * kPanelRows + n] = s;
      zi[g * kPanelRows + n] = n < nr ? zp[n * ng + g] : 0;
    }
}

/* The lanes of 16-column half v of a panel whose first nr columns are in the output. */
inline __mmask16 panel_half_mask(int64_t nr, int v) {
  const int64_t left = nr - 16 * v;
  return left <= 0 ? (__mmask16)0 : left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* Output rows t < T (stride N), columns n0 .. n0 + nr - 1: row(t, v, mask) for the 16
 * columns of half v (mask: those in the output), plus bias when given. */
template <int T, class Row>
inline void panel_store_rows(const float* bias, int64_t n0, int64_t nr, int64_t N, float* out,
                             Row row) {
  for (int v = 0; v < 2; ++v) {
    const __mmask16 m = panel_half_mask(nr, v);
    if (!m) break;
    const int64_t c0 = n0 + 16 * v;
    for (int t = 0; t < T; ++t) {
      __m512 y = row(t, v, m);
      if (bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, bias + c0));
      _mm512_mask_storeu_ps(out + t * N + c0, m, y);
    }
  }
}

/* acc[t][v], times x_scale[t] when given, plus bias when given: separate multiply and add,
 * the epilogue order of scale_bias (kernels.cpp). */
template <int T>
inline void panel_store(__m512 acc[T][2], const float* x_scale, const float* bias, int64_t n0,
                        int64_t nr, int64_t N, float* out) {
  panel_store_rows<T>(bias, n0, nr, N, out, [&](int t, int v, __mmask16) {
    return x_scale ? _mm512_mul_ps(acc[t][v], _mm512_set1_ps(x_scale[t])) : acc[t][v];
  });
}

/* The accumulators of panel_dots: rows t .. T-1 of the tile as named fields, one level of
 * nesting a row. As an array (__m512i acc[T][2]) GCC 12 carried them through the k loop in a
 * chain of register copies, two vmovdqa a vpdpbusd (T = 6: 24 copies beside the 12 products of
 * a step): the loop ran at 49-66% of the VNNI peak on a Zen 4 core, in L1, where these fields
 * give 86-92% (the same loop with T = 6, K = 4096, 1020 x rows: 66-89 against 116-123 products
 * of 4 bytes a cycle, three passes). In-process A/B of the library, both orders: int8 dynamic
 * 1.3-1.4x at M = 128 and 1024. The nibble loop (w4a8_nibble_panel_acc) runs its two vpdpbusd
 * a row as two steps here: chained on one accumulator in one expression, GCC still copied
 * each accumulator twice a step (24 copies to 24 products; 6 this way, none with the register
 * constraint in step), 1.08-1.14x at M = 128 and 1.19x at M = 1024 (4096 x 4096, W4A8),
 * unchanged at M = 1. tests/test_codegen.py counts the copies of both loops. */
template <int T>
struct PanelRows {
  __m512i a0, a1;
  PanelRows<T - 1> rest;
  PQ_ALWAYS_INLINE explicit PanelRows(const __m512i (*acc)[2]) : a0(acc[0][0]), a1(acc[0][1]), rest(acc + 1) {}
  /* one step of 4 k: x points at this row's 4 codes, the next row's ldx further */
  PQ_ALWAYS_INLINE void step(const int8_t* x, int64_t ldx, __m512i w0, __m512i w1) {
    int32_t x4;
    memcpy(&x4, x, 4);
    const __m512i xb = _mm512_set1_epi32(x4);
    a0 = _mm512_dpbusd_epi32(a0, w0, xb);
    a1 = _mm512_dpbusd_epi32(a1, w1, xb);
    /* each accumulator stays in its register from step to step: without this, where a loop
     * takes two steps an iteration (the nibble loop) and the kernel is not inlined into its
     * driver, GCC 12 copied each accumulator twice an iteration again (23 copies to 24
     * products; tests/test_codegen.py) */
    asm("" : "+v"(a0), "+v"(a1));
    rest.step(x + ldx, ldx, w0, w1);
  }
  PQ_ALWAYS_INLINE void store(__m512i (*acc)[2]) const {
    acc[0][0] = a0;
    acc[0][1] = a1;
    rest.store(acc + 1);
  }
};
template <>
struct PanelRows<0> {
  PQ_ALWAYS_INLINE explicit PanelRows(const __m512i (*)[2]) {}
  PQ_ALWAYS_INLINE void step(const int8_t*, int64_t, __m512i, __m512i) {}
  PQ_ALWAYS_INLINE void store(__m512i (*)[2]) const {}
};

/* acc[t][v] += the products of x row t (x + t * ldx, `len` codes from its start) with panel
 * rows 16v..16v+15 over those codes (p: the panel at the first of them): one 4-byte
 * broadcast of x and two vpdpbusd a row and step of 4 k. */
template <int T>
inline void panel_dots(const int8_t* x, int64_t ldx, int64_t len, const uint8_t* p,
                       __m512i acc[T][2]) {
  PanelRows<T> rows(acc);
  for (int64_t k = 0; k < len; k += 4, p += 128)
    rows.step(x + k, ldx, _mm512_load_si512(p), _mm512_load_si512(p + 64));
  rows.store(acc);
}

/* The group's exact sum_k x (code - zero) = iacc - zero * gsum (|.| < 2^24: exact in fp32
 * too), scaled and added: taking zero * gsum off in fp32 instead rounds relative to the
 * code term, which activations far from zero mean make much larger than the result. */
inline __m512 w4a8_group(__m512 facc, __m512i iacc, __m512i z, int32_t gsum, __m512 s) {
  const __m512i d = _mm512_sub_epi32(iacc, _mm512_mullo_epi32(z, _mm512_set1_epi32(gsum)));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, facc);
}

/* facc[t][v] = rows m..m+T-1 of x (codes xq, stride K; gsum rows of K/G) against panel rows
 * 16v..16v+15, scaled per group. */
template <int T>
inline void w4a8_panel_acc(const int8_t* xq, const int32_t* gsum, int64_t K, int64_t G,
                           const uint8_t* pc, const float* sp, const int32_t* zi,
                           __m512 facc[T][2]) {
  const int64_t ng = K / G;
  for (int t = 0; t < T; ++t) facc[t][0] = facc[t][1] = _mm512_setzero_ps();
  const uint8_t* p = pc;
  for (int64_t g = 0; g < ng; ++g) {
    __m512i iacc[T][2];
    for (int t = 0; t < T; ++t) iacc[t][0] = iacc[t][1] = _mm512_setzero_si512();
    panel_dots<T>(xq + g * G, K, G, p, iacc);
    p += G * kPanelRows;
    const __m512 s0 = _mm512_load_ps(sp + g * kPanelRows), s1 = _mm512_load_ps(sp + g * kPanelRows + 16);
    const __m512i z0 = _mm512_load_si512(zi + g * kPanelRows), z1 = _mm512_load_si512(zi + g * kPanelRows + 16);
    for (int t = 0; t < T; ++t) {
      facc[t][0] = w4a8_group(facc[t][0], iacc[t][0], z0, gsum[t * ng + g], s0);
      facc[t][1] = w4a8_group(facc[t][1], iacc[t][1], z1, gsum[t * ng + g], s1);
    }
  }
}

/* x rows in 24-bit fixed point (three int8 term rows each, [M][3][K], scales xs[M][3]): the
 * T x rows' 3T term rows are one tile, their results combined in registers as o_j = acc_j *
 * xs_j, out = o_hi + (o_mid + o_lo), then + bias: the arithmetic of panel_store and
 * sum_fixed24_terms (kernels.cpp), without three fp32 term outputs an output written and
 * read back. */
template <int T>
inline void fx24_panel_store(__m512 acc[3 * T][2], const float* xs, const float* bias, int64_t n0,
                             int64_t nr, int64_t N, float* out) {
  panel_store_rows<T>(bias, n0, nr, N, out, [&](int t, int v, __mmask16) {
    __m512 o[3];
    for (int j = 0; j < 3; ++j) o[j] = _mm512_mul_ps(acc[3 * t + j][v], _mm512_set1_ps(xs[3 * t + j]));
    return _mm512_add_ps(o[0], _mm512_add_ps(o[1], o[2]));
  });
}

/* The W4A8 driver shared by the two panel forms below: the code rows' group sums into gsum,
 * then for_each_panel over pack(scratch, n0, nr) -> panel (scratch: per_thread bytes a thread
 * at `scratch`), each tile's accumulators from acc(Int<R>, panel, n0, m, facc) (R code rows),
 * stored once per x row. kFx24: x rows in 24-bit fixed point (M x rows of three code rows
 * each, x_scale their xs; see fx24_panel_store), else M code rows with one scale each. */
template <bool kFx24, class Pack, class Acc>
inline void w4a8_panel_driver(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                              int64_t N, int64_t G, const float* bias, float* out, int32_t* gsum,
                              uint8_t* scratch, int64_t per_thread, int n_threads, Pack pack,
                              Acc acc) {
  constexpr int kRows = kFx24 ? 3 : 1; /* code rows an x row */
  const int64_t ng = K / G;
  for_each_panel<kPanelMaxT / kRows>(
      M, N, n_threads, scratch, per_thread,
      [&](int64_t m) {
        for (int64_t r = kRows * m; r < kRows * (m + 1); ++r) code_group_sums(xq + r * K, K, G, gsum + r * ng);
      },
      pack,
      [&](const uint8_t* pc, int64_t n0, int64_t nr, int64_t m, auto T_) {
        constexpr int T = decltype(T_)::value, R = kRows * T;
        __m512 facc[R][2];
        acc(Int<R>{}, pc, n0, kRows * m, facc);
        if constexpr (kFx24)
          fx24_panel_store<T>(facc, x_scale + 3 * m, bias, n0, nr, N, out + m * N);
        else
          panel_store<T>(facc, x_scale + m, bias, n0, nr, N, out + m * N);
      });
}

/* The whole product on the canonical int4 rows wp, each panel converted per call; work:
 * 64-byte aligned, pq::w4a8_panel_work_bytes(M', K, G, n_threads) (gsum, then one panel a
 * thread), M' the code rows. kFx24 as in w4a8_panel_driver. */
template <bool kFx24 = false>
inline void w4a8_panel_mm(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                          const uint8_t* wp, int64_t N, const float* scales, const uint8_t* zeros,
                          int64_t G, const float* bias, float* out, void* work, int n_threads) {
  constexpr int kRows = kFx24 ? 3 : 1;
  const int64_t ng = K / G;
  int32_t* gsum = (int32_t*)work;
  /* a thread's panel: codes, then scales and zero points (int32) [K/G][32] each */
  const int64_t sp_at = pq::align64(kPanelRows * K), zi_at = sp_at + pq::align64(ng * kPanelRows * 4);
  w4a8_panel_driver<kFx24>(
      xq, x_scale, M, K, N, G, bias, out, gsum, (uint8_t*)work + pq::align64(kRows * M * ng * 4),
      pq::w4a8_panel_bytes(K, G), n_threads,
      [&](uint8_t* pc, int64_t n0, int64_t nr) -> const uint8_t* {
        w4a8_pack_panel(wp + n0 * (K / 2), scales + n0 * ng, zeros + n0 * ng, nr, K, G, pc,
                        (float*)(pc + sp_at), (int32_t*)(pc + zi_at));
        return pc;
      },
      [&](auto R_, const uint8_t* pc, int64_t, int64_t r0, __m512 facc[][2]) {
        w4a8_panel_acc<decltype(R_)::value>(xq + r0 * K, gsum + r0 * ng, K, G, pc,
                                            (const float*)(pc + sp_at),
                                            (const int32_t*)(pc + zi_at), facc);
      });
}

/* W4A8 on panels packed at swap time (pq.h: pq_int4_dynamic_mm_panels), codes two a byte:
 * a panel is [K/8][2][16][4] bytes, byte (j, h, i, c) = code(16h + i, 8j + c) | code(16h +
 * i, 8j + 4 + c) << 4, so one 64-byte load holds 8 k of 16 rows and its low and high nibbles
 * are the u8 operands of two vpdpbusd steps; its scales and zero points are [K/G][32]. The
 * arithmetic of w4a8_panel_acc (w4a8_group), on half the bytes. */
template <int T>
inline void w4a8_nibble_panel_acc(const int8_t* xq, const int32_t* gsum, int64_t K, int64_t G,
                                  const uint8_t* pc, const float* sp, const uint8_t* zp,
                                  __m512 facc[T][2]) {
  const int64_t ng = K / G;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  for (int t = 0; t < T; ++t) facc[t][0] = facc[t][1] = _mm512_setzero_ps();
  const uint8_t* p = pc;
  for (int64_t g = 0; g < ng; ++g) {
    __m512i iacc[T][2];
    for (int t = 0; t < T; ++t) iacc[t][0] = iacc[t][1] = _mm512_setzero_si512();
    PanelRows<T> rows(iacc);
    const int8_t* x = xq + g * G;
    for (int64_t k = 0; k < G; k += 8, p += 128) {
      if (T <= 3) { /* decode: one stream a thread, which the hardware prefetcher alone
                       * leaves short of the DRAM bandwidth */
        PQ_PREFETCH_NEXT_TILE_L1(p + kPanelPrefetchL1);
        PQ_PREFETCH_NEXT_TILE_L1(p + kPanelPrefetchL1 + 64);
        PQ_PREFETCH_NEXT_TILE(p + kPanelPrefetchL2);
        PQ_PREFETCH_NEXT_TILE(p + kPanelPrefetchL2 + 64);
      }
      const __m512i v0 = _mm512_load_si512(p), v1 = _mm512_load_si512(p + 64);
      const __m512i a0 = _mm512_and_si512(v0, nib), b0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), nib);
      const __m512i a1 = _mm512_and_si512(v1, nib), b1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), nib);
      rows.step(x + k, K, a0, a1);
      rows.step(x + k + 4, K, b0, b1);
    }
    rows.store(iacc);
    const __m512 s0 = _mm512_load_ps(sp + g * kPanelRows), s1 = _mm512_load_ps(sp + g * kPanelRows + 16);
    const __m512i z0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zp + g * kPanelRows)));
    const __m512i z1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(zp + g * kPanelRows + 16)));
    for (int t = 0; t < T; ++t) {
      facc[t][0] = w4a8_group(facc[t][0], iacc[t][0], z0, gsum[t * ng + g], s0);
      facc[t][1] = w4a8_group(facc[t][1], iacc[t][1], z1, gsum[t * ng + g], s1);
    }
  }
}

/* The whole W4A8 product on panels packed at swap time: codes `panels` (N/32 panels of
 * 16 K bytes), scales sp and zero points zp [N/32][K/G][32]; K % 64 == 0, G % 32 == 0,
 * N % 32 == 0. work: 64-byte aligned, the code rows' group sums [M'][K/G] int32. kFx24 as in
 * w4a8_panel_driver (M' the code rows). */
template <bool kFx24 = false>
inline void w4a8_panels_mm(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                           const uint8_t* panels, int64_t N, const float* sp, const uint8_t* zp,
                           int64_t G, const float* bias, float* out, void* work, int n_threads) {
  const int64_t ng = K / G;
  int32_t* gsum = (int32_t*)work;
  w4a8_panel_driver<kFx24>(
      xq, x_scale, M, K, N, G, bias, out, gsum, nullptr, 0, n_threads,
      [&](uint8_t*, int64_t n0, int64_t) -> const uint8_t* { return panels + n0 * (K / 2); },
      [&](auto R_, const uint8_t* pc, int64_t n0, int64_t r0, __m512 facc[][2]) {
        w4a8_nibble_panel_acc<decltype(R_)::value>(xq + r0 * K, gsum + r0 * ng, K, G, pc,
                                                   sp + n0 * ng, zp + n0 * ng, facc);
      });
}

/* Rows m..m+T-1 of x (codes, stride K; xsum: their sums) against an s8 panel stored as
 * w + 128: store(t, v, acc) gets the exact (wrapping) int32 sums of x row m + t with
 * panel rows 16v .. 16v + 15. */
template <int T, class Store>
inline void w8a8_panel_tile(const int8_t* xq, const int32_t* xsum, int64_t K, const uint8_t* pc,
                            Store&& store) {
  __m512i acc[T][2];
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
  panel_dots<T>(xq, K, K, pc, acc);
  for (int t = 0; t < T; ++t) {
    const __m512i c = _mm512_set1_epi32((int32_t)((uint32_t)xsum[t] << 7)); /* 128 sum x */
    store(t, 0, _mm512_sub_epi32(acc[t][0], c));
    store(t, 1, _mm512_sub_epi32(acc[t][1], c));
  }
}

/* Rows n0 .. n0 + nr - 1 of the s8 weight w -> a panel of u8 codes w + 128. */
inline void w8a8_pack_panel(const int8_t* w, int64_t n0, int64_t nr, int64_t K, uint8_t* pc) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  pack_panel_codes(nr, K, pc, [&](int64_t n, int64_t k0) {
    return _mm512_xor_si512(_mm512_loadu_si512(w + (n0 + n) * K + k0), flip);
  });
}

/* 32 rows of the canonical int4 codes wp (two a byte, row stride K / 2) -> the nibble panel
 * of w4a8_nibble_panel_acc. Each dword of a row, codes c0..c7 in its nibbles, becomes c0 c4
 * c1 c5 c2 c6 c3 c7 (the outer perfect shuffle: swap the middle bytes, then the middle
 * nibbles of each half), so that its low nibbles are k = 8j .. 8j + 3 and its high ones the
 * next four; the dword transpose then puts 16 rows in a vector. K % 128 == 0. */
/* Swap the two middle bytes of each dword, or (bytes false) the two middle nibbles of each
 * 16-bit half: each its own inverse. */
inline __m512i swap_middle(__m512i x, bool bytes) {
  const int sh = bytes ? 8 : 4;
  const __m512i mid = _mm512_set1_epi32(bytes ? 0x0000FF00 : 0x00F000F0);
  const __m512i keep = _mm512_set1_epi32(bytes ? (int)0xFF0000FF : (int)0xF00FF00F);
  return _mm512_or_si512(_mm512_and_si512(x, keep),
                         _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(x, mid), sh),
                                         _mm512_and_si512(_mm512_srli_epi32(x, sh), mid)));
}

inline void w4a8_pack_nibble_panel(const uint8_t* wp, int64_t K, uint8_t* pc) {
  pack_panel_dwords(kPanelRows, K / 128, pc, [&](int64_t n, int64_t c) {
    return swap_middle(swap_middle(_mm512_loadu_si512(wp + n * (K / 2) + 64 * c), true), false);
  });
}

/* Its inverse: the nibble panel pc -> 32 rows of canonical int4 codes (row stride K / 2). */
inline void w4a8_unpack_nibble_panel(const uint8_t* pc, int64_t K, uint8_t* wp) {
  unpack_panel_dwords(K / 128, pc, [&](int64_t n, int64_t c, __m512i v) {
    _mm512_storeu_si512(wp + n * (K / 2) + 64 * c, swap_middle(swap_middle(v, false), true));
  });
}

/* The W8A8 panel pc -> its 32 int8 rows (row stride K). */
inline void w8a8_unpack_panel(const uint8_t* pc, int64_t K, int8_t* w) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  unpack_panel_dwords(K / 64, pc, [&](int64_t n, int64_t c, __m512i v) {
    _mm512_storeu_si512(w + n * K + 64 * c, _mm512_xor_si512(v, flip));
  });
}

/* xsum[m] = the sum of x row m's K codes (the u8 panel's bias correction). */
inline void w8a8_row_sum(const int8_t* xq, int64_t m, int64_t K, int32_t* xsum) {
  code_group_sums(xq + m * K, K, K, xsum + m);
}

/* The M x N int32 products of xq and the s8 weight (K % 64 == 0), each 16 outputs of a
 * row handed to store(m, n, mask, acc) (mask: the columns < N). The weight is w, converted
 * into panels per call (work: 64-byte aligned, pq::w8a8_panel_work_bytes(M, K, n_threads):
 * the x row sums, then a panel a thread), or, when w is null, `panels`: all of its panels,
 * converted once at swap time (pq.h: pq_int8_dynamic_mm_panels; work: the x row sums). */
template <class Store>
inline void w8a8_panel_gemm(const int8_t* xq, int64_t M, int64_t K, const int8_t* w,
                            const uint8_t* panels, int64_t N, void* work, int n_threads,
                            Store store) {
  int32_t* xsum = (int32_t*)work;
  for_each_panel<kPanelMaxT>(
      M, N, n_threads, (uint8_t*)work + pq::align64(M * 4), w ? pq::align64(kPanelRows * K) : 0,
      [&](int64_t m) { w8a8_row_sum(xq, m, K, xsum); },
      [&](uint8_t* pc, int64_t n0, int64_t nr) -> const uint8_t* {
        if (!w) return panels + n0 * K;
        w8a8_pack_panel(w, n0, nr, K, pc);
        return pc;
      },
      [&](const uint8_t* pc, int64_t n0, int64_t nr, int64_t m, auto T_) {
        w8a8_panel_tile<decltype(T_)::value>(
            xq + m * K, xsum + m, K, pc, [&](int t, int v, __m512i acc) {
              if (const __mmask16 mask = panel_half_mask(nr, v)) store(m + t, n0 + 16 * v, mask, acc);
            });
      });
}

/* int8 weight-only for activations in 24-bit fixed point (split_row_fixed24: three int8
 * term rows an x row, [M][3][K], scales xs[M][3]) on the W8A8 panels: the three term
 * rows of T x rows are one tile of 3T rows, and their sums meet in registers, in the
 * arithmetic of the AMX path and sum_fixed24_terms (kernels.cpp): o_j = float(sum_j) *
 * (xs_j * w_scale), out = o_hi + (o_mid + o_lo), then + bias. The same results, without
 * three fp32 term outputs an output written and read back. */
template <int T>
inline void w8a8_fx24_panel_tile(const int8_t* xq, const int32_t* xsum, const float* xs,
                                 int64_t K, const uint8_t* pc, const float* w_scale,
                                 const float* bias, int64_t n0, int64_t nr, int64_t N, float* out) {
  constexpr int R = 3 * T;
  __m512i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  panel_dots<R>(xq, K, K, pc, acc);
  panel_store_rows<T>(bias, n0, nr, N, out, [&](int t, int v, __mmask16 m) {
    const __m512 ws = _mm512_maskz_loadu_ps(m, w_scale + n0 + 16 * v);
    __m512 o[3];
    for (int j = 0; j < 3; ++j) {
      const int r = 3 * t + j; /* 128 sum x: the u8 panel's bias, in wrapping int32 */
      const __m512i c = _mm512_set1_epi32((int32_t)((uint32_t)xsum[r] << 7));
      o[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], c)),
                           _mm512_mul_ps(_mm512_set1_ps(xs[r]), ws));
    }
    return _mm512_add_ps(o[0], _mm512_add_ps(o[1], o[2]));
  });
}

/* The whole product for M x rows in fixed point (layout above), K % 64 == 0. The weight
 * is w, converted into panels per call (work: 64-byte aligned, pq::w8a8_panel_work_bytes(3
 * M, K, n_threads)), or, when w is null, `panels` converted at swap time (work: the x term
 * rows' sums, pq::int8_panels_work_bytes(3 M)). */
inline void w8a8_fx24_panel_mm(const int8_t* xq, const float* xs, int64_t M, int64_t K,
                               const int8_t* w, const uint8_t* panels, int64_t N,
                               const float* w_scale, const float* bias, float* out, void* work,
                               int n_threads) {
  int32_t* xsum = (int32_t*)work;
  for_each_panel<kPanelMaxT / 3>(
      M, N, n_threads, (uint8_t*)work + pq::align64(3 * M * 4), w ? pq::align64(kPanelRows * K) : 0,
      [&](int64_t m) {
        for (int j = 0; j < 3; ++j) w8a8_row_sum(xq, 3 * m + j, K, xsum);
      },
      [&](uint8_t* pc, int64_t n0, int64_t nr) -> const uint8_t* {
        if (!w) return panels + n0 * K;
        w8a8_pack_panel(w, n0, nr, K, pc);
        return pc;
      },
      [&](const uint8_t* pc, int64_t n0, int64_t nr, int64_t m, auto T_) {
        w8a8_fx24_panel_tile<decltype(T_)::value>(xq + 3 * m * K, xsum + 3 * m, xs + 3 * m, K,
                                                  pc, w_scale, bias, n0, nr, N, out + m * N);
      });
}
#endif

}  // namespace
}  // namespace PQ_NS
#endif /* PQ_CPU_TILE_VNNI_PANEL_H */
