/*
 * buffer.c -- based.Buffer: memory based allocates itself (a state created with no
 * framework at hand), handed to any DLPack consumer without a copy.
 *
 * Ownership: the bytes live in a based_storage with an atomic reference count. The
 * Buffer holds one reference and every exported DLPack tensor holds one more, so an
 * export outlives the Buffer (torch.from_dlpack(buf); del buf). The DLPack deleter
 * only drops that count and frees plain malloc'd memory: it touches no Python object,
 * so any thread may call it, with or without the GIL, even after finalisation.
 */
#include "pybased.h" /* Python.h first: it sets feature-test macros */

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    atomic_llong refcount;
    void *ptr;
    size_t nbytes;
    DLDevice device;
} based_storage;

static atomic_llong live_storages;

long long based_buffer_live_count(void) { return atomic_load(&live_storages); }

/* Host memory is 256-byte aligned (JAX makes zero-copy views only of 64-byte
 * aligned data) and never NULL, even for zero bytes. */
static based_storage *storage_new(size_t nbytes, DLDevice device, const void *copy_from) {
    based_storage *s = malloc(sizeof *s);
    if (s == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    atomic_init(&s->refcount, 1);
    s->nbytes = nbytes;
    s->device = device;
    s->ptr = NULL;
    if (device.device_type == kDLCPU) {
        size_t rounded = (nbytes + 255u) & ~(size_t)255u;
        if (rounded < nbytes || (s->ptr = aligned_alloc(256, rounded ? rounded : 256)) == NULL) {
            free(s);
            PyErr_Format(PyExc_MemoryError, "based: cannot allocate %zu bytes of host memory", nbytes);
            return NULL;
        }
        if (copy_from) memcpy(s->ptr, copy_from, nbytes);
        else memset(s->ptr, 0, nbytes);
    } else {
        const int count = based_cuda_device_count();
        if (based_built_with_cuda() && (device.device_id < 0 || device.device_id >= count)) {
            free(s);
            if (count == 0)
                PyErr_Format(PyExc_ValueError,
                             "device cuda:%d: this machine has no usable CUDA device (no GPU, or no CUDA driver; "
                             "based.cuda_available() is False); use device='cpu'",
                             (int)device.device_id);
            else
                PyErr_Format(PyExc_ValueError, "device cuda:%d: this machine has %d CUDA device%s (cuda:0..cuda:%d)",
                             (int)device.device_id, count, count == 1 ? "" : "s", count - 1);
            return NULL;
        }
        const int id = (int)device.device_id;
        based_status st = based_cuda_malloc_zeroed(&s->ptr, nbytes ? nbytes : 256, id);
        if (st == BASED_STATUS_OK && copy_from) st = based_cuda_memcpy(s->ptr, copy_from, nbytes, id);
        if (st != BASED_STATUS_OK) {
            if (s->ptr) based_cuda_free(s->ptr, id);
            free(s);
            based_py_raise(st); /* MemoryError, RuntimeError, or NotImplementedError without CUDA */
            return NULL;
        }
    }
    atomic_fetch_add(&live_storages, 1);
    return s;
}

static void storage_incref(based_storage *s) { atomic_fetch_add(&s->refcount, 1); }

/* No Python API here: called from DLPack deleters on any thread. */
static void storage_decref(based_storage *s) {
    if (atomic_fetch_sub(&s->refcount, 1) != 1) return;
    if (s->device.device_type == kDLCPU) {
        free(s->ptr);
    } else {
        based_cuda_free(s->ptr, (int)s->device.device_id);
    }
    atomic_fetch_sub(&live_storages, 1);
    free(s);
}

typedef struct {
    PyObject_HEAD
    based_storage *storage;
    DLTensor tensor;
    int64_t shape[BASED_MAX_NDIM];
    int64_t strides[BASED_MAX_NDIM];
} BufferObject;

DLTensor *based_buffer_dltensor(PyObject *buffer, int *readonly) {
    *readonly = 0;
    return &((BufferObject *)buffer)->tensor;
}

static const struct {
    const char *name;
    DLDataType dtype;
} dtype_table[] = {
    {"float32", {kDLFloat, 32, 1}}, {"float64", {kDLFloat, 64, 1}}, {"float16", {kDLFloat, 16, 1}},
    {"bfloat16", {kDLBfloat, 16, 1}}, {"int64", {kDLInt, 64, 1}},
};

int based_py_parse_dtype(PyObject *name, DLDataType *out) {
    if (PyUnicode_Check(name)) {
        const char *s = PyUnicode_AsUTF8(name);
        if (s == NULL) return -1;
        for (size_t i = 0; i < sizeof dtype_table / sizeof dtype_table[0]; i++)
            if (strcmp(s, dtype_table[i].name) == 0) {
                *out = dtype_table[i].dtype;
                return 0;
            }
    }
    PyErr_Format(PyExc_TypeError, "dtype must be one of 'float32', 'float64', 'float16', 'bfloat16', 'int64', got %R",
                 name);
    return -1;
}

const char *based_py_dtype_name(DLDataType t) {
    for (size_t i = 0; i < sizeof dtype_table / sizeof dtype_table[0]; i++)
        if (dtype_table[i].dtype.code == t.code && dtype_table[i].dtype.bits == t.bits && t.lanes == 1)
            return dtype_table[i].name;
    return NULL;
}

void based_py_describe_dtype(DLDataType t, char *buf, size_t size) {
    const char *known = based_py_dtype_name(t);
    static const char *codes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
    if (known != NULL) snprintf(buf, size, "%s", known);
    else if (t.code == kDLBool) snprintf(buf, size, "bool");
    else if (t.code <= kDLBool) snprintf(buf, size, "%s%d", codes[t.code], (int)t.bits);
    else snprintf(buf, size, "float%d (DLPack code %d)", (int)t.bits, (int)t.code);
    if (t.lanes != 1) {
        size_t n = strlen(buf);
        snprintf(buf + n, size - n, " with %d lanes", (int)t.lanes);
    }
}

PyObject *based_buffer_new(PyObject *module, const int64_t *shape, int ndim, DLDataType dtype, DLDevice device) {
    based_module_state *st = based_get_state(module);
    if (ndim < 0 || ndim > BASED_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "based.Buffer: at most %d dimensions, got %d", BASED_MAX_NDIM, ndim);
        return NULL;
    }
    size_t itemsize = (size_t)(dtype.bits / 8);
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) {
            PyErr_Format(PyExc_ValueError, "based.Buffer: negative dimension %lld", (long long)shape[i]);
            return NULL;
        }
        if (__builtin_mul_overflow(numel, shape[i], &numel)) goto too_big;
    }
    size_t nbytes;
    if (__builtin_mul_overflow((size_t)numel, itemsize, &nbytes)) goto too_big;

    BufferObject *self = (BufferObject *)st->buffer_type->tp_alloc(st->buffer_type, 0);
    if (self == NULL) return NULL;
    self->storage = storage_new(nbytes, device, NULL);
    if (self->storage == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    int64_t stride = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        self->shape[i] = shape[i];
        self->strides[i] = stride;
        stride *= shape[i] > 1 ? shape[i] : 1;
    }
    self->tensor.data = self->storage->ptr;
    self->tensor.device = device;
    self->tensor.ndim = ndim;
    self->tensor.dtype = dtype;
    self->tensor.shape = ndim ? self->shape : NULL;
    self->tensor.strides = ndim ? self->strides : NULL;
    self->tensor.byte_offset = 0;
    return (PyObject *)self;

