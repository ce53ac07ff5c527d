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
        ref = _run(ref, ref, MaskedAdamW(ref.named_parameters(), masks=_masks(ref), **hp), slice(None), reduce=False)
        rows = slice(4 * rank, 4 * rank + 4)

        plain = _model()
        _run(plain, plain, MaskedAdamW(plain.named_parameters(), masks=_masks(plain), **hp), rows, reduce=True)
        for (name, p), q in zip(plain.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")

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
