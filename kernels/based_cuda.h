/*
 * based_cuda.h -- the seam between the C core (csrc/) and the CUDA code (kernels/).
 * Everything here is extern "C" and callable from C; the .cu files implement it.
 * Functions return a cudaError_t value as int (0 = success); callers turn a failure
 * into BASED_STATUS_CUDA_ERROR with based_cuda_runtime_error_string().
 */
#ifndef BASED_CUDA_H
#define BASED_CUDA_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Usable CUDA devices; 0 when there is no driver or no GPU (never fails). */
int based_cuda_runtime_device_count(void);

/* cudaMalloc on `device` followed by a zero fill, finished before returning. The
 * calling thread's current device is restored. */
int based_cuda_runtime_malloc_zeroed(void **ptr, size_t nbytes, int device);

/* cudaFree; safe from any thread. */
int based_cuda_runtime_free(void *ptr, int device);

/* Device-to-device copy of nbytes on `device`, finished before returning. */
int based_cuda_runtime_memcpy(void *dst, const void *src, size_t nbytes, int device);

const char *based_cuda_runtime_error_string(int err);

#ifdef __cplusplus
}
#endif

#endif /* BASED_CUDA_H */
