"""Turn a user's mask (bool tensor or flat indices) into the optimizer's index set, with clear errors.

A selection is one of three kinds:

* ``DENSE``:  every element is selected (also what a parameter without a mask gets); the state is
  full-size, as in AdamW, and the fast dense kernels run;
* ``EMPTY``:  nothing selected; the parameter holds no state and never changes;
* sorted, unique flat indices (int32 when the parameter has fewer than 2**31 elements, int64
  otherwise: half the bytes to store and to read each step).
"""

from __future__ import annotations

import torch

DENSE = "dense"
EMPTY = "empty"

_INT32_LIMIT = 2**31 - 1


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= _INT32_LIMIT else torch.int64


def normalize_mask(mask, param: torch.Tensor, name: str):
    """Return ``DENSE``, ``EMPTY`` or a sorted unique 1-D index tensor on ``param``'s device.

    ``name`` is how errors refer to the parameter (its name, or ``params[i]``).
    """
    if mask is None:
        return DENSE
    if isinstance(mask, bool):
        return DENSE if mask else EMPTY
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"mask for parameter {name} is a {type(mask).__name__}; pass a bool tensor of the parameter's "
            f"shape {tuple(param.shape)} or a 1-D int64 tensor of flat indices"
        )
    numel = param.numel()
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(
                f"mask for parameter {name} has shape {tuple(mask.shape)} but the parameter has shape "
                f"{tuple(param.shape)}; a bool mask must have the parameter's shape (or pass flat indices)"
            )
        indices = mask.to(param.device).reshape(-1).nonzero().squeeze(1)
    elif mask.dtype in (torch.int64, torch.int32):
        if mask.dim() != 1:
            if tuple(mask.shape) == tuple(param.shape):  # most likely a 0/1 mask made with an integer dtype
                raise ValueError(
                    f"mask for parameter {name} is an {mask.dtype} tensor of the parameter's shape; a mask of that "
                    "shape must be bool (for a 0/1 tensor use mask.bool()); integer masks are 1-D flat indices"
                )
            raise ValueError(
                f"index mask for parameter {name} has shape {tuple(mask.shape)}; flat indices must be a 1-D "
                f"tensor (use mask.reshape(-1), or a bool mask of shape {tuple(param.shape)})"
            )
        if mask.numel():
            lo, hi = int(mask.min()), int(mask.max())
            if lo < 0 or hi >= numel:
                raise ValueError(
                    f"index mask for parameter {name} holds index {lo if lo < 0 else hi}, outside "
                    f"[0, {numel}) (the parameter has {numel} elements; indices are into param.reshape(-1))"
                )
        # in range: narrowed (int32 below 2**31 elements) where the mask is, then moved: the parameter's
        # device never holds the wider copy
        indices = mask.to(dtype=index_dtype(numel)).to(param.device)
        # sorted and unique already (what allo.select and Selection give): one comparison pass instead of a
        # sort (a sort of 10% of a 1B-element model's indices takes seconds on a CPU)
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            indices = indices.sort().values
            if bool((indices[1:] == indices[:-1]).any()):
                raise ValueError(f"index mask for parameter {name} holds duplicate indices; pass each index once")
    else:
        raise TypeError(
            f"mask for parameter {name} has dtype {mask.dtype}; a mask must be a bool tensor of the parameter's "
            f"shape {tuple(param.shape)} or a 1-D int64 tensor of flat indices (for a 0/1 tensor use mask.bool())"
        )
    k = indices.numel()
    if k == 0:
        return EMPTY
    if k == numel:
        return DENSE
    return indices.to(index_dtype(numel))


def same_selection(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b if isinstance(a, str) and isinstance(b, str) else False
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a.to(torch.int64), b.to(torch.int64)))
