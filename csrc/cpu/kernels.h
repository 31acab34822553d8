/* Internal interface between dispatch.cpp and the per-ISA kernel builds.
 *
 * kernels.cpp is compiled once per ISA with different -m flags and with PQ_NS
 * naming a distinct namespace, so each build exports one table of kernels.
 * Callers (dispatch.cpp) have already validated every argument: sizes are
 * >= 1 (M, N, K), pointers are non-null where needed, ldx >= K, the int4
 * group size is even and divides K, and n_threads >= 1.
 */
#ifndef PQ_CPU_KERNELS_H
#define PQ_CPU_KERNELS_H
#include <stdint.h>

namespace pq {

inline int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

/* W4A8 at prefill on the AVX512 builds (tile_vnni_panel.h), where AMX tiles do not
 * run it: from this many rows, K % 64 == 0. Scratch, 64-byte aligned: the x rows'
 * group sums [M][K/G] int32, then per thread a 32-row panel of u8 codes [K/4][2][16][4]
 * and its scales (float) and zero points (int32), group-major [K/G][32] each.
 * Crossover with the GEMV-shaped kernel (Zen 4, 2 threads, 11008 x 4096, G = 128):
 * M = 6 1.81-1.87 ms there vs 1.91-2.51 here, M = 8 2.81-2.87 vs 2.24-2.77, M = 12
 * 3.95-3.99 vs 2.56-2.71; expanding the panels costs ~1.2 ms a call at that size. */
constexpr int64_t kW4A8PanelMinM = 8;
inline bool w4a8_panel_applies(int64_t M, int64_t K) { return M >= kW4A8PanelMinM && K % 64 == 0; }
inline int64_t w4a8_panel_bytes(int64_t K, int64_t G) {
  return align64(32 * K) + 2 * align64(128 * (K / G));
}
inline int64_t w4a8_panel_work_bytes(int64_t M, int64_t K, int64_t G, int threads) {
  return align64(M * (K / G) * 4) + threads * w4a8_panel_bytes(K, G);
}
/* W8A8 (int8_dynamic_mm, int8_gemm_s32) on the same panels (tile_vnni_panel.h), where AMX
 * tiles do not run it: from this many rows, K % 64 == 0. Scratch, 64-byte aligned: the x
 * row sums [M] int32, then per thread a 32-row panel [K/4][2][16][4] of w + 128. Against
 * the GEMV-shaped kernel (Zen 4, 2 threads, in one process, old / panel): 11008 x 4096
 * M = 8 0.81x, 16 0.95x, 32 1.04x, 128 1.17x, 512 1.30x; MiniLM's 1536 x 384 M = 16
 * 1.82x, 512 3.05x, 384 x 1536 M = 16 1.08x, 512 1.66x. A panel converted per call costs
 * as much as the products of ~10 rows of x. */
constexpr int64_t kW8A8PanelMinM = 16;
inline bool w8a8_panel_applies(int64_t M, int64_t K) { return M >= kW8A8PanelMinM && K % 64 == 0; }
inline int64_t w8a8_panel_work_bytes(int64_t M, int64_t K, int threads) {
  return align64(M * 4) + threads * align64(32 * K);
}
/* The same on panels converted at swap time: the x row sums only. */
inline int64_t int8_panels_work_bytes(int64_t M) { return align64(M * 4); }
/* int8 weight-only on them: x's fixed-point terms [3M][K] and scales [3M], then the terms'
 * sums. Activations that are bf16 values take the bf16 panels (tile_bf16_panel.h) from
 * this many rows on the AVX512-BF16 build: against the fixed-point terms on the panels
 * (Zen 4, 2 threads, Llama-2-7B shapes, in one process, both relative to the canonical
 * bf16 path), M = 16: 1.09-1.11x vs 1.22-1.26x, M = 32: 1.06-1.09x vs 0.97-1.01x,
 * M = 48: 1.05-1.07x vs 0.87-0.89x. */
constexpr int64_t kInt8WoPanelsBf16MinM = 24;
inline int64_t int8wo_panels_work_bytes(int64_t M, int64_t K) {
  return align64(3 * M * K) + align64(3 * M * 4) + align64(3 * M * 4);
}
/* W4A8 on panels converted at swap time: the x rows' group sums only. */
inline int64_t int4_panels_work_bytes(int64_t M, int64_t K, int64_t G) {
  return align64(M * (K / G) * 4);
}
/* int4 weight-only on them: x's fixed-point terms [3M][K] and scales [3M], then the terms'
 * group sums. */
inline int64_t int4wo_panels_work_bytes(int64_t M, int64_t K, int64_t G) {
  return align64(3 * M * K) + align64(3 * M * 4) + int4_panels_work_bytes(3 * M, K, G);
}

/* int4 and int8 weight-only on the AVX512-BF16 build (no AMX) for activations that are
 * bf16 values (tile_bf16_panel.h): from this many rows, G % 32 == 0 (int8: G = K, one
 * group with the row scales; 11008 x 4096 at M = 128: 54.7 -> 30.5 ms, 0.97x bf16
 * F.linear). Scratch, 64-byte aligned: the x
 * rows as bf16 [M][K], then per thread a 32-row bf16 panel [K/2][2][16][2] and its group
 * scales [K/G][32]. Zen 4, 2 threads, 11008 x 4096, G = 128, against bf16 F.linear in the
 * same run: M = 16 1.09x, 32 1.01x, 128 0.96x, 300 0.99x (the fixed-point path before it:
 * 44 ms at M = 128, here 29). */
constexpr int64_t kBf16PanelMinM = 16;
inline bool bf16_panel_applies(int64_t M, int64_t K, int64_t G) {
  return M >= kBf16PanelMinM && G % 32 == 0 && K % G == 0;
}
inline int64_t bf16_panel_bytes(int64_t K, int64_t G) {
  return align64(64 * K) + align64(128 * (K / G));
}
inline int64_t bf16_panel_work_bytes(int64_t M, int64_t K, int64_t G, int threads) {
  return align64(M * K * 2) + threads * bf16_panel_bytes(K, G);
}
/* pq_sparse24_bf16_panels_mm and pq_sparse_unstructured_bf16_panels_mm
 * (tile_sparse_bf16_panel.h): the bf16 panels of one group of K, and per thread the 32 dense
 * bf16 rows a panel is transposed from. */
inline int64_t sparse_bf16_panel_work_bytes(int64_t M, int64_t K, int threads) {
  return bf16_panel_work_bytes(M, K, K, threads) + threads * align64(32 * K * 2);
}
/* pq_sparse_unstructured_gemm (tile_sparse_outer.h): x packed
 * transposed in blocks of kOuterMb rows (the last one's width rounded up to 16), then per
 * thread the sums of kOuterRows weight rows over a block and the rows' value offsets. */
constexpr int64_t kOuterMb = 128, kOuterRows = 256;
inline int64_t outer_xt_floats(int64_t M, int64_t K) {
  return K * (M / kOuterMb * kOuterMb + (M % kOuterMb + 15) / 16 * 16);
}
inline int64_t outer_thread_bytes() { return kOuterRows * kOuterMb * 4 + kOuterRows * 8; }
inline int64_t outer_work_bytes(int64_t M, int64_t K, int threads) {
  return align64(outer_xt_floats(M, K) * 4) + threads * outer_thread_bytes();
}
/* pq_sparse24_gemm (tile_sparse24_gemm.h): tasks of up to kS24Mb rows of x (split evenly) x
 * up to kS24Nb weight rows, K in chunks of kS24Kc columns; per thread the task's panels of one
 * chunk (256 bytes a group of 4 columns and 16 rows), whatever M and K
 * (pq_sparse24_gemm_workspace_bytes). */
constexpr int64_t kS24Mb = 960, kS24Nb = 256, kS24Kc = 512;
inline int64_t s24_thread_bytes() { return kS24Nb / 16 * (kS24Kc / 4) * 256; }

/* Where the int4 weight-only fixed-point path (pq.h) runs. Measured against
 * the float paths (4096 x 4096, G = 128, weights streamed from memory, 2
 * threads): M = 1: 1.1-1.3x on both ISAs. With AMX, where 3M >= 9 term rows
 * run on AMX int8 tiles: M = 5-8: 1.0-1.4x, M = 9-15: 1.3-2.2x (against the
 * float GEMV and dequantizing paths); from M = 16 on the AMX-BF16 path is as
 * fast (0.9-1.35x, so it keeps those sizes). Without AMX the GEMV-shaped W4A8
 * kernel took M = 5-15 in two to four register tiles of 4 term rows, each decoding
 * the weights again (0.74-0.93x), but the panel GEMM (tile_vnni_panel.h) expands
 * them once a call: from M = 5 the term rows run there (Zen 4, 2 threads, 11008 x
 * 4096, G = 128: M = 5 3.77 -> 3.16 ms, 16 9.3 -> 7.7, 128 58.9 -> 47.2, 300 137
 * -> 104). G = 32: 0.5-0.6x (the GEMV-shaped kernel's short steps), so there
 * G % 64 == 0. At M <= 4 (K % 128 == 0, G == 64 or G % 128 == 0) a GEMV of
 * its own (tile_int4_fx24.h) sums the three terms in one accumulator and decodes
 * each weight block once for all rows: at M = 1 1.0-1.36x over the W4A8 kernel on
 * the three term rows, at M = 2-4 1.11-1.40x over the float GEMV (Llama-2-7B
 * shapes, 2 threads, weights rotated past the cache). Its scratch: [3M][K] int8
 * terms | [3M] scales | [3M][N] fp32 term outputs | the W4A8 workspace for 3M rows
 * (or, where larger, the GEMV's reordered terms and lane sums of X), each part 64-byte
 * aligned. */
/* True when every one of the n zero points is a nibble (0..15), all the quantizers write.
 * The ops take any uint8 zero point; the paths that subtract it in int8 or int32 lanes
 * (2:4 + int4's fixed point and decompression, int4 weight-only's fixed-point GEMV) need a
 * nibble, and a call with another takes a path that subtracts it in float. One OR over the
 * [N, groups] bytes: a few us at 7B sizes, run only by the calls that would take them. */
inline bool zeros_fit_nibble(const uint8_t* zeros, int64_t n) {
  uint8_t any = 0;
  for (int64_t i = 0; i < n; ++i) any |= zeros[i];
  return any < 16;
}
inline bool int4wo_fx24_gemv_applies(int64_t M, int64_t K, int64_t G) {
  /* a 128-code block lies in one group, or (G = 64) in two whole ones */
  return M >= 1 && M <= 4 && K % 128 == 0 && (G == 64 || G % 128 == 0);
}
/* Without AMX, from this M (K % 64 == 0, G % 32 == 0) the 3M term rows run the W4A8 panel
 * GEMM (tile_vnni_panel.h) instead of the float kernels that dequantize the weights, the
 * three term rows of an x row in one tile, summed in registers, in slices of
 * int4wo_fixed_slice(K) rows (each packs the panels anew). Zen 4, 2 threads, in-process
 * A/B against the float path: M = 2048, G = 64, N x K = 384 x 384 1.17-1.18x, 1536 x 384
 * 1.31-1.32x, 384 x 1536 1.21-1.24x; M = 128, G = 128, 11008 x 4096 1.39-1.40x, 4096 x
 * 11008 1.31-1.40x. (With the terms summed from three fp32 outputs, as before, K < 2048
 * lost: 0.83-0.88x.) */
constexpr int64_t kInt4WoPanelMinM = 5;
/* The fixed-point panel paths (int4 here, int8 below) take x rows in slices whose int8 terms
 * fill at most this many bytes, so that the scratch stays in the caller's reused buffer. */
constexpr int64_t kFixedPanelSliceBytes = 2 << 20;
inline int64_t fixed_panel_slice(int64_t K, int64_t min_rows) {
  const int64_t s = kFixedPanelSliceBytes / (3 * (K > 0 ? K : 1));
  return s > min_rows ? s : min_rows;
}
/* int4's rows a slice: at least 128 (1820 at K = 384, where 128 took ~7% more time in
 * packing the panels and starting threads). */
inline int64_t int4wo_fixed_slice(int64_t K) { return fixed_panel_slice(K, 128); }
inline bool int4wo_fixed_applies(int64_t M, int64_t K, int64_t G, bool amx) {
  return ((M == 1 || int4wo_fx24_gemv_applies(M, K, G) || (amx && M >= 5 && M <= 15)) &&
          G % 64 == 0) ||
         (!amx && M >= kInt4WoPanelMinM && G % 32 == 0 && w4a8_panel_applies(3 * M, K));
}

/* Scratch of the AMX paths that convert 32-row weight strips per call
 * (tile_amx_grouped.h), sized here so that dispatch.cpp, which is not built per
 * ISA, can say how much the caller must provide. Native code allocates nothing.
 *   strip:  per thread, the converted strip (32 rows of row_bytes), its group
 *           scales group-major [K/G][32] floats and the fp32 sums of a task;
 *   W4A8:   the activation codes packed into int8 tiles [ceil(M/16)][K/64][1 KiB],
 *           then one strip per thread (int8 rows: row_bytes = K);
 *   bf16:   up to three bf16 activation terms packed into tiles, then one strip
 *           per thread (bf16 rows: row_bytes = 2K).
 * Each part starts 64-byte aligned from a 64-byte aligned `work`. */
constexpr int64_t kAmxInt4DynMinM = 9, kAmxBf16MinM = 16;
/* Cache blocking of the strip GEMM (tile_amx_grouped.h): K chunks of this many
 * bytes of a row once the packed activations pass kAmxGroupedL2Bytes, over tasks
 * of kAmxGroupedNc weight rows x kAmxGroupedMc activation rows, whose fp32 sums
 * wait in a per-thread buffer between chunks. A weight strip is converted once
 * per task: 512 rows rather than 256 converted it half as often at M = 512
 * (1.04-1.10x on W4A8 and int4 weight-only there, 4096 x 4096, in-process A/B).
 * When all rows' packed activations fit in L2, a task takes every row if there are
 * strips enough for the threads (W4A8 at MiniLM's 2560 x 384 x 384: 1.03-1.06x
 * over 512-row tasks). That L2 bound was 1 MiB; at 1.5 MiB (2 MiB of L2 a core on every
 * AMX CPU) W4A8 at 128 x 4096 x 11008 takes the unchunked order, 1.21x (in-process A/B,
 * both orders, Granite Rapids), and int4 weight-only with bf16 activations at M = 160,
 * 4096 x 4096, 1.02x. */
constexpr int64_t kAmxGroupedKcBytes = 1024, kAmxGroupedL2Bytes = 3 << 19,
                  kAmxGroupedNc = 256, kAmxGroupedMc = 512;
/* A converted strip's rows lie kAmxStripPad bytes further apart than their length: at a
 * stride that is a multiple of 4 KiB, the 16 rows a tile load or a panel's conversion touches
 * at once would all fall in one set of the 12-way L1. */
constexpr int64_t kAmxStripPad = 64;
inline int64_t amx_strip_bytes(int64_t row_bytes, int64_t n_groups) {
  const int64_t acc = kAmxGroupedMc * kAmxGroupedNc * 4; /* 512 KiB */
  return align64(32 * (row_bytes + kAmxStripPad)) + align64(128 * n_groups) + acc;
}
inline bool amx_int4dyn_applies(int64_t M, int64_t K, int64_t N, int64_t G) {
  return M >= kAmxInt4DynMinM && G % 64 == 0 && K % G == 0 && N % 32 == 0;
}
/* Whether the int4 fixed-point path's `rows` term rows run the W4A8 panels (kernels.cpp),
 * which need no fp32 term outputs: the scratch's [rows][N] part is then empty. */
inline bool int4wo_fixed_on_panels(int64_t rows, int64_t K, int64_t N, int64_t G, bool amx) {
  return !(amx && amx_int4dyn_applies(rows, K, N, G)) && w4a8_panel_applies(rows, K) &&
         !int4wo_fx24_gemv_applies(rows / 3, K, G);
}
inline int64_t int4wo_fixed_outputs_bytes(int64_t rows, int64_t K, int64_t N, int64_t G, bool amx) {
  return int4wo_fixed_on_panels(rows, K, N, G, amx) ? 0 : align64(rows * N * 4);
}
inline int64_t amx_int4dyn_work_bytes(int64_t M, int64_t K, int64_t G, int threads) {
  return align64((M + 15) / 16 * 16 * K) + threads * amx_strip_bytes(K, K / G);
}
/* int8 weight-only at prefill on AMX for activations that are not bf16 values:
 * 24-bit fixed point (three int8 terms a row) on the int8 tiles, in slices of
 * rows whose scratch stays near kInt8WoFixedBytes: [3S][K] terms | [3S] scales |
 * [3S][N] fp32 term outputs | the packed terms [ceil(3S/16)*16][K], 64-byte
 * aligned parts. */
constexpr int64_t kInt8WoFixedBytes = 32 << 20;
/* int8 weight-only at M = 1 on both AVX512 builds: x in 24-bit fixed point, the three
 * term rows through the exact VNNI GEMV of int8 dynamic (one vpdpbusd per 64 weights and
 * term, where the float GEMV widens and converts every 16 weights: 3 uops). Measured
 * 1.04-1.17x over the float GEMV (Llama-2-7B shapes, one thread, weights rotated past the
 * cache). Its scratch: [3][K] int8 terms | [3] scales | [3][N] fp32 term outputs, each
 * 64-byte aligned. */
inline int64_t int8wo_gemv_work_bytes(int64_t K, int64_t N) {
  return align64(3 * K) + align64(3 * 4) + align64(3 * N * 4);
}
inline bool int8wo_fixed_applies(int64_t M, int64_t K, int64_t N) {
  return M >= kAmxBf16MinM && K % 64 == 0 && N % 32 == 0;
}
inline int64_t int8wo_fixed_slice(int64_t M, int64_t K, int64_t N) {
  const int64_t per_row = 3 * (2 * K + 4 + 4 * N), s = kInt8WoFixedBytes / per_row / 16 * 16;
  return M < s ? M : (s < 16 ? 16 : s);
}
inline int64_t int8wo_fixed_work_bytes(int64_t M, int64_t K, int64_t N) {
  const int64_t rows = 3 * int8wo_fixed_slice(M, K, N);
  return align64(rows * K) + align64(rows * 4) + align64(rows * N * 4) +
         align64((rows + 15) / 16 * 16 * K);
}
/* Without AMX, int8 weight-only for activations that are not bf16 values, from
 * kInt8WoPanelMinM rows (K % 64 == 0): the same three fixed-point term rows on the W8A8 panels
 * (tile_vnni_panel.h), their sums combined in registers, where the float path widens and
 * converts each weight for every 16 products (Zen 4, 2 threads, M = 2048, in-process A/B:
 * 1.29-1.75x on MiniLM's N x K). In slices of rows whose terms fill at most
 * kFixedPanelSliceBytes: [3S][K] terms | [3S] scales | the W8A8 panel scratch for 3S rows,
 * 64-byte aligned parts. From M = 12: there 1.03-1.07x at 11008 x 4096, 1.15x at 4096 x
 * 4096, 1.11-1.45x on MiniLM's; at M = 8 0.97x at 11008 x 4096, where the float path still
 * streams the weights near the bandwidth. */
constexpr int64_t kInt8WoPanelMinM = 12;
inline bool int8wo_panel_applies(int64_t M, int64_t K) {
  return M >= kInt8WoPanelMinM && K % 64 == 0;
}
inline int64_t int8wo_panel_slice(int64_t M, int64_t K) {
  const int64_t s = fixed_panel_slice(K, kInt8WoPanelMinM);
  return M < s ? M : s;
}
inline int64_t int8wo_panel_work_bytes(int64_t M, int64_t K, int threads) {
  const int64_t S = int8wo_panel_slice(M, K);
  return align64(3 * S * K) + align64(3 * S * 4) + w8a8_panel_work_bytes(3 * S, K, threads);
}
/* int8 weight-only on the AMX-BF16 path has one scale per row, for all of K. It still runs
 * as groups of this many k (the largest of 512, 256, .., 32 dividing K), unscaled, the row
 * scale applied once to their fp32 sum: as one group of K it could not chunk K, and at
 * M = 512 every weight strip re-read the packed activations (4 MB) from L3; this ran
 * 2-3x slower than int4 weight-only on the same path. */
inline int64_t int8wo_bf16_group(int64_t K) {
  int64_t g = 512;
  while (g > 32 && K % g) g /= 2;
  return g;
}
inline bool amx_bf16_applies(int64_t M, int64_t K, int64_t N, int64_t G) {
  return M >= kAmxBf16MinM && K % 32 == 0 && N % 32 == 0 && G % 32 == 0 && K % G == 0;
}
inline int64_t amx_bf16_terms_bytes(int64_t M, int64_t K) { /* 3 terms of bf16 tiles */
  return align64(3 * ((M + 15) / 16 * 16) * K * 2);
}
inline int64_t amx_bf16_work_bytes(int64_t M, int64_t K, int64_t G, int threads) {
  return amx_bf16_terms_bytes(M, K) + threads * amx_strip_bytes(2 * K, K / G);
}

struct KernelTable {
  /* work: null, or 64-byte aligned pq_int8_weight_only_workspace_bytes (AMX: the
   * larger of the fixed-point and the bf16 paths' scratch) */
  void (*int8_weight_only_mm)(const float* x, int64_t M, int64_t K, int64_t ldx,
                              const int8_t* w, int64_t N, const float* w_scale,
                              const float* bias, float* out, int n_threads, void* work);
  /* amax: null, or M given row maxima (row-parallel shards: the whole rows') */
  void (*quantize_rows_int8)(const float* x, int64_t M, int64_t K, int64_t ldx,
                             const float* amax, int8_t* xq, float* x_scale, int n_threads);
  /* work: scratch of work_bytes (may be 0); AMX builds use it when large enough. */
  void (*int8_gemm_s32)(const int8_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t N,
                        int32_t* acc, void* work, int64_t work_bytes, int n_threads);
  void (*int8_dynamic_mm)(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                          const int8_t* w, int64_t N, const float* w_scale, const float* bias,
                          float* out, void* work, int64_t work_bytes, int n_threads);
  /* work: null, or pq_int4_weight_only_workspace_bytes for these sizes and threads,
   * 64-byte aligned (the fixed-point path, or the AMX-BF16 one) */
  void (*int4_weight_only_mm)(const float* x, int64_t M, int64_t K, int64_t ldx,
                              const uint8_t* w_packed, int64_t N, const float* scales,
                              const uint8_t* zeros, int64_t group_size, const float* bias,
                              float* out, int n_threads, void* work);
  /* work: pq_int4_dynamic_workspace_bytes bytes, 4-byte aligned; amx: work is
   * 64-byte aligned and holds amx_int4dyn_work_bytes too (AMX builds use it); panel:
   * work is 64-byte aligned and holds w4a8_panel_work_bytes (AVX512 builds use it). */
  void (*int4_dynamic_mm)(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                          const uint8_t* w_packed, int64_t N, const float* scales,
                          const uint8_t* zeros, int64_t group_size, const float* bias,
                          float* out, void* work, bool amx, bool panel, int n_threads);
  /* AVX512 builds (else null): int8_dynamic_mm on the weight's panels (pq.h,
   * pq_int8_dynamic_mm_panels; K % 64 == 0, N % 32 == 0); work: 64-byte aligned,
   * int8_panels_work_bytes(M) */
  void (*int8_dynamic_mm_panels)(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                                 const uint8_t* panels, int64_t N, const float* w_scale,
                                 const float* bias, float* out, void* work, int n_threads);
  /* AVX512 builds (else null): int4_dynamic_mm on the weight's panels (pq.h,
   * pq_int4_dynamic_mm_panels); work: 64-byte aligned, int4_panels_work_bytes(M, K, G), and
   * with amx (AMX builds: the caller checked amx_int4dyn_applies) amx_int4dyn_work_bytes */
  void (*int4_dynamic_mm_panels)(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                                 const uint8_t* panels, int64_t N, const float* scales,
                                 const uint8_t* zeros, int64_t group_size, const float* bias,
                                 float* out, void* work, bool amx, int n_threads);
  /* AVX512 builds (else null): int4_weight_only_mm on those panels (pq.h,
   * pq_int4_weight_only_mm_panels); work: 64-byte aligned, int4wo_panels_work_bytes. False
   * when a row of x cannot be written in 24-bit fixed point. */
  bool (*int4_weight_only_mm_panels)(const float* x, int64_t M, int64_t K, int64_t ldx,
                                     const uint8_t* panels, int64_t N, const float* scales,
                                     const uint8_t* zeros, int64_t group_size, const float* bias,
                                     float* out, void* work, int n_threads);
  /* AVX512 builds (else null): int8_weight_only_mm on the W8A8 panels (pq.h,
   * pq_int8_weight_only_mm_panels); work: 64-byte aligned, int8wo_panels_work_bytes. False
   * when a row of x cannot be written in 24-bit fixed point. */
  bool (*int8_weight_only_mm_panels)(const float* x, int64_t M, int64_t K, int64_t ldx,
                                     const uint8_t* panels, int64_t N, const float* w_scale,
                                     const float* bias, float* out, void* work, int n_threads);
  /* AVX512 builds (else null): a whole weight into its panels or back (pq.h,
   * pq_pack_panels) */
  void (*pack_panels)(int bits, bool unpack, const uint8_t* w, int64_t N, int64_t K,
                      uint8_t* out, int n_threads);
  /* AMX builds (else null): int8_dynamic_mm with bf16 outputs (pq.h,
   * pq_int8_dynamic_mm_bf16), on the AMX tiles only; work: 64-byte aligned,
   * amx_int8_bf16_out_work_bytes(M, K, N). */
  void (*int8_dynamic_mm_bf16)(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                               const int8_t* w, int64_t N, const float* w_scale,
                               const float* bias, uint16_t* out, void* work, int n_threads);
  /* AMX builds (else null): int4_weight_only_mm_panels for bf16 x into bf16 outputs on the
   * AMX-BF16 tiles (pq.h, pq_int4_weight_only_mm_panels_bf16; amx_bf16_applies); work as
   * there. False, out untouched, when x holds an Inf or NaN. */
  bool (*int4_weight_only_mm_panels_bf16)(const uint16_t* x, int64_t M, int64_t K, int64_t ldx,
                                          const uint8_t* panels, int64_t N, const float* scales,
                                          const uint8_t* zeros, int64_t group_size,
                                          const float* bias, uint16_t* out, void* work,
                                          int n_threads);
  /* AMX builds (else null): int8_weight_only_mm for bf16 x into bf16 outputs on the
   * AMX-BF16 tiles (pq.h, pq_int8_weight_only_mm_bf16); work as there. False, out
   * untouched, when x holds an Inf or NaN. */
  bool (*int8_weight_only_mm_bf16)(const uint16_t* x, int64_t M, int64_t K, int64_t ldx,
                                   const int8_t* w, int64_t N, const float* w_scale,
                                   const float* bias, uint16_t* out, void* work, int n_threads);
  /* AMX builds (else null): int4_dynamic_mm into bf16 outputs on the AMX tiles (pq.h,
   * pq_int4_dynamic_mm_bf16; panels: the weight in the panel layout,
   * pq_int4_dynamic_mm_panels_bf16); work: 64-byte aligned, the AMX path's scratch. False,
   * out untouched, when a zero point is above 15. */
  bool (*int4_dynamic_mm_bf16)(const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                               const uint8_t* w_packed, int64_t N, const float* scales,
                               const uint8_t* zeros, int64_t group_size, const float* bias,
                               uint16_t* out, void* work, int n_threads, bool panels);
  /* quantize_rows_int8 of M rows of bf16 values, on the calling thread: each row widened
   * (exactly) into buf (K floats, 4-byte aligned) with this build's vectors, then quantized
   * from there, so the codes and scales are those of the fp32 rows bit for bit. */
  void (*quantize_rows_int8_bf16)(const uint16_t* x, int64_t M, int64_t K, int64_t ldx,
                                  int8_t* xq, float* x_scale, float* buf);
};

/* The AMX int8 GEMM (tile_amx.h) keeps the int32 sums of a K chunk in its caller's output
 * while the next chunk runs: once the packed activations pass kAmxInt8L2Bytes, over chunks
 * of kAmxInt8Kc. A bf16 output has no room for them, so its scratch holds them after the
 * activation tiles. */
constexpr int64_t kAmxInt8L2Bytes = 3 << 19, kAmxInt8Kc = 4096;
inline int64_t amx_int8_bf16_out_work_bytes(int64_t M, int64_t K, int64_t N) {
  const int64_t tiles = (M + 15) / 16 * 16 * K;
  return align64(tiles) + (tiles > kAmxInt8L2Bytes && K > kAmxInt8Kc ? M * N * 4 : 0);
}

/* The most rows of x that the 2:4 int8/int4 panel ops write in fixed point (their workspace:
 * pq_sparse24_panels_workspace_bytes); past it, or without the workspace, they run the float
 * loop. The dense break-even of those layers lies below it (24-32 rows on avx512_bf16). */
constexpr int64_t kPanel24FxMaxM = 32;
/* Bytes between their x term rows (sparse.cpp: run_panels24). */
inline int64_t panel24_x_stride(int64_t K) { return (K + 127) / 128 * 128 + 64; }

/* The sparse kernels (sparse.cpp, compiled per ISA like kernels.cpp). Also
 * validated by the caller: K % 4 == 0 for 2:4, the int4 group size is even and
 * divides K/2, values_dtype is a pq_dtype, row_offsets[0] == 0 and
 * row_offsets[N] == nnz. The unstructured kernel checks each row's offsets
 * against its bitmask itself and returns false when any row is inconsistent. */
struct SparseKernelTable {
  void (*sparse24_mm)(const float* x, int64_t M, int64_t K, int64_t ldx, const void* values,
                      int values_dtype, const uint8_t* meta, int64_t N, const float* bias,
                      float* out, int n_threads);
  /* work: null, or pq_sparse24_workspace_bytes bytes, 64-byte aligned (the M = 1 path) */
  void (*sparse24_int8_mm)(const float* x, int64_t M, int64_t K, int64_t ldx,
                           const int8_t* values_q, const uint8_t* meta, int64_t N,
                           const float* scale, const float* bias, float* out, int n_threads,
                           void* work);
  void (*sparse24_int4_mm)(const float* x, int64_t M, int64_t K, int64_t ldx,
                           const uint8_t* packed, const uint8_t* meta, int64_t N,
                           const float* scales, const uint8_t* zeros, int64_t group_size,
                           const float* bias, float* out, int n_threads, void* work);
  bool (*sparse_unstructured_mm)(const float* x, int64_t M, int64_t K, int64_t ldx,
                                 const uint8_t* bitmask, const void* values, int values_dtype,
                                 int64_t nnz, const int64_t* row_offsets, int64_t N,
                                 const float* bias, float* out, int n_threads);
  /* 2:4 -> dense rows of elem_bytes 1, 2 or 4 (pq_sparse24_decompress); nonzero when some
   * group's positions are not strictly increasing */
  int (*sparse24_decompress)(const void* values, int elem_bytes, const uint8_t* meta, int64_t N,
                             int64_t K, void* out, int n_threads);
  /* unstructured -> dense rows of elem_bytes 2 or 4 (pq_sparse_unstructured_decompress);
   * nonzero when some row is inconsistent */
  int (*sparse_unstructured_decompress)(const uint8_t* bitmask, const void* values,
                                        int elem_bytes, int64_t nnz, const int64_t* row_offsets,
                                        int64_t N, int64_t K, void* out, int n_threads);
  /* 2:4 + int4 -> dense packed int4 (pq_sparse24_int4_decompress); nonzero when some group's
   * positions are not strictly increasing */
  int (*sparse24_int4_decompress)(const uint8_t* packed, const uint8_t* meta, int64_t N,
                                  int64_t K, const uint8_t* zeros, int64_t group_size,
                                  uint8_t* out, int n_threads);
  /* 2:4 bf16 values, x rows that are bf16 values, through bf16 panels (null on the builds
   * without them; pq_sparse24_bf16_panels_mm): 0, 1 for a non-increasing group, 2 for x
   * rows that are not bf16 values */
  int (*sparse24_bf16_panels_mm)(const float* x, int64_t M, int64_t K, int64_t ldx,
                                 const uint16_t* values, const uint8_t* meta, int64_t N,
                                 const float* bias, float* out, void* work, int n_threads);
  /* the same for unstructured bf16 (pq_sparse_unstructured_bf16_panels_mm); 1 for an
   * inconsistent row */
  int (*sparse_unstructured_bf16_panels_mm)(const float* x, int64_t M, int64_t K, int64_t ldx,
                                            const uint8_t* bitmask, const uint16_t* values,
                                            int64_t nnz, const int64_t* row_offsets, int64_t N,
                                            const float* bias, float* out, void* work,
                                            int n_threads);
  /* 2:4 + int8 / int4 in 4-row panels (tile_sparse24_fx_panel.h; pq_sparse24_int8_panels_mm,
   * pq_sparse24_int4_panels_mm), and a whole weight into them or back
   * (pq_pack_sparse24_panels): null on the builds without AVX512. work as the canonical ops'
   * (int4: null when a zero point is past 15); N % 4 == 0, K % 128 == 0, K <= 32768, int4
   * G % 32 == 0. */
  void (*sparse24_int8_panels_mm)(const float* x, int64_t M, int64_t K, int64_t ldx,
                                  const int8_t* values_q, const uint8_t* meta, int64_t N,
                                  const float* scale, const float* bias, float* out,
                                  int n_threads, void* work);
  void (*sparse24_int4_panels_mm)(const float* x, int64_t M, int64_t K, int64_t ldx,
                                  const uint8_t* codes, const uint8_t* meta, int64_t N,
                                  const float* scales, const uint8_t* zeros, int64_t group_size,
                                  const float* bias, float* out, int n_threads, void* work);
  void (*pack_sparse24_panels)(int bits, bool unpack, uint8_t* vals, uint8_t* meta, int64_t N,
                               int64_t K, uint8_t* panel_vals, uint8_t* panel_meta,
                               int n_threads);
  /* panels -> dense int8 rows (bits 8) or dense int4 codes (bits 4; zeros, G)
   * (pq_sparse24_panels_decompress); nonzero when some group's positions are not strictly
   * increasing */
  int (*sparse24_panels_decompress)(int bits, const uint8_t* vals, const uint8_t* meta,
                                    int64_t N, int64_t K, const uint8_t* zeros, int64_t G,
                                    uint8_t* out, int n_threads);
  /* unstructured weights against many rows of fp32 x, only the kept products
   * (tile_sparse_outer.h; pq_sparse_unstructured_gemm): 0, 1 for an inconsistent row, 2 for x
   * with an Inf or NaN. work: pq::outer_work_bytes, 64-byte aligned. Null without AVX512. */
  int (*sparse_unstructured_gemm)(const float* x, int64_t M, int64_t K, int64_t ldx,
                                  const uint8_t* bitmask, const void* values, int values_dtype,
                                  int64_t nnz, const int64_t* row_offsets, int64_t N,
                                  const float* bias, float* out, void* work, int n_threads);
  /* the same for 2:4 weights (pq_sparse24_gemm, tile_sparse24_gemm.h): 0, or 2 for x with an
   * Inf or NaN. work: threads x pq::s24_thread_bytes(), 64-byte aligned. */
  int (*sparse24_gemm)(const float* x, int64_t M, int64_t K, int64_t ldx, const void* values,
                       int values_dtype, const uint8_t* meta, int64_t N, const float* bias,
                       float* out, void* work, int n_threads);
};

/* The sparse table of an ISA that is compiled in and supported here, else null. */
const SparseKernelTable* sparse_table(int isa);

}  // namespace pq

/* One table per ISA build; CMake defines PQ_HAVE_<ISA> for the builds it compiled. */
namespace pq_portable { extern const pq::KernelTable kKernels; extern const pq::SparseKernelTable kSparseKernels; }
namespace pq_avx2 { extern const pq::KernelTable kKernels; extern const pq::SparseKernelTable kSparseKernels; }
namespace pq_avx512 { extern const pq::KernelTable kKernels; extern const pq::SparseKernelTable kSparseKernels; }
namespace pq_avx512bf16 { extern const pq::KernelTable kKernels; extern const pq::SparseKernelTable kSparseKernels; }
namespace pq_amx { extern const pq::KernelTable kKernels; extern const pq::SparseKernelTable kSparseKernels; }

#endif /* PQ_CPU_KERNELS_H */
