/* Shared by every ISA build of kernels.cpp: which SIMD path this build uses,
 * the register-tile shape, and the thread partitioning of the output.
 *
 * Everything here lives in PQ_NS inside an anonymous namespace. That matters:
 * the same inline code is compiled three times with different -m flags, and a
 * symbol shared between the builds (a COMDAT inline function or template)
 * would let the linker keep the AVX512 copy and call it from the portable
 * path. For the same reason this file and the kernels avoid C++ standard
 * library templates.
 */
#ifndef PQ_CPU_COMMON_H
#define PQ_CPU_COMMON_H
#include <stdint.h>

#ifndef PQ_NS
#error "PQ_NS must name the namespace of this ISA build (set by CMake)"
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__AVX512VNNI__)
#define PQ_SIMD_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PQ_SIMD_AVX2 1
#include <immintrin.h>
#endif

/* Per-step lambdas and helpers that must be inlined into their loops: called out of line
 * (GCC's heuristics do so for bodies this size) their accumulators live in memory and each
 * step pays a call and a vzeroupper, ~2.5x slower (the sparse loops, tile_sparse.h). */
#define PQ_ALWAYS_INLINE __attribute__((always_inline))

/* The dot-product loops stream kTileN weight rows at a time, each only K or
 * K/2 bytes long: too short for the hardware prefetchers to ramp up before the
 * tile moves on, so at M = 1 a thread waited on memory for about half of its
 * time. Each loop therefore prefetches, as it reads a line of row r, the same
 * line of row r + R: the next tile's rows, read one tile's time later.
 * Measured (4096 x 4096, M = 1, 2 threads, weights rotated through 500 MB):
 * int8 0.58 -> 0.8-1.0 and int4 0.4 -> 0.6-0.8 of the read bandwidth (as the
 * one-stream probe of then measured it, ~1.4x below the eight-stream one); a
 * distance of two tiles was no better. Past the last tile it prefetches bytes
 * the call does not read: a prefetch never faults.
 *
 * The hint is T1 (into L2), not T0 (into L1): a T0 prefetch holds one of the
 * core's few L1 miss buffers until its line arrives, and on a Zen 4 core those
 * ran out first. In a tile-shaped read loop (4 rows of 2 KiB, 512 MB, light
 * work a line) one thread read 12.2 GB/s with T0, 18.3 with T1 and 8.9 with no
 * prefetch; two threads 24.2 and 37.8. In the kernels (2 threads, 4096 x 4096
 * int4, M = 1, weights rotated through 107 MB): int4 weight-only 20 -> 31 GB/s
 * and W4A8 21 -> 32-36; the L2 -> L1 step that is left to the loads hides
 * behind the out-of-order window. Adding a T0 prefetch one tile ahead on top
 * of a T1 one two tiles ahead bought nothing more.
 *
 * The AVX2 bodies prefetch the same way. Their A/B (benchmarks/ab_inprocess.py,
 * both orders, 2 threads, M = 1, the AVX2 path forced on a Xeon): int8
 * weight-only 1.03-1.22x, int8 dynamic 1.08-1.14x, int4 weight-only
 * 1.03-1.24x, W4A8 1.17-1.50x on the three Llama-2-7B shapes. */
#if (defined(PQ_SIMD_AVX512) || defined(PQ_SIMD_AVX2)) && !defined(PQ_NO_PREFETCH)
#define PQ_PREFETCH_NEXT_TILE(p) _mm_prefetch((const char*)(p), _MM_HINT_T1)
#define PQ_PREFETCH_NEXT_TILE_L1(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)
#else
#define PQ_PREFETCH_NEXT_TILE(p) ((void)0)
#define PQ_PREFETCH_NEXT_TILE_L1(p) ((void)0)
#endif

namespace PQ_NS {
namespace {
/* The next tile's per-group scales and zero points (rows n + R .. n + 2R - 1,
 * contiguous after this tile's): a few lines per tile, prefetched up front. */
template <int R>
inline void prefetch_next_groups(const float* sc, const uint8_t* zp, int64_t ng) {
#if (defined(PQ_SIMD_AVX512) || defined(PQ_SIMD_AVX2)) && !defined(PQ_NO_PREFETCH)
  const char* s = (const char*)(sc + R * ng);
  const char* z = (const char*)(zp + R * ng);
  for (int64_t b = 0; b < R * ng * 4; b += 64) _mm_prefetch(s + b, _MM_HINT_T0);
  for (int64_t b = 0; b < R * ng; b += 64) _mm_prefetch(z + b, _MM_HINT_T0);
#else
  (void)sc, (void)zp, (void)ng;
#endif
}
}  // namespace
}  // namespace PQ_NS

