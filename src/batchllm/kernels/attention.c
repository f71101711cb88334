/* CPU attention kernels, loaded with ctypes by kernels/cpu.py (the contract of each is above it):
 * softmax_lse_f32 / softmax_lse_bf16, a row softmax with per-row key limits, and paged_decode,
 * decode attention read straight from the paged KV pool. Both return log-sum-exps for the merge.
 *
 * NOTE: plain C written so the compiler vectorizes the column loops (-O3 -march=native); exp is
 * a local polynomial rather than libm's expf, which does not vectorize without -ffast-math (and
 * -ffast-math would assume away the -inf this code relies on). Work is split over `threads`
 * OpenMP threads (torch's own runtime, see cpu.py).
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

/* exp(x) for x <= 0 with float accuracy (about 1 ulp); below -87 it returns exp(-87) ~ 1.6e-38,
 * which is 0 next to the row maximum's exp(0) = 1. */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = nearbyintf(x * 1.44269504088896341f);
    float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-6f; /* Cody-Waite ln 2 */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16666679e-2f
              + r * (8.33333377e-3f + r * 1.38888892e-3f)))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

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

/* Softmax of buf[0 .. n-1] (float, already scaled) in place; returns its log-sum-exp. */
static float softmax_row(float *buf, int64_t n) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; j++) m = buf[j] > m ? buf[j] : m;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; j++) {
        buf[j] = exp_nonpos(buf[j] - m);
        s += buf[j];
    }
    float inv = 1.0f / s;
    for (int64_t j = 0; j < n; j++) buf[j] *= inv;
    return m + logf(s);
}

static int64_t row_limit(const int32_t *lim, int64_t r, int64_t cols) {
    int64_t n = lim[r];
    return n < 0 ? 0 : (n > cols ? cols : n);
}

/* Row softmax in place, both dtypes: x is rows x cols, contiguous. Row r keeps
 * columns 0 .. lim[r]-1 (clamped to 0 .. cols); they become softmax(scale * x), the rest become 0,
 * and lse[r] = log(sum(exp(scale * x))) over the kept columns. A row with nothing kept becomes all
 * 0 with lse -inf. bf16 rows are read and written as bf16 (round to nearest even); all arithmetic
 * is float. */
void softmax_lse_f32(float *x, int64_t rows, int64_t cols, const int32_t *lim, float scale, float *lse,
                     int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * cols;
        int64_t n = row_limit(lim, r, cols);
        for (int64_t j = 0; j < n; j++) row[j] *= scale;
        lse[r] = n ? softmax_row(row, n) : -INFINITY;
        for (int64_t j = n; j < cols; j++) row[j] = 0.0f;
    }
}

/* As softmax_lse_f32; `work` holds cols floats per thread. */
void softmax_lse_bf16(uint16_t *x, int64_t rows, int64_t cols, const int32_t *lim, float scale, float *lse,
                      float *work, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *buf = work + (int64_t)omp_get_thread_num() * cols;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            uint16_t *row = x + r * cols;
            int64_t n = row_limit(lim, r, cols);
            for (int64_t j = 0; j < n; j++) buf[j] = bf16_to_f32(row[j]) * scale;
            lse[r] = n ? softmax_row(buf, n) : -INFINITY;
            for (int64_t j = 0; j < n; j++) row[j] = f32_to_bf16(buf[j]);
            for (int64_t j = n; j < cols; j++) row[j] = 0;
        }
    }
}

