#include <stdint.h>
#include <string.h>
#include <stdlib.h>

/* order-preserving keys, -0.0 == +0.0 (see allo_kernels/radix_select.py) */
static inline int32_t key32(uint32_t u) {
    int32_t b = (int32_t)u;
    int32_t k = b >= 0 ? b : (b ^ 0x7FFFFFFF);
    return (u & 0x7FFFFFFFu) ? k : 0;
}
static inline int32_t key16(uint16_t u) {
    int32_t b = (int16_t)u;
    int32_t k = b >= 0 ? b : (b ^ 0x7FFF);
    return (u & 0x7FFFu) ? k : 0;
}
static inline float f16_to_f32(uint16_t h) { _Float16 v; memcpy(&v, &h, 2); return (float)v; }
static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float load_f(const void* p, int64_t i, int dt) {
    if (dt == 0) return ((const float*)p)[i];
    if (dt == 1) return bf16_to_f32(((const uint16_t*)p)[i]);
    return f16_to_f32(((const uint16_t*)p)[i]);
}
static inline int32_t diff_key(const void* x, const void* y, int64_t i, int xdt, int ydt) {
    float d = load_f(x, i, xdt) - load_f(y, i, ydt);
    d = d < 0 ? -d : d;
    uint32_t u; memcpy(&u, &d, 4);
    return key32(u & 0x7FFFFFFFu);
}
static inline int32_t up_key(const void* x, int64_t i, int xdt) {
    float f = load_f(x, i, xdt);
    uint32_t u; memcpy(&u, &f, 4);
    return key32(u);
}

/* kind: 0 float32 scores, 1 16-bit scores with 16-bit keys, 2 |x - y|, 3 16-bit scores with 32-bit keys
   (mixed dtypes compare by value); dtypes xdt, ydt: 0 fp32, 1 bf16, 2 fp16.
   low=0: histogram of the 16-bit keys or of the high halves of 32-bit keys (bin + 32768);
   low=1: histogram of the low halves of the 32-bit keys whose high half is `prefix`.
   Each thread counts into its own 32-bit counters (256 KB), added to `hist` at the end. */
#define HIST_LOOP(KEYEXPR)                                                              \
    if (!low) {                                                                           \
        int64_t ii = a;                                                                   \
        for (; ii + 1 < b; ii += 2) {                                                     \
            int32_t k0 = KEYEXPR; ii++;                                                   \
            int32_t k1 = KEYEXPR; ii--;                                                   \
            s0[(k0 >> shift) + 32768]++; s0[(k1 >> shift) + 32768]++;                     \
        }                                                                                 \
        for (; ii < b; ii++) { int32_t k0 = KEYEXPR; s0[(k0 >> shift) + 32768]++; }       \
    } else {                                                                              \
        for (int64_t ii = a; ii < b; ii++) {                                              \
            int32_t k0 = KEYEXPR;                                                         \
            if ((k0 >> 16) == prefix) s0[k0 & 0xFFFF]++;                                  \
        }                                                                                 \
    }

static void hist_range(const void* x, const void* y, int64_t a, int64_t b, int kind, int xdt, int ydt,
                       uint32_t* s0, int low, int32_t prefix) {
    int shift = kind == 1 ? 0 : 16;
    if (kind == 0) { const uint32_t* p = (const uint32_t*)x; HIST_LOOP(key32(p[ii])) }
    else if (kind == 1) { const uint16_t* p = (const uint16_t*)x; HIST_LOOP(key16(p[ii])) }
    else if (kind == 2) { HIST_LOOP(diff_key(x, y, ii, xdt, ydt)) }
    else { HIST_LOOP(up_key(x, ii, xdt)) }
}

#define BLK ((int64_t)1 << 20)

static int64_t* block_starts(int64_t m, const int64_t* ns) {
    int64_t* first = (int64_t*)malloc((size_t)(m + 1) * sizeof(int64_t));
    first[0] = 0;
    for (int64_t t = 0; t < m; t++) first[t + 1] = first[t] + (ns[t] + BLK - 1) / BLK;
    return first;
}
static int64_t tensor_of_block(const int64_t* first, int64_t m, int64_t blk) {
    int64_t lo = 0, hi = m;  /* the tensor t with first[t] <= blk < first[t+1] */
    while (hi - lo > 1) { int64_t mid = (lo + hi) / 2; if (first[mid] <= blk) lo = mid; else hi = mid; }
    while (first[lo + 1] <= blk) lo++;
    return lo;
}

