"""Shape checks and TRL-named metrics shared by the ALLO losses."""

from __future__ import annotations

import torch


def check_same_shape(what: str, **tensors):
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if any(s != first for s in shapes.values()) or len(first) != 2:
        listed = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"{what}: expected equal [batch, tokens] shapes, got {listed}")


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where(), not multiplication: padded positions may hold -inf or NaN log-probs.
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)


def preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """TRL's DPOTrainer metric names, batch means of detached per-pair values."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }
