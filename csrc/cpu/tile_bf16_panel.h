/* int4 and int8 weight-only at prefill sizes on AVX512-BF16 without AMX tiles, for
 * activations that are bf16 values (a bf16 model's, widened to fp32 by the caller).
 *
 * Why: the 24-bit fixed-point path (three int8 terms a row on the W4A8 panels) does three
 * times the integer work of one and writes three fp32 outputs per output; for bf16 values
 * one bf16 term is exact. vdpbf16ps multiplies pairs of bf16 and adds both products to an
 * fp32 lane: 32 multiply-adds an instruction, half of vpdpbusd's 64 but a third of the
 * work. Products of bf16 values are exact in fp32; vdpbf16ps reads subnormal bf16 inputs
 * as zero and flushes subnormal sums (the AMX-BF16 path's contract, pq.h).
 *
 * Each thread converts a panel of 32 weight rows once per call to bf16 values code - zero
 * (exact: -15..15) in the order [K/2][2][16][2] (k / 2, 16-row half, row, k % 2): a step
 * of 2 k is two 64-byte loads and, per x row, one 4-byte broadcast of its bf16 pair and
 * two vdpbf16ps. Each group's sum enters the result once: acc += gsum * scale. int8
 * weights (exact in bf16 too) are one group of K with the row's scale. */
#ifndef PQ_CPU_TILE_BF16_PANEL_H
#define PQ_CPU_TILE_BF16_PANEL_H
#include <omp.h>
#include <string.h>
#include "common.h"
#include "kernels.h"
#include "tile_vnni_panel.h"

namespace PQ_NS {
namespace {

#if defined(PQ_SIMD_AVX512) && defined(__AVX512BF16__)
constexpr int kBf16PanelRows = kPanelRows;
constexpr int kBf16PanelMaxT = 6; /* x rows a tile: 12 group + 12 running fp32 accumulators */

/* Rows [0, nr) of the int4 weight wp (rows past nr: zeros) -> the bf16 panel pb (64 K
 * bytes, 64-byte aligned) and the group scales sp[g][32]. K % 32 == 0, G % 32 == 0. */
inline void bf16_pack_panel(const uint8_t* wp, const float* sc, const uint8_t* zp, int64_t nr,
                            int64_t K, int64_t G, uint16_t* pb, float* sp) {
  const int64_t ldw = K / 2, ng = K / G;
  /* chunks of 32 k: 64 bytes of bf16 pairs, dword j = (code k0 + 2j, code k0 + 2j + 1) */
  pack_panel_dwords(nr, K / 32, (uint8_t*)pb, [&](int64_t n, int64_t chunk) {
        const int64_t k0 = 32 * chunk;
        /* 16 bytes = 32 codes -> 32 words in k order, minus the group's zero point (a
         * 32-code block lies in one group), as fp32 then bf16: exact small integers */
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(wp + n * ldw + k0 / 2)));
        const __m512i w = _mm512_cvtepu16_epi32(b);  /* 16 bytes as 16 dwords */
        const __m512i c = _mm512_sub_epi32(_mm512_and_si512(w, _mm512_set1_epi32(15)),
                                           _mm512_set1_epi32(zp[n * ng + k0 / G]));
        const __m512i d = _mm512_sub_epi32(_mm512_srli_epi32(w, 4), _mm512_set1_epi32(zp[n * ng + k0 / G]));
        /* c: codes k0 + 2j, d: codes k0 + 2j + 1 (j = 0..15): interleave as bf16 pairs */
        const __m512bh cb = _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(d), _mm512_cvtepi32_ps(c));
        /* cb words: [c0..c15 | d0..d15] -> dword j = (c_j, d_j) */
        const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                             24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
                                             1, 16, 0);
        return _mm512_permutexvar_epi16(idx, (__m512i)cb);
      });
  for (int64_t g = 0; g < ng; ++g)
    for (int n = 0; n < kBf16PanelRows; ++n) sp[g * kBf16PanelRows + n] = n < nr ? sc[n * ng + g] : 0.0f;
}

/* A panel packed at swap time (w4a8_nibble_panel_acc's layout: [K/8][2][16][4] bytes, two
 * codes a byte; zero points zp[K/G][32]) -> the bf16 panel of bf16_pack_panel, 64 K bytes.
 * Each 64-byte load is 8 k of 16 rows; per pair of k a byte permute spreads the codes into
 * words, the zero point moves them to an index into the bf16 patterns of -15..15. */
