/* The C API of pq.h: argument checks, ISA selection, and the call into the
 * kernel table of the chosen ISA build. Compiled with baseline flags only, so
 * it runs on any x86-64 (or other) CPU and decides which builds may run. */
#include "../pq.h"
#include "kernels.h"
#include "arg_checks.h"

#include <omp.h>
#include <atomic>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

/* AMX state is off for a Linux process until it asks (kernel >= 5.16). */
int g_amx_permitted = -1; /* -1: not asked yet */

/* The AVX512-BF16 build's extras: AVX512-VBMI byte permutes, VBMI2 16-bit expands and
 * BITALG 16-bit popcounts (leaf 7, ECX bits 1, 6 and 12), BMI2 (EBX bit 8) and
 * AVX512-BF16 (leaf 7, subleaf 1, EAX bit 5). The OS state they need is the AVX512 one
 * that cpu_has checks. */
bool bf16_cpu() {
#if defined(__x86_64__)
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  const bool vbmi = (c & (1u << 1)) && (c & (1u << 6)) && (c & (1u << 12)) && (b & (1u << 8));
  unsigned a1, b1, c1, d1;
  __asm__ volatile("cpuid" : "=a"(a1), "=b"(b1), "=c"(c1), "=d"(d1) : "a"(7), "c"(1));
  return vbmi && (a1 & (1u << 5));
#else
  return false;
#endif
}

/* AMX tiles for int8 and bf16 (leaf 7, EDX bits 24, 25, 22), on top of the AVX512-BF16
 * build's extras (every AMX CPU has them all). */
bool amx_cpu() {
#if defined(__x86_64__)
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  const bool tile = d & (1u << 24), int8 = d & (1u << 25), bf16 = d & (1u << 22);
  return tile && int8 && bf16 && bf16_cpu();
#else
  return false;
#endif
}

int amx_request() {
  if (g_amx_permitted >= 0) return g_amx_permitted;
  int ok = 0;
#if defined(__linux__) && defined(__x86_64__)
  if (amx_cpu()) {
    const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }
#endif
  g_amx_permitted = ok;
  return ok;
}

bool cpu_has(int isa);

bool probe_cpu(int isa) {
  if (isa == PQ_ISA_PORTABLE) return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  /* libgcc's checks include the OS (XGETBV) enabling the AVX / AVX512 register state. */
  if (isa == PQ_ISA_AVX2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  if (isa == PQ_ISA_AVX512_VNNI)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("bmi2");
  if (isa == PQ_ISA_AVX512_BF16) return cpu_has(PQ_ISA_AVX512_VNNI) && bf16_cpu();
  if (isa == PQ_ISA_AVX512_AMX) return cpu_has(PQ_ISA_AVX512_BF16) && amx_request();
#endif
  return false;
}

/* probe_cpu once per level: every call checks its level, and CPUID traps to the
 * hypervisor in a virtual machine (several microseconds a call, as much as a whole
 * small GEMV). Races only repeat the same probe. */
bool cpu_has(int isa) {
  static std::atomic<int> known[PQ_ISA_AVX512_AMX + 1] = {-1, -1, -1, -1, -1};
  if (isa < 0 || isa > PQ_ISA_AVX512_AMX) return false;
  int v = known[isa].load(std::memory_order_relaxed);
  if (v < 0) known[isa].store(v = probe_cpu(isa), std::memory_order_relaxed);
  return v;
}

/* The dense and sparse tables of one ISA build. */
struct Build {
  const pq::KernelTable* dense;
  const pq::SparseKernelTable* sparse;
};

Build compiled_build(int isa) {
  switch (isa) {
    case PQ_ISA_PORTABLE: return {&pq_portable::kKernels, &pq_portable::kSparseKernels};
#ifdef PQ_HAVE_AVX2
    case PQ_ISA_AVX2: return {&pq_avx2::kKernels, &pq_avx2::kSparseKernels};
#endif
#ifdef PQ_HAVE_AVX512
    case PQ_ISA_AVX512_VNNI: return {&pq_avx512::kKernels, &pq_avx512::kSparseKernels};
#endif
#ifdef PQ_HAVE_AVX512BF16
    case PQ_ISA_AVX512_BF16: return {&pq_avx512bf16::kKernels, &pq_avx512bf16::kSparseKernels};
#endif
#ifdef PQ_HAVE_AMX
    case PQ_ISA_AVX512_AMX: return {&pq_amx::kKernels, &pq_amx::kSparseKernels};
#endif
    default: return {nullptr, nullptr};
  }
}

const pq::KernelTable* compiled_table(int isa) { return compiled_build(isa).dense; }

/* The table for isa, or null when it is not compiled in or the CPU lacks it. */
const pq::KernelTable* table(int isa) {
  const pq::KernelTable* t = compiled_table(isa);
  return t && cpu_has(isa) ? t : nullptr;
}

}  // namespace

/* The sparse kernels of the same build as table(isa) (used by dispatch_sparse.cpp). */
const pq::SparseKernelTable* pq::sparse_table(int isa) {
  return table(isa) ? compiled_build(isa).sparse : nullptr;
}

namespace {

}  // namespace

