/* Integer-dot products of quantised weights on x86 CPUs with AVX-512 VNNI: y = x @ W.T for W held as unsigned
 * codes c (4 bits, two a byte; 5 bits, those nibbles and a plane of fifth bits; or 8 bits) with a scale s and offset
 * o per 32 weights of a row (w = s c + o), and float32 x rounded to int8 per 32 values (scale dx; llama.cpp's Q8
 * rounding of activations), so that each 32-weight block's dot product is one run of vpdpbusd:
 *
 *     y[m, n] = sum over blocks b of  s[n, b] dx[m, b] (sum of c q over b)  +  o[n, b] dx[m, b] (sum of q over b)
 *
 * that is, the dequantised weights times the rounded x (the offsets' term must see the same x as the codes': a
 * block's s c has a large mean, so the float sum of x there would add its rounding error ~3x over). A row of y is
 * the same whatever the other rows of x are (every row is computed alone, in the same order), so a request's answer
 * does not depend on its batch.
 *
 * Layout (cpu_quant.py packs it): a row of W is K / 64 chunks of 64 weights and, where K % 64 == 32, a last block of
 * 32. A chunk's bytes are ordered so that int32 lane j of vpdpbusd sums 4 weights of block j % 2: weight p of the
 * chunk's block h sits at byte 4 (2 (p / 4) + h) + p % 4 of its 64 codes; 4-bit codes keep bytes 0-31 in the low
 * nibbles of 32 bytes and bytes 32-63 in the high ones; 5-bit codes are the 4-bit chunk's 32 bytes of their low four
 * bits followed by 8 bytes whose bit i (little-endian) is bit 4 of byte i of the 64 codes. The last block keeps its
 * natural order (4-bit: weight i in the low nibble of byte i, weight 16 + i in the high one; 5-bit: those 16 bytes and
 * 4 bytes whose bit i is bit 4 of weight i). Scales and offsets are float16 or float32 [N, K / 32], or
 * float32 [N, K / 16] for Q6_K's scale per 16 weights (8-bit codes, K a multiple of 64: `group16`), whose 16-weight
 * halves of a block sit in lanes 0-7 and 8-15 of a chunk's dot product, and whose offsets' term takes x's sums per
 * 16 values. Where every offset is a fixed multiple of its scale (Q4_0 -8 d, Q5_0 -16 d, Q8_0 -128 d, Q6_K -32 d sc)
 * the offsets are not stored (NULL) and computed as that multiple.
 *
 * Threads: OpenMP, linked against the runtime torch loaded (the same libgomp.so.1), so that the calling thread's team
 * is the one torch's own ops use.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define CHUNK 64
#define BLOCK 32
#define XROWS_PER_TASK 64   /* rows of x a task holds while it walks its rows of W (64 x 1536 int8: L2-sized) */
#define WROWS_PER_TASK 64   /* rows of W per task */
#define PREFETCH_ROWS 16    /* rows of W fetched ahead of the tile being computed (8-64: within noise; hints T1 and
                               NTA were slower in the engine's decode) */

int braid_cpu_quant_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")
        && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

static void put_block(int8_t *q, const int8_t *tmp, int b, int nb) {
    int chunk = b / 2, h = b % 2;
    if (chunk * 2 + 1 < nb) {  /* a whole chunk: the interleaved order */
        int8_t *qc = q + chunk * CHUNK;
        for (int p = 0; p < BLOCK; p++) qc[4 * (2 * (p / 4) + h) + p % 4] = tmp[p];
    } else {  /* the last, lone block */
        memcpy(q + b * BLOCK, tmp, BLOCK);
    }
}

/* Rounds one row of x (k values, k % 32 == 0) to int8 in the chunk order above: q (k bytes a term), dx (k / 32
 * scales), sx (k / 32 sums of the rounded x, dx times the integers' sum), sx16 (k / 16 such sums, for weights with a
 * scale per 16: the halves of each 32). terms 2: a second int8 row q2 (at q + k) holds the first rounding's
 * remainder in steps of 1/256 of the first's, x ~ dx (256 q + q2) with dx = max |x| / (127 * 256): ~16 bits. */