too_big:
    PyErr_SetString(PyExc_ValueError, "based.Buffer: size overflows 64-bit indexing");
    return NULL;
}

static void buffer_dealloc(BufferObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    if (self->storage) storage_decref(self->storage);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* ---------------------------------------------------------------------------------
 * Export
 * --------------------------------------------------------------------------------- */

static void deleter_versioned(DLManagedTensorVersioned *self) {
    storage_decref(self->manager_ctx);
    free(self);
}

static void deleter_legacy(DLManagedTensor *self) {
    storage_decref(self->manager_ctx);
    free(self);
}

/* A capsule nobody consumed frees its tensor; a consumed ("used_...") one is the
 * consumer's to free. Any exception in flight survives. */
static void capsule_destructor_versioned(PyObject *cap) {
    if (PyCapsule_IsValid(cap, "used_dltensor_versioned")) return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, "dltensor_versioned");
    if (m == NULL) PyErr_WriteUnraisable(cap);
    else if (m->deleter) m->deleter(m);
    PyErr_Restore(type, value, tb);
}

static void capsule_destructor_legacy(PyObject *cap) {
    if (PyCapsule_IsValid(cap, "used_dltensor")) return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    DLManagedTensor *m = PyCapsule_GetPointer(cap, "dltensor");
    if (m == NULL) PyErr_WriteUnraisable(cap);
    else if (m->deleter) m->deleter(m);
    PyErr_Restore(type, value, tb);
}