extern "C" {

int pq_init(void) { return amx_request(); }

int pq_isa_available(int isa) { return table(isa) != nullptr; }

int pq_isa_compiled(int isa) { return compiled_table(isa) != nullptr; }

int pq_cpu_best_isa(void) {
  for (int isa = PQ_ISA_AVX512_AMX; isa > PQ_ISA_PORTABLE; --isa)
    if (pq_isa_available(isa)) return isa;
  return PQ_ISA_PORTABLE;
}

const char* pq_isa_name(int isa) {
  switch (isa) {
    case PQ_ISA_PORTABLE: return "portable";
    case PQ_ISA_AVX2: return "avx2";
    case PQ_ISA_AVX512_VNNI: return "avx512_vnni";
    case PQ_ISA_AVX512_BF16: return "avx512_bf16";
    case PQ_ISA_AVX512_AMX: return "avx512_amx";
    default: return "unknown";
  }
}

/* The AMX paths' scratch (kernels.h) when they apply, else 0; -1 when a size overflows. */
static int64_t amx_bf16_need(int isa, int64_t M, int64_t K, int64_t N, int64_t G, int n_threads) {
  if (isa != PQ_ISA_AVX512_AMX || !table(isa) || M <= 0 || N <= 0 || K <= 0 ||
      !pq::amx_bf16_applies(M, K, N, G))
    return 0;
  if (too_big(M + 16, 6 * K) || too_big(threads(n_threads), 64 * K + 128 * (K / G) + 64))
    return -1;
  return pq::amx_bf16_work_bytes(M, K, G, threads(n_threads));
}

static bool aligned64(const void* p) { return ((uintptr_t)p & 63) == 0; }

/* The caller's scratch, or null (a path that needs none) unless it is all there: at
 * least `need` > 0 bytes, 64-byte aligned. */
static void* whole_work(void* work, int64_t work_bytes, int64_t need) {
  return work && need > 0 && work_bytes >= need && aligned64(work) ? work : nullptr;
}

/* int8 weight-only's fixed-point GEMV at M = 1 (kernels.h), on both AVX512 ISAs */
static bool int8wo_gemv_runs(int isa, int64_t M, int64_t K, int64_t N) {
  return M == 1 && K > 0 && N > 0 && isa >= PQ_ISA_AVX512_VNNI && table(isa);
}

/* ... and the fixed-point panels at prefill without AMX (kernels.h) */
static bool int8wo_panel_runs(int isa, int64_t M, int64_t K, int64_t N) {
  return (isa == PQ_ISA_AVX512_VNNI || isa == PQ_ISA_AVX512_BF16) && table(isa) && N > 0 &&
         pq::int8wo_panel_applies(M, K);
}

int pq_int8_weight_only_fixed_point(int isa, int64_t M, int64_t K, int64_t N) {
  return int8wo_gemv_runs(isa, M, K, N) || int8wo_panel_runs(isa, M, K, N) ||
         (amx_bf16_need(isa, M, K, N, pq::int8wo_bf16_group(K), 1) > 0 &&
          pq::int8wo_fixed_applies(M, K, N));
}

/* The bf16 panels' scratch (kernels.h). The kernels take that path whenever they are given
 * work, so sizes past int64 give no work at all (-1). Per thread at most 64 K + 4 K + 128
 * bytes (G >= 32). */
static int64_t bf16_panel_need(int64_t M, int64_t K, int64_t G, int n_threads) {
  int64_t sum;
  if (too_big(M, 2 * K) || too_big(threads(n_threads), 68 * K + 128) ||
      __builtin_add_overflow(2 * M * K + 64, threads(n_threads) * (68 * K + 128), &sum))
    return -1;
  return pq::bf16_panel_work_bytes(M, K, G, threads(n_threads));
}

int64_t pq_int8_weight_only_workspace_bytes(int isa, int64_t M, int64_t K, int64_t N,
                                            int n_threads) {
  if (M < 0 || K < 0 || N < 0) return -1;
  if (int8wo_gemv_runs(isa, M, K, N))
    return too_big(3, K + 4 * N + 64) ? -1 : pq::int8wo_gemv_work_bytes(K, N);
  if (int8wo_panel_runs(isa, M, K, N)) {
    /* the fixed-point panels (slices of S rows), and on the AVX512-BF16 build the bf16
     * panels (one group of K) for activations that are bf16 values */
    const int64_t S = pq::int8wo_panel_slice(M, K);
    if (too_big(3 * S, K + 8) || too_big(threads(n_threads), 32 * K + 64)) return -1;
    const int64_t fixed = pq::int8wo_panel_work_bytes(M, K, threads(n_threads));
    if (!(isa == PQ_ISA_AVX512_BF16 && pq::bf16_panel_applies(M, K, K))) return fixed;
    const int64_t bf16 = bf16_panel_need(M, K, K, n_threads);
    return bf16 < 0 ? -1 : bf16 > fixed ? bf16 : fixed;
  }
  /* the bf16 panels alone where the fixed-point ones do not apply (K % 64 != 0) */
  if (isa == PQ_ISA_AVX512_BF16 && table(isa) && N > 0 && pq::bf16_panel_applies(M, K, K))
    return bf16_panel_need(M, K, K, n_threads);
  const int64_t bf16 = amx_bf16_need(isa, M, K, N, pq::int8wo_bf16_group(K), n_threads);
  if (bf16 <= 0 || !pq::int8wo_fixed_applies(M, K, N)) return bf16;
  if (too_big(3 * 16 + 3 * pq::int8wo_fixed_slice(M, K, N), 2 * K + 4 * N + 4)) return -1;
  const int64_t fixed = pq::int8wo_fixed_work_bytes(M, K, N);
  return fixed > bf16 ? fixed : bf16;
}

int pq_int8_weight_only_bf16_applies(int isa, int64_t M, int64_t K, int64_t N) {
  const pq::KernelTable* t = table(isa);
  return t && t->int8_weight_only_mm_bf16 && !too_big(N, K) && !too_big(M, N) &&
         amx_bf16_need(isa, M, K, N, pq::int8wo_bf16_group(K), 1) > 0;
}

int pq_int8_weight_only_mm_bf16(int isa, const uint16_t* x, int64_t M, int64_t K, int64_t ldx,
                                const int8_t* w, int64_t N, const float* w_scale,
                                const float* bias, uint16_t* out, void* work,
                                int64_t work_bytes, int n_threads) {
  if (!pq_int8_weight_only_bf16_applies(isa, M, K, N)) return PQ_ERR_ISA;
  if (ldx < K || too_big(M, ldx) || missing(x, M * K) || missing(w, N * K) ||
      missing(w_scale, N) || missing(out, M * N) || !work || !aligned64(work))
    return PQ_ERR_ARG;
  const int64_t need = pq_int8_weight_only_workspace_bytes(isa, M, K, N, n_threads);
  if (need < 0 || work_bytes < need) return PQ_ERR_ARG;
  return table(isa)->int8_weight_only_mm_bf16(x, M, K, ldx, w, N, w_scale, bias, out, work,
                                              threads(n_threads))
             ? PQ_OK
             : PQ_NOT_FINITE;
}

int pq_int8_weight_only_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                           const int8_t* w, int64_t N, const float* w_scale, const float* bias,
                           float* out, int n_threads, void* work, int64_t work_bytes) {
  const pq::KernelTable* t = table(isa);
  if (!t) return PQ_ERR_ISA;
  if (bad_x(x, M, K, ldx) || N < 0 || too_big(N, K) || too_big(M, N) || missing(w, N * K) ||
      missing(w_scale, N) || missing(out, M * N))
    return PQ_ERR_ARG;
  if (M == 0 || N == 0) return PQ_OK;
  if (K == 0) return fill_bias(out, M, N, bias), PQ_OK;
  /* the AMX paths only with their whole, aligned workspace; else float32 */
  work = whole_work(work, work_bytes,
                    pq_int8_weight_only_workspace_bytes(isa, M, K, N, n_threads));
  t->int8_weight_only_mm(x, M, K, ldx, w, N, w_scale, bias, out, threads(n_threads), work);
  return PQ_OK;
}

