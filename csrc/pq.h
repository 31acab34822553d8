/* pyquant native API: plain C, no libtorch.
 *
 * Every function takes raw pointers, int64 sizes and a thread count, returns a
 * pq_status, never allocates heap memory for outputs, never synchronizes with
 * anything outside the call and keeps no state between calls. The Python side
 * (pyquant/_native.py) validates shapes, dtypes and contiguity before calling;
 * the checks here are a second line of defence so that nothing reachable from
 * Python can crash the process.
 *
 * Checks, in order: the ISA (PQ_ERR_ISA), then the arguments (PQ_ERR_ARG:
 * negative sizes, ldx < K, a null pointer to a buffer of > 0 elements, bad
 * group size). Then M == 0 or N == 0 does nothing, and K == 0 writes bias (or
 * 0) to float outputs, 0 to int32 outputs and scale 1 to quantization scales.
 * n_threads <= 0 means 1.
 *
 * Layouts (documented once, next to the pack functions in pyquant/formats.py):
 *   x        float32 [M, K], row stride ldx >= K (elements)
 *   out      float32 [M, N], contiguous
 *   int8 w   int8    [N, K], contiguous, symmetric per output channel; values in
 *                    [-127, 127] (the Python packers guarantee it; -128 gives a
 *                    defined but possibly wrong result on the AVX2 path)
 *   xq       int8    [M, K], contiguous, values in [-127, 127] (same caveat)
 *   int4 w   uint8   [N, K/2], byte j of row n holds code k=2j in bits 0..3
 *                    and k=2j+1 in bits 4..7; codes are unsigned 0..15
 *   scales   float32 [N, K/group_size]; zeros uint8 [N, K/group_size] in 0..15
 *            w[n,k] = scales[n,g] * (code[n,k] - zeros[n,g]),  g = k / group_size
 */
#ifndef PQ_H
#define PQ_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  PQ_OK = 0,
  PQ_ERR_ARG = 1,   /* null pointer, negative size, bad stride or group size */
  PQ_ERR_ISA = 2,   /* the requested ISA is not compiled in or not supported by this CPU */
  PQ_NOT_FIXED_POINT = 3, /* a row of x cannot be written in 24-bit fixed point (Inf, NaN,
                           * max below 2^-100): the call's other path must run it */
  PQ_NOT_FINITE = 4,      /* x holds an Inf or NaN, which a path that skips pruned weights
                           * cannot multiply as a dense product would: the other path runs it */
} pq_status;

typedef enum {
  PQ_ISA_PORTABLE = 0,
  PQ_ISA_AVX2 = 1,        /* AVX2 + FMA + F16C */
  PQ_ISA_AVX512_VNNI = 2, /* AVX512 F/BW/VL/DQ + VNNI */
  PQ_ISA_AVX512_BF16 = 3, /* the above + AVX512-BF16/VBMI/VBMI2/BITALG + BMI2 (Zen 4 and later) */
  PQ_ISA_AVX512_AMX = 4,  /* the above + AMX-TILE/INT8/BF16, with the OS permission granted */
} pq_isa;

/* Once per process, before any kernel: asks Linux for the AMX tile-data state
 * (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)). Returns 1 when AMX may
 * be used; without it PQ_ISA_AVX512_AMX is reported unavailable. Idempotent. */
int pq_init(void);

/* Highest ISA both compiled in and supported by the running CPU. */
int pq_cpu_best_isa(void);
/* 1 if the ISA is compiled in and supported by this CPU. */
int pq_isa_available(int isa);
/* 1 if the ISA's kernels are compiled into this library (whatever the CPU). */
int pq_isa_compiled(int isa);
/* "portable", "avx2", "avx512_vnni", "avx512_bf16", "avx512_amx"; "unknown" otherwise. */
const char* pq_isa_name(int isa);

/* Native code allocates nothing: where a path needs scratch, the caller passes
 * `work` of the size the matching *_workspace_bytes function returns for the same
 * sizes and n_threads (64-byte aligned where said). A call with less (or null)
 * takes a path that needs none, with the same contract. */

/* out[m,n] = w_scale[n] * sum_k x[m,k] * w[n,k] + (bias ? bias[n] : 0)
 * Products are exact and sums fp32 on every path but the fixed-point ones. With
 * AMX (M >= 16, K % 32 == 0, N % 32 == 0, and pq_int8_weight_only_workspace_bytes
 * of 64-byte aligned `work`):
 *  - when every x[m,k] is a bf16 value, or K % 64 != 0, x is split into bf16
 *    terms for the bf16 tiles (tile_amx_bf16.h), which read bf16 subnormals
 *    (|term| < 2^-126) as zero;
 *  - otherwise (fp32 or fp16 activations, K % 64 == 0) each row of x is written
 *    in 24-bit fixed point as pq_int4_weight_only_mm describes (three int8 terms,
 *    error at most s = max|x[m,:]| / 8323072 per entry) and the terms run on the
 *    exact int8 tiles; out = the fp32 sum of the three terms' scaled results
 *    (smallest first) + bias. Rows in slices, scratch bounded (kernels.h).
 * On the AVX512-BF16 ISA (M >= 16, K % 32 == 0, given that workspace) when every
 * x[m,k] is a bf16 value, vdpbf16ps sums the exact products in fp32 (bf16
 * subnormals read as zero, subnormal sums flushed); out = sum * w_scale + bias.
 * At M == 1 on the AVX512 ISAs (given that workspace, whatever K and N), the
 * row is written in the same fixed point, whatever its values, and the three
 * terms run the exact int8 dot products of pq_int8_dynamic_mm; out as above.
 * On AVX512-VNNI and AVX512-BF16 from M = 12 (K % 64 == 0, given that workspace),
 * rows that are not all bf16 values run the same fixed point, the three terms'
 * exact sums on the int8 units and combined as at M == 1: each row's result is the
 * one it gets alone at M == 1, bit for bit.
 * Calls whose x holds an Inf or NaN (or whose max is below 2^-100), or without
 * that workspace, take the fp32 path. */
