// Runtime queries. Compiled by nvcc like the kernels to come, so a broken CUDA
// toolchain fails the build here rather than later.
#include <cuda_runtime_api.h>

#include "pq_cuda.h"

extern "C" int pq_cuda_runtime_version(void) {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

extern "C" int pq_cuda_device_count(void) {
  int n = 0;
  // Without a driver this fails (cudaErrorInsufficientDriver / NoDevice);
  // clear the error so it does not leak into a later CUDA call.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}
