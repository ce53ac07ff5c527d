"""Where importance scores come from: user tensors, lazy |a - b| between two models, or gradients.

Every score source is handed to the selector as a mapping ``name -> tensor or AbsDiff``. An
:class:`AbsDiff` holds references to the two parameters and never materialises ``|a - b|`` as a whole
tensor: the selection kernels compute it block by block (Triton) or chunk by chunk (CPU).

Sharded models (FSDP2: parameters and gradients are ``DTensor`` s): both score sources work on the
rank's own block of every tensor (``to_local()``), so each rank's scores are its rows of the model;
``allo.select.selection.select_shards`` then selects over all ranks' rows together.
"""

from __future__ import annotations

import re
import warnings
from typing import Iterable, Mapping

import torch

from allo._dtensor import is_sharded, local

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class AbsDiff:
    """Lazy ``|a - b|`` of two same-shaped tensors, evaluated in float32.

    float32 because a delta between two bf16 weights is exactly representable in float32 but would
    often round in bf16, and the ranking should see the true delta.
    """

    __slots__ = ("a", "b")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, *, name: str = "?"):
        for t, which in ((a, "first"), (b, "second")):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"weight_delta_scores: {name!r} of the {which} model is a {type(t).__name__}, not a "
                                "tensor; exclude= that name")
        a, b = local(a), local(b)  # sharded (FSDP2) models: this rank's rows
        if a.shape != b.shape:
            raise ValueError(f"weight_delta_scores: parameter {name!r} has shape {tuple(a.shape)} in the first "
                             f"model and {tuple(b.shape)} in the second; both must hold the same architecture")
        if a.device != b.device:
            raise ValueError(f"weight_delta_scores: parameter {name!r} is on {a.device} in the first model and "
                             f"{b.device} in the second; move both to one device")
        for t, which in ((a, "first"), (b, "second")):
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"weight_delta_scores: parameter {name!r} of the {which} model has dtype {t.dtype}; "
                                "expected float32, bfloat16 or float16")
        self.a = a.detach().contiguous()
        self.b = b.detach().contiguous()

    shape = property(lambda self: self.a.shape)
    device = property(lambda self: self.a.device)
    dtype = property(lambda self: torch.float32)

    def numel(self) -> int:
        return self.a.numel()

    def flat_chunk(self, start: int, stop: int) -> torch.Tensor:
        a = self.a.view(-1)[start:stop]
        b = self.b.view(-1)[start:stop]
        return (a.float() - b.float()).abs_()

    def materialize(self) -> torch.Tensor:
        """The full |a - b| (float32). For tests and small models only."""
        return (self.a.float() - self.b.float()).abs_()


def _compile(patterns, what):
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    expected = "expected a regular expression (str or compiled re.Pattern) or a list of them"
    if isinstance(patterns, (bytes, Mapping)) or not isinstance(patterns, Iterable):
        raise TypeError(f"{what}={patterns!r}: {expected}")
    out = []
    for p in patterns:
        # (a bytes pattern compiles, then fails on the first str name it is searched in)
        if not isinstance(p, str) and not (isinstance(p, re.Pattern) and isinstance(p.pattern, str)):
            raise TypeError(f"{what} pattern {p!r} is a {type(p).__name__}; {expected}")
        try:
            out.append(re.compile(p) if isinstance(p, str) else p)
        except re.error as e:
            raise ValueError(f"{what} pattern {p!r} is not a valid regular expression: {e}") from None
    return out


def name_filter(include=None, exclude=None):
    """A predicate on parameter names: kept when some ``include`` regex matches (``re.search``; all
    names when ``include`` is None) and no ``exclude`` regex matches."""
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")

    def keep(name: str) -> bool:
        if inc and not any(p.search(name) for p in inc):
            return False
        return not any(p.search(name) for p in exc)

    return keep


def _warn_unmatched(include, exclude, names, what) -> None:
    """A pattern that matches no name is most likely a typo (``exclude="embeddings"`` for
    ``embed_tokens``): say so instead of silently scoring what the user meant to leave out."""
    for kind, patterns in (("include", include), ("exclude", exclude)):
        for p in _compile(patterns, kind):
            if not any(p.search(n) for n in names):
                warnings.warn(f"{what}: {kind} pattern {p.pattern!r} matches no parameter name (e.g. "
                              f"{names[:3]}); check it against model.named_parameters()", UserWarning, stacklevel=3)


def _named_tensors(obj, what) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return dict(obj.named_parameters())
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"weight_delta_scores: {what} is a {type(obj).__name__}; expected an nn.Module or a state dict")