int64_t pq_int8_weight_only_workspace_bytes(int isa, int64_t M, int64_t K, int64_t N,
                                            int n_threads);
/* 1 when the 24-bit fixed-point path above runs for these sizes on this ISA (for
 * M > 1: activations that are not all bf16 values). */
int pq_int8_weight_only_fixed_point(int isa, int64_t M, int64_t K, int64_t N);
int pq_int8_weight_only_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                           const int8_t* w, int64_t N, const float* w_scale,
                           const float* bias, float* out, int n_threads, void* work,
                           int64_t work_bytes);
/* pq_int8_weight_only_mm for bf16 rows x (row stride ldx >= K) into bf16 outputs out[M, N],
 * rounded as torch rounds (a NaN becomes 0x7FC0), on the AMX-BF16 tiles, where x is one exact
 * bf16 term: no float32 copy of x, no float32 output. The _applies query is 1 for the ISA and
 * sizes it runs (the AMX build, from M = 16); elsewhere the call returns PQ_ERR_ISA.
 * PQ_NOT_FINITE, out untouched, when x holds an Inf or NaN. work: 64-byte aligned,
 * pq_int8_weight_only_workspace_bytes. */
int pq_int8_weight_only_bf16_applies(int isa, int64_t M, int64_t K, int64_t N);
int pq_int8_weight_only_mm_bf16(int isa, const uint16_t* x, int64_t M, int64_t K, int64_t ldx,
                                const int8_t* w, int64_t N, const float* w_scale,
                                const float* bias, uint16_t* out, void* work,
                                int64_t work_bytes, int n_threads);

/* Per-row symmetric int8 quantization:
 *   amax = max_k |x[m,k]|; s = amax / 127 in float32, then s = 1 if s == 0
 *   (amax == 0, or a subnormal amax whose quotient underflows);
 *   xq[m,k] = clamp(round_half_even(x[m,k] / s), -127, 127); x_scale[m] = s
 * A row holding an Inf or NaN (or given a non-finite amax) gets x_scale NaN and
 * codes 0: every output the dynamic ops compute from it is NaN. */
int pq_quantize_rows_int8(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                          int8_t* xq, float* x_scale, int n_threads);
/* The same with given row maxima amax[M] (null: computed as above): a row-parallel
 * shard holds a slice of each row and quantizes it with the whole row's scale. */
int pq_quantize_rows_int8_amax(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                               const float* amax, int8_t* xq, float* x_scale, int n_threads);
/* The same for bf16 rows x (row stride ldx >= K): the codes and scales of their fp32 values,
 * bit for bit. Each thread widens the rows of its block one at a time into its part of
 * `work` (4-byte aligned, pq_quantize_rows_int8_bf16_workspace_bytes(M, K, n_threads) bytes:
 * one row of K floats a thread) and quantizes each from there: a bf16
 * model's dynamic layers no longer convert the whole of x to fp32 first. The query returns
 * -1 on sizes it refuses. */
int64_t pq_quantize_rows_int8_bf16_workspace_bytes(int64_t M, int64_t K, int n_threads);
int pq_quantize_rows_int8_bf16(int isa, const uint16_t* x, int64_t M, int64_t K, int64_t ldx,
                               int8_t* xq, float* x_scale, int n_threads, void* work,
                               int64_t work_bytes);

/* Bytes of scratch (`work`) the int8 GEMMs below can use for this call with
 * n_threads; 0 when the chosen path needs none. With AMX (K % 64 == 0, N % 32 == 0,
 * M > 8) the activations are repacked once per call into the tile layout
 * [ceil(M/16)][K/64][16][16][4] (ceil(M/16)*16*K bytes). Elsewhere on the AVX512
 * ISAs, from M = 16 with K % 64 == 0, a GEMM over 32-row weight panels converted
 * per call runs (the x row sums, then one panel of 32 K bytes a thread). A call
 * given less scratch than this, or none, or scratch that is not 64-byte aligned,
 * runs the AVX512-VNNI GEMV-shaped kernel instead: the same result. */
int64_t pq_int8_workspace_bytes(int isa, int64_t M, int64_t K, int64_t N, int n_threads);

/* acc[m,n] = sum_k xq[m,k] * w[n,k]   (exact int32 accumulation) */
int pq_int8_gemm_s32(int isa, const int8_t* xq, int64_t M, int64_t K, const int8_t* w,
                     int64_t N, int32_t* acc, void* work, int64_t work_bytes, int n_threads);

/* out[m,n] = x_scale[m] * w_scale[n] * sum_k xq[m,k] * w[n,k] + (bias ? bias[n] : 0)
 * The int32 sum is exact; the epilogue is computed in float32 as
 * (float)acc * (x_scale[m] * w_scale[n]) + bias[n]. */
