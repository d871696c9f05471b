// linear_attention_prefill.cu -- chunked prefill of Taylor linear attention on CUDA
// (SPEC 1.1; paper Sec. 4.1 Eq. 4 and the IO-aware algorithm of Sec. 5.2).
//
// Per (b, h) the sequence is cut into chunks of C tokens. For chunk c with queries Q,
// keys K, values V (C rows each) and the state (KV: F x Dv, ksum: F) of the tokens
// before it:
//
//   A      = mask_causal(1 + s + s^2/2),  s = scale * Q K^T      (C x C, formed on chip)
//   num    = A V + phi(Q) KV                                     (intra + inter chunk)
//   den    = rowsum(A) + phi(Q) ksum
//   o      = num / (den + eps)                                   (normalize)
//   KV    += phi(K)^T V;   ksum += colsum(phi(K))
//
// No C x C matrix of the whole sequence and no F-wide feature map of the sequence ever
// reaches global memory: phi(Q), phi(K) of one chunk live in shared memory; the state is
// read once and written once per call.
//
// Two kernels compute this:
//
// * prefill_mma_kernel (float16/bfloat16 inputs, Dk <= 16): tensor cores through
//   mma.sync.m16n8k16 (sm_80 and newer). C = 64 tokens, 8 warps, a block handles one
//   (b, h), one tile of 64 value columns and one segment of the sequence. Warp w owns the
//   8 value columns 8w..8w+7 of the tile in every product, so the state block it
//   updates (KV[:, cols of w], F_pad x 8, fp32) stays in its registers from the first
//   chunk to the last, and the inter-chunk product reads only the shared-memory copy of
//   its own columns. Per chunk:
//     S = Q K^T (each warp one 16-query x 32-key block) -> A (rounded to the input type)
//         and its row sums, in shared memory;
//     O_intra = A V, O_inter = phi(Q) KV_old (input-type copy of the state), per warp;
//     KV += phi(K)^T V into the registers, then the new copy to shared memory.
//   float16's range cannot hold a long sequence's state: its copy is scaled by a power
//   of two per warp and chunk (exact), and O_inter is scaled back in float32.
//   Operand layouts follow the PTX ISA's "Matrix Fragments for mma.m16n8k16 with
//   floating point type"; ldmatrix (.trans where the stored matrix is k-major) loads them.
//   Shared memory rows are padded so that the 8 rows one ldmatrix reads fall in 8
//   different 16-byte bank groups.
//
// * prefill_simt_kernel (float32 inputs, Dk up to 32, or when forced): the same
//   algorithm with float32 FMAs, C = 32, the state tile in shared memory, phi computed
//   on the fly. Exact to float32 rounding; the reference for the tensor-core path's
//   rounding is the tolerance policy of the tests.
//
// Filling the GPU: one block per (b, h, value tile) is B*H*ceil(Dv/64) blocks; when that
// is small against the SM count (B = 1, T = 8192: 16 blocks), the tensor-core path
// splits the sequence into S segments (a multiple of C tokens each):
//   1. prefill_mma_kernel in MODE_STATE: each segment's contribution to KV and ksum,
//      into a float32 scratch (stream-ordered, from a memory pool of based's own);
//   2. scan_segments_kernel: the state at the start of each segment (an exclusive scan
//      from the initial state), and the final state written once;
//   3. prefill_mma_kernel in MODE_OUTPUT: every segment's outputs from its start state.
//
// Token counters: the kernels do not read them; tokens[b] += T is done once per b.
#include <stdlib.h>
#include <string.h>

#include <mutex>

#include "linear_attention.cuh"

