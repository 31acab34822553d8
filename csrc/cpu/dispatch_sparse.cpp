/* The sparse part of the C API in pq.h: argument checks, then the call into
 * the sparse kernel table of the chosen ISA build. Baseline flags only. */
#include <string.h>

#include "../pq.h"
#include "arg_checks.h"
#include "kernels.h"

namespace {

bool bad_dtype(int d) { return d != PQ_DTYPE_F32 && d != PQ_DTYPE_BF16 && d != PQ_DTYPE_F16; }

/* Shared by the 2:4 ops: x [M, K] with K % 4 == 0, meta [N, ceil(K/8)], out [M, N]. */
bool bad_24(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* meta, int64_t N,
            const float* out) {
  return bad_x(x, M, K, ldx) || K % 4 != 0 || N < 0 || too_big(N, K) || too_big(M, N) ||
         missing(meta, N * ((K + 7) / 8)) || missing(out, M * N);
}

/* Shared by the unstructured ops: x [M, K], bitmask [N, ceil(K/8)], values of nnz, offsets
 * [N + 1] from 0 to nnz, out [M, N]. */
bool bad_unstructured(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* bitmask,
                      const void* values, int values_dtype, int64_t nnz,
                      const int64_t* row_offsets, int64_t N, const float* out) {
  return bad_x(x, M, K, ldx) || N < 0 || nnz < 0 || bad_dtype(values_dtype) || too_big(N, K) ||
         too_big(M, N) || missing(bitmask, N * ((K + 7) / 8)) || missing(values, nnz) ||
         row_offsets == nullptr || missing(out, M * N) || row_offsets[0] != 0 ||
         row_offsets[N] != nnz;
}

}  // namespace

extern "C" int64_t pq_sparse_gemm_workspace_bytes(int isa, int64_t M, int64_t K, int n_threads);
extern "C" int64_t pq_sparse24_gemm_workspace_bytes(int isa, int64_t M, int64_t K, int n_threads);

namespace {
/* need: the GEMM's workspace query (-1: no GEMM here) */
bool bad_gemm_work(int64_t need, const void* work, int64_t work_bytes) {
  return need < 0 || !work || ((uintptr_t)work & 63) || work_bytes < need;
}
}  // namespace

extern "C" {

int pq_sparse24_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                   const void* values, int values_dtype, const uint8_t* meta, int64_t N,
                   const float* bias, float* out, int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t) return PQ_ERR_ISA;
  if (bad_24(x, M, K, ldx, meta, N, out) || bad_dtype(values_dtype) || missing(values, N * K / 2))
    return PQ_ERR_ARG;
  if (M == 0 || N == 0) return PQ_OK;
  if (K == 0) return fill_bias(out, M, N, bias), PQ_OK;
  t->sparse24_mm(x, M, K, ldx, values, values_dtype, meta, N, bias, out, threads(n_threads));
  return PQ_OK;
}

int64_t pq_sparse_bf16_panels_workspace_bytes(int isa, int64_t M, int64_t K, int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  int64_t sum;
  if (!t || !t->sparse24_bf16_panels_mm || M < 0 || K <= 0 || K % 32 || too_big(M, 2 * K) ||
      too_big(threads(n_threads), 132 * K + 256) ||
      __builtin_add_overflow(2 * M * K + 64, threads(n_threads) * (132 * K + 256), &sum))
    return -1;
  return pq::sparse_bf16_panel_work_bytes(M, K, threads(n_threads));
}

int pq_sparse24_bf16_panels_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                               const uint16_t* values, const uint8_t* meta, int64_t N,
                               const float* bias, float* out, void* work, int64_t work_bytes,
                               int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t || !t->sparse24_bf16_panels_mm) return PQ_ERR_ISA;
  if (bad_24(x, M, K, ldx, meta, N, out) || K % 32 || missing(values, N * K / 2))
    return PQ_ERR_ARG;
  if (M == 0 || N == 0) return PQ_OK;
  if (K == 0) return fill_bias(out, M, N, bias), PQ_OK;
  const int64_t need = pq_sparse_bf16_panels_workspace_bytes(isa, M, K, n_threads);
  if (need < 0 || !work || ((uintptr_t)work & 63) || work_bytes < need) return PQ_ERR_ARG;
  return t->sparse24_bf16_panels_mm(x, M, K, ldx, values, meta, N, bias, out, work,
                                    threads(n_threads))
             ? PQ_ERR_ARG
             : PQ_OK;
}

