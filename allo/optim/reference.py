"""Plain-PyTorch masked AdamW step: the reference the fused kernels are tested against.

Written for clarity, one parameter at a time. It computes in the dtype of ``exp_avg`` (fp32 in the
optimizer's ``reference`` backend, float64 in tests), so the same code is both a working backend and
the high-precision yardstick.
"""

from __future__ import annotations

import math

import torch


def masked_adamw_step_reference(param: torch.Tensor, grad: torch.Tensor, indices: torch.Tensor | None,
                                exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, master: torch.Tensor | None, *,
                                step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                                decay_unselected: bool = False, compact_grad: bool = False) -> None:
    """One AdamW step on the selected elements of ``param``, in place.

    ``indices``: flat indices into ``param.reshape(-1)``, or None for every element. ``exp_avg``,
    ``exp_avg_sq`` (and ``master``, the high-precision copy of the selected elements, when given)
    hold one entry per selected element. ``grad`` is the full gradient, or with ``compact_grad`` the
    selected elements only. ``step`` is the step count after this step (1 on the first).

    Unselected elements are not written, unless ``decay_unselected`` (the authors' behaviour): then
    the whole parameter is multiplied by ``1 - lr * weight_decay`` first.
    """
    compute = exp_avg.dtype
    flat = param.view(-1)
    decay = 1.0 - lr * weight_decay
    if compact_grad or indices is None:
        g = grad.reshape(-1)
    else:
        g = grad.reshape(-1).index_select(0, indices.long())
    g = g.to(compute)

    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)

    if decay_unselected:
        flat.mul_(decay)
    if master is not None:
        p = master.mul(decay)
    elif decay_unselected:  # already decayed with the rest of the tensor
        p = (flat if indices is None else flat.index_select(0, indices.long())).to(compute)
    else:
        p = (flat if indices is None else flat.index_select(0, indices.long())).to(compute) * decay
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    if master is not None:
        master.copy_(p)
    if indices is None:
        flat.copy_(p)
    else:
        flat.index_copy_(0, indices.long(), p.to(param.dtype))
