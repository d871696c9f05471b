/*
 * sliding_window.c -- sliding-window softmax attention on the CPU (SPEC 1.2; paper Sec. 4):
 * the check shared by both backends and the reference twins, the fast prefill and decode
 * kernels, and the ring-cache update.
 *
 *   o_p = softmax_u(scale * q_p . k_u) @ v_u   over key positions u in (p - W, p]
 *
 * Prefill attends across the call boundary into the cached keys, then stores the last
 * min(T, W) keys and values of the call in their ring slots. Decode stores the new key
 * and value in their slot first (it held position p - W, already outside the window of
 * p) and then reads every key of the window from the ring, in place.
 * Work is O(T * W * D) per head, never O(T^2); the softmax is computed in float32
 * (float64 for float64 inputs) with the running max subtracted (online softmax).
 *
 * The arithmetic of one output row (query position p, head h), which every kernel
 * below does in exactly this order, so that one prefill, chunked prefill and decode
 * give bit-identical outputs whatever the thread count or instruction set:
 *
 *   q' = q * scale (in REAL); m = -inf, l = 0, acc = 0
 *   for each key block [KB a, KB (a+1)) meeting the window [lo, p], in order,
 *   over its keys u in J = [max(lo, KB a), min(p + 1, KB (a+1))):
 *     s_u  = 0; s_u = fma(q'_i, k_u,i, s_u)  for i = 0, 1, ..., D-1
 *     m'   = max(m, max_u s_u)               (NaN scores skipped)
 *     c    = m' == m ? 1 : EXP(m - m');  l = l * c;  acc = acc * c
 *     e_u  = EXP(s_u - m')
 *     l    = l + L_0 + L_1 + ... + L_15,     L_x = sum of e_u over u = x mod 16, u increasing
 *     acc  = fma(e_u, v_u, acc)              u increasing
 *   o = acc / l
 *
 * fma(a, b, c) is a * b + c rounded once (IEEE fusedMultiplyAdd): one instruction on the
 * AVX-512 and AVX2 (+FMA) kernels, fmaf/fma of the C library elsewhere, so every kernel
 * rounds the same; nothing else is fused (the C11 build does not contract a * b + c).
 *
 * Key blocks are aligned to absolute positions (not to the query's window), so the
 * rows of a tile share block boundaries, and the decode finds the same blocks in the ring.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sliding_window.h"

/* ---------------------------------------------------------------------------------
 * The check (shared by both backends and by the reference twins in sliding_window_ref.c)
 * --------------------------------------------------------------------------------- */

