"""CPU path of the radix selection: the same histogram and write passes as the Triton kernels, in C.

Why C and not torch ops: a 65536-bin histogram through ``torch.bincount`` costs about 3-4 ns per
element on this class of CPU (it scans for min and max first, and needs the key shifted into a new
tensor), which alone eats most of a 5x margin over ``torch.topk``; a plain C loop over the raw bits
is ~1 ns and needs no temporary at all. The C source is ``csrc/cpu/radix_select.c``; :mod:`allo._native`
compiles it on first use (cached) and it is called through ``ctypes`` on the tensors' data pointers.

Memory: each pass uses one 256 KB array of 32-bit counters per thread, freed at its end; the threads
(torch's intra-op count) are used only from 16M elements per thread, as waking a second thread costs
milliseconds on shared cores.

Keys are defined in :mod:`allo_kernels.radix_select` (the C ``key32``/``key16`` in csrc/cpu/radix_select.c implement the
same mapping; the tests check both against ``keys_torch``).
"""

from __future__ import annotations

import ctypes

import torch

from allo._native import load_c_library



_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# Waking a second thread costs milliseconds when the cores are shared (the OpenMP barrier waits for
# the scheduler); below this many elements per thread one thread is faster.
_MIN_PER_THREAD = 1 << 24


def _threads(n: int) -> int:
    return max(1, min(torch.get_num_threads(), n // _MIN_PER_THREAD))


def _lib() -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    return load_c_library("radix_select", flags=["-O3"], optional_flags=["-fopenmp"], what="allo.select's cpu backend",
                          signatures={
                              "allo_radix_hist_many": ([i64, p, p, p, p, p, p, p, i32, i32, i32], None),
                              "allo_radix_write": ([p, p, i64, i32, i32, i32, p, i32, i32, i32, i32, i32, i32, i32, i32], i64),
                              "allo_radix_count_eq_many": ([i64, p, p, p, p, p, p, i32, p, i32], None),
                              "allo_radix_find_eq": ([p, p, i64, i32, i32, i32, i32, p, i64], i64),
                          })


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
