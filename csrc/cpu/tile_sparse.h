/* Sparse micro-kernels (2:4 and unstructured weights against fp32 rows of x),
 * compiled once per ISA like the dense tiles (see common.h). Layouts: pq.h and
 * pyquant/sparse_formats.py.
 *
 * 2:4 GEMV idea: a row's kept values are contiguous, so they stream like a
 * dense row of half the length; the matching x values are gathered in
 * registers from the x chunk they lie in (kept values j..j+15 come from 32
 * consecutive columns, one vpermt2ps over two zmm of x, its index built from
 * one 32-bit word of meta with a shift and a ternary-logic op). Nothing is
 * precomputed beyond what the format holds, and stored bf16/fp16/int8/int4
 * values are widened in registers. */
#ifndef PQ_CPU_TILE_SPARSE_H
#define PQ_CPU_TILE_SPARSE_H
#include <string.h>
#include "common.h"
#include "unstructured_lut.h"

namespace PQ_NS {
namespace {

enum ValueKind { kF32 = 0, kBF16 = 1, kF16 = 2, kI8 = 3, kI4 = 4 };

inline float bits_to_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

/* IEEE half to float, exactly (every half is a float); scalar paths only. */
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13));
  if (exp == 0) { /* zero or subnormal: man * 2^-24, exact in float */
    const float f = (float)man * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}
inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}
/* Up to 8 bytes, zero-filled: never reads past p + n. */
inline uint64_t load_tail_u64(const uint8_t* p, int64_t n) {
  uint64_t v = 0;
  memcpy(&v, p, (size_t)(n < 8 ? n : 8));
  return v;
}

/* The kept values of a weight: row n's value j as float (int8: the integer,
 * its row scale is applied to the dot product; int4: (code - zero) * scale of
 * its group, as the reference dequantizes). `ld` is values per row. */
template <int Kind>
struct Vals {
  const void* p;
  int64_t ld;
  const float* scales = nullptr; /* int4 */
  const uint8_t* zeros = nullptr;
  int64_t G = 0, ng = 0;

  float at(int64_t n, int64_t j) const {
    if constexpr (Kind == kF32) return ((const float*)p)[n * ld + j];
    if constexpr (Kind == kBF16) return bf16_to_f32(((const uint16_t*)p)[n * ld + j]);
    if constexpr (Kind == kF16) return f16_to_f32(((const uint16_t*)p)[n * ld + j]);
    if constexpr (Kind == kI8) return (float)((const int8_t*)p)[n * ld + j];
    if constexpr (Kind == kI4) {
      const uint8_t b = ((const uint8_t*)p)[n * (ld / 2) + j / 2];
      const int code = (j & 1) ? b >> 4 : b & 15;
      const int64_t g = n * ng + j / G;
      return (float)(code - (int)zeros[g]) * scales[g];
    }
    return 0.0f;
  }

  /* Values of the whole row are at flat index i (unstructured: values[i]). */
  float flat(int64_t i) const { return at(0, i); }

  /* The address of row n's value j (for prefetching; int4: its byte). */
  const char* addr(int64_t n, int64_t j) const {
    constexpr int64_t bits = Kind == kF32 ? 32 : (Kind == kBF16 || Kind == kF16) ? 16
                           : Kind == kI8 ? 8 : 4;
    return (const char*)p + (n * ld + j) * bits / 8;
  }
};

/* Column of kept value j of a 2:4 row with meta bytes `meta`. */
inline int64_t col24(const uint8_t* meta, int64_t j) {
  return 4 * (j >> 1) + ((meta[j >> 2] >> (2 * (j & 3))) & 3);
}

/* acc[r][t] += sum over kept j in [j0, j1) of x[t, col] * value(n + r, j). */
template <int R, int T, class V>
inline void dot24_scalar(const V& vals, int64_t n, const uint8_t* meta, int64_t ldm,
                         const float* x, int64_t ldx, int64_t j0, int64_t j1, float acc[R][T]) {
  for (int64_t j = j0; j < j1; ++j)
    for (int r = 0; r < R; ++r) {
      const int64_t c = col24(meta + (n + r) * ldm, j);
      const float w = vals.at(n + r, j);
      for (int t = 0; t < T; ++t) acc[r][t] += x[t * ldx + c] * w;
    }
}

#if defined(PQ_SIMD_AVX512)
constexpr int64_t kChunk24 = 16; /* kept values per SIMD step */

/* 16 kept values j..j+15 of row n as fp32 lanes, in natural order; `rem` < 16
 * masks a tail (never reads past the row). Not used for int4 (see dot24). */