int pq_int8_dynamic_mm(int isa, const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                       const int8_t* w, int64_t N, const float* w_scale, const float* bias,
                       float* out, void* work, int64_t work_bytes, int n_threads);
/* pq_int8_dynamic_mm with bf16 outputs out[M, N], each the float result rounded to nearest,
 * ties to even, as torch rounds (a NaN becomes 0x7FC0; pq_f32_to_bf16): a bf16 model's layer
 * writes half the bytes and skips a conversion pass. Only on the AMX tiles (M >= 9, K % 64 ==
 * 0, N % 32 == 0); the workspace query returns -1 for any other ISA or sizes, and the call
 * PQ_ERR_ISA. work: 64-byte aligned, pq_int8_dynamic_mm_bf16_workspace_bytes bytes (the
 * packed activations, and past 1.5 MiB of them at K > 4096 the int32 sums of M x N). */
int64_t pq_int8_dynamic_mm_bf16_workspace_bytes(int isa, int64_t M, int64_t K, int64_t N,
                                                int n_threads);
int pq_int8_dynamic_mm_bf16(int isa, const int8_t* xq, const float* x_scale, int64_t M,
                            int64_t K, const int8_t* w, int64_t N, const float* w_scale,
                            const float* bias, uint16_t* out, void* work, int64_t work_bytes,
                            int n_threads);

/* The same product on the weight's panels, converted once when a layer is swapped in
 * instead of on every call (AVX512 ISAs; K % 64 == 0, N % 32 == 0). Layout, bytes
 * [N/32][K/4][2][16][4]: entry (p, j, h, i, c) = w[32 p + 16 h + i, 4 j + c] + 128 as
 * uint8 (pyquant/panels.py packs and unpacks it); `panels` 64-byte aligned. work: 64-byte
 * aligned, pq_int8_panels_workspace_bytes(M) (the x row sums). Returns PQ_ERR_ISA on an
 * ISA without these kernels. Results equal pq_int8_dynamic_mm's, bit for bit. */
int pq_int8_dynamic_mm_panels(int isa, const int8_t* xq, const float* x_scale, int64_t M,
                              int64_t K, const uint8_t* panels, int64_t N, const float* w_scale,
                              const float* bias, float* out, void* work, int64_t work_bytes,
                              int n_threads);
int64_t pq_int8_panels_workspace_bytes(int64_t M);
/* A whole weight into the panel layouts above, natively (pyquant/panels.py has the same in
 * PyTorch): bits 8, w the int8 rows [N, K] -> pq_int8_dynamic_mm_panels's layout (K % 64 ==
 * 0); bits 4, w the canonical int4 codes [N, K/2] -> pq_int4_dynamic_mm_panels's codes (K %
 * 128 == 0; scales and zeros are reordered by the caller). With unpack, the other way (w the
 * panels, 64-byte aligned). N % 32 == 0; out holds N K bits / 8 bytes. PQ_ERR_ISA on an ISA
 * without the panel kernels. */
int pq_pack_panels(int isa, int bits, int unpack, const uint8_t* w, int64_t N, int64_t K,
                   uint8_t* out, int n_threads);

/* 1 when W8A8 layers of these sizes should keep their weight in that layout on this ISA:
 * AVX512-VNNI and AVX512-BF16 (on AMX the canonical rows feed the tiles faster). */
int pq_int8_panel_layout(int isa, int64_t K, int64_t N);

/* W4A8: int8 per-row activations (pq_quantize_rows_int8) x int4 group-wise weights.
 *   acc[m,n,g] = sum_{k in g} xq[m,k] * (code[n,k] - zeros[n,g])     (exact int32)
 *   out[m,n]   = x_scale[m] * sum_g scales[n,g] * acc[m,n,g] + bias[n]  (float32)
 * The float sum over groups may be reordered (tolerance: fp32 summation over
 * K/G terms). Every kernel forms acc exactly as written but one: the AVX512
 * GEMV (M < 8 here; the panel form below has none) multiplies the codes as they
 * are and takes the zero point off in fp32 after the sum over groups,
 * sum_g scales * zeros * sum_{k in g} xq, so its rounding is relative to the
 * code term, not to the result: on activations far from zero mean (x = randn +
 * 10, K = 4096) ~9e-6 of max|out|, up to 4.6e-5 on a single group, where the
 * exact form stays near 2e-7. (Forming it per lane cost 0.73-0.81x at M = 1-4;
 * int4 weight-only's fixed-point GEMV pays 0.86-1.04x for the same, and does.)
 * K % G == 0, G == 32 or G % 64 == 0. `work`, 4-byte aligned, must hold at
 * least M * (K/G) * 4 + M * K bytes: per call the VNNI kernel stores there the
 * per-group sums of xq and xq reordered per chunk of min(G, 64) codes as
 * [even k | odd k], the order of the nibbles of a byte. With AMX (M >= 9,
 * G % 64 == 0, N % 32 == 0, zero points <= 15) the int8 tiles run instead when
 * `work` is 64-byte aligned and holds pq_int4_dynamic_workspace_bytes (the
 * activations packed into tiles and each thread's converted weight strip).
 * Elsewhere on the AVX512 ISAs, from M = 8 with K % 64 == 0, a GEMM over 32-row
 * weight panels expanded per call runs when `work` is 64-byte aligned and holds
 * pq_int4_dynamic_workspace_bytes (the group sums of xq and one panel a thread). */
int64_t pq_int4_dynamic_workspace_bytes(int isa, int64_t M, int64_t K, int64_t group_size,
                                        int n_threads);
