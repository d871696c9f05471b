/*
 * linear_attention_ref.c -- plain-loop reference twins of the linear-attention kernels:
 * the recurrent form of SPEC 1.1 written out token by token, in float64, one thread,
 * no chunks, no tricks. Same contract and same check as the fast kernels; the tests
 * hold the fast kernels to these and both to the NumPy reference.
 *
 * For each (b, h), with S = kv (F x Dv) and z = ksum (F) read once into float64:
 *   for t in 0..T-1:
 *     S += phi(k_t) v_t^T;  z += phi(k_t)
 *     num = phi(q_t)^T S;   den = phi(q_t) . z
 *     o_t = num / (den + eps)   (or num)
 * and S, z are written back once, rounded to the state's dtype.
 */
#include <stdlib.h>

#include "linear_attention.h"

/* phi(x) of SPEC 1.1 in the compact order: [1, sqrt(scale) x_i, then for i <= j:
 * scale/sqrt(2) x_i^2 (i == j) or scale x_i x_j (i < j)]. */
static void phi_ref(const double *x, int64_t dk, double scale, double *phi) {
    int64_t f = 0;
    phi[f++] = 1.0;
    for (int64_t i = 0; i < dk; i++) phi[f++] = sqrt(scale) * x[i];
    for (int64_t i = 0; i < dk; i++)
        for (int64_t j = i; j < dk; j++) phi[f++] = (i == j ? scale / sqrt(2.0) : scale) * x[i] * x[j];
}

static based_status linear_attention_ref(const based_linear_attention_args *a) {
    const int64_t F = a->feature_count, dk = a->feature_dim, dv = a->value_dim, T = a->seqlen;
    double *S = malloc((size_t)(F * dv) * sizeof(double));
    double *z = malloc((size_t)F * sizeof(double));
    double *pq = malloc((size_t)F * sizeof(double));
    double *pk = malloc((size_t)F * sizeof(double));
    double *x = malloc((size_t)(dk > dv ? dk : dv) * sizeof(double));
    if (!S || !z || !pq || !pk || !x) {
        free(S), free(z), free(pq), free(pk), free(x);
        return based_fail(BASED_STATUS_OUT_OF_MEMORY, "linear attention reference: out of memory");
    }
    const based_tensor *kv = &a->kv, *ks = &a->ksum;
    for (int64_t b = 0; b < a->batch; b++) {
        for (int64_t h = 0; h < a->heads; h++) {
            const int64_t kv0 = b * kv->strides[0] + h * kv->strides[1];
            const int64_t ks0 = b * ks->strides[0] + h * ks->strides[1];
            for (int64_t f = 0; f < F; f++) {
                for (int64_t j = 0; j < dv; j++)
                    S[f * dv + j] = based_load_f64(kv->data, kv->dtype, kv0 + f * kv->strides[2] + j * kv->strides[3]);
                z[f] = based_load_f64(ks->data, ks->dtype, ks0 + f * ks->strides[2]);
            }
            for (int64_t t = 0; t < T; t++) {
                const int64_t qo = BASED_AT3(a->q, b, t, h), ko = BASED_AT3(a->k, b, t, h);
                const int64_t vo = BASED_AT3(a->v, b, t, h), oo = BASED_AT3(a->out, b, t, h);
                for (int64_t i = 0; i < dk; i++) x[i] = based_load_f64(a->q.data, a->q.dtype, qo + i * a->q.strides[3]);
                phi_ref(x, dk, a->scale, pq);
                for (int64_t i = 0; i < dk; i++) x[i] = based_load_f64(a->k.data, a->k.dtype, ko + i * a->k.strides[3]);
                phi_ref(x, dk, a->scale, pk);
                for (int64_t j = 0; j < dv; j++) x[j] = based_load_f64(a->v.data, a->v.dtype, vo + j * a->v.strides[3]);

                for (int64_t f = 0; f < F; f++) {
                    for (int64_t j = 0; j < dv; j++) S[f * dv + j] += pk[f] * x[j];
                    z[f] += pk[f];
                }
                double den = 0.0;
                for (int64_t f = 0; f < F; f++) den += pq[f] * z[f];
                for (int64_t j = 0; j < dv; j++) {
                    double num = 0.0;
                    for (int64_t f = 0; f < F; f++) num += pq[f] * S[f * dv + j];
                    const double o = a->normalize ? num / (den + a->eps) : num;
                    based_store_f64(a->out.data, a->out.dtype, oo + j * a->out.strides[3], o);
                }
            }
            for (int64_t f = 0; f < F; f++) {
                for (int64_t j = 0; j < dv; j++)
                    based_store_f64(kv->data, kv->dtype, kv0 + f * kv->strides[2] + j * kv->strides[3], S[f * dv + j]);
                based_store_f64(ks->data, ks->dtype, ks0 + f * ks->strides[2], z[f]);
            }
        }
    }
    free(S), free(z), free(pq), free(pk), free(x);
    based_tokens_add(&a->tokens, a->batch, T);
    return BASED_STATUS_OK;
}

based_status based_cpu_linear_attention_prefill_ref(const based_linear_attention_args *args) {
    if (args->batch == 0 || args->seqlen == 0) return BASED_STATUS_OK;
    return linear_attention_ref(args);
}

based_status based_cpu_linear_attention_decode_ref(const based_linear_attention_args *args) {
    if (args->batch == 0) return BASED_STATUS_OK;
    return linear_attention_ref(args);
}
