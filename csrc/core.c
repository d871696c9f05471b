/*
 * core.c -- errors, build information, DLTensor validation and dtype conversion:
 * the checks every op runs before it writes (SPEC 4).
 */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#ifdef BASED_WITH_CUDA
#include "../kernels/based_cuda.h"
#endif

/* ---------------------------------------------------------------------------------
 * Errors
 * --------------------------------------------------------------------------------- */

static _Thread_local char based_errbuf[1024];

const char *based_status_str(based_status status) {
    switch (status) {
    case BASED_STATUS_OK: return "ok";
    case BASED_STATUS_TYPE_ERROR: return "type error";
    case BASED_STATUS_VALUE_ERROR: return "value error";
    case BASED_STATUS_OUT_OF_MEMORY: return "out of memory";
    case BASED_STATUS_NOT_IMPLEMENTED: return "not implemented";
    case BASED_STATUS_CUDA_ERROR: return "CUDA error";
    case BASED_STATUS_INTERNAL_ERROR: return "internal error";
    }
    return "unknown status";
}

const char *based_last_error(void) { return based_errbuf; }

void based_clear_error(void) { based_errbuf[0] = '\0'; }

based_status based_fail(based_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(based_errbuf, sizeof based_errbuf, fmt, ap);
    va_end(ap);
    return status;
}

/* ---------------------------------------------------------------------------------
 * Build information
 * --------------------------------------------------------------------------------- */

const char *based_version(void) { return BASED_VERSION; }

int based_built_with_cuda(void) {
#ifdef BASED_WITH_CUDA
    return 1;
#else
    return 0;
#endif
}

int based_cuda_device_count(void) {
#ifdef BASED_WITH_CUDA
    return based_cuda_runtime_device_count();
#else
    return 0;
#endif
}

const char *based_cuda_archs(void) {
#ifdef BASED_CUDA_ARCHS
    return BASED_CUDA_ARCHS; /* set by setup.py with BASED_WITH_CUDA */
#else
    return "";
#endif
}

/* ---------------------------------------------------------------------------------
 * CUDA memory (based.h): kernels/runtime.cu's functions with a based_status
 * --------------------------------------------------------------------------------- */

#ifdef BASED_WITH_CUDA
/* err: a cudaError_t; cudaErrorMemoryAllocation (2) is OUT_OF_MEMORY. */
static based_status cuda_status(int err, const char *what, size_t nbytes, int device) {
    if (err == 0) return BASED_STATUS_OK;
    return based_fail(err == 2 ? BASED_STATUS_OUT_OF_MEMORY : BASED_STATUS_CUDA_ERROR,
                      "based: cannot %s %zu bytes on cuda:%d: %s", what, nbytes, device,
                      based_cuda_runtime_error_string(err));
}

based_status based_cuda_malloc_zeroed(void **ptr, size_t nbytes, int device) {
    return cuda_status(based_cuda_runtime_malloc_zeroed(ptr, nbytes, device), "allocate", nbytes, device);
}

based_status based_cuda_free(void *ptr, int device) {
    return cuda_status(based_cuda_runtime_free(ptr, device), "free", 0, device);
}

based_status based_cuda_memcpy(void *dst, const void *src, size_t nbytes, int device) {
    return cuda_status(based_cuda_runtime_memcpy(dst, src, nbytes, device), "copy", nbytes, device);
}
#else
static based_status no_cuda_memory(void) {
    return based_fail(BASED_STATUS_NOT_IMPLEMENTED,
                      "based was built without CUDA (no nvcc at build time), so it cannot allocate CUDA memory");
}

based_status based_cuda_malloc_zeroed(void **ptr, size_t nbytes, int device) {
    (void)nbytes, (void)device;
    *ptr = NULL;
    return no_cuda_memory();
}

based_status based_cuda_free(void *ptr, int device) {
    (void)ptr, (void)device;
    return no_cuda_memory();
}

based_status based_cuda_memcpy(void *dst, const void *src, size_t nbytes, int device) {
    (void)dst, (void)src, (void)nbytes, (void)device;
    return no_cuda_memory();
}
#endif

int based_built_with_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The thread count of based_set_num_threads: 0 until set (or after a reset), when the
 * default applies. One value for the whole process; atomic, so an op starting on another
 * thread while it changes reads the old count or the new one, never a torn value. */
