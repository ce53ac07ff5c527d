"""MaskedAdamW as the optimizer of transformers.Trainer and through accelerate.Accelerator.prepare."""

import copy
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from allo.optim import MaskedAdamW  # noqa: E402


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # (tests/conftest.py)


def _tiny_llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def _masks(model, density=0.2):
    # train a random subset of the MLP and attention matrices; everything else stays frozen
    return {n: torch.rand(p.shape) < density for n, p in model.named_parameters() if n.endswith("proj.weight")}


def _check_sparse_update(before, model, masks):
    changed = 0
    for name, p in model.named_parameters():
        old = before[name]
        mask = masks.get(name)
        if mask is None:
            assert torch.equal(p.detach(), old), f"{name} is not selected but changed"
            continue
        assert torch.equal(p.detach()[~mask], old[~mask]), f"{name}: an unselected element changed"
        changed += int((p.detach()[mask] != old[mask]).sum())
    assert changed > 0


@pytest.mark.parametrize("compact", [False, True])
def test_trainer_with_masked_adamw_and_scheduler(tmp_path, compact):
    model = _tiny_llama()
    masks = _masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.01, masks=masks, compact_grads=compact)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=4)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 12))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, use_cpu=True, report_to=[],
                                          save_strategy="no", logging_steps=1, disable_tqdm=True,
                                          max_grad_norm=0.0 if compact else 1.0)  # compact: clip via opt.clip_grad_norm_
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    result = trainer.train()
    assert result.global_step == 4
    _check_sparse_update(before, model, masks)
    # the scheduler drove the optimizer's lr to the end of its schedule
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert opt.selected_count() == sum(int(m.sum()) for m in masks.values())
    # compact mode: Trainer only calls model.zero_grad(); the step itself consumed the compact grads
    assert all(opt.compact_grad(p) is None for p in model.parameters())


@pytest.mark.parametrize("compact", [False, True])
def test_trainer_resumed_from_its_checkpoint_ends_bit_for_bit_like_the_uninterrupted_run(tmp_path, compact):
    # Trainer saves optimizer.state_dict() (masks, compact moments, step counts) in each checkpoint and
    # loads it back on resume_from_checkpoint; the data order and the scheduler resume too
    from allo.optim import CompactGradClipping
    from conftest import reset_accelerate_state

    base = _tiny_llama()
    masks = _masks(base)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 12))]

    def run(out, resume=None):
        reset_accelerate_state()  # (two Trainers in one test)
        model = copy.deepcopy(base)
        opt = MaskedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.01, masks=masks, compact_grads=compact)
        sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=6)
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=2,
                                              gradient_accumulation_steps=2, use_cpu=True, report_to=[],
                                              save_strategy="steps", save_steps=3, disable_tqdm=True, seed=0,
                                              max_grad_norm=0.0 if compact else 1.0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched),
                                       callbacks=[CompactGradClipping(1.0)] if compact else None)
        trainer.train(resume_from_checkpoint=resume)
        return model, opt

    full, full_opt = run(tmp_path / "full")
    resumed, resumed_opt = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-3"))
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    for p, q in zip(full_opt.state.values(), resumed_opt.state.values()):
        assert torch.equal(p["exp_avg"], q["exp_avg"]) and torch.equal(p["exp_avg_sq"], q["exp_avg_sq"])
    assert resumed_opt.selected_count() == sum(int(m.sum()) for m in masks.values())


_TRAINER_WORKER = """
import os, sys, torch, transformers
from allo.optim import MaskedAdamW
compact, out, batch = sys.argv[1] == "1", sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=32))
g = torch.Generator().manual_seed(1)
masks = {n: torch.rand(p.shape, generator=g) < 0.2 for n, p in model.named_parameters() if n.endswith("proj.weight")}
data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 12), generator=g)]
before = {n: p.detach().clone() for n, p in model.named_parameters()}
opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=masks, compact_grads=compact)
args = transformers.TrainingArguments(output_dir=out, max_steps=3, per_device_train_batch_size=batch, use_cpu=True,
                                      report_to=[], save_strategy="no", disable_tqdm=True, max_grad_norm=0.0, seed=0)
trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                               optimizers=(opt, transformers.get_constant_schedule(opt)))
trainer.train()
torch.save({"weights": dict(model.named_parameters()), "before": before, "masks": masks,
            "processes": trainer.accelerator.num_processes}, os.path.join(out, f"rank{os.environ.get('RANK', 0)}.pt"))
"""


def test_trainer_on_two_processes_with_masked_adamw_matches_one_process_and_refuses_compact_grads(tmp_path):
    # what a multi-GPU user runs (Trainer wraps the model in DDP), on 2 CPU processes (gloo): with dense
    # gradients DDP averages them and every rank steps alike; compact gradients under DDP stop at the
    # first step with the fix in the message (README: use compact_grads=False there)
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(_TRAINER_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}

    def launch(compact, out):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                               "127.0.0.1", "--master_port", str(port), str(script), str(int(compact)), str(out), "2"],
                              env=env, capture_output=True, text=True, timeout=400)

    two = launch(False, tmp_path / "two")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), "0", str(tmp_path / "one"), "4"], env=env, capture_output=True,
                         text=True, timeout=400)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    r0, r1, single = (torch.load(tmp_path / d / f, weights_only=False)
                      for d, f in (("two", "rank0.pt"), ("two", "rank1.pt"), ("one", "rank0.pt")))
    assert (r0["processes"], single["processes"]) == (2, 1)
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), name  # the ranks stepped alike
        torch.testing.assert_close(w, single["weights"][name], rtol=1e-5, atol=1e-6, msg=name)
    _check_sparse_update(r0["before"], types.SimpleNamespace(named_parameters=r0["weights"].items), r0["masks"])

    compact = launch(True, tmp_path / "compact")
    assert compact.returncode != 0
    assert "compact gradients were not averaged across the 2 processes" in compact.stderr
    assert "compact_grads=False" in compact.stderr


