// sliding_window_decode.cu -- one new token per sequence, sliding-window softmax attention on
// CUDA (SPEC 1.2): based_cuda_sliding_window_decode.
//
// With n = tokens[b]: the new key and value go into ring slot n % W (it held position n - W,
// now outside the window), and query head h attends the L = min(n + 1, W) valid slots:
// positions 0 .. n while the ring is filling (slots 0 .. n), else every slot. So the keys of
// a decode step are exactly ring slots 0 .. L-1, in any order -- the kernel walks them in
// slot order, taking slot n % W from the call's k and v instead of the cache.
//
// Two launches on the caller's stream, nothing allocated, no host round trip, so a decode
// step can be captured in a CUDA graph:
//   1. decode_kernel: one block per (b, kv head, group of <= 8 query heads of that kv head),
//      so the ring of a kv head is read once for all heads of its GQA group (G <= 8; a larger
//      G is split over ceil(G / 8) blocks that each read the ring). The block writes the new
//      key and value into slot n % W (the first block of the kv head only); slot n % W is
//      never read as a key, so no block depends on that write. The common shapes (H = Hkv,
//      W <= 64, whole 16-byte rows) take decode_fast_kernel instead (below: the ring straight
//      into registers, one block per (b, head));
//   2. tokens[b] += 1 (sliding_window.cuh), alone because every block of sequence b reads it.
// A counter that is negative or at 2^62 marks the sequence invalid: NaN outputs, its cache
// slots and counter untouched.
//
// Block of 128 threads, per chunk of kc slots (kc <= 128, a multiple of 8, sized so that the
// block's shared memory stays under 46 KiB: no opt-in, 4+ blocks per SM):
//   - K and V rows of the chunk's slots by 16-byte cp.async (element loads for strided or
//     misaligned rows). The first chunk's loads go out before anything else, the counter
//     read included (the ring always has W slots: rows past the valid ones are loaded and
//     never read), so the latencies of the counter, q and the new key and value hide behind
//     them. A row-major key cache is staged [slot][d]; a slot-contiguous key ring
//     (strides[2] == 1) is staged [d][slot], each key dimension of the chunk being one
//     contiguous run. Row strides in shared memory are an odd number of 16-byte units, so
//     the 16-byte score reads are bank-conflict free;
//   - scores: sp adjacent threads per (head g, slot j) (sp = 1..8: as many as keep every
//     thread busy), fp32 dot products with q pre-scaled by scale (held in shared memory as
//     fp32), the partial sums added by shuffles;
//   - online softmax per head by one warp (running max subtracted, fp32, expf: the CPU
//     kernel's arithmetic, so the float32 errors of both are alike);
//   - P V: thread per (head, 16-byte piece of d) -- split over up to 16 key partitions when
//     G * D / (16-byte piece) < 128 -- with fp32 accumulators in shared memory, rescaled per
//     chunk; partitions summed at the end;
//   - the new key and value go into slot n % W from shared memory (no second global read).
//   Every slot of a chunk lies in the window, so every key is weighed (Inf/NaN in a key or
//   value reach this query's output, as on the CPU).
// The register kernel below (decode_fast_kernel) takes the common shapes; this one takes the
// rest (GQA, W > 64, any D, strided or misaligned rows). Measured on the H200 with this
// kernel forced (W=64, D=64, H=Hkv=16, B=256, CUDA-graph replay): 33 us bf16, 56 us fp32.
// Before, a block that read the counter and q ahead of its ring loads, with 64-bit index
// divisions and scalar P V, took 39 / 61 us; ncu then showed the SMs issuing on 75% of
// cycles, so instruction count is what this kernel trims. A persistent variant (blocks
// walking several items, the next item's ring loading through a second buffer) was slower
// (52 us bf16): fewer blocks per SM, each waiting on the same serial latencies.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "sliding_window.cuh"

