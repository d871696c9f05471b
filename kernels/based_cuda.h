/*
 * based_cuda.h -- the CUDA side of based, as the C core sees it: plain C, one function
 * per op and phase, each taking the op's checked arguments (csrc/args.h) and the stream
 * to run on. Nothing else of CUDA reaches csrc/.
 *
 * Contract of every based_cuda_<op>_<phase>():
 *   - the arguments passed every check of csrc/ (shapes, dtypes, one CUDA device, unit
 *     stride along each row's last axis, no overlaps); the function checks only what
 *     depends on the kernels (e.g. a size no kernel supports) and fails with
 *     BASED_STATUS_NOT_IMPLEMENTED / based_fail() naming it, before launching anything;
 *   - it runs on args->device.id (made current for the call, the caller's restored),
 *     launches asynchronously on `stream` (NULL: the legacy default stream), never
 *     synchronises the device or the stream, never copies to or from the host, and
 *     allocates nothing for the decode ops (a decode launch is CUDA-graph capturable);
 *   - a failed launch or allocation returns BASED_STATUS_CUDA_ERROR (OUT_OF_MEMORY for
 *     cudaErrorMemoryAllocation) with cudaGetErrorString's words in based_last_error().
 *
 * Token counters live on the device with the state; the kernels read and advance them
 * (tokens[b] += T) in stream order, so no host round trip is needed. Counters the CPU
 * would refuse (negative, or past 2^62) cannot be checked on the host without a sync.
 * The linear-attention kernels do not read them (they only advance them). The
 * sliding-window kernels need them for ring slots: they treat a sequence whose counter
 * is out of range as invalid, write NaN to its outputs and leave its cache and counter
 * unchanged, so memory is never addressed out of bounds.
 */
#ifndef BASED_CUDA_H
#define BASED_CUDA_H

#include <stddef.h>

#include "../csrc/args.h"

#ifdef __cplusplus
extern "C" {
#endif

/* cudaStream_t, declared as cuda_runtime_api.h declares it (a repeated identical typedef is
 * valid C11 and C++), so that csrc/ compiles without the CUDA headers. */
typedef struct CUstream_st *cudaStream_t;

/* ---- runtime (kernels/runtime.cu): devices and based's own buffers ------------------ */

/* Usable CUDA devices; 0 when there is no driver or no GPU (never fails). */
int based_cuda_runtime_device_count(void);

/* cudaMalloc on `device` followed by a zero fill, finished before returning. The
 * calling thread's current device is restored. Returns a cudaError_t as int. */
int based_cuda_runtime_malloc_zeroed(void **ptr, size_t nbytes, int device);

/* cudaFree; safe from any thread. Returns a cudaError_t as int. */
int based_cuda_runtime_free(void *ptr, int device);

/* Copy of nbytes between host and device or device and device (cudaMemcpyDefault),
 * finished before returning. Returns a cudaError_t as int. */
int based_cuda_runtime_memcpy(void *dst, const void *src, size_t nbytes, int device);

const char *based_cuda_runtime_error_string(int err);

/* Compute capability (major * 10 + minor) of `device`, or -1. */
int based_cuda_runtime_capability(int device);

/* ---- ops ------------------------------------------------------------------------- */

/* kernels/linear_attention_prefill.cu, kernels/linear_attention_decode.cu */
based_status based_cuda_linear_attention_prefill(const based_linear_attention_args *args, cudaStream_t stream);
based_status based_cuda_linear_attention_decode(const based_linear_attention_args *args, cudaStream_t stream);

/* kernels/sliding_window_prefill.cu, kernels/sliding_window_decode.cu */
based_status based_cuda_sliding_window_prefill(const based_sliding_window_args *args, cudaStream_t stream);
based_status based_cuda_sliding_window_decode(const based_sliding_window_args *args, cudaStream_t stream);

/* kernels/feature_map.cu */
based_status based_cuda_taylor_feature_map(const based_feature_map_args *args, cudaStream_t stream);

/* kernels/state.cu. zero and gather: on one CUDA device (an in-place gather stages its rows
 * in a stream-ordered device buffer). copy: also between devices (host <-> GPU, or two GPUs),
 * the one exception to the contract above: staged through the host, it synchronises and
 * returns with the copy done; float64 may be the host side's dtype (converted on the host). */
based_status based_cuda_state_zero(const based_state_args *args, cudaStream_t stream);
based_status based_cuda_state_copy(const based_state_args *args, cudaStream_t stream);
based_status based_cuda_state_gather(const based_state_args *args, cudaStream_t stream);
based_status based_cuda_linear_state_convert(const based_linear_state_args *args, cudaStream_t stream);

/* Which linear-attention prefill kernel a call of these sizes runs on `device`
 * ("mma_sync", "simt", ...): for build_info and the tests that cover each path.
 * BASED_CUDA_PREFILL=portable in the environment rules out Hopper-only kernels. */
const char *based_cuda_linear_attention_prefill_kernel(int device, based_dtype dtype, int64_t feature_dim,
                                                       int64_t value_dim);

#ifdef __cplusplus
}
#endif

#endif /* BASED_CUDA_H */
