/* Sparse -> dense weights, per ISA build: 2:4 (pq_sparse24_decompress), 2:4 +
 * int4 (pq_sparse24_int4_decompress) and unstructured
 * (pq_sparse_unstructured_decompress). From their break-even batch size on the
 * sparse ops decompress the weight on every call (no dense copy is kept) and
 * run the dense GEMM, so these run once per prefill call.
 *
 * 2:4, AVX512: 64 outputs (16 groups, one 64-bit word of meta) a step. The meta
 * bytes give, through a 256-entry table, bit masks of the outputs that take
 * each group's first and second kept value; two masked permutes place the 32
 * kept values. int8 values need vpermb (VBMI). Without it, on AVX2, and for the last
 * K % 64 columns of a row, a shuffle per meta byte through a table (kLut24) places
 * them, and the last few groups take the scalar loop. Returns nonzero when some
 * group's positions are not strictly increasing (the caller then runs the
 * sparse kernels, which add duplicates; out is unspecified). */
#ifndef PQ_CPU_SPARSE_DECOMPRESS_H
#define PQ_CPU_SPARSE_DECOMPRESS_H
#include <string.h>

#include "common.h"
#include "unstructured_lut.h"

namespace PQ_NS {
namespace {

/* An unsigned integer of four T (a 2:4 group of outputs). */
template <class T> struct Wide;
template <> struct Wide<uint8_t> { using type = uint32_t; };
template <> struct Wide<uint16_t> { using type = uint64_t; };
template <> struct Wide<uint32_t> { using type = unsigned __int128; };

/* Groups [g0, g1) of one row. Each group's four outputs are built as one
 * integer, each value shifted to its column: no branches and no stores to a
 * small array at computed indices (their store-to-load forwarding stalls made
 * this 16 ms for 4096 x 4096 int8). p0 == p1 may write anything (see above). */
template <class T>
inline int decompress_24_groups(const T* vr, const uint8_t* mr, int64_t g0, int64_t g1, T* row) {
  int bad = 0;
  for (int64_t g = g0; g < g1; ++g) {
    const int b = mr[g / 2] >> (4 * (g & 1));
    const int p0 = b & 3, p1 = (b >> 2) & 3;
    bad |= p1 <= p0;
    using W = typename Wide<T>::type;
    constexpr int bits = 8 * sizeof(T);
    const W out = ((W)vr[2 * g] << (bits * p0)) | ((W)vr[2 * g + 1] << (bits * p1));
    memcpy(row + 4 * g, &out, sizeof out);
  }
  return bad;
}

/* kMeta24[b] for a meta byte b (two groups, four 2-bit positions): bits 0..7 mark
 * the two groups' outputs that take the first kept value, bits 8..15 those that
 * take the second, bit 16 a group whose positions are not increasing. */
struct Meta24Table {
  uint32_t e[256];
  constexpr Meta24Table() : e() {
    for (int b = 0; b < 256; ++b) {
      uint32_t v = 0;
      for (int h = 0; h < 2; ++h) {
        const int p0 = (b >> (4 * h)) & 3, p1 = (b >> (4 * h + 2)) & 3;
        v |= (1u << (4 * h + p0)) | (1u << (8 + 4 * h + p1));
        if (p1 <= p0) v |= 1u << 16;
      }
      e[b] = v;
    }
  }
};
constexpr Meta24Table kMeta24{};

/* Per meta byte, where no AVX512 step runs (AVX2; int8 values without VBMI; the last groups
 * of a row): shuffle controls that put the byte's two groups' four kept values at their
 * columns. kLut24.b8: 8 bytes for 8-bit values (indices 0..3), .b16: 16 bytes for 16-bit
 * values (byte pairs), .l32: 8 lanes for 32-bit values (vpermps); 0x80 / INT32_MIN (zero)
 * at the pruned columns. Positions that are not increasing give anything there (kMeta24
 * flags them). */
struct Lut24 {
  uint8_t b8[256][8];
  uint8_t b16[256][16];
  int32_t l32[256][8];
};
constexpr Lut24 make_lut24() {
  Lut24 t{};
  for (int m = 0; m < 256; ++m)
    for (int h = 0; h < 2; ++h) {
      const int p0 = (m >> (4 * h)) & 3, p1 = (m >> (4 * h + 2)) & 3;
      for (int q = 0; q < 4; ++q) {
        const int j = 4 * h + q, k = q == p0 ? 2 * h : q == p1 ? 2 * h + 1 : -1;
        t.b8[m][j] = k < 0 ? 0x80 : (uint8_t)k;
        t.b16[m][2 * j] = k < 0 ? 0x80 : (uint8_t)(2 * k);
        t.b16[m][2 * j + 1] = k < 0 ? 0x80 : (uint8_t)(2 * k + 1);
        t.l32[m][j] = k < 0 ? INT32_MIN : k;
      }
    }
  return t;
}
alignas(32) constexpr Lut24 kLut24 = make_lut24();

#if defined(PQ_SIMD_AVX512)

/* The output masks of 64 columns from 8 meta bytes; bad |= a non-increasing group (bit 16). */
#if defined(__AVX512VBMI__)
/* With VBMI, in vector registers: for output byte j (group g = j / 4, lane q = j % 4) a
 * multishift takes the 8 meta bits from bit 4 g (p0 in the low two, p1 in the next two), and
 * byte compares with q give both masks. About 8 vector ops where the table takes 8 lookups
 * and ~30 scalar shifts and ors: the scalar loop bounded the decompression of 2:4 bf16
 * panels (tile_sparse_bf16_panel.h) at ~0.9 ms per 4096 x 4096 weight on 2 threads. */
inline void meta24_masks(const uint8_t* m, uint64_t& first, uint64_t& second, uint32_t& bad) {
  alignas(64) static const uint8_t kGroupBit[64] = {
      0,  0,  0,  0,  4,  4,  4,  4,  8,  8,  8,  8,  12, 12, 12, 12, 16, 16, 16, 16, 20, 20,
      20, 20, 24, 24, 24, 24, 28, 28, 28, 28, 32, 32, 32, 32, 36, 36, 36, 36, 40, 40, 40, 40,
      44, 44, 44, 44, 48, 48, 48, 48, 52, 52, 52, 52, 56, 56, 56, 56, 60, 60, 60, 60};
  uint64_t w;
  memcpy(&w, m, 8);
  const __m512i v = _mm512_multishift_epi64_epi8(_mm512_load_si512(kGroupBit),
                                                 _mm512_set1_epi64((long long)w));
  const __m512i three = _mm512_set1_epi8(3);
  const __m512i q = _mm512_and_si512(_mm512_set_epi64(0x3F3E3D3C3B3A3938ll, 0x3736353433323130ll,
                                                      0x2F2E2D2C2B2A2928ll, 0x2726252423222120ll,
                                                      0x1F1E1D1C1B1A1918ll, 0x1716151413121110ll,
                                                      0x0F0E0D0C0B0A0908ll, 0x0706050403020100ll),
                                     three);
  const __m512i p0 = _mm512_and_si512(v, three);
  const __m512i p1 = _mm512_and_si512(_mm512_srli_epi16(v, 2), three);
  first = _mm512_cmpeq_epi8_mask(p0, q);
  second = _mm512_cmpeq_epi8_mask(p1, q);
  if (_mm512_cmple_epu8_mask(p1, p0)) bad |= 1u << 16;
}
#else
inline void meta24_masks(const uint8_t* m, uint64_t& first, uint64_t& second, uint32_t& bad) {
  first = second = 0;
  for (int i = 0; i < 8; ++i) {
    const uint32_t e = kMeta24.e[m[i]];
    first |= (uint64_t)(e & 0xFF) << (8 * i);
    second |= (uint64_t)((e >> 8) & 0xFF) << (8 * i);
    bad |= e;
  }
}
#endif

/* Step index vectors: output j of a step takes kept value 2 * (j / 4) (+1). */
template <int Bytes>
inline bool decompress_24_step(const void* vp, uint64_t first, uint64_t second, void* op) {
  if (Bytes == 1) {
#if defined(__AVX512VBMI__)
    const __m512i lane = _mm512_set_epi32(0x3F3E3D3C, 0x3B3A3938, 0x37363534, 0x33323130,
                                          0x2F2E2D2C, 0x2B2A2928, 0x27262524, 0x23222120,
                                          0x1F1E1D1C, 0x1B1A1918, 0x17161514, 0x13121110,
                                          0x0F0E0D0C, 0x0B0A0908, 0x07060504, 0x03020100);
    const __m512i pe = _mm512_and_si512(_mm512_srli_epi16(lane, 1), _mm512_set1_epi8(0x7E));
    const __m512i v = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)vp));
    const __m512i r = _mm512_mask_permutexvar_epi8(_mm512_maskz_permutexvar_epi8(first, pe, v), second,
                                                   _mm512_add_epi8(pe, _mm512_set1_epi8(1)), v);
    _mm512_storeu_si512(op, r);
    return true;
#else
    return false;
#endif
  } else if (Bytes == 2) {
    const __m512i v = _mm512_loadu_si512(vp);
    const __m512i lane = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17,
                                          16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i pe = _mm512_slli_epi16(_mm512_srli_epi16(lane, 2), 1);
    const __m512i one = _mm512_set1_epi16(1), sixteen = _mm512_set1_epi16(16);
    for (int h = 0; h < 2; ++h) {
      const __m512i e = h ? _mm512_add_epi16(pe, sixteen) : pe;
      const __mmask32 f = (__mmask32)(first >> (32 * h)), s = (__mmask32)(second >> (32 * h));
      const __m512i r = _mm512_mask_permutexvar_epi16(_mm512_maskz_permutexvar_epi16(f, e, v), s,
                                                      _mm512_add_epi16(e, one), v);
      _mm512_storeu_si512((uint16_t*)op + 32 * h, r);
    }
    return true;
  } else {
    const __m512i v0 = _mm512_loadu_si512(vp), v1 = _mm512_loadu_si512((const uint32_t*)vp + 16);
    const __m512i pe = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
    const __m512i one = _mm512_set1_epi32(1);
    for (int q = 0; q < 4; ++q) {
      const __m512i e = _mm512_add_epi32(pe, _mm512_set1_epi32(8 * q));
      const __mmask16 f = (__mmask16)(first >> (16 * q)), s = (__mmask16)(second >> (16 * q));
      const __m512i r = _mm512_or_si512(
          _mm512_maskz_permutex2var_epi32(f, v0, e, v1),
          _mm512_maskz_permutex2var_epi32(s, v0, _mm512_add_epi32(e, one), v1));
      _mm512_storeu_si512((uint32_t*)op + 16 * q, r);
    }
    return true;
  }
}
#endif

