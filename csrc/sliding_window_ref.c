/*
 * sliding_window_ref.c -- plain-loop reference twins of the sliding-window kernels
 * (SPEC 1.2): the same contract and the same check (based_sliding_window_check), with the
 * arithmetic written straight from the definition, in float64 for every dtype:
 *
 *   s_u = scale * (q_p . k_u)              for u in (p - W, p], u >= 0
 *   o_p = sum_u exp(s_u - max s) v_u / sum_u exp(s_u - max s)
 *
 * Prefill computes every output from the cache (positions before the call) and the
 * call's inputs, then writes every key of the call into its ring slot in order, so a
 * later position overwrites an earlier one in the same slot. Decode does what its
 * description says, in that order: write the new key and value into slot
 * tokens % W, count the token, then attend over the valid slots.
 */
#include "sliding_window.h"

/* Key or value of absolute position pos of sequence b, kv head kh, when positions
 * t0.. come from the call's input x and earlier ones from the ring cache. */
static const char *kv_row(const based_tensor *x, const based_tensor *cache, int64_t b, int64_t kh, int64_t t0,
                          int64_t pos, int64_t window, int64_t *stride) {
    if (pos < t0) {
        *stride = cache->strides[3];
        return based_window_row(cache, b, kh, pos % window);
    }
    *stride = x->strides[3];
    return based_window_row(x, b, pos - t0, kh);
}

static double dot(const char *a, int64_t as, const char *b, int64_t bs, based_dtype dt, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += based_load_f64(a, dt, i * as) * based_load_f64(b, dt, i * bs);
    return s;
}

/* out[b, t, h] for a query at absolute position p whose keys are positions
 * max(0, p - W + 1) .. p, read through kv_row with the given t0. */
static void attend(const based_sliding_window_args *c, const based_tensor *keys, const based_tensor *values, int64_t b,
                   int64_t t, int64_t h, int64_t t0, int64_t p) {
    const int64_t D = c->head_dim, W = c->window, kh = h / (c->heads / c->kv_heads);
    const int64_t first = p - W + 1 > 0 ? p - W + 1 : 0;
    const char *q = based_window_row(&c->q, b, t, h);
    int64_t ks, vs;
    double m = -INFINITY;
    for (int64_t u = first; u <= p; u++) {
        const char *k = kv_row(keys, &c->k_cache, b, kh, t0, u, W, &ks);
        const double s = c->scale * dot(q, c->q.strides[3], k, ks, c->q.dtype, D);
        if (s > m) m = s;
    }
    double acc[BASED_WINDOW_MAX_HEAD_DIM] = {0}, sum = 0;
    for (int64_t u = first; u <= p; u++) {
        const char *k = kv_row(keys, &c->k_cache, b, kh, t0, u, W, &ks);
        const char *v = kv_row(values, &c->v_cache, b, kh, t0, u, W, &vs);
        const double e = exp(c->scale * dot(q, c->q.strides[3], k, ks, c->q.dtype, D) - m);
        sum += e;
        for (int64_t i = 0; i < D; i++) acc[i] += e * based_load_f64(v, c->v.dtype, i * vs);
    }
    char *o = based_window_row(&c->out, b, t, h);
    for (int64_t i = 0; i < D; i++) based_store_f64(o, c->out.dtype, i * c->out.strides[3], acc[i] / sum);
}

static void store_row(const based_tensor *cache, int64_t b, int64_t kh, int64_t slot, const based_tensor *x, int64_t t,
                      int64_t head_dim) {
    char *dst = based_window_row(cache, b, kh, slot);
    const char *src = based_window_row(x, b, t, kh);
    for (int64_t i = 0; i < head_dim; i++)
        memcpy(dst + i * cache->strides[3] * cache->itemsize, src + i * x->strides[3] * x->itemsize,
               (size_t)x->itemsize);
}

based_status based_cpu_sliding_window_prefill_ref(const based_sliding_window_args *c) {
    for (int64_t b = 0; b < c->batch; b++) {
        const int64_t t0 = based_tokens_at(&c->tokens, b);
        for (int64_t t = 0; t < c->seqlen; t++)
            for (int64_t h = 0; h < c->heads; h++) attend(c, &c->k, &c->v, b, t, h, t0, t0 + t);
    }
    for (int64_t b = 0; b < c->batch; b++) {
        int64_t *n = (int64_t *)c->tokens.data + b * c->tokens.strides[0];
        for (int64_t t = 0; t < c->seqlen; t++)
            for (int64_t kh = 0; kh < c->kv_heads; kh++) {
                store_row(&c->k_cache, b, kh, (*n + t) % c->window, &c->k, t, c->head_dim);
                store_row(&c->v_cache, b, kh, (*n + t) % c->window, &c->v, t, c->head_dim);
            }
        *n += c->seqlen;
    }
    return BASED_STATUS_OK;
}

based_status based_cpu_sliding_window_decode_ref(const based_sliding_window_args *c) {
    for (int64_t b = 0; b < c->batch; b++) {
        int64_t *n = (int64_t *)c->tokens.data + b * c->tokens.strides[0];
        for (int64_t kh = 0; kh < c->kv_heads; kh++) {
            store_row(&c->k_cache, b, kh, *n % c->window, &c->k, 0, c->head_dim);
            store_row(&c->v_cache, b, kh, *n % c->window, &c->v, 0, c->head_dim);
        }
        *n += 1;
        /* every key now lives in the cache: t0 = tokens makes kv_row read only slots */
        for (int64_t h = 0; h < c->heads; h++) attend(c, &c->k, &c->v, b, 0, h, *n, *n - 1);
    }
    return BASED_STATUS_OK;
}