namespace based {
namespace {

// ---- shared pieces --------------------------------------------------------------------

enum PrefillMode : int {
    MODE_FULL = 0,    // state in from args.kv/ksum, outputs, state out, tokens += T
    MODE_STATE = 1,   // from a zero state: this segment's KV/ksum into the scratch
    MODE_OUTPUT = 2,  // state in from the scratch (segment start), outputs only
};

struct PrefillLaunch {
    int mode;
    int f_tiles;        // ceil(F / 16)  (tensor-core kernel)
    int v_tiles;        // value-column tiles
    int tile_cols;      // value columns per tile
    int64_t nseg;       // segments per sequence
    int64_t seg_len;    // tokens per segment (a multiple of the chunk)
    float *scratch_kv;  // [(b * H + h) * nseg + seg][F][Dv]
    float *scratch_ksum;// [(b * H + h) * nseg + seg][F]
    int vec;            // q, k, v rows load as 16-byte vectors (see launch_mma_variant)
};

// The compact feature f as (i, j, coefficient): phi(x)[f] = coef * x_i * x_j, where an
// index of kNone stands for 1 (SPEC 1.1 order). f >= F gives coefficient 0.
constexpr int kNone = 255;

__device__ inline void feature_of(int f, int dk, float scale, int *i_out, int *j_out, float *coef) {
    const int F = 1 + dk + dk * (dk + 1) / 2;
    if (f >= F) {
        *i_out = kNone;
        *j_out = kNone;
        *coef = 0.0f;
    } else if (f == 0) {
        *i_out = kNone;
        *j_out = kNone;
        *coef = 1.0f;
    } else if (f <= dk) {
        *i_out = f - 1;
        *j_out = kNone;
        *coef = sqrtf(scale);
    } else {
        int r = f - 1 - dk, i = 0;
        while (r >= dk - i) { // row i of the upper triangle holds dk - i entries
            r -= dk - i;
            i++;
        }
        *i_out = i;
        *j_out = i + r;
        *coef = r == 0 ? scale / sqrtf(2.0f) : scale;
    }
}

// ---- tensor-core kernel: mma.sync.m16n8k16 --------------------------------------------

constexpr int kMmaChunk = 64;                 // tokens per chunk
constexpr int kMmaWarps = 8;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kMmaTileCols = 8 * kMmaWarps;   // value columns per block
constexpr int kMmaMaxFTiles = 10;             // F_pad <= 160: Dk <= 16
constexpr int kPitchQK = 24;                  // q, k rows: 16 (Dk padded) + 8
constexpr int kPitch64 = 72;                  // v, A, KV-copy rows: 64 + 8
constexpr int kPitchPhi = 168;                // phi rows: 160 + 8

template <typename T>
struct MmaShared {
    // offsets in elements of T, then float, then int
    static constexpr int q = 0;
    static constexpr int k = q + kMmaChunk * kPitchQK;
    static constexpr int v = k + kMmaChunk * kPitchQK;
    static constexpr int phiq = v + kMmaChunk * kPitch64;
    static constexpr int phik = phiq + kMmaChunk * kPitchPhi;
    static constexpr int a = phik + kMmaChunk * kPitchPhi;
    static constexpr int kv = a + kMmaChunk * kPitch64;
    static constexpr int t_end = kv + 16 * kMmaMaxFTiles * kPitch64;
    static constexpr int ksum = 0;                           // floats after the T part
    static constexpr int den_part = ksum + 16 * kMmaMaxFTiles; // [2][64]
    static constexpr int den_inter = den_part + 2 * kMmaChunk;
    static constexpr int coef = den_inter + kMmaChunk;
    static constexpr int f_end = coef + 16 * kMmaMaxFTiles;
    static constexpr int idx_count = 16 * kMmaMaxFTiles;     // ints: i | j << 8
    static constexpr size_t bytes =
        (static_cast<size_t>(t_end) * sizeof(T) + 15) / 16 * 16 + f_end * sizeof(float) + idx_count * sizeof(int);
};

template <typename T>
struct MmaType;
template <>
struct MmaType<__nv_bfloat16> {
    __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <>
struct MmaType<__half> {
    __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four (two) 8x8 b16 matrices from shared address `addr`; lanes 8i..8i+7 give the row
// addresses of matrix i. Callers pass a per-lane base plus a compile-time byte offset.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t &r0, uint32_t &r1, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r0), "=r"(r1)
                 : "r"(addr));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    T pair[2] = {from_float<T>(lo), from_float<T>(hi)};
    uint32_t u;
    memcpy(&u, pair, 4);
    return u;
}

template <typename T>
__device__ __forceinline__ void unpack2(uint32_t u, float &lo, float &hi) {
    T pair[2];
    memcpy(pair, &u, 4);
    lo = to_float(pair[0]);
    hi = to_float(pair[1]);
}

// Fragment index helpers (lane = 0..31):
//   A (16x16, row-major storage, non-trans x4): row = lane % 16, col = (lane / 16) * 8
//   A from k-major storage (x4.trans):  row = (lane % 8) + (lane / 16) * 8, col = ((lane / 8) % 2) * 8
//   B from n-major storage (x4, two n-tiles): row = (lane % 8) + (lane / 16) * 8, col = ((lane / 8) % 2) * 8
//   B from k-major storage (x2.trans): row = lane % 16, col = 0
//   C/D: c0, c1 at (lane / 4, 2 * (lane % 4) + {0, 1}); c2, c3 at row + 8.

template <typename T, int MIN_BLOCKS>
__global__ void __launch_bounds__(kMmaThreads, MIN_BLOCKS)
prefill_mma_kernel(const based_linear_attention_args a, const PrefillLaunch L) {
    using Sh = MmaShared<T>;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *sm = reinterpret_cast<T *>(smem_raw);
    float *smf = reinterpret_cast<float *>(smem_raw + (static_cast<size_t>(Sh::t_end) * sizeof(T) + 15) / 16 * 16);
    int *sidx = reinterpret_cast<int *>(smf + Sh::f_end);
    T *sQ = sm + Sh::q, *sK = sm + Sh::k, *sV = sm + Sh::v, *sPhiQ = sm + Sh::phiq, *sPhiK = sm + Sh::phik;
    T *sA = sm + Sh::a, *sKV = sm + Sh::kv;
    float *sKsum = smf + Sh::ksum, *sDenPart = smf + Sh::den_part, *sDenInter = smf + Sh::den_inter;
    float *sCoef = smf + Sh::coef;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t4 = lane & 3;
    const int dk = static_cast<int>(a.feature_dim);
    const int64_t F = a.feature_count, Dv = a.value_dim, H = a.heads, T_len = a.seqlen;
    const int f_tiles = L.f_tiles, f_pad = 16 * f_tiles;

    int64_t bid = blockIdx.x;
    const int64_t seg = bid % L.nseg;
    bid /= L.nseg;
    const int64_t vt = bid % L.v_tiles;
    bid /= L.v_tiles;
    const int64_t h = bid % H, b = bid / H;
    const int64_t t_begin = seg * L.seg_len;
    const int64_t t_end = t_begin + L.seg_len < T_len ? t_begin + L.seg_len : T_len;
    const int64_t col_base = vt * kMmaTileCols; // first value column of this block
    const int col0 = warp * 8;                  // this warp's columns within the tile
    const bool outputs = L.mode != MODE_STATE;
    const int64_t slot = (b * H + h) * L.nseg + seg; // scratch slot

    // feature table
    const float scale = static_cast<float>(a.scale);
    for (int f = tid; f < f_pad; f += kMmaThreads) {
        int i, j;
        float c;
        feature_of(f, dk, scale, &i, &j, &c);
        sCoef[f] = c;
        sidx[f] = i | (j << 8);
    }
    // initial state: KV block of this warp into registers, ksum into shared memory
    float kv[kMmaMaxFTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMmaMaxFTiles; mt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            kv[mt][e] = 0.0f;
            const int64_t f = 16 * mt + g + (e >= 2 ? 8 : 0);
            const int64_t j = col_base + col0 + 2 * t4 + (e & 1);
            if (mt < f_tiles && f < F && j < Dv) {
                if (L.mode == MODE_FULL)
                    kv[mt][e] = load_as_float(a.kv.data, a.kv.dtype,
                                         b * a.kv.strides[0] + h * a.kv.strides[1] + f * a.kv.strides[2] + j);
                else if (L.mode == MODE_OUTPUT)
                    kv[mt][e] = L.scratch_kv[(slot * F + f) * Dv + j];
            }
        }
    }
    for (int f = tid; f < f_pad; f += kMmaThreads) {
        float s = 0.0f;
        if (f < F) {
            if (L.mode == MODE_FULL)
                s = load_as_float(a.ksum.data, a.ksum.dtype, b * a.ksum.strides[0] + h * a.ksum.strides[1] + f * a.ksum.strides[2]);
            else if (L.mode == MODE_OUTPUT)
                s = L.scratch_ksum[slot * F + f];
        }
        sKsum[f] = s;
    }

