/* The unstructured kernels' loops alone (csrc/cpu/tile_sparse.h, sparse_decompress.h), one
 * thread, rows of K = 4096 at 30% kept: cycles per 64 columns of a weight row, with 16 rows
 * in cache (their values and masks, 80 KB, in L2), and the bf16 and fp32 decode loops over a
 * 4096 x 4096 weight streamed from memory (copies rotated through 256 MB). First, the fact the
 * loops are built around: a vpexpandw load waits on its destination register on Zen 4, so
 * a chain of expands into one register is much slower than expands into several.
 *
 * Built and run by benchmarks/unstructured_loop.py (the flags of the AVX512-BF16 build).
 * Every result feeds a sum that is printed, so that the compiler cannot drop the work. */
#define PQ_NS bench
#include "sparse_decompress.h"
#include "tile_sparse.h"
#include "loop_timing.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

using namespace bench;
using loop_timing::best_seconds;
using loop_timing::core_hz;

namespace {

/* Cycles a vpexpandw load, four a turn, into one register (each waits on the last) or four. */
double expand_cycles(bool same, double hz, int passes) {
  alignas(64) static uint16_t buf[1024];
  const long n = 1000000;
  const double t = best_seconds([&] {
    for (long i = 0; i < n; ++i) {
      if (same)
        __asm__ volatile(
            "mov $0x5a5a1234, %%eax\n\tkmovd %%eax, %%k1\n\t"
            "vpexpandw (%0), %%zmm5%{%%k1%}%{z%}\n\tvpexpandw 64(%0), %%zmm5%{%%k1%}%{z%}\n\t"
            "vpexpandw 128(%0), %%zmm5%{%%k1%}%{z%}\n\tvpexpandw 192(%0), %%zmm5%{%%k1%}%{z%}"
            ::"r"(buf) : "eax", "xmm5", "memory");
      else
        __asm__ volatile(
            "mov $0x5a5a1234, %%eax\n\tkmovd %%eax, %%k1\n\t"
            "vpexpandw (%0), %%zmm5%{%%k1%}%{z%}\n\tvpexpandw 64(%0), %%zmm6%{%%k1%}%{z%}\n\t"
            "vpexpandw 128(%0), %%zmm7%{%%k1%}%{z%}\n\tvpexpandw 192(%0), %%zmm8%{%%k1%}%{z%}"
            ::"r"(buf) : "eax", "xmm5", "xmm6", "xmm7", "xmm8", "memory");
    }
  }, 1, passes);
  return t * hz / (4.0 * n);
}

/* rows x K bitmask at 30% kept (a fixed seed), its row offsets, and values of both widths */
struct Weight {
  int64_t rows, K, ldb, nnz;
  std::vector<uint8_t> bm;
  std::vector<int64_t> off;
  std::vector<uint16_t> v16;
  std::vector<float> v32;
  Weight(int64_t rows_, int64_t K_) : rows(rows_), K(K_), ldb((K_ + 7) / 8), off(rows_ + 1, 0) {
    bm.assign(rows * ldb, 0);
    std::srand(1);
    for (int64_t n = 0; n < rows; ++n) {
      int64_t c = 0;
      for (int64_t k = 0; k < K; ++k)
        if (std::rand() % 10 < 3) {
          bm[n * ldb + k / 8] |= (uint8_t)(1u << (k % 8));
          ++c;
        }
      off[n + 1] = off[n] + c;
    }
    nnz = off[rows];
    v16.resize(nnz + 64);
    v32.resize(nnz + 64);
    for (int64_t i = 0; i < nnz + 64; ++i) {
      v16[i] = (uint16_t)(0x3f80 + (std::rand() & 0x3f));
      const uint32_t u = (uint32_t)v16[i] << 16;
      std::memcpy(&v32[i], &u, 4);
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 200;
  const int passes = argc > 2 ? std::atoi(argv[2]) : 25;
  const int64_t K = 4096, ldxb = K;
  const double hz = core_hz(passes);
  double sink = 0;
  std::printf("core clock %.2f GHz (measured), one thread\n", hz / 1e9);
  std::printf("cycles a vpexpandw load, four a turn:\n");
  std::printf("  %-52s %5.2f\n", "into one register (each waits on the last)", expand_cycles(true, hz, passes));
  std::printf("  %-52s %5.2f\n", "into four registers", expand_cycles(false, hz, passes));

  const Weight w(16, K);
  std::vector<float> x(4 * K);
  for (auto& e : x) {
    const uint32_t u = (uint32_t)(0x3f80 + (std::rand() & 0x3f)) << 16; /* bf16 values */
    std::memcpy(&e, &u, 4);
  }
  std::vector<uint16_t> xb(4 * ldxb + 64);
  narrow_rows_bf16(x.data(), 4, K, K, xb.data(), ldxb);
  const double per_row = K / 64.0;
  std::printf("cycles per 64 columns of a row, 16 rows of K = %lld at 30%% kept in cache:\n",
              (long long)K);
  auto rows_loop = [&](const char* name, int t_rows, auto&& row) {
    const double t = best_seconds([&] {
      for (int64_t n = 0; n < w.rows; ++n) sink += row(n);
    }, reps, passes);
    std::printf("  %-52s %5.2f\n", name, t * hz / (w.rows * per_row) / t_rows);
  };
  const Vals<kBF16> vb{w.v16.data(), 0};
  const Vals<kF32> vf{w.v32.data(), 0};
  rows_loop("bf16 values, bf16 x (vdpbf16ps), 1 x row", 1, [&](int64_t n) {
    float d[1];
    dot_unstructured_bf16<1>(vb, w.nnz, w.bm.data() + n * w.ldb, K, w.off[n],
                             w.off[n + 1] - w.off[n], xb.data(), ldxb, d);
    return d[0];
  });
  rows_loop("bf16 values, bf16 x, 4 x rows a pass (per x row)", 4, [&](int64_t n) {
    float d[4];
    dot_unstructured_bf16<4>(vb, w.nnz, w.bm.data() + n * w.ldb, K, w.off[n],
                             w.off[n + 1] - w.off[n], xb.data(), ldxb, d);
    return d[0] + d[3];
  });
  rows_loop("fp32 values, float32 x (FMA), 1 x row", 1, [&](int64_t n) {
    float d[1];
    dot_unstructured<1>(vf, w.nnz, w.bm.data() + n * w.ldb, K, w.off[n], w.off[n + 1] - w.off[n],
                        x.data(), K, d);
    return d[0];
  });
  rows_loop("bf16 values, float32 x (FMA), 1 x row", 1, [&](int64_t n) {
    float d[1];
    dot_unstructured<1>(vb, w.nnz, w.bm.data() + n * w.ldb, K, w.off[n], w.off[n + 1] - w.off[n],
                        x.data(), K, d);
    return d[0];
  });
  std::vector<uint16_t> dense(K);
  rows_loop("decompression of bf16 values (the dense path)", 1, [&](int64_t n) {
    const int bad = decompress_unstructured_row(w.bm.data() + n * w.ldb, w.v16.data(), w.nnz,
                                                w.off[n], w.off[n + 1], K, dense.data());
    return (double)bad + dense[n];
  });

  /* from memory: 4096 rows a copy, copies past 256 MB in all; dot(values, mask, n) runs row n
   * of a copy */
  const Weight big(4096, K);
  auto from_memory = [&](const char* what, const auto& values, auto&& dot) {
    using Vec = std::decay_t<decltype(values)>;
    const int64_t bytes = big.nnz * (int64_t)sizeof(typename Vec::value_type) + big.rows * big.ldb;
    const int copies = (int)((256ll << 20) / bytes + 1);
    std::vector<Vec> vs(copies, values);
    std::vector<std::vector<uint8_t>> bms(copies, big.bm);
    int c = 0;
    const double t = best_seconds([&] {
      const int i = c++ % copies;
      for (int64_t n = 0; n < big.rows; ++n) sink += dot(vs[i].data(), bms[i].data() + n * big.ldb, n);
    }, copies, std::max(3, passes / 5));
    std::printf("%s decode from memory (4096 x 4096, %d copies rotated):\n", what, copies);
    char name[64];
    std::snprintf(name, sizeof name, "1 x row (%.1f GB/s)", bytes / t / 1e9);
    std::printf("  %-52s %5.2f\n", name, t * hz / (big.rows * per_row));
  };
  from_memory("bf16", big.v16, [&](const uint16_t* v, const uint8_t* bm, int64_t n) {
    float d[1];
    dot_unstructured_bf16<1>(Vals<kBF16>{v, 0}, big.nnz, bm, K, big.off[n],
                             big.off[n + 1] - big.off[n], xb.data(), ldxb, d);
    return d[0];
  });
  /* fp32 values against float32 x: twice the value bytes */
  from_memory("fp32", big.v32, [&](const float* v, const uint8_t* bm, int64_t n) {
    float d[1];
    dot_unstructured<1>(Vals<kF32>{v, 0}, big.nnz, bm, K, big.off[n], big.off[n + 1] - big.off[n],
                        x.data(), K, d);
    return d[0];
  });
  std::printf("(checksum %g)\n", sink);
  return 0;
}
