/* bf16 <-> fp32 for the bound calls of bf16 models (pyquant/_native.py: _bf16_rows): the
 * kernels take fp32 rows and write fp32 outputs, and a bf16 layer call used to convert x and
 * its output with torch (two tensors allocated, two dispatcher calls). At decode a call runs
 * from caches that the weight stream has just flushed, where each of those cost ~20 us: a
 * 64 x 4096 int4 weight-only layer took 105-119 us a call with bf16 x against 59-64 us with
 * fp32 x (2-core Xeon, benchmarks/cold_call.py). Here both conversions write into buffers the
 * caller keeps, so the call allocates only its bf16 output.
 *
 * Compiled once, for the baseline ISA (no libtorch): the compiler's vector code for the
 * plain loops is enough for decode's M x K and M x N elements. */
#include <stdint.h>
#include <string.h>

#include "pq.h"

extern "C" int pq_bf16_to_f32_rows(const uint16_t* src, int64_t M, int64_t K, int64_t ld,
                                   float* dst) {
  if (M < 0 || K < 0 || ld < K || (M && K && (!src || !dst))) return PQ_ERR_ARG;
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* s = src + m * ld;
    float* d = dst + m * K;
    for (int64_t k = 0; k < K; ++k) {
      const uint32_t u = (uint32_t)s[k] << 16; /* exact: bf16 is fp32's top half */
      memcpy(d + k, &u, 4);
    }
  }
  return PQ_OK;
}

/* Rounded to nearest, ties to even, as torch's own conversion (c10::BFloat16's
 * round_to_nearest_even): finite values and infinities bit for bit; a NaN becomes the quiet
 * NaN 0x7FC0 (torch's scalar conversion; its vector paths may keep other NaN bits). */
extern "C" int pq_f32_to_bf16(const float* src, int64_t n, uint16_t* dst) {
  if (n < 0 || (n && (!src || !dst))) return PQ_ERR_ARG;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    memcpy(&u, src + i, 4);
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    dst[i] = nan ? (uint16_t)0x7FC0 : (uint16_t)r;
  }
  return PQ_OK;
}
