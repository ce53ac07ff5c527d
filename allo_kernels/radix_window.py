"""The sampled start of the blocked selection (Triton): a weighted sample of the keys, and one pass
over the window where the sample puts each threshold.

A sample of ``SAMPLES`` keys per tile (:func:`sample`: added straight into a weighted 65536-bin
histogram, 0.5 MB, where a sorted sample of 973M scores took 21 MB; :mod:`allo.select.sampling` turns
it into windows) puts each threshold in a window of ``2**WINDOW_BITS`` values of ``key >> shift``; one pass
(:func:`window_histogram`) counts the keys above the window and histograms those inside (few: the window holds ~0.5% of them, so the
shared-memory atomics of ``tl.histogram`` are rare). For 16-bit keys on a large model the window is
usually single keys (``shift`` 0): that one pass finds the exact threshold, where the radix passes
take three; float32 keys leave ~12 bits, two prefix passes. A window above zero (the usual case:
scores are magnitudes) compares the scores' raw bits, which order every key that can reach it, and
skips the key transform and the lane mask.

Windows of up to ``2**REGISTER_BITS`` bins (the sample asks for the narrowest window at its shift; for
973M bf16 scores the six-sigma window spans ~4 keys) and one-key windows are counted in registers:
8-bit counters packed in each lane's int64, unpacked once per tile. On the H100 (2026-11-27) the
32-bin pass took 2.06 ms of kernel time for 973M bf16 scores, 3.3x the time to read them, with
full occupancy: its loop body is 439 sm_90 PTX instructions and 3 barriers per step of 8 elements a
thread (``tl.histogram`` zeroes, fills and reads back shared memory at every step); the register-
counted loop is 122 instructions and no barrier (static counts); measured on the H100 (run 6): 0.785
ms of kernel time with per-tile counts, 0.675 ms with atomics, 1.2-1.4x the time to read the scores.

Tried and dropped: loading each step's scores a step ahead (Triton does not pipeline this loop
itself; on the H100 the per-tile pass took 0.907 ms with it and 0.913 without in run 6, 1.103 against
0.916 in run 7); global atomics for the in-window keys (before any GPU measurement: Triton moves the
scattered pointers through shared memory into another layout, four barriers per step against three
for ``tl.histogram``); and (measured in run 7) writing each score's code against the window into its
mask during this pass, so that a pass over the masks (one byte per score) finishes them instead of a
write pass over the scores: the pass with codes took 1.12 ms and the finishing pass 0.67 ms (1.5 TB/s
for its bytes: no saving in kernel time) against 0.79 + 1.04 ms, and the masks' allocation moved in
front of the window pass, where the GPU waits for it (the whole selection 4.08 against 2.94 ms).

The kernels use the launch tables, tiles and step helpers of :mod:`allo_kernels.radix_blocked`
(read through the module, so that tests shrinking its ``TILE`` reach these launches too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import radix_blocked as rb
from .radix_blocked import _row, _step_scores
from .radix_select import _keys

SAMPLES = 16  # keys sampled per tile for the window pass (one per 2048 elements of a full tile)
WINDOW_BITS = {False: 5, True: 6}  # bins of the window pass: 32 for 16-bit keys, 64 for 32-bit ones
# Windows of up to 2**REGISTER_BITS bins are counted in registers instead (see _window_count); the sample
# asks for the narrowest window that needs no larger shift (sampling.windows). For 973M bf16 scores the
# six-sigma window spans ~4 keys, so the usual large-model pass makes no shared-memory histogram at all
REGISTER_BITS = 3
REGISTER_BINS = tl.constexpr(1 << REGISTER_BITS)


@triton.jit
def _blocked_sample_kernel(table_ptr, tile_tensor_ptr, hist_ptr, high0, high1, seed, X_T: tl.constexpr,
                           Y_T: tl.constexpr, IS_DIFF: tl.constexpr, KEY32: tl.constexpr, X_BF16: tl.constexpr,
                           Y_BF16: tl.constexpr, LOW: tl.constexpr, ALIGNED: tl.constexpr, TILE: tl.constexpr,
                           BLOCK: tl.constexpr, SAMPLES: tl.constexpr):
    """SAMPLES keys per tile, one from each of SAMPLES equal strata at a hashed offset (a fixed stride
    would keep hitting the same columns of a weight matrix), added to a 65536-bin histogram with the
    tile's element count as weight (SAMPLES times what a sample stands for: integers, so the sums are
    exact in any order). ``LOW``: the low 16 bits of the 32-bit keys whose high half is ``high0``
    (row 0) or ``high1`` (row 1); else the 16-bit key, or the high half of a 32-bit one, plus 32768."""
    row, x, y, n, start, count, full = _row(table_ptr, tile_tensor_ptr, X_T, Y_T, ALIGNED, TILE, BLOCK)
    p = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, SAMPLES).to(tl.int64)
    lo = j * count // SAMPLES
    width = tl.maximum((j + 1) * count // SAMPLES - lo, 1)
    h = (p * SAMPLES + j + seed) * 0x9E3779B1  # < 2**63 for any realistic tile index
    h = (h ^ (h >> 15)) & 0x7FFFFFFF
    offs = start + tl.minimum(lo + h % width, count - 1)
    key = _keys(x, y, offs, tl.full([SAMPLES], 1, tl.int1), IS_DIFF, KEY32, X_BF16, Y_BF16)
    weight = tl.zeros([SAMPLES], dtype=tl.int64) + count
    if LOW:
        low = key & 0xFFFF
        tl.atomic_add(hist_ptr + low, weight, mask=(key >> 16) == high0, sem="relaxed")
        tl.atomic_add(hist_ptr + 65536 + low, weight, mask=(key >> 16) == high1, sem="relaxed")
    else:
        if KEY32:
            key = key >> 16
        tl.atomic_add(hist_ptr + key + 32768, weight, sem="relaxed")


@triton.jit
def _window_step(x, y, base, n, h0, h1, acc0, acc1, low0, low1, shift, edge, IS_DIFF: tl.constexpr,
                 KEY32: tl.constexpr, X_BF16: tl.constexpr, Y_BF16: tl.constexpr, BINS: tl.constexpr,
                 TWO: tl.constexpr, POSITIVE: tl.constexpr, SHIFTED: tl.constexpr, MASKED: tl.constexpr,
                 BLOCK: tl.constexpr):
    _, _, m, key = _step_scores(x, y, base, n, IS_DIFF, KEY32, X_BF16, Y_BF16, POSITIVE, MASKED, BLOCK)
    return _window_count_keys(key, m, h0, h1, acc0, acc1, low0, low1, shift, edge, KEY32, BINS, TWO, POSITIVE,
                              SHIFTED)


@triton.jit
def _window_count_keys(key, m, h0, h1, acc0, acc1, low0, low1, shift, edge, KEY32: tl.constexpr, BINS: tl.constexpr,
                       TWO: tl.constexpr, POSITIVE: tl.constexpr, SHIFTED: tl.constexpr):
    # a step's keys (raw bits when POSITIVE) and lane mask into the running counts
    if SHIFTED:
        high = key >> shift
    else:
        high = key
    # (per lane, packed 8-bit counters: a lane sees at most TILE / BLOCK + 1 keys) above the window,
    # and for one-key windows in it; compared with the window's ends, not subtracted from them:
    # high - low overflows int32 for distant keys
    h0, acc0 = _window_count(high, m, low0, h0, acc0, BINS, POSITIVE)
    if TWO:
        h1, acc1 = _window_count(high, m, low1, h1, acc1, BINS, POSITIVE)
    # non-finite scores: the magnitude bits of the raw bits (the caller keeps their maximum and tests
    # it against edge); the general path's keys are not raw bits, so it tests them itself
    if POSITIVE:
        if KEY32:
            mag = key & 0x7FFFFFFF
        else:
            mag = key & 0x7FFF
    else:
        mag = tl.where(m & ((key >= edge) | (key < -edge)), edge, 0)
    return h0, h1, acc0, acc1, mag


@triton.jit
def _window_zero(BINS: tl.constexpr, BLOCK: tl.constexpr):
    """The in-window counts a program starts from: packed per-lane counters (a [BLOCK] int64, 8 bits per
    bin) for windows of up to REGISTER_BINS bins, else a [BINS] histogram."""
    if BINS > 1 and BINS <= REGISTER_BINS:
        h = tl.zeros([BLOCK], dtype=tl.int64)
    else:
        h = tl.zeros([BINS], dtype=tl.int32)
    return h


@triton.jit
def _window_count(high, m, low, h, acc, BINS: tl.constexpr, POSITIVE: tl.constexpr):
    if BINS == 1:
        acc += (m & (high > low)).to(tl.int32) + ((m & (high == low)).to(tl.int32) << 8)
    else:
        acc += (m & (high >= low + BINS)).to(tl.int32)
        if POSITIVE:
            # high - low wraps around only for raw bits far below the window (low > 0): still not in it
            d = high - low
            w = d.to(tl.uint32, bitcast=True) < BINS
        else:
            w = m & (high >= low) & (high < low + BINS)
            d = tl.where(w, high - low, 0)
        if BINS <= REGISTER_BINS:
            # one 8-bit counter per bin in each lane's int64 (a lane sees at most TILE / BLOCK + 1 keys):
            # a shift and an add per key, where tl.histogram zeroes, fills (shared-memory atomics) and
            # reads back its bins with barriers at every step
            one = tl.full(h.shape, 1, dtype=tl.int64)
            h += tl.where(w, one << (tl.where(w, d, 0).to(tl.int64) * 8), 0)
        else:
            h += tl.histogram(d, BINS, mask=w)
    return h, acc


@triton.jit
def _window_totals(h, acc, BINS: tl.constexpr):
    """A program's (window histogram [BINS] int32, keys above the window) from its running counts."""
    above = tl.sum(acc & 0xFF, axis=0)
    if BINS == 1:
        h = tl.zeros([1], dtype=tl.int32) + tl.sum((acc >> 8) & 0xFF, axis=0)  # a one-key window: its count
    elif BINS <= REGISTER_BINS:  # unpack the per-lane counters into the window's histogram
        bins = tl.arange(0, BINS)
        counts = tl.zeros([BINS], dtype=tl.int32)
        for b in tl.static_range(BINS):
            counts = tl.where(bins == b, tl.sum(((h >> (8 * b)) & 0xFF).to(tl.int32), axis=0), counts)
        h = counts
    return h, above


