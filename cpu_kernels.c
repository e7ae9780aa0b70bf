/* CPU kernels of the convolutional network, compiled on first use by cpu_kernels.py.
 *
 * unpool_conv_transpose: the feedback a convolution layer sends down through its max-pool,
 *
 *     out = base + conv_transpose2d(max_unpool2d(s, indices), w, padding)
 *
 * computed from the pooled state directly.  After unpooling, only one value of each Fpool x Fpool
 * window is non-zero, so a dense transposed convolution spends 1 - 1/Fpool^2 of its arithmetic
 * (3/4 for the seed's Fpool 2) on zeros; here each pooled value (and only a non-zero one) adds
 * its weighted kernel at the position its pool index names.  The pooled values of one window
 * position that point at the same place are grouped, and each group's weighted sum of kernel
 * rows is accumulated in registers (AVX2/FMA when the compiler targets it) before it is added
 * to the output.  Every sample is independent and summed in a fixed order (channels ascending
 * within a group), so a sample's result does not depend on the batch it is in.
 *
 * Memory layouts (all dense, float32 unless stated):
 *   s        [B][Hp][Wp][C]      pooled states, channels last (C = channels of the layer above)
 *   indices  [B][Hp][Wp][C]      int64, flat position (h * Wc + w) in that layer's Hc x Wc
 *                                convolution output, as max_pool2d returns it
 *   w        [C][K][K][Co]       the layer's Conv2d weight (C, Co, K, K) in channels-last order
 *   base     [B][Ho][Wo][Co]     added to the result (NULL: zero)
 *   out      [B][Ho][Wo][Co]     the result (may be base itself)
 * where Hc x Wc is the size of the convolution output and Ho x Wo that of the layer below (the
 * convolution's input), Hc = Ho - K + 1 + 2 pad.
 *
 * conv_delta: a convolution whose input is a state, kept up to date from step to step,
 *
 *     acc += conv2d(s - prev, weight, pad);  prev = s
 *
 * Once the relaxation settles, about three in four of the input values stay exactly equal from
 * one step to the next (clamped at 0, or converged), so adding the convolution of the change,
 * from the changed values only, costs a fraction of the dense convolution.  It is the same
 * scatter of weighted kernels as above (a transposed convolution of the change with the kernel
 * flipped), summed in a fixed order per sample.  Layouts are described at the function.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* dst[0:8 N] += sum_i v[i] * src[i][0:8 N], the sum held in N registers (N a constant once
 * inlined: the loops over k unroll and acc stays in registers) */
static inline __attribute__((always_inline)) void
add_weighted_block(float *restrict dst, const float *const *src, int64_t off, const float *v,
                   int64_t m, int64_t t, const int N)
{
    __m256 acc[8];
    for (int k = 0; k < N; k++)
        acc[k] = _mm256_setzero_ps();
    for (int64_t i = 0; i < m; i++) {
        const __m256 vi = _mm256_broadcast_ss(v + i);
        const float *p = src[i] + off + t;
        for (int k = 0; k < N; k++)
            acc[k] = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + 8 * k), acc[k]);
    }
    for (int k = 0; k < N; k++)
        _mm256_storeu_ps(dst + t + 8 * k, _mm256_add_ps(_mm256_loadu_ps(dst + t + 8 * k), acc[k]));
}
#endif

/* dst[0:n] += sum_i v[i] * src[i][off:off + n]: 64 floats at a time (8 registers of sums, enough
 * independent FMAs to hide their latency), then 32, then 8, then one by one */
static void add_weighted_rows(float *restrict dst, const float *const *src, int64_t off,
                              const float *v, int64_t m, int64_t n)
{
    int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; t + 64 <= n; t += 64)
        add_weighted_block(dst, src, off, v, m, t, 8);
    for (; t + 32 <= n; t += 32)
        add_weighted_block(dst, src, off, v, m, t, 4);
    for (; t + 8 <= n; t += 8)
        add_weighted_block(dst, src, off, v, m, t, 1);
#endif
    for (; t < n; t++) {
        float a = 0.0f;
        for (int64_t i = 0; i < m; i++)
            a += v[i] * src[i][off + t];
        dst[t] += a;
    }
}

/* o[y0 + ky][x0 + kx][0:Co] += sum_i val[i] * src[i][ky][kx][0:Co] for every tap inside the
 * Ho x Wo image (src[i]: a K x K x Co kernel) */
static void add_kernels(float *o, const float *const *src, const float *val, int64_t m,
                        int64_t y0, int64_t x0, int64_t K, int64_t Co, int64_t Ho, int64_t Wo)
{
    const int64_t row = K * Co;
    const int64_t lo = x0 < 0 ? -x0 * Co : 0;  /* the part [lo, hi) of a row inside the image */
    const int64_t hi = x0 + K > Wo ? (Wo - x0) * Co : row;
    if (m == 0 || hi <= lo)
        return;
    for (int64_t ky = 0; ky < K; ky++) {
        const int64_t y = y0 + ky;
        if (y >= 0 && y < Ho)
            add_weighted_rows(o + (y * Wo + x0) * Co + lo, src, ky * row + lo, val, m, hi - lo);
    }
}

/* Returns 0; -1 when scratch memory could not be allocated, -2 when an index lies outside its
 * pooling window (then the output is incomplete). */
