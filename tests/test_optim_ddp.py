"""Compact-grad mode next to DistributedDataParallel (2 CPU processes, gloo).

Compact gradients are gathered as autograd makes each gradient, before DDP's reducer averages them,
so under DDP every rank would step on its own gradient (the ranks' weights drifting apart). Without
DDP, ``all_reduce_grads()`` averages the compact gradients: the ranks then match one process with the
whole batch. Wrapped in DDP, ``step()`` raises, naming the parameter and the fix.
"""

import gc

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from allo.optim import MaskedAdamW

WORLD = 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))


def _masks(model):
    g = torch.Generator().manual_seed(1)
    return {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters()}


def _run(model, forward, opt, rows, *, reduce, steps=3):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    for _ in range(steps):
        ((forward(x[rows]) - y[rows]) ** 2).mean().backward()
        if reduce:
            opt.all_reduce_grads()
        opt.step()
        opt.zero_grad()
    return model


def _worker(rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        hp = dict(lr=1e-2, compact_grads=True)
        ref = _model()
        # the whole batch in every process: one process's run, on purpose (local_grads)
        ref = _run(ref, ref, MaskedAdamW(ref.named_parameters(), masks=_masks(ref), local_grads=True, **hp),
                   slice(None), reduce=False)
        rows = slice(4 * rank, 4 * rank + 4)

        plain = _model()
        _run(plain, plain, MaskedAdamW(plain.named_parameters(), masks=_masks(plain), **hp), rows, reduce=True)
        for (name, p), q in zip(plain.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")

        # a parameter frozen when the optimizer was built and trainable since (no hook yet at the first
        # backward): all_reduce_grads must average its gradient too, not leave the step this rank's own
        late = _model()
        late[0].weight.requires_grad_(False)
        opt = MaskedAdamW(late.named_parameters(), masks=_masks(late), **hp)
        late[0].weight.requires_grad_(True)
        _run(late, late, opt, rows, reduce=True)
        for (name, p), q in zip(late.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"unfrozen later, {name}: {m}")

        wrapped = _model()
        opt = MaskedAdamW(wrapped.named_parameters(), masks=_masks(wrapped), **hp)
        ddp = DistributedDataParallel(wrapped)
        try:
            _run(wrapped, ddp, opt, rows, reduce=False, steps=1)
            raise AssertionError("compact mode under DDP stepped")
        except RuntimeError as e:
            assert "DistributedDataParallel" in str(e) and "all_reduce_grads()" in str(e) and "parameter '" in str(e), e
        # DDP's reducer and gloo's threads go before the process group (else an abort at exit, now and then)
        del ddp
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_compact_grads_with_all_reduce_match_one_process_and_ddp_is_refused(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")


class _Branches(nn.Module):
    """Two branches; each rank's batch reaches only some of them (an MoE expert, a skipped head)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 2), nn.Linear(4, 2, bias=False), nn.Linear(4, 2)

    def forward(self, x, branches):
        return sum(getattr(self, name)(x) for name in branches)


def _branch_masks(model):
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters()}
    masks["a.bias"] = None  # fully selected: a dense gradient next to the compact ones
    return masks


def _branch_worker(rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        # rank 0 uses a only, rank 1 a and b; neither uses c. One process holding both halves of the batch
        # sums the ranks' losses / WORLD: what averaging the ranks' gradients gives
        uses = [("a",), ("a", "b")]
        g = torch.Generator().manual_seed(4)
        x = torch.randn(WORLD, 3, 4, generator=g)
        for compact in (True, False):
            ref = _Branches()
            ref_opt = MaskedAdamW(ref.named_parameters(), lr=1e-2, masks=_branch_masks(ref), compact_grads=compact,
                                  local_grads=True)
            model = _Branches()
            opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=_branch_masks(model), compact_grads=compact)
            for _ in range(2):
                (sum(ref(x[r], uses[r]).pow(2).sum() for r in range(WORLD)) / WORLD).backward()
                ref_opt.step()
                ref_opt.zero_grad()
                model(x[rank], uses[rank]).pow(2).sum().backward()
                opt.all_reduce_grads()
                opt.step()
                opt.zero_grad()
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: f"compact={compact} {name}: {m}")
            # nobody used c: it has no gradient after the reduction either (and its state never moved)
            model(x[rank], uses[rank]).pow(2).sum().backward()
            opt.all_reduce_grads()
            assert model.c.weight.grad is None and model.c.weight not in opt._compact
            assert opt.state[model.c.weight]["step"] == 0
        _unreduced_compact_grads_are_refused(rank, x, uses)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _unreduced_compact_grads_are_refused(rank, x, uses):
    """A step on compact gradients no all_reduce_grads averaged raises on every rank: forgotten, or left to
    DDP with find_unused_parameters=True (transformers.Trainer's setting on several processes), which finds
    no gradient where the hook took it and leaves each rank its own, silently."""
    model = _Branches()
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=_branch_masks(model), compact_grads=True)
    before = [p.detach().clone() for p in model.parameters()]
    for wrap in (None, "ddp"):
        forward = model if wrap is None else DistributedDataParallel(model, find_unused_parameters=True)
        forward(x[rank], uses[rank]).pow(2).sum().backward()
        try:
            opt.step()
            raise AssertionError(f"{wrap}: stepped on unreduced compact gradients")
        except RuntimeError as e:
            assert "not averaged across the 2 processes" in str(e) and "all_reduce_grads()" in str(e), e
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # nothing stepped
        opt.zero_grad()
        del forward
        gc.collect()
    # reduced, the step goes; reduced then zero_grad (a skipped step), the next one must reduce again
    model(x[rank], uses[rank]).pow(2).sum().backward()
    opt.all_reduce_grads()
    opt.step()
    # a step consumes the reduction: the next backward's gradients must be reduced again
    model(x[rank], uses[rank]).pow(2).sum().backward()
    try:
        opt.step()
        raise AssertionError("stepped on gradients reduced before the last step")
    except RuntimeError as e:
        assert "not averaged across the 2 processes" in str(e), e
    opt.zero_grad()
    opt.all_reduce_grads()
    opt.zero_grad()
    model(x[rank], uses[rank]).pow(2).sum().backward()
    try:
        opt.step()
        raise AssertionError("stepped on gradients reduced before the last zero_grad")
    except RuntimeError:
        opt.zero_grad()
    # per-rank training on purpose
    local = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=_branch_masks(model), compact_grads=True,
                        local_grads=True)
    model(x[rank], uses[rank]).pow(2).sum().backward()
    local.step()


def test_all_reduce_grads_pairs_the_same_parameters_when_ranks_miss_different_gradients(tmp_path):
    # rank 0 has no gradient for b: its buffer used to hold only a's, so a was averaged with b's gradient
    mp.start_processes(_branch_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