    // the input-type copy of this warp's state columns, scaled by kv_scale (float16 range)
    float kv_scale = 1.0f;
    auto write_kv_copy = [&]() {
        if constexpr (sizeof(T) == 2 && std::is_same<T, __half>::value) {
            float m = 0.0f;
#pragma unroll
            for (int mt = 0; mt < kMmaMaxFTiles; mt++)
#pragma unroll
                for (int e = 0; e < 4; e++) m = fmaxf(m, fabsf(kv[mt][e]));
            m = warp_max(m);
            int ex = 0;
            frexpf(m, &ex); // m < 2^ex
            kv_scale = ex > 14 ? ldexpf(1.0f, 14 - ex) : 1.0f; // keep |copy| < 2^14
        }
#pragma unroll
        for (int mt = 0; mt < kMmaMaxFTiles; mt++) {
            if (mt < f_tiles) {
                const int r = 16 * mt + g;
                *reinterpret_cast<uint32_t *>(&sKV[r * kPitch64 + col0 + 2 * t4]) =
                    pack2<T>(kv[mt][0] * kv_scale, kv[mt][1] * kv_scale);
                *reinterpret_cast<uint32_t *>(&sKV[(r + 8) * kPitch64 + col0 + 2 * t4]) =
                    pack2<T>(kv[mt][2] * kv_scale, kv[mt][3] * kv_scale);
            }
        }
    };
    if (outputs) write_kv_copy();

    // per-lane shared addresses of the fragments (see "Fragment index helpers")
    constexpr uint32_t E = sizeof(T);
    const uint32_t lrow16 = lane % 16, lcol16 = (lane / 16) * 8;               // A, row-major
    const uint32_t trow = (lane % 8) + (lane / 16) * 8, tcol = ((lane / 8) % 2) * 8; // k-major A / n-major B
    const uint32_t q_base = smem_addr(sQ) + (lrow16 * kPitchQK + lcol16) * E;
    const uint32_t k_base = smem_addr(sK) + (trow * kPitchQK + tcol) * E;
    const uint32_t v_base = smem_addr(sV) + (lrow16 * kPitch64 + col0) * E;
    const uint32_t a_base = smem_addr(sA) + (lrow16 * kPitch64 + lcol16) * E;
    const uint32_t kvc_base = smem_addr(sKV) + (lrow16 * kPitch64 + col0) * E;
    const uint32_t phiq_base = smem_addr(sPhiQ) + (lrow16 * kPitchPhi + lcol16) * E;
    const uint32_t phik_base = smem_addr(sPhiK) + (trow * kPitchPhi + tcol) * E;

    // Chunk loads. Vector path (L.vec: Dk = 16, 16-byte aligned rows, Dv % 8 == 0): a q or
    // k row is two 16-byte pieces, a v tile row eight; thread tid loads piece tid of q (tid <
    // 128) or k (tid >= 128) and pieces tid, tid + 256 of v -- three loads per thread, issued
    // for the next chunk before this one is computed (registers, no extra shared memory).
    // Scalar path: every element, all loads of a chunk issued before its stores.
    const T *qrow = reinterpret_cast<const T *>(a.q.data), *krow = reinterpret_cast<const T *>(a.k.data);
    const T *vrow = reinterpret_cast<const T *>(a.v.data);
    uint4 pf_qk = {}, pf_v0 = {}, pf_v1 = {};
    auto vec_load = [&](int64_t c0) {
        const int64_t n = t_end - c0;
        const int piece = tid & 127, t = piece >> 1, half = piece & 1;
        const bool is_q = tid < 128;
        const uint4 zero = {};
        pf_qk = zero;
        if (t < n && (outputs || !is_q)) {
            const T *src = is_q ? qrow + BASED_AT3(a.q, b, c0 + t, h) : krow + BASED_AT3(a.k, b, c0 + t, h);
            pf_qk = *reinterpret_cast<const uint4 *>(src + 8 * half);
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int pv = tid + 256 * r, tv = pv >> 3, cv = (pv & 7) * 8;
            uint4 x = zero;
            if (tv < n && col_base + cv < Dv)
                x = *reinterpret_cast<const uint4 *>(vrow + BASED_AT3(a.v, b, c0 + tv, h) + col_base + cv);
            (r == 0 ? pf_v0 : pf_v1) = x;
        }
    };
    auto vec_store = [&]() {
        const int piece = tid & 127, t = piece >> 1, half = piece & 1;
        T *dst = (tid < 128 ? sQ : sK) + t * kPitchQK + 8 * half;
        *reinterpret_cast<uint4 *>(dst) = pf_qk;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int pv = tid + 256 * r, tv = pv >> 3, cv = (pv & 7) * 8;
            *reinterpret_cast<uint4 *>(sV + tv * kPitch64 + cv) = r == 0 ? pf_v0 : pf_v1;
        }
    };
    auto scalar_load_store = [&](int64_t c0) {
        const int64_t n = t_end - c0;
        T xq[4], xk[4], xv[16];
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int e = tid + kMmaThreads * r, t = e / 16, d = e % 16;
            const bool ok = t < n && d < dk;
            xq[r] = ok && outputs ? qrow[BASED_AT3(a.q, b, c0 + t, h) + d] : T(0.0f);
            xk[r] = ok ? krow[BASED_AT3(a.k, b, c0 + t, h) + d] : T(0.0f);
        }
#pragma unroll
        for (int r = 0; r < 16; r++) {
            const int e = tid + kMmaThreads * r, t = e / 64, jj = e % 64;
            const int64_t j = col_base + jj;
            xv[r] = t < n && j < Dv ? vrow[BASED_AT3(a.v, b, c0 + t, h) + j] : T(0.0f);
        }
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int e = tid + kMmaThreads * r, t = e / 16, d = e % 16;
            sQ[t * kPitchQK + d] = xq[r];
            sK[t * kPitchQK + d] = xk[r];
        }