static PyObject *export_capsule(BufferObject *self, int versioned, int copy) {
    int ndim = self->tensor.ndim;
    size_t head = versioned ? sizeof(DLManagedTensorVersioned) : sizeof(DLManagedTensor);
    char *block = malloc(head + 2 * (size_t)ndim * sizeof(int64_t) + 1);
    if (block == NULL) return PyErr_NoMemory();
    based_storage *storage = self->storage;
    if (copy) {
        storage = storage_new(self->storage->nbytes, self->storage->device, self->storage->ptr);
        if (storage == NULL) {
            free(block);
            return NULL;
        }
    } else {
        storage_incref(storage);
    }
    int64_t *shape = (int64_t *)(block + head), *strides = shape + ndim;
    for (int i = 0; i < ndim; i++) {
        shape[i] = self->shape[i];
        strides[i] = self->strides[i];
    }
    DLTensor *t;
    if (versioned) {
        DLManagedTensorVersioned *m = (DLManagedTensorVersioned *)block;
        m->version.major = DLPACK_MAJOR_VERSION;
        m->version.minor = DLPACK_MINOR_VERSION;
        m->manager_ctx = storage;
        m->deleter = deleter_versioned;
        m->flags = copy ? DLPACK_FLAG_BITMASK_IS_COPIED : 0;
        t = &m->dl_tensor;
    } else {
        DLManagedTensor *m = (DLManagedTensor *)block;
        m->manager_ctx = storage;
        m->deleter = deleter_legacy;
        t = &m->dl_tensor;
    }
    *t = self->tensor;
    t->data = storage->ptr;
    t->shape = ndim ? shape : NULL;
    t->strides = ndim ? strides : NULL;
    t->byte_offset = 0;
    PyObject *cap = versioned ? PyCapsule_New(block, "dltensor_versioned", capsule_destructor_versioned)
                              : PyCapsule_New(block, "dltensor", capsule_destructor_legacy);
    if (cap == NULL) {
        if (versioned) deleter_versioned((DLManagedTensorVersioned *)block);
        else deleter_legacy((DLManagedTensor *)block);
    }
    return cap;
}

static int same_device_request(PyObject *dl_device, DLDevice mine, int *ok) {
    *ok = 1;
    if (dl_device == Py_None) return 0;
    if (!PyTuple_Check(dl_device) || PyTuple_GET_SIZE(dl_device) != 2) {
        PyErr_SetString(PyExc_TypeError, "dl_device must be None or a (device_type, device_id) tuple");
        return -1;
    }
    long type = PyLong_AsLong(PyTuple_GET_ITEM(dl_device, 0));
    long id = PyLong_AsLong(PyTuple_GET_ITEM(dl_device, 1));
    if (PyErr_Occurred()) return -1;
    *ok = type == (long)mine.device_type && id == (long)mine.device_id;
    return 0;
}

static PyObject *buffer_dlpack(BufferObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *stream = Py_None, *max_version = Py_None, *dl_device = Py_None, *copy = Py_None;
    if (nargs != 0) {
        PyErr_SetString(PyExc_TypeError, "__dlpack__() takes keyword arguments only");
        return NULL;
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        const char *k = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, i));
        if (k == NULL) return NULL;
        PyObject *v = args[i];
        if (strcmp(k, "stream") == 0) stream = v;
        else if (strcmp(k, "max_version") == 0) max_version = v;
        else if (strcmp(k, "dl_device") == 0) dl_device = v;
        else if (strcmp(k, "copy") == 0) copy = v;
        else {
            PyErr_Format(PyExc_TypeError, "__dlpack__() got an unexpected keyword argument '%s'", k);
            return NULL;
        }
    }
    int versioned = 0;
    if (max_version != Py_None) {
        if (!PyTuple_Check(max_version) || PyTuple_GET_SIZE(max_version) != 2) {
            PyErr_SetString(PyExc_TypeError, "max_version must be None or a (major, minor) tuple");
            return NULL;
        }
        long major = PyLong_AsLong(PyTuple_GET_ITEM(max_version, 0));
        if (major == -1 && PyErr_Occurred()) return NULL;
        versioned = major >= 1;
    }
    if (stream != Py_None && !PyLong_Check(stream)) {
        PyErr_SetString(PyExc_TypeError, "stream must be None or an int");
        return NULL;
    }
    if (copy != Py_None && !PyBool_Check(copy)) {
        PyErr_SetString(PyExc_TypeError, "copy must be None or a bool");
        return NULL;
    }
    DLDevice dev = self->tensor.device;
    if (stream != Py_None) {
        long s = PyLong_AsLong(stream);
        if (s == -1 && PyErr_Occurred()) return NULL;
        if (dev.device_type == kDLCPU && s != -1) {
            PyErr_Format(PyExc_BufferError, "stream must be None for a CPU buffer, got %ld", s);
            return NULL;
        }
        if (dev.device_type == kDLCUDA && s == 0) {
            PyErr_SetString(PyExc_BufferError, "stream=0 is ambiguous and not allowed by DLPack; use 1 for the legacy "
                                               "default stream");
            return NULL;
        }
        /* based's allocations finish before they return and its kernels run on the
         * caller's stream, so there is no pending work of ours to order. */
    }
    int same = 1;
    if (same_device_request(dl_device, dev, &same) < 0) return NULL;
    if (!same) {
        PyErr_Format(PyExc_BufferError, "based.Buffer cannot be exported to dl_device %R (it lives on (%d, %d))",
                     dl_device, (int)dev.device_type, (int)dev.device_id);
        return NULL;
    }
    return export_capsule(self, versioned, copy == Py_True);
}