/* Element i of a float32 (is_bf16 = 0) or bfloat16 (1) array, as float. */
static inline float load_elem(const void *p, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Start of the block holding key t0 (a multiple of bs) of sequence b in KV head kh's part of a
 * [kvh, slots, d] cache whose elements are esize bytes. */
static inline const char *block_start(const void *cache, int64_t kh, int64_t slots, const int64_t *bt, int64_t nb,
                                      int64_t b, int64_t t0, int64_t bs, int64_t d, int64_t esize) {
    return (const char *)cache + (kh * slots + bt[b * nb + t0 / bs] * bs) * d * esize;
}

/* One decode task: sequence b, KV head kh (see paged_decode). Inlined per head size and dtype so
 * the column loops compile with constant trip counts. */
static inline __attribute__((always_inline)) void decode_task(
    const void *q, const void *k_cache, const void *v_cache, int64_t slots, const int64_t *bt, int64_t nb,
    int64_t n, int64_t b, int64_t kh, int64_t H, int64_t g, const int64_t d, int64_t bs, float scale,
    const int is_bf16, void *out, float *lse, float *scores) {
    const int64_t tmax = nb * bs, esize = is_bf16 ? 2 : 4;
    float qf[g][d], acc[g][d], row[d], mx[g], sum[g];
    for (int64_t h = 0; h < g; h++) {
        for (int64_t i = 0; i < d; i++) qf[h][i] = load_elem(q, ((b * H) + kh * g + h) * d + i, is_bf16) * scale;
        mx[h] = -INFINITY;
        for (int64_t i = 0; i < d; i++) acc[h][i] = 0.0f;
    }
    for (int64_t t0 = 0; t0 < n; t0 += bs) { /* scores, block by block: one key row for all g heads */
        const char *blk = block_start(k_cache, kh, slots, bt, nb, b, t0, bs, d, esize);
        for (int64_t j = 0; j < bs && t0 + j < n; j++) {
            for (int64_t i = 0; i < d; i++) row[i] = load_elem(blk, j * d + i, is_bf16);
            for (int64_t h = 0; h < g; h++) {
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t i = 0; i < d; i++) s += qf[h][i] * row[i];
                scores[h * tmax + t0 + j] = s;
                mx[h] = s > mx[h] ? s : mx[h];
            }
        }
    }
    for (int64_t h = 0; h < g; h++) {
        float *sh = scores + h * tmax, m = mx[h], s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t t = 0; t < n; t++) {
            sh[t] = exp_nonpos(sh[t] - m);
            s += sh[t];
        }
        sum[h] = s;
    }
    for (int64_t t0 = 0; t0 < n; t0 += bs) { /* values, block by block: one row for all g heads */
        const char *blk = block_start(v_cache, kh, slots, bt, nb, b, t0, bs, d, esize);
        for (int64_t j = 0; j < bs && t0 + j < n; j++) {
            for (int64_t i = 0; i < d; i++) row[i] = load_elem(blk, j * d + i, is_bf16);
            for (int64_t h = 0; h < g; h++) {
                const float p = scores[h * tmax + t0 + j];
                for (int64_t i = 0; i < d; i++) acc[h][i] += p * row[i];
            }
        }
    }
    for (int64_t h = 0; h < g; h++) {
        const int64_t o = ((b * H) + kh * g + h) * d;
        const float inv = n ? 1.0f / sum[h] : 0.0f;
        for (int64_t i = 0; i < d; i++) {
            if (is_bf16) ((uint16_t *)out)[o + i] = f32_to_bf16(acc[h][i] * inv);
            else ((float *)out)[o + i] = acc[h][i] * inv;
        }
        if (lse) lse[b * H + kh * g + h] = n ? mx[h] + logf(sum[h]) : -INFINITY;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__) && !defined(BATCHLLM_PORTABLE)
#define HAVE_AVX512_DECODE 1
#include <immintrin.h>
/* AVX-512 decode task for head sizes that are a multiple of 32 (as decode_task, same contract).
 *
 * NOTE: why not the portable loop: its score of one key is a dot product that ends in a horizontal
 * reduction, and those reductions, not memory, bounded it (~100 cycles per key row in bf16). Here
 * 16 keys' dot-product vectors are reduced together by one transpose-add tree (sum16), bf16 scores
 * use the CPU's bf16 dot-product instruction (exact products, float sums, like the bf16 matmul the
 * reference uses), and the value pass keeps a few heads' accumulators in registers while it
 * streams the value rows once per head tile. */

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

