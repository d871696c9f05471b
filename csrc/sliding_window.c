/*
 * sliding_window.c -- sliding-window softmax attention on the CPU (SPEC 1.2; paper Sec. 4):
 * the checks shared with the reference twins, the fast prefill and decode kernels, and
 * the ring-cache update.
 *
 *   o_p = softmax_u(scale * q_p . k_u) @ v_u   over key positions u in (p - W, p]
 *
 * Prefill attends across the call boundary into the cached keys, then stores the last
 * min(T, W) keys and values of the call in their ring slots. Decode is prefill with
 * T = 1: the slot the new key replaces held position p - W, which is already outside
 * the window of p, so attending before writing gives the same result as writing first.
 * Work is O(T * W * D) per head, never O(T^2); the softmax is computed in float32
 * (float64 for float64 inputs) with the running max subtracted (online softmax).
 */
#include <stdio.h>
#include <stdlib.h>

#include "sliding_window.h"

/* ---------------------------------------------------------------------------------
 * Checks (shared with sliding_window_ref.c)
 * --------------------------------------------------------------------------------- */

/* A decode tensor (B, H, D) seen as (B, 1, H, D). */
static void insert_time_axis(based_view *x) {
    x->shape[3] = x->shape[2];
    x->strides[3] = x->strides[2];
    x->shape[2] = x->shape[1];
    x->strides[2] = x->strides[1];
    x->shape[1] = 1;
    x->strides[1] = 0;
    x->ndim = 4;
}

based_status based_window_check(based_window_call *c, const DLTensor *q_, const DLTensor *k_, const DLTensor *v_,
                                const DLTensor *k_cache_, const DLTensor *v_cache_, const DLTensor *tokens_,
                                const DLTensor *out_, const based_sliding_window_params *params, int decode,
                                const char *op) {
    memset(c, 0, sizeof *c);
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
    BASED_TRY(based_check_same_device(all, 7));
    BASED_TRY(based_check_host(&c->q, op));

    /* everything written: out, the cache, tokens */
    BASED_TRY(based_check_no_self_overlap(&c->out));
    BASED_TRY(based_check_no_self_overlap(&c->k_cache));
    BASED_TRY(based_check_no_self_overlap(&c->v_cache));
    BASED_TRY(based_check_no_self_overlap(&c->tokens));
    const based_view *written[] = {&c->out, &c->k_cache, &c->v_cache, &c->tokens};
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 7; j++)
            if (all[j] != written[i]) BASED_TRY(based_check_disjoint(written[i], all[j]));

    for (int64_t b = 0; b < B; b++) {
        const int64_t n = ((const int64_t *)c->tokens.data)[b * c->tokens.strides[0]];
        if (n < 0)
            return based_fail(BASED_STATUS_VALUE_ERROR, "%s: tokens[%lld] must be >= 0, got %lld", op, (long long)b,
                              (long long)n);
        if (n > BASED_WINDOW_MAX_POSITION - T) /* headroom for the kernels' position arithmetic */
            return based_fail(BASED_STATUS_VALUE_ERROR,
                              "%s: tokens[%lld] = %lld; positions must stay below 2^62, and adding T=%lld "
                              "would pass that",
                              op, (long long)b, (long long)n, (long long)T);
    }

    if (decode) {
        insert_time_axis(&c->q);
        insert_time_axis(&c->k);
        insert_time_axis(&c->v);
        insert_time_axis(&c->out);
    }
    c->batch = B;
    c->seqlen = T;
    c->heads = H;
    c->kv_heads = Hkv;
    c->head_dim = D;
    c->window = W;
    c->scale = params->scale;
    return BASED_STATUS_OK;
}

/* ---------------------------------------------------------------------------------
 * Kernels: the template in sliding_window_kernel.h, for float and for double
 * --------------------------------------------------------------------------------- */

#define LANES 16  /* keys (scores) or output dims accumulated in registers at once (or 4 * LANES) */
#define KB 64     /* key block of the online softmax; a multiple of 4 * LANES */
#define KC 256    /* block starts per key chunk converted into scratch at once */
#define QB_MAX 64 /* query positions per work item */
#define DP_OF(d) (((d) + LANES - 1) / LANES * LANES)

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

/* The work-item function is compiled for AVX-512, AVX2 and baseline x86-64, and the
 * loader picks the best the CPU has (GNU ifunc), so a portable build runs wide vectors.
 * Every lane does the same IEEE operations in the same order (no FMA contraction in
 * ISO C mode), so all three give bit-identical results. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(BASED_NO_TARGET_CLONES)
#define BASED_WINDOW_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BASED_WINDOW_CLONES
#endif
/* Prefetch the cache lines of a row of `bytes` bytes (rows with unit stride in the last
 * dim; for other strides it fetches the first lines, which is harmless). */
