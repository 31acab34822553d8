/* 2:4 + int8 and 2:4 + int4 weights in 4-row panels (pyquant/sparse_panels.py), and the
 * fixed-point kernels that read them: every AVX512 build (AVX512-VNNI, AVX512-BF16, AMX).
 * The kernels need AVX512-BW and VNNI; the packer moves qwords (vpermq) and the meta bits
 * (BMI2 pext, pdep), so CPUs without VBMI (Cascade Lake) take these layers too.
 *
 * Why a layout of their own. From the canonical rows, dot24_i8_fx2 and dot24_i4_fx2
 * (tile_sparse.h) put two rows' values into one register with a masked broadcast, their
 * meta with another, and (int4) split each code byte with a variable shift: 11 (int8) and
 * 14 (int4) vector uops per 64 kept values, and each of a tile's 4 rows is two streams
 * (values, meta) that the prefetchers follow separately. In a panel the values of one
 * 64-lane step of a row pair are one load, the meta of a step one 16-byte broadcast, and an
 * int4 code byte holds the same lane of two consecutive steps: 9 and 11.5 uops, and a
 * 4-row tile is one stream of values and one of meta.
 *
 * Layout, for N % 4 == 0 and K % 128 == 0. Quad q is rows 4q .. 4q+3 (pair p: rows 4q + 2p
 * and 4q + 2p + 1). Its values are the bytes of its four canonical rows, reordered: int8
 * 2K bytes at values + 2qK, int4 K bytes at codes + qK; its meta K/2 bytes at meta + qK/2.
 * So [N, K/2] (int8), [N, K/4] (int4) and [N, K/8] keep their shapes, and slicing whole
 * quads is slicing rows. A step s is 32 kept values of each row (columns 64s .. 64s + 63);
 * lane L (0..63) of a pair's 64-byte vector holds pair row r = (L / 8) % 2 and kept value k
 * = 8 (L / 16) + L % 8 of the step, so the rows alternate by qword:
 *   int8: values[2qK + 128 s + 64 p + L] = value 32s + k of pair row r;
 *   int4: codes[qK + 128 d + 64 p + L] = code 64d + k (low nibble) | code 64d + 32 + k
 *         (high nibble) of pair row r: the same lane of steps 2d and 2d + 1;
 *   meta[qK/2 + 32 s + 16 p + b] (b = 8 r + i, i < 8): bits 2l, 2l + 1 (l < 4) hold the
 *         position of kept value 8 l + i of the step in pair row r,
 * the byte lane b of each 128-bit lane l. One 16-byte broadcast of a pair's step meta and one
 * shift by 2 l in lane l (vpsrlvd) then put each lane's position in its low two bits, and the
 * lane's x candidates lie in its own 128-bit lane (columns 16 l .. 16 l + 15), so vpshufb
 * gathers them. A dword lane (4 bytes) stays in one row, as vpdpbusd needs. Each step and
 * pair costs 3 vpdpbusd, 3 vpshufb, 1 vpdpbusd for the bias and 3 simple ops for the index.
 *
 * Measured on a Zen 4, one thread, one quad of 4096 columns in L1
 * (benchmarks/sparse24_panel_loop.py), cycles per 64 columns of a weight row at decode:
 *                                     int8   int4 g128   int4 g64
 *   first layout, generic loops        4.9-5.7   5.6       7.3-7.6
 *   (its meta bytes the canonical ones reordered, put under each lane by vpmultishiftqb,
 *   a shuffle-unit op where vpsrlvd is a plain shift, and x gathered by vpermb)
 *   this layout, the quad loops below   3.4      4.6       5.6
 *   the first layout's index in them    4.0      4.8       5.7
 *   int4's x as the digits of X + 2^23           4.5       5.3   (i4_combine)
 *   the step's instructions alone       2.9      3.0-3.1   (from registers: no flush, no memory)
 * The rest of int4's gap to its floor is the group flush (3 terms combined, converted and
 * scaled once per 4 steps: without it 4.0 at group 128, 4.6 at 64, before i4_combine) and the
 * zero point and scale broadcasts of each group (hoisted out, which a real group cannot be:
 * 4.3 and 5.0; from a per-quad transposed copy, one broadcast and two permutes each, 4.6 and
 * 5.55: not worth the copy). Replacing the bias's vpdpbusd a step by byte adds and one
 * vpdpbusd a block changed nothing (4.62 and 5.6x either way). */
#ifndef PQ_CPU_TILE_SPARSE24_FX_PANEL_H
#define PQ_CPU_TILE_SPARSE24_FX_PANEL_H
#include "common.h"
#include "tile_sparse.h"

