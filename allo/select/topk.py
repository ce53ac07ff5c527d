"""Exact global band selection over many tensors: streaming radix histograms, no concatenation.

Semantics (the contract the tests check against :mod:`allo.select.reference`):

* ``N`` = number of elements over all score tensors (all ranks under ``torch.distributed``).
* ``k(ratio) = floor(ratio * N + 1/2)`` (round half up). The band keeps the elements ranked in
  ``[k(exclude_ratio), k(ratio))`` of the total order below: exactly ``k(ratio) - k(exclude_ratio)``.
* Total order: higher score first; equal scores (compared by value: -0.0 == +0.0, bf16 1.5 == fp32
  1.5) in the order of the tensors in the mapping, then of the flat (row-major) index. Under
  ``torch.distributed`` tensors are ordered by where their name first appears going through ranks
  0, 1, ... and, for a name on several ranks (a sharded parameter), by rank: so dim-0 shards in rank
  order, or a partition of the tensors in rank order, reproduce the single-process selection.
* NaN or infinite scores are an error naming the tensor.

Algorithm: one 65536-bin histogram of the keys' high 16 bits accumulated over every tensor (all
reduced across ranks), which fixes the threshold's bin; for float32 keys a second pass histograms
the low 16 bits of the elements in that bin only. That yields the exact threshold key and how many
of the elements equal to it are taken. A last pass writes the masks; when only some of the tied
elements are taken, their positions are found tensor by tensor and the first ones in the order above
are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from allo._backend import resolve_backend

from . import radix_cpu
from .scores import AbsDiff, iter_chunks, normalize_scores

_TIE_CHUNK = 1 << 20
BINS = 65536  # 16 bits of key per pass


def band_count(ratio: float, n: int) -> int:
    """Number of elements in the top ``ratio`` of ``n``: round half up."""
    return int(math.floor(ratio * n + 0.5))


def check_ratios(ratio, exclude_ratio, what="select_top"):
    for name, r in (("ratio", ratio), ("exclude_ratio", exclude_ratio)):
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not (0.0 <= r <= 1.0):
            raise ValueError(f"{what}({name}={r!r}): expected a fraction in [0, 1] (0.05 means the top 5%)")
    if exclude_ratio > ratio:
        raise ValueError(f"{what}: exclude_ratio={exclude_ratio} is larger than ratio={ratio}; the band is the top "
                         "`ratio` minus the top `exclude_ratio`, so exclude_ratio <= ratio")


@dataclass
class Boundary:
    """Where the top ``k`` elements end: keys above ``key``, plus the first ``take`` of the ``n_eq``
    elements whose key is ``key``. ``key is None`` when ``k == 0``."""

    k: int
    key: int | None = None
    take: int = 0
    n_eq: int = 0

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


def _all_reduce(t, group):
    if group is not None:
        torch.distributed.all_reduce(t, group=group)
    return t


def _ops(backend):
    if backend == "triton":
        # imported here: CPU-only installs of allo need not have triton
        from allo_kernels import radix_select

        return radix_select
    return radix_cpu


def _nonfinite_bins(hist, key32, dtype):
    # +-inf and NaN have the largest key magnitudes: 32-bit (and bf16) keys >= 0x7F80 in the high half,
    # fp16 keys >= 0x7C00
    edge = 0x7F80 if key32 or dtype == torch.bfloat16 else 0x7C00
    return int(hist[edge + 32768:].sum()) + int(hist[: 32768 - edge].sum())


def _name_nonfinite(sources, group, what):
    for name, s in sources.items():
        for start, c in iter_chunks(s, _TIE_CHUNK):
            bad = ~torch.isfinite(c)
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"{what}: scores[{name!r}] holds a non-finite value ({c[i].item()}) at flat index "
                                 f"{start + i}; scores must be finite (check the model or the gradients for NaN/inf, "
                                 "or exclude= that parameter)")
    rank = torch.distributed.get_rank(group) if group is not None else 0
    raise ValueError(f"{what}: some scores are NaN or infinite on another rank than rank {rank}; scores must be finite")


def _find_bin_flat(hist: torch.Tensor, k: int):
    c = hist.cumsum(0)  # count(bin >= b) = total - c[b - 1]: the largest b with c[b - 1] <= total - k
    total = int(c[-1])
    b = int(torch.searchsorted(c, torch.tensor([total - k], dtype=c.dtype), right=True).item())
    return b, total - int(c[b])


def _find_bin(hist: torch.Tensor, k: int):
    """Bin b holding the k-th largest (1 <= k <= total) and the count strictly above it; in two
    levels of 256 so that no 65536-long temporary is made."""
    row, above = _find_bin_flat(hist.view(256, 256).sum(1), k)
    b, above_in_row = _find_bin_flat(hist[row * 256:(row + 1) * 256], k - above)
    return row * 256 + b, above + above_in_row


def plan(sources: dict, ratios, *, key32: bool, dtype, backend: str, group=None, what="select_top"):
    """Exact boundaries (one per count in ``ratios``) over ``sources``; also returns N."""
    n = torch.tensor([sum(s.numel() for s in sources.values())], dtype=torch.int64)
    device = next(iter(sources.values())).device if sources else torch.device("cpu")
    if group is not None:
        n = _all_reduce(n.to(device), group).cpu()
    n = int(n)
    bounds = [Boundary(band_count(r, n)) for r in ratios]
    if n == 0:
        return bounds, n
    ops = _ops(backend)
    buf = torch.zeros(BINS, dtype=torch.int64, device=device)
    ops.radix_histogram(list(sources.values()), buf, key32=key32)
    hist = _all_reduce(buf, group).cpu()
    if _nonfinite_bins(hist, key32, dtype):
        _name_nonfinite(sources, group, what)
    highs = [(bd, *_find_bin(hist, bd.k)) for bd in bounds if bd.k > 0]
    if not key32:
        for bd, b, above in highs:
            bd.key, bd.n_eq, bd.take = b - 32768, int(hist[b]), bd.k - above
        return bounds, n
    # the low passes reuse the one buffer (on CPU `hist` is that buffer): one histogram alive at a time
    for prefix in sorted({b - 32768 for _, b, _ in highs}):
        buf.zero_()
        ops.radix_histogram(list(sources.values()), buf, key32=True, low_prefix=prefix)
        low = _all_reduce(buf, group).cpu()
        for bd, b, above in highs:
            if b - 32768 == prefix:
                lb, above_low = _find_bin(low, bd.k - above)
                bd.key, bd.n_eq, bd.take = prefix * 65536 + lb, int(low[lb]), bd.k - above - above_low
    return bounds, n


def _tie_starts(counts: dict, group):
    """Global rank of each local tensor's first tied element, in the documented tie order."""
    entries = [list(counts.items())]
    if group is not None:
        gathered = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(gathered, entries[0], group=group)
        entries, rank = gathered, torch.distributed.get_rank(group)
    else:
        rank = 0
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