int pq_quantize_rows_int8_amax(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                               const float* amax, int8_t* xq, float* x_scale, int n_threads) {
  const pq::KernelTable* t = table(isa);
  if (!t) return PQ_ERR_ISA;
  if (bad_x(x, M, K, ldx) || too_big(M, K) || missing(xq, M * K) || missing(x_scale, M))
    return PQ_ERR_ARG;
  if (M == 0) return PQ_OK;
  if (K == 0) { /* nothing to quantize; the scale follows the (given or empty-row) amax */
    for (int64_t m = 0; m < M; ++m) {
      const float s = amax ? amax[m] / 127.0f : 0.0f;
      x_scale[m] = s == 0.0f ? 1.0f : s;
    }
    return PQ_OK;
  }
  t->quantize_rows_int8(x, M, K, ldx, amax, xq, x_scale, threads(n_threads));
  return PQ_OK;
}

int pq_quantize_rows_int8(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                          int8_t* xq, float* x_scale, int n_threads) {
  return pq_quantize_rows_int8_amax(isa, x, M, K, ldx, nullptr, xq, x_scale, n_threads);
}

/* bf16 rows: each thread takes a block of rows and widens them one at a time into its part
 * of `work` (K floats, in its L1 at K = 4096), with its ISA's vectors, quantizing each from
 * there (KernelTable::quantize_rows_int8_bf16). Against a block of rows (up to 64 KiB)
 * widened first by the baseline build's loop (pq_bf16_to_f32_rows), the quantizer ran
 * 1.17-1.24x faster on the AVX512/AMX build and 1.04-1.13x on AVX2 (M x K = 16..1024 x 4096
 * and 1024 x 11008, two threads, calls of both builds alternated in one process). */
/* Rows a block: at most 16384 values, and few enough that every thread gets a block (the
 * fp32 quantizer ran a row a thread: at K = 4096, M = 64, blocks of 4 rows would have left
 * 48 of 64 threads idle). */
static int64_t bf16_quant_rows_a_block(int64_t M, int64_t K, int n_threads) {
  const int64_t cap = K >= 16384 ? 1 : 16384 / K, share = (M + threads(n_threads) - 1) / threads(n_threads);
  return cap < share ? cap : share > 0 ? share : 1;
}
static int bf16_quant_threads(int64_t M, int64_t K, int n_threads) {
  const int64_t rows = bf16_quant_rows_a_block(M, K, n_threads), blocks = (M + rows - 1) / rows;
  return blocks < threads(n_threads) ? (int)(blocks > 0 ? blocks : 1) : threads(n_threads);
}

int64_t pq_quantize_rows_int8_bf16_workspace_bytes(int64_t M, int64_t K, int n_threads) {
  if (M < 0 || K < 0 || too_big(M, K)) return -1;
  if (M == 0 || K == 0) return 0;
  return (int64_t)bf16_quant_threads(M, K, n_threads) * K * 4;
}

int pq_quantize_rows_int8_bf16(int isa, const uint16_t* x, int64_t M, int64_t K, int64_t ldx,
                               int8_t* xq, float* x_scale, int n_threads, void* work,
                               int64_t work_bytes) {
  const pq::KernelTable* t = table(isa);
  if (!t) return PQ_ERR_ISA;
  if (M < 0 || K < 0 || ldx < K || too_big(M, ldx) || missing(x, M * K) ||
      missing(xq, M * K) || missing(x_scale, M))
    return PQ_ERR_ARG;
  const int64_t need = pq_quantize_rows_int8_bf16_workspace_bytes(M, K, n_threads);
  if (need < 0 || (need > 0 && (!work || work_bytes < need || ((uintptr_t)work & 3))))
    return PQ_ERR_ARG;
  if (M == 0) return PQ_OK;
  if (K == 0) return pq_quantize_rows_int8_amax(isa, nullptr, M, 0, 0, nullptr, xq, x_scale, 1);
  const int64_t rows = bf16_quant_rows_a_block(M, K, n_threads), blocks = (M + rows - 1) / rows;
  const int nt = bf16_quant_threads(M, K, n_threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    float* buf = (float*)work + (int64_t)omp_get_thread_num() * K;
    const int64_t m0 = b * rows, mr = M - m0 < rows ? M - m0 : rows;
    t->quantize_rows_int8_bf16(x + m0 * ldx, mr, K, ldx, xq + m0 * K, x_scale + m0, buf);
  }
  return PQ_OK;
}

