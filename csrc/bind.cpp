// pyquant._C: a thin pybind11 layer over the C API in pq.h.
//
// Buffers arrive as integer addresses (tensor.data_ptr(), 0 for None) so the
// module needs no libtorch; pyquant/_native.py owns the shape/dtype checks.
// Every kernel releases the GIL: they can run for milliseconds and use their
// own OpenMP threads, and other Python threads may keep working meanwhile.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "pq.h"

namespace py = pybind11;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

using gil_release = py::call_guard<py::gil_scoped_release>;

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyquant native CPU kernels (see csrc/pq.h for the exact semantics)";
  m.attr("__version__") = PYQUANT_VERSION;
  m.attr("ISA_PORTABLE") = static_cast<int>(PQ_ISA_PORTABLE);
  m.attr("ISA_AVX2") = static_cast<int>(PQ_ISA_AVX2);
  m.attr("ISA_AVX512_VNNI") = static_cast<int>(PQ_ISA_AVX512_VNNI);
  m.attr("ISA_AVX512_BF16") = static_cast<int>(PQ_ISA_AVX512_BF16);
  m.attr("ISA_AVX512_AMX") = static_cast<int>(PQ_ISA_AVX512_AMX);

  m.def("init", &pq_init, "Once per process: request the AMX tile state; 1 if AMX may be used.");
  m.def("int8_workspace_bytes", &pq_int8_workspace_bytes, py::arg("isa"), py::arg("M"),
        py::arg("K"), py::arg("N"), py::arg("n_threads"));
  m.def("int8_weight_only_workspace_bytes", &pq_int8_weight_only_workspace_bytes,
        py::arg("isa"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("n_threads"));
  m.def("int4_weight_only_workspace_bytes", &pq_int4_weight_only_workspace_bytes, py::arg("isa"),
        py::arg("M"), py::arg("K"), py::arg("N"), py::arg("group_size"), py::arg("n_threads"));
  m.def("int8_weight_only_fixed_point", &pq_int8_weight_only_fixed_point, py::arg("isa"),
        py::arg("M"), py::arg("K"), py::arg("N"));
  m.def("int4_weight_only_fixed_point", &pq_int4_weight_only_fixed_point, py::arg("isa"),
        py::arg("M"), py::arg("K"), py::arg("group_size"));
  m.def("int4_dynamic_workspace_bytes", &pq_int4_dynamic_workspace_bytes, py::arg("isa"),
        py::arg("M"), py::arg("K"), py::arg("group_size"), py::arg("n_threads"));

  m.def("best_isa", &pq_cpu_best_isa, "Highest ISA compiled in and supported by this CPU.");
  m.def("isa_available", &pq_isa_available, py::arg("isa"));
  m.def("isa_name", [](int isa) { return std::string(pq_isa_name(isa)); }, py::arg("isa"));
  m.def("compiled_isas", [] {
    std::vector<std::string> names;
    for (int isa = PQ_ISA_PORTABLE; isa <= PQ_ISA_AVX512_AMX; ++isa)
      if (pq_isa_compiled(isa)) names.emplace_back(pq_isa_name(isa));
    return names;
  }, "Names of the ISAs compiled into this build (whether or not this CPU has them).");

  m.def("int8_weight_only_mm",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t w, int64_t N,
           uintptr_t w_scale, uintptr_t bias, uintptr_t out, int n_threads, uintptr_t work,
           int64_t work_bytes) {
          return pq_int8_weight_only_mm(isa, ptr<const float>(x), M, K, ldx, ptr<const int8_t>(w), N,
                                        ptr<const float>(w_scale), ptr<const float>(bias),
                                        ptr<float>(out), n_threads, ptr<void>(work), work_bytes);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"), py::arg("w"),
        py::arg("N"), py::arg("w_scale"), py::arg("bias"), py::arg("out"), py::arg("n_threads"),
        py::arg("work") = 0, py::arg("work_bytes") = 0, gil_release());

  m.def("quantize_rows_int8",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t xq, uintptr_t x_scale,
           int n_threads) {
          return pq_quantize_rows_int8(isa, ptr<const float>(x), M, K, ldx, ptr<int8_t>(xq),
                                       ptr<float>(x_scale), n_threads);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"), py::arg("xq"),
        py::arg("x_scale"), py::arg("n_threads"), gil_release());

  m.def("quantize_rows_int8_amax",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t amax, uintptr_t xq,
           uintptr_t x_scale, int n_threads) {
          return pq_quantize_rows_int8_amax(isa, ptr<const float>(x), M, K, ldx,
                                            ptr<const float>(amax), ptr<int8_t>(xq),
                                            ptr<float>(x_scale), n_threads);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"), py::arg("amax"),
        py::arg("xq"), py::arg("x_scale"), py::arg("n_threads"), gil_release());

  /* the rows' and the panels' bf16-output W4A8 calls take the same arguments */
  for (auto [name, fn] : {std::pair{"int4_dynamic_mm_bf16", &pq_int4_dynamic_mm_bf16},
                          std::pair{"int4_dynamic_mm_panels_bf16", &pq_int4_dynamic_mm_panels_bf16}})
    m.def(name,
          [fn = fn](int isa, uintptr_t xq, uintptr_t x_scale, int64_t M, int64_t K, uintptr_t w,
                    int64_t N, uintptr_t scales, uintptr_t zeros, int64_t group_size,
                    uintptr_t bias, uintptr_t out, int n_threads, uintptr_t work,
                    int64_t work_bytes) {
            return fn(isa, ptr<const int8_t>(xq), ptr<const float>(x_scale), M, K,
                      ptr<const uint8_t>(w), N, ptr<const float>(scales),
                      ptr<const uint8_t>(zeros), group_size, ptr<const float>(bias),
                      ptr<uint16_t>(out), ptr<void>(work), work_bytes, n_threads);
          },
          py::arg("isa"), py::arg("xq"), py::arg("x_scale"), py::arg("M"), py::arg("K"),
          py::arg("w"), py::arg("N"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"),
          py::arg("bias"), py::arg("out"), py::arg("n_threads"), py::arg("work"),
          py::arg("work_bytes"), gil_release());
  m.def("int4_dynamic_bf16_applies", &pq_int4_dynamic_bf16_applies, py::arg("isa"), py::arg("M"),
        py::arg("K"), py::arg("N"), py::arg("group_size"));
  m.def("int8_weight_only_mm_bf16",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t w, int64_t N,
           uintptr_t w_scale, uintptr_t bias, uintptr_t out, int n_threads, uintptr_t work,
           int64_t work_bytes) {
          return pq_int8_weight_only_mm_bf16(isa, ptr<const uint16_t>(x), M, K, ldx,
                                             ptr<const int8_t>(w), N, ptr<const float>(w_scale),
                                             ptr<const float>(bias), ptr<uint16_t>(out),
                                             ptr<void>(work), work_bytes, n_threads);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"), py::arg("w"),
        py::arg("N"), py::arg("w_scale"), py::arg("bias"), py::arg("out"), py::arg("n_threads"),
        py::arg("work"), py::arg("work_bytes"), gil_release());
  m.def("int8_weight_only_bf16_applies", &pq_int8_weight_only_bf16_applies, py::arg("isa"),
        py::arg("M"), py::arg("K"), py::arg("N"));
  m.def("int4_weight_only_mm_panels_bf16",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t panels, int64_t N,
           uintptr_t scales, uintptr_t zeros, int64_t group_size, uintptr_t bias, uintptr_t out,
           int n_threads, uintptr_t work, int64_t work_bytes) {
          return pq_int4_weight_only_mm_panels_bf16(
              isa, ptr<const uint16_t>(x), M, K, ldx, ptr<const uint8_t>(panels), N,
              ptr<const float>(scales), ptr<const uint8_t>(zeros), group_size,
              ptr<const float>(bias), ptr<uint16_t>(out), ptr<void>(work), work_bytes, n_threads);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("panels"), py::arg("N"), py::arg("scales"), py::arg("zeros"),
        py::arg("group_size"), py::arg("bias"), py::arg("out"), py::arg("n_threads"),
        py::arg("work"), py::arg("work_bytes"), gil_release());
  m.def("int4_weight_only_panels_bf16_applies", &pq_int4_weight_only_panels_bf16_applies,
        py::arg("isa"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("group_size"));
  m.def("int8_dynamic_mm_bf16",
        [](int isa, uintptr_t xq, uintptr_t x_scale, int64_t M, int64_t K, uintptr_t w, int64_t N,
           uintptr_t w_scale, uintptr_t bias, uintptr_t out, int n_threads, uintptr_t work,
           int64_t work_bytes) {
          return pq_int8_dynamic_mm_bf16(isa, ptr<const int8_t>(xq), ptr<const float>(x_scale), M,
                                         K, ptr<const int8_t>(w), N, ptr<const float>(w_scale),
                                         ptr<const float>(bias), ptr<uint16_t>(out),
                                         ptr<void>(work), work_bytes, n_threads);
        },
        py::arg("isa"), py::arg("xq"), py::arg("x_scale"), py::arg("M"), py::arg("K"),
        py::arg("w"), py::arg("N"), py::arg("w_scale"), py::arg("bias"), py::arg("out"),
        py::arg("n_threads"), py::arg("work"), py::arg("work_bytes"), gil_release());
  m.def("int8_dynamic_mm_bf16_workspace_bytes", &pq_int8_dynamic_mm_bf16_workspace_bytes,
        py::arg("isa"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("n_threads"));
  m.def("quantize_rows_int8_bf16",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t xq, uintptr_t x_scale,
           int n_threads, uintptr_t work, int64_t work_bytes) {
          return pq_quantize_rows_int8_bf16(isa, ptr<const uint16_t>(x), M, K, ldx,
                                            ptr<int8_t>(xq), ptr<float>(x_scale), n_threads,
                                            ptr<void>(work), work_bytes);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"), py::arg("xq"),
        py::arg("x_scale"), py::arg("n_threads"), py::arg("work"), py::arg("work_bytes"),
        gil_release());
  m.def("quantize_rows_int8_bf16_workspace_bytes", &pq_quantize_rows_int8_bf16_workspace_bytes,
        py::arg("M"), py::arg("K"), py::arg("n_threads"));

  m.def("int8_gemm_s32",
        [](int isa, uintptr_t xq, int64_t M, int64_t K, uintptr_t w, int64_t N, uintptr_t acc,
           int n_threads, uintptr_t work, int64_t work_bytes) {
          return pq_int8_gemm_s32(isa, ptr<const int8_t>(xq), M, K, ptr<const int8_t>(w), N,
                                  ptr<int32_t>(acc), ptr<void>(work), work_bytes, n_threads);
        },
        py::arg("isa"), py::arg("xq"), py::arg("M"), py::arg("K"), py::arg("w"), py::arg("N"),
        py::arg("acc"), py::arg("n_threads"), py::arg("work") = 0, py::arg("work_bytes") = 0,
        gil_release());

  m.def("int8_dynamic_mm",
        [](int isa, uintptr_t xq, uintptr_t x_scale, int64_t M, int64_t K, uintptr_t w, int64_t N,
           uintptr_t w_scale, uintptr_t bias, uintptr_t out, int n_threads, uintptr_t work,
           int64_t work_bytes) {
          return pq_int8_dynamic_mm(isa, ptr<const int8_t>(xq), ptr<const float>(x_scale), M, K,
                                    ptr<const int8_t>(w), N, ptr<const float>(w_scale),
                                    ptr<const float>(bias), ptr<float>(out), ptr<void>(work),
                                    work_bytes, n_threads);
        },
        py::arg("isa"), py::arg("xq"), py::arg("x_scale"), py::arg("M"), py::arg("K"), py::arg("w"),
        py::arg("N"), py::arg("w_scale"), py::arg("bias"), py::arg("out"), py::arg("n_threads"),
        py::arg("work") = 0, py::arg("work_bytes") = 0, gil_release());

  m.def("int8_dynamic_mm_panels",
        [](int isa, uintptr_t xq, uintptr_t x_scale, int64_t M, int64_t K, uintptr_t panels,
           int64_t N, uintptr_t w_scale, uintptr_t bias, uintptr_t out, int n_threads,
           uintptr_t work, int64_t work_bytes) {
          return pq_int8_dynamic_mm_panels(isa, ptr<const int8_t>(xq), ptr<const float>(x_scale),
                                           M, K, ptr<const uint8_t>(panels), N,
                                           ptr<const float>(w_scale), ptr<const float>(bias),
                                           ptr<float>(out), ptr<void>(work), work_bytes, n_threads);
        },
        py::arg("isa"), py::arg("xq"), py::arg("x_scale"), py::arg("M"), py::arg("K"),
        py::arg("panels"), py::arg("N"), py::arg("w_scale"), py::arg("bias"), py::arg("out"),
        py::arg("n_threads"), py::arg("work"), py::arg("work_bytes"), gil_release());
  m.def("int8_panels_workspace_bytes", &pq_int8_panels_workspace_bytes, py::arg("M"));
  m.def("int8_panel_layout", &pq_int8_panel_layout, py::arg("isa"), py::arg("K"), py::arg("N"));

  m.def("int4_dynamic_mm_panels",
        [](int isa, uintptr_t xq, uintptr_t x_scale, int64_t M, int64_t K, uintptr_t panels,
           int64_t N, uintptr_t scales, uintptr_t zeros, int64_t group_size, uintptr_t bias,
           uintptr_t out, int n_threads, uintptr_t work, int64_t work_bytes) {
          return pq_int4_dynamic_mm_panels(isa, ptr<const int8_t>(xq), ptr<const float>(x_scale),
                                           M, K, ptr<const uint8_t>(panels), N,
                                           ptr<const float>(scales), ptr<const uint8_t>(zeros),
                                           group_size, ptr<const float>(bias), ptr<float>(out),
                                           ptr<void>(work), work_bytes, n_threads);
        },
        py::arg("isa"), py::arg("xq"), py::arg("x_scale"), py::arg("M"), py::arg("K"),
        py::arg("panels"), py::arg("N"), py::arg("scales"), py::arg("zeros"),
        py::arg("group_size"), py::arg("bias"), py::arg("out"), py::arg("n_threads"),
        py::arg("work"), py::arg("work_bytes"), gil_release());
  m.def("int4_panels_workspace_bytes", &pq_int4_panels_workspace_bytes, py::arg("M"),
        py::arg("K"), py::arg("group_size"));
  m.def("int4_dynamic_panels_workspace_bytes", &pq_int4_dynamic_panels_workspace_bytes,
        py::arg("isa"), py::arg("M"), py::arg("K"), py::arg("group_size"),
        py::arg("n_threads"));
  m.def("int4_panel_layout", &pq_int4_panel_layout, py::arg("isa"), py::arg("K"), py::arg("N"),
        py::arg("group_size"));
  m.def("int4_weight_only_panel_layout", &pq_int4_weight_only_panel_layout, py::arg("isa"),
        py::arg("K"), py::arg("N"), py::arg("group_size"));

  m.def("int8_weight_only_mm_panels",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t panels, int64_t N,
           uintptr_t w_scale, uintptr_t bias, uintptr_t out, int n_threads, uintptr_t work,
           int64_t work_bytes) {
          return pq_int8_weight_only_mm_panels(isa, ptr<const float>(x), M, K, ldx,
                                               ptr<const uint8_t>(panels), N,
                                               ptr<const float>(w_scale), ptr<const float>(bias),
                                               ptr<float>(out), ptr<void>(work), work_bytes,
                                               n_threads);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("panels"), py::arg("N"), py::arg("w_scale"), py::arg("bias"), py::arg("out"),
        py::arg("n_threads"), py::arg("work"), py::arg("work_bytes"), gil_release());
  m.def("int8_weight_only_panels_workspace_bytes", &pq_int8_weight_only_panels_workspace_bytes,
        py::arg("isa"), py::arg("M"), py::arg("K"), py::arg("n_threads"));

  m.def("pack_panels",
        [](int isa, int bits, int unpack, uintptr_t w, int64_t N, int64_t K, uintptr_t out,
           int n_threads) {
          return pq_pack_panels(isa, bits, unpack, ptr<const uint8_t>(w), N, K,
                                ptr<uint8_t>(out), n_threads);
        },
        py::arg("isa"), py::arg("bits"), py::arg("unpack"), py::arg("w"), py::arg("N"),
        py::arg("K"), py::arg("out"), py::arg("n_threads"), gil_release());
  m.def("int4_weight_only_mm_panels",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t panels, int64_t N,
           uintptr_t scales, uintptr_t zeros, int64_t group_size, uintptr_t bias, uintptr_t out,
           int n_threads, uintptr_t work, int64_t work_bytes) {
          return pq_int4_weight_only_mm_panels(isa, ptr<const float>(x), M, K, ldx,
                                               ptr<const uint8_t>(panels), N,
                                               ptr<const float>(scales), ptr<const uint8_t>(zeros),
                                               group_size, ptr<const float>(bias), ptr<float>(out),
                                               ptr<void>(work), work_bytes, n_threads);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("panels"), py::arg("N"), py::arg("scales"), py::arg("zeros"),
        py::arg("group_size"), py::arg("bias"), py::arg("out"), py::arg("n_threads"),
        py::arg("work"), py::arg("work_bytes"), gil_release());
  m.def("int4_weight_only_panels_workspace_bytes", &pq_int4_weight_only_panels_workspace_bytes,
        py::arg("isa"), py::arg("M"), py::arg("K"), py::arg("group_size"), py::arg("n_threads"));

  m.def("int4_dynamic_mm",
        [](int isa, uintptr_t xq, uintptr_t x_scale, int64_t M, int64_t K, uintptr_t w_packed,
           int64_t N, uintptr_t scales, uintptr_t zeros, int64_t group_size, uintptr_t bias,
           uintptr_t out, uintptr_t work, int64_t work_bytes, int n_threads) {
          return pq_int4_dynamic_mm(isa, ptr<const int8_t>(xq), ptr<const float>(x_scale), M, K,
                                    ptr<const uint8_t>(w_packed), N, ptr<const float>(scales),
                                    ptr<const uint8_t>(zeros), group_size, ptr<const float>(bias),
                                    ptr<float>(out), ptr<void>(work), work_bytes, n_threads);
        },
        py::arg("isa"), py::arg("xq"), py::arg("x_scale"), py::arg("M"), py::arg("K"),
        py::arg("w_packed"), py::arg("N"), py::arg("scales"), py::arg("zeros"),
        py::arg("group_size"), py::arg("bias"), py::arg("out"), py::arg("work"),
        py::arg("work_bytes"), py::arg("n_threads"), gil_release());

  m.def("int4_weight_only_mm",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t w_packed, int64_t N,
           uintptr_t scales, uintptr_t zeros, int64_t group_size, uintptr_t bias, uintptr_t out,
           int n_threads, uintptr_t work, int64_t work_bytes) {
          return pq_int4_weight_only_mm(isa, ptr<const float>(x), M, K, ldx,
                                        ptr<const uint8_t>(w_packed), N, ptr<const float>(scales),
                                        ptr<const uint8_t>(zeros), group_size,
                                        ptr<const float>(bias), ptr<float>(out), n_threads,
                                        ptr<void>(work), work_bytes);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("w_packed"), py::arg("N"), py::arg("scales"), py::arg("zeros"),
        py::arg("group_size"), py::arg("bias"), py::arg("out"), py::arg("n_threads"),
        py::arg("work") = 0, py::arg("work_bytes") = 0, gil_release());

  m.def("bf16_to_f32_rows",
        [](uintptr_t src, int64_t M, int64_t K, int64_t ld, uintptr_t dst) {
          return pq_bf16_to_f32_rows(ptr<const uint16_t>(src), M, K, ld, ptr<float>(dst));
        },
        py::arg("src"), py::arg("M"), py::arg("K"), py::arg("ld"), py::arg("dst"),
        gil_release());
  m.def("f32_to_bf16",
        [](uintptr_t src, int64_t n, uintptr_t dst) {
          return pq_f32_to_bf16(ptr<const float>(src), n, ptr<uint16_t>(dst));
        },
        py::arg("src"), py::arg("n"), py::arg("dst"), gil_release());

  m.def("stream_read",
        [](uintptr_t data, int64_t bytes, int n_threads) {
          // A C++ pair, not a Python tuple: the GIL is released while this body runs.
          uint64_t sum = 0;
          const int st = pq_stream_read(ptr<const void>(data), bytes, n_threads, &sum);
          return std::make_pair(st, sum);
        },
        py::arg("data"), py::arg("bytes"), py::arg("n_threads"), gil_release());

  m.def("probe_peak",
        [](int unit, int64_t iters, int n_threads) {
          double ops = 0;
          const int st = pq_probe_peak(unit, iters, n_threads, &ops);
          return std::make_pair(st, ops);
        },
        py::arg("unit"), py::arg("iters"), py::arg("n_threads"), gil_release());
  m.attr("PEAK_FP32") = static_cast<int>(PQ_PEAK_FP32);
  m.attr("PEAK_BF16") = static_cast<int>(PQ_PEAK_BF16);
  m.attr("PEAK_INT8") = static_cast<int>(PQ_PEAK_INT8);

  m.attr("DTYPE_F32") = static_cast<int>(PQ_DTYPE_F32);
  m.attr("DTYPE_BF16") = static_cast<int>(PQ_DTYPE_BF16);
  m.attr("DTYPE_F16") = static_cast<int>(PQ_DTYPE_F16);

  m.def("sparse24_mm",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t values,
           int values_dtype, uintptr_t meta, int64_t N, uintptr_t bias, uintptr_t out,
           int n_threads) {
          return pq_sparse24_mm(isa, ptr<const float>(x), M, K, ldx, ptr<const void>(values),
                                values_dtype, ptr<const uint8_t>(meta), N, ptr<const float>(bias),
                                ptr<float>(out), n_threads);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("values"), py::arg("values_dtype"), py::arg("meta"), py::arg("N"),
        py::arg("bias"), py::arg("out"), py::arg("n_threads"), gil_release());

  m.def("sparse_bf16_panels_workspace_bytes", &pq_sparse_bf16_panels_workspace_bytes,
        py::arg("isa"), py::arg("M"), py::arg("K"), py::arg("n_threads"));
  m.def("sparse24_bf16_panels_mm",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t values,
           uintptr_t meta, int64_t N, uintptr_t bias, uintptr_t out, uintptr_t work,
           int64_t work_bytes, int n_threads) {
          return pq_sparse24_bf16_panels_mm(isa, ptr<const float>(x), M, K, ldx,
                                            ptr<const uint16_t>(values), ptr<const uint8_t>(meta),
                                            N, ptr<const float>(bias), ptr<float>(out),
                                            ptr<void>(work), work_bytes, n_threads);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("values"), py::arg("meta"), py::arg("N"), py::arg("bias"), py::arg("out"),
        py::arg("work"), py::arg("work_bytes"), py::arg("n_threads"), gil_release());
  m.def("sparse_unstructured_bf16_panels_mm",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t bitmask,
           uintptr_t values, int64_t nnz, uintptr_t row_offsets, int64_t N, uintptr_t bias,
           uintptr_t out, uintptr_t work, int64_t work_bytes, int n_threads) {
          return pq_sparse_unstructured_bf16_panels_mm(
              isa, ptr<const float>(x), M, K, ldx, ptr<const uint8_t>(bitmask),
              ptr<const uint16_t>(values), nnz, ptr<const int64_t>(row_offsets), N,
              ptr<const float>(bias), ptr<float>(out), ptr<void>(work), work_bytes, n_threads);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("bitmask"), py::arg("values"), py::arg("nnz"), py::arg("row_offsets"),
        py::arg("N"), py::arg("bias"), py::arg("out"), py::arg("work"), py::arg("work_bytes"),
        py::arg("n_threads"), gil_release());
  m.def("sparse24_decompress",
        [](int isa, uintptr_t values, int elem_bytes, uintptr_t meta, int64_t N, int64_t K,
           uintptr_t out, int n_threads) {
          return pq_sparse24_decompress(isa, ptr<const void>(values), elem_bytes,
                                        ptr<const uint8_t>(meta), N, K, ptr<void>(out),
                                        n_threads);
        },
        py::arg("isa"), py::arg("values"), py::arg("elem_bytes"), py::arg("meta"), py::arg("N"), py::arg("K"),
        py::arg("out"), py::arg("n_threads"), gil_release());

  m.def("sparse_unstructured_decompress",
        [](int isa, uintptr_t bitmask, uintptr_t values, int elem_bytes, int64_t nnz,
           uintptr_t row_offsets, int64_t N, int64_t K, uintptr_t out, int n_threads) {
          return pq_sparse_unstructured_decompress(isa, ptr<const uint8_t>(bitmask),
                                                   ptr<const void>(values), elem_bytes, nnz,
                                                   ptr<const int64_t>(row_offsets), N, K,
                                                   ptr<void>(out), n_threads);
        },
        py::arg("isa"), py::arg("bitmask"), py::arg("values"), py::arg("elem_bytes"), py::arg("nnz"),
        py::arg("row_offsets"), py::arg("N"), py::arg("K"), py::arg("out"), py::arg("n_threads"),
        gil_release());

  m.def("sparse24_workspace_bytes", &pq_sparse24_workspace_bytes, py::arg("isa"), py::arg("M"),
        py::arg("K"));

  m.def("sparse24_int4_decompress",
        [](int isa, uintptr_t packed, uintptr_t meta, int64_t N, int64_t K, uintptr_t zeros,
           int64_t group_size, uintptr_t out, int n_threads) {
          return pq_sparse24_int4_decompress(isa, ptr<const uint8_t>(packed),
                                             ptr<const uint8_t>(meta), N, K,
                                             ptr<const uint8_t>(zeros), group_size,
                                             ptr<uint8_t>(out), n_threads);
        },
        py::arg("isa"), py::arg("packed"), py::arg("meta"), py::arg("N"), py::arg("K"), py::arg("zeros"),
        py::arg("group_size"), py::arg("out"), py::arg("n_threads"), gil_release());

  m.def("sparse24_int8_mm",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t values_q,
           uintptr_t meta, int64_t N, uintptr_t scale, uintptr_t bias, uintptr_t out,
           int n_threads, uintptr_t work, int64_t work_bytes) {
          return pq_sparse24_int8_mm(isa, ptr<const float>(x), M, K, ldx,
                                     ptr<const int8_t>(values_q), ptr<const uint8_t>(meta), N,
                                     ptr<const float>(scale), ptr<const float>(bias),
                                     ptr<float>(out), n_threads, ptr<void>(work), work_bytes);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("values_q"), py::arg("meta"), py::arg("N"), py::arg("scale"), py::arg("bias"),
        py::arg("out"), py::arg("n_threads"), py::arg("work") = 0, py::arg("work_bytes") = 0,
        gil_release());

  m.def("sparse24_int4_mm",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t packed,
           uintptr_t meta, int64_t N, uintptr_t scales, uintptr_t zeros, int64_t group_size,
           uintptr_t bias, uintptr_t out, int n_threads, uintptr_t work, int64_t work_bytes) {
          return pq_sparse24_int4_mm(isa, ptr<const float>(x), M, K, ldx,
                                     ptr<const uint8_t>(packed), ptr<const uint8_t>(meta), N,
                                     ptr<const float>(scales), ptr<const uint8_t>(zeros),
                                     group_size, ptr<const float>(bias), ptr<float>(out),
                                     n_threads, ptr<void>(work), work_bytes);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("packed"), py::arg("meta"), py::arg("N"), py::arg("scales"), py::arg("zeros"),
        py::arg("group_size"), py::arg("bias"), py::arg("out"), py::arg("n_threads"),
        py::arg("work") = 0, py::arg("work_bytes") = 0, gil_release());

  m.def("sparse24_panels_workspace_bytes", &pq_sparse24_panels_workspace_bytes, py::arg("isa"),
        py::arg("M"), py::arg("K"));
  m.def("sparse24_int8_panels_mm",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t values_q,
           uintptr_t meta, int64_t N, uintptr_t scale, uintptr_t bias, uintptr_t out,
           int n_threads, uintptr_t work, int64_t work_bytes) {
          return pq_sparse24_int8_panels_mm(isa, ptr<const float>(x), M, K, ldx,
                                            ptr<const int8_t>(values_q), ptr<const uint8_t>(meta),
                                            N, ptr<const float>(scale), ptr<const float>(bias),
                                            ptr<float>(out), n_threads, ptr<void>(work),
                                            work_bytes);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("values_q"), py::arg("meta"), py::arg("N"), py::arg("scale"), py::arg("bias"),
        py::arg("out"), py::arg("n_threads"), py::arg("work") = 0, py::arg("work_bytes") = 0,
        gil_release());
  m.def("sparse24_int4_panels_mm",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t codes,
           uintptr_t meta, int64_t N, uintptr_t scales, uintptr_t zeros, int64_t group_size,
           uintptr_t bias, uintptr_t out, int n_threads, uintptr_t work, int64_t work_bytes) {
          return pq_sparse24_int4_panels_mm(isa, ptr<const float>(x), M, K, ldx,
                                            ptr<const uint8_t>(codes), ptr<const uint8_t>(meta),
                                            N, ptr<const float>(scales),
                                            ptr<const uint8_t>(zeros), group_size,
                                            ptr<const float>(bias), ptr<float>(out), n_threads,
                                            ptr<void>(work), work_bytes);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("codes"), py::arg("meta"), py::arg("N"), py::arg("scales"), py::arg("zeros"),
        py::arg("group_size"), py::arg("bias"), py::arg("out"), py::arg("n_threads"),
        py::arg("work") = 0, py::arg("work_bytes") = 0, gil_release());
  m.def("sparse24_panels_decompress",
        [](int isa, int bits, uintptr_t values, uintptr_t meta, int64_t N, int64_t K,
           uintptr_t zeros, int64_t group_size, uintptr_t out, int n_threads) {
          return pq_sparse24_panels_decompress(isa, bits, ptr<const uint8_t>(values),
                                               ptr<const uint8_t>(meta), N, K,
                                               ptr<const uint8_t>(zeros), group_size,
                                               ptr<uint8_t>(out), n_threads);
        },
        py::arg("isa"), py::arg("bits"), py::arg("values"), py::arg("meta"), py::arg("N"),
        py::arg("K"), py::arg("zeros"), py::arg("group_size"), py::arg("out"),
        py::arg("n_threads"), gil_release());
  m.def("pack_sparse24_panels",
        [](int isa, int bits, int unpack, uintptr_t values, uintptr_t meta, int64_t N, int64_t K,
           uintptr_t panel_values, uintptr_t panel_meta, int n_threads) {
          return pq_pack_sparse24_panels(isa, bits, unpack, ptr<uint8_t>(values),
                                         ptr<uint8_t>(meta), N, K, ptr<uint8_t>(panel_values),
                                         ptr<uint8_t>(panel_meta), n_threads);
        },
        py::arg("isa"), py::arg("bits"), py::arg("unpack"), py::arg("values"), py::arg("meta"),
        py::arg("N"), py::arg("K"), py::arg("panel_values"), py::arg("panel_meta"),
        py::arg("n_threads"), gil_release());

  m.def("sparse_gemm_workspace_bytes", &pq_sparse_gemm_workspace_bytes, py::arg("isa"),
        py::arg("M"), py::arg("K"), py::arg("n_threads"));
  m.def("sparse24_gemm_workspace_bytes", &pq_sparse24_gemm_workspace_bytes, py::arg("isa"),
        py::arg("M"), py::arg("K"), py::arg("n_threads"));
  m.def("sparse24_gemm",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t values,
           int values_dtype, uintptr_t meta, int64_t N, uintptr_t bias, uintptr_t out,
           uintptr_t work, int64_t work_bytes, int n_threads) {
          return pq_sparse24_gemm(isa, ptr<const float>(x), M, K, ldx, ptr<const void>(values),
                                  values_dtype, ptr<const uint8_t>(meta), N,
                                  ptr<const float>(bias), ptr<float>(out), ptr<void>(work),
                                  work_bytes, n_threads);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("values"), py::arg("values_dtype"), py::arg("meta"), py::arg("N"),
        py::arg("bias"), py::arg("out"), py::arg("work"), py::arg("work_bytes"),
        py::arg("n_threads"), gil_release());
  m.def("sparse_unstructured_gemm",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t bitmask,
           uintptr_t values, int values_dtype, int64_t nnz, uintptr_t row_offsets, int64_t N,
           uintptr_t bias, uintptr_t out, uintptr_t work, int64_t work_bytes, int n_threads) {
          return pq_sparse_unstructured_gemm(
              isa, ptr<const float>(x), M, K, ldx, ptr<const uint8_t>(bitmask),
              ptr<const void>(values), values_dtype, nnz, ptr<const int64_t>(row_offsets), N,
              ptr<const float>(bias), ptr<float>(out), ptr<void>(work), work_bytes, n_threads);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("bitmask"), py::arg("values"), py::arg("values_dtype"), py::arg("nnz"),
        py::arg("row_offsets"), py::arg("N"), py::arg("bias"), py::arg("out"), py::arg("work"),
        py::arg("work_bytes"), py::arg("n_threads"), gil_release());
  m.def("sparse_unstructured_mm",
        [](int isa, uintptr_t x, int64_t M, int64_t K, int64_t ldx, uintptr_t bitmask,
           uintptr_t values, int values_dtype, int64_t nnz, uintptr_t row_offsets, int64_t N,
           uintptr_t bias, uintptr_t out, int n_threads) {
          return pq_sparse_unstructured_mm(isa, ptr<const float>(x), M, K, ldx,
                                           ptr<const uint8_t>(bitmask), ptr<const void>(values),
                                           values_dtype, nnz, ptr<const int64_t>(row_offsets), N,
                                           ptr<const float>(bias), ptr<float>(out), n_threads);
        },
        py::arg("isa"), py::arg("x"), py::arg("M"), py::arg("K"), py::arg("ldx"),
        py::arg("bitmask"), py::arg("values"), py::arg("values_dtype"), py::arg("nnz"),
        py::arg("row_offsets"), py::arg("N"), py::arg("bias"), py::arg("out"),
        py::arg("n_threads"), gil_release());
}
