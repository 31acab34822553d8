/* AMX-BF16 GEMM for int8 weight-only at prefill sizes (only in the build
 * compiled with -mamx-bf16 -mavx512bf16).
 *
 * Why: the fp32 FMA kernels (tile_int8.h) top out at 32 multiply-adds a cycle,
 * so at M >= 64 int8 weight-only ran at 0.6-1.0x of fp32 F.linear (oneDNN).
 * A tdpbf16ps does 16 x 16 x 32 of them; the cost is converting the weights
 * to bf16 per call, which a task amortizes over all its activation rows.
 *
 * Exactness: an int8 code (-127..127) is exact in bf16, and the activations
 * are split into bf16 terms x = x1 + x2 + x3 by truncation (the top 16 bits of
 * x, of what is left, and the rest, at most 8 significant bits), so every
 * product is exact and the sums are fp32: the result differs from the fp32
 * kernels only by summation order -- except that AMX treats bf16 subnormals
 * (|x| < 2^-126 in a term) as zero. Terms that are zero everywhere are
 * skipped: bf16 activations need one, fp16 ones two, fp32 ones three.
 *
 * Operands: A = 16 weight rows x 32 k of bf16 (the [N, K] layout as is, after
 * conversion, row stride 2K bytes); B = the activations "VNNI transposed":
 * B[r][2j + i] = term(x[m0 + j, k0 + 2r + i]), packed once per call as
 * xp[term][ceil(M/16)][K/32][16][16][2]. C[n][m] is the output transposed; the
 * epilogue transposes it back (tile_amx.h). Register blocking and tasks as in
 * tile_amx.h, with larger M blocks per task so that each weight strip is
 * converted once per task's activation rows (tile_amx_grouped.h). */
#ifndef PQ_CPU_TILE_AMX_BF16_H
#define PQ_CPU_TILE_AMX_BF16_H
#include "tile_amx_grouped.h"

#if defined(PQ_AMX) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define PQ_AMX_BF16 1

namespace PQ_NS {
namespace {

/* pq::kAmxBf16MinM (16): from there up the AMX path beats the fp32 FMA kernels:
 * at 1024 x 4096, one thread, it ran 0.98x of them at M = 8 and 1.2-1.8x at
 * M = 16 (CPU time). */
constexpr int kAmxBf16MaxTerms = 3;

/* Splits 16 floats into bf16 terms by truncation; returns the term bits as
 * 16 dwords each holding one bf16 in the low half. */
inline void split3(__m512 v, __m512i t[kAmxBf16MaxTerms]) {
  const __m512i hi_mask = _mm512_set1_epi32((int)0xFFFF0000u);
  for (int i = 0; i < kAmxBf16MaxTerms; ++i) {
    const __m512i bits = _mm512_and_si512(_mm512_castps_si512(v), hi_mask);
    t[i] = _mm512_srli_epi32(bits, 16);
    v = _mm512_sub_ps(v, _mm512_castsi512_ps(bits)); /* exact */
  }
}

/* Packs x (fp32, rows of stride ldx) into xp (see above); returns the number
 * of terms that are nonzero somewhere (>= 1), or more than kAmxBf16MaxTerms
 * when x holds an Inf or NaN. xp holds 3 * ceil(M/16)*16*K bf16. Rows past M
 * are zero. */
inline int amx_bf16_pack_x(const float* x, int64_t M, int64_t K, int64_t ldx, uint16_t* xp,
                           int n_threads) {
  const int64_t Mt = ceil_div(M, 16), KB = K / 32, tiles = Mt * KB;
  const int64_t term_stride = Mt * KB * 512; /* bf16 per term */
  int used = 1;
  const int threads = tiles < n_threads ? (int)tiles : n_threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1) \
    reduction(max : used)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t mt = tile / KB, kb = tile % KB;
    /* dword (r, j) of a tile = the bf16 pair k = k0 + 2r, 2r + 1 of row m0 + j: per term,
     * the transpose of the 16 rows' pair vectors */
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    __m512i pair[kAmxBf16MaxTerms][16];
    for (int j = 0; j < 16; ++j) {
      const int64_t m = mt * 16 + j;
      if (m < M) {
        const float* p = x + m * ldx + kb * 32;
        const __m512 va = _mm512_loadu_ps(p), vb = _mm512_loadu_ps(p + 16);
        /* Inf and NaN do not split into terms (inf - inf, truncated payloads). */
        if (_mm512_fpclass_ps_mask(va, 0x99) | _mm512_fpclass_ps_mask(vb, 0x99)) used = 99;
        __m512i a[kAmxBf16MaxTerms], b[kAmxBf16MaxTerms];
        split3(va, a);
        split3(vb, b);
        for (int i = 0; i < kAmxBf16MaxTerms; ++i) {
          const __m512i lo = _mm512_permutex2var_epi32(a[i], even, b[i]); /* k = 2r */
          const __m512i hi = _mm512_permutex2var_epi32(a[i], odd, b[i]);  /* k = 2r + 1 */
          pair[i][j] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
          if (i > 0 && _mm512_test_epi32_mask(pair[i][j], pair[i][j]) && used < i + 1)
            used = i + 1;
        }
      } else {
        for (int i = 0; i < kAmxBf16MaxTerms; ++i) pair[i][j] = _mm512_setzero_si512();
      }
    }
    for (int i = 0; i < kAmxBf16MaxTerms; ++i) {
      transpose16x16(pair[i]);
      uint16_t* dst = xp + i * term_stride + tile * 512;
      for (int r = 0; r < 16; ++r) _mm512_storeu_si512(dst + r * 32, pair[i][r]);
    }
  }
  return used;
}

