/* AVX-512 (with bf16) paths of pool.h's step, for head sizes D that are multiples of 32.
 *
 * rows_dot: a few query rows (one sequence's heads of a KV head) over a sequence's keys.
 * NOTE: why not the portable loop: its score of one key is a dot product that ends in a horizontal
 * reduction, and those reductions, not memory, bounded it (~100 cycles per key row in bf16). Here
 * 16 keys' dot-product vectors are reduced together by one transpose-add tree (sum16), bf16 scores
 * use the CPU's bf16 dot-product instruction (exact products, float sums, like the bf16 matmul the
 * reference uses), and the value pass keeps a few rows' accumulators in registers while it
 * streams the value rows once per row tile. In bf16 the value pass takes the probabilities as
 * bf16 (as the reference's bf16 matmul does) and pairs of adjacent value rows, interleaved on the
 * fly, so it too runs on the bf16 dot-product instruction: half the multiply instructions of
 * widening V to float and no conversions (paged_decode, 64 sequences x 1,100 keys, warm caches:
 * 1.0 -> 0.70 ms).
 *
 * rows_packed: many query rows (a group's members) over a shared prefix. The prefix K is first
 * repacked into the layout of a matrix product (16 keys side by side, by 16 x 16 register
 * transposes), so each score update is a broadcast times a packed vector, with no horizontal
 * reductions, paid for by one repack per task. Scores go 4 rows x 64 keys per step: each
 * broadcast query word serves 4 products and 16 independent accumulators hide the dot product's
 * latency. The value pass is rows_dot's (in bf16, pairing V rows on the fly measured as fast as
 * repacking V once per task).
 * NOTE: measured per phase with the time-stamp counter in the engine (micro workload, bf16), a
 * group decode's cycles split (while V was still repacked per task): scores 21%, values 18%,
 * members' own parts 31%, K packing 11%, V packing 7%, exp 8%, bf16 probabilities 2%. The
 * packing and the own parts mostly wait on memory (each layer's KV is evicted by the other layers
 * and the weights before the next step: a call's first run takes 2.6x a repeat there); software
 * prefetch of the next block was tried and gained nothing. Over the whole micro run these kernels
 * cut group-decode cycles by 16%.
 */
#include <immintrin.h>

/* Lane j of the result is the sum of the 16 lanes of p[j]. */
static inline __m512 sum16(const __m512 p[16]) {
    __m512 a[8], b[4], c[2];
    for (int k = 0; k < 8; k++) /* 128-bit lanes (0,1) + (2,3): two vectors per result */
        a[k] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(p[2 * k], p[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; k++) /* lanes (0,2) + (1,3): lane L of b[k] holds vector 4k+L in 4 floats */
        b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xDD));
    for (int k = 0; k < 2; k++)
        c[k] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * k], b[2 * k + 1]), _mm512_unpackhi_ps(b[2 * k], b[2 * k + 1]));
    const __m512 d = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))));
    /* element 4L + e of d is vector 4e + L */
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), d);
}

/* float32 value pass of rows r0 .. r0+HP-1 over V in the pool: res[r] = sum_t p[r][t] * v[t],
 * p = scores rows (stride `stride`). */
ALWAYS_INLINE void values_tile(const Pool *pl, int64_t kh, const int64_t *bt, int64_t n, const int64_t D,
                               const int HP, int64_t r0, const float *scores, int64_t stride, float *res) {
    __m512 acc[HP][D / 16];
    for (int h = 0; h < HP; h++)
        for (int64_t c = 0; c < D / 16; c++) acc[h][c] = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < n; t0 += pl->bs) {
        const float *blk = (const float *)block_start(pl->v, pl, kh, bt, t0, D, 4);
        const int64_t cnt = n - t0 < pl->bs ? n - t0 : pl->bs;
        for (int64_t j = 0; j < cnt; j++) {
            for (int64_t c = 0; c < D / 16; c++) {
                const __m512 v = _mm512_loadu_ps(blk + j * D + 16 * c);
                for (int h = 0; h < HP; h++)
                    acc[h][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(r0 + h) * stride + t0 + j]), v, acc[h][c]);
            }
        }
    }
    for (int h = 0; h < HP; h++)
        for (int64_t c = 0; c < D / 16; c++) _mm512_storeu_ps(res + (r0 + h) * D + 16 * c, acc[h][c]);
}

/* The float32 value pass of R rows in tiles whose accumulators fit in 16 of the 32 vector
 * registers. */
