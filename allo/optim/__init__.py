"""Sparse optimizers: :class:`MaskedAdamW` updates only selected elements and keeps state for those only.

Implementations: ``allo_kernels.masked_adamw`` (Triton, CUDA), ``allo.optim._cpu_kernel`` (fused C
loop, CPU) and ``allo.optim.reference`` (plain PyTorch, the yardstick in tests).
:class:`CompactGradClipping` (``allo.optim.trainer_callback``) clips compact gradients under
``transformers.Trainer``.
"""

from allo.optim.compact_embedding import compact_embedding_grads
from allo.optim.compact_rows import compact_row_grads
from allo.optim.masked_adamw import MaskedAdamW
from allo.optim.reference import masked_adamw_step_reference

__all__ = ["CompactGradClipping", "MaskedAdamW", "compact_embedding_grads", "compact_row_grads",
           "masked_adamw_step_reference"]


def __getattr__(name):
    if name == "CompactGradClipping":  # imports transformers: only when asked for
        from allo.optim.trainer_callback import CompactGradClipping

        return CompactGradClipping
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
