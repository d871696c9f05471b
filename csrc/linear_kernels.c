/*
 * linear_kernels.c -- the portable instantiation of linear_kernels.h: plain C for any
 * target (SSE2 on a default x86-64 build). The compiler vectorises with its baseline
 * vectors; a * b + c stays unfused (C11 mode does not contract).
 */
#include "linear_internal.h"

#define LK_FMA(a, b, c) ((a) * (b) + (c))

#define LK_REAL float
#define LK_VEC 4
#define LK_SFX f32
#include "linear_kernels.h"
#undef LK_REAL
#undef LK_VEC
#undef LK_SFX

#define LK_REAL double
#define LK_VEC 2
#define LK_SFX f64
#include "linear_kernels.h"

const based_lin_kernels based_lin_kernels_generic = {
    "generic", lk_chunk_f32, lk_chunk_f64, lk_decode_rows_f32, lk_decode_rows_f64,
};