ALWAYS_INLINE void values_rows(const Pool *pl, int64_t kh, const int64_t *bt, int64_t n, const int64_t D,
                               int64_t R, const float *scores, int64_t stride, float *res) {
    int64_t r0 = 0;
    if (D <= 64)
        for (; r0 + 4 <= R; r0 += 4) values_tile(pl, kh, bt, n, D, 4, r0, scores, stride, res);
    for (; r0 + 2 <= R; r0 += 2) values_tile(pl, kh, bt, n, D, 2, r0, scores, stride, res);
    for (; r0 < R; r0++) values_tile(pl, kh, bt, n, D, 1, r0, scores, stride, res);
}

/* Columns 0..31 in order from the (low, high) accumulators of one 32-column group of
 * values_pairs_tile (the 16-bit interleave of two value rows, low half and high half): lane j of
 * the low one is column 8*(j/4) + j%4, of the high one that + 4. */
static inline void unpair32(__m512 lo, __m512 hi, float *dst) {
    const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i i1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    _mm512_storeu_ps(dst, _mm512_permutex2var_ps(lo, i0, hi));
    _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(lo, i1, hi));
}

/* bf16 value pass of rows r0 .. r0+HP-1 straight from the pool: p16 holds the probabilities as
 * bf16 (row stride `stride`, 0 from each row's last attended key up to n rounded up to even), and
 * each bf16 dot product takes a pair of adjacent keys of a block (the 16-bit interleave of their
 * value rows; an odd block's last key pairs with a zero row). Accumulators are in unpair32's
 * column order.
 * NOTE: a pair's two probabilities are one 32-bit broadcast load, which the zeros past key n make
 * safe for an odd last key; building that word from two 16-bit loads, a shift and an or per row
 * cost paged_prefill 1.2x (16 members x 100 queries over 1,100 keys, bf16: 6.3 -> 5.3 ms). */
ALWAYS_INLINE void values_pairs_tile(const Pool *pl, int64_t kh, const int64_t *bt, int64_t n, const int64_t D,
                                     const int HP, int64_t r0, const uint16_t *p16, int64_t stride, float *res) {
    __m512 acc[4][8];
    for (int h = 0; h < HP; h++)
        for (int64_t c = 0; c < D / 16; c++) acc[h][c] = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < n; t0 += pl->bs) {
        const char *blk = block_start(pl->v, pl, kh, bt, t0, D, 2);
        const int64_t cnt = n - t0 < pl->bs ? n - t0 : pl->bs;
        for (int64_t j = 0; j < cnt; j += 2) {
            const int pair = j + 1 < cnt; /* key j+1 is in this block */
            __m512i lo[4], hi[4];
            for (int64_t c = 0; c < D / 32; c++) {
                const __m512i x = _mm512_loadu_si512((const __m512i *)(blk + j * D * 2) + c);
                const __m512i y = pair ? _mm512_loadu_si512((const __m512i *)(blk + (j + 1) * D * 2) + c)
                                       : _mm512_setzero_si512();
                lo[c] = _mm512_unpacklo_epi16(x, y);
                hi[c] = _mm512_unpackhi_epi16(x, y);
            }
            for (int h = 0; h < HP; h++) {
                int32_t pw; /* the probabilities of keys j and j+1 (0 past key n), one 32-bit load */
                memcpy(&pw, p16 + (r0 + h) * stride + t0 + j, sizeof pw);
                const __m512bh pp = (__m512bh)_mm512_set1_epi32(pw);
                for (int64_t c = 0; c < D / 32; c++) {
                    acc[h][2 * c] = _mm512_dpbf16_ps(acc[h][2 * c], pp, (__m512bh)lo[c]);
                    acc[h][2 * c + 1] = _mm512_dpbf16_ps(acc[h][2 * c + 1], pp, (__m512bh)hi[c]);
                }
            }
        }
    }
    for (int h = 0; h < HP; h++)
        for (int64_t c = 0; c < D / 32; c++) unpair32(acc[h][2 * c], acc[h][2 * c + 1], res + (r0 + h) * D + 32 * c);
}

/* The bf16 value pass of all R rows; p16 holds the probabilities as bf16 (row stride `stride`
 * bf16s, as values_pairs_tile takes them; softmax_row writes them so). */
