/*
 * linear_state.c -- the linear-attention state in the paper code's expanded layout
 * (SPEC 1.1): F273 = 1 + Dk + Dk^2 rows [1, sqrt(scale) x, scale/sqrt(2) vec(x x^T)]
 * against our compact F = 1 + Dk + Dk(Dk+1)/2 rows (upper triangle, row-major).
 *
 * Rows 0..Dk are the same in both. Second-order rows: compact (i, i) holds
 * scale/sqrt(2) sum x_i^2 v, as does expanded (i, i); compact (i, j), i < j, holds
 * scale sum x_i x_j v, and expanded (i, j) = (j, i) = that / sqrt(2). Neither direction
 * needs the scale. from_expanded symmetrises: compact (i, j) = (exp(i, j) + exp(j, i)) / sqrt(2).
 */
#include <stdio.h>

#include "linear_internal.h"

/* Dk with 1 + Dk + Dk(Dk+1)/2 == F (compact) or 1 + Dk + Dk^2 == F (expanded), else -1. */
static int64_t dk_from_rows(int64_t F, int expanded) {
    for (int64_t d = 1;; d++) {
        int64_t rows = expanded ? 1 + d + d * d : based_taylor_feature_dim(d);
        if (rows == F) return d;
        if (rows > F || rows < 0) return -1;
    }
}

static int64_t compact_row(int64_t dk, int64_t i, int64_t j) { /* i <= j */
    return 1 + dk + i * dk - i * (i - 1) / 2 + (j - i);
}

static int64_t expanded_row(int64_t dk, int64_t i, int64_t j) { return 1 + dk + i * dk + j; }

typedef struct {
    based_view kv, ksum, kv_exp, ksum_exp;
    int64_t B, H, Dk, Dv, F, F273;
} state_pair;

/* Checks both layouts; `from` names the side whose row count fixes Dk. */
static based_status check_pair(state_pair *s, const DLTensor *kv, const DLTensor *ksum, const DLTensor *kv_exp,
                               const DLTensor *ksum_exp, int from_expanded, const char *op) {
    BASED_TRY(based_view_init(&s->kv, kv, "kv"));
    BASED_TRY(based_view_init(&s->ksum, ksum, "ksum"));
    BASED_TRY(based_view_init(&s->kv_exp, kv_exp, "kv_expanded"));
    BASED_TRY(based_view_init(&s->ksum_exp, ksum_exp, "ksum_expanded"));
    BASED_TRY(based_check_dtype(&s->kv, BASED_DTYPES_FLOAT));
    BASED_TRY(based_check_same_dtype(&s->ksum, &s->kv));
    BASED_TRY(based_check_dtype(&s->kv_exp, BASED_DTYPES_FLOAT));
    BASED_TRY(based_check_same_dtype(&s->ksum_exp, &s->kv_exp));

    const int64_t any[4] = {-1, -1, -1, -1};
    const based_view *src = from_expanded ? &s->kv_exp : &s->kv;
    BASED_TRY(based_check_shape(src, 4, any, from_expanded ? "B,H,F273,Dv" : "B,H,F,Dv"));
    s->B = src->shape[0];
    s->H = src->shape[1];
    s->Dv = src->shape[3];
    s->Dk = dk_from_rows(src->shape[2], from_expanded);
    if (s->Dk < 0)
        return based_fail(BASED_STATUS_VALUE_ERROR, "%s: %s has %lld feature rows, which is not %s for any Dk >= 1", op,
                          src->name, (long long)src->shape[2],
                          from_expanded ? "1 + Dk + Dk^2" : "1 + Dk + Dk(Dk+1)/2");
    s->F = based_taylor_feature_dim(s->Dk);
    s->F273 = 1 + s->Dk + s->Dk * s->Dk;
    const int64_t kvs[4] = {s->B, s->H, s->F, s->Dv}, kss[3] = {s->B, s->H, s->F};
    const int64_t kes[4] = {s->B, s->H, s->F273, s->Dv}, kses[3] = {s->B, s->H, s->F273};
    BASED_TRY(based_check_shape(&s->kv, 4, kvs, "B,H,F,Dv"));
    BASED_TRY(based_check_shape(&s->ksum, 3, kss, "B,H,F"));
    BASED_TRY(based_check_shape(&s->kv_exp, 4, kes, "B,H,F273,Dv"));
    BASED_TRY(based_check_shape(&s->ksum_exp, 3, kses, "B,H,F273"));

    const based_view *all[] = {&s->kv, &s->ksum, &s->kv_exp, &s->ksum_exp};
    BASED_TRY(based_check_same_device(all, 4));
    for (int i = 0; i < 4; i++) BASED_TRY(based_check_host(all[i], op));
    const based_view *in0 = from_expanded ? &s->kv_exp : &s->kv, *in1 = from_expanded ? &s->ksum_exp : &s->ksum;
    const based_view *o0 = from_expanded ? &s->kv : &s->kv_exp, *o1 = from_expanded ? &s->ksum : &s->ksum_exp;
    const based_view *written[] = {o0, o1}, *read[] = {in0, in1};
    BASED_TRY(based_check_writes(written, 2, read, 2));
    return BASED_STATUS_OK;
}