/* One row: K / 2 kept values vr and their meta bytes mr -> K outputs; nonzero as above. */
template <class T>
inline int decompress_24_row(const T* vr, const uint8_t* mr, int64_t K, T* row) {
  const int64_t groups = K / 4;
  int64_t g = 0;
  int bad = 0;
#if defined(PQ_SIMD_AVX512)
  uint32_t vbad = 0;
  for (; g + 16 <= groups; g += 16) {
    uint64_t first, second;
    meta24_masks(mr + g / 2, first, second, vbad);
    if (!decompress_24_step<sizeof(T)>(vr + 2 * g, first, second, row + 4 * g)) break;
  }
  bad |= (vbad >> 16) & 1;
#endif
#if defined(PQ_SIMD_AVX512) || defined(PQ_SIMD_AVX2)
  /* The rest through kLut24, one shuffle per meta byte (two for 8-bit values), while the
   * loads (8 kept values from the step's first) stay in the row: 4096 x 4096 on AVX2, int8
   * 3.0 -> 0.6 ms, bf16 3.1 -> 1.1 ms (int8 without VBMI 3.0 -> 0.6 ms; pyquant's
   * decompression, its output's allocation included). */
  uint32_t tbad = 0;
  for (; g + 4 <= groups; g += sizeof(T) == 1 ? 4 : 2) {
    const unsigned m0 = mr[g / 2];
    tbad |= kMeta24.e[m0];
    if constexpr (sizeof(T) == 1) {
      const unsigned m1 = mr[g / 2 + 1];
      tbad |= kMeta24.e[m1];
      const __m128i ctl = _mm_unpacklo_epi64(
          _mm_loadl_epi64((const __m128i*)kLut24.b8[m0]),
          _mm_add_epi8(_mm_loadl_epi64((const __m128i*)kLut24.b8[m1]), _mm_set1_epi8(4)));
      _mm_storeu_si128((__m128i*)(row + 4 * g),
                       _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i*)(vr + 2 * g)), ctl));
    } else if constexpr (sizeof(T) == 2) {
      _mm_storeu_si128((__m128i*)(row + 4 * g),
                       _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)(vr + 2 * g)),
                                        _mm_load_si128((const __m128i*)kLut24.b16[m0])));
    } else {
      const __m256i idx = _mm256_load_si256((const __m256i*)kLut24.l32[m0]);
      _mm256_storeu_ps((float*)(row + 4 * g),
                       _mm256_blendv_ps(
                           _mm256_permutevar8x32_ps(_mm256_loadu_ps((const float*)(vr + 2 * g)), idx),
                           _mm256_setzero_ps(), _mm256_castsi256_ps(idx)));
    }
  }
  bad |= (tbad >> 16) & 1;
