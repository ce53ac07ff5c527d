"""What a torch.optim.AdamW user does to an optimizer, done to MaskedAdamW: weights changed behind the
optimizer's back (the master copies follow), state removed or replaced by hand, groups and parameter lists
edited, dtype changes, torch's own constructor arguments. Each case runs on the backends that run here."""

import importlib.util
import warnings
from collections import defaultdict

import pytest
import torch

from allo._backend import triton_interpreting
from allo.optim import MaskedAdamW
from conftest import device_for

TRITON = pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                         reason="triton is not installed"))
BACKENDS = ["cpu", "reference", TRITON]


def _bf16_linear(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 5).bfloat16().to(device)


def _backward(model, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(3, model.in_features).to(model.weight.dtype).to(model.weight.device)
    model(x).float().pow(2).sum().backward()


def _some(shape, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["fill", "load_state_dict", "init"])
def test_master_copy_follows_weights_changed_in_place(backend, how):
    """A bf16 weight changed after the optimizer was built (model.load_state_dict, torch.nn.init, an in-place
    op: what torch records in the version counter): the next step starts from the new weight, not from the
    master copy made at construction (which would silently put the old values back)."""
    model = _bf16_linear(device=device_for(backend))
    masks = {"weight": _some(model.weight.shape).to(model.weight.device), "bias": None}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-6, weight_decay=0.0, masks=masks, backend=backend)
    new = torch.full_like(model.weight, 5.0)
    with torch.no_grad():
        if how == "fill":
            model.weight.fill_(5.0)
        elif how == "init":
            torch.nn.init.constant_(model.weight, 5.0)
    if how == "load_state_dict":
        model.load_state_dict({"weight": new, "bias": model.bias.detach().clone()})
    _backward(model)
    opt.step()
    # lr 1e-6 moves a weight of 5 by less than half a bf16 step (2**-6), so every element reads 5 (Triton's
    # interpreter truncates to bf16: one step below, 4.96875, where the update went down)
    assert bool(((model.weight.detach().float() - 5.0).abs() <= 2.0 ** -5).all()), model.weight
    if not (backend == "triton" and triton_interpreting()):
        assert torch.equal(model.weight.detach(), new), model.weight
    assert torch.equal(opt.state[model.weight]["master"].to(torch.bfloat16), new.reshape(-1)[masks["weight"].reshape(-1)])


# not under Triton's interpreter: it truncates to bf16 where torch rounds, so the weights it wrote differ from
# their masters rounded by torch, and a sync would take them all (compiled Triton rounds as torch does)
@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param(
    "triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None or not torch.cuda.is_available(),
                                       reason="compiled Triton (a CUDA GPU)"))])
def test_master_copy_keeps_its_precision_where_the_weight_did_not_change(backend):
    """Reloading the very weights the optimizer wrote (resume: model first, then a step) leaves each master
    entry as it was: only elements whose weight differs from the master's rounding take the weight."""
    model = _bf16_linear(device=device_for(backend))
    opt = MaskedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.0, backend=backend)
    for seed in range(3):
        _backward(model, seed)
        opt.step()
        opt.zero_grad()
    master = opt.state[model.weight]["master"].clone()
    assert not torch.equal(master, master.to(torch.bfloat16).float())  # it holds bits the weight has not
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.view(-1)[0] += 1.0  # one element changed
    model.load_state_dict(saved)  # and put back: an in-place copy of the same values
    with torch.no_grad():
        model.weight.view(-1)[1] = -3.0
    opt.sync_master_copies()
    after = opt.state[model.weight]["master"].reshape(-1)
    assert after[1] == -3.0
    keep = torch.ones_like(after, dtype=torch.bool)
    keep[1] = False
    assert torch.equal(after[keep], master.reshape(-1)[keep])


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_copy_follows_weights_changed_in_place_after_load_state_dict(backend):
    """Resume: the optimizer's state dict is loaded (its master copies then are the truth), then the weights
    are changed in place (model.load_state_dict of other weights, an init): the next step starts from them."""
    model = _bf16_linear(device=device_for(backend))
    masks = {"weight": _some(model.weight.shape).to(model.weight.device), "bias": None}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-6, weight_decay=0.0, masks=masks, backend=backend)
    _backward(model)
    opt.step()
    saved = opt.state_dict()
    resumed = MaskedAdamW(model.named_parameters(), lr=1e-6, weight_decay=0.0, backend=backend)
    resumed.load_state_dict(saved)
    new = torch.full_like(model.weight, 5.0)
    model.load_state_dict({"weight": new, "bias": model.bias.detach().clone()})
    _backward(model, seed=4)
    resumed.step()
    # as in test_master_copy_follows_weights_changed_in_place: lr 1e-6 leaves 5 within a bf16 step
    assert bool(((model.weight.detach().float() - 5.0).abs() <= 2.0 ** -5).all()), model.weight
    assert torch.equal(resumed.state[model.weight]["master"].to(torch.bfloat16),
                       new.reshape(-1)[masks["weight"].reshape(-1)])


