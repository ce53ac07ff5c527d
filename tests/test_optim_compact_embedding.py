"""compact_embedding_grads: the input embedding's gradient written straight into MaskedAdamW's compact
gradient. The routed path must give the dense path's compact gradients and weights bit-for-bit (fp32 on
the CPU: the same sums in the same order), tied and untied, with gradient accumulation, and must never
make a dense [V, H] gradient of the embedding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from allo.optim import MaskedAdamW, compact_embedding_grads
from allo.optim.compact_embedding import selected_row_grads

from _allocations import Allocations

V, H = 97, 24  # odd sizes; rows of 24 elements


class TinyLM(nn.Module):
    def __init__(self, tied, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(V, H, padding_idx=padding_idx)
        self.mid = nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        h = torch.tanh(self.mid(self.embed(ids)))
        return F.log_softmax(self.head(h).float(), -1)


def _indices(numel, density, g):
    return torch.nonzero(torch.rand(numel, generator=g) < density).squeeze(1)


def _masks(model, g):
    # the embedding's mask leaves some rows empty and fills some whole: ranges of every length
    emb = torch.rand(V, H, generator=g) < 0.3
    emb[3] = False
    emb[5] = True
    masks = {"embed.weight": emb}
    for n, p in model.named_parameters():
        if n not in masks:
            masks[n] = torch.rand(p.shape, generator=g) < 0.4
    return masks


def _batches(g, n):
    # repeated tokens (a small id range and a wide one), weighted non-uniformly
    out = []
    for i in range(n):
        hi = 9 if i % 2 == 0 else V
        ids = torch.randint(0, hi, (3, 11), generator=g)
        ids[0, :4] = 7  # the same row many times
        out.append((ids, torch.randint(0, V, (3, 11), generator=g), torch.rand(3, 11, generator=g)))
    return out


def _train(tied, route, *, steps=2, accum=2, padding_idx=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyLM(tied, padding_idx).to(dtype)
    masks = _masks(model, g)
    opt = MaskedAdamW(list(model.named_parameters()), lr=1e-2, weight_decay=0.1, masks=masks, compact_grads=True)
    if route:
        compact_embedding_grads(model.embed, opt)
    compact = []
    for _ in range(steps):
        for ids, labels, w in _batches(g, accum):
            lp = model(ids).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            (-(lp * w).sum()).backward()
        compact.append({n: opt.compact_grad(p).clone() for n, p in model.named_parameters()
                        if opt.compact_grad(p) is not None})
        opt.clip_grad_norm_(5.0)
        opt.step()
        opt.zero_grad()
    return model, compact


def _assert_same(a, b, equal=True):
    for (na, ta), (nb, tb) in zip(a.items(), b.items()):
        assert na == nb
        if equal:
            assert torch.equal(ta, tb), f"{na}: max diff {(ta.float() - tb.float()).abs().max().item()}"
        else:
            torch.testing.assert_close(ta, tb, rtol=2e-2, atol=2e-2, msg=lambda m: f"{na}: {m}")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("padding_idx", [None, 7], ids=["no-pad", "pad7"])
def test_routed_equals_dense_path(tied, padding_idx):
    dense_model, dense_compact = _train(tied, route=False, padding_idx=padding_idx)
    routed_model, routed_compact = _train(tied, route=True, padding_idx=padding_idx)
    assert len(dense_compact) == len(routed_compact) == 2
    for d, r in zip(dense_compact, routed_compact):
        assert d.keys() == r.keys() and "embed.weight" in d
        _assert_same(d, r)
    _assert_same(dict(dense_model.named_parameters()), dict(routed_model.named_parameters()))
    # the embedding did train (unselected elements unchanged, as in the dense path)
    assert not torch.equal(routed_model.embed.weight, TinyLM(tied, padding_idx).embed.weight)
    if not tied:
        assert routed_model.embed.weight.grad is None


def test_routed_bf16_close_to_dense():
    dense_model, dense_compact = _train(True, route=False, dtype=torch.bfloat16, steps=1)
    routed_model, routed_compact = _train(True, route=True, dtype=torch.bfloat16, steps=1)
    _assert_same(dense_compact[0], routed_compact[0], equal=False)
    _assert_same(dict(dense_model.named_parameters()), dict(routed_model.named_parameters()), equal=False)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("route", [True, False], ids=["routed", "plain"])
def test_no_dense_embedding_gradient(tied, route):
    """Routed, backward never runs embedding_dense_backward (nor sums two [V, H] gradients); the plain
    case shows the check sees them when they are there."""
    torch.manual_seed(0)
    model = TinyLM(tied)
    opt = MaskedAdamW(list(model.named_parameters()), masks=_masks(model, torch.Generator().manual_seed(1)),
                      compact_grads=True)
    if route:
        compact_embedding_grads(model.embed, opt)
    ids = torch.randint(0, V, (2, 5))
    loss = model(ids).sum()
    with Allocations() as seen:
        loss.backward()
    dense = [name for name, _ in seen.shaped((V, H))]
    assert ("embedding_dense_backward.default" in dense) == (not route)
    assert ("add.Tensor" in dense or "add_.Tensor" in dense) == (tied and not route)
    assert model.embed.weight.grad is None and opt.compact_grad(model.embed.weight) is not None


def test_selected_row_grads_matches_dense_gather():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 13, (4, 9), generator=g)
    ids[1] = 2
    grad = torch.randn(4, 9, H, generator=g)
    indices = _indices(V * H, 0.25, g).to(torch.int32)
    for pad in (None, 2):
        dense = torch.ops.aten.embedding_dense_backward(grad, ids, V, -1 if pad is None else pad, False)
        part = selected_row_grads(grad, ids, indices, (V, H), pad)
        assert part.dtype == torch.float32 and part.shape == indices.shape
        assert torch.equal(part, dense.reshape(-1)[indices.long()])
        ref = torch.zeros(V, H, dtype=torch.float64).index_add_(0, ids.reshape(-1), grad.reshape(-1, H).double())
        if pad is not None:
            ref[pad] = 0
        torch.testing.assert_close(part.double(), ref.reshape(-1)[indices.long()], rtol=1e-6, atol=1e-6)


def test_plain_path_where_nothing_to_save():
    """No routing under no_grad, for a dense (every element) or empty selection: the module's own output."""
    torch.manual_seed(0)
    model = TinyLM(False)
    masks = _masks(model, torch.Generator().manual_seed(1))
    masks["embed.weight"] = torch.ones(V, H, dtype=torch.bool)
    opt = MaskedAdamW(list(model.named_parameters()), masks=masks, compact_grads=True)
    compact_embedding_grads(model.embed, opt)
    ids = torch.randint(0, V, (2, 5))
    assert model.embed(ids).grad_fn.name() == "EmbeddingBackward0"
    with torch.no_grad():
        assert model.embed(ids).grad_fn is None
    masks["embed.weight"] = torch.rand(V, H) < 0.3
    opt.set_masks(masks)
    assert "Routed" in model.embed(ids).grad_fn.name()


