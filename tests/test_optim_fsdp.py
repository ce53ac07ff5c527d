"""MaskedAdamW on FSDP2 shards (2 CPU processes, gloo) equals MaskedAdamW in one process.

The model is sharded with ``fully_shard`` (every parameter a ``Shard(0)`` DTensor, uneven blocks,
one parameter with no row at all on rank 1); masks are given over the global shapes. Compact
gradients, gradient accumulation, clipping, ``all_reduce_grads`` (a no-op for shards) and a
state-dict round trip all run on the shards.
"""

import io
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from allo.optim import MaskedAdamW

WORLD = 2
STEPS = 4
CUT = 2  # the resumed run rebuilds its optimizer from a state dict after this step
HP = dict(lr=0.05, weight_decay=0.1, eps=1e-8, compact_grads=True)
MAX_NORM = 0.05  # below the gradient norms: clipping scales every step


def _model():
    torch.manual_seed(0)
    # odd row counts: uneven blocks; the last layer's bias has one row, so rank 1 holds none of it
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))


def _masks(model):
    g = torch.Generator().manual_seed(7)
    masks = {}
    for name, p in model.named_parameters():
        masks[name] = torch.rand(p.shape, generator=g) < 0.4
    masks["0.weight"][4:] = False           # rank 1's block (rows 4..6) has nothing selected
    masks["0.weight"][1] = True             # a whole selected row on rank 0
    masks["2.weight"][:3] = False           # rank 0's block has nothing selected
    masks["0.bias"] = torch.ones(7, dtype=torch.bool)  # every element: the dense path, on shards
    masks["2.bias"] = torch.zeros(5, dtype=torch.bool)  # nothing: no state, never changes
    masks["4.weight"] = masks["4.weight"].reshape(-1).nonzero().squeeze(1)  # flat global indices
    masks["4.bias"] = torch.ones(1, dtype=torch.bool)
    return masks


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)