#pragma unroll
        for (int r = 0; r < 16; r++) {
            const int e = tid + kMmaThreads * r, t = e / 64, jj = e % 64;
            sV[t * kPitch64 + jj] = xv[r];
        }
    };
    if (L.vec && t_begin < t_end) vec_load(t_begin);

    float o[4][4];
    for (int64_t c0 = t_begin; c0 < t_end; c0 += kMmaChunk) {
        const int n = static_cast<int>(t_end - c0 < kMmaChunk ? t_end - c0 : kMmaChunk);
        __syncthreads(); // the previous chunk's reads of the staging buffers are done
        if (L.vec) {
            vec_store();
            if (c0 + kMmaChunk < t_end) vec_load(c0 + kMmaChunk); // in flight while this chunk runs
        } else {
            scalar_load_store(c0);
        }
        __syncthreads();

        // phi(Q), phi(K): two features per thread and step; rows of invalid tokens are 0
        for (int p = tid; p < kMmaChunk * (f_pad / 2); p += kMmaThreads) {
            const int t = p / (f_pad / 2), f = 2 * (p % (f_pad / 2));
            float vq[2], vk[2];
#pragma unroll
            for (int u = 0; u < 2; u++) {
                const int ij = sidx[f + u], i = ij & 0xff, j = ij >> 8;
                const float c = t < n ? sCoef[f + u] : 0.0f;
                const float qi = i == kNone ? 1.0f : to_float(sQ[t * kPitchQK + i]);
                const float qj = j == kNone ? 1.0f : to_float(sQ[t * kPitchQK + j]);
                const float ki = i == kNone ? 1.0f : to_float(sK[t * kPitchQK + i]);
                const float kj = j == kNone ? 1.0f : to_float(sK[t * kPitchQK + j]);
                vq[u] = c * qi * qj;
                vk[u] = c * ki * kj;
            }
            if (outputs) *reinterpret_cast<uint32_t *>(&sPhiQ[t * kPitchPhi + f]) = pack2<T>(vq[0], vq[1]);
            *reinterpret_cast<uint32_t *>(&sPhiK[t * kPitchPhi + f]) = pack2<T>(vk[0], vk[1]);
        }
        __syncthreads();

        if (outputs) {
            // S = Q K^T for queries 16 mi.. and keys 32 kh..: A = mask(1 + s + s^2/2)
            const int mi = warp >> 1, kh = warp & 1;
            uint32_t fa[4];
            ldmatrix_x4(fa, q_base + 16 * mi * kPitchQK * E);
            float s[4][4] = {};
#pragma unroll
            for (int p = 0; p < 2; p++) {
                const int n0 = 32 * kh + 16 * p;
                uint32_t fb[4];
                ldmatrix_x4(fb, k_base + n0 * kPitchQK * E);
                MmaType<T>::mma(s[2 * p], fa, fb[0], fb[1]);
                MmaType<T>::mma(s[2 * p + 1], fa, fb[2], fb[3]);
            }
            float rs0 = 0.0f, rs1 = 0.0f; // row sums of rows g and g + 8 of this block
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                float w[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = 16 * mi + g + (e >= 2 ? 8 : 0);
                    const int u = 32 * kh + 8 * nt + 2 * t4 + (e & 1);
                    const float x = s[nt][e] * scale;
                    w[e] = (u <= r && u < n) ? 1.0f + x + 0.5f * x * x : 0.0f;
                }
                const uint32_t lo = pack2<T>(w[0], w[1]), hi = pack2<T>(w[2], w[3]);
                const int r = 16 * mi + g, u = 32 * kh + 8 * nt + 2 * t4;
                *reinterpret_cast<uint32_t *>(&sA[r * kPitch64 + u]) = lo;
                *reinterpret_cast<uint32_t *>(&sA[(r + 8) * kPitch64 + u]) = hi;
                float x0, x1; // the rounded weights, as the numerator sees them
                unpack2<T>(lo, x0, x1);
                rs0 += x0 + x1;
                unpack2<T>(hi, x0, x1);
                rs1 += x0 + x1;
            }
            rs0 += __shfl_xor_sync(0xffffffffu, rs0, 1);
            rs0 += __shfl_xor_sync(0xffffffffu, rs0, 2);
            rs1 += __shfl_xor_sync(0xffffffffu, rs1, 1);
            rs1 += __shfl_xor_sync(0xffffffffu, rs1, 2);
            if (t4 == 0) {
                sDenPart[kh * kMmaChunk + 16 * mi + g] = rs0;
                sDenPart[kh * kMmaChunk + 16 * mi + g + 8] = rs1;
            }
            // den_inter[t] = phi(q_t) . ksum: 4 threads per token
            {
                const int t = tid / 4, part = tid % 4;
                float d = 0.0f;
                for (int f = part; f < f_pad; f += 4) d += to_float(sPhiQ[t * kPitchPhi + f]) * sKsum[f];
                d += __shfl_xor_sync(0xffffffffu, d, 1);
                d += __shfl_xor_sync(0xffffffffu, d, 2);
                if (part == 0) sDenInter[t] = d;
            }
        }
        __syncthreads();

        // V fragments of this warp's columns for the 4 key steps (used twice)
        uint32_t fv[4][2];
#pragma unroll
        for (int ks = 0; ks < 4; ks++)
            ldmatrix_x2_trans(fv[ks][0], fv[ks][1], v_base + 16 * ks * kPitch64 * E);

        if (outputs) {
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int e = 0; e < 4; e++) o[mi][e] = 0.0f;
            // O_intra = A V (key steps above the diagonal are all zero: skipped)
#pragma unroll
            for (int mi = 0; mi < 4; mi++) {
#pragma unroll
                for (int ks = 0; ks < 4; ks++) {
                    if (ks > mi) continue;
                    // The diagonal block's masked weights are exact zeros, but 0 * inf or NaN
                    // in a later token's value would reach earlier rows (SPEC 4: non-finite
                    // inputs reach only the outputs they touch): such a block is summed
                    // over the causal keys only.
                    bool exact = false;
                    if (ks == mi) {
                        float x0, x1, x2, x3;
                        unpack2<T>(fv[ks][0], x0, x1);
                        unpack2<T>(fv[ks][1], x2, x3);
                        const bool bad = !(isfinite(x0) && isfinite(x1) && isfinite(x2) && isfinite(x3));
                        exact = __any_sync(0xffffffffu, bad);
                    }
                    if (!exact) {
                        uint32_t fa[4];
                        ldmatrix_x4(fa, a_base + (16 * mi * kPitch64 + 16 * ks) * E);
                        MmaType<T>::mma(o[mi], fa, fv[ks][0], fv[ks][1]);
                    } else {
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int r = 16 * mi + g + (e >= 2 ? 8 : 0), j = col0 + 2 * t4 + (e & 1);
                            float acc = 0.0f;
                            for (int u = 16 * mi; u <= r; u++)
                                acc += to_float(sA[r * kPitch64 + u]) * to_float(sV[u * kPitch64 + j]);
                            o[mi][e] += acc;
                        }
                    }
                }
            }
            // O_inter = phi(Q) KV_old (this warp's columns of the copy, which holds KV * kv_scale)
            if (kv_scale != 1.0f) {
#pragma unroll
                for (int mi = 0; mi < 4; mi++)
#pragma unroll
                    for (int e = 0; e < 4; e++) o[mi][e] *= kv_scale;
            }