namespace PQ_NS {
namespace {

#if defined(PQ_SIMD_AVX512) && defined(__BMI2__)
#define PQ_HAVE_SPARSE24_FX_PANELS 1

/* Lane L's kept value in its step (0..31); its row in the pair is (L / 8) % 2. */
constexpr int panel24_kept(int L) { return 8 * (L / 16) + L % 8; }

/* The constant vectors of the layout, built at compile time. */
struct Panel24Tables {
  uint8_t base[64]; /* lane L's group of 4 within its 128-bit lane of x: 4 (k % 8 / 2) */
  constexpr Panel24Tables() : base() {
    for (int L = 0; L < 64; ++L) base[L] = (uint8_t)(4 * (panel24_kept(L) % 8 / 2));
  }
};
constexpr Panel24Tables kPanel24{};

/* One quad: canonical rows (values [4][ldv] bytes, meta [4][ldm]) -> its panel (values at
 * pv, meta at pm), or back with `unpack`. bits: 8 (ldv >= K/2) or 4 (ldv >= K/4).
 *
 * Qword moves only (AVX512F vpermq / vpermt2q, and AVX512BW byte unpacks), so that the
 * AVX512-VNNI build without VBMI packs and reads panels too: a lane's kept values come in
 * runs of 8 (k % 8), so each qword of a pair's vector is one qword of the rows'.
 *   int8: qword 2c + r of the panel = qword c of row r's 32 bytes (c = k / 8).
 *   int4: the rows' nibbles are first spread to bytes in value order (an unpack of each
 *   128-bit lane's low and high nibbles: chunk ch = 2 r + h, the 16 bytes of row r's step
 *   2d + h, gives values 0-15 in U0 and 16-31 in U1, 8 a qword); then the panel's low
 *   nibbles (h = 0) and high ones (h = 1) are each one two-source qword permute of them. */
inline void panel24_quad(int bits, bool unpack, uint8_t* vals, int64_t ldv, uint8_t* meta,
                         int64_t ldm, int64_t K, uint8_t* pv, uint8_t* pm) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  /* one 64-byte unit of a pair: rows a and b, 32 bytes each, from or into the panel q */
  auto unit = [&](uint8_t* a, uint8_t* b, uint8_t* q) PQ_ALWAYS_INLINE {
    const __m512i v = unpack ? _mm512_loadu_si512(q)
                             : _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)a)),
                                                  _mm256_loadu_si256((const __m256i*)b), 1);
    const __m512i lo = _mm512_and_si512(v, nib);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
    __m512i r;
    if (bits == 8 && !unpack) {
      r = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7), v);
    } else if (bits == 8) {
      r = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), v);
    } else if (!unpack) {
      const __m512i u0 = _mm512_unpacklo_epi8(lo, hi), u1 = _mm512_unpackhi_epi8(lo, hi);
      const __m512i h0 = _mm512_permutex2var_epi64(u0, _mm512_setr_epi64(0, 4, 1, 5, 8, 12, 9, 13), u1);
      const __m512i h1 = _mm512_permutex2var_epi64(u0, _mm512_setr_epi64(2, 6, 3, 7, 10, 14, 11, 15), u1);
      r = _mm512_or_si512(h0, _mm512_slli_epi16(h1, 4)); /* h0, h1 <= 15 a byte */
    } else {
      const __m512i u0 = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(0, 2, 8, 10, 1, 3, 9, 11), hi);
      const __m512i u1 = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(4, 6, 12, 14, 5, 7, 13, 15), hi);
      /* each word's two values (v, w) -> the byte v | w << 4, then the words' low bytes */
      const __m512i low = _mm512_set1_epi16(0x00FF);
      r = _mm512_packus_epi16(_mm512_and_si512(_mm512_or_si512(u0, _mm512_srli_epi16(u0, 4)), low),
                              _mm512_and_si512(_mm512_or_si512(u1, _mm512_srli_epi16(u1, 4)), low));
    }
    if (unpack) {
      _mm256_storeu_si256((__m256i*)a, _mm512_castsi512_si256(r));
      _mm256_storeu_si256((__m256i*)b, _mm512_extracti64x4_epi64(r, 1));
    } else {
      _mm512_storeu_si512(q, r);
    }
  };
  /* a unit is 32 bytes of each row: one step of int8 values, two of int4 codes */
  for (int64_t u = 0; u < K / (bits == 8 ? 64 : 128); ++u)
    for (int p = 0; p < 2; ++p)
      unit(vals + 2 * p * ldv + 32 * u, vals + (2 * p + 1) * ldv + 32 * u, pv + 128 * u + 64 * p);
  /* a row's step meta is one little-endian qword, kept value k at bits 2k; panel byte i of the
   * row takes kept values i, 8 + i, 16 + i, 24 + i: the bits of kMetaLane << 2i */
  constexpr uint64_t kMetaLane = 0x0003000300030003ull;
  for (int64_t s = 0; s < K / 64; ++s)
    for (int row = 0; row < 4; ++row) {
      uint8_t* m = meta + row * ldm + 8 * s;
      uint8_t* c = pm + 32 * s + 8 * row; /* pair row / 2, byte 8 (row % 2) + i */
      if (unpack) {
        uint64_t q = 0;
        for (int i = 0; i < 8; ++i) q |= _pdep_u64(c[i], kMetaLane << (2 * i));
        memcpy(m, &q, 8);
      } else {
        uint64_t q;
        memcpy(&q, m, 8);
        for (int i = 0; i < 8; ++i) c[i] = (uint8_t)_pext_u64(q, kMetaLane << (2 * i));
      }
    }
}

