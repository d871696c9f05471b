/*
 * dlpack_import.c -- the consumer side of DLPack: borrow any object's memory for the
 * length of one call, zero-copy.
 *
 * Protocol (DLPack Python spec; shared/notes/dlpack.md section 4):
 *   1. __dlpack_device__() says where the data lives;
 *   2. __dlpack__(max_version=(1, 0)[, stream=s]) asks for a versioned capsule; a
 *      producer that predates max_version raises TypeError and is asked again
 *      without it (JAX answers only that way);
 *   3. every field of the tensor is checked (check_tensor) before anything reads
 *      through it;
 *   4. the capsule is renamed "used_..." (we own the managed tensor from then on)
 *      and its deleter is called exactly once, in based_py_release();
 *   5. a capsule we refuse is dropped unrenamed, so its producer frees it.
 * based.Buffer skips the capsule dance: we hold a reference to the Buffer instead (its
 * tensor is ours, built by based_buffer_new). Types that publish the DLPack 1.3 C
 * exchange table (torch) hand over an owning versioned tensor through it directly, for
 * host memory, which saves ~4 us per tensor per call; it is checked the same way.
 *
 * A producer's deleter or capsule destructor may run Python code, and may run while an
 * error of ours is being raised: run_foreign_* set that error aside around the call and
 * put it back, so the caller sees it and not a SystemError.
 */
#include "pybased.h" /* Python.h first: it sets feature-test macros */

#include <stdint.h>

#include "../internal.h" /* BASED_MAX_NDIM: the most dimensions a based_view holds */

static const char CAPSULE_VERSIONED[] = "dltensor_versioned";
static const char CAPSULE_LEGACY[] = "dltensor";
static const char CAPSULE_USED_VERSIONED[] = "used_dltensor_versioned";
static const char CAPSULE_USED_LEGACY[] = "used_dltensor";

DLTensor *based_buffer_dltensor(PyObject *buffer, int *readonly); /* buffer.c */

/* ---------------------------------------------------------------------------------
 * Producer code run on our behalf
 * --------------------------------------------------------------------------------- */

/* After producer code ran with our exception set aside: anything it left set goes to
 * sys.unraisablehook (a deleter has no way to report failure), then ours is back. */
static void foreign_code_done(PyObject *type, PyObject *value, PyObject *tb, const char *what, const char *name) {
    if (PyErr_Occurred()) {
        PyObject *t2, *v2, *tb2;
        PyErr_Fetch(&t2, &v2, &tb2);
        PyObject *where = PyUnicode_FromFormat("the DLPack %s of %s", what, name ? name : "an argument");
        PyErr_Restore(t2, v2, tb2);
        PyErr_WriteUnraisable(where); /* clears it; where == NULL (no memory) is allowed */
        Py_XDECREF(where);
    }
    PyErr_Restore(type, value, tb);
}

/* Calls a managed tensor's deleter (once; NULL deleter: nothing to free). */
static void run_foreign_deleter(void *managed, int versioned, const char *name) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (versioned) {
        DLManagedTensorVersioned *m = managed;
        if (m->deleter) m->deleter(m);
    } else {
        DLManagedTensor *m = managed;
        if (m->deleter) m->deleter(m);
    }
    foreign_code_done(type, value, tb, "deleter", name);
}

/* Drops our reference to a capsule; if it was the last, the producer's destructor runs. */
static void drop_capsule(PyObject *cap, const char *name) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    Py_DECREF(cap);
    foreign_code_done(type, value, tb, "capsule destructor", name);
}

/* ---------------------------------------------------------------------------------
 * Checks
 * --------------------------------------------------------------------------------- */

static int supported_device(long type) {
    return type == kDLCPU || type == kDLCUDA || type == kDLCUDAHost || type == kDLCUDAManaged;
}

/* Every field of a producer's DLTensor, checked before anything reads through it: ndim
 * before shape; shape values and element count; the dtype; the device (and that it is the
 * one __dlpack_device__ declared, when declared_type >= 0); then, for a non-empty tensor,
 * strides, data and byte_offset: the bytes the elements span must lie inside the address
 * space and within 64-bit indexing. Returns 0, or -1 with ValueError (TypeError for the
 * dtype) naming the argument. The C core checks shapes, dtypes and strides again against
 * each op's rules; this makes the tensor safe to read at all. */