int pq_int4_dynamic_mm(int isa, const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                       const uint8_t* w_packed, int64_t N, const float* scales,
                       const uint8_t* zeros, int64_t group_size, const float* bias, float* out,
                       void* work, int64_t work_bytes, int n_threads);
/* pq_int4_dynamic_mm into bf16 outputs out[M, N], rounded as torch rounds (a NaN becomes
 * 0x7FC0), on the AMX tiles: a bf16 model's layer writes no float32 output to convert. The
 * _applies query is 1 for the ISA and sizes it runs (the AMX build, M >= 9, N % 32 == 0,
 * group_size % 64 == 0); elsewhere the call returns PQ_ERR_ISA. PQ_NOT_FIXED_POINT, out
 * untouched, when a zero point is above 15 (the tiles take code - zero as int8; the other
 * paths take any). work: 64-byte aligned, pq_int4_dynamic_workspace_bytes. */
int pq_int4_dynamic_bf16_applies(int isa, int64_t M, int64_t K, int64_t N, int64_t group_size);
int pq_int4_dynamic_mm_bf16(int isa, const int8_t* xq, const float* x_scale, int64_t M,
                            int64_t K, const uint8_t* w_packed, int64_t N, const float* scales,
                            const uint8_t* zeros, int64_t group_size, const float* bias,
                            uint16_t* out, void* work, int64_t work_bytes, int n_threads);
/* The same on the panels of pq_int4_dynamic_mm_panels (codes and scales 64-byte aligned):
 * each weight strip converted from its panel into the same int8 strip, so the same bits. */
int pq_int4_dynamic_mm_panels_bf16(int isa, const int8_t* xq, const float* x_scale, int64_t M,
                                   int64_t K, const uint8_t* panels, int64_t N,
                                   const float* scales, const uint8_t* zeros, int64_t group_size,
                                   const float* bias, uint16_t* out, void* work,
                                   int64_t work_bytes, int n_threads);

/* The same product on the weight's panels, converted once when a layer is swapped in
 * (AVX512 ISAs; K % 64 == 0, N % 32 == 0, group_size % 32 == 0). Layout, per panel p of
 * 32 rows: codes, bytes [N/32][K/8][2][16][4], byte (p, j, h, i, c) = code[n, 8 j + c] |
 * code[n, 8 j + 4 + c] << 4 with n = 32 p + 16 h + i (64-byte aligned); scales (float32,
 * 64-byte aligned) and zeros (uint8), [N/32][K/G][32]: entry (p, g, r) is row 32 p + r's
 * (pyquant/panels.py packs and unpacks them). work: 64-byte aligned,
 * pq_int4_panels_workspace_bytes(M, K, group_size) at least; on AMX, with
 * pq_int4_dynamic_panels_workspace_bytes (which adds the int8 tiles' scratch) prefill sizes
 * run the tiles, each weight strip converted from its panel (else the VNNI kernels). Returns
 * PQ_ERR_ISA on an ISA without these kernels. From M = 8 the results equal
 * pq_int4_dynamic_mm's bit for bit (the same panel arithmetic, or the same tiles); below, its
 * GEMV sums the groups in another order. */
int pq_int4_dynamic_mm_panels(int isa, const int8_t* xq, const float* x_scale, int64_t M,
                              int64_t K, const uint8_t* panels, int64_t N, const float* scales,
                              const uint8_t* zeros, int64_t group_size, const float* bias,
                              float* out, void* work, int64_t work_bytes, int n_threads);
int64_t pq_int4_panels_workspace_bytes(int64_t M, int64_t K, int64_t group_size);
/* The whole scratch of pq_int4_dynamic_mm_panels on this ISA and thread count (-1: the sizes
 * overflow). */
int64_t pq_int4_dynamic_panels_workspace_bytes(int isa, int64_t M, int64_t K,
                                               int64_t group_size, int n_threads);
/* int8 weight-only (pq_int8_weight_only_mm's product) on the W8A8 panels of
 * pq_int8_dynamic_mm_panels, at every M: each row of x in 24-bit fixed point (three int8
 * terms, error at most max|x[m,:]| / 8323072 per entry), the three term rows of an x row in
 * one tile, combined as pq_int8_weight_only_mm's fixed-point paths do: each row's result is
 * the one it gets there alone at M == 1, bit for bit. On the AVX512-BF16 ISA from M = 24,
 * activations that are all bf16 values run one exact bf16 term instead (vdpbf16ps; results
 * those of pq_int8_weight_only_mm's bf16 path). work: 64-byte aligned,
 * pq_int8_weight_only_panels_workspace_bytes for these sizes. PQ_NOT_FIXED_POINT when a row cannot be
 * written so (out incomplete: the caller runs the canonical weights). */
int pq_int8_weight_only_mm_panels(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                                  const uint8_t* panels, int64_t N, const float* w_scale,
                                  const float* bias, float* out, void* work, int64_t work_bytes,
                                  int n_threads);
int64_t pq_int8_weight_only_panels_workspace_bytes(int isa, int64_t M, int64_t K,
                                                   int n_threads);

