/*
 * dispatch.c -- every public entry point of based.h that runs an op: check the arguments
 * (the op's check in csrc/<op>.c, shared by both backends), then run the checked
 * arguments on the CPU (csrc/<op>.c, the reference twins in csrc/<op>_ref.c).
 */
#include "internal.h"
#include "ops.h"

based_status based_taylor_feature_map(const DLTensor *x, DLTensor *out, double scale) {
    based_feature_map_args a;
    BASED_TRY(based_taylor_feature_map_check(&a, x, out, scale));
    return based_cpu_taylor_feature_map(&a);
}

/* ---- linear_attention ---------------------------------------------------------------- */

based_status based_linear_attention_prefill(const DLTensor *q, const DLTensor *k, const DLTensor *v, DLTensor *kv,
                                            DLTensor *ksum, DLTensor *tokens, DLTensor *out,
                                            const based_linear_attention_params *params) {
    based_linear_attention_args a;
    BASED_TRY(based_linear_attention_check(&a, q, k, v, kv, ksum, tokens, out, params, BASED_PHASE_PREFILL,
                                           "linear_attention_prefill"));
    return based_cpu_linear_attention_prefill(&a);
}

based_status based_linear_attention_decode(const DLTensor *q, const DLTensor *k, const DLTensor *v, DLTensor *kv,
                                           DLTensor *ksum, DLTensor *tokens, DLTensor *out,
                                           const based_linear_attention_params *params) {
    based_linear_attention_args a;
    BASED_TRY(based_linear_attention_check(&a, q, k, v, kv, ksum, tokens, out, params, BASED_PHASE_DECODE,
                                           "linear_attention_decode"));
    return based_cpu_linear_attention_decode(&a);
}

based_status based_linear_attention_prefill_ref(const DLTensor *q, const DLTensor *k, const DLTensor *v, DLTensor *kv,
                                                DLTensor *ksum, DLTensor *tokens, DLTensor *out,
                                                const based_linear_attention_params *params) {
    based_linear_attention_args a;
    BASED_TRY(based_linear_attention_check(&a, q, k, v, kv, ksum, tokens, out, params, BASED_PHASE_PREFILL,
                                           "linear_attention_prefill_ref"));
    return based_cpu_linear_attention_prefill_ref(&a);
}

based_status based_linear_attention_decode_ref(const DLTensor *q, const DLTensor *k, const DLTensor *v, DLTensor *kv,
                                               DLTensor *ksum, DLTensor *tokens, DLTensor *out,
                                               const based_linear_attention_params *params) {
    based_linear_attention_args a;
    BASED_TRY(based_linear_attention_check(&a, q, k, v, kv, ksum, tokens, out, params, BASED_PHASE_DECODE,
                                           "linear_attention_decode_ref"));
    return based_cpu_linear_attention_decode_ref(&a);
}

/* ---- linear_state -------------------------------------------------------------------- */

based_status based_linear_state_to_expanded(const DLTensor *kv, const DLTensor *ksum, DLTensor *kv_exp,
                                            DLTensor *ksum_exp) {
    based_linear_state_args a;
    BASED_TRY(based_linear_state_check(&a, kv, ksum, kv_exp, ksum_exp, 0, "linear_state_to_expanded"));
    return based_cpu_linear_state_convert(&a);
}

based_status based_linear_state_from_expanded(const DLTensor *kv_exp, const DLTensor *ksum_exp, DLTensor *kv,
                                              DLTensor *ksum) {
    based_linear_state_args a;
    BASED_TRY(based_linear_state_check(&a, kv, ksum, kv_exp, ksum_exp, 1, "linear_state_from_expanded"));
    return based_cpu_linear_state_convert(&a);
}

/* ---- sliding_window ------------------------------------------------------------------ */

based_status based_sliding_window_prefill(const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                          DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
                                          const based_sliding_window_params *params) {
    based_sliding_window_args a;
    BASED_TRY(based_sliding_window_check(&a, q, k, v, k_cache, v_cache, tokens, out, params, BASED_PHASE_PREFILL,
                                         "sliding_window_prefill"));
    return based_cpu_sliding_window_prefill(&a);
}

based_status based_sliding_window_decode(const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                         DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
                                         const based_sliding_window_params *params) {
    based_sliding_window_args a;
    BASED_TRY(based_sliding_window_check(&a, q, k, v, k_cache, v_cache, tokens, out, params, BASED_PHASE_DECODE,
                                         "sliding_window_decode"));
    return based_cpu_sliding_window_decode(&a);
}

based_status based_sliding_window_prefill_ref(const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                              DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
                                              const based_sliding_window_params *params) {
    based_sliding_window_args a;
    BASED_TRY(based_sliding_window_check(&a, q, k, v, k_cache, v_cache, tokens, out, params, BASED_PHASE_PREFILL,
                                         "sliding_window_prefill_ref"));
    return based_cpu_sliding_window_prefill_ref(&a);
}

based_status based_sliding_window_decode_ref(const DLTensor *q, const DLTensor *k, const DLTensor *v,
                                             DLTensor *k_cache, DLTensor *v_cache, DLTensor *tokens, DLTensor *out,
                                             const based_sliding_window_params *params) {
    based_sliding_window_args a;
    BASED_TRY(based_sliding_window_check(&a, q, k, v, k_cache, v_cache, tokens, out, params, BASED_PHASE_DECODE,
                                         "sliding_window_decode_ref"));
    return based_cpu_sliding_window_decode_ref(&a);
}

/* ---- state helpers ------------------------------------------------------------------- */

based_status based_state_zero(DLTensor *t, const DLTensor *batch_indices) {
    based_state_args a;
    BASED_TRY(based_state_zero_check(&a, t, batch_indices));
    const based_status st = based_cpu_state_zero(&a);
    based_state_args_free(&a);
    return st;
}

based_status based_state_copy(DLTensor *dst, const DLTensor *src) {
    based_state_args a;
    BASED_TRY(based_state_copy_check(&a, dst, src));
    const based_status st = based_cpu_state_copy(&a);
    based_state_args_free(&a);
    return st;
}

based_status based_state_gather(DLTensor *dst, const DLTensor *src, const DLTensor *indices) {
    based_state_args a;
    BASED_TRY(based_state_gather_check(&a, dst, src, indices));
    const based_status st = based_cpu_state_gather(&a);
    based_state_args_free(&a);
    return st;
}