static atomic_int based_threads_setting;

based_status based_set_num_threads(int n) {
    if (n < 0)
        return based_fail(BASED_STATUS_VALUE_ERROR,
                          "set_num_threads: n must be >= 1 (or 0 for the default), got %d", n);
    atomic_store_explicit(&based_threads_setting, n, memory_order_relaxed);
    return BASED_STATUS_OK;
}

int based_get_num_threads(void) {
#ifdef _OPENMP
    const int n = atomic_load_explicit(&based_threads_setting, memory_order_relaxed);
    if (n > 0) return n;
    const int want = omp_get_max_threads(), procs = omp_get_num_procs();
    return want < procs ? want : procs > 0 ? procs : 1;
#else
    return 1;
#endif
}

int based_max_threads(void) { return based_get_num_threads(); }

based_isa_cap based_cpu_isa_cap(void) {
    const char *want = getenv("BASED_CPU_ISA");
    if (want != NULL && strcmp(want, "generic") == 0) return BASED_ISA_CAP_GENERIC;
    if (want != NULL && strcmp(want, "avx2") == 0) return BASED_ISA_CAP_AVX2;
    return BASED_ISA_CAP_NONE;
}

/* BASED_PARALLEL_ANY_SIZE=1 in the environment (read once): no minimum work per thread, so
 * that tests can run the thread splits of small calls. 0 unread, 1 off, 2 on. */
static atomic_int based_any_size_setting;

static int based_parallel_any_size(void) {
    int v = atomic_load_explicit(&based_any_size_setting, memory_order_relaxed);
    if (v == 0) {
        const char *env = getenv("BASED_PARALLEL_ANY_SIZE");
        v = env != NULL && strcmp(env, "1") == 0 ? 2 : 1;
        atomic_store_explicit(&based_any_size_setting, v, memory_order_relaxed);
    }
    return v == 2;
}

int based_threads_for(int64_t items, int64_t work, int64_t min_per_thread) {
    int64_t n = based_get_num_threads();
    const int64_t by_work = min_per_thread > 0 && !based_parallel_any_size() ? work / min_per_thread : n;
    if (by_work < n) n = by_work;
    if (items < n) n = items;
    return n < 1 ? 1 : (int)n;
}

/* ---------------------------------------------------------------------------------
 * dtypes
 * --------------------------------------------------------------------------------- */

const char *based_dtype_name(based_dtype dt) {
    switch (dt) {
    case BASED_DTYPE_FLOAT32: return "float32";
    case BASED_DTYPE_FLOAT64: return "float64";
    case BASED_DTYPE_FLOAT16: return "float16";
    case BASED_DTYPE_BFLOAT16: return "bfloat16";
    case BASED_DTYPE_INT64: return "int64";
    default: return "?";
    }
}

int based_dtype_size(based_dtype dt) {
    switch (dt) {
    case BASED_DTYPE_FLOAT32: return 4;
    case BASED_DTYPE_FLOAT64: return 8;
    case BASED_DTYPE_FLOAT16: return 2;
    case BASED_DTYPE_BFLOAT16: return 2;
    case BASED_DTYPE_INT64: return 8;
    default: return 0;
    }
}

static const char *dl_code_name(uint8_t code) {
    switch (code) {
    case kDLInt: return "int";
    case kDLUInt: return "uint";
    case kDLFloat: return "float";
    case kDLBfloat: return "bfloat";
    case kDLComplex: return "complex";
    case kDLBool: return "bool";
    case kDLOpaqueHandle: return "opaque handle";
    default: return "float8/6/4 or unknown";
    }
}

static int dtype_from_dl(DLDataType t, based_dtype *out) {
    if (t.lanes != 1) return 0;
    if (t.code == kDLFloat && t.bits == 32) *out = BASED_DTYPE_FLOAT32;
    else if (t.code == kDLFloat && t.bits == 64) *out = BASED_DTYPE_FLOAT64;
    else if (t.code == kDLFloat && t.bits == 16) *out = BASED_DTYPE_FLOAT16;
    else if (t.code == kDLBfloat && t.bits == 16) *out = BASED_DTYPE_BFLOAT16;
    else if (t.code == kDLInt && t.bits == 64) *out = BASED_DTYPE_INT64;
    else return 0;
    return 1;
}

