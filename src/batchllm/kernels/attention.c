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
        if (d == 64 && is_bf16) TASK(64, 1);
        else if (d == 64) TASK(64, 0);
        else if (d == 128 && is_bf16) TASK(128, 1);
        else if (d == 128) TASK(128, 0);
        else TASK(d, is_bf16);
#undef TASK
    }
}