int64_t pq_int8_workspace_bytes(int isa, int64_t M, int64_t K, int64_t N, int n_threads) {
  if (isa < PQ_ISA_AVX512_VNNI || !table(isa) || M <= 0 || K <= 0 || N <= 0 || K % 64 ||
      too_big((M + 15) / 16 * 16, K) || too_big(threads(n_threads), 32 * K + 64))
    return 0;
  const int64_t amx = isa == PQ_ISA_AVX512_AMX && M >= 9 && N % 32 == 0 ? (M + 15) / 16 * 16 * K : 0;
  const int64_t panel = pq::w8a8_panel_applies(M, K) ? pq::w8a8_panel_work_bytes(M, K, threads(n_threads)) : 0;
  return amx > panel ? amx : panel;
}

int pq_int8_gemm_s32(int isa, const int8_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t N,
                     int32_t* acc, void* work, int64_t work_bytes, int n_threads) {
  const pq::KernelTable* t = table(isa);
  if (!t) return PQ_ERR_ISA;
  if (M < 0 || K < 0 || N < 0 || too_big(M, K) || too_big(N, K) || too_big(M, N) ||
      missing(xq, M * K) || missing(w, N * K) || missing(acc, M * N))
    return PQ_ERR_ARG;
  if (M == 0 || N == 0) return PQ_OK;
  if (K == 0) {
    for (int64_t i = 0; i < M * N; ++i) acc[i] = 0;
    return PQ_OK;
  }
  if (work_bytes < 0) work_bytes = 0;
  t->int8_gemm_s32(xq, M, K, w, N, acc, work, work ? work_bytes : 0, threads(n_threads));
  return PQ_OK;
}

int pq_int8_dynamic_mm(int isa, const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                       const int8_t* w, int64_t N, const float* w_scale, const float* bias,
                       float* out, void* work, int64_t work_bytes, int n_threads) {
  const pq::KernelTable* t = table(isa);
  if (!t) return PQ_ERR_ISA;
  if (M < 0 || K < 0 || N < 0 || too_big(M, K) || too_big(N, K) || too_big(M, N) ||
      missing(xq, M * K) || missing(x_scale, M) || missing(w, N * K) || missing(w_scale, N) ||
      missing(out, M * N))
    return PQ_ERR_ARG;
  if (M == 0 || N == 0) return PQ_OK;
  if (K == 0) return fill_bias(out, M, N, bias), PQ_OK;
  if (work_bytes < 0) work_bytes = 0;
  t->int8_dynamic_mm(xq, x_scale, M, K, w, N, w_scale, bias, out, work, work ? work_bytes : 0,
                     threads(n_threads));
  return PQ_OK;
}

int64_t pq_int8_dynamic_mm_bf16_workspace_bytes(int isa, int64_t M, int64_t K, int64_t N,
                                                int n_threads) {
  (void)n_threads;
  const pq::KernelTable* t = table(isa);
  if (!t || !t->int8_dynamic_mm_bf16 || M < 9 || K <= 0 || N <= 0 || K % 64 || N % 32 ||
      too_big((M + 15) / 16 * 16, K) || too_big(M, N) || too_big(N, K))
    return -1;
  return pq::amx_int8_bf16_out_work_bytes(M, K, N);
}

int pq_int8_dynamic_mm_bf16(int isa, const int8_t* xq, const float* x_scale, int64_t M,
                            int64_t K, const int8_t* w, int64_t N, const float* w_scale,
                            const float* bias, uint16_t* out, void* work, int64_t work_bytes,
                            int n_threads) {
  const pq::KernelTable* t = table(isa);
  if (!t) return PQ_ERR_ISA;
  const int64_t need = pq_int8_dynamic_mm_bf16_workspace_bytes(isa, M, K, N, n_threads);
  if (need < 0) return PQ_ERR_ISA;
  if (missing(xq, M * K) || missing(x_scale, M) || missing(w, N * K) || missing(w_scale, N) ||
      missing(out, M * N) || !work || !aligned64(work) || work_bytes < need)
    return PQ_ERR_ARG;
  t->int8_dynamic_mm_bf16(xq, x_scale, M, K, w, N, w_scale, bias, out, work, threads(n_threads));
  return PQ_OK;
}

int pq_int8_panel_layout(int isa, int64_t K, int64_t N) {
  /* AMX tiles multiply the canonical rows faster at prefill: there the layout is not kept */
  return (isa == PQ_ISA_AVX512_VNNI || isa == PQ_ISA_AVX512_BF16) && table(isa) &&
         table(isa)->int8_dynamic_mm_panels && K > 0 && N > 0 && K % 64 == 0 && N % 32 == 0;
}

int64_t pq_int8_panels_workspace_bytes(int64_t M) {
  return M < 0 || M > ((int64_t)1 << 40) ? -1 : pq::int8_panels_work_bytes(M);
}

int pq_int8_dynamic_mm_panels(int isa, const int8_t* xq, const float* x_scale, int64_t M,
                              int64_t K, const uint8_t* panels, int64_t N, const float* w_scale,
                              const float* bias, float* out, void* work, int64_t work_bytes,
                              int n_threads) {
  const pq::KernelTable* t = table(isa);
  if (!t) return PQ_ERR_ISA;
  if (!t->int8_dynamic_mm_panels) return PQ_ERR_ISA;
  if (M < 0 || K <= 0 || N <= 0 || K % 64 || N % 32 || too_big(M, K) || too_big(N, K) ||
      too_big(M, N) || missing(xq, M * K) || missing(x_scale, M) || missing(panels, N * K) ||
      ((uintptr_t)panels & 63) || missing(w_scale, N) || missing(out, M * N))
    return PQ_ERR_ARG;
  if (M == 0) return PQ_OK;
  if (!work || ((uintptr_t)work & 63) || work_bytes < pq::int8_panels_work_bytes(M))
    return PQ_ERR_ARG;
  t->int8_dynamic_mm_panels(xq, x_scale, M, K, panels, N, w_scale, bias, out, work,
                            threads(n_threads));
  return PQ_OK;
}

