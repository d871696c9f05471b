/*
 * ops_window.c -- bindings for sliding-window attention (prefill, decode, and the
 * plain-loop reference twins the tests compare against). The cache is three tensors
 * (k_cache, v_cache, tokens) here; based/sliding_window.py bundles them.
 */
#include "pybased.h"

typedef based_status (*window_op)(const DLTensor *, const DLTensor *, const DLTensor *, DLTensor *, DLTensor *,
                                  DLTensor *, DLTensor *, const based_sliding_window_params *);

/* name(q, k, v, k_cache, v_cache, tokens, out, window, scale, stream) -> None */
static PyObject *window_call(PyObject *m, PyObject *const *args, Py_ssize_t nargs, const char *name, window_op op) {
    if (based_py_check_nargs(name, nargs, 10) < 0) return NULL;
    based_sliding_window_params p = {0, 0.0, NULL};
    if (based_py_as_int64(args[7], "window", &p.window) < 0) return NULL;
    if (based_py_as_double(args[8], "scale", &p.scale) < 0) return NULL;
    if (based_py_as_stream(args[9], &p.stream) < 0) return NULL;
    static const char *const names[7] = {"q", "k", "v", "k_cache", "v_cache", "tokens", "out"};
    based_py_tensor t[7];
    if (based_py_import_many(m, args, names, 7, 0x78u, 0u, args[9], t) < 0) return NULL; /* writes the cache, out */
    based_status st;
    Py_BEGIN_ALLOW_THREADS
    st = op(t[0].tensor, t[1].tensor, t[2].tensor, t[3].tensor, t[4].tensor, t[5].tensor, t[6].tensor, &p);
    Py_END_ALLOW_THREADS
    return based_py_finish(st, t, 7);
}

static PyObject *py_prefill(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    return window_call(m, args, nargs, "sliding_window_prefill", based_sliding_window_prefill);
}

static PyObject *py_decode(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    return window_call(m, args, nargs, "sliding_window_decode", based_sliding_window_decode);
}

static PyObject *py_prefill_ref(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    return window_call(m, args, nargs, "sliding_window_prefill_ref", based_sliding_window_prefill_ref);
}

static PyObject *py_decode_ref(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    return window_call(m, args, nargs, "sliding_window_decode_ref", based_sliding_window_decode_ref);
}

#define WINDOW_ARGS "(q, k, v, k_cache, v_cache, tokens, out, window, scale, stream, /)\n--\n\n"

static PyObject *py_kernel_isa(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored)) {
    return PyUnicode_FromString(based_cpu_kernel_isa("sliding_window"));
}

PyMethodDef based_window_methods[] = {
    {"window_kernel_isa", (PyCFunction)py_kernel_isa, METH_NOARGS,
     "window_kernel_isa()\n--\n\nThe CPU kernels sliding-window attention runs: 'avx512', 'avx2' or 'generic'."},
    {"sliding_window_prefill", FASTCALL(py_prefill), METH_FASTCALL,
     "sliding_window_prefill" WINDOW_ARGS "Prefill into out, continuing and updating the ring cache in place.\n"
     BASED_PY_STREAM_DOC},
    {"sliding_window_decode", FASTCALL(py_decode), METH_FASTCALL,
     "sliding_window_decode" WINDOW_ARGS "One token per sequence into out; updates the ring cache in place."},
    {"sliding_window_prefill_ref", FASTCALL(py_prefill_ref), METH_FASTCALL,
     "sliding_window_prefill_ref" WINDOW_ARGS "Plain-loop reference twin of sliding_window_prefill."},
    {"sliding_window_decode_ref", FASTCALL(py_decode_ref), METH_FASTCALL,
     "sliding_window_decode_ref" WINDOW_ARGS "Plain-loop reference twin of sliding_window_decode."},
    {NULL, NULL, 0, NULL},
};
