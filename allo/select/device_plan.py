"""The default GPU selection, finished on the device: the host waits for the GPU once, at the end.

:func:`allo.select.topk.plan` reads every pass's histogram back on the host and then prepares the
write pass: on an H100 (2026-11-27, 973M bf16 scores, top 10%) the search took 3.1 ms and the write
2.5 ms of wall time for 2.1 and 1.1 ms of kernels, the GPU idle while the host worked between the
passes. For 16-bit scores, when every window is single keys, the window pass already determines the
exact thresholds, so here the rest is queued without reading anything back (H100: 3.28 ms against 3.98
ms for the host-read path in run 6, for 1.97 ms of kernels; 2.94 ms in run 7 with the masks allocated
in one call, see :func:`allo.select.topk._new_masks`):

0. the windows: on a large bf16 model (:func:`speculates`) a window of ``2**REGISTER_BITS`` keys
   around the sample's estimate of each threshold, computed on the device in one launch
   (:func:`allo.select.sampling.speculative_lows`); otherwise the host reads the sample and sizes the
   windows (:func:`allo.select.sampling.windows`: one more wait), and only windows of single keys
   (``shift`` 0) go on here;
1. the window pass keeps its counts per tile (:func:`allo_kernels.radix_window.window_tile_counts`);
2. one single-program kernel (:func:`allo_kernels.radix_boundary.boundaries`; ~25 torch ops before,
   whose host time the GPU waited for) finds, per boundary, its key (the bin where the count from the
   top reaches ``k``), ``take`` (how many elements equal to the key are in the top k) and each tile's
   first tie rank (an exclusive prefix sum of the tiles' counts of that key: tiles are in source
   order, so this is the documented tie order);
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
32-bin windows), plus the sample's 0.5 MB histogram (6.9 MB measured in all on the H100, run 7).
"""

from __future__ import annotations

import torch

from allo_kernels import radix_blocked as RB
from allo_kernels import radix_window as RW
from allo_kernels.radix_boundary import boundaries

from . import sampling


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
    speculative = speculates(n, search.dtype)
    if speculative:
        # windows around the sample's estimates, computed on the device; above zero is assumed (scores are
        # usually magnitudes) and checked with the rest
        bits = search.window_ops.REGISTER_BITS
        lows = sampling.speculative_lows(search.window_ops, src, todo, bits)
        positive = True
        tiles = RW.window_tile_counts(src, lows, bits, key32=search.key32, edge=search.edge, positive=True)
        windows = list(range(len(todo)))
    else:
        shift, lows, bits = search.windows(todo, n)
        if shift != 0:
            return None
        distinct, positive = sorted(set(lows)), min(lows) > 0
        tiles = RW.window_tile_counts(src, distinct, bits, key32=search.key32, edge=search.edge)
        windows = [distinct.index(low) for low in lows]
    # queued before the masks' allocation, which is host work while the GPU runs the window pass
    bounds, tile_ties, flags = boundaries(tiles, bits, todo, windows, lows, check_positive=speculative)
    masks = allocate_masks()
    RB.write_band_ranked(src, masks, bounds, tile_ties, has_hi=True, has_ex=ks[1] > 0, positive=positive,
                         key32=search.key32)
    ok, bad = flags.tolist()  # the one wait
    if bad:
        _name_nonfinite(sources, None, what)
    return masks if ok else None
