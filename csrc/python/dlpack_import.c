/*
 * dlpack_import.c -- the consumer side of DLPack: borrow any object's memory for the
 * length of one call, zero-copy.
 *
 * Protocol (DLPack Python spec; shared/notes/dlpack.md section 4):
 *   1. __dlpack_device__() says where the data lives;
 *   2. __dlpack__(max_version=(1, 0)[, stream=s]) asks for a versioned capsule; a
 *      producer that predates max_version raises TypeError and is asked again
 *      without it (JAX answers only that way);
 *   3. the capsule is renamed "used_..." (we own the managed tensor from then on)
 *      and its deleter is called exactly once, in based_py_release();
 *   4. a capsule we refuse is dropped unrenamed, so its producer frees it.
 * based.Buffer skips the capsule dance: we hold a reference to the Buffer instead. Types
 * that publish the DLPack 1.3 C exchange table (torch) hand over an owning versioned
 * tensor through it directly, for host memory, which saves ~4 us per tensor per call.
 *
 * A producer's deleter or capsule destructor may run Python code, and may run while an
 * error of ours is being raised: run_foreign_* set that error aside around the call and
 * put it back, so the caller sees it and not a SystemError.
 */
#include "pybased.h"

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
            if (m->version.major == 1 && (dt == kDLCPU || dt == kDLCUDAHost)) {
                out->managed = m;
                out->versioned = 1;
                out->tensor = &m->dl_tensor;
                out->readonly = (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
                goto check_writable;
            }
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
    if (device_type != kDLCPU && device_type != kDLCUDA && device_type != kDLCUDAHost &&
        device_type != kDLCUDAManaged) {
        PyErr_Format(PyExc_ValueError, "%s is on DLPack device type %ld (id %ld); based takes CPU and CUDA arrays",
                     name, device_type, device_id);
        return -1;
    }

    PyObject *cap = request_capsule(module, obj, name, device_type, stream);
    if (cap == NULL) return -1;

    if (PyCapsule_IsValid(cap, CAPSULE_VERSIONED)) {
        DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, CAPSULE_VERSIONED);
        if (m == NULL) goto fail;
        if (m->version.major != 1) {
            /* read nothing else; the unrenamed capsule goes back to its producer */
            PyErr_Format(PyExc_TypeError, "%s was exported with DLPack %u.%u; based reads major version 1", name,
                         (unsigned)m->version.major, (unsigned)m->version.minor);
            goto fail;
        }
        if (PyCapsule_SetName(cap, CAPSULE_USED_VERSIONED) < 0) goto fail;
        out->managed = m;
        out->versioned = 1;
        out->tensor = &m->dl_tensor;
        out->readonly = (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
    } else if (PyCapsule_IsValid(cap, CAPSULE_LEGACY)) {
        DLManagedTensor *m = PyCapsule_GetPointer(cap, CAPSULE_LEGACY);
        if (m == NULL) goto fail;
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
                         unsigned written, unsigned optional, based_py_tensor *out) {
    for (int i = 0; i < n; i++) out[i] = (based_py_tensor)BASED_PY_TENSOR_INIT;
    for (int i = 0; i < n; i++) {
        int w = (written >> i) & 1u;
        int rc = ((optional >> i) & 1u) ? based_py_import_optional(module, objs[i], names[i], w, Py_None, &out[i])
                                        : based_py_import(module, objs[i], names[i], w, Py_None, &out[i]);
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