int pq_pack_panels(int isa, int bits, int unpack, const uint8_t* w, int64_t N, int64_t K,
                   uint8_t* out, int n_threads) {
  const pq::KernelTable* t = table(isa);
  if (!t || !t->pack_panels) return PQ_ERR_ISA;
  if ((bits != 8 && bits != 4) || N <= 0 || K <= 0 || N % 32 || K % (bits == 8 ? 64 : 128) ||
      too_big(N, K) || missing(w, N * K * bits / 8) || missing(out, N * K * bits / 8) ||
      (unpack && ((uintptr_t)w & 63)))
    return PQ_ERR_ARG;
  t->pack_panels(bits, unpack != 0, w, N, K, out, threads(n_threads));
  return PQ_OK;
}

int pq_int4_panel_layout(int isa, int64_t K, int64_t N, int64_t group_size) {
  const bool groups = group_size > 0 && group_size % 32 == 0 && K % group_size == 0;
  /* AMX too (where the int8 layers keep rows): W4A8 decode runs the panels' GEMV and prefill
   * the int8 tiles converting each strip from its panel (amx_int4dyn_convert_panels).
   * Against the rows (benchmarks/panel_layout_ab.py, Llama-2-7B shapes, 2-core Granite
   * Rapids): 1.02-1.21x at M = 1, 0.94-1.31x at M = 2-6, 1.23-1.77x at M = 8-32, 1.06-1.13x
   * from M = 128 */
  if (isa == PQ_ISA_AVX512_AMX)
    return groups && K > 0 && N > 0 && K % 64 == 0 && N % 32 == 0 && table(isa) &&
           table(isa)->int4_dynamic_mm_panels;
  return pq_int8_panel_layout(isa, K, N) && table(isa)->int4_dynamic_mm_panels && groups;
}

int pq_int4_weight_only_panel_layout(int isa, int64_t K, int64_t N, int64_t group_size) {
  /* AMX too: its prefill converts each strip from the panels as fast as from the rows, and
   * its decode runs the panels' fixed-point GEMV */
  const bool shape = K > 0 && N > 0 && K % 64 == 0 && N % 32 == 0 && group_size > 0 &&
                     group_size % 32 == 0 && K % group_size == 0;
  if (isa == PQ_ISA_AVX512_AMX)
    return shape && table(isa) && table(isa)->int4_weight_only_mm_panels;
  return pq_int4_panel_layout(isa, K, N, group_size);
}

int64_t pq_int4_panels_workspace_bytes(int64_t M, int64_t K, int64_t group_size) {
  if (M < 0 || K <= 0 || group_size <= 0 || K % group_size || too_big(M, K)) return -1;
  return pq::int4_panels_work_bytes(M, K, group_size);
}

static int64_t int4_dynamic_amx_bytes(int isa, int64_t M, int64_t K, int64_t G, int n_threads);

int64_t pq_int4_dynamic_panels_workspace_bytes(int isa, int64_t M, int64_t K,
                                               int64_t group_size, int n_threads) {
  const int64_t base = pq_int4_panels_workspace_bytes(M, K, group_size);
  const int64_t amx = base < 0 ? -1 : int4_dynamic_amx_bytes(isa, M, K, group_size, n_threads);
  if (amx < 0) return -1;
  return amx > base ? amx : base;
}

int pq_int4_dynamic_mm_panels(int isa, const int8_t* xq, const float* x_scale, int64_t M,
                              int64_t K, const uint8_t* panels, int64_t N, const float* scales,
                              const uint8_t* zeros, int64_t group_size, const float* bias,
                              float* out, void* work, int64_t work_bytes, int n_threads) {
  const pq::KernelTable* t = table(isa);
  if (!t || !t->int4_dynamic_mm_panels) return PQ_ERR_ISA;
  const int64_t G = group_size;
  if (M < 0 || K <= 0 || N <= 0 || K % 64 || N % 32 || G <= 0 || G % 32 || K % G ||
      too_big(M, K) || too_big(N, K) || too_big(M, N) || missing(xq, M * K) ||
      missing(x_scale, M) || missing(panels, N * K / 2) || ((uintptr_t)panels & 63) ||
      missing(scales, N * (K / G)) || missing(zeros, N * (K / G)) || ((uintptr_t)scales & 63) ||
      missing(out, M * N))
    return PQ_ERR_ARG;
  if (M == 0) return PQ_OK;
  if (!work || ((uintptr_t)work & 63) || work_bytes < pq::int4_panels_work_bytes(M, K, G))
    return PQ_ERR_ARG;
  /* the AMX tiles only with their whole scratch (pq_int4_dynamic_panels_workspace_bytes);
   * else the panels' VNNI kernels */
  const bool amx = pq::amx_int4dyn_applies(M, K, N, G) &&
                   whole_work(work, work_bytes, int4_dynamic_amx_bytes(isa, M, K, G, n_threads));
  t->int4_dynamic_mm_panels(xq, x_scale, M, K, panels, N, scales, zeros, G, bias, out, work,
                            amx, threads(n_threads));
  return PQ_OK;
}

