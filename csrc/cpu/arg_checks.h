/* Argument checks shared by the C API files (dispatch.cpp, dispatch_sparse.cpp).
 * Baseline code: compiled without ISA flags. */
#ifndef PQ_CPU_ARG_CHECKS_H
#define PQ_CPU_ARG_CHECKS_H
#include <stdint.h>

namespace {

inline int threads(int n) { return n > 0 ? n : 1; }

/* A buffer of `count` elements must be non-null when count > 0. */
inline bool missing(const void* p, int64_t count) { return count > 0 && p == nullptr; }

/* Products of sizes must fit in int64 (Python ints are unbounded). */
inline bool too_big(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_mul_overflow(a, b, &r);
}

/* Checks shared by the fp32-activation kernels: x is [M, K] with row stride ldx. */
inline bool bad_x(const float* x, int64_t M, int64_t K, int64_t ldx) {
  return M < 0 || K < 0 || ldx < K || too_big(M, ldx) || missing(x, M * K);
}

inline void fill_bias(float* out, int64_t M, int64_t N, const float* bias) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) out[m * N + n] = bias ? bias[n] : 0.0f;
}

}  // namespace
#endif /* PQ_CPU_ARG_CHECKS_H */
