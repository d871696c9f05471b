// runtime.cu -- device queries and memory for based's own buffers (states allocated
// with no framework at hand). The attention kernels live in their own files.
#include <cuda_runtime.h>

#include "based_cuda.h"

namespace {

// Runs fn with `device` current, then restores the caller's device.
template <typename Fn>
int with_device(int device, Fn fn) {
    int prev = -1;
    cudaError_t err = cudaGetDevice(&prev);
    if (err != cudaSuccess) return static_cast<int>(err);
    if (prev != device && (err = cudaSetDevice(device)) != cudaSuccess) return static_cast<int>(err);
    err = fn();
    if (prev != device) cudaSetDevice(prev);
    return static_cast<int>(err);
}

}  // namespace

extern "C" int based_cuda_runtime_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no driver" error
        return 0;
    }
    return n;
}

extern "C" int based_cuda_runtime_malloc_zeroed(void **ptr, size_t nbytes, int device) {
    *ptr = nullptr;
    return with_device(device, [&]() {
        void *p = nullptr;
        cudaError_t err = cudaMalloc(&p, nbytes);
        if (err != cudaSuccess) return err;
        err = cudaMemset(p, 0, nbytes);
        if (err == cudaSuccess) err = cudaDeviceSynchronize();
        if (err != cudaSuccess) {
            cudaFree(p);
            return err;
        }
        *ptr = p;
        return cudaSuccess;
    });
}

extern "C" int based_cuda_runtime_free(void *ptr, int device) {
    return with_device(device, [&]() { return cudaFree(ptr); });
}

extern "C" int based_cuda_runtime_memcpy(void *dst, const void *src, size_t nbytes, int device) {
    return with_device(device, [&]() {
        cudaError_t err = cudaMemcpy(dst, src, nbytes, cudaMemcpyDefault);
        return err;
    });
}

extern "C" int based_cuda_runtime_capability(int device) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    return major * 10 + minor;
}

extern "C" const char *based_cuda_runtime_error_string(int err) {
    return cudaGetErrorString(static_cast<cudaError_t>(err));
}
