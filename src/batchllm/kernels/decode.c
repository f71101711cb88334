/* Decode attention read straight from the paged KV pool (kernels/cpu.py: paged_decode and
 * shared_decode), built on pool.h's step: R query rows over the keys of one block table in one KV
 * head.
 */
#include "pool.h"

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
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t task = 0; task < B * kvh; task++) {
        const int64_t b = task / kvh, kh = task % kvh, n = min64(lens[b], tmax);
        const int64_t nx = task + threads; /* this thread's next task: its KV is fetched while this one computes */
        if (nx < B * kvh) prefetch_keys(&pl, nx % kvh, bt + nx / kvh * nb, min64(lens[nx / kvh], tmax), d, esize);
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
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t task = 0; task < first[G]; task++) {
        int64_t j = 0;
        while (first[j + 1] <= task) j++;
        const int64_t nx = task + threads; /* this thread's next task: its prefix is fetched during the own parts */
        int64_t jn = j;
        while (nx < first[G] && first[jn + 1] <= nx) jn++;
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
        prefetch_keys(&pl, kh, obt + m0 * onb, olens[m0], d, esize); /* the first own part, during the prefix pass */
#if HAVE_AVX512
        if (d == 64 && is_bf16) rows_packed(qrows, R, &pl, kh, pbt + j * pnb, n, 64, scale, 1, w, res, lse_p);
        else if (d == 64) rows_packed(qrows, R, &pl, kh, pbt + j * pnb, n, 64, scale, 0, w, res, lse_p);
        else if (d == 128 && is_bf16) rows_packed(qrows, R, &pl, kh, pbt + j * pnb, n, 128, scale, 1, w, res, lse_p);
        else if (d == 128) rows_packed(qrows, R, &pl, kh, pbt + j * pnb, n, 128, scale, 0, w, res, lse_p);
        else
#endif
            rows_portable(qrows, R, &pl, kh, pbt + j * pnb, n, d, scale, is_bf16, w, res, lse_p);
        if (nx < first[G]) prefetch_keys(&pl, (nx - first[jn]) % kvh, pbt + jn * pnb, plens[jn], d, esize);
        for (int64_t m = m0; m < m1; m++) { /* own part, merged into the prefix result */
            const int64_t r0 = (m - m0) * g;
            if (m + 1 < m1) prefetch_keys(&pl, kh, obt + (m + 1) * onb, olens[m + 1], d, esize); /* the next one's */
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