def test_writes_through_data_need_sync_master_copies():
    """param.data writes are not recorded by torch: the step does not see them (documented), and
    sync_master_copies() takes them in."""
    model = _bf16_linear()
    opt = MaskedAdamW(model.named_parameters(), lr=1e-6, weight_decay=0.0, backend="cpu")
    model.weight.data.fill_(5.0)
    opt.sync_master_copies()
    _backward(model)
    opt.step()
    assert torch.equal(model.weight.detach(), torch.full_like(model.weight, 5.0))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bf16_checkpoint_into_fp32_model_drops_the_master_copy(backend):
    """An fp32 weight is its own master: a bf16 run's master copy in the checkpoint is dropped, and the step
    starts from the fp32 weight."""
    model = _bf16_linear()
    masks = {"weight": torch.tensor([1, 3, 5]), "bias": False}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.0, masks=masks, backend=backend)
    _backward(model)
    opt.step()
    sd = opt.state_dict()
    fp32 = torch.nn.Linear(6, 5)
    with torch.no_grad():
        fp32.weight.fill_(100.0)
    opt32 = MaskedAdamW(fp32.named_parameters(), lr=1e-3, weight_decay=0.0, backend=backend)
    opt32.load_state_dict(sd)
    assert "master" not in opt32.state[fp32.weight]
    _backward(fp32)
    opt32.step()
    w = fp32.weight.detach().reshape(-1)
    assert bool(((w[[1, 3, 5]] - 100.0).abs() < 0.01).all()) and bool((w[[1, 3, 5]] != 100.0).all()), w[[1, 3, 5]]


def test_fp32_checkpoint_into_bf16_model_makes_the_master_copy_from_the_weight():
    fp32 = torch.nn.Linear(6, 5)
    masks = {"weight": torch.tensor([0, 2, 29]), "bias": None}
    opt = MaskedAdamW(fp32.named_parameters(), lr=1e-3, masks=masks, backend="cpu")
    _backward(fp32)
    opt.step()
    bf16 = _bf16_linear(seed=3)
    opt16 = MaskedAdamW(bf16.named_parameters(), lr=1e-3, backend="cpu")
    opt16.load_state_dict(opt.state_dict())
    master = opt16.state[bf16.weight]["master"]
    assert master.dtype == torch.float32
    assert torch.equal(master, bf16.weight.detach().reshape(-1)[[0, 2, 29]].float())
    assert torch.equal(opt16.state[bf16.bias]["master"], bf16.bias.detach().float())


def _against_torch_adamw(backend, steps, meddle_after, meddle):
    """``steps`` steps of MaskedAdamW (every element selected) and of torch.optim.AdamW on two copies of a
    model; after step ``meddle_after``, ``meddle(optimizer, model)`` on both. Checks the weights agree and
    returns MaskedAdamW's weight's state."""
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(7, 4), torch.nn.Linear(7, 4)
    theirs.load_state_dict(ours.state_dict())
    ours.to(device_for(backend))
    opt = MaskedAdamW(ours.parameters(), lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2)
    for step in range(steps):
        for m, o in ((ours, opt), (theirs, ref)):
            _backward(m, seed=step)
            o.step()
            o.zero_grad()
            if step == meddle_after:
                meddle(o, m)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
    return opt.state[ours.weight]


def _remove_state(how):
    def meddle(o, m):
        if how == "clear":
            o.state.clear()
        elif how == "del":
            del o.state[m.weight]
        elif how == "new dict":
            o.state = defaultdict(dict)
        else:
            o.state[m.weight] = {}
    return meddle


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["clear", "del", "new dict", "reassign"])
def test_state_removed_by_hand_starts_afresh_as_in_torch(backend, how):
    """torch.optim.AdamW makes fresh state for a parameter whose state was removed; so does MaskedAdamW
    (for the parameter's selection), instead of freezing it."""
    state = _against_torch_adamw(backend, 5, 2, _remove_state(how))
    assert float(state["step"]) == 2.0