based_status based_sliding_window_check(based_sliding_window_args *args, const DLTensor *q_, const DLTensor *k_,
                                        const DLTensor *v_, const DLTensor *k_cache_, const DLTensor *v_cache_,
                                        const DLTensor *tokens_, const DLTensor *out_,
                                        const based_sliding_window_params *params, based_phase phase,
                                        const char *op) {
    memset(args, 0, sizeof *args);
    const int decode = phase == BASED_PHASE_DECODE;
    struct { /* the arguments as checked views, named as in the messages */
        based_view q, k, v, k_cache, v_cache, tokens, out;
    } views, *c = &views;
    BASED_TRY(based_view_init(&c->q, q_, "q"));
    BASED_TRY(based_view_init(&c->k, k_, "k"));
    BASED_TRY(based_view_init(&c->v, v_, "v"));
    BASED_TRY(based_view_init(&c->k_cache, k_cache_, "k_cache"));
    BASED_TRY(based_view_init(&c->v_cache, v_cache_, "v_cache"));
    BASED_TRY(based_view_init(&c->tokens, tokens_, "tokens"));
    BASED_TRY(based_view_init(&c->out, out_, "out"));
    if (params == NULL) return based_fail(BASED_STATUS_VALUE_ERROR, "%s: params is NULL", op);

    BASED_TRY(based_check_dtype(&c->q, BASED_DTYPES_FLOAT));
    BASED_TRY(based_check_same_dtype(&c->k, &c->q));
    BASED_TRY(based_check_same_dtype(&c->v, &c->q));
    BASED_TRY(based_check_same_dtype(&c->out, &c->v));
    /* the cache holds keys and values exactly as given: prefill and decode then read
     * bit-identical keys, whichever call they arrived in */
    BASED_TRY(based_check_same_dtype(&c->k_cache, &c->k));
    BASED_TRY(based_check_same_dtype(&c->v_cache, &c->v));
    BASED_TRY(based_check_dtype(&c->tokens, BASED_DTYPES_INDEX));

    if (params->window < 1)
        return based_fail(BASED_STATUS_VALUE_ERROR, "%s: window must be >= 1, got %lld", op,
                          (long long)params->window);
    BASED_TRY(based_check_scalar(params->scale, "scale", 1));

    const int32_t nd = decode ? 3 : 4;
    const char *q_dims = decode ? "B,H,D" : "B,T,H,D";
    const int64_t any[4] = {-1, -1, -1, -1};
    BASED_TRY(based_check_shape(&c->q, nd, any, q_dims));
    const int64_t B = c->q.shape[0], T = decode ? 1 : c->q.shape[1];
    const int64_t H = c->q.shape[nd - 2], D = c->q.shape[nd - 1], W = params->window;
    if (D < 1 || D > BASED_WINDOW_MAX_HEAD_DIM)
        return based_fail(BASED_STATUS_VALUE_ERROR, "%s: q must have a head dim D between 1 and %d, got D=%lld", op,
                          BASED_WINDOW_MAX_HEAD_DIM, (long long)D);
    if (decode) {
        const int64_t k_want[3] = {B, -1, D};
        BASED_TRY(based_check_shape(&c->k, 3, k_want, "B,Hkv,D"));
    } else {
        const int64_t k_want[4] = {B, T, -1, D};
        BASED_TRY(based_check_shape(&c->k, 4, k_want, "B,T,Hkv,D"));
    }
    const int64_t Hkv = c->k.shape[nd - 2];
    if (Hkv < 1 || H % Hkv != 0)
        return based_fail(BASED_STATUS_VALUE_ERROR,
                          "%s: q has H=%lld heads, which is not a multiple of the Hkv=%lld heads of k "
                          "(grouped-query attention needs H %% Hkv == 0 and Hkv >= 1)",
                          op, (long long)H, (long long)Hkv);
    if (decode) {
        const int64_t kv_want[3] = {B, Hkv, D}, q_want[3] = {B, H, D};
        BASED_TRY(based_check_shape(&c->v, 3, kv_want, "B,Hkv,D"));
        BASED_TRY(based_check_shape(&c->out, 3, q_want, "B,H,D"));
    } else {
        const int64_t kv_want[4] = {B, T, Hkv, D}, q_want[4] = {B, T, H, D};
        BASED_TRY(based_check_shape(&c->v, 4, kv_want, "B,T,Hkv,D"));
        BASED_TRY(based_check_shape(&c->out, 4, q_want, "B,T,H,D"));
    }
    const int64_t cache_want[4] = {B, Hkv, W, D}, tokens_want[1] = {B};
    BASED_TRY(based_check_shape(&c->k_cache, 4, cache_want, "B,Hkv,W,D"));
    BASED_TRY(based_check_shape(&c->v_cache, 4, cache_want, "B,Hkv,W,D"));
    BASED_TRY(based_check_shape(&c->tokens, 1, tokens_want, "B"));

    const based_view *all[] = {&c->q, &c->k, &c->v, &c->k_cache, &c->v_cache, &c->tokens, &c->out};
    BASED_TRY(based_check_device(all, 7, op, &args->device));
    const based_view *rows[] = {&c->q, &c->k, &c->v, &c->k_cache, &c->v_cache, &c->out};
    BASED_TRY(based_check_cuda_rows(rows, 6, args->device, op));

    /* everything written: out, the cache, tokens */
    const based_view *written[] = {&c->out, &c->k_cache, &c->v_cache, &c->tokens}, *read[] = {&c->q, &c->k, &c->v};
    BASED_TRY(based_check_writes(written, 4, read, 3));

    args->phase = phase;
    args->q = decode ? based_tensor_of_decode(&c->q) : based_tensor_of(&c->q);
    args->k = decode ? based_tensor_of_decode(&c->k) : based_tensor_of(&c->k);
    args->v = decode ? based_tensor_of_decode(&c->v) : based_tensor_of(&c->v);
    args->out = decode ? based_tensor_of_decode(&c->out) : based_tensor_of(&c->out);
    args->k_cache = based_tensor_of(&c->k_cache);
    args->v_cache = based_tensor_of(&c->v_cache);
    args->tokens = based_tensor_of(&c->tokens);
    args->batch = B;
    args->seqlen = T;
    args->heads = H;
    args->kv_heads = Hkv;
    args->head_dim = D;
    args->window = W;
    args->scale = params->scale;

    /* token counters, on the host only (CUDA counters are the kernels' to check: based_cuda.h) */
    for (int64_t b = 0; args->device.kind == BASED_DEVICE_CPU && b < B; b++) {
        const int64_t n = based_tokens_at(&args->tokens, b);
        if (n < 0)
            return based_fail(BASED_STATUS_VALUE_ERROR, "%s: tokens[%lld] must be >= 0, got %lld", op, (long long)b,
                              (long long)n);
        if (n > BASED_WINDOW_MAX_POSITION - T) /* headroom for the kernels' position arithmetic */
            return based_fail(BASED_STATUS_VALUE_ERROR,
                              "%s: tokens[%lld] = %lld; positions must stay below 2^62, and adding T=%lld "
                              "would pass that",
                              op, (long long)b, (long long)n, (long long)T);
    }
    return BASED_STATUS_OK;
}

