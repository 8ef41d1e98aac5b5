/* One layer's attention over the paged KV pool on x86 CPUs with AVX-512, float32 rows, for every row of a step
 * (prompt rows and decode rows alike):
 *
 *   1. per row: q and k of the packed qkv row, each head RMS-normed (optional, Qwen3's QK-norm) and rotated by the
 *      row's cos/sin (optional; the half-split "rotate_half" convention); k and v written into the pool at the row's
 *      slot (float32, or bfloat16 rounded to nearest even);
 *   2. per row and KV head: the row's query heads of that group against the keys 0..p of its sequence (p: the row's
 *      index in its sequence's KV; with a sliding window W, p - W + 1..p), read through its page table: scores, their
 *      softmax (max subtracted, exp, sum) and the weighted sum of the values, in float32.
 *
 * Each row is computed alone, in one order, whatever the other rows of the step are: a request's answer does not
 * depend on its batch (tests/reliability/test_concurrency.py). The pool of one layer is [pages, 2, kv_heads,
 * page_size, head_dim] (K then V), FlashInfer's HND layout, as braidinfer/attention/torch_backend.py holds it.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_HEAD_DIM 256
#define SPLIT_KEYS 256  /* a row's keys are attended in parts of this many, merged in order (flash-decoding) */

static void rms_norm_head(float *x, const float *w, long hd, float eps) {
    __m512 acc = _mm512_setzero_ps();
    for (long i = 0; i < hd; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)hd + eps);
    for (long i = 0; i < hd; i++) x[i] = w[i] * (x[i] * inv);
}

static void rotate_head(float *x, const float *cos, const float *sin, long hd) {
    long half = hd / 2;
    float tmp[MAX_HEAD_DIM];
    for (long i = 0; i < half; i++) {
        tmp[i] = x[i] * cos[i] - x[i + half] * sin[i];
        tmp[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
    memcpy(x, tmp, sizeof(float) * hd);
}

static inline void store_row(void *pool, int bf16, long index, const float *src, long hd) {
    if (bf16) {
        uint16_t *dst = (uint16_t *)pool + index;
        for (long i = 0; i < hd; i++) dst[i] = to_bf16(src[i]);
    } else {
        memcpy((float *)pool + index, src, sizeof(float) * hd);
    }
}

static inline __m512 load_pool(const void *pool, int bf16, long index) {
    return bf16 ? load_bf16((const uint16_t *)pool + index) : _mm512_loadu_ps((const float *)pool + index);
}

/* The query heads qg [group][HD] of one row and KV head g against keys first..first + n - 1 of its sequence (pages
 * `table`): scores into `scores` [group][n], then per query head into part [group][HD + 2]: the scores' max m, the
 * sum l of exp(score - m), and the values weighted by those exps (not yet divided by l). HD is a constant where
 * inlined for 64 and 128 (registers for the vectors), the row's head_dim otherwise. */
static inline __attribute__((always_inline)) void attend(
        const long HD, const float *qg, long group, const void *pool, int bf16, long kv_heads, long g,
        long page_size, const int64_t *table, long first, long n, float scale, float *scores, float *part) {
    const long chunks = HD / 16;
    const long block = HD <= 64 ? 4 : HD <= 128 ? 2 : 1;  /* query heads whose values accumulate together */
    long page = first / page_size, offset = first % page_size;  /* walked key by key: no division per key */
    for (long j = 0; j < n; j++) {  /* scores */
        long base = ((table[page] * 2 * kv_heads + g) * page_size + offset) * HD;
        if (++offset == page_size) { offset = 0; page++; }
        __m512 k[MAX_HEAD_DIM / 16];
        for (long c = 0; c < chunks; c++) k[c] = load_pool(pool, bf16, base + 16 * c);
        for (long h = 0; h < group; h++) {
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg + h * HD), k[0]);
            for (long c = 1; c < chunks; c++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + h * HD + 16 * c), k[c], acc);
            scores[h * n + j] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    for (long h = 0; h < group; h++) {  /* softmax numerators */
        float *sc = scores + h * n;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (long j = 0; j < n; j += 16)
            mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), first_lanes(n - j), sc + j));
        const float top = _mm512_reduce_max_ps(mx);
        __m512 m = _mm512_set1_ps(top), sum = _mm512_setzero_ps();
        for (long j = 0; j < n; j += 16) {
            __mmask16 lanes = first_lanes(n - j);
            __m512 e = _mm512_maskz_mov_ps(lanes, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, sc + j), m)));
            _mm512_mask_storeu_ps(sc + j, lanes, e);
            sum = _mm512_add_ps(sum, e);
        }
        part[h * (HD + 2)] = top;
        part[h * (HD + 2) + 1] = _mm512_reduce_add_ps(sum);
    }
    for (long h0 = 0; h0 < group; h0 += block) {  /* the weighted values, `block` query heads at a time */
        const long count = group - h0 < block ? group - h0 : block;
        __m512 acc[4 * (MAX_HEAD_DIM / 16)];
        for (long i = 0; i < block * chunks; i++) acc[i] = _mm512_setzero_ps();
        page = first / page_size;
        offset = first % page_size;
        for (long j = 0; j < n; j++) {
            long base = ((table[page] * 2 * kv_heads + kv_heads + g) * page_size + offset) * HD;  /* V: K's page + 1 */
            if (++offset == page_size) { offset = 0; page++; }
            for (long c = 0; c < chunks; c++) {
                __m512 v = load_pool(pool, bf16, base + 16 * c);
                for (long h = 0; h < block; h++)
                    if (h < count)
                        acc[h * chunks + c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(h0 + h) * n + j]), v,
                                                              acc[h * chunks + c]);
            }
        }
        for (long h = 0; h < count; h++)
            for (long c = 0; c < chunks; c++) _mm512_storeu_ps(part + (h0 + h) * (HD + 2) + 2 + 16 * c, acc[h * chunks + c]);
    }
}