ALWAYS_INLINE void values_rows_bf16(const Pool *pl, int64_t kh, const int64_t *bt, int64_t n, const int64_t D,
                                    int64_t R, const uint16_t *p16, int64_t stride, float *res) {
    const int HP = D == 64 ? 4 : 2; /* 16 accumulators */
    int64_t r0 = 0;
    for (; r0 + HP <= R; r0 += HP) values_pairs_tile(pl, kh, bt, n, D, HP, r0, p16, stride, res);
    for (; r0 < R; r0++) values_pairs_tile(pl, kh, bt, n, D, 1, r0, p16, stride, res);
}

/* common.h's exp_nonpos on 16 lanes (the same constants and polynomial); the power of two is
 * applied by vscalefps instead of being built from exponent bits. */
static inline __m512 exp16_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(EXP_POLY[i]));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Lanes of keys t .. t+15 that are below m. */
static inline __mmask16 keys_below(int64_t t, int64_t m) {
    return t + 16 <= m ? (__mmask16)0xFFFF : (__mmask16)((1u << (m - t)) - 1u);
}

/* exp_row for a score row x whose first m of `width` entries are real: they become exp(x - max)
 * and the rest 0, as floats, or with to_bf16 as bf16 in place at the start of the row (each
 * vector is loaded before the narrower store reaches it; zeros up to width rounded up to even,
 * for values_pairs_tile). Returns the max (-inf when m is 0); *sum gets the sum.
 * NOTE: one pass for exp, sum and the bf16 conversion (two vectors per conversion instruction),
 * and a max over 4 accumulators (the compiler's reduction in exp_row chains one), where exp_row
 * and a separate conversion pass took 26% of paged_prefill's time (perf, 16 members x 100
 * queries over 1,100 keys, bf16); with this, 6.6 -> 6.3 ms, and 32 keys a step 5.3 -> 4.8 ms.
 * Now the score and value loops (34% and 30%) issue the bf16 dot product back to back and this
 * pass takes 17%. */
ALWAYS_INLINE float softmax_row(float *x, int64_t m, int64_t width, const int to_bf16, float *sum) {
    __m512 mx[4];
    for (int k = 0; k < 4; k++) mx[k] = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 64 <= m; t += 64)
        for (int k = 0; k < 4; k++) mx[k] = _mm512_max_ps(mx[k], _mm512_loadu_ps(x + t + 16 * k));
    for (; t < m; t += 16) {
        const __mmask16 real = keys_below(t, m);
        mx[0] = _mm512_mask_max_ps(mx[0], real, mx[0], _mm512_maskz_loadu_ps(real, x + t));
    }
    const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3])));
    const __m512 tv = _mm512_set1_ps(top);
    __m512 s = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    t = 0;
    for (; t + 32 <= m; t += 32) { /* 32 keys a step: two bf16 conversions in one instruction */
        const __m512 e0 = exp16_nonpos(_mm512_sub_ps(_mm512_loadu_ps(x + t), tv));
        const __m512 e1 = exp16_nonpos(_mm512_sub_ps(_mm512_loadu_ps(x + t + 16), tv));
        s = _mm512_add_ps(s, e0);
        s1 = _mm512_add_ps(s1, e1);
        if (to_bf16) {
            _mm512_storeu_si512((uint16_t *)x + t, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        } else {
            _mm512_storeu_ps(x + t, e0);
            _mm512_storeu_ps(x + t + 16, e1);
        }
    }
    s = _mm512_add_ps(s, s1);
    for (; t < m; t += 16) {
        const __mmask16 real = keys_below(t, m);
        const __m512 e = exp16_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(real, x + t), tv));
        s = _mm512_mask_add_ps(s, real, s, e);
        if (to_bf16) _mm256_mask_storeu_epi16((uint16_t *)x + t, real, (__m256i)_mm512_cvtneps_pbh(e));
        else _mm512_mask_storeu_ps(x + t, real, e);
    }
    if (to_bf16) memset((uint16_t *)x + m, 0, (size_t)((width + 1) / 2 * 2 - m) * 2); /* the pair of an odd last key too */
    else memset(x + m, 0, (size_t)(width - m) * 4);
    *sum = _mm512_reduce_add_ps(s);
    return top;
}