/* The x gather index of step s's pair p for vpshufb: each lane's column within its 128-bit
 * lane of the step's 64 (meta m: the step's 32 bytes of the quad). Bits 2 .. 7 of a shifted
 * byte are other lanes' positions, which the AND takes off (bit 7 clear: no zeroing). */
PQ_ALWAYS_INLINE inline __m512i panel24_index(const uint8_t* m, int p) {
  const __m512i mq = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(m + 16 * p)));
  const __m512i by_lane = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
  return _mm512_ternarylogic_epi32(_mm512_srlv_epi32(mq, by_lane), _mm512_set1_epi8(3),
                                   _mm512_loadu_si512(kPanel24.base), 0xEA); /* (a & b) | c */
}

/* The kernels below take both pairs of a quad and T <= 2 rows of x (so that the accumulators
 * fit the 32 registers: 3 T + 1 a pair). x row t's three u8 term rows are Kp bytes apart from
 * xu + 3 t Kp. A pair's rows take the dword lanes of kPanel24Dw[r] of its accumulators. They
 * prefetch ahead in the panel as they go (common.h). */
constexpr __mmask16 kPanel24Dw[2] = {0x3333, 0xCCCC};
/* The M > 1 loops' L2 hints (int8 and int4) run this many bytes of values (int4: codes) ahead in the panel, whose quads lie back to back, rather than at the same offset of
 * the next quad (2K bytes ahead for int8, K for int4: 22 and 11 KiB at K = 11008); so did the
 * int8 decode loop until it took the two hints below. In-process A/B at M = 1, two threads, geometric
 * mean of both orders, against the next-quad hint:
 *                       4096 x 4096   11008 x 4096   4096 x 11008
 *   int8, 4 KiB ahead      1.02x          1.01x          1.07x
 *   int4 decode            -              -            1.05x   (now kPanel24L2Ahead, below)
 * and int8 at 4 KiB against 2 KiB: 1.05-1.06x, against 8 KiB: 1.03-1.08x (on a Zen 4 8 KiB
 * read 1.01x / 1.06x / 1.03x against 4, 16 KiB 0.98-1.01x against 8: within the noise of both
 * measurements, so 4 stays). On one thread from memory (the from-memory loop of
 * benchmarks/sparse24_panel_loop.cpp with its K set to 11008) the next-quad hint read
 * 23.5-23.9 GB/s and 4 KiB ahead 25.8-27.1; that loop then summed one output of each quad,
 * so the compiler dropped the products of the other outputs and those GB/s are of a lighter
 * loop than this one (the in-process A/B above times the op itself). */
constexpr int64_t kPanel24I8Ahead = 4096, kPanel24I4Ahead = 4096;

/* The decode quad loops (M = 1, int4 and int8) prefetch their values and meta into L1
 * kPanel24L1Ahead bytes ahead and into L2 kPanel24L2Ahead bytes ahead, as the dense W4A8 panel
 * sweep does (tile_vnni_panel.h; panel24_decode_prefetch). The int4 loop does much work a byte
 * (4.6 cycles per 64 columns of a row in L1, where memory takes ~6.4 at 29 GB/s on two cores),
 * so its loads must not wait. History (in-process A/B at M = 1, 2 threads, geometric mean of
 * both orders; 4096 x 4096 / 11008 x 4096 / 4096 x 11008):
 *  - a 2-core Zen 4 reading ~34 GB/s, against an L2 hint one quad ahead: an L1 hint 2 KiB ahead
 *    where x's three term rows took at most 16 KiB (1.11x / 1.10x; at K = 11008 they do not fit
 *    L1 beside the prefetched lines, and there an L2 hint 4 KiB ahead: 0.99x); 1 KiB as 2,
 *    8 KiB 0.97x;
 *  - another 2-core Zen 4 (32 KiB L1, 29 GB/s), against that: L1 at 1 KiB plus L2 at 8 KiB
 *    1.04x / 1.15x, and then the same at every K 1.03x on 4096 x 11008 (L2 at 16 KiB instead:
 *    1.01-1.03x on the three).
 * The int8 quad loop, which does less work a byte, had an L2 hint kPanel24I8Ahead ahead alone:
 * an L1 hint 4 KiB ahead made it slower on the first (0.96x, 0.94x and 0.84x), with no hint at
 * all it ran 0.66x on the second, and an L2 hint 8 or 16 KiB ahead read as noise there. Both
 * hints as int4's, on a third (32 KiB L1, 29-51 GB/s), against the L2 hint 4 KiB ahead alone, two
 * sets of three runs each order: 1.04-1.06x / 1.06-1.08x / 1.10-1.11x. */