/* int4 weight-only (pq_int4_weight_only_mm's product) on the W4A8 panels above, at every
 * M: each row of x in 24-bit fixed point (three int8 terms, error at most max|x[m,:]| /
 * 8323072 per entry, as pq_int4_weight_only_mm describes), the three term rows of an x row
 * in one tile, their scaled sums added in registers, hi + (mid + lo), then + bias. On
 * the AVX512-BF16 ISA from M = 16 (group_size % 32 == 0), activations that are all bf16
 * values run one exact bf16 term instead, as pq_int4_weight_only_mm does there.
 * work: 64-byte aligned, pq_int4_weight_only_panels_workspace_bytes for these sizes.
 * PQ_NOT_FIXED_POINT when a row cannot be written so (out incomplete: the caller runs the
 * canonical weights). */
int pq_int4_weight_only_mm_panels(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                                  const uint8_t* panels, int64_t N, const float* scales,
                                  const uint8_t* zeros, int64_t group_size, const float* bias,
                                  float* out, void* work, int64_t work_bytes, int n_threads);
int64_t pq_int4_weight_only_panels_workspace_bytes(int isa, int64_t M, int64_t K,
                                                   int64_t group_size, int n_threads);
/* 1 when W4A8 layers of these sizes should keep their weight in that layout on this ISA:
 * as pq_int8_panel_layout, and on the AMX ISA, where pq_int4_dynamic_mm_panels runs the int8
 * tiles from M = 9 (each weight strip converted from its panel; the products those of
 * pq_int4_dynamic_mm's AMX path, bit for bit) and the panels' VNNI GEMV below. */
int pq_int4_panel_layout(int isa, int64_t K, int64_t N, int64_t group_size);
/* 1 when int4 weight-only layers should: as pq_int4_panel_layout, and on the AMX ISA, where
 * pq_int4_weight_only_mm_panels runs AMX-BF16 tiles from M = 16 (each weight strip converted
 * from its panel; the products those of pq_int4_weight_only_mm's AMX path, bit for bit) and
 * the panels' fixed-point GEMV below. */
int pq_int4_weight_only_panel_layout(int isa, int64_t K, int64_t N, int64_t group_size);

/* out[m,n] = sum_k x[m,k] * scales[n,k/G] * (code[n,k] - zeros[n,k/G]) + bias[n]
 * K % G == 0, G % 2 == 0 (G in {32, 64, 128, 256} from Python). Each weight is
 * dequantized to float32 as (float)(code - zero) * scale and x * w accumulated
 * in float32 (no per-group partial sums) -- except:
 *  - on AMX (M >= 16, G % 32 == 0, N % 32 == 0, given the workspace below),
 *    where each group's exact products (code - zero) * x (x split into bf16
 *    terms, see pq_int8_weight_only_mm) are summed in fp32 and scaled once;
 *  - on the AVX512-BF16 ISA (M >= 16, G % 32 == 0, given the workspace below)
 *    when every x[m,k] is a bf16 value: each group's exact products
 *    (code - zero) * x are summed in fp32 by vdpbf16ps (bf16 subnormals read as
 *    zero, subnormal sums flushed) and scaled once;
 *  - at decode sizes (G % 64 == 0; M == 1 on AVX512-VNNI, and M <= 4 when
 *    K % 128 == 0 and G == 64 or G % 128 == 0; also 5 <= M <= 15 on AMX, and
 *    M >= 5 on the AVX512 ISAs without AMX when K % 64 == 0 and G % 32 == 0;
 *    on AVX2 only M <= 4 with K % 128 == 0, G == 64 or G % 128 == 0 and every
 *    zero point <= 15, the GEMV below, other zero points there the float path:
 *    where pq_int4_weight_only_fixed_point says so;
 *    given that many bytes of 64-byte aligned `work`), where each row
 *    of x is written in 24-bit fixed point, x = s * (65536*hi + 256*mid + lo)
 *    + e with s = max|x[m,:]| / 8323072, three int8 terms and |e| <= s (the
 *    representation error: ~6e-8 of the row's max, below fp32's own rounding
 *    for all but the row's smallest entries), and each term runs the exact
 *    int8 x int4 group sums of pq_int4_dynamic_mm; out is the fp32 sum of the
 *    three terms' results (smallest first) + bias. At M <= 4 with K % 128 == 0,
 *    G == 64 or G % 128 == 0 and every zero point <= 15, the three terms instead
 *    share one exact int32 sum per 8 codes of X * (code - zero) (X = 65536*hi +
 *    256*mid + lo), rounded once to fp32 and scaled per group; out = s * (the
 *    fp32 sum of those) + bias.
 *    A row that is not finite,
 *    or whose max is below 2^-100, takes the float32 path. `work` may be null
 *    (the float32 path everywhere).
 * pq_int4_weight_only_workspace_bytes: the 64-byte aligned `work` of whichever of
 * these paths apply to the sizes and n_threads (the larger; 0: none). */
int64_t pq_int4_weight_only_workspace_bytes(int isa, int64_t M, int64_t K, int64_t N,
                                            int64_t group_size, int n_threads);
/* pq_int4_weight_only_mm_panels for bf16 rows x (row stride ldx >= K) into bf16 outputs
 * out[M, N], each the float result rounded to nearest, ties to even, as torch rounds (a NaN
 * becomes 0x7FC0): on the AMX-BF16 tiles, where x is one exact bf16 term, without a float32
 * copy of x or a float32 output. The _applies query is 1 for the ISA and sizes it runs (the
 * AMX build, from M = 16); elsewhere the call returns PQ_ERR_ISA. PQ_NOT_FINITE, out
 * untouched, when x holds an Inf or NaN (the float path propagates them). work as for
 * pq_int4_weight_only_mm_panels. */
