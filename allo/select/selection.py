"""Public entry points (``select_top``, ``select``) and the :class:`Selection` they return.

Granularity ``"element"`` ranks single weight elements (the paper). ``"row"`` ranks output neurons:
a row is a slice along dim 0 (a row of a Linear weight ``[out, in]``), scored by the sum of its
elements' scores (float32); a 1-D tensor (bias, norm) has one row per element, a 0-d tensor is one
row, a 3-D tensor's row is a ``[d1, d2]`` slab. dim 0 is the output dimension for ``nn.Linear``, not
for every module: an ``nn.Embedding`` weight ``[vocab, hidden]`` has one row per token (its vector),
and a ``Conv1D`` (GPT-2) weight ``[in, out]`` one per input feature; exclude= such tensors, or score
them by element, if that is not the unit wanted. With rows, ``ratio`` is a fraction of all rows
(counted as for elements) and a selected row keeps all its elements; rows compare by their sums, so a
long row (a wide layer) tends to outrank a short one.

A :class:`Selection` keeps sorted flat int64 indices per tensor (compact: 8 bytes per selected
element); ``masks`` builds bool masks on demand. ``save`` writes a safetensors file with the indices
(int32 where the tensor has fewer than 2**31 elements) and metadata; ``load`` checks it against a
model.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os

import torch

from allo._atomic import atomic_path

from .scores import AbsDiff, normalize_scores
from .topk import NonFiniteScoresError, band_count, band_masks, check_ratios, first_nonfinite, nonfinite_message

GRANULARITIES = ("element", "row")
RECORDED = ("ratio", "exclude_ratio", "granularity", "score_source")  # the metadata select writes itself
FORMAT = "allo.selection"
VERSION = "1"
_ROW_CHUNK = 1 << 20


def _rows_view(shape) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    rows = shape[0]
    per = 1
    for d in shape[1:]:
        per *= d
    return rows, per


def row_scores(sources: dict) -> dict[str, torch.Tensor]:
    """Sum of each row's element scores, float32, computed a block of rows at a time."""
    out = {}
    for name, s in sources.items():
        rows, per = _rows_view(tuple(s.shape))
        res = torch.zeros(rows, dtype=torch.float32, device=s.device)
        step = max(1, _ROW_CHUNK // max(per, 1))
        for r0 in range(0, rows if per else 0, step):
            r1 = min(rows, r0 + step)
            if isinstance(s, AbsDiff):
                block = s.flat_chunk(r0 * per, r1 * per)
            else:
                block = s.reshape(-1)[r0 * per:r1 * per].float()
            res[r0:r1] = block.view(r1 - r0, per).sum(1)
        out[name] = res
    return out


def _row_band_masks(sources, ratio, exclude_ratio, *, what, **kw):
    """:func:`band_masks` over the rows' scores; a non-finite row sum is reported where it comes from:
    a NaN/inf element (its flat index in the tensor), or finite elements whose float32 sum overflows."""
    try:
        return band_masks(row_scores(sources), ratio, exclude_ratio, what=what, **kw)
    except NonFiniteScoresError as e:
        if e.name is None:  # on another rank
            raise
        name, row = e.name, e.index
        _, per = _rows_view(tuple(sources[name].shape))
        found = first_nonfinite(sources[name], row * per, (row + 1) * per)
        if found is not None:
            raise NonFiniteScoresError(nonfinite_message(what, name, *found) + f" (row {row})", name,
                                       found[0]) from None
        # the row's score (what is ranked) is infinite: the same error, at the row's first element
        raise NonFiniteScoresError(f"{what}: row {row} of scores[{name!r}] overflows: its scores are finite but their "
                                   "float32 sum is not (granularity='row' ranks rows by the sum of their scores); "
                                   "scale the scores down", name, row * per) from None


def _check_granularity(g, what):
    if g not in GRANULARITIES:
        raise ValueError(f"{what}(granularity={g!r}): expected one of {GRANULARITIES}")


def _expand_rows(row_mask: torch.Tensor, shape) -> torch.Tensor:
    rows, per = _rows_view(tuple(shape))
    return row_mask.view(rows, 1).expand(rows, per).reshape(shape).contiguous()


def select_top(scores, ratio, *, exclude_ratio=0.0, granularity="element", backend=None, group=None):
    """Masks of the exact global top-``ratio`` band (minus the top ``exclude_ratio``) of ``scores``.

    ``scores``: mapping name -> score tensor (fp32/bf16/fp16, any shape, any sign) or lazy ``AbsDiff``
    (from :func:`weight_delta_scores`). ``ratio``, ``exclude_ratio``: fractions in [0, 1] (0.05 is the
    top 5%; 5 is an error). Returns name -> bool mask of the same shape. Exactly
    ``round(ratio*N) - round(exclude_ratio*N)`` elements (rows) are selected, halves rounded up
    (computed exactly: 0.29 of 50 is 15); ties are taken in (tensor order, flat index) order. See
    :mod:`allo.select.topk` for details.

    NaN or infinite scores raise :class:`~allo.select.topk.NonFiniteScoresError` naming the tensor (with
    ``granularity="row"`` also a row whose float32 sum overflows), except when nothing is to be
    selected (``round(ratio*N)`` is 0: ``ratio=0``, or a ratio below half an element): then the
    ``"cpu"`` and ``"triton"`` backends do not read the scores, so they are not checked.
    """
    _check_granularity(granularity, "select_top")
    ratio, exclude_ratio = check_ratios(ratio, exclude_ratio, "select_top")  # before any row is scored
    sources = normalize_scores(scores, "select_top")
    if granularity == "element":
        return band_masks(sources, ratio, exclude_ratio, backend=backend, group=group)
    masks = _row_band_masks(sources, ratio, exclude_ratio, what="select_top", backend=backend, group=group)
    return {n: _expand_rows(masks[n], s.shape) for n, s in sources.items()}


def select(scores, ratio, *, exclude_ratio=0.0, granularity="element", metadata=None, backend=None, group=None,
           score_source=None) -> "Selection":
    """Like :func:`select_top`, returning a :class:`Selection` (compact indices + metadata).

    The metadata records ``ratio``, ``exclude_ratio``, ``granularity`` and ``score_source`` (given, or
    what the scores are: ``"tensor"``, ``"weight_delta"``); ``metadata`` adds other keys, not those.

    Masks are produced one tensor at a time and turned into indices right away, so at most one
    tensor-sized mask exists at once.
    """
    _check_granularity(granularity, "select")
    ratio, exclude_ratio = check_ratios(ratio, exclude_ratio, "select")  # floats in the metadata
    taken = [k for k in (metadata or {}) if k in RECORDED]
    if taken:  # the file would then say the selection is something it is not
        raise ValueError(f"select(metadata=...): {taken} are recorded by select itself, from its arguments "
                         "(score_source= names the scores); rename those metadata keys")
    sources = normalize_scores(scores, "select")
    for name in sources:  # before the work: a Selection names tensors by str (what a model's names are)
        _check_name(name, "select: scores")
    indices = {}
    rows = granularity == "row"

    def keep(name, mask):
        if rows:
            mask = _expand_rows(mask, sources[name].shape)
        indices[name] = mask.reshape(-1).nonzero().view(-1)

    (_row_band_masks if rows else band_masks)(sources, ratio, exclude_ratio, backend=backend, group=group,
                                              what="select", emit=keep)
    if score_source is None:
        kinds = {"weight_delta" if isinstance(s, AbsDiff) else "tensor" for s in sources.values()}
        score_source = "+".join(sorted(kinds))
    meta = {"ratio": ratio, "exclude_ratio": exclude_ratio, "granularity": granularity, "score_source": score_source}
    meta.update(metadata or {})
    shapes = {n: tuple(s.shape) for n, s in sources.items()}
    return Selection(indices, shapes, meta)


def select_shards(scores, ratio, *, shapes: dict, exclude_ratio=0.0, granularity="element", metadata=None,
                  backend=None, score_source=None, dst: int = 0) -> "Selection | None":
    """:func:`select` over a model sharded along dim 0 across the ranks of torch.distributed's
    default group (FSDP2's ``Shard(0)``: rank ``r`` holds a contiguous block of rows of every
    tensor, the blocks in rank order). Every rank calls it with ``scores`` of its own rows (the same
    names, in the same order, on every rank; a rank may hold 0 rows of a tensor) and ``shapes``, the
    whole tensors' shapes. The selection is exactly the one :func:`select` makes of the whole
    tensors (the counts are all-reduced, ties ordered by rank, see :mod:`allo.select.topk`); with
    ``granularity="row"`` a row lives on one rank and is scored there whole. Each rank turns its
    part into global flat indices; rank ``dst`` gathers them (one tensor at a time) and gets the
    :class:`Selection` (global shapes, same metadata as :func:`select`); the other ranks get None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("select_shards: torch.distributed is not initialised; for scores of whole tensors "
                           "in one process use select()")
    sources = normalize_scores(scores, "select_shards")
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = [(n, tuple(s.shape)) for n, s in sources.items()]
    every = [None] * world
    dist.all_gather_object(every, mine)
    first_row = {}
    for n, shape in mine:
        if n not in shapes:
            raise ValueError(f"select_shards: scores[{n!r}] has no entry in shapes=; give every tensor's whole shape")
        whole = tuple(shapes[n])
        if not whole:
            raise ValueError(f"select_shards: {n!r} is 0-dimensional; a sharded tensor has rows (dim 0)")
        first_row[n] = 0
    for r, part in enumerate(every):
        if [n for n, _ in part] != [n for n, _ in mine]:
            raise ValueError(f"select_shards: rank {r} passed scores for other names, or in another order, than "
                             f"rank {rank}; every rank must pass its rows of the same tensors in the same order")
        for n, shape in part:
            whole = tuple(shapes[n])
            if shape[1:] != whole[1:]:
                raise ValueError(f"select_shards: rank {r}'s scores[{n!r}] have shape {shape}; rows of {whole} "
                                 "(a dim-0 shard) were expected")
            if r < rank:
                first_row[n] += shape[0]
    for n, whole in ((n, tuple(shapes[n])) for n, _ in mine):
        rows = sum(dict(part)[n][0] for part in every)
        if rows != whole[0]:
            raise ValueError(f"select_shards: the ranks' scores of {n!r} hold {rows} rows together, the tensor "
                             f"{whole[0]}; every row must be on exactly one rank")
    local = select(sources, ratio, exclude_ratio=exclude_ratio, granularity=granularity, metadata=metadata,
                   backend=backend, group=dist.group.WORLD, score_source=score_source)
    indices = {}
    for n, _ in mine:
        per_row = _numel(tuple(shapes[n])[1:])
        part = (local.indices.pop(n) + first_row[n] * per_row).cpu()
        parts = [None] * world if rank == dst else None
        dist.gather_object(part, parts, dst=dst)
        del part
        if rank == dst:
            indices[n] = torch.cat(parts)  # blocks of rows in rank order: still sorted
    if rank != dst:
        return None
    return Selection(indices, {n: tuple(shapes[n]) for n, _ in mine}, local.metadata)


class Selection:
    """A selection of weight elements per parameter: sorted flat int64 ``indices`` and ``shapes``.

    Built directly, ``indices`` maps each parameter name (a str) to a 1-D integer tensor of flat
    (row-major) indices into the tensor of that name's shape, strictly increasing and in range.
    Construction checks only what costs no pass over the indices (names, shapes, dtypes, counts);
    :meth:`save` checks the order and the range before writing, :attr:`masks` the range.
    """

    def __init__(self, indices: dict, shapes: dict, metadata: dict | None = None):
        if set(indices) != set(shapes):
            raise ValueError("Selection: indices and shapes must have the same names")
        for n in shapes:
            _check_name(n, "Selection: indices")
        self.shapes = {n: _check_shape(n, shapes[n]) for n in shapes}
        for n, shape in self.shapes.items():
            _check_index_tensor(n, indices[n], _numel(shape))
        self.indices = {n: indices[n] for n in shapes}
        self.metadata = dict(metadata or {})
        self._masks = None

    @property
    def names(self):
        return list(self.shapes)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """bool masks, built on first access and cached: every access returns the same tensors, so do not
        modify them (the selection is ``indices``; a changed mask would disagree with it and with a saved
        file). Clone one to edit it."""
        if self._masks is None:
            masks = {}
            for n, shape in self.shapes.items():
                idx, total = self.indices[n], _numel(shape)
                # (a negative index would wrap around silently; one too large fails without naming the
                # tensor, on CUDA as a device-side assert)
                if idx.numel():
                    lo, hi = torch.aminmax(idx)
                    if int(lo) < 0 or int(hi) >= total:
                        raise ValueError(f"Selection.masks: the indices of {n!r} fall outside its {total} elements; "
                                         "this Selection was built with bad indices")
                m = torch.zeros(shape, dtype=torch.bool, device=idx.device)
                m.view(-1)[idx] = True
                masks[n] = m
            self._masks = masks
        return self._masks

    def num_selected(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    def num_total(self) -> int:
        return sum(_numel(s) for s in self.shapes.values())

    def to(self, device) -> "Selection":
        return Selection({n: i.to(device) for n, i in self.indices.items()}, self.shapes, self.metadata)

    def __repr__(self):
        return (f"Selection({len(self.shapes)} tensors, {self.num_selected()}/{self.num_total()} elements, "
                f"{self.metadata.get('granularity', '?')}, ratio={self.metadata.get('ratio')})")

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write a safetensors file atomically: ``indices/<name>`` tensors plus string metadata."""
        from safetensors.torch import save_file

        tensors = {}
        for n, shape in self.shapes.items():
            idx = self.indices[n].detach().to("cpu", torch.int64)
            problem = _index_problem(idx, _numel(shape))
            if problem:  # a file that load refuses is not written
                raise ValueError(f"Selection.save: the indices of {n!r} {problem}; this Selection was built with "
                                 "bad indices (each tensor's flat indices sorted, without repeats, each below its "
                                 f"number of elements: torch.unique sorts and deduplicates); {path} is not written")
            small = _numel(shape) < 2**31
            tensors[f"indices/{n}"] = (idx.to(torch.int32) if small else idx).contiguous()
        meta = {"format": FORMAT, "version": VERSION, "names": json.dumps(self.names),
                "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()}),
                "metadata": json.dumps(self.metadata, default=str)}
        with atomic_path(path, what="Selection.save") as tmp:
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str, model=None, *, device="cpu") -> "Selection":
        """Read a file written by :meth:`save`; with ``model`` (nn.Module or name->tensor mapping),
        check that every name exists there with the same shape."""
        with _open(path, "Selection.load") as (f, names, shapes, meta):
            indices = {n: f.get_tensor(f"indices/{n}").to(torch.int64) for n in names}
        for n in names:
            problem = _index_problem(indices[n], _numel(shapes[n]))
            if problem:
                raise ValueError(f"Selection.load: {path}: the indices of {n!r} {problem}; the file is damaged (or "
                                 "not written by Selection.save), write it again")
        sel = cls({n: indices[n].to(device) for n in names}, shapes, json.loads(meta.get("metadata", "{}")))
        if model is not None:
            sel.check(model, source=path)
        return sel

    @staticmethod
    def load_counts(path: str, model=None) -> dict[str, int]:
        """The number of selected elements of every tensor in a file written by :meth:`save`, read
        from its header alone (no index is read); ``model`` as in :meth:`load`."""
        with _open(path, "Selection.load_counts") as (f, names, shapes, _):
            counts = {n: int(f.get_slice(f"indices/{n}").get_shape()[0]) for n in names}
        if model is not None:
            _check_shapes(shapes, model, path)
        return counts

    @staticmethod
    def load_indices(path: str, flat_ranges: dict, model=None, *, device="cpu") -> dict[str, torch.Tensor]:
        """Only part of a file written by :meth:`save`: for each ``name -> (start, stop)`` of
        ``flat_ranges``, the sorted int64 flat indices (into the whole tensor's ``reshape(-1)``) of
        its selected elements in ``[start, stop)``. The stored indices are sorted, so the part is one
        run of them, found by binary search and read alone: a process that trains some rows of every
        tensor (an FSDP2 rank: ``allo.optim.sharding.flat_range``) never holds the rest of the
        selection nor a mask. ``model`` as in :meth:`load`."""
        out = {}
        with _open(path, "Selection.load_indices") as (f, names, shapes, _):
            unknown = [n for n in flat_ranges if n not in shapes]
            if unknown:
                raise ValueError(f"Selection.load_indices: {path} holds no selection for {unknown[:3]} (it has "
                                 f"{names[:3]}{', ...' if len(names) > 3 else ''}); ask only for its tensors")
            for n, (start, stop) in flat_ranges.items():
                total = _numel(shapes[n])
                if not 0 <= start <= stop <= total:
                    raise ValueError(f"Selection.load_indices: range [{start}, {stop}) of {n!r} is not inside its "
                                     f"{total} elements")
                part = f.get_slice(f"indices/{n}")
                size = part.get_shape()[0]
                lo, hi = _lower_bound(part, size, start), _lower_bound(part, size, stop)
                idx = part[lo:hi] if hi > lo else torch.zeros(0)
                out[n] = idx.to(device=device, dtype=torch.int64)
        if model is not None:
            _check_shapes(shapes, model, path)
        return out

    def check(self, model, *, source="Selection") -> None:
        """Fail clearly unless every selected name is a parameter of ``model`` with the same shape."""
        _check_shapes(self.shapes, model, source)

    # -- reports -------------------------------------------------------------------------------
    def summary(self, **kw) -> str:
        from .summary import summary_table

        return summary_table(self, **kw)

    def plot(self, path: str, **kw) -> None:
        """A chart of the selected share per module kind and per layer, in the format ``path``'s suffix
        names (``.png``, ``.pdf``, ``.svg``, ...); see :func:`allo.select.summary.plot_selection`."""
        from .summary import plot_selection

        plot_selection(self, path, **kw)


