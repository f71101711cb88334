/* Decode attention read straight from the paged KV pool (kernels/cpu.py: paged_decode and
 * shared_decode). Both are built from one step: R query rows attended over the keys of one block
 * table in one KV head, giving normalized float outputs and log-sum-exps (attend_rows).
 *
 * NOTE: where the compiler targets AVX-512 with bf16 (and BATCHLLM_PORTABLE is not defined) head
 * sizes 64 and 128 take intrinsics paths; everything else, and the reference they are tested
 * against, is the portable loop.
 */
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

static inline float load_elem(const void *p, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Rows r < R of scores (row stride `stride`, n keys) become exp(s - max); mx[r], sum[r] kept. */
static void exp_rows(float *scores, int64_t R, int64_t n, int64_t stride, float *mx, float *sum) {
    for (int64_t r = 0; r < R; r++) mx[r] = exp_row(scores + r * stride, n, &sum[r]);
}

/* res rows (d floats) divided by their sums; lse = max + log(sum), or -inf with res 0 when n = 0. */
static void finish_rows(float *res, int64_t R, int64_t d, int64_t n, const float *mx, const float *sum, float *lse) {
    for (int64_t r = 0; r < R; r++) {
        const float inv = n ? 1.0f / sum[r] : 0.0f;
        for (int64_t i = 0; i < d; i++) res[r * d + i] *= inv;
        lse[r] = n ? mx[r] + logf(sum[r]) : -INFINITY;
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
    finish_rows(res, R, d, n, mx, sum, lse);
}

#if defined(__AVX512F__) && defined(__AVX512BF16__) && !defined(BATCHLLM_PORTABLE)
#define HAVE_AVX512 1
#include "decode_avx512.h"
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
static void store_rows(const float *res, int64_t R, int64_t d, const int64_t *dst, int is_bf16, void *out) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t i = 0; i < d; i++) {
            if (is_bf16) ((uint16_t *)out)[dst[r] + i] = f32_to_bf16(res[r * d + i]);
            else ((float *)out)[dst[r] + i] = res[r * d + i];
        }
}

/* Decode attention, one query per sequence: q [B, H, d]; k_cache, v_cache [kvh, slots, d]; block
 * tables bt [B, nb] (slot of key t of sequence b: bt[b, t / bs] * bs + t % bs); lens [B] keys of
 * each sequence (0: empty). All contiguous, q and the caches of one dtype (is_bf16). Writes out
 * [B, H, d] in that dtype and, if lse is not NULL, lse [B, H] float32 (-inf for an empty sequence,
 * whose out is 0). `work` holds (H / kvh) * nb * bs floats per thread. One task per (sequence, KV
 * head): its H / kvh query heads share each key and value row read from the pool. */
void paged_decode(const void *q, const void *k_cache, const void *v_cache, int64_t slots, const int64_t *bt,
                  int64_t nb, const int64_t *lens, int64_t B, int64_t H, int64_t kvh, int64_t d, int64_t bs,
                  float scale, int is_bf16, void *out, float *lse, float *work, int threads) {
    const int64_t g = H / kvh, tmax = nb * bs, esize = is_bf16 ? 2 : 4;
    const Pool pl = {k_cache, v_cache, slots, bs};
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t task = 0; task < B * kvh; task++) {
        const int64_t b = task / kvh, kh = task % kvh, n = lens[b] < tmax ? lens[b] : tmax;
        float *scores = work + (int64_t)omp_get_thread_num() * g * tmax, res[g * d], l[g];
        const char *qrows[g];
        int64_t dst[g];
        for (int64_t h = 0; h < g; h++) {
            dst[h] = (b * H + kh * g + h) * d;
            qrows[h] = (const char *)q + dst[h] * esize;
        }
        ATTEND_ROWS(qrows, g, bt + b * nb, n, scores, res, l);
        store_rows(res, g, d, dst, is_bf16, out);
        if (lse)
            for (int64_t h = 0; h < g; h++) lse[b * H + kh * g + h] = l[h];
    }
}

/* Floats of work per thread that shared_decode needs (see there). */
int64_t shared_decode_work(int64_t H, int64_t kvh, int64_t d, int64_t mt, int64_t pmax, int64_t omax) {
    const int64_t g = H / kvh, R = (mt * g + 3) / 4 * 4, pn = (pmax + 15) / 16 * 16;
    /* packed K (as floats: bf16 takes half), prefix scores, own scores */
    const int64_t n = pn * d + R * pn + g * (omax > 0 ? omax : 1) + 64;
    return (n + 15) / 16 * 16; /* keeps every thread's part 64-byte aligned */
}