#endif
  return bad | decompress_24_groups(vr, mr, g, groups, row);
}

template <class T>
int decompress_24(const T* v, const uint8_t* meta, int64_t N, int64_t K, T* out, int n_threads) {
  const int64_t mc = (K + 7) / 8;
  int bad = 0;
#pragma omp parallel for num_threads(n_threads) schedule(static) reduction(| : bad)
  for (int64_t n = 0; n < N; ++n)
    bad |= decompress_24_row(v + n * (K / 2), meta + n * mc, K, out + n * K);
  return bad;
}

/* Unstructured -> dense rows (pq_sparse_unstructured_decompress): zero the row, then
 * write each kept value at its set bit. A row whose popcount disagrees with its
 * offsets, that leaves [0, nnz], or that has a bit at k >= K makes the call fail
 * (the op then runs the kernel, which reports the weight). AVX512: each 64-column
 * word of the bitmask is counted first, then its values are expanded to their
 * columns (16-bit values need VBMI2's expand), so a row's values are never read
 * past its count. Elsewhere (AVX2, and 16-bit values without VBMI2) a table per
 * byte of the bitmask places them (below). */
/* One row: its bitmask b, values v[o0, o1) of nnz -> K outputs; nonzero when the row is
 * inconsistent (as above; the row is then left unwritten). */
