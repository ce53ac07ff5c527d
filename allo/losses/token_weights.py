"""Which tokens the ALLO losses count: per-token weights for forgetting, key tokens for improving.

Decisions (METHOD.md leaves them to us):

* ``top_fraction_mask`` picks, per row, the ``k = max(1, floor(fraction * n))`` highest-scoring of the
  row's ``n`` masked tokens (``k = 0`` for an empty row). ``floor`` keeps the selection at most the
  stated fraction (as the released code's ``int(...)``), except that at least one token is always
  kept. Ties are broken by position: the earlier token wins (a stable sort), so on the first
  improving step, where every log-ratio is 0, the first ``k`` tokens of the response are chosen
  (the released code kept every tied token instead).
* ``token_weights_from_probs``: ``w_t = 1[p_t < threshold]`` (threshold 0.5) by default, the raw
  ``p_t`` with ``mode="raw"`` (what the released code passes).
* ``token_weights_from_implicit_reward``: with no token-level reward model, the warm-up DPO model's
  implicit token reward ``r_t = log pi_warm(y_t) - log pi_0(y_t)`` marks the tokens DPO learned to
  avoid: per response, the ``fraction`` (default 0.1, like ``eps``) of its tokens with the most
  negative ``r_t``, among tokens with ``r_t < 0`` only (a response DPO did not push down anywhere
  gets no weight, so it does not contribute to the forgetting loss).
"""

from __future__ import annotations

import torch


def _check_fraction(fraction, what):
    if not (0.0 < float(fraction) <= 1.0):
        raise ValueError(f"{what} must be in (0, 1] (a fraction of each response's tokens), got {fraction}")


def top_fraction_mask(scores: torch.Tensor, mask: torch.Tensor, fraction: float, *, what: str = "fraction") -> torch.Tensor:
    """Bool mask of the ``max(1, floor(fraction * n_row))`` highest ``scores`` among ``mask`` per row.

    ``scores`` and ``mask`` are ``[B, T]``; no gradient flows through the choice. Ties: earlier
    position first. Only masked-in positions are counted, so a row with any masked-in token gets its
    ``k`` even when their scores are ``-inf`` and masked-out positions come first. Scores are compared
    in their own precision (fp64 stays fp64; fp16/bf16 are widened to fp32 exactly).
    """
    _check_fraction(fraction, what)
    if scores.shape != mask.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and mask {tuple(mask.shape)} must be the same [B, T] shape")
    mask = mask.bool()
    with torch.no_grad():
        lengths = mask.sum(-1)
        k = torch.floor(lengths.double() * float(fraction) + 1e-9).long().clamp(min=1)
        k = torch.where(lengths > 0, k, torch.zeros_like(k))
        values = scores.detach()
        if values.dtype in (torch.float16, torch.bfloat16, torch.bool):
            values = values.float()
        order = torch.sort(values, dim=-1, descending=True, stable=True).indices
        # walk each row in score order and take its first k masked-in positions: masked-out ones take
        # no place in the count, whatever their score (filling them with -inf instead let them tie with,
        # and come before, masked-in -inf scores)
        in_order = mask.gather(-1, order)
        picked = in_order & (in_order.cumsum(-1) <= k.unsqueeze(-1))
        return torch.zeros_like(mask).scatter_(-1, order, picked)


def token_weights_from_probs(keep_probs: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "threshold",
                             threshold: float = 0.5) -> torch.Tensor:
    """Forgetting weights from a token-level reward model's probability ``p_t`` of keeping each token.

    ``mode="threshold"`` (default): ``w_t = 1[p_t < threshold]``, the tokens the rewriting model would
    change. ``mode="raw"``: ``w_t = p_t``, as the released scripts do. Positions outside ``mask`` get 0.
    """
    if mode == "threshold":
        weights = (keep_probs < threshold).float()
    elif mode == "raw":
        weights = keep_probs.detach().float()
    else:
        raise ValueError(f"token_weights_from_probs: mode must be 'threshold' or 'raw', got {mode!r}")
    if mask is not None:
        weights = weights.masked_fill(~mask.bool(), 0.0)
    return weights


def token_weights_from_implicit_reward(warm_token_logps: torch.Tensor, sft_token_logps: torch.Tensor,
                                       mask: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Forgetting weights (0/1, float) from the warm-up model's implicit token reward.

    Per response, marks the ``max(1, floor(fraction * n))`` tokens whose ``log pi_warm - log pi_0`` is
    most negative, keeping only tokens where it is negative. Inputs are ``[B, T]`` per-token log-probs
    of the response tokens and the response mask.
    """
    if warm_token_logps.shape != sft_token_logps.shape or warm_token_logps.shape != mask.shape:
        raise ValueError(
            f"token_weights_from_implicit_reward: warm_token_logps {tuple(warm_token_logps.shape)}, "
            f"sft_token_logps {tuple(sft_token_logps.shape)} and mask {tuple(mask.shape)} must share a [B, T] shape"
        )
    reward = (warm_token_logps - sft_token_logps).detach()
    negative = mask.bool() & (reward < 0)
    chosen = top_fraction_mask(-reward, mask, fraction, what="token_weights_from_implicit_reward(fraction)")
    return (chosen & negative).float()
