#include <stdint.h>
#include <math.h>
#include <pthread.h>

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } x; x.u = ((uint32_t)h) << 16; return x.f;
}
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    union { uint32_t u; float f; } x; x.f = f;
    if (isnan(f)) return (uint16_t)((x.u >> 16) | 0x40);
    x.u += 0x7FFF + ((x.u >> 16) & 1);
    return (uint16_t)(x.u >> 16);
}
static inline float load_any(const void *p, int64_t i, int dt) {
    if (dt == 0) return ((const float *)p)[i];
    if (dt == 1) return bf16_to_f32(((const uint16_t *)p)[i]);
    return (float)((const _Float16 *)p)[i];
}
static inline void store_any(void *p, int64_t i, int dt, float v) {
    if (dt == 0) ((float *)p)[i] = v;
    else if (dt == 1) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((_Float16 *)p)[i] = (_Float16)v;
}

/* Per-tensor scalars (float32), N_SCAL per row, layout documented in allo/optim/_cpu_kernel.py:
   1 - beta1, beta2, 1 - beta2, step_size, bias_correction2_sqrt, decay, eps. */
#define N_SCAL 7

#define PREFETCH 64
#define RUN 256

/* Selected elements that form a contiguous run (whole rows, say): plain arrays, so the compiler
   vectorises the loop, sqrt and division included. Same operations, same order as the scalar loop. */
static void run_contiguous(float *restrict P, const float *restrict G, float *restrict m, float *restrict v,
                           int64_t n, const float *s) {
    const float omb1 = s[0], b2 = s[1], omb2 = s[2], step_size = s[3], bc2_sqrt = s[4], decay = s[5], eps = s[6];
    for (int64_t q = 0; q < n; ++q) {
        float g = G[q];
        float mq = m[q] + omb1 * (g - m[q]);
        float vq = b2 * v[q] + omb2 * g * g;
        m[q] = mq; v[q] = vq;
        P[q] = P[q] * decay - step_size * mq / (sqrtf(vq) / bc2_sqrt + eps);
    }
}

/* One chunk [lo, hi) of one tensor's selected elements. The common case (fp32 weight, fp32 grad,
   int32 indices, no master) gets its own loops: runs of RUN selected elements that are contiguous in
   the weight take the vectorised path, the others a scalar loop with prefetches. */
static void chunk(const int64_t *a, const float *s, int64_t lo, int64_t hi) {
    void *param = (void *)a[0]; const void *grad = (const void *)a[1]; const void *idx = (const void *)a[2];
    float *m = (float *)a[3]; float *v = (float *)a[4]; float *master = (float *)a[5];
    int codes = (int)a[7];
    int pdt = codes & 15, gdt = (codes >> 4) & 15, icode = (codes >> 8) & 15, gcompact = (codes >> 12) & 1;
    const float omb1 = s[0], b2 = s[1], omb2 = s[2], step_size = s[3], bc2_sqrt = s[4], decay = s[5], eps = s[6];
    if (pdt == 0 && icode == 4 && master == 0 && (gcompact || gdt == 0)) {
        float *P = (float *)param; const float *G = (const float *)grad; const int32_t *I = (const int32_t *)idx;
        for (int64_t j0 = lo; j0 < hi; j0 += RUN) {
            int64_t j1 = j0 + RUN < hi ? j0 + RUN : hi, base = I[j0];
            if ((int64_t)I[j1 - 1] - base == j1 - 1 - j0) {  /* sorted, unique: one contiguous run */
                run_contiguous(P + base, gcompact ? G + j0 : G + base, m + j0, v + j0, j1 - j0, s);
                continue;
            }
            for (int64_t j = j0; j < j1; ++j) {
                if (j + PREFETCH < hi) {  /* random accesses: ask for lines early so misses overlap */
                    int64_t f = I[j + PREFETCH];
                    if (!gcompact) __builtin_prefetch(&G[f], 0, 0);
                    __builtin_prefetch(&P[f], 1, 0);
                }
                int64_t e = I[j];
                float g = gcompact ? G[j] : G[e];
                float mj = m[j] + omb1 * (g - m[j]);
                float vj = b2 * v[j] + omb2 * g * g;
                m[j] = mj; v[j] = vj;
                float p = P[e] * decay;
                P[e] = p - step_size * mj / (sqrtf(vj) / bc2_sqrt + eps);
            }
        }
        return;
    }
    for (int64_t j = lo; j < hi; ++j) {
        int64_t e = icode == 0 ? j : (icode == 4 ? (int64_t)((const int32_t *)idx)[j] : ((const int64_t *)idx)[j]);
        float g = gcompact ? ((const float *)grad)[j] : load_any(grad, e, gdt);
        float mj = m[j] + omb1 * (g - m[j]);
        float vj = b2 * v[j] + omb2 * g * g;
        m[j] = mj; v[j] = vj;
        float p = (master ? master[j] : load_any(param, e, pdt)) * decay;
        p = p - step_size * mj / (sqrtf(vj) / bc2_sqrt + eps);
        if (master) master[j] = p;
        store_any(param, e, pdt, p);
    }
}

#define CHUNK 32768
/* All tensors in one call: work is cut into chunks of CHUNK selected elements, which the threads take
   from a shared counter, so one big tensor and many small ones both keep every core busy. Plain
   pthreads, not OpenMP: a second OpenMP runtime next to torch's would spin-wait against it. */
typedef struct { int64_t n; const int64_t *addr; const float *scal; int64_t total; int64_t next; } job_t;

static void *worker(void *arg) {
    job_t *job = (job_t *)arg;
    for (;;) {
        int64_t c = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (c >= job->total) return 0;
        int64_t t = 0, first = 0;
        for (;;) {  /* tensors are few; a linear walk costs nothing next to a chunk */
            int64_t nc = (job->addr[t * 8 + 6] + CHUNK - 1) / CHUNK;
            if (c < first + nc) break;
            first += nc; ++t;
        }
        int64_t k = job->addr[t * 8 + 6], lo = (c - first) * CHUNK, hi = lo + CHUNK;
        chunk(job->addr + t * 8, job->scal + t * N_SCAL, lo, hi < k ? hi : k);
    }
}

void allo_masked_adamw(int64_t n, const int64_t *addr, const float *scal, int nthreads) {
    job_t job = {n, addr, scal, 0, 0};
    for (int64_t t = 0; t < n; ++t) job.total += (addr[t * 8 + 6] + CHUNK - 1) / CHUNK;
    if (nthreads > job.total) nthreads = (int)job.total;
    if (nthreads > 64) nthreads = 64;
    pthread_t threads[64];
    int started = 0;
    for (int i = 1; i < nthreads; ++i)
        if (pthread_create(&threads[started], 0, worker, &job) == 0) ++started;
    worker(&job);  /* the calling thread works too; if a thread failed to start, the others do its share */
    for (int i = 0; i < started; ++i) pthread_join(threads[i], 0);
}
