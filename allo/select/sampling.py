"""Where a threshold probably is: a weighted sample of the keys puts each boundary in a narrow window.

The blocked Triton search (:mod:`allo.select.topk`) starts with one pass over the window the sample
points to instead of radix passes from the top digit: for 16-bit scores that one pass usually finds
the exact threshold key (and every tensor's count of it), for float32 scores it leaves a few low bits
for prefix passes. The result is exact either way: the pass counts the keys above the window and in
it, and when the k-th largest key is not inside (the sample misled us, about one time in 10^9 at
``Z = 6``), the search starts over from the top digit.

The sample: :func:`allo_kernels.radix_window.sample` takes ``SAMPLES`` keys per tile, one from each
of ``SAMPLES`` equal strata, each standing for ``tile count / SAMPLES`` elements (tiles at the end of a
tensor are short, so samples are weighted), and adds them straight into a 65536-bin histogram of
weights (the key, or a 32-bit key's high half, then the low halves under the two high halves found):
0.5-1 MB whatever the model size, integer sums (exact in any order, all-reduced across ranks). The
number of elements at or above key ``b`` is estimated by the weight at or above ``b``; its standard
deviation is at most ``sqrt(w_max n q (1 - q))`` for a boundary at the top fraction ``q``, ``w_max``
the largest weight. A boundary ``k`` gets the window ``[L, U]`` with ``U`` the largest key whose
estimate reaches ``k - d`` and ``L`` the largest whose estimate reaches ``k + d``, ``d = Z sigma +
w_max``; ``U`` is the largest finite key when ``k - d <= 0`` (the top of the order is not sampled
finely enough), ``L`` the smallest one when ``k + d`` is beyond the total.
"""

from __future__ import annotations

import math

import torch

Z = 6.0  # standard deviations between a boundary's estimate and each end of its window
BINS = 65536


def window_shift(upper: int, lower: int, bits: int) -> int:
    """The smallest ``s`` such that the keys in ``[lower, upper]`` span fewer than ``2**bits`` values of
    ``key >> s`` (arithmetic shifts: negative keys too)."""
    s = 0
    while (upper >> s) - (lower >> s) >= (1 << bits):
        s += 1
    return s


def speculative_lows(ops, sources, ks, bits: int) -> torch.Tensor:
    """For 16-bit keys, queued on the device without a wait: per boundary ``k``, the low end of a window of
    ``2**bits`` keys around the sample's estimate of the k-th largest key (the largest key whose weight
    at or above it reaches ``k``), int64 [len(ks)]. ``ops`` and ``sources`` as for :func:`windows`.
    Nothing here says the window holds the key: the window pass's counts do. For a large model the
    estimate is within a key or two (973M bf16 scores: ~2.6M elements per key at the top 10% of
    |N(0, 1)|-like scores, against a standard deviation of the estimate of ~0.4M elements)."""
    from allo_kernels.radix_boundary import lows_from_sample

    # one single-program launch from the histogram (as ~7 torch ops the host time exceeded the GPU's)
    return lows_from_sample(ops.sample(sources, key32=False), ks, ops.SAMPLES, bits)


def _last_reaching(hist: torch.Tensor, targets, above=None) -> list:
    """For each target t: (the largest bin b whose weight at or above it, plus ``above``, reaches t, or
    -1 when none does; the weight above bin b, plus ``above``). Rows of ``above``/targets pair up with
    rows of a 2-D ``hist``. One synchronization."""
    rows = hist.view(-1, hist.shape[-1])
    c = rows.cumsum(1)
    # weight at or above b = total - (c[b] - hist[b]): it reaches t for the prefix of bins whose
    # exclusive cumsum is <= total + above - t (non-decreasing in b)
    room = c[:, -1:] - torch.tensor(targets, dtype=torch.int64, device=hist.device).view(rows.shape[0], -1)
    if above is not None:
        room += torch.tensor(above, dtype=torch.int64, device=hist.device).view(-1, 1)
    b = torch.searchsorted(c - rows, room, right=True) - 1
    weight_above = c[:, -1:] - c.gather(1, b.clamp(min=0))
    if above is not None:
        weight_above += torch.tensor(above, dtype=torch.int64, device=hist.device).view(-1, 1)
    return [tuple(x) for x in torch.stack([b, weight_above], -1).view(-1, 2).tolist()]