#if defined(__GNUC__)
#define BASED_WINDOW_PREFETCH(ptr, bytes)                                                          \
    do {                                                                                           \
        const char *pf_ = (const char *)(ptr);                                                     \
        for (int64_t o_ = 0; o_ < (bytes); o_ += 64) __builtin_prefetch(pf_ + o_, 0, 3);           \
    } while (0)
#else
#define BASED_WINDOW_PREFETCH(ptr, bytes) ((void)(ptr))
#endif
/* helpers of the work item: inlined, so each clone compiles them for its own ISA */
#if defined(__GNUC__)
#define BASED_WINDOW_INLINE static inline __attribute__((always_inline))
#else
#define BASED_WINDOW_INLINE static inline
#endif

/* exp(x) for x <= 0 or NaN in float32, in a form the compiler vectorises (libm's expf is
 * a scalar call): x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), exp(r) by
 * its Taylor polynomial to r^7 (truncation < 0.05 ulp), 2^n built from exponent bits.
 * Measured max error 0.86 ulp over [-87.3, 0]; exp(0) == 1 exactly; results below
 * FLT_MIN (x < ln FLT_MIN) flush to 0; -inf gives 0, NaN gives NaN. */
static inline float window_exp_f32(float x) {
    const float xc = x > -87.33654f ? x : -87.33654f; /* NaN -> the bound: no out-of-range int conversion */
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2), 1.5 * 2^23 */
    const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) * (1 << 23);
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    const float e = p * two_n;
    return x > -87.33654f ? e : (x == x ? 0.0f : x);
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

#define REAL float
#define NATIVE BASED_DTYPE_FLOAT32
#define EXP window_exp_f32
#define LOAD based_load_f32
#define SCATTER based_scatter_f32
#define FN(name) CAT(name, _f32)
#include "sliding_window_kernel.h"
#undef REAL
#undef NATIVE
#undef EXP
#undef LOAD
#undef SCATTER
#undef FN

#define REAL double
#define NATIVE BASED_DTYPE_FLOAT64
#define EXP exp
#define LOAD based_load_f64
#define SCATTER based_scatter_f64
#define FN(name) CAT(name, _f64)
#include "sliding_window_kernel.h"
#undef REAL
#undef NATIVE
#undef EXP
#undef LOAD
#undef SCATTER
#undef FN

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
static void window_update_cache(const based_window_call *c) {
    const int64_t T = c->seqlen, W = c->window, D = c->head_dim;
    const int64_t first = T > W ? T - W : 0, pairs = c->batch * c->kv_heads;
    const int nthreads = based_threads_for(pairs * (T - first) * D / 4096);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bh = 0; bh < pairs; bh++) {
        const int64_t b = bh / c->kv_heads, kh = bh % c->kv_heads, t0 = based_window_tokens(c, b);
        for (int64_t t = first; t < T; t++) {
            const int64_t slot = (t0 + t) % W;
            copy_row(based_window_row(&c->k_cache, b, kh, slot), c->k_cache.strides[3],
                     based_window_row(&c->k, b, t, kh), c->k.strides[3], D, c->k.itemsize);
            copy_row(based_window_row(&c->v_cache, b, kh, slot), c->v_cache.strides[3],
                     based_window_row(&c->v, b, t, kh), c->v.strides[3], D, c->v.itemsize);
        }
    }
    for (int64_t b = 0; b < c->batch; b++) ((int64_t *)c->tokens.data)[b * c->tokens.strides[0]] += T;
}

static based_status window_run(const based_window_call *c) {
    if (c->batch == 0 || c->seqlen == 0) return BASED_STATUS_OK;
    if (c->heads > 0) {
        if (c->q.dtype == BASED_DTYPE_FLOAT64) BASED_TRY(window_forward_f64(c));
        else BASED_TRY(window_forward_f32(c));
    }
    window_update_cache(c);
    return BASED_STATUS_OK;
}

based_status based_sliding_window_prefill(const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                          DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
                                          const based_sliding_window_params *params) {
    based_window_call c;
    BASED_TRY(based_window_check(&c, q, k, v, k_cache, v_cache, tokens, out, params, 0, "sliding_window_prefill"));
    return window_run(&c);
}

based_status based_sliding_window_decode(const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                         DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
                                         const based_sliding_window_params *params) {
    based_window_call c;
    BASED_TRY(based_window_check(&c, q, k, v, k_cache, v_cache, tokens, out, params, 1, "sliding_window_decode"));
    return window_run(&c);
}
