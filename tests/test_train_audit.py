"""allo-train edge cases found by the session-6 audit: resuming (which stage a checkpoint belongs to,
a stage restarted over an abandoned run's checkpoints), caches of a stage run again, data and
config errors. Reuses test_train's tiny model and files."""

import json
import shutil
import sys

import pytest
from types import SimpleNamespace
import torch

from allo.train import pipeline
from test_train import _cfg, _weights, tiny  # noqa: F401  (tiny: the module's fixture)


class _Interrupt(Exception):
    pass


def _interrupt_at(stage, step):
    def boom(st, s):
        if st == stage and s == step:
            raise _Interrupt
    return boom


def _same_weights(a, b):
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


def test_resume_checkpoint_folder_is_its_own_stages(tiny, tmp_path):  # noqa: F811
    shared = tmp_path / "shared"
    pipeline.run(_cfg(tiny, shared, stages="warmup,select", max_steps=2))
    kw = dict(stages="forget,improve", save_steps=2, reuse_from=str(shared), reuse_stages="warmup,select")
    pipeline.run(_cfg(tiny, tmp_path / "full", **kw))

    cut = tmp_path / "cut"
    with pytest.raises(_Interrupt):
        pipeline.run(_cfg(tiny, cut, **kw), on_step_end=_interrupt_at("forget", 3))
    ckpt = cut / "forget" / "checkpoints" / "checkpoint-2"
    with pytest.raises(FileNotFoundError, match="no such folder"):
        pipeline.run(_cfg(tiny, cut, resume_from_checkpoint=str(cut / "forget" / "checkpoint-2"), **kw))
    # a selection other than the checkpoint's: MaskedAdamW would train the checkpoint's instead
    altered = tmp_path / "altered"
    shutil.copytree(ckpt, altered)
    shutil.copy(shared / "select" / "improve_mask.safetensors", altered / "masks.safetensors")
    with pytest.raises(ValueError, match="selection differs"):
        pipeline.run(_cfg(tiny, cut, resume_from_checkpoint=str(altered), **kw))

    # the forget checkpoint resumes forget; improve (not started) starts fresh, as without the flag
    pipeline.run(_cfg(tiny, cut, resume_from_checkpoint=str(ckpt), **kw))
    for stage in ("forget", "improve"):
        _same_weights(_weights(tmp_path / "full", stage), _weights(cut, stage))
    with pytest.raises(ValueError, match="checkpoint of the `forget` stage, not of `improve`"):
        pipeline.run_stage("improve", _cfg(tiny, cut, resume_from_checkpoint=str(ckpt), **kw))


