"""MaskedAdamW: AdamW on a selected subset of each parameter's elements, with state for those only."""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections import defaultdict
from operator import attrgetter

import numpy as np
import torch
from torch.optim import Optimizer

from allo._backend import BACKENDS, resolve_backend
from allo.optim import _cpu_kernel, sharding
from allo.optim.masks import DENSE, EMPTY, normalize_mask, same_selection
from allo.optim.reference import masked_adamw_step_reference
from allo.optim.step_plan import DECAY_COLUMN, StepPlan, scalar_table
from allo_kernels.multi_tensor import upload

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_VERSION = attrgetter("_version")
# Fully selected fp32 parameters on CUDA: False (the default), allo's Triton kernel in its dense mode (no
# indices, 16-byte accesses); True, torch's fused AdamW kernel (torch._fused_adamw_). On the H100
# (2026-11-27, run 13; benchmarks/profile_gpu.py, alternated, 973M fp32 parameters in 144 tensors) the
# Triton step took 9.54 ms, torch's kernel 11.23 ms through MaskedAdamW and 11.05 ms as
# torch.optim.AdamW(fused=True). (bf16/fp16 parameters with a master copy always take the Triton kernel;
# the CPU backend always takes torch's fused loop.)
FULL_MASKS_ON_TORCH_FUSED = False


