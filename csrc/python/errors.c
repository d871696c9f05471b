/*
 * errors.c -- the one place where a based_status becomes a Python exception (SPEC 4),
 * plus the small argument helpers the fastcall bindings share.
 */
#include "pybased.h"

PyObject *based_py_raise(based_status st) {
    const char *msg = based_last_error();
    PyObject *type;
    switch (st) {
    case BASED_STATUS_TYPE_ERROR: type = PyExc_TypeError; break;
    case BASED_STATUS_VALUE_ERROR: type = PyExc_ValueError; break;
    case BASED_STATUS_OUT_OF_MEMORY: type = PyExc_MemoryError; break;
    case BASED_STATUS_NOT_IMPLEMENTED: type = PyExc_NotImplementedError; break;
    case BASED_STATUS_CUDA_ERROR: type = PyExc_RuntimeError; break;
    default: type = PyExc_RuntimeError; break;
    }
    if (msg == NULL || msg[0] == '\0') msg = based_status_str(st);
    PyErr_SetString(type, msg);
    return NULL;
}

int based_py_check_nargs(const char *fname, Py_ssize_t nargs, Py_ssize_t n) {
    if (nargs == n) return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments, got %zd", fname, n, nargs);
    return -1;
}

int based_py_as_int64(PyObject *o, const char *name, int64_t *out) {
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %.200s", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    const long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = (int64_t)v;
    return 0;
}

int based_py_as_stream(PyObject *o, void **out) {
    *out = NULL;
    if (o == Py_None) return 0;
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError,
                     "stream must be None or an int (a cudaStream_t as DLPack passes it: 1 for the legacy default "
                     "stream, 2 for the per-thread default stream), got %.200s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    void *p = overflow < 0 || (overflow == 0 && v < 0) ? NULL : PyLong_AsVoidPtr(o);
    if (p == NULL && (PyErr_Occurred() || v != 0)) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError,
                     "stream must be None or a cudaStream_t handle, an int from 0 to 2**%d - 1, got %R",
                     (int)(8 * sizeof(void *)), o);
        return -1;
    }
    *out = p;
    return 0;
}

int based_py_as_double(PyObject *o, const char *name, double *out) {
    if (PyBool_Check(o)) { /* an int subclass, but True is not a scale nor an eps */
        PyErr_Format(PyExc_TypeError, "%s must be a number, got bool", name);
        return -1;
    }
    if (!PyFloat_Check(o) && !PyLong_Check(o)) {
        /* accept numpy/torch scalars through __float__, but not strings or None */
        if (Py_TYPE(o)->tp_as_number == NULL || Py_TYPE(o)->tp_as_number->nb_float == NULL) {
            PyErr_Format(PyExc_TypeError, "%s must be a number, got %.200s", name, Py_TYPE(o)->tp_name);
            return -1;
        }
    }
    *out = PyFloat_AsDouble(o);
    if (*out == -1.0 && PyErr_Occurred()) return -1;
    return 0;
}