/* No bit of bitmask row b at a column k >= K. */
inline bool unstructured_tail_clear(const uint8_t* b, int64_t K) {
  return K % 8 == 0 || (b[(K + 7) / 8 - 1] >> (K % 8)) == 0;
}

/* A row of an unstructured weight is consistent: its offsets [o0, o1) stay inside [0, nnz]
 * and step by the popcount of its bitmask row b, and no bit at k >= K is set (the
 * decompression checks it before reading any of its values, the row loops before or right
 * after: unstructured_row_bounded). */
inline bool unstructured_row_ok(const uint8_t* b, int64_t K, int64_t o0, int64_t o1,
                                int64_t nnz) {
  const int64_t ldb = (K + 7) / 8;
  if (!unstructured_tail_clear(b, K)) return false;
  int64_t pop = 0, j = 0;
  for (; j + 8 <= ldb; j += 8) { /* a word at a time: a byte at a time took ~8 cycles a word */
    uint64_t w;
    memcpy(&w, b + j, 8);
    pop += __builtin_popcountll(w);
  }
  for (; j < ldb; ++j) pop += __builtin_popcount(b[j]);
  return o0 >= 0 && o1 <= nnz && o1 - o0 == pop;
}

/* What unstructured_row_ok checks without counting the bitmask row, where counting can wait:
 * no bit at k >= K, offsets inside [0, nnz], and K values from o0 on inside the buffer too,
 * so that no bitmask, however wrong its count, makes a loop read past the values. The row
 * loops (tile_sparse.h) then return the offset their values ended at, which must be o1.
 * Counting first is a pass over the row's bitmask before the loop's own: checking after
 * instead ran the decode 1.16-1.20x faster with bf16 values and 1.01-1.05x with fp32 (M = 1,
 * 70% sparse, Llama-2-7B shapes, 2 threads of a Zen 4, benchmarks/ab_inprocess.py, both
 * orders). */
