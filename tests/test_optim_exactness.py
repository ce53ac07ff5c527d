"""MaskedAdamW behaviour the other optimizer tests left open (found by mutation testing): each test here
failed on a deliberately broken copy of the code that the rest of the suite passed.

Every expected value is computed here in float64 by ``_adamw64`` (an AdamW step written out, independent
of ``allo.optim.reference``), on fresh random inputs, odd sizes, non-uniform gradient magnitudes."""

import importlib.util
import math

import pytest
import torch

from allo.optim import MaskedAdamW, _cpu_kernel, masked_adamw_step_reference
from conftest import device_for

TRITON = pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                         reason="triton is not installed"))
BACKENDS = ["cpu", "reference", TRITON]


def _adamw64(p, g, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step in float64 on 1-D tensors ``p`` (the selected weights), ``m``, ``v`` (in place)."""
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
    p.mul_(1 - lr * weight_decay).sub_(lr / (1 - beta1**step) * m / denom)


def _grad(shape, dtype=torch.float32):
    return (torch.randn(shape) * torch.rand(shape) * 3).to(dtype)


def _flat_selection(mask):
    """Sorted flat indices (int64, CPU) of a bool mask or an index mask."""
    mask = mask.cpu()
    if mask.dtype == torch.bool:
        return mask.reshape(-1).nonzero().squeeze(1)
    return mask.long().sort().values


class _Reference:
    """float64 state of one parameter's selected elements: weights (or the master copy), moments, count."""

    def __init__(self, p, idx):
        self.idx = idx
        self.p = p.detach().cpu().reshape(-1)[idx].double()
        self.m = torch.zeros(idx.numel(), dtype=torch.float64)
        self.v = torch.zeros(idx.numel(), dtype=torch.float64)
        self.step = 0

    def update(self, grad, **hp):
        self.step += 1
        _adamw64(self.p, grad.cpu().reshape(-1)[self.idx].double(), self.m, self.v, step=self.step, **hp)


def _assert_selected_close(p, state, ref, what):
    """fp32: the weights; bf16/fp16: the fp32 master copy to fp32 precision, the weight to its own."""
    flat = p.detach().cpu().reshape(-1)[ref.idx]
    if "master" in state:
        torch.testing.assert_close(state["master"].cpu().reshape(-1), ref.p.float(), rtol=3e-6, atol=3e-6, msg=what)
        ulp = 2**-7 if p.dtype == torch.bfloat16 else 2**-10
        torch.testing.assert_close(flat.float(), ref.p.float(), rtol=ulp, atol=1e-6, msg=what)
    else:
        torch.testing.assert_close(flat, ref.p.float(), rtol=3e-6, atol=3e-6, msg=what)


# ---------------------------------------------------------------------------------------------- the C loop

def _kernel_row(weight, grad, indices, m, v, master, *, step, lr, beta1, beta2, eps, wd):
    return (weight, grad, indices, m, v, master, False,
            (1 - beta1, beta2, 1 - beta2, lr / (1 - beta1**step), math.sqrt(1 - beta2**step), 1 - lr * wd, eps))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_rounds_low_precision_weights_to_nearest_even_as_torch(dtype):
    # master values exactly halfway between two neighbouring bf16/fp16 values (both parities of the lower
    # one), and one fp32 ulp either side of halfway: the weight written back must be torch's rounding of the
    # master copy, ties to even. (A random master value almost never lands on a tie.)
    n = 1531
    low = (torch.randn(n) * 4).to(dtype)
    low = low[low.abs() < 1000]  # far from fp16's largest finite value
    high = (low.view(torch.int16) + 1).view(dtype)  # the next value away from zero
    mid = ((low.double() + high.double()) / 2).float()  # exact in fp32
    assert torch.equal(mid.double(), (low.double() + high.double()) / 2)
    below = torch.nextafter(mid, torch.zeros_like(mid))
    above = torch.nextafter(mid, torch.full_like(mid, math.inf) * mid.sign())
    values = torch.cat([mid, below, above])
    values = values[torch.randperm(values.numel())]
    k = values.numel()
    for indices in (None, torch.randperm(3 * k + 7)[:k].sort().values.to(torch.int32)):
        size = k if indices is None else 3 * k + 7
        weight = torch.full((size,), math.nan, dtype=dtype)
        master = values.clone()
        m, v = torch.zeros(k), torch.zeros(k)
        # lr 0 and no decay: the update leaves the master copy as it is, only the write-back rounds
        row = _kernel_row(weight, torch.randn(size).to(dtype), indices, m, v, master, step=1, lr=0.0, beta1=0.9,
                          beta2=0.999, eps=1e-8, wd=0.0)
        _cpu_kernel.masked_adamw_cpu(*_cpu_kernel.pack([row]))
        assert torch.equal(master, values)
        written = weight if indices is None else weight[indices.long()]
        expected = values.to(dtype)
        assert torch.equal(written.view(torch.int16), expected.view(torch.int16)), \
            int((written.view(torch.int16) != expected.view(torch.int16)).sum())
        if indices is not None:
            rest = torch.ones(size, dtype=torch.bool)
            rest[indices.long()] = False
            assert torch.isnan(weight[rest].float()).all()


def _assert_cpu_kernel_matches_float64(cases, hp, first_step):
    """One call of the C loop over ``cases`` ((dtype, n, indices or None for dense), one tensor each, the
    unselected weights poisoned with NaN, step counts from ``first_step`` on) against float64 AdamW."""
    rows, refs = [], []
    for step, (dtype, n, indices) in enumerate(cases, start=first_step):
        k = n if indices is None else indices.numel()
        sel = torch.arange(n) if indices is None else indices.long()
        weight = torch.randn(n).to(dtype)
        unselected = torch.ones(n, dtype=torch.bool)
        unselected[sel] = False
        weight[unselected] = math.nan
        grad = _grad(n, dtype)
        m, v = torch.randn(k) * 0.1, torch.rand(k) * 0.01
        master = weight[sel].float() + torch.randn(k) * 1e-3 if dtype != torch.float32 else None
        ref_p = (weight[sel] if master is None else master).double()
        ref_m, ref_v = m.double(), v.double()
        _adamw64(ref_p, grad[sel].double(), ref_m, ref_v, step=step, **hp)
        rows.append(_kernel_row(weight, grad, indices, m, v, master, step=step, lr=hp["lr"], beta1=hp["beta1"],
                                beta2=hp["beta2"], eps=hp["eps"], wd=hp["weight_decay"]))
        refs.append((sel, unselected, ref_p, ref_m, ref_v))
    _cpu_kernel.masked_adamw_cpu(*_cpu_kernel.pack(rows))
    for i, (row, (sel, unselected, ref_p, ref_m, ref_v)) in enumerate(zip(rows, refs)):
        weight, _, _, m, v, master = row[:6]
        torch.testing.assert_close(m, ref_m.float(), rtol=5e-6, atol=3e-7, msg=f"tensor {i}")
        torch.testing.assert_close(v, ref_v.float(), rtol=1e-6, atol=5e-9, msg=f"tensor {i}")
        got = weight[sel] if master is None else master
        torch.testing.assert_close(got, ref_p.float(), rtol=5e-6, atol=3e-7, msg=f"tensor {i}")
        if master is not None:
            assert torch.equal(weight[sel], master.to(weight.dtype))
        assert torch.isnan(weight[unselected].float()).all()


def test_cpu_kernel_is_exact_across_its_work_chunks():
    # the C loop cuts each tensor's selection into chunks of 32768 elements that threads take in turn;
    # selections of several chunks (every element of each chunk, the last ones included) in every loop of
    # the kernel: fp32 with int32 indices (runs and scattered), fp32 dense, bf16 with int64 indices
    chunk = 32768
    hp = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    cases = []
    n = 2 * chunk + 4099
    idx = torch.cat([torch.arange(chunk - 300, chunk + 301),  # a run across the first chunk boundary
                     torch.randperm(n - chunk - 400)[:chunk + 1001].sort().values + chunk + 400])
    cases.append((torch.float32, n, idx.int()))
    cases.append((torch.float32, chunk + 77, None))
    n = 3 * chunk + 5
    cases.append((torch.bfloat16, n, torch.randperm(n)[:2 * chunk + 333].sort().values))
    _assert_cpu_kernel_matches_float64(cases, hp, first_step=2)


def test_cpu_kernel_selections_of_whole_chunks_and_empty_ones_next_to_others():
    # the threads map a chunk number to its tensor by counting each tensor's chunks (ceil(k / 32768)): a
    # selection of exactly one or two whole chunks, or of none, must not shift the tensors after it
    chunk = 32768
    hp = dict(lr=2e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.05)
    cases = [(torch.float32, chunk + 999, chunk), (torch.float32, 41, 0), (torch.bfloat16, 2 * chunk + 3, 2 * chunk),
             (torch.float32, 5003, 1711)]
    for i, (dtype, n, k) in enumerate(cases):
        sel = torch.randperm(n)[:k].sort().values
        cases[i] = (dtype, n, sel.int() if dtype == torch.float32 else sel)
    _assert_cpu_kernel_matches_float64(cases, hp, first_step=3)


def test_cpu_kernel_on_several_threads_is_bit_identical_to_one_thread():
    # the threads take chunks from a shared counter and the call returns after joining them: every chunk
    # is applied exactly once and finished before the call returns, whatever the thread count
    chunk = 32768
    sizes = [(torch.float32, 9 * chunk + 123), (torch.bfloat16, 4 * chunk + 7), (torch.float32, 3 * chunk - 5)]
    inputs = []
    for dtype, n in sizes:
        k = n * 3 // 4
        idx = torch.randperm(n)[:k].sort().values
        inputs.append((torch.randn(n).to(dtype), _grad(n, dtype), idx.int() if dtype == torch.float32 else idx,
                       torch.randn(k) * 0.1, torch.rand(k) * 0.01))

    def run(threads):
        rows = []
        for weight, grad, idx, m, v in inputs:
            w = weight.clone()
            master = w[idx.long()].float() if w.dtype != torch.float32 else None
            rows.append(_kernel_row(w, grad, idx, m.clone(), v.clone(), master, step=4, lr=1e-2, beta1=0.9,
                                    beta2=0.99, eps=1e-8, wd=0.1))
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            _cpu_kernel.masked_adamw_cpu(*_cpu_kernel.pack(rows))
        finally:
            torch.set_num_threads(before)
        return [torch.cat([r[0].float(), r[3], r[4]] + ([] if r[5] is None else [r[5]])) for r in rows]

    expected = run(1)
    for _ in range(4):
        for got, want in zip(run(4), expected):
            assert torch.equal(got, want), int((got != want).sum())


def _run_kernel(impl, rows):
    if impl == "triton":
        from allo_kernels.masked_adamw import masked_adamw_triton

        masked_adamw_triton(rows)
    else:
        _cpu_kernel.masked_adamw_cpu(*_cpu_kernel.pack(rows))


@pytest.mark.parametrize("impl", ["cpu", TRITON])
def test_kernels_read_every_scalar_column_per_tensor(impl):
    # rows whose scalars differ only in 1 - beta1, beta2, 1 - beta2 (the kernels' API takes any scalars per
    # tensor; the Triton launch passes scalars shared by every row as arguments, per-row ones as a table)
    device = device_for(impl)
    rows, refs = [], []
    for i, (beta1, beta2) in enumerate([(0.9, 0.999), (0.5, 0.9), (0.7, 0.99)]):
        n, k = 211 + 2 * i, 97
        idx = torch.randperm(n)[:k].sort().values
        weight, grad = torch.randn(n), _grad(n)
        m0, v0 = torch.randn(k) * 0.1, torch.rand(k) * 0.01
        ref = (weight[idx].double(), m0.double(), v0.double())
        _adamw64(ref[0], grad[idx].double(), ref[1], ref[2], step=3, lr=1e-2, beta1=beta1, beta2=beta2, eps=1e-8,
                 weight_decay=0.1)
        # the step-dependent columns are the first row's for every row: only the betas differ
        step_size, bc2 = 1e-2 / (1 - 0.9**3), math.sqrt(1 - 0.999**3)
        ref[0].copy_(weight[idx].double() * (1 - 1e-3) - step_size * ref[1] / (ref[2].sqrt() / bc2 + 1e-8))
        rows.append((weight.to(device), grad.to(device), idx.int().to(device), m0.to(device), v0.to(device), None,
                     False, (1 - beta1, beta2, 1 - beta2, step_size, bc2, 1 - 1e-3, 1e-8)))
        refs.append((idx, ref))
    _run_kernel(impl, rows)
    for row, (idx, (ref_p, ref_m, ref_v)) in zip(rows, refs):
        torch.testing.assert_close(row[3].cpu(), ref_m.float(), rtol=5e-6, atol=3e-7)
        torch.testing.assert_close(row[4].cpu(), ref_v.float(), rtol=1e-6, atol=5e-9)
        torch.testing.assert_close(row[0].cpu()[idx], ref_p.float(), rtol=5e-6, atol=3e-7)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_block_contiguous_but_for_its_last_element_reads_its_indices():
    # a block of 1024 selected elements whose first 1023 are one run and whose last is elsewhere is not a
    # run: the kernel must read its indices (a run's last element decides it), and update exactly them
    from allo_kernels.masked_adamw import BLOCK, contiguous_block_starts, masked_adamw_triton

    idx = torch.cat([torch.arange(8, 8 + BLOCK - 1), torch.tensor([BLOCK + 37]),
                     torch.arange(2 * BLOCK + 8, 3 * BLOCK + 8), torch.tensor([3 * BLOCK + 11, 3 * BLOCK + 12])])
    assert contiguous_block_starts(idx).tolist() == [-1, 2 * BLOCK + 8, -1]
    device = device_for("triton")
    n, k = 3 * BLOCK + 21, idx.numel()
    sel = torch.zeros(n, dtype=torch.bool)
    sel[idx] = True
    weight = torch.randn(n)
    weight[~sel] = math.nan
    grad = _grad(n)
    grad[~sel] = math.nan
    ref_p, ref_m, ref_v = weight[idx].double(), torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    _adamw64(ref_p, grad[idx].double(), ref_m, ref_v, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
             weight_decay=0.1)
    w, m, v = weight.to(device), torch.zeros(k, device=device), torch.zeros(k, device=device)
    masked_adamw_triton([_kernel_row(w, grad.to(device), idx.int().to(device), m, v, None, step=1, lr=1e-2, beta1=0.9,
                                     beta2=0.999, eps=1e-8, wd=0.1)])
    w = w.cpu()
    assert torch.isnan(w[~sel]).all()
    torch.testing.assert_close(w[idx], ref_p.float(), rtol=5e-6, atol=3e-7)
    torch.testing.assert_close(m.cpu(), ref_m.float(), rtol=5e-6, atol=3e-7)


# ---------------------------------------------------------------------------------- through the optimizer

def _mixed_params(device):
    """A fully selected fp32 parameter first (torch's fused loop on the CPU: the kernel launch gets the
    later rows), partial fp32 ones (bool mask, index mask), a partial bf16 one (another Triton bucket) and
    another fully selected one."""
    shapes_dtypes = [((5, 3), torch.float32), ((37, 11), torch.float32), ((53,), torch.float32),
                     ((19, 7), torch.bfloat16), ((3,), torch.float32)]
    params = [torch.nn.Parameter(torch.randn(s).to(d).to(device)) for s, d in shapes_dtypes]
    masks = [None, torch.rand(37, 11) < 0.3, torch.randperm(53)[:17], torch.rand(19, 7) < 0.4, None]
    return params, [m if m is None else m.to(device) for m in masks]


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_with_different_step_counts_each_use_their_own(backend):
    # one group whose parameters have taken different numbers of steps (the first steps give only some
    # parameters a gradient): each must use its own count's bias corrections, on the general path (which
    # builds a per-row scalar table) and on the replayed plan that follows, in the kernels and in torch's
    # fused loop (two fully selected parameters with different counts)
    device = device_for(backend)
    params, masks = _mixed_params(device)
    hp = dict(lr=2e-2, beta1=0.8, beta2=0.95, eps=1e-8, weight_decay=0.1)
    opt = MaskedAdamW(params, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                      weight_decay=hp["weight_decay"], masks=masks, backend=backend)
    refs = [_Reference(p, torch.arange(p.numel()) if m is None else _flat_selection(m))
            for p, m in zip(params, masks)]
    for step in range(6):
        stepping = [1] if step < 2 else ([2, 4] if step < 3 else range(len(params)))
        for i, p in enumerate(params):
            p.grad = _grad(p.shape, p.dtype).to(device) if i in stepping else None
        opt.step()
        for i in stepping:
            refs[i].update(params[i].grad, **hp)
    assert [int(opt.state[p]["step"]) for p in params] == [3, 5, 4, 3, 4]
    for i, (p, ref) in enumerate(zip(params, refs)):
        _assert_selected_close(p, opt.state[p], ref, f"params[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_groups_keep_their_own_hyperparameters_on_partial_masks(backend):
    # two groups, each with its own lr, weight decay, betas and eps, partial masks in both: every step (the
    # first on the general path, the later ones replaying the plan) uses each group's own values
    device = device_for(backend)
    params, masks = _mixed_params(device)
    groups_hp = [dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0),
                 dict(lr=5e-2, beta1=0.7, beta2=0.9, eps=1e-3, weight_decay=0.4)]
    groups = [{"params": params[:2]},
              {"params": params[2:], "lr": 5e-2, "betas": (0.7, 0.9), "eps": 1e-3, "weight_decay": 0.4}]
    opt = MaskedAdamW(groups, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, masks=masks, backend=backend)
    refs = [_Reference(p, torch.arange(p.numel()) if m is None else _flat_selection(m))
            for p, m in zip(params, masks)]
    for _ in range(4):
        for i, (p, ref) in enumerate(zip(params, refs)):
            p.grad = _grad(p.shape, p.dtype).to(device)
            ref.update(p.grad, **groups_hp[0 if i < 2 else 1])
        opt.step()
    for i, (p, ref) in enumerate(zip(params, refs)):
        _assert_selected_close(p, opt.state[p], ref, f"params[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decay_unselected_decays_each_stepping_parameter_once(backend):
    # the authors' behaviour: every parameter that takes a step (has a gradient) is multiplied by
    # 1 - lr * wd, selected elements then get the Adam update; on every backend, for fp32 weights and for
    # bf16 ones with a master copy; a parameter without a gradient is not touched
    device = device_for(backend)
    lr, wd = 0.1, 0.5
    hp = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd)
    params, masks = _mixed_params(device)
    idle = torch.nn.Parameter(torch.randn(7, 3).to(device))  # empty mask, no gradient
    frozen = torch.nn.Parameter(torch.randn(9).to(device))  # empty mask, a gradient
    opt = MaskedAdamW(params + [idle, frozen], lr=lr, weight_decay=wd, masks=masks + [False, False],
                      decay_unselected=True, backend=backend)
    refs = [_Reference(p, torch.arange(p.numel()) if m is None else _flat_selection(m))
            for p, m in zip(params, masks)]
    idle_start = idle.detach().clone()
    expected_frozen = frozen.detach().clone()
    for _ in range(2):
        unselected = []
        for p, ref in zip(params, refs):
            rest = torch.ones(p.numel(), dtype=torch.bool)
            rest[ref.idx] = False
            # torch's own in-place product in the weight's dtype: what the unselected elements must equal
            unselected.append((rest, p.detach().cpu().reshape(-1)[rest].mul_(1 - lr * wd)))
            p.grad = _grad(p.shape, p.dtype).to(device)
            ref.update(p.grad, **hp)
        frozen.grad = _grad(frozen.shape).to(device)
        expected_frozen.mul_(1 - lr * wd)
        opt.step()
        for i, (p, (rest, expect)) in enumerate(zip(params, unselected)):
            assert torch.equal(p.detach().cpu().reshape(-1)[rest], expect), f"params[{i}]"
    for i, (p, ref) in enumerate(zip(params, refs)):
        _assert_selected_close(p, opt.state[p], ref, f"params[{i}]")
    assert torch.equal(frozen.detach(), expected_frozen)
    assert torch.equal(idle.detach(), idle_start)


def test_reference_decay_unselected_decays_the_whole_tensor_once():
    # the exported plain-PyTorch step with decay_unselected (not used by the optimizer, which decays first
    # and calls it without): every element times 1 - lr * wd, the selected ones then updated
    n = 301
    idx = torch.randperm(n)[:97].sort().values
    hp = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.3)
    for with_master in (False, True):
        param = torch.randn(n, dtype=torch.float64)
        grad = _grad(n).double()
        master = param[idx].clone() + 1e-3 * torch.randn(idx.numel(), dtype=torch.float64) if with_master else None
        expected = param * (1 - hp["lr"] * hp["weight_decay"])
        p = (param[idx] if master is None else master).clone()
        m, v = torch.zeros(idx.numel(), dtype=torch.float64), torch.zeros(idx.numel(), dtype=torch.float64)
        _adamw64(p, grad[idx], m, v, step=3, **hp)
        expected[idx] = p
        got_m, got_v = torch.zeros_like(m), torch.zeros_like(v)
        masked_adamw_step_reference(param, grad, idx, got_m, got_v, master, step=3, lr=hp["lr"], beta1=hp["beta1"],
                                    beta2=hp["beta2"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                                    decay_unselected=True)
        torch.testing.assert_close(param, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_m, m, rtol=1e-12, atol=0)
        torch.testing.assert_close(got_v, v, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------ clipping

def _clip_model():
    model = torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.Tanh(), torch.nn.Linear(11, 5))
    masks = {"0.weight": torch.rand(11, 13) < 0.3, "0.bias": torch.tensor([2, 7]), "2.weight": None,
             "2.bias": False}
    return model, masks


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("compact", [False, True])
def test_clip_grad_norm_uses_the_norm_type_and_never_scales_up(norm_type, compact):
    model, masks = _clip_model()
    opt = MaskedAdamW(model.named_parameters(), masks=masks, compact_grads=compact)
    x = torch.randn(6, 13)
    dense_model = torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.Tanh(), torch.nn.Linear(11, 5))
    dense_model.load_state_dict(model.state_dict())
    model(x).pow(2).sum().backward()
    dense_model(x).pow(2).sum().backward()
    # the gradients the step will use: compact mode keeps the selected elements (and the fully selected
    # parameter's gradient), dense mode every gradient
    parts = []
    for name, p in dense_model.named_parameters():
        m = masks[name]
        if not compact or m is None:
            parts.append(p.grad.reshape(-1).double())
        elif isinstance(m, torch.Tensor):
            parts.append(p.grad.reshape(-1)[_flat_selection(m)].double())
    flat = torch.cat(parts)
    expect = flat.abs().max() if math.isinf(norm_type) else flat.abs().pow(norm_type).sum().pow(1 / norm_type)
    before = [g.clone() for g in opt._grad_tensors()]
    # a limit above the norm: the gradients stay as they are
    norm = opt.clip_grad_norm_(float(expect) * 1.5, norm_type=norm_type)
    torch.testing.assert_close(norm.double(), expect, rtol=1e-5, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(before, opt._grad_tensors()))
    # below it: scaled to the limit, in the same norm
    opt.clip_grad_norm_(float(expect) / 4, norm_type=norm_type)
    after = torch.cat([g.reshape(-1).double() for g in opt._grad_tensors()])
    got = after.abs().max() if math.isinf(norm_type) else after.abs().pow(norm_type).sum().pow(1 / norm_type)
    torch.testing.assert_close(got, expect / 4, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("compact", [False, True])
def test_clip_grad_norm_error_if_nonfinite_raises_before_scaling(bad, compact):
    """error_if_nonfinite=True: a non-finite total norm raises (as torch's clip_grad_norm_ does) and leaves
    the gradients as they were; False (the default) returns the non-finite norm."""
    model, masks = _clip_model()
    opt = MaskedAdamW(model.named_parameters(), masks=masks, compact_grads=compact)
    model(torch.randn(6, 13)).pow(2).sum().backward()
    opt._grad_tensors()[0].view(-1)[0] = bad  # a selected element of 0.weight's gradient
    before = [g.clone() for g in opt._grad_tensors()]
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before, opt._grad_tensors()))
    assert not torch.isfinite(opt.clip_grad_norm_(1.0))