static int check_tensor(const DLTensor *t, const char *name, long declared_type, long declared_id) {
    if (t->ndim < 0 || t->ndim > BASED_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "%s: DLTensor.ndim is %d; based takes 0 to %d dimensions", name, (int)t->ndim,
                     BASED_MAX_NDIM);
        return -1;
    }
    if (t->ndim > 0 && t->shape == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: DLTensor.shape is NULL for ndim %d", name, (int)t->ndim);
        return -1;
    }
    const DLDataType dt = t->dtype;
    if (dt.code > kDLFloat4_e2m1fn) {
        PyErr_Format(PyExc_TypeError, "%s has DLPack dtype code %d, which DLPack %d.%d does not define (codes 0 to %d)",
                     name, (int)dt.code, DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION, (int)kDLFloat4_e2m1fn);
        return -1;
    }
    if (dt.bits == 0) {
        PyErr_Format(PyExc_TypeError, "%s has a DLPack dtype of 0 bits (code %d)", name, (int)dt.code);
        return -1;
    }
    if (dt.lanes != 1) {
        char desc[64];
        based_py_describe_dtype(dt, desc, sizeof desc);
        PyErr_Format(PyExc_TypeError, "%s has DLPack dtype %s; based takes one element per lane (lanes = 1)", name,
                     desc);
        return -1;
    }
    const long type = (long)t->device.device_type, id = (long)t->device.device_id;
    if (!supported_device(type)) {
        PyErr_Format(PyExc_ValueError, "%s is on DLPack device type %ld (id %ld); based takes CPU and CUDA arrays",
                     name, type, id);
        return -1;
    }
    if (id < 0) {
        PyErr_Format(PyExc_ValueError, "%s: DLTensor.device has id %ld; DLPack device ids are 0 to %ld", name, id,
                     (long)INT32_MAX);
        return -1;
    }
    if (declared_type >= 0 && (type != declared_type || id != declared_id)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: __dlpack__() exported a tensor on DLPack device (%ld, %ld), but __dlpack_device__() said "
                     "(%ld, %ld)",
                     name, type, id, declared_type, declared_id);
        return -1;
    }
    int64_t numel = 1;
    for (int32_t i = 0; i < t->ndim; i++) {
        const int64_t n = t->shape[i];
        if (n < 0) {
            PyErr_Format(PyExc_ValueError, "%s: dimension %d has negative size %lld", name, (int)i, (long long)n);
            return -1;
        }
        if (__builtin_mul_overflow(numel, n, &numel)) {
            PyErr_Format(PyExc_ValueError, "%s: element count overflows 64-bit indexing (dimension %d of size %lld)",
                         name, (int)i, (long long)n);
            return -1;
        }
    }
    /* data + byte_offset: nothing is read at an empty tensor, but the pointer is still formed */
    const uintptr_t data = (uintptr_t)t->data;
    uintptr_t start;
#if UINTPTR_MAX < UINT64_MAX
    const int offset_too_big = t->byte_offset > UINTPTR_MAX;
#else
    const int offset_too_big = 0;
#endif
    if (offset_too_big || __builtin_add_overflow(data, (uintptr_t)t->byte_offset, &start)) {
        PyErr_Format(PyExc_ValueError, "%s: data + byte_offset (%p + %llu) wraps around the address space", name,
                     t->data, (unsigned long long)t->byte_offset);
        return -1;
    }
    if (numel == 0) return 0;
    if (t->data == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: data pointer is NULL for a non-empty tensor", name);
        return -1;
    }
    /* element offsets reached, [lo, hi]; NULL strides: row-major (within numel, so no overflow) */
    int64_t lo = 0, hi = 0, row_major = 1;
    for (int32_t i = t->ndim - 1; i >= 0; i--) {
        const int64_t n = t->shape[i];
        const int64_t stride = t->strides ? t->strides[i] : row_major;
        if (t->strides == NULL) row_major *= n;
        int64_t span;
        if (__builtin_mul_overflow(stride, n - 1, &span) ||
            __builtin_add_overflow(span < 0 ? lo : hi, span, span < 0 ? &lo : &hi)) {
            PyErr_Format(PyExc_ValueError, "%s: strides address memory beyond 64-bit indexing (axis %d, stride %lld)",
                         name, (int)i, (long long)stride);
            return -1;
        }
    }
    const int64_t itemsize = (dt.bits + 7) / 8;
    int64_t lo_bytes, end_bytes, extent;
    if (__builtin_mul_overflow(lo, itemsize, &lo_bytes) || __builtin_add_overflow(hi, 1, &end_bytes) ||
        __builtin_mul_overflow(end_bytes, itemsize, &end_bytes) ||
        __builtin_sub_overflow(end_bytes, lo_bytes, &extent)) {
        PyErr_Format(PyExc_ValueError, "%s: byte extent overflows 64-bit indexing", name);
        return -1;
    }
    /* the bytes [start + lo_bytes, start + end_bytes) must not wrap around */
    uintptr_t last;
    if ((uintptr_t)0 - (uintptr_t)lo_bytes > start || __builtin_add_overflow(start, (uintptr_t)end_bytes, &last)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: its elements span %lld bytes from data + byte_offset = %p, which wraps around the "
                     "address space",
                     name, (long long)extent, (void *)start);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------
 * Import
 * --------------------------------------------------------------------------------- */