inline bool unstructured_row_bounded(const uint8_t* b, int64_t K, int64_t o0, int64_t o1,
                                     int64_t nnz) {
  return unstructured_tail_clear(b, K) && o0 >= 0 && o0 <= o1 && o1 <= nnz && K <= nnz - o0;
}

template <class T>
inline int decompress_unstructured_row(const uint8_t* b, const T* v, int64_t nnz, int64_t o0,
                                       int64_t o1, int64_t K, T* row) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "unstructured values are 16 or 32 bits");
  const int64_t ldb = (K + 7) / 8;
  if (!unstructured_row_ok(b, K, o0, o1, nnz)) return 1;
  int64_t o = o0, i = 0;
#if defined(PQ_SIMD_AVX512)
  constexpr bool kExpand = sizeof(T) == 4
#if defined(__AVX512VBMI2__)
                           || sizeof(T) == 2
#endif
      ;
  /* Two words a step, then one: a step's 64-byte slices of output (2 a word for 16-bit
   * values, 4 for 32-bit) are all expanded before any is stored. Zen 4's expands wait on
   * their destination register (tile_sparse.h, expand_run): one register reused slice after
   * slice took 5.2 cycles an expand, against 1.8 for separate ones. */
  constexpr int per = 64 / sizeof(T);
  auto step = [&](auto words_) {
    constexpr int words = decltype(words_)::value, slices = words * (int)sizeof(T);
    uint64_t w[words];
    memcpy(w, b + i, 8 * words);
    __m512i e[slices];
    for (int s = 0; s < slices; ++s) {
      const uint64_t bits =
          (w[s / (int)sizeof(T)] >> (per * (s % (int)sizeof(T)))) & ((1ull << per) - 1);
      if (sizeof(T) == 4)
        e[s] = _mm512_maskz_expandloadu_epi32((__mmask16)bits, v + o);
#if defined(__AVX512VBMI2__)
      else
        e[s] = _mm512_maskz_expandloadu_epi16((__mmask32)bits, v + o);
#endif
      o += __builtin_popcountll(bits);
    }
    for (int s = 0; s < slices; ++s) _mm512_storeu_si512(row + 8 * i + per * s, e[s]);
    i += 8 * words;
  };
  if (kExpand) { /* whole words: no column of the next row */
    while (8 * i + 128 <= K) step(Int<2>{});
    if (8 * i + 64 <= K) step(Int<1>{});
  }
#endif
#if defined(PQ_SIMD_AVX512) || defined(PQ_SIMD_AVX2)
  /* Byte by byte (8 columns) through a table (unstructured_lut.h) where no expand ran: 16-bit
   * values by one pshufb (AVX2, AVX512 without VBMI2), 32-bit ones by a vpermps and a blend
   * (AVX2); on every build also the whole bytes after the last whole word. Each reads the run
   * of 8 values at the byte's offset, so it stops 8 values before the buffer's end. */
  for (; 8 * i + 8 <= K && o + 8 <= nnz; ++i) {
    const unsigned bits = b[i];
    if constexpr (sizeof(T) == 2) {
      const __m128i sh = _mm_load_si128((const __m128i*)kUnstructuredShuffleLut.byte[bits]);
      _mm_storeu_si128((__m128i*)(row + 8 * i),
                       _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)(v + o)), sh));
    } else { /* 32-bit values (the op's values are 16 or 32 bits wide) */
      const __m256i idx = _mm256_load_si256((const __m256i*)kUnstructuredRankLut.lane[bits]);
      const __m256 run = _mm256_loadu_ps((const float*)(v + o));
      _mm256_storeu_ps((float*)(row + 8 * i),
                       _mm256_blendv_ps(_mm256_permutevar8x32_ps(run, idx), _mm256_setzero_ps(),
                                        _mm256_castsi256_ps(idx)));
    }
    o += __builtin_popcount(bits);
  }
