"""Plain-PyTorch references for the kernels in ``allo.ops``: written for clarity, used by the tests
(in float64) and selectable with ``backend="reference"``. They materialise full fp32 copies of the
logits, which is exactly what the kernels avoid."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log softmax(logits)[label] per token, in fp32 (float64 for float64 logits); 0 where ignored."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    keep = labels != ignore_index
    safe = labels.masked_fill(~keep, 0).long()
    logp = torch.log_softmax(logits.to(acc), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(~keep, 0.0)


def fused_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                ignore_index: int = -100) -> torch.Tensor:
    """``token_logprobs(hidden @ weight.T, labels)`` with the whole logits tensor in memory."""
    return token_logprobs(hidden @ weight.t(), labels, ignore_index)