@contextlib.contextmanager
def _open(path: str, what: str):
    """The open safetensors file of a selection, checked, with its names, shapes and metadata."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} does not exist" + (" as a file" if os.path.exists(path) else ""))
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{what}: {path} is not a readable safetensors file ({e}): it is truncated or damaged; "
                         "write it again with Selection.save") from None
    with handle as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{what}: {path} is not an allo selection file (metadata format="
                             f"{meta.get('format')!r}, expected {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise ValueError(f"{what}: {path} has format version {meta.get('version')!r}; this allo reads "
                             f"version {VERSION}")
        names, shapes = _header(meta, path, what)
        keys = set(f.keys())
        missing = [n for n in names if f"indices/{n}" not in keys]
        if missing:
            raise ValueError(f"{what}: {path} lists {missing[:3]} but holds no indices for them; "
                             "the file is damaged, write it again")
        for n in names:
            part = f.get_slice(f"indices/{n}")
            if part.get_dtype() not in ("I32", "I64") or len(part.get_shape()) != 1:
                raise ValueError(f"{what}: {path}: the indices of {n!r} are a {part.get_dtype()} tensor of shape "
                                 f"{part.get_shape()}, not a 1-D int32/int64 one; the file is damaged, write it again")
        yield f, names, shapes, meta


def _header(meta: dict, path: str, what: str):
    """names (list) and shapes (name -> tuple) from a selection file's metadata, checked."""
    try:
        names = json.loads(meta["names"])
        shapes = {n: tuple(int(d) for d in s) for n, s in json.loads(meta["shapes"]).items()}
        json.loads(meta.get("metadata", "{}"))
        ok = isinstance(names, list) and all(isinstance(n, str) for n in names) and set(names) == set(shapes)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        ok, names = False, repr(e)
    if not ok:
        raise ValueError(f"{what}: {path}: the metadata's names/shapes/metadata fields are missing or do not agree "
                         f"({names if isinstance(names, str) else 'names and shapes differ'}); the file is damaged, "
                         "write it again with Selection.save")
    return names, shapes