class MaskedAdamW(Optimizer):
    r"""AdamW that updates only selected elements of each parameter and keeps state only for them.

    Arguments follow :class:`torch.optim.AdamW` (``params`` may be tensors, ``(name, tensor)`` pairs
    from ``model.named_parameters()``, or param-group dicts with their own ``lr``/``weight_decay``;
    LR schedulers work as usual), plus:

    masks: which elements each parameter trains. ``None`` (default): every element of every
        parameter (plain AdamW). A list aligned with the parameters in the order the optimizer holds
        them (group after group), or, when the parameters have names, a dict ``name -> mask``;
        parameters a dict does not name are not trained. A mask is a bool tensor of the parameter's
        shape, a 1-D int64 tensor of flat indices into ``param.reshape(-1)``, ``None`` / ``True``
        (every element) or ``False`` (none). Can be (re)set later with :meth:`set_masks`.
    decay_unselected: ``False`` (default): unselected elements stay bit-for-bit unchanged, weight decay
        included. ``True``: the authors' behaviour for ablations: each parameter that takes a step is
        decayed whole, and only selected elements get the Adam update.
    compact_grads: when True, a post-accumulate-grad hook copies the selected gradient elements of
        each partially selected parameter into a compact fp32 buffer (summing over backward passes,
        so gradient accumulation works) and frees ``param.grad`` right away, so full-size gradients
        never all exist at once. :meth:`step` consumes the compact gradients (``model.zero_grad()``
        cannot reach them). Parameters with an empty mask have their gradient freed; fully
        selected ones keep ``param.grad``. Clip with :meth:`clip_grad_norm_` (``param.grad`` is None,
        so ``torch.nn.utils.clip_grad_norm_`` and loss scalers cannot see these gradients) and
        average across ranks with :meth:`all_reduce_grads` before :meth:`step`: the hooks gather
        each rank's own gradient before ``DistributedDataParallel`` could average it, so do not wrap
        the model in DDP. With several processes ``step`` raises unless :meth:`all_reduce_grads` ran
        since the last step (DDP cannot average compact gradients: it writes a dense one back, or, with
        ``find_unused_parameters=True``, as ``transformers.Trainer`` sets on several processes, it finds
        no gradient and leaves each rank its own, silently).
        FSDP2 shards need neither: their hooks see reduce-scattered gradients. The norm it measures is then that of the
        gradients the step uses (selected elements); in dense mode it is every ``param.grad``'s, as
        torch's, so with partial masks the same ``max_norm`` clips more in dense mode than in compact
        mode. ``transformers.Trainer`` clips with torch's function, which would see only the fully
        selected parameters' gradients: set ``max_grad_norm=0`` there and pass
        ``callbacks=[allo.optim.CompactGradClipping(max_norm)]``, which calls this method before each step.
    local_grads: compact-grad mode under several processes, each rank steps on its own gradients on
        purpose (no :meth:`all_reduce_grads`; ``step`` would raise otherwise).
    backend: ``None``/``"auto"`` (Triton on CUDA, fused C loop on CPU), ``"triton"``, ``"cpu"`` or
        ``"reference"`` (plain PyTorch); the environment variable ``ALLO_BACKEND`` sets the default.
    amsgrad, maximize, capturable, differentiable, foreach, fused: ``torch.optim.AdamW``'s, accepted so that
        code spelling out its defaults runs; the first four only as ``False``, ``foreach``/``fused`` are
        ignored (``backend`` picks the kernels).

    State per trained parameter: ``step``, fp32 ``exp_avg`` and ``exp_avg_sq`` with one entry per
    selected element, ``indices`` (sorted flat int32/int64; absent when every element is selected)
    and, for bf16/fp16 parameters, ``master``: an fp32 copy of the selected elements that the update
    is applied to, so that small updates (say lr 5e-7 on bf16) accumulate instead of rounding away.
    A parameter with an empty mask holds no state. Unlike ``torch.optim.AdamW``, which makes state at a
    parameter's first gradient, state is made when a selection is set, for every parameter given:
    leave frozen parameters out of the optimizer (or give them the mask ``False``). As in torch, state
    removed by hand (``opt.state.clear()``, ``del opt.state[p]``) starts afresh at the next step (zero
    moments, step 0), for the same selection.

    The master copy follows the weight: where a bf16/fp16 weight was changed outside the optimizer
    (``model.load_state_dict``, ``torch.nn.init``, any in-place op, which torch records in the tensor's
    version counter) the next step first takes those elements' values into the master copy, so the
    step continues from the new weights (elements the change left equal keep their master value).
    Writes that torch does not record (through ``param.data``) are not seen: call
    :meth:`sync_master_copies` after them. (Sharded FSDP2 parameters are not tracked.)
    Parameters added later with :meth:`add_param_group` train every element until :meth:`set_masks`.

    FSDP2: parameters may be ``DTensor`` shards from ``torch.distributed.fsdp.fully_shard``
    (``Shard(0)`` on a 1-D mesh; other layouts are refused). Masks are still given over the GLOBAL
    parameter (as ``allo.select`` writes them); each rank keeps the part that falls in its rows, and
    its state, compact gradients and :meth:`state_dict` cover those rows only (save and load one
    state dict per rank, with the same number of ranks). :meth:`clip_grad_norm_` combines the ranks'
    norms (every rank must call it); :meth:`all_reduce_grads` leaves shards alone (FSDP2 already
    averaged their gradients). :meth:`selected_count` and :meth:`state_bytes` count this rank's part.

    NaN/inf gradients are not filtered: as in ``torch.optim.AdamW``, they propagate into the moments
    and weights of the selected elements they hit (unselected elements are never read or written).
    Skip such steps upstream (e.g. with a loss scaler) or check the norm from :meth:`clip_grad_norm_`.
    In compact-grad mode loss scalers cannot see the gradients, and to skip a step call this
    optimizer's :meth:`zero_grad`: ``model.zero_grad()`` leaves the compact gradients to the next step.
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, masks=None,
                 decay_unselected: bool = False, compact_grads: bool = False, local_grads: bool = False,
                 backend: str | None = None,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None):
        # torch.optim.AdamW's other arguments, accepted at the values that mean what this optimizer does
        # (code that spells out torch's defaults keeps working); anything else is refused by name
        _check_torch_adamw_options(dict(amsgrad=amsgrad, maximize=maximize, capturable=capturable,
                                        differentiable=differentiable, foreach=foreach, fused=fused), "MaskedAdamW")
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"MaskedAdamW(lr=...): Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        elif isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise TypeError(f"MaskedAdamW(lr={lr!r}): expected a float or a 1-element tensor")
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if backend is not None and backend not in BACKENDS:  # else the first step, much later, would say it
            raise ValueError(f"MaskedAdamW(backend=...) is {backend!r}; expected None or one of {', '.join(BACKENDS)}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decay_unselected=decay_unselected)
        self._selection: dict[torch.Tensor, object] = {}
        self._compact: dict[torch.Tensor, torch.Tensor] = {}
        # compact-size gradient parts that reached a parameter without a full gradient (written by
        # allo.optim.compact_embedding_grads and compact_row_grads), waiting for the parameter's hook or
        # the end of backward
        self._pending: dict[torch.Tensor, torch.Tensor] = {}
        self._hooks: list = []
        self._unhooked: list = []  # compact-grad mode: frozen (requires_grad=False) parameters, not hooked
        self._stepped_without_state: set = set()
        # bf16/fp16 parameters with a master copy -> the weight's version counter when master and weight
        # last agreed: a later in-place change of the weight shows as a new version (see _sync_changed_masters)
        self._weight_versions: dict[torch.Tensor, int] = {}
        self._versions_total = None  # their sum (None: to be computed)
        self.compact_grads = compact_grads
        self.local_grads = local_grads
        self._reduced = False  # all_reduce_grads ran since the last step (see step)
        self.backend = backend
        self._group = None  # process group of the FSDP2 mesh when parameters are sharded
        # Every state["step"] is a 0-dim view into one CPU buffer, so a step advances all counts with
        # one numpy operation instead of one tensor op per parameter (see _advance_steps)
        self._step_buf = torch.zeros(0)
        self._step_np = self._step_buf.numpy()
        self._step_views: list = []
        self._step_slot: dict = {}
        self._step_generation = 0  # bumped when the counts move to a new buffer
        # per group index, the step that group took last (allo.optim.step_plan); _plan_version is
        # bumped whenever selections or states change, which retires every plan
        self._plans: dict = {}
        self._plan_version = 0
        # torch's Optimizer.__init__ adds the groups through add_param_group, which gives a new parameter
        # dense state; here set_masks makes each parameter's state once, for its mask: dense state first
        # would be 8 bytes per parameter (all of AdamW's state) held until the masks replaced it
        self._constructing = True
        super().__init__(params, defaults)
        self._constructing = False
        self.set_masks(masks)

    # ------------------------------------------------------------------ parameters and masks
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _names(self) -> list[str | None]:
        names = []
        for g in self.param_groups:
            names.extend(g.get("param_names", [None] * len(g["params"])))
        return names

    def _label(self, i: int, name: str | None) -> str:
        return repr(name) if name is not None else f"params[{i}]"

    def _label_of(self, p: torch.Tensor) -> str:
        """How errors name parameter ``p`` (found by identity; the loops above have the index at hand)."""
        i = next((j for j, q in enumerate(self._params()) if q is p), -1)
        return self._label(i, self._names()[i] if i >= 0 else None)

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):  # (torch's own check names anything else)
            # torch.optim.AdamW honours these per group; here a group saying maximize=True would be minimised
            _check_torch_adamw_options({k: v for k, v in param_group.items() if k in _TORCH_ADAMW_OPTIONS},
                                       "MaskedAdamW param group")
            for key in ("mask", "masks", "indices"):
                if key in param_group:
                    raise ValueError(f"MaskedAdamW param group: a '{key}' key is not read (the group would train "
                                     "every element); give masks with masks= or set_masks(...) instead")
        super().add_param_group(param_group)
        if hasattr(self, "_plan_version"):
            self._plan_version += 1
        # after __init__ (not during it: see there), a group's new parameters train densely
        if not getattr(self, "_constructing", True) and "params" in param_group:
            names = self._names()
            added = []
            try:
                for i, p in enumerate(self._params()):
                    if p not in self._selection:
                        label = self._label(i, names[i])
                        if sharding.is_sharded(p):
                            sharding.check_placement(p, label)
                        added.append(p)
                        self._select(p, sharding.localize(DENSE, p) if sharding.is_sharded(p) else DENSE, label)
            except Exception:
                # a group that cannot train is not left half-added (its parameters would never train, and
                # adding them again would say they are in a group already)
                self.param_groups.pop()
                for p in added:
                    self._selection.pop(p, None)
                    self.state.pop(p, None)
                    self._untrack_weight(p)
                raise
            self._group = sharding.mesh_group(self._params())
            self._register_hooks()

    def set_masks(self, masks) -> None:
        """Set which elements train (forms as in the class docstring). A parameter whose selection
        changes starts from fresh state (zero moments, step 0); an unchanged one keeps its state (and,
        in compact-grad mode, the compact gradient gathered since the last step). In compact-grad mode
        a selection cannot change between backward and :meth:`step` (the full gradient is gone)."""
        params, names = self._params(), self._names()
        if masks is None:
            chosen = [None] * len(params)
        elif isinstance(masks, dict):
            if any(n is None for n in names):
                raise ValueError(
                    "masks is a dict of names, but the optimizer's parameters have no names; construct it "
                    "with model.named_parameters() (or pass masks as a list aligned with the parameters)"
                )
            position = {n: i for i, n in enumerate(names)}
            twice = sorted({n for n in masks if names.count(n) > 1}) if len(position) < len(names) else []
            if twice:
                raise ValueError(
                    f"masks names {twice[:5]!r}, which more than one of the optimizer's parameters "
                    f"{'has' if len(twice) == 1 else 'have'} (groups built from submodules' named_parameters()?); "
                    "name the parameters uniquely (e.g. with "
                    "the whole model's named_parameters()) or pass masks as a list aligned with the parameters"
                )
            unknown = [k for k in masks if k not in position]
            if unknown:
                known = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                raise KeyError(
                    f"masks names {unknown[:5]!r}, which {'is' if len(unknown) == 1 else 'are'} not a parameter of "
                    f"this optimizer (its parameters: {known}); use the names of model.named_parameters()"
                )
            if not masks and params:
                warnings.warn("MaskedAdamW: masks is an empty dict, so no parameter trains (parameters a dict does "
                              "not name are frozen); pass masks=None to train every element", UserWarning, stacklevel=3)
            chosen = [masks.get(n, False) for n in names]
        elif isinstance(masks, (list, tuple)):
            if len(masks) != len(params):
                raise ValueError(
                    f"masks is a list of {len(masks)} masks, but the optimizer holds {len(params)} parameters; "
                    "give one mask per parameter, in the optimizer's order (group after group)"
                )
            chosen = list(masks)
        else:
            raise TypeError(f"masks must be None, a list or a dict name -> mask, not {type(masks).__name__}")
        selections = []
        for i, (m, p, n) in enumerate(zip(chosen, params, names)):
            label = self._label(i, n)
            if sharding.is_sharded(p):
                sharding.check_placement(p, label)
            sel = normalize_mask(m, p, label)  # over the global shape: what allo.select writes
            selections.append(sharding.localize(sel, p) if sharding.is_sharded(p) else sel)
        self._check_gathered_grads(selections, "set_masks")
        self._group = sharding.mesh_group(params)
        for i, (p, sel) in enumerate(zip(params, selections)):
            self._select(p, sel, self._label(i, names[i]))
        self._register_hooks()

    def _check_gathered_grads(self, selections: list, where: str) -> None:
        """Refuse new selections (aligned with :meth:`_params`) that the gradients gathered in
        compact-grad mode since the last step cannot serve: the hook kept only the old selection's
        elements and freed the full gradient. Dropping them would silently skip the parameter's step."""
        if not (self._compact or self._pending or self._stepped_without_state):
            return
        names = self._names()
        for i, (p, sel) in enumerate(zip(self._params(), selections)):
            gathered = p in self._compact or p in self._pending or p in self._stepped_without_state
            if gathered and sel != EMPTY and not same_selection(self._selection.get(p), sel):
                raise ValueError(
                    f"{where}: parameter {self._label(i, names[i])} would change its selection, but this "
                    "optimizer (compact_grads=True) already gathered its gradient for the old selection and freed "
                    "the full gradient; change selections before backward, or after step() / zero_grad()"
                )

    def _select(self, p: torch.Tensor, sel, label: str) -> None:
        """``sel`` is over ``p``'s local block when ``p`` is sharded (see :mod:`allo.optim.sharding`);
        ``label`` names ``p`` in errors."""
        self._plan_version += 1
        old = self._selection.get(p)
        if old is not None and same_selection(old, sel) and (sel == EMPTY or p in self.state):
            # state and gathered compact gradient still fit; the current index tensor stays too: row sinks
            # (compact_row_grads) made before check it by identity, and state["indices"] is that tensor
            return
        self._selection[p] = sel
        self._compact.pop(p, None)
        self._pending.pop(p, None)
        self.state.pop(p, None)
        self._untrack_weight(p)
        if sel != EMPTY:
            self.state[p] = self._make_state(p, sel, label)

    def _make_state(self, param: torch.Tensor, sel, label: str) -> dict:
        """Fresh state (zero moments, step 0, master copy from the weight) for selection ``sel`` of
        ``param`` (not EMPTY)."""
        p = sharding.local(param)  # state, indices and master copy cover this rank's block only
        if not p.is_contiguous():
            raise _not_contiguous(label, "is not contiguous", "make it contiguous before building the optimizer")
        if p.dtype not in (torch.float32, *_LOW_PRECISION):
            raise TypeError(f"parameter {label} is {p.dtype}; MaskedAdamW trains fp32, bf16 and fp16 parameters")
        k = p.numel() if sel == DENSE else sel.numel()
        state = {"step": torch.tensor(0.0, dtype=torch.float32),
                 "exp_avg": torch.zeros(k, dtype=torch.float32, device=p.device),
                 "exp_avg_sq": torch.zeros(k, dtype=torch.float32, device=p.device)}
        if sharding.is_sharded(param):  # which block the state covers: resuming on another rank fails clearly
            state["shard_rows"] = sharding.row_block(param)
        if sel == DENSE:
            state["exp_avg"] = state["exp_avg"].view(p.shape)
            state["exp_avg_sq"] = state["exp_avg_sq"].view(p.shape)
        else:
            state["indices"] = sel
        if p.dtype in _LOW_PRECISION:
            state["master"] = _master_from_weight(p, None if sel == DENSE else sel)
            self._track_weight(param)
        return state

    # ------------------------------------------------------------------ master copies and the weights
    def _track_weight(self, param: torch.Tensor) -> None:
        """Record that ``param``'s master copy agrees with its weight now."""
        if not sharding.is_sharded(param):
            self._weight_versions[param] = param._version
            self._versions_total = None

    def _untrack_weight(self, param: torch.Tensor) -> None:
        if self._weight_versions.pop(param, None) is not None:
            self._versions_total = None

    def _sync_changed_masters(self) -> None:
        """Before a step: the master copy of every weight changed in place since it last agreed with it
        (its version counter moved) takes the changed elements' values. Version counters only grow, so
        an unchanged sum of them (one pass in C, ~150 parameters) says that none moved."""
        versions = self._weight_versions
        if sum(map(_VERSION, versions)) == self._versions_total:
            return
        for param, version in list(versions.items()):
            if param._version != version:
                state = self.state.get(param)
                if state and "master" in state:
                    _sync_master(param, state)
                    versions[param] = param._version
                else:  # (its state went: removed by hand, or a new selection)
                    del versions[param]
        self._versions_total = sum(map(_VERSION, versions))

    def _note_weight_versions(self) -> None:
        """After a step: the weights agree with their master copies again (the step wrote them; where it
        wrote with torch ops, e.g. the CPU's fused loop for fully selected parameters, their version
        counters moved)."""
        versions = self._weight_versions
        total = sum(map(_VERSION, versions))
        if total != self._versions_total:
            for param in versions:
                versions[param] = param._version
            self._versions_total = total

    @torch.no_grad()
    def sync_master_copies(self) -> None:
        """Take into the fp32 master copies every bf16/fp16 weight element that no longer equals its master
        rounded to the weight's dtype. Steps do this by themselves for changes torch records (in-place ops,
        ``load_state_dict``); call this after writes through ``param.data``, which it does not record."""
        for param, state in self.state.items():
            if state and "master" in state:
                _sync_master(param, state)
                self._track_weight(param)

    def selected_count(self) -> int:
        """Number of elements that train, over all parameters (this rank's blocks of sharded ones)."""
        return sum(sharding.local(p).numel() if s == DENSE else (0 if s == EMPTY else s.numel())
                   for p, s in self._selection.items())

    def state_bytes(self) -> int:
        """Bytes held in optimizer state (moments, indices, master copies)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor) and v.dim() > 0)

    # ------------------------------------------------------------------ compact gradients
    def _register_hooks(self) -> None:
        self.remove_hooks()
        if not self.compact_grads:
            return
        for p in self._params():
            if self._selection.get(p) != DENSE:
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(_CompactHook(self)))
                else:  # no hook can be put on it now (torch refuses); see _hook_unfrozen
                    self._unhooked.append(p)

    def _hook_unfrozen(self) -> None:
        """Parameters frozen when the hooks were registered and trainable since (``requires_grad_()``
        after building the optimizer): hook them now, and take the full gradient a backward may already
        have left them into the compact gradients, so that clipping and the step see only the selected
        elements (and the full gradient is freed)."""
        unfrozen = [p for p in self._unhooked if p.requires_grad]
        if not unfrozen:
            return
        self._unhooked = [p for p in self._unhooked if not p.requires_grad]
        for p in unfrozen:
            self._hooks.append(p.register_post_accumulate_grad_hook(_CompactHook(self)))
            self._compact_hook(p)

    def remove_hooks(self) -> None:
        """Detach the compact-grad hooks from the parameters (also done when the optimizer is freed)."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._unhooked = [], []

    def __del__(self):
        if getattr(self, "_hooks", None):
            self.remove_hooks()

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickle: torch's Optimizer keeps only defaults, state and param_groups, which
        # leaves a MaskedAdamW without its selections. Everything goes but what cannot be copied: the
        # hooks (registered on the copy's parameters in __setstate__), the numpy view of the step
        # counts and the step plans (they hold the original's tensor addresses)
        state = self.__dict__.copy()
        for key in ("_hooks", "_unhooked", "_step_np", "_plans"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_step_buf" in state:  # a whole optimizer (copy or pickle), not torch's load_state_dict
            # pickle restores the step counts' views and their buffer as separate storages (deepcopy
            # keeps them shared): views of a new buffer, values kept
            self._rebuild_step_buffer()
            self._plans, self._hooks, self._unhooked = {}, [], []
            self._plan_version += 1
            self._register_hooks()

    def _compact_hook(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        grad = sharding.local(grad)  # FSDP2: this rank's block of the reduce-scattered gradient
        _check_grad(grad, p, self)
        sel = self._selection.get(p)
        if sel == EMPTY:
            self._stepped_without_state.add(p)
        elif isinstance(sel, torch.Tensor):
            selected = grad.reshape(-1).index_select(0, sel).float()  # int32 indices are fine for index_select
            part = self._pending.pop(p, None)
            if part is not None:
                # a tied weight with one use routed (embedding rows or output-layer blocks) and one dense:
                # one addition of the two parts, as autograd's sum of the dense gradients would be
                selected.add_(part)
            self._merge_compact(p, selected)
        p.grad = None  # the point of compact mode: the full gradient dies as soon as it is read

    def _merge_compact(self, p: torch.Tensor, part: torch.Tensor) -> None:
        held = self._compact.get(p)
        if held is None:
            self._compact[p] = part
        else:
            held.add_(part)

    def _check_routable(self, where: str, p: torch.Tensor, what: str) -> None:
        """What routing ``p``'s gradient into the compact gradients needs (compact_embedding_grads,
        compact_row_grads): compact-grad mode, and ``p`` one of this optimizer's plain parameters."""
        if not self.compact_grads:
            raise ValueError(f"{where}: optimizer must be a MaskedAdamW built with compact_grads=True "
                             "(got MaskedAdamW with compact_grads=False)")
        if p not in self._selection:  # every parameter has a selection (DENSE when unmasked)
            raise ValueError(f"{where}: {what} is not one of the optimizer's parameters; build the optimizer "
                             "with it (a frozen one needs no routing)")
        if sharding.is_sharded(p):
            raise ValueError(f"{where}: {what} is a DTensor shard (FSDP2); routing covers plain parameters "
                             "only, leave sharded ones to the optimizer's hook")

    def row_grad_sink(self, weight: torch.Tensor):
        """``allo.optim.compact_row_grads(self, weight)``: the sink that hands the fused log-prob op's
        output-layer gradient to this optimizer's compact gradients (None: the usual route). The same
        call as ``GradientScoreAccumulator.row_grad_sink``, so a caller can route to either."""
        from allo.optim import compact_row_grads

        return compact_row_grads(self, weight)

    def _partial_selection(self, p: torch.Tensor) -> torch.Tensor | None:
        """``p``'s sorted flat indices when some but not all of its elements are selected, else None
        (every element: the dense gradient is kept; none: the hook records the step): where routing
        its gradient saves something."""
        sel = self._selection.get(p)
        return sel if isinstance(sel, torch.Tensor) else None

    def _add_compact_part(self, p: torch.Tensor, part: torch.Tensor, start: int = 0) -> None:
        """Add ``part`` (fp32, entries ``start, start + 1, ...`` of ``p``'s selected elements), computed
        during backward without a full gradient, to this backward's gradient of ``p``. It is kept aside
        until ``p``'s own hook runs in this backward (its other uses' gradient is added to it there, in
        the order autograd sums them) or, if no full gradient reaches ``p``, until the backward ends;
        so the compact gradient is what the dense path would gather, accumulation included. Parts
        come from allo.optim.compact_embedding_grads (whole) and compact_row_grads (row blocks)."""
        held = self._pending.get(p)
        if held is not None:
            held[start:start + part.numel()].add_(part)
            return
        selected = self._selection[p].numel()
        if start == 0 and part.numel() == selected:
            self._pending[p] = part
        else:
            self._pending[p] = torch.zeros(selected, dtype=torch.float32, device=part.device)
            self._pending[p][start:start + part.numel()] = part
        torch.autograd.Variable._execution_engine.queue_callback(lambda: self._flush_pending(p))

    def _flush_pending(self, p: torch.Tensor) -> None:
        part = self._pending.pop(p, None)
        if part is not None:  # None: p's hook took it
            self._merge_compact(p, part)

    def compact_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """The accumulated compact gradient of ``p`` (compact-grad mode), or None."""
        return self._compact.get(p)

    def _grad_tensors(self, sharded: bool | None = None) -> list[torch.Tensor]:
        """The gradients the next step uses (local blocks of sharded parameters); ``sharded``: only
        those of sharded (True) or of plain (False) parameters."""
        grads = []
        for p in self._params():
            if sharded is not None and sharding.is_sharded(p) != sharded:
                continue
            if p in self._compact:
                grads.append(self._compact[p])
            elif p.grad is not None:
                grads.append(sharding.local(p.grad))
        return grads

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> torch.Tensor:
        """Clip the gradients the next step will use to total norm ``max_norm``; return the norm.

        In compact-grad mode these are the compact gradients (selected elements) plus the full
        gradients of fully selected parameters; otherwise every ``param.grad`` (as
        ``torch.nn.utils.clip_grad_norm_`` over the optimizer's parameters would).

        FSDP2 (sharded parameters): each rank holds disjoint blocks of the gradients, so the norms of
        the blocks are combined across the mesh (one all-reduce, which every rank must call), and the
        result is the norm a single process would compute over the whole gradients. Gradients of
        plain (replicated) parameters are counted once.
        """
        if self._unhooked:
            self._hook_unfrozen()
        if self._group is None:
            grads = self._grad_tensors()
            if not grads:
                return torch.tensor(0.0)
            total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
        else:
            grads = self._grad_tensors()
            total = self._sharded_total_norm(float(norm_type), error_if_nonfinite, foreach)
            if not grads:
                return total
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        by_device = defaultdict(list)
        for g in grads:
            by_device[g.device].append(g)
        for device, gs in by_device.items():
            torch._foreach_mul_(gs, coef.to(device))
        return total

    def _sharded_total_norm(self, norm_type: float, error_if_nonfinite: bool, foreach) -> torch.Tensor:
        import torch.distributed as dist

        sharded, plain = self._grad_tensors(sharded=True), self._grad_tensors(sharded=False)
        device = (sharded or plain or [None])[0]
        device = device.device if device is not None else torch.device(self._mesh_device_type())

        def norm(gs):
            gs = [g for g in gs if g.numel()]  # a rank may hold 0 rows of a parameter (inf norm refuses empties)
            if not gs:
                return torch.zeros((), dtype=torch.float32, device=device)
            return torch.nn.utils.get_total_norm(gs, norm_type, False, foreach).float().to(device)

        if math.isinf(norm_type):
            part = norm(sharded)
            dist.all_reduce(part, op=dist.ReduceOp.MAX, group=self._group)
            total = torch.maximum(part, norm(plain))
        else:
            part = norm(sharded) ** norm_type  # disjoint blocks: the p-th powers add up
            dist.all_reduce(part, group=self._group)
            total = (part + norm(plain) ** norm_type) ** (1.0 / norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"The total norm of order {norm_type} for gradients is non-finite, so it cannot be "
                               "clipped. To disable this error and scale the gradients by the non-finite norm "
                               "anyway, set `error_if_nonfinite=False`")
        return total

    def _mesh_device_type(self) -> str:
        for p in self._params():
            if sharding.is_sharded(p):
                return p.device_mesh.device_type
        return "cpu"

    @torch.no_grad()
    def all_reduce_grads(self, group=None) -> None:
        """Average the gradients the next step will use across the ranks of ``group`` (one flat
        all-reduce per device and dtype). Use instead of DDP's gradient sync in compact-grad mode.
        Every rank must call it. As in DDP, a parameter that has no gradient on a rank (a branch its
        batch did not reach) counts as zeros there, and gets the average if any rank had a gradient.

        Sharded (FSDP2) parameters are left out: FSDP2 already reduce-scattered (averaged) their
        gradients in backward, and each rank holds a different block, so for a fully sharded model
        this is a no-op. Only plain parameters next to them (e.g. ones FSDP ignores) are averaged."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce_grads needs torch.distributed to be initialized (init_process_group)")
        if self._unhooked:
            self._hook_unfrozen()
        world = dist.get_world_size(group)
        # Every trained plain parameter takes part on every rank, in the optimizer's order, zeros standing
        # in where this rank has no gradient (a branch or expert its batch did not reach), as DDP does:
        # otherwise the ranks' flat buffers would pair different parameters' gradients (or differ in
        # size). Each bucket ends with a flag per parameter (1: this rank has its gradient); a parameter
        # no rank has a gradient for keeps none.
        buckets = defaultdict(list)  # (device, dtype) -> [(param, its gradient or None, shape)]
        for p in self._params():
            sel = self._selection.get(p)
            if sharding.is_sharded(p) or not p.requires_grad or (isinstance(sel, str) and sel == EMPTY):
                continue
            if self.compact_grads and isinstance(sel, torch.Tensor):  # fp32, one per selected element
                g, dtype, shape = self._compact.get(p), torch.float32, (sel.numel(),)
            else:
                g, dtype, shape = p.grad, p.dtype, tuple(p.shape)
            buckets[(p.device, dtype)].append((p, g, shape))
        for (device, dtype), entries in buckets.items():
            parts = [g.reshape(-1).to(dtype) if g is not None else torch.zeros(math.prod(shape), dtype=dtype,
                                                                               device=device)
                     for _, g, shape in entries]
            parts.append(torch.tensor([g is not None for _, g, _ in entries], dtype=dtype, device=device))
            flat = torch.cat(parts)
            dist.all_reduce(flat, group=group)
            flat.div_(world)
            missing = any(g is None for _, g, _ in entries)  # only then the flags are read (a host sync)
            offset, present = 0, (flat[-len(entries):] > 0).tolist() if missing else [True] * len(entries)
            for (p, g, shape), anywhere in zip(entries, present):
                value = flat[offset:offset + math.prod(shape)].view(shape)
                offset += value.numel()
                if g is not None:
                    g.copy_(value)
                elif anywhere:
                    if self.compact_grads and isinstance(self._selection.get(p), torch.Tensor):
                        self._compact[p] = value.clone()
                    else:
                        p.grad = value.clone()
        self._reduced = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._pending.clear()
        self._reduced = False
        if set_to_none:
            self._compact.clear()
        else:
            for g in self._compact.values():
                g.zero_()
        self._stepped_without_state.clear()

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._unhooked:
            self._hook_unfrozen()
        if self._compact and _several_processes():  # DDP needs them; one process never pays the check
            for p in self._compact:
                if p.grad is not None:
                    self._raise_dense_grad_after_compact(p)
            if not (self._reduced or self.local_grads) and not all(sharding.is_sharded(p) for p in self._compact):
                self._raise_unreduced_compact_grads()
        if self._weight_versions:
            self._sync_changed_masters()
        for i, group in enumerate(self.param_groups):
            plan = self._plans.get(i)
            if plan is None or not plan.run(self, group, _fused_dense):
                self._step_group(i, group)
        if self._weight_versions:
            self._note_weight_versions()
        # The step consumes the compact gradients: model.zero_grad() (what transformers.Trainer calls)
        # cannot reach them, and they must not leak into the next step.
        self._compact.clear()
        self._pending.clear()
        self._stepped_without_state.clear()
        self._reduced = False
        return loss

    def _restored_state(self, param: torch.Tensor) -> dict | None:
        """State for a parameter that has none: fresh state for its selection when that was removed by
        hand (torch's optimizers start such a parameter afresh too), None when nothing is selected."""
        sel = self._selection.get(param)
        if sel is not None and sel == EMPTY:
            return None
        label = self._label_of(param)
        if sel is None:
            raise ValueError(
                f"parameter {label} is in the optimizer's param_groups but was never given to it "
                "(put into a group's 'params' list by hand?); add parameters with add_param_group"
            )
        state = self.state[param] = self._make_state(param, sel, label)
        return state

    def _state_does_not_fit(self, param: torch.Tensor, state: dict) -> Exception:
        """The error for a parameter whose dtype or device changed after its state was made."""
        p = sharding.local(param)
        was = "bf16/fp16 (it has a master copy)" if "master" in state else "fp32"
        return RuntimeError(
            f"parameter {self._label_of(param)} is now {p.dtype} on {p.device}, but its optimizer state was made "
            f"for a {was} parameter on {state['exp_avg'].device} (model.to(...) after building the optimizer?); "
            "build MaskedAdamW after moving or casting the model, or load a state dict saved for it"
        )

    def _raise_unreduced_compact_grads(self) -> None:
        import torch.distributed as dist

        raise RuntimeError(
            f"compact gradients were not averaged across the {dist.get_world_size()} processes: call "
            "opt.all_reduce_grads() after the backward passes and before step(). DistributedDataParallel cannot "
            "average them (with find_unused_parameters=True, which transformers.Trainer sets on several "
            "processes, it finds no gradient and leaves each rank its own): do not wrap the model in DDP in compact "
            "mode, or use compact_grads=False there. To step each rank on its own gradients on purpose, build the "
            "optimizer with local_grads=True"
        )

    def _raise_dense_grad_after_compact(self, p: torch.Tensor) -> None:
        """A compact gradient and a dense one written after the hook took it: DistributedDataParallel
        does that (its reducer writes the averaged gradient back at the end of backward). The compact
        one is this rank's alone; stepping on it would let the ranks' weights drift apart, silently."""
        raise RuntimeError(
            f"parameter {self._label_of(p)} has a compact gradient and also a dense .grad written "
            "after compact mode took its gradient; DistributedDataParallel does this (it averages a dense copy at "
            "the end of backward, after the compact gradients were gathered). Do not wrap the model in DDP in "
            "compact mode: call opt.all_reduce_grads() after the backward passes and before step() instead (or "
            "use compact_grads=False with DDP)"
        )

    def _advance_steps(self, slots: np.ndarray) -> np.ndarray:
        """Add 1 to the step counts at ``slots`` of ``_step_buf`` (from :meth:`_step_slots`); return the
        new counts (int64).

        The counts stay 0-dim float32 CPU tensors, as in torch.optim.AdamW, but are views into one
        buffer (``_step_buf``), so this is one numpy operation rather than ~150 tensor ops (whose
        dispatch cost more than the whole GPU update of a 10% row mask)."""
        self._step_np[slots] += 1
        return self._step_np[slots].astype(np.int64)

    def _step_slots(self, entries: list) -> np.ndarray:
        """Positions of the step counts of ``(param, state)`` entries in ``_step_buf``. A state whose
        ``step`` is not (or no longer) a view of it, e.g. new after :meth:`set_masks` or
        :meth:`load_state_dict`, makes every state's count move into a new buffer first, values kept."""
        slots = []
        for param, state in entries:
            slot = self._step_slot.get(param)
            if slot is None or state["step"] is not self._step_views[slot]:
                self._rebuild_step_buffer()
                slots = [self._step_slot[q] for q, _ in entries]
                break
            slots.append(slot)
        return np.asarray(slots, dtype=np.int64)

    def _rebuild_step_buffer(self) -> None:
        live = [(p, st) for p, st in self.state.items() if "step" in st]
        buf = torch.tensor([float(st["step"]) for _, st in live], dtype=torch.float32)
        views = list(buf.unbind())  # 0-dim views sharing buf's memory, as is its numpy array
        for (_, st), view in zip(live, views):
            st["step"] = view
        self._step_buf, self._step_np, self._step_views = buf, buf.numpy(), views
        self._step_slot = {p: i for i, (p, _) in enumerate(live)}
        self._step_generation += 1

    def _step_group(self, gi: int, group: dict) -> None:
        """The general path of a group's step; also records the plan that later steps replay
        (allo.optim.step_plan) when the group allows one."""
        self._plans.pop(gi, None)
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        decay_unselected = group.get("decay_unselected", False)
        decay = 1.0 - lr * wd
        rows_by_backend = defaultdict(list)
        dense_rows = defaultdict(list)
        stepping = []
        # this loop runs per parameter per step: look things up once (a tensor's hash is a Python call)
        compact_grads, without_state = self._compact, self._stepped_without_state
        dtensor = sharding.dtensor_type()
        all_state = self.state
        # a plan (allo.optim.step_plan) needs every parameter with state to step, no DTensor, and no
        # decay of unselected elements
        plannable = not (decay_unselected and wd != 0)
        for p in group["params"]:
            state = all_state.get(p)
            if not state:  # None, or {} where opt.state[p] was read (a defaultdict), or removed by hand
                state = self._restored_state(p)
            compact = bool(compact_grads) and p in compact_grads
            grad = compact_grads[p] if compact else p.grad
            # FSDP2: the rank's block of the weight and of the (reduce-scattered) gradient; the
            # selection and state were made for that block
            param = p
            if dtensor is not None and isinstance(p, dtensor):
                p = p.to_local()
                grad = None if grad is None else sharding.local(grad)
                plannable = False
            if state is not None and grad is None:
                plannable = False
            if state is None:
                stepped_without_state = bool(without_state) and param in without_state
                if decay_unselected and wd != 0 and (grad is not None or stepped_without_state):
                    p.mul_(decay)  # authors' behaviour: decay even where nothing is selected
                continue
            if grad is None:
                continue
            _check_grad(grad, param, self)
            if ("master" in state) != (p.dtype in _LOW_PRECISION) or state["exp_avg"].device != p.device:
                raise self._state_does_not_fit(param, state)
            if not p.is_contiguous():  # (e.g. p.data replaced by a transposed view after construction)
                raise _not_contiguous(self._label_of(param), "is no longer contiguous",
                                      "keep it contiguous (p.data = p.data.contiguous())")
            stepping.append((param, p, state, grad, compact))
        if not stepping:
            return
        # per-parameter host work is what a step of many small tensors costs: batch what can be batched
        slots = self._step_slots([(param, state) for param, _, state, _, _ in stepping])
        steps = self._advance_steps(slots).tolist()
        # the kernels' scalars per stepping parameter, computed as the plan computes them
        table = np.array(scalar_table(steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, decay=decay))  # (writable)
        backends = {}
        positions_by_backend = defaultdict(list)  # each row's position in `stepping`, for the plan
        dense_positions = defaultdict(list)
        for i, ((_, p, state, grad, compact), step) in enumerate(zip(stepping, steps)):
            indices = state.get("indices")
            master = state.get("master")
            backend = backends.get(p.device)
            if backend is None:
                backend = backends[p.device] = resolve_backend(self.backend, p.device, what="MaskedAdamW")
            if indices is None and not compact and (backend == "cpu" or (
                    backend == "triton" and p.device.type == "cuda" and master is None and FULL_MASKS_ON_TORCH_FUSED)):
                # every element selected, on the CPU (or on CUDA with FULL_MASKS_ON_TORCH_FUSED): torch's own
                # fused AdamW kernel (one multi-tensor pass)
                dense_rows[p.device].append((p, grad, state, step))
                dense_positions[p.device].append(i)
                continue
            kernel_decay = decay
            if decay_unselected and indices is not None and wd != 0:
                p.mul_(decay)  # unselected elements; selected ones are rewritten from the update below
                if master is None:
                    kernel_decay = table[i, DECAY_COLUMN] = 1.0  # the kernel reads the weight, already decayed
            if backend == "reference":
                plannable = False
                masked_adamw_step_reference(p.detach(), grad, indices, state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                                            None if master is None else master.view(-1), step=step, lr=lr, beta1=beta1,
                                            beta2=beta2, eps=eps, weight_decay=wd if kernel_decay != 1.0 else 0.0,
                                            compact_grad=compact)
                continue
            grad = grad if compact or grad.is_contiguous() else grad.contiguous()
            rows_by_backend[backend].append((p, grad, indices, state["exp_avg"], state["exp_avg_sq"], master, compact,
                                             table[i]))
            positions_by_backend[backend].append(i)
        for device, rows in dense_rows.items():
            _fused_dense(rows, device, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd)
        launches = []  # (launch, positions of its rows in `stepping`)
        if rows_by_backend.get("cpu"):
            launches.append((_cpu_kernel.Launch(rows_by_backend["cpu"]), np.asarray(positions_by_backend["cpu"])))
        if rows_by_backend.get("triton"):
            from allo_kernels.masked_adamw import Launch, bucket_rows

            rows, positions = rows_by_backend["triton"], np.asarray(positions_by_backend["triton"])
            for key, js in bucket_rows(rows).items():
                launches.append((Launch(key, [rows[j] for j in js]), positions[js]))
        for launch, positions in launches:
            launch.run(None, table[positions])
        if plannable:
            entries = [(param, state, compact, grad.dtype, p.data_ptr(),
                        (state["exp_avg"], state["exp_avg_sq"], state.get("indices"), state.get("master")))
                       for param, p, state, grad, compact in stepping]
            self._plans[gi] = StepPlan(self._plan_version, group["params"], entries, launches,
                                       [(d, pos) for d, pos in dense_positions.items()],
                                       (self._step_generation, slots), self.backend, self.state)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch's layout (``state`` by parameter id, ``param_groups``); each trained parameter's
        state carries its index set, so the masks travel with the checkpoint."""
        sd = super().state_dict()
        # the step counts are views into one live buffer (see _advance_steps): hand out copies, so a
        # saved or kept state dict does not change with later steps
        sd["state"] = {pid: {**st, "step": st["step"].clone()} if isinstance(st.get("step"), torch.Tensor) else st
                       for pid, st in sd["state"].items()}
        # a selected parameter whose state was removed by hand (opt.state.clear(), or del opt.state[p])
        # starts afresh at the next step; its fresh state is saved, so that the selection travels too (a
        # missing entry loads as nothing selected)
        ids = [pid for g in sd["param_groups"] for pid in g["params"]]
        # which rows of each sharded parameter this rank held, with state or without (a rank with no selected
        # element there saves none): loading into another rank, another world size or a whole model is refused
        rows = {pid: list(sharding.row_block(p)) for pid, p in zip(ids, self._params()) if sharding.is_sharded(p)}
        if rows:
            sd["shard_rows"] = rows
        for pid, param in zip(ids, self._params()):
            sel = self._selection.get(param)
            if pid not in sd["state"] and sel is not None and not (isinstance(sel, str) and sel == EMPTY):
                sd["state"][pid] = self._make_state(param, sel, self._label_of(param))
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`: masks, compact state and hyper-parameters. The masks are the saved
        ones (a resumed run continues its own selection): those given to the constructor or to
        :meth:`set_masks` before are replaced; call :meth:`set_masks` after loading to change them.
        Tensors keep their saved dtypes (torch's loader would cast fp32 moments to a bf16 parameter's
        dtype, which would break bit-for-bit resume), and move to each parameter's device. As in torch, pre-hooks
        (:meth:`register_load_state_dict_pre_hook`) may rewrite the state dict first, post-hooks run
        once the state is loaded, and a state dict that does not fit changes nothing. Compact
        gradients gathered since the last step are kept where the selection stays the same, and so is
        the index tensor (row sinks from :func:`~allo.optim.compact_row_grads` made before stay valid)."""
        state_dict = state_dict.copy()  # shallow, as torch's: a pre-hook may rewrite it
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            rewritten = hook(self, state_dict)
            if rewritten is not None:
                state_dict = rewritten
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if saved_groups and not any("decay_unselected" in g for g in saved_groups):
            # torch.optim.AdamW's, say: its parameters with state would load as fully selected and
            # those without (never stepped) as frozen, silently
            raise ValueError(
                "load_state_dict: this state dict was not saved by MaskedAdamW (its param groups have no "
                "'decay_unselected'; torch.optim.AdamW's?). MaskedAdamW loads only its own state dicts, which "
                "carry the masks; to start from another optimizer's run, build MaskedAdamW with masks= instead"
            )
        if len(groups) != len(saved_groups) or any(len(g["params"]) != len(s["params"])
                                                   for g, s in zip(groups, saved_groups)):
            raise ValueError(
                f"loaded state dict has parameter groups of {[len(s['params']) for s in saved_groups]} parameters, "
                f"this optimizer of {[len(g['params']) for g in groups]}; build the optimizer with the parameters "
                "(and groups) it was saved with"
            )
        loaded = self._loaded_states(state_dict["state"], [pid for g in saved_groups for pid in g["params"]],
                                     state_dict.get("shard_rows"))
        self._check_gathered_grads([sel for sel, _ in loaded], "load_state_dict")
        # nothing below fails on a state dict that fits: torch's loader takes the groups (hyper-
        # parameters), without its hooks (run here around the whole load) and without the state
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
        try:
            super().load_state_dict({**state_dict, "state": {}})
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre, post
        self._plan_version += 1
        self.state = defaultdict(dict)
        for param, (sel, state) in zip(self._params(), loaded):
            current = self._selection.get(param)
            if not same_selection(current, sel):
                self._compact.pop(param, None)
                self._pending.pop(param, None)
            elif isinstance(current, torch.Tensor):
                # the same selection: keep the current index tensor, which row sinks (compact_row_grads)
                # made before the load check by identity; the loaded copy would make them stale
                sel = current
                if state is not None:
                    state["indices"] = current
            self._selection[param] = sel
            self._untrack_weight(param)
            if state is not None:
                self.state[param] = state
                if "master" in state:  # the loaded master copy is the truth until the weight changes
                    self._track_weight(param)
        self._register_hooks()
        for hook in post.values():
            hook(self)

    def _loaded_states(self, saved_state: dict, ids: list, shard_rows: dict | None = None) -> list[tuple]:
        """(selection, state or None) per parameter from a state dict's ``state`` (``ids``: the saved
        parameter ids in the optimizer's order; ``shard_rows``: the saving rank's row blocks of its sharded
        parameters), checked against the parameters; changes nothing."""
        loaded = []
        names = self._names()
        for i, (pid, param) in enumerate(zip(ids, self._params())):
            label = self._label(i, names[i])
            saved = saved_state.get(pid)
            held = (shard_rows or {}).get(pid, saved.get("shard_rows") if saved else None)
            if held is not None and not sharding.is_sharded(param):
                raise ValueError(
                    f"state_dict state for parameter {label} was saved by one rank of a sharded (FSDP2) run, for "
                    f"its rows {tuple(held)} (first row, count), but this parameter is whole: its indices would "
                    "be read as global ones. Load it into the same sharded model, one state dict per rank"
                )
            if sharding.is_sharded(param) and shard_rows is not None and \
                    tuple(shard_rows.get(pid, ())) != sharding.row_block(param):
                raise ValueError(
                    f"state_dict state for parameter {label} was saved for rows {tuple(shard_rows.get(pid, ()))} of the "
                    f"parameter (first row, count) but this rank holds rows {sharding.row_block(param)}; load each "
                    "rank's own optimizer state, saved with the same number of processes"
                )
            if not saved:
                loaded.append((EMPTY, None))
                continue
            p = sharding.local(param)  # sharded: the state is this rank's block's
            if sharding.is_sharded(param) and tuple(saved.get("shard_rows", ())) != sharding.row_block(param):
                raise ValueError(
                    f"state_dict state for parameter {label} was saved for rows {saved.get('shard_rows')} of the "
                    f"parameter (first row, count) but this rank holds rows {sharding.row_block(param)}; load each "
                    "rank's own optimizer state, saved with the same number of processes"
                )
            state = {}
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    value = value.detach().to("cpu" if key == "step" else p.device, copy=True)
                state[key] = value
            indices = state.get("indices")
            k = p.numel() if indices is None else indices.numel()
            if p.dtype not in _LOW_PRECISION:
                # saved for a bf16/fp16 run of this parameter: an fp32 weight is its own master
                state.pop("master", None)
            for key in ("exp_avg", "exp_avg_sq", "master"):
                if key in state and (state[key].numel() != k or state[key].dtype != torch.float32):
                    raise ValueError(
                        f"state_dict {key!r} for parameter {label} is not fp32 with {k} entries; the checkpoint "
                        "does not match this model/optimizer (was it saved by MaskedAdamW for this model?)"
                    )
                if key not in state and key != "master":
                    raise ValueError(
                        f"state_dict state for parameter {label} has no {key!r}; the checkpoint does not match "
                        "this model/optimizer (was it saved by MaskedAdamW for this model?)"
                    )
            if indices is not None:
                if indices.dim() != 1 or (k and (int(indices.min()) < 0 or int(indices.max()) >= p.numel())):
                    raise ValueError(f"state_dict 'indices' for parameter {label} do not index a tensor of "
                                     f"{p.numel()} elements; the checkpoint does not match this model")
                # the kernels take runs of consecutive indices for contiguous rows: unsorted or repeated
                # ones would update the wrong elements, silently
                if indices.dtype not in (torch.int32, torch.int64) or bool((indices[1:] <= indices[:-1]).any()):
                    raise ValueError(f"state_dict 'indices' for parameter {label} are not sorted, unique int32/int64 "
                                     "flat indices (as MaskedAdamW saves them); the checkpoint was not saved by "
                                     "MaskedAdamW or was altered")
            if p.dtype in _LOW_PRECISION and "master" not in state:
                # saved for an fp32 run of this parameter (no master then): the bf16/fp16 weight starts one
                state["master"] = _master_from_weight(p, indices)
            if indices is not None:
                loaded.append((indices, state))
            else:
                for key in ("exp_avg", "exp_avg_sq", "master"):
                    if key in state:
                        state[key] = state[key].view(p.shape)
                loaded.append((DENSE, state))
        return loaded


class _CompactHook:
    """Holds the optimizer weakly: a parameter's hook must not keep a discarded optimizer alive (its
    hooks would go on taking the gradients away from the next one)."""

    def __init__(self, opt: MaskedAdamW):
        self.opt = weakref.ref(opt)

    def __call__(self, p: torch.Tensor) -> None:
        opt = self.opt()
        if opt is not None:
            opt._compact_hook(p)


def _several_processes() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _not_contiguous(label: str, what: str, fix: str) -> ValueError:
    return ValueError(f"parameter {label} {what}; MaskedAdamW needs contiguous parameters (flat indices address "
                      f"param.reshape(-1)): {fix}")


def _check_grad(grad: torch.Tensor, p: torch.Tensor, opt: MaskedAdamW) -> None:
    if grad.is_sparse:
        raise RuntimeError(
            f"parameter {opt._label_of(p)} has a sparse gradient; MaskedAdamW needs dense "
            "gradients (e.g. nn.Embedding(sparse=False)); for sparse embedding updates use torch.optim.SparseAdam"
        )


def _master_from_weight(p: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """An fp32 master copy of the weight's selected elements (all of them, in its shape, for ``None``)."""
    flat = p.detach().reshape(-1)
    if indices is None:
        return flat.to(torch.float32, copy=True).view(p.shape)
    return flat.index_select(0, indices.long()).to(torch.float32)


# torch.optim.AdamW's options that MaskedAdamW accepts only at the values that mean what it does: code
# that spells out torch's defaults (or copies an AdamW's param groups) keeps working; anything else is
# refused by name
_TORCH_ADAMW_UNSUPPORTED = {"amsgrad": "AMSGrad's running maximum is not implemented",
                            "maximize": "negate the loss instead",
                            "capturable": "CUDA-graph capture of the step is not supported",
                            "differentiable": "the step is not differentiable"}
_TORCH_ADAMW_OPTIONS = (*_TORCH_ADAMW_UNSUPPORTED, "foreach", "fused")


def _check_torch_adamw_options(options: dict, where: str) -> None:
    for arg, value in options.items():
        if arg in _TORCH_ADAMW_UNSUPPORTED:
            if value is not False:
                raise ValueError(f"{where}: {arg}={value!r} is not supported ({_TORCH_ADAMW_UNSUPPORTED[arg]}); "
                                 f"leave {arg} at False")
        elif value not in (None, True, False):
            raise ValueError(f"{where}: {arg}={value!r}: expected None, True or False (it is ignored: the kernels "
                             "are chosen by backend=)")


def _sync_master(param: torch.Tensor, state: dict) -> None:
    """Elements of ``param`` (bf16/fp16) that differ from their master copy rounded to the weight's dtype
    were changed outside the optimizer: their master entries take the weight's value. The others keep
    theirs (the precision below the weight's dtype is the master copy's point)."""
    p = sharding.local(param)
    master = state["master"]
    weight = _master_from_weight(p, state.get("indices")).view(master.shape)  # the weight's values, exactly
    changed = weight != master.to(p.dtype).to(torch.float32)
    master.copy_(torch.where(changed, weight, master))


def _fused_dense(rows: list, device: torch.device, *, lr, beta1, beta2, eps, weight_decay) -> None:
    """Fully selected parameters: torch's fused AdamW kernel (one vectorised / multi-tensor pass)."""
    params, grads, avgs, sqs, steps = [], [], [], [], []
    masters = []
    for p, grad, state, step in rows:
        # torch's fused kernel walks each tensor's memory in order: a gradient laid out otherwise (a
        # transposed or expanded .grad) would pair with the wrong elements (torch 2.14's own AdamW(fused=True)
        # does so on the CPU)
        grad = grad.contiguous()
        master = state.get("master")
        if master is not None:
            params.append(master)
            grads.append(grad.float())
            masters.append((p, master))
        else:
            params.append(p)
            grads.append(grad if grad.dtype == p.dtype else grad.to(p.dtype))
        avgs.append(state["exp_avg"])
        sqs.append(state["exp_avg_sq"])
        steps.append(float(step))
    # the kernel reads each count from a tensor (on the parameters' device: ours stay on the CPU);
    # through pinned memory: a pageable copy would make the host wait for the GPU's queue. Usually every
    # count is the same: then one tensor serves them all (145 views cost more host time, paid before the
    # kernel starts, than the difference between this step and torch's fused AdamW)
    if len(set(steps)) == 1:
        steps = [upload(torch.tensor(steps[0], dtype=torch.float32), device)] * len(steps)
    else:
        steps = list(upload(torch.tensor(steps, dtype=torch.float32), device).unbind())
    torch._fused_adamw_(params, grads, avgs, sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
    for p, master in masters:
        p.copy_(master)