def _train(model, opt, rows, steps, *, sharded):
    """``rows``: this process's rows of the batch; two micro-batches per step, loss = global mean."""
    x, y = _batch()
    x, y = x[rows], y[rows]
    norms = []
    for _ in range(steps):
        for micro in (slice(0, len(x) // 2), slice(len(x) // 2, None)):
            loss = ((model(x[micro]) - y[micro]) ** 2).mean() / 2  # FSDP2 averages the ranks' grads
            loss.backward()
        if sharded:
            opt.all_reduce_grads()  # FSDP2 already averaged: must change nothing
        norms.append(float(opt.clip_grad_norm_(MAX_NORM)))
        opt.step()
        opt.zero_grad()
    return norms


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _worker(rank, out_dir):
    # a file rendezvous: a free TCP port picked beforehand can be taken by another process meanwhile
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (WORLD,))
        start = {n: p.detach().clone() for n, p in _model().named_parameters()}
        masks = _masks(_model())
        rows = slice(rank * 4, (rank + 1) * 4)

        # the yardstick: one process, whole parameters, the whole batch
        ref = _model()
        ref_opt = MaskedAdamW(ref.named_parameters(), masks=masks, local_grads=True, **HP)
        ref_norms = _train(ref, ref_opt, slice(None), STEPS, sharded=False)

        # uninterrupted sharded run
        a = _shard(_model(), mesh)
        assert all(isinstance(p, DTensor) for p in a.parameters())
        opt_a = MaskedAdamW(a.named_parameters(), masks=masks, **HP)
        norms = _train(a, opt_a, rows, STEPS, sharded=True)
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=1e-7)
        # selected elements counted over the ranks' blocks add up to the global masks
        count = torch.tensor(opt_a.selected_count())
        dist.all_reduce(count)
        assert int(count) == sum(int(m.sum()) if m.dtype == torch.bool else m.numel() for m in masks.values())
        for name, p in a.named_parameters():
            full = p.full_tensor()
            torch.testing.assert_close(full, dict(ref.named_parameters())[name].detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name}: {m}")
            m = masks[name]
            if m.dtype != torch.bool:
                m = torch.zeros(p.shape, dtype=torch.bool).view(-1).index_fill_(0, m, True).view(p.shape)
            assert torch.equal(full[~m], start[name][~m]), f"{name}: an unselected element changed"
            assert not torch.equal(full[m], start[name][m]) or not m.any(), f"{name}: selected elements never moved"
        assert not opt_a.state.get(dict(a.named_parameters())["2.bias"])  # empty mask: no state
        if rank == 1:  # no selected row in this block, and a parameter with no row at all
            assert not opt_a.state.get(dict(a.named_parameters())["0.weight"])
            assert dict(a.named_parameters())["4.bias"].to_local().numel() == 0

        # the same run, its optimizer rebuilt from a saved state dict after CUT steps: bit for bit
        b = _shard(_model(), mesh)
        opt_b = MaskedAdamW(b.named_parameters(), masks=masks, **HP)
        _train(b, opt_b, rows, CUT, sharded=True)
        buf = io.BytesIO()
        torch.save(opt_b.state_dict(), buf)
        torch.save(opt_b.state_dict(), os.path.join(out_dir, f"optim{rank}.pt"))
        opt_b.remove_hooks()
        del opt_b
        buf.seek(0)
        opt_b = MaskedAdamW(b.named_parameters(), **HP)  # masks come from the state dict
        opt_b.load_state_dict(torch.load(buf, weights_only=False))
        _train(b, opt_b, rows, STEPS - CUT, sharded=True)
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa.to_local(), pb.to_local()), f"resumed run differs at {name}"

        # another rank's state does not fit this rank's blocks
        dist.barrier()
        other = torch.load(os.path.join(out_dir, f"optim{1 - rank}.pt"), weights_only=False)
        try:
            MaskedAdamW(b.named_parameters(), **HP).load_state_dict(other)
            raise AssertionError("loading the other rank's optimizer state did not fail")
        except ValueError as e:
            assert "this rank holds rows" in str(e), e

        # a rank's state dict into an optimizer over the whole model: its indices are this rank's rows'
        try:
            plain = _model()
            MaskedAdamW(plain.named_parameters(), **HP).load_state_dict(
                torch.load(os.path.join(out_dir, f"optim{rank}.pt"), weights_only=False))
            raise AssertionError("a rank's sharded optimizer state loaded into a whole model")
        except ValueError as e:
            assert "saved by one rank of a sharded (FSDP2) run" in str(e), e
        # a rank with nothing selected in its rows saves no state there: its rows still travel, and another
        # rank's optimizer refuses them (it loaded as 'nothing selected', dropping its own selection)
        weight0 = dict(b.named_parameters())["0.weight"]
        only = MaskedAdamW([("0.weight", weight0)], masks={"0.weight": masks["0.weight"]}, **HP)
        assert (only.selected_count() == 0) == (rank == 1) and (len(only.state_dict()["state"]) == 0) == (rank == 1)
        torch.save(only.state_dict(), os.path.join(out_dir, f"only{rank}.pt"))
        only.remove_hooks()
        dist.barrier()
        try:
            MaskedAdamW([("0.weight", weight0)], **HP).load_state_dict(
                torch.load(os.path.join(out_dir, f"only{1 - rank}.pt"), weights_only=False))
            raise AssertionError("the other rank's (stateless) optimizer state loaded")
        except ValueError as e:
            assert "this rank holds rows" in str(e), e

        # the infinity norm with a parameter this rank holds no rows of (4.bias on rank 1), dense mode
        opt_b.remove_hooks()  # (its compact-grad hooks would take the gradients first)
        x, y = _batch()
        dense = MaskedAdamW(b.named_parameters(), lr=0.05)
        ((b(x[rows]) - y[rows]) ** 2).mean().backward()
        norm = float(dense.clip_grad_norm_(1e9, norm_type=float("inf")))
        ref = _model()
        ref.load_state_dict({n: q.full_tensor() for n, q in b.named_parameters()})  # b's trained weights
        ((ref(x) - y) ** 2).mean().backward()
        expect = float(torch.nn.utils.get_total_norm([q.grad for q in ref.parameters()], float("inf")))
        assert abs(norm - expect) <= 1e-6 * expect, (norm, expect)
        dense.zero_grad()

        # layouts other than FSDP2's are refused, naming the parameter
        rep = nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Replicate()]))
        try:
            MaskedAdamW([("replicated.weight", rep)], **HP)
            raise AssertionError("a Replicate DTensor was accepted")
        except ValueError as e:
            assert "'replicated.weight'" in str(e) and "Shard(0)" in str(e), e
    finally:
        dist.destroy_process_group()


def test_sharded_masked_adamw_equals_single_process(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
