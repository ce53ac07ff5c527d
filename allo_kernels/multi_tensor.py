"""Launching one Triton grid over many tensors: an address table and a tile table.

A model has ~150 weight tensors of very different sizes. A launch per tensor costs a few microseconds
of launch overhead each, more than the work on a small tensor, and leaves SMs idle at every launch
boundary. Instead, one launch covers every tensor of a group: the kernel gets

* a table with one int64 row per tensor (addresses as integers, sizes, per-tensor scalars), which a
  program turns back into typed pointers with ``tl.load(row + c).to(tl.pointer_type(T))``;
* a tile table: for every program, the (int32) row of the tensor it works on. Each tensor is cut into
  tiles of ``tile`` elements, so no tile spans two tensors and no program searches. A program finds
  its first element as ``(program_id - first_tile[tensor]) * tile``, ``first_tile`` being a column of
  the address table.

The same layout serves :mod:`allo_kernels.masked_adamw` (which also caches its block table) and
:mod:`allo_kernels.radix_blocked`.
"""

from __future__ import annotations

import torch


def tile_layout(numels, tile: int, device) -> tuple[torch.Tensor, list[int]]:
    """(tensor row of each tile as int32 on ``device``, first tile of each tensor). Empty tensors
    get no tile."""
    counts = [(int(n) + tile - 1) // tile for n in numels]
    first, total = [], 0
    for c in counts:
        first.append(total)
        total += c
    # built on the device: a 1B-element model has ~10^5 tiles, no need to copy them from the host
    rows = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32, device=device),
                                   torch.tensor(counts, dtype=torch.int64, device=device), output_size=total)
    return rows, first


def upload_table(rows, device) -> torch.Tensor:
    """An int64 [len(rows), columns] table (a list of rows, or a CPU int64 tensor) on ``device``
    (pinned, asynchronous copy on CUDA). The caller keeps every tensor whose address is in it alive
    until the kernels that read it have run."""
    table = rows if isinstance(rows, torch.Tensor) else torch.tensor(rows, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table