# ------------------------------------------------------------------------------------ selections and grads

def _other_selection_of_the_same_size(idx, numel):
    """Sorted flat indices, as many as ``idx``, not all the same as ``idx``."""
    while True:
        other = torch.randperm(numel)[:idx.numel()].sort().values
        if not torch.equal(other, idx):
            return other


def test_a_new_selection_of_the_same_size_replaces_the_old_one():
    # set_masks and load_state_dict keep the state of a parameter whose selection is unchanged; a different
    # selection with as many elements is a change: its elements train, from fresh (or the loaded) state
    p = torch.nn.Parameter(torch.randn(23, 17))
    first = torch.randperm(p.numel())[:61].sort().values
    second = _other_selection_of_the_same_size(first, p.numel())
    opt = MaskedAdamW([p], lr=1e-2, masks=[first])
    for _ in range(2):
        p.grad = _grad(p.shape)
        opt.step()
    saved_first = opt.state_dict()
    opt.set_masks([second])
    assert torch.equal(opt.state[p]["indices"].long(), second) and int(opt.state[p]["step"]) == 0
    start = p.detach().clone()
    ref = _Reference(p, second)
    p.grad = _grad(p.shape)
    ref.update(p.grad, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    opt.step()
    rest = torch.ones(p.numel(), dtype=torch.bool)
    rest[second] = False
    assert torch.equal(p.detach().reshape(-1)[rest], start.reshape(-1)[rest])
    _assert_selected_close(p, opt.state[p], ref, "after set_masks")
    # loading the first checkpoint brings its selection and state back
    opt.load_state_dict(saved_first)
    assert torch.equal(opt.state[p]["indices"].long(), first) and int(opt.state[p]["step"]) == 2
    assert torch.equal(opt.state[p]["exp_avg"], saved_first["state"][0]["exp_avg"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_partially_selected_parameter_with_a_non_contiguous_gradient(backend, layout):
    """A .grad laid out otherwise than the weight (transposed, expanded) must pair each selected weight with
    its own gradient element: the kernels address the gradient by the weight's flat indices."""
    device = device_for(backend)
    p = torch.nn.Parameter(torch.randn(19, 23).to(device))
    idx = torch.randperm(p.numel())[:97].sort().values
    opt = MaskedAdamW([p], lr=1e-2, masks=[idx.to(device)], backend=backend)
    ref = _Reference(p, idx)
    start = p.detach().cpu().clone()
    for _ in range(3):
        g = _grad((23, 19)).t() if layout == "transposed" else _grad((1, 23)).expand(19, 23)
        p.grad = g.to(device)
        assert not p.grad.is_contiguous()
        ref.update(g, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
        opt.step()
    _assert_selected_close(p, opt.state[p], ref, layout)
    rest = torch.ones(p.numel(), dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(p.detach().cpu().reshape(-1)[rest], start.reshape(-1)[rest])


@pytest.mark.parametrize("backend", ["cpu", TRITON])
def test_zero_grad_without_set_to_none_clears_compact_gradients(backend):
    # compact-grad mode: zero_grad(set_to_none=False) zeroes the gathered compact gradients in place, so a
    # step after it and one more backward uses that backward's gradient only, as in dense mode
    device = device_for(backend)
    model = torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.Tanh(), torch.nn.Linear(11, 5)).to(device)
    twin = torch.nn.Sequential(torch.nn.Linear(13, 11), torch.nn.Tanh(), torch.nn.Linear(11, 5)).to(device)
    twin.load_state_dict(model.state_dict())
    masks = {"0.weight": (torch.rand(11, 13) < 0.3).to(device), "0.bias": torch.tensor([2, 7], device=device),
             "2.weight": None, "2.bias": torch.tensor([0, 4], device=device)}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=masks, compact_grads=True, backend=backend)
    ref = MaskedAdamW(twin.named_parameters(), lr=1e-2, masks=masks, backend=backend)
    x0, x1 = torch.randn(4, 13).to(device), torch.randn(4, 13).to(device)
    model(x0).pow(2).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(not g.any() for g in opt._grad_tensors())
    model(x1).pow(2).sum().backward()
    twin(x1).pow(2).sum().backward()
    opt.step(), ref.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_replayed_cpu_step_with_one_row_in_a_launch_warns_nothing():
    """A replayed step whose C launch has one row (beside a fully selected parameter) handed torch a
    read-only broadcast view of the scalar table, and torch.from_numpy warned (an error under -W error)."""
    import warnings

    torch.manual_seed(0)
    dense = torch.nn.Parameter(torch.randn(4))
    sparse = torch.nn.Parameter(torch.randn(10, 10))
    opt = MaskedAdamW([dense, sparse], masks=[None, torch.rand(10, 10) < 0.3], backend="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            dense.grad, sparse.grad = torch.randn(4), torch.randn(10, 10)
            opt.step()