int pq_sparse_unstructured_bf16_panels_mm(int isa, const float* x, int64_t M, int64_t K,
                                          int64_t ldx, const uint8_t* bitmask,
                                          const uint16_t* values, int64_t nnz,
                                          const int64_t* row_offsets, int64_t N,
                                          const float* bias, float* out, void* work,
                                          int64_t work_bytes, int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t || !t->sparse_unstructured_bf16_panels_mm) return PQ_ERR_ISA;
  if (bad_x(x, M, K, ldx) || N < 0 || K % 32 || nnz < 0 || too_big(N, K) || too_big(M, N) ||
      missing(bitmask, N * ((K + 7) / 8)) || missing(values, nnz) ||
      missing(row_offsets, N + 1) || missing(out, M * N))
    return PQ_ERR_ARG;
  if (M == 0 || N == 0) return PQ_OK;
  if (row_offsets[0] != 0 || row_offsets[N] != nnz) return PQ_ERR_ARG;
  if (K == 0) return fill_bias(out, M, N, bias), PQ_OK;
  const int64_t need = pq_sparse_bf16_panels_workspace_bytes(isa, M, K, n_threads);
  if (need < 0 || !work || ((uintptr_t)work & 63) || work_bytes < need) return PQ_ERR_ARG;
  return t->sparse_unstructured_bf16_panels_mm(x, M, K, ldx, bitmask, values, nnz, row_offsets,
                                               N, bias, out, work, threads(n_threads))
             ? PQ_ERR_ARG
             : PQ_OK;
}

int64_t pq_sparse24_workspace_bytes(int isa, int64_t M, int64_t K) {
  if (M < 0 || K < 0 || too_big(3, K + 128)) return -1;
  return isa >= PQ_ISA_AVX512_BF16 && M == 1 && K > 0 ? 3 * ((K + 127) / 128 * 128) : 0;
}

/* A fixed-point path's scratch when the caller gave all `need` bytes of it (need > 0: the path
 * applies), 64-byte aligned; else null. */
static void* aligned_work(int64_t need, void* work, int64_t work_bytes) {
  return work && need > 0 && work_bytes >= need && !((uintptr_t)work & 63) ? work : nullptr;
}

/* The M = 1 path's scratch (pq_sparse24_workspace_bytes). */
static void* fx_work(int isa, int64_t M, int64_t K, void* work, int64_t work_bytes) {
  return aligned_work(pq_sparse24_workspace_bytes(isa, M, K), work, work_bytes);
}

/* The arguments of 2:4 + int8 (canonical or panels) that the op cannot take. */
static bool bad_24_int8(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* values_q,
                        const uint8_t* meta, int64_t N, const float* scale, const float* out) {
  return bad_24(x, M, K, ldx, meta, N, out) || missing(values_q, N * K / 2) || missing(scale, N);
}

/* The same for 2:4 + int4 (group size G over the kept values: even, dividing K/2). */
static bool bad_24_int4(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* packed,
                        const uint8_t* meta, int64_t N, const float* scales,
                        const uint8_t* zeros, int64_t G, const float* out) {
  if (bad_24(x, M, K, ldx, meta, N, out) || G <= 0 || G % 2 != 0 || (K / 2) % G != 0)
    return true;
  const int64_t groups = N * (K / 2 / G);
  return missing(packed, N * K / 4) || missing(scales, groups) || missing(zeros, groups);
}

int pq_sparse24_int8_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                        const int8_t* values_q, const uint8_t* meta, int64_t N,
                        const float* scale, const float* bias, float* out, int n_threads,
                        void* work, int64_t work_bytes) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t) return PQ_ERR_ISA;
  if (bad_24_int8(x, M, K, ldx, values_q, meta, N, scale, out)) return PQ_ERR_ARG;
  if (M == 0 || N == 0) return PQ_OK;
  if (K == 0) return fill_bias(out, M, N, bias), PQ_OK;
  t->sparse24_int8_mm(x, M, K, ldx, values_q, meta, N, scale, bias, out, threads(n_threads),
                      fx_work(isa, M, K, work, work_bytes));
  return PQ_OK;
}