/* IEEE binary16 <-> binary32 with round-to-nearest-even, written out so that the
 * build needs neither _Float16 nor F16C. */
float based_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t u;
    float f;
    if (exp == 0) {
        f = (float)mant * 5.9604644775390625e-8f; /* subnormal: mant * 2^-24 (exact) */
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}

uint16_t based_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;        /* NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00u;       /* >= 65520 rounds to inf */
    if (a >= 0x38800000u) {                            /* normal half */
        uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
        r -= 0x38000000u;                              /* rebias 127 -> 15 */
        return sign | (uint16_t)(r >> 13);
    }
    uint32_t e = a >> 23;                              /* subnormal half or zero */
    if (e < 102) return sign;                          /* below 2^-25: rounds to zero */
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;                          /* 14..24 */
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return sign | (uint16_t)r;
}

void based_gather_f32(float *dst, const char *p, based_dtype dt, int64_t n, int64_t stride) {
    if (dt == BASED_DTYPE_FLOAT32) {
        const float *s = (const float *)p;
        if (stride == 1) memcpy(dst, s, (size_t)n * sizeof(float));
        else for (int64_t i = 0; i < n; i++) dst[i] = s[i * stride];
    } else {
        for (int64_t i = 0; i < n; i++) dst[i] = based_load_f32(p, dt, i * stride);
    }
}

void based_gather_f64(double *dst, const char *p, based_dtype dt, int64_t n, int64_t stride) {
    for (int64_t i = 0; i < n; i++) dst[i] = based_load_f64(p, dt, i * stride);
}

void based_scatter_f32(char *p, based_dtype dt, int64_t n, int64_t stride, const float *src) {
    if (dt == BASED_DTYPE_FLOAT32) {
        float *d = (float *)p;
        if (stride == 1) memcpy(d, src, (size_t)n * sizeof(float));
        else for (int64_t i = 0; i < n; i++) d[i * stride] = src[i];
    } else {
        for (int64_t i = 0; i < n; i++) based_store_f32(p, dt, i * stride, src[i]);
    }
}

void based_scatter_f64(char *p, based_dtype dt, int64_t n, int64_t stride, const double *src) {
    for (int64_t i = 0; i < n; i++) based_store_f64(p, dt, i * stride, src[i]);
}

void *based_scratch_alloc(size_t nbytes) {
    if (nbytes == 0) return NULL;
    size_t rounded = (nbytes + 63u) & ~(size_t)63u;
    if (rounded < nbytes) return NULL;
    return aligned_alloc(64, rounded);
}

void based_scratch_free(void *p) { free(p); }

/* ---------------------------------------------------------------------------------
 * Views and checks
 * --------------------------------------------------------------------------------- */

const char *based_format_shape(const based_view *v, char *buf, size_t size) {
    size_t n = 0;
    n += (size_t)snprintf(buf + n, size - n, "(");
    for (int32_t i = 0; i < v->ndim && n < size; i++)
        n += (size_t)snprintf(buf + n, size - n, i ? ", %lld" : "%lld", (long long)v->shape[i]);
    if (n < size) snprintf(buf + n, size - n, v->ndim == 1 ? ",)" : ")");
    return buf;
}

