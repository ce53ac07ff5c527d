"""allo-train's masked stages under FSDP2: 2 CPU processes (gloo) == 1 process with the doubled batch.

The 2-process runs are this file run as a script under torchrun, with the environment `accelerate
launch` sets for an FSDP2 config (ACCELERATE_USE_FSDP=true, FSDP_VERSION=2; on CPU accelerate itself
runs MULTI_CPU and the masked stages shard the model themselves). One launch runs select + improve,
then improve again interrupted after its checkpoint and resumed.
"""

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def _cfg(tiny, out, **kw):
    from allo.train import TrainConfig

    base = dict(model_name_or_path=os.path.join(tiny, "sft"), train_file=os.path.join(tiny, "train.jsonl"),
                output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS, save_steps=2, logging_steps=1,
                improve_learning_rate=1e-2, max_grad_norm=0.5, disable_tqdm=True, report_to="jsonl", seed=3,
                skip_forget=True, score_source="gradient", score_batches=2, improve_ratio=0.3)
    base.update(kw)
    return TrainConfig(**base)


class _Interrupt(Exception):
    pass


def _two_process_runs(tiny, out):
    """Under torchrun: select + improve; then improve cut after step 3 (checkpoint at 2) and resumed."""
    from allo.train import pipeline

    pipeline.run(_cfg(tiny, os.path.join(out, "two"), stages="select,improve", per_device_train_batch_size=2))
    kw = dict(stages="improve", per_device_train_batch_size=2, reuse_from=os.path.join(out, "two"),
              reuse_stages="select")

    def boom(stage, step):
        if step == 3:
            raise _Interrupt

    try:
        pipeline.run(_cfg(tiny, os.path.join(out, "cut"), **kw), on_step_end=boom)
        raise AssertionError("the interrupted run was not interrupted")
    except _Interrupt:
        pass
    pipeline.run(_cfg(tiny, os.path.join(out, "cut"), resume_from_checkpoint="true", **kw))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from allo.train.model import build_tiny_model, save_model
    from allo.train.tasks import ANSWER_PREFIX, make_problems
    from allo.train.tokenizer import load_builtin_tokenizer

    root = tmp_path_factory.mktemp("tiny_fsdp")
    tok = load_builtin_tokenizer()
    save_model(build_tiny_model(tok, hidden_size=32, num_layers=2, seed=0), tok, str(root / "sft"))
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for p in make_problems("arithmetic", 16, 0):
            bad = p.solution.replace(f"{ANSWER_PREFIX} {p.answer}.", f"{ANSWER_PREFIX} {p.answer + rng.choice([-2, 1, 3])}.")
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.solution, "rejected": bad}) + "\n")
    return str(root)


def test_fsdp2_improve_matches_one_process_and_resumes_exactly(tiny, tmp_path):
    from allo.select import Selection
    from allo.train import pipeline

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), os.path.abspath(__file__), tiny, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-5000:]
    pipeline.run(_cfg(tiny, tmp_path / "one", stages="select,improve"))

    # select with 2 processes: the main process alone selects; the same masks as 1 process
    for stage in ("forget", "improve"):
        a = Selection.load(str(tmp_path / "one" / "select" / f"{stage}_mask.safetensors"))
        b = Selection.load(str(tmp_path / "two" / "select" / f"{stage}_mask.safetensors"))
        assert all(torch.equal(a.indices[n], b.indices[n]) for n in a.names)

    sft = load_file(os.path.join(tiny, "sft", "model.safetensors"))
    masks = Selection.load(str(tmp_path / "one" / "select" / "improve_mask.safetensors")).masks
    one = load_file(str(tmp_path / "one" / "improve" / "model" / "model.safetensors"))
    two_w = load_file(str(tmp_path / "two" / "improve" / "model" / "model.safetensors"))
    assert set(two_w) == set(sft)
    changed = 0
    for k in one:
        # sums of the batch in another order (2 ranks): Adam's sqrt(v) can amplify fp32 rounding a little
        torch.testing.assert_close(two_w[k], one[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"improve/{k}: {m}")
        diff = two_w[k] != sft[k]
        assert not (diff & ~masks[k]).any(), f"{k}: an unselected element changed"
        changed += int(diff.sum())
    assert changed > 0.5 * sum(int(m.sum()) for m in masks.values())

    # the checkpoint holds the whole HF model (gathered), scheduler and one optimizer file per rank
    ckpt = tmp_path / "two" / "improve" / "checkpoints" / "checkpoint-2"
    saved, ref = load_file(str(ckpt / "model.safetensors")), load_file(
        str(tmp_path / "one" / "improve" / "checkpoints" / "checkpoint-2" / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in sft.items()}
    for k in ref:
        torch.testing.assert_close(saved[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"checkpoint-2/{k}: {m}")
    assert (ckpt / "config.json").exists() and (ckpt / "optimizer_0.pt").exists() and (ckpt / "optimizer_1.pt").exists()
    assert not (ckpt / "optimizer.pt").exists()

    # interrupted after step 3 and resumed from checkpoint-2: bit for bit the uninterrupted run
    cut = load_file(str(tmp_path / "cut" / "improve" / "model" / "model.safetensors"))
    for k in two_w:
        assert torch.equal(cut[k], two_w[k]), f"resumed improve differs at {k}"
    rows = [json.loads(l) for l in open(tmp_path / "cut" / "improve" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


def test_fsdp1_and_deepspeed_are_refused_with_how_to_switch(monkeypatch):
    from accelerate.utils import DistributedType

    from allo.train.fsdp import masked_stage_shards

    class Acc:
        distributed_type = DistributedType.NO
        num_processes = 2

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match=r"FSDP version 1 .*fsdp_version: 2"):
        masked_stage_shards(Acc(), "improve")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert masked_stage_shards(Acc(), "improve")
    Acc.num_processes = 1
    assert not masked_stage_shards(Acc(), "improve")  # one process: nothing to shard
    Acc.distributed_type = DistributedType.DEEPSPEED
    with pytest.raises(ValueError, match=r"DeepSpeed is not supported .*FSDP2, DDP .* one process"):
        masked_stage_shards(Acc(), "improve")


if __name__ == "__main__":  # a rank of the 2-process run (see the first test)
    _two_process_runs(sys.argv[1], sys.argv[2])
