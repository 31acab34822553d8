/* The 2:4 + int8 / int4 panel kernels' inner loops alone (csrc/cpu/tile_sparse24_fx_panel.h),
 * on one quad whose panel sits in L1, one thread: cycles per 64 columns of a weight row and
 * row of x, next to the same instruction mix from registers (no loads past the first level,
 * no group flush), which is how far the loop could go on this core. Then the decode loops
 * over a weight of 4096 x 4096 streamed from memory (copies rotated through 256 MB, one
 * thread): where their cycles exceed the L1 ones, the loads wait on memory.
 *
 * Built and run by benchmarks/sparse24_panel_loop.py (the flags of the AVX512-BF16 build).
 * The core clock is measured here (a chain of dependent adds retires one a cycle), so the
 * cycles do not depend on the time-stamp counter's rate. Every result feeds a sum that is
 * printed, so that the compiler cannot drop the work. */
#define PQ_NS bench
#include "tile_sparse24_fx_panel.h"
#include "loop_timing.h"

#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <vector>

using namespace bench;
using loop_timing::best_seconds;
using loop_timing::core_hz;

namespace {

/* The decode step's instructions from registers: both pairs of a quad, three x terms, the
 * index (broadcast, shift, AND/OR), the bias, and (int4) the nibble unpack; no flush. Cycles
 * a step (4 weight rows x 64 columns). Named accumulators: in an array GCC keeps them on the
 * stack, which this would then time too. */
double mix_cycles(bool int4, double hz, int passes) {
  alignas(64) static uint8_t buf[1 << 15];
  for (int i = 0; i < (1 << 15); ++i) buf[i] = (uint8_t)(i * 7);
  const int steps = 200000;
  long long sink = 0;
  const double t = best_seconds([&] {
    __m512i a0 = _mm512_set1_epi32(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    const __m512i three = _mm512_set1_epi8(3), nib = _mm512_set1_epi8(0x0F),
                  zb = _mm512_set1_epi8(8), b128 = _mm512_set1_epi8((char)128);
    const __m512i base = _mm512_loadu_si512(kPanel24.base);
    const __m512i by_lane = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
    auto pair = [&](const uint8_t* p, const __m512i* xt, bool hi, __m512i& ws, __m512i& c0,
                    __m512i& c1, __m512i& c2) PQ_ALWAYS_INLINE {
      __m512i w = _mm512_load_si512(p);
      if (int4) {
        if (hi) w = _mm512_srli_epi16(w, 4);
        w = _mm512_sub_epi8(_mm512_and_si512(w, nib), zb);
      }
      const __m512i mq = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(p + 128)));
      const __m512i idx = _mm512_ternarylogic_epi32(_mm512_srlv_epi32(mq, by_lane), three, base, 0xEA);
      ws = _mm512_dpbusd_epi32(ws, b128, w);
      c0 = _mm512_dpbusd_epi32(c0, _mm512_shuffle_epi8(xt[0], idx), w);
      c1 = _mm512_dpbusd_epi32(c1, _mm512_shuffle_epi8(xt[1], idx), w);
      c2 = _mm512_dpbusd_epi32(c2, _mm512_shuffle_epi8(xt[2], idx), w);
    };
    for (int it = 0; it < steps; it += 2) {
      const uint8_t* p = buf + (it & 31) * 256;
      for (int h = 0; h < 2; ++h) {
        __m512i xt[3];
        for (int j = 0; j < 3; ++j)
          xt[j] = _mm512_load_si512(buf + 16384 + 4096 * j + ((it + h) & 31) * 64);
        pair(p, xt, h, a0, a1, a2, a3);
        pair(p + 64, xt, h, a4, a5, a6, a7);
      }
    }
    __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                                 _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
    sink += _mm512_reduce_add_epi32(s);
  }, 1, passes);
  if (sink == 1) std::printf(" ");
  return t * hz / steps;
}

}  // namespace

