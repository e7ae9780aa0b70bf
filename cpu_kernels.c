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
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* dst[0:n] += sum_i v[i] * src[i][0:n] */
static void add_weighted_rows(float *restrict dst, const float *const *src, const float *v,
                              int64_t m, int64_t n)
{
    int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; t + 64 <= n; t += 64) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t i = 0; i < m; i++) {
            const __m256 vi = _mm256_broadcast_ss(v + i);
            const float *p = src[i] + t;
            a0 = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p), a0);
            a1 = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + 8), a1);
            a2 = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + 16), a2);
            a3 = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + 24), a3);
            a4 = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + 32), a4);
            a5 = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + 40), a5);
            a6 = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + 48), a6);
            a7 = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + 56), a7);
        }
        float *d = dst + t;
        _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), a0));
        _mm256_storeu_ps(d + 8, _mm256_add_ps(_mm256_loadu_ps(d + 8), a1));
        _mm256_storeu_ps(d + 16, _mm256_add_ps(_mm256_loadu_ps(d + 16), a2));
        _mm256_storeu_ps(d + 24, _mm256_add_ps(_mm256_loadu_ps(d + 24), a3));
        _mm256_storeu_ps(d + 32, _mm256_add_ps(_mm256_loadu_ps(d + 32), a4));
        _mm256_storeu_ps(d + 40, _mm256_add_ps(_mm256_loadu_ps(d + 40), a5));
        _mm256_storeu_ps(d + 48, _mm256_add_ps(_mm256_loadu_ps(d + 48), a6));
        _mm256_storeu_ps(d + 56, _mm256_add_ps(_mm256_loadu_ps(d + 56), a7));
    }
    for (; t + 32 <= n; t += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < m; i++) {
            const __m256 vi = _mm256_broadcast_ss(v + i);
            const float *p = src[i] + t;
            a0 = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p), a0);
            a1 = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + 8), a1);
            a2 = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + 16), a2);
            a3 = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + 24), a3);
        }
        float *d = dst + t;
        _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), a0));
        _mm256_storeu_ps(d + 8, _mm256_add_ps(_mm256_loadu_ps(d + 8), a1));
        _mm256_storeu_ps(d + 16, _mm256_add_ps(_mm256_loadu_ps(d + 16), a2));
        _mm256_storeu_ps(d + 24, _mm256_add_ps(_mm256_loadu_ps(d + 24), a3));
    }
    for (; t + 8 <= n; t += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t i = 0; i < m; i++)
            a = _mm256_fmadd_ps(_mm256_broadcast_ss(v + i), _mm256_loadu_ps(src[i] + t), a);
        _mm256_storeu_ps(dst + t, _mm256_add_ps(_mm256_loadu_ps(dst + t), a));
    }
#endif
    for (; t < n; t++) {
        float a = 0.0f;
        for (int64_t i = 0; i < m; i++)
            a += v[i] * src[i][t];
        dst[t] += a;
    }
}

/* Returns 0, or -1 when scratch memory could not be allocated (nothing is written then). */
int unpool_conv_transpose(const float *s, const int64_t *indices, const float *w,
                          const float *base, float *out,
                          int64_t B, int64_t C, int64_t Hp, int64_t Wp, int64_t Wc,
                          int64_t Co, int64_t Ho, int64_t Wo, int64_t K, int64_t pad)
{
    const int64_t image = Ho * Wo * Co, J = Hp * Wp, pooled = J * C, row = K * Co;
    int64_t *chan = malloc((size_t)C * sizeof(int64_t));
    int64_t *pos = malloc((size_t)C * sizeof(int64_t));
    float *val = malloc((size_t)C * sizeof(float));
    int64_t *gchan = malloc((size_t)C * sizeof(int64_t));
    float *gval = malloc((size_t)C * sizeof(float));
    const float **src = malloc((size_t)C * sizeof(float *));
    const int ok = chan && pos && val && gchan && gval && src;
    for (int64_t b = 0; ok && b < B; b++) {
        float *o = out + b * image;
        if (base == NULL)
            memset(o, 0, (size_t)image * sizeof(float));
        else if (base != out)
            memcpy(o, base + b * image, (size_t)image * sizeof(float));
        for (int64_t j = 0; j < J; j++) {
            const float *sj = s + b * pooled + j * C;
            const int64_t *ij = indices + b * pooled + j * C;
            int64_t n = 0;
            for (int64_t c = 0; c < C; c++)
                if (sj[c] != 0.0f) {
                    chan[n] = c; pos[n] = ij[c]; val[n] = sj[c]; n++;
                }
            while (n > 0) {  /* one group per position the window's values point at */
                const int64_t p = pos[0];
                int64_t m = 0, rest = 0;
                for (int64_t i = 0; i < n; i++) {
                    if (pos[i] == p) {
                        gchan[m] = chan[i]; gval[m] = val[i]; m++;
                    } else {
                        chan[rest] = chan[i]; pos[rest] = pos[i]; val[rest] = val[i]; rest++;
                    }
                }
                n = rest;
                /* output position of kernel tap (0, 0): the convolution position minus pad,
                 * and the part of each kernel row that lands inside the image */
                const int64_t y0 = p / Wc - pad, x0 = p % Wc - pad;
                const int64_t lo = x0 < 0 ? -x0 * Co : 0;
                const int64_t hi = x0 + K > Wo ? (Wo - x0) * Co : row;
                if (hi <= lo)
                    continue;
                for (int64_t ky = 0; ky < K; ky++) {
                    const int64_t y = y0 + ky;
                    if (y < 0 || y >= Ho)
                        continue;
                    for (int64_t i = 0; i < m; i++)
                        src[i] = w + (gchan[i] * K + ky) * row + lo;
                    add_weighted_rows(o + (y * Wo + x0) * Co + lo, src, gval, m, hi - lo);
                }
            }
        }
    }
    free(chan); free(pos); free(val); free(gchan); free(gval); free(src);
    return ok ? 0 : -1;
}
