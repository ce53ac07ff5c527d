"""FSDP2's parameters as allo sees them: a ``DTensor`` sharded along rows (``Shard(0)``), rank ``r``
holding a contiguous block of rows. Shared by the optimizer (allo.optim.sharding), the scores
(allo.select.scores) and the training stages; imports nothing from torch.distributed until a
DTensor is actually there."""

from __future__ import annotations

import functools
import math

import torch


@functools.cache  # looked up once: is_sharded runs per parameter per optimizer step
def dtensor_type():
    """``torch.distributed.tensor.DTensor``, or None when this torch has no distributed package."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(p) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(p, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own block of a DTensor (a view sharing its storage), or ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def row_block(p) -> tuple[int, int]:
    """(first global row, number of rows) of this rank's block of a ``Shard(0)`` DTensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0], shape[0]


def flat_range(p) -> tuple[int, int]:
    """``[start, stop)``: the global flat indices (into the global ``p.reshape(-1)``) of this rank's
    rows of a ``Shard(0)`` DTensor. A selection cut to this range is all the rank needs of it."""
    first_row, rows = row_block(p)
    per_row = math.prod(p.shape[1:])  # from the global shape: indexing a DTensor could communicate
    return first_row * per_row, (first_row + rows) * per_row