#endif
  if (i < ldb) memset(row + 8 * i, 0, (size_t)(K - 8 * i) * sizeof(T));
  for (; i < ldb; ++i)
    for (unsigned bits = b[i]; bits; bits &= bits - 1) row[8 * i + __builtin_ctz(bits)] = v[o++];
  return 0;
}

template <class T>
int decompress_unstructured(const uint8_t* bm, const T* v, int64_t nnz, const int64_t* off,
                            int64_t N, int64_t K, T* out, int n_threads) {
  const int64_t ldb = (K + 7) / 8;
  int bad = 0;
#pragma omp parallel for num_threads(n_threads) schedule(static) reduction(| : bad)
  for (int64_t n = 0; n < N; ++n)
    bad |= decompress_unstructured_row(bm + n * ldb, v, nnz, off[n], off[n + 1], K, out + n * K);
  return bad;
}

/* 2:4 + int4 -> dense packed int4 (pq_sparse24_int4_decompress). Per group of 4
 * columns: one byte of two kept codes, one meta nibble, two output bytes; the
 * pruned nibbles hold the zero point. Branch-free: the four output nibbles start
 * as z and the kept two are masked in. Groups [g0, g1) of one row; a zero point
 * covers G kept codes, G / 2 groups. */
inline int decompress_24_int4_groups(const uint8_t* pr, const uint8_t* mr, const uint8_t* zr,
                                     int64_t G, int64_t g0, int64_t g1, uint8_t* row) {
  int bad = 0;
  for (int64_t g = g0; g < g1;) {
    const int64_t zg = g / (G / 2), gend = min64(g1, (zg + 1) * (G / 2));
    const uint32_t zz = (zr[zg] & 15u) * 0x1111u;
    for (; g < gend; ++g) {
      const int b = mr[g / 2] >> (4 * (g & 1));
      const int p0 = b & 3, p1 = (b >> 2) & 3;
      bad |= p1 <= p0;
      const uint32_t c = pr[g];
      const uint32_t keep = (0xFu << (4 * p0)) | (0xFu << (4 * p1));
      const uint32_t v = (zz & ~keep) | ((c & 15u) << (4 * p0)) | ((c >> 4) << (4 * p1));
      row[2 * g] = (uint8_t)v;
      row[2 * g + 1] = (uint8_t)(v >> 8);
    }
  }
  return bad;
}

/* One row: its kept codes pr, meta mr and zero points zr -> its K / 2 dense code bytes; nonzero
 * when a group's positions are not strictly increasing. AVX512: 32 groups a step as the 16-bit
 * lanes of one vector, the same arithmetic with per-lane shifts, where the step lies in one
 * zero-point group (G % 64 == 0). */
