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
 * Once the relaxation settles, most of the input values stay exactly equal from one step to
 * the next (clamped at 0, or converged), so adding the convolution of the change, from the
 * changed values only, costs a fraction of the dense convolution.  It is the same scatter of
 * weighted kernels as above (a transposed convolution of the change with the kernel flipped),
 * summed in a fixed order per sample.  unpool_conv_transpose_delta keeps the feedback up to
 * date the same way.  Layouts are described at the functions.
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

/* Geometry and scratch space of the feedback through a max-pool (see the top of this file). */
typedef struct {
    int64_t C, Hp, Wp, Wc, Fp, Co, Ho, Wo, K, pad, F2, span;
    int64_t *window;     /* index - window corner (0 .. span - 1) -> offset code in the window */
    int64_t *code;       /* [C] */
    const float **src;   /* [F2][C] kernels of the groups */
    float *val;          /* [F2][C] their weights */
    int64_t *m;          /* [F2] group sizes */
} Unpool;

static int unpool_init(Unpool *u, int64_t C, int64_t Hp, int64_t Wp, int64_t Wc, int64_t Fp,
                       int64_t Co, int64_t Ho, int64_t Wo, int64_t K, int64_t pad)
{
    *u = (Unpool){C, Hp, Wp, Wc, Fp, Co, Ho, Wo, K, pad, Fp * Fp, (Fp - 1) * Wc + Fp,
                  NULL, NULL, NULL, NULL, NULL};
    u->window = malloc((size_t)u->span * sizeof(int64_t));
    u->code = malloc((size_t)C * sizeof(int64_t));
    u->src = malloc((size_t)(u->F2 * C) * sizeof(float *));
    u->val = malloc((size_t)(u->F2 * C) * sizeof(float));
    u->m = malloc((size_t)u->F2 * sizeof(int64_t));
    if (!(u->window && u->code && u->src && u->val && u->m))
        return -1;
    for (int64_t d = 0; d < u->span; d++)
        u->window[d] = d % Wc < Fp ? (d / Wc) * Fp + d % Wc : -1;
    return 0;
}

static void unpool_free(Unpool *u)
{
    free(u->window); free(u->code); free(u->src); free(u->val); free(u->m);
}

/* offset code (0 .. F2 - 1) of index ij in the window with this corner, or -1 outside it */
static inline int64_t unpool_offset(const Unpool *u, int64_t ij, int64_t corner)
{
    const int64_t d = ij - corner;
    return d < 0 || d >= u->span ? -1 : u->window[d];
}

/* o[Ho][Wo][Co] += conv_transpose2d(max_unpool2d(s, ij)) of one sample (s, ij: [Hp][Wp][C]);
 * 0, or -2 for an index outside its window */
static int unpool_sample(const Unpool *u, const float *s, const int64_t *ij, const float *w, float *o)
{
    const int64_t C = u->C, F2 = u->F2, Fp = u->Fp, kern = u->K * u->K * u->Co;
    for (int64_t py = 0; py < u->Hp; py++)
        for (int64_t px = 0; px < u->Wp; px++) {
            const int64_t cell = (py * u->Wp + px) * C, corner = Fp * py * u->Wc + Fp * px;
            const float *sj = s + cell;
            /* the offset in the window each value points at (F2 for a zero: skipped) */
            for (int64_t c = 0; c < C; c++) {
                const int64_t g = unpool_offset(u, ij[cell + c], corner);
                if (g < 0)
                    return -2;
                const int64_t nonzero = sj[c] != 0.0f;  /* arithmetic, not a branch */
                u->code[c] = F2 + nonzero * (g - F2);
            }
            for (int64_t g = 0; g < F2; g++) {
                /* the group: channels pointing at offset g, ascending (appended without
                 * branches: every channel is written, only the group's advance m) */
                int64_t m = 0;
                for (int64_t c = 0; c < C; c++) {
                    u->src[m] = w + c * kern;
                    u->val[m] = sj[c];
                    m += u->code[c] == g;
                }
                /* kernel tap (0, 0) lands at the convolution position minus pad */
                add_kernels(o, u->src, u->val, m, Fp * py + g / Fp - u->pad, Fp * px + g % Fp - u->pad,
                            u->K, u->Co, u->Ho, u->Wo);
            }
        }
    return 0;
}

/* Returns 0; -1 when scratch memory could not be allocated, -2 when an index lies outside its
 * pooling window (then the output is incomplete). */