/* Element offset of (b, h, row, j) in a (B, H, rows, Dv) view, or (b, h, row) when ndim is 3. */
static int64_t at(const based_view *v, int64_t b, int64_t h, int64_t row, int64_t j) {
    int64_t off = b * v->strides[0] + h * v->strides[1] + row * v->strides[2];
    return v->ndim == 4 ? off + j * v->strides[3] : off;
}

/* One column j (j == -1: the ksum vector) of (b, h) in either direction. */
static void convert_column(const state_pair *s, int64_t b, int64_t h, int64_t j, int from_expanded) {
    const based_view *c = j < 0 ? &s->ksum : &s->kv, *e = j < 0 ? &s->ksum_exp : &s->kv_exp;
    const int64_t dk = s->Dk;
    const double r2 = sqrt(0.5);
    for (int64_t f = 0; f <= dk; f++) { /* the constant and linear rows */
        if (from_expanded)
            based_store_f64(c->data, c->dtype, at(c, b, h, f, j), based_load_f64(e->data, e->dtype, at(e, b, h, f, j)));
        else
            based_store_f64(e->data, e->dtype, at(e, b, h, f, j), based_load_f64(c->data, c->dtype, at(c, b, h, f, j)));
    }
    for (int64_t i = 0; i < dk; i++) {
        for (int64_t k = i; k < dk; k++) {
            const int64_t cr = compact_row(dk, i, k), eik = expanded_row(dk, i, k), eki = expanded_row(dk, k, i);
            if (from_expanded) {
                double x = based_load_f64(e->data, e->dtype, at(e, b, h, eik, j));
                if (i != k) x = (x + based_load_f64(e->data, e->dtype, at(e, b, h, eki, j))) * r2;
                based_store_f64(c->data, c->dtype, at(c, b, h, cr, j), x);
            } else {
                const double x = based_load_f64(c->data, c->dtype, at(c, b, h, cr, j));
                based_store_f64(e->data, e->dtype, at(e, b, h, eik, j), i == k ? x : x * r2);
                if (i != k) based_store_f64(e->data, e->dtype, at(e, b, h, eki, j), x * r2);
            }
        }
    }
}

static based_status convert(const DLTensor *kv, const DLTensor *ksum, const DLTensor *kv_exp,
                            const DLTensor *ksum_exp, int from_expanded, const char *op) {
    state_pair s;
    BASED_TRY(check_pair(&s, kv, ksum, kv_exp, ksum_exp, from_expanded, op));
    const int64_t work = s.B * s.H;
#pragma omp parallel for num_threads(based_threads_for(work / 8)) schedule(static)
    for (int64_t bh = 0; bh < work; bh++) {
        const int64_t b = bh / s.H, h = bh % s.H;
        for (int64_t j = -1; j < s.Dv; j++) convert_column(&s, b, h, j, from_expanded);
    }
    return BASED_STATUS_OK;
}

based_status based_linear_state_to_expanded(const DLTensor *kv, const DLTensor *ksum, DLTensor *kv_exp,
                                            DLTensor *ksum_exp) {
    return convert(kv, ksum, kv_exp, ksum_exp, 0, "linear_state_to_expanded");
}

based_status based_linear_state_from_expanded(const DLTensor *kv_exp, const DLTensor *ksum_exp, DLTensor *kv,
                                              DLTensor *ksum) {
    return convert(kv, ksum, kv_exp, ksum_exp, 1, "linear_state_from_expanded");
}