inline void bf16_pack_panel_nibbles(const uint8_t* pc, const uint8_t* zp, int64_t K, int64_t G,
                                    uint16_t* pb) {
  alignas(64) uint16_t tab[32];
  for (int v = 0; v < 32; ++v) { /* bf16 of v - 15: exact */
    const float f = (float)(v - 15);
    uint32_t u;
    memcpy(&u, &f, 4);
    tab[v] = (uint16_t)(u >> 16);
  }
  const __m512i table = _mm512_load_si512(tab), nib = _mm512_set1_epi8(0x0F);
  /* word 2i + b of pair s takes byte 4i + 2s + b (row i's codes 2s, 2s + 1 of four) */
  alignas(64) uint8_t ix[2][64];
  for (int s = 0; s < 2; ++s)
    for (int w = 0; w < 32; ++w) ix[s][2 * w] = (uint8_t)(4 * (w / 2) + 2 * s + w % 2), ix[s][2 * w + 1] = 0;
  const __m512i idx[2] = {_mm512_load_si512(ix[0]), _mm512_load_si512(ix[1])};
  const __mmask64 even = 0x5555555555555555ull;
  __m512i zv[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
  for (int64_t j = 0; j < K / 8; ++j) {
    if (8 * j % G == 0) /* a new group: 15 - zero point in both words of each row's dword */
      for (int h = 0; h < 2; ++h) {
        const __m512i z = _mm512_sub_epi32(_mm512_set1_epi32(15), _mm512_cvtepu8_epi32(_mm_loadu_si128(
                              (const __m128i*)(zp + 8 * j / G * kBf16PanelRows + 16 * h))));
        zv[h] = _mm512_or_si512(z, _mm512_slli_epi32(z, 16));
      }
    for (int h = 0; h < 2; ++h) {
      const __m512i v = _mm512_load_si512(pc + j * 128 + h * 64);
      const __m512i half[2] = {_mm512_and_si512(v, nib), _mm512_and_si512(_mm512_srli_epi16(v, 4), nib)};
      for (int q = 0; q < 2; ++q) /* codes 8j + 4q .. 8j + 4q + 3 */
        for (int s = 0; s < 2; ++s) {
          const __m512i words = _mm512_add_epi16(_mm512_maskz_permutexvar_epi8(even, idx[s], half[q]), zv[h]);
          _mm512_store_si512(pb + ((4 * j + 2 * q + s) * 2 + h) * 32, _mm512_permutexvar_epi16(words, table));
        }
    }
  }
}

/* A W8A8 panel packed at swap time ([K/4][2][16][4] bytes of w + 128, tile_vnni_panel.h)
 * -> the bf16 panel of bf16_pack_panel_i8 (64 K bytes): per pair of k a byte permute
 * spreads the codes into words, and w (|w| <= 127) goes to bf16 through fp32, exactly. */
inline void bf16_pack_panel_u8(const uint8_t* pc, int64_t K, uint16_t* pb) {
  alignas(64) uint8_t ix[2][64];
  for (int s = 0; s < 2; ++s)
    for (int w = 0; w < 32; ++w) ix[s][2 * w] = (uint8_t)(4 * (w / 2) + 2 * s + w % 2), ix[s][2 * w + 1] = 0;
  const __m512i idx[2] = {_mm512_load_si512(ix[0]), _mm512_load_si512(ix[1])};
  const __mmask64 even = 0x5555555555555555ull;
  const __m512i bias = _mm512_set1_epi16(128);
  for (int64_t j = 0; j < K / 4; ++j)
    for (int h = 0; h < 2; ++h) {
      const __m512i v = _mm512_load_si512(pc + j * 128 + h * 64);
      for (int s = 0; s < 2; ++s) { /* k = 4j + 2s, 4j + 2s + 1 */
        const __m512i w = _mm512_sub_epi16(_mm512_maskz_permutexvar_epi8(even, idx[s], v), bias);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(w)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(w, 1)));
        _mm512_store_si512(pb + ((2 * j + s) * 2 + h) * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
}

/* Rows [0, nr) of the int8 weight w (row stride K; rows past nr: zeros) -> the bf16 panel
 * pb and the row scales as one group, sp[0][32]. K % 32 == 0. */
inline void bf16_pack_panel_i8(const int8_t* w, const float* w_scale, int64_t nr, int64_t K,
                               uint16_t* pb, float* sp) {
  pack_panel_dwords(nr, K / 32, (uint8_t*)pb, [&](int64_t n, int64_t c) {
        /* 32 codes as words; dword j = (code 32c + 2j, code 32c + 2j + 1), sign-extended */
        const __m512i d = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + n * K + 32 * c)));
        const __m512 ev = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(d, 16), 16));
        const __m512 od = _mm512_cvtepi32_ps(_mm512_srai_epi32(d, 16));
        /* bf16 of the even codes in the low word, of the odd ones in the high word */
        return _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(ev), 16),
                               _mm512_and_si512(_mm512_castps_si512(od), _mm512_set1_epi32((int)0xFFFF0000)));
      });
  for (int n = 0; n < kBf16PanelRows; ++n) sp[n] = n < nr ? w_scale[n] : 0.0f;
}

/* Rows m..m+T-1 of the bf16 activations xb (stride K) against the panel, into out rows
 * (stride N, nr of the 32 columns from n0): acc (+ bias). */