@pytest.mark.parametrize("compact", [False, True])
def test_accelerate_prepare_with_gradient_accumulation(compact):
    from accelerate import Accelerator

    torch.manual_seed(0)
    base = _tiny_llama()
    masks = _masks(base)
    batches = [torch.randint(0, 64, (2, 10)) for _ in range(4)]

    # plain loop: accumulate two micro-batches per step by hand
    manual = copy.deepcopy(base)
    manual_opt = MaskedAdamW(manual.named_parameters(), lr=1e-2, masks=masks)
    for i in range(0, 4, 2):
        for ids in batches[i:i + 2]:
            (manual(input_ids=ids, labels=ids).loss / 2).backward()
        manual_opt.step()
        manual_opt.zero_grad()

    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=masks, compact_grads=compact)
    model, prepared = accelerator.prepare(model, opt)
    for ids in batches:
        with accelerator.accumulate(model):
            accelerator.backward(model(input_ids=ids, labels=ids).loss)
            if compact and accelerator.sync_gradients:
                opt.clip_grad_norm_(1e9)  # the compact-mode clipping entry point (no-op threshold)
            prepared.step()
            prepared.zero_grad()
    _check_sparse_update(before, model, masks)
    for (name, a), b in zip(model.named_parameters(), manual.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_compact_grad_clipping_clips_what_the_step_uses_before_every_trainer_step(tmp_path):
    # Trainer's own clipping (torch's function over param.grad) cannot see compact gradients; the callback
    # clips them by their global norm right before each optimizer step
    from allo.optim import CompactGradClipping

    model = _tiny_llama()
    masks = _masks(model)
    opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=masks, compact_grads=True)
    events, real_clip, real_step = [], opt.clip_grad_norm_, opt.step

    def clip(max_norm, norm_type=2.0, **kw):
        before = real_clip(max_norm, norm_type, **kw)
        after = real_clip(float("inf"))  # (inf: measures, scales by 1)
        events.append(("clip", max_norm, float(before), float(after)))
        return before

    def step(self, *a, **kw):
        events.append(("step",))
        return real_step(*a, **kw)

    # (bound: the LR scheduler wraps opt.step and needs a method)
    opt.clip_grad_norm_, opt.step = clip, types.MethodType(step, opt)
    sched = transformers.get_constant_schedule(opt)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 12))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, use_cpu=True, report_to=[],
                                          save_strategy="no", disable_tqdm=True, max_grad_norm=0.0,
                                          logging_steps=1)

    class Reporter(transformers.TrainerCallback):  # stands in for a reporting integration (TensorBoard, W&B)
        def __init__(self):
            self.grad_norms = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "grad_norm" in logs:
                self.grad_norms.append(logs["grad_norm"])

    clipping, reporter = CompactGradClipping(max_norm=1e-3), Reporter()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched),
                                   callbacks=[reporter])
    trainer.callback_handler.callbacks.insert(0, clipping)  # first: what the README says, for integrations
    trainer.train()
    assert [e[0] for e in events] == ["clip", "step"] * 3, events
    for _, max_norm, before, after in events[::2]:
        assert max_norm == 1e-3 and before > 1e-2  # (so it did clip)
        assert after == pytest.approx(1e-3, rel=1e-3)
    assert clipping.last_norm == events[-2][2]
    # the logged grad_norm is each step's compact norm (Trainer's own saw no gradients: 0.0), in the logs
    # the callbacks after it get and in the trainer state's history
    norms = [before for _, _, before, _ in events[::2]]
    assert reporter.grad_norms == norms
    assert [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h] == norms


def test_compact_grad_clipping_refuses_a_trainer_that_clips_too_and_a_dense_optimizer(tmp_path):
    from allo.optim import CompactGradClipping

    with pytest.raises(ValueError, match="max_norm must be a positive finite number"):
        CompactGradClipping(max_norm=0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (4, 12))]
    for compact, max_grad_norm, says in ((True, 1.0, "max_grad_norm is 1.0, so Trainer also clips"),
                                         (False, 0.0, "compact_grads=True \\(got MaskedAdamW with compact_grads=False")):
        model = _tiny_llama()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=_masks(model), compact_grads=compact)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                                              use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                                              max_grad_norm=max_grad_norm)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       optimizers=(opt, transformers.get_constant_schedule(opt)),
                                       callbacks=[CompactGradClipping(max_norm=1.0)])
        with pytest.raises(ValueError, match=says):
            trainer.train()
        assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())  # before any step
