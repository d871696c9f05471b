// strided.cuh -- what the layout kernels (state helpers, Taylor feature map, linear-state
// layout conversion) share: N-d strided index math over two tensors of one shape, the
// compact Taylor feature rows and their (i, j) pairs, and float conversions. Everything
// here is __host__ __device__, so the per-element code of these kernels also runs on
// the host: in the staging of cross-device copies, and in tests/c/test_cuda_on_host.cpp,
// which checks the index math and the staging logic without a GPU.
#ifndef BASED_STRIDED_CUH
#define BASED_STRIDED_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "common.cuh"

namespace based {

// ---- one launch over the elements of an op ---------------------------------------------

constexpr int kElementThreads = 256;
constexpr int64_t kMaxElementBlocks = int64_t(1) << 20;  // then grid-stride

#ifndef BASED_KERNELS_ON_HOST
template <typename Body>
__global__ void __launch_bounds__(kElementThreads) elements_kernel(const __grid_constant__ Body body, int64_t total) {
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += step)
        body((int32_t)blockIdx.y, e);
}
#endif

// Runs body(y, e) for every y < rows and e < total: one launch of a grid-stride kernel on
// `stream` (rows is gridDim.y, at most 65535), consecutive threads on consecutive e. Body
// is a small struct (its fields are the kernel's parameters, at most 4 KiB) with a const
// __host__ __device__ operator()(int32_t y, int64_t e). With BASED_KERNELS_ON_HOST defined
// (a test build with a host compiler), the same loops run on the host instead.
template <typename Body>
based_status launch_elements(const Body &body, int64_t total, int32_t rows, cudaStream_t stream, const char *op) {
    static_assert(sizeof(Body) <= 4000, "kernel parameters are limited to 4 KiB");
    if (total <= 0 || rows <= 0) return BASED_STATUS_OK;
#ifdef BASED_KERNELS_ON_HOST
    (void)stream;
    (void)op;
    for (int32_t y = 0; y < rows; y++)
        for (int64_t e = 0; e < total; e++) body(y, e);
    return BASED_STATUS_OK;
#else
    const int threads = total >= kElementThreads ? kElementThreads : (int)ceil_div<int64_t>(total, 32) * 32;
    int64_t blocks = ceil_div<int64_t>(total, threads);
    if (blocks > kMaxElementBlocks) blocks = kMaxElementBlocks;
    elements_kernel<Body><<<dim3((unsigned)blocks, (unsigned)rows), threads, 0, stream>>>(body, total);
    return check_launch(op);
#endif
}

// ---- two tensors of one shape, walked together ---------------------------------------

// Axis d has size shape[d] and element strides a_st[d] in tensor a, b_st[d] in tensor b.
// Made by collapse_axes: no axis of size 1, no two neighbours that could be merged, so a
// dense pair is one axis of unit strides and the common layouts cost one division or none.
struct PairWalk {
    int32_t ndim;  // >= 1
    int64_t shape[BASED_ARGS_MAX_NDIM];
    int64_t a_st[BASED_ARGS_MAX_NDIM];
    int64_t b_st[BASED_ARGS_MAX_NDIM];
};

// The walk over axes [first, ndim) of `shape` with strides a_st and b_st (b_st NULL: all 0,
// for ops that read nothing); *numel gets the product of those sizes (1 when there are none).
// Axis d merges into its outer neighbour p when st[p] == st[d] * shape[d] in both tensors.
inline PairWalk collapse_axes(int32_t ndim, const int64_t *shape, const int64_t *a_st, const int64_t *b_st,
                              int32_t first, int64_t *numel) {
    PairWalk w{};
    int64_t n = 1;
    for (int32_t d = first; d < ndim; d++) {
        const int64_t size = shape[d], as = a_st[d], bs = b_st ? b_st[d] : 0;
        n *= size;
        if (size == 1) continue;
        const int32_t p = w.ndim - 1;
        if (p >= 0 && w.a_st[p] == as * size && w.b_st[p] == bs * size) {
            w.shape[p] *= size;
            w.a_st[p] = as;
            w.b_st[p] = bs;
        } else {
            w.shape[w.ndim] = size;
            w.a_st[w.ndim] = as;
            w.b_st[w.ndim] = bs;
            w.ndim++;
        }
    }
    if (w.ndim == 0) {  // no axes, or all of size 1: one element
        w.ndim = 1;
        w.shape[0] = 1;
        w.a_st[0] = 0;
        w.b_st[0] = 0;
    }
    *numel = n;
    return w;
}