template <int T>
inline void bf16_panel_tile(const uint16_t* xb, int64_t K, int64_t G, const uint16_t* pb,
                            const float* sp, const float* bias, int64_t n0, int64_t nr, int64_t N,
                            float* out) {
  const int64_t ng = K / G;
  __m512 acc[T][2];
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  const uint16_t* p = pb;
  for (int64_t g = 0; g < ng; ++g) {
    __m512 gacc[T][2];
    for (int t = 0; t < T; ++t) gacc[t][0] = gacc[t][1] = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 2, p += 64) {
      const __m512bh w0 = (__m512bh)_mm512_load_si512(p), w1 = (__m512bh)_mm512_load_si512(p + 32);
      for (int t = 0; t < T; ++t) {
        int32_t x2;
        memcpy(&x2, xb + t * K + k, 4);
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(x2);
        gacc[t][0] = _mm512_dpbf16_ps(gacc[t][0], w0, xv);
        gacc[t][1] = _mm512_dpbf16_ps(gacc[t][1], w1, xv);
      }
    }
    const __m512 s0 = _mm512_load_ps(sp + g * kBf16PanelRows), s1 = _mm512_load_ps(sp + g * kBf16PanelRows + 16);
    for (int t = 0; t < T; ++t) {
      acc[t][0] = _mm512_fmadd_ps(gacc[t][0], s0, acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(gacc[t][1], s1, acc[t][1]);
    }
  }
  panel_store<T>(acc, nullptr, bias, n0, nr, N, out);
}

/* The whole product for x rows that are bf16 values (the caller checked rows_are_bf16),
 * with groups of G k; pack(pb, sp, n0, nr) fills a thread's panel and its scales. Each
 * thread's area is the panel (pq::bf16_panel_bytes(K, G)), then `extra` bytes of its own
 * for pack. work: 64-byte aligned, pq::bf16_panel_work_bytes(M, K, G, n_threads) plus
 * n_threads x extra. */
template <class Pack>
inline void bf16_panel_wo(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t N,
                          int64_t G, const float* bias, float* out, void* work, int n_threads,
                          Pack pack, int64_t extra = 0) {
  uint16_t* xb = (uint16_t*)work;
  /* a thread's panel: the bf16 weights, then the scales [K/G][32] */
  const int64_t scales_at = pq::align64(kBf16PanelRows * K * 2);
  for_each_panel<kBf16PanelMaxT>(
      M, N, n_threads, (uint8_t*)work + pq::align64(M * K * 2), pq::bf16_panel_bytes(K, G) + extra,
      [&](int64_t m) { /* the high halves of the fp32 words: exact */
        for (int64_t k = 0; k < K; k += 16)
          _mm256_storeu_si256((__m256i*)(xb + m * K + k),
                              _mm512_cvtepi32_epi16(_mm512_srli_epi32(
                                  _mm512_loadu_si512(x + m * ldx + k), 16)));
      },
      [&](uint8_t* pb, int64_t n0, int64_t nr) -> const uint8_t* {
        pack((uint16_t*)pb, (float*)(pb + scales_at), n0, nr);
        return pb;
      },
      [&](const uint8_t* pb, int64_t n0, int64_t nr, int64_t m, auto T_) {
        bf16_panel_tile<decltype(T_)::value>(xb + m * K, K, G, (const uint16_t*)pb,
                                             (const float*)(pb + scales_at),
                                             bias, n0, nr, N, out + m * N);
      });
}

inline void bf16_panel_int4_wo(const float* x, int64_t M, int64_t K, int64_t ldx,
                               const uint8_t* wp, int64_t N, const float* scales,
                               const uint8_t* zeros, int64_t G, const float* bias, float* out,
                               void* work, int n_threads) {
  const int64_t ng = K / G;
  bf16_panel_wo(x, M, K, ldx, N, G, bias, out, work, n_threads,
                [&](uint16_t* pb, float* sp, int64_t n0, int64_t nr) {
                  bf16_pack_panel(wp + n0 * (K / 2), scales + n0 * ng, zeros + n0 * ng, nr, K,
                                  G, pb, sp);
                });
}

inline void bf16_panel_int8_wo(const float* x, int64_t M, int64_t K, int64_t ldx,
                               const int8_t* w, int64_t N, const float* w_scale,
                               const float* bias, float* out, void* work, int n_threads) {
  bf16_panel_wo(x, M, K, ldx, N, K, bias, out, work, n_threads,
                [&](uint16_t* pb, float* sp, int64_t n0, int64_t nr) {
                  bf16_pack_panel_i8(w + n0 * K, w_scale + n0, nr, K, pb, sp);
                });
}
#endif

}  // namespace
}  // namespace PQ_NS
#endif /* PQ_CPU_TILE_BF16_PANEL_H */
