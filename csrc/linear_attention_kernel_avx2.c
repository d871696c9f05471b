/*
 * linear_attention_kernel_avx2.c -- linear_attention_kernel.h compiled for AVX2 + FMA (x86-64-v3: Intel
 * Haswell and later, AMD Zen and later), chosen at run time by based_lin_kernels_pick()
 * when the CPU has both. A portable wheel is built for baseline x86-64 (SSE2, no FMA);
 * this file is how it still reaches the FMA units. GCC only (#pragma GCC target); other
 * compilers get the portable kernels.
 */
#include "linear_attention.h"

#if BASED_LIN_HAVE_AVX2
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#define LK_REAL float
#define LK_VEC 8
#define LK_SFX f32
#define LK_FMA(a, b, c) __builtin_fmaf((a), (b), (c))
#define LK_VFMA(s, b, c) _mm256_fmadd_ps(_mm256_set1_ps(s), (b), (c))
#include "linear_attention_kernel.h"
#undef LK_REAL
#undef LK_VEC
#undef LK_SFX
#undef LK_FMA
#undef LK_VFMA

#define LK_REAL double
#define LK_VEC 4
#define LK_SFX f64
#define LK_FMA(a, b, c) __builtin_fma((a), (b), (c))
#define LK_VFMA(s, b, c) _mm256_fmadd_pd(_mm256_set1_pd(s), (b), (c))
#include "linear_attention_kernel.h"

const based_lin_kernels based_lin_kernels_avx2 = {
    "avx2+fma", lk_chunk_f32, lk_chunk_f64, lk_decode_rows_f32, lk_decode_rows_f64, lk_decode_phi_f32,
    lk_decode_phi_f64, lk_decode_ksum_f32, lk_decode_ksum_f64,
};
#endif
