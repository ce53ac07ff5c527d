"""MaskedAdamW's fast path (allo.optim.step_plan) gives bit-identical results to the general path
through everything that can change between steps."""

import copy

import numpy as np
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


def _native():
    return step_plan._native_checks()


# the plan's per-parameter checks: in one call into allo._C (where built) and in Python
CHECKS = [pytest.param(True, id="native-checks", marks=pytest.mark.skipif(
    __import__("allo.ops._extension", fromlist=["x"]).extension_if_ready() is None, reason="allo._C is not built")),
    pytest.param(False, id="python-checks")]


@pytest.mark.parametrize("native", CHECKS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compact", [False, True])
def test_fast_path_matches_general_path(backend, compact, native, monkeypatch):
    monkeypatch.setattr(step_plan, "NATIVE_CHECKS", native)
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


def test_changing_the_backend_retires_the_plan(monkeypatch):
    """opt.backend set between steps: the next step runs on the new backend, not the plan's launches."""
    from allo.optim import masked_adamw

    calls = []
    real = masked_adamw.masked_adamw_step_reference
    monkeypatch.setattr(masked_adamw, "masked_adamw_step_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model("cpu")
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=_masks(), backend="cpu")
    for i in range(3):
        if i == 2:
            assert opt._plans and not calls  # the cpu backend's plan exists
            opt.backend = "reference"
        _loss(model, torch.randn(4, 13)).backward()
        opt.step()
        opt.zero_grad()
    assert len(calls) == 5  # every parameter with state (4 partial, 1 full) stepped on the reference backend
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


@pytest.mark.parametrize("native", CHECKS)
@pytest.mark.parametrize("replace", ["tensor", "dict"])
def test_replaced_state_retires_the_plan(replace, native, monkeypatch):
    monkeypatch.setattr(step_plan, "NATIVE_CHECKS", native)
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


def test_prebuilt_extension_has_the_plan_checks():
    # a stale allo._C (built before plan_gradients existed) would quietly leave every step on the Python checks
    from allo.ops._extension import extension_if_ready

    ext = extension_if_ready()
    if ext is None:
        pytest.skip("allo._C is not built")
    assert _native() is ext.plan_gradients


def _planned(compact=False):
    model = _model("cpu")
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=_masks(), compact_grads=compact, backend="cpu")
    _loss(model, torch.randn(4, 13)).backward()
    opt.step()
    _loss(model, torch.randn(4, 13)).backward()
    return model, opt, opt._plans[0]


def _both(plan, compact):
    """The plan's checks both ways; they must agree (None, or the same gradients and addresses)."""
    got = {}
    for native in (True, False):
        step_plan.NATIVE_CHECKS = native
        try:
            got[native] = plan.gradients(compact)
        finally:
            step_plan.NATIVE_CHECKS = True
    a, b = got[True], got[False]
    assert (a is None) == (b is None)
    if a is not None:
        assert all(x is y for x, y in zip(a[0], b[0])) and len(a[0]) == len(b[0])
        assert a[1].dtype == b[1].dtype == np.int64 and (a[1] == b[1]).all()
    return b


@pytest.mark.parametrize("change", ["none", "grad-none", "grad-noncontiguous", "grad-dtype", "grad-sparse",
                                    "weight-moved", "weight-strided", "now-compact", "state-tensor", "master-added"])
def test_native_and_python_checks_agree(change):
    if _native() is None:
        pytest.skip("allo._C is not built")
    model, opt, plan = _planned()
    w = model[0].weight
    compact = {}
    if change == "grad-none":
        w.grad = None
    elif change == "grad-noncontiguous":
        w.grad = torch.randn(w.shape[1], w.shape[0]).t()
    elif change == "grad-dtype":
        if hasattr(w, "grad_dtype"):
            w.grad_dtype = None  # (torch >= 2.10 refuses a gradient of another dtype unless told)
        w.grad = w.grad.double()
    elif change == "grad-sparse":
        w.grad = w.grad.to_sparse()
    elif change == "weight-moved":
        w.data = w.data.clone()
    elif change == "weight-strided":  # the same address, now a transposed view: flat offsets would be wrong
        w.data = w.data.view(w.shape[1], w.shape[0]).t()
    elif change == "now-compact":
        compact = {w: torch.zeros(3)}
    elif change == "state-tensor":
        opt.state[w]["exp_avg_sq"] = opt.state[w]["exp_avg_sq"].clone()
    elif change == "master-added":
        opt.state[w]["master"] = torch.zeros(3)
    got = _both(plan, compact)
    assert (got is None) == (change != "none")
    if got is not None:
        assert [g.data_ptr() for g in got[0]] == got[1].tolist()


def test_checks_of_compact_gradients_agree():
    if _native() is None:
        pytest.skip("allo._C is not built")
    model, opt, plan = _planned(compact=True)
    assert any(plan.columns[5]) and _both(plan, opt._compact) is not None  # (compact entries)
    taken = dict(opt._compact)
    del opt._compact[model[0].weight]
    assert _both(plan, opt._compact) is None  # a compact gradient missing
    opt._compact.update(taken)
    model[0].weight.grad = torch.zeros_like(model[0].weight)  # harmless: compact entries read compact grads
    assert _both(plan, opt._compact) is not None


@pytest.mark.parametrize("moment", ["exp_avg", "exp_avg_sq"])
def test_native_checks_raise_as_python_does_on_a_state_without_moments(moment):
    if _native() is None:
        pytest.skip("allo._C is not built")
    model, opt, plan = _planned()
    del opt.state[model[0].weight][moment]
    for native in (True, False):
        step_plan.NATIVE_CHECKS = native
        try:
            with pytest.raises(KeyError, match=moment):
                plan.gradients({})
        finally:
            step_plan.NATIVE_CHECKS = True


def test_uniform_scalar_table_equals_the_general_formula():
    kw = dict(lr=3e-4, beta1=0.9, beta2=0.999, eps=1e-8, decay=1 - 3e-4 * 0.01)
    for t in (1, 2, 7, 1000):
        uniform = step_plan.scalar_table([t] * 5, **kw)
        assert uniform.strides[0] == 0 and uniform.dtype == np.float32
        general = step_plan.scalar_table([t, t + 1], **kw)[:1]  # (counts differ: the general formula)
        assert np.array_equal(uniform[0], general[0]), t
        assert step_plan.rows_of(uniform, np.array([3, 1])).strides[0] == 0
    mixed = step_plan.scalar_table([3, 5, 3], **kw)
    assert np.array_equal(mixed[0], mixed[2]) and not np.array_equal(mixed[0], mixed[1])
    assert np.array_equal(step_plan.rows_of(mixed, np.array([1, 0])), mixed[[1, 0]])


def test_a_weight_made_strided_after_construction_is_refused():
    model, opt, plan = _planned()
    w = model[0].weight
    w.data = w.data.view(w.shape[1], w.shape[0]).t()  # same storage and address, not contiguous
    w.grad = torch.zeros(w.shape)
    with pytest.raises(ValueError, match=r"'0\.weight' is no longer contiguous"):
        opt.step()