/* rows_portable's contract; scores holds R * n floats. */
ALWAYS_INLINE void rows_dot(const char *const *qrows, int64_t R, const Pool *pl, int64_t kh, const int64_t *bt,
                            int64_t n, const int64_t D, float scale, const int is_bf16, float *scores, float *res,
                            float *lse) {
    const int64_t esize = is_bf16 ? 2 : 4;
    for (int64_t r = 0; r < R; r++) { /* scores of row r, 16 keys of a block at a time */
        __m512i qb[D / 32];
        __m512 qf[D / 16];
        for (int64_t c = 0; c < D / 32; c++) qb[c] = _mm512_loadu_si512((const __m512i *)qrows[r] + c);
        for (int64_t c = 0; c < D / 16; c++)
            qf[c] = is_bf16 ? _mm512_setzero_ps() : _mm512_loadu_ps((const float *)qrows[r] + 16 * c);
        for (int64_t t0 = 0; t0 < n; t0 += pl->bs) {
            const char *blk = block_start(pl->k, pl, kh, bt, t0, D, esize);
            const int64_t end = n - t0 < pl->bs ? n - t0 : pl->bs;
            for (int64_t j0 = 0; j0 < end; j0 += 16) {
                const int64_t cnt = end - j0 < 16 ? end - j0 : 16;
                __m512 p[16];
                for (int64_t j = 0; j < 16; j++) {
                    __m512 s = _mm512_setzero_ps();
                    const char *row = blk + (j0 + j) * D * esize;
                    if (j < cnt && is_bf16)
                        for (int64_t c = 0; c < D / 32; c++)
                            s = _mm512_dpbf16_ps(s, (__m512bh)qb[c], (__m512bh)_mm512_loadu_si512((const __m512i *)row + c));
                    else if (j < cnt)
                        for (int64_t c = 0; c < D / 16; c++) s = _mm512_fmadd_ps(qf[c], _mm512_loadu_ps((const float *)row + 16 * c), s);
                    p[j] = s;
                }
                _mm512_mask_storeu_ps(scores + r * n + t0 + j0, (__mmask16)((1u << cnt) - 1u),
                                      _mm512_mul_ps(sum16(p), _mm512_set1_ps(scale)));
            }
        }
    }
    float mx[R], sum[R];
    for (int64_t r = 0; r < R; r++) mx[r] = softmax_row(scores + r * n, n, n, is_bf16, &sum[r]);
    if (is_bf16) /* probabilities as bf16, as the reference's bf16 matmul takes them */
        values_rows_bf16(pl, kh, bt, n, D, R, (const uint16_t *)scores, 2 * n, res);
    else
        values_rows(pl, kh, bt, n, D, R, scores, n, res);
    finish_rows(res, R, D, mx, sum, lse);
}

/* r[0..15] (16 words each) transposed in place: word c of r[k] becomes word k of r[c]. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) { /* 128-bit lane L of t[i]: rows i, i+1 at columns 4L, 4L+1 (4L+2, 4L+3) */
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int b = 0; b < 16; b += 4) { /* lane L of u[b + e]: rows b .. b+3 at column 4L+e */
        u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
        u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
        u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
        u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    for (int e = 0; e < 4; e++) { /* column 4L+e: lane L of u[e], u[4+e], u[8+e], u[12+e] */
        const __m512i v = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88), w = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xDD);
        const __m512i v2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88);
        const __m512i w2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xDD);
        r[e] = _mm512_shuffle_i32x4(v, v2, 0x88);
        r[4 + e] = _mm512_shuffle_i32x4(w, w2, 0x88);
        r[8 + e] = _mm512_shuffle_i32x4(v, v2, 0xDD);
        r[12 + e] = _mm512_shuffle_i32x4(w, w2, 0xDD);
    }
}

/* K of keys 0..n-1 packed per 16-key chunk: for each 32-bit word w of a key row (a bf16 pair or a
 * float), the 16 keys' words side by side. Keys past n are 0. Each 16 keys x 16 words block is
 * one register transpose. */
ALWAYS_INLINE void pack_k(const Pool *pl, int64_t kh, const int64_t *bt, int64_t n, const int64_t D,
                          const int is_bf16, uint32_t *kp) {
    const int64_t esize = is_bf16 ? 2 : 4, W = is_bf16 ? D / 2 : D;
    for (int64_t c0 = 0; c0 < n; c0 += 16) {
        const __m512i *rows[16];
        for (int64_t k = 0; k < 16; k++)
            rows[k] = c0 + k < n ? (const __m512i *)key_row(pl->k, pl, kh, bt, c0 + k, D, esize) : NULL;
        for (int64_t b = 0; b < W / 16; b++) {
            __m512i r[16];
            for (int k = 0; k < 16; k++) r[k] = rows[k] ? _mm512_loadu_si512(rows[k] + b) : _mm512_setzero_si512();
            transpose16(r);
            for (int x = 0; x < 16; x++) _mm512_storeu_si512((__m512i *)(kp + c0 * W + (b * 16 + x) * 16), r[x]);
        }
    }
}

