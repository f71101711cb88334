/* Shared by the CPU kernels (decode.c, prefill.c, argmax.c): float helpers, compiled into one library. */
#ifndef BATCHLLM_KERNELS_COMMON_H
#define BATCHLLM_KERNELS_COMMON_H
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

/* exp_nonpos's constants (the AVX-512 exp16_nonpos uses the same): log2(e), ln 2 in two parts
 * (Cody-Waite), and the Taylor coefficients of e^r from r^6 down to r^1 (the constant term is 1). */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693145751953125f
#define EXP_LN2_LO 1.428606765330187045e-6f
static const float EXP_POLY[6] = {1.38888892e-3f, 8.33333377e-3f, 4.16666679e-2f, 1.66666672e-1f, 0.5f, 1.0f};

/* exp(x) for x <= 0 with float accuracy (about 1 ulp); below -87 it returns exp(-87) ~ 1.6e-38,
 * which is 0 next to the row maximum's exp(0) = 1.
 * NOTE: a local polynomial rather than libm's expf, which does not vectorize without -ffast-math
 * (and -ffast-math would assume away the -inf the kernels rely on). */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = nearbyintf(x * EXP_LOG2E);
    float r = x - n * EXP_LN2_HI - n * EXP_LN2_LO;
    float p = EXP_POLY[0];
    for (int i = 1; i < 6; i++) p = p * r + EXP_POLY[i];
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; inputs are finite */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* x[0 .. n-1] becomes exp(x - max) in place; returns the max, *sum gets the sum. The shared first
 * half of a softmax: the attention kernels normalize after the value pass. */
static inline float exp_row(float *x, int64_t n, float *sum) {
    float m = -INFINITY, s = 0.0f;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; j++) {
        x[j] = exp_nonpos(x[j] - m);
        s += x[j];
    }
    *sum = s;
    return m;
}

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#endif
