"""Input-embedding gradients written straight into MaskedAdamW's compact gradients.

An embedding's backward (``embedding_dense_backward``) makes a dense ``[V, H]`` gradient in which
only the rows of the looked-up tokens are non-zero. For a large vocabulary that is the biggest
gradient of the model (Llama-3.2-1B: 128256 x 2048 fp32 = 1.05 GB), and with tied embeddings it
lives beside the output layer's own ``[V, H]`` gradient, which autograd holds until the embedding's
arrives: two dense copies, only for the compact-grad hook to gather about ``ratio`` of one.

:func:`compact_embedding_grads` routes the embedding's gradient around that: the module's output is
re-attached to a function whose backward sums the output gradient per looked-up row ([rows, H]) and
writes only the selected elements of those rows into the optimizer's compact gradient (the rows of
a ``[V, H]`` weight are contiguous ranges of its sorted flat indices). The weight gets no dense
gradient from the embedding; a tied output layer's gradient still arrives through the usual hook,
and the two are summed in the order autograd would sum them (see ``MaskedAdamW._add_compact_part``).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn



def compact_embedding_grads(embedding: nn.Embedding, optimizer):
    """Make ``embedding``'s weight gradient go straight into ``optimizer``'s compact gradient.

    ``optimizer`` is a :class:`~allo.optim.MaskedAdamW` with ``compact_grads=True`` holding
    ``embedding.weight``. While the weight's selection is partial (a mask, not every or no element),
    each forward with gradients enabled re-attaches the output so that backward adds the selected
    elements of the looked-up rows to the compact gradient and makes no dense ``[V, H]`` gradient;
    otherwise (every element or none selected, ``torch.no_grad()``, a frozen weight) the module
    runs as before. Results equal the dense path's: bit-for-bit for fp32 weights on the CPU (the
    same sums in the same order), within rounding elsewhere. Tied output layers, gradient
    accumulation, :meth:`~allo.optim.MaskedAdamW.clip_grad_norm_` and ``all_reduce_grads`` work
    as before. ``embedding.weight.grad`` stays None for an untied embedding. A selection changed
    between forward and backward (``set_masks``) is honoured: backward gathers the new selection's
    elements, or gives the weight the plain module's dense gradient if it is no longer partial.

    Returns a handle; ``handle.remove()`` restores the plain module.
    """
    from allo.optim import MaskedAdamW

    where = f"compact_embedding_grads(embedding={type(embedding).__name__})"
    if not isinstance(embedding, nn.Embedding) or type(embedding).forward is not nn.Embedding.forward:
        raise TypeError(f"{where}: needs a torch.nn.Embedding whose forward is nn.Embedding's (a subclass that "
                        "changes the output, e.g. scales it, would get wrong gradients); pass "
                        "model.get_input_embeddings() of a model that uses nn.Embedding")
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        raise ValueError(f"{where}: max_norm, scale_grad_by_freq and sparse are not supported (they are "
                         f"{embedding.max_norm}, {embedding.scale_grad_by_freq}, {embedding.sparse}); "
                         "leave them at their defaults or do not route this embedding")
    if not isinstance(optimizer, MaskedAdamW):
        raise ValueError(f"{where}: optimizer must be a MaskedAdamW built with compact_grads=True "
                         f"(got {type(optimizer).__name__})")
    optimizer._check_routable(where, embedding.weight, "embedding.weight")
    return embedding.register_forward_hook(_RouteHook(optimizer), with_kwargs=True)


class _RouteHook:
    """Holds the optimizer weakly, like MaskedAdamW's own hooks: a discarded optimizer must not keep
    taking the embedding's gradients."""

    def __init__(self, optimizer):
        self.opt = weakref.ref(optimizer)

    def __call__(self, module: nn.Embedding, args, kwargs, output: torch.Tensor):
        opt = self.opt()
        weight = module.weight
        if opt is None or not (torch.is_grad_enabled() and weight.requires_grad):
            return None
        if opt._partial_selection(weight) is None:
            return None  # every element (param.grad kept) or none selected: nothing to save
        # the output's values are kept (no second lookup); only its gradient's route changes, and
        # the plain lookup's graph, which would make the dense gradient, is dropped with `output`
        ids = args[0] if args else kwargs["input"]
        return _RoutedEmbedding.apply(output.detach(), weight, ids, module.padding_idx, self)


class _RoutedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, weight, ids, padding_idx, route):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx, ctx.route = weight, padding_idx, route
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        (ids,) = ctx.saved_tensors
        opt = ctx.route.opt()
        weight = ctx.weight
        sel = None if opt is None else opt._partial_selection(weight)
        if sel is not None:
            # the selection now, not the forward's: set_masks between forward and backward is allowed,
            # and the rows' gradient does not depend on it
            part = selected_row_grads(grad_output, ids, sel, weight.shape, ctx.padding_idx)
            opt._add_compact_part(weight, part)
            return None, None, None, None, None
        # the selection stopped being partial since the forward (set_masks / load_state_dict before
        # backward to every or no element; or the optimizer is gone): nothing to route, so give the weight
        # the plain module's dense gradient (nn.Embedding's backward, bit for bit). Returning None here lost
        # it silently: a fully selected weight kept no gradient, an empty one missed its step record
        dense = torch.ops.aten.embedding_dense_backward(
            grad_output, ids, weight.shape[0], -1 if ctx.padding_idx is None else ctx.padding_idx, False)
        return None, dense, None, None, None


def selected_row_grads(grad_output: torch.Tensor, ids: torch.Tensor, indices: torch.Tensor, shape,
                       padding_idx: int | None = None) -> torch.Tensor:
    """The selected elements (sorted flat ``indices`` of a ``shape = [V, H]`` weight) of the
    embedding gradient ``embedding_dense_backward(grad_output, ids)``, as fp32 ``[len(indices)]``,
    without the dense ``[V, H]`` gradient: rows are summed over their tokens by the same kernel as the
    dense embedding backward, in ``grad_output``'s dtype, then the selected elements of those rows are
    gathered (rows of a ``[V, H]`` weight are contiguous ranges of ``indices``)."""
    hidden = shape[1]
    flat_ids = ids.reshape(-1)
    grads = grad_output.reshape(-1, hidden)
    if padding_idx is not None:  # nn.Embedding gives its padding row no gradient
        keep = flat_ids != padding_idx
        flat_ids, grads = flat_ids[keep], grads[keep]
    rows, inverse = torch.unique(flat_ids, sorted=True, return_inverse=True)
    # torch's own embedding backward over the looked-up rows only: on CUDA it sums each row's tokens in a
    # fixed order (sort + segment sums), where index_add_ adds with atomics in whatever order they land,
    # so a step, and a run resumed from a checkpoint, would not be reproducible bit for bit
    row_sums = torch.ops.aten.embedding_dense_backward(grads, inverse, rows.numel(), -1, False)
    # each looked-up row's selected elements: the range of `indices` inside [row * H, (row + 1) * H)
    bounds = torch.stack([rows * hidden, (rows + 1) * hidden]).to(indices.dtype)
    starts, ends = torch.searchsorted(indices, bounds).long()
    counts = ends - starts
    first = torch.cumsum(counts, 0) - counts
    which = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts)
    positions = torch.arange(which.numel(), device=rows.device) - first[which] + starts[which]
    columns = indices[positions].long() - rows[which] * hidden
    part = torch.zeros(indices.numel(), dtype=torch.float32, device=grads.device)
    part[positions] = row_sums[which, columns].float()
    return part