constexpr int64_t kPanel24L1Ahead = 1024, kPanel24L2Ahead = 8192;

/* A decode loop turn's prefetch: its kVBytes of values (int8 values or int4 codes) at v and
 * its 64 bytes of meta at m, kPanel24L1Ahead bytes of values on into L1 and kPanel24L2Ahead
 * into L2, the meta as many turns on. */
template <int kVBytes>
PQ_ALWAYS_INLINE inline void panel24_decode_prefetch(const uint8_t* v, const uint8_t* m) {
  for (int l = 0; l < kVBytes; l += 64) PQ_PREFETCH_NEXT_TILE_L1(v + kPanel24L1Ahead + l);
  PQ_PREFETCH_NEXT_TILE_L1(m + kPanel24L1Ahead * 64 / kVBytes);
  for (int l = 0; l < kVBytes; l += 64) PQ_PREFETCH_NEXT_TILE(v + kPanel24L2Ahead + l);
  PQ_PREFETCH_NEXT_TILE(m + kPanel24L2Ahead * 64 / kVBytes);
}

/* The decode loops' accumulators, named (an array of them went through the stack, see
 * dot24_i8_panel_quad): the three terms' sums and the bias of each pair. QuadRows<1> (below)
 * holds the same but ties each to its register a step; the M = 1 loops on it ran slower: int8
 * 0.91-0.97x in the op (in-process A/B, both orders), int4 at group 64 5.4 cycles per 64
 * columns of a row in L1 where these take 2.8-3.3. */
struct QuadAcc {
  __m512i a00, a01, a02, ws0, a10, a11, a12, ws1;
  QuadAcc() : a00(_mm512_setzero_si512()), a01(a00), a02(a00), ws0(a00), a10(a00), a11(a00),
              a12(a00), ws1(a00) {}
};

/* One step s of both pairs at one row of x: their values w0, w1 (int4: code - zero), the
 * step's meta m (pair 0 at m, pair 1 at m + 16), x's three term rows at x0, x1, x2. */
PQ_ALWAYS_INLINE inline void quad_step(QuadAcc& q, __m512i w0, __m512i w1, const uint8_t* m,
                                       const uint8_t* x0, const uint8_t* x1, const uint8_t* x2,
                                       int64_t s) {
  const __m512i t0 = _mm512_load_si512(x0 + 64 * s), t1 = _mm512_load_si512(x1 + 64 * s),
                t2 = _mm512_load_si512(x2 + 64 * s);
  const __m512i i0 = panel24_index(m, 0), i1 = panel24_index(m, 1);
  const __m512i b128 = _mm512_set1_epi8((char)128);
  q.ws0 = _mm512_dpbusd_epi32(q.ws0, b128, w0);
  q.ws1 = _mm512_dpbusd_epi32(q.ws1, b128, w1);
  q.a00 = _mm512_dpbusd_epi32(q.a00, _mm512_shuffle_epi8(t0, i0), w0);
  q.a10 = _mm512_dpbusd_epi32(q.a10, _mm512_shuffle_epi8(t0, i1), w1);
  q.a01 = _mm512_dpbusd_epi32(q.a01, _mm512_shuffle_epi8(t1, i0), w0);
  q.a11 = _mm512_dpbusd_epi32(q.a11, _mm512_shuffle_epi8(t1, i1), w1);
  q.a02 = _mm512_dpbusd_epi32(q.a02, _mm512_shuffle_epi8(t2, i0), w0);
  q.a12 = _mm512_dpbusd_epi32(q.a12, _mm512_shuffle_epi8(t2, i1), w1);
  /* In sparse.cpp's build GCC copies 13 accumulators a turn of 16 products here (int8); tied
   * to their registers (as PanelRows::step) none, but the decode ran no faster for it (in-process
   * A/B at M = 1, both orders: 0.97-1.02x): the loop waits on memory. */
}

/* The int4 kernels' block sum: x's term rows are the digits of X + 2^23 (fixed24_u8 with
 * offset_digits), hi, mid and lo the three terms' sums against w = code - zero, b = 128
 * sum(w): 65536 (hi - b) + 256 mid + lo = sum X w, exact in wrapping int32 (|the sum| <= 16
 * 8323072 15 < 2^31 a dword lane in a block of up to 4 steps). Balanced digits each + 128
 * took b off all three terms: 2 subtractions more a block and pair, 3-5% of the decode loop
 * in L1 (4.62 -> 4.48 cycles per 64 columns at group 128, 5.61 -> 5.30 at 64). */