/* Floats c*16 .. c*16+15 of a float32 or bfloat16 row. */
static inline __attribute__((always_inline)) __m512 load16(const char *row, int64_t c, const int is_bf16) {
    if (!is_bf16) return _mm512_loadu_ps((const float *)row + 16 * c);
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)row + c));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

/* Values pass for heads h0 .. h0+HP-1: out[h] = sum_t p[h][t] * v[t] with p = scores rows. */
static inline __attribute__((always_inline)) void values_tile(
    const void *v_cache, int64_t slots, const int64_t *bt, int64_t nb, int64_t n, int64_t b, int64_t kh,
    const int64_t D, int64_t bs, const int is_bf16, const int HP, int64_t h0, const float *scores, int64_t tmax,
    float *res) {
    const int64_t esize = is_bf16 ? 2 : 4;
    __m512 acc[HP][D / 16];
    for (int h = 0; h < HP; h++)
        for (int64_t c = 0; c < D / 16; c++) acc[h][c] = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < n; t0 += bs) {
        const char *blk = block_start(v_cache, kh, slots, bt, nb, b, t0, bs, D, esize);
        const int64_t cnt = n - t0 < bs ? n - t0 : bs;
        for (int64_t j = 0; j < cnt; j++) {
            const char *row = blk + j * D * esize;
            for (int64_t c = 0; c < D / 16; c++) {
                const __m512 v = load16(row, c, is_bf16);
                for (int h = 0; h < HP; h++)
                    acc[h][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(h0 + h) * tmax + t0 + j]), v, acc[h][c]);
            }
        }
    }
    for (int h = 0; h < HP; h++)
        for (int64_t c = 0; c < D / 16; c++) _mm512_storeu_ps(res + (h0 + h) * D + 16 * c, acc[h][c]);
}

static inline __attribute__((always_inline)) void decode_task_avx512(
    const void *q, const void *k_cache, const void *v_cache, int64_t slots, const int64_t *bt, int64_t nb,
    int64_t n, int64_t b, int64_t kh, int64_t H, int64_t g, const int64_t D, int64_t bs, float scale,
    const int is_bf16, void *out, float *lse, float *scores) {
    const int64_t tmax = nb * bs, esize = is_bf16 ? 2 : 4;
    float res[g * D];
    for (int64_t h = 0; h < g; h++) { /* scores of head h, 16 keys of a block at a time */
        const char *qrow = (const char *)q + ((b * H) + kh * g + h) * D * esize;
        __m512i qb[D / 32 > 0 ? D / 32 : 1];
        __m512 qf[D / 16];
        for (int64_t c = 0; c < D / 32; c++) qb[c] = _mm512_loadu_si512((const __m512i *)qrow + c);
        for (int64_t c = 0; c < D / 16; c++) qf[c] = is_bf16 ? _mm512_setzero_ps() : load16(qrow, c, 0);
        for (int64_t t0 = 0; t0 < n; t0 += bs) {
            const char *blk = block_start(k_cache, kh, slots, bt, nb, b, t0, bs, D, esize);
            const int64_t end = n - t0 < bs ? n - t0 : bs;
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
                        for (int64_t c = 0; c < D / 16; c++) s = _mm512_fmadd_ps(qf[c], load16(row, c, 0), s);
                    p[j] = s;
                }
                _mm512_mask_storeu_ps(scores + h * tmax + t0 + j0, (__mmask16)((1u << cnt) - 1u),
                                      _mm512_mul_ps(sum16(p), _mm512_set1_ps(scale)));
            }
        }
    }
    float mx[g], sum[g];
    for (int64_t h = 0; h < g; h++) {
        float *sh = scores + h * tmax, m = -INFINITY, s = 0.0f;
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < n; t++) m = sh[t] > m ? sh[t] : m;
#pragma omp simd reduction(+ : s)
        for (int64_t t = 0; t < n; t++) {
            sh[t] = exp_nonpos(sh[t] - m);
            s += sh[t];
        }
        mx[h] = m;
        sum[h] = s;
    }
    /* NOTE: tiles of heads whose accumulators fit in 16 of the 32 vector registers */
    const int64_t hp = 256 / D;
    int64_t h0 = 0;
    if (hp >= 4)
        for (; h0 + 4 <= g; h0 += 4) values_tile(v_cache, slots, bt, nb, n, b, kh, D, bs, is_bf16, 4, h0, scores, tmax, res);
    if (hp >= 2)
        for (; h0 + 2 <= g; h0 += 2) values_tile(v_cache, slots, bt, nb, n, b, kh, D, bs, is_bf16, 2, h0, scores, tmax, res);
    for (; h0 < g; h0++) values_tile(v_cache, slots, bt, nb, n, b, kh, D, bs, is_bf16, 1, h0, scores, tmax, res);
    for (int64_t h = 0; h < g; h++) {
        const int64_t o = ((b * H) + kh * g + h) * D;
        const float inv = n ? 1.0f / sum[h] : 0.0f;
        for (int64_t i = 0; i < D; i++) {
            if (is_bf16) ((uint16_t *)out)[o + i] = f32_to_bf16(res[h * D + i] * inv);
            else ((float *)out)[o + i] = res[h * D + i] * inv;
        }
        if (lse) lse[b * H + kh * g + h] = n ? mx[h] + logf(sum[h]) : -INFINITY;
    }
}
#define DECODE_FAST(D, BF) decode_task_avx512(q, k_cache, v_cache, slots, bt, nb, n, b, kh, H, g, D, bs, scale, BF, out, lse, scores)
#else
#define HAVE_AVX512_DECODE 0
#define DECODE_FAST(D, BF) decode_task(q, k_cache, v_cache, slots, bt, nb, n, b, kh, H, g, D, bs, scale, BF, out, lse, scores)
#endif