namespace PQ_NS {
namespace {

#if defined(PQ_SIMD_AVX512)
/* In-register transpose of a 16 x 16 matrix of 32-bit elements: r[i] holds row
 * i on entry and column i on return. 64 shuffles, where 16 scatters or gathers
 * would cost several times that: the activation packing and the epilogues of
 * every AMX path go through it, and the W4A8 panels (tile_vnni_panel.h). */
inline void transpose16x16(__m512i r[16]) {
  __m512i u[16]; /* u[4g + c]: rows 4g..4g+3, column 4L + c in 128-bit lane L */
  for (int g = 0; g < 4; ++g) {
    const __m512i t0 = _mm512_unpacklo_epi32(r[4 * g], r[4 * g + 1]);
    const __m512i t1 = _mm512_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
    const __m512i t2 = _mm512_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]);
    const __m512i t3 = _mm512_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
    u[4 * g] = _mm512_unpacklo_epi64(t0, t2);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
  }
  for (int c = 0; c < 4; ++c) { /* gather lane L of the four row groups: column 4L + c */
    const __m512i a = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);       /* lanes 0, 2 */
    const __m512i b = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);       /* lanes 1, 3 */
    const __m512i e = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i f = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_i32x4(a, e, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(a, e, 0xDD);
    r[4 + c] = _mm512_shuffle_i32x4(b, f, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(b, f, 0xDD);
  }
}
#endif

}  // namespace
}  // namespace PQ_NS

namespace PQ_NS {
namespace {

/* A micro-tile is kTileN weight rows x kTileM activation rows: every weight
 * vector loaded is used kTileM times and every x vector kTileN times, with all
 * kTileN * kTileM accumulators held in registers. */
constexpr int kTileN = 4;
#if defined(PQ_SIMD_AVX512)
constexpr int kTileM = 4; /* 32 zmm: 16 accumulators + 4 x + weights */
#else
constexpr int kTileM = 2; /* 16 ymm/xmm: 8 accumulators + x + weights */
#endif
/* Activation rows per task when M is large: a 64-row x block (256 KiB of fp32
 * at K = 1024) stays in L2 while the task's weight rows are swept over it. */
constexpr int64_t kBlockM = 64;
/* At most this many weight rows per task (64 x K bytes of int8 weights). */
constexpr int64_t kMaxBlockN = 64;

#if defined(PQ_SIMD_AVX512) || defined(PQ_SIMD_AVX2)
/* The sum of a ymm's 8 floats (the AVX2 tiles' epilogues). */
inline float hsum256(__m256 a) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#endif

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int V>
struct Int {
  static constexpr int value = V;
};

/* Calls f(Int<R>{}, Int<T>{}) with R == nr and T == mt, so the tile loops see
 * compile-time bounds and the compiler keeps the accumulators in registers. */
template <int R, int T, class F>
inline void dispatch_t(int mt, F& f) {
  if constexpr (T > 1) {
    if (mt < T) return dispatch_t<R, T - 1>(mt, f);
  }
  f(Int<R>{}, Int<T>{});
}
template <int R, class F>
inline void dispatch_tile(int nr, int mt, F&& f) {
  if constexpr (R > 1) {
    if (nr < R) return dispatch_tile<R - 1>(nr, mt, f);
  }
  dispatch_t<R, kTileM>(mt, f);
}

/* Runs tile(n, nr, m, mt, first, scratch) over the M x N output in micro-tiles.
 *
 * Tasks are blocks of whole weight rows, so each thread streams its own
 * slices of the weight matrix (the dominant memory traffic for small M) once
 * per M block; M is blocked only when large. There are at least about four
 * blocks per thread (of at most kMaxBlockN rows), handed out dynamically: a
 * thread that loses its core to another process does not hold the others up,
 * they take over its blocks. `first` is true for the first micro-tile of a
 * weight-row tile within a task, and `scratch` (kTileN int32) persists across
 * that row tile's activation tiles: kernels cache per-weight-row values there. */
template <class F>
void for_each_tile(int64_t M, int64_t N, int n_threads, F&& tile) {
  int64_t nb = ceil_div(ceil_div(N, (int64_t)n_threads * 4), kTileN) * kTileN;
  nb = nb > kMaxBlockN ? kMaxBlockN : nb;
  const int64_t mb = min64(M, kBlockM);
  const int64_t n_mblk = ceil_div(M, mb);
  const int64_t tasks = ceil_div(N, nb) * n_mblk;
  const int threads = tasks < n_threads ? (int)tasks : n_threads;
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (threads > 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t n0 = task / n_mblk * nb, m0 = task % n_mblk * mb;
    const int64_t n1 = min64(n0 + nb, N), m1 = min64(m0 + mb, M);
    for (int64_t n = n0; n < n1; n += kTileN) {
      int32_t scratch[kTileN];
      for (int64_t m = m0; m < m1; m += kTileM)
        tile(n, (int)min64(kTileN, n1 - n), m, (int)min64(kTileM, m1 - m), m == m0, scratch);
    }
  }
}

#if defined(PQ_SIMD_AVX512)
/* True when every x[m, k] is a bf16 value (its low 16 bits are zero): the paths that
 * multiply bf16 exactly choose themselves by it. */
inline bool rows_are_bf16(const float* x, int64_t M, int64_t K, int64_t ldx) {
  const __m512i low = _mm512_set1_epi32(0xFFFF);
  for (int64_t m = 0; m < M; ++m) {
    const int32_t* r = (const int32_t*)(x + m * ldx);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      if (_mm512_test_epi32_mask(_mm512_loadu_si512(r + k), low)) return false;
    if (k < K && _mm512_mask_test_epi32_mask((__mmask16)((1u << (K - k)) - 1),
                                             _mm512_maskz_loadu_epi32((__mmask16)((1u << (K - k)) - 1), r + k), low))
      return false;
  }
  return true;
}
#endif

}  // namespace
}  // namespace PQ_NS
#endif /* PQ_CPU_COMMON_H */
