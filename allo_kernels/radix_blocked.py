"""Radix selection with block-local histograms and one launch per pass over all tensors (Triton).

The ``blocked`` variant of :mod:`allo_kernels.radix_select` (same keys, same results). It replaces
the two costs of the ``atomic`` variant on a GPU:

* one global atomic per element into a 65536-bin histogram: here the key is split into small digits
  (16-bit keys: 6 + 5 + 5 bits; 32-bit keys: 6 + 6 + 5 + 5 + 5 + 5), each program builds the histogram of
  its tile (``tl.histogram``) and then adds it to the global histogram with one atomic per non-empty
  bin. Pass ``i > 0`` counts only the elements whose higher digits equal the prefix found so far (two
  prefixes at once when an exclusion band needs them);
* one launch per tensor per pass: a launch covers every tensor of a dtype group (usually all of
  them), through an address table and a tile table (:mod:`allo_kernels.multi_tensor`).

Why such small digits (measured on an H100, 2026-11-26, 973M bf16 scores, ``benchmarks/profile_gpu.py``):
``tl.histogram`` builds a warp's histogram from one ballot per bit of the bin index, then each lane
popcounts the bins it owns: about ``(bins / 32 + 1) x log2(bins)`` warp instructions per 32
elements. With 8-bit digits (256 bins) that made each pass compute-bound at 3.8 ms (twice the
0.65 ms it takes to read the scores), and launch sizes or warps changed nothing (7.8-9.4 ms for
the two passes). A 5-bit digit costs ~10 and a 6-bit one ~18 instructions per 32 elements against
72 for 8 bits, so the passes were predicted to run near the speed of reading the scores (~0.65-0.95
ms). Measured on the same H100 (run 2): 2.27 ms per pass, 6.8 ms of kernels for the three passes
against 7.6 ms for two 8-bit ones. So the instruction count was not the whole cost; what else bounds a
pass (the loads of a program's 32 steps are not pipelined, say) is for the next GPU session to find
with a profiler.

The window pass that starts the default search, and the sample it comes from, are in
:mod:`allo_kernels.radix_window`; they share this module's tables and step helpers.

Ties. The last pass can keep one histogram row per tensor (``tensors x bins`` counters, capped by
``PER_TENSOR_BYTES``): the threshold key's count per tensor then comes for free, so no counting pass
is needed to order ties across tensors. The (at most two) tensors where a threshold cuts through
equal scores are then read once more to count the ties per tile; the write pass ranks the ties of a
tile with a prefix sum (``tl.cumsum``) from the tile's offset.

Extra memory: ``O(bins x prefixes + tiles + tensors)`` and the per-tensor rows of the last pass
(<= ``PER_TENSOR_BYTES``); scores are never concatenated. For 973M scores a few hundred KB
(histograms of <= 64 bins, the per-tensor rows, a tile table of 4 bytes per 32768 scores). The loads are 16-byte vectors only when
every tensor of a launch is 16-byte aligned (checked; a misaligned view makes its launch use 2-byte
loads, correct but slower).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .multi_tensor import tile_layout, upload_table
from .radix_select import _bits, _keys_of, _operands

DIGITS = {False: (6, 5, 5), True: (6, 6, 5, 5, 5, 5)}  # bits per pass, most significant first; sum = key bits
TILE = 32768  # elements per program: global atomics per pass <= (elements / TILE) x bins
BLOCK = 1024  # elements per step inside a tile
NUM_WARPS = 4
# software-pipelining depth of the tile loops (None: Triton's default): a knob for profile_gpu.py's sweep
# (whether loads issued earlier speed up the passes is not measured yet)
NUM_STAGES = None
PER_TENSOR_BYTES = 8 << 20  # largest per-tensor histogram of the last pass; beyond it, a counting pass
_NCOL = 8  # table columns: x, y, numel, first tile, source index, out, ties limit (hi), ties limit (ex)
NO_LIMIT = 1 << 62  # "every tied element of this tensor is taken"

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def digits(key32: bool) -> tuple:
    return DIGITS[key32]


def nonfinite_edge(key32: bool, dtype: torch.dtype) -> int:
    """The smallest key magnitude of +-inf/NaN: keys >= edge or < -edge are not finite."""
    if key32:
        return 0x7F800000
    return 0x7F80 if dtype == torch.bfloat16 else 0x7C00


@triton.jit
def _row(table_ptr, tile_tensor_ptr, X_T: tl.constexpr, Y_T: tl.constexpr, ALIGNED: tl.constexpr,
         TILE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's table row, typed pointers, numel, first element, and how many elements of its
    tile are in whole steps of BLOCK (``full``) or in the tail (``count - full``)."""
    p = tl.program_id(0)
    row = table_ptr + tl.load(tile_tensor_ptr + p).to(tl.int64) * 8
    x = tl.load(row + 0).to(tl.pointer_type(X_T))
    y = tl.load(row + 1).to(tl.pointer_type(Y_T))
    if ALIGNED:
        # addresses from a table carry no alignment: without this hint every load is a 2-byte one
        x = tl.multiple_of(x, 16)
        y = tl.multiple_of(y, 16)
    n = tl.load(row + 2)
    start = tl.multiple_of((p - tl.load(row + 3)) * TILE, TILE)
    count = tl.minimum(n - start, TILE)
    return row, x, y, n, start, count, count // BLOCK * BLOCK