@triton.jit
def _window_flush(out, h, acc, counter_ptr, BINS: tl.constexpr):
    h, above = _window_totals(h, acc, BINS)
    above = above.to(tl.int64)
    tl.atomic_add(out + tl.arange(0, BINS), h.to(tl.int64), mask=h > 0, sem="relaxed")
    tl.atomic_add(counter_ptr, above, mask=above > 0, sem="relaxed")


@triton.jit
def _window_store(out, h, acc, BINS: tl.constexpr):
    # this tile's row of the per-tile output: BINS counts, then the keys above the window
    h, above = _window_totals(h, acc, BINS)
    tl.store(out + tl.arange(0, BINS), h.to(tl.int32))
    tl.store(out + BINS, above.to(tl.int32))


@triton.jit
def _blocked_window_kernel(table_ptr, tile_tensor_ptr, hist_ptr, counts_ptr, lows_ptr, low0, low1, shift, edge,
                           X_T: tl.constexpr, Y_T: tl.constexpr, IS_DIFF: tl.constexpr, KEY32: tl.constexpr,
                           X_BF16: tl.constexpr, Y_BF16: tl.constexpr, BITS: tl.constexpr, TWO: tl.constexpr,
                           POSITIVE: tl.constexpr, SHIFTED: tl.constexpr, PER_TENSOR: tl.constexpr,
                           PER_TILE: tl.constexpr, LOWS_ON_DEVICE: tl.constexpr, ALIGNED: tl.constexpr,
                           TILE: tl.constexpr, BLOCK: tl.constexpr):
    """Per window (one or two): the keys with ``key >> shift`` in ``[low, low + BINS)`` by bin, and how
    many are above the window; also whether the tile holds a non-finite score. ``counts_ptr``:
    [above0, above1, tiles with a non-finite score]. ``BITS == 0``: one-key windows (``shift`` 0),
    counted without a histogram (a huge group of equal scores costs nothing extra). ``POSITIVE``:
    both windows start above zero (``low > 0``). ``PER_TILE``: no atomics; each program writes its
    own row of ``hist_ptr`` (int32: window 0's bins and above-count, window 1's, the non-finite flag).
    ``LOWS_ON_DEVICE``: ``low0`` and ``low1`` are read from ``lows_ptr`` (int64 [2], or [1] without
    ``TWO``), which the device computed from the sample (no wait for the host)."""
    row, x, y, n, start, count, full = _row(table_ptr, tile_tensor_ptr, X_T, Y_T, ALIGNED, TILE, BLOCK)
    if LOWS_ON_DEVICE:
        low0 = tl.load(lows_ptr).to(tl.int32)
        if TWO:
            low1 = tl.load(lows_ptr + 1).to(tl.int32)
        else:  # one window: read as both (an expanded copy of the one low cost a kernel and host time)
            low1 = low0
    BINS: tl.constexpr = 1 << BITS
    h0 = _window_zero(BINS, BLOCK)
    h1 = _window_zero(BINS, BLOCK)
    acc0 = tl.zeros([BLOCK], dtype=tl.int32)
    acc1 = tl.zeros([BLOCK], dtype=tl.int32)
    big = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(0, full, BLOCK):
        h0, h1, acc0, acc1, mag = _window_step(x, y, start + off, n, h0, h1, acc0, acc1, low0, low1, shift, edge,
                                               IS_DIFF, KEY32, X_BF16, Y_BF16, BINS, TWO, POSITIVE, SHIFTED, False,
                                               BLOCK)
        big = tl.maximum(big, mag)
    if full < count:
        h0, h1, acc0, acc1, mag = _window_step(x, y, start + full, n, h0, h1, acc0, acc1, low0, low1, shift, edge,
                                               IS_DIFF, KEY32, X_BF16, Y_BF16, BINS, TWO, POSITIVE, SHIFTED, True,
                                               BLOCK)
        big = tl.maximum(big, mag)
    bad = (tl.max(big, axis=0) >= edge).to(tl.int64)
    if PER_TILE:
        out = hist_ptr + tl.program_id(0).to(tl.int64) * (2 * BINS + 3)
        _window_store(out, h0, acc0, BINS)
        # one window: the second one's columns get the first one's counts (every column written)
        if TWO:
            _window_store(out + BINS + 1, h1, acc1, BINS)
        else:
            _window_store(out + BINS + 1, h0, acc0, BINS)
        tl.store(out + 2 * BINS + 2, bad.to(tl.int32))
    else:
        if PER_TENSOR:
            out = hist_ptr + tl.load(row + 4) * (2 * BINS)
        else:
            out = hist_ptr
        _window_flush(out, h0, acc0, counts_ptr, BINS)
        if TWO:
            _window_flush(out + BINS, h1, acc1, counts_ptr + 1, BINS)
        tl.atomic_add(counts_ptr + 2, bad, mask=bad > 0, sem="relaxed")


