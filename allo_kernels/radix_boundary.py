"""The small steps between the passes of the device-finished selection, each one single-program launch.

:mod:`allo.select.device_plan` queues the whole selection without reading anything back. Between its
passes two small computations run on the device: the windows from the sample's histogram
(:func:`lows_from_sample`) and, from the window pass's per-tile counts, each boundary's key, how many
elements on it are taken, and each tile's first tie rank (:func:`boundaries`). As torch ops they took
~10 and ~25 launches of 1-4 us kernels, each with more host time than GPU time; on the H100 (run 7,
973M bf16 scores) the GPU waited for that host work before and after the window pass. Here each is one
Triton program (tens of microseconds of GPU time on ~30K tiles; one launch of host time; the
column sums of the window pass's counts stay a torch reduction, which uses every SM).

Both have plain-PyTorch references beside them (:func:`lows_from_sample_reference`,
:func:`boundaries_reference`), which the tests compare them with.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SAMPLE_BINS = 65536  # the sample's histogram (allo_kernels.radix_window.sample)
# False: the plain-PyTorch references do the work instead (the glue these kernels replaced; bench_select
# times both on a GPU, until one is measured better)
USE_KERNELS = True


@triton.jit
def _lows_kernel(hist_ptr, out_ptr, k0, k1, SAMPLES: tl.constexpr, OFFSET: tl.constexpr, TWO: tl.constexpr,
                 NBINS: tl.constexpr, BLOCK: tl.constexpr):
    # the estimate for k is the largest bin whose weight at or above it reaches k * SAMPLES: those bins are
    # a prefix of the bins (the weight at or above b does not grow with b), so the estimate is their count
    # minus one. One pass from the top bin down, the weight above the block carried
    lanes = tl.arange(0, BLOCK)
    # tl.cast, not .to: the JIT passes an int argument equal to 1 as a Python constant, which has no .to
    # (a GPU-only failure: the interpreter does not specialize; every k == 1 failed to compile on the H100)
    t0 = tl.cast(k0, tl.int64) * SAMPLES  # (k of a large model times SAMPLES overflows int32)
    t1 = tl.cast(k1, tl.int64) * SAMPLES
    carry = tl.zeros([], dtype=tl.int64)
    n0 = tl.zeros([], dtype=tl.int64)
    n1 = tl.zeros([], dtype=tl.int64)
    for i in range(0, NBINS // BLOCK):
        h = tl.load(hist_ptr + (NBINS - BLOCK - i * BLOCK) + lanes)
        total = tl.sum(h, axis=0)
        at_or_above = carry + total - (tl.cumsum(h, axis=0) - h)
        n0 += tl.sum((at_or_above >= t0).to(tl.int64), axis=0)
        if TWO:
            n1 += tl.sum((at_or_above >= t1).to(tl.int64), axis=0)
        carry += total
    # bin b is key b - NBINS // 2; the window starts OFFSET keys below the estimate
    tl.store(out_ptr, n0 - 1 - NBINS // 2 - OFFSET)
    if TWO:
        tl.store(out_ptr + 1, n1 - 1 - NBINS // 2 - OFFSET)


def lows_from_sample(hist: torch.Tensor, ks, samples: int, bits: int) -> torch.Tensor:
    """For 16-bit keys, per boundary ``k`` (one or two): the low end of a window of ``2**bits`` keys around
    the sample's estimate of the k-th largest key (the largest key whose weight at or above it reaches
    ``k``; ``hist``: the sample's int64 [65536] histogram, ``samples`` keys per tile). int64
    [len(ks)] on the histogram's device; nothing waits for the GPU."""
    if not 1 <= len(ks) <= 2 or hist.shape != (SAMPLE_BINS,) or hist.dtype != torch.int64:
        raise ValueError(f"radix_boundary.lows_from_sample: {len(ks)} boundaries over a {hist.dtype} "
                         f"{tuple(hist.shape)} histogram; expected 1 or 2 over int64 ({SAMPLE_BINS},)")
    if not USE_KERNELS:
        return lows_from_sample_reference(hist, ks, samples, bits)
    out = torch.empty(len(ks), dtype=torch.int64, device=hist.device)
    _lows_kernel[(1,)](hist, out, int(ks[0]), int(ks[-1]), SAMPLES=samples, OFFSET=(1 << bits) // 2 - 1,
                       TWO=len(ks) == 2, NBINS=SAMPLE_BINS, BLOCK=4096, num_warps=8)
    return out


def lows_from_sample_reference(hist: torch.Tensor, ks, samples: int, bits: int) -> torch.Tensor:
    """Plain-PyTorch :func:`lows_from_sample` (no wait either: ~7 small torch ops)."""
    c = hist.cumsum(0)
    room = torch.cat([c[-1:] - k * samples for k in ks])
    b = torch.searchsorted(c - hist, room, right=True) - 1
    return b - SAMPLE_BINS // 2 - ((1 << bits) // 2 - 1)