def test_stage_restarted_without_resume_replaces_an_abandoned_runs_checkpoints(tiny, tmp_path):  # noqa: F811
    kw = dict(stages="warmup", max_steps=6, save_steps=2)
    out = tmp_path / "run"
    with pytest.raises(_Interrupt):
        pipeline.run(_cfg(tiny, out, **kw), on_step_end=_interrupt_at("warmup", 5))
    assert (out / "warmup" / "checkpoints" / "checkpoint-4").exists()

    def boom(stage, step):  # the restarted stage is interrupted before it saves step 4 again
        if step == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        pipeline.run(_cfg(tiny, out, **kw), on_step_end=boom)  # saved checkpoint-2 over the old one
    # 'true' resumes the restarted run's checkpoint-2, not the abandoned run's checkpoint-4
    pipeline.run(_cfg(tiny, out, resume_from_checkpoint="true", **kw))
    pipeline.run(_cfg(tiny, tmp_path / "full", **kw))
    _same_weights(_weights(tmp_path / "full", "warmup"), _weights(out, "warmup"))
    steps = [json.loads(line)["step"] for line in open(out / "warmup" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_stage_run_again_recomputes_what_its_changed_inputs_make(tiny, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    # warm-up run again on other data: its reference log-probs are those of the new data
    out, other = tmp_path / "run", str(tiny / "eval.jsonl")
    pipeline.run_stage("warmup", _cfg(tiny, out, max_steps=1))
    pipeline.run_stage("warmup", _cfg(tiny, out, max_steps=1, train_file=other))
    pipeline.run_stage("warmup", _cfg(tiny, tmp_path / "fresh", max_steps=1, train_file=other))
    a, b = (load_file(str(d / "warmup" / "reference_logps.safetensors")) for d in (tmp_path / "fresh", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _same_weights(_weights(tmp_path / "fresh", "warmup"), _weights(out, "warmup"))

    # improve trained again (another learning rate), then `allo-train eval`: the new model's numbers
    # (another folder: `run` refuses one whose saved options differ, allo_config.json)
    out = tmp_path / "run2"
    kw = dict(selection="none", skip_forget=True, eval_models="improve", max_steps=2, eval_problems_file=None)
    pipeline.run(_cfg(tiny, out, stages="select,forget,improve,eval", **kw))
    pipeline.run_stage("improve", _cfg(tiny, out, improve_learning_rate=0.1, **kw))
    again = pipeline.run_stage("eval", _cfg(tiny, out, **kw))
    fresh = pipeline.run(_cfg(tiny, tmp_path / "eval", stages="eval", reuse_from=str(out),
                              reuse_stages="select,forget,improve", **kw))
    assert again == fresh


def test_cached_results_are_keyed_by_the_dtype_the_models_run_in_not_by_the_attention_kernel():
    # `allo-train eval --dtype bfloat16` on a run evaluated in float32 reused the float32 results (and a stage's
    # reference log-probs, token weights likewise)
    from allo.train.config import TrainConfig
    from allo.train.stages.common import Context, inputs_key

    def key(**kw):
        return inputs_key(Context(TrainConfig(**kw), None, None), models=["m"], examples=[[{"ids": [1, 2]}]], beta=0.1)

    assert key(dtype="bfloat16") != key() != key(bf16=True)
    assert key(attn_implementation="eager") == key() == key(per_device_eval_batch_size=3)


def test_data_source_errors_name_the_file_and_how_to_fix(tmp_path, capsys):
    from allo.train import data as D
    from allo.train.cli import main
    from allo.train.tokenizer import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    # a mistyped file name is no hub dataset (asking the hub only says it cannot be reached)
    with pytest.raises(FileNotFoundError, match="pairs.jsnol: no such file"):
        D.load_pairs(str(tmp_path / "pairs.jsnol"), tok)
    bad = tmp_path / "pairs.json"
    bad.write_text('[{"prompt": "1?",\n "chosen": "1.", }]')
    with pytest.raises(D.BadRowError, match=r"pairs.json:2: not valid JSON"):
        D.load_pairs(str(bad), tok)
    rc = main(["warmup", "--train_file", str(bad), "--output_dir", str(tmp_path / "out"), "--disable_tqdm"])
    err = capsys.readouterr().err
    assert rc == 2 and "pairs.json:2: not valid JSON" in err and "Traceback" not in err
    # per-token values that would turn the loss into NaN, or probabilities that are none
    negs = tmp_path / "negs.jsonl"
    negs.write_text('{"prompt": "1?", "response": "ab", "token_weights": [1, NaN], "keep_probs": [0.5, 1.5]}\n')
    with pytest.raises(D.BadRowError, match=r"negs.jsonl:1: field 'token_weights': .*not a finite number"):
        D.load_negatives(str(negs), tok, weight_field="token_weights")
    with pytest.raises(D.BadRowError, match=r"negs.jsonl:1: field 'keep_probs': .*outside \[0, 1\]"):
        D.load_negatives(str(negs), tok, weight_field="keep_probs")


@pytest.mark.parametrize("yaml_text, message", [
    ("learning_rate: [0.1]\n", r"c.yaml: key 'learning_rate': expected a float, got \[0.1\]"),
    ("per_device_train_batch_size: 2.5\n", r"c.yaml: key 'per_device_train_batch_size': expected an int, got 2.5"),
    ("learning_rate: abc\n", r"c.yaml: key 'learning_rate': expected a float, got 'abc'"),
    ("bf16: maybe\n", r"c.yaml: key 'bf16': expected true or false, got 'maybe'"),
    ("logging_steps: 0\n", r"--logging_steps is 0; expected >= 1"),
    # YAML values a flag could not give
    ("learning_rate: true\n", r"c.yaml: key 'learning_rate': expected a float, got True"),
    ("max_steps: true\n", r"c.yaml: key 'max_steps': expected an int, got True"),
    ("seed: null\n", r"c.yaml: key 'seed': expected an int, got None"),          # (None reached the run)
    ("dataset_train_split: null\n", r"c.yaml: key 'dataset_train_split': expected a string, got None"),
    ("bf16: 1.5\n", r"c.yaml: key 'bf16': expected true or false, got 1.5"),
])
def test_config_values_of_the_wrong_type_name_the_file_and_key(tmp_path, capsys, yaml_text, message):
    from allo.train.cli import parse

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml_text)
    with pytest.raises(SystemExit):
        parse(["--config", str(cfg_file)])
    assert __import__("re").search(message, capsys.readouterr().err)


def test_config_yaml_values_typed_like_flags(tmp_path, capsys):
    from allo.train.cli import parse

    cfg_file = tmp_path / "c.yaml"
    # YAML reads 1e-5 as a string and 1 as an int: both are what the flag would give
    cfg_file.write_text("learning_rate: 1e-5\nbeta: 1\nmax_prompt_length: null\nbf16: 'yes'\nresume_from_checkpoint: true\n")
    _, cfg = parse(["--config", str(cfg_file), "--beta", "0.5"])
    assert cfg.learning_rate == 1e-5 and cfg.beta == 0.5 and cfg.max_prompt_length is None and cfg.bf16 is True
    assert cfg.resume_from_checkpoint == "true"
    with pytest.raises(SystemExit):
        parse(["--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in capsys.readouterr().err


def test_report_to_tensorboard_without_it_fails_before_training(monkeypatch):
    import sys

    from allo.train import TrainConfig

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ValueError, match="--report_to tensorboard needs `pip install tensorboard`"):
        TrainConfig(report_to="tensorboard").validate()
    TrainConfig(report_to="all").validate()  # all: TensorBoard when installed


def test_resumed_metrics_drop_a_line_cut_short_by_a_kill(tmp_path):
    from allo.train.reporting import MetricsSink

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')
    MetricsSink(str(tmp_path), "jsonl", enabled=True, resume_step=2).close()
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("flags, message", [
    (dict(num_train_epochs=0), r"--num_train_epochs is 0; expected > 0"),
    (dict(beta=0.0), r"--beta is 0.0; expected > 0"),
    (dict(improve_learning_rate=-1e-5), r"--improve_learning_rate is -1e-05; expected >= 0"),
])
def test_values_that_would_fail_or_do_nothing_mid_run_are_refused_up_front(flags, message):
    from allo.train import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(**flags).validate()
    TrainConfig(num_train_epochs=0, max_steps=3).validate()  # max_steps overrides the epochs


def test_run_reruns_a_complete_stage_whose_input_stage_finished_after_it(tiny, tmp_path):  # noqa: F811
    import os

    out = tmp_path / "run"
    cfg = _cfg(tiny, out, stages="warmup,select", max_steps=1)
    pipeline.run(cfg)
    select_done = out / "select" / "DONE"
    before = os.path.getmtime(select_done)
    pipeline.run(cfg)  # nothing changed: both skipped
    assert os.path.getmtime(select_done) == before
    # warm-up run again after the selection (e.g. `allo-train warmup` with other options): the
    # selection came from the old warm-up, so `run` makes it again (and then leaves it alone)
    os.utime(select_done, (before - 100, before - 100))
    warm = os.path.getmtime(out / "warmup" / "DONE")
    pipeline.run(cfg)
    rerun = os.path.getmtime(select_done)
    assert rerun > warm and os.path.getmtime(out / "warmup" / "DONE") == warm
    pipeline.run(cfg)
    assert os.path.getmtime(select_done) == rerun


def test_a_model_whose_forward_transforms_its_logits_is_refused():
    """The fused path computes log_softmax(hidden @ W.T); Cohere scales its logits (logit_scale), Gemma 2
    soft-caps them: their log-probs would be silently wrong."""
    from transformers import CohereConfig, CohereForCausalLM, LlamaConfig, LlamaForCausalLM

    from allo.train.logps import TokenLogprobs

    dims = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    torch.manual_seed(0)
    assert TokenLogprobs(LlamaForCausalLM(LlamaConfig(**dims)))(ids, mask, ids).shape == (2, 8)
    with pytest.raises(ValueError, match="CohereForCausalLM's logits are not its output layer's"):
        TokenLogprobs(CohereForCausalLM(CohereConfig(logit_scale=0.25, **dims)))(ids, mask, ids)


def test_dataset_folder_errors_name_the_split_and_how_to_fix(tmp_path, monkeypatch):
    from allo.train import data as D
    from allo.train.tokenizer import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text('{"prompt": "1?", "chosen": "1.", "rejected": "2."}\n')
    # without `datasets` (the GPU image has none): a folder is named as one, with the way out
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
        with pytest.raises(D.DataError, match=r"/ds' is a dataset folder: that needs `pip install datasets`"):
            D.load_pairs(str(tmp_path / "ds"), tok, split="test")
    # the way out of a folder with no test split: no held-out pairs (TRL's eval is optional too)
    import types

    from allo.train import TrainConfig
    from allo.train.stages.common import _pairs_source

    def source(split, **kw):
        return _pairs_source(types.SimpleNamespace(cfg=TrainConfig(dataset_name=str(tmp_path / "ds"), **kw)), split)

    assert source("eval") == source("train") == str(tmp_path / "ds")
    assert source("eval", dataset_test_split="none") is None and source("train", dataset_test_split="none")
    pytest.importorskip("datasets")
    # with `datasets`: the folder without the split asked for says so, and how to go on
    with pytest.raises(D.DataError, match="split 'test'.*--dataset_test_split none"):
        D.load_pairs(str(tmp_path / "ds"), tok, split="test")


def test_a_dataset_without_a_test_split_runs_with_dataset_test_split_none(tiny, tmp_path):  # noqa: F811
    pytest.importorskip("datasets")  # a dataset folder is read through `datasets`
    ds = tmp_path / "ds"
    ds.mkdir()
    shutil.copy(tiny / "train.jsonl", ds / "train.jsonl")
    cfg = _cfg(tiny, tmp_path / "run", train_file=None, eval_file=None, dataset_name=str(ds), stages="warmup,eval",
               max_steps=1)
    with pytest.raises(Exception, match="--dataset_test_split none"):
        pipeline.run(cfg)
    import dataclasses

    res = pipeline.run(dataclasses.replace(cfg, dataset_test_split="none"))
    # no held-out pairs: the answers are still judged (eval_problems_file), no reward metrics
    assert set(res) == {"sft", "warmup"}
    assert "eval_answer_accuracy" in res["warmup"] and "eval_rewards/accuracies" not in res["warmup"]


def test_dataset_config_picks_a_configuration_of_the_dataset(tiny, tmp_path):  # noqa: F811
    """--dataset_config (TRL's flag): the configuration of a dataset with several (GSM8K's 'main' and
    'socratic'), here a local folder whose README declares two; before, `load_dataset` got no name and
    such a dataset could not be read at all."""
    pytest.importorskip("datasets")
    import types

    from allo.train import TrainConfig
    from allo.train import data as D
    from allo.train.stages import common
    from allo.train.tokenizer import load_builtin_tokenizer

    with open(tiny / "train.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ds = tmp_path / "ds"
    for name, part in (("easy", rows[:3]), ("hard", rows[3:8])):
        (ds / name).mkdir(parents=True)
        with open(ds / name / "train.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    (ds / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {n}\n  data_files:\n  - split: train\n    path: {n}/train.jsonl\n" for n in ("easy", "hard"))
        + "---\n")
    tok = load_builtin_tokenizer()
    logged = []
    for config, n in (("hard", 5), ("easy", 3)):
        cfg = TrainConfig(dataset_name=str(ds), dataset_config=config, dataset_test_split="none")
        cfg.validate()
        ctx = types.SimpleNamespace(cfg=cfg, tokenizer=tok, log=logged.append, loaded={})
        assert len(common.load_pairs(ctx, "train")) == n, config
    # a configuration the dataset does not have: named in the error, with the flag to choose another
    with pytest.raises(D.DataError, match=r"configuration 'medium'.*--dataset_config"):
        D.load_pairs(str(ds), tok, config="medium")
    with pytest.raises(ValueError, match=r"--dataset_config 'hard' needs --dataset_name"):
        TrainConfig(dataset_config="hard").validate()


_PROBE_CONFIG = """
from transformers import LlamaConfig


class ProbeLlamaConfig(LlamaConfig):
    model_type = "allo_probe_llama"
"""

_PROBE_MODEL = """
import os

from transformers import LlamaForCausalLM

from .configuration_allo_probe import ProbeLlamaConfig


class ProbeLlamaForCausalLM(LlamaForCausalLM):
    config_class = ProbeLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        with open(os.environ["ALLO_PROBE_RECORD"], "a") as f:  # every model built, and its attention
            f.write(config._attn_implementation + "\\n")
"""


def _model_with_its_own_code(tiny, folder):
    """tiny's SFT model as a model folder that brings its own code (an architecture transformers does
    not have, as some hub models do): config.json's auto_map names the two files beside it."""
    shutil.copytree(tiny / "sft", folder)
    (folder / "configuration_allo_probe.py").write_text(_PROBE_CONFIG)
    (folder / "modeling_allo_probe.py").write_text(_PROBE_MODEL)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="allo_probe_llama", architectures=["ProbeLlamaForCausalLM"],
                  auto_map={"AutoConfig": "configuration_allo_probe.ProbeLlamaConfig",
                            "AutoModelForCausalLM": "modeling_allo_probe.ProbeLlamaForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))


def test_trust_remote_code_and_attn_implementation_reach_every_model_load(tiny, tmp_path, monkeypatch):  # noqa: F811
    """--trust_remote_code and --attn_implementation (TRL's ModelConfig flags) reach every model the
    stages load or build (whole, or empty for the weights of other ranks), and the models the stages
    save carry the code on: a model folder with its own code runs the whole pipeline."""
    custom = tmp_path / "custom"
    _model_with_its_own_code(tiny, custom)
    record = tmp_path / "built.txt"
    monkeypatch.setenv("ALLO_PROBE_RECORD", str(record))
    stages = "warmup,select,forget,improve,eval"
    # without the flag: refused before any stage, naming it (transformers alone would ask on the terminal)
    with pytest.raises(ValueError, match=r"--model_name_or_path .*custom: the model brings its own code .*"
                                         r"'allo_probe_llama'.*pass --trust_remote_code true"):
        pipeline.run(_cfg(tiny, tmp_path / "refused", model_name_or_path=str(custom), stages=stages, max_steps=1))
    assert not record.exists()
    res = pipeline.run(_cfg(tiny, tmp_path / "run", model_name_or_path=str(custom), stages=stages, max_steps=1,
                            trust_remote_code=True, attn_implementation="eager"))
    assert set(res) == {"sft", "warmup", "forget", "improve"}
    built = record.read_text().split()
    assert len(built) >= 8 and set(built) == {"eager"}, built
    for stage in ("warmup", "forget", "improve"):
        saved = tmp_path / "run" / stage / "model"
        assert (saved / "modeling_allo_probe.py").is_file(), stage
        assert json.loads((saved / "config.json").read_text())["model_type"] == "allo_probe_llama", stage


def test_loss_type_reaches_every_dpo_loss_it_names(tiny, tmp_path, monkeypatch):  # noqa: F811
    """--loss_type and --label_smoothing: the warm-up, the gradient scores and improve with --key_tokens
    False use them; the eval's yardstick stays sigmoid. (A spy on allo.losses.dpo_loss, which each caller imports per call.)"""
    import allo.losses as losses
    from allo.train import TrainConfig

    real, seen = losses.dpo_loss, []

    def spy(*args, loss_type="sigmoid", label_smoothing=0.0, **kwargs):
        seen.append((sys._getframe(1).f_code.co_name, loss_type, label_smoothing))
        return real(*args, loss_type=loss_type, label_smoothing=label_smoothing, **kwargs)

    monkeypatch.setattr(losses, "dpo_loss", spy)
    for loss_type, smoothing in (("ipo", 0.0), ("robust", 0.2)):
        seen.clear()
        pipeline.run(_cfg(tiny, tmp_path / loss_type, loss_type=loss_type, label_smoothing=smoothing,
                          score_source="gradient", score_batches=1, key_tokens=False, skip_forget=True,
                          stages="warmup,select,improve,eval", eval_models="improve", max_steps=1).validate())
        assert sorted(set(seen)) == [("_forward_loss", loss_type, smoothing), ("_gradient_scores", loss_type, smoothing),
                                     ("_reward_metrics", "sigmoid", 0.0)], loss_type
    with pytest.raises(ValueError, match=r"--loss_type is 'dpo'; expected one of sigmoid, ipo, hinge, robust"):
        TrainConfig(loss_type="dpo").validate()
    with pytest.raises(ValueError, match=r"--label_smoothing applies to the sigmoid and robust loss types, not 'hinge'"):
        TrainConfig(loss_type="hinge", label_smoothing=0.1).validate()
    with pytest.raises(ValueError, match=r"--label_smoothing is 0.5; expected a probability in \[0, 0.5\)"):
        TrainConfig(label_smoothing=0.5).validate()


def test_a_warmup_model_trained_elsewhere_replaces_the_warmup_stage(tiny, tmp_path):  # noqa: F811
    """--warmup_model_path (e.g. a TRL DPO model): select, forget and eval use it as allo's own warm-up
    model would be used (same masks, token weights and numbers), the warmup stage is not run, and the
    stages after it run again when it is replaced by a newer model."""
    import os

    from safetensors.torch import load_file

    from allo.train import TrainConfig

    kw = dict(stages="warmup,select,forget,eval", eval_models="sft,warmup,forget", max_steps=2)
    ours = tmp_path / "ours"
    expected = pipeline.run(_cfg(tiny, ours, **kw).validate())
    elsewhere = tmp_path / "trl_dpo_model"
    shutil.copytree(ours / "warmup" / "model", elsewhere)
    theirs = tmp_path / "theirs"
    got = pipeline.run(_cfg(tiny, theirs, warmup_model_path=str(elsewhere), **kw).validate())
    assert not (theirs / "warmup").exists()
    assert got == expected  # the warm-up model evaluated, and the forget model trained the same way
    for f in ("select/forget_mask.safetensors", "select/improve_mask.safetensors",
              "forget/token_weights.safetensors"):
        a, b = load_file(str(ours / f)), load_file(str(theirs / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f

    # a newer model at that path: select (and what follows) run again; unchanged: all skipped
    done = os.path.getmtime(theirs / "select" / "DONE")
    pipeline.run(_cfg(tiny, theirs, warmup_model_path=str(elsewhere), **kw).validate())
    assert os.path.getmtime(theirs / "select" / "DONE") == done
    os.utime(elsewhere / "config.json", (done + 10, done + 10))
    pipeline.run(_cfg(tiny, theirs, warmup_model_path=str(elsewhere), **kw).validate())
    assert os.path.getmtime(theirs / "select" / "DONE") > done

    with pytest.raises(ValueError, match="--warmup_model_path needs --model_name_or_path"):
        TrainConfig(warmup_model_path=str(elsewhere)).validate()
    with pytest.raises(ValueError, match=r"--warmup_model_path .*/nowhere: no such folder"):
        _cfg(tiny, theirs, warmup_model_path=str(tmp_path / "nowhere")).validate()
    with pytest.raises(ValueError, match="--warmup_model_path org/dpo-model: expected a local model folder"):
        _cfg(tiny, theirs, warmup_model_path="org/dpo-model").validate()
    # another architecture: refused before any stage (select would fail only after the reference passes)
    from allo.train.model import build_tiny_model, load_tokenizer, save_model

    tok = load_tokenizer(str(tiny / "sft"))
    save_model(build_tiny_model(tok, hidden_size=48, num_layers=1, seed=0), tok, str(tmp_path / "wide"))
    with pytest.raises(ValueError, match=r"--warmup_model_path .*wide: not the architecture of --model_name_or_path "
                                         r".*sft \(hidden_size 48 vs 32; intermediate_size"):
        _cfg(tiny, theirs, warmup_model_path=str(tmp_path / "wide")).validate()


@pytest.mark.parametrize("flags, warmup", [({}, 0), ({"warmup_steps": 2}, 2), ({"warmup_steps": 0.5}, 2),
                                           ({"warmup_steps": 0.3, "warmup_ratio": 0.9}, 2)])
def test_warmup_steps_as_transformers_5_reads_it(tiny, tmp_path, flags, warmup):  # noqa: F811
    """--warmup_steps: whole steps, or a fraction of the stage's steps below 1 (transformers 5, whose
    TrainingArguments has no warmup_ratio); it overrides --warmup_ratio (default 0.1: no warm-up step
    of a 4-step stage). The loop's scheduler follows it: linear, lr 1e-2, 4 steps."""
    from allo.train import TrainConfig

    cfg = _cfg(tiny, tmp_path, stages="warmup", max_steps=4, lr_scheduler_type="linear", **flags).validate()
    assert cfg.num_warmup_steps(4) == warmup
    pipeline.run(cfg)
    lrs = [json.loads(line)["learning_rate"] for line in open(tmp_path / "warmup" / "metrics.jsonl")]
    expected = [1e-2 * (s / warmup if s < warmup else (4 - s) / (4 - warmup)) for s in (1, 2, 3, 4)]
    assert lrs == pytest.approx(expected)
    if not flags:
        for bad in (-1, 2.5):
            with pytest.raises(ValueError, match=f"--warmup_steps is {bad}; expected a whole number of steps"):
                TrainConfig(warmup_steps=bad).validate()


@pytest.mark.parametrize("use_cpu", [True, False])
def test_use_cpu_reaches_the_accelerator(tiny, tmp_path, monkeypatch, use_cpu):  # noqa: F811
    # --use_cpu (transformers' TrainingArguments.use_cpu): the run stays on the CPU on a GPU machine
    import accelerate

    seen = {}

    def accelerator(**kw):
        seen.update(kw)
        raise _Interrupt

    monkeypatch.setattr(accelerate, "Accelerator", accelerator)
    with pytest.raises(_Interrupt):
        pipeline.make_context(_cfg(tiny, tmp_path / "out", use_cpu=use_cpu))
    assert seen["cpu"] is use_cpu


class _FakeAcc:
    is_main_process = True
    num_processes = 1
    process_index = 0

    def wait_for_everyone(self):
        pass


class _Killed(BaseException):
    """Stands for a SIGKILL at a chosen point (nothing after it runs)."""


class _FakeModel:
    def __init__(self, tag):
        self.tag = tag

    def save_pretrained(self, folder, safe_serialization=True):
        import os

        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "model.safetensors"), "w") as f:
            f.write(self.tag)


def test_save_model_killed_while_replacing_never_leaves_no_model(tmp_path, monkeypatch):
    # killed right after a folder is deleted: the old code deleted the old model before renaming the new
    # one in (a kill there left no model); now the old one is renamed aside and deleted after
    from allo.train import model as M

    path = str(tmp_path / "model")
    M.save_model(_FakeModel("old"), None, path)
    real = shutil.rmtree

    def rmtree_then_die(p, *a, **k):
        existed = __import__("os").path.exists(p)
        real(p, *a, **k)
        if existed and not p.endswith(".tmp"):
            raise _Killed

    monkeypatch.setattr(M.shutil, "rmtree", rmtree_then_die)
    with pytest.raises(_Killed):
        M.save_model(_FakeModel("new"), None, path)
    assert (tmp_path / "model" / "model.safetensors").read_text() == "new"
    monkeypatch.setattr(M.shutil, "rmtree", real)
    M.save_model(_FakeModel("newer"), None, path)  # the next save clears what the kill left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_stage_run_again_drops_its_done_before_rewriting_its_folder(tmp_path, monkeypatch):
    # a kill while a re-run stage replaces its outputs must not leave them under the old DONE
    from allo.train.config import TrainConfig
    from allo.train.stages import Context

    sdir = tmp_path / "select"
    sdir.mkdir()
    (sdir / "DONE").write_text("{}")
    seen = []

    def stage(ctx):
        seen.append((sdir / "DONE").exists())
        raise _Killed

    monkeypatch.setitem(pipeline.STAGE_FUNCS, "select", stage)
    ctx = Context(TrainConfig(output_dir=str(tmp_path)), _FakeAcc(), None)
    with pytest.raises(_Killed):
        pipeline.run_stage("select", None, context=ctx)
    assert seen == [False] and not (sdir / "DONE").exists()


def _fake_checkpoint(folder, step, stage="forget"):
    import json
    import os

    d = os.path.join(folder, "checkpoints", f"checkpoint-{step}")
    os.makedirs(d)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pth"):
        open(os.path.join(d, name), "w").close()
    with open(os.path.join(d, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step, "world_size": 1, "stage": stage}, f)
    return d


def test_a_checkpoint_killed_while_deleted_is_never_resumed(tmp_path, monkeypatch):
    # a stage starting fresh deletes the old checkpoints; a kill part-way (model gone, trainer_state.json
    # left) must not leave a folder that --resume_from_checkpoint true takes for the latest checkpoint
    import os
    from types import SimpleNamespace

    from allo.train import loop

    sdir = str(tmp_path / "forget")
    ckpt = _fake_checkpoint(sdir, 2)

    def rmtree_part_way(p, *a, **k):
        for root, _, files in os.walk(p):
            if "model.safetensors" in files:
                os.remove(os.path.join(root, "model.safetensors"))
        raise _Killed

    monkeypatch.setattr(loop.shutil, "rmtree", rmtree_part_way)
    with pytest.raises(_Killed):
        loop._checkpoint_to_resume(_FakeAcc(), SimpleNamespace(resume_from_checkpoint=None), sdir, None)
    assert loop.latest_checkpoint(sdir) is None
    monkeypatch.undo()
    # an incomplete checkpoint given anyway is named as one (not as a missing model or a sharding mismatch)
    os.makedirs(ckpt)
    with open(os.path.join(ckpt, "trainer_state.json"), "w") as f:
        f.write('{"global_step": 2, "world_size": 1, "stage": "forget"}')
    with pytest.raises(Exception, match="incomplete checkpoint.*model.safetensors"):
        loop._checkpoint_to_resume(_FakeAcc(), SimpleNamespace(resume_from_checkpoint=ckpt), sdir, None)


def test_checkpoint_pruning_killed_part_way_leaves_no_checkpoint_named_folder(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from allo.train import loop

    sdir = str(tmp_path / "warmup")
    acc = _FakeAcc()
    acc.unwrap_model = lambda m: m
    state = SimpleNamespace(state_dict=lambda: {})
    model = SimpleNamespace(model=_FakeModel("w"))
    for step in (1, 2):
        loop._save_checkpoint(acc, sdir, step, model, None, state, state, None, 2)
    real = shutil.rmtree

    def rmtree_part_way(p, *a, **k):
        if "checkpoint-1" in p:
            import os

            os.remove(os.path.join(p, "model.safetensors"))
            raise _Killed
        real(p, *a, **k)

    monkeypatch.setattr(loop.shutil, "rmtree", rmtree_part_way)
    with pytest.raises(_Killed):
        loop._save_checkpoint(acc, sdir, 3, model, None, state, state, None, 2)
    names = sorted(p.name for p in (tmp_path / "warmup" / "checkpoints").iterdir() if p.name.startswith("checkpoint"))
    assert names == ["checkpoint-2", "checkpoint-3"]
    monkeypatch.undo()
    loop._save_checkpoint(acc, sdir, 4, model, None, state, state, None, 2)  # clears the kill's leftovers
    assert sorted(p.name for p in (tmp_path / "warmup" / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_a_checkpoint_cut_short_by_a_kill_does_not_hold_results(tmp_path):
    # killed during a stage's first checkpoint write (only checkpoint-1.tmp): nothing there would be reused,
    # so a run with other options is not refused; a complete checkpoint still holds the stage's results
    import dataclasses

    from allo.train import run_config
    from allo.train.config import RunError, TrainConfig

    cfg = TrainConfig(output_dir=str(tmp_path))
    run_config.write(cfg, run_config.input_identities(cfg))
    (tmp_path / "warmup" / "checkpoints" / "checkpoint-1.tmp").mkdir(parents=True)
    other = dataclasses.replace(cfg, learning_rate=cfg.learning_rate * 2)
    assert run_config.stages_holding_results(str(tmp_path)) == set()
    run_config.check(other, log=lambda m: None)
    _fake_checkpoint(str(tmp_path / "warmup"), 1, stage="warmup")
    with pytest.raises(RunError, match="learning_rate"):
        run_config.check(other, log=lambda m: None)


def test_a_checkpoint_trained_from_other_inputs_is_not_resumed(tmp_path):
    # an upstream stage ran again (new starting model): the stage's reference cache is recomputed under a
    # new key, and its checkpoint of the old run must not be resumed on top of it
    import json

    from allo.train import loop
    from allo.train.config import RunError

    sdir = str(tmp_path / "improve")
    acc = _FakeAcc()
    acc.unwrap_model = lambda m: m
    state = SimpleNamespace(state_dict=lambda: {})
    loop._save_checkpoint(acc, sdir, 2, SimpleNamespace(model=_FakeModel("w")), None, state, state, None, 2,
                          inputs={"reference_logps": "old-key"})
    ckpt = loop.latest_checkpoint(sdir)
    assert json.load(open(f"{ckpt}/trainer_state.json"))["inputs"] == {"reference_logps": "old-key"}
    cfg = SimpleNamespace(resume_from_checkpoint="true")
    assert loop._checkpoint_to_resume(acc, cfg, sdir, None, {"reference_logps": "old-key"}) == ckpt
    with pytest.raises(RunError, match="reference_logps changed.*without --resume_from_checkpoint"):
        loop._checkpoint_to_resume(acc, cfg, sdir, None, {"reference_logps": "new-key"})


def test_resume_reads_a_checkpoint_whose_model_save_pretrained_sharded(tiny, tmp_path):  # noqa: F811
    # save_pretrained splits a model larger than its max_shard_size (50 GB in transformers 5) into
    # model-0000k-of-0000n.safetensors files and an index: the resume read model.safetensors alone
    from safetensors.torch import load_file, save_file

    kw = dict(stages="warmup", max_steps=6, save_steps=2)
    pipeline.run(_cfg(tiny, tmp_path / "full", **kw))
    cut = tmp_path / "cut"
    with pytest.raises(_Interrupt):
        pipeline.run(_cfg(tiny, cut, **kw), on_step_end=_interrupt_at("warmup", 5))
    ckpt = cut / "warmup" / "checkpoints" / "checkpoint-4"
    weights = load_file(str(ckpt / "model.safetensors"))
    names = sorted(weights)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for file, part in shards.items():
        save_file({n: weights[n] for n in part}, str(ckpt / file), metadata={"format": "pt"})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: file for file, part in shards.items() for n in part}}))
    (ckpt / "model.safetensors").unlink()
    pipeline.run(_cfg(tiny, cut, resume_from_checkpoint="true", **kw))
    _same_weights(_weights(tmp_path / "full", "warmup"), _weights(cut, "warmup"))


def test_a_stage_linked_from_reuse_from_is_never_written_when_it_runs_again(tiny, tmp_path):  # noqa: F811
    # a linked stage runs again when it is stale (here: warm-up, trained in this run, finished after the
    # linked selection) or is run by name: it must get its own folder, not overwrite the other run's
    shared = tmp_path / "shared"
    pipeline.run(_cfg(tiny, shared, stages="warmup,select", max_steps=2))
    before = {p.name: p.read_bytes() for p in (shared / "select").iterdir() if p.is_file()}
    out = tmp_path / "out"
    pipeline.run(_cfg(tiny, out, stages="warmup,select", max_steps=3, reuse_from=str(shared), reuse_stages="select"))
    assert not (out / "select").is_symlink() and (out / "select" / "DONE").exists()
    pipeline.run(_cfg(tiny, tmp_path / "named", stages="warmup,select", max_steps=2, reuse_from=str(shared),
                      reuse_stages="warmup,select"))
    assert (tmp_path / "named" / "select").is_symlink()
    pipeline.run_stage("select", _cfg(tiny, tmp_path / "named", stages="warmup,select", max_steps=2))
    assert not (tmp_path / "named" / "select").is_symlink() and (tmp_path / "named" / "select" / "DONE").exists()
    assert {p.name: p.read_bytes() for p in (shared / "select").iterdir() if p.is_file()} == before
