"""MaskedAdamW's compact-gradient mode and its helpers, where the other tests left behaviour open (found by
mutation testing: each test here failed on a deliberately broken copy of the code that the rest of the suite
passed).

Gradients reach the parameters through ``torch.autograd.backward(params, grads)``, so the post-accumulate-grad
hooks run as in training while every gradient value is chosen here (fresh random, odd sizes, non-uniform
magnitudes). Expected weights are computed here in float64 by ``_adamw64``; unselected elements must stay
bit-identical."""

import math

import pytest
import torch

from allo.optim import MaskedAdamW

HP = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _adamw64(p, g, m, v, *, step, lr, betas, eps, weight_decay):
    """One AdamW step in float64 on 1-D tensors ``p`` (the selected weights), ``m``, ``v`` (in place)."""
    beta1, beta2 = betas
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
    p.mul_(1 - lr * weight_decay).sub_(lr / (1 - beta1**step) * m / denom)


def _grad(shape):
    return torch.randn(shape) * torch.rand(shape) * 3


class _Ref:
    """float64 state of one parameter's selected elements (``idx``: sorted flat indices)."""

    def __init__(self, p, idx, **hp):
        self.idx, self.hp = idx, hp
        self.start = p.detach().clone()
        self.p = p.detach().reshape(-1)[idx].double()
        self.m = torch.zeros(idx.numel(), dtype=torch.float64)
        self.v = torch.zeros(idx.numel(), dtype=torch.float64)
        self.step = 0

    def update(self, grad):
        """``grad``: the whole (dense) gradient, float64 or fp32."""
        self.step += 1
        _adamw64(self.p, grad.reshape(-1)[self.idx].double(), self.m, self.v, step=self.step, **self.hp)

    def check(self, p, what=""):
        flat = p.detach().reshape(-1)
        torch.testing.assert_close(flat[self.idx], self.p.float(), rtol=2e-6, atol=2e-6, msg=lambda m: f"{what}: {m}")
        rest = torch.ones(flat.numel(), dtype=torch.bool)
        rest[self.idx] = False
        assert torch.equal(flat[rest], self.start.reshape(-1)[rest]), f"{what}: an unselected element changed"


def _mask(shape, density):
    m = torch.rand(shape) < density
    m.reshape(-1)[0] = True  # never empty, never full
    m.reshape(-1)[-1] = False
    return m


# ------------------------------------------------------------------------------------------ zero_grad

def test_zero_grad_discards_the_compact_gradients_gathered_so_far():
    # the documented way to skip a step in compact mode: opt.zero_grad() (model.zero_grad() cannot reach the
    # compact gradients); the next step must then see only the gradients of later backward passes
    p = torch.nn.Parameter(torch.randn(7, 13))
    mask = _mask(p.shape, 0.35)
    opt = MaskedAdamW([p], masks=[mask], compact_grads=True, **HP)
    ref = _Ref(p, mask.reshape(-1).nonzero().squeeze(1), **HP)
    skipped = _grad(p.shape) * 1e3  # e.g. an overflowed step
    torch.autograd.backward([p], [skipped])
    assert opt.compact_grad(p) is not None
    opt.zero_grad()
    assert opt.compact_grad(p) is None and p.grad is None
    g1, g2 = _grad(p.shape), _grad(p.shape)
    torch.autograd.backward([p], [g1])
    torch.autograd.backward([p], [g2])
    opt.step()
    ref.update(g1.double() + g2.double())
    ref.check(p, "after a skipped step")



