"""Selection objects: indices, save/load round trip and mismatch errors, summary table, PNG chart;
and the gradient score accumulator."""

import json

import pytest
import torch

from allo.select import GradientScoreAccumulator, Selection, select, select_top, weight_delta_scores


class Tiny(torch.nn.Module):
    def __init__(self, h=8):
        super().__init__()
        self.embed = torch.nn.Embedding(11, h)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(h, h) for _ in range(3))
        self.norm = torch.nn.LayerNorm(h)
        self.head = torch.nn.Linear(h, 5)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(self.norm(x))


def test_select_indices_equal_masks():
    scores = {"a": torch.randint(0, 4, (7, 9)).float(), "b": torch.rand(13), "c": torch.zeros(0)}
    for gran in ("element", "row"):
        sel = select(scores, 0.4, exclude_ratio=0.1, granularity=gran, backend="cpu")
        masks = select_top(scores, 0.4, exclude_ratio=0.1, granularity=gran, backend="cpu")
        for n, m in masks.items():
            assert torch.equal(sel.masks[n], m)
            assert torch.equal(sel.indices[n], m.view(-1).nonzero().view(-1))
            assert sel.indices[n].dtype == torch.int64
        assert sel.metadata["granularity"] == gran and sel.metadata["ratio"] == 0.4


def test_save_load_round_trip(tmp_path):
    m0, m1 = Tiny(), Tiny()
    sel = select(weight_delta_scores(m0, m1, exclude="embed"), 0.2, metadata={"stage": "forget"}, backend="cpu")
    path = tmp_path / "sel.safetensors"
    sel.save(str(path))
    back = Selection.load(str(path), model=m0)
    assert back.names == sel.names and back.shapes == sel.shapes
    for n in sel.names:
        assert torch.equal(back.indices[n], sel.indices[n]) and back.indices[n].dtype == torch.int64
        assert torch.equal(back.masks[n], sel.masks[n])
    assert back.metadata == {"ratio": 0.2, "exclude_ratio": 0.0, "granularity": "element",
                             "score_source": "weight_delta", "stage": "forget"}
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_to_keeps_the_selection():
    scores = {"a": torch.rand(7, 9), "b": torch.rand(13)}
    sel = select(scores, 0.3, metadata={"stage": "forget"}, backend="cpu")
    moved = sel.to("cpu")
    assert moved is not sel and moved.shapes == sel.shapes and moved.metadata == sel.metadata
    assert moved.metadata["stage"] == "forget" and moved.metadata["ratio"] == 0.3
    for n in sel.names:
        assert torch.equal(moved.indices[n], sel.indices[n]) and torch.equal(moved.masks[n], sel.masks[n])