int pq_sparse24_int4_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                        const uint8_t* packed, const uint8_t* meta, int64_t N,
                        const float* scales, const uint8_t* zeros, int64_t group_size,
                        const float* bias, float* out, int n_threads, void* work,
                        int64_t work_bytes) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t) return PQ_ERR_ISA;
  if (bad_24_int4(x, M, K, ldx, packed, meta, N, scales, zeros, group_size, out))
    return PQ_ERR_ARG;
  const int64_t groups = N * (K / 2 / group_size);
  if (M == 0 || N == 0) return PQ_OK;
  if (K == 0) return fill_bias(out, M, N, bias), PQ_OK;
  /* no workspace: no fixed-point path (the zero points are scanned only where it applies) */
  void* fx = fx_work(isa, M, K, work, work_bytes);
  /* 2:4 + int4 takes any uint8 zero point, as the dense int4 ops do, but its fixed-point
   * path subtracts it in int8 and its decompression writes it in a pruned position's
   * nibble: other zero points take the float path and no decompression */
  if (fx && !pq::zeros_fit_nibble(zeros, groups)) fx = nullptr;
  t->sparse24_int4_mm(x, M, K, ldx, packed, meta, N, scales, zeros, group_size, bias, out,
                      threads(n_threads), fx);
  return PQ_OK;
}

/* The sizes the 4-row panels of 2:4 + int8 / int4 take (pq.h). */
static bool bad_panel24_sizes(int64_t N, int64_t K) {
  return N < 0 || K <= 0 || N % 4 || K % 128 || K > 32768 || too_big(N, K);
}

int64_t pq_sparse24_panels_workspace_bytes(int isa, int64_t M, int64_t K) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (M < 0 || K < 0 || too_big(3 * pq::kPanel24FxMaxM, K + 256)) return -1;
  return t && t->pack_sparse24_panels && M >= 1 && M <= pq::kPanel24FxMaxM && K > 0
             ? 3 * M * pq::panel24_x_stride(K)
             : 0;
}

/* The panel ops' fixed-point scratch (pq_sparse24_panels_workspace_bytes). */
static void* panels_fx_work(int isa, int64_t M, int64_t K, void* work, int64_t work_bytes) {
  return aligned_work(pq_sparse24_panels_workspace_bytes(isa, M, K), work, work_bytes);
}

int pq_sparse24_int8_panels_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                               const int8_t* values_q, const uint8_t* meta, int64_t N,
                               const float* scale, const float* bias, float* out, int n_threads,
                               void* work, int64_t work_bytes) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t || !t->sparse24_int8_panels_mm) return PQ_ERR_ISA;
  if (bad_24_int8(x, M, K, ldx, values_q, meta, N, scale, out) || bad_panel24_sizes(N, K))
    return PQ_ERR_ARG;
  if (M == 0 || N == 0) return PQ_OK;
  t->sparse24_int8_panels_mm(x, M, K, ldx, values_q, meta, N, scale, bias, out,
                             threads(n_threads), panels_fx_work(isa, M, K, work, work_bytes));
  return PQ_OK;
}

int pq_sparse24_int4_panels_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                               const uint8_t* codes, const uint8_t* meta, int64_t N,
                               const float* scales, const uint8_t* zeros, int64_t group_size,
                               const float* bias, float* out, int n_threads, void* work,
                               int64_t work_bytes) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t || !t->sparse24_int4_panels_mm) return PQ_ERR_ISA;
  if (bad_24_int4(x, M, K, ldx, codes, meta, N, scales, zeros, group_size, out) ||
      bad_panel24_sizes(N, K) || group_size % 32 != 0)
    return PQ_ERR_ARG;
  const int64_t groups = N * (K / 2 / group_size);
  if (M == 0 || N == 0) return PQ_OK;
  void* fx = panels_fx_work(isa, M, K, work, work_bytes);
  if (fx && !pq::zeros_fit_nibble(zeros, groups)) fx = nullptr; /* as pq_sparse24_int4_mm */
  t->sparse24_int4_panels_mm(x, M, K, ldx, codes, meta, N, scales, zeros, group_size, bias, out,
                             threads(n_threads), fx);
  return PQ_OK;
}

