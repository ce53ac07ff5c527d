"""Sequence-level preference losses on per-token log-probs: DPO and ALLO's improving loss.

Inputs are per-token log-probs ``[B, T]`` (fp32; ``allo.ops.token_logprobs``) of the policy and the
frozen reference on the chosen and rejected responses, and response masks ``[B, T]`` (True on scored
response tokens; the prompt is never scored). Each function returns ``(loss, metrics)``: the batch
mean of the per-pair losses and TRL's metric names (``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from allo.loss_options import LOSS_TYPES, label_smoothing_problem

from ._common import check_same_shape, masked_sum, preference_metrics
from .token_weights import top_fraction_mask


def _check_pair(what, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_mask, rejected_mask, beta):
    check_same_shape(what, policy_chosen=policy_chosen, ref_chosen=ref_chosen, chosen_mask=chosen_mask)
    check_same_shape(what, policy_rejected=policy_rejected, ref_rejected=ref_rejected, rejected_mask=rejected_mask)
    if policy_chosen.shape[0] != policy_rejected.shape[0]:
        raise ValueError(f"{what}: {policy_chosen.shape[0]} chosen but {policy_rejected.shape[0]} rejected responses")
    if not beta > 0:
        raise ValueError(f"{what}: beta must be > 0, got {beta}")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """DPO on whole responses: ``h = sum_{y_w} d_t - sum_{y_l} d_t`` with ``d_t = lp_t(policy) - lp_t(ref)``.

    ``sigmoid``: ``-log sigma(beta h)`` (the paper's L_DPO); ``hinge``: ``relu(1 - beta h)``;
    ``ipo``: ``(h - 1/(2 beta))^2`` where, as in TRL, the log-probs are averaged over each response's
    tokens instead of summed (the rewards metrics then use the averages too). ``label_smoothing``
    ``e`` (TRL's, for labels flipped with probability ``e``): ``sigmoid`` becomes conservative DPO,
    ``-(1 - e) log sigma(beta h) - e log sigma(-beta h)``, and ``robust`` is robust DPO,
    ``(-(1 - e) log sigma(beta h) + e log sigma(-beta h)) / (1 - 2e)`` (``e < 0.5``); ``ipo`` and ``hinge``
    take none.
    """
    what = "dpo_loss"
    _check_pair(what, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_mask, rejected_mask, beta)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    problem = label_smoothing_problem(label_smoothing, loss_type)
    if problem:
        raise ValueError(f"dpo_loss: label_smoothing {problem}")
    pc, rc = masked_sum(policy_chosen, chosen_mask), masked_sum(ref_chosen, chosen_mask)
    pr, rr = masked_sum(policy_rejected, rejected_mask), masked_sum(ref_rejected, rejected_mask)
    if loss_type == "ipo":
        n_chosen = chosen_mask.sum(-1).clamp(min=1).to(pc.dtype)
        n_rejected = rejected_mask.sum(-1).clamp(min=1).to(pr.dtype)
        pc, rc, pr, rr = pc / n_chosen, rc / n_chosen, pr / n_rejected, rr / n_rejected
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    h = chosen_ratio - rejected_ratio
    if loss_type in ("sigmoid", "robust"):
        losses = -F.logsigmoid(beta * h)
        if label_smoothing:  # (the flipped label's term only when there is one: this is every step's loss)
            flipped = label_smoothing * F.logsigmoid(-beta * h)
            losses = (1 - label_smoothing) * losses
            losses = losses - flipped if loss_type == "sigmoid" else (losses + flipped) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses.mean(), preference_metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr)


def improve_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, chosen_mask: torch.Tensor, rejected_mask: torch.Tensor, beta: float = 0.1,
                 eps: float = 0.1, *, policy_is_reference: bool = False):
    """ALLO's improving loss: DPO where the rejected response counts only its key tokens.

    ``L = -log sigma(beta * (sum_{t in y_w} d_t - sum_{t in K(y_l)} d_t))``, the reference being the
    model that came out of the forgetting stage. ``K(y_l)``: the rejected response's tokens with the
    largest ``-d_t``, ``max(1, floor(eps * n))`` of its own ``n`` response tokens (not of the padded
    length), chosen afresh on every call with no gradient through the choice; ties go to the earlier
    token (see ``allo.losses.token_weights``). Metrics: TRL's names, with ``rewards/rejected`` over the
    key tokens and ``logps/rejected`` over the whole rejected response, plus ``improve/key_tokens``
    (mean number of key tokens per rejected response).

    ``policy_is_reference``: the policy's weights are the reference's (allo-train: before the stage's
    first optimizer step). Then every ``d_t`` is 0 by definition and the key tokens are the tie rule's,
    the earliest ones, whatever the two log-prob passes' rounding says: on a GPU the policy's pass and
    the cached reference's differ by ~1e-7 (relative), and choosing key tokens by that noise changed
    every trained weight of a 4-step improve stage by up to 4 x lr against a CPU run (H100, run 13;
    reproduced on the CPU by perturbing the reference log-probs by 1e-7). The loss itself still uses
    the computed ``d_t``.
    """
    what = "improve_loss"
    _check_pair(what, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_mask, rejected_mask, beta)
    rejected_ratio_tokens = policy_rejected - ref_rejected
    scores = torch.zeros_like(rejected_ratio_tokens) if policy_is_reference else -rejected_ratio_tokens
    key = top_fraction_mask(scores, rejected_mask, eps, what="improve_loss(eps)")
    chosen_ratio = masked_sum(policy_chosen - ref_chosen, chosen_mask)
    rejected_ratio = masked_sum(rejected_ratio_tokens, key)
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    metrics = preference_metrics(beta * chosen_ratio, beta * rejected_ratio, masked_sum(policy_chosen, chosen_mask),
                                 masked_sum(policy_rejected, rejected_mask))
    metrics["improve/key_tokens"] = key.sum(-1).float().mean()
    return losses.mean(), metrics