#pragma unroll
            for (int kf = 0; kf < kMmaMaxFTiles; kf++) {
                if (kf < f_tiles) {
                    uint32_t b0, b1;
                    ldmatrix_x2_trans(b0, b1, kvc_base + 16 * kf * kPitch64 * E);
#pragma unroll
                    for (int mi = 0; mi < 4; mi++) {
                        uint32_t fa[4];
                        ldmatrix_x4(fa, phiq_base + (16 * mi * kPitchPhi + 16 * kf) * E);
                        MmaType<T>::mma(o[mi], fa, b0, b1);
                    }
                }
            }
            // epilogue: o = (A V + phi(Q) KV) / (den + eps)
            const float inv_scale = 1.0f / kv_scale, eps = static_cast<float>(a.eps);
#pragma unroll
            for (int mi = 0; mi < 4; mi++) {
#pragma unroll
                for (int hr = 0; hr < 2; hr++) {
                    const int r = 16 * mi + g + 8 * hr;
                    if (r < n) {
                        float o0 = o[mi][2 * hr] * inv_scale;
                        float o1 = o[mi][2 * hr + 1] * inv_scale;
                        if (a.normalize) {
                            const float den = sDenPart[r] + sDenPart[kMmaChunk + r] + sDenInter[r];
                            const float inv = 1.0f / (den + eps);
                            o0 *= inv;
                            o1 *= inv;
                        }
                        const int64_t j = col_base + col0 + 2 * t4;
                        T *op = reinterpret_cast<T *>(a.out.data) + BASED_AT3(a.out, b, c0 + r, h);
                        if (j < Dv) op[j] = from_float<T>(o0);
                        if (j + 1 < Dv) op[j + 1] = from_float<T>(o1);
                    }
                }
            }
        }

        // ksum += colsum(phi(K)) (den_inter of this chunk has read the old sums)
        if (vt == 0 || outputs) {
            for (int f = tid; f < f_pad; f += kMmaThreads) {
                float s = 0.0f;
                for (int t = 0; t < kMmaChunk; t++) s += to_float(sPhiK[t * kPitchPhi + f]);
                sKsum[f] += s;
            }
        }
        // KV += phi(K)^T V (this warp's columns, in registers)
#pragma unroll
        for (int mt = 0; mt < kMmaMaxFTiles; mt++) {
            if (mt < f_tiles) {
#pragma unroll
                for (int ks = 0; ks < 4; ks++) {
                    uint32_t fa[4];
                    ldmatrix_x4_trans(fa, phik_base + (16 * ks * kPitchPhi + 16 * mt) * E);
                    MmaType<T>::mma(kv[mt], fa, fv[ks][0], fv[ks][1]);
                }
            }
        }
        if (outputs) {
            __syncwarp(); // this warp's reads of its copy are done
            write_kv_copy();
        }
    }

    // final state
    if (L.mode == MODE_FULL || L.mode == MODE_STATE) {
#pragma unroll
        for (int mt = 0; mt < kMmaMaxFTiles; mt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int64_t f = 16 * mt + g + (e >= 2 ? 8 : 0);
                const int64_t j = col_base + col0 + 2 * t4 + (e & 1);
                if (mt < f_tiles && f < F && j < Dv) {
                    if (L.mode == MODE_FULL)
                        store_from_float(a.kv.data, a.kv.dtype,
                                  b * a.kv.strides[0] + h * a.kv.strides[1] + f * a.kv.strides[2] + j, kv[mt][e]);
                    else
                        L.scratch_kv[(slot * F + f) * Dv + j] = kv[mt][e];
                }
            }
        }
        __syncthreads(); // sKsum's last update
        if (vt == 0) {
            for (int64_t f = tid; f < F; f += kMmaThreads) {
                if (L.mode == MODE_FULL)
                    store_from_float(a.ksum.data, a.ksum.dtype,
                              b * a.ksum.strides[0] + h * a.ksum.strides[1] + f * a.ksum.strides[2], sKsum[f]);
                else
                    L.scratch_ksum[slot * F + f] = sKsum[f];
            }
        }
        if (L.mode == MODE_FULL && vt == 0 && h == 0 && tid == 0)
            reinterpret_cast<int64_t *>(a.tokens.data)[b * a.tokens.strides[0]] += T_len;
    }
}

// The start state of each segment (exclusive scan over segments from the initial state)
// in the scratch, and the final state into args.kv/ksum. One thread per state element.
__global__ void scan_segments_kernel(const based_linear_attention_args a, const PrefillLaunch L) {
    const int64_t F = a.feature_count, Dv = a.value_dim, H = a.heads;
    const int64_t n_kv = a.batch * H * F * Dv, n_ks = a.batch * H * F;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_kv + n_ks + a.batch;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        if (i < n_kv) {
            const int64_t j = i % Dv, f = (i / Dv) % F, bh = i / (Dv * F), b = bh / H, h = bh % H;
            const int64_t off = b * a.kv.strides[0] + h * a.kv.strides[1] + f * a.kv.strides[2] + j;
            float run = load_as_float(a.kv.data, a.kv.dtype, off);
            for (int64_t s = 0; s < L.nseg; s++) {
                float *p = &L.scratch_kv[((bh * L.nseg + s) * F + f) * Dv + j];
                const float d = *p;
                *p = run;
                run += d;
            }
            store_from_float(a.kv.data, a.kv.dtype, off, run);
        } else if (i < n_kv + n_ks) {
            const int64_t r = i - n_kv, f = r % F, bh = r / F, b = bh / H, h = bh % H;
            const int64_t off = b * a.ksum.strides[0] + h * a.ksum.strides[1] + f * a.ksum.strides[2];
            float run = load_as_float(a.ksum.data, a.ksum.dtype, off);
            for (int64_t s = 0; s < L.nseg; s++) {
                float *p = &L.scratch_ksum[(bh * L.nseg + s) * F + f];
                const float d = *p;
                *p = run;
                run += d;
            }
            store_from_float(a.ksum.data, a.ksum.dtype, off, run);
        } else {
            const int64_t b = i - n_kv - n_ks;
            reinterpret_cast<int64_t *>(a.tokens.data)[b * a.tokens.strides[0]] += a.seqlen;
        }
    }
}

// ---- SIMT kernel: float32 FMAs --------------------------------------------------------

constexpr int kSimtChunk = 32;
constexpr int kSimtThreads = 256;
constexpr int kSimtMaxCols = 64; // value columns per block: 64, 32, 16 or 8

struct SimtLayout {
    int tile_cols, pitch_kv, pitch_qk, pitch_a;
    size_t kv, ksum, q, k, v, a, coef, idx, bytes; // float offsets (idx: ints after coef)
};