static int read_device(PyObject *module, PyObject *obj, const char *name, long *type, long *id) {
    based_module_state *st = based_get_state(module);
    PyObject *meth = PyObject_GetAttr(obj, st->str_dlpack_device);
    if (meth == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s has __dlpack__ but no __dlpack_device__ (DLPack producers have both); got %.200s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *dev = PyObject_CallNoArgs(meth);
    Py_DECREF(meth);
    if (dev == NULL) return -1;
    if (!PyTuple_Check(dev) || PyTuple_GET_SIZE(dev) != 2) {
        PyErr_Format(PyExc_TypeError, "%s.__dlpack_device__() must return a (device_type, device_id) tuple, got %R",
                     name, dev);
        Py_DECREF(dev);
        return -1;
    }
    *type = PyLong_AsLong(PyTuple_GET_ITEM(dev, 0));
    *id = PyLong_AsLong(PyTuple_GET_ITEM(dev, 1));
    Py_DECREF(dev);
    if ((*type == -1 || *id == -1) && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s.__dlpack_device__() must return two integers", name);
        return -1;
    }
    if (*id < 0 || *id > (long)INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s.__dlpack_device__() returned device id %ld; DLPack device ids are 0 to %ld",
                     name, *id, (long)INT32_MAX);
        return -1;
    }
    return 0;
}

/* Calls obj.__dlpack__ with max_version (and stream for device memory), retrying
 * without max_version for producers that do not know the keyword. */
static PyObject *request_capsule(PyObject *module, PyObject *obj, const char *name, long device_type,
                                 PyObject *stream) {
    based_module_state *st = based_get_state(module);
    int with_stream = device_type != kDLCPU && device_type != kDLCUDAHost && stream != NULL && stream != Py_None;
    PyObject *args[3] = {obj, NULL, NULL};
    PyObject *cap;
    if (with_stream) {
        args[1] = stream;
        args[2] = st->max_version;
        cap = PyObject_VectorcallMethod(st->str_dlpack, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                        st->kw_stream_max_version);
    } else {
        args[1] = st->max_version;
        cap = PyObject_VectorcallMethod(st->str_dlpack, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                        st->kw_max_version);
    }
    if (cap == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear(); /* a producer from before DLPack 1.0: no max_version */
        if (with_stream) {
            args[1] = stream;
            cap = PyObject_VectorcallMethod(st->str_dlpack, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, st->kw_stream);
        } else {
            cap = PyObject_VectorcallMethod(st->str_dlpack, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        }
    }
    if (cap == NULL && PyErr_ExceptionMatches(PyExc_BufferError)) {
        /* e.g. numpy refusing a non-native byte order or an odd dtype: keep its words */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        PyErr_Format(PyExc_TypeError, "%s cannot be exported through DLPack: %S", name, value);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    }
    return cap;
}

/* The class in type's MRO whose own __dict__ holds the exchange table, or NULL, also when
 * a class before it defines its own __dlpack__ (a subclass that overrides the export, e.g.
 * to refuse it or to synchronise a stream: its export must run). */
static PyTypeObject *exchange_provider(based_module_state *st, PyTypeObject *type) {
    PyObject *mro = type->tp_mro;
    if (mro == NULL || !PyTuple_Check(mro)) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(mro); i++) {
        PyTypeObject *t = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if (t->tp_dict == NULL) continue;
        if (PyDict_GetItemWithError(t->tp_dict, st->str_exchange_api) != NULL) return t;
        if (!PyErr_Occurred() && PyDict_GetItemWithError(t->tp_dict, st->str_dlpack) != NULL) return NULL;
        if (PyErr_Occurred()) {
            PyErr_Clear();
            return NULL;
        }
    }
    return NULL;
}