PQ_ALWAYS_INLINE inline __m512i i4_combine(__m512i hi, __m512i mid, __m512i lo, __m512i b) {
  return _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(_mm512_sub_epi32(hi, b), 16),
                                           _mm512_slli_epi32(mid, 8)),
                          lo);
}

/* The accumulators of one pair against T rows of x (M > 1), named and nested one level per
 * row as PanelRows (tile_vnni_panel.h), each tied to its register a step: as arrays GCC
 * carried them through the loop in chains of register copies (int8, 2 rows: 40 copies to 7
 * products). a0..a2: the three terms' sums. */
template <int T>
struct Pair24Rows {
  __m512i a0, a1, a2;
  Pair24Rows<T - 1> rest;
  Pair24Rows() : a0(_mm512_setzero_si512()), a1(a0), a2(a0) {}
  PQ_ALWAYS_INLINE void clear() {
    a0 = a1 = a2 = _mm512_setzero_si512();
    rest.clear();
  }
  /* one step: x points at this row's term 0 at the step's columns, its terms Kp apart and the
   * next row's 3 Kp further */
  PQ_ALWAYS_INLINE void step(const uint8_t* x, int64_t Kp, __m512i idx, __m512i w) {
    a0 = _mm512_dpbusd_epi32(a0, _mm512_shuffle_epi8(_mm512_load_si512(x), idx), w);
    a1 = _mm512_dpbusd_epi32(a1, _mm512_shuffle_epi8(_mm512_load_si512(x + Kp), idx), w);
    a2 = _mm512_dpbusd_epi32(a2, _mm512_shuffle_epi8(_mm512_load_si512(x + 2 * Kp), idx), w);
    asm("" : "+v"(a0), "+v"(a1), "+v"(a2));
    rest.step(x + 3 * Kp, Kp, idx, w);
  }
  /* fn(t, a0, a1, a2) for each row t */
  template <class Fn>
  PQ_ALWAYS_INLINE void each(Fn fn, int t = 0) const {
    fn(t, a0, a1, a2);
    rest.each(fn, t + 1);
  }
};
template <>
struct Pair24Rows<0> {
  PQ_ALWAYS_INLINE void clear() {}
  PQ_ALWAYS_INLINE void step(const uint8_t*, int64_t, __m512i, __m512i) {}
  template <class Fn>
  PQ_ALWAYS_INLINE void each(Fn, int = 0) const {}
};

/* Both pairs of a quad against T rows of x: each pair's Pair24Rows and its bias sum (128 x the
 * values' sum: int8's bias of each u8 term's sum, int4's of the hi term's). */
template <int T>
struct QuadRows {
  Pair24Rows<T> r0, r1;
  __m512i ws0, ws1;
  QuadRows() : ws0(_mm512_setzero_si512()), ws1(ws0) {}
  PQ_ALWAYS_INLINE void clear() {
    r0.clear();
    r1.clear();
    ws0 = ws1 = _mm512_setzero_si512();
  }
  /* one step: the pairs' values w0, w1 (int4: code - zero), the step's meta m, x's term 0 at
   * the step's columns */
  PQ_ALWAYS_INLINE void step(__m512i w0, __m512i w1, const uint8_t* m, const uint8_t* x,
                             int64_t Kp) {
    ws0 = _mm512_dpbusd_epi32(ws0, _mm512_set1_epi8((char)128), w0);
    ws1 = _mm512_dpbusd_epi32(ws1, _mm512_set1_epi8((char)128), w1);
    asm("" : "+v"(ws0), "+v"(ws1));
    r0.step(x, Kp, panel24_index(m, 0), w0);
    r1.step(x, Kp, panel24_index(m, 1), w1);
  }
};

/* dot24_i8_panel<2, 1> (decode: the whole quad against one row of x) with its accumulators
 * named (QuadAcc: fields, not an array) and two steps a loop turn. The generic loop's
 * accumulators went through an array in a struct, which GCC kept in a chain of register
 * copies and stored to the stack every step: 4.9-6.3 cycles per 64 columns of a row in L1
 * where this takes 3.4. */