/* 32 int16 lanes (|v| <= 256 here: exact in bf16) -> 32 bf16, by way of fp32. */
inline __m512i bf16_from_i16(__m512i v) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(v)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(v, 1)));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* Columns k0..k1-1 of 32 weight rows of int8 [.., K] -> bf16, row r at wb + r * ld
 * values (k1 - k0 a multiple of 32). */
inline void amx_bf16_convert_i8(const int8_t* w, int64_t K, int64_t k0, int64_t k1, uint16_t* wb,
                                int64_t ld) {
  for (int r = 0; r < 32; ++r)
    for (int64_t k = k0; k < k1; k += 32) {
      const __m512i v = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + r * K + k)));
      _mm512_storeu_si512(wb + r * ld + (k - k0), bf16_from_i16(v));
    }
}

/* Groups g0..g1-1 of 32 weight rows of packed int4 [.., K/2] -> bf16 (code - zero),
 * row r at wb + r * ld bf16 values; the group scales are applied to the fp32 sums
 * (amx_grouped_gemm). G % 32 == 0.
 *
 * By table: tab[z] holds bf16(i % 16 - z) in word i (0..31), so one vpermw turns
 * 32 codes into their bf16 values. vpermb puts byte j / 2 of the 16 packed bytes
 * in the low byte of word j and vpsrlvw shifts the odd words by 4, so word j's
 * low 4 bits are code j; vpermw reads bits 0..4 of each index and the table
 * repeats after 16 entries, so the bits above the code do not matter. 3 shuffles
 * a step where widening through fp32 took 6 (and 12 uops in all). */
inline void amx_bf16_convert_u4(const uint8_t* wp, const uint8_t* zp, int64_t K, int64_t G,
                                int64_t g0, int64_t g1, uint16_t* wb, int64_t ld) {
  const int64_t ng = K / G;
  __m512i tab[16];
  const __m512i code = _mm512_and_si512(
      _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13,
                       12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi16(15));
  for (int z = 0; z < 16; ++z) tab[z] = bf16_from_i16(_mm512_sub_epi16(code, _mm512_set1_epi16((short)z)));
  const __m512i spread = _mm512_set_epi8(
      15, 15, 15, 15, 14, 14, 14, 14, 13, 13, 13, 13, 12, 12, 12, 12, 11, 11, 11, 11, 10, 10, 10, 10,
      9, 9, 9, 9, 8, 8, 8, 8, 7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2,
      1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i odd_shift = _mm512_set1_epi32(4 << 16); /* words 2i: 0, 2i + 1: 4 */
  for (int r = 0; r < 32; ++r)
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t z = zp[r * ng + g];
      uint16_t* dst = wb + r * ld - g0 * G;
      if (z > 15) { /* nothing the quantizers write, but the op takes any uint8 zero point */
        const __m512i zv = _mm512_set1_epi16(z);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32)
          _mm512_storeu_si512(dst + k, bf16_from_i16(u4_codes_minus_zero(wp + r * (K / 2) + k / 2, zv)));
        continue;
      }
      const __m512i t = tab[z];
      for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
        const __m512i b = _mm512_castsi128_si512(
            _mm_loadu_si128((const __m128i*)(wp + r * (K / 2) + k / 2)));
        const __m512i idx = _mm512_srlv_epi16(_mm512_permutexvar_epi8(spread, b), odd_shift);
        _mm512_storeu_si512(dst + k, _mm512_permutexvar_epi16(idx, t));
      }
    }
}