namespace {

using namespace based;
using namespace based::window;

constexpr int kThreads = 128;
constexpr int kGroupMax = 8;         // query heads per block
constexpr int kChunkMax = 128;       // slots per chunk
constexpr int kPartsMax = 16;        // key partitions of P V
constexpr int kSplitMax = 8;         // threads per score (a power of two)
constexpr size_t kSmemBudget = 46 * 1024;

// Sizes and shared-memory layout of one launch (byte offsets, each 16-byte aligned).
struct DecodePlan {
    int gb;   // query heads per block (the last block of a kv head may have fewer)
    int nhg;  // blocks per (b, kv head)
    int kc;   // slots per chunk
    int dq;   // D rounded up to whole 16-byte pieces
    int ds;   // row stride (elements) of K rows and V rows in shared memory
    int rs;   // key partitions of P V
    int sp;   // threads per score (a power of two)
    int sp_log2;
    int64_t group;  // query heads per kv head, H / Hkv
    unsigned off_k, off_v, off_kn, off_vn, off_q, off_p, off_acc, off_stat, smem;
};

// Whether every row of a cache (b, kh, slots from `base` on) is fast: unit stride along d,
// 16-byte aligned start and a row stride of whole 16-byte units.
template <typename T>
__device__ __forceinline__ bool rows_fast(const based_tensor &cache, const T *base) {
    return cache.strides[3] == 1 && aligned16(base) && (cache.strides[2] * (int64_t)sizeof(T)) % 16 == 0;
}

// cp.async (element loads for rows that are not fast) of the keys and values of ring slots
// c0 .. c0+cnt-1 of (b, kv head kh) into Ks and Vs; the caller commits the group. Thread tid
// takes pieces tid, tid + 128, ... of the chunk's rows, its (row, piece) advanced by adding.
template <typename T, bool KT>
__device__ __forceinline__ void load_chunk(const based_sliding_window_args &a, const DecodePlan &pl, int64_t b,
                                           int64_t kh, int64_t c0, int cnt, T *Ks, T *Vs) {
    constexpr int E = 16 / sizeof(T);
    const int tid = threadIdx.x, kc = pl.kc, ds = pl.ds, pieces = pl.dq / E, D = (int)a.head_dim;
    const based_tensor &kcache = a.k_cache, &vcache = a.v_cache;
    const T *const kbase = row_ptr<T>(kcache, b, kh, c0);
    const T *const vbase = row_ptr<T>(vcache, b, kh, c0);
    const int64_t krow = kcache.strides[2], vrow = vcache.strides[2];
    const bool vfast = rows_fast(vcache, vbase);
    const int dr = kThreads / pieces, dc = kThreads - dr * pieces, r0 = tid / pieces, p0 = tid - r0 * pieces;
    if constexpr (KT) {
        const int runs = kc / E;  // per key dimension: a run of slots
        for (int i = tid; i < D * runs; i += kThreads) {
            const int d = i / runs, c = i % runs;
            if (c * E >= cnt) continue;
            const T *run = kbase + (int64_t)d * kcache.strides[3];
            load_piece(Ks + d * kc + c * E, run, krow, c * E, cnt, krow == 1 && aligned16(run));
        }
        for (int r = r0, c = p0; r < cnt;) {
            load_piece(Vs + r * ds + c * E, vbase + r * vrow, vcache.strides[3], c * E, D, vfast);
            r += dr;
            c += dc;
            if (c >= pieces) c -= pieces, r++;
        }
    } else {
        const bool kfast = rows_fast(kcache, kbase);
        for (int r = r0, c = p0; r < cnt;) {
            load_piece(Ks + r * ds + c * E, kbase + r * krow, kcache.strides[3], c * E, D, kfast);
            load_piece(Vs + r * ds + c * E, vbase + r * vrow, vcache.strides[3], c * E, D, vfast);
            r += dr;
            c += dc;
            if (c >= pieces) c -= pieces, r++;
        }
    }
}

template <typename T, bool KT>
__global__ void __launch_bounds__(kThreads) decode_kernel(const based_sliding_window_args a, const DecodePlan pl) {
    constexpr int E = 16 / sizeof(T);
    extern __shared__ uint4 smem_u4[];
    unsigned char *const sm = reinterpret_cast<unsigned char *>(smem_u4);
    T *const Ks = reinterpret_cast<T *>(sm + pl.off_k);       // KT ? [D][kc] : [kc][ds]
    T *const Vs = reinterpret_cast<T *>(sm + pl.off_v);       // [kc][ds]
    T *const Kn = reinterpret_cast<T *>(sm + pl.off_kn);      // [ds] the new key, zero-padded
    T *const Vn = reinterpret_cast<T *>(sm + pl.off_vn);      // [ds] the new value
    float *const qs = reinterpret_cast<float *>(sm + pl.off_q);     // [gb][dq] q * scale
    float *const ps = reinterpret_cast<float *>(sm + pl.off_p);     // [gb][kc] scores, then weights
    float *const acc = reinterpret_cast<float *>(sm + pl.off_acc);  // [rs][gb][dq] unnormalised outputs
    float *const m_s = reinterpret_cast<float *>(sm + pl.off_stat); // [gb] running max
    float *const l_s = m_s + pl.gb;                                 // [gb] running sum of weights
    float *const c_s = l_s + pl.gb;                                 // [gb] rescaling of this chunk

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gb = pl.gb, kc = pl.kc, dq = pl.dq, ds = pl.ds, rs = pl.rs, sp = pl.sp;
    // 32-bit divisions (the grid has < 2^31 blocks, so B, Hkv and nhg each fit): a 64-bit one
    // costs ~70 instructions, and this kernel is short enough for that to show
    const unsigned bx = blockIdx.x, nhg = (unsigned)pl.nhg, Hkv = (unsigned)a.kv_heads;
    const int64_t hg = bx % nhg, bk = bx / nhg;
    const int64_t kh = (unsigned)bk % Hkv, b = (unsigned)bk / Hkv;
    const int64_t G = pl.group;
    const int64_t h0 = kh * G + hg * gb;  // first query head of the block
    const int gcnt = (int)(G - hg * gb < gb ? G - hg * gb : gb);
    const int D = (int)a.head_dim;
    const int64_t W = a.window;
    const T *const knew = row_ptr<T>(a.k, b, 0, kh);
    const T *const vnew = row_ptr<T>(a.v, b, 0, kh);

    // The loads go out first, before the counter is read: the ring always has W slots, so
    // slots 0 .. min(W, kc)-1 may be read whatever tokens[b] is (slots past the valid ones are
    // loaded and never read), and the counter's latency overlaps theirs.
    if (gcnt > 0) load_chunk<T, KT>(a, pl, b, kh, 0, (int)(W < kc ? W : kc), Ks, Vs);
    for (int c = tid; c < dq / E; c += kThreads) {
        load_piece(Kn + c * E, knew, a.k.strides[3], c * E, D, a.k.strides[3] == 1 && aligned16(knew));
        load_piece(Vn + c * E, vnew, a.v.strides[3], c * E, D, a.v.strides[3] == 1 && aligned16(vnew));
    }
    cp_async_commit();

    const int64_t n = tokens_at(a.tokens, b);
    if (!counter_valid(n, 1)) {
        const T nan = nan_value<T>();
        for (int i = tid; i < gcnt * D; i += kThreads) {
            const int g = i / D, d = i % D;
            row_ptr_mut<T>(a.out, b, 0, h0 + g)[(int64_t)d * a.out.strides[3]] = nan;
        }
        cp_async_wait<0>();
        return;
    }
    const int64_t L = n + 1 < W ? n + 1 : W;  // valid slots 0 .. L-1
    const int64_t sn = (n | W) >> 32 == 0 ? (int64_t)((uint32_t)n % (uint32_t)W) : n % W;  // slot of the new token
    const float scale = (float)a.scale;

    for (int i = tid; i < gb * dq; i += kThreads) {
        const int g = (unsigned)i / dq, d = i - g * dq;
        qs[i] = g < gcnt && d < D ? to_float(row_ptr<T>(a.q, b, 0, h0 + g)[(int64_t)d * a.q.strides[3]]) * scale : 0.f;
    }
    for (int i = tid; i < rs * gb * dq; i += kThreads) acc[i] = 0.f;
    for (int i = tid; i < gb; i += kThreads) {
        m_s[i] = -INFINITY;
        l_s[i] = 0.f;
    }

    const int64_t slots = gcnt > 0 ? L : 0;  // no query head here (H == 0): only the cache write below
    for (int64_t c0 = 0; c0 < slots; c0 += kc) {
        const int cnt = (int)(slots - c0 < kc ? slots - c0 : kc);
        const int jn = sn >= c0 && sn < c0 + cnt ? (int)(sn - c0) : -1;  // the new token's row, if here

        // keys and values of slots c0 .. c0+cnt-1 (the first chunk's are on their way already;
        // row jn is loaded too, stale, and never read)
        if (c0 > 0) {
            load_chunk<T, KT>(a, pl, b, kh, c0, cnt, Ks, Vs);
            cp_async_commit();
        }
        cp_async_wait<0>();
        __syncthreads();

        // scores of every (head, slot), sp adjacent threads each, partial sums added by shuffles
        const int total = gcnt * cnt * sp;
        for (int i0 = 0; i0 < total; i0 += kThreads) {
            const int i = i0 + tid;
            const int pair = i >> pl.sp_log2, part = i & (sp - 1), g = (unsigned)pair / cnt, j = pair - g * cnt;
            float s = 0.f;
            if (i < total) {
                const float *qg = qs + g * dq;
                if constexpr (KT) {
                    const T *kp = j == jn ? Kn : Ks + j;
                    const int st = j == jn ? 1 : kc;
                    for (int d = part; d < D; d += sp) s += qg[d] * to_float(kp[d * st]);
                } else {
                    const T *kp = j == jn ? Kn : Ks + j * ds;
                    for (int c = part; c < dq / E; c += sp) {
                        float kf[E];
                        piece_to_float<T>(*reinterpret_cast<const uint4 *>(kp + c * E), kf);
#pragma unroll
                        for (int e = 0; e < E; e += 4) {
                            const float4 qv = *reinterpret_cast<const float4 *>(qg + c * E + e);
                            s += qv.x * kf[e] + qv.y * kf[e + 1] + qv.z * kf[e + 2] + qv.w * kf[e + 3];
                        }
                    }
                }
            }
            for (int o = sp / 2; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (i < total && part == 0) ps[g * kc + j] = s;
        }
        __syncthreads();

        // online softmax of each head over the chunk, one warp per head
        for (int g = warp; g < gcnt; g += kThreads / 32) {
            float *pg = ps + g * kc;
            float mx = -INFINITY;
            for (int j = lane; j < cnt; j += 32) mx = fmaxf(mx, pg[j]);
            mx = warp_max(mx);
            const float m_old = m_s[g], m_new = fmaxf(m_old, mx);
            const float mu = m_new == -INFINITY ? 0.f : m_new;
            const float corr = expf(m_old - mu);
            float sum = 0.f;
            for (int j = lane; j < cnt; j += 32) {
                const float p = expf(pg[j] - mu);
                pg[j] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            __syncwarp();
            if (lane == 0) {
                m_s[g] = m_new;
                l_s[g] = l_s[g] * corr + sum;
                c_s[g] = corr;
            }
        }
        __syncthreads();

        // acc = acc * corr + P V, per (key partition, head, 16-byte piece of d)
        const int pieces = dq / E, units = gb * pieces;
        for (int idx = tid; idx < rs * units; idx += kThreads) {
            const int part = (unsigned)idx / units, unit = idx - part * units;
            const int g = (unsigned)unit / pieces, c = unit - g * pieces;
            if (g >= gcnt) continue;
            const float *pg = ps + g * kc;
            float sum[E];
#pragma unroll
            for (int e = 0; e < E; e++) sum[e] = 0.f;
            for (int j = part; j < cnt; j += rs) {
                const float w = pg[j];
                float vf[E];
                piece_to_float<T>(*reinterpret_cast<const uint4 *>((j == jn ? Vn : Vs + j * ds) + c * E), vf);
#pragma unroll
                for (int e = 0; e < E; e++) sum[e] += w * vf[e];
            }
            float4 *ac = reinterpret_cast<float4 *>(acc + (part * gb + g) * dq + c * E);
            const float corr = c_s[g];
#pragma unroll
            for (int e = 0; e < E / 4; e++) {
                const float4 o = ac[e];
                ac[e] = make_float4(o.x * corr + sum[4 * e], o.y * corr + sum[4 * e + 1], o.z * corr + sum[4 * e + 2],
                                    o.w * corr + sum[4 * e + 3]);
            }
        }
        __syncthreads();  // before the next chunk replaces Ks, Vs, ps and c_s
    }
    if (slots == 0) {  // the new key and value were never waited for
        cp_async_wait<0>();
        __syncthreads();
    }

    for (int i = tid; i < gcnt * D; i += kThreads) {
        const int g = i / D, d = i % D;
        float s = 0.f;
        for (int part = 0; part < rs; part++) s += acc[(part * gb + g) * dq + d];
        row_ptr_mut<T>(a.out, b, 0, h0 + g)[(int64_t)d * a.out.strides[3]] = from_float<T>(s / l_s[g]);
    }
    if (hg == 0) {  // the new key and value into slot n % W, bit for bit (from shared memory)
        T *kd = row_ptr_mut<T>(a.k_cache, b, kh, sn);
        T *vd = row_ptr_mut<T>(a.v_cache, b, kh, sn);
        for (int d = tid; d < D; d += kThreads) {
            kd[(int64_t)d * a.k_cache.strides[3]] = Kn[d];
            vd[(int64_t)d * a.v_cache.strides[3]] = Vn[d];
        }
    }
}

// ---- the register kernel: one query head per kv head, W <= 64, whole 16-byte rows -----------
//
// The common decode shape (the paper's window layers: H = Hkv, W = 64, D = 64) needs no
// shared-memory staging: each key element feeds one score and each value element one
// output sum, so every thread loads its part of the ring straight into registers, all of a
// block's ring in flight at once, before the counter is read. Block of 128 threads per (b, h):
//   - scores: 2 threads per slot j = tid / 2 (64 slots), each a half of the key row (P / 2
//     pieces of 16 bytes), partial dot products added by one shuffle;
//   - softmax over the block: warp maxima and sums through shared memory (two barriers);
//   - P V: thread (r = tid / P, piece c = tid % P) sums slots r, r + RS, ... (RS = 128 / P)
//     of its value piece, kept in registers; the partial sums meet by shuffles within a warp
//     and through shared memory across the 4 warps;
//   - the new key and value: staged in shared memory (key, with q) and registers (value);
//     the threads owning slot n % W store them there.
// Taken when the cache rows, q, k, v and out are all whole aligned 16-byte pieces (checked
// on the host); anything else goes to decode_kernel above, and BASED_CUDA_WINDOW_DECODE=smem
// sends everything there. H200, W=64, D=64, H=Hkv=16, B=256, CUDA-graph replay: 23.5 us bf16,
// 41.9 us fp32: 80% / 84% of the same-run copy bandwidth.
constexpr int kFastSlots = 64;

template <typename T, int P>
__global__ void __launch_bounds__(kThreads) decode_fast_kernel(const based_sliding_window_args a) {
    constexpr int E = 16 / sizeof(T), D = P * E;
    constexpr int SP = kThreads / kFastSlots, KPT = P / SP;  // threads per slot, key pieces per thread
    constexpr int RS = kThreads / P, VPT = kFastSlots / RS;  // value partitions, slots per thread
    static_assert(P % SP == 0 && kThreads % P == 0 && kFastSlots % RS == 0, "pieces per row");
    __shared__ float4 q_s[D / 4];  // q * scale (the CPU's order: q is scaled before the dot product)
    __shared__ uint4 kn_s[P];
    __shared__ float p_s[kFastSlots];
    __shared__ float red[2][kThreads / 32];
    __shared__ float4 part_s[kThreads / 32][D / 4];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const unsigned H = (unsigned)a.heads;
    const int64_t h = blockIdx.x % H, b = blockIdx.x / H;
    const int W = (int)a.window;
    const based_tensor &kc = a.k_cache, &vc = a.v_cache;

    // every load first: this thread's key pieces, value pieces, and the new value's piece
    const int j = tid / SP, half = tid % SP;
    const int r = tid / P, c = tid % P;
    uint4 kr[KPT], vr[VPT];
    const T *krow = row_ptr<T>(kc, b, h, j) + half * KPT * E;
#pragma unroll
    for (int i = 0; i < KPT; i++)
        kr[i] = j < W ? *reinterpret_cast<const uint4 *>(krow + i * E) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        const int jj = r + i * RS;
        vr[i] = jj < W ? *reinterpret_cast<const uint4 *>(row_ptr<T>(vc, b, h, jj) + c * E) : make_uint4(0, 0, 0, 0);
    }
    const uint4 vn = *reinterpret_cast<const uint4 *>(row_ptr<T>(a.v, b, 0, h) + c * E);
    if (tid < P) {
        float qf[E];
        piece_to_float<T>(*reinterpret_cast<const uint4 *>(row_ptr<T>(a.q, b, 0, h) + tid * E), qf);
        const float scale = (float)a.scale;
#pragma unroll
        for (int e = 0; e < E; e += 4)
            q_s[(tid * E + e) / 4] = make_float4(qf[e] * scale, qf[e + 1] * scale, qf[e + 2] * scale, qf[e + 3] * scale);
        kn_s[tid] = *reinterpret_cast<const uint4 *>(row_ptr<T>(a.k, b, 0, h) + tid * E);
    }
    const int64_t n = tokens_at(a.tokens, b);
    T *const orow = row_ptr_mut<T>(a.out, b, 0, h);
    if (!counter_valid(n, 1)) {
        if (tid < P) {
            Piece<T> x;
#pragma unroll
            for (int e = 0; e < E; e++) x.e[e] = nan_value<T>();
            *reinterpret_cast<uint4 *>(orow + tid * E) = x.u;
        }
        return;
    }
    const int L = n + 1 < W ? (int)n + 1 : W;  // valid slots 0 .. L-1
    const int sn = (int)(n < W ? n : (n >> 32 == 0 ? (int64_t)((uint32_t)n % (uint32_t)W) : n % W));
    __syncthreads();  // q_s, kn_s

    // score of slot j: q . k_j * scale (the new key for slot sn), -inf past the valid slots
    if (j == sn) {
#pragma unroll
        for (int i = 0; i < KPT; i++) kr[i] = kn_s[half * KPT + i];
    }
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < KPT; i++) {
        float kf[E];
        piece_to_float<T>(kr[i], kf);
#pragma unroll
        for (int e = 0; e < E; e += 4) {
            const float4 qv = q_s[((half * KPT + i) * E + e) / 4];
            s += qv.x * kf[e] + qv.y * kf[e + 1] + qv.z * kf[e + 2] + qv.w * kf[e + 3];
        }
    }
#pragma unroll
    for (int o = SP / 2; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (j >= L) s = -INFINITY;

    // softmax over the slots (fp32, max subtracted)
    const float wmax = warp_max(s);
    if (lane == 0) red[0][warp] = wmax;
    __syncthreads();
    float m = red[0][0];
#pragma unroll
    for (int w = 1; w < kThreads / 32; w++) m = fmaxf(m, red[0][w]);
    const float mu = m == -INFINITY ? 0.f : m;
    const float pj = expf(s - mu);
    const float wsum = warp_sum(half == 0 ? pj : 0.f);
    if (half == 0) p_s[j] = pj;
    if (lane == 0) red[1][warp] = wsum;
    __syncthreads();
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; w++) l += red[1][w];

    // P V: this thread's slots r, r + RS, ... of value piece c (the new value for slot sn)
    float acc[E];
#pragma unroll
    for (int e = 0; e < E; e++) acc[e] = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        const int jj = r + i * RS;
        float vf[E];
        // a slot past the valid ones (ring filling) weighs nothing and is never read, as on the
        // CPU: zeros stand in for its stale bits (0 * Inf would be NaN)
        const uint4 vu = jj == sn ? vn : jj < L ? vr[i] : make_uint4(0, 0, 0, 0);
        piece_to_float<T>(vu, vf);
        const float w = jj < L ? p_s[jj] : 0.f;
#pragma unroll
        for (int e = 0; e < E; e++) acc[e] += w * vf[e];
    }
#pragma unroll
    for (int o = P; o < 32; o *= 2)
#pragma unroll
        for (int e = 0; e < E; e++) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], o);
    if (lane < P) {
#pragma unroll
        for (int e = 0; e < E; e += 4) part_s[warp][(c * E + e) / 4] = make_float4(acc[e], acc[e + 1], acc[e + 2], acc[e + 3]);
    }
    __syncthreads();
    if (tid < P) {
        Piece<T> x;
#pragma unroll
        for (int e = 0; e < E; e += 4) {
            float4 t = part_s[0][(tid * E + e) / 4];
#pragma unroll
            for (int w = 1; w < kThreads / 32; w++) {
                const float4 u = part_s[w][(tid * E + e) / 4];
                t.x += u.x, t.y += u.y, t.z += u.z, t.w += u.w;
            }
            x.e[e] = from_float<T>(t.x / l);
            x.e[e + 1] = from_float<T>(t.y / l);
            x.e[e + 2] = from_float<T>(t.z / l);
            x.e[e + 3] = from_float<T>(t.w / l);
        }
        *reinterpret_cast<uint4 *>(orow + tid * E) = x.u;
    }
    // the new key and value into slot sn, bit for bit
    if (j == sn) {
        T *kd = row_ptr_mut<T>(kc, b, h, sn) + half * KPT * E;
#pragma unroll
        for (int i = 0; i < KPT; i++) *reinterpret_cast<uint4 *>(kd + i * E) = kn_s[half * KPT + i];
    }
    if (sn % RS == r) *reinterpret_cast<uint4 *>(row_ptr_mut<T>(vc, b, h, sn) + c * E) = vn;
}

