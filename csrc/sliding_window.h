/*
 * sliding_window.h -- what the sliding-window kernels (sliding_window.c) and their
 * plain-loop twins (sliding_window_ref.c) share: one checked description of a call.
 * Both build it with based_window_check(), so they accept and reject exactly the same
 * calls and differ only in the arithmetic.
 *
 * Semantics (SPEC 1.2): query position p attends key positions u in (p - W, p]; query
 * head h reads kv head h / (H / Hkv). Ring cache: position u of sequence b lives in
 * slot u % W of k_cache/v_cache[b, kv_head]; tokens[b] counts positions seen.
 */
#ifndef BASED_SLIDING_WINDOW_H
#define BASED_SLIDING_WINDOW_H

#include "internal.h"

/* Head dims the sliding-window ops accept (SPEC 1.2; the CUDA kernels share the limit). */
#define BASED_WINDOW_MAX_HEAD_DIM 256

/* Positions (tokens + T) stay below this, so position arithmetic never nears int64's end. */
#define BASED_WINDOW_MAX_POSITION ((int64_t)1 << 62)

typedef struct {
    /* decode views get a time axis of size 1, so both ops see prefill layouts */
    based_view q, out;           /* (B, T, H, D) */
    based_view k, v;             /* (B, T, Hkv, D) */
    based_view k_cache, v_cache; /* (B, Hkv, W, D), the dtype of k and v */
    based_view tokens;           /* (B,) int64, 0 <= tokens and tokens + T <= 2^62 */
    int64_t batch, seqlen, heads, kv_heads, head_dim, window;
    double scale;
} based_window_call;

/* Builds c from the arguments of based_sliding_window_prefill (decode == 0) or
 * _decode (decode != 0) and runs every check; `op` names the op in messages.
 * Writes nothing but c. */
based_status based_window_check(based_window_call *c, const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                const DLTensor *k_cache, const DLTensor *v_cache, const DLTensor *tokens,
                                const DLTensor *out, const based_sliding_window_params *params, int decode,
                                const char *op);

/* Name of the kernels this CPU runs ("avx512", "avx2" or "generic"): picked once, at the
 * first call, from the CPU and BASED_CPU_ISA. */
const char *based_window_kernel_isa(void);

/* Address of element [i0, i1, i2, 0] of a 4-d view. */
static inline char *based_window_row(const based_view *x, int64_t i0, int64_t i1, int64_t i2) {
    return x->data + (i0 * x->strides[0] + i1 * x->strides[1] + i2 * x->strides[2]) * x->itemsize;
}

#endif /* BASED_SLIDING_WINDOW_H */
