"""The README's Python examples run as written (on a tiny Llama, CPU): an API change that breaks them
fails here, not in a user's first session."""

import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_the_readme_python_examples_run(tmp_path, monkeypatch):
    from allo.select import select
    from allo.train.model import build_tiny_model
    from allo.train.tokenizer import load_builtin_tokenizer

    blocks = _python_blocks()
    assert len(blocks) == 3, "a Python block was added to or removed from the README: update this test"
    monkeypatch.chdir(tmp_path)  # the examples write files
    tok = load_builtin_tokenizer()
    sft_model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=0)
    warm_model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=0)
    with torch.no_grad():  # a "warm-up": every weight moved a little, some more
        for p in warm_model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    selection = select({n: p.detach().abs() for n, p in model.named_parameters()}, ratio=0.1)
    hidden = torch.randn(2, 5, 32, requires_grad=True)
    labels = torch.randint(0, tok.vocab_size, (2, 5))
    ns = dict(model=model, selection=selection, hidden=hidden, labels=labels, warm_model=warm_model,
              sft_model=sft_model)

    exec(blocks[0], ns)  # MaskedAdamW over the selection
    exec(blocks[1], ns)  # routed embedding / output-layer gradients and the fused head
    ns["logp"].sum().backward()
    ns["opt"].step()
    masks = selection.masks
    for n, p in model.named_parameters():
        changed = p.detach() != before[n]
        assert not (changed & ~masks[n]).any(), n  # only selected elements change
    assert (model.lm_head.weight != before["lm_head.weight"]).any()  # the routed head gradient arrived
    ns["handle"].remove()

    exec(blocks[2], ns)  # scores from two models, select, save / summary / plot, load
    excluded = {n for n in selection.masks if re.search("embed|norm", n)}
    assert excluded and ns["sel"].masks.keys() == selection.masks.keys() - excluded
    assert os.path.getsize(tmp_path / "neurons.safetensors") > 0 and os.path.getsize(tmp_path / "neurons.png") > 0