int pq_int4_weight_only_panels_bf16_applies(int isa, int64_t M, int64_t K, int64_t N,
                                            int64_t group_size);
int pq_int4_weight_only_mm_panels_bf16(int isa, const uint16_t* x, int64_t M, int64_t K,
                                       int64_t ldx, const uint8_t* panels, int64_t N,
                                       const float* scales, const uint8_t* zeros,
                                       int64_t group_size, const float* bias, uint16_t* out,
                                       void* work, int64_t work_bytes, int n_threads);
/* 1 when the 24-bit fixed-point path above is the one for these sizes on this ISA. */
int pq_int4_weight_only_fixed_point(int isa, int64_t M, int64_t K, int64_t group_size);
int pq_int4_weight_only_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                           const uint8_t* w_packed, int64_t N, const float* scales,
                           const uint8_t* zeros, int64_t group_size, const float* bias,
                           float* out, int n_threads, void* work, int64_t work_bytes);

/* bf16 rows (M of K values, row stride ld >= K) -> fp32 [M, K] at dst, exactly; and n fp32
 * values -> bf16, rounded to nearest even as torch rounds (a NaN becomes 0x7FC0): the bound
 * calls of bf16 layers convert into buffers they keep (csrc/cpu/convert_bf16.cpp). */
int pq_bf16_to_f32_rows(const uint16_t* src, int64_t M, int64_t K, int64_t ld, float* dst);
int pq_f32_to_bf16(const float* src, int64_t n, uint16_t* dst);

/* Reads `bytes` bytes at `data` on n_threads threads (contiguous chunks), XOR-folding them
 * into *checksum: the benchmarks' memory read-bandwidth probe (csrc/cpu/probe.cpp). */
int pq_stream_read(const void* data, int64_t bytes, int n_threads, uint64_t* checksum);

/* The instruction peak of one vector unit on n_threads threads: ops per second (a multiply or
 * an add is one op) of `iters` iterations of independent register-only dot products or FMAs,
 * the widest this CPU has for the unit: the benchmarks' compute ceiling (csrc/cpu/probe_peak.cpp).
 * PQ_ERR_ISA when the CPU has no vector instruction for the unit (bf16 without AVX512-BF16). */
enum pq_peak_unit {
  PQ_PEAK_FP32 = 0, /* fp32 FMA */
  PQ_PEAK_BF16 = 1, /* bf16 pair dot product into fp32 (VDPBF16PS) */
  PQ_PEAK_INT8 = 2  /* u8 x s8 dot product into int32 (VPDPBUSD, or AVX2's VPMADDUBSW chain) */
};
int pq_probe_peak(int unit, int64_t iters, int n_threads, double* ops_per_s);

/* ---------------------------------------------------------------- sparse
 * Layouts (documented once in pyquant/sparse_formats.py):
 *   2:4 values   [N, K/2] (float32, bfloat16 or float16 per `values_dtype`;
 *                int8 for pq_sparse24_int8_mm; int4 codes packed two a byte
 *                as [N, K/4] for pq_sparse24_int4_mm), K % 4 == 0
 *   meta         uint8 [N, ceil(K/8)]: kept value j of row n sits at column
 *                4*(j/2) + ((meta[n, j/4] >> 2*(j%4)) & 3). Any meta bytes are
 *                safe: duplicate positions add up (as the reference's scatter_add).
 *   bitmask      uint8 [N, ceil(K/8)], bit k%8 of byte k/8 set when kept
 *   row_offsets  int64 [N + 1]; values[row_offsets[n] .. row_offsets[n+1])
 * Values stored as bf16/fp16 are widened to float32 in registers; every
 * product is accumulated in float32. Only kept positions are multiplied: an
 * Inf or NaN of x in a pruned column does not reach the output, where a dense
 * product with the decompressed weight (the reference, and the dense path
 * from the break-even batch size on) gives NaN for it (Inf * 0). */
typedef enum {
  PQ_DTYPE_F32 = 0,
  PQ_DTYPE_BF16 = 1,
  PQ_DTYPE_F16 = 2,
} pq_dtype;

/* out[m,n] = sum_j x[m, col(n,j)] * values[n,j] + (bias ? bias[n] : 0) */
int pq_sparse24_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                   const void* values, int values_dtype, const uint8_t* meta, int64_t N,
                   const float* bias, float* out, int n_threads);

/* out[m,n] = scale[n] * sum_j x[m, col(n,j)] * values_q[n,j] + bias[n]
 * At M = 1 on AVX512_AMX (whose CPUs have VBMI), x is written in 24-bit fixed point as in
 * pq_int4_weight_only_mm's decode path (three int8 terms, |error| <= max|x| / 8323072 per
 * entry; non-finite x, or max |x| < 2^-100, takes the float path) and the exact int32 sums
 * of the terms are combined in fp32. The same holds for pq_sparse24_int4_mm at M = 1 with
 * G % 32 == 0, except that its terms are combined exactly in int32 per group (per 128 kept
 * values where G is larger) and rounded to fp32 once. That path needs `work`: pq_sparse24_workspace_bytes(isa, M, K)
 * bytes (0 where it does not apply), 64-byte aligned; with less, or null, the float path runs. */
int64_t pq_sparse24_workspace_bytes(int isa, int64_t M, int64_t K);
int pq_sparse24_int8_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                        const int8_t* values_q, const uint8_t* meta, int64_t N,
                        const float* scale, const float* bias, float* out, int n_threads,
                        void* work, int64_t work_bytes);