int64_t pq_int8_weight_only_panels_workspace_bytes(int isa, int64_t M, int64_t K,
                                                   int n_threads) {
  if (M < 0 || K <= 0 || too_big(3 * M, K)) return -1;
  const int64_t fixed = pq::int8wo_panels_work_bytes(M, K);
  /* the bf16 panels of the AVX512-BF16 build, for activations that are bf16 values */
  if (isa != PQ_ISA_AVX512_BF16 || M < pq::kInt8WoPanelsBf16MinM) return fixed;
  const int64_t bf16 = bf16_panel_need(M, K, K, n_threads);
  return bf16 < 0 ? -1 : bf16 > fixed ? bf16 : fixed;
}

int pq_int8_weight_only_mm_panels(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                                  const uint8_t* panels, int64_t N, const float* w_scale,
                                  const float* bias, float* out, void* work, int64_t work_bytes,
                                  int n_threads) {
  const pq::KernelTable* t = table(isa);
  if (!t || !t->int8_weight_only_mm_panels) return PQ_ERR_ISA;
  if (bad_x(x, M, K, ldx) || N <= 0 || K <= 0 || K % 64 || N % 32 || too_big(3 * M, K) ||
      too_big(N, K) || too_big(M, N) || missing(panels, N * K) || ((uintptr_t)panels & 63) ||
      missing(w_scale, N) || missing(out, M * N))
    return PQ_ERR_ARG;
  if (M == 0) return PQ_OK;
  if (!work || ((uintptr_t)work & 63) ||
      work_bytes < pq_int8_weight_only_panels_workspace_bytes(isa, M, K, n_threads))
    return PQ_ERR_ARG;
  return t->int8_weight_only_mm_panels(x, M, K, ldx, panels, N, w_scale, bias, out, work,
                                       threads(n_threads))
             ? PQ_OK
             : PQ_NOT_FIXED_POINT;
}

int64_t pq_int4_weight_only_panels_workspace_bytes(int isa, int64_t M, int64_t K,
                                                   int64_t group_size, int n_threads) {
  if (M < 0 || K <= 0 || group_size <= 0 || K % group_size || too_big(3 * M, K)) return -1;
  const int64_t fixed = pq::int4wo_panels_work_bytes(M, K, group_size);
  /* the AMX-BF16 tiles from M = 16 (N does not size them: any multiple of 32 will do) */
  const int64_t amx = amx_bf16_need(isa, M, K, 32, group_size, n_threads);
  if (amx) return amx < 0 ? -1 : amx > fixed ? amx : fixed;
  /* the bf16 panels of the AVX512-BF16 build, for activations that are bf16 values */
  if (isa != PQ_ISA_AVX512_BF16 || !pq::bf16_panel_applies(M, K, group_size)) return fixed;
  const int64_t bf16 = bf16_panel_need(M, K, group_size, n_threads);
  return bf16 < 0 ? -1 : bf16 > fixed ? bf16 : fixed;
}

int pq_int4_weight_only_mm_panels(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                                  const uint8_t* panels, int64_t N, const float* scales,
                                  const uint8_t* zeros, int64_t group_size, const float* bias,
                                  float* out, void* work, int64_t work_bytes, int n_threads) {
  const pq::KernelTable* t = table(isa);
  if (!t || !t->int4_weight_only_mm_panels) return PQ_ERR_ISA;
  const int64_t G = group_size;
  if (bad_x(x, M, K, ldx) || N <= 0 || K <= 0 || K % 64 || N % 32 || G <= 0 || G % 32 ||
      K % G || too_big(3 * M, K) || too_big(N, K) || too_big(M, N) ||
      missing(panels, N * K / 2) || ((uintptr_t)panels & 63) || missing(scales, N * (K / G)) ||
      missing(zeros, N * (K / G)) || ((uintptr_t)scales & 63) || missing(out, M * N))
    return PQ_ERR_ARG;
  if (M == 0) return PQ_OK;
  if (!work || ((uintptr_t)work & 63) ||
      work_bytes < pq_int4_weight_only_panels_workspace_bytes(isa, M, K, G, n_threads))
    return PQ_ERR_ARG;
  return t->int4_weight_only_mm_panels(x, M, K, ldx, panels, N, scales, zeros, G, bias, out,
                                       work, threads(n_threads))
             ? PQ_OK
             : PQ_NOT_FIXED_POINT;
}

int pq_int4_weight_only_panels_bf16_applies(int isa, int64_t M, int64_t K, int64_t N,
                                            int64_t group_size) {
  const pq::KernelTable* t = table(isa);
  return t && t->int4_weight_only_mm_panels_bf16 && M > 0 && K > 0 && N > 0 && K % 64 == 0 &&
         N % 32 == 0 && group_size > 0 && group_size % 32 == 0 && K % group_size == 0 &&
         !too_big(3 * M, K) && !too_big(N, K) && !too_big(M, N) &&
         pq::amx_bf16_applies(M, K, N, group_size);
}

int pq_int4_weight_only_mm_panels_bf16(int isa, const uint16_t* x, int64_t M, int64_t K,
                                       int64_t ldx, const uint8_t* panels, int64_t N,
                                       const float* scales, const uint8_t* zeros,
                                       int64_t group_size, const float* bias, uint16_t* out,
                                       void* work, int64_t work_bytes, int n_threads) {
  if (!pq_int4_weight_only_panels_bf16_applies(isa, M, K, N, group_size)) return PQ_ERR_ISA;
  const int64_t G = group_size;
  if (ldx < K || too_big(M, ldx) || missing(x, M * K) || missing(panels, N * K / 2) ||
      ((uintptr_t)panels & 63) || missing(scales, N * (K / G)) || missing(zeros, N * (K / G)) ||
      ((uintptr_t)scales & 63) || missing(out, M * N) || !work || ((uintptr_t)work & 63))
    return PQ_ERR_ARG;
  const int64_t need = pq_int4_weight_only_panels_workspace_bytes(isa, M, K, G, n_threads);
  if (need < 0 || work_bytes < need) return PQ_ERR_ARG;
  return table(isa)->int4_weight_only_mm_panels_bf16(x, M, K, ldx, panels, N, scales, zeros, G,
                                                     bias, out, work, threads(n_threads))
             ? PQ_OK
             : PQ_NOT_FINITE;
}