def _aliases(tensors: dict) -> dict[str, str]:
    """name -> the earlier name whose tensor it is (same storage, offset, shape and strides): the tied
    weights a state dict lists under every name, which ``named_parameters`` lists once."""
    seen, out = {}, {}
    for n, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
            continue  # no data to share (empty tensors may all have a null data pointer)
        t = local(t)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if key in seen:
            out[n] = seen[key]
        else:
            seen[key] = n
    return out


def weight_delta_scores(a, b, include=None, exclude=None) -> dict[str, AbsDiff]:
    """Lazy ``|theta_a - theta_b|`` per parameter (the ALLO importance score after warm-up).

    ``a`` and ``b`` are ``nn.Module`` s (their ``named_parameters``) or state dicts; for two models
    sharded alike (FSDP2) each ``AbsDiff`` covers this rank's rows (the local shards). The result is in
    the parameter order of the module among ``a`` and ``b`` (``a`` 's when both are modules), else in
    ``a`` 's order: the order in which selection takes equal scores. Tied weights are
    left out, as ``named_parameters`` does: a state-dict name whose tensor is the tensor of an earlier
    name, when the other side ties it to that same name too or does not list it at all (a module, or a
    state dict saved without the duplicates). Names present in
    only one of them, or whose tensors are not floating point, are an error unless filtered out by
    ``include``/``exclude`` (regexes searched in the name). Nothing is computed here.
    """
    keep = name_filter(include, exclude)
    ta, tb = _named_tensors(a, "the first model"), _named_tensors(b, "the second model")
    _warn_unmatched(include, exclude, list(ta), "weight_delta_scores")
    # a tied name is one tensor twice: scored once, as named_parameters does. Dropped where it is tied to
    # the same earlier name in both, or tied on one side and absent from the other (a module's
    # named_parameters, or a state dict saved without duplicates, lists the tensor once); a name that
    # the other side holds as a tensor of its own stays, and its two tensors are compared
    tied_a, tied_b = _aliases(ta), _aliases(tb)
    tied = {n for n, first in tied_a.items() if tied_b.get(n) == first or (n not in tb and first in tb)}
    tied |= {n for n, first in tied_b.items() if n not in ta and first in ta}
    ta = {n: t for n, t in ta.items() if n not in tied}
    tb = {n: t for n, t in tb.items() if n not in tied}
    names = [n for n in ta if keep(n)]
    if isinstance(b, torch.nn.Module) and not isinstance(a, torch.nn.Module):
        # the scores' order is the tie order (select takes equal scores in the mapping's order): a
        # model's parameter order, whichever side it is on, not a state dict's (a safetensors file's
        # keys come back sorted by name)
        order = {n: i for i, n in enumerate(tb)}
        names.sort(key=lambda n: order.get(n, len(order)))
    missing = [n for n in names if n not in tb]
    extra = [n for n in tb if keep(n) and n not in ta]
    if missing or extra:
        raise KeyError("weight_delta_scores: the two models' parameter names differ: "
                       f"only in the first: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                       f"only in the second: {extra[:5]}{'...' if len(extra) > 5 else ''}. "
                       "Pass models of the same architecture, or exclude= those names")
    if not names:
        raise ValueError("weight_delta_scores: no parameter name passes include/exclude")
    return {n: AbsDiff(ta[n], tb[n], name=n) for n in names}


