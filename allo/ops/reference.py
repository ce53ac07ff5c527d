"""Plain-PyTorch references for the kernels in ``allo.ops``: written for clarity, used by the tests
(in float64) and selectable with ``backend="reference"``. They materialise full fp32 copies of the
logits, which is exactly what the kernels avoid."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log softmax(logits)[label] per token, in fp32 (float64 for float64 logits); 0 where ignored."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    keep = labels != ignore_index
    vocab = logits.shape[-1]
    if vocab < 1:
        raise RuntimeError("token_logprobs: logits' last dimension (the vocabulary) is empty")
    bad = (keep & ((labels < 0) | (labels >= vocab))).reshape(-1).nonzero()
    if len(bad):  # the kernels' check and message, so the backends refuse the same labels alike
        row = int(bad[0])
        raise RuntimeError(f"token_logprobs: labels[{row}] = {int(labels.reshape(-1)[row])} is outside the "
                           f"vocabulary [0, {vocab}) and is not ignore_index ({ignore_index})")
    safe = labels.masked_fill(~keep, 0).long()
    # ignored rows are zeroed before the softmax, as the kernels never read them: a NaN in a padding
    # row must not reach that row's gradient
    logits = logits.to(acc).masked_fill(~keep.unsqueeze(-1), 0.0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(~keep, 0.0)


def fused_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                ignore_index: int = -100) -> torch.Tensor:
    """``token_logprobs(hidden @ weight.T, labels)`` with the whole logits tensor in memory."""
    return token_logprobs(hidden @ weight.t(), labels, ignore_index)