def test_reading_the_state_of_a_frozen_parameter_changes_nothing():
    model = torch.nn.Linear(4, 3)
    opt = MaskedAdamW(model.named_parameters(), masks={"weight": torch.tensor([0, 5, 7])}, backend="cpu")
    bias = model.bias.detach().clone()
    assert opt.state[model.bias] == {}  # a defaultdict: reading makes an empty entry
    _backward(model)
    opt.step()
    assert torch.equal(model.bias.detach(), bias)
    assert opt.selected_count() == 3


@pytest.mark.parametrize("backend", ["cpu", TRITON])
def test_step_count_replaced_by_hand_is_read_by_the_replayed_step(backend):
    """state['step'] replaced mid-run (a warm restart of the bias correction): steps replayed from a plan
    read it, as the general path and torch do."""
    def restart(o, m):
        o.state[m.weight]["step"] = torch.tensor(0.0)

    state = _against_torch_adamw(backend, 6, 3, restart)
    assert float(state["step"]) == 2.0


def test_parameter_swapped_into_a_group_list_is_an_error():
    model, other = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    opt = MaskedAdamW(model.parameters(), backend="cpu")
    for _ in range(2):  # the second step replays a plan
        _backward(model)
        opt.step()
    opt.param_groups[0]["params"][0] = other.weight
    _backward(other)
    with pytest.raises(ValueError, match="never given to it.*add_param_group"):
        opt.step()


def test_failed_add_param_group_leaves_no_group_behind():
    model = torch.nn.Linear(4, 3)
    opt = MaskedAdamW(model.parameters(), backend="cpu")
    bad = torch.nn.Parameter(torch.randn(6, 4).t())  # not contiguous
    with pytest.raises(ValueError, match="not contiguous"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1
    ok = torch.nn.Parameter(bad.detach().contiguous())
    with pytest.raises(TypeError, match="float64"):
        opt.add_param_group({"params": [torch.nn.Parameter(ok.detach().double())]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [ok]})  # still possible
    assert len(opt.param_groups) == 2 and opt.selected_count() == 15 + 24


def test_dict_masks_naming_parameters_that_share_a_name_are_refused():
    enc, dec = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    groups = [{"params": list(enc.named_parameters())}, {"params": list(dec.named_parameters())}]
    with pytest.raises(ValueError, match=r"\['weight'\].*more than one"):
        MaskedAdamW(groups, masks={"weight": torch.tensor([1, 2])}, backend="cpu")


@pytest.mark.parametrize("change", ["bfloat16", "float"])
def test_dtype_changed_after_construction_names_the_parameter(change):
    model = torch.nn.Linear(4, 3) if change == "bfloat16" else torch.nn.Linear(4, 3).bfloat16()
    opt = MaskedAdamW(model.named_parameters(), masks={"weight": torch.tensor([0, 1]), "bias": None}, backend="cpu")
    getattr(model, change)()
    _backward(model)
    with pytest.raises(RuntimeError, match="parameter 'weight' is now .*build MaskedAdamW after"):
        opt.step()


def test_integer_mask_of_the_parameters_shape_suggests_bool():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"mask.bool\(\)"):
        MaskedAdamW(model.named_parameters(), masks={"weight": (torch.rand(3, 4) < 0.5).long()}, backend="cpu")


def test_bool_mask_of_another_shape_with_as_many_elements_is_refused():
    """A transposed bool mask has the weight's element count but would select other elements of the weight."""
    weight = torch.nn.Parameter(torch.randn(5, 7))
    mask = torch.rand(7, 5) < 0.5
    with pytest.raises(ValueError, match=r"shape \(7, 5\).*shape \(5, 7\)"):
        MaskedAdamW([("w", weight)], masks={"w": mask}, backend="cpu")
    with pytest.raises(ValueError, match="shape"):
        MaskedAdamW([("w", weight)], masks={"w": mask.reshape(-1)}, backend="cpu")