def _index_problem(idx: torch.Tensor, total: int) -> str | None:
    """What is wrong with a tensor's flat indices, or None: they must be strictly increasing
    (load_indices' binary search relies on it) and inside its ``total`` elements."""
    chunk = 1 << 24
    for start in range(0, max(idx.numel() - 1, 0), chunk):
        part = idx[start:start + chunk + 1]
        if not bool((part[1:] > part[:-1]).all()):
            return "are not strictly increasing"
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= total):  # sorted: the ends are the extremes
        return f"fall outside its {total} elements"
    return None


_INDEX_DTYPES = (torch.int64, torch.int32)  # what indexing takes (uint8 and bool tensors index as masks)


def _check_name(name, what) -> None:
    if not isinstance(name, str):
        raise TypeError(f"{what} name {name!r} is a {type(name).__name__}; a selection names parameters by str, "
                        "as model.named_parameters() does")


def _check_shape(name: str, shape) -> tuple:
    try:
        dims = tuple(operator.index(d) for d in shape)  # (NumPy ints too; not floats)
    except TypeError:
        dims = None
    if dims is None or any(d < 0 for d in dims):
        raise ValueError(f"Selection: shapes[{name!r}] is {shape!r}; expected a tuple of non-negative ints "
                         "(the parameter's shape)")
    return dims