template <int Kind>
inline __m512 load16(const Vals<Kind>& v, int64_t n, int64_t j, __mmask16 m, bool full) {
  if constexpr (Kind == kF32) {
    const float* p = (const float*)v.p + n * v.ld + j;
    return full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (Kind == kBF16 || Kind == kF16) {
    const uint16_t* p = (const uint16_t*)v.p + n * v.ld + j;
    const __m256i h = full ? _mm256_loadu_si256((const __m256i*)p) : _mm256_maskz_loadu_epi16(m, p);
    if constexpr (Kind == kF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    const int8_t* p = (const int8_t*)v.p + n * v.ld + j;
    const __m128i b = full ? _mm_loadu_si128((const __m128i*)p) : _mm_maskz_loadu_epi8(m, p);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  }
}

/* dot[r][t] = sum_j x[t, col(n+r, j)] * value(n+r, j) over the whole row.
 *
 * Lane L of a step holds kept value j + pi(L). For float/int8 pi is the
 * identity. For int4 the 8 code bytes of a step are broadcast as one qword, so
 * even lanes see bytes 0..3 and odd lanes bytes 4..7; lane 2i then takes code
 * i and lane 2i+1 code 8+i (pi(2i) = i, pi(2i+1) = 8+i), decoded with a
 * vpermps lookup into the group's 16-entry table (code - zero) * scale. The
 * meta index uses the same pi, so x is gathered in the same lane order, and no
 * instruction is spent putting the codes back in order. Every kept value of a
 * step lies in the 32 columns 2j..2j+31 (8 groups of 4). */
template <int R, int T, int Kind>
inline void dot24(const Vals<Kind>& vals, int64_t n, const uint8_t* meta, int64_t ldm,
                  const float* x, int64_t ldx, int64_t K, float dot[R][T]) {
  const int64_t H = K / 2;
  constexpr bool kPi = Kind == kI4;
  const __m512i shift = kPi ? _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
                            : _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = kPi ? _mm512_setr_epi32(0, 16, 0, 16, 4, 20, 4, 20, 8, 24, 8, 24, 12, 28, 12, 28)
                           : _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  __m512 tab[R]; /* int4: the current group's decoded values per code */
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i nib = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);

  /* Inlined twice: full steps, then one masked tail (float/int8 only: int4
   * needs (K/2) % G == 0 with G % 16 == 0, so it has no tail). In the tail the
   * masked-off lanes load value 0 and x 0 (their columns are >= K). */
  /* int4: the next kept index that starts a group. Compared, not j % G: a
   * 64-bit division per step cost more than the rest of the step. */
  int64_t next_group = 0;
  if constexpr (Kind == kI4) prefetch_next_groups<R>(vals.scales + n * vals.ng, vals.zeros + n * vals.ng, vals.ng);
  auto step = [&](int64_t j, bool full) PQ_ALWAYS_INLINE {
    if constexpr (Kind == kI4) {
      if (j == next_group) {
        for (int r = 0; r < R; ++r) {
          const int64_t g = (n + r) * vals.ng + j / vals.G;
          tab[r] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps((float)vals.zeros[g])),
                                 _mm512_set1_ps(vals.scales[g]));
        }
        next_group += vals.G;
      }
    }
    const int64_t rem = H - j, cols = 2 * rem;
    const __mmask16 mv = full ? 0xFFFF : (__mmask16)((1u << rem) - 1);
    const __mmask16 mlo = full || cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
    const __mmask16 mhi = full ? 0xFFFF : cols > 16 ? (__mmask16)((1u << (cols - 16)) - 1) : 0;
    __m512 xlo[T], xhi[T];
    for (int t = 0; t < T; ++t) {
      const float* p = x + t * ldx + 2 * j;
      xlo[t] = full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mlo, p);
      xhi[t] = full ? _mm512_loadu_ps(p + 16) : _mm512_maskz_loadu_ps(mhi, p + 16);
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* mp = meta + (n + r) * ldm + j / 4;
      /* the next tile's rows, as in the dense kernels (common.h) */
      PQ_PREFETCH_NEXT_TILE(vals.addr(n + r + R, j));
      PQ_PREFETCH_NEXT_TILE(mp + R * ldm);
      const uint32_t m32 = full ? load_u32(mp) : (uint32_t)load_tail_u64(mp, ldm - j / 4);
      const __m512i idx = _mm512_ternarylogic_epi32(
          _mm512_srlv_epi32(_mm512_set1_epi32((int)m32), shift), three, base, 0xEA); /* (a&b)|c */
      __m512 w;
      if constexpr (Kind == kI4) {
        const uint64_t q = load_u64((const uint8_t*)vals.p + (n + r) * (vals.ld / 2) + j / 2);
        /* vpermps reads only the low 4 bits of each index: the shifted code. */
        w = _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64((long long)q), nib), tab[r]);
      } else {
        w = load16<Kind>(vals, n + r, j, mv, full);
      }
      for (int t = 0; t < T; ++t)
        acc[r][t] = _mm512_fmadd_ps(_mm512_permutex2var_ps(xlo[t], idx, xhi[t]), w, acc[r][t]);
    }
  };
  int64_t j = 0;
  for (; j + kChunk24 <= H; j += kChunk24) step(j, true);
  if (j < H) step(j, false);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) dot[r][t] = _mm512_reduce_add_ps(acc[r][t]);
}

#if defined(__AVX512VBMI__)
/* 2:4 + int8 at M = 1 (the AVX512-BF16 and AMX builds, which have VBMI): x in 24-bit
 * fixed point (three int8 terms, split_row_fixed24), each term biased to u8
 * (x + 128) and padded to whole 128-column steps by the caller. A step takes
 * 64 kept values (128 columns): their columns come from 16 meta bytes by one
 * byte spread (vpermb) and one bit-field extract per byte (vpmultishiftqb),
 * then per term one vpermi2b gathers the 64 x bytes and one vpdpbusd
 * multiplies them with the values. The u8 bias returns as 128 * sum(values),
 * summed by a vpdpbusd against ones. Per 80 bytes of weight (64 values + 16
 * meta) about 12 vector ops, where the float kernel (dot24) needs ~28. Exact
 * int32 sums: dot[r][t] = sum_j xterm_t[col(j)] * v[r, j]. Runs where K/2 % 32 != 0;
 * dot24_i8_fx2 (two rows a register) takes the others. */
/* The 128 columns of x (three u8 term rows of Kp bytes) that kept values j..j+63 can
 * index: the two tables of each term's vpermi2b. */
inline void load_fx_step(const uint8_t* xu, int64_t Kp, int64_t j, __m512i xlo[3], __m512i xhi[3]) {
  for (int t = 0; t < 3; ++t) {
    const uint8_t* p = xu + t * Kp + 2 * j;
    xlo[t] = _mm512_load_si512(p);
    xhi[t] = _mm512_load_si512(p + 64);
  }
}

template <int R>
inline void dot24_i8_fx(const int8_t* v, int64_t ldv, const uint8_t* meta, int64_t ldm,
                        const uint8_t* xu, int64_t Kp, int64_t H, int32_t dot[R][3]) {
  alignas(64) static const uint8_t kSpread[64] = {
      0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5,
      6, 6, 6, 6, 7, 7, 7, 7, 8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11,
      12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15};
  alignas(64) static const uint8_t kCtrl[8] = {0, 10, 20, 30, 32, 42, 52, 62}; /* 8(j%8)+2(j%4) */
  alignas(64) static const uint8_t kBase[64] = {
      0,   0,   4,   4,   8,   8,   12,  12,  16,  16,  20,  20,  24,  24,  28,  28,
      32,  32,  36,  36,  40,  40,  44,  44,  48,  48,  52,  52,  56,  56,  60,  60,
      64,  64,  68,  68,  72,  72,  76,  76,  80,  80,  84,  84,  88,  88,  92,  92,
      96,  96,  100, 100, 104, 104, 108, 108, 112, 112, 116, 116, 120, 120, 124, 124};
  const __m512i spread = _mm512_load_si512(kSpread), base = _mm512_load_si512(kBase);
  const __m512i ctrl = _mm512_set1_epi64(*(const long long*)kCtrl);
  const __m512i three = _mm512_set1_epi8(3), ones = _mm512_set1_epi8(1);
  __m512i acc[R][3], wsum[R];
  for (int r = 0; r < R; ++r) {
    wsum[r] = _mm512_setzero_si512();
    for (int t = 0; t < 3; ++t) acc[r][t] = _mm512_setzero_si512();
  }
  for (int64_t j = 0; j < H; j += 64) {
    const int64_t rem = H - j;
    const __mmask64 mv = rem >= 64 ? ~0ULL : (1ULL << rem) - 1;
    const __mmask16 mm = rem >= 64 ? (__mmask16)0xFFFF : (__mmask16)((1u << ((rem + 3) / 4)) - 1);
    __m512i xlo[3], xhi[3];
    load_fx_step(xu, Kp, j, xlo, xhi);
    for (int r = 0; r < R; ++r) {
      const uint8_t* mp = meta + r * ldm + j / 4;
      PQ_PREFETCH_NEXT_TILE(v + (r + R) * ldv + j);
      PQ_PREFETCH_NEXT_TILE(mp + R * ldm);
      const __m512i m16 = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(mm, mp));
      const __m512i pos = _mm512_and_si512(
          _mm512_multishift_epi64_epi8(ctrl, _mm512_permutexvar_epi8(spread, m16)), three);
      const __m512i idx = _mm512_add_epi8(pos, base);
      const __m512i w = _mm512_maskz_loadu_epi8(mv, v + r * ldv + j);
      wsum[r] = _mm512_dpbusd_epi32(wsum[r], ones, w);
      for (int t = 0; t < 3; ++t)
        acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], _mm512_permutex2var_epi8(xlo[t], idx, xhi[t]), w);
    }
  }
  for (int r = 0; r < R; ++r) {
    const uint32_t bias = 128u * (uint32_t)_mm512_reduce_add_epi32(wsum[r]);
    for (int t = 0; t < 3; ++t) /* unsigned: the bias removal wraps, not overflows */
      dot[r][t] = (int32_t)((uint32_t)_mm512_reduce_add_epi32(acc[r][t]) - bias);
  }
}

