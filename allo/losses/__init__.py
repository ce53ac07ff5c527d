"""The ALLO losses on per-token log-probs, with TRL's metric names.

    lp = token_logprobs(logits, labels)                       # [B, T] fp32, 0 where ignored
    loss, metrics = dpo_loss(...)      # warm-up (stage 1): plain DPO (sigmoid / ipo / hinge / robust)
    loss, metrics = forget_loss(...)   # stage 2: token-weighted NPO on wrong responses
    loss, metrics = improve_loss(...)  # stage 3: DPO with the rejected response's key tokens only
"""

from allo.ops import token_logprobs

from .forget import forget_loss
from .preference import dpo_loss, improve_loss
from .token_weights import token_weights_from_implicit_reward, token_weights_from_probs, top_fraction_mask

__all__ = [
    "dpo_loss",
    "forget_loss",
    "improve_loss",
    "token_logprobs",
    "token_weights_from_implicit_reward",
    "token_weights_from_probs",
    "top_fraction_mask",
]