int main(int argc, char** argv) {
  /* group sizes in kept values, as the op's group_size (a group spans twice the columns) */
  const int reps = argc > 1 ? std::atoi(argv[1]) : 2000;
  const int passes = argc > 2 ? std::atoi(argv[2]) : 25;
  /* K: 4096, or the third argument (a multiple of 128; 11008 puts x's terms past a 32 KiB L1) */
  const int64_t K = argc > 3 ? std::atoll(argv[3]) / 128 * 128 : 4096;
  const int64_t Kp = K + 64; /* x term rows a line past whole steps (as the op) */
  std::vector<uint8_t> pv(2 * K + 4096), pm(K / 2 + 4096), zp(4 * K);
  std::vector<float> sc(4 * K, 0.01f);
  for (auto& b : pv) b = (uint8_t)std::rand();
  for (auto& b : pm) b = (uint8_t)std::rand();
  for (auto& z : zp) z = (uint8_t)(std::rand() & 15);
  std::vector<uint8_t> xu_buf(4 * 3 * Kp + 64);
  uint8_t* xu = (uint8_t*)(((uintptr_t)xu_buf.data() + 63) / 64 * 64);
  for (int64_t i = 0; i < 4 * 3 * Kp; ++i) xu[i] = (uint8_t)std::rand();

  const double hz = core_hz(passes);
  const double row64 = 4.0 * K / 64; /* 64-column blocks of the quad's 4 rows */
  double sink = 0;
  std::printf("core clock %.2f GHz (measured); one quad of K = %lld, one thread\n", hz / 1e9,
              (long long)K);
  std::printf("cycles per 64 columns of a weight row and row of x:\n");
  {
    int32_t d[4][1][3];
    const double t = best_seconds([&] {
      dot24_i8_panel<1>(pv.data(), pm.data(), K, xu, Kp, d);
      for (auto& r : d) sink += r[0][0] + r[0][1] + r[0][2];
    }, reps, passes);
    std::printf("  %-44s %5.2f\n", "int8 decode (both pairs, 1 x row)", t * hz / row64);
  }
  {
    int32_t d[4][2][3]; /* int8 takes blocks of 2 rows of x (sparse.cpp, panel24_fx_quad) */
    const double t = best_seconds([&] {
      dot24_i8_panel<2>(pv.data(), pm.data(), K, xu, Kp, d);
      for (auto& r : d)
        for (auto& u : r) sink += u[0] + u[1] + u[2];
    }, reps / 2, passes);
    std::printf("  %-44s %5.2f\n", "int8 both pairs, 2 x rows a pass (M > 1)", t * hz / row64 / 2);
  }
  for (int64_t G : {128, 64}) {
    const int64_t ng = K / 2 / G; /* group size in kept values, as the op's group_size */
    float d[4][1];
    const double t = best_seconds([&] {
      dot24_i4_panel<1>(pv.data(), pm.data(), K, sc.data(), zp.data(), ng, G, xu, Kp, d);
      for (auto& r : d) sink += r[0];
    }, reps, passes);
    float e[4][2];
    const double t2 = best_seconds([&] {
      dot24_i4_panel<2>(pv.data(), pm.data(), K, sc.data(), zp.data(), ng, G, xu, Kp, e);
      for (auto& r : e) sink += r[0] + r[1];
    }, reps / 2, passes);
    char name[64];
    std::snprintf(name, sizeof name, "int4 group %lld decode (both pairs, 1 x row)", (long long)G);
    std::printf("  %-44s %5.2f\n", name, t * hz / row64);
    std::snprintf(name, sizeof name, "int4 group %lld, 2 x rows a pass (M > 1)", (long long)G);
    std::printf("  %-44s %5.2f\n", name, t2 * hz / row64 / 2);
  }
  {
    /* from memory: 4096 rows (1024 quads) a copy, copies past 256 MB in all */
    const int64_t N = 4096, quads = N / 4, ng = K / 2 / 128;
    const int64_t i8_bytes = quads * (2 * K + K / 2), i4_bytes = quads * (K + K / 2);
    const int copies = (int)((256ll << 20) / i4_bytes + 1);
    std::vector<uint8_t> big((size_t)copies * i8_bytes + 4096);
    for (size_t i = 0; i < big.size(); i += 64) big[i] = (uint8_t)std::rand();
    std::vector<float> bsc(N * ng, 0.01f);
    std::vector<uint8_t> bzp(N * ng, 8);
    std::printf("decode from memory (4096 x %lld, %d copies rotated, one thread):\n", (long long)K,
                copies);
    for (int bits : {8, 4}) {
      const int64_t bytes = bits == 8 ? i8_bytes : i4_bytes, vq = bits == 8 ? 2 * K : K;
      int c = 0;
      const double t = best_seconds([&] {
        const uint8_t* v = big.data() + (size_t)(c++ % copies) * bytes;
        const uint8_t* m = v + quads * vq;
        for (int64_t q = 0; q < quads; ++q) {
          if (bits == 8) {
            int32_t d[4][1][3];
            dot24_i8_panel<1>(v + q * vq, m + q * K / 2, K, xu, Kp, d);
            for (auto& r : d) sink += r[0][0] + r[0][1] + r[0][2]; /* every output: see below */
          } else {
            float d[4][1];
            dot24_i4_panel<1>(v + q * vq, m + q * K / 2, K, bsc.data() + 4 * q * ng,
                              bzp.data() + 4 * q * ng, ng, 128, xu, Kp, d);
            /* every row's result feeds the sum: with only row 0's, the compiler dropped the
             * other pair's accumulators, shuffles and products, and the loop timed ~half of
             * the kernel (int4: 2.5-3.0 cycles per 64 columns with the weight in L3, where
             * the op takes 5.2-5.5) */
            for (auto& r : d) sink += r[0];
          }
        }
      }, copies, std::max(3, passes / 5));
      char name[64];
      std::snprintf(name, sizeof name, "%s (%.1f GB/s)", bits == 8 ? "int8" : "int4 group 128",
                    bytes / t / 1e9);
      std::printf("  %-44s %5.2f\n", name, t * hz / (N * K / 64.0));
    }
  }
  std::printf("the decode step's instruction mix from registers (no flush, no memory):\n");
  std::printf("  %-44s %5.2f\n  %-44s %5.2f\n", "int8", mix_cycles(false, hz, passes) / 4, "int4",
              mix_cycles(true, hz, passes) / 4);
  std::printf("(checksum %g)\n", sink);
  return 0;
}