def test_handle_remove_and_errors():
    model = TinyLM(False)
    opt = MaskedAdamW(list(model.named_parameters()), masks=_masks(model, torch.Generator().manual_seed(1)),
                      compact_grads=True)
    handle = compact_embedding_grads(model.embed, opt)
    ids = torch.randint(0, V, (2, 5))
    assert "Routed" in model.embed(ids).grad_fn.name()
    handle.remove()
    assert model.embed(ids).grad_fn.name() == "EmbeddingBackward0"
    with pytest.raises(ValueError, match="compact_grads=True"):
        compact_embedding_grads(model.embed, MaskedAdamW(model.parameters()))
    with pytest.raises(ValueError, match="not one of the optimizer's parameters"):
        compact_embedding_grads(model.embed, MaskedAdamW([model.mid.weight], compact_grads=True))
    with pytest.raises(TypeError, match="nn.Embedding"):
        compact_embedding_grads(model.mid, opt)
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        compact_embedding_grads(nn.Embedding(5, 3, scale_grad_by_freq=True), opt)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("change", ["every", "other", "none"])
def test_selection_changed_between_forward_and_backward(tied, change):
    """set_masks between a routed forward and its backward (allowed: nothing is gathered yet). The
    routed backward must give what the plain path gives for the new selection: the dense gradient
    once every element is selected (it used to be dropped, silently), the new selection's elements,
    or, for none, the record that the weight took a step (decay_unselected decays it)."""
    results = []
    for route in (False, True):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = TinyLM(tied, padding_idx=7)  # token 7 is frequent in _batches
        masks = _masks(model, g)
        opt = MaskedAdamW(list(model.named_parameters()), lr=1e-2, weight_decay=0.1, masks=masks,
                          compact_grads=True, decay_unselected=change == "none")
        if route:
            compact_embedding_grads(model.embed, opt)
        seen = []  # runs after the routing hook: sees the output the model goes on with
        model.embed.register_forward_hook(lambda m, args, out: seen.append(out.grad_fn.name()))
        ids, labels, w = _batches(g, 1)[0]
        lp = model(ids).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        assert ("Routed" in seen[0]) == route
        new = {"every": True, "other": torch.rand(V, H, generator=g) < 0.5, "none": False}[change]
        opt.set_masks({**masks, "embed.weight": new})
        (-(lp * w).sum()).backward()
        weight = model.embed.weight
        grad = weight.grad if change == "every" else opt.compact_grad(weight)
        if change != "none":
            assert grad is not None and bool(grad.abs().sum() > 0)
        results.append((None if grad is None else grad.clone(), weight.detach().clone()))
        opt.step()
        results[-1] += (weight.detach().clone(),)
    (plain_grad, before, plain_after), (routed_grad, _, routed_after) = results
    assert (plain_grad is None) == (routed_grad is None)
    if plain_grad is not None:
        assert torch.equal(plain_grad, routed_grad)
    assert not torch.equal(plain_after, before)  # the embedding did change in the step
    assert torch.equal(plain_after, routed_after)
