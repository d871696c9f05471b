/*
 * linear_attention_kernel.c -- the portable instantiation of linear_attention_kernel.h: plain C for any
 * target (SSE2 on a default x86-64 build): 16-byte vectors, a * b + c unfused (C11 mode
 * does not contract).
 */
#include "linear_attention.h"

#define LK_FMA(a, b, c) ((a) * (b) + (c))
#define LK_VFMA(s, b, c) ((s) * (b) + (c))

#define LK_REAL float
#define LK_VEC 4
#define LK_SFX f32
#include "linear_attention_kernel.h"
#undef LK_REAL
#undef LK_VEC
#undef LK_SFX

#define LK_REAL double
#define LK_VEC 2
#define LK_SFX f64
#include "linear_attention_kernel.h"

const based_lin_kernels based_lin_kernels_generic = {
    "generic", lk_chunk_f32, lk_chunk_f64, lk_decode_rows_f32, lk_decode_rows_f64, lk_decode_phi_f32,
    lk_decode_phi_f64, lk_decode_ksum_f32, lk_decode_ksum_f64,
};