int pq_int4_weight_only_fixed_point(int isa, int64_t M, int64_t K, int64_t group_size) {
  if (!table(isa) || group_size <= 0 || K <= 0 || K % group_size != 0) return 0;
  if (isa == PQ_ISA_AVX2) return pq::int4wo_fx24_gemv_applies(M, K, group_size); /* its only one */
  return isa >= PQ_ISA_AVX512_VNNI &&
         pq::int4wo_fixed_applies(M, K, group_size, isa == PQ_ISA_AVX512_AMX);
}

int64_t pq_int4_weight_only_workspace_bytes(int isa, int64_t M, int64_t K, int64_t N,
                                            int64_t group_size, int n_threads) {
  if (M < 0 || K < 0 || N < 0 || group_size <= 0 || too_big(M, K) || too_big(M, N)) return -1;
  if (K % group_size != 0) return 0;
  /* the AVX512-BF16 build's bf16 panels, for activations that are bf16 values */
  const int64_t bf16p =
      isa == PQ_ISA_AVX512_BF16 && table(isa) && N > 0 && pq::bf16_panel_applies(M, K, group_size)
          ? bf16_panel_need(M, K, group_size, n_threads)
          : 0;
  if (bf16p < 0) return -1;
  if (!pq_int4_weight_only_fixed_point(isa, M, K, group_size)) {
    const int64_t amx = amx_bf16_need(isa, M, K, N, group_size, n_threads);
    return amx < 0 ? -1 : amx > bf16p ? amx : bf16p;
  }
  /* one slice of rows (kernels.h): a whole one and the last, which may take another path */
  const int64_t S = pq::int4wo_fixed_slice(K), slices[2] = {M < S ? M : S, M > S ? M % S : 0};
  int64_t fixed = bf16p;
  for (const int64_t ms : slices) {
    if (ms == 0) continue;
    const int64_t rows = 3 * ms;
    int64_t dyn = pq_int4_dynamic_workspace_bytes(isa, rows, K, group_size, n_threads);
    if (dyn < 0) return -1;
    /* the M <= 4 GEMV keeps its reordered terms and lane sums there (kernels.cpp) */
    const int64_t gemv = pq::int4wo_fx24_gemv_applies(ms, K, group_size)
                             ? pq::align64(3 * ms * K) + ms * K / 2 : 0;
    if (gemv > dyn) dyn = gemv;
    const int64_t need = pq::align64(rows * K) + pq::align64(rows * 4) +
                         pq::int4wo_fixed_outputs_bytes(rows, K, N, group_size, isa == PQ_ISA_AVX512_AMX) + dyn;
    if (need > fixed) fixed = need;
  }
  return fixed;
}

int pq_int4_weight_only_mm(int isa, const float* x, int64_t M, int64_t K, int64_t ldx,
                           const uint8_t* w_packed, int64_t N, const float* scales,
                           const uint8_t* zeros, int64_t group_size, const float* bias,
                           float* out, int n_threads, void* work, int64_t work_bytes) {
  const pq::KernelTable* t = table(isa);
  if (!t) return PQ_ERR_ISA;
  if (group_size <= 0 || group_size % 2 != 0 || bad_x(x, M, K, ldx) || K % group_size != 0 ||
      N < 0 || too_big(N, K) || too_big(M, N))
    return PQ_ERR_ARG;
  const int64_t groups = N * (K / group_size);
  if (missing(w_packed, N * K / 2) || missing(scales, groups) || missing(zeros, groups) ||
      missing(out, M * N))
    return PQ_ERR_ARG;
  if (M == 0 || N == 0) return PQ_OK;
  if (K == 0) return fill_bias(out, M, N, bias), PQ_OK;
  /* the fixed-point path only with its whole, aligned workspace; else float32 */
  work = whole_work(work, work_bytes,
                    pq_int4_weight_only_workspace_bytes(isa, M, K, N, group_size, n_threads));
  t->int4_weight_only_mm(x, M, K, ldx, w_packed, N, scales, zeros, group_size, bias, out,
                         threads(n_threads), work);
  return PQ_OK;
}

/* The part every ISA needs (the VNNI kernel's group sums and reordered codes). */
static int64_t int4_dynamic_base_bytes(int64_t M, int64_t K, int64_t group_size) {
  if (M < 0 || K < 0 || group_size <= 0 || too_big(M, K) || too_big(M, K / group_size * 4 + K))
    return -1;
  return M * (K / group_size) * 4 + M * K;
}

/* The AMX W4A8 scratch for these sizes (any N: the caller's N decides whether it runs). */
static int64_t int4_dynamic_amx_bytes(int isa, int64_t M, int64_t K, int64_t G, int n_threads) {
  if (isa != PQ_ISA_AVX512_AMX || !table(isa) || K <= 0 || !pq::amx_int4dyn_applies(M, K, 32, G))
    return 0;
  if (too_big(M + 16, K) || too_big(threads(n_threads), 32 * K + 128 * (K / G) + 64)) return -1;
  return pq::amx_int4dyn_work_bytes(M, K, G, threads(n_threads));
}

/* The AVX512 W4A8 panel scratch (kernels.h) where that path applies, else 0. */
static int64_t int4_dynamic_panel_bytes(int isa, int64_t M, int64_t K, int64_t G, int n_threads) {
  if (isa < PQ_ISA_AVX512_VNNI || !table(isa) || K <= 0 || !pq::w4a8_panel_applies(M, K))
    return 0;
  if (too_big(M, K / G * 4 + 64) || too_big(threads(n_threads), 40 * K + 256)) return -1;
  return pq::w4a8_panel_work_bytes(M, K, G, threads(n_threads));
}