int pq_pack_sparse24_panels(int isa, int bits, int unpack, uint8_t* values, uint8_t* meta,
                            int64_t N, int64_t K, uint8_t* panel_values, uint8_t* panel_meta,
                            int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t || !t->pack_sparse24_panels) return PQ_ERR_ISA;
  const int64_t nv = N * K * bits / 16;
  if ((bits != 8 && bits != 4) || bad_panel24_sizes(N, K) || missing(values, nv) ||
      missing(meta, N * K / 8) || missing(panel_values, nv) || missing(panel_meta, N * K / 8))
    return PQ_ERR_ARG;
  if (N == 0) return PQ_OK;
  t->pack_sparse24_panels(bits, unpack != 0, values, meta, N, K, panel_values, panel_meta,
                          threads(n_threads));
  return PQ_OK;
}

int pq_sparse_unstructured_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                              const uint8_t* bitmask, const void* values, int values_dtype,
                              int64_t nnz, const int64_t* row_offsets, int64_t N,
                              const float* bias, float* out, int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t) return PQ_ERR_ISA;
  if (bad_unstructured(x, M, K, ldx, bitmask, values, values_dtype, nnz, row_offsets, N, out))
    return PQ_ERR_ARG;
  if (M == 0 || N == 0) return PQ_OK;
  if (K == 0) return fill_bias(out, M, N, bias), PQ_OK;
  return t->sparse_unstructured_mm(x, M, K, ldx, bitmask, values, values_dtype, nnz, row_offsets,
                                   N, bias, out, threads(n_threads))
             ? PQ_OK
             : PQ_ERR_ARG;
}

int64_t pq_sparse_gemm_workspace_bytes(int isa, int64_t M, int64_t K, int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  int64_t xt, per_thread, sum;
  if (!t || !t->sparse_unstructured_gemm || M < 0 || K < 0 || M > (int64_t)1 << 40 ||
      __builtin_mul_overflow(K, M + pq::kOuterMb, &xt) || too_big(xt, 4) ||
      __builtin_mul_overflow((int64_t)threads(n_threads), pq::outer_thread_bytes(), &per_thread) ||
      __builtin_add_overflow(xt * 4 + 64, per_thread, &sum))
    return -1;
  return pq::outer_work_bytes(M, K, threads(n_threads));
}

int64_t pq_sparse24_gemm_workspace_bytes(int isa, int64_t M, int64_t K, int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t || !t->sparse24_gemm || M < 0 || K < 0) return -1;
  return threads(n_threads) * pq::s24_thread_bytes();
}

int pq_sparse_unstructured_gemm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                                const uint8_t* bitmask, const void* values, int values_dtype,
                                int64_t nnz, const int64_t* row_offsets, int64_t N,
                                const float* bias, float* out, void* work, int64_t work_bytes,
                                int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t || !t->sparse_unstructured_gemm) return PQ_ERR_ISA;
  if (bad_unstructured(x, M, K, ldx, bitmask, values, values_dtype, nnz, row_offsets, N, out))
    return PQ_ERR_ARG;
  if (M == 0 || N == 0) return PQ_OK;
  if (K == 0) return fill_bias(out, M, N, bias), PQ_OK;
  if (bad_gemm_work(pq_sparse_gemm_workspace_bytes(isa, M, K, n_threads), work, work_bytes))
    return PQ_ERR_ARG;
  switch (t->sparse_unstructured_gemm(x, M, K, ldx, bitmask, values, values_dtype, nnz,
                                      row_offsets, N, bias, out, work, threads(n_threads))) {
    case 0: return PQ_OK;
    case 2: return PQ_NOT_FINITE;
    default: return PQ_ERR_ARG;
  }
}

int pq_sparse24_gemm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                     const void* values, int values_dtype, const uint8_t* meta, int64_t N,
                     const float* bias, float* out, void* work, int64_t work_bytes,
                     int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t || !t->sparse24_gemm) return PQ_ERR_ISA;
  if (bad_24(x, M, K, ldx, meta, N, out) || bad_dtype(values_dtype) || missing(values, N * K / 2))
    return PQ_ERR_ARG;
  if (M == 0 || N == 0) return PQ_OK;
  if (K == 0) return fill_bias(out, M, N, bias), PQ_OK;
  if (bad_gemm_work(pq_sparse24_gemm_workspace_bytes(isa, M, K, n_threads), work, work_bytes))
    return PQ_ERR_ARG;
  return t->sparse24_gemm(x, M, K, ldx, values, values_dtype, meta, N, bias, out, work,
                          threads(n_threads))
             ? PQ_NOT_FINITE
             : PQ_OK;
}