static void quantize_row(const float *x, int k, int terms, int8_t *q, float *dx, float *sx, float *sx16) {
    int nb = k / BLOCK;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * BLOCK;
        __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float d = amax / 127.0f;
        dx[b] = d;
        float inv = d > 0.0f ? 1.0f / d : 0.0f;
        __m512 vi = _mm512_set1_ps(inv);
        __m512i i0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v0, vi), _MM_FROUND_TO_NEAREST_INT));
        __m512i i1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v1, vi), _MM_FROUND_TO_NEAREST_INT));
        int8_t tmp[BLOCK];
        _mm_storeu_si128((__m128i *)tmp, _mm512_cvtsepi32_epi8(i0));
        _mm_storeu_si128((__m128i *)(tmp + 16), _mm512_cvtsepi32_epi8(i1));
        put_block(q, tmp, b, nb);
        int half0 = _mm512_reduce_add_epi32(i0), half1 = _mm512_reduce_add_epi32(i1), total = half0 + half1;
        if (terms == 1) {
            sx[b] = d * (float)total;
            sx16[2 * b] = d * (float)half0;
            sx16[2 * b + 1] = d * (float)half1;
            continue;
        }
        /* the remainder x - d q, in steps of d / 256 (|remainder| <= d / 2: within int8 but for ties at 128) */
        __m512 vd = _mm512_set1_ps(d), fine = _mm512_set1_ps(256.0f * inv);
        __m512 r0 = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(i0), vd, v0), r1 = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(i1), vd, v1);
        __m512i j0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(r0, fine), _MM_FROUND_TO_NEAREST_INT));
        __m512i j1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(r1, fine), _MM_FROUND_TO_NEAREST_INT));
        __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        j0 = _mm512_min_epi32(_mm512_max_epi32(j0, lo), hi);
        j1 = _mm512_min_epi32(_mm512_max_epi32(j1, lo), hi);
        _mm_storeu_si128((__m128i *)tmp, _mm512_cvtsepi32_epi8(j0));
        _mm_storeu_si128((__m128i *)(tmp + 16), _mm512_cvtsepi32_epi8(j1));
        put_block(q + k, tmp, b, nb);
        dx[b] = d / 256.0f;
        int fine0 = _mm512_reduce_add_epi32(j0), fine1 = _mm512_reduce_add_epi32(j1);
        sx[b] = dx[b] * (float)(256 * total + fine0 + fine1);
        sx16[2 * b] = dx[b] * (float)(256 * half0 + fine0);
        sx16[2 * b + 1] = dx[b] * (float)(256 * half1 + fine1);
    }
}

static inline __m512i load_codes(const uint8_t *c, int bits) {
    if (bits == 8) return _mm512_loadu_si512((const void *)c);
    /* the 32 bytes in both halves, the upper half's shifted down a nibble, then the low nibbles of every byte */
    __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)c));
    both = _mm512_mask_srli_epi16(both, (__mmask32)0xFFFF0000u, both, 4);
    __m512i codes = _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
    if (bits == 5) {  /* the fifth bits: one mask bit a byte, set as 16 */
        uint64_t high;
        memcpy(&high, c + 32, sizeof high);
        codes = _mm512_or_si512(codes, _mm512_maskz_set1_epi8((__mmask64)high, 0x10));
    }
    return codes;
}

static inline __m256i load_tail_codes(const uint8_t *c, int bits) {
    if (bits == 8) return _mm256_loadu_si256((const __m256i *)c);
    __m128i packed = _mm_loadu_si128((const __m128i *)c);
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(packed, mask), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    __m256i codes = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    if (bits == 5) {
        uint32_t high;
        memcpy(&high, c + 16, sizeof high);
        codes = _mm256_or_si256(codes, _mm256_maskz_set1_epi8((__mmask32)high, 0x10));
    }
    return codes;
}

/* Two adjacent floats as the bits of one double (broadcast as a pair). */
static inline double two_values(const float *p) {
    double d;
    memcpy(&d, p, sizeof d);
    return d;
}

/* The scales of blocks b and b + 1 of a row as [s_b, s_b+1] repeated over 16 lanes. */
static inline __m512 pair_scales(const void *s, int b, int f32) {
    if (f32) return _mm512_castpd_ps(_mm512_set1_pd(two_values((const float *)s + b)));
    int32_t halves;
    memcpy(&halves, (const uint16_t *)s + b, sizeof halves);
    __m256i two = _mm256_set1_epi32(halves);
    return _mm512_cvtph_ps(two);
}

/* Q6_K: the float32 scales of the four 16-weight halves of blocks b and b + 1 as a chunk's lanes hold them: lane j
 * sums weights of block j % 2, from its second half when j >= 8. */
