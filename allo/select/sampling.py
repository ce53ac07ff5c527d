"""Where a threshold probably is: a weighted sample of the keys puts each boundary in a narrow window.

The blocked Triton search (:mod:`allo.select.topk`) starts with one pass over the window the sample
points to instead of radix passes from the top digit: for 16-bit scores that one pass usually finds
the exact threshold key (and every tensor's count of it), for float32 scores it leaves a few low bits
for prefix passes. The result is exact either way: the pass counts the keys above the window and in
it, and when the k-th largest key is not inside (the sample misled us, about one time in 10^9 at
``Z = 6``), the search starts over from the top digit.

The sample: :func:`allo_kernels.radix_window.sample` takes ``SAMPLES`` keys per tile, one from each
of ``SAMPLES`` equal strata, each standing for ``tile count / SAMPLES`` elements (tiles at the end of a
tensor are short, so samples are weighted). The number of elements at or above the ``i``-th largest
sample key is estimated by the cumulative weight ``c_i``; its standard deviation is at most
``sqrt(sum(w^2) q (1 - q))`` for a boundary at the top fraction ``q``. A boundary ``k`` gets the window
``[L, U]`` with ``U`` the sample key where ``c`` reaches ``k - d`` and ``L`` where it reaches ``k + d``,
``d = Z sigma + max(w)``; ``U`` is the largest finite key when ``k - d <= 0`` (the top of the order is
not sampled finely enough), ``L`` the smallest one when ``k + d`` is beyond the total.
"""

from __future__ import annotations

import torch

Z = 6.0  # standard deviations between a boundary's estimate and each end of its window


def window_shift(upper: int, lower: int, bits: int) -> int:
    """The smallest ``s`` such that the keys in ``[lower, upper]`` span fewer than ``2**bits`` values of
    ``key >> s`` (arithmetic shifts: negative keys too)."""
    s = 0
    while (upper >> s) - (lower >> s) >= (1 << bits):
        s += 1
    return s


def windows(ops, sources, ks, n: int, *, key32: bool, edge: int, gather=None):
    """Windows for the boundaries ``ks`` (each ``1 <= k <= n``) over ``sources`` (a prepared
    :class:`allo_kernels.radix_blocked.Sources`), sampled by ``ops`` (:mod:`allo_kernels.radix_window`). Returns ``(shift, lows, bits)`` for
    :func:`allo_kernels.radix_window.window_histogram`: boundary ``i``'s window holds the keys with
    ``key >> shift`` in ``[lows[i], lows[i] + 2**bits)``; ``bits == 0`` when every window is one key.
    ``gather(t)``: the concatenation of ``t`` over ranks (under torch.distributed), so that every rank
    derives the same windows from the same sample. One synchronization."""
    keys, counts = ops.sample(sources, key32=key32)
    per = ops.SAMPLES
    w = counts.to(torch.int64).repeat_interleave(per)  # per x weight, kept integral
    if gather is not None:
        both = gather(torch.stack([keys.to(torch.int64), w], 1))
        keys, w = both[:, 0], both[:, 1]
    sk, order = torch.sort(keys, descending=True, stable=True)
    wf = w[order].to(torch.float64) / per
    c = wf.cumsum(0)  # c[i]: estimated number of elements with key >= sk[i]
    k = torch.tensor(list(ks), dtype=torch.float64, device=keys.device)
    q = k / n
    d = Z * torch.sqrt((wf * wf).sum() * q * (1 - q)) + wf.max()
    last = sk.numel() - 1
    top, bottom = edge - 1, -edge  # the largest and the smallest finite keys
    iu = torch.searchsorted(c, k - d).clamp_(max=last)
    il = torch.searchsorted(c, k + d)
    upper = torch.where(k - d > 0, sk[iu].to(torch.int64), top).clamp_(bottom, top)
    lower = torch.where(il <= last, sk[il.clamp(max=last)].to(torch.int64), bottom).clamp_(bottom, top)
    bounds = torch.stack([upper, lower], 1).tolist()
    bits = ops.WINDOW_BITS[key32]
    shift = max(window_shift(u, lo, bits) for u, lo in bounds)
    if shift == 0 and all(u == lo for u, lo in bounds):
        bits = 0  # every window is one key (a large group of equal scores): counted without a histogram
    return shift, [lo >> shift for _, lo in bounds], bits
