// linear_attention_decode.cu -- one decode step of Taylor linear attention on CUDA
// (SPEC 1.1; paper Sec. 4.1 Eq. 3): fold token (k, v) of every sequence into the state,
// then read it with q, in one pass over the state.
//
//   kv[f, :] += phi(k)[f] v;   ksum[f] += phi(k)[f]
//   num = phi(q) @ kv;  den = phi(q) . ksum;  o = num / (den + eps)   (normalize)
//
// The step is memory-bound: it reads and writes each state element once (F x Dv per
// head, 153 x 64 for the paper's Dk = 16, Dv = 64). Its yardstick is a device-to-device
// copy of the same bytes.
//
// One block of 128 threads per (b, h). Threads tile the state's rows: a row of Dv values
// is split into 16-byte vectors (4 float32 or 8 bfloat16/float16 elements) held by
// consecutive threads, so the threads of a warp stream whole rows; the block covers
// kRowsPerPass rows at a time and each thread keeps kUnroll rows' loads in flight before
// it updates and stores them. Each thread accumulates phi(q)[f] * kv[f, j] for its
// columns over its rows; a shared-memory reduction over the row groups gives num. The
// updated row (before rounding to the state's dtype) feeds num, as on the CPU.
// phi(q), phi(k) (F <= 561 floats each) are computed once per block into shared memory.
//
// Nothing is allocated and nothing synchronises: the launch is CUDA-graph capturable.
// tokens[b] += 1 is done by the block of head 0 (no block reads the counters).
#include "linear_attention.cuh"

