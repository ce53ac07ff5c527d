"""Output-layer gradients written straight into MaskedAdamW's compact gradients, a row block at a time.

The fused log-prob head (``allo.ops.fused_linear_token_logprobs``) produces the LM head's ``[V, H]``
weight gradient one block of rows at a time and can hand each finished block to a
``weight_grad_sink`` instead of building the whole gradient for autograd. :func:`compact_row_grads`
makes that sink for a :class:`MaskedAdamW` in compact-grad mode: it gathers the selected elements of
each block (the rows of a ``[V, H]`` weight are contiguous ranges of its sorted flat indices) and adds
them to the optimizer's compact gradient. At Llama-3.2-1B shape with fp32 master weights the head's
dense gradient is 1.05 GB, and with tied embeddings autograd would hold it through the whole
backward, waiting for the embedding's part (which ``compact_embedding_grads`` routes the same way).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary


# sorted flat indices (a selection tensor) -> {(first element, end element): (first position, end position)};
# keyed weakly by the selection tensor, so a new selection never meets stale bounds
_bounds = WeakIdKeyDictionary()


def compact_row_grads(optimizer, weight: torch.Tensor):
    """A ``weight_grad_sink`` for :func:`allo.ops.fused_linear_token_logprobs` that adds the selected
    elements of each finished row block of ``weight``'s gradient to ``optimizer``'s compact gradient.

    ``optimizer`` is a :class:`~allo.optim.MaskedAdamW` with ``compact_grads=True`` holding ``weight``
    (a 2-D ``[V, H]`` output layer). Returns None where the weight's gradient should take the usual
    route or there is none (every element or no element selected, a frozen weight, gradients
    disabled), so the call can be made on every forward::

        sink = compact_row_grads(opt, model.lm_head.weight)
        logp = fused_linear_token_logprobs(hidden, model.lm_head.weight, labels, weight_grad_sink=sink)

    With a sink the weight gets no ``.grad`` from the op; the compact gradient equals what the
    optimizer's hook would gather from the dense gradient (within the rounding of the op's blocks),
    and tied input embeddings (dense, or routed by :func:`~allo.optim.compact_embedding_grads`),
    gradient accumulation, :meth:`~allo.optim.MaskedAdamW.clip_grad_norm_` and ``all_reduce_grads``
    work as with the hook. Ask again after ``set_masks``: a sink serves the selection it was made for.
    """
    from allo.optim import MaskedAdamW

    where = "compact_row_grads(optimizer, weight)"
    if not isinstance(optimizer, MaskedAdamW):
        raise ValueError(f"{where}: optimizer must be a MaskedAdamW built with compact_grads=True "
                         f"(got {type(optimizer).__name__})")
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return None  # no gradient to route (a frozen output layer, or torch.no_grad())
    optimizer._check_routable(where, weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be a [V, H] output layer, got shape {tuple(weight.shape)}")
    indices = optimizer._partial_selection(weight)
    # every element (param.grad kept) or none selected (the hook records it): the usual route
    return None if indices is None else _RowSink(optimizer, weight, indices)


class _RowSink:
    """Holds the optimizer weakly, like MaskedAdamW's own hooks: a discarded optimizer must not keep
    taking gradients."""

    def __init__(self, optimizer, weight: torch.Tensor, indices: torch.Tensor):
        self.opt = weakref.ref(optimizer)
        self.weight, self.indices, self.row_len = weight, indices, weight.shape[1]

    def __call__(self, first_row: int, grad_rows: torch.Tensor) -> None:
        opt = self.opt()
        if opt is None:
            return
        if opt._selection.get(self.weight) is not self.indices:
            # positions into the old selection would land on other elements of the new one
            raise RuntimeError("compact_row_grads: this sink was made for an earlier selection of the weight "
                               "(set_masks or load_state_dict changed it since); call compact_row_grads(opt, weight) "
                               "again, on every forward")
        lo = first_row * self.row_len
        start, end = self._positions(lo, lo + grad_rows.numel())
        if end > start:
            local = self.indices[start:end] - lo  # flat positions inside this block
            values = grad_rows.reshape(-1).index_select(0, local).float()
            opt._add_compact_part(self.weight, values, start=start)

    def _positions(self, lo: int, hi: int) -> tuple[int, int]:
        """The range of ``indices`` that falls in ``[lo, hi)``: one host sync per block and selection,
        then cached (the blocks are the same every step)."""
        cache = _bounds.setdefault(self.indices, {})
        hit = cache.get((lo, hi))
        if hit is None:
            edges = torch.tensor([lo, hi], dtype=self.indices.dtype, device=self.indices.device)
            hit = cache[(lo, hi)] = tuple(torch.searchsorted(self.indices, edges).tolist())
        return hit
