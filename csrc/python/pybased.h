/*
 * pybased.h -- what the files of the CPython extension `based._C` share.
 *
 * The extension is a thin layer over csrc/based.h:
 *   - dlpack_import.c  turns any __dlpack__ object into a borrowed DLTensor (consumer);
 *   - buffer.c         is based.Buffer, memory based owns, exported through __dlpack__;
 *   - errors.c         maps a based_status to a Python exception (the one place that does);
 *   - ops_*.c          bind the ops, releasing the GIL around the C call;
 *   - module.c         module state, multi-phase init, and the method tables.
 */
#ifndef BASED_PYBASED_H
#define BASED_PYBASED_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../based.h"

typedef struct {
    PyTypeObject *buffer_type;   /* based.Buffer */
    PyObject *str_dlpack;        /* "__dlpack__" */
    PyObject *str_dlpack_device; /* "__dlpack_device__" */
    PyObject *kw_max_version;    /* ("max_version",) */
    PyObject *kw_stream_max_version; /* ("stream", "max_version") */
    PyObject *kw_stream;         /* ("stream",) */
    PyObject *max_version;       /* (1, 0): the newest DLPack major we read */
    PyObject *str_exchange_api;  /* "__dlpack_c_exchange_api__" */
    /* types seen, with their DLPack C exchange table (NULL: the type has none) */
    PyTypeObject *api_types[4];
    const DLPackExchangeAPI *apis[4];
    int api_next;                /* round-robin slot to fill next */
} based_module_state;

based_module_state *based_get_state(PyObject *module);

/* ---------------------------------------------------------------------------------
 * Consumer side: a tensor borrowed from a __dlpack__ producer for one call.
 * --------------------------------------------------------------------------------- */

typedef struct {
    DLTensor *tensor;   /* NULL when the slot holds no tensor (an omitted optional) */
    void *managed;      /* DLManagedTensor[Versioned] we own, or NULL for based.Buffer */
    PyObject *owner;    /* strong ref to a based.Buffer (fast path), else NULL */
    const char *name;   /* the argument's name, for messages (outlives the slot) */
    int versioned;
    int readonly;
} based_py_tensor;

#define BASED_PY_TENSOR_INIT {NULL, NULL, NULL, NULL, 0, 0}

/* Imports obj. name is the argument's name for messages (it must outlive the tensor).
 * writable: the op writes to it, so a read-only export is refused (ValueError). stream:
 * None or an int passed to __dlpack__ for CUDA producers. Every field of a producer's
 * DLTensor is checked before anything reads through it (ndim before shape; shape,
 * strides, dtype, data + byte_offset, device): a bad one is a ValueError (TypeError for
 * the dtype) naming the argument. Returns 0, or -1 with an exception set (nothing to
 * release then). The producer's memory stays alive until based_py_release(). */
int based_py_import(PyObject *module, PyObject *obj, const char *name, int writable, PyObject *stream,
                    based_py_tensor *out);

/* Same, but Py_None gives an empty slot (tensor == NULL). */
int based_py_import_optional(PyObject *module, PyObject *obj, const char *name, int writable, PyObject *stream,
                             based_py_tensor *out);

/* Gives the tensor back to its producer: calls the DLPack deleter exactly once (the slot is
 * emptied before the deleter runs). A deleter may run Python code: an exception being
 * raised is set aside while it runs and survives it, and one the deleter leaves set goes
 * to sys.unraisablehook (DLPack deleters cannot fail). */
void based_py_release(based_py_tensor *t);
void based_py_release_all(based_py_tensor *ts, int n);

/* The shape of every binding: import objs[0..n) (bit i of `written`: the op writes it;
 * bit i of `optional`: Py_None is an empty slot), all or nothing: returns 0, or -1 with an
 * exception set (the one about the argument refused) and nothing held. stream: the op's
 * stream argument, handed to the __dlpack__ of CUDA producers. */
int based_py_import_many(PyObject *module, PyObject *const *objs, const char *const *names, int n,
                         unsigned written, unsigned optional, PyObject *stream, based_py_tensor *out);

/* Raises for st (from this thread's last error, read before any deleter can run based
 * code and overwrite it), gives the n tensors back, and returns None for OK, else NULL. */
PyObject *based_py_finish(based_status st, based_py_tensor *ts, int n);

/* ---------------------------------------------------------------------------------
 * based.Buffer
 * --------------------------------------------------------------------------------- */

extern PyType_Spec based_buffer_spec;

/* A new zero-filled Buffer; dtype is one of "float32", "float64", "float16",
 * "bfloat16", "int64"; device_type is kDLCPU or kDLCUDA. */
PyObject *based_buffer_new(PyObject *module, const int64_t *shape, int ndim, DLDataType dtype, DLDevice device);

/* Live storages (for leak tests). */
long long based_buffer_live_count(void);

/* ---------------------------------------------------------------------------------
 * Errors and argument helpers
 * --------------------------------------------------------------------------------- */

/* Sets the Python exception for st from based_last_error(); returns NULL. */
PyObject *based_py_raise(based_status st);

/* dtype name <-> DLDataType; -1 with TypeError on an unknown name. */
int based_py_parse_dtype(PyObject *name, DLDataType *out);
const char *based_py_dtype_name(DLDataType t);

/* Any DLPack dtype's name for messages: ours ("bfloat16"), else e.g. "int32",
 * "complex64", "float8 (DLPack code 10)", "float32 with 4 lanes". */
void based_py_describe_dtype(DLDataType t, char *buf, size_t size);

/* Fastcall helpers: exactly n positional arguments; a float argument; an int argument
 * (not a bool). Each sets a TypeError naming the argument and returns -1 on failure. */
int based_py_check_nargs(const char *fname, Py_ssize_t nargs, Py_ssize_t n);
int based_py_as_double(PyObject *o, const char *name, double *out);
int based_py_as_int64(PyObject *o, const char *name, int64_t *out);

/* The trailing `stream` argument of every op binding: None (NULL, the legacy default
 * stream) or a non-negative int, the cudaStream_t as DLPack passes it (1: the legacy
 * default stream, 2: the per-thread default stream, else the handle). TypeError or
 * ValueError naming it, and -1, otherwise. */
int based_py_as_stream(PyObject *o, void **out);
#define BASED_PY_STREAM_DOC                                                                               \
    "stream: None (the legacy default stream) or a cudaStream_t as an int (1: the legacy default "        \
    "stream, 2: the per-thread default stream); CUDA producers export for it, CPU tensors ignore it."

/* A METH_FASTCALL function as the PyCFunction a PyMethodDef holds. */
#define FASTCALL(fn) (PyCFunction)(void (*)(void))(fn)

/* Method tables, one per op family (module.c adds them all). */
extern PyMethodDef based_core_methods[];
extern PyMethodDef based_linear_methods[];
extern PyMethodDef based_window_methods[];

#endif /* BASED_PYBASED_H */