/* As amx_bf16_convert_u4, from the int4 panel layout (pyquant/panels.py): panel holds the
 * 32 rows' codes as [K/8][2][16][4] bytes, byte c of (j, h, i) = code[16h + i][8j + c] |
 * code[16h + i][8j + 4 + c] << 4; pz the panel's zero points [K/G][32]. Per half panel and
 * 32 k (4 j), four 64-byte loads hold the 16 rows' dwords; a 4 x 4 dword transpose in each
 * 128-bit lane gives every row its 4 dwords in one lane, and then, as from the rows, one
 * vpermb (the row's lane, bytes to words in k order), one vpsrlvw (high nibbles down) and one
 * vpermw by table make its 32 bf16 values. The rows' converter and this one write the same
 * strip, so the products are those of the canonical layout, bit for bit. */
inline void amx_bf16_convert_u4_panels(const uint8_t* panel, const uint8_t* pz, int64_t K,
                                       int64_t G, int64_t g0, int64_t g1, uint16_t* wb,
                                       int64_t ld) {
  __m512i tab[16];
  const __m512i code = _mm512_and_si512(
      _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13,
                       12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi16(15));
  for (int z = 0; z < 16; ++z)
    tab[z] = bf16_from_i16(_mm512_sub_epi16(code, _mm512_set1_epi16((short)z)));
  /* word w = k - k0 (both of its bytes): byte 16 l + 4 (w / 8) + w % 4 of lane l; the words
   * with w % 8 >= 4 take the high nibble */
  alignas(64) uint8_t spread[4][64];
  alignas(64) uint16_t shift[32];
  for (int w = 0; w < 32; ++w) {
    for (int l = 0; l < 4; ++l)
      spread[l][2 * w] = spread[l][2 * w + 1] = (uint8_t)(16 * l + 4 * (w / 8) + w % 4);
    shift[w] = w % 8 >= 4 ? 4 : 0;
  }
  __m512i sp[4];
  for (int l = 0; l < 4; ++l) sp[l] = _mm512_load_si512(spread[l]);
  const __m512i sh = _mm512_load_si512(shift);
  const __m512i low4 = _mm512_set1_epi16(15);
  for (int h = 0; h < 2; ++h)
    for (int64_t g = g0; g < g1; ++g) {
      /* the half's 16 zero points of the group: their tables, once */
      const uint8_t* zg = pz + g * 32 + 16 * h;
      bool small = true;
      for (int i = 0; i < 16; ++i) small &= zg[i] < 16;
      __m512i t16[16];
      if (small)
        for (int i = 0; i < 16; ++i) t16[i] = tab[zg[i]];
      uint16_t* dst = wb + 16 * h * ld - g0 * G;
      for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
        /* u[q], lane l: the 4 dwords (j = k/8 .. k/8 + 3) of row 4 l + q of the half */
        __m512i u[4];
        panel_half_rows(panel + (k / 8 * 2 + h) * 64, u);
        for (int q = 0; q < 4; ++q)
          for (int l = 0; l < 4; ++l) {
            const int i = 4 * l + q;
            const __m512i idx = _mm512_srlv_epi16(_mm512_permutexvar_epi8(sp[l], u[q]), sh);
            if (small)
              _mm512_storeu_si512(dst + i * ld + k, _mm512_permutexvar_epi16(idx, t16[i]));
            else /* nothing the quantizers write, but the op takes any uint8 zero point */
              _mm512_storeu_si512(dst + i * ld + k,
                                  bf16_from_i16(_mm512_sub_epi16(_mm512_and_si512(idx, low4),
                                                                 _mm512_set1_epi16(zg[i]))));
          }
      }
    }
}

/* out = sum (* row_scale, where given) + bias: int8's order, dot * scale + bias */
template <class Out>
struct AmxStoreRowScaled {
  Out* out;
  int64_t N;
  const float* row_scale;
  const float* bias;
  inline void operator()(int64_t m, int64_t n0, __m512i v) const {
    __m512 y = _mm512_castsi512_ps(v);
    if (row_scale) y = _mm512_mul_ps(y, _mm512_loadu_ps(row_scale + n0));
    if (bias) y = _mm512_add_ps(y, _mm512_loadu_ps(bias + n0));
    store16(out + m * N + n0, y);
  }
};
using AmxStoreF32 = AmxStoreRowScaled<float>;
/* the bf16-in, bf16-out calls (store16) */
using AmxStoreBf16 = AmxStoreRowScaled<uint16_t>;