/* The DLPack C exchange table of obj's type, or NULL (cached per type; never fails). */
static const DLPackExchangeAPI *exchange_api(based_module_state *st, PyTypeObject *type) {
    for (int i = 0; i < 4; i++)
        if (st->api_types[i] == type) return st->apis[i];
    const DLPackExchangeAPI *api = NULL;
    PyTypeObject *provider = exchange_provider(st, type);
    PyObject *cap = NULL;
    if (provider != NULL) cap = PyObject_GetAttr((PyObject *)provider, st->str_exchange_api);
    if (cap == NULL) {
        PyErr_Clear();
    } else {
        if (PyCapsule_IsValid(cap, "dlpack_exchange_api")) {
            const DLPackExchangeAPIHeader *h = PyCapsule_GetPointer(cap, "dlpack_exchange_api");
            while (h != NULL && h->version.major > 1) h = h->prev_api;  /* an older table we can read */
            if (h != NULL && h->version.major == 1) api = (const DLPackExchangeAPI *)h;
        }
        Py_DECREF(cap); /* the table itself is static in its library, alive for the process */
    }
    int slot = st->api_next;
    st->api_next = (slot + 1) % 4;
    Py_XSETREF(st->api_types[slot], (PyTypeObject *)Py_NewRef(type));
    st->apis[slot] = api;
    return api;
}

