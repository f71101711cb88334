/* Prefill attention read straight from the paged KV pool (kernels/cpu.py: paged_prefill), built on
 * pool.h's step. Query chunks attend the keys of a key set (a block table and its length): query j
 * of chunk c sees keys 0 .. min(n, lim0[c] + j) - 1, so a causal chunk at positions p .. p+q-1
 * has lim0 = p + 1, and a chunk that sees all n keys (group members over their prefix) lim0 = n.
 * Outputs are normalized, with log-sum-exps for merging partial attentions.
 *
 * NOTE: a task is (key set, KV head, tile of consecutive queries x the query heads of the KV head,
 * TILE_ROWS rows). Its scores, rows x keys up to the tile's largest limit, stay in L2, and a tile
 * of one causal chunk computes at most a tile's width of masked keys (tile sizes 16 to 128 rows
 * measured the same). On the AVX-512 paths each key set's
 * K is packed once per call (pack_k), before the tiles, so every chunk of a key set, e.g. all of a
 * group's members, reads one packed copy; V is read from the pool (pairs interleaved on the fly).
 */
#include "pool.h"

#define TILE_ROWS 64

static inline int64_t tile_queries(int64_t g) { return g >= TILE_ROWS ? 1 : TILE_ROWS / g; }

static inline int packed_path(int64_t d) { return HAVE_AVX512 && (d == 64 || d == 128); }

/* Floats of work per thread paged_prefill needs for key sets of at most nmax keys. */
int64_t prefill_work(int64_t H, int64_t kvh, int64_t nmax) {
    const int64_t g = H / kvh, R4 = (tile_queries(g) * g + 3) / 4 * 4, pn = (nmax + 15) / 16 * 16;
    return (R4 * (pn > 0 ? pn : 16) + 15) / 16 * 16;
}

/* 32-bit words of packed K paged_prefill needs for key sets of nkeys[0 .. S-1] keys (0 where no
 * packed path is built for head size d): each key set's keys rounded up to 16, per KV head. */
int64_t prefill_pack(const int64_t *nkeys, int64_t S, int64_t kvh, int64_t d, int is_bf16) {
    int64_t keys = 0;
    for (int64_t s = 0; s < S; s++) keys += (nkeys[s] + 15) / 16 * 16;
    return packed_path(d) ? keys * kvh * (is_bf16 ? d / 2 : d) : 0;
}

/* q [N, H, d] flat query rows; k_cache, v_cache [kvh, slots, d]; key set s: keys 0 .. nkeys[s]-1
 * of block table kbt [S, nb]; its chunks are cfirst[s] .. cfirst[s+1]-1, chunk c being qlen[c]
 * queries at flat rows qrow[c] .. with first limit lim0[c] (see above). All contiguous, q and the
 * pool of one dtype (is_bf16). Writes the chunks' rows of out [N, H, d] (that dtype) and, if lse
 * is not NULL, of lse [N, H] float32; other rows are left alone. kpack holds prefill_pack(...)
 * words, work prefill_work(...) = wsize floats per thread, with nmax >= every nkeys.
 * Returns 0, or without touching anything: 1 when cfirst is not 0 .. C in order, 2 when a chunk
 * has fewer than 0 queries or rows outside 0 .. N-1, 3 when a key set has fewer than 0 keys or
 * more than its block table holds, 4 when out of memory. */