inline SimtLayout simt_layout(int64_t F, int64_t dk, int tile_cols) {
    SimtLayout s;
    s.tile_cols = tile_cols;
    s.pitch_kv = tile_cols + 8;
    s.pitch_qk = static_cast<int>(dk) + 1;
    s.pitch_a = kSimtChunk + 1;
    s.kv = 0;
    s.ksum = s.kv + static_cast<size_t>(F) * s.pitch_kv;
    s.q = s.ksum + static_cast<size_t>(F);
    s.k = s.q + static_cast<size_t>(kSimtChunk) * s.pitch_qk;
    s.v = s.k + static_cast<size_t>(kSimtChunk) * s.pitch_qk;
    s.a = s.v + static_cast<size_t>(kSimtChunk) * s.pitch_kv;
    s.coef = s.a + static_cast<size_t>(kSimtChunk) * s.pitch_a;
    s.idx = s.coef + static_cast<size_t>(F);
    s.bytes = (s.idx + static_cast<size_t>(F)) * sizeof(float);
    return s;
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
prefill_simt_kernel(const based_linear_attention_args a, const SimtLayout S, int v_tiles) {
    extern __shared__ float sf[];
    float *sKV = sf + S.kv, *sKsum = sf + S.ksum, *sQ = sf + S.q, *sK = sf + S.k, *sV = sf + S.v, *sA = sf + S.a;
    float *sCoef = sf + S.coef;
    int *sIdx = reinterpret_cast<int *>(sf + S.idx);
    const int tid = threadIdx.x;
    const int dk = static_cast<int>(a.feature_dim);
    const int64_t F = a.feature_count, Dv = a.value_dim, H = a.heads, T_len = a.seqlen;
    const int64_t vt = blockIdx.x % v_tiles, bh = blockIdx.x / v_tiles, h = bh % H, b = bh / H;
    const int NV = S.tile_cols, PV = S.pitch_kv, PQ = S.pitch_qk, PA = S.pitch_a;
    const int64_t col_base = vt * NV;
    const float scale = static_cast<float>(a.scale), eps = static_cast<float>(a.eps);

    for (int f = tid; f < F; f += kSimtThreads) {
        int i, j;
        float c;
        feature_of(f, dk, scale, &i, &j, &c);
        sCoef[f] = c;
        sIdx[f] = i | (j << 8);
        sKsum[f] = load_as_float(a.ksum.data, a.ksum.dtype, b * a.ksum.strides[0] + h * a.ksum.strides[1] + f * a.ksum.strides[2]);
    }
    for (int64_t e = tid; e < F * NV; e += kSimtThreads) {
        const int64_t f = e / NV, jj = e % NV, j = col_base + jj;
        sKV[f * PV + jj] = j < Dv ? load_as_float(a.kv.data, a.kv.dtype,
                                             b * a.kv.strides[0] + h * a.kv.strides[1] + f * a.kv.strides[2] + j)
                                  : 0.0f;
    }
    const int per = NV / 8; // columns per thread: jg + 8 r
    for (int64_t c0 = 0; c0 < T_len; c0 += kSimtChunk) {
        const int n = static_cast<int>(T_len - c0 < kSimtChunk ? T_len - c0 : kSimtChunk);
        __syncthreads();
        for (int e = tid; e < kSimtChunk * dk; e += kSimtThreads) {
            const int t = e / dk, d = e % dk;
            const bool ok = t < n;
            sQ[t * PQ + d] = ok ? to_float(reinterpret_cast<const T *>(a.q.data)[BASED_AT3(a.q, b, c0 + t, h) + d]) : 0.0f;
            sK[t * PQ + d] = ok ? to_float(reinterpret_cast<const T *>(a.k.data)[BASED_AT3(a.k, b, c0 + t, h) + d]) : 0.0f;
        }
        for (int e = tid; e < kSimtChunk * NV; e += kSimtThreads) {
            const int t = e / NV, jj = e % NV;
            const int64_t j = col_base + jj;
            sV[t * PV + jj] = t < n && j < Dv ? to_float(reinterpret_cast<const T *>(a.v.data)[BASED_AT3(a.v, b, c0 + t, h) + j])
                                              : 0.0f;
        }
        __syncthreads();
        // A = mask(1 + s + s^2/2)
        for (int e = tid; e < kSimtChunk * kSimtChunk; e += kSimtThreads) {
            const int r = e / kSimtChunk, u = e % kSimtChunk;
            float w = 0.0f;
            if (u <= r && u < n) {
                float s = 0.0f;
                for (int d = 0; d < dk; d++) s = fmaf(sQ[r * PQ + d], sK[u * PQ + d], s);
                s *= scale;
                w = 1.0f + s + 0.5f * s * s;
            }
            sA[r * PA + u] = w;
        }
        __syncthreads();
        // outputs: thread (t, jg) computes columns jg + 8 r of token t
        {
            const int t = tid / 8, jg = tid % 8;
            float acc[kSimtMaxCols / 8];
#pragma unroll
            for (int r = 0; r < kSimtMaxCols / 8; r++) acc[r] = 0.0f;
            float den = 0.0f;
            for (int u = 0; u <= t; u++) {
                const float w = sA[t * PA + u];
                den += w;
#pragma unroll
                for (int r = 0; r < kSimtMaxCols / 8; r++)
                    if (r < per) acc[r] = fmaf(w, sV[u * PV + jg + 8 * r], acc[r]);
            }
            for (int64_t f = 0; f < F; f++) {
                const int ij = sIdx[f], i = ij & 0xff, j = ij >> 8;
                const float p = sCoef[f] * (i == kNone ? 1.0f : sQ[t * PQ + i]) * (j == kNone ? 1.0f : sQ[t * PQ + j]);
                den = fmaf(p, sKsum[f], den);
#pragma unroll
                for (int r = 0; r < kSimtMaxCols / 8; r++)
                    if (r < per) acc[r] = fmaf(p, sKV[f * PV + jg + 8 * r], acc[r]);
            }
            if (t < n) {
                const float inv = a.normalize ? 1.0f / (den + eps) : 1.0f;
                T *op = reinterpret_cast<T *>(a.out.data) + BASED_AT3(a.out, b, c0 + t, h);
#pragma unroll
                for (int r = 0; r < kSimtMaxCols / 8; r++) {
                    const int64_t j = col_base + jg + 8 * r;
                    if (r < per && j < Dv) op[j] = from_float<T>(acc[r] * inv);
                }
            }
        }
        __syncthreads();
        // KV += phi(K)^T V, ksum += colsum phi(K): unit (f, jg) covers columns jg + 8 r
        for (int64_t unit = tid; unit < F * 8; unit += kSimtThreads) {
            const int64_t f = unit / 8;
            const int jg = static_cast<int>(unit % 8);
            const int ij = sIdx[f], i = ij & 0xff, j = ij >> 8;
            const float c = sCoef[f];
            float acc[kSimtMaxCols / 8];
#pragma unroll
            for (int r = 0; r < kSimtMaxCols / 8; r++) acc[r] = r < per ? sKV[f * PV + jg + 8 * r] : 0.0f;
            float ks = 0.0f;
            for (int u = 0; u < n; u++) {
                const float p = c * (i == kNone ? 1.0f : sK[u * PQ + i]) * (j == kNone ? 1.0f : sK[u * PQ + j]);
                ks += p;
#pragma unroll
                for (int r = 0; r < kSimtMaxCols / 8; r++)
                    if (r < per) acc[r] = fmaf(p, sV[u * PV + jg + 8 * r], acc[r]);
            }
#pragma unroll
            for (int r = 0; r < kSimtMaxCols / 8; r++)
                if (r < per) sKV[f * PV + jg + 8 * r] = acc[r];
            if (jg == 0) sKsum[f] += ks;
        }
    }
    __syncthreads();
    for (int64_t e = tid; e < F * NV; e += kSimtThreads) {
        const int64_t f = e / NV, jj = e % NV, j = col_base + jj;
        if (j < Dv)
            store_from_float(a.kv.data, a.kv.dtype, b * a.kv.strides[0] + h * a.kv.strides[1] + f * a.kv.strides[2] + j,
                      sKV[f * PV + jj]);
    }
    if (vt == 0) {
        for (int64_t f = tid; f < F; f += kSimtThreads)
            store_from_float(a.ksum.data, a.ksum.dtype, b * a.ksum.strides[0] + h * a.ksum.strides[1] + f * a.ksum.strides[2],
                      sKsum[f]);
        if (h == 0 && tid == 0) reinterpret_cast<int64_t *>(a.tokens.data)[b * a.tokens.strides[0]] += T_len;
    }
}

// ---- host side --------------------------------------------------------------------------

enum class Kernel { Simt, MmaSync };

// BASED_CUDA_PREFILL: "simt" forces the float32 SIMT kernel, "mma_sync" (or unset) lets
// float16/bfloat16 calls with Dk <= 16 take the tensor-core kernel.
inline Kernel pick_kernel(int device, based_dtype dtype, int64_t dk) {
    const char *env = getenv("BASED_CUDA_PREFILL");
    if (env != nullptr && strcmp(env, "simt") == 0) return Kernel::Simt;
    if (dtype == BASED_DTYPE_FLOAT32 || dk > 16) return Kernel::Simt;
    const DeviceInfo d = device_info(device);
    if (d.capability < 80) return Kernel::Simt;
    if (static_cast<size_t>(d.smem_optin) < MmaShared<__half>::bytes) return Kernel::Simt;
    return Kernel::MmaSync;
}

// The segment states of the split prefill come from a memory pool of based's own per device
// that keeps what it has allocated (release threshold: never), so that repeated prefills
// reuse it instead of returning it to the driver at every synchronisation (the default
// pool's behaviour, which costs an allocation per call). It holds at most the largest
// scratch one call needed (~10 MB: about two blocks' states per SM).
inline cudaError_t scratch_pool(int device, cudaMemPool_t *out) {
    static std::mutex lock;
    static cudaMemPool_t pools[kMaxDevices];
    if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
    std::lock_guard<std::mutex> guard(lock);
    if (pools[device] == nullptr) {
        cudaMemPoolProps props = {};
        props.allocType = cudaMemAllocationTypePinned;
        props.location.type = cudaMemLocationTypeDevice;
        props.location.id = device;
        cudaMemPool_t pool = nullptr;
        cudaError_t err = cudaMemPoolCreate(&pool, &props);
        if (err != cudaSuccess) return err;
        uint64_t keep = UINT64_MAX;
        err = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
        if (err != cudaSuccess) {
            cudaMemPoolDestroy(pool);
            return err;
        }
        pools[device] = pool;
    }
    *out = pools[device];
    return cudaSuccess;
}

// Blocks per SM the tensor-core kernel is compiled for: 1 (232 registers, no spills) or
// 2 (128 registers, a few spills). BASED_CUDA_PREFILL_BLOCKS=1|2 picks one (a tuning knob
// for the benchmarks; the default is the faster one measured on the H200).
inline int mma_blocks_per_sm() {
    const char *env = getenv("BASED_CUDA_PREFILL_BLOCKS");
    return env != nullptr && strcmp(env, "1") == 0 ? 1 : 2;
}

template <typename T, int MIN_BLOCKS>
based_status launch_mma_variant(const based_linear_attention_args &a, cudaStream_t stream) {
    const char *op = "linear_attention_prefill";
    const DeviceInfo d = device_info(a.device.id);
    PrefillLaunch L = {};
    L.f_tiles = static_cast<int>(ceil_div<int64_t>(a.feature_count, 16));
    L.tile_cols = kMmaTileCols;
    L.v_tiles = static_cast<int>(ceil_div<int64_t>(a.value_dim, kMmaTileCols));
    const int64_t heads_blocks = a.batch * a.heads * L.v_tiles;
    const int64_t chunks = ceil_div<int64_t>(a.seqlen, kMmaChunk);
    // q, k, v rows as 16-byte vectors: Dk = 16, aligned bases, strides in whole vectors
    auto aligned = [](const based_tensor &t) {
        return reinterpret_cast<uintptr_t>(t.data) % 16 == 0 && t.strides[0] % 8 == 0 && t.strides[1] % 8 == 0 &&
               t.strides[2] % 8 == 0;
    };
    L.vec = a.feature_dim == 16 && a.value_dim % 8 == 0 && aligned(a.q) && aligned(a.k) && aligned(a.v);
    // segments, when B*H*tiles leaves SMs idle: about two blocks per SM, each segment at
    // least 4 chunks (the state pass costs ~40% of a full pass, so a full wave is not split)
    int64_t nseg = 1;
    if (heads_blocks < static_cast<int64_t>(d.sms) && chunks >= 8 && d.pools) {
        nseg = ceil_div<int64_t>(2 * d.sms, heads_blocks);
        const int64_t most = chunks / 4;
        if (nseg > most) nseg = most;
        if (nseg < 1) nseg = 1;
    }
    L.seg_len = ceil_div<int64_t>(chunks, nseg) * kMmaChunk;
    L.nseg = ceil_div<int64_t>(a.seqlen, L.seg_len);
    if (heads_blocks * L.nseg > 0x7fffffffLL)
        return based_fail(BASED_STATUS_NOT_IMPLEMENTED, "%s: B*H*ceil(Dv/64) = %lld exceeds the CUDA grid", op,
                          (long long)heads_blocks);
    const size_t shmem = MmaShared<T>::bytes;
    cudaError_t err = cudaFuncSetAttribute(prefill_mma_kernel<T, MIN_BLOCKS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(shmem));
    if (err != cudaSuccess) return cuda_fail(err, op, "cudaFuncSetAttribute");
    if (L.nseg == 1) {
        L.mode = MODE_FULL;
        prefill_mma_kernel<T, MIN_BLOCKS><<<static_cast<unsigned>(heads_blocks), kMmaThreads, shmem, stream>>>(a, L);
        return check_launch(op);
    }
    const size_t slots = static_cast<size_t>(a.batch * a.heads * L.nseg);
    const size_t kv_bytes = slots * static_cast<size_t>(a.feature_count * a.value_dim) * sizeof(float);
    const size_t ks_bytes = slots * static_cast<size_t>(a.feature_count) * sizeof(float);
    void *scratch = nullptr;
    cudaMemPool_t pool = nullptr;
    err = scratch_pool(a.device.id, &pool);
    if (err != cudaSuccess) return cuda_fail(err, op, "creating the scratch memory pool");
    err = cudaMallocFromPoolAsync(&scratch, kv_bytes + ks_bytes, pool, stream);
    if (err != cudaSuccess) return cuda_fail(err, op, "allocating the segment states");
    L.scratch_kv = static_cast<float *>(scratch);
    L.scratch_ksum = reinterpret_cast<float *>(static_cast<char *>(scratch) + kv_bytes);
    const unsigned grid = static_cast<unsigned>(heads_blocks * L.nseg);
    L.mode = MODE_STATE;
    prefill_mma_kernel<T, MIN_BLOCKS><<<grid, kMmaThreads, shmem, stream>>>(a, L);
    based_status st = check_launch(op);
    if (st == BASED_STATUS_OK) {
        const int64_t elems = a.batch * a.heads * a.feature_count * (a.value_dim + 1) + a.batch;
        const int64_t blocks = ceil_div<int64_t>(elems, 256);
        scan_segments_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), 256, 0, stream>>>(a, L);
        st = check_launch(op);
    }
    if (st == BASED_STATUS_OK) {
        L.mode = MODE_OUTPUT;
        prefill_mma_kernel<T, MIN_BLOCKS><<<grid, kMmaThreads, shmem, stream>>>(a, L);
        st = check_launch(op);
    }
    err = cudaFreeAsync(scratch, stream);
    if (st == BASED_STATUS_OK && err != cudaSuccess) return cuda_fail(err, op, "cudaFreeAsync");
    return st;
}