/* The R rows of a tile taken two a register by the *_fx2 kernels: pair p is rows a[p]
 * and b[p]; an odd last row is paired with itself (its copy is computed and dropped). */
template <int R>
struct RowPairs {
  static constexpr int P = (R + 1) / 2;
  int64_t a[P], b[P];
  RowPairs() {
    for (int p = 0; p < P; ++p) a[p] = 2 * p, b[p] = 2 * p + 1 < R ? 2 * p + 1 : 2 * p;
  }
};

/* The gather indices of one step of a row pair: each row's 8 meta bytes (32 kept
 * values) broadcast to its own qwords (`b_qwords`: row b's), then in each byte lane the
 * 2-bit position at bit offset ctrl of its qword, or'ed into the lane's group column
 * `base` (whose low 2 bits are 0). */
inline __m512i pair_index(const uint8_t* ma, const uint8_t* mb, __mmask8 b_qwords, __m512i ctrl,
                          __m512i base) {
  const __m512i mq = _mm512_mask_set1_epi64(_mm512_set1_epi64((long long)load_u64(ma)), b_qwords,
                                            (long long)load_u64(mb));
  return _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(ctrl, mq), _mm512_set1_epi8(3), base,
                                   0xEA); /* (a & b) | c */
}

/* 2:4 + int8 at M = 1, two weight rows a register (as dot24_i4_fx2 below): bytes 0-31 hold
 * row a's kept values j..j+31, bytes 32-63 row b's; each row's 8 meta bytes fill
 * its four qwords, so one multishift finds every position and one vpermb per term
 * gathers x from the step's 64 columns. About 11 vector uops per 64 row values,
 * where dot24_i8_fx spends 17. Exact int32 sums as dot24_i8_fx. H % 32 == 0. */
template <int R>
inline void dot24_i8_fx2(const int8_t* v, int64_t ldv, const uint8_t* meta, int64_t ldm,
                         const uint8_t* xu, int64_t Kp, int64_t H, int32_t dot[R][3]) {
  constexpr int P = RowPairs<R>::P;
  constexpr int64_t kStep = 32;
  /* lane L is kept value k = L % 32 of its row: bit offset 2k of the row's meta, column
   * 4 * (k / 2) + position */
  alignas(64) static const uint8_t kCtrl[64] = {0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30,32,34,36,38,40,42,44,46,48,50,52,54,56,58,60,62,0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30,32,34,36,38,40,42,44,46,48,50,52,54,56,58,60,62};
  alignas(64) static const uint8_t kBase[64] = {0,0,4,4,8,8,12,12,16,16,20,20,24,24,28,28,32,32,36,36,40,40,44,44,48,48,52,52,56,56,60,60,0,0,4,4,8,8,12,12,16,16,20,20,24,24,28,28,32,32,36,36,40,40,44,44,48,48,52,52,56,56,60,60};
  const __m512i ctrl = _mm512_load_si512(kCtrl), base = _mm512_load_si512(kBase);
  const __m512i ones = _mm512_set1_epi8(1);
  const RowPairs<R> rows;
  __m512i acc[P][3], wsum[P];
  for (int p = 0; p < P; ++p) {
    wsum[p] = _mm512_setzero_si512();
    for (int t = 0; t < 3; ++t) acc[p][t] = _mm512_setzero_si512();
  }
  for (int64_t j0 = 0; j0 < H; j0 += 4 * kStep) {
    /* the next tile's rows, once per 128 values (two lines of each row's values, one of
     * its meta), as dot24_i4_fx2 */
    for (int r = 0; r < R; ++r) {
      PQ_PREFETCH_NEXT_TILE(v + (r + R) * ldv + j0);
      PQ_PREFETCH_NEXT_TILE(v + (r + R) * ldv + j0 + 64);
      PQ_PREFETCH_NEXT_TILE(meta + (r + R) * ldm + j0 / 4);
    }
    const int64_t j1 = j0 + 4 * kStep < H ? j0 + 4 * kStep : H;
    for (int64_t j = j0; j < j1; j += kStep) {
      __m512i xt[3];
      for (int t = 0; t < 3; ++t) xt[t] = _mm512_load_si512(xu + t * Kp + 2 * j);
      for (int p = 0; p < P; ++p) {
        const __m512i idx = pair_index(meta + rows.a[p] * ldm + j / 4,
                                       meta + rows.b[p] * ldm + j / 4, 0xF0, ctrl, base);
        const __m512i w = _mm512_mask_broadcast_i64x4(
            _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(v + rows.a[p] * ldv + j))),
            0xF0, _mm256_loadu_si256((const __m256i*)(v + rows.b[p] * ldv + j)));
        wsum[p] = _mm512_dpbusd_epi32(wsum[p], ones, w);
        for (int t = 0; t < 3; ++t)
          acc[p][t] = _mm512_dpbusd_epi32(acc[p][t], _mm512_permutexvar_epi8(idx, xt[t]), w);
      }
    }
  }
  /* row `r`'s sums from the dword lanes `m` of pair p */
  auto reduce = [&](int p, int64_t r, __mmask16 m) {
    const uint32_t bias = 128u * (uint32_t)_mm512_mask_reduce_add_epi32(m, wsum[p]);
    for (int t = 0; t < 3; ++t) /* unsigned: the bias removal wraps, not overflows */
      dot[r][t] = (int32_t)((uint32_t)_mm512_mask_reduce_add_epi32(m, acc[p][t]) - bias);
  };
  for (int p = 0; p < P; ++p) {
    reduce(p, rows.a[p], 0x00FF);
    if (rows.b[p] != rows.a[p]) reduce(p, rows.b[p], 0xFF00);
  }
}