def sample(sources, *, key32: bool, seed: int = 0, highs=None):
    """The weighted histogram of a sample of ``SAMPLES`` keys per tile of every source (int64 [65536] on
    the scores' device; sums to ``SAMPLES`` x the number of elements): bin ``key + 32768`` for 16-bit
    keys, ``(key >> 16) + 32768`` for 32-bit ones. ``highs=(h0, h1)`` (32-bit keys): the same sample's
    low halves instead, [2, 65536], row ``i`` over the keys whose high half is ``h_i``. The same
    ``seed`` draws the same elements. No synchronization; 0.5 MB (1 MB) whatever the model size."""
    src = rb._prepared(sources)
    low = highs is not None
    if low and not key32:
        raise ValueError("radix_window.sample: highs= is for 32-bit keys only")
    hist = torch.zeros((2, 65536) if low else 65536, dtype=torch.int64, device=src.device)
    h0, h1 = (int(highs[0]), int(highs[-1])) if low else (0, 0)
    for key, members in src.groups().items():
        rb._run(_blocked_sample_kernel, key, rb._layout(src, members), (hist, h0, h1, int(seed)), KEY32=key32,
                LOW=low, SAMPLES=SAMPLES)
    return hist


def sample_weight_max() -> float:
    """The most elements one sample stands for (a full tile's)."""
    return rb.TILE / SAMPLES


