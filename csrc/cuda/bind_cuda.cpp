// pyquant._C_cuda: CUDA availability queries (kernels are bound here later).
#include <pybind11/pybind11.h>

#include "pq_cuda.h"

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pyquant CUDA module (statically linked CUDA runtime, no libtorch)";
  m.attr("__version__") = PYQUANT_VERSION;
  m.def("cuda_runtime_version", &pq_cuda_runtime_version,
        "CUDA runtime version linked in, e.g. 13000 for 13.0.");
  m.def("device_count", &pq_cuda_device_count,
        "Number of CUDA devices; 0 without a GPU or driver.",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