namespace based {
namespace {

constexpr int kThreads = 128;
constexpr int kUnroll = 4;

struct DecodeGeometry {
    int vec;            // elements per vector (1, or 16 bytes' worth)
    int col_vectors;    // vectors per row chunk handled at once (<= kThreads)
    int rows_per_pass;  // rows the block covers at once
    int64_t chunk_cols; // columns per chunk = col_vectors * vec
};

// VEC consecutive elements of type S at p (16-byte aligned when VEC > 1) as floats.
template <typename S, int VEC>
struct Vec {
    static_assert(VEC * sizeof(S) == 16 || VEC == 1, "a vector is one element or 16 bytes");
    __device__ __forceinline__ static void load(const S *p, float (&x)[VEC]) {
        if constexpr (VEC == 1) {
            x[0] = to_float(*p);
        } else {
            uint4 raw = *reinterpret_cast<const uint4 *>(p);
            const S *e = reinterpret_cast<const S *>(&raw);
#pragma unroll
            for (int i = 0; i < VEC; i++) x[i] = to_float(e[i]);
        }
    }
    __device__ __forceinline__ static void store(S *p, const float (&x)[VEC]) {
        if constexpr (VEC == 1) {
            *p = from_float<S>(x[0]);
        } else {
            uint4 raw;
            S *e = reinterpret_cast<S *>(&raw);
#pragma unroll
            for (int i = 0; i < VEC; i++) e[i] = from_float<S>(x[i]);
            *reinterpret_cast<uint4 *>(p) = raw;
        }
    }
};

// phi(x) of one row x (Dk values in shared memory) into phi (F floats), compact order
// (SPEC 1.1): [1, sqrt(scale) x_i, scale/sqrt(2) x_i^2, scale x_i x_j (i < j)]. Thread i
// of the calling group (i < Dk) writes the linear entry i and the upper-triangle row i.
__device__ __forceinline__ void phi_row(const float *x, int dk, float scale, float *phi, int i) {
    const float c1 = sqrtf(scale), c2 = scale / sqrtf(2.0f), c3 = scale;
    if (i == 0) phi[0] = 1.0f;
    if (i < dk) {
        const float xi = x[i];
        phi[1 + i] = c1 * xi;
        float *row = phi + 1 + dk + i * dk - i * (i - 1) / 2; // compact index of (i, i)
        row[0] = c2 * xi * xi;
        for (int j = i + 1; j < dk; j++) row[j - i] = c3 * xi * x[j];
    }
}

template <typename T, typename S, int VEC>
__global__ void __launch_bounds__(kThreads)
linear_attention_decode_kernel(const based_linear_attention_args a, const DecodeGeometry geo) {
    extern __shared__ float smem[];
    const int64_t F = a.feature_count, dv = a.value_dim;
    const int dk = static_cast<int>(a.feature_dim);
    float *phiq = smem;                 // F
    float *phik = phiq + F;             // F
    float *xq = phik + F;               // 32
    float *xk = xq + 32;                // 32
    float *red = xk + 32;               // kThreads * VEC: partial sums of num
    float *scal = red + kThreads * VEC; // [0]: den, [1..4]: warp partials

    const int tid = threadIdx.x;
    const int64_t b = blockIdx.x / a.heads, h = blockIdx.x % a.heads;

    // q, k of this (b, h) (decode tensors: strides[1] == 0, t = 0)
    const T *q = reinterpret_cast<const T *>(a.q.data) + BASED_AT3(a.q, b, 0, h);
    const T *k = reinterpret_cast<const T *>(a.k.data) + BASED_AT3(a.k, b, 0, h);
    if (tid < dk) xq[tid] = to_float(q[tid]);
    if (tid >= 32 && tid - 32 < dk) xk[tid - 32] = to_float(k[tid - 32]);
    __syncthreads();
    const float scale = static_cast<float>(a.scale);
    if (tid < 32) phi_row(xq, dk, scale, phiq, tid);
    else if (tid < 64) phi_row(xk, dk, scale, phik, tid - 32);
    __syncthreads();

    // normaliser: ksum += phi(k); den = phi(q) . ksum (the updated sums)
    char *ksum = a.ksum.data + (b * a.ksum.strides[0] + h * a.ksum.strides[1]) * a.ksum.itemsize;
    float den = 0.0f;
    for (int64_t f = tid; f < F; f += kThreads) {
        const int64_t off = f * a.ksum.strides[2];
        const float z = load_as_float(ksum, a.ksum.dtype, off) + phik[f];
        store_from_float(ksum, a.ksum.dtype, off, z);
        den += phiq[f] * z;
    }
    den = warp_sum(den);
    if ((tid & 31) == 0) scal[1 + tid / 32] = den;
    __syncthreads();
    if (tid == 0) scal[0] = scal[1] + scal[2] + scal[3] + scal[4];
    __syncthreads();
    den = scal[0];
    const float inv = a.normalize ? 1.0f / (den + static_cast<float>(a.eps)) : 1.0f;

    // the state rows: kv[f, :] += phi(k)[f] v; num += phi(q)[f] kv[f, :]
    S *kv = reinterpret_cast<S *>(a.kv.data) + b * a.kv.strides[0] + h * a.kv.strides[1];
    const int64_t rs = a.kv.strides[2];
    const T *v = reinterpret_cast<const T *>(a.v.data) + BASED_AT3(a.v, b, 0, h);
    T *out = reinterpret_cast<T *>(a.out.data) + BASED_AT3(a.out, b, 0, h);
    const int tcol = tid % geo.col_vectors, trow = tid / geo.col_vectors;
    const bool active = trow < geo.rows_per_pass;
    for (int64_t c0 = 0; c0 < dv; c0 += geo.chunk_cols) {
        const int64_t col = c0 + static_cast<int64_t>(tcol) * VEC;
        const bool has_col = active && col < dv; // with VEC > 1, dv % VEC == 0
        float vv[VEC], acc[VEC];
#pragma unroll
        for (int e = 0; e < VEC; e++) {
            vv[e] = has_col ? to_float(v[col + e]) : 0.0f;
            acc[e] = 0.0f;
        }
        if (has_col) {
            for (int64_t f0 = trow; f0 < F; f0 += static_cast<int64_t>(geo.rows_per_pass) * kUnroll) {
                float r[kUnroll][VEC];
#pragma unroll
                for (int u = 0; u < kUnroll; u++) {
                    const int64_t f = f0 + static_cast<int64_t>(u) * geo.rows_per_pass;
                    if (f < F) Vec<S, VEC>::load(kv + f * rs + col, r[u]);
                }
#pragma unroll
                for (int u = 0; u < kUnroll; u++) {
                    const int64_t f = f0 + static_cast<int64_t>(u) * geo.rows_per_pass;
                    if (f < F) {
                        const float pk = phik[f], pq = phiq[f];
#pragma unroll
                        for (int e = 0; e < VEC; e++) {
                            r[u][e] = fmaf(pk, vv[e], r[u][e]);
                            acc[e] = fmaf(pq, r[u][e], acc[e]);
                        }
                        Vec<S, VEC>::store(kv + f * rs + col, r[u]);
                    }
                }
            }
        }
        // num over the row groups: red[trow][tcol * VEC + e]
        if (active) {
#pragma unroll
            for (int e = 0; e < VEC; e++) red[trow * geo.chunk_cols + tcol * VEC + e] = acc[e];
        }
        __syncthreads();
        for (int64_t j = tid; j < geo.chunk_cols; j += kThreads) {
            if (c0 + j < dv) {
                float num = 0.0f;
                for (int r = 0; r < geo.rows_per_pass; r++) num += red[r * geo.chunk_cols + j];
                out[c0 + j] = from_float<T>(num * inv);
            }
        }
        __syncthreads();
    }
    if (h == 0 && tid == 0) reinterpret_cast<int64_t *>(a.tokens.data)[b * a.tokens.strides[0]] += 1;
}

template <typename T, typename S>
based_status launch_decode(const based_linear_attention_args &a, cudaStream_t stream) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(S));
    // 16-byte vectors need 16-byte aligned rows: base, batch/head/row strides and Dv
    const uintptr_t base = reinterpret_cast<uintptr_t>(a.kv.data);
    const bool vec_ok = base % 16 == 0 && a.value_dim % kVec == 0 && a.kv.strides[0] % kVec == 0 &&
                        a.kv.strides[1] % kVec == 0 && a.kv.strides[2] % kVec == 0;
    const int vec = vec_ok ? kVec : 1;
    DecodeGeometry geo;
    geo.vec = vec;
    const int64_t vectors = a.value_dim / vec;
    geo.col_vectors = static_cast<int>(vectors < kThreads ? vectors : kThreads);
    geo.rows_per_pass = kThreads / geo.col_vectors;
    geo.chunk_cols = static_cast<int64_t>(geo.col_vectors) * vec;
    const size_t shmem = (2 * static_cast<size_t>(a.feature_count) + 64 + kThreads * kVec + 8) * sizeof(float);
    const dim3 grid(static_cast<unsigned>(a.batch * a.heads));
    if (vec_ok)
        linear_attention_decode_kernel<T, S, kVec><<<grid, kThreads, shmem, stream>>>(a, geo);
    else
        linear_attention_decode_kernel<T, S, 1><<<grid, kThreads, shmem, stream>>>(a, geo);
    return check_launch("linear_attention_decode");
}

}  // namespace
}  // namespace based