/* ---------------------------------------------------------------------------------
 * Kernels: the template in sliding_window_kernel.h, for float and double, each for
 * AVX-512, AVX2 and the baseline instruction set
 * --------------------------------------------------------------------------------- */

#define LANES 16  /* weights are summed in LANES lanes (position mod LANES); every VL divides it */
#define KB 256    /* key block of the online softmax, aligned to absolute positions; a multiple of LANES */
#define SROW (KB + 2 * LANES) /* scores of one row of a tile: a block and a partial vector either side */
#define ACC_LD BASED_WINDOW_MAX_HEAD_DIM /* decode: outputs of one row */
#define QB_MAX 256 /* query positions per prefill work item */
#define DP_OF(d) (((d) + LANES - 1) / LANES * LANES) /* prefill: value and output rows, zero-padded */

/* kinds of key and value rows the decode reads in place */
#define KIND_NATIVE 0
#define KIND_BF16 1
#define KIND_F16 2

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

/* Prefetch the cache lines of a row of `bytes` bytes (rows with unit stride in the last
 * dim; for other strides it fetches the first lines, which is harmless). */
#if defined(__GNUC__)
#define BASED_WINDOW_PREFETCH(ptr, bytes)                                                          \
    do {                                                                                           \
        const char *pf_ = (const char *)(ptr);                                                     \
        for (int64_t o_ = 0; o_ < (bytes); o_ += 64) __builtin_prefetch(pf_ + o_, 0, 3);           \
    } while (0)
/* the same, for writing (the lines arrive ready to be written) */
#define BASED_WINDOW_PREFETCH_W(ptr, bytes)                                                        \
    do {                                                                                           \
        const char *pf_ = (const char *)(ptr);                                                     \
        for (int64_t o_ = 0; o_ < (bytes); o_ += 64) __builtin_prefetch(pf_ + o_, 1, 3);           \
    } while (0)
