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
        if (n > INT64_MAX - T)
            return based_fail(BASED_STATUS_VALUE_ERROR,
                              "%s: tokens[%lld] = %lld; adding %lld more would overflow int64", op, (long long)b,
                              (long long)n, (long long)T);
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

#define LANES 16            /* keys (scores) or output dims accumulated in registers at once */
#define KB 64               /* key block of the online softmax (absolute positions, aligned) */
#define KC 256              /* key chunk converted into scratch at once; a multiple of KB */
#define KCP (KC + LANES)    /* transposed key rows, padded so a LANES-wide read never leaves them */
#define QB_MAX 64           /* query positions per work item */
#define DP_OF(d) (((d) + LANES - 1) / LANES * LANES)

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

#define REAL float
#define EXP expf
#define GATHER based_gather_f32
#define SCATTER based_scatter_f32
#define FN(name) CAT(name, _f32)
#include "sliding_window_kernel.h"
#undef REAL
#undef EXP
#undef GATHER
#undef SCATTER
#undef FN

#define REAL double
#define EXP exp
#define GATHER based_gather_f64
#define SCATTER based_scatter_f64
#define FN(name) CAT(name, _f64)
#include "sliding_window_kernel.h"
#undef REAL
#undef EXP
#undef GATHER
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
