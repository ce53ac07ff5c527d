"""compact_row_grads: the fused log-prob head's weight gradient handed to MaskedAdamW's compact gradient
one row block at a time. The routed path must give the dense path's compact gradients and weights
bit-for-bit (fp32 on the CPU: the op computes the same blocks either way, and the tied sums are single
additions), tied and untied, with the input embedding routed or not, with gradient accumulation; and
with both routed a tied [V, H] weight never gets a dense gradient."""

import copy

import pytest
import torch
from torch import nn

from allo.ops import fused_linear_token_logprobs
from allo.optim import MaskedAdamW, compact_embedding_grads, compact_row_grads

from _allocations import Allocations
from conftest import requires_cuda

V, H = 101, 24  # odd sizes; row blocks of 32 leave a short last block


class TinyLM(nn.Module):
    def __init__(self, tied):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.mid = nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.opt = None  # set to route the head's gradient

    def forward(self, ids, labels):
        h = torch.tanh(self.mid(self.embed(ids)))
        sink = compact_row_grads(self.opt, self.head.weight) if self.opt is not None else None
        return fused_linear_token_logprobs(h, self.head.weight, labels, chunk_size=13, vocab_chunk_size=32,
                                           weight_grad_sink=sink)


def _masks(model, g):
    masks = {}
    for n, p in model.named_parameters():
        m = torch.rand(p.shape, generator=g) < 0.35
        if p.dim() == 2 and p.shape[0] == V:
            m[40:72] = False  # a whole row block with nothing selected
            m[3] = True
        masks[n] = m
    return masks


def _train(tied, route_head, route_embedding, *, steps=2, accum=2, seed=0, device="cpu", autocast=False):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyLM(tied).to(device)
    masks = {n: m.to(device) for n, m in _masks(model, g).items()}
    opt = MaskedAdamW(list(model.named_parameters()), lr=1e-2, weight_decay=0.1, masks=masks, compact_grads=True)
    if route_head:
        model.opt = opt
    if route_embedding:
        compact_embedding_grads(model.embed, opt)
    compact = []
    for _ in range(steps):
        for _ in range(accum):
            ids = torch.randint(0, V, (3, 11), generator=g).to(device)
            labels = torch.randint(0, V, (3, 11), generator=g)
            labels[0, :3] = -100
            upstream = torch.rand(3, 11, generator=g).to(device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                logp = model(ids, labels.to(device))
            (-(logp * upstream).sum()).backward()
        compact.append({n: opt.compact_grad(p).clone() for n, p in model.named_parameters()})
        opt.clip_grad_norm_(5.0)
        opt.step()
        opt.zero_grad()
    return model, compact


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("route_embedding", [False, True])
def test_routed_head_equals_dense_path(tied, route_embedding):
    dense_model, dense = _train(tied, False, route_embedding)
    routed_model, routed = _train(tied, True, route_embedding)
    for a, b in zip(dense, routed):
        assert a.keys() == b.keys()
        for n in a:
            assert torch.equal(a[n], b[n]), n
    for (n, p), q in zip(dense_model.named_parameters(), routed_model.parameters()):
        assert torch.equal(p, q), n


@requires_cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_routed_head_equals_dense_path_cuda(autocast):
    """The GPU route (Triton optimizer, CUDA kernels, cuBLAS fp32-output products of bf16 blocks under
    autocast): the same compact gradients and weights as the dense route, to rounding."""
    dense_model, dense = _train(True, False, True, device="cuda", autocast=autocast)
    routed_model, routed = _train(True, True, True, device="cuda", autocast=autocast)
    tol = dict(rtol=1e-3, atol=1e-5) if autocast else dict(rtol=1e-5, atol=1e-7)
    for a, b in zip(dense, routed):
        for n in a:
            torch.testing.assert_close(b[n], a[n], **tol, msg=n)
    for (n, p), q in zip(dense_model.named_parameters(), routed_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)


def test_tied_weight_gets_no_dense_gradient_when_both_uses_are_routed():
    torch.manual_seed(0)
    model = TinyLM(tied=True)
    opt = MaskedAdamW(list(model.named_parameters()), lr=1e-2, masks=_masks(model, torch.Generator().manual_seed(1)),
                      compact_grads=True)
    model.opt = opt
    compact_embedding_grads(model.embed, opt)
    ids, labels = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 9))
    loss = -model(ids, labels).sum()
    with Allocations() as seen:
        loss.backward()
    assert seen.shaped((V, H)) == []
    assert model.embed.weight.grad is None and opt.compact_grad(model.embed.weight) is not None