def test_torch_adamw_arguments_at_their_defaults_are_accepted():
    model = torch.nn.Linear(4, 3)
    MaskedAdamW(model.parameters(), 1e-3, (0.9, 0.999), 1e-8, 1e-2, False, maximize=False, foreach=None,
                capturable=False, differentiable=False, fused=None, backend="cpu")
    MaskedAdamW(model.parameters(), foreach=True, fused=False, backend="cpu")
    for arg in ("amsgrad", "maximize", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"{arg}=True.*not supported"):
            MaskedAdamW(model.parameters(), **{arg: True})


def test_learning_rate_checks_match_torch():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        MaskedAdamW(model.parameters(), lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(TypeError, match="lr='1e-3'"):
        MaskedAdamW(model.parameters(), lr="1e-3")
    MaskedAdamW(model.parameters(), lr=torch.tensor(1e-3), backend="cpu")


@pytest.mark.parametrize("bad", [dict(lr=-1e-3), dict(lr=torch.tensor(-1e-3)), dict(eps=-1e-8),
                                 dict(betas=(0.9, 1.0)), dict(betas=(-0.1, 0.999)), dict(betas=(1.0, 0.999)),
                                 dict(betas=(0.9, -0.5)), dict(weight_decay=-0.01)])
def test_out_of_range_hyperparameters_are_refused_as_torch_refuses_them(bad):
    """A negative lr/eps/weight_decay or a beta outside [0, 1) is refused at construction, as torch.optim.AdamW
    refuses it (beta2 = 1 would make the bias correction 1 - beta2**t zero: a division by zero at every step)."""
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError):
        torch.optim.AdamW(model.parameters(), **bad)
    with pytest.raises(ValueError, match="Invalid"):
        MaskedAdamW(model.parameters(), backend="cpu", **bad)
    # the edges torch accepts are accepted
    MaskedAdamW(model.parameters(), lr=0.0, eps=0.0, betas=(0.0, 0.0), weight_decay=0.0, backend="cpu")


def test_an_empty_dict_of_masks_warns_that_nothing_trains():
    model = torch.nn.Linear(4, 3)
    with pytest.warns(UserWarning, match="no parameter trains"):
        opt = MaskedAdamW(model.named_parameters(), masks={}, backend="cpu")
    assert opt.selected_count() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskedAdamW(model.named_parameters(), masks={"weight": None}, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_fully_selected_parameter_with_a_non_contiguous_gradient_matches_adamw(dtype, layout):
    # the CPU path hands fully selected parameters to torch's fused AdamW kernel, which walks memory in
    # order: a transposed .grad paired the wrong elements (torch's own AdamW(fused=True) does, in 2.14)
    torch.manual_seed(0)
    w0 = torch.randn(3, 5)
    grads = [torch.randn(5, 3).t() if layout == "transposed" else torch.randn(5).expand(3, 5) for _ in range(3)]
    assert not grads[0].is_contiguous()
    out = {}
    for name in ("torch", "cpu"):
        p = torch.nn.Parameter(w0.clone())
        opt = (torch.optim.AdamW([p], lr=0.1, foreach=False) if name == "torch"
               else MaskedAdamW([p], lr=0.1, backend="cpu"))
        for g in grads:
            p.grad = g
            opt.step()
        out[name] = p.detach()
    torch.testing.assert_close(out["cpu"], out["torch"], rtol=1e-6, atol=1e-6)
    if dtype == torch.bfloat16:  # with a master copy: the same update, rounded once into the weight
        p = torch.nn.Parameter(w0.to(dtype))
        opt = MaskedAdamW([p], lr=0.1, backend="cpu")
        ref = torch.nn.Parameter(w0.to(dtype).float())
        ref_opt = torch.optim.AdamW([ref], lr=0.1, foreach=False)
        for g in grads:
            p.grad, ref.grad = g.to(dtype), g.to(dtype).float()
            assert layout == "expanded" or not p.grad.is_contiguous()
            opt.step()
            ref_opt.step()
        torch.testing.assert_close(opt.state[p]["master"].view(3, 5), ref.detach(), rtol=1e-6, atol=1e-6)


def test_pickled_optimizer_keeps_counting_steps():
    import pickle

    model = torch.nn.Linear(4, 3)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks={"weight": torch.rand(3, 4) < 0.5, "bias": None},
                      backend="cpu")
    _backward_linear(model)
    opt.step()
    opt.zero_grad()
    model, opt = pickle.loads(pickle.dumps((model, opt)))
    twin_model = torch.nn.Linear(4, 3)
    twin_model.load_state_dict(model.state_dict())
    twin = MaskedAdamW(twin_model.named_parameters(), lr=1e-2, backend="cpu")
    twin.load_state_dict(opt.state_dict())
    for _ in range(2):
        for m, o in ((model, opt), (twin_model, twin)):
            _backward_linear(m)
            o.step()
            o.zero_grad()
    assert [float(opt.state[p]["step"]) for p in model.parameters()] == [3.0, 3.0]
    assert [float(s["step"]) for s in opt.state_dict()["state"].values()] == [3.0, 3.0]
    opt.set_masks({"weight": opt.state[model.weight]["indices"], "bias": torch.tensor([True, False, True])})
    assert float(opt.state[model.weight]["step"]) == 3.0  # kept through the move into a new buffer
    for p, q in zip(model.parameters(), twin_model.parameters()):  # bias correction of step 2 and 3
        assert torch.equal(p, q)