based_status based_view_init(based_view *v, const DLTensor *t, const char *name) {
    memset(v, 0, sizeof *v);
    v->name = name;
    if (t == NULL) return based_fail(BASED_STATUS_VALUE_ERROR, "%s: expected a tensor, got NULL", name);
    if (t->ndim < 0 || t->ndim > BASED_MAX_NDIM)
        return based_fail(BASED_STATUS_VALUE_ERROR, "%s: expected at most %d dimensions, got %d", name,
                          BASED_MAX_NDIM, (int)t->ndim);
    if (t->ndim > 0 && t->shape == NULL)
        return based_fail(BASED_STATUS_VALUE_ERROR, "%s: DLTensor.shape is NULL for ndim %d", name, (int)t->ndim);
    if (!dtype_from_dl(t->dtype, &v->dtype))
        return based_fail(BASED_STATUS_TYPE_ERROR,
                          "%s has an unsupported dtype (%s, %d bits, %d lanes); expected float32, float64, "
                          "float16 or bfloat16 (int64 for token counts and batch indices)",
                          name, dl_code_name(t->dtype.code), (int)t->dtype.bits, (int)t->dtype.lanes);
    v->itemsize = based_dtype_size(v->dtype);
    v->ndim = t->ndim;
    v->device = t->device;
    int64_t numel = 1;
    for (int32_t i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0)
            return based_fail(BASED_STATUS_VALUE_ERROR, "%s: dimension %d has negative size %lld", name, (int)i,
                              (long long)t->shape[i]);
        v->shape[i] = t->shape[i];
        if (__builtin_mul_overflow(numel, t->shape[i], &numel))
            return based_fail(BASED_STATUS_VALUE_ERROR,
                              "%s: element count overflows 64-bit indexing (dimension %d of size %lld)", name,
                              (int)i, (long long)t->shape[i]);
    }
    /* strides: NULL means row-major */
    if (t->ndim > 0 && t->strides == NULL) {
        int64_t s = 1;
        for (int32_t i = t->ndim - 1; i >= 0; i--) {
            v->strides[i] = s;
            if (t->shape[i] > 1) s *= t->shape[i]; /* cannot overflow: s <= numel */
        }
    } else {
        for (int32_t i = 0; i < t->ndim; i++) v->strides[i] = t->strides[i];
    }
    v->numel = numel;
    v->lo = v->hi = 0;
    if (numel > 0) {
        for (int32_t i = 0; i < t->ndim; i++) {
            int64_t span;
            if (__builtin_mul_overflow(v->strides[i], v->shape[i] - 1, &span) ||
                __builtin_add_overflow(span < 0 ? v->lo : v->hi, span, span < 0 ? &v->lo : &v->hi))
                return based_fail(BASED_STATUS_VALUE_ERROR,
                                  "%s: strides address memory beyond 64-bit indexing (axis %d, stride %lld)", name,
                                  (int)i, (long long)v->strides[i]);
        }
        int64_t tmp;
        if (__builtin_mul_overflow(v->hi + 1, (int64_t)v->itemsize, &tmp) ||
            __builtin_mul_overflow(v->lo, (int64_t)v->itemsize, &tmp))
            return based_fail(BASED_STATUS_VALUE_ERROR, "%s: byte extent overflows 64-bit indexing", name);
        if (t->data == NULL)
            return based_fail(BASED_STATUS_VALUE_ERROR, "%s: data pointer is NULL for a non-empty tensor", name);
    }
    v->data = t->data ? (char *)t->data + t->byte_offset : NULL;
    return BASED_STATUS_OK;
}

static const char *dtype_list(unsigned allowed, char *buf, size_t size) {
    size_t n = 0;
    buf[0] = '\0';
    int count = 0;
    for (int d = 0; d < BASED_DTYPE_COUNT_; d++) {
        if (!(allowed & (1u << d))) continue;
        n += (size_t)snprintf(buf + n, size - n, "%s%s", count ? ", " : "", based_dtype_name((based_dtype)d));
        count++;
        if (n >= size) break;
    }
    return buf;
}

based_status based_check_dtype(const based_view *v, unsigned allowed) {
    if (allowed & (1u << v->dtype)) return BASED_STATUS_OK;
    char buf[96];
    return based_fail(BASED_STATUS_TYPE_ERROR, "%s must have dtype %s%s, got %s", v->name,
                      (allowed & (allowed - 1)) ? "one of " : "", dtype_list(allowed, buf, sizeof buf),
                      based_dtype_name(v->dtype));
}

based_status based_check_same_dtype(const based_view *v, const based_view *ref) {
    if (v->dtype == ref->dtype) return BASED_STATUS_OK;
    return based_fail(BASED_STATUS_TYPE_ERROR, "%s must have the dtype of %s (%s), got %s", v->name, ref->name,
                      based_dtype_name(ref->dtype), based_dtype_name(v->dtype));
}

