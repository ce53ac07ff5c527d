"""Fused kernels for per-token log-probabilities (compiled from ``csrc/``).

``token_logprobs(logits, labels)`` and ``fused_linear_token_logprobs(hidden, lm_head_weight, labels)``
are differentiable and match their plain-PyTorch references in ``allo.ops.reference``.
"""

from ._extension import extension_info
from .fused_linear import fused_linear_token_logprobs
from .logprob import load_extension, token_logprobs

__all__ = ["extension_info", "fused_linear_token_logprobs", "load_extension", "token_logprobs"]
