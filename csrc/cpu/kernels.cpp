/* The CPU kernels, compiled once per ISA (see CMakeLists.txt): the drivers
 * here are shared; the SIMD bodies are in tile_int8.h / tile_int4.h. */
#include "kernels.h"
#include "tile_int4.h"
#include "tile_int8.h"

namespace PQ_NS {
namespace {

/* Epilogues are written as separate multiply and add; the build uses
 * -ffp-contract=off so the compiler does not fuse them into an FMA, keeping
 * the rounding order documented in pq.h on every ISA. */
inline float scale_bias(float dot, float scale, const float* bias, int64_t n) {
  const float v = dot * scale;
  return bias ? v + bias[n] : v;
}

void int8_weight_only_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* w,
                         int64_t N, const float* w_scale, const float* bias, float* out,
                         int n_threads) {
  for_each_tile(M, N, n_threads, [&](int64_t n, int nr, int64_t m, int mt, bool, int32_t*) {
    dispatch_tile<kTileN>(nr, mt, [&](auto R_, auto T_) {
      constexpr int R = decltype(R_)::value, T = decltype(T_)::value;
      float dot[R][T];
      dot_f32_i8<R, T>(x + m * ldx, ldx, w + n * K, K, dot);
      for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r)
          out[(m + t) * N + n + r] = scale_bias(dot[r][t], w_scale[n + r], bias, n + r);
    });
  });
}

void quantize_rows_int8(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* xq,
                        float* x_scale, int n_threads) {
  const int threads = M < n_threads ? (int)M : n_threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t m = 0; m < M; ++m) quantize_row(x + m * ldx, K, xq + m * K, x_scale + m);
}

/* The exact int8 GEMM shared by int8_gemm_s32 and int8_dynamic_mm; epi(m, n,
 * acc) stores one output. The per-weight-row sums the VNNI path needs are
 * computed with the first activation tile and cached in the tile scratch. */
template <class Epi>
void int8_gemm(const int8_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t N, int n_threads,
               Epi epi) {
  for_each_tile(M, N, n_threads, [&](int64_t n, int nr, int64_t m, int mt, bool first, int32_t* wsum) {
    dispatch_tile<kTileN>(nr, mt, [&](auto R_, auto T_) {
      constexpr int R = decltype(R_)::value, T = decltype(T_)::value;
      int32_t dot[R][T];
      if (first)
        dot_i8_i8<R, T, true>(xq + m * K, w + n * K, K, dot, wsum);
      else
        dot_i8_i8<R, T, false>(xq + m * K, w + n * K, K, dot, wsum);
      for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) epi(m + t, n + r, dot[r][t]);
    });
  });
}

void int8_gemm_s32(const int8_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t N,
                   int32_t* acc, int n_threads) {
  int8_gemm(xq, M, K, w, N, n_threads, [=](int64_t m, int64_t n, int32_t v) { acc[m * N + n] = v; });
}

void int8_dynamic_mm(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                     const int8_t* w, int64_t N, const float* w_scale, const float* bias,
                     float* out, int n_threads) {
  int8_gemm(xq, M, K, w, N, n_threads, [=](int64_t m, int64_t n, int32_t v) {
    out[m * N + n] = scale_bias((float)v, x_scale[m] * w_scale[n], bias, n);
  });
}

void int4_weight_only_mm(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* wp,
                         int64_t N, const float* scales, const uint8_t* zeros, int64_t G,
                         const float* bias, float* out, int n_threads) {
  const int64_t ng = K / G;
  for_each_tile(M, N, n_threads, [&](int64_t n, int nr, int64_t m, int mt, bool, int32_t*) {
    dispatch_tile<kTileN>(nr, mt, [&](auto R_, auto T_) {
      constexpr int R = decltype(R_)::value, T = decltype(T_)::value;
      float dot[R][T];
      dot_f32_u4<R, T>(x + m * ldx, ldx, wp + n * (K / 2), scales + n * ng, zeros + n * ng, K, G, dot);
      for (int t = 0; t < T; ++t)
        for (int r = 0; r < R; ++r) {
          const float v = dot[r][t];
          out[(m + t) * N + n + r] = bias ? v + bias[n + r] : v;
        }
    });
  });
}

}  // namespace

extern const pq::KernelTable kKernels = {
    int8_weight_only_mm, quantize_rows_int8, int8_gemm_s32, int8_dynamic_mm, int4_weight_only_mm,
};

}  // namespace PQ_NS
