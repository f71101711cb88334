/* Fused element-wise steps of a decoder layer (kernels/cpu.py: rms_norm, silu_mul), each one
 * pass over its rows instead of the 3-8 PyTorch ops (and their temporaries) it replaces.
 *
 * NOTE: the rounding follows transformers' modules op for op: RMSNorm normalises in float32,
 * rounds to the model's dtype, then multiplies by the weight in that dtype; the residual add and
 * SiLU(gate) * up round after each op. Only the float sums (a few ulp of the variance) and the
 * exp polynomial differ from PyTorch's, as in the attention kernels.
 */
#include "common.h"

ALWAYS_INLINE float load(const void *p, int64_t i, const int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* A value rounded to the dtype (bf16: round to nearest even), as a float. */
ALWAYS_INLINE float round_to(float x, const int is_bf16) { return is_bf16 ? bf16_to_f32(f32_to_bf16(x)) : x; }

ALWAYS_INLINE void store(void *p, int64_t i, float x, const int is_bf16) {
    if (is_bf16) ((uint16_t *)p)[i] = f32_to_bf16(x);
    else ((float *)p)[i] = x;
}

ALWAYS_INLINE void rms_norm_row(void *x, const void *res, const void *weight, void *out, int64_t n, float eps,
                                const int is_bf16) {
    float ss = 0.0f;
    if (res) {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) {
            const float v = round_to(load(x, i, is_bf16) + load(res, i, is_bf16), is_bf16);
            store(x, i, v, is_bf16);
            ss += v * v;
        }
    } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) ss += load(x, i, is_bf16) * load(x, i, is_bf16);
    }
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; i++)
        store(out, i, load(weight, i, is_bf16) * round_to(load(x, i, is_bf16) * inv, is_bf16), is_bf16);
}

/* out = weight * round(x * rsqrt(mean(x^2) + eps)) per row of x [rows, n]; with `res` not NULL,
 * x = round(x + res) first, written back to x (the residual stream). All of one dtype
 * (is_bf16), contiguous; out may not alias x or res. */
void rms_norm(void *x, const void *res, const void *weight, void *out, int64_t rows, int64_t n, float eps,
              int is_bf16, int threads) {
    const int64_t es = is_bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        char *xr = (char *)x + r * n * es, *o = (char *)out + r * n * es;
        const char *rr = res ? (const char *)res + r * n * es : NULL;
        if (is_bf16) rms_norm_row(xr, rr, weight, o, n, eps, 1);
        else rms_norm_row(xr, rr, weight, o, n, eps, 0);
    }
}

/* silu(g) = g / (1 + e^-g), with the exponent kept <= 0 (for g < 0: g e^g / (1 + e^g)). */
static inline float silu(float g) {
    const float e = exp_nonpos(g < 0.0f ? g : -g);
    return g < 0.0f ? g * e / (1.0f + e) : g / (1.0f + e);
}

ALWAYS_INLINE void silu_mul_row(const void *gate, const void *up, void *out, int64_t m, const int is_bf16) {
#pragma omp simd
    for (int64_t i = 0; i < m; i++)
        store(out, i, round_to(round_to(silu(load(gate, i, is_bf16)), is_bf16) * load(up, i, is_bf16), is_bf16),
              is_bf16);
}

/* out [rows, m] = round(round(silu(gate)) * up) with gate_up [rows, 2m] (gate then up per row),
 * one dtype (is_bf16), contiguous. */
void silu_mul(const void *gate_up, void *out, int64_t rows, int64_t m, int is_bf16, int threads) {
    const int64_t es = is_bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const char *g = (const char *)gate_up + r * 2 * m * es;
        if (is_bf16) silu_mul_row(g, g + m * es, (char *)out + r * m * es, m, 1);
        else silu_mul_row(g, g + m * es, (char *)out + r * m * es, m, 0);
    }
}
