/*
 * state.c -- state helpers shared by LinearAttentionState and SlidingWindowCache:
 * zero chosen sequences, copy, and gather sequences (beam-search reordering).
 * They treat axis 0 as the batch and move raw elements, so they serve every dtype.
 */
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"
#include "ops.h"

/* Row b of dst = row sb of src (zeros when src == NULL), walking axes 1..ndim-1: raw
 * bytes for one dtype, converted through float64 (round to nearest even) between two. */
static void for_each_in_row(const based_state_tensor *dst, int64_t b, const based_state_tensor *src, int64_t sb) {
    int32_t nd = dst->ndim;
    int64_t idx[BASED_MAX_NDIM] = {0};
    int64_t inner = nd > 1 ? dst->shape[nd - 1] : 1;
    int64_t count = dst->numel / (dst->shape[0] ? dst->shape[0] : 1);
    int64_t outer = inner ? count / inner : 0;
    int isz = dst->itemsize;
    for (int64_t o = 0; o < outer; o++) {
        int64_t doff = b * dst->strides[0], soff = src ? sb * src->strides[0] : 0;
        for (int32_t d = 1; d < nd - 1; d++) {
            doff += idx[d] * dst->strides[d];
            if (src) soff += idx[d] * src->strides[d];
        }
        int64_t ds = nd > 1 ? dst->strides[nd - 1] : 0, ss = (src && nd > 1) ? src->strides[nd - 1] : 0;
        char *dp = dst->data + doff * isz;
        if (src == NULL) {
            if (ds == 1) memset(dp, 0, (size_t)(inner * isz));
            else for (int64_t i = 0; i < inner; i++) memset(dp + i * ds * isz, 0, (size_t)isz);
        } else if (src->dtype != dst->dtype) {
            for (int64_t i = 0; i < inner; i++) {
                const double x = based_load_f64(src->data, src->dtype, soff + i * ss);
                based_store_f64(dst->data, dst->dtype, doff + i * ds, x);
            }
        } else {
            const char *sp = src->data + soff * isz;
            if (ds == 1 && ss == 1) memmove(dp, sp, (size_t)(inner * isz));
            else for (int64_t i = 0; i < inner; i++) memcpy(dp + i * ds * isz, sp + i * ss * isz, (size_t)isz);
        }
        for (int32_t d = nd - 2; d >= 1; d--) { /* advance the multi-index over axes 1..nd-2 */
            if (++idx[d] < dst->shape[d]) break;
            idx[d] = 0;
        }
    }
}

/* A checked view on `device` as an args state tensor. */
static based_state_tensor state_tensor_of(const based_view *v, based_device device) {
    based_state_tensor t;
    memset(&t, 0, sizeof t);
    t.data = v->data;
    t.dtype = v->dtype;
    t.itemsize = v->itemsize;
    t.device = device;
    t.ndim = v->ndim;
    for (int32_t i = 0; i < v->ndim; i++) {
        t.shape[i] = v->shape[i];
        t.strides[i] = v->strides[i];
    }
    t.numel = v->numel;
    return t;
}

/* A state tensor: at least a batch axis, on the CPU or a CUDA device (*device). */
static based_status check_state_tensor(based_view *v, based_device *device, const DLTensor *t, const char *name,
                                       const char *op) {
    BASED_TRY(based_view_init(v, t, name));
    if (v->ndim < 1)
        return based_fail(BASED_STATUS_VALUE_ERROR, "%s: %s must have a batch axis (at least 1 dimension)", op, name);
    return based_device_of(v, op, device);
}

/* Reads indices into a malloc'd array, normalising negatives; all checked first. They are
 * read here, on the host, whatever the device of the state: they must be in host memory. */
static based_status read_indices(const DLTensor *t, int64_t n_rows, const char *op, int64_t **out, int64_t *count) {
    based_view iv;
    based_device device;
    BASED_TRY(based_view_init(&iv, t, "batch_indices"));
    BASED_TRY(based_check_dtype(&iv, BASED_DTYPES_INDEX));
    BASED_TRY(based_device_of(&iv, op, &device));
    if (device.kind != BASED_DEVICE_CPU)
        return based_fail(BASED_STATUS_NOT_IMPLEMENTED,
                          "%s: batch_indices is on cuda:%d; batch indices are read on the host, so pass them in CPU "
                          "memory",
                          op, (int)device.id);
    if (iv.ndim != 1) {
        char buf[96];
        return based_fail(BASED_STATUS_VALUE_ERROR, "%s: batch_indices must be 1-D, got shape %s", op,
                          based_format_shape(&iv, buf, sizeof buf));
    }
    int64_t n = iv.shape[0];
    int64_t *idx = malloc((size_t)(n ? n : 1) * sizeof *idx);
    if (idx == NULL) return based_fail(BASED_STATUS_OUT_OF_MEMORY, "%s: out of memory", op);
    for (int64_t i = 0; i < n; i++) {
        int64_t j = ((const int64_t *)iv.data)[i * iv.strides[0]];
        int64_t k = j < 0 ? j + n_rows : j;
        if (k < 0 || k >= n_rows) {
            free(idx);
            return based_fail(BASED_STATUS_VALUE_ERROR, "%s: batch index %lld is out of range for batch size %lld",
                              op, (long long)j, (long long)n_rows);
        }
        idx[i] = k;
    }
    *out = idx;
    *count = n;
    return BASED_STATUS_OK;
}

