/*
 * ops_window.c -- bindings for sliding-window attention (prefill, decode, cache).
 */
#include "pybased.h"

PyMethodDef based_window_methods[] = {
    {NULL, NULL, 0, NULL},
};
