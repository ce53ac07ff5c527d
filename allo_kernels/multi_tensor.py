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

import numpy as np
import torch


def tile_layout(numels, tile: int, device) -> tuple[torch.Tensor, list[int]]:
    """(tensor row of each tile as int32 on ``device``, first tile of each tensor). Empty tensors
    get no tile."""
    counts = (np.asarray(numels, dtype=np.int64).reshape(-1) + (tile - 1)) // tile
    ends = np.cumsum(counts)
    first = (ends - counts).tolist()
    total = int(ends[-1]) if len(ends) else 0
    if torch.device(device).type == "cpu":
        # (the Triton interpreter) torch's CPU repeat_interleave takes milliseconds for 145 tensors
        return torch.from_numpy(np.repeat(np.arange(len(counts), dtype=np.int32), counts)), first
    # built on the device: a 1B-element model has ~10^5 tiles, no need to copy them from the host
    rows = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32, device=device),
                                   upload(torch.from_numpy(counts), device), output_size=total)
    return rows, first


def upload(host: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on ``device``: on CUDA through pinned memory and an asynchronous copy, so that the
    host neither waits for the kernels already queued (a pageable copy synchronizes the stream) nor
    for the copy."""
    if torch.device(device).type == "cuda":
        # torch.empty(pin_memory=True) takes a block from torch's caching host allocator, which keeps it
        # from being reused until the copy has run; host.pin_memory() would do the same but first asks
        # the driver whether the memory is pinned already (aten::is_pinned), which the H100 profile of
        # 2026-11-26 showed at ~0.9 ms a call (1.8 ms of a MaskedAdamW step's 3.2 ms under the profiler)
        staging = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        staging.copy_(host)
        return staging.to(device, non_blocking=True)
    return host


def upload_table(rows, device) -> torch.Tensor:
    """An int64 [len(rows), columns] table (a list of rows, a numpy array or a CPU int64 tensor) on
    ``device`` (pinned, asynchronous copy on CUDA). The caller keeps every tensor whose address is in
    it alive until the kernels that read it have run."""
    if not isinstance(rows, torch.Tensor):
        # one numpy conversion: torch.tensor(list of lists) costs ~1 us per row of Python ints
        rows = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    return upload(rows, device)


def adamw_address_table(rows) -> np.ndarray:
    """The address table of MaskedAdamW's kernels (Triton and C alike), int64 [len(rows), 8]: weight,
    grad, indices, exp_avg, exp_avg_sq, master (0 when absent), selected count k, and a last column
    left 0 (the C path packs dtype codes there). ``rows`` as MaskedAdamW builds them: (weight, grad,
    indices|None, exp_avg, exp_avg_sq, master|None, compact, scalars). Built from a list in one numpy
    call: per-row assignment costs more than the step of a small tensor."""
    return np.array([(w.data_ptr(), g.data_ptr(), 0 if i is None else i.data_ptr(), m.data_ptr(), v.data_ptr(),
                      0 if master is None else master.data_ptr(), m.numel(), 0)
                     for w, g, i, m, v, master, _, _ in rows], dtype=np.int64).reshape(len(rows), 8)