def sample_reference(sources, *, key32: bool, seed: int = 0, highs=None):
    """Plain-PyTorch :func:`sample` of a list of sources (the same elements, the same histogram), for
    tests; also returns the sampled keys and their weights."""
    from .radix_select import keys_torch

    keys, weights = [], []
    for _, members in rb.Sources(sources).groups().items():
        p = 0  # the hash takes the program id, which restarts with every launch
        for i in members:
            flat = _flat_scores(sources[i])
            n = flat.numel()
            for start in range(0, n, rb.TILE):
                count = min(n - start, rb.TILE)
                j = torch.arange(SAMPLES, dtype=torch.int64)
                lo = j * count // SAMPLES
                width = torch.clamp((j + 1) * count // SAMPLES - lo, min=1)
                h = (p * SAMPLES + j + seed) * 0x9E3779B1
                h = (h ^ (h >> 15)) & 0x7FFFFFFF
                offs = start + torch.minimum(lo + h % width, torch.tensor(count - 1))
                keys.append(keys_torch(flat[offs.to(flat.device)], key32).cpu().long())
                weights.append(torch.full((SAMPLES,), count, dtype=torch.int64))
                p += 1
    keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)
    weights = torch.cat(weights) if weights else torch.zeros(0, dtype=torch.int64)
    if highs is None:
        hist = torch.bincount((keys >> 16 if key32 else keys) + 32768, weights=weights.double(), minlength=65536)
    else:
        hist = torch.stack([torch.bincount(keys & 0xFFFF, weights=(weights * ((keys >> 16) == h)).double(),
                                           minlength=65536) for h in (highs[0], highs[-1])])
    return hist.long(), keys, weights


