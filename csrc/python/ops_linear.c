/*
 * ops_linear.c -- bindings for Taylor linear attention (prefill, decode, state).
 * Each op: import the tensors (GIL held), release the GIL around the C call, give the
 * tensors back, map the status. based/linear_attention.py is the public API.
 */
#include "pybased.h"

typedef based_status (*linear_op)(const DLTensor *, const DLTensor *, const DLTensor *, DLTensor *, DLTensor *,
                                  DLTensor *, DLTensor *, const based_linear_attention_params *);

/* args: q, k, v, kv, ksum, tokens, out, scale, normalize, eps[, chunk_size], stream */
static PyObject *run_linear(PyObject *m, PyObject *const *args, Py_ssize_t nargs, const char *fname,
                            Py_ssize_t want, linear_op op) {
    static const char *const names[7] = {"q", "k", "v", "state.kv", "state.ksum", "state.tokens", "out"};
    if (based_py_check_nargs(fname, nargs, want) < 0) return NULL;
    based_linear_attention_params p = based_linear_attention_params_default(1);
    if (based_py_as_double(args[7], "scale", &p.scale) < 0) return NULL;
    int normalize = PyObject_IsTrue(args[8]);
    if (normalize < 0) return NULL;
    p.normalize = normalize;
    if (based_py_as_double(args[9], "eps", &p.eps) < 0) return NULL;
    if (want == 12) {
        if (based_py_as_int64(args[10], "chunk_size", &p.chunk_size) < 0) return NULL;
    }
    PyObject *stream = args[want - 1];
    if (based_py_as_stream(stream, &p.stream) < 0) return NULL;
    based_py_tensor t[7];
    /* the op writes kv, ksum, tokens and out */
    if (based_py_import_many(m, args, names, 7, 0x78u, 0u, stream, t) < 0) return NULL;
    based_status st;
    Py_BEGIN_ALLOW_THREADS
    st = op(t[0].tensor, t[1].tensor, t[2].tensor, t[3].tensor, t[4].tensor, t[5].tensor, t[6].tensor, &p);
    Py_END_ALLOW_THREADS
    return based_py_finish(st, t, 7);
}

static PyObject *py_prefill(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    return run_linear(m, args, nargs, "linear_attention_prefill", 12, based_linear_attention_prefill);
}

static PyObject *py_prefill_ref(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    return run_linear(m, args, nargs, "linear_attention_prefill_ref", 12, based_linear_attention_prefill_ref);
}

static PyObject *py_decode(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    return run_linear(m, args, nargs, "linear_attention_decode", 11, based_linear_attention_decode);
}

static PyObject *py_decode_ref(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    return run_linear(m, args, nargs, "linear_attention_decode_ref", 11, based_linear_attention_decode_ref);
}

typedef based_status (*convert_op)(const DLTensor *, const DLTensor *, DLTensor *, DLTensor *, void *);

/* args: the two tensors read, the two written, stream */
static PyObject *run_convert(PyObject *m, PyObject *const *args, Py_ssize_t nargs, const char *fname,
                             const char *const names[4], convert_op op) {
    void *stream;
    if (based_py_check_nargs(fname, nargs, 5) < 0 || based_py_as_stream(args[4], &stream) < 0) return NULL;
    based_py_tensor t[4];
    if (based_py_import_many(m, args, names, 4, 0xcu, 0u, args[4], t) < 0) return NULL; /* writes the last two */
    based_status st;
    Py_BEGIN_ALLOW_THREADS
    st = op(t[0].tensor, t[1].tensor, t[2].tensor, t[3].tensor, stream);
    Py_END_ALLOW_THREADS
    return based_py_finish(st, t, 4);
}

static PyObject *py_to_expanded(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    static const char *const names[4] = {"kv", "ksum", "kv_expanded", "ksum_expanded"};
    return run_convert(m, args, nargs, "linear_state_to_expanded", names, based_linear_state_to_expanded);
}

static PyObject *py_from_expanded(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    static const char *const names[4] = {"kv_expanded", "ksum_expanded", "kv", "ksum"};
    return run_convert(m, args, nargs, "linear_state_from_expanded", names, based_linear_state_from_expanded);
}

static PyObject *py_kernel_isa(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored)) {
    return PyUnicode_FromString(based_cpu_kernel_isa("linear_attention"));
}

PyMethodDef based_linear_methods[] = {
    {"linear_attention_prefill", FASTCALL(py_prefill), METH_FASTCALL,
     "linear_attention_prefill(q, k, v, kv, ksum, tokens, out, scale, normalize, eps, chunk_size, stream, /)\n--\n\n"
     "Chunked prefill into out, continuing and updating the state (see based.linear_attention_prefill).\n"
     BASED_PY_STREAM_DOC},
    {"linear_attention_prefill_ref", FASTCALL(py_prefill_ref), METH_FASTCALL,
     "linear_attention_prefill_ref(q, k, v, kv, ksum, tokens, out, scale, normalize, eps, chunk_size, stream, /)\n"
     "--\n\n"
     "Plain-loop float64 reference twin of linear_attention_prefill (chunk_size is ignored)."},
    {"linear_attention_decode", FASTCALL(py_decode), METH_FASTCALL,
     "linear_attention_decode(q, k, v, kv, ksum, tokens, out, scale, normalize, eps, stream, /)\n--\n\n"
     "One token per sequence (see based.linear_attention_decode).\n" BASED_PY_STREAM_DOC},
    {"linear_attention_decode_ref", FASTCALL(py_decode_ref), METH_FASTCALL,
     "linear_attention_decode_ref(q, k, v, kv, ksum, tokens, out, scale, normalize, eps, stream, /)\n--\n\n"
     "Plain-loop float64 reference twin of linear_attention_decode."},
    {"linear_state_to_expanded", FASTCALL(py_to_expanded), METH_FASTCALL,
     "linear_state_to_expanded(kv, ksum, kv_expanded, ksum_expanded, stream, /)\n--\n\n"
     "Compact (F rows) -> the paper code's 1 + Dk + Dk^2 rows."},
    {"linear_state_from_expanded", FASTCALL(py_from_expanded), METH_FASTCALL,
     "linear_state_from_expanded(kv_expanded, ksum_expanded, kv, ksum, stream, /)\n--\n\n"
     "The paper code's 1 + Dk + Dk^2 rows -> compact (F rows)."},
    {"linear_kernel_isa", (PyCFunction)py_kernel_isa, METH_NOARGS,
     "linear_kernel_isa()\n--\n\nThe CPU kernels linear attention runs: 'avx2+fma' or 'generic'."},
    {NULL, NULL, 0, NULL},
};
