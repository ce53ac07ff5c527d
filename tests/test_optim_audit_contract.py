"""MaskedAdamW against the torch.optim contract where the other tests do not reach: what set_masks and
load_state_dict do to gradients already gathered in compact-grad mode, load_state_dict hooks, copies
of the optimizer, and errors that name the parameter."""

import copy

import pytest
import torch

from allo.optim import MaskedAdamW


def _model(dtype=torch.float32):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(dtype)


def _masks(model):
    g = torch.Generator().manual_seed(3)
    return {n: torch.rand(p.shape, generator=g) > 0.5 for n, p in model.named_parameters()}


def _backward(model, seed=0):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).sum().backward()


@pytest.mark.parametrize("between", ["set_masks", "load_state_dict"])
def test_compact_grads_survive_unchanged_selection_between_backward_and_step(between):
    """torch's optimizers never touch gradients outside step/zero_grad; in compact-grad mode the
    gradients live in the optimizer, so re-setting the same masks (or loading a checkpoint with the
    same selection) between backward and step must keep them."""
    results = []
    for interrupt in (False, True):
        model = _model()
        masks = _masks(model)
        opt = MaskedAdamW(model.named_parameters(), lr=0.05, masks=masks, compact_grads=True)
        saved = copy.deepcopy(opt.state_dict())
        _backward(model)
        if interrupt:
            opt.set_masks(masks) if between == "set_masks" else opt.load_state_dict(saved)
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_set_masks_changing_a_selection_with_compact_grads_pending_is_an_error():
    model = _model()
    masks = _masks(model)
    opt = MaskedAdamW(model.named_parameters(), lr=0.05, masks=masks, compact_grads=True)
    _backward(model)
    with pytest.raises(ValueError, match="'0.weight'.*before backward"):
        opt.set_masks({**masks, "0.weight": ~masks["0.weight"]})
    opt.step()  # nothing was changed by the refused call: the step uses the gathered gradients
    assert all(float(st["step"]) == 1 for st in opt.state.values())
    opt.set_masks({**masks, "0.weight": ~masks["0.weight"]})  # after step: fine


def test_load_state_dict_runs_hooks_around_the_loaded_state():
    """torch documents load_state_dict pre-hooks as the way to adapt a saved state dict (e.g. remap
    it by parameter names) and post-hooks as running after the state is loaded."""
    model = _model()
    opt = MaskedAdamW(model.named_parameters(), lr=0.05, masks=_masks(model))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    params = list(model.parameters())
    # the second optimizer holds the parameters in another order; a pre-hook maps the saved state
    fresh = MaskedAdamW([params[1], params[0], params[3], params[2]], lr=0.05)
    order = [1, 0, 3, 2]

    def remap(optimizer, state_dict):
        ids = state_dict["param_groups"][0]["params"]
        return {**state_dict, "state": {ids[i]: state_dict["state"][ids[j]] for i, j in enumerate(order)}}

    seen = []
    fresh.register_load_state_dict_pre_hook(remap)
    fresh.register_load_state_dict_post_hook(lambda o: seen.append(sum(int(st["step"]) for st in o.state.values())))
    fresh.load_state_dict(saved)
    assert seen == [4]
    for p in params:
        assert torch.equal(fresh.state[p]["indices"], opt.state[p]["indices"])


@pytest.mark.parametrize("how", ["set_masks", "load_state_dict"])
def test_a_selection_emptied_between_backward_and_step_drops_its_compact_gradient(how):
    """Emptying a selection after backward is allowed in compact-grad mode (nothing is left to update); the
    compact gradient gathered for the old selection goes with it: clip_grad_norm_ must not count it."""
    model = _model()
    masks = _masks(model)
    opt = MaskedAdamW(model.named_parameters(), lr=0.05, masks=masks, compact_grads=True)
    emptied = model[0].weight
    saved = MaskedAdamW(model.named_parameters(), lr=0.05, masks={**masks, "0.weight": False}).state_dict()
    _backward(model)
    assert opt.compact_grad(emptied) is not None
    kept = [opt.compact_grad(p).double() for n, p in model.named_parameters() if n != "0.weight"]
    if how == "set_masks":
        opt.set_masks({**masks, "0.weight": False})
    else:
        opt.load_state_dict(saved)
    assert opt.compact_grad(emptied) is None
    before = emptied.detach().clone()
    norm = opt.clip_grad_norm_(1e9)
    torch.testing.assert_close(norm.double(), torch.cat(kept).norm(), rtol=1e-6, atol=0)
    opt.step()
    assert torch.equal(emptied.detach(), before)