def test_load_mismatch_errors(tmp_path):
    m = Tiny()
    sel = select({n: p.detach().abs() for n, p in m.named_parameters()}, 0.1, backend="cpu")
    path = str(tmp_path / "sel.safetensors")
    sel.save(path)
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(3, 8\) in the model but \(5, 8\)"):
        other = Tiny()
        other.head = torch.nn.Linear(8, 3)
        Selection.load(path, model=other)
    with pytest.raises(ValueError, match="not in the model"):
        Selection.load(path, model=torch.nn.Linear(8, 8))
    with pytest.raises(FileNotFoundError):
        Selection.load(str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    with pytest.raises(ValueError, match="not an allo selection file"):
        Selection.load(str(tmp_path / "other.safetensors"))
    # indices that cannot belong to the recorded shape
    save_file({"indices/w": torch.tensor([0, 9], dtype=torch.int32)}, str(tmp_path / "bad.safetensors"),
              metadata={"format": "allo.selection", "version": "1", "names": json.dumps(["w"]),
                        "shapes": json.dumps({"w": [3, 3]}), "metadata": "{}"})
    with pytest.raises(ValueError, match="outside its 9 elements"):
        Selection.load(str(tmp_path / "bad.safetensors"))


def test_summary_and_plot(tmp_path):
    m = Tiny()
    sel = select({n: p.detach().abs() for n, p in m.named_parameters()}, 0.25, backend="cpu")
    text = sel.summary()
    assert "layers.1" in text and "TOTAL" in text
    total_line = [line for line in text.splitlines() if line.startswith("TOTAL")][0]
    assert f"{sel.num_selected():,}" in total_line and f"{sel.num_total():,}" in total_line
    assert "layers.*" in sel.summary(by="kind") and total_line.rstrip().endswith("100.00%")
    empty = select({n: p.detach().abs() for n, p in m.named_parameters()}, 0.0, backend="cpu")
    assert [line for line in empty.summary().splitlines() if line.startswith("TOTAL")][0].rstrip().endswith("-")
    png = tmp_path / "sel.png"
    sel.plot(str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode", ["accumulated", "sum_of_magnitudes"])
def test_gradient_score_accumulator(mode):
    model = Tiny()
    batches = [torch.randint(0, 11, (3, 4)) for _ in range(3)]
    # expected: per-batch gradients computed independently
    grads = []
    for ids in batches:
        model.zero_grad()
        model(ids).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "norm" not in n})
    model.zero_grad(set_to_none=True)
    acc = GradientScoreAccumulator(model, exclude="norm", mode=mode)
    for ids in batches:
        model(ids).pow(2).mean().backward()
        assert model.head.weight.grad is None  # folded into the buffer and freed by the hook
    scores = acc.scores()
    acc.remove()
    assert set(scores) == set(grads[0]) and acc.num_backward == 3
    for n in scores:
        if mode == "accumulated":
            expect = sum(g[n] for g in grads).abs()
        else:
            expect = sum(g[n].abs() for g in grads)
        torch.testing.assert_close(scores[n], expect, rtol=1e-5, atol=1e-7)
    # grads of tracked parameters were freed as they were folded in; untracked ones kept theirs
    assert model.layers[0].weight.grad is None and model.norm.weight.grad is not None
    model(batches[0]).sum().backward()  # hooks removed: grads accumulate normally again
    assert model.layers[0].weight.grad is not None
    assert select_top(scores, 0.1, backend="cpu")["head.weight"].shape == (5, 8)


def _batch_grads(model, batches):
    grads = []
    for ids in batches:
        model.zero_grad()
        model(ids).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("mode", ["accumulated", "sum_of_magnitudes"])