int paged_prefill(const void *q, const void *k_cache, const void *v_cache, int64_t slots, int64_t S,
                  const int64_t *kbt, int64_t nb, const int64_t *nkeys, const int64_t *cfirst, int64_t C,
                  const int64_t *qrow, const int64_t *qlen, const int64_t *lim0, int64_t N, int64_t H, int64_t kvh,
                  int64_t d, int64_t bs, float scale, int is_bf16, void *out, float *lse, uint32_t *kpack,
                  float *work, int64_t wsize, int threads) {
    const int64_t g = H / kvh, esize = is_bf16 ? 2 : 4, TQ = tile_queries(g), W = is_bf16 ? d / 2 : d;
    const Pool pl = {k_cache, v_cache, slots, bs};
    if (cfirst[0] != 0 || cfirst[S] != C) return 1;
    for (int64_t s = 0; s < S; s++)
        if (cfirst[s + 1] < cfirst[s]) return 1;
    for (int64_t c = 0; c < C; c++)
        if (qlen[c] < 0 || qrow[c] < 0 || qrow[c] + qlen[c] > N) return 2;
    for (int64_t s = 0; s < S; s++)
        if (nkeys[s] < 0 || nkeys[s] > nb * bs) return 3;
    /* first task and first packed word of each key set */
    int64_t *first = malloc((size_t)(S + 1) * sizeof(int64_t)), *koff = malloc((size_t)(S + 1) * sizeof(int64_t));
    if (!first || !koff) {
        free(first);
        free(koff);
        return 4;
    }
    first[0] = koff[0] = 0;
    for (int64_t s = 0; s < S; s++) {
        int64_t nq = 0;
        for (int64_t c = cfirst[s]; c < cfirst[s + 1]; c++) nq += qlen[c];
        first[s + 1] = first[s] + (nq + TQ - 1) / TQ * kvh;
        koff[s + 1] = koff[s] + (nkeys[s] + 15) / 16 * 16 * W * kvh;
    }
#pragma omp parallel num_threads(threads)
    {
#if HAVE_AVX512
        if (packed_path(d)) {
#pragma omp for schedule(dynamic)
            for (int64_t t = 0; t < S * kvh; t++) {
                const int64_t s = t / kvh, *bt = kbt + s * nb, n = nkeys[s];
                uint32_t *kp = kpack + koff[s] + t % kvh * ((n + 15) / 16 * 16) * W;
                if (d == 64) pack_k(&pl, t % kvh, bt, n, 64, is_bf16, kp);
                else pack_k(&pl, t % kvh, bt, n, 128, is_bf16, kp);
            }
        }
#endif
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < first[S]; task++) {
            int64_t s = 0, lo = 0, hi = S - 1; /* the key set: first[s] <= task < first[s + 1] */
            while (lo <= hi) {
                const int64_t mid = (lo + hi) / 2;
                if (first[mid] <= task) { s = mid; lo = mid + 1; } else hi = mid - 1;
            }
            const int64_t kh = (task - first[s]) % kvh, n = nkeys[s], *bt = kbt + s * nb;
            int64_t c = cfirst[s], j = (task - first[s]) / kvh * TQ, R = 0, tmax = 0;
            while (j >= qlen[c]) j -= qlen[c++]; /* (skips empty chunks) */
            const char *qrows[(TQ * g + 3) / 4 * 4];
            int64_t dst[TQ * g], lim[TQ * g];
            for (int64_t i = 0; i < TQ && c < cfirst[s + 1]; i++) { /* rows: query-major, then head */
                const int64_t m = lim0[c] + j < 0 ? 0 : (lim0[c] + j < n ? lim0[c] + j : n);
                for (int64_t h = 0; h < g; h++, R++) {
                    dst[R] = ((qrow[c] + j) * H + kh * g + h) * d;
                    qrows[R] = (const char *)q + dst[R] * esize;
                    lim[R] = m;
                }
                tmax = m > tmax ? m : tmax;
                if (++j == qlen[c])
                    for (j = 0, c++; c < cfirst[s + 1] && qlen[c] == 0;) c++;
            }
            for (int64_t r = R; r < (R + 3) / 4 * 4; r++) qrows[r] = qrows[R - 1]; /* padding rows for tiles of 4 */
            float *w = work + (int64_t)omp_get_thread_num() * wsize, res[R * d], l[R];
#if HAVE_AVX512
            const uint32_t *kp = kpack + koff[s] + kh * ((n + 15) / 16 * 16) * W;
            if (d == 64 && is_bf16) rows_prepacked(qrows, R, lim, &pl, kh, bt, tmax, kp, 64, scale, 1, w, res, l);
            else if (d == 64) rows_prepacked(qrows, R, lim, &pl, kh, bt, tmax, kp, 64, scale, 0, w, res, l);
            else if (d == 128 && is_bf16) rows_prepacked(qrows, R, lim, &pl, kh, bt, tmax, kp, 128, scale, 1, w, res, l);
            else if (d == 128) rows_prepacked(qrows, R, lim, &pl, kh, bt, tmax, kp, 128, scale, 0, w, res, l);
            else
#endif
                for (int64_t r = 0; r < R; r++)
                    rows_portable(qrows + r, 1, &pl, kh, bt, lim[r], d, scale, is_bf16, w, res + r * d, l + r);
            store_rows(res, R, d, dst, is_bf16, out);
            if (lse)
                for (int64_t r = 0; r < R; r++) lse[dst[r] / d] = l[r];
        }
    }
    free(first);
    free(koff);
    return 0;
}