int pq_sparse_unstructured_decompress(int isa, const uint8_t* bitmask, const void* values,
                                      int elem_bytes, int64_t nnz, const int64_t* row_offsets,
                                      int64_t N, int64_t K, void* out, int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t) return PQ_ERR_ISA;
  if (N < 0 || K < 0 || nnz < 0 || too_big(N, K) || too_big(N * K, 4) ||
      (elem_bytes != 2 && elem_bytes != 4) || missing(bitmask, N * ((K + 7) / 8)) ||
      missing(values, nnz) || row_offsets == nullptr || missing(out, N * K))
    return PQ_ERR_ARG;
  if (row_offsets[0] != 0 || row_offsets[N] != nnz) return PQ_ERR_ARG;
  return t->sparse_unstructured_decompress(bitmask, values, elem_bytes, nnz, row_offsets, N, K,
                                           out, threads(n_threads))
             ? PQ_ERR_ARG
             : PQ_OK;
}

int pq_sparse24_decompress(int isa, const void* values, int elem_bytes, const uint8_t* meta,
                           int64_t N, int64_t K, void* out, int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t) return PQ_ERR_ISA;
  if (N < 0 || K < 0 || K % 4 != 0 || too_big(N, K) || too_big(N * K, 4) ||
      (elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4) || missing(values, N * K / 2) ||
      missing(meta, N * ((K + 7) / 8)) || missing(out, N * K))
    return PQ_ERR_ARG;
  return t->sparse24_decompress(values, elem_bytes, meta, N, K, out, threads(n_threads))
             ? PQ_ERR_ARG
             : PQ_OK;
}

int pq_sparse24_int4_decompress(int isa, const uint8_t* packed, const uint8_t* meta, int64_t N,
                                int64_t K, const uint8_t* zeros, int64_t group_size,
                                uint8_t* out, int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t) return PQ_ERR_ISA;
  if (N < 0 || K < 0 || K % 4 != 0 || too_big(N, K) || group_size <= 0 || group_size % 2 != 0 ||
      (K / 2) % group_size != 0 || missing(packed, N * K / 4) ||
      missing(meta, N * ((K + 7) / 8)) || missing(zeros, N * (K / 2 / group_size)) ||
      missing(out, N * K / 2) || !pq::zeros_fit_nibble(zeros, N * (K / 2 / group_size)))
    return PQ_ERR_ARG;
  return t->sparse24_int4_decompress(packed, meta, N, K, zeros, group_size, out,
                                     threads(n_threads))
             ? PQ_ERR_ARG
             : PQ_OK;
}

int pq_sparse24_panels_decompress(int isa, int bits, const uint8_t* values, const uint8_t* meta,
                                  int64_t N, int64_t K, const uint8_t* zeros, int64_t group_size,
                                  uint8_t* out, int n_threads) {
  const pq::SparseKernelTable* t = pq::sparse_table(isa);
  if (!t || !t->sparse24_panels_decompress) return PQ_ERR_ISA;
  if ((bits != 8 && bits != 4) || bad_panel24_sizes(N, K) || missing(values, N * K * bits / 16) ||
      missing(meta, N * K / 8) || missing(out, bits == 8 ? N * K : N * K / 2))
    return PQ_ERR_ARG;
  if (bits == 4 && (group_size <= 0 || group_size % 2 || (K / 2) % group_size ||
                    missing(zeros, N * (K / 2 / group_size)) ||
                    !pq::zeros_fit_nibble(zeros, N * (K / 2 / group_size))))
    return PQ_ERR_ARG;
  if (N == 0) return PQ_OK;
  return t->sparse24_panels_decompress(bits, values, meta, N, K, zeros, group_size, out,
                                       threads(n_threads))
             ? PQ_ERR_ARG
             : PQ_OK;
}

}  // extern "C"
