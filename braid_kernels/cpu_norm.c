/* The elementwise steps around the quantised products on x86 CPUs with AVX-512, float32, one call for all rows
 * (each row computed alone, in the same order whatever the other rows are):
 *
 *   braid_cpu_rms_norm:      y = w * (x * rsqrt(mean(x^2) + eps))
 *   braid_cpu_add_rms_norm:  h = x + residual, written to h, then y as above of h
 *   braid_cpu_silu_mul:  y = silu(gate) * up for rows [gate | up]
 *
 * The operations and their order of rounding are transformers' Llama RMSNorm in float32; the sum of squares is taken
 * over 16 lanes and then across them, so it may differ from torch's in the last bit; exp is cpu_simd.h's exp16.
 */
#include <math.h>

#include "cpu_simd.h"

static inline float sum_of_squares(const float *h, long dim) {
    __m512 acc = _mm512_setzero_ps();
    long i = 0;
    for (; i + 16 <= dim; i += 16) {
        __m512 v = _mm512_loadu_ps(h + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    if (i < dim) {
        __m512 v = _mm512_maskz_loadu_ps((__mmask16)((1u << (dim - i)) - 1), h + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* Rows of `dim` values, each row's values contiguous and rows one after another (x, residual, h, y). */
static void rms_norm_rows(const float *x, const float *residual, float *h, const float *w, float eps, float *y,
                          long m, long dim) {
    for (long r = 0; r < m; r++) {
        const float *xr = x + r * dim;
        float *hr = residual ? h + r * dim : (float *)xr;
        if (residual) {
            const float *rr = residual + r * dim;
            long i = 0;
            for (; i + 16 <= dim; i += 16)
                _mm512_storeu_ps(hr + i, _mm512_add_ps(_mm512_loadu_ps(xr + i), _mm512_loadu_ps(rr + i)));
            for (; i < dim; i++) hr[i] = xr[i] + rr[i];
        }
        float inv = 1.0f / sqrtf(sum_of_squares(hr, dim) / (float)dim + eps);
        __m512 vinv = _mm512_set1_ps(inv);
        float *yr = y + r * dim;
        long i = 0;
        for (; i + 16 <= dim; i += 16)
            _mm512_storeu_ps(yr + i, _mm512_mul_ps(_mm512_loadu_ps(w + i),
                                                   _mm512_mul_ps(_mm512_loadu_ps(hr + i), vinv)));
        for (; i < dim; i++) yr[i] = w[i] * (hr[i] * inv);
    }
}

/* Few arguments each: a call through ctypes costs per argument. */
void braid_cpu_rms_norm(const float *x, const float *w, float eps, float *y, long m, long dim) {
    rms_norm_rows(x, 0, 0, w, eps, y, m, dim);
}

void braid_cpu_add_rms_norm(const float *x, const float *residual, const float *w, float eps, float *y, float *h,
                            long m, long dim) {
    rms_norm_rows(x, residual, h, w, eps, y, m, dim);
}

void braid_cpu_silu_mul(const float *x, float *y, long m, long d) {
    for (long r = 0; r < m; r++) {
        const float *gate = x + r * 2 * d, *up = gate + d;
        float *yr = y + r * d;
        for (long i = 0; i < d; i += 16) {
            __mmask16 mask = d - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - i)) - 1);
            __m512 g = _mm512_maskz_loadu_ps(mask, gate + i), u = _mm512_maskz_loadu_ps(mask, up + i);
            __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm512_mask_storeu_ps(yr + i, mask, _mm512_mul_ps(silu, u));
        }
    }
}