based_status based_check_shape(const based_view *v, int32_t ndim, const int64_t *expected, const char *dims) {
    int ok = v->ndim == ndim;
    for (int32_t i = 0; ok && i < ndim; i++)
        if (expected[i] >= 0 && v->shape[i] != expected[i]) ok = 0;
    if (ok) return BASED_STATUS_OK;
    char want[256], got[256];
    size_t n = 0;
    const char *d = dims;
    n += (size_t)snprintf(want, sizeof want, "(");
    for (int32_t i = 0; i < ndim && n < sizeof want; i++) {
        const char *comma = strchr(d, ',');
        int len = comma ? (int)(comma - d) : (int)strlen(d);
        if (expected[i] >= 0)
            n += (size_t)snprintf(want + n, sizeof want - n, "%s%.*s=%lld", i ? ", " : "", len, d,
                                  (long long)expected[i]);
        else
            n += (size_t)snprintf(want + n, sizeof want - n, "%s%.*s", i ? ", " : "", len, d);
        d = comma ? comma + 1 : d + len;
    }
    if (n < sizeof want) snprintf(want + n, sizeof want - n, ndim == 1 ? ",)" : ")");
    if (v->ndim != ndim)
        return based_fail(BASED_STATUS_VALUE_ERROR, "%s must have %d dimensions %s, got %d dimensions %s", v->name,
                          (int)ndim, want, (int)v->ndim, based_format_shape(v, got, sizeof got));
    return based_fail(BASED_STATUS_VALUE_ERROR, "%s must have shape %s, got %s", v->name, want,
                      based_format_shape(v, got, sizeof got));
}

static const char *device_name(DLDevice d, char *buf, size_t size) {
    switch ((int)d.device_type) {
    case kDLCPU: snprintf(buf, size, "cpu"); break;
    case kDLCUDA: snprintf(buf, size, "cuda:%d", (int)d.device_id); break;
    case kDLCUDAHost: snprintf(buf, size, "cuda_host (pinned cpu)"); break;
    case kDLCUDAManaged: snprintf(buf, size, "cuda_managed:%d", (int)d.device_id); break;
    default: snprintf(buf, size, "device type %d id %d", (int)d.device_type, (int)d.device_id); break;
    }
    return buf;
}

static int is_host(DLDevice d) { return d.device_type == kDLCPU || d.device_type == kDLCUDAHost; }

based_status based_check_same_device(const based_view *const *views, int n) {
    const based_view *first = NULL;
    for (int i = 0; i < n; i++) {
        const based_view *v = views[i];
        if (v == NULL) continue;
        if (first == NULL) {
            first = v;
            continue;
        }
        int same = (is_host(v->device) && is_host(first->device)) ||
                   (v->device.device_type == first->device.device_type &&
                    v->device.device_id == first->device.device_id);
        if (!same) {
            char a[48], b[48];
            return based_fail(BASED_STATUS_VALUE_ERROR, "%s is on %s but %s is on %s: all tensors of one call must "
                              "be on one device", v->name, device_name(v->device, a, sizeof a), first->name,
                              device_name(first->device, b, sizeof b));
        }
    }
    return BASED_STATUS_OK;
}

based_status based_device_of(const based_view *v, const char *op, based_device *device) {
    device->kind = BASED_DEVICE_CPU;
    device->id = 0;
    if (is_host(v->device)) return BASED_STATUS_OK;
    if (v->device.device_type == kDLCUDA || v->device.device_type == kDLCUDAManaged) {
        device->kind = BASED_DEVICE_CUDA;
        device->id = v->device.device_id;
        return BASED_STATUS_OK;
    }
    char d[48];
    return based_fail(BASED_STATUS_VALUE_ERROR, "%s: %s is on %s; expected a CPU or CUDA tensor", op, v->name,
                      device_name(v->device, d, sizeof d));
}

based_status based_check_device(const based_view *const *views, int n, const char *op, based_device *device) {
    BASED_TRY(based_check_same_device(views, n));
    for (int i = 0; i < n; i++)
        if (views[i] != NULL) return based_device_of(views[i], op, device);
    device->kind = BASED_DEVICE_CPU;
    device->id = 0;
    return BASED_STATUS_OK;
}

