"""The default GPU selection, finished on the device: the host waits for the GPU once, at the end.

:func:`allo.select.topk.plan` reads every pass's histogram back on the host and then prepares the
write pass: on an H100 (2026-11-27, 973M bf16 scores, top 10%) the search took 3.1 ms and the write
2.5 ms of wall time for 2.1 and 1.1 ms of kernels, the GPU idle while the host worked between the
passes. For 16-bit scores, when every window is single keys, the window pass already determines the
exact thresholds, so here the rest is queued without reading anything back (H100: 3.28 ms against 3.98
ms for the host-read path in run 6, for 1.97 ms of kernels; 2.94 ms in run 7 with the masks allocated
in one call, see :func:`allo.select.topk._new_masks`):

0. the windows: on a large bf16 model (:func:`speculates`) a window of ``2**REGISTER_BITS`` keys
   around the sample's estimate of each threshold, computed on the device
   (:func:`allo.select.sampling.speculative_lows`); otherwise the host reads the sample and sizes the
   windows (:func:`allo.select.sampling.windows`: one more wait), and only windows of single keys
   (``shift`` 0) go on here;
1. the window pass keeps its counts per tile (:func:`allo_kernels.radix_window.window_tile_counts`);
2. a few small torch ops find, per boundary, its key (the bin where the count from the top reaches
   ``k``), ``take`` (how many elements equal to the key are in the top k) and each tile's first tie
   rank (an exclusive prefix sum of the tiles' counts of that key: tiles are in source order, so this
   is the documented tie order);
3. the write pass reads those from device memory
   (:func:`allo_kernels.radix_blocked.write_band_ranked`);
4. the host reads back whether each boundary was inside its window (and, for windows from the device,
   above zero, which the raw-bits comparisons assume) and whether any score was non-finite: the wait.
   A boundary outside its window sends the caller to the general search, which overwrites the masks.

The masks are the general search's, bit for bit (the tests compare both with the reference). Not
taken (the caller runs the general search): ``torch.distributed`` (tie order across ranks), masks
streamed out one by one, scores in more than one launch group (dtypes, or weight deltas mixed with
tensors), float32 scores (32-bit keys: the prefix passes need the host), and host-sized windows wider
than single keys. Extra memory grows with the number of tiles (one per 32768 scores), ~100-300 bytes
each: int32 counts per tile and window bin, int64 tie ranks; ~5 MB for 973M scores (10 MB with
32-bin windows), plus the sample's 0.5 MB histogram.
"""

from __future__ import annotations

import torch

from allo_kernels import radix_blocked as RB
from allo_kernels import radix_window as RW

from . import sampling


def _boundary(counts, tiles, w, bins, low, k):
    """One boundary from window ``w``'s columns, all on the device (no wait; 1-element tensors, which
    index without a synchronization where a 0-d index would be read back): ``(key, take, ok, tie rank
    of each tile's first tied element, each tile's tie count)``. ``counts``: the column sums of
    ``tiles``. ``ok`` is False when the k-th largest key is not in the window (the rest is then
    meaningless)."""
    base = w * (bins + 1)
    hist, above = counts[base:base + bins], counts[base + bins:base + bins + 1]
    # elements at or above each bin's key (bin j is key low + j): non-increasing in j
    at_or_above = above + hist.flip(0).cumsum(0).flip(0)
    j = (at_or_above >= k).sum(0, keepdim=True) - 1  # the largest bin reaching k; -1 when none does
    ok = (above < k) & (j >= 0)
    j = j.clamp(min=0)
    take = k - at_or_above.index_select(0, j) + hist.index_select(0, j)  # k minus the elements above the key
    ties = tiles.index_select(1, base + j).view(-1).to(torch.int64)
    return low + j, take, ok, ties.cumsum(0) - ties, ties


# from this many bf16 scores on, the windows come from the sample on the device (no wait for it): the
# estimate of a large model's thresholds is within a key or two, so a window of 2**REGISTER_BITS keys
# around it holds them; for fewer scores the host reads the sample and sizes the windows
# (sampling.windows). Not fp16: its keys are 8x finer, so at 2^26 scores the estimate's standard
# deviation is ~5 keys (a window of 8 would miss often, and each miss costs a second search)
SPECULATE_MIN_SCORES = 1 << 26


def speculates(n: int, dtype) -> bool:
    """Whether ``n`` scores of ``dtype`` get their windows from the sample on the device."""
    return dtype == torch.bfloat16 and n >= SPECULATE_MIN_SCORES


def band_masks_on_device(sources: dict, search, ks, n: int, *, allocate_masks, what: str):
    """Masks of the band between the top ``ks[0]`` and the top ``ks[1]`` (``ks[1]`` may be 0) over
    ``sources`` (name -> scores; ``search``: their :class:`allo.select.topk._SearchBlocked`), or None
    when this path does not apply or a window missed its boundary: the caller then runs the general
    search. ``allocate_masks()`` returns the masks to write into (called while the window pass runs;
    the caller can reuse them after a None)."""
    from .topk import _name_nonfinite

    src = search.sources
    if ks[0] == 0 or len(src.groups()) != 1:
        return None
    todo = [k for k in ks if k > 0]
    if speculates(n, search.dtype):
        # windows around the sample's estimates, computed on the device; above zero is assumed (scores are
        # usually magnitudes) and checked with the rest
        bits = search.window_ops.REGISTER_BITS
        lows = sampling.speculative_lows(search.window_ops, src, todo, bits)
        positive, checks = True, [(lows > 0).all().view(1)]
        tiles = RW.window_tile_counts(src, lows, bits, key32=search.key32, edge=search.edge, positive=True)
        window_of = [(i, lows[i:i + 1]) for i in range(len(todo))]
    else:
        shift, lows, bits = search.windows(todo, n)
        if shift != 0:
            return None
        windows, positive, checks = sorted(set(lows)), min(lows) > 0, []
        tiles = RW.window_tile_counts(src, windows, bits, key32=search.key32, edge=search.edge)
        window_of = [(windows.index(low), low) for low in lows]
    masks = allocate_masks()  # host work while the GPU runs the window pass
    counts = tiles.sum(0, dtype=torch.int64)
    bins = 1 << bits
    found = [_boundary(counts, tiles, w, bins, low, k) for (w, low), k in zip(window_of, todo)]
    if len(found) == 1:  # no exclusion band: the ex columns are not read
        found.append(found[0])
    (key_hi, take_hi, ok_hi, run_hi, ties_hi), (key_ex, take_ex, ok_ex, run_ex, ties_ex) = found
    bounds = torch.cat([key_hi, take_hi, key_ex, take_ex])
    tile_ties = torch.stack([run_hi, ties_hi, run_ex, ties_ex], 1)
    RB.write_band_ranked(src, masks, bounds, tile_ties, has_hi=True, has_ex=ks[1] > 0, positive=positive,
                         key32=search.key32)
    ok = torch.cat([ok_hi, ok_ex] + checks).all().long()
    ok, bad = torch.cat([ok.view(1), counts[-1:]]).tolist()  # the one wait
    if bad:
        _name_nonfinite(sources, None, what)
    return masks if ok else None