/* Histogram of m tensors at once, blocks of BLK elements shared among nthreads threads. */
void allo_radix_hist_many(int64_t m, const int64_t* xs, const int64_t* ys, const int64_t* ns, const int32_t* kinds,
                          const int32_t* xdts, const int32_t* ydts, int64_t* hist, int low, int32_t prefix,
                          int nthreads) {
    int64_t* first = block_starts(m, ns);
    int64_t nblocks = first[m];
    #pragma omp parallel num_threads(nthreads)
    {
        uint32_t* s0 = (uint32_t*)calloc(65536, sizeof(uint32_t));
        int64_t done = 0;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            int64_t t = tensor_of_block(first, m, blk);
            int64_t a = (blk - first[t]) * BLK, b = a + BLK < ns[t] ? a + BLK : ns[t];
            hist_range((const void*)xs[t], (const void*)ys[t], a, b, kinds[t], xdts[t], ydts[t], s0, low, prefix);
            done += b - a;
            if (done > ((int64_t)1 << 31)) {  /* keep the 32-bit counters from overflowing */
                #pragma omp critical
                for (int i = 0; i < 65536; i++) hist[i] += (int64_t)s0[i];
                memset(s0, 0, 65536 * sizeof(uint32_t));
                done = 0;
            }
        }
        #pragma omp critical
        for (int i = 0; i < 65536; i++) hist[i] += (int64_t)s0[i];
        free(s0);
    }
    free(first);
}

/* Ties: how many elements of each tensor have key `key`, and where they are. */
#define EQ_LOOP(KEYEXPR, BODY) \
    for (int64_t ii = a; ii < b; ii++) { int32_t k0 = KEYEXPR; if (k0 == key) { BODY; } }
#define EQ_DISPATCH(BODY)                                                                      \
    if (kind == 0) { const uint32_t* p = (const uint32_t*)x; EQ_LOOP(key32(p[ii]), BODY) }     \
    else if (kind == 1) { const uint16_t* p = (const uint16_t*)x; EQ_LOOP(key16(p[ii]), BODY) } \
    else if (kind == 2) { EQ_LOOP(diff_key(x, y, ii, xdt, ydt), BODY) }                        \
    else { EQ_LOOP(up_key(x, ii, xdt), BODY) }

void allo_radix_count_eq_many(int64_t m, const int64_t* xs, const int64_t* ys, const int64_t* ns,
                              const int32_t* kinds, const int32_t* xdts, const int32_t* ydts, int32_t key,
                              int64_t* counts, int nthreads) {
    int64_t* first = block_starts(m, ns);
    int64_t nblocks = first[m];
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        int64_t t = tensor_of_block(first, m, blk);
        int64_t a = (blk - first[t]) * BLK, b = a + BLK < ns[t] ? a + BLK : ns[t];
        const void* x = (const void*)xs[t]; const void* y = (const void*)ys[t];
        int kind = kinds[t], xdt = xdts[t], ydt = ydts[t];
        int64_t c = 0;
        EQ_DISPATCH(c++)
        #pragma omp atomic
        counts[t] += c;
    }
    free(first);
}

/* positions (ascending) of the first `max_out` elements with key `key`; returns how many were written */
int64_t allo_radix_find_eq(const void* x, const void* y, int64_t n, int kind, int xdt, int ydt, int32_t key,
                           int64_t* out, int64_t max_out) {
    int64_t c = 0, a = 0, b = n;
    EQ_DISPATCH(if (c < max_out) out[c++] = ii; else return c)
    return c;
}

/* out[i] = (key > khi or (hi_ties and key == khi)) and not (key > kex or (ex_ties and key == kex)),
   with has_hi=0 meaning nothing kept and has_ex=0 nothing excluded. Returns how many keys equal ckey
   (the caller learns a tensor's tie count in the same pass). */
#define WRITE_LOOP(KEYEXPR)                                                          \
    for (int64_t i = a; i < n; i++) {                                                \
        int32_t k = KEYEXPR;                                                         \
        int keep = hi_ties ? (k >= khi) : (k > khi);                                 \
        if (has_ex) keep &= ex_ties ? (k < kex) : (k <= kex);                        \
        out[i] = (uint8_t)keep;                                                      \
        cnt += k == ckey;                                                            \
    }
static int64_t write_range(const void* x, const void* y, int64_t a, int64_t n, int kind, int xdt, int ydt,
                           uint8_t* out, int32_t khi, int hi_ties, int has_ex, int32_t kex, int ex_ties,
                           int32_t ckey) {
    int64_t cnt = 0;
    if (kind == 1) { const uint16_t* p = (const uint16_t*)x; WRITE_LOOP(key16(p[i])) }
    else if (kind == 0) { const uint32_t* p = (const uint32_t*)x; WRITE_LOOP(key32(p[i])) }
    else if (kind == 2) { WRITE_LOOP(diff_key(x, y, i, xdt, ydt)) }
    else { WRITE_LOOP(up_key(x, i, xdt)) }
    return cnt;
}
int64_t allo_radix_write(const void* x, const void* y, int64_t n, int kind, int xdt, int ydt, uint8_t* out,
                         int has_hi, int32_t khi, int hi_ties, int has_ex, int32_t kex, int ex_ties, int32_t ckey,
                         int nthreads) {
    if (!has_hi) { memset(out, 0, (size_t)n); return 0; }
    int64_t nblocks = (n + BLK - 1) / BLK, total = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (nblocks > 1) reduction(+:total)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        int64_t a = blk * BLK, b = a + BLK < n ? a + BLK : n;
        total += write_range(x, y, a, b, kind, xdt, ydt, out, khi, hi_ties, has_ex, kex, ex_ties, ckey);
    }
    return total;
}
