"""Exact global band selection over many tensors: streaming radix histograms, no concatenation.

Semantics (the contract the tests check against :mod:`allo.select.reference`):

* ``N`` = number of elements over all score tensors (all ranks under ``torch.distributed``).
* ``k(ratio) = floor(ratio * N + 1/2)`` (round half up), computed exactly with the ratio as written
  (its shortest decimal form: 0.29 of 50 elements is 14.5, so 15). The band keeps the elements ranked in
  ``[k(exclude_ratio), k(ratio))`` of the total order below: exactly ``k(ratio) - k(exclude_ratio)``.
* Total order: higher score first; equal scores (compared by value: -0.0 == +0.0, bf16 1.5 == fp32
  1.5) in the order of the tensors in the mapping, then of the flat (row-major) index. Under
  ``torch.distributed`` tensors are ordered by where their name first appears going through ranks
  0, 1, ... and, for a name on several ranks (a sharded parameter), by rank: so dim-0 shards in rank
  order, or a partition of the tensors in rank order, reproduce the single-process selection.
* NaN or infinite scores are an error naming the tensor.

Algorithm: radix passes over the keys (order-preserving integers, see
:mod:`allo_kernels.radix_select`), most significant digit first. Each pass histograms one digit of the
keys whose higher digits equal the threshold's prefix found so far (all reduced across ranks), which
narrows the threshold down; after the last digit the exact threshold key is known, and how many of
the elements equal to it are taken. A last pass writes the masks; when only some of the tied
elements are taken, the first ones in the order above are kept.

Digits: the ``cpu`` backend (C) and the ``atomic`` Triton variant use 16-bit digits (one 65536-bin
histogram pass for 16-bit keys, two for float32 keys). The ``blocked`` Triton variant (the default
on GPU) uses block-local histograms and one launch per pass over all tensors
(:mod:`allo_kernels.radix_blocked`), and starts from a sample (:mod:`allo.select.sampling`): one pass
over the window where the sample puts each threshold (for 16-bit scores usually the exact key), then
prefix passes over 5-6-bit digits for the bits the window left; if a threshold turns out to be
outside its window, it starts over with radix passes from the top digit. When every window is single
keys (16-bit scores on a large model), in one process, the search is finished on the device without
reading the window pass back (:mod:`allo.select.device_plan`). ``blocked-radix`` does the radix
passes only. ``ALLO_SELECT_HISTOGRAM=blocked|blocked-radix|atomic`` (or ``histogram=`` of
:func:`band_masks`) picks the Triton variant; results are identical.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

from allo._backend import resolve_backend

from . import radix_cpu, sampling
from .scores import AbsDiff, iter_chunks, normalize_scores

_TIE_CHUNK = 1 << 20
BINS = 65536  # 16 bits of key per pass (cpu backend and the atomic Triton variant)
HISTOGRAM_VARIANTS = ("blocked", "blocked-radix", "atomic")
HISTOGRAM_ENV = "ALLO_SELECT_HISTOGRAM"
_WRITE_WAVE = 1 << 26  # elements of masks written per launch when they are streamed out one by one
# the blocked Triton search for 16-bit scores finished on the device when it can (allo.select.device_plan);
# False: the thresholds are read back between the passes (benchmarks/bench_select.py times both)
FINISH_ON_DEVICE = True


def histogram_variant(histogram=None) -> str:
    """The Triton selection variant: ``histogram`` if given, else ``$ALLO_SELECT_HISTOGRAM``, else
    ``"blocked"``: one launch per pass over all tensors, a few global atomics per tile instead of one
    per element, and a first pass over the window a sample points to (:mod:`allo.select.sampling`).
    ``"blocked-radix"``: the same kernels, radix passes from the top digit (no sample)."""
    v = histogram if histogram is not None else (os.environ.get(HISTOGRAM_ENV) or "blocked")
    if v not in HISTOGRAM_VARIANTS:
        src = f"histogram={v!r}" if histogram is not None else f"{HISTOGRAM_ENV}={v!r}"
        raise ValueError(f"allo.select: {src} is not a Triton selection variant; expected one of "
                         f"{HISTOGRAM_VARIANTS} ('blocked' is the default)")
    return v


def band_count(ratio: float, n: int) -> int:
    """Number of elements in the top ``ratio`` of ``n``: round half up. Exact: in float arithmetic
    0.29 * 50 is 14.499999999999998, which would round down; the ratio's shortest decimal form
    (``repr``, what the user wrote) times ``n`` is 14.5 exactly."""
    return math.floor(Fraction(repr(float(ratio))) * n + Fraction(1, 2))


def check_ratios(ratio, exclude_ratio, what="select_top"):
    """Both ratios as Python floats (NumPy scalars accepted), or a ValueError naming the bad one."""
    out = []
    for name, r in (("ratio", ratio), ("exclude_ratio", exclude_ratio)):
        if not isinstance(r, numbers.Real) or isinstance(r, (bool, np.bool_)) or not (0.0 <= r <= 1.0):
            raise ValueError(f"{what}({name}={r!r}): expected a fraction in [0, 1] given as a Python or NumPy "
                             "number (0.05 means the top 5%)")
        # a NumPy float32 converts to its binary value (0.3 -> 0.30000001192092896); its str is what was meant
        out.append(float(str(r)) if isinstance(r, np.floating) else float(r))
    ratio, exclude_ratio = out
    if exclude_ratio > ratio:
        raise ValueError(f"{what}: exclude_ratio={exclude_ratio} is larger than ratio={ratio}; the band is the top "
                         "`ratio` minus the top `exclude_ratio`, so exclude_ratio <= ratio")
    return ratio, exclude_ratio


@dataclass
class Boundary:
    """Where the top ``k`` elements end: keys above ``key``, plus the first ``take`` of the ``n_eq``
    elements whose key is ``key``. ``key is None`` when ``k == 0``."""

    k: int
    key: int | None = None
    take: int = 0
    n_eq: int = 0
    counts: list | None = field(default=None, repr=False)  # per local tensor: elements equal to key

    @property
    def all_ties(self) -> bool:
        return self.take == self.n_eq

    @property
    def partial(self) -> bool:
        return self.key is not None and not self.all_ties


def _dist_group(group):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return group if group is not None else torch.distributed.group.WORLD
    return None


def _reduce_device(t, group) -> torch.device:
    # NCCL reduces only CUDA tensors; histograms of scores kept on the CPU (FSDP2 with CPU offload)
    # go through the rank's current GPU there. gloo, and mixed "cpu:gloo,cuda:nccl" groups, take them as they are
    if t.device.type == "cpu" and torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _all_reduce(t, group):
    if group is None:
        return t
    device = _reduce_device(t, group)
    if device != t.device:
        moved = t.to(device)
        torch.distributed.all_reduce(moved, group=group)
        return moved.to(t.device)
    torch.distributed.all_reduce(t, group=group)
    return t


def _ops(backend, histogram=None):
    if backend == "triton":
        # imported here: CPU-only installs of allo need not have triton
        if histogram_variant(histogram) != "atomic":
            from allo_kernels import radix_blocked

            return radix_blocked
        from allo_kernels import radix_select

        return radix_select
    return radix_cpu


class _Search16:
    """Histogram passes of the cpu backend and the atomic Triton variant: 16-bit digits."""

    def __init__(self, ops, sources, key32, dtype):
        self.ops, self.sources, self.key32, self.dtype = ops, sources, key32, dtype
        self.digits = (16, 16) if key32 else (16,)

    def histogram(self, level, prefixes, per_tensor):
        device = self.sources[0].device if self.sources else torch.device("cpu")
        if level == 0:
            buf = torch.zeros(1, BINS, dtype=torch.int64, device=device)
            self.ops.radix_histogram(self.sources, buf[0], key32=self.key32)
            return buf, None, None
        buf = torch.zeros(len(prefixes), BINS, dtype=torch.int64, device=device)
        for row, prefix in zip(buf, prefixes):
            self.ops.radix_histogram(self.sources, row, key32=True, low_prefix=prefix)
        return buf, None, None

    def nonfinite(self, hist0, bad):
        return _nonfinite_bins(hist0, self.key32, self.dtype)


class _SearchBlocked:
    """Histogram passes of the blocked Triton variant: small digits, block-local histograms."""

    def __init__(self, ops, sources, key32, dtype):
        self.ops, self.key32, self.dtype = ops, key32, dtype
        self.sources = ops.Sources(sources)  # operands and addresses read once for all the passes
        self.digits = ops.digits(key32)
        self.edge = ops.nonfinite_edge(key32, dtype)
        self.num_sources = len(sources)
        from allo_kernels import radix_window  # the sampled start: sample and window pass

        self.window_ops = radix_window
        self._windows = None  # (boundaries, n) -> sampling.windows' result, for the last boundaries asked

    def windows(self, ks, n: int, reduce=None):
        """:func:`allo.select.sampling.windows` for boundaries ``ks`` over these sources. Kept (one process):
        when the search finished on the device gives up, the general search asks for the same windows."""
        if reduce is not None:
            return sampling.windows(self.window_ops, self.sources, ks, n, key32=self.key32, edge=self.edge,
                                    reduce=reduce)
        if self._windows is None or self._windows[0] != (tuple(ks), n):
            self._windows = ((tuple(ks), n), sampling.windows(self.window_ops, self.sources, ks, n, key32=self.key32,
                                                              edge=self.edge))
        return self._windows[1]

    def _per_tensor(self, per_tensor, bits):
        # per-tensor rows in the last pass give each tensor's tie count without a counting pass
        return per_tensor and self.ops.per_tensor_fits(self.num_sources, bits)

    def histogram(self, level, prefixes, per_tensor):
        return self.ops.histogram(self.sources, level, prefixes, key32=self.key32, edge=self.edge,
                                  per_tensor=self._per_tensor(per_tensor, self.digits[-1]))

    def prefix_histogram(self, shift, bits, prefixes, per_tensor):
        return self.ops.prefix_histogram(self.sources, shift, bits, prefixes, key32=self.key32,
                                         per_tensor=self._per_tensor(per_tensor, bits))

    def window_histogram(self, shift, lows, bits):
        # the exact key comes out of this pass when shift == 0: keep per-tensor rows for its ties then
        per_tensor = self._per_tensor(shift == 0, bits)
        return self.window_ops.window_histogram(self.sources, shift, lows, bits, key32=self.key32, edge=self.edge,
                                         per_tensor=per_tensor)

    def nonfinite(self, hist0, bad):
        return int(bad[0])


def _nonfinite_bins(hist, key32, dtype):
    # +-inf and NaN have the largest key magnitudes: 32-bit (and bf16) keys >= 0x7F80 in the high half,
    # fp16 keys >= 0x7C00
    edge = 0x7F80 if key32 or dtype == torch.bfloat16 else 0x7C00
    return int(hist[edge + 32768:].sum()) + int(hist[: 32768 - edge].sum())


class NonFiniteScoresError(ValueError):
    """NaN or infinite scores; ``name`` and ``index`` (flat) say where on this rank (None: on another rank)."""

    def __init__(self, message, name=None, index=None):
        super().__init__(message)
        self.name, self.index = name, index


def first_nonfinite(s, start: int = 0, stop: int | None = None):
    """(flat index, value) of the first NaN or infinite element of ``s`` in ``[start, stop)``, or None."""
    for first, c in iter_chunks(s, _TIE_CHUNK, start, stop):
        bad = ~torch.isfinite(c)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            return first + i, c[i].item()
    return None


def nonfinite_message(what, name, index, value) -> str:
    return (f"{what}: scores[{name!r}] holds a non-finite value ({value}) at flat index {index}; scores must be "
            "finite (check the model or the gradients for NaN/inf, or exclude= that parameter)")


def _name_nonfinite(sources, group, what):
    # on every rank at the same point of the search: each raises, none is left waiting in a collective
    for name, s in sources.items():
        found = first_nonfinite(s)
        if found is not None:
            raise NonFiniteScoresError(nonfinite_message(what, name, *found), name, found[0])
    rank = torch.distributed.get_rank(group) if group is not None else 0
    raise NonFiniteScoresError(f"{what}: some scores are NaN or infinite on another rank than rank {rank}; scores "
                               "must be finite")


def _find_bin_flat(hist: torch.Tensor, k: int):
    c = hist.cumsum(0)  # count(bin >= b) = total - c[b - 1]: the largest b with c[b - 1] <= total - k
    total = int(c[-1])
    b = int(torch.searchsorted(c, torch.tensor([total - k], dtype=c.dtype), right=True).item())
    return b, total - int(c[b])


def _find_bin(hist: torch.Tensor, k: int):
    """Bin b holding the k-th largest (1 <= k <= total) and the count strictly above it; a 65536-bin
    histogram in two levels of 256, so that no 65536-long temporary is made."""
    if hist.numel() != BINS:
        return _find_bin_flat(hist, k)
    row, above = _find_bin_flat(hist.view(256, 256).sum(1), k)
    b, above_in_row = _find_bin_flat(hist[row * 256:(row + 1) * 256], k - above)
    return row * 256 + b, above + above_in_row


def plan(sources: dict, ratios, *, key32: bool, dtype, backend: str, group=None, what="select_top", histogram=None,
         overlap=None, search=None):
    """Exact boundaries (one per count in ``ratios``) over ``sources``; also returns N. ``overlap``: host
    work (e.g. allocating the masks) run once while the GPU does the first pass, before the search
    waits for it. ``search``: the passes' object already made for these sources (its operands and
    sample are reused), else one is made."""
    n = torch.tensor([sum(s.numel() for s in sources.values())], dtype=torch.int64)
    device = next(iter(sources.values())).device if sources else torch.device("cpu")
    if group is not None:
        n = _all_reduce(n.to(device), group).cpu()
    n = int(n)
    bounds = [Boundary(band_count(r, n)) for r in ratios]
    todo = [bd for bd in bounds if bd.k > 0]
    if not todo:
        return bounds, n
    if search is None:
        ops = _ops(backend, histogram)
        search = (_SearchBlocked if hasattr(ops, "digits") else _Search16)(ops, list(sources.values()), key32, dtype)
    if backend == "triton" and histogram_variant(histogram) == "blocked":
        if _plan_windowed(search, todo, n, sources, group, what, overlap):
            return bounds, n
        overlap = None  # it ran
    # per boundary: [prefix (the key's digits found so far), k left to place below that prefix]
    state = {id(bd): [None, bd.k] for bd in todo}
    for level, bits in enumerate(search.digits):
        last = level == len(search.digits) - 1
        prefixes = sorted({p for p, _ in state.values()}) if level > 0 else [None]
        hist, per, bad = search.histogram(level, prefixes, last)
        if overlap is not None:
            overlap()
            overlap = None
        hist, bad = _reduced(hist, bad, group)
        if level == 0 and search.nonfinite(hist[0], bad):
            _name_nonfinite(sources, group, what)
        # the top digit is signed (the key's order is the signed order)
        _narrow(todo, state, prefixes, hist, per, last,
                lambda p, b: b - (1 << bits) // 2 if p is None else (p << bits) | b)
    return bounds, n


def _reduced(hist, counts, group):
    """``hist`` and ``counts`` (or None) summed over ranks (one all-reduce), on the CPU."""
    if group is not None:
        packed = _all_reduce(torch.cat([hist.reshape(-1)] + ([] if counts is None else [counts])), group)
        hist, counts = packed[:hist.numel()].view(hist.shape), (None if counts is None else packed[hist.numel():])
    return hist.cpu(), (None if counts is None else counts.cpu())


def _narrow(todo, state, prefixes, hist, per, last, next_prefix):
    """One pass's effect on each boundary: the bin holding its k-th element extends its prefix
    (``next_prefix(prefix, bin)``) and the elements above that bin are placed; after the ``last``
    pass the prefix is the exact key."""
    for bd in todo:
        st = state[id(bd)]
        row = prefixes.index(st[0])
        b, above = _find_bin(hist[row], st[1])
        st[0], st[1] = next_prefix(st[0], b), st[1] - above
        if last:
            bd.key, bd.n_eq, bd.take = st[0], int(hist[row, b]), st[1]
            if per is not None:
                bd.counts = per[:, row, b].tolist()


def _plan_windowed(search, todo, n, sources, group, what, overlap=None) -> bool:
    """The blocked search from a sample (:mod:`allo.select.sampling`): one pass over each boundary's
    window, then prefix passes over the bits the window left (none when its bins are single keys).
    False when some boundary's k-th element is outside its window: the caller starts over."""
    reduce = None if group is None else (lambda t: _all_reduce(t, group))  # every rank gets the same windows
    shift, lows, bits = search.windows([bd.k for bd in todo], n, reduce)
    windows = sorted(set(lows))
    hist, per, above, bad = search.window_histogram(shift, windows, bits)
    if overlap is not None:
        overlap()
    hist, counts = _reduced(hist, torch.cat([above, bad]), group)
    above, bad = counts[:-1], counts[-1:]
    if search.nonfinite(None, bad):
        _name_nonfinite(sources, group, what)
    for bd, low in zip(todo, lows):
        row = windows.index(low)
        placed = int(above[row])
        if not placed < bd.k <= placed + int(hist[row].sum()):
            return False
    # the window pass as the first pass of the narrowing: every boundary starts at its window's row
    state = {id(bd): [low, bd.k - int(above[windows.index(low)])] for bd, low in zip(todo, lows)}
    _narrow(todo, state, windows, hist, per, shift == 0, lambda low, b: low + b)
    steps = _digits_of(shift)
    for i, (step_shift, step_bits) in enumerate(steps):
        last = i == len(steps) - 1
        prefixes = sorted({p for p, _ in state.values()})
        hist, per = search.prefix_histogram(step_shift, step_bits, prefixes, last)
        hist, _ = _reduced(hist, None, group)
        _narrow(todo, state, prefixes, hist, per, last, lambda p, b, bits=step_bits: (p << bits) | b)
    return True


