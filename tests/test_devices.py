"""Tensors land on the device of the model / inputs they meet, not on the default (CPU) device.

There is no GPU in CI, so each test makes the mix-up observable on the CPU: inputs on a device other
than the default one (``torch.device("meta")`` made the default, so a tensor created without a device
is a meta tensor, which cannot be copied out: the CPU stand-in for a CPU tensor meeting CUDA inputs),
a spy that checks the batches are built for the model's device, or a checkpoint whose tensors are
tagged with a GPU this machine does not have.
"""

import os
from types import SimpleNamespace

import pytest
import torch

import allo.train.data as D


def _examples(weights=False):
    out = [{"prompt_ids": [5, 6, 7], "response_ids": [8, 9]}, {"prompt_ids": [5], "response_ids": [8, 9, 10, 2]}]
    if weights:
        out[0]["weights"], out[1]["weights"] = [1.0, 0.0], [0.5, 1.0, 1.0, 0.0]
    return out


@pytest.mark.parametrize("weights", [False, True], ids=["plain", "token-weights"])
def test_collate_builds_the_batch_on_the_given_device(weights):
    cpu = D.collate(_examples(weights), pad_id=0)
    on = D.collate(_examples(weights), pad_id=0, device="meta")
    assert set(on) == set(cpu) == {"input_ids", "attention_mask", "labels"} | ({"weights"} if weights else set())
    for k, v in on.items():
        assert v.device.type == "meta" and v.shape == cpu[k].shape and v.dtype == cpu[k].dtype, k
        assert cpu[k].device.type == "cpu"


@pytest.fixture
def batches_for(monkeypatch):
    """Every collate call of allo-train, wherever it was imported from, must name ``expected[0]``."""
    expected, seen = [None], []
    real = D.collate

    def spy(examples, pad_id, device=None):
        seen.append(device)
        assert device is not None and torch.device(device) == expected[0], \
            f"a batch built for {device}, the model is on {expected[0]}"
        return real(examples, pad_id, device)

    import allo.train.logps
    import allo.train.loop

    for module in (D, allo.train.loop, allo.train.logps):
        monkeypatch.setattr(module, "collate", spy)

    def expect(device):
        expected[0] = torch.device(device)
        return seen

    return expect


def _tiny():
    from allo.train.model import build_tiny_model
    from allo.train.tokenizer import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    return build_tiny_model(tok, hidden_size=16, num_layers=1, seed=0), tok


def test_sft_and_scoring_batches_go_to_the_models_device(batches_for):
    """sft_train (the built-in task's SFT) and the reference / eval scoring pass the model's device."""
    from allo.train.logps import TokenLogprobs, compute_logps
    from allo.train.model import sft_train
    from allo.train.tasks import make_problems

    model, tok = _tiny()
    seen = batches_for("cpu")
    sft_train(model, tok, make_problems("arithmetic", 4, 0), steps=1, lr=1e-3, batch_size=2, seed=0, progress=False)
    assert seen
    seen.clear()
    examples = [D.encode_text_pair(tok, "1 + 1?", "2."), D.encode_text_pair(tok, "2 + 2?", "4.")]
    compute_logps(TokenLogprobs(model), examples, pad_id=tok.pad_token_id, batch_size=2, device=torch.device("cpu"),
                  autocast=torch.enable_grad)
    assert seen