def write_masks(sources: dict, hi: Boundary, ex: Boundary, *, key32: bool, backend: str, group=None, emit=None):
    """Band masks per tensor, handed one at a time to ``emit(name, mask)`` (or collected in a dict)."""
    ops = _ops(backend)
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
        mask = torch.empty(s.shape, dtype=torch.bool, device=s.device)
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


def _write_masks_sequential(sources, hi, ex, key, *, key32, emit):
    """Single-process CPU path when one key's ties are cut: the write pass also counts each tensor's
    ties, so tensors are written assuming the tie state at their start (``seen`` ties so far) and only
    the tensor where a boundary falls is fixed by position; no separate counting pass."""
    out = {} if emit is None else None
    seen = 0
    for name, s in sources.items():
        hi_ties = hi.all_ties or (hi.key == key and seen < hi.take)
        ex_ties = ex.all_ties or (ex.k > 0 and ex.key == key and seen < ex.take)
        mask = torch.empty(s.shape, dtype=torch.bool, device=s.device)
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
    dtypes = {torch.float32 if isinstance(s, AbsDiff) else s.dtype for s in sources.values()}
    if len(dtypes) == 1 and torch.float32 not in dtypes:
        return False, dtypes.pop()
    return True, torch.float32


def band_masks(scores, ratio, exclude_ratio=0.0, *, backend=None, group=None, emit=None, what="select_top"):
    """Element-granularity band masks (see the module docstring). ``emit`` streams them out."""
    check_ratios(ratio, exclude_ratio, what)
    sources = normalize_scores(scores, what)
    device = next(iter(sources.values())).device if sources else torch.device("cpu")
    backend = resolve_backend(backend, device, what=what)
    group = _dist_group(group)
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
    key32, dtype = key_domain(sources)
    (hi, ex), _ = plan(sources, (ratio, exclude_ratio), key32=key32, dtype=dtype, backend=backend, group=group,
                       what=what)
    return write_masks(sources, hi, ex, key32=key32, backend=backend, group=group, emit=emit)


def value_of_boundary(bd: Boundary, key32: bool, dtype) -> float | None:
    """The threshold score of a boundary (for reports), or None when it keeps nothing."""
    from allo_kernels.radix_select import value_of_key

    return None if bd.key is None else value_of_key(bd.key, torch.float32 if key32 else dtype)