int64_t pq_int4_dynamic_workspace_bytes(int isa, int64_t M, int64_t K, int64_t group_size,
                                        int n_threads) {
  const int64_t base = int4_dynamic_base_bytes(M, K, group_size);
  const int64_t amx = base < 0 ? -1 : int4_dynamic_amx_bytes(isa, M, K, group_size, n_threads);
  const int64_t panel = base < 0 ? -1 : int4_dynamic_panel_bytes(isa, M, K, group_size, n_threads);
  if (amx < 0 || panel < 0) return -1;
  const int64_t most = amx > panel ? amx : panel;
  return base > most ? base : most;
}

int pq_int4_dynamic_mm(int isa, const int8_t* xq, const float* x_scale, int64_t M, int64_t K,
                       const uint8_t* w_packed, int64_t N, const float* scales,
                       const uint8_t* zeros, int64_t group_size, const float* bias, float* out,
                       void* work, int64_t work_bytes, int n_threads) {
  const pq::KernelTable* t = table(isa);
  if (!t) return PQ_ERR_ISA;
  /* the row kernels step 64 codes at a time through a group, or take a group of 32 whole */
  if (group_size <= 0 || (group_size != 32 && group_size % 64 != 0) || M < 0 || K < 0 ||
      K % group_size != 0 || N < 0 || too_big(M, K) || too_big(N, K) || too_big(M, N))
    return PQ_ERR_ARG;
  const int64_t groups = N * (K / group_size);
  const int64_t need = int4_dynamic_base_bytes(M, K, group_size);
  if (missing(xq, M * K) || missing(x_scale, M) || missing(w_packed, N * K / 2) ||
      missing(scales, groups) || missing(zeros, groups) || missing(out, M * N) || need < 0 ||
      work_bytes < need || missing(work, need) || ((uintptr_t)work & 3))
    return PQ_ERR_ARG;
  if (M == 0 || N == 0) return PQ_OK;
  if (K == 0) return fill_bias(out, M, N, bias), PQ_OK;
  /* the AMX tiles only with their whole, aligned scratch; else the VNNI kernel */
  const bool amx = pq::amx_int4dyn_applies(M, K, N, group_size) &&
                   whole_work(work, work_bytes,
                              int4_dynamic_amx_bytes(isa, M, K, group_size, n_threads));
  /* else, on AVX512, the panel GEMM with its whole, aligned scratch */
  const bool panel = !amx && whole_work(work, work_bytes,
                                        int4_dynamic_panel_bytes(isa, M, K, group_size, n_threads));
  t->int4_dynamic_mm(xq, x_scale, M, K, w_packed, N, scales, zeros, group_size, bias, out, work,
                     amx, panel, threads(n_threads));
  return PQ_OK;
}

int pq_int4_dynamic_bf16_applies(int isa, int64_t M, int64_t K, int64_t N, int64_t group_size) {
  const pq::KernelTable* t = table(isa);
  return t && t->int4_dynamic_mm_bf16 && group_size > 0 && group_size % 32 == 0 && K > 0 && N > 0 &&
         K % group_size == 0 && !too_big(N, K) && !too_big(M, N) &&
         pq::amx_int4dyn_applies(M, K, N, group_size) &&
         int4_dynamic_amx_bytes(isa, M, K, group_size, 1) > 0;
}

static int int4_dynamic_bf16_call(int isa, const int8_t* xq, const float* x_scale, int64_t M,
                                  int64_t K, const uint8_t* w, int64_t N, const float* scales,
                                  const uint8_t* zeros, int64_t group_size, const float* bias,
                                  uint16_t* out, void* work, int64_t work_bytes, int n_threads,
                                  bool panels) {
  if (!pq_int4_dynamic_bf16_applies(isa, M, K, N, group_size)) return PQ_ERR_ISA;
  const int64_t groups = N * (K / group_size);
  if (missing(xq, M * K) || missing(x_scale, M) || missing(w, N * K / 2) ||
      missing(scales, groups) || missing(zeros, groups) || missing(out, M * N) || !work ||
      !aligned64(work) || (panels && (!aligned64(w) || !aligned64(scales))))
    return PQ_ERR_ARG;
  const int64_t need = int4_dynamic_amx_bytes(isa, M, K, group_size, n_threads);
  if (need < 0 || work_bytes < need) return PQ_ERR_ARG;
  return table(isa)->int4_dynamic_mm_bf16(xq, x_scale, M, K, w, N, scales, zeros, group_size,
                                          bias, out, work, threads(n_threads), panels)
             ? PQ_OK
             : PQ_NOT_FIXED_POINT;
}

int pq_int4_dynamic_mm_bf16(int isa, const int8_t* xq, const float* x_scale, int64_t M,
                            int64_t K, const uint8_t* w_packed, int64_t N, const float* scales,
                            const uint8_t* zeros, int64_t group_size, const float* bias,
                            uint16_t* out, void* work, int64_t work_bytes, int n_threads) {
  return int4_dynamic_bf16_call(isa, xq, x_scale, M, K, w_packed, N, scales, zeros, group_size,
                                bias, out, work, work_bytes, n_threads, false);
}

int pq_int4_dynamic_mm_panels_bf16(int isa, const int8_t* xq, const float* x_scale, int64_t M,
                                   int64_t K, const uint8_t* panels, int64_t N,
                                   const float* scales, const uint8_t* zeros, int64_t group_size,
                                   const float* bias, uint16_t* out, void* work,
                                   int64_t work_bytes, int n_threads) {
  return int4_dynamic_bf16_call(isa, xq, x_scale, M, K, panels, N, scales, zeros, group_size,
                                bias, out, work, work_bytes, n_threads, true);
}

}  // extern "C"
