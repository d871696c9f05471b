/*
 * feature_map.c -- the 2nd-order Taylor feature map of BASED (paper Sec. 4.1, Eq. 4;
 * SPEC 1.1), compact (symmetric) order:
 *
 *   phi(x) = [ 1,
 *              sqrt(scale) * x_i                  for i < Dk,
 *              scale / sqrt(2) * x_i * x_i        for i == j   } upper triangle,
 *              scale * x_i * x_j                  for i <  j   } row-major ]
 *
 * so phi(q) . phi(k) = 1 + s + s^2 / 2 with s = scale * q.k. The kernels never need
 * phi of a whole sequence; this op exists for inspection, tests and interop.
 */
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"
#include "ops.h"

int64_t based_taylor_feature_dim(int64_t head_dim) {
    if (head_dim < 1 || head_dim > BASED_MAX_FEATURE_MAP_DIM) return -1; /* Dk(Dk+1)/2 must fit int64 */
    return 1 + head_dim + head_dim * (head_dim + 1) / 2;
}

/* One row of phi in compute type REAL, written with the output's dtype and stride. */
#define BASED_FEATURE_MAP_ROW(REAL, SQRT, GATHER, STORE)                                  \
    static void feature_map_row_##REAL(const char *xp, int64_t xs, char *op, int64_t os,   \
                                       based_dtype xdt, based_dtype odt, int64_t dk,      \
                                       REAL scale, REAL *x) {                             \
        GATHER(x, xp, xdt, dk, xs);                                                       \
        const REAL c1 = SQRT(scale), c2 = scale / SQRT((REAL)2), c3 = scale;              \
        int64_t f = 0;                                                                    \
        STORE(op, odt, f * os, (REAL)1);                                                  \
        f++;                                                                              \
        for (int64_t i = 0; i < dk; i++, f++) STORE(op, odt, f * os, c1 * x[i]);          \
        for (int64_t i = 0; i < dk; i++) {                                                \
            STORE(op, odt, f * os, c2 * x[i] * x[i]);                                     \
            f++;                                                                          \
            for (int64_t j = i + 1; j < dk; j++, f++) STORE(op, odt, f * os, c3 * x[i] * x[j]); \
        }                                                                                 \
    }

BASED_FEATURE_MAP_ROW(float, sqrtf, based_gather_f32, based_store_f32)
BASED_FEATURE_MAP_ROW(double, sqrt, based_gather_f64, based_store_f64)

based_status based_taylor_feature_map_check(based_feature_map_args *args, const DLTensor *x_, const DLTensor *out_,
                                            double scale) {
    memset(args, 0, sizeof *args);
    based_view x, out;
    BASED_TRY(based_view_init(&x, x_, "x"));
    BASED_TRY(based_view_init(&out, out_, "out"));
    BASED_TRY(based_check_dtype(&x, BASED_DTYPES_FLOAT));
    BASED_TRY(based_check_same_dtype(&out, &x));
    if (x.ndim < 1)
        return based_fail(BASED_STATUS_VALUE_ERROR, "x must have at least 1 dimension (..., Dk), got a 0-d tensor");
    int64_t dk = x.shape[x.ndim - 1];
    int64_t f = based_taylor_feature_dim(dk);
    if (f < 0)
        return based_fail(BASED_STATUS_VALUE_ERROR, "x must have a last dimension Dk >= 1, got Dk=%lld",
                          (long long)dk);
    int64_t want[BASED_MAX_NDIM];
    char dims[BASED_MAX_NDIM * 4 + 8];
    size_t n = 0;
    for (int32_t i = 0; i < x.ndim; i++) {
        want[i] = i == x.ndim - 1 ? f : x.shape[i];
        n += (size_t)snprintf(dims + n, sizeof dims - n, i == x.ndim - 1 ? "F" : "d%d,", (int)i);
    }
    BASED_TRY(based_check_shape(&out, x.ndim, want, dims));
    const based_view *all[] = {&x, &out};
    BASED_TRY(based_check_device(all, 2, "taylor_feature_map", &args->device));
    BASED_TRY(based_check_cuda_rows(all, 2, args->device, "taylor_feature_map"));
    BASED_TRY(based_check_scalar(scale, "scale", 1));
    const based_view *written[] = {&out}, *read[] = {&x};
    BASED_TRY(based_check_writes(written, 1, read, 1));

    args->x = x.data;
    args->out = out.data;
    args->dtype = x.dtype;
    args->ndim = x.ndim;
    for (int32_t i = 0; i < x.ndim; i++) {
        args->shape[i] = x.shape[i];
        args->x_strides[i] = x.strides[i];
        args->out_strides[i] = out.strides[i];
    }
    args->rows = x.numel / dk;
    args->feature_dim = dk;
    args->feature_count = f;
    args->scale = scale;
    return BASED_STATUS_OK;
}

based_status based_cpu_taylor_feature_map(const based_feature_map_args *a) {
    const int64_t rows = a->rows, dk = a->feature_dim;
    if (rows == 0) return BASED_STATUS_OK;
    const int lead = a->ndim - 1;
    /* memory-bound: F outputs written per row */
    const int nthreads = based_threads_for(rows, rows * a->feature_count * based_dtype_size(a->dtype),
                                           BASED_MIN_BYTES_PER_THREAD);
    const size_t elem = a->dtype == BASED_DTYPE_FLOAT64 ? sizeof(double) : sizeof(float);
    const size_t itemsize = (size_t)based_dtype_size(a->dtype);
    const size_t row_bytes = ((size_t)dk * elem + 63u) & ~(size_t)63u;
    char *scratch = based_scratch_alloc(row_bytes * (size_t)nthreads);
    if (scratch == NULL) return based_fail(BASED_STATUS_OUT_OF_MEMORY, "taylor_feature_map: out of memory for scratch");
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        void *xbuf = scratch + row_bytes * (size_t)based_thread_num();
        int64_t rem = r, xo = 0, oo = 0;
        for (int d = lead - 1; d >= 0; d--) {
            int64_t idx = rem % a->shape[d];
            rem /= a->shape[d];
            xo += idx * a->x_strides[d];
            oo += idx * a->out_strides[d];
        }
        const char *xp = a->x + xo * (int64_t)itemsize;
        char *op = a->out + oo * (int64_t)itemsize;
        if (a->dtype == BASED_DTYPE_FLOAT64)
            feature_map_row_double(xp, a->x_strides[lead], op, a->out_strides[lead], a->dtype, a->dtype, dk, a->scale,
                                   (double *)xbuf);
        else
            feature_map_row_float(xp, a->x_strides[lead], op, a->out_strides[lead], a->dtype, a->dtype, dk,
                                  (float)a->scale, (float *)xbuf);
    }
    based_scratch_free(scratch);
    return BASED_STATUS_OK;
}