/* 2:4 + int4 at M = 1, G % 32 == 0, two weight rows a register. Per step each
 * row of a pair gives 32 kept values (64 columns, one zmm of each x term), so
 * the x gather is one vpermb (1 uop) per term, where a 128-column vpermi2b (one
 * row, 64 values) takes 3; and each row's 8 meta bytes fill their own qword lanes, so
 * a multishift finds every position without a byte spread. Byte lanes: 0-15
 * row a, 16-31 row b, 32-47 row a, 48-63 row b; the low 256 bits hold the even
 * kept values (low nibbles of the 16 code bytes), the high 256 the odd ones.
 * The three terms' sums are combined in int32 (hi << 16 + mid << 8 + lo, minus
 * 2^23 sum(code - zero): the terms are the digits of X + 2^23, split_row_fixed24's
 * kOffsetDigits) with wrapping arithmetic, exact because the true sum of at most 4
 * steps is below 2^31 (16 products a dword lane, |X| <= 8323072, |code - zero| <= 15:
 * 16 * 8323072 * 15 < 2^31);
 * one convert and one FMA by the two rows' scales then follow, per group or
 * per 4 steps. About 14 vector uops per 64 row values, where one row a
 * register took ~20 plus a per-group epilogue per row (1.2-1.3x slower from
 * memory on two threads). The weights are signed (code - zero, -15..15) and x
 * the u8 digits of X + 2^23. dot[r] is in units of the lo term's scale. */
template <int R>
inline void dot24_i4_fx2(const uint8_t* packed, int64_t ldp, const uint8_t* meta, int64_t ldm,
                         const float* sc, const uint8_t* zp, int64_t ng, int64_t G,
                         const uint8_t* xu, int64_t Kp, float dot[R]) {
  constexpr int P = RowPairs<R>::P;
  constexpr int64_t kStep = 32, kMaxSteps = 4;
  /* bit offset of lane L's position in its row's 64 meta bits: kept 2i, or 2i + 1 in the
   * high half, i = L % 16; and its group of 4's first column, 4i */
  alignas(64) static const uint8_t kCtrl[64] = {0,4,8,12,16,20,24,28,32,36,40,44,48,52,56,60,0,4,8,12,16,20,24,28,32,36,40,44,48,52,56,60,2,6,10,14,18,22,26,30,34,38,42,46,50,54,58,62,2,6,10,14,18,22,26,30,34,38,42,46,50,54,58,62};
  alignas(64) static const uint8_t kBase[64] = {0,4,8,12,16,20,24,28,32,36,40,44,48,52,56,60,0,4,8,12,16,20,24,28,32,36,40,44,48,52,56,60,0,4,8,12,16,20,24,28,32,36,40,44,48,52,56,60,0,4,8,12,16,20,24,28,32,36,40,44,48,52,56,60};
  const __m512i ctrl = _mm512_load_si512(kCtrl), base = _mm512_load_si512(kBase);
  const __m512i ones = _mm512_set1_epi8(1), nib = _mm512_set1_epi8(0x0F);
  const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  constexpr __mmask64 kRowB = 0xFFFF0000FFFF0000ull;
  prefetch_next_groups<R>(sc, zp, ng);
  const RowPairs<R> rows;
  __m512 facc[P];
  for (int p = 0; p < P; ++p) facc[p] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512i zb[P];
    for (int p = 0; p < P; ++p)
      zb[p] = _mm512_mask_set1_epi8(_mm512_set1_epi8((char)zp[rows.a[p] * ng + g]), kRowB,
                                    (char)zp[rows.b[p] * ng + g]);
    for (int64_t j0 = g * G; j0 < (g + 1) * G; j0 += kMaxSteps * kStep) {
      const int64_t j1 = j0 + kMaxSteps * kStep < (g + 1) * G ? j0 + kMaxSteps * kStep : (g + 1) * G;
      __m512i acc[P][3], wsum[P];
      for (int p = 0; p < P; ++p) {
        wsum[p] = _mm512_setzero_si512();
        for (int t = 0; t < 3; ++t) acc[p][t] = _mm512_setzero_si512();
      }
      /* the next tile's rows, as in the dense kernels (common.h), once per block of at
       * most 4 steps: its 64 code bytes and 32 meta bytes of each row (a prefetch per
       * step, 4 to a line, cost ~30% in L2) */
      for (int r = 0; r < R; ++r) {
        PQ_PREFETCH_NEXT_TILE(packed + (r + R) * ldp + j0 / 2);
        PQ_PREFETCH_NEXT_TILE(meta + (r + R) * ldm + j0 / 4);
      }
      for (int64_t j = j0; j < j1; j += kStep) {
        __m512i xt[3];
        for (int t = 0; t < 3; ++t) xt[t] = _mm512_load_si512(xu + t * Kp + 2 * j);
        for (int p = 0; p < P; ++p) {
          const uint8_t* ca = packed + rows.a[p] * ldp + j / 2;
          const uint8_t* cb = packed + rows.b[p] * ldp + j / 2;
          const __m512i idx = pair_index(meta + rows.a[p] * ldm + j / 4,
                                         meta + rows.b[p] * ldm + j / 4, 0xCC, ctrl, base);
          const __m512i c = _mm512_mask_broadcast_i32x4(
              _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)ca)), 0xF0F0,
              _mm_loadu_si128((const __m128i*)cb));
          const __m512i w = _mm512_sub_epi8(_mm512_and_si512(_mm512_srlv_epi16(c, shift), nib), zb[p]);
          wsum[p] = _mm512_dpbusd_epi32(wsum[p], ones, w);
          for (int t = 0; t < 3; ++t)
            acc[p][t] = _mm512_dpbusd_epi32(acc[p][t], _mm512_permutexvar_epi8(idx, xt[t]), w);
        }
      }
      for (int p = 0; p < P; ++p) { /* scales read here: registers are short in the loop */
        const __m512 sv = _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(sc[rows.a[p] * ng + g]),
                                               _mm512_set1_ps(sc[rows.b[p] * ng + g]));
        const __m512i s = _mm512_sub_epi32(
            _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(acc[p][0], 16), _mm512_slli_epi32(acc[p][1], 8)),
                             acc[p][2]),
            _mm512_slli_epi32(wsum[p], 23)); /* 2^23 sum(code - zero) */
        facc[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sv, facc[p]);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    dot[rows.a[p]] = _mm512_mask_reduce_add_ps(0x0F0F, facc[p]);
    if (rows.b[p] != rows.a[p]) dot[rows.b[p]] = _mm512_mask_reduce_add_ps(0xF0F0, facc[p]);
  }
}
#endif

#elif defined(PQ_SIMD_AVX2)
constexpr int64_t kChunk24 = 8;

