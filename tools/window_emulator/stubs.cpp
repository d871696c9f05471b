#include "emu.h"
cudaError_t cudaGetDevice(int *d) { *d = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char *cudaGetErrorString(cudaError_t) { return "emulated"; }
const char *cudaGetErrorName(cudaError_t) { return "emulated"; }
size_t g_max_smem = 99 * 1024;  // sm_86's opt-in limit: the strictest target
cudaError_t cudaFuncSetAttribute(const void *, enum cudaFuncAttribute, int v) {
    return (size_t)v <= g_max_smem ? cudaSuccess : cudaErrorInvalidValue;
}
thread_local char g_last_error[1024];
extern "C" based_status based_fail(based_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_last_error, sizeof g_last_error, fmt, ap);
    va_end(ap);
    return status;
}