// Both tensors dense and row-major over the walk (one memcpy / memset covers it).
__host__ __device__ inline bool is_dense(const PairWalk &w) {
    return w.ndim == 1 && (w.shape[0] == 1 || (w.a_st[0] == 1 && w.b_st[0] == 1));
}

// Element offsets in a and b of the e-th element in row-major order over w.shape.
__host__ __device__ inline void pair_offsets(const PairWalk &w, int64_t e, int64_t *a, int64_t *b) {
    int64_t ao = 0, bo = 0;
    for (int32_t d = w.ndim - 1; d > 0; d--) {
        const int64_t q = e / w.shape[d], c = e - q * w.shape[d];
        ao += c * w.a_st[d];
        bo += c * w.b_st[d];
        e = q;
    }
    *a = ao + e * w.a_st[0];
    *b = bo + e * w.b_st[0];
}

// ---- Taylor feature rows (SPEC 1.1) ---------------------------------------------------
// Compact: rows 0..Dk are [1, x_0..x_{Dk-1}], then the upper triangle (i <= j) row-major:
// pair number g of the triangle is row 1 + Dk + g. Expanded: (i, j) is row 1 + Dk + i*Dk + j.

// Index within the triangle of its first pair (i, i) of row i: i*Dk - i(i-1)/2.
__host__ __device__ inline int64_t triangle_start(int64_t dk, int64_t i) { return i * dk - i * (i - 1) / 2; }

__host__ __device__ inline int64_t compact_row(int64_t dk, int64_t i, int64_t j) {  // i <= j
    return 1 + dk + triangle_start(dk, i) + (j - i);
}

__host__ __device__ inline int64_t expanded_row(int64_t dk, int64_t i, int64_t j) { return 1 + dk + i * dk + j; }

// The pair (i, j), i <= j < dk, of triangle index g in [0, dk(dk+1)/2): i is the largest
// row with triangle_start(i) <= g, the smaller root of i^2 - (2dk+1)i + 2g = 0 rounded down,
// computed in double and then corrected by exact integer steps.
__host__ __device__ inline void triangle_pair(int64_t g, int64_t dk, int64_t *i_out, int64_t *j_out) {
    const double b = 2.0 * (double)dk + 1.0;
    double disc = b * b - 8.0 * (double)g;
    if (disc < 0.0) disc = 0.0;
    int64_t i = (int64_t)((b - sqrt(disc)) * 0.5);
    if (i > dk - 1) i = dk - 1;
    if (i < 0) i = 0;
    while (i > 0 && triangle_start(dk, i) > g) i--;
    while (i + 1 < dk && triangle_start(dk, i + 1) <= g) i++;
    *i_out = i;
    *j_out = i + (g - triangle_start(dk, i));
}

// ---- float conversions, host and device -----------------------------------------------
// As the C core converts (csrc/internal.h): float16 and bfloat16 round to nearest even
// from float32; float64 goes to them through float32 ((float)x first), like based_store_f64.
namespace hd {

__host__ __device__ inline float to_f32(float x) { return x; }
__host__ __device__ inline float to_f32(double x) { return (float)x; }
__host__ __device__ inline float to_f32(__half x) { return __half2float(x); }
__host__ __device__ inline float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

__host__ __device__ inline double to_f64(double x) { return x; }
template <typename T>
__host__ __device__ inline double to_f64(T x) { return (double)to_f32(x); }

template <typename T>
__host__ __device__ inline T from_f32(float x);
template <>
__host__ __device__ inline float from_f32<float>(float x) { return x; }
template <>
__host__ __device__ inline double from_f32<double>(float x) { return (double)x; }
template <>
__host__ __device__ inline __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__host__ __device__ inline __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// x of type S in type D, one rounding from the exact value except float64 -> 16-bit types
// (two, through float32, as the C core does).
template <typename D, typename S>
__host__ __device__ inline D convert(S x) {
    if constexpr (std::is_same_v<D, double>) return to_f64(x);
    else return from_f32<D>(to_f32(x));
}

}  // namespace hd
}  // namespace based

#endif  // BASED_STRIDED_CUH
