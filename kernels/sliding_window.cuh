// sliding_window.cuh -- what the sliding-window CUDA kernels (SPEC 1.2) share: the
// token-counter rules, the ring-slot mapping, row loads into shared memory (16-byte
// cp.async where a row allows it, element by element where it does not), and the two
// small launches that follow an attention kernel on the same stream (ring-cache update,
// counter advance). Included by sliding_window_prefill.cu and sliding_window_decode.cu.
//
// Conventions of both files:
//   - a "row" is the D elements of one (b, t, head) of q/k/v/out or one (b, kv head, slot)
//     of a cache, at element offset BASED_AT3(...) with element stride strides[3] along d;
//     every offset is int64 (B*T*H*D may pass 2^31);
//   - a row is "fast" when strides[3] == 1 and its address is 16-byte aligned: it then
//     moves in 16-byte pieces; any other row moves element by element (correct for any
//     stride, e.g. the slot-contiguous key ring of based.SlidingWindowCache);
//   - a counter n = tokens[b] is valid when 0 <= n <= 2^62 - T (the CPU's check,
//     csrc/sliding_window.c). An invalid sequence gets NaN outputs and its cache and
//     counter stay untouched, so no kernel ever forms a slot from a bad counter.
#ifndef BASED_SLIDING_WINDOW_CUH
#define BASED_SLIDING_WINDOW_CUH

#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "common.cuh"

namespace based {
namespace window {

constexpr int64_t kMaxPosition = (int64_t)1 << 62;  // BASED_WINDOW_MAX_POSITION of the C core

// tokens[b], read on the device (stream order: no host round trip).
__device__ __forceinline__ int64_t tokens_at(const based_tensor &tokens, int64_t b) {
    return reinterpret_cast<const int64_t *>(tokens.data)[b * tokens.strides[0]];
}

// Whether a sequence with counter n may take a call of T more positions.
__device__ __forceinline__ bool counter_valid(int64_t n, int64_t T) { return n >= 0 && n <= kMaxPosition - T; }

template <typename T>
__device__ __forceinline__ const T *row_ptr(const based_tensor &x, int64_t i0, int64_t i1, int64_t i2) {
    return reinterpret_cast<const T *>(x.data) + BASED_AT3(x, i0, i1, i2);
}

template <typename T>
__device__ __forceinline__ T *row_ptr_mut(const based_tensor &x, int64_t i0, int64_t i1, int64_t i2) {
    return reinterpret_cast<T *>(x.data) + BASED_AT3(x, i0, i1, i2);
}

__device__ __forceinline__ bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// A quiet NaN in T (what an invalid sequence's outputs get).
template <typename T>
__device__ __forceinline__ T nan_value() {
    return from_float<T>(__int_as_float(0x7fc00000));
}

// ---- cp.async (sm_80+): 16-byte global -> shared copies that do not go through registers --

__device__ __forceinline__ void cp_async16(void *smem_dst, const void *gmem_src) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
    const size_t src = __cvta_generic_to_global(gmem_src);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight; the
// copies of the others are then visible to this thread (to the block after a barrier).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 16 bytes of shared memory set to zero.
__device__ __forceinline__ void zero16(void *smem_dst) {
    *reinterpret_cast<uint4 *>(smem_dst) = make_uint4(0, 0, 0, 0);
}

// 16 bytes seen as a uint4 or as its E = 16 / sizeof(T) elements.
template <typename T>
union Piece {
    uint4 u;
    T e[16 / sizeof(T)];
};

// The E = 16 / sizeof(T) elements d0 .. d0+E-1 of a row (element stride `stride`) into 16
// bytes of shared memory, elements at or past `count` as zeros. `fast`: the row is fast
// (see above); the piece then goes by cp.async when it lies wholly below count.
template <typename T>
__device__ __forceinline__ void load_piece(T *smem_dst, const T *row, int64_t stride, int d0, int count, bool fast) {
    constexpr int E = 16 / sizeof(T);
    if (fast && d0 + E <= count) {
        cp_async16(smem_dst, row + d0);
        return;
    }
    Piece<T> piece;
    piece.u = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int e = 0; e < E; e++)
        if (d0 + e < count) piece.e[e] = row[(int64_t)(d0 + e) * stride];
    *reinterpret_cast<uint4 *>(smem_dst) = piece.u;
}

// The E elements d0 .. d0+E-1 of 16 bytes of shared memory into a row, only those below
// count (the row's D): one 16-byte store when the row is fast and the piece whole.
template <typename T>
__device__ __forceinline__ void store_piece(T *row, int64_t stride, const T *smem_src, int d0, int count, bool fast) {
    constexpr int E = 16 / sizeof(T);
    if (fast && d0 + E <= count) {
        *reinterpret_cast<uint4 *>(row + d0) = *reinterpret_cast<const uint4 *>(smem_src);
        return;
    }
#pragma unroll
    for (int e = 0; e < E; e++)
        if (d0 + e < count) row[(int64_t)(d0 + e) * stride] = smem_src[e];
}

// The E = 16 / sizeof(T) elements of a 16-byte piece as floats, in registers.
template <typename T>
__device__ __forceinline__ void piece_to_float(const uint4 &u, float *f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if constexpr (std::is_same<T, float>::value) {
            f[i] = __uint_as_float(w[i]);
        } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
            f[2 * i] = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        } else {
            __half2 h;
            memcpy(&h, &w[i], sizeof h);
            const float2 x = __half22float2(h);
            f[2 * i] = x.x;
            f[2 * i + 1] = x.y;
        }
    }
}