static void attend_any(long hd, const float *qg, long group, const void *pool, int bf16, long kv_heads, long g,
                       long page_size, const int64_t *table, long first, long n, float scale, float *scores,
                       float *part) {
    attend(hd, qg, group, pool, bf16, kv_heads, g, page_size, table, first, n, scale, scores, part);
}

/* o [hd] = `count` parts (part i at parts + i stride, as `attend` writes them) merged in order: each part's values
 * and sum scaled by exp(its max - the largest max), the values then divided by the scaled sums' total. */
static void merge(const float *parts, long count, long stride, long hd, float *o) {
    float top = parts[0], total = 0.0f;
    for (long i = 1; i < count; i++) top = parts[i * stride] > top ? parts[i * stride] : top;
    __m512 acc[MAX_HEAD_DIM / 16];
    for (long c = 0; c < hd / 16; c++) acc[c] = _mm512_setzero_ps();
    for (long i = 0; i < count; i++) {
        const float *part = parts + i * stride;
        const float w = _mm512_cvtss_f32(exp16(_mm512_set1_ps(part[0] - top)));
        total += part[1] * w;
        for (long c = 0; c < hd / 16; c++)
            acc[c] = _mm512_fmadd_ps(_mm512_loadu_ps(part + 2 + 16 * c), _mm512_set1_ps(w), acc[c]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / total);
    for (long c = 0; c < hd / 16; c++) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(acc[c], inv));
}

