"""ALLO's forgetting loss: token-weighted NPO on wrong responses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_same_shape, masked_sum

NORMALIZE = ("batch", "sequence")


def forget_loss(policy_tokens: torch.Tensor, ref_tokens: torch.Tensor, token_weights: torch.Tensor, beta: float = 0.1,
                normalize: str = "batch"):
    """``L = -(1 / #{t : w_t != 0}) * sum_t w_t * log sigma(-beta * d_t)``, ``d_t = lp_t(policy) - lp_t(ref)``.

    Args:
        policy_tokens, ref_tokens: per-token log-probs ``[B, T]`` of the wrong responses; the
            reference's are usually computed once before training.
        token_weights: ``[B, T]``; 0 means not counted (prompt, padding, aligned tokens). See
            ``allo.losses.token_weights`` for where weights come from.
        normalize: **decision**: ``"batch"`` (default) divides by the number of non-zero weights in
            the whole batch (each weighted token counts equally, whatever response it is in);
            ``"sequence"`` applies the formula per response and averages over the responses that
            have any weighted token. Both equal METHOD.md's formula for one response. A batch with no
            weighted token gives loss 0 (with a zero gradient).

    Returns:
        ``(loss, metrics)``; metrics: ``forget/weighted_tokens`` (mean per response),
        ``forget/log_ratio`` (mean ``d_t`` over weighted tokens), ``rewards/rejected``
        (``beta * sum_{w_t != 0} d_t``, mean over responses) and ``logps/rejected`` (policy log-prob
        summed over the weighted tokens, mean over responses).
    """
    check_same_shape("forget_loss", policy_tokens=policy_tokens, ref_tokens=ref_tokens, token_weights=token_weights)
    if not beta > 0:
        raise ValueError(f"forget_loss: beta must be > 0, got {beta}")
    if normalize not in NORMALIZE:
        raise ValueError(f"forget_loss: normalize must be 'batch' or 'sequence', got {normalize!r}")
    counted = token_weights != 0
    # Zero d outside the counted tokens *before* the nonlinearity: padding may hold -inf log-probs,
    # and a NaN there would leak into the gradient through 0 * NaN.
    d = torch.where(counted, policy_tokens - ref_tokens, torch.zeros((), dtype=policy_tokens.dtype,
                                                                      device=policy_tokens.device))
    weights = token_weights.to(d.dtype)
    per_token = -weights * F.logsigmoid(-beta * d)
    per_row = masked_sum(per_token, counted)
    row_counts = counted.sum(-1)
    if normalize == "batch":
        loss = per_row.sum() / row_counts.sum().clamp(min=1).to(per_row.dtype)
    else:
        has_tokens = row_counts > 0
        row_losses = per_row / row_counts.clamp(min=1).to(per_row.dtype)
        loss = row_losses.sum() / has_tokens.sum().clamp(min=1).to(per_row.dtype)
    with torch.no_grad():
        ratio_sum = masked_sum(d, counted)
        metrics = {
            "forget/weighted_tokens": row_counts.float().mean(),
            "forget/log_ratio": ratio_sum.sum() / row_counts.sum().clamp(min=1),
            "rewards/rejected": (beta * ratio_sum).mean(),
            "logps/rejected": masked_sum(policy_tokens, counted).mean(),
        }
    return loss, metrics