/* Kept value j = scales[n, j/G] * (code[n,j] - zeros[n, j/G]) (in float32, as
 * pq_int4_weight_only_mm along the compressed axis); (K/2) % G == 0, G even. Any uint8
 * zero point; one past 15 (no quantizer writes it) keeps the call off the fixed-point path. */
int pq_sparse24_int4_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                        const uint8_t* packed, const uint8_t* meta, int64_t N,
                        const float* scales, const uint8_t* zeros, int64_t group_size,
                        const float* bias, float* out, int n_threads, void* work,
                        int64_t work_bytes);

/* pq_sparse24_int8_mm and pq_sparse24_int4_mm with values and meta in 4-row panels
 * (csrc/cpu/tile_sparse24_fx_panel.h, pyquant/sparse_panels.py): the same bytes as the
 * canonical [N, K/2] int8 or [N, K/4] int4 and [N, K/8] meta, reordered so that the kernels
 * read one stream of values and one of meta per 4 rows and decode them with fewer
 * instructions; scales and zeros stay canonical. N % 4 == 0, K % 128 == 0, K <= 32768; int4
 * G % 32 == 0. Results as the canonical ops' on the same weight: without the fixed-point path
 * bit for bit (the same float loop runs on each quad's rows); with it the canonical M = 1
 * fixed-point arithmetic (int8: the same; int4: the fp32 sums in another order), now at
 * every M up to 32, where the canonical ops run the float loop from M = 2. PQ_ERR_ISA on the
 * builds without them (all but AVX512-BF16 and AMX). */
/* Their workspace: bytes for M rows of x in fixed point (3 M panel rows of a line past K
 * rounded up to 128), 0 past 32 rows or on an ISA without them; with it (64-byte aligned)
 * every M up to 32 runs the int8 dot products, each pair of weight rows against blocks of 2
 * (int8) or 4 (int4) rows of x (at M = 1 both pairs of a quad at once); without it, past 32
 * rows, or for rows of x that fixed point cannot hold, the float loop runs on each quad's
 * canonical rows. */
int64_t pq_sparse24_panels_workspace_bytes(int isa, int64_t M, int64_t K);
int pq_sparse24_int8_panels_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                               const int8_t* values_q, const uint8_t* meta, int64_t N,
                               const float* scale, const float* bias, float* out, int n_threads,
                               void* work, int64_t work_bytes);
int pq_sparse24_int4_panels_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                               const uint8_t* codes, const uint8_t* meta, int64_t N,
                               const float* scales, const uint8_t* zeros, int64_t group_size,
                               const float* bias, float* out, int n_threads, void* work,
                               int64_t work_bytes);
/* Canonical values (bits 8: int8 [N, K/2]; bits 4: int4 codes [N, K/4]) and meta [N, K/8]
 * into those panels, or with unpack the other way (the panels are then read and the
 * canonical buffers written). Sizes as above; the two sides must not overlap. */
int pq_pack_sparse24_panels(int isa, int bits, int unpack, uint8_t* values, uint8_t* meta,
                            int64_t N, int64_t K, uint8_t* panel_values, uint8_t* panel_meta,
                            int n_threads);
/* Their dense weight: bits 8 -> int8 [N, K] as pq_sparse24_decompress, bits 4 -> dense int4
 * codes [N, K/2] as pq_sparse24_int4_decompress (zeros, group_size as there), from the panels
 * directly; PQ_ERR_ARG as those. */
int pq_sparse24_panels_decompress(int isa, int bits, const uint8_t* values, const uint8_t* meta,
                                  int64_t N, int64_t K, const uint8_t* zeros, int64_t group_size,
                                  uint8_t* out, int n_threads);

/* 2:4 bf16 values (values [N, K/2] bf16 bits) against x rows that are bf16 values (fp32
 * holding bf16, as the op's dense path gets them): the product of the dense weight, through
 * per-thread bf16 panels decompressed on the fly (csrc/cpu/tile_sparse_bf16_panel.h). Exact
 * products summed in fp32, bias added in fp32, on vdpbf16ps: a subnormal bf16 value or x
 * entry is read as zero and a subnormal partial sum is flushed to zero, as in the other bf16
 * paths (the sparse kernel below the break-even keeps them). K % 32 == 0. work: 64-byte aligned,
 * pq_sparse_bf16_panels_workspace_bytes bytes (-1: not on this ISA or these sizes).
 * PQ_ERR_ISA on builds without it (all but AVX512-BF16 without AMX); PQ_ERR_ARG also when
 * a group's positions are not strictly increasing or a row of x is not bf16 values (out is
 * then unspecified: the caller runs pq_sparse24_mm). */
int64_t pq_sparse_bf16_panels_workspace_bytes(int isa, int64_t M, int64_t K, int n_threads);
int pq_sparse24_bf16_panels_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                               const uint16_t* values, const uint8_t* meta, int64_t N,
                               const float* bias, float* out, void* work, int64_t work_bytes,
                               int n_threads);
/* The same for unstructured bf16 values (bitmask, values of nnz, row_offsets as in
 * pq_sparse_unstructured_mm; the same workspace); PQ_ERR_ARG also for an inconsistent row. */