static PyObject *buffer_dlpack_device(BufferObject *self, PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("(ii)", (int)self->tensor.device.device_type, (int)self->tensor.device.device_id);
}

static PyObject *buffer_get_shape(BufferObject *self, void *Py_UNUSED(closure)) {
    PyObject *t = PyTuple_New(self->tensor.ndim);
    if (t == NULL) return NULL;
    for (int i = 0; i < self->tensor.ndim; i++) {
        PyObject *n = PyLong_FromLongLong(self->shape[i]);
        if (n == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, n);
    }
    return t;
}

static PyObject *buffer_get_dtype(BufferObject *self, void *Py_UNUSED(closure)) {
    return PyUnicode_FromString(based_py_dtype_name(self->tensor.dtype));
}

static PyObject *buffer_get_device(BufferObject *self, void *Py_UNUSED(closure)) {
    if (self->tensor.device.device_type == kDLCPU) return PyUnicode_FromString("cpu");
    return PyUnicode_FromFormat("cuda:%d", (int)self->tensor.device.device_id);
}

static PyObject *buffer_get_nbytes(BufferObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSize_t(self->storage->nbytes);
}

static PyObject *buffer_get_data_ptr(BufferObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromVoidPtr(self->tensor.data);
}

static PyObject *buffer_repr(BufferObject *self) {
    PyObject *shape = buffer_get_shape(self, NULL);
    if (shape == NULL) return NULL;
    PyObject *dev = buffer_get_device(self, NULL);
    if (dev == NULL) {
        Py_DECREF(shape);
        return NULL;
    }
    PyObject *r = PyUnicode_FromFormat("based.Buffer(shape=%R, dtype=%s, device=%U)", shape,
                                       based_py_dtype_name(self->tensor.dtype), dev);
    Py_DECREF(shape);
    Py_DECREF(dev);
    return r;
}

/* numpy.asarray(buf) and friends: numpy.from_dlpack(buf), zero-copy, converted only when a
 * dtype is asked for. Without this, numpy would wrap the Buffer in a 0-d object array. */
/* numpy.from_dlpack(self): host memory and a dtype NumPy has, else a TypeError that says
 * what to do instead. */
static PyObject *host_array(BufferObject *self) {
    if (self->tensor.device.device_type != kDLCPU) {
        PyErr_Format(PyExc_TypeError,
                     "this based.Buffer lives on cuda:%d; NumPy reads host memory only (copy it with "
                     "torch.from_dlpack(buf).cpu() or cupy.from_dlpack(buf).get())",
                     (int)self->tensor.device.device_id);
        return NULL;
    }
    if (self->tensor.dtype.code == kDLBfloat) {
        PyErr_SetString(PyExc_TypeError,
                        "this based.Buffer holds bfloat16, which NumPy has no dtype for; view it with "
                        "torch.from_dlpack(buf) (or create the state with like=<a torch tensor>)");
        return NULL;
    }
    PyObject *np = PyImport_ImportModule("numpy");
    if (np == NULL) return NULL;
    PyObject *arr = PyObject_CallMethod(np, "from_dlpack", "O", (PyObject *)self);
    Py_DECREF(np);
    return arr;
}