int unpool_conv_transpose(const float *s, const int64_t *indices, const float *w,
                          const float *base, float *out,
                          int64_t B, int64_t C, int64_t Hp, int64_t Wp, int64_t Wc, int64_t Fp,
                          int64_t Co, int64_t Ho, int64_t Wo, int64_t K, int64_t pad)
{
    const int64_t image = Ho * Wo * Co, pooled = Hp * Wp * C, row = K * Co, F2 = Fp * Fp;
    const int64_t span = (Fp - 1) * Wc + Fp;  /* index - window corner: 0 .. span - 1 */
    int64_t *window = malloc((size_t)span * sizeof(int64_t));  /* index - corner -> offset code */
    int64_t *code = malloc((size_t)C * sizeof(int64_t));
    const float **src = malloc((size_t)C * sizeof(float *));  /* a group's kernels, from lo */
    float *val = malloc((size_t)C * sizeof(float));
    int status = window && code && src && val ? 0 : -1;
    if (status == 0) {
        for (int64_t d = 0; d < span; d++)
            window[d] = d % Wc < Fp ? (d / Wc) * Fp + d % Wc : -1;
    }
    for (int64_t b = 0; status == 0 && b < B; b++) {
        float *o = out + b * image;
        if (base == NULL)
            memset(o, 0, (size_t)image * sizeof(float));
        else if (base != out)
            memcpy(o, base + b * image, (size_t)image * sizeof(float));
        for (int64_t py = 0; py < Hp && status == 0; py++)
            for (int64_t px = 0; px < Wp; px++) {
                const int64_t cell = b * pooled + (py * Wp + px) * C;
                const float *sj = s + cell;
                const int64_t *ij = indices + cell;
                const int64_t corner = Fp * py * Wc + Fp * px;
                /* the offset in the window each value points at (F2 for a zero: skipped) */
                for (int64_t c = 0; c < C; c++) {
                    const int64_t d = ij[c] - corner;
                    if (d < 0 || d >= span || window[d] < 0) {
                        status = -2;
                        break;
                    }
                    const int64_t nonzero = sj[c] != 0.0f;  /* arithmetic, not a branch */
                    code[c] = F2 + nonzero * (window[d] - F2);
                }
                if (status)
                    break;
                for (int64_t g = 0; g < F2; g++) {
                    /* the group: channels pointing at offset g, ascending (appended without
                     * branches: every channel is written, only the group's advance m) */
                    int64_t m = 0;
                    for (int64_t c = 0; c < C; c++) {
                        src[m] = w + c * K * row;
                        val[m] = sj[c];
                        m += code[c] == g;
                    }
                    /* kernel tap (0, 0) lands at the convolution position minus pad */
                    add_kernels(o, src, val, m, Fp * py + g / Fp - pad, Fp * px + g % Fp - pad, K, Co, Ho, Wo);
                }
            }
    }
    free(window); free(code); free(src); free(val);
    return status;
}

/* acc += conv2d(s - prev, weight, padding pad) and prev = s, per sample, for each sample in
 * which at most max_changed input values changed; the others are left alone and marked in
 * skipped (the dense convolution is faster for them).  Returns how many were skipped, or -1
 * without scratch memory (then nothing is changed).  Only the inputs that changed are
 * visited: each one adds its weighted kernel, flipped, to the outputs it reaches, a transposed
 * convolution with padding K - 1 - pad.  Layouts:
 *   s, prev  [B][H][W][Ci]     the convolution's input now and when acc was last brought up to
 *                              date (prev is overwritten with s)
 *   wt       [Ci][K][K][Co]    the Conv2d weight (Co, Ci, K, K) flipped in both spatial
 *                              dimensions: wt[c][j][i][o] = weight[o][c][K-1-j][K-1-i]
 *   acc      [B][Ho][Wo][Co]   conv2d(prev, weight, pad) (plus anything constant, the bias),
 *                              Ho = H + 2 pad - K + 1
 *   skipped  [B]               uint8, 1 for a sample left alone, else 0 */
int64_t conv_delta(const float *s, float *prev, const float *wt, float *acc, uint8_t *skipped,
                   int64_t B, int64_t Ci, int64_t H, int64_t W, int64_t Co, int64_t Ho, int64_t Wo,
                   int64_t K, int64_t pad, int64_t max_changed)
{
    const int64_t image = H * W * Ci, outimg = Ho * Wo * Co, kern = K * K * Co, tpad = K - 1 - pad;
    const float **src = malloc((size_t)Ci * sizeof(float *));
    float *val = malloc((size_t)Ci * sizeof(float));
    int64_t status = src && val ? 0 : -1;
    for (int64_t b = 0; status >= 0 && b < B; b++) {
        const float *sb = s + b * image;
        float *pb = prev + b * image;
        int64_t changed = 0;
        for (int64_t j = 0; j < image; j++)
            changed += sb[j] != pb[j];
        skipped[b] = changed > max_changed;
        if (skipped[b]) {
            status++;
            continue;
        }
        for (int64_t y = 0; y < H; y++)
            for (int64_t x = 0; x < W; x++) {
                const float *sj = sb + (y * W + x) * Ci;
                float *pj = pb + (y * W + x) * Ci;
                int64_t m = 0;  /* the changed channels, ascending, appended without branches */
                for (int64_t c = 0; c < Ci; c++) {
                    const float d = sj[c] - pj[c];
                    pj[c] = sj[c];
                    src[m] = wt + c * kern;
                    val[m] = d;
                    m += d != 0.0f;
                }
                add_kernels(acc + b * outimg, src, val, m, y - tpad, x - tpad, K, Co, Ho, Wo);
            }
    }
    free(src); free(val);
    return status;
}
