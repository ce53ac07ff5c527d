"""CPU path of the radix selection: the same histogram and write passes as the Triton kernels, in C.

Why C and not torch ops: a 65536-bin histogram through ``torch.bincount`` costs about 3-4 ns per
element on this class of CPU (it scans for min and max first, and needs the key shifted into a new
tensor), which alone eats most of a 5x margin over ``torch.topk``; a plain C loop over the raw bits
is ~1 ns and needs no temporary at all. The file is tiny and has no torch headers, so it compiles in
about a second with the system C compiler on first use and is cached (``$ALLO_CACHE_DIR`` or
``~/.cache/allo``); it is called through ``ctypes`` on the tensors' data pointers.

Memory: each pass uses one 256 KB array of 32-bit counters per thread, freed at its end; the threads
(torch's intra-op count) are used only from 16M elements per thread, as waking a second thread costs
milliseconds on shared cores.

Keys are defined in :mod:`allo_kernels.radix_select` (the C ``key32``/``key16`` below implement the
same mapping; the tests check both against ``keys_torch``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings

import torch

_C_SOURCE = r"""
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
"""

_LIB = None
_LOCK = threading.Lock()
_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# Waking a second thread costs milliseconds when the cores are shared (the OpenMP barrier waits for
# the scheduler); below this many elements per thread one thread is faster.
_MIN_PER_THREAD = 1 << 24


def _threads(n: int) -> int:
    return max(1, min(torch.get_num_threads(), n // _MIN_PER_THREAD))


def _cache_dir() -> str:
    return os.environ.get("ALLO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "allo")


def _compile() -> str:
    digest = hashlib.sha256(_C_SOURCE.encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"radix_select_{digest}.so")
    if os.path.exists(path):
        return path
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("allo.select: the CPU selection path compiles a small C file on first use and found no "
                           "C compiler; install gcc (or set CC), or pass backend='reference' (slower, more memory)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "radix_select.c")
        with open(src, "w") as f:
            f.write(_C_SOURCE)
        out = os.path.join(tmp, "radix_select.so")
        proc = subprocess.run([cc, "-O3", "-fopenmp", "-fPIC", "-shared", "-o", out, src], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            # e.g. Apple clang has no OpenMP: same results, one thread
            first_err = proc.stderr
            proc = subprocess.run([cc, "-O3", "-fPIC", "-shared", "-o", out, src], capture_output=True, text=True)
            if proc.returncode == 0:
                warnings.warn(f"allo.select: {cc} could not compile with -fopenmp, so the CPU selection path runs on "
                              f"one thread:\n{first_err[-500:]}", RuntimeWarning, stacklevel=3)
        if proc.returncode != 0:
            raise RuntimeError(f"allo.select: compiling the CPU selection path with {cc} failed:\n{proc.stderr}\n"
                               "set CC to a C compiler with _Float16 support (gcc >= 12, clang >= 15), or pass "
                               "backend='reference'")
        fd, tmp_dst = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".so.tmp")
        os.close(fd)
        shutil.copyfile(out, tmp_dst)
        os.replace(tmp_dst, path)  # atomic: concurrent first uses never load half a file
    return path


def _lib():
    global _LIB
    if _LIB is None:
        with _LOCK:
            if _LIB is None:
                lib = ctypes.CDLL(_compile())
                p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
                lib.allo_radix_hist_many.argtypes = [i64, p, p, p, p, p, p, p, i32, i32, i32]
                lib.allo_radix_hist_many.restype = None
                lib.allo_radix_write.argtypes = [p, p, i64, i32, i32, i32, p, i32, i32, i32, i32, i32, i32, i32, i32]
                lib.allo_radix_write.restype = i64
                lib.allo_radix_count_eq_many.argtypes = [i64, p, p, p, p, p, p, i32, p, i32]
                lib.allo_radix_count_eq_many.restype = None
                lib.allo_radix_find_eq.argtypes = [p, p, i64, i32, i32, i32, i32, p, i64]
                lib.allo_radix_find_eq.restype = i64
                _LIB = lib
    return _LIB


def _operands(src, key32):
    if hasattr(src, "a"):  # AbsDiff: |a - b| computed in the loop
        return src.a, src.b, 2, _DT[src.a.dtype], _DT[src.b.dtype]
    kind = 0 if src.dtype == torch.float32 else (3 if key32 else 1)
    return src, src, kind, _DT[src.dtype], _DT[src.dtype]


def _check_cpu(t, what):
    if t.device.type != "cpu":
        raise ValueError(f"allo.select backend 'cpu' got {what} on {t.device}; use backend 'triton' for CUDA tensors")


def _columns(sources, key32):
    ops = [_operands(s, key32) for s in sources]
    for o in ops:
        _check_cpu(o[0], "scores")
    ptrs = lambda i: torch.tensor([o[i].data_ptr() for o in ops], dtype=torch.int64)  # noqa: E731
    ints = lambda i: torch.tensor([o[i] for o in ops], dtype=torch.int32)  # noqa: E731
    ns = torch.tensor([o[0].numel() for o in ops], dtype=torch.int64)
    # the tensors are returned too: they keep the pointed-to arrays alive during the call
    return ops, (ptrs(0), ptrs(1), ns, ints(2), ints(3), ints(4))


def radix_histogram(sources, hist: torch.Tensor, *, key32: bool, low_prefix: int | None = None) -> None:
    """Same contract as :func:`allo_kernels.radix_select.radix_histogram`, on CPU tensors, for a list of
    score sources at once (one C call; blocks of 1M elements shared among torch's threads)."""
    sources = [s for s in sources if s.numel() > 0]
    if not sources:
        return
    assert hist.dtype == torch.int64 and hist.is_contiguous() and hist.numel() == 65536
    _, cols = _columns(sources, key32)
    _lib().allo_radix_hist_many(len(sources), *(c.data_ptr() for c in cols), hist.data_ptr(),
                                0 if low_prefix is None else 1, 0 if low_prefix is None else int(low_prefix),
                                _threads(int(cols[2].sum())))


def count_equal(sources, key: int, *, key32: bool) -> list[int]:
    """Number of elements whose key is ``key``, per source."""
    counts = torch.zeros(len(sources), dtype=torch.int64)
    if sources:
        _, cols = _columns(sources, key32)
        _lib().allo_radix_count_eq_many(len(sources), *(c.data_ptr() for c in cols), int(key), counts.data_ptr(),
                                        _threads(int(cols[2].sum())))
    return counts.tolist()


def equal_positions(src, key: int, count: int, *, key32: bool) -> torch.Tensor:
    """Flat positions (ascending, int64) of the ``count`` elements of ``src`` whose key is ``key``."""
    x, y, kind, xdt, ydt = _operands(src, key32)
    _check_cpu(x, "scores")
    out = torch.empty(count, dtype=torch.int64)
    got = _lib().allo_radix_find_eq(x.data_ptr(), y.data_ptr(), x.numel(), kind, xdt, ydt, int(key), out.data_ptr(),
                                    count)
    assert got == count, (got, count)
    return out


def radix_write(src, out: torch.Tensor, key_hi, hi_ties, key_ex, ex_ties, *, key32: bool,
                count_key: int | None = None) -> int | None:
    """Same contract as :func:`allo_kernels.radix_select.radix_write`, on CPU tensors; with
    ``count_key`` also returns how many elements have that key (counted in the same pass)."""
    x, y, kind, xdt, ydt = _operands(src, key32)
    _check_cpu(x, "scores")
    n = x.numel()
    if n == 0:
        return 0
    assert out.dtype == torch.bool and out.is_contiguous() and out.numel() == n
    # 2**31 - 1 never occurs as a key (it would be a NaN), so "no count" counts nothing
    cnt = _lib().allo_radix_write(x.data_ptr(), y.data_ptr(), n, kind, xdt, ydt, out.data_ptr(),
                                  int(key_hi is not None), 0 if key_hi is None else int(key_hi), int(bool(hi_ties)),
                                  int(key_ex is not None), 0 if key_ex is None else int(key_ex), int(bool(ex_ties)),
                                  0x7FFFFFFF if count_key is None else int(count_key), _threads(n))
    return cnt if count_key is not None else None