def _flat_scores(s):
    # the scores of a source as one flat tensor (|a - b| in float32 for an AbsDiff, as the kernels compute it)
    return s.flat_chunk(0, s.numel()) if hasattr(s, "a") else s.reshape(-1)


def window_histogram(sources, shift: int, lows, bits: int, *, key32: bool, edge: int, per_tensor: bool = False):
    """The window pass: for each of the one or two windows ``low`` (keys with ``key >> shift`` in
    ``[low, low + 2**bits)``), the histogram of ``(key >> shift) - low``, and the number of keys above
    the window; also the number of non-finite scores (keys beyond ``edge``).

    Returns ``(hist [len(lows), bins] int64, per [sources, len(lows), bins] or None, above [len(lows)]
    int64, nonfinite [1] int64: tiles holding a non-finite score)`` on the scores' device; ``per`` when
    ``per_tensor``."""
    if not 1 <= len(lows) <= 2:
        raise ValueError(f"radix_window.window_histogram: {len(lows)} windows; expected 1 or 2")
    src = rb._prepared(sources)
    bins = 1 << bits
    block = rb.hist_block(bits)
    assert rb.TILE // block < 255, (rb.TILE, block)  # the kernel's 8-bit per-lane counters
    rows = len(src) if per_tensor else 1
    # histograms and the three counters zeroed in one buffer (one fill)
    zeroed = torch.zeros(rows * 2 * bins + 3, dtype=torch.int64, device=src.device)
    buf, counters = zeroed[:-3].view(rows, 2, bins), zeroed[-3:]
    lo0, lo1 = int(lows[0]), int(lows[-1])
    for key, members in src.groups().items():
        rb._run(_blocked_window_kernel, key, rb._layout(src, members),
                (buf, counters, counters, lo0, lo1, int(shift), int(edge)), block=block, KEY32=key32, BITS=bits,
                TWO=len(lows) == 2, POSITIVE=min(lo0, lo1) > 0, SHIFTED=shift > 0, PER_TENSOR=per_tensor,
                PER_TILE=False, LOWS_ON_DEVICE=False)
    per = buf[:, :len(lows)]
    hist = per.sum(0) if per_tensor else per[0]
    return hist, (per if per_tensor else None), counters[:len(lows)], counters[2:]