struct AmxBf16Op {
  static constexpr bool kInt = false;
  /* tile numbers are literals: GCC's tile intrinsics paste them into the asm */
  static void dp046() { _tile_dpbf16ps(0, 4, 6); }
  static void dp147() { _tile_dpbf16ps(1, 4, 7); }
  static void dp256() { _tile_dpbf16ps(2, 5, 6); }
  static void dp357() { _tile_dpbf16ps(3, 5, 7); }
};

/* Weight-only GEMM on AMX-BF16: out[m, n] = sum_g scales[n, g] * sum_{k in g}
 * x[m, k] * wb[n, k] + bias[n], where convert(n0, g0, g1, wb, ld) writes groups
 * g0..g1-1 of 32 weight rows from n0 as bf16, row stride ld values (exact integer
 * values); scales_panels: scales in the panel layout. int8: scales null and row_scale the
 * per-channel w_scale, so out =
 * (sum_g sum_{k in g} ..) * w_scale + bias, the order pq.h says.
 * Returns false (nothing done) when x holds Inf/NaN. The caller checked
 * pq::amx_bf16_applies; work: 64-byte aligned pq::amx_bf16_work_bytes(M, K, G,
 * n_threads) (the packed terms, then the threads' strips). */
/* bf16 rows x -> the one-term tiles of amx_bf16_pack_x, which a bf16 row's fp32 values
 * split into (the pairs of a row are its 32-bit words as they lie in memory): the same bytes
 * without the fp32 copy. False (xp incomplete) when x holds an Inf or NaN, as there. */
inline bool amx_bf16_pack_x_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx,
                                 uint16_t* xp, int n_threads) {
  const __m512i expo = _mm512_set1_epi16(0x7F80); /* all ones: an Inf or NaN */
  return amx_pack_tiles((const uint8_t*)x, M, K / 32, 2 * ldx, (uint8_t*)xp, n_threads,
                        [&](__m512i v) {
                          return _mm512_cmpeq_epi16_mask(_mm512_and_si512(v, expo), expo) != 0;
                        });
}

template <class Convert>
bool amx_bf16_wo(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t N,
                 const float* scales, int64_t G, const float* row_scale, const float* bias,
                 float* out, int n_threads, void* work, Convert convert,
                 bool scales_panels = false) {
  const int64_t term_stride = ceil_div(M, 16) * (K / 32) * 512; /* bf16 */
  uint16_t* xp = (uint16_t*)work;
  const int terms = amx_bf16_pack_x(x, M, K, ldx, xp, n_threads);
  if (terms > kAmxBf16MaxTerms) /* Inf/NaN: the fp32 kernels propagate them as fp32 does */
    return false;
  amx_grouped_gemm<AmxBf16Op>(
      M, N, 2 * K, 2 * G, (const uint8_t*)xp, terms, 2 * term_stride, scales,
      (uint8_t*)work + pq::amx_bf16_terms_bytes(M, K),
      [&](int64_t n0, int64_t g0, int64_t g1, uint8_t* wb, int64_t ld) {
        convert(n0, g0, g1, (uint16_t*)wb, ld / 2);
      },
      AmxStoreF32{out, N, row_scale, bias}, n_threads, scales_panels);
  return true;
}

/* amx_bf16_wo for bf16 rows x into bf16 outputs (AmxStoreBf16): one term, packed from the
 * rows as they are. False, out untouched, when x holds an Inf or NaN. */
template <class Convert>
bool amx_bf16_wo_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, int64_t N,
                      const float* scales, int64_t G, const float* row_scale, const float* bias,
                      uint16_t* out, int n_threads, void* work, Convert convert,
                      bool scales_panels = false) {
  uint16_t* xp = (uint16_t*)work;
  if (!amx_bf16_pack_x_bf16(x, M, K, ldx, xp, n_threads)) return false;
  amx_grouped_gemm<AmxBf16Op>(
      M, N, 2 * K, 2 * G, (const uint8_t*)xp, 1, 0, scales,
      (uint8_t*)work + pq::amx_bf16_terms_bytes(M, K),
      [&](int64_t n0, int64_t g0, int64_t g1, uint8_t* wb, int64_t ld) {
        convert(n0, g0, g1, (uint16_t*)wb, ld / 2);
      },
      AmxStoreBf16{out, N, row_scale, bias}, n_threads, scales_panels);
  return true;
}

}  // namespace
}  // namespace PQ_NS
#endif
#endif /* PQ_CPU_TILE_AMX_BF16_H */
