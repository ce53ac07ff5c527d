"""A parameter group's optimizer step, kept between steps: MaskedAdamW's fast path.

A MaskedAdamW step over the ~150 tensors of a 1B model spent more time on the host (finding each
parameter's state and gradient, building the kernels' address and scalar tables) than the GPU spent
on a 10% row mask (H100, 2026-11-26: 0.6-0.86 ms of host work against ~0.95 ms of kernel for rows
10%, 0.1 ms for rows 1%), and a step pays for both because the kernels are launched after it. Between
two steps usually nothing changes but the gradients' addresses (often not even those: the caching
allocator hands a step's gradients the blocks of the last step's), the step counts and the
hyper-parameters. A StepPlan records what the general path (``MaskedAdamW._step_group``) worked out
for a group and replays it: one pass over the trained parameters to fetch their gradients and check
that the plan still holds, then a few numpy operations and the launches.

The plan holds while the optimizer's selections and states are the ones it was built from
(MaskedAdamW bumps ``_plan_version`` whenever they change: set_masks, load_state_dict,
add_param_group), the group's parameter list is the same object, and each trained parameter has a
gradient of the same kind as then (compact or full, dtype, contiguous, not sparse) and its weight at
the same address. Anything else sends the step down the general path, which builds a new plan.
Groups with sharded (DTensor) parameters, ``decay_unselected`` with weight decay, a parameter with
state but no gradient, or the reference backend always take the general path. Both paths compute
the same scalars with the same float64 formulas, so they give bit-identical results (tested).
"""

from __future__ import annotations

import math
from operator import is_

import numpy as np


def bias_corrections(steps, lr: float, beta1: float, beta2: float) -> tuple[np.ndarray, np.ndarray]:
    """(sqrt(1 - beta2**t), lr / (1 - beta1**t)) per step count t, in Python float64 as the general
    path computes them (numpy's pow may differ in the last bit), once per distinct count."""
    steps = np.asarray(steps, dtype=np.int64)
    uniq, inverse = np.unique(steps, return_inverse=True)
    bc2 = np.array([math.sqrt(1.0 - beta2 ** int(t)) for t in uniq], dtype=np.float64)
    size = np.array([lr / (1.0 - beta1 ** int(t)) for t in uniq], dtype=np.float64)
    return bc2[inverse], size[inverse]


DECAY_COLUMN = 5  # of the scalar table: the factor weights are multiplied by before the update


def scalar_table(steps, *, lr, beta1, beta2, eps, decay) -> np.ndarray:
    """The kernels' [rows, 7] float32 scalars (see allo_kernels.masked_adamw.N_SCAL) for step counts
    ``steps``: 1 - beta1, beta2, 1 - beta2 (float64 on the host), step_size, sqrt of the second bias
    correction, decay, eps."""
    steps = np.asarray(steps, dtype=np.int64)
    # the usual case, every parameter at the same count: one row, repeated (a step's host time is paid
    # before its kernels start, and this is ~5x cheaper than a row per parameter)
    uniform = len(steps) > 1 and steps.min() == steps.max()
    bc2, size = bias_corrections(steps[:1] if uniform else steps, lr, beta1, beta2)
    table = np.empty((len(bc2), 7), dtype=np.float64)
    table[:, 0], table[:, 1], table[:, 2] = 1.0 - beta1, beta2, 1.0 - beta2
    table[:, 3], table[:, 4], table[:, DECAY_COLUMN], table[:, 6] = size, bc2, decay, eps
    table = table.astype(np.float32)
    return np.repeat(table, len(steps), axis=0) if uniform else table


class StepPlan:
    """See the module docstring. ``entries``: per trained parameter, in the order its step counts and
    scalars are laid out, ``(param, state, compact, grad dtype, weight address, (exp_avg, exp_avg_sq,
    indices, master))``; ``launches``: kernel
    launches with the entry positions of their rows; ``dense``: per device, the entry positions that
    take torch's fused AdamW (fully selected parameters)."""

    def __init__(self, version: int, params: list, entries: list, launches: list, dense: list, step_slots,
                 backend, state):
        self.version, self.params, self.n_params = version, params, len(params)
        # the optimizer's state mapping and its values (each parameter's state dict) when the plan was made:
        # a state dict replaced by hand shows as a different value (compared by identity, in C: a lookup
        # per entry would hash each parameter in Python)
        self.state, self.state_values = state, list(state.values())
        self.entries, self.launches, self.dense = entries, launches, dense
        self.step_slots = step_slots  # (buffer generation, slot indices) of the entries' step counts
        self.backend = backend

    def run(self, opt, group, fused_dense) -> bool:
        """Take the group's step if the plan still holds; False (nothing changed) if it does not."""
        if (opt._plan_version != self.version or group["params"] is not self.params or len(self.params) != self.n_params
                or opt.backend != self.backend or (group.get("decay_unselected") and group["weight_decay"] != 0)):
            return False
        if (opt.state is not self.state or len(opt.state) != len(self.state_values)
                or not all(map(is_, opt.state.values(), self.state_values))):
            return False
        compact = opt._compact
        grads, grad_ptrs = [], []
        for p, state, is_compact, dtype, weight_ptr, tensors in self.entries:
            # the launch tables hold these tensors' addresses (and the plan holds the tensors, so a
            # replaced one is never freed under a launch): any state tensor replaced retires the plan
            if (state["exp_avg"] is not tensors[0] or state["exp_avg_sq"] is not tensors[1]
                    or state.get("indices") is not tensors[2] or state.get("master") is not tensors[3]):
                return False
            if is_compact:
                g = compact.get(p)
                if g is None:
                    return False
            else:
                g = p.grad
                if g is None or (compact and p in compact) or g.is_sparse or not g.is_contiguous():
                    return False
            if g.dtype != dtype or p.data_ptr() != weight_ptr:
                return False
            grads.append(g)
            grad_ptrs.append(g.data_ptr())
        # from here on the step is taken
        generation, slots = self.step_slots
        if generation != opt._step_generation:
            slots = opt._step_slots([(e[0], e[1]) for e in self.entries])
            self.step_slots = (opt._step_generation, slots)
        steps = opt._advance_steps(slots)
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        table = scalar_table(steps, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], decay=1.0 - lr * wd)
        for device, positions in self.dense:
            rows = [(self.entries[i][0], grads[i], self.entries[i][1], int(steps[i])) for i in positions]
            fused_dense(rows, device, lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=wd)
        grad_ptrs = np.array(grad_ptrs, dtype=np.int64)
        for launch, positions in self.launches:
            launch.run(grad_ptrs[positions], table[positions])
        return True