void based_state_args_free(based_state_args *args) {
    free((void *)args->indices);
    args->indices = NULL;
}

based_status based_state_zero_check(based_state_args *args, const DLTensor *t_, const DLTensor *indices) {
    memset(args, 0, sizeof *args);
    based_view t;
    based_device device;
    BASED_TRY(check_state_tensor(&t, &device, t_, "state", "reset"));
    BASED_TRY(based_check_no_self_overlap(&t));
    args->dst = state_tensor_of(&t, device);
    if (indices == NULL) return BASED_STATUS_OK;
    /* the indices are checked even when there is nothing to zero: a bad one is an error */
    int64_t *idx, n;
    BASED_TRY(read_indices(indices, t.shape[0], "reset", &idx, &n));
    args->indices = idx;
    args->n_indices = n;
    return BASED_STATUS_OK;
}

based_status based_cpu_state_zero(const based_state_args *args) {
    const based_state_tensor *t = &args->dst;
    if (t->numel == 0) return BASED_STATUS_OK;
    if (args->indices == NULL) {
        for (int64_t b = 0; b < t->shape[0]; b++) for_each_in_row(t, b, NULL, 0);
        return BASED_STATUS_OK;
    }
    for (int64_t i = 0; i < args->n_indices; i++) for_each_in_row(t, args->indices[i], NULL, 0);
    return BASED_STATUS_OK;
}

static based_status check_pair(based_view *dst, based_view *src, const char *op, int convert) {
    if (convert && dst->dtype != src->dtype) {
        /* float <-> float converts (rounding to nearest even); int64 only to int64 */
        if ((BASED_DTYPES_FLOAT & (1u << dst->dtype)) == 0 || (BASED_DTYPES_FLOAT & (1u << src->dtype)) == 0)
            BASED_TRY(based_check_same_dtype(src, dst));
    } else {
        BASED_TRY(based_check_same_dtype(src, dst));
    }
    BASED_TRY(based_check_no_self_overlap(dst));
    if (dst->ndim != src->ndim) goto bad;
    for (int32_t i = 1; i < dst->ndim; i++)
        if (dst->shape[i] != src->shape[i]) goto bad;
    return BASED_STATUS_OK;
bad:;
    char a[128], b[128];
    return based_fail(BASED_STATUS_VALUE_ERROR, "%s: %s has shape %s, which does not match %s %s", op, src->name,
                      based_format_shape(src, a, sizeof a), dst->name, based_format_shape(dst, b, sizeof b));
}

/* dst and src are the very same tensor (one device, address, dtype and strides): a copy is a
 * no-op. */
static int same_tensor(const based_state_tensor *dst, const based_state_tensor *src) {
    return dst->device.kind == src->device.kind && dst->device.id == src->device.id && dst->data == src->data &&
           dst->dtype == src->dtype &&
           memcmp(dst->strides, src->strides, sizeof(int64_t) * (size_t)dst->ndim) == 0;
}

based_status based_state_copy_check(based_state_args *args, const DLTensor *dst_, const DLTensor *src_) {
    memset(args, 0, sizeof *args);
    based_view dst, src;
    based_device dst_device, src_device;
    BASED_TRY(check_state_tensor(&dst, &dst_device, dst_, "dst", "copy_"));
    BASED_TRY(check_state_tensor(&src, &src_device, src_, "src", "copy_"));
    BASED_TRY(check_pair(&dst, &src, "copy_", 1));
    if (dst.shape[0] != src.shape[0]) {
        char a[128], b[128];
        return based_fail(BASED_STATUS_VALUE_ERROR, "copy_: src has shape %s, which does not match dst %s",
                          based_format_shape(&src, a, sizeof a), based_format_shape(&dst, b, sizeof b));
    }
    args->dst = state_tensor_of(&dst, dst_device);
    args->src = state_tensor_of(&src, src_device);
    if (dst.numel == 0 || same_tensor(&args->dst, &args->src)) return BASED_STATUS_OK;
    if (based_check_disjoint(&dst, &src) != BASED_STATUS_OK) {
        based_clear_error();
        return based_fail(BASED_STATUS_VALUE_ERROR, "copy_: dst and src share memory; copy from a clone instead");
    }
    return BASED_STATUS_OK;
}