static inline __m512 quad_scales(const float *s, int b) {
    const __m512i lanes = _mm512_set_epi32(3, 1, 3, 1, 3, 1, 3, 1, 2, 0, 2, 0, 2, 0, 2, 0);
    return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_loadu_ps(s + 2 * b)));
}

static inline float one_scale(const void *s, int b, int f32) {
    if (f32) return ((const float *)s)[b];
    return _cvtsh_ss(((const uint16_t *)s)[b]);
}

static inline __m512 sixteen(const void *s, int b, int count, int f32) {
    __mmask16 m = count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
    if (f32) return _mm512_maskz_loadu_ps(m, (const float *)s + b);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)s + b));
}

/* y[m][n] for RW rows of W from w_row and RX rows of x: one tile, kept in registers. */
static inline __attribute__((always_inline)) void tile(
        const int RW, const int RX, int bits, int f32, const int terms, const int g16, int k,
        const uint8_t *codes, const void *scales, const void *offsets, float factor, long n0,
        const int8_t *q, const float *dx, const float *sx, long m0,
        float *y, long ldy) {
    const int nb = k / BLOCK, chunks = k / CHUNK;
    const int ng = g16 ? 2 * nb : nb;  /* scales (and offsets) a row */
    const long code_stride = (long)k * bits / 8;
    __m512 acc[4][4];
    for (int i = 0; i < RW; i++)
        for (int j = 0; j < RX; j++) acc[i][j] = _mm512_setzero_ps();
    for (int c = 0; c < chunks; c++) {
        __m512i w[4];
        __m512 ws[4];
        for (int i = 0; i < RW; i++) {
            w[i] = load_codes(codes + (n0 + i) * code_stride + (long)c * CHUNK * bits / 8, bits);
            ws[i] = g16 ? quad_scales((const float *)scales + (n0 + i) * ng, 2 * c)
                        : pair_scales((const char *)scales + (n0 + i) * nb * (f32 ? 4 : 2), 2 * c, f32);
        }
        for (int j = 0; j < RX; j++) {
            const int8_t *qj = q + (m0 + j) * k * terms + c * CHUNK;
            __m512i xq = _mm512_loadu_si512((const void *)qj);
            __m512i xq2 = terms == 2 ? _mm512_loadu_si512((const void *)(qj + k)) : xq;
            __m512 xs = _mm512_castpd_ps(_mm512_set1_pd(two_values(dx + (m0 + j) * nb + 2 * c)));
            for (int i = 0; i < RW; i++) {
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[i], xq);
                if (terms == 2) dot = _mm512_dpbusd_epi32(_mm512_slli_epi32(dot, 8), w[i], xq2);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws[i], xs), acc[i][j]);
            }
        }
    }
    float tail[4][4] = {{0}};
    if (nb % 2) {  /* the last, lone block: 256-bit */
        int b = nb - 1;
        for (int i = 0; i < RW; i++) {
            __m256i w = load_tail_codes(codes + (n0 + i) * code_stride + (long)b * BLOCK * bits / 8, bits);
            float s = one_scale((const char *)scales + (n0 + i) * nb * (f32 ? 4 : 2), b, f32);
            for (int j = 0; j < RX; j++) {
                const int8_t *qj = q + (m0 + j) * k * terms + b * BLOCK;
                __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, _mm256_loadu_si256((const __m256i *)qj));
                if (terms == 2)
                    dot = _mm256_dpbusd_epi32(_mm256_slli_epi32(dot, 8), w, _mm256_loadu_si256((const __m256i *)(qj + k)));
                __m128i d4 = _mm_add_epi32(_mm256_castsi256_si128(dot), _mm256_extracti128_si256(dot, 1));
                d4 = _mm_add_epi32(d4, _mm_shuffle_epi32(d4, 0x4E));
                d4 = _mm_add_epi32(d4, _mm_shuffle_epi32(d4, 0xB1));
                tail[i][j] = (float)_mm_cvtsi128_si32(d4) * (s * dx[(m0 + j) * nb + b]);
            }
        }
    }
    for (int b = 0; b < ng; b += 16) {  /* the offsets' term, o . (sums of x), folded into the same lanes */
        int count = ng - b;
        __m512 o[4];
        const char *stored = offsets ? (const char *)offsets : (const char *)scales;  /* or `factor` times these */
        for (int i = 0; i < RW; i++) {
            o[i] = sixteen(stored + (n0 + i) * ng * (f32 ? 4 : 2), b, count, f32);
            if (!offsets) o[i] = _mm512_mul_ps(o[i], _mm512_set1_ps(factor));
        }
        for (int j = 0; j < RX; j++) {
            __mmask16 m = count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
            __m512 s = _mm512_maskz_loadu_ps(m, sx + (m0 + j) * ng + b);
            for (int i = 0; i < RW; i++) acc[i][j] = _mm512_fmadd_ps(o[i], s, acc[i][j]);
        }
    }
    for (int j = 0; j < RX; j++)
        for (int i = 0; i < RW; i++)
            y[(m0 + j) * ldy + n0 + i] = _mm512_reduce_add_ps(acc[i][j]) + tail[i][j];
}