@triton.jit
def _step_keys(x, y, base, n, IS_DIFF: tl.constexpr, KEY32: tl.constexpr, X_BF16: tl.constexpr,
               Y_BF16: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offs, m, _, key = _step_scores(x, y, base, n, IS_DIFF, KEY32, X_BF16, Y_BF16, False, MASKED, BLOCK)
    return offs, m, key


@triton.jit
def _step_scores(x, y, base, n, IS_DIFF: tl.constexpr, KEY32: tl.constexpr, X_BF16: tl.constexpr,
                 Y_BF16: tl.constexpr, POSITIVE: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """(offsets, lane mask, mask for the comparisons, keys) of a step, as :func:`_step_keys` gives them,
    or with ``POSITIVE`` (a pass whose boundaries are all above zero) the scores' raw bits: they order
    every key above zero like the keys do, while negative scores, zeros and masked lanes (read as 0)
    have bits <= 0, below any such boundary either way. That saves the key transform and the lane mask
    in the comparisons (the mask for them is all true): a pass over 973M scores measured ~3.5x the
    time it takes to read them (H100, 2026-11-26), so passes are taken to be bound by integer
    instructions per element."""
    offs = base + tl.arange(0, BLOCK)
    if MASKED:
        m = offs < n
    else:
        # whole steps have a constant mask, so the loads can be vectorized
        m = tl.full([BLOCK], 1, tl.int1)
    bits = _bits(x, y, offs, m, IS_DIFF, KEY32, X_BF16, Y_BF16)
    if POSITIVE:
        return offs, m, tl.full([BLOCK], 1, tl.int1), bits
    return offs, m, m, _keys_of(bits, KEY32)


@triton.jit
def _hist_step(x, y, base, n, h0, h1, bad, prefix0, prefix1, edge, IS_DIFF: tl.constexpr, KEY32: tl.constexpr,
               X_BF16: tl.constexpr, Y_BF16: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
               FIRST: tl.constexpr, TWO: tl.constexpr, POSITIVE: tl.constexpr, MASKED: tl.constexpr,
               BLOCK: tl.constexpr):
    # POSITIVE (prefix passes whose prefixes are all above zero): raw bits, see _step_scores
    _, m, valid, key = _step_scores(x, y, base, n, IS_DIFF, KEY32, X_BF16, Y_BF16, POSITIVE, MASKED, BLOCK)
    BINS: tl.constexpr = 1 << BITS
    if FIRST:
        # the top digit is signed (the key's order is the signed order): shift it to [0, BINS)
        h0 += tl.histogram((key >> SHIFT) + (BINS // 2), BINS, mask=m)
        bad += (m & ((key >= edge) | (key < -edge))).to(tl.int32)
    else:
        digit = (key >> SHIFT) & (BINS - 1)
        high = key >> (SHIFT + BITS)
        h0 += tl.histogram(digit, BINS, mask=valid & (high == prefix0))
        if TWO:
            h1 += tl.histogram(digit, BINS, mask=valid & (high == prefix1))
    return h0, h1, bad


@triton.jit
def _blocked_hist_kernel(table_ptr, tile_tensor_ptr, hist_ptr, bad_ptr, prefix0, prefix1, edge,
                         X_T: tl.constexpr, Y_T: tl.constexpr, IS_DIFF: tl.constexpr, KEY32: tl.constexpr,
                         X_BF16: tl.constexpr, Y_BF16: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
                         FIRST: tl.constexpr, TWO: tl.constexpr, POSITIVE: tl.constexpr, PER_TENSOR: tl.constexpr,
                         ALIGNED: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    row, x, y, n, start, count, full = _row(table_ptr, tile_tensor_ptr, X_T, Y_T, ALIGNED, TILE, BLOCK)
    BINS: tl.constexpr = 1 << BITS
    h0 = tl.zeros([BINS], dtype=tl.int32)
    h1 = tl.zeros([BINS], dtype=tl.int32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(0, full, BLOCK):
        h0, h1, bad = _hist_step(x, y, start + off, n, h0, h1, bad, prefix0, prefix1, edge, IS_DIFF, KEY32, X_BF16,
                                 Y_BF16, SHIFT, BITS, FIRST, TWO, POSITIVE, False, BLOCK)
    if full < count:
        h0, h1, bad = _hist_step(x, y, start + full, n, h0, h1, bad, prefix0, prefix1, edge, IS_DIFF, KEY32, X_BF16,
                                 Y_BF16, SHIFT, BITS, FIRST, TWO, POSITIVE, True, BLOCK)
    bins = tl.arange(0, BINS)
    if PER_TENSOR:
        out = hist_ptr + tl.load(row + 4) * (2 * BINS)
    else:
        out = hist_ptr
    # one global atomic per non-empty bin of the tile
    tl.atomic_add(out + bins, h0.to(tl.int64), mask=h0 > 0, sem="relaxed")
    if TWO:
        tl.atomic_add(out + BINS + bins, h1.to(tl.int64), mask=h1 > 0, sem="relaxed")
    if FIRST:
        nbad = tl.sum(bad, axis=0).to(tl.int64)
        tl.atomic_add(bad_ptr, nbad, mask=nbad > 0, sem="relaxed")


@triton.jit
def _count_step(x, y, base, n, c0, c1, key0, key1, IS_DIFF: tl.constexpr, KEY32: tl.constexpr, X_BF16: tl.constexpr,
                Y_BF16: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offs, m, key = _step_keys(x, y, base, n, IS_DIFF, KEY32, X_BF16, Y_BF16, MASKED, BLOCK)
    return c0 + (m & (key == key0)).to(tl.int32), c1 + (m & (key == key1)).to(tl.int32)


@triton.jit
def _blocked_count_kernel(table_ptr, tile_tensor_ptr, counts_ptr, key0, key1, X_T: tl.constexpr, Y_T: tl.constexpr,
                          IS_DIFF: tl.constexpr, KEY32: tl.constexpr, X_BF16: tl.constexpr, Y_BF16: tl.constexpr,
                          ALIGNED: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    # per tile: how many elements have key0 and key1 (every tile writes its own slots: no atomics)
    row, x, y, n, start, count, full = _row(table_ptr, tile_tensor_ptr, X_T, Y_T, ALIGNED, TILE, BLOCK)
    c0 = tl.zeros([BLOCK], dtype=tl.int32)
    c1 = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(0, full, BLOCK):
        c0, c1 = _count_step(x, y, start + off, n, c0, c1, key0, key1, IS_DIFF, KEY32, X_BF16, Y_BF16, False, BLOCK)
    if full < count:
        c0, c1 = _count_step(x, y, start + full, n, c0, c1, key0, key1, IS_DIFF, KEY32, X_BF16, Y_BF16, True, BLOCK)
    p = tl.program_id(0).to(tl.int64)
    tl.store(counts_ptr + 2 * p, tl.sum(c0, axis=0).to(tl.int64))
    tl.store(counts_ptr + 2 * p + 1, tl.sum(c1, axis=0).to(tl.int64))


@triton.jit
def _taken(key, m, bkey, limit, run, CUT: tl.constexpr):
    # in the top k of a boundary: above its key, or tied with it and ranked below this tensor's limit
    eq = m & (key == bkey)
    if CUT:
        e = eq.to(tl.int64)
        rank = run + tl.cumsum(e, axis=0) - e
        tie = eq & (rank < limit)
        run += tl.sum(e, axis=0)
    else:
        tie = eq & (limit > 0)
    return (key > bkey) | tie, run


@triton.jit
def _write_step(x, y, out, base, n, run_hi, run_ex, key_hi, key_ex, lim_hi, lim_ex, IS_DIFF: tl.constexpr,
                KEY32: tl.constexpr, X_BF16: tl.constexpr, Y_BF16: tl.constexpr, HAS_HI: tl.constexpr,
                HAS_EX: tl.constexpr, CUT: tl.constexpr, POSITIVE: tl.constexpr, MASKED: tl.constexpr,
                BLOCK: tl.constexpr):
    offs, m, valid, key = _step_scores(x, y, base, n, IS_DIFF, KEY32, X_BF16, Y_BF16, POSITIVE, MASKED, BLOCK)
    if HAS_HI:
        keep, run_hi = _taken(key, valid, key_hi, lim_hi, run_hi, CUT)
    else:
        keep = key != key
    if HAS_EX:
        excluded, run_ex = _taken(key, valid, key_ex, lim_ex, run_ex, CUT)
        keep = keep & ~excluded
    tl.store(out + offs, keep.to(tl.uint8), mask=m)
    return run_hi, run_ex


@triton.jit
def _write_tile(x, y, out, start, n, count, full, run_hi, run_ex, key_hi, key_ex, lim_hi, lim_ex,
                IS_DIFF: tl.constexpr, KEY32: tl.constexpr, X_BF16: tl.constexpr, Y_BF16: tl.constexpr,
                HAS_HI: tl.constexpr, HAS_EX: tl.constexpr, CUT: tl.constexpr, POSITIVE: tl.constexpr,
                BLOCK: tl.constexpr):
    for off in range(0, full, BLOCK):
        run_hi, run_ex = _write_step(x, y, out, start + off, n, run_hi, run_ex, key_hi, key_ex, lim_hi, lim_ex,
                                     IS_DIFF, KEY32, X_BF16, Y_BF16, HAS_HI, HAS_EX, CUT, POSITIVE, False, BLOCK)
    if full < count:
        run_hi, run_ex = _write_step(x, y, out, start + full, n, run_hi, run_ex, key_hi, key_ex, lim_hi, lim_ex,
                                     IS_DIFF, KEY32, X_BF16, Y_BF16, HAS_HI, HAS_EX, CUT, POSITIVE, True, BLOCK)


@triton.jit
def _blocked_write_kernel(table_ptr, tile_tensor_ptr, prefix_ptr, key_hi, key_ex, X_T: tl.constexpr,
                          Y_T: tl.constexpr, IS_DIFF: tl.constexpr, KEY32: tl.constexpr, X_BF16: tl.constexpr,
                          Y_BF16: tl.constexpr, HAS_HI: tl.constexpr, HAS_EX: tl.constexpr, CUT: tl.constexpr,
                          POSITIVE: tl.constexpr, ALIGNED: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    row, x, y, n, start, count, full = _row(table_ptr, tile_tensor_ptr, X_T, Y_T, ALIGNED, TILE, BLOCK)
    out = tl.load(row + 5).to(tl.pointer_type(tl.uint8))
    if ALIGNED:
        out = tl.multiple_of(out, 16)
    lim_hi = tl.load(row + 6)
    lim_ex = tl.load(row + 7)
    p = tl.program_id(0).to(tl.int64)
    run_hi = tl.zeros([], dtype=tl.int64)
    run_ex = tl.zeros([], dtype=tl.int64)
    if CUT:
        # ties of this tensor before this tile (for the tie rank inside a cut tensor)
        run_hi += tl.load(prefix_ptr + 2 * p)
        run_ex += tl.load(prefix_ptr + 2 * p + 1)
    _write_tile(x, y, out, start, n, count, full, run_hi, run_ex, key_hi, key_ex, lim_hi, lim_ex, IS_DIFF, KEY32,
                X_BF16, Y_BF16, HAS_HI, HAS_EX, CUT, POSITIVE, BLOCK)


@triton.jit
def _blocked_write_ranked_kernel(table_ptr, tile_tensor_ptr, ties_ptr, bounds_ptr, X_T: tl.constexpr,
                                 Y_T: tl.constexpr, IS_DIFF: tl.constexpr, KEY32: tl.constexpr,
                                 X_BF16: tl.constexpr, Y_BF16: tl.constexpr, HAS_HI: tl.constexpr,
                                 HAS_EX: tl.constexpr, POSITIVE: tl.constexpr, CUT_TILES: tl.constexpr,
                                 ALIGNED: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """The write pass with the boundaries in device memory: ``bounds_ptr`` = [key_hi, take_hi, key_ex,
    take_ex] (take: how many elements equal to the key are in the top k, over all tensors), and per
    tile ``ties_ptr[4 p:4 p + 4]`` = [global tie rank of the tile's first element equal to key_hi, its
    count of them, the same for key_ex]. A tile whose ties a boundary cuts ranks them (prefix sums);
    every other tile takes its ties whole or not at all. Two launches over the same tiles: the tiles
    no boundary cuts (``CUT_TILES`` False: nearly all of them, a kernel with few registers), then the
    (one or two) cut ones; each program of a launch skips the other kind's tiles."""
    row, x, y, n, start, count, full = _row(table_ptr, tile_tensor_ptr, X_T, Y_T, ALIGNED, TILE, BLOCK)
    p = tl.program_id(0).to(tl.int64)
    take_hi = tl.load(bounds_ptr + 1)
    take_ex = tl.load(bounds_ptr + 3)
    run_hi = tl.load(ties_ptr + 4 * p)
    run_ex = tl.load(ties_ptr + 4 * p + 2)
    cut = tl.zeros([], dtype=tl.int1)
    if HAS_HI:
        cut = cut | ((run_hi < take_hi) & (run_hi + tl.load(ties_ptr + 4 * p + 1) > take_hi))
    if HAS_EX:
        cut = cut | ((run_ex < take_ex) & (run_ex + tl.load(ties_ptr + 4 * p + 3) > take_ex))
    if cut == CUT_TILES:
        out = tl.load(row + 5).to(tl.pointer_type(tl.uint8))
        if ALIGNED:
            out = tl.multiple_of(out, 16)
        # keys fit in int32: compared with the int32 keys (or raw bits) of the scores, not widened
        key_hi = tl.load(bounds_ptr + 0).to(tl.int32)
        key_ex = tl.load(bounds_ptr + 2).to(tl.int32)
        if CUT_TILES:
            lim_hi, lim_ex = take_hi, take_ex
        else:
            # the tile's ties are all before a boundary's take (all in) or all after it (all out)
            lim_hi, lim_ex = (run_hi < take_hi).to(tl.int64), (run_ex < take_ex).to(tl.int64)
        _write_tile(x, y, out, start, n, count, full, run_hi, run_ex, key_hi, key_ex, lim_hi, lim_ex, IS_DIFF, KEY32,
                    X_BF16, Y_BF16, HAS_HI, HAS_EX, CUT_TILES, POSITIVE, BLOCK)


class Sources:
    """The operands of every source, read once per call (or once per selection: :func:`histogram`
    and :func:`tile_counts` take one in place of the list): the launch group of each non-empty
    source, and an int64 table with one row per source in the launch table's columns (x, y, numel,
    source index; the first tile and the write columns are filled per launch)."""

    __slots__ = ("rows", "group_of", "device", "_all_groups")

    def __init__(self, sources):
        cols, group_of = [], []  # (x address, y address, numel) per source
        tensor = torch.Tensor
        for s in sources:
            # (~150 sources, before the first launch: plain tensors skip _operands' attribute probe)
            x, y, diff = (s, s, False) if type(s) is tensor else _operands(s)
            n = x.numel()
            if diff:
                cols.append((x.data_ptr(), y.data_ptr(), n))
                group_of.append((x.dtype, y.dtype, True) if n else None)
            else:  # a score tensor: y is x
                p = x.data_ptr()
                cols.append((p, p, n))
                group_of.append((x.dtype, x.dtype, False) if n else None)
        rows = np.zeros((len(cols), _NCOL), dtype=np.int64)
        if cols:
            rows[:, :3] = cols
            rows[:, 4] = np.arange(len(cols))
        # one launch per (x dtype, y dtype, AbsDiff) group; empty tensors get none
        self.group_of = group_of
        self.rows = rows
        self.device = sources[0].device if len(sources) else None
        self._all_groups = None

    def __len__(self):
        return len(self.group_of)

    def groups(self, members=None) -> dict:
        """Source indices (of ``members``, default all) per launch group, in order. (For all sources:
        computed once; every pass of a selection asks. Not to be modified.)"""
        if members is None and self._all_groups is not None:
            return self._all_groups
        out = {}
        for i in range(len(self.group_of)) if members is None else members:
            g = self.group_of[i]
            if g is not None:
                out.setdefault(g, []).append(i)
        if members is None:
            self._all_groups = out
        return out


def _prepared(sources) -> Sources:
    return sources if isinstance(sources, Sources) else Sources(sources)


_tables: dict = {}
_tile_rows: dict = {}


def _layout(src: Sources, members, extra=None):
    """(address table on the device, tile rows, aligned) of a launch over ``members`` (``extra``: the
    write columns, int64 [len(members), 3]). Cached by the table's own content (addresses, sizes,
    columns), so it is always valid: the passes of one selection reuse one upload, and the tile rows
    (which depend on the sizes only) are shared by every launch over the same tensors."""
    rows = src.rows[members]  # a copy: filled in below, then owned by the cache
    counts = (rows[:, 2] + (TILE - 1)) // TILE
    rows[:, 3] = np.cumsum(counts) - counts
    if extra is not None:
        rows[:, 5:] = extra
    device = src.device
    key = (str(device), TILE, rows.tobytes())
    hit = _tables.get(key)
    if hit is not None:
        return hit
    sizes = (str(device), TILE, rows[:, 2].tobytes())
    tile_rows = _tile_rows.get(sizes)
    if tile_rows is None:
        tile_rows = tile_layout(rows[:, 2], TILE, device)[0]
        if len(_tile_rows) >= 16:
            _tile_rows.clear()
        _tile_rows[sizes] = tile_rows
    # the vectorization hint holds only if every address of the launch is 16-byte aligned (a view
    # into a larger tensor may not be: then the launch is correct but slower)
    aligned = not (rows[:, [0, 1, 5]] % 16).any()
    if len(_tables) >= 16:  # a few selections' worth; entries are small
        _tables.clear()
    _tables[key] = hit = (upload_table(rows, device), tile_rows, aligned)
    return hit


def _run(kernel, group_key, layout, grid_args, *, block=None, **constexprs):
    """One launch of ``kernel`` over the tiles of a layout from :func:`_layout`."""
    xdt, ydt, diff = group_key
    table, tile_rows, aligned = layout
    block = block or BLOCK
    assert TILE % block == 0, (TILE, block)  # the masked tail step must stay inside its tile
    ntiles = tile_rows.numel()
    if ntiles:
        if NUM_STAGES is not None:
            constexprs["num_stages"] = NUM_STAGES
        kernel[(ntiles,)](table, tile_rows, *grid_args, X_T=_TL[xdt], Y_T=_TL[ydt], IS_DIFF=diff,
                          X_BF16=xdt == torch.bfloat16, Y_BF16=ydt == torch.bfloat16, ALIGNED=aligned, TILE=TILE,
                          BLOCK=block, num_warps=NUM_WARPS, **constexprs)


def hist_block(bits: int) -> int:
    """Elements per histogram step: each ``tl.histogram`` call zeroes and reads back its bins in
    shared memory, so a step has at least two elements per bin to keep that overhead below the
    per-element work (BLOCK for digits of up to 9 bits)."""
    return min(TILE, max(BLOCK, 2 << bits))


def per_tensor_fits(num_sources: int, bits: int) -> bool:
    return num_sources * 2 * (1 << bits) * 8 <= PER_TENSOR_BYTES


def histogram(sources, level: int, prefixes, *, key32: bool, edge: int = 0, per_tensor: bool = False):
    """Histogram of pass ``level`` (digit ``digits(key32)[level]``) over every source (a list, or
    the :class:`Sources` of one, prepared once for all the passes).

    ``level == 0``: the top digit of every key (``prefixes`` ignored); also counts non-finite scores
    (keys beyond ``edge``). ``level > 0``: for each of the one or two ``prefixes``, the digit of the
    keys whose higher bits (``key >> (shift + bits)``) equal the prefix.

    Returns ``(hist [len(prefixes), bins] int64, per [sources, len(prefixes), bins] or None,
    nonfinite int64 [1] or None)`` on the scores' device; ``per`` (the same counts per source) when
    ``per_tensor``.
    """
    bits_list = digits(key32)
    return _histogram(sources, sum(bits_list[level + 1:]), bits_list[level], level == 0, prefixes, key32=key32,
                      edge=edge, per_tensor=per_tensor)


def prefix_histogram(sources, shift: int, bits: int, prefixes, *, key32: bool, per_tensor: bool = False):
    """A pass of any digit: for each of the one or two ``prefixes``, the histogram of
    ``(key >> shift) & (2**bits - 1)`` over the keys with ``key >> (shift + bits) == prefix``. Returns
    ``(hist, per or None)`` as :func:`histogram` does."""
    hist, per, _ = _histogram(sources, shift, bits, False, prefixes, key32=key32, per_tensor=per_tensor)
    return hist, per


def _histogram(sources, shift, bits, first, prefixes, *, key32, edge=0, per_tensor=False):
    bins = 1 << bits
    prefixes = [0] if first else list(prefixes)
    if not 1 <= len(prefixes) <= 2:
        raise ValueError(f"radix_blocked.histogram: {len(prefixes)} prefixes; expected 1 or 2")
    src = _prepared(sources)
    rows = len(src) if per_tensor else 1
    # histograms and the non-finite count zeroed in one buffer (one fill)
    zeroed = torch.zeros(rows * 2 * bins + 1, dtype=torch.int64, device=src.device)
    buf, bad = zeroed[:-1].view(rows, 2, bins), zeroed[-1:]
    p0 = int(prefixes[0])
    p1 = int(prefixes[-1])
    for key, members in src.groups().items():
        _run(_blocked_hist_kernel, key, _layout(src, members), (buf, bad, p0, p1, int(edge)), block=hist_block(bits),
             KEY32=key32, SHIFT=shift, BITS=bits, FIRST=first, TWO=len(prefixes) == 2,
             POSITIVE=not first and min(p0, p1) > 0, PER_TENSOR=per_tensor)
    per = buf[:, :len(prefixes)]
    hist = per.sum(0) if per_tensor else per[0]
    return hist, (per if per_tensor else None), (bad if first else None)


def _count_tiles(src: Sources, group_key, members, k0: int, k1: int, *, key32: bool):
    layout = _layout(src, members)
    counts = torch.empty(layout[1].numel(), 2, dtype=torch.int64, device=src.device)
    _run(_blocked_count_kernel, group_key, layout, (counts, k0, k1), KEY32=key32)
    return counts, layout


def tile_counts(sources, members, keys, *, key32: bool):
    """Per tile of ``members`` (in launch order, per dtype group): counts of ``keys[0]`` and
    ``keys[1]``; returns a list of (group members, counts [tiles, 2], tile rows, address table on the
    device: column 3 is each tensor's first tile, column 4 its source index)."""
    src = _prepared(sources)
    k0, k1 = int(keys[0]), int(keys[-1])
    out = []
    for gkey, group in src.groups(members).items():
        counts, (table, tile_rows, _) = _count_tiles(src, gkey, group, k0, k1, key32=key32)
        out.append((group, counts, tile_rows, table))
    return out


def count_equal(sources, key: int, *, key32: bool) -> list[int]:
    """Number of elements whose key is ``key``, per source (one launch per dtype group, one sync)."""
    if not len(sources):
        return []
    src = _prepared(sources)
    totals = torch.zeros(len(src), dtype=torch.int64, device=src.device)
    for _, counts, tile_rows, table in tile_counts(src, None, (key, key), key32=key32):
        totals.index_add_(0, table[:, 4][tile_rows.long()], counts[:, 0])
    return totals.tolist()


def write_band(sources, outs, key_hi, limits_hi, key_ex, limits_ex, cut, *, key32: bool) -> None:
    """Band masks of ``sources`` into ``outs`` (contiguous bool/uint8 tensors of any shape, each with
    its source's numel).

    An element is kept when it is in the top ``k_hi`` and not in the top ``k_ex``: for a boundary
    with key ``K`` and this tensor's ``limit``, an element is in its top k when ``key > K``, or
    ``key == K`` and its rank among this tensor's elements equal to ``K`` (flat order) is below
    ``limit``. ``key_hi=None`` keeps nothing, ``key_ex=None`` excludes nothing. ``cut[i]``: some
    limit of source ``i`` is strictly between 0 and its tie count (the ties are then ranked;
    otherwise ``limit`` only needs to be 0 or ``>=`` the count).
    """
    src = _prepared(sources)
    n = len(src)
    if len(outs) != n:
        raise ValueError(f"radix_blocked.write_band: {len(outs)} outs for {n} sources; pass one mask per source")
    # the write columns of the launch table: mask address and the two tie limits, per source
    extra = np.empty((n, 3), dtype=np.int64)
    if n:
        extra[:, 0] = [o.data_ptr() for o in outs]
        extra[:, 1] = np.minimum(np.asarray(limits_hi, dtype=np.int64), NO_LIMIT)
        extra[:, 2] = np.minimum(np.asarray(limits_ex, dtype=np.int64), NO_LIMIT)
        sized = np.array([o.numel() for o in outs], dtype=np.int64) == src.rows[:, 2]
        if not sized.all() or not all(o.is_contiguous() for o in outs):
            i = next(i for i, o in enumerate(outs) if not (sized[i] and o.is_contiguous()))
            raise ValueError(f"radix_blocked.write_band: outs[{i}] has {outs[i].numel()} elements (contiguous: "
                             f"{outs[i].is_contiguous()}) for a source of {int(src.rows[i, 2])}; each out must be "
                             "a contiguous tensor with its source's numel")
    scalars = (int(key_hi or 0), int(key_ex or 0))
    # every boundary above zero (scores are usually magnitudes): the kernel compares raw bits
    positive = key_hi is not None and key_hi > 0 and (key_ex is None or key_ex > 0)
    cut = np.asarray(cut, dtype=bool).reshape(-1)
    for cut_launch in (False, True):
        members = np.flatnonzero(cut == cut_launch).tolist()
        if not members:
            continue
        for gkey, group in src.groups(members).items():
            layout = _layout(src, group, extra[group])
            table, tile_rows, _ = layout
            if cut_launch:
                counts, _ = _count_tiles(src, gkey, group, *scalars, key32=key32)
                # exclusive prefix sum of the tile counts, restarted at each tensor's first tile
                excl = counts.cumsum(0) - counts
                prefix = (excl - excl[table[:, 3][tile_rows.long()]]).contiguous()
            else:
                prefix = table  # any int64 tensor: not read when CUT is False
            _run(_blocked_write_kernel, gkey, layout, (prefix, *scalars), KEY32=key32, HAS_HI=key_hi is not None,
                 HAS_EX=key_ex is not None, CUT=cut_launch, POSITIVE=positive)


def write_band_ranked(sources, outs, bounds, tile_ties, *, has_hi: bool, has_ex: bool, positive: bool,
                      key32: bool) -> None:
    """Band masks of ``sources`` (one launch group) into ``outs``, the boundaries read from device
    memory (nothing here waits for the GPU): ``bounds`` int64 [4] = (key_hi, take_hi, key_ex,
    take_ex), ``take`` counting the elements equal to ``key`` that are in the top k over all sources;
    ``tile_ties`` int64 [tiles, 4], per tile in launch order: (tie rank of the tile's first element
    equal to key_hi among all of them, in source then flat order; how many the tile holds; the same
    for key_ex). ``positive``: every boundary present is above zero (raw bits are compared)."""
    src = _prepared(sources)
    groups = src.groups()
    if len(groups) != 1:
        raise ValueError(f"radix_blocked.write_band_ranked: {len(groups)} launch groups; expected one (the tile "
                         "order must be the source order)")
    (gkey, members), = groups.items()
    if len(outs) != len(src):
        raise ValueError(f"radix_blocked.write_band_ranked: {len(outs)} outs for {len(src)} sources; pass one mask "
                         "per source")
    extra = np.zeros((len(members), 3), dtype=np.int64)
    extra[:, 0] = [outs[i].data_ptr() for i in members]
    layout = _layout(src, members, extra)
    if tile_ties.shape != (layout[1].numel(), 4) or bounds.shape != (4,):
        raise ValueError(f"radix_blocked.write_band_ranked: tile_ties {tuple(tile_ties.shape)} and bounds "
                         f"{tuple(bounds.shape)}; expected ({layout[1].numel()}, 4) and (4,)")
    for cut_tiles in (False, True):
        _run(_blocked_write_ranked_kernel, gkey, layout, (tile_ties, bounds), KEY32=key32, HAS_HI=has_hi,
             HAS_EX=has_ex, POSITIVE=positive, CUT_TILES=cut_tiles)
