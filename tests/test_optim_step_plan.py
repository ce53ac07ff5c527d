"""MaskedAdamW's fast path (allo.optim.step_plan) gives bit-identical results to the general path
through everything that can change between steps."""

import copy

import pytest
import torch

from allo.optim import MaskedAdamW
from allo.optim import step_plan
from conftest import device_for

BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton is not installed"))]


def _model(device):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.ReLU(), torch.nn.Linear(11, 7), torch.nn.ReLU(),
                            torch.nn.Linear(7, 3))
    m[2].to(torch.bfloat16)  # a second dtype: a second kernel bucket, and master copies
    return m.to(device)


def _masks():
    g = torch.Generator().manual_seed(1)
    return {"0.weight": torch.rand(11, 13, generator=g) < 0.3, "0.bias": torch.tensor([1, 4, 9]),
            "2.weight": torch.rand(7, 11, generator=g) < 0.5, "2.bias": None,  # fully selected: dense path
            "4.weight": torch.zeros(3, 7, dtype=torch.bool),  # nothing: no state
            "4.bias": torch.tensor([0, 2])}


def _loss(model, x):
    h = model[1](model[0](x))
    h = model[3](model[2](h.to(torch.bfloat16))).float()
    return model[4](h).pow(2).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compact", [False, True])
def test_fast_path_matches_general_path(backend, compact, monkeypatch):
    device = device_for(backend)
    fast_model = _model(device)
    slow_model = copy.deepcopy(fast_model)
    kw = dict(lr=1e-2, weight_decay=0.05, compact_grads=compact, backend=backend)
    fast = MaskedAdamW(fast_model.named_parameters(), masks=_masks(), **kw)
    slow = MaskedAdamW(slow_model.named_parameters(), masks=_masks(), **kw)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (fast, slow)]
    taken = []
    real_run = step_plan.StepPlan.run

    def counting_run(self, opt, group, fused_dense):
        if opt is slow:
            return False  # the general path every time
        ok = real_run(self, opt, group, fused_dense)
        taken.append(ok)
        return ok

    monkeypatch.setattr(step_plan.StepPlan, "run", counting_run)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(5, 13, generator=g).to(device) for _ in range(12)]
    saved = None
    for i, x in enumerate(batches):
        for model, opt, sched in ((fast_model, fast, scheds[0]), (slow_model, slow, scheds[1])):
            if i == 6:  # a new selection for one parameter: the plan must be retired
                opt.set_masks({**_masks(), "0.bias": torch.tensor([0, 2, 3])})
            if i == 9:  # back to an earlier state
                opt.load_state_dict(saved[opt is fast])
            if i == 4:
                model[0].weight.grad = None  # one step where a trained parameter has no gradient
            _loss(model, x).backward()
            if i == 4:
                model[0].weight.grad = None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=(i % 2 == 0))  # gradients reallocated every other step
        if i == 7:
            saved = {True: copy.deepcopy(fast.state_dict()), False: copy.deepcopy(slow.state_dict())}
        for (name, a), b in zip(fast_model.named_parameters(), slow_model.parameters()):
            assert torch.equal(a, b), (i, name)
    for a, b in zip(fast_model.parameters(), slow_model.parameters()):
        sa, sb = fast.state.get(a, {}), slow.state.get(b, {})
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)
    assert sum(taken) >= 5, taken  # the fast path did run (else this test would prove nothing)
    assert not all(taken)  # and was left where the plan no longer held


def test_no_plan_where_the_general_path_is_needed():
    model = _model("cpu")
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1, masks=_masks(), decay_unselected=True)
    for _ in range(2):
        _loss(model, torch.randn(4, 13)).backward()
        opt.step()
        opt.zero_grad()
    assert not opt._plans  # unselected elements decay every step: no plan
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=_masks(), backend="reference")
    _loss(model, torch.randn(4, 13)).backward()
    opt.step()
    assert not opt._plans


def test_switching_decay_unselected_on_retires_the_plan():
    model = _model("cpu")
    ref = copy.deepcopy(model)
    opts = [MaskedAdamW(m.named_parameters(), lr=1e-2, weight_decay=0.1, masks=_masks()) for m in (model, ref)]
    for i in range(4):
        if i == 2:
            opts[0].param_groups[0]["decay_unselected"] = True  # after the plan exists
            opts[1].param_groups[0]["decay_unselected"] = True
            opts[1]._plans.clear()
        x = torch.randn(4, 13)
        for m, o in zip((model, ref), opts):
            _loss(m, x).backward()
            o.step()
            o.zero_grad()
            if o is opts[1]:
                o._plans.clear()  # the reference always takes the general path
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    w = model[4].weight  # nothing selected: only the authors' decay moves it
    assert not torch.equal(w, _model("cpu")[4].weight)


@pytest.mark.parametrize("replace", ["tensor", "dict"])
def test_replaced_state_retires_the_plan(replace):
    # e.g. a user moving or restoring one moment, or a whole state dict, by hand: the plan's tables hold the
    # old tensors' addresses, and must not keep updating them while the visible state goes stale
    model = _model("cpu")
    ref = copy.deepcopy(model)
    opts = [MaskedAdamW(m.named_parameters(), lr=1e-2, masks=_masks()) for m in (model, ref)]
    for i in range(4):
        x = torch.randn(4, 13)
        for m, o in zip((model, ref), opts):
            if i == 2:
                w = m[0].weight
                if replace == "tensor":
                    o.state[w]["exp_avg"] = o.state[w]["exp_avg"].clone() * 0.5
                else:
                    o.state[w] = {k: v.clone() for k, v in o.state[w].items()}
            _loss(m, x).backward()
            o.step()
            o.zero_grad()
        opts[1]._plans.clear()  # the reference always takes the general path
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
        sa, sb = opts[0].state.get(a, {}), opts[1].state.get(b, {})
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