def _digits_of(bits: int, widest: int = 6) -> list:
    """(shift, bits) of the prefix passes over the low ``bits`` bits of a key, most significant first:
    as few passes as digits of at most ``widest`` bits allow, the wider digits first."""
    count = -(-bits // widest)
    sizes = [bits // count + (i < bits % count) for i in range(count)] if count else []
    return [(sum(sizes[i + 1:]), b) for i, b in enumerate(sizes)]


def _tie_starts(counts: dict, group):
    """Global rank of each local tensor's first tied element, in the documented tie order."""
    if group is None:  # one process: the order is the mapping's
        c = np.fromiter(counts.values(), dtype=np.int64, count=len(counts))
        return dict(zip(counts, (np.cumsum(c) - c).tolist()))
    entries = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(entries, list(counts.items()), group=group)
    rank = torch.distributed.get_rank(group)
    order = {}
    for per_rank in entries:
        for name, _ in per_rank:
            order.setdefault(name, len(order))
    flat = sorted(((order[name], r, name, c) for r, per_rank in enumerate(entries) for name, c in per_rank))
    starts, total = {}, 0
    for _, r, name, c in flat:
        if r == rank:
            starts[name] = total
        total += c
    return starts


def _taken(bd: Boundary, key: int, r: torch.Tensor) -> torch.Tensor:
    """Whether the elements with key ``key`` and tie ranks ``r`` are among ``bd``'s top k."""
    if bd.k == 0 or key < bd.key:
        return torch.zeros_like(r, dtype=torch.bool)
    if key > bd.key:
        return torch.ones_like(r, dtype=torch.bool)
    return r < bd.take


# allocate the masks in one C++ call when the extension is there (see _new_masks); False: one
# torch.empty_like per mask (bench_select times both on a GPU)
ALLOCATE_IN_ONE_CALL = True


def _new_masks(srcs) -> list[torch.Tensor]:
    """Uninitialized contiguous bool masks of the scores' shapes, on their device, each with its own
    storage (masks are saved with safetensors, which refuses tensors that share one). ~150 masks per
    call: with the compiled extension loaded or prebuilt, one call allocates them all in C++ (H100
    machine, 145 masks: 0.48 ms of host time against 0.58 ms for ``torch.empty_like`` each; the CUDA
    caching allocator is most of it); otherwise ``empty_like`` per mask (half of ``torch.empty(shape,
    ...)``: no shape to parse). Both give the same masks."""
    like = [s.a if isinstance(s, AbsDiff) else s for s in srcs]
    plain = (torch.Tensor, torch.nn.Parameter)  # (weight deltas hold the models' parameters)
    if ALLOCATE_IN_ONE_CALL and all(type(t) in plain for t in like):
        from allo.ops._extension import extension_if_ready

        empty_masks = getattr(extension_if_ready(), "empty_masks", None)  # (None: no extension, or one built
        if empty_masks is not None:                                        # before empty_masks existed)
            return empty_masks(like)
    empty_like, dtype, fmt = torch.empty_like, torch.bool, torch.contiguous_format
    out = []
    for t in like:
        if type(t) in plain:
            out.append(empty_like(t, dtype=dtype, memory_format=fmt))
        else:  # a subclass (e.g. DTensor) would make its own kind of mask
            out.append(torch.empty(t.shape, dtype=dtype, device=t.device))
    return out


def write_masks(sources: dict, hi: Boundary, ex: Boundary, *, key32: bool, backend: str, group=None, emit=None,
                histogram=None, masks=None):
    """Band masks per tensor, handed one at a time to ``emit(name, mask)`` (or collected in a dict).
    ``masks``: uninitialized masks from :func:`_new_masks` to write into (blocked variant, no ``emit``)."""
    ops = _ops(backend, histogram)
    if hasattr(ops, "write_band"):
        return _write_masks_blocked(ops, sources, hi, ex, key32=key32, group=group, emit=emit, masks=masks)
    ex_key = ex.key if ex.k > 0 else None
    partial = sorted({bd.key for bd in (hi, ex) if bd.k > 0 and bd.partial})
    if backend == "cpu" and group is None and len(partial) == 1:
        return _write_masks_sequential(sources, hi, ex, partial[0], key32=key32, emit=emit)
    starts, counts = {}, {}
    for key in partial:
        # only when a threshold cuts through a group of equal scores: count them per tensor
        counts[key] = dict(zip(sources, ops.count_equal(list(sources.values()), key, key32=key32)))
        starts[key] = _tie_starts(counts[key], group)
    out = {} if emit is None else None
    for name, s in sources.items():
        # per tensor, a boundary's ties are all in, all out, or cut (then fixed below by position)
        hi_ties, ex_ties, cut = hi.all_ties, ex.all_ties, []
        for key in partial:
            first, c = starts[key][name], counts[key][name]
            if c == 0:
                continue
            for bd in (hi, ex):
                if bd.k > 0 and bd.key == key and not bd.all_ties:
                    if first + c <= bd.take:
                        hi_ties, ex_ties = (True, ex_ties) if bd is hi else (hi_ties, True)
                    elif first < bd.take:
                        cut.append(key)
        mask = _new_masks((s,))[0]
        ops.radix_write(s, mask.view(-1), hi.key if hi.k > 0 else None, hi_ties, ex_key, ex_ties, key32=key32)
        for key in sorted(set(cut)):
            pos = ops.equal_positions(s, key, counts[key][name], key32=key32)
            # r: each tied element's rank among all elements equal to `key`, in the tie order
            r = starts[key][name] + torch.arange(pos.numel(), device=s.device)
            keep = _taken(hi, key, r)
            if ex.k > 0:
                keep &= ~_taken(ex, key, r)
            mask.view(-1)[pos] = keep
        if emit is None:
            out[name] = mask
        else:
            emit(name, mask)
    return out


def _write_masks_blocked(ops, sources, hi, ex, *, key32, group, emit, masks=None):
    """Blocked Triton variant: one launch writes the masks of many tensors (of all of them unless the
    masks are streamed out through ``emit``: then waves of about ``_WRITE_WAVE`` elements, so that
    few masks exist at once). A tensor where a boundary cuts through ties gets the number of its
    ties taken (``limit``); the kernel ranks its ties in flat order."""
    names, srcs = list(sources), list(sources.values())
    limits, cut = {}, np.zeros(len(srcs), dtype=bool)
    for bd in (hi, ex):
        if bd.k == 0 or not bd.partial:
            limits[id(bd)] = np.full(len(srcs), ops.NO_LIMIT, dtype=np.int64)  # all ties in (or, k == 0, unused)
            continue
        counts = bd.counts
        if counts is None:  # too many tensors for per-tensor rows in the last pass: count now
            counts = ops.count_equal(srcs, bd.key, key32=key32)
        counts = np.asarray(counts, dtype=np.int64)
        first = _tie_starts(dict(zip(names, counts.tolist())), group)
        starts = np.array([first[nm] for nm in names], dtype=np.int64)
        lim = np.minimum(np.maximum(bd.take - starts, 0), counts)
        cut |= (0 < lim) & (lim < counts)
        limits[id(bd)] = lim
    key_hi = hi.key if hi.k > 0 else None
    key_ex = ex.key if ex.k > 0 else None
    out = {} if emit is None else None
    wave_cap = max([_WRITE_WAVE] + [s.numel() for s in srcs]) if emit is not None else None
    i = 0
    while i < len(srcs):
        if emit is None:
            j = len(srcs)
        else:
            j, size = i, 0
            while j < len(srcs) and (j == i or size + srcs[j].numel() <= wave_cap):
                size += srcs[j].numel()
                j += 1
        wave = masks if masks is not None and emit is None else _new_masks(srcs[i:j])
        ops.write_band(srcs[i:j], wave, key_hi, limits[id(hi)][i:j], key_ex, limits[id(ex)][i:j], cut[i:j],
                       key32=key32)
        if emit is None:
            out.update(zip(names[i:j], wave))
        else:
            for name, mask in zip(names[i:j], wave):
                emit(name, mask)
        i = j
    return out


def _write_masks_sequential(sources, hi, ex, key, *, key32, emit):
    """Single-process CPU path when one key's ties are cut: the write pass also counts each tensor's
    ties, so tensors are written assuming the tie state at their start (``seen`` ties so far) and only
    the tensor where a boundary falls is fixed by position; no separate counting pass."""
    out = {} if emit is None else None
    seen = 0
    for name, s in sources.items():
        hi_ties = hi.all_ties or (hi.key == key and seen < hi.take)
        ex_ties = ex.all_ties or (ex.k > 0 and ex.key == key and seen < ex.take)
        mask = _new_masks((s,))[0]
        c = radix_cpu.radix_write(s, mask.view(-1), hi.key, hi_ties, ex.key if ex.k > 0 else None, ex_ties,
                                  key32=key32, count_key=key)
        if any(bd.k > 0 and bd.key == key and seen < bd.take < seen + c for bd in (hi, ex)):
            pos = radix_cpu.equal_positions(s, key, c, key32=key32)
            r = seen + torch.arange(c)
            keep = _taken(hi, key, r)
            if ex.k > 0:
                keep &= ~_taken(ex, key, r)
            mask.view(-1)[pos] = keep
        seen += c
        if emit is None:
            out[name] = mask
        else:
            emit(name, mask)
    return out


def key_domain(sources: dict):
    """(key32, dtype): 16-bit keys only when every score has the same 16-bit dtype."""
    return _domain_of({s.dtype for s in sources.values()})  # (AbsDiff's dtype: float32)


def _domain_of(dtypes: set):
    if len(dtypes) == 1 and torch.float32 not in dtypes:
        return False, next(iter(dtypes))
    return True, torch.float32


_HELD = (torch.float32, torch.bfloat16, torch.float16)  # agreed_domain's flags: the score dtypes, then devices


def agreed_domain(sources: dict, device: torch.device, group, what: str):
    """(key32, dtype, device) for the search, the same on every rank of ``group``: ranks holding
    different tensors (a partition of the model, or none at all) must run the same passes over the
    same kind of keys, or their histograms' all-reduces would pair different passes (and hang). One
    all-reduce of what each rank holds: :func:`key_domain`'s rule over every rank's dtypes; a rank
    without scores searches on the device kind the others hold theirs on."""
    if group is None:
        return (*key_domain(sources), device)
    held = [0] * (len(_HELD) + 2)  # the dtypes, then: on an accelerator, on the CPU
    for s in sources.values():
        held[_HELD.index(s.dtype)] = 1
        held[-1 if s.device.type == "cpu" else -2] = 1
    every = _all_reduce(torch.tensor(held, dtype=torch.int64), group).tolist()
    if every[-1] and every[-2]:
        raise ValueError(f"{what}: under torch.distributed some ranks hold their scores on the CPU and others on "
                         "a GPU; the ranks' searches must run alike: put every rank's scores on the same kind "
                         "of device")
    if not sources and every[-2]:
        device = torch.device("cuda", torch.cuda.current_device())
    return (*_domain_of({dt for dt, flag in zip(_HELD, every) if flag}), device)


def band_masks(scores, ratio, exclude_ratio=0.0, *, backend=None, group=None, emit=None, what="select_top",
               histogram=None):
    """Element-granularity band masks (see the module docstring). ``emit`` streams them out.
    ``histogram``: the Triton variant (``"blocked"`` or ``"atomic"``, see :func:`histogram_variant`)."""
    ratio, exclude_ratio = check_ratios(ratio, exclude_ratio, what)
    sources = normalize_scores(scores, what)
    device = next(iter(sources.values())).device if sources else torch.device("cpu")
    group = _dist_group(group)
    key32, dtype, device = agreed_domain(sources, device, group, what)
    backend = resolve_backend(backend, device, what=what)
    if backend == "reference":
        if group is not None:
            raise ValueError(f"{what}: backend 'reference' works in a single process only; use 'cpu' or 'triton' "
                             "under torch.distributed")
        from .reference import reference_band_masks

        masks = reference_band_masks(sources, ratio, exclude_ratio)
        if emit is None:
            return masks
        for name, m in masks.items():
            emit(name, m)
        return None
    if backend == "triton":
        histogram = histogram_variant(histogram)  # a bad value fails before any pass
    early = {}

    def allocate_masks():
        if "masks" not in early:
            early["masks"] = _new_masks(list(sources.values()))
        return early["masks"]

    search = None
    if FINISH_ON_DEVICE and emit is None and group is None and backend == "triton" and histogram == "blocked" \
            and not key32:
        # the usual large-model case, finished without reading the passes back (None: not applicable; the
        # general search below then reuses the search object, its operands and its sample's windows)
        from .device_plan import band_masks_on_device

        n = sum(s.numel() for s in sources.values())
        search = _SearchBlocked(_ops(backend, histogram), list(sources.values()), key32, dtype)
        masks = band_masks_on_device(sources, search, (band_count(ratio, n), band_count(exclude_ratio, n)), n,
                                     allocate_masks=allocate_masks, what=what)
        if masks is not None:
            return dict(zip(sources, masks))
    # allocating ~150 masks costs ~0.5 ms of host time (H100 profile): done while the first pass runs
    overlap = allocate_masks if emit is None and backend == "triton" and histogram != "atomic" else None
    (hi, ex), _ = plan(sources, (ratio, exclude_ratio), key32=key32, dtype=dtype, backend=backend, group=group,
                       what=what, histogram=histogram, overlap=overlap, search=search)
    return write_masks(sources, hi, ex, key32=key32, backend=backend, group=group, emit=emit, histogram=histogram,
                       masks=early.get("masks"))


def value_of_boundary(bd: Boundary, key32: bool, dtype) -> float | None:
    """The threshold score of a boundary (for reports), or None when it keeps nothing."""
    from allo_kernels.radix_select import value_of_key

    return None if bd.key is None else value_of_key(bd.key, torch.float32 if key32 else dtype)
