/* The step every attention kernel here is built from (decode.c, prefill.c): query rows attended
 * over the keys of one block table in one KV head of the paged pool, giving normalized float
 * outputs and log-sum-exps.
 *
 * NOTE: where the compiler targets AVX-512 with bf16 (and BATCHLLM_PORTABLE is not defined) head
 * sizes 64 and 128 take intrinsics paths (pool_avx512.h); everything else, and the reference they
 * are tested against, is the portable loop.
 */
#ifndef BATCHLLM_KERNELS_POOL_H
#define BATCHLLM_KERNELS_POOL_H
#include <stdlib.h>
#include "common.h"

typedef struct { /* one layer's pool: k and v are [kvh, slots, d] of esize-byte elements */
    const char *k, *v;
    int64_t slots, bs;
} Pool;

/* Start of the block of `cache` holding key t of block table bt, in KV head kh. */
static inline const char *block_start(const char *cache, const Pool *pl, int64_t kh, const int64_t *bt, int64_t t,
                                      int64_t d, int64_t esize) {
    return cache + (kh * pl->slots + bt[t / pl->bs] * pl->bs) * d * esize;
}

/* Key or value row t (a pointer to its d elements). */
static inline const char *key_row(const char *cache, const Pool *pl, int64_t kh, const int64_t *bt, int64_t t,
                                  int64_t d, int64_t esize) {
    return block_start(cache, pl, kh, bt, t, d, esize) + (t % pl->bs) * d * esize;
}

/* Asks the caches for the K and V rows of keys 0 .. n-1 of block table bt in KV head kh, at most
 * PREFETCH_BYTES of each (a hint, no effect on results).
 * NOTE: the decode kernels call it for a thread's next piece of work while it computes the current
 * one: a sequence's blocks can lie scattered in the pool (the block manager keeps them consecutive
 * where it can), so the hardware prefetchers only start on each block after its first misses, and
 * cold scattered KV was read at 15-17 GB/s (bf16, 172 sequences x 290 keys, 8 layers' pools);
 * fetched ahead, the same reads took 1.25x less time. The cap keeps the next piece's KV and the
 * current one's inside a core's L2. */
#define PREFETCH_BYTES (128 * 1024)
static inline void prefetch_keys(const Pool *pl, int64_t kh, const int64_t *bt, int64_t n, int64_t d, int64_t esize) {
    const int64_t cap = PREFETCH_BYTES / (d * esize);
    n = n < cap ? n : cap;
    for (int64_t t = 0; t < n; t += pl->bs) {
        const int64_t bytes = (n - t < pl->bs ? n - t : pl->bs) * d * esize;
        const char *k = block_start(pl->k, pl, kh, bt, t, d, esize), *v = block_start(pl->v, pl, kh, bt, t, d, esize);
        for (int64_t o = 0; o < bytes; o += 64) {
            __builtin_prefetch(k + o, 0, 2);
            __builtin_prefetch(v + o, 0, 2);
        }
    }
}

static inline float load_elem(const void *p, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Rows r < R of scores (row stride `stride`, n keys) become exp(s - max); mx[r], sum[r] kept. */
static inline void exp_rows(float *scores, int64_t R, int64_t n, int64_t stride, float *mx, float *sum) {
    for (int64_t r = 0; r < R; r++) mx[r] = exp_row(scores + r * stride, n, &sum[r]);
}

/* res rows (d floats) divided by their sums; lse = max + log(sum). A row that attended no key has
 * sum 0 (any key gives sum >= 1: its maximum contributes exp(0)): res 0 and lse -inf. */
static inline void finish_rows(float *res, int64_t R, int64_t d, const float *mx, const float *sum, float *lse) {
    for (int64_t r = 0; r < R; r++) {
        const float inv = sum[r] > 0.0f ? 1.0f / sum[r] : 0.0f;
        for (int64_t i = 0; i < d; i++) res[r * d + i] *= inv;
        lse[r] = sum[r] > 0.0f ? mx[r] + logf(sum[r]) : -INFINITY;
    }
}

/* The portable attend_rows: query rows qrows[r] (d elements, the pool's dtype) over keys 0..n-1
 * of block table bt in KV head kh -> res [R, d] (float, normalized), lse [R]. `scores` holds
 * R * n floats. */
ALWAYS_INLINE void rows_portable(const char *const *qrows, int64_t R, const Pool *pl, int64_t kh, const int64_t *bt,
                                 int64_t n, const int64_t d, float scale, const int is_bf16, float *scores,
                                 float *res, float *lse) {
    const int64_t esize = is_bf16 ? 2 : 4;
    float row[d], mx[R], sum[R];
    for (int64_t i = 0; i < R * d; i++) res[i] = 0.0f;
    for (int64_t t = 0; t < n; t++) { /* one key row for all R query rows */
        const char *kr = key_row(pl->k, pl, kh, bt, t, d, esize);
        for (int64_t i = 0; i < d; i++) row[i] = load_elem(kr, i, is_bf16);
        for (int64_t r = 0; r < R; r++) {
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < d; i++) s += load_elem(qrows[r], i, is_bf16) * row[i];
            scores[r * n + t] = s * scale;
        }
    }
    exp_rows(scores, R, n, n, mx, sum);
    for (int64_t t = 0; t < n; t++) {
        const char *vr = key_row(pl->v, pl, kh, bt, t, d, esize);
        for (int64_t i = 0; i < d; i++) row[i] = load_elem(vr, i, is_bf16);
        for (int64_t r = 0; r < R; r++)
            for (int64_t i = 0; i < d; i++) res[r * d + i] += scores[r * n + t] * row[i];
    }
    finish_rows(res, R, d, mx, sum, lse);
}

#if defined(__AVX512F__) && defined(__AVX512BF16__) && !defined(BATCHLLM_PORTABLE)
#define HAVE_AVX512 1
#include "pool_avx512.h"
#define ROWS(D, BF, QR, R, BT, N, SC, RES, LSE) rows_dot(QR, R, &pl, kh, BT, N, D, scale, BF, SC, RES, LSE)
#else
#define HAVE_AVX512 0
#define ROWS(D, BF, QR, R, BT, N, SC, RES, LSE) rows_portable(QR, R, &pl, kh, BT, N, D, scale, BF, SC, RES, LSE)
#endif

/* attend_rows with the head size and dtype as compile-time constants where a fast path exists. */
#define ATTEND_ROWS(QR, R, BT, N, SC, RES, LSE)                                        \
    do {                                                                               \
        if (HAVE_AVX512 && d == 64 && is_bf16) ROWS(64, 1, QR, R, BT, N, SC, RES, LSE);   \
        else if (HAVE_AVX512 && d == 64) ROWS(64, 0, QR, R, BT, N, SC, RES, LSE);         \
        else if (HAVE_AVX512 && d == 128 && is_bf16) ROWS(128, 1, QR, R, BT, N, SC, RES, LSE); \
        else if (HAVE_AVX512 && d == 128) ROWS(128, 0, QR, R, BT, N, SC, RES, LSE);       \
        else rows_portable(QR, R, &pl, kh, BT, N, d, scale, is_bf16, SC, RES, LSE);    \
    } while (0)

/* Writes res [R, d] rows as the output dtype to out rows dst[r] (element offsets). */
static inline void store_rows(const float *res, int64_t R, int64_t d, const int64_t *dst, int is_bf16, void *out) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t i = 0; i < d; i++) {
            if (is_bf16) ((uint16_t *)out)[dst[r] + i] = f32_to_bf16(res[r * d + i]);
            else ((float *)out)[dst[r] + i] = res[r * d + i];
        }
}

#endif