inline void dot24_i8_panel_quad(const uint8_t* pv, const uint8_t* pm, int64_t K,
                                const uint8_t* xu, int64_t Kp, int32_t dot[4][1][3]) {
  QuadAcc q;
  for (int64_t s = 0; s < K / 64; s += 2) {
    const uint8_t* v = pv + 128 * s;
    const uint8_t* m = pm + 32 * s;
    panel24_decode_prefetch<256>(v, m); /* the two steps' values and meta */
    quad_step(q, _mm512_loadu_si512(v), _mm512_loadu_si512(v + 64), m, xu, xu + Kp, xu + 2 * Kp, s);
    quad_step(q, _mm512_loadu_si512(v + 128), _mm512_loadu_si512(v + 192), m + 32, xu, xu + Kp,
              xu + 2 * Kp, s + 1);
  }
  const __m512i ws[2] = {q.ws0, q.ws1};
  const __m512i acc[2][3] = {{q.a00, q.a01, q.a02}, {q.a10, q.a11, q.a12}};
  for (int p = 0; p < 2; ++p)
    for (int r = 0; r < 2; ++r) {
      const uint32_t bias = (uint32_t)_mm512_mask_reduce_add_epi32(kPanel24Dw[r], ws[p]);
      for (int j = 0; j < 3; ++j)
        dot[2 * p + r][0][j] = (int32_t)((uint32_t)_mm512_mask_reduce_add_epi32(kPanel24Dw[r], acc[p][j]) - bias);
    }
}

/* dot[2 p + r][t][j] = the exact int32 sum over pair p's row r of xterm_j[col] * value against
 * x row t (as dot24_i8_fx2: x u8-biased, the bias 128 * sum(values) taken off, wrapping
 * unsigned arithmetic), both pairs of the quad (pv, pm: its panel) a pass (sparse.cpp,
 * panel24_fx_quad). T = 1: dot24_i8_panel_quad; T > 1: each pair its own named accumulators
 * (Pair24Rows; as an array GCC carried them in chains of register copies: 3.96
 * cycles per 64 columns of a weight row and a row of x in L1 at T = 2, one pair a pass; named,
 * 1.8-2.0, and both pairs a pass 1.5-1.7: benchmarks/sparse24_panel_loop.py). */
template <int T>
inline void dot24_i8_panel(const uint8_t* pv, const uint8_t* pm, int64_t K, const uint8_t* xu,
                           int64_t Kp, int32_t dot[4][T][3]) {
  if constexpr (T == 1) {
    dot24_i8_panel_quad(pv, pm, K, xu, Kp, dot);
  } else {
    QuadRows<T> q;
    for (int64_t s = 0; s < K / 64; ++s) {
      const uint8_t* v = pv + 128 * s;
      const uint8_t* m = pm + 32 * s;
      if (s % 2 == 0) { /* as dot24_i8_panel_quad */
        PQ_PREFETCH_NEXT_TILE(v + kPanel24I8Ahead);
        PQ_PREFETCH_NEXT_TILE(v + kPanel24I8Ahead + 64);
        PQ_PREFETCH_NEXT_TILE(v + kPanel24I8Ahead + 128);
        PQ_PREFETCH_NEXT_TILE(v + kPanel24I8Ahead + 192);
        PQ_PREFETCH_NEXT_TILE(m + kPanel24I8Ahead / 4);
      }
      q.step(_mm512_loadu_si512(v), _mm512_loadu_si512(v + 64), m, xu + 64 * s, Kp);
    }
    /* each pair's rows by name: a reference chosen at run time (p ? q.r1 : q.r0) put both
     * accumulator sets on the stack, loop and all */
    auto reduce = [&](const Pair24Rows<T>& rows, __m512i ws, int p) PQ_ALWAYS_INLINE {
      for (int r = 0; r < 2; ++r) {
        const uint32_t bias = (uint32_t)_mm512_mask_reduce_add_epi32(kPanel24Dw[r], ws);
        rows.each([&](int t, __m512i a0, __m512i a1, __m512i a2) {
          const __m512i a[3] = {a0, a1, a2};
          for (int j = 0; j < 3; ++j) /* unsigned: the bias removal wraps, not overflows */
            dot[2 * p + r][t][j] =
                (int32_t)((uint32_t)_mm512_mask_reduce_add_epi32(kPanel24Dw[r], a[j]) - bias);
        });
      }
    };
    reduce(q.r0, q.ws0, 0);
    reduce(q.r1, q.ws1, 1);
  }
}


/* dot24_i4_panel<2, 1> (decode: the whole quad against one row of x) for G % 64 == 0, with
 * its accumulators named (QuadAcc) and a block of kBlock steps unrolled (the arithmetic and
 * order of the generic loop, so the same floats): 5.3-5.5 -> 4.6 cycles per 64 columns of a
 * row at group 128, 7.2-7.7 -> 5.6 at group 64, in L1. */