def windows(ops, sources, ks, n: int, *, key32: bool, edge: int, reduce=None):
    """Windows for the boundaries ``ks`` (each ``1 <= k <= n``) over ``sources`` (a prepared
    :class:`allo_kernels.radix_blocked.Sources`), sampled by ``ops`` (:mod:`allo_kernels.radix_window`).
    Returns ``(shift, lows, bits)`` for :func:`allo_kernels.radix_window.window_histogram`: boundary
    ``i``'s window holds the keys with ``key >> shift`` in ``[lows[i], lows[i] + 2**bits)``;
    ``bits == 0`` when every window is one key. ``reduce(t)``: ``t`` summed over ranks (under
    torch.distributed). One synchronization for 16-bit keys, and one more per boundary for 32-bit ones."""
    per, w_max = ops.SAMPLES, ops.sample_weight_max()
    top, bottom = edge - 1, -edge  # the largest and the smallest finite keys
    ends = []  # per boundary: (target weight of U, of L), scaled by `per`; None: no bound from the sample
    for k in ks:
        q = k / n
        d = Z * math.sqrt(w_max * n * q * (1 - q)) + w_max
        ends.append((math.ceil((k - d) * per) if k - d > 0 else None,
                     math.ceil((k + d) * per) if k + d < n else None))
    hist = ops.sample(sources, key32=key32)
    if reduce is not None:
        hist = reduce(hist)
    targets = [t for pair in ends for t in pair if t is not None]
    found = iter(_last_reaching(hist, targets) if targets else [])
    keys = []
    for pair in ends:
        # per end: (bin, weight above the bin) from the histogram, None when the sample gives no bound
        hits = [next(found) if t is not None else None for t in pair]
        hits = [None if h is None or h[0] < 0 else h for h in hits]  # (no bin reaches a target below the total)
        if key32:  # bins of high halves so far: the low halves come from the same sample under them
            hits = _refine_low(ops, sources, reduce, pair, hits)
        u, lo = (None if h is None else h[0] - (0 if key32 else BINS // 2) for h in hits)
        keys.append((top if u is None else min(max(u, bottom), top), bottom if lo is None else min(max(lo, bottom), top)))
    bits = ops.WINDOW_BITS[key32]
    shift = max(window_shift(u, lo, bits) for u, lo in keys)
    if shift == 0 and all(u == lo for u, lo in keys):
        bits = 0  # every window is one key (a large group of equal scores): counted without a histogram
    else:
        # the narrowest window at that shift: up to 2**REGISTER_BITS bins the pass counts in registers,
        # without a shared-memory histogram (the same keys are counted: the window still spans [L, U])
        bits = next((b for b in range(1, ops.REGISTER_BITS + 1)
                     if max(window_shift(u, lo, b) for u, lo in keys) == shift), bits)
    return shift, [lo >> shift for _, lo in keys], bits


def _refine_low(ops, sources, reduce, targets, hits):
    """32-bit keys: each end's key from its high half's bin, by the low halves of the sampled keys under
    that high half (the same sample: the same seed draws the same elements). Returns (key, None) per
    end, or None where the end has no bound."""
    todo = [i for i in (0, 1) if hits[i] is not None]
    if not todo:
        return hits
    highs = [hits[i][0] - BINS // 2 for i in todo]
    hist = ops.sample(sources, key32=True, highs=(highs[0], highs[-1]))
    if reduce is not None:
        hist = reduce(hist)
    low = _last_reaching(hist[:len(todo)], [targets[i] for i in todo], above=[hits[i][1] for i in todo])
    out = list(hits)
    for i, high, (b, _) in zip(todo, highs, low):
        # b >= 0: the weight above the high bin is below the target, the weight at or above it is not
        out[i] = ((high << 16) | b, None) if b >= 0 else None
    return out
