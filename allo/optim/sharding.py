"""FSDP2 shards for MaskedAdamW: a parameter that is a ``DTensor`` sharded along rows.

``torch.distributed.fsdp.fully_shard`` turns every parameter into a DTensor with placement
``Shard(0)`` on a 1-D device mesh: rank ``r`` holds a contiguous block of rows (uneven: the first
ranks get ``ceil(rows / world)``). Masks are given over the GLOBAL parameter (what ``allo.select``
writes), or as only the part of them inside the rank's rows (the global flat indices in
``flat_range(p)``: what ``Selection.load_indices`` reads, so a rank never holds the rest); here they
are cut down to the rank's block. Everything else in the optimizer then works on the local block as
if it were a plain tensor.
"""

from __future__ import annotations

import torch

from allo._dtensor import dtensor_type, flat_range, is_sharded, local, row_block  # noqa: F401 (used through this module too)
from allo.optim.masks import DENSE, EMPTY, index_dtype


def check_placement(p, name: str) -> None:
    """Only FSDP2's layout is understood: ``Shard(0)`` on a 1-D mesh."""
    from torch.distributed.tensor import Shard

    placements = tuple(p.placements)
    if p.device_mesh.ndim != 1 or len(placements) != 1 or type(placements[0]) is not Shard or placements[0].dim != 0:
        raise ValueError(
            f"parameter {name} is a DTensor with placements {placements} on a {p.device_mesh.ndim}-D mesh; "
            "MaskedAdamW supports FSDP2's layout only: Shard(0) on a 1-D mesh (fully_shard without "
            "tensor parallelism or HSDP). Shard the model with fully_shard(module, mesh=1-D mesh)"
        )


def localize(sel, p) -> object:
    """A selection over the global parameter (``DENSE``, ``EMPTY`` or sorted global flat indices)
    turned into one over this rank's block (flat indices into ``p.to_local().reshape(-1)``)."""
    n_local = local(p).numel()
    if n_local == 0 or sel == EMPTY:
        return EMPTY
    if sel == DENSE:
        return DENSE
    lo, hi = flat_range(p)
    # the indices are sorted: the rank's block is one contiguous run of them
    g = sel.to(torch.int64)
    start, stop = torch.searchsorted(g, torch.tensor([lo, hi], device=g.device)).tolist()
    mine = g[start:stop] - lo
    if mine.numel() == 0:
        return EMPTY
    if mine.numel() == n_local:
        return DENSE
    return mine.to(index_dtype(n_local))


def mesh_group(params) -> object | None:
    """The process group of the (single) mesh the sharded parameters live on, or None."""
    groups = {}
    for p in params:
        if is_sharded(p):
            groups[id(p.device_mesh)] = p.device_mesh
    if not groups:
        return None
    meshes = list(groups.values())
    if any(m != meshes[0] for m in meshes[1:]):
        raise ValueError("MaskedAdamW's parameters are sharded over different device meshes; shard the whole model "
                         "over one mesh (one fully_shard mesh for every module)")
    return meshes[0].get_group()