@triton.jit
def _window_boundary(acc, cols, k, low, base, BINS: tl.constexpr):
    """One boundary from its window's column sums (``acc``: every column's sum, int64 [CP]; the window's
    bins from column ``base``, then the count above it): (key, take, ok, the key's bin)."""
    j = tl.arange(0, BINS)
    in_window = (cols[None, :] >= base + j[:, None]) & (cols[None, :] < base + BINS)
    above = tl.sum(tl.where(cols == base + BINS, acc, 0), axis=0)
    # elements at or above each bin's key (bin j is key low + j): non-increasing in j
    at_or_above = above + tl.sum(tl.where(in_window, acc[None, :], 0), axis=1)
    hist = tl.sum(tl.where(cols[None, :] == base + j[:, None], acc[None, :], 0), axis=1)
    jk = tl.sum((at_or_above >= k).to(tl.int64), axis=0) - 1  # the largest bin reaching k; -1 when none does
    ok = (above < k) & (jk >= 0)
    jk = tl.maximum(jk, 0)
    take = k - tl.sum(tl.where(j == jk, at_or_above - hist, 0), axis=0)  # k minus the elements above the key
    return low + jk, take, ok, jk


@triton.jit
def _boundaries_kernel(tiles_ptr, counts_ptr, ntiles, lows_ptr, low0, low1, base0, base1, k0, k1, bounds_ptr,
                       ties_ptr, flags_ptr, C: tl.constexpr, CP: tl.constexpr, BINS: tl.constexpr, TWO: tl.constexpr,
                       LOWS_ON_DEVICE: tl.constexpr, CHECK_POSITIVE: tl.constexpr, TIE_ROWS: tl.constexpr):
    cols = tl.arange(0, CP)
    k0 = tl.cast(k0, tl.int64)  # (not .to: a k of 1 arrives as a Python constant, see _lows_kernel)
    k1 = tl.cast(k1, tl.int64)
    acc = tl.load(counts_ptr + cols, mask=cols < C, other=0)  # every column's sum over the tiles
    if LOWS_ON_DEVICE:
        low0 = tl.load(lows_ptr)
        if TWO:
            low1 = tl.load(lows_ptr + 1)
    key0, take0, ok, j0 = _window_boundary(acc, cols, k0, low0, base0, BINS)
    if CHECK_POSITIVE:  # the window pass compared raw bits, which assumes every window above zero
        ok = ok & (low0 > 0)
    if TWO:
        key1, take1, ok1, j1 = _window_boundary(acc, cols, k1, low1, base1, BINS)
        ok = ok & ok1
        if CHECK_POSITIVE:
            ok = ok & (low1 > 0)
    else:  # no exclusion band: its columns are the first boundary's (not read by the write pass)
        key1, take1, j1, base1 = key0, take0, j0, base0
    tl.store(bounds_ptr, key0)
    tl.store(bounds_ptr + 1, take0)
    tl.store(bounds_ptr + 2, key1)
    tl.store(bounds_ptr + 3, take1)
    tl.store(flags_ptr, ok.to(tl.int64))
    tl.store(flags_ptr + 1, tl.sum(tl.where(cols == C - 1, acc, 0), axis=0))  # tiles with a non-finite score
    # each tile's first tie rank: an exclusive prefix sum of the tiles' counts of the key (tiles are in
    # source order, the documented tie order), and the count itself
    carry0 = tl.zeros([], dtype=tl.int64)
    carry1 = tl.zeros([], dtype=tl.int64)
    for r0 in range(0, ntiles, TIE_ROWS):
        rows = r0 + tl.arange(0, TIE_ROWS)
        m = rows < ntiles
        row = rows.to(tl.int64)
        x0 = tl.load(tiles_ptr + row * C + base0 + j0, mask=m, other=0).to(tl.int64)
        x1 = tl.load(tiles_ptr + row * C + base1 + j1, mask=m, other=0).to(tl.int64)
        tl.store(ties_ptr + row * 4, carry0 + tl.cumsum(x0, axis=0) - x0, mask=m)
        tl.store(ties_ptr + row * 4 + 1, x0, mask=m)
        tl.store(ties_ptr + row * 4 + 2, carry1 + tl.cumsum(x1, axis=0) - x1, mask=m)
        tl.store(ties_ptr + row * 4 + 3, x1, mask=m)
        carry0 += tl.sum(x0, axis=0)
        carry1 += tl.sum(x1, axis=0)


def _check_boundaries_args(tiles, bits, ks, windows, lows, what):
    bins = 1 << bits
    if tiles.dim() != 2 or tiles.shape[1] != 2 * (bins + 1) + 1 or tiles.dtype != torch.int32:
        raise ValueError(f"radix_boundary.{what}: tiles {tiles.dtype} {tuple(tiles.shape)}; expected int32 "
                         f"[tiles, {2 * (bins + 1) + 1}] (window_tile_counts with 2**{bits} bins)")
    if not 1 <= len(ks) <= 2 or len(windows) != len(ks) or len(lows) != len(ks) or not set(windows) <= {0, 1}:
        raise ValueError(f"radix_boundary.{what}: {len(ks)} boundaries with windows {list(windows)} and "
                         f"{len(lows)} lows; expected 1 or 2 of each, windows 0 or 1")