template <int kBlock>
inline void dot24_i4_panel_quad(const uint8_t* pc, const uint8_t* pm, int64_t K, const float* sc,
                                const uint8_t* zp, int64_t ng, int64_t G, const uint8_t* xu,
                                int64_t Kp, float dot[4][1]) {
  constexpr __mmask64 kRowB = 0xFF00FF00FF00FF00ull; /* odd qwords */
  const __m512i nib = _mm512_set1_epi8(0x0F);
  prefetch_next_groups<4>(sc, zp, ng);
  __m512 f0 = _mm512_setzero_ps(), f1 = _mm512_setzero_ps();
  const int64_t blocks_g = G / 32 / kBlock;
  for (int64_t g = 0; g < ng; ++g) {
    const __m512i z0 = _mm512_mask_set1_epi8(_mm512_set1_epi8((char)zp[g]), kRowB, (char)zp[ng + g]);
    const __m512i z1 = _mm512_mask_set1_epi8(_mm512_set1_epi8((char)zp[2 * ng + g]), kRowB, (char)zp[3 * ng + g]);
    const __m512 s0 = _mm512_mask_blend_ps(kPanel24Dw[1], _mm512_set1_ps(sc[g]), _mm512_set1_ps(sc[ng + g]));
    const __m512 s1 = _mm512_mask_blend_ps(kPanel24Dw[1], _mm512_set1_ps(sc[2 * ng + g]), _mm512_set1_ps(sc[3 * ng + g]));
    for (int64_t b = 0; b < blocks_g; ++b) {
      const int64_t d0 = (g * blocks_g + b) * kBlock / 2; /* the block's first double step */
      QuadAcc q;
      auto half = [&](__m512i r0, __m512i r1, const uint8_t* m, int64_t s) PQ_ALWAYS_INLINE {
        quad_step(q, _mm512_sub_epi8(_mm512_and_si512(r0, nib), z0),
                  _mm512_sub_epi8(_mm512_and_si512(r1, nib), z1), m, xu, xu + Kp, xu + 2 * Kp, s);
      };
      for (int e = 0; e < kBlock / 2; ++e) {
        const int64_t d = d0 + e;
        const uint8_t* c = pc + 128 * d;
        const uint8_t* m = pm + 64 * d;
        panel24_decode_prefetch<128>(c, m);
        const __m512i r0 = _mm512_loadu_si512(c), r1 = _mm512_loadu_si512(c + 64);
        half(r0, r1, m, 2 * d);
        half(_mm512_srli_epi16(r0, 4), _mm512_srli_epi16(r1, 4), m + 32, 2 * d + 1);
      }
      const __m512i q0 = i4_combine(q.a00, q.a01, q.a02, q.ws0);
      const __m512i q1 = i4_combine(q.a10, q.a11, q.a12, q.ws1);
      f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q0), s0, f0);
      f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q1), s1, f1);
    }
  }
  dot[0][0] = _mm512_mask_reduce_add_ps(kPanel24Dw[0], f0);
  dot[1][0] = _mm512_mask_reduce_add_ps(kPanel24Dw[1], f0);
  dot[2][0] = _mm512_mask_reduce_add_ps(kPanel24Dw[0], f1);
  dot[3][0] = _mm512_mask_reduce_add_ps(kPanel24Dw[1], f1);
}

/* dot24_i4_panel for T > 1 (M > 1; and T = 1 where G % 64 != 0): both pairs a pass against T
 * rows of x, each pair's accumulators named (Pair24Rows), blocks of kBlock steps (4, 2
 * unrolled; 0: up to 4 counted at run time). */