/* int4: zero and scale are the group's, broadcast (kept per row by dot24). */
template <int Kind>
inline __m256 load8(const Vals<Kind>& v, int64_t n, int64_t j, __m256 zero, __m256 scale) {
  if constexpr (Kind == kF32) {
    return _mm256_loadu_ps((const float*)v.p + n * v.ld + j);
  } else if constexpr (Kind == kBF16 || Kind == kF16) {
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)v.p + n * v.ld + j));
    if constexpr (Kind == kF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (Kind == kI8) {
    const __m128i b = _mm_loadl_epi64((const __m128i*)((const int8_t*)v.p + n * v.ld + j));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  } else { /* int4, G % 8 == 0: the 8 values share one group */
    const uint32_t q = load_u32((const uint8_t*)v.p + n * (v.ld / 2) + j / 2);
    const __m256i c = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32((int)q), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
        _mm256_set1_epi32(15));
    return _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c), zero), scale);
  }
}

/* kGather24[b]: for a meta byte b (two groups of 4 columns, four 2-bit positions), the
 * columns (0..7) of its four kept values, one per 32-bit lane: the vpermps control that
 * gathers their x from the byte's 8 columns. */
struct Gather24Table {
  alignas(16) int32_t c[256][4];
  constexpr Gather24Table() : c() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 4; ++i) c[b][i] = 4 * (i / 2) + ((b >> (2 * i)) & 3);
  }
};
alignas(64) constexpr Gather24Table kGather24{};

/* As the AVX512 dot24, 8 kept values (16 columns) a step: the first four kept values
 * lie in the step's first 8 columns and the last four in the next 8, so one vpermps
 * over each half of x, controlled by the two meta bytes' table rows (kGather24), and a
 * blend by lane put every kept value's x in its lane. It computed each control from the
 * meta bits (a broadcast, a variable shift, a mask, an add) and blended on its bit 3: 6
 * vector uops more per row and step. The tail (< 8 kept values) runs the scalar loop. */
template <int R, int T, int Kind>
inline void dot24(const Vals<Kind>& vals, int64_t n, const uint8_t* meta, int64_t ldm,
                  const float* x, int64_t ldx, int64_t K, float dot[R][T]) {
  const int64_t H = K / 2;
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  __m256 zero[R], scale[R]; /* int4: the current group's, per row */
  for (int r = 0; r < R; ++r) zero[r] = scale[r] = _mm256_setzero_ps();
  int64_t next_group = 0;
  int64_t j = 0;
  /* the next tile's rows, as in the dense kernels (common.h): a line of values every
   * kPfValues kept values, a line of meta every 256. M = 1, 2 threads, the AVX2 path
   * forced on a Xeon, Llama-2-7B shapes, in-process A/B both orders: fp32 1.03-1.07x,
   * bf16 1.06-1.15x (one set 0.87x on 4096x4096, 1.13x in three runs after), int8
   * 1.05-1.30x, int4 1.00-1.07x. */
  constexpr int64_t kPfValues = Kind == kF32 ? 16 : (Kind == kBF16 || Kind == kF16) ? 32
                              : Kind == kI8 ? 64 : 128;
  if constexpr (Kind == kI4) prefetch_next_groups<R>(vals.scales + n * vals.ng, vals.zeros + n * vals.ng, vals.ng);
  for (; j + kChunk24 <= H; j += kChunk24) {
    if (j % kPfValues == 0)
      for (int r = 0; r < R; ++r) PQ_PREFETCH_NEXT_TILE(vals.addr(n + r + R, j));
    if (j % 256 == 0)
      for (int r = 0; r < R; ++r) PQ_PREFETCH_NEXT_TILE(meta + (n + r + R) * ldm + j / 4);
    if constexpr (Kind == kI4) {
      if (j == next_group) {
        for (int r = 0; r < R; ++r) {
          const int64_t g = (n + r) * vals.ng + j / vals.G;
          zero[r] = _mm256_set1_ps((float)vals.zeros[g]);
          scale[r] = _mm256_set1_ps(vals.scales[g]);
        }
        next_group += vals.G;
      }
    }
    __m256 xlo[T], xhi[T];
    for (int t = 0; t < T; ++t) {
      xlo[t] = _mm256_loadu_ps(x + t * ldx + 2 * j);
      xhi[t] = _mm256_loadu_ps(x + t * ldx + 2 * j + 8);
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* mp = meta + (n + r) * ldm + j / 4;
      const __m256i idx = _mm256_inserti128_si256(
          _mm256_castsi128_si256(_mm_load_si128((const __m128i*)kGather24.c[mp[0]])),
          _mm_load_si128((const __m128i*)kGather24.c[mp[1]]), 1);
      const __m256 w = load8<Kind>(vals, n + r, j, zero[r], scale[r]);
      for (int t = 0; t < T; ++t) {
        const __m256 g = _mm256_blend_ps(_mm256_permutevar8x32_ps(xlo[t], idx),
                                         _mm256_permutevar8x32_ps(xhi[t], idx), 0xF0);
        acc[r][t] = _mm256_fmadd_ps(g, w, acc[r][t]);
      }
    }
  }
  float tail[R][T] = {};
  dot24_scalar<R, T>(vals, n, meta, ldm, x, ldx, j, H, tail);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      dot[r][t] = hsum256(acc[r][t]) + tail[r][t];
    }
}
#endif

/* Whether dot24 handles these values (int4 needs whole groups per SIMD step);
 * otherwise the scalar loop runs. */
template <int Kind>
inline bool simd24(const Vals<Kind>& v) {
#if defined(PQ_SIMD_AVX512) || defined(PQ_SIMD_AVX2)
  return Kind != kI4 || v.G % kChunk24 == 0;
#else
  (void)v;
  return false;
#endif
}

/* ------------------------------------------------------------ unstructured */

/* dot[t] = sum over set bits k of the row of x[t, k] * values[o0 + rank(k)]; returns o0
 * plus the row's set bits (the offset its values end at, which the caller checks against
 * the next row's: sparse.cpp, run_unstructured), as the loops below do.
 * Scalar: walk the set bits of each 64-bit word. */
template <int T, int Kind>
inline int64_t dot_unstructured_scalar(const Vals<Kind>& vals, const uint8_t* bm, int64_t K,
                                       int64_t o0, const float* x, int64_t ldx, float dot[T]) {
  const int64_t ldb = (K + 7) / 8;
  float acc[T] = {};
  int64_t o = o0;
  for (int64_t i = 0; i < ldb; i += 8) {
    uint64_t w = i + 8 <= ldb ? load_u64(bm + i) : load_tail_u64(bm + i, ldb - i);
    while (w) {
      const int64_t k = 8 * i + __builtin_ctzll(w);
      const float v = vals.flat(o++);
      for (int t = 0; t < T; ++t) acc[t] += x[t * ldx + k] * v;
      w &= w - 1;
    }
  }
  for (int t = 0; t < T; ++t) dot[t] = acc[t];
  return o;
}