def boundaries(tiles: torch.Tensor, bits: int, ks, windows, lows, *, check_positive: bool = False):
    """The boundaries from the window pass's per-tile counts (``tiles``:
    :func:`allo_kernels.radix_window.window_tile_counts`, windows of ``2**bits`` single keys), all on the
    device, no wait. Boundary ``i`` (``ks[i]``, one or two: the top k, then the exclusion band's) is in
    window ``windows[i]`` (0 or 1), whose low end is ``lows[i]`` (ints, or an int64 tensor on the device).

    Returns ``(bounds, tile_ties, flags)``: ``bounds`` int64 [4] = (key, take) of each boundary (the
    first one's again when there is one), ``take`` the number of elements on the key in the top k;
    ``tile_ties`` int64 [tiles, 4] = per tile, for each boundary, the tie rank of its first element on
    the key and its count of them (:func:`allo_kernels.radix_blocked.write_band_ranked`'s operands);
    ``flags`` int64 [2] = (1 when every key is inside its window and, with ``check_positive``, every
    window above zero; else 0 and the rest is meaningless, the number of tiles holding a non-finite
    score)."""
    _check_boundaries_args(tiles, bits, ks, windows, lows, "boundaries")
    if not USE_KERNELS:
        return boundaries_reference(tiles, bits, ks, windows, lows, check_positive=check_positive)
    bins = 1 << bits
    ncols = tiles.shape[1]
    ntiles = tiles.shape[0]
    device = tiles.device
    # the column sums by torch (a reduction over every SM; one program would take ~100 us for 30K tiles)
    counts = tiles.sum(0, dtype=torch.int64)
    out = torch.empty(4 + 4 * ntiles + 2, dtype=torch.int64, device=device)  # one allocation
    bounds, tile_ties, flags = out[:4], out[4:4 + 4 * ntiles].view(ntiles, 4), out[4 + 4 * ntiles:]
    on_device = isinstance(lows, torch.Tensor)
    low0, low1 = (0, 0) if on_device else (int(lows[0]), int(lows[-1]))
    bases = [w * (bins + 1) for w in windows]
    _boundaries_kernel[(1,)](tiles, counts, ntiles, lows if on_device else out, low0, low1, bases[0], bases[-1],
                             int(ks[0]), int(ks[-1]), bounds, tile_ties, flags, C=ncols,
                             CP=triton.next_power_of_2(ncols), BINS=bins, TWO=len(ks) == 2, LOWS_ON_DEVICE=on_device,
                             CHECK_POSITIVE=check_positive, TIE_ROWS=4096, num_warps=8)
    return bounds, tile_ties, flags


def boundaries_reference(tiles: torch.Tensor, bits: int, ks, windows, lows, *, check_positive: bool = False):
    """Plain-PyTorch :func:`boundaries` (the same results; only the meaningful ones when a key is outside
    its window). Like the kernel it never waits for the GPU: ~25 small torch ops, the device path's glue
    before the kernel (bench_select times both: :data:`USE_KERNELS`)."""
    _check_boundaries_args(tiles, bits, ks, windows, lows, "boundaries_reference")
    bins = 1 << bits
    counts = tiles.sum(0, dtype=torch.int64)
    on_device = isinstance(lows, torch.Tensor)
    found, oks = [], []
    for i, (k, w) in enumerate(zip(ks, windows)):
        # 1-element tensors, which index without a synchronization where a 0-d index would be read back
        low = lows[i:i + 1] if on_device else int(lows[i])
        base = w * (bins + 1)
        hist, above = counts[base:base + bins], counts[base + bins:base + bins + 1]
        # elements at or above each bin's key (bin j is key low + j): non-increasing in j
        at_or_above = above + hist.flip(0).cumsum(0).flip(0)
        j = (at_or_above >= k).sum(0, keepdim=True) - 1  # the largest bin reaching k; -1 when none does
        oks.append((above < k) & (j >= 0))
        if check_positive:
            oks.append(low > 0 if on_device else torch.full_like(j, int(low) > 0, dtype=torch.bool))
        j = j.clamp(min=0)
        take = k - at_or_above.index_select(0, j) + hist.index_select(0, j)  # k minus the elements above the key
        ties = tiles.index_select(1, base + j).view(-1).to(torch.int64)
        found.append((low + j, take, ties.cumsum(0) - ties, ties))
    if len(found) == 1:  # no exclusion band: its columns are the first boundary's
        found.append(found[0])
    (key0, take0, run0, ties0), (key1, take1, run1, ties1) = found
    flags = torch.cat([torch.cat(oks).all().long().view(1), counts[-1:]])
    return torch.cat([key0, take0, key1, take1]), torch.stack([run0, ties0, run1, ties1], 1), flags