template <int T, int kBlock>
inline void dot24_i4_quad_rows(const uint8_t* pc, const uint8_t* pm, int64_t K, const float* sc,
                               const uint8_t* zp, int64_t ng, int64_t G, const uint8_t* xu,
                               int64_t Kp, float dot[4][T]) {
  constexpr __mmask64 kRowB = 0xFF00FF00FF00FF00ull; /* odd qwords */
  const __m512i nib = _mm512_set1_epi8(0x0F);
  prefetch_next_groups<4>(sc, zp, ng);
  QuadRows<T> q;
  __m512 f[2][T];
  for (int p = 0; p < 2; ++p)
    for (int t = 0; t < T; ++t) f[p][t] = _mm512_setzero_ps();
  const int64_t steps_g = G / 32;
  for (int64_t g = 0; g < ng; ++g) {
    const __m512i z0 = _mm512_mask_set1_epi8(_mm512_set1_epi8((char)zp[g]), kRowB, (char)zp[ng + g]);
    const __m512i z1 = _mm512_mask_set1_epi8(_mm512_set1_epi8((char)zp[2 * ng + g]), kRowB, (char)zp[3 * ng + g]);
    const __m512 s0 = _mm512_mask_blend_ps(kPanel24Dw[1], _mm512_set1_ps(sc[g]), _mm512_set1_ps(sc[ng + g]));
    const __m512 s1 = _mm512_mask_blend_ps(kPanel24Dw[1], _mm512_set1_ps(sc[2 * ng + g]), _mm512_set1_ps(sc[3 * ng + g]));
    for (int64_t st0 = g * steps_g; st0 < (g + 1) * steps_g; st0 += kBlock ? kBlock : 4) {
      q.clear();
      /* step st: its half (the high nibbles at odd steps) of double step st / 2 */
      auto one = [&](int64_t st, bool hi) PQ_ALWAYS_INLINE {
        const uint8_t* c = pc + 128 * (st / 2);
        const uint8_t* m = pm + 64 * (st / 2) + 32 * (st % 2);
        if (!hi) {
          PQ_PREFETCH_NEXT_TILE(c + kPanel24I4Ahead);
          PQ_PREFETCH_NEXT_TILE(c + kPanel24I4Ahead + 64);
          PQ_PREFETCH_NEXT_TILE(pm + 64 * (st / 2) + kPanel24I4Ahead / 2);
        }
        __m512i w0 = _mm512_loadu_si512(c), w1 = _mm512_loadu_si512(c + 64);
        if (hi) w0 = _mm512_srli_epi16(w0, 4), w1 = _mm512_srli_epi16(w1, 4);
        q.step(_mm512_sub_epi8(_mm512_and_si512(w0, nib), z0),
               _mm512_sub_epi8(_mm512_and_si512(w1, nib), z1), m, xu + 64 * st, Kp);
      };
      if constexpr (kBlock > 0) {
        one(st0, false);
        one(st0 + 1, true);
        if constexpr (kBlock == 4) {
          one(st0 + 2, false);
          one(st0 + 3, true);
        }
      } else {
        const int64_t st1 = st0 + 4 < (g + 1) * steps_g ? st0 + 4 : (g + 1) * steps_g;
        for (int64_t st = st0; st < st1; ++st) one(st, st % 2 != 0);
      }
      q.r0.each([&](int t, __m512i a0, __m512i a1, __m512i a2) {
        f[0][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i4_combine(a0, a1, a2, q.ws0)), s0, f[0][t]);
      });
      q.r1.each([&](int t, __m512i a0, __m512i a1, __m512i a2) {
        f[1][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i4_combine(a0, a1, a2, q.ws1)), s1, f[1][t]);
      });
    }
  }
  for (int p = 0; p < 2; ++p)
    for (int r = 0; r < 2; ++r)
      for (int t = 0; t < T; ++t) dot[2 * p + r][t] = _mm512_mask_reduce_add_ps(kPanel24Dw[r], f[p][t]);
}

/* dot[2 p + r][t] = sum over pair p's row r's kept values of x_t[col] * (code - zero) *
 * scale, in units of x row t's lo-term scale (as dot24_i4_fx2, whose arithmetic this is:
 * exact int32 sums of the three terms per block of at most 4 steps within a group, combined
 * in int32 with the bias taken off the hi term (i4_combine), one convert and one FMA by the
 * group scale), both pairs of the quad a pass (sparse.cpp, panel24_fx_quad). pc, pm: the
 * quad's panel; sc, zp: its rows' scales and zero points ([4][ng], canonical); G % 32 == 0,
 * zero points <= 15.
 *
 * A block of 4 (G % 128 == 0) or 2 (G % 64 == 0) steps starting at an even step is unrolled
 * at compile time: with the step count known only at run time, GCC kept the accumulators in
 * a chain of register copies and redid the parity arithmetic each step, ~60 instructions a
 * step where the vector work is ~30 (5.3 cycles per 64 columns of a row in L2). At T > 1 the
 * loop took one pair a pass, 4 rows of x, its accumulators in arrays; both pairs and 2 rows,
 * named, ran 1.27-1.57x faster at M = 2-16 (in-process A/B, 2-core Zen 5, 4096 x 4096 and
 * 4096 x 11008, geometric mean of both orders). */
template <int T>
inline void dot24_i4_panel(const uint8_t* pc, const uint8_t* pm, int64_t K, const float* sc,
                           const uint8_t* zp, int64_t ng, int64_t G, const uint8_t* xu,
                           int64_t Kp, float dot[4][T]) {
  if constexpr (T == 1) {
    if (G % 128 == 0) return dot24_i4_panel_quad<4>(pc, pm, K, sc, zp, ng, G, xu, Kp, dot);
    if (G % 64 == 0) return dot24_i4_panel_quad<2>(pc, pm, K, sc, zp, ng, G, xu, Kp, dot);
  }
  if (G % 128 == 0) return dot24_i4_quad_rows<T, 4>(pc, pm, K, sc, zp, ng, G, xu, Kp, dot);
  if (G % 64 == 0) return dot24_i4_quad_rows<T, 2>(pc, pm, K, sc, zp, ng, G, xu, Kp, dot);
  dot24_i4_quad_rows<T, 0>(pc, pm, K, sc, zp, ng, G, xu, Kp, dot);
}
#endif

}  // namespace
}  // namespace PQ_NS
#endif /* PQ_CPU_TILE_SPARSE24_FX_PANEL_H */