class GradientScoreAccumulator:
    """Accumulates gradient scores while the user runs ``loss.backward()`` on N batches.

    ``mode="accumulated"`` (default, the METHOD's score): ``|sum_n g_n|``, the magnitude of the
    gradient accumulated over the batches. ``mode="sum_of_magnitudes"``: ``sum_n |g_n|``, which does
    not let opposite gradients of different batches cancel.

    Each backward's gradient counts once, whatever ``p.grad`` held before it (a stale gradient from
    before the accumulator, or the earlier batches' when ``free_grads=False`` and the gradients are
    not zeroed between backward passes): a tensor hook folds the gradient that arrives, before it is
    added to ``p.grad``.

    Memory: one ``dtype`` (float32 by default) buffer per tracked parameter. With ``free_grads=True``
    (default) a post-accumulate-grad hook then drops ``p.grad`` right away, so no full gradient
    outlives its backward; do not step an optimizer meanwhile. Call :meth:`remove` (or leave the
    ``with`` block) to detach the hooks; :meth:`scores` stays readable after that.

    On a sharded model (FSDP2: the post-accumulate-grad hook sees the reduced ``DTensor`` gradient of
    the rank's rows; no tensor hook sees it), the buffers and the scores are this rank's rows only,
    and ``p.grad`` is what is folded: with ``free_grads=False`` set the gradients to None between
    backward passes there.

    ``num_backward`` counts the backward passes that reached at least one tracked parameter, each
    once whichever (and however many) of them it reached: the first gradient of a pass to arrive asks
    the autograd engine to count the pass when it ends. A backward run inside another one (reentrant
    checkpointing, ``torch.utils.checkpoint(use_reentrant=True)``) is part of the enclosing pass.
    FSDP2 parameters are folded when FSDP2 hands over their reduced gradient: with gradient sync off
    (``set_requires_gradient_sync(False)`` for accumulation) that is the synced pass only, so the
    count is of reduce steps there (the scores are the same).
    ``dtype``: of the buffers and the scores, float32 (default), bfloat16 or float16 (what
    :func:`select` ranks).
    """

    MODES = ("accumulated", "sum_of_magnitudes")

    def __init__(self, model: torch.nn.Module, include=None, exclude=None, *, mode: str = "accumulated",
                 dtype: torch.dtype = torch.float32, free_grads: bool = True):
        if mode not in self.MODES:
            raise ValueError(f"GradientScoreAccumulator(mode={mode!r}): expected one of {self.MODES}")
        if dtype not in FLOAT_DTYPES:  # an integer one would truncate the gradients, float64 select() refuses
            raise ValueError(f"GradientScoreAccumulator(dtype={dtype!r}): expected torch.float32, torch.bfloat16 "
                             "or torch.float16 (the score dtypes select() ranks)")
        keep = name_filter(include, exclude)
        self.mode, self.dtype, self.free_grads = mode, dtype, free_grads
        self.num_backward = 0
        self._counting: set[int] = set()  # the autograd graph tasks whose end will count a backward pass
        self._buffers: dict[str, torch.Tensor] = {}
        self._handles = []
        named = list(model.named_parameters())
        _warn_unmatched(include, exclude, [n for n, _ in named], "GradientScoreAccumulator")
        self._params = {n: p for n, p in named if p.requires_grad and keep(n)}
        if not self._params:
            raise ValueError("GradientScoreAccumulator: no trainable parameter passes include/exclude")
        for name, p in self._params.items():
            if is_sharded(p):
                self._handles.append(p.register_post_accumulate_grad_hook(self._accumulated_hook(name)))
            else:
                self._handles.append(p.register_hook(self._incoming_hook(name)))
                if free_grads:
                    self._handles.append(p.register_post_accumulate_grad_hook(_drop_grad))

    _finished = False  # scores(in_place=True) turned the buffers into magnitudes: no more folding

    def _buffer(self, name, shape, device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = torch.zeros(shape, dtype=self.dtype, device=device)
        return buf

    def _fold(self, name, g):
        buf = self._buffer(name, g.shape, g.device)
        if g.is_sparse:  # nn.Embedding(sparse=True): a repeated row's entries summed first (|sum|, not sum of |.|)
            g = g.coalesce()
        if self.mode == "accumulated":
            buf.add_(g.to(self.dtype))
        else:
            buf.add_(g.to(self.dtype).abs_())
        self._count_pass()

    def _count_pass(self):
        """Count the running backward pass once, when it ends (an engine callback), whichever tracked
        parameters' gradients it brings: the first gradient of each pass queues the callback."""
        task = torch._C._current_graph_task_id()
        if task < 0:  # a gradient handed over outside any backward pass (no engine to wait for)
            self.num_backward += 1
        elif task not in self._counting:
            self._counting.add(task)
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._pass_ended(task))

    def _pass_ended(self, task):
        self._counting.discard(task)
        outer = torch._C._current_autograd_node()
        if outer is None:
            self.num_backward += 1
        else:
            # a reentrant backward inside node `outer` of an enclosing pass (reentrant checkpointing): that
            # pass counts instead, once `outer` has run (its post hook runs in the enclosing pass)
            outer.register_hook(lambda grad_inputs, grad_outputs: self._count_pass())

    def _incoming_hook(self, name):
        def hook(grad: torch.Tensor | None):
            if grad is not None:  # None: the op routed this weight's gradient elsewhere (row_grad_sink)
                self._fold(name, grad)  # returns None: the gradient goes on to p.grad unchanged
        return hook

    def _accumulated_hook(self, name):
        def hook(p: torch.Tensor):
            if p.grad is None:
                return
            self._fold(name, local(p.grad))
            if self.free_grads:
                p.grad = None
        return hook

    def row_grad_sink(self, param: torch.Tensor):
        """A ``weight_grad_sink`` for ``allo.ops.fused_linear_token_logprobs`` that folds the output
        layer's gradient into ``param``'s score a row block at a time, so backward makes no ``[V, H]``
        gradient for it (1.05 GB in fp32 at Llama-3.2-1B's shape; with tied embeddings autograd held it
        through the whole backward). None (use the usual gradient) where that would change the score:
        a parameter not tracked here or sharded, ``mode="sum_of_magnitudes"`` (``|g|`` of a tied
        weight's two uses must be taken of their sum), ``free_grads=False`` (``p.grad`` is kept and must
        be whole). Made for each forward, like the op's other arguments."""
        name = next((n for n, p in self._params.items() if p is param), None)
        if (name is None or is_sharded(param) or param.dim() != 2 or self.mode != "accumulated"
                or not self.free_grads or not self._handles):
            return None

        def sink(first_row: int, grad_rows: torch.Tensor) -> None:
            if self._finished:  # the buffer holds magnitudes now; folding a signed gradient would corrupt it
                raise RuntimeError("GradientScoreAccumulator: scores(in_place=True) finished this accumulator; a "
                                   "row_grad_sink made before it cannot take a later backward's gradient")
            buf = self._buffer(name, param.shape, grad_rows.device)
            buf[first_row:first_row + grad_rows.shape[0]].add_(grad_rows.to(self.dtype))
            self._count_pass()

        return sink

    def scores(self, *, in_place: bool = False) -> dict[str, torch.Tensor]:
        """Scores per tracked parameter (parameters that never received a gradient score 0): copies, so
        accumulation may go on. ``in_place=True``: the buffers become the scores (the magnitudes taken in
        them), so the scores cost no second copy (``dtype``'s bytes per tracked parameter, beside the
        model on its device); the accumulator is finished then: its hooks are removed, no later backward
        is folded, and a later ``scores()`` gives the same values."""
        magnitudes = self.mode == "sum_of_magnitudes" or self._finished  # the buffers hold magnitudes
        if in_place:
            self.remove()
            self._finished = True
        out = {}
        for name, p in self._params.items():
            buf = self._buffers.get(name)
            if buf is None:
                shard = local(p)
                out[name] = torch.zeros(shard.shape, dtype=self.dtype, device=shard.device)
            elif magnitudes:
                out[name] = buf if in_place else buf.clone()
            else:
                out[name] = buf.abs_() if in_place else buf.abs()
        return out

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def normalize_scores(scores, what="select_top") -> dict:
    """Validate a ``name -> tensor | AbsDiff`` mapping; tensors are made contiguous (no copy if already)."""
    if isinstance(scores, torch.Tensor) or not isinstance(scores, Mapping):
        raise TypeError(f"{what}: scores must be a mapping from parameter name to score tensor, "
                        f"got {type(scores).__name__}; wrap a single tensor as {{'name': tensor}}")
    out = {}
    device = None
    for name, s in scores.items():
        if isinstance(s, AbsDiff):
            pass
        elif isinstance(s, torch.Tensor):
            if s.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{what}: scores[{name!r}] has dtype {s.dtype}; expected float32, bfloat16 or float16")
            # (detach and contiguous only where they change something: ~150 tensors, before the first launch)
            if s.requires_grad:
                s = s.detach()
            if not s.is_contiguous():
                s = s.contiguous()
        else:
            raise TypeError(f"{what}: scores[{name!r}] is a {type(s).__name__}; expected a tensor or an AbsDiff "
                            "(from weight_delta_scores)")
        if device is None:
            device = s.device
        elif s.device != device:
            raise ValueError(f"{what}: scores[{name!r}] is on {s.device} but earlier scores are on {device}; "
                             "put every score on one device")
        out[name] = s
    return out


def flat_chunk(s, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of the flattened scores (a view for tensors, computed for AbsDiff)."""
    if isinstance(s, AbsDiff):
        return s.flat_chunk(start, stop)
    return s.view(-1)[start:stop]


def iter_chunks(s, chunk: int, start: int = 0, stop: int | None = None) -> Iterable[tuple[int, torch.Tensor]]:
    """(first flat index, flat chunk) over elements ``[start, stop)`` of ``s``, ``chunk`` at a time."""
    stop = s.numel() if stop is None else stop
    for first in range(start, stop, chunk):
        yield first, flat_chunk(s, first, min(stop, first + chunk))
