/*
 * ops_core.c -- bindings for the feature map, the state helpers, based's own
 * buffers and build information. Each op: import the tensors (GIL held), release
 * the GIL around the C call, give the tensors back, map the status.
 */
#include "pybased.h"

/* taylor_feature_map(x, out, scale, stream) */
static PyObject *py_taylor_feature_map(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    static const char *const names[2] = {"x", "out"};
    double scale;
    void *stream;
    based_py_tensor t[2];
    if (based_py_check_nargs("taylor_feature_map", nargs, 4) < 0 || based_py_as_double(args[2], "scale", &scale) < 0 ||
        based_py_as_stream(args[3], &stream) < 0 || based_py_import_many(m, args, names, 2, 0x2u, 0u, args[3], t) < 0)
        return NULL;
    based_status st;
    Py_BEGIN_ALLOW_THREADS
    st = based_taylor_feature_map(t[0].tensor, t[1].tensor, scale, stream);
    Py_END_ALLOW_THREADS
    return based_py_finish(st, t, 2);
}

/* state_zero(t, batch_indices_or_None, stream) */
static PyObject *py_state_zero(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    static const char *const names[2] = {"state", "batch_indices"};
    void *stream;
    based_py_tensor t[2];
    if (based_py_check_nargs("state_zero", nargs, 3) < 0 || based_py_as_stream(args[2], &stream) < 0 ||
        based_py_import_many(m, args, names, 2, 0x1u, 0x2u, args[2], t) < 0)
        return NULL;
    based_status st;
    Py_BEGIN_ALLOW_THREADS
    st = based_state_zero(t[0].tensor, t[1].tensor, stream);
    Py_END_ALLOW_THREADS
    return based_py_finish(st, t, 2);
}

/* state_copy(dst, src, stream) */
static PyObject *py_state_copy(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    static const char *const names[2] = {"dst", "src"};
    void *stream;
    based_py_tensor t[2];
    if (based_py_check_nargs("state_copy", nargs, 3) < 0 || based_py_as_stream(args[2], &stream) < 0 ||
        based_py_import_many(m, args, names, 2, 0x1u, 0u, args[2], t) < 0)
        return NULL;
    based_status st;
    Py_BEGIN_ALLOW_THREADS
    st = based_state_copy(t[0].tensor, t[1].tensor, stream);
    Py_END_ALLOW_THREADS
    return based_py_finish(st, t, 2);
}

/* state_gather(dst, src, batch_indices, stream) */
static PyObject *py_state_gather(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    static const char *const names[3] = {"dst", "src", "batch_indices"};
    void *stream;
    based_py_tensor t[3];
    if (based_py_check_nargs("state_gather", nargs, 4) < 0 || based_py_as_stream(args[3], &stream) < 0 ||
        based_py_import_many(m, args, names, 3, 0x1u, 0u, args[3], t) < 0)
        return NULL;
    based_status st;
    Py_BEGIN_ALLOW_THREADS
    st = based_state_gather(t[0].tensor, t[1].tensor, t[2].tensor, stream);
    Py_END_ALLOW_THREADS
    return based_py_finish(st, t, 3);
}

/* zeros(shape, dtype, device_type, device_id) -> Buffer */
static PyObject *py_zeros(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (based_py_check_nargs("zeros", nargs, 4) < 0) return NULL;
    PyObject *seq = PySequence_Fast(args[0], "shape must be a sequence of ints");
    if (seq == NULL) return NULL;
    Py_ssize_t ndim = PySequence_Fast_GET_SIZE(seq);
    int64_t shape[16];
    if (ndim > 16) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "shape: at most 16 dimensions");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < ndim; i++) {
        shape[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (shape[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    DLDataType dtype;
    if (based_py_parse_dtype(args[1], &dtype) < 0) return NULL;
    long type = PyLong_AsLong(args[2]), id = PyLong_AsLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (type != kDLCPU && type != kDLCUDA) {
        PyErr_Format(PyExc_ValueError, "device must be cpu or cuda, got DLPack device type %ld", type);
        return NULL;
    }
    DLDevice dev = {(DLDeviceType)type, (int32_t)id};
    return based_buffer_new(m, shape, (int)ndim, dtype, dev);
}

/* dlpack_info(obj[, name]) -> (shape, dtype name, (device_type, device_id), readonly);
 * name (default "array") is the argument's name in error messages. */
static PyObject *py_dlpack_info(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "dlpack_info() takes 1 or 2 positional arguments, got %zd", nargs);
        return NULL;
    }
    const char *name = "array";
    if (nargs == 2) {
        if (!PyUnicode_Check(args[1])) {
            PyErr_Format(PyExc_TypeError, "dlpack_info(): name must be a str, got %.200s", Py_TYPE(args[1])->tp_name);
            return NULL;
        }
        if ((name = PyUnicode_AsUTF8(args[1])) == NULL) return NULL;
    }
    based_py_tensor t = BASED_PY_TENSOR_INIT;
    if (based_py_import(m, args[0], name, 0, Py_None, &t) < 0) return NULL;
    DLTensor *d = t.tensor;
    PyObject *shape = PyTuple_New(d->ndim), *res = NULL;
    if (shape == NULL) goto done;
    for (int i = 0; i < d->ndim; i++) {
        PyObject *n = PyLong_FromLongLong(d->shape[i]);
        if (n == NULL) goto done;
        PyTuple_SET_ITEM(shape, i, n);
    }
    char dt[64];
    based_py_describe_dtype(d->dtype, dt, sizeof dt);
    res = Py_BuildValue("(Os(ii)O)", shape, dt, (int)d->device.device_type, (int)d->device.device_id,
                        t.readonly ? Py_True : Py_False);
done:
    Py_XDECREF(shape);
    based_py_release(&t);
    return res;
}

static PyObject *py_build_info(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("{s:s,s:O,s:O,s:i,s:s}", "version", based_version(), "cuda",
                         based_built_with_cuda() ? Py_True : Py_False, "openmp",
                         based_built_with_openmp() ? Py_True : Py_False, "max_threads", based_get_num_threads(),
                         "cuda_archs", based_cuda_archs());
}

static PyObject *py_limits(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:L}", "max_ndim", BASED_MAX_NDIM, "max_feature_dim", BASED_MAX_FEATURE_DIM,
                         "max_chunk_size", BASED_MAX_CHUNK_SIZE, "max_head_dim", BASED_MAX_HEAD_DIM,
                         "max_feature_map_dim", (long long)BASED_MAX_FEATURE_MAP_DIM);
}