@pytest.mark.parametrize("saved_as", ["dense", "partial"])
def test_load_state_dict_that_changes_a_selection_moves_the_compact_grad_hooks(saved_as):
    """Compact-grad mode: a checkpoint that makes a partially selected parameter fully selected (or the
    reverse) must leave the hooks as set_masks would: a fully selected parameter keeps its .grad (a hook
    left on it freed the gradient, and the parameter silently stopped training), a partial one gets a
    compact gradient."""
    model = _model()
    masks = _masks(model)
    w = model[0].weight
    other = {**masks, "0.weight": None if saved_as == "dense" else masks["0.weight"]}
    here = {**masks, "0.weight": masks["0.weight"] if saved_as == "dense" else None}
    saved = MaskedAdamW(model.named_parameters(), lr=0.05, masks=other).state_dict()
    opt = MaskedAdamW(model.named_parameters(), lr=0.05, masks=here, compact_grads=True)
    opt.load_state_dict(saved)
    _backward(model)
    if saved_as == "dense":
        assert w.grad is not None and opt.compact_grad(w) is None
        before = w.detach().clone()
        opt.step()
        assert bool((w.detach() != before).all())  # every element trained
    else:
        assert w.grad is None and opt.compact_grad(w).numel() == int(masks["0.weight"].sum())