/* Returns 0, -1 for arguments out of range, -2 when scratch memory could not be had. */
int braid_cpu_attention(const float *qkv, long ld_qkv, long rows, long heads, long kv_heads, long hd,
                        const float *cos, const float *sin, long ld_rope,
                        const float *q_norm, const float *k_norm, float norm_eps,
                        void *pool, int pool_bf16, long page_size,
                        const int64_t *slots, const int64_t *positions, const int64_t *tables,
                        const int64_t *table_start, long window, float scale,
                        float *out, long ld_out, int threads) {
    if (rows < 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads || hd <= 0 || hd % 16 || hd > MAX_HEAD_DIM
        || heads / kv_heads > MAX_HEAD_DIM || page_size <= 0 || threads < 1)
        return -1;
    if (rows == 0) return 0;
    const long group = heads / kv_heads;
    /* each row's keys in parts of SPLIT_KEYS from its first key: tasks of (part, KV head), merged per row after */
    long *part_start = (long *)malloc(sizeof(long) * (rows + 1));
    if (!part_start) return -2;
    part_start[0] = 0;
    long work = 0;
    for (long r = 0; r < rows; r++) {
        const long p = positions[r], first = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
        part_start[r + 1] = part_start[r] + (p + 1 - first + SPLIT_KEYS - 1) / SPLIT_KEYS;
        work += (p + 1 - first) * heads;
    }
    const long parts = part_start[rows], part_size = group * (hd + 2);
    long *part_row = (long *)malloc(sizeof(long) * parts);
    float *q = (float *)malloc(sizeof(float) * rows * heads * hd);
    float *partials = (float *)malloc(sizeof(float) * (size_t)parts * kv_heads * part_size);
    float *scratch = (float *)malloc(sizeof(float) * (size_t)threads * group * SPLIT_KEYS);
    if (!part_row || !q || !partials || !scratch) {
        free(part_start); free(part_row); free(q); free(partials); free(scratch);
        return -2;
    }
    for (long r = 0; r < rows; r++)
        for (long t = part_start[r]; t < part_start[r + 1]; t++) part_row[t] = r;
    int parallel = threads > 1 && work >= 4096;

    #pragma omp parallel for num_threads(threads) schedule(static) if (parallel && rows > 1)
    for (long r = 0; r < rows; r++) {
        const float *row = qkv + r * ld_qkv;
        float *qr = q + r * heads * hd;
        memcpy(qr, row, sizeof(float) * heads * hd);
        float k[MAX_HEAD_DIM];
        long page = slots[r] / page_size, offset = slots[r] % page_size;
        for (long h = 0; h < heads + kv_heads; h++) {
            float *x = h < heads ? qr + h * hd : k;
            if (h >= heads) memcpy(k, row + h * hd, sizeof(float) * hd);
            if (q_norm) rms_norm_head(x, h < heads ? q_norm : k_norm, hd, norm_eps);
            if (cos) rotate_head(x, cos + r * ld_rope, sin + r * ld_rope, hd);
            if (h >= heads) {
                long g = h - heads;
                store_row(pool, pool_bf16, (((page * 2) * kv_heads + g) * page_size + offset) * hd, k, hd);
                store_row(pool, pool_bf16, (((page * 2 + 1) * kv_heads + g) * page_size + offset) * hd,
                          row + (heads + kv_heads + g) * hd, hd);
            }
        }
    }

    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1) collapse(2) if (parallel)
    for (long t = 0; t < parts; t++)
        for (long g = 0; g < kv_heads; g++) {
#ifdef _OPENMP
            float *scores = scratch + (size_t)omp_get_thread_num() * group * SPLIT_KEYS;
#else
            float *scores = scratch;
#endif
            const long r = part_row[t], p = positions[r];
            const long first = (window > 0 && p - window + 1 > 0 ? p - window + 1 : 0)
                               + (t - part_start[r]) * SPLIT_KEYS;
            const long n = p + 1 - first < SPLIT_KEYS ? p + 1 - first : SPLIT_KEYS;
            const float *qg = q + (r * heads + g * group) * hd;
            float *part = partials + (t * kv_heads + g) * part_size;
            const int64_t *table = tables + table_start[r];
            if (hd == 64)
                attend(64, qg, group, pool, pool_bf16, kv_heads, g, page_size, table, first, n, scale, scores, part);
            else if (hd == 128)
                attend(128, qg, group, pool, pool_bf16, kv_heads, g, page_size, table, first, n, scale, scores, part);
            else
                attend_any(hd, qg, group, pool, pool_bf16, kv_heads, g, page_size, table, first, n, scale, scores,
                           part);
        }

    #pragma omp parallel for num_threads(threads) schedule(static) collapse(2) if (parallel)
    for (long r = 0; r < rows; r++)
        for (long g = 0; g < kv_heads; g++)
            for (long h = 0; h < group; h++)
                merge(partials + (part_start[r] * kv_heads + g) * part_size + h * (hd + 2),
                      part_start[r + 1] - part_start[r], kv_heads * part_size, hd,
                      out + r * ld_out + (g * group + h) * hd);
    free(part_start);
    free(part_row);
    free(partials);
    free(q);
    free(scratch);
    return 0;
}
