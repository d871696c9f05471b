/*
 * ops_linear.c -- bindings for Taylor linear attention (prefill, decode, state).
 */
#include "pybased.h"

PyMethodDef based_linear_methods[] = {
    {NULL, NULL, 0, NULL},
};