// ---- host side ----------------------------------------------------------------------------

const char *const kOp = "sliding_window_decode";

template <typename T>
DecodePlan make_plan(const based_sliding_window_args &a, bool kt) {
    constexpr int isz = (int)sizeof(T), E = 16 / isz;
    const int D = (int)a.head_dim;
    const int64_t G = a.heads / a.kv_heads;
    DecodePlan p{};
    p.group = G;
    p.nhg = (int)std::max<int64_t>(1, (G + kGroupMax - 1) / kGroupMax);
    p.gb = (int)std::max<int64_t>(1, (G + p.nhg - 1) / p.nhg);
    p.dq = (D + E - 1) / E * E;
    p.ds = p.dq + ((p.dq / E) % 2 == 0 ? E : 2 * E);  // an odd number of 16-byte units
    const int units = p.gb * (p.dq / E);  // P V: a thread per (head, 16-byte piece of d, key partition)
    p.rs = units >= kThreads ? 1 : std::min(kThreads / units, kPartsMax);

    size_t off = 0;
    auto take = [&off](size_t bytes) {
        const size_t at = off;
        off += (bytes + 15) / 16 * 16;
        return (unsigned)at;
    };
    p.off_kn = take((size_t)p.ds * isz);
    p.off_vn = take((size_t)p.ds * isz);
    p.off_q = take((size_t)p.gb * p.dq * 4);
    p.off_acc = take((size_t)p.rs * p.gb * p.dq * 4);
    p.off_stat = take((size_t)3 * p.gb * 4);
    // per slot of a chunk: its key row, value row and one weight per head (+16 for rounding)
    const size_t per_slot = (size_t)(kt ? D : p.ds) * isz + (size_t)p.ds * isz + (size_t)p.gb * 4;
    int64_t kc = (int64_t)((kSmemBudget - off - 48) / per_slot) / 8 * 8;
    kc = std::min<int64_t>(kc, kChunkMax);
    if (a.window < kc) kc = (a.window + 7) / 8 * 8;  // (W + 7 would overflow for W near 2^63)
    kc = std::max<int64_t>(kc, 8);
    p.kc = (int)kc;
    p.off_k = take((size_t)(kt ? D : p.ds) * p.kc * isz);
    p.off_v = take((size_t)p.ds * p.kc * isz);
    p.off_p = take((size_t)p.gb * p.kc * 4);
    p.smem = (unsigned)off;
    int sp = 1;  // threads per score: as many as leave no thread idle, at most one per 16-byte piece
    while (sp < kSplitMax && (int64_t)p.gb * p.kc * sp * 2 <= kThreads && sp * 2 <= (kt ? D : p.dq / E)) sp *= 2;
    p.sp = sp;
    while ((1 << p.sp_log2) < sp) p.sp_log2++;
    return p;
}