int unpool_conv_transpose(const float *s, const int64_t *indices, const float *w,
                          const float *base, float *out,
                          int64_t B, int64_t C, int64_t Hp, int64_t Wp, int64_t Wc, int64_t Fp,
                          int64_t Co, int64_t Ho, int64_t Wo, int64_t K, int64_t pad)
{
    const int64_t image = Ho * Wo * Co, pooled = Hp * Wp * C;
    Unpool u;
    int status = unpool_init(&u, C, Hp, Wp, Wc, Fp, Co, Ho, Wo, K, pad);
    for (int64_t b = 0; status == 0 && b < B; b++) {
        float *o = out + b * image;
        if (base == NULL)
            memset(o, 0, (size_t)image * sizeof(float));
        else if (base != out)
            memcpy(o, base + b * image, (size_t)image * sizeof(float));
        status = unpool_sample(&u, s + b * pooled, indices + b * pooled, w, o);
    }
    unpool_free(&u);
    return status;
}

/* The same feedback kept up to date from step to step, per sample:
 *
 *     acc = conv_transpose2d(max_unpool2d(s, indices), w, pad);  prev_s = s;  prev_idx = indices
 *
 * given acc for (prev_s, prev_idx).  A pooled value whose value and index did not change (or
 * that was and is zero) is skipped; a changed one takes its old value out where its old index
 * pointed and adds its new value where its new index points (the difference, where both point
 * at the same place).  A sample in which more than max_changed values changed is recomputed in
 * full, as unpool_conv_transpose does.  Layouts as at the top of this file, prev_s and prev_idx
 * like s and indices, acc like out.  Returns how many samples were recomputed in full, -1
 * without scratch memory, -2 for an index outside its window (then acc is incomplete). */
int64_t unpool_conv_transpose_delta(const float *s, const int64_t *indices, float *prev_s,
                                    int64_t *prev_idx, const float *w, float *acc,
                                    int64_t B, int64_t C, int64_t Hp, int64_t Wp, int64_t Wc,
                                    int64_t Fp, int64_t Co, int64_t Ho, int64_t Wo, int64_t K,
                                    int64_t pad, int64_t max_changed)
{
    const int64_t image = Ho * Wo * Co, pooled = Hp * Wp * C, kern = K * K * Co;
    Unpool u;
    int64_t status = unpool_init(&u, C, Hp, Wp, Wc, Fp, Co, Ho, Wo, K, pad), full = 0;
    for (int64_t b = 0; status == 0 && b < B; b++) {
        const float *sb = s + b * pooled;
        const int64_t *ib = indices + b * pooled;
        float *pb = prev_s + b * pooled, *o = acc + b * image;
        int64_t *qb = prev_idx + b * pooled;
        int64_t changed = 0;
        for (int64_t j = 0; j < pooled; j++)
            changed += (sb[j] != pb[j]) | ((sb[j] != 0.0f) & (ib[j] != qb[j]));
        if (changed > max_changed) {
            full++;
            memset(o, 0, (size_t)image * sizeof(float));
            status = unpool_sample(&u, sb, ib, w, o);
        } else {
            for (int64_t py = 0; py < Hp && status == 0 && changed; py++)
                for (int64_t px = 0; px < Wp; px++) {
                    const int64_t cell = (py * Wp + px) * C, corner = Fp * py * Wc + Fp * px;
                    for (int64_t g = 0; g < u.F2; g++)
                        u.m[g] = 0;
                    for (int64_t c = cell; c < cell + C; c++) {
                        const float now = sb[c], was = pb[c];
                        if (now == was && (now == 0.0f || ib[c] == qb[c]))
                            continue;
                        const int64_t gn = unpool_offset(&u, ib[c], corner);
                        const int64_t go = unpool_offset(&u, qb[c], corner);
                        if (gn < 0 || go < 0) {
                            status = -2;
                            break;
                        }
                        const float *kc = w + (c - cell) * kern;
                        if (gn == go) {  /* one entry: the difference */
                            u.src[gn * C + u.m[gn]] = kc;
                            u.val[gn * C + u.m[gn]++] = now - was;
                            continue;
                        }
                        if (was != 0.0f) {
                            u.src[go * C + u.m[go]] = kc;
                            u.val[go * C + u.m[go]++] = -was;
                        }
                        if (now != 0.0f) {
                            u.src[gn * C + u.m[gn]] = kc;
                            u.val[gn * C + u.m[gn]++] = now;
                        }
                    }
                    if (status)
                        break;
                    for (int64_t g = 0; g < u.F2; g++)
                        add_kernels(o, u.src + g * C, u.val + g * C, u.m[g], Fp * py + g / Fp - pad,
                                    Fp * px + g % Fp - pad, K, Co, Ho, Wo);
                }
        }
        memcpy(pb, sb, (size_t)pooled * sizeof(float));
        memcpy(qb, ib, (size_t)pooled * sizeof(int64_t));
    }
    unpool_free(&u);
    return status < 0 ? status : full;
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
