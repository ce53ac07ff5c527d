"""What the ops make, for the tests of memory savings: a TorchDispatchMode that records the op name,
shape and dtype of every tensor an op returns (views excluded: they allocate nothing; in-place ops
included, so a sum into an existing gradient shows as ``add_.Tensor``)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Allocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.made = []  # (op name, shape, dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.made.append((func.__name__, tuple(t.shape), t.dtype))
        return out

    def shaped(self, shape) -> list:
        """(op name, dtype) of what was made with ``shape``."""
        return [(name, dtype) for name, s, dtype in self.made if s == tuple(shape)]