#else
#define BASED_WINDOW_PREFETCH(ptr, bytes) ((void)(ptr))
#define BASED_WINDOW_PREFETCH_W(ptr, bytes) ((void)(ptr))
#endif
/* helpers of the kernels: inlined, so each instantiation compiles them for its own ISA */
#define BASED_WINDOW_INLINE static inline __attribute__((always_inline))

/* The steps of window_exp_f32, shared with its vector form in sliding_window_kernel.h
 * (FN(vexp)): both must do the same operations to give the same bits, so they take the
 * fused multiply-add FMA and the constant maker K of their type. x is clamped to
 * WINDOW_EXP_LO first; n = round(x / ln2) by the 1.5 * 2^23 trick; r = x - n ln2 in two
 * fused steps (n * 0.693359375 is exact for |n| < 2^14); WINDOW_EXP_POLY turns p = 1/5040
 * into exp(r) by Horner's rule. */
#define WINDOW_EXP_LO (-87.33654f)
#define WINDOW_EXP_ROUND(x, FMA, K) (FMA((x), K(1.44269504088896341f), K(12582912.0f)) - K(12582912.0f))
#define WINDOW_EXP_REDUCE(x, n, FMA, K) FMA((n), K(2.12194440e-4f), FMA((n), K(-0.693359375f), (x)))
#define WINDOW_EXP_POLY(p, r, FMA, K)                                                                      \
    do {                                                                                                   \
        p = FMA(p, (r), K(1.0f / 720.0f));                                                                 \
        p = FMA(p, (r), K(1.0f / 120.0f));                                                                 \
        p = FMA(p, (r), K(1.0f / 24.0f));                                                                  \
        p = FMA(p, (r), K(1.0f / 6.0f));                                                                   \
        p = FMA(p, (r), K(0.5f));                                                                          \
        p = FMA(p, (r), K(1.0f));                                                                          \
        p = FMA(p, (r), K(1.0f));                                                                          \
    } while (0)
#define WINDOW_SCALAR(c) (c)

/* exp(x) for x <= 0 or NaN in float32, in a form the compiler vectorises (libm's expf is
 * a scalar call): x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), exp(r) by
 * its Taylor polynomial to r^7 (truncation < 0.05 ulp), 2^n built from exponent bits.
 * Measured max error 0.94 ulp over every float in (WINDOW_EXP_LO, 0] (1.22 with the
 * multiply-adds unfused); exp(0) == 1 exactly; x <= WINDOW_EXP_LO (about ln FLT_MIN)
 * flushes to 0; -inf gives 0, NaN gives NaN. */
BASED_WINDOW_INLINE float window_exp_f32(float x) {
    const float xc = x > WINDOW_EXP_LO ? x : WINDOW_EXP_LO; /* NaN -> the bound: no out-of-range int conversion */
    const float n = WINDOW_EXP_ROUND(xc, __builtin_fmaf, WINDOW_SCALAR);
    const float r = WINDOW_EXP_REDUCE(xc, n, __builtin_fmaf, WINDOW_SCALAR);
    float p = 1.0f / 5040.0f;
    WINDOW_EXP_POLY(p, r, __builtin_fmaf, WINDOW_SCALAR);
    const int32_t bits = ((int32_t)n + 127) * (1 << 23);
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    const float e = p * two_n;
    return x > WINDOW_EXP_LO ? e : (x == x ? 0.0f : x);
}

/* bfloat16 and float16 bit patterns to float32 (the values of based_bf16_to_f32 and
 * based_f16_to_f32), inline and branch-free so that row loads vectorise. */