class _FailingBackward(torch.autograd.Function):
    """Identity whose backward raises (an out-of-memory error in the middle of a backward, say)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward failed")


def test_zero_grad_after_a_failed_backward_drops_the_routed_embedding_part():
    # a routed embedding's part is held aside until its backward ends; a backward that fails after it ran
    # never ends, and zero_grad (skipping the batch) must drop the part, or it leaks into the next step
    from allo.optim import compact_embedding_grads

    V, H = 23, 9
    emb = torch.nn.Embedding(V, H)
    other = torch.nn.Parameter(torch.randn(5))
    mask = _mask(emb.weight.shape, 0.4)
    opt = MaskedAdamW([emb.weight, other], masks=[mask, None], compact_grads=True, **HP)
    compact_embedding_grads(emb, opt)
    idx = mask.reshape(-1).nonzero().squeeze(1)

    def loss_of(ids, upstream, fail):
        before = _FailingBackward.apply(other) if fail else other  # made first: its backward runs last
        return (emb(ids) * upstream).sum() + before.sum()

    ids = torch.randint(0, V, (3, 7))
    with pytest.raises(RuntimeError, match="backward failed"):
        loss_of(ids, _grad((3, 7, H)), fail=True).backward()
    opt.zero_grad()
    ids = torch.randint(0, V, (4, 5))
    ids[0, :3] = 2  # a repeated row
    upstream = _grad((4, 5, H))
    loss_of(ids, upstream, fail=False).backward()
    dense = torch.zeros(V, H, dtype=torch.float64).index_add_(0, ids.reshape(-1), upstream.reshape(-1, H).double())
    torch.testing.assert_close(opt.compact_grad(emb.weight).double(), dense.reshape(-1)[idx], rtol=1e-6, atol=1e-6)



def test_decay_unselected_decays_an_empty_mask_only_on_steps_it_got_a_gradient():
    # decay_unselected=True decays a parameter with nothing selected whole on each step where it had a
    # gradient (as in dense mode, where its .grad tells); the hook's record of that gradient is consumed by
    # the step, so a later step without a gradient for it (model.zero_grad() between, not opt.zero_grad())
    # leaves it alone
    frozen = torch.nn.Parameter(torch.randn(5, 9))
    w = torch.nn.Parameter(torch.randn(6, 7))
    mask = _mask(w.shape, 0.4)
    opt = MaskedAdamW([frozen, w], masks=[False, mask], compact_grads=True, decay_unselected=True, **HP)
    decay = 1 - HP["lr"] * HP["weight_decay"]
    start = frozen.detach().clone()
    torch.autograd.backward([frozen, w], [_grad(frozen.shape), _grad(w.shape)])
    assert frozen.grad is None
    opt.step()
    assert torch.equal(frozen.detach(), start * decay)
    torch.autograd.backward([w], [_grad(w.shape)])  # `frozen` unused in this batch
    opt.step()
    assert torch.equal(frozen.detach(), start * decay), "decayed on a step without a gradient"


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_forgets_that_an_empty_mask_got_a_gradient(set_to_none):
    # a step skipped with opt.zero_grad() (either form): the gradient that reached the empty-mask parameter
    # went with it, so the next step, in whose batch it had none, must not decay it
    frozen = torch.nn.Parameter(torch.randn(5, 9))
    w = torch.nn.Parameter(torch.randn(6, 7))
    opt = MaskedAdamW([frozen, w], masks=[False, _mask(w.shape, 0.4)], compact_grads=True, decay_unselected=True, **HP)
    start = frozen.detach().clone()
    torch.autograd.backward([frozen, w], [_grad(frozen.shape), _grad(w.shape)])
    opt.zero_grad(set_to_none=set_to_none)
    torch.autograd.backward([w], [_grad(w.shape)])
    opt.step()
    assert torch.equal(frozen.detach(), start), "decayed for a gradient zero_grad discarded"


# ------------------------------------------------------------------------------------------ clipping

def test_clip_grad_norm_spans_every_param_group():
    # two groups (own lr), partial masks in both, plus a fully selected parameter that keeps its .grad:
    # the norm is that of every gradient the step uses, and all of them are scaled by the same factor
    w1 = torch.nn.Parameter(torch.randn(9, 5))
    b1 = torch.nn.Parameter(torch.randn(9))
    w2 = torch.nn.Parameter(torch.randn(6, 11))
    b2 = torch.nn.Parameter(torch.randn(6))
    m1, m2, mb2 = _mask(w1.shape, 0.4), _mask(w2.shape, 0.3), _mask(b2.shape, 0.5)
    hp2 = {**HP, "lr": 7e-3}
    opt = MaskedAdamW([{"params": [w1, b1]}, {"params": [w2, b2], "lr": hp2["lr"]}], masks=[m1, None, m2, mb2],
                      compact_grads=True, **HP)
    refs = [_Ref(w1, m1.reshape(-1).nonzero().squeeze(1), **HP), _Ref(b1, torch.arange(9), **HP),
            _Ref(w2, m2.reshape(-1).nonzero().squeeze(1), **hp2), _Ref(b2, mb2.nonzero().squeeze(1), **hp2)]
    params = [w1, b1, w2, b2]
    grads = [_grad(p.shape) for p in params]
    grads[2] *= 10  # the second group's gradient dominates the norm
    torch.autograd.backward(params, grads)
    assert w1.grad is None and b1.grad is not None and w2.grad is None and b2.grad is None
    selected = torch.cat([g.reshape(-1)[r.idx].double() for g, r in zip(grads, refs)])
    expect = selected.norm()
    max_norm = expect.item() / 3
    norm = opt.clip_grad_norm_(max_norm)
    torch.testing.assert_close(norm.double(), expect, rtol=1e-6, atol=0)
    coef = max_norm / (expect.item() + 1e-6)
    torch.testing.assert_close(opt.compact_grad(w2).double(), grads[2].reshape(-1)[refs[2].idx].double() * coef,
                               rtol=1e-6, atol=1e-7)
    opt.step()
    for p, g, r, name in zip(params, grads, refs, ["w1", "b1", "w2", "b2"]):
        r.update(g.double() * coef)
        r.check(p, name)


# ------------------------------------------------------------------------------------------ masks

def test_a_non_contiguous_bool_mask_selects_in_the_parameters_element_order():
    # a mask made as a view (here the transpose of a [13, 7] mask) selects mask[i, j] -> param[i, j], not the
    # elements at the mask's storage order
    p = torch.nn.Parameter(torch.randn(7, 13))
    mask = (torch.rand(13, 7) < 0.4).t()
    assert not mask.is_contiguous()
    opt = MaskedAdamW([p], masks=[mask], compact_grads=True, **HP)
    ref = _Ref(p, mask.reshape(-1).nonzero().squeeze(1), **HP)
    for _ in range(2):
        g = _grad(p.shape)
        torch.autograd.backward([p], [g])
        assert torch.equal(opt.compact_grad(p), g[mask])
        opt.step()
        ref.update(g)
    ref.check(p, "transposed mask")


def test_indices_past_int32_are_kept_as_int64():
    # a parameter of more than 2**31 elements (on the meta device: no memory) needs int64 flat indices; an
    # index past 2**31 - 1 narrowed to int32 would wrap to a negative one
    from allo.optim.masks import index_dtype, normalize_mask

    assert index_dtype(2**31 - 1) == torch.int32 and index_dtype(2**31 + 1) == torch.int64
    big = torch.empty(2**31 + 9, device="meta")
    sel = normalize_mask(torch.tensor([2**31 + 5]), big, "big")
    assert sel.dtype == torch.int64
    small = torch.empty(2**31 - 1, device="meta")
    assert normalize_mask(torch.tensor([2**31 - 2]), small, "small").dtype == torch.int32


# ------------------------------------------------------------------------------------------ FSDP2 shards

WORLD = 2


def _sharded_worker(rank, out_dir):
    """Two ``Shard(0)`` DTensor parameters (odd row counts: uneven blocks) and one plain parameter, in
    compact mode: the norms clip_grad_norm_ returns (2 and inf) and the weights after the step must be the
    single-process float64 values over the GLOBAL masks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(11)  # the same values on both ranks
        shapes = [(7, 5), (5, 2, 3), (4, 6)]  # the last one stays a plain (replicated) tensor
        full = [torch.randn(s) for s in shapes]
        masks = [_mask(s, 0.45) for s in shapes]
        masks[0][:4] = True  # rank 0's whole block (rows 0-3): dense there, partial on rank 1
        masks[1][3:] = True  # rank 1's block (rows 3-4) all but its last element
        masks[1][4, 1, 2] = False
        for norm_type, top in ((2.0, 2), (math.inf, 1), (math.inf, 2)):
            # the largest gradient element: 2-norm, in the plain parameter (its part adds to the shards'); inf,
            # in a sharded block (the ranks' maxima combine by MAX, not by sum) and in the plain parameter
            grads = [_grad(s) for s in shapes]
            grads[top].reshape(-1)[masks[top].reshape(-1).nonzero()[-1]] = 50.0
            params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full[:2]]
            params.append(torch.nn.Parameter(full[2].clone()))
            opt = MaskedAdamW(params, masks=masks, compact_grads=True, **HP)
            torch.autograd.backward(params, [distribute_tensor(g, mesh, [Shard(0)]) for g in grads[:2]] + [grads[2]])
            assert [p.grad is None for p in params] == [rank == 1, True, True]  # a dense block keeps its .grad
            opt.all_reduce_grads()  # the plain gradient is the same on both ranks: unchanged
            refs = [_Ref(t, m.reshape(-1).nonzero().squeeze(1), **HP) for t, m in zip(full, masks)]
            selected = torch.cat([g.reshape(-1)[r.idx].double() for g, r in zip(grads, refs)])
            expect = selected.abs().max() if math.isinf(norm_type) else selected.norm()
            max_norm = expect.item() / 4
            norm = opt.clip_grad_norm_(max_norm, norm_type=norm_type)
            torch.testing.assert_close(norm.double(), expect, rtol=1e-6, atol=0, msg=lambda m: f"norm {norm_type}: {m}")
            opt.step()
            coef = max_norm / (expect.item() + 1e-6)
            for i, (p, g, r) in enumerate(zip(params, grads, refs)):
                r.update(g.double() * coef)
                r.check(p.full_tensor() if i < 2 else p, f"norm {norm_type}, parameter {i}")
        # a layout other than FSDP2's Shard(0) (its blocks are not row blocks of the mask) is refused
        cols = torch.nn.Parameter(distribute_tensor(full[0].clone(), mesh, [Shard(1)]))
        with pytest.raises(ValueError, match="Shard\\(0\\)"):
            MaskedAdamW([cols], masks=[masks[0]], **HP)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharded_clip_norm_and_step_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_sharded_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