#if defined(PQ_SIMD_AVX512)
/* 16 consecutive values from flat index o, widened to fp32 (lanes past the
 * run are ignored by the expand). Unmasked while 16 values remain in the
 * buffer (saves a mask move on the shuffle port); masked to the run's `cnt`
 * values near the end of the buffer, so nothing past it is read. */
template <int Kind>
inline __m512 load_run(const Vals<Kind>& v, int64_t o, unsigned cnt, bool room) {
  const __mmask16 m = (__mmask16)((1u << cnt) - 1);
  if constexpr (Kind == kF32) {
    const float* p = (const float*)v.p + o;
    return room ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
  } else {
    const uint16_t* p = (const uint16_t*)v.p + o;
    const __m256i h = room ? _mm256_loadu_si256((const __m256i*)p) : _mm256_maskz_loadu_epi16(m, p);
    if constexpr (Kind == kF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

/* The run of popcount(bits) values from flat index o, as fp32 at the set lanes of bits
 * (zeros elsewhere). An expand load reads exactly the run, so nothing past the buffer is
 * touched; without VBMI2 (no 16-bit expand) 16-bit values are loaded as a run (room: 16
 * values remain in the buffer, see load_run) and expanded in registers. Zen 4's expands
 * wait on their destination register (5.0-5.2 cycles a call where every call writes the
 * same one, 1.7-1.8 where four calls write four: benchmarks/unstructured_loop.py), so
 * callers issue several before using them. */
template <int Kind>
inline __m512 expand_run(const Vals<Kind>& v, int64_t o, __mmask16 bits, bool room) {
  if constexpr (Kind == kF32) {
    (void)room;
    return _mm512_maskz_expandloadu_ps(bits, (const float*)v.p + o);
  } else {
#if defined(__AVX512VBMI2__)
    (void)room;
    const __m256i h = _mm256_maskz_expandloadu_epi16(bits, (const uint16_t*)v.p + o);
    if constexpr (Kind == kF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
    return _mm512_maskz_expand_ps(bits, load_run(v, o, (unsigned)__builtin_popcount(bits), room));
#endif
  }
}

/* How far ahead (bytes of values) the unstructured loops prefetch into L1 where rows are
 * longer than kUnstructuredL1MinK columns; the mask a quarter as many bytes on (at 30% kept, 2
 * bytes of bf16 values go with 0.4 bytes of mask). First measured for the bf16 loop
 * (dot_unstructured_bf16) in-process on two threads at M = 1, 70% sparse, N = 4096, against
 * the L2 hint one row ahead alone (the geometric mean of both orders): 4 KB ahead, 1.20-1.26x
 * at K = 5120, 6144, 8192, 11008 and 14336, but 0.89x and 0.94x at K = 3072 and 4096 (3 KB
 * ahead: 0.91x and 0.96x there), so shorter rows kept the L2 hint alone. Later, 4 KB ahead on
 * a 2-core Zen 4 reading 29 GB/s, where the L2 hint alone left the loop at 68-75% of the
 * bandwidth at K = 4096: 1.06x (4096 x 4096) and 1.09x (11008 x 4096), four runs of each
 * order; so K = 4096 takes it too, K = 3072 not.
 * The float-x loop (dot_unstructured: fp32, or bf16/fp16 values against float32 x) had the
 * L2 hint alone until its fp32 form, one thread streaming a 4096 x 4096 weight from memory
 * (benchmarks/unstructured_loop.py), was seen at 34-38 cycles per 64 columns and 8-9 GB/s
 * where its loop takes 15 in cache: with one line 4 KB ahead, 22-32 (2 KB: 23-30, and a
 * second line a step no better). */
constexpr int64_t kUnstructuredL1AheadBytes = 4096, kUnstructuredL1MinK = 3072;

/* AVX512: per 16 columns, load the run of popcount(bits) values and put them at
 * their columns (zeros elsewhere: expand_run), then plain FMAs against x. The four
 * 16-column slices of a 64-bit mask word get their value offsets from prefix
 * popcounts, so they do not wait on each other, and (one row of x) each has its own
 * accumulators (a serial chain of 4 cycles per 64 columns instead of 16). */
template <int T, int Kind>
inline int64_t dot_unstructured(const Vals<Kind>& vals, int64_t nnz, const uint8_t* bm, int64_t K,
                                int64_t o0, int64_t row_nnz, const float* x, int64_t ldx,
                                float dot[T]) {
  const int64_t ldb = (K + 7) / 8;
  /* four accumulator sets for one row of x, two from two rows on: four sets of four rows
   * (16 registers, with the four expands in flight) ran M = 4 at 0.81-0.88x */
  constexpr int S = T == 1 ? 4 : 2;
  __m512 acc[S][T];
  for (int s = 0; s < S; ++s)
    for (int t = 0; t < T; ++t) acc[s][t] = _mm512_setzero_ps();
  int64_t o = o0;
  const bool l1_ahead = K > kUnstructuredL1MinK;
  constexpr int64_t kAhead = kUnstructuredL1AheadBytes / (Kind == kF32 ? 4 : 2); /* values */
  auto expand = [&](__mmask16 bits, int64_t os) PQ_ALWAYS_INLINE {
    return expand_run(vals, os, bits, os + 16 <= nnz);
  };
  auto fma = [&](int s, int64_t k, __mmask16 bits, __m512 e, bool full) PQ_ALWAYS_INLINE {
    for (int t = 0; t < T; ++t) {
      /* In the last word only set bits are loaded: no column >= K is touched. */
      const float* p = x + t * ldx + k;
      const __m512 xv = full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(bits, p);
      acc[s % S][t] = _mm512_fmadd_ps(xv, e, acc[s % S][t]);
    }
  };
  for (int64_t i = 0; i < ldb; i += 8) {
    const bool full = i + 8 <= ldb && 8 * i + 64 <= K;
    const uint64_t w = i + 8 <= ldb ? load_u64(bm + i) : load_tail_u64(bm + i, ldb - i);
    const int64_t c1 = __builtin_popcountll(w & 0xFFFFull), c2 = __builtin_popcountll(w & 0xFFFFFFFFull),
                  c3 = __builtin_popcountll(w & 0xFFFFFFFFFFFFull);
    const int64_t k = 8 * i;
    /* the next row's mask and values, one row ahead (rows follow each other). Four rows
     * ahead measured 1.07-1.12x on one thread (4096 x 4096 from memory) but slower on two
     * (pyquant bench, bf16 at M = 1: 0.79 ms against 0.71 ms one row ahead, medians of 3
     * alternated runs on a noisy machine). */
    PQ_PREFETCH_NEXT_TILE(bm + ldb + i);
    PQ_PREFETCH_NEXT_TILE(vals.addr(0, o + row_nnz));
    if (l1_ahead) { /* into L1 further on (kUnstructuredL1AheadBytes) */
      PQ_PREFETCH_NEXT_TILE_L1(bm + i + kAhead / 4);
      PQ_PREFETCH_NEXT_TILE_L1(vals.addr(0, o + kAhead));
    }
    const __mmask16 b0 = (__mmask16)w, b1 = (__mmask16)(w >> 16), b2 = (__mmask16)(w >> 32),
                    b3 = (__mmask16)(w >> 48);
    if (full) { /* the four expands first, to four registers (see expand_run) */
      const __m512 e0 = expand(b0, o), e1 = expand(b1, o + c1), e2 = expand(b2, o + c2),
                   e3 = expand(b3, o + c3);
      fma(0, k, b0, e0, true);
      fma(1, k + 16, b1, e1, true);
      fma(2, k + 32, b2, e2, true);
      fma(3, k + 48, b3, e3, true);
    } else {
      fma(0, k, b0, expand(b0, o), false);
      if (k + 16 < K) fma(1, k + 16, b1, expand(b1, o + c1), false);
      if (k + 32 < K) fma(2, k + 32, b2, expand(b2, o + c2), false);
      if (k + 48 < K) fma(3, k + 48, b3, expand(b3, o + c3), false);
    }
    o += __builtin_popcountll(w);
  }
  for (int t = 0; t < T; ++t) {
    __m512 sum = acc[0][t];
    for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[s][t]);
    dot[t] = _mm512_reduce_add_ps(sum);
  }
  return o;
}

#if defined(__AVX512BF16__) && defined(__AVX512VBMI2__)
#define PQ_UNSTRUCTURED_BF16_DOT 1
/* bf16 values and activations that are bf16 values (rows_are_bf16), narrowed once per call
 * to bf16 rows xb (row stride ldxb, zero-padded to a multiple of 32 columns). Per 32
 * columns, one vpexpandw load puts the slice's popcount(bits) kept values at their columns
 * (zeros elsewhere) and one vdpbf16ps multiplies them by x and adds each pair of lanes'
 * products into a 32-bit lane. The expand load reads exactly the kept values, so no load
 * passes the row's end. Two 64-bit mask words a step.
 *
 * Why this form: it takes 6.5-6.8 cycles per 64 columns (one thread, 4096 columns at 30%
 * kept, in L2; benchmarks/unstructured_loop.py) where the vpermw placement before it (each
 * lane's rank by a 16-bit popcount of the bits below it, a vptestmw for the kept lanes, two
 * half loads) took 11-12. An expand had measured slower than that placement only because
 * each call wrote the register the previous one had (Zen 4's expands wait on their
 * destination: expand_run). At 70% sparsity memory delivers a row's 46 bytes of 64 columns
 * in about 7 cycles a core.
 * On an Intel core with AMX (2 cores of a Granite Rapids VM) the loop takes 11.2-11.5 cycles
 * per 64 columns in L2, and there vdpbf16ps issues once every 2.2 cycles with a latency of ~9
 * (an FMA: two a cycle, latency 4). Replacing each vdpbf16ps by two conversions (shift, mask)
 * and two FMAs against fp32 x split into even and odd columns measured 12.0 in the same run:
 * the products are not what limits this loop there, and it was not kept.
 * Products of bf16 values are exact in fp32; vdpbf16ps reads subnormal bf16 inputs as zero
 * and flushes subnormal sums (pq.h). */
template <int T>
inline int64_t dot_unstructured_bf16(const Vals<kBF16>& vals, int64_t, const uint8_t* bm,
                                     int64_t K, int64_t o0, int64_t row_nnz, const uint16_t* xb,
                                     int64_t ldxb, float dot[T]) {
  const int64_t ldb = (K + 7) / 8;
  const uint16_t* v = (const uint16_t*)vals.p;
  /* Accumulator sets: four for one row of x (vdpbf16ps has a latency of 6 cycles), two from
   * two rows on. Four sets of four rows (16 registers) spilled to the stack inside the op,
   * which ran M = 4 at 0.75x the speed of the loop before this one. */
  constexpr int S = T == 1 ? 4 : 2;
  __m512 acc[S][T];
  for (int s = 0; s < S; ++s)
    for (int t = 0; t < T; ++t) acc[s][t] = _mm512_setzero_ps();
  auto expand = [&](uint32_t bits, int64_t os) PQ_ALWAYS_INLINE {
    return (__m512bh)_mm512_maskz_expandloadu_epi16((__mmask32)bits, v + os);
  };
  auto fma = [&](int s, int64_t k, __m512bh e) PQ_ALWAYS_INLINE {
    for (int t = 0; t < T; ++t)
      acc[s % S][t] = _mm512_dpbf16_ps(acc[s % S][t], e,
                                       (__m512bh)_mm512_loadu_si512(xb + t * ldxb + k));
  };
  const bool l1_ahead = K > kUnstructuredL1MinK;
  constexpr int64_t kAhead = kUnstructuredL1AheadBytes / 2; /* values */
  int64_t o = o0, i = 0;
  /* Whole steps: every slice starts before K (the row's last byte holds column K - 1). The
   * offsets come from popcounts of the words as loaded: where the compiler took the counts
   * from the mask registers instead (kmov k -> r), or where each expand wrote the register
   * the previous slice's vdpbf16ps had read (Zen 4's vpexpandw waits on its destination),
   * the loop ran at 13 cycles: the four expands are issued first, to four registers. */
  for (; i + 16 <= ldb; i += 16) {
    /* the next row's mask and values, one row ahead (rows follow each other), into L2;
     * and on long rows the values kUnstructuredL1AheadBytes on, into L1 */
    PQ_PREFETCH_NEXT_TILE(bm + ldb + i);
    PQ_PREFETCH_NEXT_TILE(v + o + row_nnz);
    if (l1_ahead) {
      PQ_PREFETCH_NEXT_TILE_L1(bm + i + kAhead / 4);
      PQ_PREFETCH_NEXT_TILE_L1(v + o + kAhead);
    }
    const uint64_t w0 = load_u64(bm + i), w1 = load_u64(bm + i + 8);
    const int64_t k = 8 * i, o1 = o + __builtin_popcountll(w0);
    const __m512bh e0 = expand((uint32_t)w0, o),
                   e1 = expand((uint32_t)(w0 >> 32), o + __builtin_popcount((uint32_t)w0)),
                   e2 = expand((uint32_t)w1, o1),
                   e3 = expand((uint32_t)(w1 >> 32), o1 + __builtin_popcount((uint32_t)w1));
    fma(0, k, e0);
    fma(1, k + 32, e1);
    fma(2, k + 64, e2);
    fma(3, k + 96, e3);
    o = o1 + __builtin_popcountll(w1);
  }
  /* the rest a word at a time; a slice from K on has no bits and is skipped (its x would
   * lie past ldxb) */
  for (; i < ldb; i += 8) {
    const uint64_t w = i + 8 <= ldb ? load_u64(bm + i) : load_tail_u64(bm + i, ldb - i);
    const int64_t k = 8 * i;
    fma(0, k, expand((uint32_t)w, o));
    if (k + 32 < K) fma(1, k + 32, expand((uint32_t)(w >> 32), o + __builtin_popcount((uint32_t)w)));
    o += __builtin_popcountll(w);
  }
  for (int t = 0; t < T; ++t) {
    __m512 sum = acc[0][t];
    for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[s][t]);
    dot[t] = _mm512_reduce_add_ps(sum);
  }
  return o;
}

/* Rows x[0..M) (bf16 values) -> bf16 rows of stride ldxb (a multiple of 32), zeros from K
 * to ldxb: each float's high half (the values are bf16, so nothing is rounded). */
inline void narrow_rows_bf16(const float* x, int64_t M, int64_t K, int64_t ldx, uint16_t* xb,
                             int64_t ldxb) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < ldxb; k += 32) {
      const __mmask16 lo = (__mmask16)(k + 16 <= K ? 0xFFFF : K > k ? (1u << (K - k)) - 1 : 0);
      const __mmask16 hi = (__mmask16)(k + 32 <= K ? 0xFFFF : K > k + 16 ? (1u << (K - k - 16)) - 1 : 0);
      const float* p = x + m * ldx + k;
      const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, p + 16),
                                                    _mm512_maskz_loadu_ps(lo, p));
      _mm512_storeu_si512(xb + m * ldxb + k, b);
    }
}
#endif
#elif defined(PQ_SIMD_AVX2)
/* AVX2 has no expand instruction. Per 8 columns (one byte of the mask) a table gives each
 * lane its column's rank among the byte's set bits (the sign bit set where the bit is not),
 * so one vpermps puts the run of up to 8 values from the byte's offset at their columns and
 * one blendv zeroes the other lanes (unstructured_lut.h); then FMAs against x. Against the
 * set-bit walk it replaced (4096 x 4096, 70% sparse, float32 x, a Zen 4 running this build,
 * three alternated runs): fp32 values 2.2-2.3x at M = 1 and 1.9-2.2x at M = 4, bf16 values
 * 3.0-3.1x and 2.5-2.7x.
 * Then, as the AVX512 loop: 64 columns a step, each byte's value offset from the word's
 * byte popcounts, and the next row's mask and values prefetched one row ahead. Against the
 * two-byte loop without prefetch (the AVX2 path forced on a Xeon, 2 threads, M = 1, 70%
 * pruned, benchmarks/ab_inprocess.py both orders): fp32 values 1.92x / 1.97x / 1.49x and
 * bf16 1.69x / 1.80x / 1.22x on 4096x4096 / 11008x4096 / 4096x11008; the 64-column step
 * alone gave ~1.25x of it. Four accumulator sets instead of two, or a second prefetched
 * line a step for fp32 values (~77 bytes of them per 64 columns), measured no better. */