int pq_sparse_unstructured_bf16_panels_mm(int isa, const float* x, int64_t M, int64_t K,
                                          int64_t ldx, const uint8_t* bitmask,
                                          const uint16_t* values, int64_t nnz,
                                          const int64_t* row_offsets, int64_t N,
                                          const float* bias, float* out, void* work,
                                          int64_t work_bytes, int n_threads);

/* Dense [N, K] (values' element type: elem_bytes 1 for int8 codes, 2 for bf16/fp16, 4 for
 * float32) from 2:4 values and canonical meta: kept values copied bit for bit, zeros
 * elsewhere. PQ_ERR_ARG also when a group's two positions are not strictly increasing (out
 * is then unspecified: such weights run on the sparse kernels, which add duplicates). */
int pq_sparse24_decompress(int isa, const void* values, int elem_bytes, const uint8_t* meta,
                           int64_t N, int64_t K, void* out, int n_threads);
/* Dense [N, K] from unstructured values (elem_bytes 2 for bf16/fp16, 4 for float32): kept
 * values copied bit for bit, zeros elsewhere. PQ_ERR_ARG when the weight is inconsistent (the
 * checks of pq_sparse_unstructured_mm; out is then unspecified). */
int pq_sparse_unstructured_decompress(int isa, const uint8_t* bitmask, const void* values,
                                      int elem_bytes, int64_t nnz, const int64_t* row_offsets,
                                      int64_t N, int64_t K, void* out, int n_threads);
/* The same for 2:4 + int4: dense packed int4 codes [N, K/2] (two a byte, low nibble first)
 * from the kept codes [N, K/4] and canonical meta; a pruned position holds its group's zero
 * point (zeros [N, (K/2)/G], G the group size over kept values), so it dequantizes to exactly
 * 0 and the dense codes with the same scales and zeros, group size 2G over K, are the weight
 * of pq_int4_weight_only_mm. PQ_ERR_ARG as above, and when a zero point is past 15 (it would
 * not fit a pruned position's nibble; pq_sparse24_int4_mm takes such weights). */
int pq_sparse24_int4_decompress(int isa, const uint8_t* packed, const uint8_t* meta, int64_t N,
                                int64_t K, const uint8_t* zeros, int64_t group_size,
                                uint8_t* out, int n_threads);

/* out[m,n] = sum over set bits k of row n of x[m,k] * values[row_offsets[n] + rank]
 * + bias[n]. The kernel checks, per row, that the offsets step by the row's
 * popcount and stay inside [0, nnz], that row_offsets[0] == 0 and
 * row_offsets[N] == nnz, and that no bit at k >= K is set: before reading the
 * row's values, or, where the K values from its first offset lie inside the
 * buffer (so that no bitmask can take a read past it), its count right after;
 * an inconsistent weight returns PQ_ERR_ARG (out is then unspecified).
 * On the AVX512-BF16 and AMX builds, bf16 values with rows of x that are all bf16 values (M * K up to
 * about 131072) run on vdpbf16ps: the products are exact as everywhere, but a subnormal
 * bf16 value or x entry is read as zero and a subnormal partial sum is flushed to zero. */
int pq_sparse_unstructured_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                              const uint8_t* bitmask, const void* values, int values_dtype,
                              int64_t nnz, const int64_t* row_offsets, int64_t N,
                              const float* bias, float* out, int n_threads);

/* The sparse GEMMs: the sparse ops for many rows of x (the prefill sizes), forming only the
 * kept products (AVX512 builds: PQ_ERR_ISA elsewhere). Each output is the sum over kept k of
 * values * x by fused multiply-add in fp32, then + bias, and any thread count gives the same
 * bits. The order: pq_sparse_unstructured_gemm sums in k order where M is past 64 in the
 * output's block of 128 rows, else as two interleaved partial sums per 64 columns, so the
 * same row of x can round differently in calls of different M; pq_sparse24_gemm sums in k
 * order at every M (a group's first kept value before its second), so a row of x gives the
 * same bits in any call. PQ_NOT_FINITE when x holds an Inf or NaN (nothing written: a dense
 * product would turn 0 * Inf into NaN, which these paths never form). work: 64-byte aligned,
 * pq_sparse_gemm_workspace_bytes(isa, M, K, n_threads) bytes for the unstructured GEMM (x
 * transposed, then per thread a block's sums) and pq_sparse24_gemm_workspace_bytes for the
 * 2:4 one (per thread 512 KiB, whatever M and K); each is -1 where its GEMM does not exist.
 *
 * pq_sparse_unstructured_gemm: pq_sparse_unstructured_mm's arguments, and the same checks of
 * the weight (PQ_ERR_ARG; out is then unspecified). pq_sparse24_gemm: pq_sparse24_mm's; meta
 * that is not canonical is taken as that op takes it (repeated positions add up). */
int64_t pq_sparse_gemm_workspace_bytes(int isa, int64_t M, int64_t K, int n_threads);
int64_t pq_sparse24_gemm_workspace_bytes(int isa, int64_t M, int64_t K, int n_threads);
int pq_sparse_unstructured_gemm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                                const uint8_t* bitmask, const void* values, int values_dtype,
                                int64_t nnz, const int64_t* row_offsets, int64_t N,
                                const float* bias, float* out, void* work, int64_t work_bytes,
                                int n_threads);
int pq_sparse24_gemm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                     const void* values, int values_dtype, const uint8_t* meta, int64_t N,
                     const float* bias, float* out, void* work, int64_t work_bytes,
                     int n_threads);

#ifdef __cplusplus
}
#endif
#endif /* PQ_H */