/* numpy.asarray(buf) and friends: a zero-copy view, converted (or copied) only when dtype
 * (or copy=True) asks. Without it, NumPy would wrap the Buffer in a 0-d object array. */
static PyObject *buffer_array(BufferObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"dtype", "copy", NULL};
    PyObject *dtype = Py_None, *copy = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OO:__array__", kwlist, &dtype, &copy)) return NULL;
    PyObject *arr = host_array(self);
    if (arr == NULL || (dtype == Py_None && copy == Py_None)) return arr;
    /* arr.__array__(dtype, copy=copy): NumPy's own rules for the conversion and the copy
     * (copy passed only when given: NumPy 1.x's __array__ has no such keyword) */
    PyObject *conv = NULL, *method = PyObject_GetAttrString(arr, "__array__");
    PyObject *pos = method == NULL ? NULL : PyTuple_Pack(1, dtype);
    PyObject *kw = copy == Py_None || pos == NULL ? NULL : Py_BuildValue("{s:O}", "copy", copy);
    if (pos != NULL && (copy == Py_None || kw != NULL)) conv = PyObject_Call(method, pos, kw);
    Py_XDECREF(kw);
    Py_XDECREF(pos);
    Py_XDECREF(method);
    Py_DECREF(arr);
    return conv;
}

static PyObject *buffer_tolist(BufferObject *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *arr = host_array(self);
    if (arr == NULL) return NULL;
    PyObject *list = PyObject_CallMethod(arr, "tolist", NULL);
    Py_DECREF(arr);
    return list;
}

static PyMethodDef buffer_methods[] = {
    {"__array__", (PyCFunction)(void (*)(void))buffer_array, METH_VARARGS | METH_KEYWORDS,
     "__array__($self, /, dtype=None, copy=None)\n--\n\n"
     "The buffer as a NumPy array (numpy.asarray(buf)): a zero-copy view of host memory,\n"
     "converted to dtype if given. TypeError for CUDA buffers and bfloat16 (NumPy has no\n"
     "bfloat16; use torch.from_dlpack(buf))."},
    {"tolist", (PyCFunction)buffer_tolist, METH_NOARGS,
     "tolist($self, /)\n--\n\nThe values as nested Python lists (host buffers; not bfloat16)."},
    {"__dlpack__", (PyCFunction)(void (*)(void))buffer_dlpack, METH_FASTCALL | METH_KEYWORDS,
     "__dlpack__($self, /, *, stream=None, max_version=None, dl_device=None, copy=None)\n--\n\n"
     "Export the buffer as a DLPack capsule (versioned when max_version >= (1, 0)), without a copy\n"
     "unless copy=True."},
    {"__dlpack_device__", (PyCFunction)buffer_dlpack_device, METH_NOARGS,
     "__dlpack_device__($self, /)\n--\n\n(device_type, device_id) of the buffer, as DLPack numbers them."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef buffer_getset[] = {
    {"shape", (getter)buffer_get_shape, NULL, "Shape, a tuple of ints.", NULL},
    {"dtype", (getter)buffer_get_dtype, NULL, "dtype name: 'float32', 'float64', 'float16', 'bfloat16' or 'int64'.",
     NULL},
    {"device", (getter)buffer_get_device, NULL, "'cpu' or 'cuda:N'.", NULL},
    {"nbytes", (getter)buffer_get_nbytes, NULL, "Bytes of memory the buffer holds.", NULL},
    {"data_ptr", (getter)buffer_get_data_ptr, NULL, "Address of the first element.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot buffer_slots[] = {
    {Py_tp_dealloc, buffer_dealloc},
    {Py_tp_repr, buffer_repr},
    {Py_tp_methods, buffer_methods},
    {Py_tp_getset, buffer_getset},
    {Py_tp_doc, "Buffer()\n--\n\n"
                "Memory owned by based (a state or cache allocated with no framework at hand).\n\n"
                "Any DLPack consumer views it without a copy: numpy.from_dlpack(buf),\n"
                "torch.from_dlpack(buf), cupy.from_dlpack(buf), jax.dlpack.from_dlpack(buf).\n"
                "Views made that way keep the memory alive after the Buffer is gone.\n"
                "Create one with based.empty()."},
    {0, NULL},
};

PyType_Spec based_buffer_spec = {
    .name = "based.Buffer",
    .basicsize = sizeof(BufferObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = buffer_slots,
};