/* Scores of rows 0 .. R4-1 (a multiple of 4) over keys c0 .. c0+16*KC-1 of the packed K, into
 * scores rows (stride pn): per step 4 rows x KC chunks of 16 keys, so each broadcast query word
 * serves KC products and each K vector 4 rows (4*KC independent accumulator chains). */
ALWAYS_INLINE void scores_tile(const char *const *qrows, int64_t R4, const uint32_t *kp, int64_t c0, int64_t pn,
                               int64_t W, float scale, const int is_bf16, const int KC, float *scores) {
    for (int64_t r0 = 0; r0 < R4; r0 += 4) {
        __m512 acc[4][4];
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < KC; c++) acc[r][c] = _mm512_setzero_ps();
        for (int64_t x = 0; x < W; x++) {
            __m512i kv[4];
            for (int c = 0; c < KC; c++) kv[c] = _mm512_loadu_si512((const __m512i *)(kp + (c0 + 16 * c) * W + x * 16));
            for (int r = 0; r < 4; r++) {
                const int32_t qw = ((const int32_t *)qrows[r0 + r])[x];
                for (int c = 0; c < KC; c++) {
                    if (is_bf16)
                        acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)_mm512_set1_epi32(qw), (__m512bh)kv[c]);
                    else
                        acc[r][c] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_set1_epi32(qw)),
                                                    _mm512_castsi512_ps(kv[c]), acc[r][c]);
                }
            }
        }
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < KC; c++)
                _mm512_storeu_ps(scores + (r0 + r) * pn + c0 + 16 * c, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(scale)));
    }
}

/* Rows 0 .. R-1 over K already packed by pack_k (kp, keys 0 .. n-1 at least): row r attends keys
 * 0 .. lim[r]-1 (lim NULL: all n; every lim[r] <= n). qrows has R rounded up to 4 entries;
 * scores holds R rounded up to 4 rows of n rounded up to 16 floats. Otherwise rows_portable's
 * contract. */
ALWAYS_INLINE void rows_prepacked(const char *const *qrows, int64_t R, const int64_t *lim, const Pool *pl, int64_t kh,
                                  const int64_t *bt, int64_t n, const uint32_t *kp, const int64_t D, float scale,
                                  const int is_bf16, float *scores, float *res, float *lse) {
    const int64_t W = is_bf16 ? D / 2 : D, pn = (n + 15) / 16 * 16, R4 = (R + 3) / 4 * 4;
    int64_t c0 = 0; /* scores: 4 rows x 64 keys per step, then 4 rows x 16 keys */
    for (; c0 + 64 <= pn; c0 += 64) scores_tile(qrows, R4, kp, c0, pn, W, scale, is_bf16, 4, scores);
    for (; c0 < pn; c0 += 16) scores_tile(qrows, R4, kp, c0, pn, W, scale, is_bf16, 1, scores);
    float mx[R], sum[R];
    for (int64_t r = 0; r < R; r++) /* keys past a row's limit get probability 0 */
        mx[r] = softmax_row(scores + r * pn, lim ? lim[r] : n, n, is_bf16, &sum[r]);
    if (is_bf16)
        values_rows_bf16(pl, kh, bt, n, D, R, (const uint16_t *)scores, 2 * pn, res);
    else
        values_rows(pl, kh, bt, n, D, R, scores, pn, res);
    finish_rows(res, R, D, mx, sum, lse);
}

/* rows_portable's contract for many rows over one prefix; qrows has R rounded up to 4 entries.
 * `w` holds shared_decode_work floats. */
ALWAYS_INLINE void rows_packed(const char *const *qrows, int64_t R, const Pool *pl, int64_t kh, const int64_t *bt,
                               int64_t n, const int64_t D, float scale, const int is_bf16, float *w, float *res,
                               float *lse) {
    uint32_t *kp = (uint32_t *)w;
    pack_k(pl, kh, bt, n, D, is_bf16, kp);
    rows_prepacked(qrows, R, NULL, pl, kh, bt, n, kp, D, scale, is_bf16, w + (n + 15) / 16 * 16 * D, res, lse);
}
