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

#include "linear_attention.h"

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

based_status based_linear_state_check(based_linear_state_args *args, const DLTensor *kv_, const DLTensor *ksum_,
                                      const DLTensor *kv_exp_, const DLTensor *ksum_exp_, int from_expanded,
                                      const char *op) {
    memset(args, 0, sizeof *args);
    struct { /* the arguments as checked views, named as in the messages */
        based_view kv, ksum, kv_exp, ksum_exp;
    } views, *s = &views;
    BASED_TRY(based_view_init(&s->kv, kv_, "kv"));
    BASED_TRY(based_view_init(&s->ksum, ksum_, "ksum"));
    BASED_TRY(based_view_init(&s->kv_exp, kv_exp_, "kv_expanded"));
    BASED_TRY(based_view_init(&s->ksum_exp, ksum_exp_, "ksum_expanded"));
    BASED_TRY(based_check_dtype(&s->kv, BASED_DTYPES_FLOAT));
    BASED_TRY(based_check_same_dtype(&s->ksum, &s->kv));
    BASED_TRY(based_check_dtype(&s->kv_exp, BASED_DTYPES_FLOAT));
    BASED_TRY(based_check_same_dtype(&s->ksum_exp, &s->kv_exp));

    const int64_t any[4] = {-1, -1, -1, -1};
    const based_view *src = from_expanded ? &s->kv_exp : &s->kv;
    BASED_TRY(based_check_shape(src, 4, any, from_expanded ? "B,H,F273,Dv" : "B,H,F,Dv"));
    const int64_t B = src->shape[0], H = src->shape[1], Dv = src->shape[3];
    const int64_t Dk = dk_from_rows(src->shape[2], from_expanded);
    if (Dk < 0)
        return based_fail(BASED_STATUS_VALUE_ERROR, "%s: %s has %lld feature rows, which is not %s for any Dk >= 1", op,
                          src->name, (long long)src->shape[2],
                          from_expanded ? "1 + Dk + Dk^2" : "1 + Dk + Dk(Dk+1)/2");
    const int64_t F = based_taylor_feature_dim(Dk), F273 = 1 + Dk + Dk * Dk;
    const int64_t kvs[4] = {B, H, F, Dv}, kss[3] = {B, H, F};
    const int64_t kes[4] = {B, H, F273, Dv}, kses[3] = {B, H, F273};
    BASED_TRY(based_check_shape(&s->kv, 4, kvs, "B,H,F,Dv"));
    BASED_TRY(based_check_shape(&s->ksum, 3, kss, "B,H,F"));
    BASED_TRY(based_check_shape(&s->kv_exp, 4, kes, "B,H,F273,Dv"));
    BASED_TRY(based_check_shape(&s->ksum_exp, 3, kses, "B,H,F273"));

    const based_view *all[] = {&s->kv, &s->ksum, &s->kv_exp, &s->ksum_exp};
    BASED_TRY(based_check_device(all, 4, op, &args->device));
    BASED_TRY(based_check_cuda_rows(all, 4, args->device, op));
    const based_view *in0 = from_expanded ? &s->kv_exp : &s->kv, *in1 = from_expanded ? &s->ksum_exp : &s->ksum;
    const based_view *o0 = from_expanded ? &s->kv : &s->kv_exp, *o1 = from_expanded ? &s->ksum : &s->ksum_exp;
    const based_view *written[] = {o0, o1}, *read[] = {in0, in1};
    BASED_TRY(based_check_writes(written, 2, read, 2));

    args->kv = based_tensor_of(&s->kv);
    args->ksum = based_tensor_of(&s->ksum);
    args->kv_exp = based_tensor_of(&s->kv_exp);
    args->ksum_exp = based_tensor_of(&s->ksum_exp);
    args->batch = B;
    args->heads = H;
    args->feature_dim = Dk;
    args->value_dim = Dv;
    args->feature_count = F;
    args->expanded_count = F273;
    args->from_expanded = from_expanded != 0;
    return BASED_STATUS_OK;
}

/* Element offset of (b, h, row, j) in a (B, H, rows, Dv) tensor, or (b, h, row) of a
 * (B, H, rows) one (its strides[3] is 0). */
static int64_t at(const based_tensor *v, int64_t b, int64_t h, int64_t row, int64_t j) {
    return b * v->strides[0] + h * v->strides[1] + row * v->strides[2] + j * v->strides[3];
}

/* One column j (j == -1: the ksum vector) of (b, h) in either direction. */
static void convert_column(const based_linear_state_args *s, int64_t b, int64_t h, int64_t j) {
    const int from_expanded = s->from_expanded;
    const based_tensor *c = j < 0 ? &s->ksum : &s->kv, *e = j < 0 ? &s->ksum_exp : &s->kv_exp;
    const int64_t dk = s->feature_dim;
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

based_status based_cpu_linear_state_convert(const based_linear_state_args *s) {
    const int64_t work = s->batch * s->heads;
    const int64_t bytes = work * s->feature_count * (s->value_dim + 1) * s->kv.itemsize; /* compact side */
    const int nthreads = based_threads_for(work, bytes, BASED_MIN_BYTES_PER_THREAD);
    (void)nthreads; /* only the pragma reads it: unused without OpenMP */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bh = 0; bh < work; bh++) {
        const int64_t b = bh / s->heads, h = bh % s->heads;
        for (int64_t j = -1; j < s->value_dim; j++) convert_column(s, b, h, j);
    }
    return BASED_STATUS_OK;
}