// Whether a tensor's rows (axes 0..2 as used) are whole 16-byte pieces at 16-byte addresses.
inline bool rows_whole(const based_tensor &t, int64_t elem) {
    if (t.strides[3] != 1 || (reinterpret_cast<uintptr_t>(t.data) & 15u) != 0) return false;
    for (int i = 0; i < 3; i++)
        if ((t.strides[i] * elem) % 16 != 0) return false;
    return true;
}

// Whether decode_fast_kernel takes the call: one query head per kv head, W <= 64, a row of
// 4, 8 or 16 pieces of 16 bytes (D = 64 or 128 in 16-bit types, 32 or 64 in float32...),
// every row whole and aligned.
template <typename T>
bool fast_eligible(const based_sliding_window_args &a) {
    const int64_t bytes = a.head_dim * (int64_t)sizeof(T);
    if (a.heads < 1 || a.heads != a.kv_heads || a.window > kFastSlots) return false;
    if (bytes != 64 && bytes != 128 && bytes != 256) return false;
    const int64_t e = (int64_t)sizeof(T);
    return rows_whole(a.q, e) && rows_whole(a.k, e) && rows_whole(a.v, e) && rows_whole(a.out, e) &&
           rows_whole(a.k_cache, e) && rows_whole(a.v_cache, e);
}

