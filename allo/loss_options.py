"""The DPO loss options that both :func:`allo.losses.dpo_loss` and allo-train's configuration
(``allo.train.config``) check: one rule, one message, in a module of their own so that the
configuration checks them without importing the losses and the kernels behind them."""

from __future__ import annotations

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
# the loss types label smoothing applies to: conservative DPO (sigmoid) and robust DPO, as in TRL
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")


def label_smoothing_problem(label_smoothing: float, loss_type: str) -> str | None:
    """What is wrong with ``label_smoothing`` for ``loss_type`` (to follow the option's name in an
    error message), or None."""
    if not 0.0 <= label_smoothing < 0.5:
        return f"is {label_smoothing}; expected a probability in [0, 0.5)"
    if label_smoothing and loss_type not in SMOOTHED_LOSS_TYPES:
        return f"applies to the {' and '.join(SMOOTHED_LOSS_TYPES)} loss types, not {loss_type!r}"
    return None