inline int decompress_24_int4_row(const uint8_t* pr, const uint8_t* mr, const uint8_t* zr,
                                  int64_t K, int64_t G, uint8_t* row) {
  const int64_t groups = K / 4;
  int bad = 0;
  int64_t g = 0;
#if defined(PQ_SIMD_AVX512)
  if (G % 64 == 0) {
    const __m512i f = _mm512_set1_epi16(0xF), three = _mm512_set1_epi16(3);
    __mmask32 vbad = 0;
    for (; g + 32 <= groups; g += 32) {
      const __m512i c = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(pr + g)));
      /* meta byte i holds groups 2i (low nibble) and 2i + 1: dword i -> words 2i, 2i + 1 */
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(mr + g / 2)));
      const __m512i m = _mm512_or_si512(_mm512_and_si512(d, _mm512_set1_epi32(0xF)),
                                        _mm512_slli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(0xF0)), 12));
      const __m512i p0 = _mm512_and_si512(m, three);
      const __m512i p1 = _mm512_and_si512(_mm512_srli_epi16(m, 2), three);
      vbad |= _mm512_cmple_epu16_mask(p1, p0);
      const __m512i s0 = _mm512_slli_epi16(p0, 2), s1 = _mm512_slli_epi16(p1, 2);
      const __m512i keep = _mm512_or_si512(_mm512_sllv_epi16(f, s0), _mm512_sllv_epi16(f, s1));
      const __m512i zz = _mm512_set1_epi16((short)((zr[g / (G / 2)] & 15u) * 0x1111u));
      const __m512i v = _mm512_or_si512(
          _mm512_andnot_si512(keep, zz),
          _mm512_or_si512(_mm512_sllv_epi16(_mm512_and_si512(c, f), s0),
                          _mm512_sllv_epi16(_mm512_srli_epi16(c, 4), s1)));
      _mm512_storeu_si512(row + 2 * g, v);
    }
    bad |= vbad != 0;
  }
#elif defined(PQ_SIMD_AVX2)
  /* The same arithmetic in the 32-bit lanes of AVX2 (no 16-bit variable shifts): 8 groups a
   * step, within one zero-point group (G % 16 == 0), packed to 16 bytes of output. 4096 x
   * 4096 at group 128: 4.7 -> 0.6 ms (pyquant's decompression, output included). */
  if (G % 16 == 0) {
    const __m256i f = _mm256_set1_epi32(0xF), three = _mm256_set1_epi32(3),
                  one = _mm256_set1_epi32(1),
                  by_group = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    int vbad = 0;
    for (; g + 8 <= groups; g += 8) {
      const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(pr + g)));
      uint32_t mw;
      memcpy(&mw, mr + g / 2, 4); /* groups g..g + 7: nibble j of the word is group g + j */
      const __m256i m =
          _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)mw), by_group), f);
      const __m256i p0 = _mm256_and_si256(m, three);
      const __m256i p1 = _mm256_and_si256(_mm256_srli_epi32(m, 2), three);
      vbad |= _mm256_movemask_epi8(_mm256_cmpgt_epi32(_mm256_add_epi32(p0, one), p1));
      const __m256i s0 = _mm256_slli_epi32(p0, 2), s1 = _mm256_slli_epi32(p1, 2);
      const __m256i keep = _mm256_or_si256(_mm256_sllv_epi32(f, s0), _mm256_sllv_epi32(f, s1));
      const __m256i zz = _mm256_set1_epi32((int)((zr[g / (G / 2)] & 15u) * 0x1111u));
      const __m256i v = _mm256_or_si256(
          _mm256_andnot_si256(keep, zz),
          _mm256_or_si256(_mm256_sllv_epi32(_mm256_and_si256(c, f), s0),
                          _mm256_sllv_epi32(_mm256_srli_epi32(c, 4), s1)));
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08);
      _mm_storeu_si128((__m128i*)(row + 2 * g), _mm256_castsi256_si128(packed));
    }
    bad |= vbad != 0;
  }
#endif
  return bad | decompress_24_int4_groups(pr, mr, zr, G, g, groups, row);
}

int decompress_24_int4(const uint8_t* packed, const uint8_t* meta, int64_t N, int64_t K,
                       const uint8_t* zeros, int64_t G, uint8_t* out, int n_threads) {
  const int64_t mc = (K + 7) / 8, ng = K / 2 / G;
  int bad = 0;
#pragma omp parallel for num_threads(n_threads) schedule(static) reduction(| : bad)
  for (int64_t n = 0; n < N; ++n)
    bad |= decompress_24_int4_row(packed + n * (K / 4), meta + n * mc, zeros + n * ng, K, G,
                                  out + n * (K / 2));
  return bad;
}

}  // namespace
}  // namespace PQ_NS
#endif /* PQ_CPU_SPARSE_DECOMPRESS_H */
