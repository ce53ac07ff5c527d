"""Gradient clipping for ``transformers.Trainer`` when its optimizer is a compact-gradient MaskedAdamW.

Why: Trainer clips with ``torch.nn.utils.clip_grad_norm_`` over ``param.grad``, which compact-gradient
mode frees as soon as the selected elements are gathered; what is left are the full gradients of fully
selected parameters, so Trainer's ``max_grad_norm`` would clip those by their own norm and leave every
compact gradient unclipped. This callback clips the gradients the step uses, by their global norm, right
before each optimizer step (Trainer's ``on_pre_optimizer_step``), and refuses a Trainer that clips too.

    opt = MaskedAdamW(model.named_parameters(), lr=5e-7, masks=masks, compact_grads=True)
    args = TrainingArguments(..., max_grad_norm=0)
    Trainer(model=model, args=args, optimizers=(opt, sched), callbacks=[CompactGradClipping(max_norm=1.0)])
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from allo.optim.masked_adamw import MaskedAdamW


def _masked_adamw(optimizer) -> MaskedAdamW:
    """The MaskedAdamW inside ``optimizer`` (accelerate wraps it in an AcceleratedOptimizer)."""
    seen = optimizer
    while seen is not None and not isinstance(seen, MaskedAdamW):
        seen = getattr(seen, "optimizer", None)
    if seen is None or not seen.compact_grads:
        got = type(optimizer).__name__ if seen is None else "MaskedAdamW with compact_grads=False"
        raise ValueError(f"CompactGradClipping: the Trainer's optimizer must be a MaskedAdamW built with "
                         f"compact_grads=True (got {got}); with dense gradients, Trainer's own max_grad_norm "
                         "clips them: drop this callback")
    return seen


class CompactGradClipping(TrainerCallback):
    """Clip a compact-gradient :class:`MaskedAdamW`'s gradients to total norm ``max_norm`` before every
    optimizer step of a ``transformers.Trainer`` (see the module docstring). The Trainer must not clip
    itself: ``TrainingArguments(max_grad_norm=0)``, else training stops at its start with a ValueError.
    ``last_norm``: the norm before clipping at the latest step.

    Trainer computes the ``grad_norm`` it logs from ``param.grad``, which compact gradients leave empty
    (0.0); this callback writes ``last_norm`` over it in the logs it is given and in
    ``state.log_history`` (the console, ``trainer_state.json``). Reporting integrations (TensorBoard,
    W&B, ...) run before the callbacks given to Trainer, so to give them the compact norm too, build the
    Trainer without it and put it first: ``trainer.callback_handler.callbacks.insert(0, callback)``."""

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0):
        if not (isinstance(max_norm, (int, float)) and max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"CompactGradClipping: max_norm must be a positive finite number, got {max_norm!r}")
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)
        self.last_norm: float | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        _masked_adamw(optimizer)
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            raise ValueError(f"CompactGradClipping: TrainingArguments.max_grad_norm is {args.max_grad_norm}, so Trainer "
                             "also clips, with torch's function, which sees only the fully selected parameters' "
                             "gradients (it would scale those alone); set max_grad_norm=0 and give the norm to "
                             f"CompactGradClipping(max_norm=...) (now {self.max_norm})")

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        total = _masked_adamw(optimizer).clip_grad_norm_(self.max_norm, self.norm_type)
        self.last_norm = float(total)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Trainer logs the grad_norm of the latest step, as last_norm is; its own value saw no gradients
        if logs is None or "grad_norm" not in logs or self.last_norm is None:
            return
        logs["grad_norm"] = self.last_norm
        if state.log_history and state.log_history[-1].get("step") == state.global_step \
                and "grad_norm" in state.log_history[-1]:
            state.log_history[-1]["grad_norm"] = self.last_norm