based_status based_check_cuda_rows(const based_view *const *views, int n, based_device device, const char *op) {
    if (device.kind != BASED_DEVICE_CUDA) return BASED_STATUS_OK;
    for (int i = 0; i < n; i++)
        if (views[i]->dtype == BASED_DTYPE_FLOAT64)
            return based_fail(BASED_STATUS_TYPE_ERROR,
                              "%s: %s is float64 on cuda:%d; the CUDA kernels compute in float32, float16 and bfloat16",
                              op, views[i]->name, (int)device.id);
    for (int i = 0; i < n; i++) {
        const based_view *v = views[i];
        if (v->ndim < 1) continue;
        const int64_t size = v->shape[v->ndim - 1], stride = v->strides[v->ndim - 1];
        if (size > 1 && stride != 1)
            return based_fail(BASED_STATUS_VALUE_ERROR,
                              "%s: on CUDA, %s must have unit stride along its last dim (of size %lld), got stride "
                              "%lld; pass .contiguous()",
                              op, v->name, (long long)size, (long long)stride);
    }
    return BASED_STATUS_OK;
}

based_status based_check_no_self_overlap(const based_view *v) {
    if (v->numel <= 1) return BASED_STATUS_OK;
    int axes[BASED_MAX_NDIM];
    int n = 0;
    for (int32_t i = 0; i < v->ndim; i++) {
        if (v->shape[i] <= 1) continue;
        if (v->strides[i] == 0)
            return based_fail(BASED_STATUS_VALUE_ERROR,
                              "%s has overlapping memory (stride 0 along axis %d of size %lld); it is written to, "
                              "so every element needs its own memory",
                              v->name, (int)i, (long long)v->shape[i]);
        axes[n++] = i;
    }
    /* sort axes by |stride| (insertion sort, n <= 16) */
    for (int i = 1; i < n; i++) {
        int a = axes[i], j = i - 1;
        while (j >= 0 && llabs(v->strides[axes[j]]) > llabs(v->strides[a])) {
            axes[j + 1] = axes[j];
            j--;
        }
        axes[j + 1] = a;
    }
    int64_t extent = 0; /* largest offset reachable by the smaller axes */
    for (int i = 0; i < n; i++) {
        int64_t s = llabs(v->strides[axes[i]]);
        if (s <= extent)
            return based_fail(BASED_STATUS_VALUE_ERROR,
                              "%s has overlapping memory (its strides let two elements share an address); it is "
                              "written to, so every element needs its own memory",
                              v->name);
        extent += s * (v->shape[axes[i]] - 1);
    }
    return BASED_STATUS_OK;
}

based_status based_check_disjoint(const based_view *a, const based_view *b) {
    if (a->numel == 0 || b->numel == 0) return BASED_STATUS_OK;
    if (a->device.device_type != b->device.device_type) return BASED_STATUS_OK;
    uintptr_t a0 = (uintptr_t)a->data + (uintptr_t)(a->lo * a->itemsize);
    uintptr_t a1 = (uintptr_t)a->data + (uintptr_t)((a->hi + 1) * a->itemsize);
    uintptr_t b0 = (uintptr_t)b->data + (uintptr_t)(b->lo * b->itemsize);
    uintptr_t b1 = (uintptr_t)b->data + (uintptr_t)((b->hi + 1) * b->itemsize);
    if (a1 <= b0 || b1 <= a0) return BASED_STATUS_OK;
    return based_fail(BASED_STATUS_VALUE_ERROR, "%s shares memory with %s; pass a separate buffer", a->name, b->name);
}

based_status based_check_writes(const based_view *const *written, int nw, const based_view *const *read, int nr) {
    for (int i = 0; i < nw; i++) BASED_TRY(based_check_no_self_overlap(written[i]));
    for (int i = 0; i < nw; i++) {
        for (int j = i + 1; j < nw; j++) BASED_TRY(based_check_disjoint(written[i], written[j]));
        for (int j = 0; j < nr; j++) BASED_TRY(based_check_disjoint(written[i], read[j]));
    }
    return BASED_STATUS_OK;
}

based_status based_check_scalar(double value, const char *name, int positive) {
    if (isfinite(value) && (positive ? value > 0 : value >= 0)) return BASED_STATUS_OK;
    return based_fail(BASED_STATUS_VALUE_ERROR, "%s must be a finite number %s 0, got %g", name,
                      positive ? ">" : ">=", value);
}