def _backward_linear(model, seed=5):
    torch.manual_seed(seed)
    model(torch.randn(2, model.in_features)).pow(2).sum().backward()


@pytest.mark.parametrize("key, value", [("maximize", True), ("amsgrad", True), ("capturable", True),
                                        ("differentiable", True), ("foreach", "yes"),
                                        ("masks", [torch.tensor([0])]), ("mask", torch.tensor([True] * 3))])
def test_param_group_options_it_would_ignore_are_refused(key, value):
    model = torch.nn.Linear(4, 3)
    opt = MaskedAdamW([model.weight], backend="cpu")
    with pytest.raises(ValueError, match=f"param group: (a ')?{key}"):
        opt.add_param_group({"params": [model.bias], key: value})
    assert len(opt.param_groups) == 1 and model.bias not in opt.state
    with pytest.raises(ValueError, match=f"param group: (a ')?{key}"):  # groups given to the constructor too
        MaskedAdamW([{"params": [model.weight]}, {"params": [model.bias], key: value}], backend="cpu")
    # torch.optim.AdamW's own values for them (copied param groups) are accepted
    MaskedAdamW([{"params": [model.weight], "amsgrad": False, "maximize": False, "foreach": None, "fused": None,
                  "capturable": False, "differentiable": False}], backend="cpu")


@pytest.mark.parametrize("compact", [False, True])
def test_state_removed_by_hand_is_saved_with_its_selection(compact):
    model = torch.nn.Linear(4, 3)
    masks = {"weight": torch.rand(3, 4) < 0.5, "bias": None}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=masks, compact_grads=compact, backend="cpu")
    _backward_linear(model)
    opt.step()
    opt.zero_grad()
    opt.state.clear()  # starts afresh at the next step, for the same selection
    saved = opt.state_dict()
    assert len(opt.state) == 0  # saving made no state in the optimizer itself
    twin_model = torch.nn.Linear(4, 3)
    twin_model.load_state_dict(model.state_dict())
    twin = MaskedAdamW(twin_model.named_parameters(), lr=1e-2, compact_grads=compact, backend="cpu")
    twin.load_state_dict(saved)
    assert twin.selected_count() == opt.selected_count() == int(masks["weight"].sum()) + 3
    for m, o in ((model, opt), (twin_model, twin)):
        _backward_linear(m, seed=6)
        o.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_parameter_unfrozen_after_building_gets_compact_gradients():
    def run(unfreeze_later):
        torch.manual_seed(0)
        lin = torch.nn.Linear(6, 6, bias=False)
        lin.weight.requires_grad_(not unfreeze_later)
        mask = torch.zeros(6, 6, dtype=torch.bool)
        mask[0] = True
        opt = MaskedAdamW(lin.named_parameters(), lr=1e-2, masks={"weight": mask}, compact_grads=True, backend="cpu")
        lin.weight.requires_grad_(True)
        norms = []
        for step in range(2):
            torch.manual_seed(1 + step)
            lin(torch.randn(2, 6)).pow(2).sum().backward()
            norms.append(float(opt.clip_grad_norm_(1e9)))
            assert lin.weight.grad is None  # taken into the compact gradient (from the second backward on, by the hook)
            opt.step()
            opt.zero_grad()
        return norms, lin.weight.detach().clone()

    (norms, weight), (ref_norms, ref_weight) = run(True), run(False)
    assert norms == ref_norms  # the selected row's norm, not the whole gradient's
    assert torch.equal(weight, ref_weight)
