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
add_param_group; a state dict or step count replaced by hand is seen by identity), the group's
parameter list is the same object holding the same parameters, and each trained parameter has a
gradient of the same kind as then (compact or full, dtype, contiguous, not sparse) and its weight at
the same address. Anything else sends the step down the general path, which builds a new plan.
Groups with sharded (DTensor) parameters, ``decay_unselected`` with weight decay, a parameter with
state but no gradient, or the reference backend always take the general path. Both paths compute
the same scalars with the same float64 formulas, so they give bit-identical results (tested).
"""

from __future__ import annotations

import functools
import math
from operator import is_, itemgetter

import numpy as np


def _bias_correction(t: int, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    """(sqrt(1 - beta2**t), lr / (1 - beta1**t)) for step count t, in Python float64 (numpy's pow may
    differ in the last bit)."""
    return math.sqrt(1.0 - beta2 ** t), lr / (1.0 - beta1 ** t)


def bias_corrections(steps, lr: float, beta1: float, beta2: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_bias_correction` per step count, computed once per distinct count."""
    steps = np.asarray(steps, dtype=np.int64)
    uniq, inverse = np.unique(steps, return_inverse=True)
    bc2, size = np.array([_bias_correction(int(t), lr, beta1, beta2) for t in uniq], dtype=np.float64).reshape(-1, 2).T
    return bc2[inverse], size[inverse]


_STEP = itemgetter("step")
DECAY_COLUMN = 5  # of the scalar table: the factor weights are multiplied by before the update


def scalar_table(steps, *, lr, beta1, beta2, eps, decay) -> np.ndarray:
    """The kernels' [rows, 7] float32 scalars (see allo_kernels.masked_adamw.N_SCAL) for step counts
    ``steps``: 1 - beta1, beta2, 1 - beta2 (float64 on the host), step_size, sqrt of the second bias
    correction, decay, eps. When every count is the same (the usual case) the rows are one row
    broadcast (read-only, stride 0: :func:`rows_of` keeps it so, and the launches then pass the row as
    kernel arguments); the general path copies it before writing into it."""
    steps = np.asarray(steps, dtype=np.int64)
    if len(steps) > 1 and steps.min() == steps.max():
        # one row computed in Python floats: the general formula's numpy work (unique, per-column fills,
        # repeat) cost ~30-60 us, paid by every step before its kernels start
        bc2, size = _bias_correction(int(steps[0]), lr, beta1, beta2)
        row = np.array([1.0 - beta1, beta2, 1.0 - beta2, size, bc2, decay, eps], dtype=np.float64).astype(np.float32)
        return np.broadcast_to(row, (len(steps), 7))
    bc2, size = bias_corrections(steps, lr, beta1, beta2)
    table = np.empty((len(bc2), 7), dtype=np.float64)
    table[:, 0], table[:, 1], table[:, 2] = 1.0 - beta1, beta2, 1.0 - beta2
    table[:, 3], table[:, 4], table[:, DECAY_COLUMN], table[:, 6] = size, bc2, decay, eps
    return table.astype(np.float32)


def rows_of(table: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``table[positions]``, a broadcast table's rows without a copy (still stride 0)."""
    return table[:len(positions)] if table.strides[0] == 0 else table[positions]


class StepPlan:
    """See the module docstring. ``entries``: per trained parameter, in the order its step counts and
    scalars are laid out, ``(param, state, compact, grad dtype, weight address, (exp_avg, exp_avg_sq,
    indices, master))``; ``launches``: kernel
    launches with the entry positions of their rows; ``dense``: per device, the entry positions that
    take torch's fused AdamW (fully selected parameters)."""

    def __init__(self, version: int, params: list, entries: list, launches: list, dense: list, step_slots,
                 backend, state):
        self.version, self.params, self.n_params = version, params, len(params)
        # the group's parameters when the plan was made: the list object can be edited in place
        self.param_snapshot = tuple(params)
        # the optimizer's state mapping and its values (each parameter's state dict) when the plan was made:
        # a state dict replaced by hand shows as a different value (compared by identity, in C: a lookup
        # per entry would hash each parameter in Python)
        self.state, self.state_values = state, list(state.values())
        self.entries, self.launches, self.dense = entries, launches, dense
        # the entries by column, for the native checks (allo._C.plan_gradients)
        self.columns = ([e[0] for e in entries], [e[1] for e in entries], [e[5] for e in entries],
                        [e[4] for e in entries], [e[3] for e in entries], [bool(e[2]) for e in entries])
        self.step_slots = step_slots  # (buffer generation, slot indices) of the entries' step counts
        # each entry's step count (a view into the optimizer's count buffer): a count replaced by hand
        # (state["step"] = torch.tensor(0.)) must be read, as the general path does
        self.step_views = [e[1]["step"] for e in entries]
        self.backend = backend

    def run(self, opt, group, fused_dense) -> bool:
        """Take the group's step if the plan still holds; False (nothing changed) if it does not."""
        if (opt._plan_version != self.version or group["params"] is not self.params or len(self.params) != self.n_params
                or opt.backend != self.backend or (group.get("decay_unselected") and group["weight_decay"] != 0)):
            return False
        if (opt.state is not self.state or len(opt.state) != len(self.state_values)
                or not all(map(is_, opt.state.values(), self.state_values))
                or not all(map(is_, self.params, self.param_snapshot))
                or not all(map(is_, map(_STEP, self.columns[1]), self.step_views))):
            return False
        got = self.gradients(opt._compact)
        if got is None:
            return False
        grads, grad_ptrs = got
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
        for launch, positions in self.launches:
            launch.run(grad_ptrs[positions], rows_of(table, positions))
        return True

    def gradients(self, compact: dict):
        """(the entries' gradients, their data pointers as an int64 array), or None when the plan no longer
        holds: a state tensor replaced (the launch tables hold the old one's address; the plan holds the
        old tensor, so it is never freed under a launch), a gradient missing or of another kind than when
        the plan was made (compact or full, dtype; a full one sparse or not contiguous), a weight moved or
        made a strided view.
        In one call into allo._C when the extension is built (NATIVE_CHECKS), else in Python: the same
        checks, ~1-2 us a parameter in Python, before any kernel of the step can start."""
        native = _native_checks() if NATIVE_CHECKS else None
        if native is not None:
            got = native(*self.columns, compact)
            return None if got is None else (got[0], got[1].numpy())
        grads, grad_ptrs = [], []
        for p, state, is_compact, dtype, weight_ptr, tensors in self.entries:
            if (state["exp_avg"] is not tensors[0] or state["exp_avg_sq"] is not tensors[1]
                    or state.get("indices") is not tensors[2] or state.get("master") is not tensors[3]):
                return None
            if is_compact:
                g = compact.get(p)
                if g is None:
                    return None
            else:
                g = p.grad
                if g is None or (compact and p in compact) or g.is_sparse or not g.is_contiguous():
                    return None
            if g.dtype != dtype or p.data_ptr() != weight_ptr or not p.is_contiguous():
                return None
            grads.append(g)
            grad_ptrs.append(g.data_ptr())
        return grads, np.array(grad_ptrs, dtype=np.int64)


# False: the plan's checks run in Python even where allo._C has them (tests compare the two)
NATIVE_CHECKS = True


@functools.cache
def _native_checks():
    """allo._C.plan_gradients, looked up once; None without a prebuilt extension (never built here) or
    with one built before plan_gradients existed."""
    from allo.ops._extension import extension_if_ready

    return getattr(extension_if_ready(), "plan_gradients", None)