/* Decode attention straight from a paged KV pool: no gathered copy of the KV.
 *
 * q: [B, H, d]; k_cache, v_cache: [kvh, slots, d]; block tables bt: [B, nb] (slot of key t of
 * sequence b: bt[b, t / bs] * bs + t % bs); lens: [B] keys of each sequence (0: empty). All
 * contiguous, q and the caches of one dtype (is_bf16). Writes out [B, H, d] in that dtype and, if
 * lse is not NULL, lse [B, H] float32 (-inf for an empty sequence, whose out is 0). `work` holds
 * (H / kvh) * nb * bs floats per thread. One task per (sequence, KV head): its H / kvh query heads
 * share each key and value row read from the pool.
 */
void paged_decode(const void *q, const void *k_cache, const void *v_cache, int64_t slots, const int64_t *bt,
                  int64_t nb, const int64_t *lens, int64_t B, int64_t H, int64_t kvh, int64_t d, int64_t bs,
                  float scale, int is_bf16, void *out, float *lse, float *work, int threads) {
    const int64_t g = H / kvh, tmax = nb * bs;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t task = 0; task < B * kvh; task++) {
        const int64_t b = task / kvh, kh = task % kvh, n = lens[b] < tmax ? lens[b] : tmax;
        float *scores = work + (int64_t)omp_get_thread_num() * g * tmax;
#define TASK(D, BF) decode_task(q, k_cache, v_cache, slots, bt, nb, n, b, kh, H, g, D, bs, scale, BF, out, lse, scores)
        if (d == 64 && is_bf16) DECODE_FAST(64, 1);
        else if (d == 64) DECODE_FAST(64, 0);
        else if (d == 128 && is_bf16) DECODE_FAST(128, 1);
        else if (d == 128) DECODE_FAST(128, 0);
        else TASK(d, is_bf16);
#undef TASK
    }
}

/* 1 where paged_decode has its AVX-512 path (head sizes 64 and 128), 0 where it runs the portable loop. */
int avx512_decode(void) { return HAVE_AVX512_DECODE; }