/* The 8 values from flat index o as fp32 (the caller keeps o + 8 <= nnz). */
template <int Kind>
inline __m256 load_run8(const Vals<Kind>& v, int64_t o) {
  if constexpr (Kind == kF32) return _mm256_loadu_ps((const float*)v.p + o);
  const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)v.p + o));
  if constexpr (Kind == kF16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int T, int Kind>
inline int64_t dot_unstructured(const Vals<Kind>& vals, int64_t nnz, const uint8_t* bm, int64_t K,
                                int64_t o0, int64_t row_nnz, const float* x, int64_t ldx,
                                float dot[T]) {
  const int64_t ldb = (K + 7) / 8;
  const __m256 zero = _mm256_setzero_ps();
  __m256 acc[2][T]; /* two sets: a byte's FMAs do not wait on the previous byte's */
  for (int s = 0; s < 2; ++s)
    for (int t = 0; t < T; ++t) acc[s][t] = zero;
  auto byte = [&](int s, int64_t i, unsigned b, int64_t o) PQ_ALWAYS_INLINE {
    const __m256i idx = _mm256_load_si256((const __m256i*)kUnstructuredRankLut.lane[b]);
    const __m256 e = _mm256_blendv_ps(_mm256_permutevar8x32_ps(load_run8(vals, o), idx), zero,
                                      _mm256_castsi256_ps(idx));
    for (int t = 0; t < T; ++t)
      acc[s][t] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * ldx + 8 * i), e, acc[s][t]);
  };
  int64_t o = o0, i = 0;
  /* the next row's mask and values, one row ahead, as the AVX512 loop does */
  for (int64_t c = 0; c < ldb; c += 64) PQ_PREFETCH_NEXT_TILE(bm + ldb + c);
  for (; 8 * i + 64 <= K && o + 64 <= nnz; i += 8) {
    const uint64_t w = load_u64(bm + i);
    PQ_PREFETCH_NEXT_TILE(vals.addr(0, o + row_nnz));
    int64_t ob[8];
    ob[0] = o;
    for (int b = 1; b < 8; ++b) ob[b] = ob[b - 1] + __builtin_popcount((unsigned)(w >> (8 * b - 8)) & 0xFF);
    for (int b = 0; b < 8; ++b) byte(b & 1, i + b, (unsigned)(w >> (8 * b)) & 0xFF, ob[b]);
    o = ob[7] + __builtin_popcount((unsigned)(w >> 56));
  }
  /* Two bytes a step while their columns lie before K (x is read 8 columns at a time) and
   * 16 values remain in the buffer (each run reads 8); the rest by the set-bit walk. */
  for (; 8 * i + 16 <= K && o + 16 <= nnz; i += 2) {
    const unsigned b0 = bm[i], b1 = bm[i + 1];
    const int64_t o1 = o + __builtin_popcount(b0);
    byte(0, i, b0, o);
    byte(1, i + 1, b1, o1);
    o = o1 + __builtin_popcount(b1);
  }
  float rest[T] = {};
  for (; i < ldb; ++i)
    for (unsigned b = bm[i]; b; b &= b - 1) {
      const float v = vals.flat(o++);
      for (int t = 0; t < T; ++t) rest[t] += x[t * ldx + 8 * i + __builtin_ctz(b)] * v;
    }
  for (int t = 0; t < T; ++t) dot[t] = hsum256(_mm256_add_ps(acc[0][t], acc[1][t])) + rest[t];
  return o;
}
#else
/* The portable build: the set-bit walk. */
template <int T, int Kind>
inline int64_t dot_unstructured(const Vals<Kind>& vals, int64_t, const uint8_t* bm, int64_t K,
                                int64_t o0, int64_t, const float* x, int64_t ldx, float dot[T]) {
  return dot_unstructured_scalar<T>(vals, bm, K, o0, x, ldx, dot);
}
#endif

}  // namespace
}  // namespace PQ_NS
#endif /* PQ_CPU_TILE_SPARSE_H */