template <typename T>
based_status launch_decode(const based_sliding_window_args &a, cudaStream_t stream) {
    if (a.head_dim < 1 || a.head_dim > 256)
        return based_fail(BASED_STATUS_NOT_IMPLEMENTED, "%s: head dim D=%lld is outside the CUDA kernels' 1..256", kOp,
                          (long long)a.head_dim);
    const int pieces = (int)(a.head_dim * (int64_t)sizeof(T) / 16);
    if (getenv("BASED_CUDA_WINDOW_DECODE") == nullptr || strcmp(getenv("BASED_CUDA_WINDOW_DECODE"), "smem") != 0) {
        if (fast_eligible<T>(a) && a.batch * a.heads <= INT32_MAX) {
            const unsigned blocks = (unsigned)(a.batch * a.heads);
            if (pieces == 4)
                decode_fast_kernel<T, 4><<<blocks, kThreads, 0, stream>>>(a);
            else if (pieces == 8)
                decode_fast_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(a);
            else
                decode_fast_kernel<T, 16><<<blocks, kThreads, 0, stream>>>(a);
            return check_launch(kOp);
        }
    }
    // blocks per (b, kv head) in 64 bits, checked before make_plan narrows anything to int
    const int64_t G = a.heads / a.kv_heads, nhg = std::max<int64_t>(1, (G + kGroupMax - 1) / kGroupMax);
    const int64_t blocks = a.batch > INT32_MAX / a.kv_heads / nhg ? (int64_t)INT32_MAX + 1 : a.batch * a.kv_heads * nhg;
    if (blocks > INT32_MAX)
        return based_fail(BASED_STATUS_NOT_IMPLEMENTED,
                          "%s: B=%lld, Hkv=%lld need %lld thread blocks, more than the CUDA kernel supports (2^31 - 1)",
                          kOp, (long long)a.batch, (long long)a.kv_heads, (long long)(a.batch * a.kv_heads * nhg));
    // the slot-contiguous key ring (strides (.., 1, W)) is staged by key dimension
    const bool kt = a.k_cache.strides[2] == 1 && a.k_cache.strides[3] != 1;
    const DecodePlan p = make_plan<T>(a, kt);
    if (kt)
        decode_kernel<T, true><<<(unsigned)blocks, kThreads, p.smem, stream>>>(a, p);
    else
        decode_kernel<T, false><<<(unsigned)blocks, kThreads, p.smem, stream>>>(a, p);
    return check_launch(kOp);
}

}  // namespace

extern "C" based_status based_cuda_sliding_window_decode(const based_sliding_window_args *args, cudaStream_t stream) {
    const based_sliding_window_args &a = *args;
    if (a.batch == 0) return BASED_STATUS_OK;
    BASED_CUDA_DEVICE(a.device.id, kOp);
    return dispatch_float(a.k.dtype, kOp, [&](auto tag) -> based_status {
        using T = decltype(tag);
        const based_status st = launch_decode<T>(a, stream);  // also with H == 0: it stores k, v
        if (st != BASED_STATUS_OK) return st;
        return launch_ring_and_tokens<T>(a, stream, false, 1, kOp);
    });
}