def test_training_and_gradient_score_batches_go_to_the_models_device(batches_for, monkeypatch):
    """A masked stage's loss (allo.train.loop) and the select stage's gradient scores."""
    from allo.train.config import TrainConfig
    from allo.train.logps import TokenLogprobs
    from allo.train.loop import StageData, _forward_loss
    from allo.train.stages import select as select_stage

    model, tok = _tiny()
    pairs = [{"prompt_ids": p, "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2]} for p in ([5, 6], [7], [5, 7, 6])]
    seen = batches_for("cpu")
    scorer = TokenLogprobs(model)
    ref = {"chosen": [torch.zeros(3)] * 3, "rejected": [torch.zeros(2)] * 3}
    cfg = TrainConfig(per_device_train_batch_size=2, score_batches=1, seed=0)
    loss, _ = _forward_loss("dpo", scorer, pairs, StageData("dpo", pairs, ref), [0, 1], cfg, torch.device("cpu"),
                            tok.pad_token_id)
    loss.backward()
    assert seen
    seen.clear()
    monkeypatch.setattr(select_stage, "load_pairs", lambda ctx, split: pairs)
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0,
                                  autocast=torch.enable_grad)
    ctx = SimpleNamespace(cfg=cfg, accelerator=accelerator, tokenizer=tok, loaded={})
    scores = select_stage._gradient_scores(ctx, TokenLogprobs(model), model, sharded=False)
    assert seen and scores


def test_reference_band_masks_follow_the_scores_device():
    """backend='reference' (ALLO_BACKEND=reference) on scores away from the default device: its mask
    was made on the default device and indexed with the scores' sort order (a CPU mask and CUDA
    indices: an error on a GPU)."""
    from allo.select import select_top
    from allo.select.reference import reference_band_masks

    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(5, 7, generator=g), "b": torch.randn(13, generator=g)}
    want = select_top(scores, 0.3, exclude_ratio=0.1, backend="cpu")
    with torch.device("meta"):
        got = reference_band_masks(scores, 0.3, exclude_ratio=0.1)
    for name, mask in want.items():
        assert got[name].device.type == "cpu" and torch.equal(got[name], mask), name


def _save_tagged(obj, path, tag):
    """torch.save, with every storage recorded as living on ``tag`` (what a GPU run writes)."""
    import torch.serialization as S

    real = S.location_tag
    S.location_tag = lambda storage: tag
    try:
        torch.save(obj, path)
    finally:
        S.location_tag = real


@pytest.mark.parametrize("masked", [True, False], ids=["MaskedAdamW", "AdamW"])
def test_resume_loads_a_checkpoint_written_on_another_gpu(tmp_path, masked):
    """A checkpoint's optimizer state saved from a GPU this process does not have (here: cuda:99; in a
    DDP run, the main process's cuda:0 read by every rank, or a GPU run resumed elsewhere) is read onto
    the CPU and moved to the parameters by the optimizer, not deserialised onto that GPU."""
    from transformers import get_scheduler

    from allo.optim import MaskedAdamW
    from allo.train.loop import _load_checkpoint_state, _rng_state

    def build():
        torch.manual_seed(0)
        lin = torch.nn.Linear(5, 3)
        opt = MaskedAdamW(list(lin.named_parameters()), lr=1e-2, masks={"weight": torch.rand(3, 5) < 0.5}) \
            if masked else torch.optim.AdamW(lin.parameters(), lr=1e-2)
        return lin, opt, get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=10)

    lin, opt, sched = build()
    lin(torch.randn(4, 5)).sum().backward()
    opt.step()
    sched.step()
    ckpt = str(tmp_path)
    _save_tagged(opt.state_dict(), os.path.join(ckpt, "optimizer.pt"), "cuda:99")
    _save_tagged(sched.state_dict(), os.path.join(ckpt, "scheduler.pt"), "cuda:99")
    torch.save(_rng_state(), os.path.join(ckpt, "rng_state_0.pth"))
    _, opt2, sched2 = build()
    _load_checkpoint_state(SimpleNamespace(process_index=0), ckpt, opt2, sched2, sharded=False)
    want = opt.state_dict()["state"]
    got = opt2.state_dict()["state"]
    assert set(want) == set(got)
    for pid in want:
        for key, v in want[pid].items():
            if isinstance(v, torch.Tensor):
                assert got[pid][key].device == v.device and torch.equal(got[pid][key], v), (pid, key)
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