extern "C" based_status based_cuda_linear_attention_decode(const based_linear_attention_args *args,
                                                          cudaStream_t stream) {
    using namespace based;
    const based_linear_attention_args &a = *args;
    if (a.batch == 0) return BASED_STATUS_OK;
    if (a.feature_dim > 32)
        return based_fail(BASED_STATUS_NOT_IMPLEMENTED, "linear_attention_decode: the CUDA kernel takes Dk <= 32, got %lld",
                          (long long)a.feature_dim);
    if (a.batch * a.heads > 0x7fffffffLL)
        return based_fail(BASED_STATUS_NOT_IMPLEMENTED,
                          "linear_attention_decode: B*H = %lld exceeds the CUDA grid (2^31 - 1 blocks)",
                          (long long)(a.batch * a.heads));
    BASED_CUDA_DEVICE(a.device.id, "linear_attention_decode");
    if (a.heads == 0) {
        tokens_add_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(a.batch, 256)), 256, 0, stream>>>(a.tokens,
                                                                                                      a.batch, 1);
        return check_launch("linear_attention_decode");
    }
    return dispatch_float(a.q.dtype, "linear_attention_decode", [&](auto tin) {
        using T = decltype(tin);
        return dispatch_float(a.kv.dtype, "linear_attention_decode", [&](auto tst) {
            using S = decltype(tst);
            return launch_decode<T, S>(a, stream);
        });
    });
}