def test_usual_route_where_nothing_to_save_and_errors():
    model = TinyLM(tied=False)
    named = list(model.named_parameters())
    opt = MaskedAdamW(named, masks={"head.weight": True}, compact_grads=True)  # every element: the dense path
    assert compact_row_grads(opt, model.head.weight) is None
    opt.set_masks({"head.weight": False})  # nothing selected: the hook records it as before
    assert compact_row_grads(opt, model.head.weight) is None
    opt.set_masks({"head.weight": torch.rand(V, H) < 0.5})
    assert compact_row_grads(opt, model.head.weight) is not None
    with torch.no_grad():
        assert compact_row_grads(opt, model.head.weight) is None
    frozen = nn.Parameter(torch.randn(V, H), requires_grad=False)  # not the optimizer's: nothing to route
    assert compact_row_grads(opt, frozen) is None
    with pytest.raises(ValueError, match="compact_grads=True"):
        compact_row_grads(MaskedAdamW(named), model.head.weight)
    with pytest.raises(ValueError, match="not one of the optimizer's parameters"):
        compact_row_grads(opt, nn.Parameter(torch.randn(V, H)))
    with pytest.raises(ValueError, match=r"must be a \[V, H\] output layer"):
        compact_row_grads(MaskedAdamW([("b", model.mid.bias)], compact_grads=True), model.mid.bias)


@pytest.mark.parametrize("how", ["load_state_dict", "set_masks"])
@pytest.mark.parametrize("tied", [False, True])
def test_sink_made_before_setting_the_same_selection_stays_valid(tied, how):
    """allo-train makes the head's sink at forward time; a checkpoint with the same selection loaded
    before backward (or a resume that reloads what the optimizer already holds), or set_masks with the
    same masks, must leave it valid (it used to be refused as stale: the new index tensor replaced the
    equal current one) and give the gradients of a run without it. A different selection still makes
    it stale."""
    results = []
    for load in (False, True):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = TinyLM(tied)
        masks = _masks(model, g)
        opt = MaskedAdamW(list(model.named_parameters()), lr=1e-2, weight_decay=0.1, masks=masks, compact_grads=True)
        model.opt = opt
        saved = copy.deepcopy(opt.state_dict())
        ids, labels = torch.randint(0, V, (3, 11), generator=g), torch.randint(0, V, (3, 11), generator=g)
        logp = model(ids, labels)  # the sink is made here
        if load:
            before = opt.state[model.head.weight]["indices"]
            if how == "load_state_dict":
                opt.load_state_dict(saved)
            else:
                opt.set_masks(masks)
            assert opt.state[model.head.weight]["indices"] is before
        (-logp.sum()).backward()
        results.append({n: opt.compact_grad(p).clone() for n, p in model.named_parameters()})
        opt.step()
        results[-1].update({n + ":weight": p.detach().clone() for n, p in model.named_parameters()})
    assert results[0].keys() == results[1].keys()
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n
    sink = compact_row_grads(opt, model.head.weight)
    other = copy.deepcopy(opt.state_dict())
    head = next(i for i, p in enumerate(model.parameters()) if p is model.head.weight)  # state dict id
    other["state"][head]["indices"] = torch.arange(0, V * H, 3, dtype=torch.int32)
    for key in ("exp_avg", "exp_avg_sq"):
        other["state"][head][key] = torch.zeros(len(range(0, V * H, 3)))
    opt.load_state_dict(other)
    with pytest.raises(RuntimeError, match="earlier selection"):
        sink(0, torch.randn(32, H))