/* Decode attention of prefix-sharing group members, prefix and own part in one call.
 *
 * q [N, H, d]: the decode queries of G groups, group j's members in rows offs[j] .. offs[j+1]-1.
 * Group j's prefix: keys 0 .. plens[j]-1 of block table pbt [G, pnb]; member row i's own part:
 * keys 0 .. olens[i]-1 of block table obt [N, onb] (its blocks after the prefix). out [N, H, d] =
 * attention over prefix + own part, merged by log-sum-exp. Work: tasks of (group, KV head, up to
 * mt members); each reads its group's prefix once for its mt * H / kvh query rows. `work` holds
 * shared_decode_work(...) floats per thread, with pmax >= every plens and omax >= every olens.
 */
void shared_decode(const void *q, const void *k_cache, const void *v_cache, int64_t slots, int64_t G,
                   const int64_t *offs, const int64_t *pbt, int64_t pnb, const int64_t *plens, const int64_t *obt,
                   int64_t onb, const int64_t *olens, int64_t H, int64_t kvh, int64_t d, int64_t bs, float scale,
                   int is_bf16, int64_t mt, void *out, float *work, int64_t wsize, int threads) {
    const int64_t g = H / kvh, esize = is_bf16 ? 2 : 4;
    const Pool pl = {k_cache, v_cache, slots, bs};
    int64_t first[G + 1]; /* first task of each group */
    first[0] = 0;
    for (int64_t j = 0; j < G; j++) first[j + 1] = first[j] + (offs[j + 1] - offs[j] + mt - 1) / mt * kvh;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t task = 0; task < first[G]; task++) {
        int64_t j = 0;
        while (first[j + 1] <= task) j++;
        const int64_t kh = (task - first[j]) % kvh, m0 = offs[j] + (task - first[j]) / kvh * mt;
        const int64_t m1 = m0 + mt < offs[j + 1] ? m0 + mt : offs[j + 1], R = (m1 - m0) * g;
        const int64_t n = plens[j];
        float *w = work + (int64_t)omp_get_thread_num() * wsize, res[R * d], lse_p[R], res_o[g * d], lse_o[g];
        const char *qrows[(R + 3) / 4 * 4];
        int64_t dst[R];
        for (int64_t r = 0; r < R; r++) {
            dst[r] = ((m0 + r / g) * H + kh * g + r % g) * d;
            qrows[r] = (const char *)q + dst[r] * esize;
        }
        for (int64_t r = R; r < (R + 3) / 4 * 4; r++) qrows[r] = qrows[R - 1]; /* padding rows for tiles of 4 */
#if HAVE_AVX512
        if (d == 64 && is_bf16) rows_packed(qrows, R, &pl, kh, pbt + j * pnb, n, 64, scale, 1, w, res, lse_p);
        else if (d == 64) rows_packed(qrows, R, &pl, kh, pbt + j * pnb, n, 64, scale, 0, w, res, lse_p);
        else if (d == 128 && is_bf16) rows_packed(qrows, R, &pl, kh, pbt + j * pnb, n, 128, scale, 1, w, res, lse_p);
        else if (d == 128) rows_packed(qrows, R, &pl, kh, pbt + j * pnb, n, 128, scale, 0, w, res, lse_p);
        else
#endif
            rows_portable(qrows, R, &pl, kh, pbt + j * pnb, n, d, scale, is_bf16, w, res, lse_p);
        for (int64_t m = m0; m < m1; m++) { /* own part, merged into the prefix result */
            const int64_t r0 = (m - m0) * g;
            ATTEND_ROWS(qrows + r0, g, obt + m * onb, olens[m], w, res_o, lse_o);
            for (int64_t h = 0; h < g; h++) {
                /* weight of the prefix part: sigmoid(lse_p - lse_o); an empty part (-inf) weighs 0 */
                const float a = lse_p[r0 + h], b = lse_o[h];
                const float wp = a == -INFINITY ? 0.0f : (b == -INFINITY ? 1.0f : 1.0f / (1.0f + expf(b - a)));
                float *o = res + (r0 + h) * d;
                for (int64_t i = 0; i < d; i++) o[i] = res_o[h * d + i] + wp * (o[i] - res_o[h * d + i]);
            }
        }
        store_rows(res, R, d, dst, is_bf16, out);
    }
}

/* 1 where the AVX-512 paths (head sizes 64 and 128) are built, 0 where only the portable loop is. */
int avx512_decode(void) { return HAVE_AVX512; }