def test_scores_read_mid_way_are_copies_and_accumulation_goes_on(mode):
    # scores() between backward passes: the values so far, which later passes leave alone; the buffers
    # keep accumulating signed gradients (mode "accumulated": |g1 + g2 + g3|, not ||g1| + g2 + g3|)
    model = Tiny()
    batches = [torch.randint(0, 11, (3, 4)) for _ in range(3)]
    grads = _batch_grads(model, batches)
    acc = GradientScoreAccumulator(model, mode=mode)
    model(batches[0]).pow(2).mean().backward()
    first = acc.scores()
    kept = {n: s.clone() for n, s in first.items()}
    for ids in batches[1:]:
        model(ids).pow(2).mean().backward()
    final = acc.scores()
    acc.remove()
    for n in final:
        assert torch.equal(first[n], kept[n]), n
        combine = (lambda gs: sum(gs).abs()) if mode == "accumulated" else (lambda gs: sum(g.abs() for g in gs))
        torch.testing.assert_close(first[n], combine([grads[0][n]]), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(final[n], combine([g[n] for g in grads]), rtol=1e-5, atol=1e-7)


def test_frozen_parameters_are_not_tracked():
    model = Tiny()
    model.embed.weight.requires_grad_(False)
    model.norm.bias.requires_grad_(False)
    batches = [torch.randint(0, 11, (3, 4)) for _ in range(2)]
    grads = _batch_grads(model, batches)
    with GradientScoreAccumulator(model) as acc:
        for ids in batches:
            model(ids).pow(2).mean().backward()
    scores = acc.scores()
    assert set(scores) == {n for n, p in model.named_parameters() if p.requires_grad} == set(grads[0])
    for n in scores:
        torch.testing.assert_close(scores[n], (grads[0][n] + grads[1][n]).abs(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["accumulated", "sum_of_magnitudes"])
def test_in_place_scores_make_no_second_copy_and_finish_the_accumulator(mode):
    from _allocations import Allocations

    torch.manual_seed(0)
    model = Tiny()
    batches = [torch.randint(0, 11, (3, 4)) for _ in range(2)]
    acc = GradientScoreAccumulator(model, exclude="norm", mode=mode)
    for ids in batches:
        model(ids).pow(2).mean().backward()
    copies = acc.scores()
    with Allocations() as made:
        scores = acc.scores(in_place=True)
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if "norm" not in n}
    # no tensor of a parameter's size is made (in-place ops, which Allocations also lists, write into the buffers)
    assert not [m for m in made.made if m[1] in shapes and not m[0].split(".")[0].endswith("_")], made.made
    assert scores.keys() == copies.keys() and all(torch.equal(scores[n], copies[n]) for n in scores)
    # finished: hooks gone (gradients accumulate as usual), nothing folded, the same values again
    model(batches[0]).pow(2).mean().backward()
    assert model.head.weight.grad is not None
    again = acc.scores()
    assert all(torch.equal(again[n], copies[n]) for n in again)


class _HeadLM(torch.nn.Module):
    """An embedding, a layer and an output layer scored through the fused log-prob op."""

    def __init__(self, tied, vocab=37, h=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, h)
        self.mid = torch.nn.Linear(h, h)
        self.head = torch.nn.Linear(h, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.acc = None  # set: the output layer's gradient goes to this accumulator's row sink

    def forward(self, ids):
        from allo.ops import fused_linear_token_logprobs

        sink = self.acc.row_grad_sink(self.head.weight) if self.acc is not None else None
        return fused_linear_token_logprobs(torch.tanh(self.mid(self.embed(ids[:, :-1]))), self.head.weight,
                                           ids[:, 1:], vocab_chunk_size=10, weight_grad_sink=sink)


@pytest.mark.parametrize("tied", [False, True])
def test_output_layer_gradient_folded_by_row_blocks_gives_the_same_scores(tied):
    """allo-train's select stage folds the output layer's gradient into its score block by block (no
    [V, H] gradient); the scores are the usual ones (bit-for-bit untied; tied: one addition reordered)."""
    from _allocations import Allocations

    def scores(route):
        torch.manual_seed(0)
        model = _HeadLM(tied)
        g = torch.Generator().manual_seed(1)
        with GradientScoreAccumulator(model) as acc:
            model.acc = acc if route else None
            allocated = []
            for _ in range(3):
                ids = torch.randint(0, 37, (2, 9), generator=g)
                loss = -(model(ids) * torch.rand(2, 8, generator=g)).sum()
                with Allocations() as seen:
                    loss.backward()
                allocated.append(seen.shaped((37, 6)))
            assert model.head.weight.grad is None
            return acc.scores(), allocated

    dense, dense_allocs = scores(False)
    routed, routed_allocs = scores(True)
    # the usual route makes the output layer's [V, H] gradient every backward; routed, only the score
    # buffer is made (at the first backward), and the embedding's own gradient (also [V, H] here)
    head_grads = [[op for op, _ in seen if op != "embedding_dense_backward.default" and not op.startswith("add")]
                  for seen in dense_allocs]
    assert all(head_grads)
    embedding_only = [[("embedding_dense_backward.default", torch.float32)] for _ in range(2)]
    assert [[a for a in seen if not a[0].startswith("add")] for seen in routed_allocs[1:]] == embedding_only
    for name in dense:
        if tied:
            torch.testing.assert_close(routed[name], dense[name], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(routed[name], dense[name]), name
    # where the sink would change the score, there is none
    model = _HeadLM(tied)
    assert GradientScoreAccumulator(model, mode="sum_of_magnitudes").row_grad_sink(model.head.weight) is None
    assert GradientScoreAccumulator(model, free_grads=False).row_grad_sink(model.head.weight) is None
    assert GradientScoreAccumulator(model, exclude="head|embed").row_grad_sink(model.head.weight) is None
