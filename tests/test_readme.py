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

    blocks = [b for b in _python_blocks() if "DPOTrainer" not in b]  # (the TRL recipe: the test below)
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


def test_the_readme_trl_recipe_runs(tmp_path, monkeypatch, fresh_accelerate_state):
    import copy

    import pytest

    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from allo.train.model import build_tiny_model
    from allo.train.tokenizer import load_builtin_tokenizer

    (block,) = [b for b in _python_blocks() if "DPOTrainer" in b]
    monkeypatch.chdir(tmp_path)  # DPOConfig's output_dir
    tok = load_builtin_tokenizer()
    sft_model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=0)
    dpo_model = copy.deepcopy(sft_model)
    with torch.no_grad():
        for p in dpo_model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    policy = copy.deepcopy(sft_model)
    pairs = datasets.Dataset.from_list([{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a - b)}
                                        for a in range(4) for b in range(4)])
    ns = dict(sft_model=sft_model, dpo_model=dpo_model, policy=policy, pairs=pairs, tok=tok)
    # what this machine needs besides the block's options (DPOConfig defaults to bf16 on a GPU), and a short run
    real_config = trl.DPOConfig
    monkeypatch.setattr(trl, "DPOConfig", lambda **kw: real_config(
        **{"use_cpu": True, "report_to": [], "max_steps": 2, "disable_tqdm": True, **kw}))
    exec(block, ns)
    masks = ns["masks"]
    for (n, p), (_, p0) in zip(policy.named_parameters(), sft_model.named_parameters()):
        changed = p.detach() != p0.detach()
        assert not (changed & ~masks[n]).any() if n in masks else not changed.any(), n
    assert any((p.detach() != p0.detach()).any() for p, p0 in zip(policy.parameters(), sft_model.parameters()))
    assert ns["trainer"].state.global_step > 0
