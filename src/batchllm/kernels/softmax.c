/* Row softmax with per-row key limits, returning the log-sum-exp (kernels/cpu.py: softmax_lse_).
 *
 * NOTE: plain C written so the compiler vectorizes the column loops (-O3 -march=native); exp is
 * a local polynomial rather than libm's expf, which does not vectorize without -ffast-math (and
 * -ffast-math would assume away the -inf this code relies on). Work is split over `threads`
 * OpenMP threads (torch's own runtime, see cpu.py).
 */
#include "common.h"

/* Softmax of buf[0 .. n-1] (float, already scaled) in place; returns its log-sum-exp. */
static float softmax_row(float *buf, int64_t n) {
    float s;
    const float m = exp_row(buf, n, &s);
    const float inv = 1.0f / s;
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

