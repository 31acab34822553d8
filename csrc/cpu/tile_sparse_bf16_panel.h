/* 2:4 and unstructured bf16 weights against activations that are bf16 values, from the sparse
 * ops' break-even batch size on (pyquant/_native.py: SPARSE_DENSE_MIN_M), on the AVX512-BF16
 * build without AMX tiles (pq_sparse24_bf16_panels_mm, pq_sparse_unstructured_bf16_panels_mm).
 *
 * Why: above the break-even the op used to decompress the whole weight into a dense scratch
 * matrix (the 32 MB of a 4096 x 4096 bf16 weight written, then read again) and run oneDNN's
 * bf16 GEMM on it, which packs it once more: 0.85-0.87x of bf16 F.linear on the dense weight
 * at M = 128 (Zen 4, 2 threads). Here each thread decompresses one 32-row panel at a time into
 * its own scratch (64 K bytes, in L2) and transposes it into the bf16 panel of
 * tile_bf16_panel.h, whose tiles sweep every x row with vdpbf16ps: the compressed weight is
 * read once a call and the dense one never goes to memory. The arithmetic is the dense bf16
 * path's: exact products summed in fp32 (one group of K, scale 1), bias added in fp32. */
#ifndef PQ_CPU_TILE_SPARSE_BF16_PANEL_H
#define PQ_CPU_TILE_SPARSE_BF16_PANEL_H
#include "common.h"
#include "kernels.h"
#include "sparse_decompress.h"
#include "tile_bf16_panel.h"

namespace PQ_NS {
namespace {

#if defined(PQ_SIMD_AVX512) && defined(__AVX512BF16__) && !defined(__AMX_BF16__)
/* The product of x rows that are bf16 values and a bf16 weight that row(n, dst) decompresses
 * (K values at dst; nonzero for an inconsistent row): 0, or 1 when a row is inconsistent (out
 * is then unspecified and the caller runs the sparse kernel), or 2 when a row of x is not
 * bf16 values. K % 32 == 0; work: pq::sparse_bf16_panel_work_bytes(M, K, n_threads). */
template <class Row>
inline int sparse_bf16_panel_mm(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t N,
                                const float* bias, float* out, void* work, int n_threads,
                                Row row) {
  if (!rows_are_bf16(x, M, K, ldx)) return 2;
  const int64_t rows_at = pq::bf16_panel_bytes(K, K);
  int bad = 0;
  bf16_panel_wo(
      x, M, K, ldx, N, K, bias, out, work, n_threads,
      [&](uint16_t* pb, float* sp, int64_t n0, int64_t nr) {
        uint16_t* rows = (uint16_t*)((uint8_t*)pb + rows_at); /* this thread's dense rows */
        int b = 0;
        for (int64_t r = 0; r < nr; ++r) b |= row(n0 + r, rows + r * K);
        if (b) __atomic_store_n(&bad, 1, __ATOMIC_RELAXED);
        /* dword j of a row's chunk c is the bf16 pair k = 32 c + 2 j, + 1: the panel order */
        pack_panel_dwords(nr, K / 32, (uint8_t*)pb, [&](int64_t n, int64_t c) {
          return _mm512_loadu_si512(rows + n * K + 32 * c);
        });
        for (int n = 0; n < kBf16PanelRows; ++n) sp[n] = 1.0f;
      },
      pq::align64(kBf16PanelRows * K * 2));
  return bad;
}

inline int sparse24_bf16_panel_mm(const float* x, int64_t M, int64_t K, int64_t ldx,
                                  const uint16_t* values, const uint8_t* meta, int64_t N,
                                  const float* bias, float* out, void* work, int n_threads) {
  const int64_t ldm = (K + 7) / 8;
  return sparse_bf16_panel_mm(x, M, K, ldx, N, bias, out, work, n_threads,
                              [&](int64_t n, uint16_t* dst) {
                                return decompress_24_row(values + n * (K / 2), meta + n * ldm, K,
                                                         dst);
                              });
}

/* Unstructured bf16 (bitmask [N, ceil(K/8)], values of nnz, row_offsets [N + 1]). */
inline int sparse_unstructured_bf16_panel_mm(const float* x, int64_t M, int64_t K, int64_t ldx,
                                             const uint8_t* bitmask, const uint16_t* values,
                                             int64_t nnz, const int64_t* off, int64_t N,
                                             const float* bias, float* out, void* work,
                                             int n_threads) {
  const int64_t ldb = (K + 7) / 8;
  return sparse_bf16_panel_mm(x, M, K, ldx, N, bias, out, work, n_threads,
                              [&](int64_t n, uint16_t* dst) {
                                return decompress_unstructured_row(bitmask + n * ldb, values, nnz,
                                                                   off[n], off[n + 1], K, dst);
                              });
}
#define PQ_HAVE_SPARSE24_BF16_PANELS 1
#endif

}  // namespace
}  // namespace PQ_NS
#endif /* PQ_CPU_TILE_SPARSE_BF16_PANEL_H */