/* Rows [m0, m1) of x against rows [n0, n1) of W. */
static inline __attribute__((always_inline)) void span(
        int bits, int f32, const int terms, const int g16, int k, const uint8_t *codes, const void *scales,
        const void *offsets, float factor,
        long rows_of_w, long n0, long n1,
        const int8_t *q, const float *dx, const float *sx, long m0, long m1, float *y, long ldy) {
    long n = n0;
    const long code_stride = (long)k * bits / 8, scale_stride = (long)(k / BLOCK) * (g16 ? 2 : 1) * (f32 ? 4 : 2);
/* one tile of RW rows of W and RX rows of x at (n, m) */
#define TILE(RW, RX) tile(RW, RX, bits, f32, terms, g16, k, codes, scales, offsets, factor, n, q, dx, sx, m, y, ldy)
    for (; n + 4 <= n1; n += 4) {
        /* Rows of W come from L3 or memory once per call: fetch those PREFETCH_ROWS ahead, so that more lines are
         * in flight than the hardware prefetchers keep (one core's reads are latency-bound otherwise: 15% faster
         * on the embedded model's matrices). */
        if (n + PREFETCH_ROWS + 4 <= rows_of_w) {
            const char *c = (const char *)codes + (n + PREFETCH_ROWS) * code_stride;
            for (long b = 0; b < 4 * code_stride; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
            const char *s = (const char *)scales + (n + PREFETCH_ROWS) * scale_stride;
            for (long b = 0; b < 4 * scale_stride; b += 64) {
                _mm_prefetch(s + b, _MM_HINT_T0);
                if (offsets) _mm_prefetch((const char *)offsets + (n + PREFETCH_ROWS) * scale_stride + b, _MM_HINT_T0);
            }
        }
        long m = m0;
        for (; m + 4 <= m1; m += 4) TILE(4, 4);
        for (; m < m1; m++) TILE(4, 1);
    }
    for (; n < n1; n++) {
        long m = m0;
        for (; m + 4 <= m1; m += 4) TILE(1, 4);
        for (; m < m1; m++) TILE(1, 1);
    }
#undef TILE
}

#define SPAN_VARIANT(name, BITS, F32, TERMS, G16) \
    static void name(int k, const uint8_t *codes, const void *scales, const void *offsets, float factor, \
                     long rows_of_w, long n0, long n1, const int8_t *q, const float *dx, const float *sx, long m0, \
                     long m1, float *y, long ldy) { \
        span(BITS, F32, TERMS, G16, k, codes, scales, offsets, factor, rows_of_w, n0, n1, q, dx, sx, m0, m1, y, \
             ldy); \
    }
SPAN_VARIANT(span4_f16, 4, 0, 1, 0)
SPAN_VARIANT(span4_f32, 4, 1, 1, 0)
SPAN_VARIANT(span5_f16, 5, 0, 1, 0)
SPAN_VARIANT(span5_f32, 5, 1, 1, 0)
SPAN_VARIANT(span8_f16, 8, 0, 1, 0)
SPAN_VARIANT(span8_f32, 8, 1, 1, 0)
SPAN_VARIANT(span4_f16_fine, 4, 0, 2, 0)
SPAN_VARIANT(span4_f32_fine, 4, 1, 2, 0)
SPAN_VARIANT(span5_f16_fine, 5, 0, 2, 0)
SPAN_VARIANT(span5_f32_fine, 5, 1, 2, 0)
SPAN_VARIANT(span8_f16_fine, 8, 0, 2, 0)
SPAN_VARIANT(span8_f32_fine, 8, 1, 2, 0)
SPAN_VARIANT(span8_g16, 8, 1, 1, 1)
SPAN_VARIANT(span8_g16_fine, 8, 1, 2, 1)

/* A packed weight W [n, k] (cpu_quant.py's PackedWeight): codes, scales and offsets as above. */
struct braid_weight {
    const uint8_t *codes;
    const void *scales;
    const void *offsets;
    long n;
    long k;
    long bits;        /* 4, 5 or 8 */
    long scales_f32;  /* 0: float16 scales and offsets, 1: float32 */
    long group16;     /* 1: a float32 scale (and offset) per 16 weights (8-bit codes, k % 64 == 0) */
    float offset_factor;  /* offsets NULL: every offset is this times its scale */
};

typedef void (*span_fn)(int, const uint8_t *, const void *, const void *, float, long, long, long, const int8_t *,
                        const float *, const float *, long, long, float *, long);
static const span_fn SPANS[2][3][2] = {  /* [terms - 1][bits 4, 5, 8][scales_f32] */
    {{span4_f16, span4_f32}, {span5_f16, span5_f32}, {span8_f16, span8_f32}},
    {{span4_f16_fine, span4_f32_fine}, {span5_f16_fine, span5_f32_fine}, {span8_f16_fine, span8_f32_fine}},
};
static const span_fn SPANS16[2] = {span8_g16, span8_g16_fine};  /* [terms - 1] */

/* y [m, ldy] (columns 0..n) = x [m, ldx] @ W.T, x rounded to x_terms (1 or 2) int8 terms. Returns 0, or -1 for
 * arguments out of range, -2 when memory for x's int8 copy could not be had. */
int braid_cpu_quant_linear(const struct braid_weight *w, const float *x, long m, long ldx, float *y, long ldy,
                           int x_terms, int threads) {
    const long n = w->n;
    const int k = (int)w->k, bits = (int)w->bits;
    const int g16 = w->group16 != 0;
    if (m < 0 || n < 0 || k <= 0 || k % BLOCK || (bits != 4 && bits != 5 && bits != 8) || ldx < k || ldy < n
        || threads < 1 || (x_terms != 1 && x_terms != 2) || (g16 && (bits != 8 || !w->scales_f32 || k % CHUNK)))
        return -1;
    if (m == 0 || n == 0) return 0;
    const int nb = k / BLOCK;
    int8_t stack_q[8192];
    float stack_dx[4 * 256];
    int small = (long)m * k * x_terms <= 8192 && (long)m * nb <= 256;  /* decode: no allocation */
    int8_t *q = small ? stack_q : (int8_t *)aligned_alloc(64, ((size_t)m * k * x_terms + 63) / 64 * 64);
    float *dx = small ? stack_dx : (float *)malloc(sizeof(float) * (size_t)m * nb * 4);
    if (!q || !dx) {
        if (!small) { free(q); free(dx); }
        return -2;
    }
    float *sx = dx + (size_t)m * nb, *sx16 = sx + (size_t)m * nb;  /* x's sums per 32 and per 16 values */
    const int width = bits == 4 ? 0 : bits == 5 ? 1 : 2;
    const span_fn fn = g16 ? SPANS16[x_terms - 1] : SPANS[x_terms - 1][width][w->scales_f32 != 0];
    int parallel = threads > 1 && (long)m * n * k >= (1L << 18);
    #pragma omp parallel for num_threads(threads) schedule(static) if (parallel && m > 1)
    for (long r = 0; r < m; r++)
        quantize_row(x + r * ldx, k, x_terms, q + r * k * x_terms, dx + r * nb, sx + r * nb, sx16 + r * 2 * nb);
    long xtasks = (m + XROWS_PER_TASK - 1) / XROWS_PER_TASK;
    long wtasks = (n + WROWS_PER_TASK - 1) / WROWS_PER_TASK;
    #pragma omp parallel for num_threads(threads) schedule(static) collapse(2) if (parallel)
    for (long xt = 0; xt < xtasks; xt++)
        for (long wt = 0; wt < wtasks; wt++) {
            long m0 = xt * XROWS_PER_TASK, m1 = m0 + XROWS_PER_TASK < m ? m0 + XROWS_PER_TASK : m;
            long n0 = wt * WROWS_PER_TASK, n1 = n0 + WROWS_PER_TASK < n ? n0 + WROWS_PER_TASK : n;
            fn(k, w->codes, w->scales, w->offsets, w->offset_factor, n, n0, n1, q, dx, g16 ? sx16 : sx, m0, m1, y,
               ldy);
        }
    if (!small) { free(q); free(dx); }
    return 0;
}