/* set_num_threads(n): n >= 1, or 0 for the default */
static PyObject *py_set_num_threads(PyObject *Py_UNUSED(m), PyObject *arg) {
    int64_t n;
    if (based_py_as_int64(arg, "n", &n) < 0) return NULL;
    if (n < INT32_MIN || n > INT32_MAX) { /* in int range, the C function checks it */
        PyErr_Format(PyExc_ValueError, "set_num_threads: n must be >= 1 (or 0 for the default) and at most %d, "
                     "got %lld", (int)INT32_MAX, (long long)n);
        return NULL;
    }
    const based_status st = based_set_num_threads((int)n);
    if (st != BASED_STATUS_OK) return based_py_raise(st);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(based_get_num_threads());
}

static PyObject *py_cuda_device_count(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored)) {
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = based_cuda_device_count();
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

static PyObject *py_live_buffers(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLongLong(based_buffer_live_count());
}

static PyObject *py_feature_dim(PyObject *Py_UNUSED(m), PyObject *arg) {
    long long dk = PyLong_AsLongLong(arg);
    if (dk == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong(based_taylor_feature_dim(dk));
}

PyMethodDef based_core_methods[] = {
    {"taylor_feature_map", FASTCALL(py_taylor_feature_map), METH_FASTCALL,
     "taylor_feature_map(x, out, scale, stream, /)\n--\n\nphi(x) into out (see based.taylor_feature_map).\n"
     BASED_PY_STREAM_DOC},
    {"state_zero", FASTCALL(py_state_zero), METH_FASTCALL,
     "state_zero(t, batch_indices, stream, /)\n--\n\nZero t[i] for i in batch_indices (None: all; host memory)."},
    {"state_copy", FASTCALL(py_state_copy), METH_FASTCALL,
     "state_copy(dst, src, stream, /)\n--\n\ndst[...] = src[...], also between the host and a GPU."},
    {"state_gather", FASTCALL(py_state_gather), METH_FASTCALL,
     "state_gather(dst, src, batch_indices, stream, /)\n--\n\ndst[i] = src[batch_indices[i]] along axis 0."},
    {"zeros", FASTCALL(py_zeros), METH_FASTCALL,
     "zeros(shape, dtype, device_type, device_id, /)\n--\n\nA zero-filled based.Buffer."},
    {"dlpack_info", FASTCALL(py_dlpack_info), METH_FASTCALL,
     "dlpack_info(array, name='array', /)\n--\n\n(shape, dtype, (device_type, device_id), readonly) read through DLPack;\n"
     "errors name the argument `name`."},
    {"build_info", (PyCFunction)py_build_info, METH_NOARGS, "build_info()\n--\n\nHow this extension was built."},
    {"limits", (PyCFunction)py_limits, METH_NOARGS,
     "limits()\n--\n\nThe C core's limits (based.h): max_ndim, max_feature_dim (Dk), max_chunk_size, max_head_dim,\n"
     "max_feature_map_dim (Dk of feature_dim)."},
    {"set_num_threads", (PyCFunction)py_set_num_threads, METH_O,
     "set_num_threads(n, /)\n--\n\nThreads of the CPU ops, process-wide: n >= 1, or 0 for the default."},
    {"get_num_threads", (PyCFunction)py_get_num_threads, METH_NOARGS,
     "get_num_threads()\n--\n\nThreads a CPU op started now on this thread may use."},
    {"cuda_device_count", (PyCFunction)py_cuda_device_count, METH_NOARGS,
     "cuda_device_count()\n--\n\nUsable CUDA devices (0 without CUDA build, driver or GPU)."},
    {"live_buffers", (PyCFunction)py_live_buffers, METH_NOARGS,
     "live_buffers()\n--\n\nStorages of based.Buffer alive now, exports included (for leak tests)."},
    {"feature_dim", (PyCFunction)py_feature_dim, METH_O, "feature_dim(head_dim, /)\n--\n\n1 + Dk + Dk(Dk+1)/2."},
    {NULL, NULL, 0, NULL},
};