template <typename T>
based_status launch_mma(const based_linear_attention_args &a, cudaStream_t stream) {
    return mma_blocks_per_sm() == 1 ? launch_mma_variant<T, 1>(a, stream) : launch_mma_variant<T, 2>(a, stream);
}

template <typename T>
based_status launch_simt(const based_linear_attention_args &a, cudaStream_t stream) {
    const char *op = "linear_attention_prefill";
    const DeviceInfo d = device_info(a.device.id);
    int cols = kSimtMaxCols;
    SimtLayout S = simt_layout(a.feature_count, a.feature_dim, cols);
    while (cols > 8 && S.bytes > 48 * 1024) {
        cols /= 2;
        S = simt_layout(a.feature_count, a.feature_dim, cols);
    }
    if (S.bytes > static_cast<size_t>(d.smem_optin))
        return based_fail(BASED_STATUS_NOT_IMPLEMENTED, "%s: F = %lld needs %zu bytes of shared memory, more than "
                          "this GPU's %d", op, (long long)a.feature_count, S.bytes, d.smem_optin);
    const int64_t v_tiles = ceil_div<int64_t>(a.value_dim, cols);
    const int64_t blocks = a.batch * a.heads * v_tiles;
    if (blocks > 0x7fffffffLL)
        return based_fail(BASED_STATUS_NOT_IMPLEMENTED, "%s: B*H*value tiles = %lld exceeds the CUDA grid", op,
                          (long long)blocks);
    cudaError_t err = cudaFuncSetAttribute(prefill_simt_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(S.bytes));
    if (err != cudaSuccess) return cuda_fail(err, op, "cudaFuncSetAttribute");
    prefill_simt_kernel<T><<<static_cast<unsigned>(blocks), kSimtThreads, S.bytes, stream>>>(a, S,
                                                                                             static_cast<int>(v_tiles));
    return check_launch(op);
}

}  // namespace
}  // namespace based