def window_tile_counts(sources, lows, bits: int, *, key32: bool, edge: int, positive: bool | None = None):
    """The window pass at ``shift`` 0 (each bin one key) with its counts kept per tile, for a search
    that goes on on the device (:mod:`allo.select.device_plan`). ``sources``: one launch group only
    (their tiles, in source order, are the rows). ``lows``: the windows' low ends, ints or an int64
    tensor on the device (then ``positive``, whether they are above zero, is the caller's assumption to
    check: the counts are meaningless for a window that is not).

    Returns int32 ``[tiles, 2 * (2**bits + 1) + 1]``: per tile, window 0's bins (bin ``j``: the keys
    equal to ``lows[0] + j``) and the keys above it, the same for window 1 (window 0 again when there
    is one), and 1 when the tile holds a non-finite score. No atomics, no zero fill, no synchronization."""
    if not 1 <= len(lows) <= 2:
        raise ValueError(f"radix_window.window_tile_counts: {len(lows)} windows; expected 1 or 2")
    on_device = isinstance(lows, torch.Tensor)
    if on_device == (positive is None):
        raise ValueError("radix_window.window_tile_counts: positive= is given with lows on the device, and only then")
    src = rb._prepared(sources)
    groups = src.groups()
    if len(groups) != 1:
        raise ValueError(f"radix_window.window_tile_counts: {len(groups)} launch groups (score dtypes, or scores "
                         "mixed with weight deltas); expected one")
    (key, members), = groups.items()
    bins = 1 << bits
    block = rb.hist_block(bits)
    assert rb.TILE // block < 255, (rb.TILE, block)  # the kernel's 8-bit per-lane counters
    layout = rb._layout(src, members)
    out = torch.empty(layout[1].numel(), 2 * bins + 3, dtype=torch.int32, device=src.device)
    if on_device:
        # (one window: the kernel reads its low for both; before, an expanded copy took a kernel launch
        # between the sample's kernels and this pass, and the GPU waited ~0.1 ms for it: H100 profile)
        lows_dev, lo0, lo1 = lows.to(torch.int64).contiguous(), 0, 0
    else:
        lows_dev, (lo0, lo1), positive = out, (int(lows[0]), int(lows[-1])), min(lows) > 0
    rb._run(_blocked_window_kernel, key, layout, (out, out, lows_dev, lo0, lo1, 0, int(edge)), block=block,
            KEY32=key32, BITS=bits, TWO=len(lows) == 2, POSITIVE=positive, SHIFTED=False, PER_TENSOR=False,
            PER_TILE=True, LOWS_ON_DEVICE=on_device)
    return out