static inline float window_bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float window_f16_to_f32(uint16_t h) {
    const uint32_t em = h & 0x7fffu, sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t normal = (em << 13) + 0x38000000u;  /* exponent bias 15 -> 127 */
    const uint32_t inf_nan = (em << 13) | 0x7f800000u; /* payload kept */
    const float sub = (float)(int32_t)em * 5.9604644775390625e-8f; /* subnormal: mantissa * 2^-24, exact */
    uint32_t sub_bits;
    memcpy(&sub_bits, &sub, sizeof sub_bits);
    const uint32_t u = sign | (em >= 0x7c00u ? inf_nan : em >= 0x0400u ? normal : sub_bits);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Per-thread scratch of the prefill (see window_prefill_item), in the compute type. */
typedef struct {
    int64_t kcp; /* keys of kt and rows of vv: the widest block of an item, plus partial vectors */
    int64_t dp;  /* DP_OF(D) */
    void *kt;    /* [kcp/LANES][D][LANES] keys u = pos - cbase of the current block, transposed */
    void *vv;    /* [kcp][dp]  values of the current block, rows zero-padded */
    void *qs;    /* [rows][D]  queries of the item, times scale */
    void *acc;   /* [rows][dp] unnormalised outputs */
    void *m;     /* [rows]     running max of the scores */
    void *l;     /* [rows]     running sum of the weights */
    void *s;     /* [4][SROW]  scores of a tile, then their weights */
    void *tile;  /* [LANES][D] key rows on their way into kt */
} window_scratch;

/* The instantiations. x86-64 with GCC: AVX-512 and AVX2 (+FMA) ones besides the baseline
 * (SSE2) one, picked at run time (window_kernels_pick). Every one does the same IEEE
 * operations in the same order, so they give the same bits: the two with vector FMA
 * instructions fuse in vectors (VFMA), the baseline lane by lane through the C library's
 * fmaf/fma (exact on any CPU: the FMA instruction where there is one, else in software). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WINDOW_HAVE_X86 1
#include <immintrin.h>
#else
#define WINDOW_HAVE_X86 0
#endif

#define REAL float
#define IREAL int32_t
#define NATIVE BASED_DTYPE_FLOAT32
#define HALF_LOADS 1
#define VEC_EXP 1
#define EXP window_exp_f32
#define LOAD based_load_f32
#define SCATTER based_scatter_f32
#define SFMA __builtin_fmaf
#if WINDOW_HAVE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define VL 16
#define NV4 5
#define NV1 8
#define DV4 4
#define DV1 8
#define VFMA(a, b, c) ((VEC)_mm512_fmadd_ps((__m512)(a), (__m512)(b), (__m512)(c)))
#define FN(name) CAT(name, _f32_avx512)
#include "sliding_window_kernel.h"
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define VL 8
#define NV4 3
#define NV1 6
#define DV4 3
#define DV1 6
#define VFMA(a, b, c) ((VEC)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
#define FN(name) CAT(name, _f32_avx2)
#include "sliding_window_kernel.h"
#pragma GCC pop_options
#endif
#define VL 4
#define NV4 3
#define NV1 6
#define DV4 3
#define DV1 6
#define FN(name) CAT(name, _f32_generic)
#include "sliding_window_kernel.h"
#undef REAL
#undef IREAL
#undef NATIVE
#undef HALF_LOADS
#undef VEC_EXP
#undef EXP
#undef LOAD
#undef SCATTER
#undef SFMA

#define REAL double
#define IREAL int64_t
#define NATIVE BASED_DTYPE_FLOAT64
#define HALF_LOADS 0
#define VEC_EXP 0
#define EXP exp
#define LOAD based_load_f64
#define SCATTER based_scatter_f64
#define SFMA __builtin_fma
#if WINDOW_HAVE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define VL 8
#define NV4 4
#define NV1 8
#define DV4 4
#define DV1 8
#define VFMA(a, b, c) ((VEC)_mm512_fmadd_pd((__m512d)(a), (__m512d)(b), (__m512d)(c)))
#define FN(name) CAT(name, _f64_avx512)
#include "sliding_window_kernel.h"
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define VL 4
#define NV4 3
#define NV1 6
#define DV4 3
#define DV1 6
#define VFMA(a, b, c) ((VEC)_mm256_fmadd_pd((__m256d)(a), (__m256d)(b), (__m256d)(c)))
#define FN(name) CAT(name, _f64_avx2)
#include "sliding_window_kernel.h"
#pragma GCC pop_options
#endif
#define VL 2
#define NV4 3
#define NV1 6
#define DV4 3
#define DV1 6
#define FN(name) CAT(name, _f64_generic)
#include "sliding_window_kernel.h"
#undef REAL
#undef IREAL
#undef NATIVE
#undef HALF_LOADS
#undef VEC_EXP
#undef EXP
#undef LOAD
#undef SCATTER
#undef SFMA

typedef void (*window_prefill_fn)(const based_sliding_window_args *, const window_scratch *, int64_t, int64_t, int64_t,
                                  int64_t);
typedef void (*window_decode_fn)(const based_sliding_window_args *, int64_t, int64_t);

typedef struct {
    const char *name;
    window_prefill_fn prefill_f32, prefill_f64;
    window_decode_fn decode_f32, decode_f64;
} window_kernels;

#define WINDOW_KERNELS(isa)                                                                                \
    {#isa, window_prefill_item_f32_##isa, window_prefill_item_f64_##isa, window_decode_item_f32_##isa,    \
     window_decode_item_f64_##isa}
static const window_kernels window_generic = WINDOW_KERNELS(generic);
#if WINDOW_HAVE_X86
static const window_kernels window_avx2 = WINDOW_KERNELS(avx2);
static const window_kernels window_avx512 = WINDOW_KERNELS(avx512);
#endif

/* The kernels for this CPU: AVX-512 where the CPU has it, else AVX2, else the baseline
 * (each of the first two also needs FMA, which every such CPU has). BASED_CPU_ISA=generic
 * (or avx2) in the environment caps the choice (read once). */
static const window_kernels *window_kernels_pick_uncached(void) {
    const based_isa_cap cap = based_cpu_isa_cap();
    if (cap == BASED_ISA_CAP_GENERIC) return &window_generic;
#if WINDOW_HAVE_X86
    __builtin_cpu_init();
    const int fma = __builtin_cpu_supports("fma");
    if (cap != BASED_ISA_CAP_AVX2 && fma && __builtin_cpu_supports("avx512f")) return &window_avx512;
    if (fma && __builtin_cpu_supports("avx2")) return &window_avx2;
#endif
    return &window_generic;
}

static const window_kernels *window_kernels_pick(void) {
    static _Atomic(const window_kernels *) chosen = NULL;
    const window_kernels *k = atomic_load_explicit(&chosen, memory_order_acquire);
    if (k == NULL) {
        k = window_kernels_pick_uncached();
        atomic_store_explicit(&chosen, k, memory_order_release);
    }
    return k;
}

const char *based_window_kernel_isa(void) { return window_kernels_pick()->name; }

/* Multiply-adds of a prefill call (scores and weighted values, 2 D per query and key it
 * attends): query position p sees min(p + 1, W) keys. In double, so that no size overflows;
 * saturated at 2^62 (only a thread count depends on it). */
static int64_t window_prefill_macs(const based_sliding_window_args *c) {
    const double w = (double)c->window, t = (double)c->seqlen;
    double keys = 0;
    for (int64_t b = 0; b < c->batch; b++) {
        const double a = (double)based_tokens_at(&c->tokens, b), e = a + t; /* positions a .. e-1 */
        /* positions p < W - 1 see p + 1 keys (a triangle), the others W */
        const double tri_end = e < w - 1 ? e : (a > w - 1 ? a : w - 1);
        keys += ((a + 1) + tri_end) * (tri_end - a) / 2 + (e - tri_end) * w;
    }
    const double macs = keys * (double)c->heads * (double)c->head_dim * 2;
    return macs < 0x1p62 ? (int64_t)macs : (int64_t)1 << 62;
}

/* All outputs of a checked prefill call (the cache is read, not written). */
static based_status window_forward(const based_sliding_window_args *c) {
    const window_kernels *kern = window_kernels_pick();
    const int f64 = c->q.dtype == BASED_DTYPE_FLOAT64;
    const size_t elem = f64 ? sizeof(double) : sizeof(float);
    const window_prefill_fn item_fn = f64 ? kern->prefill_f64 : kern->prefill_f32;
    const int64_t d = c->head_dim, dp = DP_OF(d), g_count = c->heads / c->kv_heads, w = c->window;
    /* keep one item's outputs near 128 KiB (in L2) */
    int64_t qb = (int64_t)(131072 / elem) / (g_count * dp);
    qb = qb < 1 ? 1 : qb > QB_MAX ? QB_MAX : qb;
    qb = qb < c->seqlen ? qb : c->seqlen;
    /* an item's keys: qb + W - 1 positions at most, KB per block at most, plus the
     * partial vectors before and after a block */
    const int64_t span = qb - 1 < KB - w ? qb + w - 1 : KB;
    const int64_t kcp = (span + 2 * LANES - 1) / LANES * LANES;
    const int64_t rows = qb * g_count;
    const int64_t n_qblocks = (c->seqlen + qb - 1) / qb, items = c->batch * c->kv_heads * n_qblocks;
    const int nthreads = based_threads_for(items, window_prefill_macs(c), BASED_MIN_MACS_PER_THREAD);

    /* per-thread layout, each array on its own cache lines */
    const size_t sizes[8] = {(size_t)(d * kcp), (size_t)(kcp * dp), (size_t)(rows * d), (size_t)(rows * dp),
                             (size_t)rows,      (size_t)rows,       (size_t)(4 * SROW), (size_t)(LANES * d)};
    size_t offsets[8], per_thread = 0;
    for (int i = 0; i < 8; i++) {
        offsets[i] = per_thread;
        per_thread += (sizes[i] * elem + 63) / 64 * 64;
    }
    if (per_thread > SIZE_MAX / (size_t)nthreads)
        return based_fail(BASED_STATUS_OUT_OF_MEMORY, "sliding_window: scratch size overflows");
    char *scratch = based_scratch_alloc(per_thread * (size_t)nthreads);
    if (scratch == NULL)
        return based_fail(BASED_STATUS_OUT_OF_MEMORY, "sliding_window: out of memory for %zu bytes of scratch",
                          per_thread * (size_t)nthreads);
    /* zero once: padding lanes and rows are read (and their results dropped) but never written */
    memset(scratch, 0, per_thread * (size_t)nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (nthreads > 1)
    for (int64_t it = 0; it < items; it++) {
        char *base = scratch + per_thread * (size_t)based_thread_num();
        const window_scratch sc = {kcp,
                                   dp,
                                   base + offsets[0],
                                   base + offsets[1],
                                   base + offsets[2],
                                   base + offsets[3],
                                   base + offsets[4],
                                   base + offsets[5],
                                   base + offsets[6],
                                   base + offsets[7]};
        const int64_t qi = it % n_qblocks, bh = it / n_qblocks;
        const int64_t t_a = qi * qb, t_b = t_a + qb < c->seqlen ? t_a + qb : c->seqlen;
        item_fn(c, &sc, bh / c->kv_heads, bh % c->kv_heads, t_a, t_b);
    }
    based_scratch_free(scratch);
    return BASED_STATUS_OK;
}

/* A decode step reads the ring in place when its key cache is slot-contiguous (the
 * layout SlidingWindowCache allocates) and its value rows unit-stride; other layouts go
 * through the prefill kernel (T = 1), which converts the window into scratch. */
static int window_decode_in_place(const based_sliding_window_args *c) {
    return c->k_cache.strides[2] == 1 && (c->v_cache.strides[3] == 1 || c->head_dim == 1);
}

/* A decode step read in place: each (b, kv head) stores its new key and value and
 * attends; tokens grow by one. Static schedule: each thread streams a contiguous run of
 * the cache. */
static void window_decode(const based_sliding_window_args *c) {
    const window_kernels *kern = window_kernels_pick();
    const window_decode_fn item_fn = c->q.dtype == BASED_DTYPE_FLOAT64 ? kern->decode_f64 : kern->decode_f32;
    const int64_t pairs = c->batch * c->kv_heads;
    const int64_t bytes = pairs * c->window * c->head_dim * c->k.itemsize * 2;
    const int nthreads = based_threads_for(pairs, bytes, BASED_MIN_BYTES_PER_THREAD);
    if (nthreads == 1) {
        for (int64_t bh = 0; bh < pairs; bh++) item_fn(c, bh / c->kv_heads, bh % c->kv_heads);
    } else {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t bh = 0; bh < pairs; bh++) item_fn(c, bh / c->kv_heads, bh % c->kv_heads);
    }
    based_tokens_add(&c->tokens, c->batch, 1);
}

/* n elements of one dtype from src to dst (element strides), bit for bit. */
static void copy_row(char *dst, int64_t dst_stride, const char *src, int64_t src_stride, int64_t n, int itemsize) {
    if (dst_stride == 1 && src_stride == 1) {
        memcpy(dst, src, (size_t)(n * itemsize));
        return;
    }
    for (int64_t i = 0; i < n; i++)
        memcpy(dst + i * dst_stride * itemsize, src + i * src_stride * itemsize, (size_t)itemsize);
}

/* Stores the keys and values of the last min(T, W) positions of the call in their
 * ring slots (position p -> slot p % W), then advances tokens by T. */
static void window_update_cache(const based_sliding_window_args *c) {
    const int64_t T = c->seqlen, W = c->window, D = c->head_dim;
    const int64_t first = T > W ? T - W : 0, pairs = c->batch * c->kv_heads;
    const int64_t bytes = pairs * (T - first) * D * (c->k.itemsize + c->v.itemsize);
    const int nthreads = based_threads_for(pairs, bytes, BASED_MIN_BYTES_PER_THREAD);
    (void)nthreads; /* only the pragma reads it: unused without OpenMP */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bh = 0; bh < pairs; bh++) {
        const int64_t b = bh / c->kv_heads, kh = bh % c->kv_heads, t0 = based_tokens_at(&c->tokens, b);
        for (int64_t t = first; t < T; t++) {
            const int64_t slot = (t0 + t) % W;
            copy_row(based_window_row(&c->k_cache, b, kh, slot), c->k_cache.strides[3],
                     based_window_row(&c->k, b, t, kh), c->k.strides[3], D, c->k.itemsize);
            copy_row(based_window_row(&c->v_cache, b, kh, slot), c->v_cache.strides[3],
                     based_window_row(&c->v, b, t, kh), c->v.strides[3], D, c->v.itemsize);
        }
    }
    based_tokens_add(&c->tokens, c->batch, T);
}

static based_status window_run(const based_sliding_window_args *c) {
    if (c->batch == 0 || c->seqlen == 0) return BASED_STATUS_OK;
    if (c->phase == BASED_PHASE_DECODE && window_decode_in_place(c)) {
        window_decode(c);
        return BASED_STATUS_OK;
    }
    if (c->heads > 0) BASED_TRY(window_forward(c));
    window_update_cache(c);
    return BASED_STATUS_OK;
}

based_status based_cpu_sliding_window_prefill(const based_sliding_window_args *args) { return window_run(args); }

based_status based_cpu_sliding_window_decode(const based_sliding_window_args *args) { return window_run(args); }
