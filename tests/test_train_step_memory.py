"""The improve step's memory savings keep results unchanged: TokenLogprobs without autocast's weight
cache (no layer's low-precision weight copy outlives its use under gradient checkpointing), the input
embedding routed into the compact gradients (allo-train's _route_embedding_grads) and the output
layer's row blocks too (TokenLogprobs.route_head_grads), on a tiny Llama through the fused log-prob path."""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from allo.optim import MaskedAdamW
from allo.train.logps import TokenLogprobs
from allo.train.loop import _route_embedding_grads


def _llama(tied=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=211, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def _batch(seed, vocab=211, rows=4, seq=13):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    ids[:, -2:] = 0  # padding tokens (the embedding's padding row)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[:, -2:] = -100
    attn = torch.ones_like(ids)
    attn[:, -2:] = 0
    return ids, attn, labels, torch.randn(rows, seq - 1, generator=g)


class _WeightCopies(TorchDispatchMode):
    """Storages of the low-precision copies autocast makes of [out, in] weights (weak references)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.copies = shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__ == "_to_copy.default" and isinstance(out, torch.Tensor) and tuple(out.shape) in self.shapes \
                and out.dtype == torch.bfloat16:
            self.copies.append(StorageWeakRef(out.untyped_storage()))
        return out

    def alive(self):
        return sum(not r.expired() for r in self.copies)


@pytest.mark.parametrize("cache", [False, True], ids=["default", "cache-on"])
def test_no_weight_copies_outlive_the_forward(cache):
    """With gradient checkpointing, no layer's bf16 weight copy is alive once the forward returns (inside the
    autocast region); autocast_weight_cache=True (the old behaviour) shows the check sees them."""
    model = _llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    scorer = TokenLogprobs(model, autocast_weight_cache=cache)
    layer_shapes = {tuple(p.shape) for n, p in model.named_parameters() if "layers." in n and p.dim() == 2}
    ids, attn, labels, _ = _batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _WeightCopies(layer_shapes) as seen:
            lp = scorer(ids, attn, labels)
        assert len(seen.copies) >= 14  # 7 linear layers x 2 decoder layers were cast
        assert (seen.alive() > 0) == cache
    lp.sum().backward()


def _train(route, *, tied, autocast, steps=2, accum=2):
    model = _llama(tied)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    g = torch.Generator().manual_seed(5)
    masks = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()}
    opt = MaskedAdamW(list(model.named_parameters()), lr=1e-2, weight_decay=0.0, masks=masks, compact_grads=True)
    handle = _route_embedding_grads(model, opt) if route else None
    assert (handle is not None) == route
    scorer = TokenLogprobs(model, autocast_weight_cache=not route)
    if route:
        scorer.route_head_grads(opt)
    watched = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else torch.enable_grad
    compact = []
    for step in range(steps):
        for micro in range(accum):
            ids, attn, labels, w = _batch(10 * step + micro)
            with ctx():
                lp = scorer(ids, attn, labels)
            (lp * w).sum().backward()
        compact.append([opt.compact_grad(p).clone() for p in watched])
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    return model, compact


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_improve_step_unchanged(tied, autocast):
    """Weights and the embeddings' compact gradients after 2 steps of 2 micro-batches: bit-for-bit the
    path without the savings (the same sums in the same order; bf16 casts are the same with or without
    autocast's cache)."""
    before, before_grads = _train(False, tied=tied, autocast=autocast)
    after, after_grads = _train(True, tied=tied, autocast=autocast)
    for a, b in zip(sum(before_grads, []), sum(after_grads, [])):
        assert torch.equal(a, b), (a - b).abs().max()
    for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()):
        assert torch.equal(a, b), f"{n}: {(a - b).abs().max()}"
    assert not torch.equal(after.get_input_embeddings().weight, _llama(tied).get_input_embeddings().weight)


def test_route_skips_frozen_embedding():
    model = _llama()
    model.get_input_embeddings().weight.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = MaskedAdamW(named, masks={n: torch.rand(p.shape) < 0.3 for n, p in named}, compact_grads=True)
    assert _route_embedding_grads(model, opt) is None


def test_masked_stages_route_the_embedding(tmp_path, monkeypatch):
    """allo-train's forget and improve stages route the input embedding (and remove the hook after)."""
    import json
    import random

    import allo.optim
    from allo.train import TrainConfig, pipeline
    from allo.train.model import build_tiny_model, save_model
    from allo.train.tasks import ANSWER_PREFIX, make_problems
    from allo.train.tokenizer import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    save_model(build_tiny_model(tok, hidden_size=16, num_layers=1, seed=0), tok, str(tmp_path / "sft"))
    rng = random.Random(0)
    rows = [{"prompt": p.prompt, "chosen": p.solution,
             "rejected": p.solution.replace(f"{ANSWER_PREFIX} {p.answer}.", f"{ANSWER_PREFIX} {p.answer + rng.randint(1, 9)}.")}
            for p in make_problems("arithmetic", 8, 0)]
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    routed, removed, heads = [], [], []
    real = allo.optim.compact_embedding_grads
    real_rows = allo.optim.compact_row_grads

    def spy(embedding, opt):
        handle = real(embedding, opt)
        routed.append(embedding)
        remove = handle.remove
        handle.remove = lambda: (removed.append(embedding), remove())
        return handle

    def spy_rows(opt, weight):
        sink = real_rows(opt, weight)
        heads.append(sink is not None)
        return sink

    monkeypatch.setattr(allo.optim, "compact_embedding_grads", spy)
    monkeypatch.setattr(allo.optim, "compact_row_grads", spy_rows)
    cfg = TrainConfig(model_name_or_path=str(tmp_path / "sft"), train_file=str(tmp_path / "train.jsonl"),
                      output_dir=str(tmp_path / "run"), stages="prepare,warmup,select,forget,improve",
                      per_device_train_batch_size=4, max_steps=1, disable_tqdm=True, report_to="jsonl",
                      forget_ratio=0.3, improve_ratio=0.3, seed=3)
    pipeline.run(cfg)
    assert len(routed) == 2 and removed == routed  # forget and improve
    assert heads and all(heads)  # every training forward of those stages routed the output layer
    assert not routed[0]._forward_hooks


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_routed_head_frozen_or_fully_selected(tied):
    """A masked stage freezes parameters with nothing selected (prepare_trainable) and leaves them out of
    the optimizer: routing the head must then do nothing, as it must for a fully selected head."""
    for head_mask in (None, True):
        model = _llama(tied)
        head = model.get_output_embeddings().weight
        if head_mask is None:
            head.requires_grad_(False)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        masks = {n: (torch.ones(p.shape, dtype=torch.bool) if p is head else torch.rand(p.shape) < 0.3)
                 for n, p in named}
        opt = MaskedAdamW(named, masks=masks, compact_grads=True)
        scorer = TokenLogprobs(model)
        scorer.route_head_grads(opt)
        ids, attn, labels, w = _batch(1)
        (scorer(ids, attn, labels) * w).sum().backward()
        assert (opt.compact_grad(head) is None) and (head.grad is not None) == (head_mask is True)
        opt.step()
