/* pyquant CUDA side: plain C entry points implemented in csrc/cuda/*.cu and
 * bound by bind_cuda.cpp. Like pq.h, no libtorch: the CUDA runtime is linked
 * statically, so the module loads on machines without a GPU or driver. */
#ifndef PQ_CUDA_H
#define PQ_CUDA_H

#ifdef __cplusplus
extern "C" {
#endif

/* CUDA runtime version this module was linked against (e.g. 13000 = 13.0). */
int pq_cuda_runtime_version(void);
/* Number of usable CUDA devices; 0 when there is no GPU or no driver. */
int pq_cuda_device_count(void);

#ifdef __cplusplus
}
#endif
#endif /* PQ_CUDA_H */
