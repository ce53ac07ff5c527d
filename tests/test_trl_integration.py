"""allo's sparse update inside TRL's DPOTrainer, as the README's recipe has it: key neurons from
allo.select, MaskedAdamW as the trainer's optimizer (dense gradients, or compact ones clipped by
CompactGradClipping). TRL is a dev dependency, so CI runs this."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from allo.optim import CompactGradClipping, MaskedAdamW  # noqa: E402
from allo.select import select_top, weight_delta_scores  # noqa: E402
from allo.train.tokenizer import load_builtin_tokenizer  # noqa: E402


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # (tests/conftest.py)


def _tiny_llama(tok):
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      bos_token_id=tok.bos_token_id)
    return transformers.LlamaForCausalLM(config)


def _pairs():
    return datasets.Dataset.from_list([{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
                                       for a in range(8) for b in range(4)])


@pytest.mark.parametrize("compact", [False, True])
def test_dpo_trainer_updates_only_the_key_neurons(tmp_path, compact):
    torch.manual_seed(0)
    tok = load_builtin_tokenizer()
    sft = _tiny_llama(tok)
    warm = copy.deepcopy(sft)  # stands in for the DPO warm-up model: a few weights moved
    with torch.no_grad():
        for p in warm.parameters():
            p.add_(torch.randn_like(p) * (torch.rand_like(p) < 0.1))
    masks = select_top(weight_delta_scores(warm, sft, exclude=r"embed|norm"), 0.05)
    policy, ref = copy.deepcopy(sft), copy.deepcopy(sft)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}

    opt = MaskedAdamW(policy.named_parameters(), lr=1e-3, masks=masks, compact_grads=compact)
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.1, max_steps=3, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, use_cpu=True, report_to=[], save_strategy="no",
                         logging_steps=1, disable_tqdm=True, max_grad_norm=0.0 if compact else 1.0)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=_pairs(), processing_class=tok,
                             optimizers=(opt, None), callbacks=[CompactGradClipping(1.0)] if compact else None)
    trainer.train()

    changed = 0
    for name, p in policy.named_parameters():
        mask = masks.get(name)
        if mask is None:
            assert torch.equal(p.detach(), before[name]), f"{name} has no mask but changed"
            continue
        assert torch.equal(p.detach()[~mask], before[name][~mask]), f"{name}: an unselected element changed"
        changed += int((p.detach()[mask] != before[name][mask]).sum())
    selected = sum(int(m.sum()) for m in masks.values())
    assert selected > 0 and changed > selected // 2, (changed, selected)

    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    assert all("rewards/accuracies" in h and "rewards/margins" in h for h in logged)
    # with compact gradients, Trainer's own grad_norm saw none (0.0): CompactGradClipping logs theirs
    assert all(h["grad_norm"] > 0 for h in logged), [h["grad_norm"] for h in logged]
