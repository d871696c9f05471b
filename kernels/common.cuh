// common.cuh -- what every CUDA file of based shares: the device guard, launch-error
// mapping, dtype conversion and dispatch, small math helpers. C++17, header-only.
#ifndef BASED_COMMON_CUH
#define BASED_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "based_cuda.h"

namespace based {

// Makes `device` current for the scope of a host function, restoring the caller's.
class DeviceGuard {
  public:
    explicit DeviceGuard(int device) {
        if (cudaGetDevice(&prev_) != cudaSuccess) {
            prev_ = -1;
            err_ = cudaGetLastError();
            return;
        }
        if (prev_ != device) err_ = cudaSetDevice(device);
    }
    ~DeviceGuard() {
        if (prev_ >= 0 && err_ == cudaSuccess) cudaSetDevice(prev_);
    }
    cudaError_t error() const { return err_; }
    DeviceGuard(const DeviceGuard &) = delete;
    DeviceGuard &operator=(const DeviceGuard &) = delete;

  private:
    int prev_ = -1;
    cudaError_t err_ = cudaSuccess;
};

constexpr int kMaxDevices = 64;  // devices whose properties are cached

struct DeviceInfo {
    int sms = 0, smem_optin = 0, capability = 0, pools = 0;
};

// Properties of `device` the launch plans need (queried once per device; a benign race
// fills the same values).
inline DeviceInfo device_info(int device) {
    static DeviceInfo cache[kMaxDevices];
    static int known[kMaxDevices];
    if (device >= 0 && device < kMaxDevices && known[device]) return cache[device];
    DeviceInfo d;
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
    cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cudaDeviceGetAttribute(&d.pools, cudaDevAttrMemoryPoolsSupported, device);
    cudaGetLastError();
    d.capability = major * 10 + minor;
    if (device >= 0 && device < kMaxDevices) {
        cache[device] = d;
        known[device] = 1;
    }
    return d;
}

// A CUDA runtime error as a based status with cudaGetErrorString's words.
inline based_status cuda_fail(cudaError_t err, const char *op, const char *what) {
    return based_fail(err == cudaErrorMemoryAllocation ? BASED_STATUS_OUT_OF_MEMORY : BASED_STATUS_CUDA_ERROR,
                      "%s: %s failed: %s (%s)", op, what, cudaGetErrorString(err), cudaGetErrorName(err));
}

// After a launch: the launch's own error (bad configuration, too much shared memory...).
// Sticky errors of earlier asynchronous work also surface here, as CUDA reports them.
inline based_status check_launch(const char *op) {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? BASED_STATUS_OK : cuda_fail(err, op, "kernel launch");
}

// Sets the device for the call or returns its error: `BASED_CUDA_DEVICE(args->device.id, "op");`
#define BASED_CUDA_DEVICE(id, op)                                                \
    ::based::DeviceGuard based_device_guard_(id);                                \
    if (based_device_guard_.error() != cudaSuccess)                              \
        return ::based::cuda_fail(based_device_guard_.error(), op, "cudaSetDevice")

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
    return (a + b - 1) / b;
}

// ---- element types: float, __half, __nv_bfloat16 ------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Runs `body` (a generic lambda taking a value of the element type as a tag) for the
// element type of a float dtype; float64 never reaches CUDA (the checks refuse it).
template <typename F>
inline based_status dispatch_float(based_dtype dtype, const char *op, F &&body) {
    switch (dtype) {
    case BASED_DTYPE_FLOAT32: return body(float{});
    case BASED_DTYPE_FLOAT16: return body(__half{});
    case BASED_DTYPE_BFLOAT16: return body(__nv_bfloat16{});
    default:
        return based_fail(BASED_STATUS_INTERNAL_ERROR, "%s: dtype %d reached a CUDA kernel", op, (int)dtype);
    }
}

// ---- warp reductions -------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// ---- element access by a runtime dtype (states may differ from the inputs' dtype) -------

// Element i of a float32/float16/bfloat16 array at p, as float.
__device__ __forceinline__ float load_as_float(const char *p, based_dtype dt, int64_t i) {
    switch (dt) {
    case BASED_DTYPE_FLOAT16: return __half2float(reinterpret_cast<const __half *>(p)[i]);
    case BASED_DTYPE_BFLOAT16: return __bfloat162float(reinterpret_cast<const __nv_bfloat16 *>(p)[i]);
    default: return reinterpret_cast<const float *>(p)[i];
    }
}

// Element i of a float32/float16/bfloat16 array at p = x, rounded to nearest even.
__device__ __forceinline__ void store_from_float(char *p, based_dtype dt, int64_t i, float x) {
    switch (dt) {
    case BASED_DTYPE_FLOAT16: reinterpret_cast<__half *>(p)[i] = __float2half_rn(x); break;
    case BASED_DTYPE_BFLOAT16: reinterpret_cast<__nv_bfloat16 *>(p)[i] = __float2bfloat16_rn(x); break;
    default: reinterpret_cast<float *>(p)[i] = x; break;
    }
}


}  // namespace based

#endif  // BASED_COMMON_CUH
