/* A recorded sequence of calls into this library's kernels, made in one call (braidinfer/cpu_graphs.py replays a
 * decoder layer's decode step through it instead of one ctypes call per kernel):
 *
 *   braid_cpu_run(ops, n, bound): for each op in order, first a[patch_arg[j]] = bound[patch_slot[j]] +
 *   patch_offset[j] (the step's own pointers and thread count), then the kernel `kernel` with the arguments a, in
 *   its own order: pointers and integers as 64-bit words, float arguments as their bits in the low 32.
 *
 * Returns 0, or the first failing kernel's status (-1 arguments out of range, -2 no scratch memory) with the ops
 * after it not run; -3 for an unknown kernel.
 */
#include <stdint.h>
#include <string.h>

struct braid_weight;

int braid_cpu_quant_linear(const struct braid_weight *w, const float *x, long m, long ldx, float *y, long ldy,
                           int x_terms, int threads);
void braid_cpu_rms_norm(const float *x, const float *w, float eps, float *y, long m, long dim);
void braid_cpu_add_rms_norm(const float *x, const float *residual, const float *w, float eps, float *y, float *h,
                            long m, long dim);
void braid_cpu_silu_mul(const float *x, float *y, long m, long d);
int braid_cpu_attention(const float *qkv, long ld_qkv, long rows, long heads, long kv_heads, long hd,
                        const float *cos, const float *sin, long ld_rope,
                        const float *q_norm, const float *k_norm, float norm_eps,
                        void *pool, int pool_bf16, long page_size,
                        const int64_t *slots, const int64_t *positions, const int64_t *tables,
                        const int64_t *table_start, long window, float scale,
                        float *out, long ld_out, int threads);

enum { OP_QUANT_LINEAR, OP_RMS_NORM, OP_ADD_RMS_NORM, OP_SILU_MUL, OP_ATTENTION };

#define MAX_PATCHES 12  /* as braid_kernels/cpu_program.py */
#define MAX_ARGS 24

typedef struct {
    int32_t kernel;
    int32_t num_patches;
    int32_t patch_arg[MAX_PATCHES];
    int32_t patch_slot[MAX_PATCHES];
    int64_t patch_offset[MAX_PATCHES];
    int64_t a[MAX_ARGS];
} braid_op;

static inline float f32(int64_t word) {
    uint32_t bits = (uint32_t)word;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define P(i) ((void *)(intptr_t)a[i])

static int run_one(const braid_op *op) {
    const int64_t *a = op->a;
    switch (op->kernel) {
    case OP_QUANT_LINEAR:
        return braid_cpu_quant_linear(P(0), P(1), a[2], a[3], P(4), a[5], (int)a[6], (int)a[7]);
    case OP_RMS_NORM:
        braid_cpu_rms_norm(P(0), P(1), f32(a[2]), P(3), a[4], a[5]);
        return 0;
    case OP_ADD_RMS_NORM:
        braid_cpu_add_rms_norm(P(0), P(1), P(2), f32(a[3]), P(4), P(5), a[6], a[7]);
        return 0;
    case OP_SILU_MUL:
        braid_cpu_silu_mul(P(0), P(1), a[2], a[3]);
        return 0;
    case OP_ATTENTION:
        return braid_cpu_attention(P(0), a[1], a[2], a[3], a[4], a[5], P(6), P(7), a[8], P(9), P(10), f32(a[11]),
                                   P(12), (int)a[13], a[14], P(15), P(16), P(17), P(18), a[19], f32(a[20]), P(21),
                                   a[22], (int)a[23]);
    }
    return -3;
}

int braid_cpu_run(braid_op *ops, long n, const int64_t *bound) {
    for (long i = 0; i < n; i++) {
        braid_op *op = &ops[i];
        for (int j = 0; j < op->num_patches; j++)
            op->a[op->patch_arg[j]] = bound[op->patch_slot[j]] + op->patch_offset[j];
        int rc = run_one(op);
        if (rc) return rc;
    }
    return 0;
}