extern "C" const char *based_cuda_linear_attention_prefill_kernel(int device, based_dtype dtype, int64_t feature_dim,
                                                                 int64_t value_dim) {
    (void)value_dim;
    return based::pick_kernel(device, dtype, feature_dim) == based::Kernel::MmaSync ? "mma_sync" : "simt";
}

extern "C" based_status based_cuda_linear_attention_prefill(const based_linear_attention_args *args,
                                                           cudaStream_t stream) {
    using namespace based;
    const based_linear_attention_args &a = *args;
    const char *op = "linear_attention_prefill";
    if (a.batch == 0 || a.seqlen == 0) return BASED_STATUS_OK;
    if (a.feature_dim > 32)
        return based_fail(BASED_STATUS_NOT_IMPLEMENTED, "%s: the CUDA kernels take Dk <= 32, got %lld", op,
                          (long long)a.feature_dim);
    BASED_CUDA_DEVICE(a.device.id, op);
    if (a.heads == 0) {
        tokens_add_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(a.batch, 256)), 256, 0, stream>>>(a.tokens, a.batch,
                                                                                                      a.seqlen);
        return check_launch(op);
    }
    const Kernel kernel = pick_kernel(a.device.id, a.q.dtype, a.feature_dim);
    return dispatch_float(a.q.dtype, op, [&](auto tag) {
        using T = decltype(tag);
        if constexpr (std::is_same<T, float>::value) {
            return launch_simt<T>(a, stream);
        } else {
            return kernel == Kernel::MmaSync ? launch_mma<T>(a, stream) : launch_simt<T>(a, stream);
        }
    });
}