// Whether any of the E elements in 16 bytes of shared memory is Inf or NaN (exponent all
// ones), from the bits: float16 0x7c00, bfloat16 0x7f80, float32 0x7f800000.
template <typename T>
__device__ __forceinline__ bool piece_nonfinite(const T *smem_src) {
    const uint4 u = *reinterpret_cast<const uint4 *>(smem_src);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
    bool bad = false;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (sizeof(T) == 4) {
            bad |= (w[i] & 0x7f800000u) == 0x7f800000u;
        } else {
            const uint32_t m = std::is_same<T, __half>::value ? 0x7c00u : 0x7f80u;
            bad |= (w[i] & m) == m || ((w[i] >> 16) & m) == m;
        }
    }
    return bad;
}

// ---- the launches after the attention kernel --------------------------------------------

// Prefill, second launch: the last R = min(T, W) keys and values of the call into their ring
// slots (position n + t in slot (n + t) % W), bit for bit, for every valid sequence. One warp
// per (b, kv head, t) row; a grid-stride loop over the B * Hkv * R rows.
template <typename T>
__global__ void __launch_bounds__(256) ring_store_kernel(const based_sliding_window_args a, int64_t rows_total) {
    constexpr int E = 16 / sizeof(T);
    const int lane = threadIdx.x & 31;
    const int64_t T_ = a.seqlen, W = a.window, Hkv = a.kv_heads;
    const int64_t R = T_ < W ? T_ : W;
    const int D = (int)a.head_dim;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
    for (int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; row < rows_total; row += warps) {
        const int64_t b = row / (Hkv * R), rem = row % (Hkv * R);
        const int64_t kh = rem / R, t = T_ - R + rem % R;
        const int64_t n = tokens_at(a.tokens, b);
        if (!counter_valid(n, T_)) continue;
        const int64_t slot = (n + t) % W;
        for (int which = 0; which < 2; which++) {
            const based_tensor &src = which == 0 ? a.k : a.v;
            const based_tensor &dst = which == 0 ? a.k_cache : a.v_cache;
            const T *s = row_ptr<T>(src, b, t, kh);
            T *d = row_ptr_mut<T>(dst, b, kh, slot);
            const bool fast = src.strides[3] == 1 && dst.strides[3] == 1 && aligned16(s) && aligned16(d);
            if (fast) {
                for (int d0 = lane * E; d0 < D; d0 += 32 * E) {
                    if (d0 + E <= D) {
                        *reinterpret_cast<uint4 *>(d + d0) = *reinterpret_cast<const uint4 *>(s + d0);
                    } else {
                        for (int i = d0; i < D; i++) d[i] = s[i];
                    }
                }
            } else {
                for (int i = lane; i < D; i += 32) d[(int64_t)i * dst.strides[3]] = s[(int64_t)i * src.strides[3]];
            }
        }
    }
}

// Last launch of both phases: tokens[b] += T for every valid sequence. Alone in its launch
// because every attention block of sequence b reads tokens[b].
static __global__ void __launch_bounds__(256)
    advance_tokens_kernel(const based_tensor tokens, int64_t batch, int64_t T) {
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; b < batch; b += step) {
        int64_t *p = reinterpret_cast<int64_t *>(tokens.data) + b * tokens.strides[0];
        const int64_t n = *p;
        if (counter_valid(n, T)) *p = n + T;
    }
}

// Blocks for a grid-stride launch over `items` with `per_block` items a block.
inline unsigned grid_for(int64_t items, int64_t per_block) {
    const int64_t blocks = (items + per_block - 1) / per_block;
    return (unsigned)(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

// The ring update of a prefill (store_ring) and the counter advance by `advance` positions,
// in that order.
template <typename T>
inline based_status launch_ring_and_tokens(const based_sliding_window_args &a, cudaStream_t stream, bool store_ring,
                                           int64_t advance, const char *op) {
    if (store_ring) {
        const int64_t R = a.seqlen < a.window ? a.seqlen : a.window;
        const int64_t rows = a.batch * a.kv_heads * R;
        ring_store_kernel<T><<<grid_for(rows, 8), 256, 0, stream>>>(a, rows);
        const based_status st = check_launch(op);
        if (st != BASED_STATUS_OK) return st;
    }
    advance_tokens_kernel<<<grid_for(a.batch, 256), 256, 0, stream>>>(a.tokens, a.batch, advance);
    return check_launch(op);
}

}  // namespace window
}  // namespace based

#endif  // BASED_SLIDING_WINDOW_CUH