def test_failed_load_state_dict_leaves_the_optimizer_as_it_was():
    model = _model()
    opt = MaskedAdamW(model.named_parameters(), lr=0.05, masks=_masks(model))
    saved = copy.deepcopy(opt.state_dict())
    first = next(iter(saved["state"]))
    saved["state"][first]["exp_avg"] = saved["state"][first]["exp_avg"][:-1]
    saved["param_groups"][0]["lr"] = 1.0
    before = {p: {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    with pytest.raises(ValueError, match="'0.weight'"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 0.05
    assert set(opt.state) == set(before)
    for p, st in before.items():
        for k, v in st.items():
            assert torch.equal(opt.state[p][k], v)


@pytest.mark.parametrize("compact", [False, True])
def test_deepcopy_of_the_optimizer_trains_like_the_original(compact):
    """copy.deepcopy(optimizer) works for torch.optim.AdamW (a snapshot of model and optimizer)."""
    model = _model()
    opt = MaskedAdamW(model.named_parameters(), lr=0.05, masks=_masks(model), compact_grads=compact)
    _backward(model)
    opt.step()
    opt.zero_grad()
    twin_model, twin = copy.deepcopy((model, opt))
    for m, o in ((model, opt), (twin_model, twin)):
        for seed in (1, 2):
            _backward(m, seed)
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
    assert [float(s["step"]) for s in twin.state.values()] == [3.0] * 4
    if compact:  # the copy's hooks feed the copy, the original's the original
        _backward(twin_model)
        assert twin.compact_grad(next(twin_model.parameters())) is not None
        assert opt.compact_grad(next(model.parameters())) is None


def test_parameter_errors_name_the_parameter():
    weight = torch.nn.Parameter(torch.randn(4, 3).t())
    with pytest.raises(ValueError, match="'w'.*contiguous"):
        MaskedAdamW([("w", weight)])
    with pytest.raises(TypeError, match=r"params\[1\].*float64"):
        MaskedAdamW([torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3).double())])


def test_unknown_backend_is_refused_at_construction():
    with pytest.raises(ValueError, match="backend.*'cuda'"):
        MaskedAdamW([torch.nn.Parameter(torch.randn(3))], backend="cuda")


@pytest.mark.parametrize("change", ["unsorted", "repeated", "float"])
def test_load_state_dict_refuses_indices_the_kernels_cannot_take(change):
    """The kernels treat a run of k indices spanning k elements as contiguous rows: unsorted or
    repeated indices from an altered checkpoint would update the wrong elements."""
    p = torch.nn.Parameter(torch.randn(8, 8))
    mask = torch.tensor([0, 5, 2, 3]) if change == "unsorted" else torch.tensor([1, 2, 3, 6])
    opt = MaskedAdamW([p], masks=[torch.tensor([1, 2, 3, 6])])
    saved = copy.deepcopy(opt.state_dict())
    pid = next(iter(saved["state"]))
    indices = {"unsorted": mask, "repeated": torch.tensor([1, 2, 2, 6]), "float": mask.float()}[change]
    saved["state"][pid]["indices"] = indices.to(torch.int32 if change != "float" else torch.float32)
    with pytest.raises(ValueError, match=r"params\[0\].*sorted, unique"):
        MaskedAdamW([p]).load_state_dict(saved)


@pytest.mark.parametrize("bad", [64, -1])
def test_load_state_dict_refuses_indices_outside_the_parameter(bad):
    """An index one past the end (or negative) would make the kernels write outside the weight."""
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = MaskedAdamW([p], masks=[torch.tensor([1, 2, 3, 6])])
    saved = copy.deepcopy(opt.state_dict())
    pid = next(iter(saved["state"]))
    indices = [1, 2, 3, bad] if bad > 0 else [bad, 2, 3, 6]
    saved["state"][pid]["indices"] = torch.tensor(indices, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"params\[0\].*do not index a tensor of 64"):
        MaskedAdamW([p]).load_state_dict(saved)


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "master"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_load_state_dict_refuses_state_tensors_that_are_not_fp32(key, dtype):
    """The kernels read the moments and the master copy as fp32 through their addresses: a checkpoint cast to
    another dtype (same number of entries) must be refused, not read as fp32 bytes."""
    p = torch.nn.Parameter(torch.randn(7, 9).bfloat16())
    opt = MaskedAdamW([p], masks=[torch.tensor([0, 4, 5, 30, 62])])
    p.grad = torch.randn(7, 9).bfloat16()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    pid = next(iter(saved["state"]))
    saved["state"][pid][key] = saved["state"][pid][key].to(dtype)
    with pytest.raises(ValueError, match=f"'{key}'.*not fp32"):
        MaskedAdamW([p]).load_state_dict(saved)


def test_row_sink_made_for_an_older_selection_is_an_error():
    """compact_row_grads' sink serves the selection it was made for; used after set_masks changed the
    selection, it would add the old selection's elements at the new selection's positions."""
    from allo.optim import compact_row_grads

    weight = torch.nn.Parameter(torch.randn(6, 4))
    old = torch.zeros(6, 4, dtype=torch.bool)
    old[1, :2] = old[4] = True
    opt = MaskedAdamW([("w", weight)], masks={"w": old}, compact_grads=True)
    sink = compact_row_grads(opt, weight)
    new = old.clone()
    new[0, 3] = True  # 7 selected now, so the old sink's 6 values would fit at the wrong positions
    opt.set_masks({"w": new})
    x = torch.ones(1, requires_grad=True)
    x.register_hook(lambda g: sink(0, torch.randn(6, 4)))  # a sink runs during backward
    with pytest.raises(RuntimeError, match="set_masks"):
        x.sum().backward()


def test_a_torch_adamw_state_dict_is_refused():
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    adamw = torch.optim.AdamW([a, b])
    a.grad = torch.randn_like(a)  # b never gets a gradient: no state, it would have loaded as frozen
    adamw.step()
    opt = MaskedAdamW([a, b])
    before = opt.state_dict()
    with pytest.raises(ValueError, match="not saved by MaskedAdamW"):
        opt.load_state_dict(adamw.state_dict())
    assert opt.state_dict()["param_groups"] == before["param_groups"]