based_status based_cpu_state_copy(const based_state_args *args) {
    const based_state_tensor *dst = &args->dst, *src = &args->src;
    if (dst->numel == 0 || same_tensor(dst, src)) return BASED_STATUS_OK;
    for (int64_t b = 0; b < dst->shape[0]; b++) for_each_in_row(dst, b, src, b);
    return BASED_STATUS_OK;
}

based_status based_state_gather_check(based_state_args *args, const DLTensor *dst_, const DLTensor *src_,
                                      const DLTensor *indices) {
    memset(args, 0, sizeof *args);
    based_view dst, src;
    based_device dst_device, src_device;
    BASED_TRY(check_state_tensor(&dst, &dst_device, dst_, "dst", "index_select"));
    BASED_TRY(check_state_tensor(&src, &src_device, src_, "src", "index_select"));
    BASED_TRY(check_pair(&dst, &src, "index_select", 0));
    int64_t *idx, n;
    BASED_TRY(read_indices(indices, src.shape[0], "index_select", &idx, &n));
    if (n != dst.shape[0]) {
        free(idx);
        return based_fail(BASED_STATUS_VALUE_ERROR,
                          "index_select: %lld batch indices given for a destination of batch size %lld",
                          (long long)n, (long long)dst.shape[0]);
    }
    args->dst = state_tensor_of(&dst, dst_device);
    args->src = state_tensor_of(&src, src_device);
    args->indices = idx;
    args->n_indices = n;
    return BASED_STATUS_OK;
}

/* Whether the element ranges of a and b (one device) share a byte. */
static int share_memory(const based_state_tensor *a, const based_state_tensor *b) {
    int64_t a_lo = 0, a_hi = 0, b_lo = 0, b_hi = 0;
    for (int32_t i = 0; i < a->ndim; i++) {
        const int64_t span = a->strides[i] * (a->shape[i] - 1);
        *(span < 0 ? &a_lo : &a_hi) += span;
    }
    for (int32_t i = 0; i < b->ndim; i++) {
        const int64_t span = b->strides[i] * (b->shape[i] - 1);
        *(span < 0 ? &b_lo : &b_hi) += span;
    }
    const uintptr_t a0 = (uintptr_t)a->data + (uintptr_t)(a_lo * a->itemsize);
    const uintptr_t a1 = (uintptr_t)a->data + (uintptr_t)((a_hi + 1) * a->itemsize);
    const uintptr_t b0 = (uintptr_t)b->data + (uintptr_t)(b_lo * b->itemsize);
    const uintptr_t b1 = (uintptr_t)b->data + (uintptr_t)((b_hi + 1) * b->itemsize);
    return !(a1 <= b0 || b1 <= a0);
}

based_status based_cpu_state_gather(const based_state_args *args) {
    const based_state_tensor *dst = &args->dst, *src = &args->src;
    const int64_t n = args->n_indices;
    if (dst->numel == 0) return BASED_STATUS_OK;
    if (!share_memory(dst, src)) {
        for (int64_t i = 0; i < n; i++) for_each_in_row(dst, i, src, args->indices[i]);
        return BASED_STATUS_OK;
    }
    /* In-place reorder: stage the selected rows in a contiguous buffer first. */
    int64_t row = src->numel / src->shape[0];
    char *tmp = based_scratch_alloc((size_t)(n * row * src->itemsize));
    if (tmp == NULL)
        return based_fail(BASED_STATUS_OUT_OF_MEMORY, "index_select: out of memory for a %lld-byte staging buffer",
                          (long long)(n * row * src->itemsize));
    based_state_tensor stage = *dst;
    stage.data = tmp;
    int64_t stride = 1;
    for (int32_t d = dst->ndim - 1; d >= 0; d--) {
        stage.strides[d] = stride;
        stride *= dst->shape[d];
    }
    for (int64_t i = 0; i < n; i++) for_each_in_row(&stage, i, src, args->indices[i]);
    for (int64_t i = 0; i < n; i++) for_each_in_row(dst, i, &stage, i);
    based_scratch_free(tmp);
    return BASED_STATUS_OK;
}