def _check_index_tensor(name: str, idx, total: int) -> None:
    """What construction can check without a pass over the indices."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype not in _INDEX_DTYPES:
        got = (f"a {idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor)
               else f"a {type(idx).__name__}")
        raise TypeError(f"Selection: indices[{name!r}] is {got}; expected a 1-D int64 (or int32) tensor of flat "
                        "indices")
    if idx.numel() > total:
        raise ValueError(f"Selection: indices[{name!r}] holds {idx.numel()} indices for a tensor of {total} elements; "
                         "each element is selected at most once")


def _lower_bound(part, size: int, value: int) -> int:
    """First position of the sorted stored indices ``part`` (a safetensors slice) holding >= ``value``;
    reads one element per halving."""
    lo, hi = 0, size
    while lo < hi:
        mid = (lo + hi) // 2
        if int(part[mid:mid + 1][0]) < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _check_shapes(shapes: dict, model, source: str) -> None:
    params = dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else dict(model)
    missing = [n for n in shapes if n not in params]
    if missing:
        raise ValueError(f"{source}: {len(missing)} selected parameter(s) are not in the model, e.g. "
                         f"{missing[:3]}; the selection was made for another model (or another naming: "
                         "compare with model.named_parameters())")
    for n, shape in shapes.items():
        if tuple(params[n].shape) != shape:
            raise ValueError(f"{source}: parameter {n!r} has shape {tuple(params[n].shape)} in the model but "
                             f"{shape} in the selection; the selection was made for another model")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


__all__ = ["select_top", "select", "select_shards", "Selection", "row_scores", "band_count"]