int based_py_import(PyObject *module, PyObject *obj, const char *name, int writable, PyObject *stream,
                    based_py_tensor *out) {
    based_module_state *st = based_get_state(module);
    *out = (based_py_tensor)BASED_PY_TENSOR_INIT;
    out->name = name;

    if (Py_IS_TYPE(obj, st->buffer_type)) {
        int ro = 0;
        out->tensor = based_buffer_dltensor(obj, &ro);
        out->readonly = ro;
        out->owner = Py_NewRef(obj);
        goto check_writable;
    }

    /* Fast path (DLPack 1.3 C exchange API, e.g. torch): no Python-level __dlpack__ call.
     * Host memory only: CUDA producers go through __dlpack__ so the stream handshake
     * happens. Any failure falls back to the protocol below, which gives the canonical
     * error message. */
    const DLPackExchangeAPI *api = exchange_api(st, Py_TYPE(obj));
    if (api != NULL && api->managed_tensor_from_py_object_no_sync != NULL) {
        DLManagedTensorVersioned *m = NULL;
        if (api->managed_tensor_from_py_object_no_sync(obj, &m) == 0 && m != NULL) {
            DLDeviceType dt = m->dl_tensor.device.device_type;
            if (m->version.major == 1 && (dt == kDLCPU || dt == kDLCUDAHost) &&
                check_tensor(&m->dl_tensor, name, -1, -1) == 0) {
                out->managed = m;
                out->versioned = 1;
                out->tensor = &m->dl_tensor;
                out->readonly = (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
                goto check_writable;
            }
            PyErr_Clear(); /* a refused tensor: the protocol below says why */
            run_foreign_deleter(m, 1, name);
        } else {
            PyErr_Clear();
        }
    }

    PyObject *dl = PyObject_GetAttr(obj, st->str_dlpack);
    if (dl == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s must be an array implementing the DLPack protocol (__dlpack__ and __dlpack_device__), "
                     "such as a torch.Tensor or numpy.ndarray; got %.200s",
                     name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    Py_DECREF(dl);

    long device_type, device_id;
    if (read_device(module, obj, name, &device_type, &device_id) < 0) return -1;
    if (!supported_device(device_type)) {
        PyErr_Format(PyExc_ValueError, "%s is on DLPack device type %ld (id %ld); based takes CPU and CUDA arrays",
                     name, device_type, device_id);
        return -1;
    }

    PyObject *cap = request_capsule(module, obj, name, device_type, stream);
    if (cap == NULL) return -1;

    /* Checked while the capsule is still unrenamed: a refused one goes back to its
     * producer, whose destructor frees it. */
    if (PyCapsule_IsValid(cap, CAPSULE_VERSIONED)) {
        DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, CAPSULE_VERSIONED);
        if (m == NULL) goto fail;
        if (m->version.major != 1) {
            /* read nothing else */
            PyErr_Format(PyExc_TypeError, "%s was exported with DLPack %u.%u; based reads major version 1", name,
                         (unsigned)m->version.major, (unsigned)m->version.minor);
            goto fail;
        }
        if (check_tensor(&m->dl_tensor, name, device_type, device_id) < 0) goto fail;
        if (PyCapsule_SetName(cap, CAPSULE_USED_VERSIONED) < 0) goto fail;
        out->managed = m;
        out->versioned = 1;
        out->tensor = &m->dl_tensor;
        out->readonly = (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
    } else if (PyCapsule_IsValid(cap, CAPSULE_LEGACY)) {
        DLManagedTensor *m = PyCapsule_GetPointer(cap, CAPSULE_LEGACY);
        if (m == NULL) goto fail;
        if (check_tensor(&m->dl_tensor, name, device_type, device_id) < 0) goto fail;
        if (PyCapsule_SetName(cap, CAPSULE_USED_LEGACY) < 0) goto fail;
        out->managed = m;
        out->versioned = 0;
        out->tensor = &m->dl_tensor;
        out->readonly = 0; /* legacy capsules cannot say; treated as writable, like torch and CuPy do */
    } else {
        PyErr_Format(PyExc_TypeError,
                     "%s.__dlpack__() did not return an unused DLPack capsule (got %.200s); was it already consumed?",
                     name, Py_TYPE(cap)->tp_name);
        goto fail;
    }
    drop_capsule(cap, name); /* renamed: its destructor leaves the tensor to us */

check_writable:
    if (writable && out->readonly) {
        based_py_release(out);
        PyErr_Format(PyExc_ValueError,
                     "%s is read-only (exported with the DLPack read-only flag), but based writes into it; pass a "
                     "writable array",
                     name);
        return -1;
    }
    return 0;

fail:
    drop_capsule(cap, name); /* keeps our exception */
    return -1;
}

int based_py_import_optional(PyObject *module, PyObject *obj, const char *name, int writable, PyObject *stream,
                             based_py_tensor *out) {
    if (obj == Py_None) {
        *out = (based_py_tensor)BASED_PY_TENSOR_INIT;
        return 0;
    }
    return based_py_import(module, obj, name, writable, stream, out);
}

void based_py_release(based_py_tensor *t) {
    const based_py_tensor held = *t;
    *t = (based_py_tensor)BASED_PY_TENSOR_INIT; /* emptied first: released once, whatever the deleter runs */
    if (held.managed != NULL) run_foreign_deleter(held.managed, held.versioned, held.name);
    Py_XDECREF(held.owner); /* a based.Buffer: its dealloc runs no Python code */
}

void based_py_release_all(based_py_tensor *ts, int n) {
    for (int i = 0; i < n; i++) based_py_release(&ts[i]);
}

int based_py_import_many(PyObject *module, PyObject *const *objs, const char *const *names, int n,
                         unsigned written, unsigned optional, PyObject *stream, based_py_tensor *out) {
    for (int i = 0; i < n; i++) out[i] = (based_py_tensor)BASED_PY_TENSOR_INIT;
    for (int i = 0; i < n; i++) {
        int w = (written >> i) & 1u;
        int rc = ((optional >> i) & 1u) ? based_py_import_optional(module, objs[i], names[i], w, stream, &out[i])
                                        : based_py_import(module, objs[i], names[i], w, stream, &out[i]);
        if (rc < 0) {
            based_py_release_all(out, i); /* with the error about objs[i] pending: it survives */
            return -1;
        }
    }
    return 0;
}

PyObject *based_py_finish(based_status st, based_py_tensor *ts, int n) {
    /* raised first: a deleter may run Python that calls based, overwriting this thread's last error */
    PyObject *res = st == BASED_STATUS_OK ? Py_NewRef(Py_None) : based_py_raise(st);
    based_py_release_all(ts, n);
    return res;
}
