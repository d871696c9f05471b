/*
 * module.c -- the extension module based._C: module state (no static PyObject
 * globals), multi-phase initialisation, and the method tables of every op family.
 */
#include "pybased.h"

based_module_state *based_get_state(PyObject *module) { return (based_module_state *)PyModule_GetState(module); }

static int based_exec(PyObject *m) {
    based_module_state *st = based_get_state(m);
    st->buffer_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &based_buffer_spec, NULL);
    if (st->buffer_type == NULL) return -1;
    if (PyModule_AddType(m, st->buffer_type) < 0) return -1;
    if ((st->str_dlpack = PyUnicode_InternFromString("__dlpack__")) == NULL) return -1;
    if ((st->str_dlpack_device = PyUnicode_InternFromString("__dlpack_device__")) == NULL) return -1;
    if ((st->kw_max_version = Py_BuildValue("(s)", "max_version")) == NULL) return -1;
    if ((st->kw_stream_max_version = Py_BuildValue("(ss)", "stream", "max_version")) == NULL) return -1;
    if ((st->kw_stream = Py_BuildValue("(s)", "stream")) == NULL) return -1;
    if ((st->max_version = Py_BuildValue("(ii)", 1, 0)) == NULL) return -1;
    if ((st->str_exchange_api = PyUnicode_InternFromString("__dlpack_c_exchange_api__")) == NULL) return -1;
    if (PyModule_AddFunctions(m, based_core_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, based_linear_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, based_window_methods) < 0) return -1;
    if (PyModule_AddStringConstant(m, "__version__", BASED_VERSION) < 0) return -1;
    return 0;
}

static int based_traverse(PyObject *m, visitproc visit, void *arg) {
    based_module_state *st = based_get_state(m);
    Py_VISIT(st->buffer_type);
    for (int i = 0; i < 4; i++) Py_VISIT(st->api_types[i]);
    return 0;
}

static int based_clear(PyObject *m) {
    based_module_state *st = based_get_state(m);
    Py_CLEAR(st->buffer_type);
    Py_CLEAR(st->str_dlpack);
    Py_CLEAR(st->str_dlpack_device);
    Py_CLEAR(st->kw_max_version);
    Py_CLEAR(st->kw_stream_max_version);
    Py_CLEAR(st->kw_stream);
    Py_CLEAR(st->max_version);
    Py_CLEAR(st->str_exchange_api);
    for (int i = 0; i < 4; i++) {
        Py_CLEAR(st->api_types[i]);
        st->apis[i] = NULL;
    }
    return 0;
}

static void based_free(void *m) { based_clear((PyObject *)m); }

static PyModuleDef_Slot based_slots[] = {
    {Py_mod_exec, based_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
/* No Py_mod_gil slot: on free-threaded CPython the module keeps the GIL on. The kernels
 * release it anyway; the per-type DLPack table cache in module state is not yet locked. */
    {0, NULL},
};

static struct PyModuleDef based_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "based._C",
    .m_doc = "The C core of based: BASED attention kernels over DLPack tensors. Use the based package, not this.",
    .m_size = sizeof(based_module_state),
    .m_slots = based_slots,
    .m_traverse = based_traverse,
    .m_clear = based_clear,
    .m_free = based_free,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&based_module); }
