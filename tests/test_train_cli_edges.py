"""allo-train's edges found by the CLI review: a rerun into an existing --output_dir with other options,
options refused at parse time, a run without held-out data, unknown TRL flags, clean errors before any
stage, data files checked up front. Reuses test_train's tiny model and files."""

import dataclasses
import json
import os
import re
import shutil

import pytest

from allo.train import folders, pipeline, run_config
from allo.train import data as D
from allo.train.cli import build_parser, main, parse
from allo.train import TrainConfig
from allo.train.config import LR_SCHEDULERS, STAGES, RunError
from test_train import _cfg, tiny  # noqa: F401  (tiny: the module's fixture)


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


# ------------------------------------------------------------------ 1. a rerun with other options
def test_a_rerun_with_other_options_or_data_is_refused_and_overwrite_starts_over(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    kw = dict(stages="warmup", max_steps=1)
    pipeline.run(_cfg(tiny, out, **kw))
    saved = json.loads((out / "allo_config.json").read_text())
    assert saved["options"]["learning_rate"] == 1e-2 and saved["inputs"]["train_file"]["sha256"]
    done = os.path.getmtime(out / "warmup" / "DONE")

    # the same options, or options that do not change results: completed stages are skipped
    pipeline.run(_cfg(tiny, out, report_to="none", logging_steps=3, **kw))
    # the same data at another path is the same data
    moved = tmp_path / "moved.jsonl"
    shutil.copy(tiny / "train.jsonl", moved)
    pipeline.run(_cfg(tiny, out, train_file=str(moved), **kw))
    assert os.path.getmtime(out / "warmup" / "DONE") == done

    # other options, other data: refused, naming each difference and how to go on
    with pytest.raises(RunError) as e:
        pipeline.run(_cfg(tiny, out, learning_rate=2e-2, beta=0.2, **kw))
    msg = str(e.value)
    assert "--learning_rate: 0.01 -> 0.02" in msg and "--beta: 0.1 -> 0.2" in msg
    assert "--overwrite_output_dir" in msg and "another --output_dir" in msg
    moved.write_text(moved.read_text().replace("The answer is", "The answer is:", 1))
    with pytest.raises(RunError, match=r"--train_file: .*moved.jsonl"):
        pipeline.run(_cfg(tiny, out, train_file=str(moved), **kw))
    assert os.path.getmtime(out / "warmup" / "DONE") == done
    capsys.readouterr()
    # the CLI: one error line, exit status 2
    assert _exit_code(["--model_name_or_path", str(tiny / "sft"), "--train_file", str(tiny / "train.jsonl"),
                       "--eval_file", str(tiny / "eval.jsonl"), "--output_dir", str(out), "--stages", "warmup",
                       "--max_steps", "1", "--disable_tqdm", "--beta", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "allo-train: error: --output_dir" in err and "--beta: 0.1 -> 0.3" in err

    # one stage run on purpose is not refused: it says how its options differ
    pipeline.run_stage("warmup", _cfg(tiny, out, learning_rate=2e-2, **kw))
    assert "differ from the run saved" in capsys.readouterr().out

    # --overwrite_output_dir: the old outputs go, the stage runs again, the new options are saved
    (out / "notes.txt").write_text("mine")
    pipeline.run(_cfg(tiny, out, learning_rate=2e-2, overwrite_output_dir=True, **kw))
    assert "removed the earlier run's outputs" in capsys.readouterr().out
    assert json.loads((out / "allo_config.json").read_text())["options"]["learning_rate"] == 2e-2
    assert (out / "notes.txt").read_text() == "mine"  # not allo-train's: left alone
    assert not [n for n in os.listdir(out) if n.startswith(folders.TRASH_PREFIX)]
    pipeline.run(_cfg(tiny, out, learning_rate=2e-2, **kw))  # and now the same options again: skipped


def test_options_no_completed_stage_used_may_differ(tmp_path, tiny):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    cfg = _cfg(tiny, out)
    run_config.write(cfg, run_config.input_identities(cfg))
    other = _cfg(tiny, out, learning_rate=0.5)
    logs = []
    assert run_config.check(other, log=logs.append)[0] is None and "replace the saved ones" in logs[0]
    (out / "warmup").mkdir()
    (out / "warmup" / "DONE").write_text("{}")
    assert run_config.check(_cfg(tiny, out, eval_file=None), log=logs.append)[0] is None  # only eval uses it
    (out / "eval").mkdir()
    (out / "eval" / "DONE").write_text("{}")
    with pytest.raises(RunError, match=r"--eval_file: .*eval.jsonl .* -> None"):
        run_config.check(_cfg(tiny, out, eval_file=None))
    with pytest.raises(RunError, match="--learning_rate"):  # the completed warm-up used it
        run_config.check(other)
    # a run that goes through no stage made with the old value (--stages select) goes on, and says so
    logs.clear()
    saved, _ = run_config.check(_cfg(tiny, out, learning_rate=0.5, stages="select"), log=logs.append)
    assert saved is not None and "outside this run" in logs[0]
    # the built-in task's options change nothing when the pairs come from a file
    assert run_config.check(_cfg(tiny, out, task="compare"), log=logs.append)[0] is None


def test_generation_batch_size_is_compared_where_prepare_sampled(tmp_path):
    # prepare's samples depend on how the prompts are batched: a built-in run's completed prepare was made with it
    from allo.train.config import TrainConfig

    out = tmp_path / "run"
    (out / "prepare").mkdir(parents=True)
    (out / "prepare" / "DONE").write_text("{}")
    cfg = TrainConfig(output_dir=str(out))
    run_config.write(cfg, run_config.input_identities(cfg))
    with pytest.raises(RunError, match=r"--generation_batch_size: 256 -> 4"):
        run_config.check(TrainConfig(output_dir=str(out), generation_batch_size=4), log=lambda m: None)


def _other(v):
    return (not v) if isinstance(v, bool) else "x" if v is None else v + "x" if isinstance(v, str) else v + 1


def test_every_option_but_the_documented_few_is_compared_on_a_rerun():
    """Each option, changed alone, is a difference (its value, or for data files and the starting model their
    identity), except exactly the options that change where, how fast or how verbosely a run goes: a new
    option left out of the comparison by mistake (a data limit such as --max_prompt_length, --skip_bad_rows,
    --dtype) would let a run reuse stages made with another value, silently."""
    not_compared = {"output_dir", "overwrite_output_dir", "report_to", "run_name", "disable_tqdm", "logging_steps",
                    "save_steps", "save_total_limit", "resume_from_checkpoint", "stages", "per_device_eval_batch_size",
                    "gradient_checkpointing", "use_cpu", "attn_implementation", "trust_remote_code"}
    assert set(run_config.NOT_COMPARED) == not_compared
    cfg = TrainConfig()
    current = cfg.to_dict()
    inputs = run_config.input_identities(cfg)
    for name, old in current.items():
        diff = run_config.differences({"options": {**current, name: _other(old)}, "inputs": inputs}, cfg, inputs)
        assert list(diff) == ([] if name in not_compared or name in run_config.DATA_FILES + run_config.MODEL_PATHS
                              else [name]), name


def test_a_data_file_of_the_same_size_with_other_content_is_other_data(tmp_path):
    a = tmp_path / "train.jsonl"
    a.write_text('{"prompt": "1?", "chosen": "2.", "rejected": "3."}\n')
    cfg = TrainConfig(train_file=str(a))
    old = run_config.input_identities(cfg)
    a.write_text('{"prompt": "1?", "chosen": "2.", "rejected": "4."}\n')  # one digit: the same size
    diff = run_config.differences({"options": cfg.to_dict(), "inputs": old}, cfg, run_config.input_identities(cfg))
    assert list(diff) == ["train_file"]


_ALL = set(STAGES)
_FROM = {s: set(STAGES[STAGES.index(s):]) for s in STAGES}


@pytest.mark.parametrize("option, pairs_from, want", [
    # the stages an option changes: from the first that uses it on, through eval
    ("eval_file", "file", {"eval"}),
    ("eval_problems_file", "file", {"eval"}),
    ("improve_learning_rate", "file", _FROM["improve"]),
    ("eps", "file", _FROM["improve"]),
    ("negatives_file", "file", _FROM["forget"]),
    ("token_weight_source", "file", _FROM["forget"]),
    ("skip_forget", "file", _FROM["forget"]),
    ("improve_ratio", "file", _FROM["select"]),
    ("score_source", "file", _FROM["select"]),
    ("learning_rate", "file", _FROM["warmup"]),
    ("beta", "file", _FROM["warmup"]),
    ("max_length", "file", _FROM["warmup"]),         # prepare does not run for pairs from a file
    ("max_length", "builtin", _ALL),
    ("seed", "builtin", _ALL),
    ("answer_pattern", "file", {"eval"}),
    ("answer_pattern", "builtin", _ALL),
    ("temperature", "file", set()),                  # the built-in task's options: nothing, for pairs from a file
    ("temperature", "builtin", _ALL),
    ("temperature", "file+problems", _ALL),          # prepare samples the --problems_file's
    ("learning_rate", "reused", set()),              # the warm-up linked from --reuse_from was made by that run
    ("max_length", "reused", _FROM["select"]),
])
def test_an_option_changes_the_stages_from_the_first_that_uses_it_on(tmp_path, option, pairs_from, want):
    kw = {"file": dict(train_file="t.jsonl"), "builtin": {},
          "file+problems": dict(model_name_or_path="m", train_file="t.jsonl", problems_file="p.jsonl"),
          "reused": dict(reuse_from=str(tmp_path), reuse_stages="prepare, warmup")}[pairs_from]
    assert run_config._affected(TrainConfig(**kw), option) == want


def test_a_stale_completed_stage_is_refused_for_the_option_that_made_it(tmp_path):
    """A completed forget stage, then a run with other negatives: refused (forget would be reused as it is);
    with other held-out pairs only: eval has not completed, so the new value replaces the saved one."""
    negs = tmp_path / "negs.jsonl"
    negs.write_text('{"prompt": "1?", "response": "3."}\n')
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), train_file="t.jsonl", negatives_file=str(negs))
    for stage in ("warmup", "select", "forget"):
        os.makedirs(tmp_path / "out" / stage)
        (tmp_path / "out" / stage / "DONE").write_text("{}")
    run_config.write(cfg, run_config.input_identities(cfg))
    negs.write_text('{"prompt": "1?", "response": "4."}\n')
    with pytest.raises(RunError, match=r"--negatives_file: .*negs.jsonl"):
        run_config.check(cfg, log=lambda m: None)
    negs.write_text('{"prompt": "1?", "response": "3."}\n')
    for change in (dict(skip_forget=True), dict(forget_ratio=0.05), dict(max_prompt_length=8)):
        with pytest.raises(RunError, match="--" + next(iter(change))):
            run_config.check(dataclasses.replace(cfg, **change), log=lambda m: None)
    logs = []
    assert run_config.check(dataclasses.replace(cfg, eval_file="e.jsonl"),
                            log=logs.append)[0] is None
    assert "--eval_file: None -> 'e.jsonl'" in logs[0] and "replace the saved ones" in logs[0]


def test_one_stage_run_on_purpose_keeps_comparing_with_the_saved_options(tmp_path):
    """`allo-train STAGE` with other options is not refused but says so, and keeps the saved record (with
    --overwrite_output_dir too: the earlier stages it starts from were made with the saved options, which a
    later `allo-train run` must keep comparing with)."""
    out = tmp_path / "out"
    cfg = TrainConfig(output_dir=str(out), train_file="t.jsonl")
    for stage in ("warmup", "select"):
        os.makedirs(out / stage)
        (out / stage / "DONE").write_text("{}")
    run_config.write(cfg, run_config.input_identities(cfg))
    for overwrite in (False, True):
        other = dataclasses.replace(cfg, learning_rate=cfg.learning_rate * 2, overwrite_output_dir=overwrite)
        logs = []
        saved, _ = run_config.check(other, explicit_stage="select", log=logs.append)
        assert saved is not None and saved["options"]["learning_rate"] == cfg.learning_rate, overwrite
        assert len(logs) == 1 and "select: runs with options that differ" in logs[0] and "--learning_rate" in logs[0]
    with pytest.raises(RunError, match="--learning_rate"):
        run_config.check(dataclasses.replace(cfg, learning_rate=cfg.learning_rate * 2), log=lambda m: None)
    assert run_config.check(dataclasses.replace(cfg, learning_rate=1.0, overwrite_output_dir=True))[0] is None


def test_a_stage_made_by_a_one_stage_run_with_other_options_is_compared_by_what_it_recorded(tmp_path):
    """A run with --improve_ratio 0.1, then `allo-train select --improve_ratio 0.05`: select's DONE records
    0.05 and is newer than forget's and improve's. A later `allo-train run` with the saved 0.1 would reuse
    that selection (and train forget and improve on it), so it is refused, naming select; a run with 0.05
    makes forget and improve again (stale: select finished after them), so nothing it reuses was made with
    another value and its options replace the saved ones. A DONE without a record stands for the saved
    options."""
    out = tmp_path / "out"
    cfg = TrainConfig(output_dir=str(out), train_file="t.jsonl", improve_ratio=0.1)
    inputs = run_config.input_identities(cfg)
    other = dataclasses.replace(cfg, improve_ratio=0.05)
    made = {"warmup": cfg, "select": other, "forget": cfg, "improve": cfg}
    for when, stage in enumerate(("warmup", "forget", "improve", "select")):  # select: made last
        os.makedirs(out / stage)
        (out / stage / "DONE").write_text(json.dumps({"made_with": run_config.made_with(made[stage], inputs)}))
        os.utime(out / stage / "DONE", (1e9 + when, 1e9 + when))
    run_config.write(cfg, inputs)

    def check(c, **kw):
        stale = {s for s, what, _ in pipeline.stage_plan(c) if what == "stale"}
        return run_config.check(c, remade=stale, **kw)

    assert [(s, w) for s, w, _ in pipeline.stage_plan(cfg)] == [
        ("prepare", "not needed"), ("warmup", "reuse"), ("select", "reuse"), ("forget", "stale"),
        ("improve", "stale"), ("eval", "run")]
    with pytest.raises(RunError, match=r"--improve_ratio: 0.05 -> 0.1 \(made with another value: select\)"):
        check(cfg, log=lambda m: None)
    check(dataclasses.replace(cfg, stages="warmup"), log=lambda m: None)  # (select not in this run)
    logs = []
    assert check(other, log=logs.append)[0] is None
    assert "--improve_ratio: 0.1 -> 0.05" in logs[0] and "replace the saved ones" in logs[0]
    # without the stale stages made again (before stage_plan), forget and improve counted as reused
    with pytest.raises(RunError, match=r"made with another value: forget, improve"):
        run_config.check(other, log=lambda m: None)
    (out / "select" / "DONE").write_text("{}")
    check(cfg, log=lambda m: None)
    with pytest.raises(RunError, match=r"--improve_ratio: 0.1 -> 0.05 \(made with another value: select\)"):
        check(other, log=lambda m: None)


def test_after_a_stage_run_again_with_other_options_a_run_with_them_remakes_the_later_stages(tiny, tmp_path):  # noqa: F811
    """README: `allo-train warmup` with other options, then `allo-train run` with them runs the later stages
    again (they are stale); with the saved options the run is refused, naming warmup (it would reuse a
    warm-up made with the other learning rate)."""
    out = tmp_path / "run"
    kw = dict(max_steps=1, stages="warmup,select,forget,improve")
    pipeline.run(_cfg(tiny, out, **kw))
    pipeline.run_stage("warmup", _cfg(tiny, out, learning_rate=2e-2, **kw))
    with pytest.raises(RunError, match=r"--learning_rate: 0.02 -> 0.01 \(made with another value: warmup\)"):
        pipeline.run(_cfg(tiny, out, **kw))
    warmed = os.path.getmtime(out / "warmup" / "DONE")
    pipeline.run(_cfg(tiny, out, learning_rate=2e-2, **kw))
    for stage in ("select", "forget", "improve"):
        done = json.load(open(out / stage / "DONE"))
        assert os.path.getmtime(out / stage / "DONE") > warmed and done["made_with"]["options"]["learning_rate"] == 2e-2
    assert json.load(open(out / run_config.CONFIG_FILE))["options"]["learning_rate"] == 2e-2
    pipeline.run(_cfg(tiny, out, learning_rate=2e-2, **kw))  # and again: every stage reused


def test_python_api_values_that_json_saves_as_strings_compare_equal_on_a_rerun(tmp_path):
    import pathlib

    import numpy as np

    cfg = TrainConfig(output_dir=str(tmp_path / "out"), train_file="t.jsonl", max_steps=np.int64(3),
                      warmup_model_path=None, run_name=None)
    cfg = dataclasses.replace(cfg, output_dir=pathlib.Path(tmp_path / "out"))  # (not compared: no difference)
    os.makedirs(tmp_path / "out" / "warmup")
    inputs = run_config.input_identities(cfg)
    (tmp_path / "out" / "warmup" / "DONE").write_text(json.dumps({"made_with": run_config.made_with(cfg, inputs)},
                                                                default=str))
    run_config.write(cfg, inputs)
    run_config.check(cfg, log=lambda m: None)  # the identical rerun: not refused
    with pytest.raises(RunError, match="--max_steps: '3' -> 4"):
        run_config.check(dataclasses.replace(cfg, max_steps=4), log=lambda m: None)


def test_a_local_starting_model_is_known_by_its_weight_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x" * 8)
    cfg = TrainConfig(model_name_or_path=str(model))
    old = run_config.input_identities(cfg)
    assert old["model_name_or_path"]["weights"][0][:2] == ["model.safetensors", 8]
    (model / "model.safetensors").write_bytes(b"x" * 9)  # trained again in place
    diff = run_config.differences({"options": cfg.to_dict(), "inputs": old}, cfg, run_config.input_identities(cfg))
    assert list(diff) == ["model_name_or_path"]
    assert run_config.input_identities(TrainConfig(model_name_or_path="org/name"))["model_name_or_path"] == "org/name"


def test_overwrite_interrupted_part_way_leaves_the_saved_options_to_refuse_with(tmp_path, tiny, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    cfg = _cfg(tiny, out)
    for stage in ("warmup", "select"):
        (out / stage).mkdir(parents=True)
        (out / stage / "DONE").write_text("{}")
    run_config.write(cfg, run_config.input_identities(cfg))
    real, moved = os.rename, []

    def crash_after_one(src, dst):
        if moved:
            raise OSError("killed")
        moved.append(src)
        real(src, dst)

    monkeypatch.setattr(os, "rename", crash_after_one)
    with pytest.raises(OSError):
        run_config.remove_outputs(str(out), log=lambda m: None)
    monkeypatch.setattr(os, "rename", real)
    assert (out / "allo_config.json").exists() and not (out / "warmup").exists() and (out / "select").exists()
    with pytest.raises(RunError, match="--learning_rate"):  # still refused: the rest is not taken for a new run
        run_config.check(_cfg(tiny, out, learning_rate=0.5))
    run_config.remove_outputs(str(out), log=lambda m: None)  # the next overwrite finishes, leftovers included
    assert os.listdir(out) == []


def test_one_stage_with_overwrite_removes_that_stage_and_the_later_ones_only(tmp_path, tiny, capsys):  # noqa: F811
    # `allo-train select --overwrite_output_dir` removed the warmup stage select starts from, then failed
    out = tmp_path / "run"
    cfg = _cfg(tiny, out)
    for stage in ("warmup", "select", "forget", "eval"):
        (out / stage).mkdir(parents=True)
        (out / stage / "DONE").write_text("{}")
    (out / "report.md").write_text("old")
    run_config.write(cfg, run_config.input_identities(cfg))
    saved = (out / "allo_config.json").read_text()
    pipeline.make_context(_cfg(tiny, out, overwrite_output_dir=True, improve_ratio=0.2), stage="select")
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == ["allo_config.json", "warmup"]
    # the options the kept warm-up was made with stay saved (a later `run` compares with them)
    assert (out / "allo_config.json").read_text() == saved
    assert "the stages before `select` and allo_config.json are kept" in capsys.readouterr().out


def test_a_resumed_stage_says_which_checkpoint_it_picked_up(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    kw = dict(stages="warmup", max_steps=3, save_steps=2)

    def boom(stage, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run(_cfg(tiny, out, **kw), on_step_end=boom)
    capsys.readouterr()
    pipeline.run(_cfg(tiny, out, resume_from_checkpoint="true", **kw))
    assert "resuming warmup from checkpoint-2" in capsys.readouterr().out


# ------------------------------------------------------------------ 2, 5, 8. options refused at parse time
@pytest.mark.parametrize("argv, message", [
    (["--score_source", "gradient", "--score_batches", "0"], "--score_batches is 0; expected >= 1"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size is 0; expected >= 1"),
    (["--max_grad_norm", "-1"], "--max_grad_norm is -1.0; expected >= 0 (0: no clipping)"),
    (["--adam_epsilon=-1e-8"], "--adam_epsilon is -1e-08; expected >= 0"),
    (["--num_samples", "0"], "--num_samples is 0; expected >= 1"),
    (["--task", "foo"], "argument --task: invalid choice: 'foo'"),
    (["--lr_scheduler_type", "foo"], "not one of transformers' schedulers"),
    (["--lr_scheduler_type", "warmup_stable_decay"], "needs options allo-train does not pass"),
    (["--eval_steps", "10"], "unrecognized arguments: --eval_steps 10"),
    (["warmup", "--save_strategy", "steps"], "unrecognized arguments: --save_strategy steps"),
    (["--logging_dir", "x", "--max_steps", "2"], "unrecognized arguments: --logging_dir x"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["foo"], "invalid command 'foo'; choose from run, prepare"),
    # found before any stage, not after warm-up and select (forget's optimizer: "an empty parameter list")
    (["--exclude_ratio", "0.03"], "--forget_ratio is 0.03; expected more than --exclude_ratio (0.03)"),
    (["--improve_ratio", "0"], "--improve_ratio is 0.0; expected more than --exclude_ratio (0.0)"),
    # not in transformers' generate after prepare's SFT training
    (["--temperature", "0"], "--temperature is 0.0; expected > 0"),
    (["--temperature=-1"], "--temperature is -1.0; expected > 0"),
    (["--top_p", "1.5"], "--top_p is 1.5; expected a fraction in (0, 1]"),
    (["--top_p", "0"], "--top_p is 0.0; expected a fraction in (0, 1]"),
    # not in the forget stage, after warm-up and select
    (["--token_weight_source", "data"], "--token_weight_source data reads token_weights from a --negatives_file"),
])
def test_bad_options_are_one_error_line_after_a_one_line_usage_hint(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "allo-train --help" in lines[0], err
    assert lines[1].startswith("allo-train: error: ") and message in lines[1], err


@pytest.mark.parametrize("flags, message", [
    (dict(max_prompt_length=0), r"--max_prompt_length is 0; expected a positive number of tokens"),
    (dict(per_device_train_batch_size=0), r"--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1"),
    (dict(gradient_accumulation_steps=0), r"--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1"),
    (dict(warmup_steps=2.5), r"--warmup_steps is 2.5; expected a whole number of steps"),
    (dict(warmup_steps=-1), r"--warmup_steps is -1; expected a whole number of steps"),
    (dict(token_weight_source="reward_model_probs"), r"--token_weight_source reward_model_probs reads keep_probs from a "
                                                     r"--negatives_file"),
    (dict(dataset_config="main"), r"--dataset_config 'main' needs --dataset_name"),
    (dict(eval_models="sft,wamrup"), r"--eval_models names unknown model\(s\) \['wamrup'\]"),
    (dict(stages="warmup,slect"), r"--stages names unknown stage\(s\) \['slect'\]"),
    (dict(eps=1.5), r"--eps is 1.5; expected a fraction in \[0, 1\]"),
    (dict(implicit_token_fraction=-0.1), r"--implicit_token_fraction is -0.1; expected a fraction in \[0, 1\]"),
    (dict(warmup_ratio=1.5), r"--warmup_ratio is 1.5; expected a fraction in \[0, 1\]"),
    (dict(max_new_tokens=0), r"--max_new_tokens is 0; expected >= 1"),
    (dict(forget_learning_rate=-1e-5), r"--forget_learning_rate is -1e-05; expected >= 0"),
    (dict(sft_learning_rate=float("nan")), r"--sft_learning_rate is nan; expected >= 0"),
])
def test_option_values_that_cannot_make_a_run_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**flags).validate()


@pytest.mark.parametrize("flags", [
    dict(top_p=1.0), dict(max_length=1, max_prompt_length=1, max_completion_length=1), dict(warmup_steps=0.5),
    dict(warmup_steps=3.0), dict(eps=0.0, implicit_token_fraction=1.0, warmup_ratio=1.0, improve_ratio=1.0),
    dict(token_weight_source="reward_model_probs", skip_forget=True), dict(per_device_train_batch_size=1),
])
def test_option_values_at_the_edge_of_their_range_are_accepted(flags):
    TrainConfig(**flags).validate()


@pytest.mark.parametrize("flags, total, want", [
    (dict(warmup_ratio=0.25), 10, 2),           # the ratio rounds down (no warm-up step of learning rate 0)
    (dict(warmup_ratio=0.1), 9, 0),
    (dict(warmup_steps=0.25), 10, 3),           # a fraction rounds up, as transformers does
    (dict(warmup_steps=1), 10, 1),              # a whole number of steps, not a fraction of 1 (all of them)
    (dict(warmup_steps=3, warmup_ratio=0.5), 10, 3),  # overrides --warmup_ratio
])
def test_num_warmup_steps(flags, total, want):
    assert TrainConfig(**flags).num_warmup_steps(total) == want


def test_yaml_booleans_and_numbers_and_flags_over_them(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("skip_bad_rows: on\nbf16: false\ndisable_tqdm: '1'\nmax_prompt_length: 7\nwarmup_steps: 2\n"
                        "model_name_or_path: null\nrun_name: 12\n")
    _, cfg = parse(["--config", str(cfg_file), "--bf16", "--max_prompt_length", "9"])
    assert (cfg.skip_bad_rows, cfg.bf16, cfg.disable_tqdm) == (True, True, True)
    assert (cfg.max_prompt_length, cfg.warmup_steps, cfg.model_name_or_path, cfg.run_name) == (9, 2.0, None, "12")
    assert isinstance(cfg.warmup_steps, float)
    _, cfg = parse(["--config", str(cfg_file), "--skip_bad_rows", "off"])
    assert (cfg.skip_bad_rows, cfg.bf16, cfg.max_prompt_length) == (False, False, 7)


def test_a_flag_value_that_is_a_command_name_is_its_value_not_the_command():
    # --run_name eval: the run's name, and the command stays `run`; an unknown flag's value is no command either
    command, cfg = parse(["--run_name", "eval"])
    assert command == "run" and cfg.run_name == "eval"
    with pytest.raises(SystemExit):
        parse(["--eval_strategy", "eval"])


def test_the_command_may_come_anywhere_and_max_grad_norm_0_means_no_clipping():
    assert parse(["--max_steps", "3", "warmup"])[0] == "warmup"
    assert parse(["eval", "--max_steps=2"])[0] == "eval"
    assert parse(["--max_grad_norm", "0"])[1].max_grad_norm == 0


def test_ratios_a_stage_does_not_use_may_select_nothing():
    assert parse(["--skip_forget", "--forget_ratio", "0"])[1].forget_ratio == 0
    assert parse(["--selection", "none", "--improve_ratio", "0"])[1].improve_ratio == 0


def test_a_ratio_that_selects_no_element_of_the_model_stops_select_by_name():
    from allo.train.config import TrainConfig
    from allo.train.stages.select import _check_band

    shapes = {"a": (4, 5), "b": (10,)}  # 30 elements: round(0.03 x 30) = 1, round(0.01 x 30) = 0
    _check_band(TrainConfig(forget_ratio=0.03, exclude_ratio=0.01), shapes)
    with pytest.raises(RunError, match=r"--forget_ratio 0.01 with --exclude_ratio 0.0 selects no element of the "
                                       r"model's 30 .*raise --forget_ratio or lower --exclude_ratio"):
        _check_band(TrainConfig(forget_ratio=0.01), shapes)
    _check_band(TrainConfig(forget_ratio=0.01, skip_forget=True), shapes)  # no forget stage: nothing to train


def test_a_bare_boolean_flag_before_the_command_takes_no_value_from_it():
    command, cfg = parse(["--bf16", "warmup", "--max_steps", "2"])
    assert command == "warmup" and cfg.bf16 is True
    command, cfg = parse(["--disable_tqdm", "eval"])
    assert command == "eval" and cfg.disable_tqdm is True
    assert parse(["--bf16", "false", "eval"])[1].bf16 is False  # a value is still a value


def test_lr_schedulers_offered_are_transformers_own():
    from transformers.trainer_utils import SchedulerType

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}


def test_help_gives_each_default_once():
    parser = build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text
    for action in parser._actions:
        if action.help and action.help != "==SUPPRESS==":
            assert len(re.findall(r"\(default", action.help.replace("%(default)s", ""))) <= 1, action.option_strings
    assert "(default: 5e-05)" in " ".join(text.split())  # a default the text does not give is still shown


@pytest.mark.parametrize("where, says", [("file", "is a file"), ("under_file", "is a file, so no folder")])
def test_an_output_dir_that_is_or_is_under_a_file_is_refused_at_parse_time(tmp_path, capsys, where, says):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    path = str(a_file) if where == "file" else str(a_file / "x" / "y")
    with pytest.raises(SystemExit):
        parse(["--output_dir", path])
    assert f"--output_dir {path}: " in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_an_output_dir_that_cannot_be_created_names_the_option(tiny, capsys):  # noqa: F811
    assert _exit_code(["warmup", "--model_name_or_path", str(tiny / "sft"), "--train_file", str(tiny / "train.jsonl"),
                       "--output_dir", "/proc/nope", "--disable_tqdm"]) == 2
    err = capsys.readouterr().err
    assert "allo-train: error: --output_dir /proc/nope: cannot write there" in err and "Traceback" not in err


def test_a_hub_name_that_cannot_be_loaded_is_a_clean_error(tmp_path, monkeypatch, capsys):
    from allo.train import model as models

    def offline(path, options=None):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.\nCheck your internet connection")

    monkeypatch.setattr(models, "load_tokenizer", offline)
    assert _exit_code(["--model_name_or_path", "nonexistent-model-xyz", "--output_dir", str(tmp_path / "out"),
                       "--disable_tqdm"]) == 2
    err = capsys.readouterr().err
    assert "--model_name_or_path nonexistent-model-xyz: not a local folder" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_built_in_run_whose_model_samples_no_pair_says_to_raise_sft_steps(tmp_path, capsys):
    # an untrained built-in model: every sample is wrong, so no problem has a correct and a wrong one
    rc = _exit_code(["prepare", "--sft_steps", "0", "--num_sft_problems", "1", "--num_train_problems", "3",
                     "--num_eval_problems", "2", "--num_samples", "2", "--max_new_tokens", "4",
                     "--model_hidden_size", "16", "--model_num_layers", "1", "--output_dir", str(tmp_path / "out"),
                     "--disable_tqdm", "--report_to", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "no problem had both a correct and a wrong sample" in err and "raise --sft_steps" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------ 3. no held-out data
def test_without_held_out_data_eval_says_so_and_the_report_is_well_formed(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert pipeline.run(_cfg(tiny, out, stages="eval", eval_file=None, eval_problems_file=None)) == {}
    printed = capsys.readouterr().out
    assert "no held-out pairs: pass --eval_file to evaluate" in printed and "None" not in printed
    assert "no held-out pairs: pass --eval_file" in (out / "report.md").read_text()
    assert not (out / "eval" / "sft.json").exists()


def test_report_tables_have_as_many_cells_in_every_line():
    from allo.train.report import format_table

    for results in ({"sft": {}}, {"sft": {"eval_loss": 0.5}, "warmup": {}},
                    {"sft": {"eval_answer_accuracy": 0.1, "eval_loss": 0.7}}):
        lines = format_table(results).splitlines()
        assert len({line.count("|") for line in lines}) == 1, lines
        assert len(lines) == 2 + len(results)


# ------------------------------------------------------------------ 6, 7. data files checked up front
@pytest.mark.parametrize("flag, text, says", [
    ("--eval_file", '[{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}]',
     "--eval_file {path}: row 2: field 'rejected': missing"),
    ("--negatives_file", '{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', "--negatives_file {path}:2: field 'response': missing"),
    ("--eval_problems_file", '{"prompt": "a", "answer": ""}\n', "--eval_problems_file {path}:1: field 'answer'"),
    ("--eval_file", None, "--eval_file {path}: no such file"),
])
def test_every_data_file_is_checked_before_any_stage_runs(tiny, tmp_path, capsys, flag, text, says):  # noqa: F811
    path = tmp_path / ("data.json" if text and text.startswith("[") else "data.jsonl")
    if text is not None:
        path.write_text(text)
    out = tmp_path / "out"
    assert _exit_code(["--model_name_or_path", str(tiny / "sft"), "--train_file", str(tiny / "train.jsonl"),
                       flag, str(path), "--output_dir", str(out), "--disable_tqdm", "--report_to", "none"]) == 2
    err = capsys.readouterr().err
    assert says.format(path=path) in err and "Traceback" not in err, err
    assert not out.exists()  # before any stage (and before the folder is made)


def test_json_items_are_numbered_from_1_like_jsonl_lines(tmp_path):
    from allo.train.tokenizer import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    rows = [{"prompt": "1+1?", "chosen": "2", "rejected": "3"}, {"prompt": "1+2?", "chosen": 3, "rejected": "4"}]
    as_json, as_jsonl = tmp_path / "p.json", tmp_path / "p.jsonl"
    as_json.write_text(json.dumps(rows))
    as_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(D.BadRowError, match=r"p\.json: row 2: field 'chosen'"):
        D.load_pairs(str(as_json), tok)
    with pytest.raises(D.BadRowError, match=r"p\.jsonl:2: field 'chosen'"):
        D.load_pairs(str(as_jsonl), tok)


def test_a_tilde_in_a_yaml_path_option_is_expanded_where_it_is_used(tiny, tmp_path, monkeypatch):  # noqa: F811
    # the shell expands ~ on the command line, not in a --config file: validate() does it, for every stage
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(tiny / "sft", home / "sft")
    shutil.copy(tiny / "train.jsonl", home / "train.jsonl")
    monkeypatch.setenv("HOME", str(home))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model_name_or_path: ~/sft\ntrain_file: ~/train.jsonl\noutput_dir: ~/out\n")
    _, cfg = parse(["--config", str(yaml_file)])
    assert (cfg.model_name_or_path, cfg.train_file, cfg.output_dir) == (
        str(home / "sft"), str(home / "train.jsonl"), str(home / "out"))
    pipeline.check_data_files(cfg)  # found, where before it was "no such file"


_CHAT = {"prompt": [{"role": "user", "content": "1+1?"}], "rejected": [{"role": "assistant", "content": "3"}]}


@pytest.mark.parametrize("name, content, kind, says", [
    ("latin1.jsonl", b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n', "pairs",
     r"latin1\.jsonl:1: not UTF-8 text: byte 0xe9 at column 16; save the file as UTF-8"),
    ("latin1.json", b'[{"prompt": "a", "chosen": "a", "rejected": "b"},\n {"prompt": "caf\xe9"}]', "pairs",
     r"latin1\.json:2: not UTF-8 text: byte 0xe9 at column 17"),
    ("null.jsonl", json.dumps({**_CHAT, "chosen": [{"role": "assistant", "content": None}]}).encode(), "pairs",
     r"null\.jsonl:1: field 'chosen': message 1: 'content' is null; expected a string"),
    ("int.jsonl", json.dumps({**_CHAT, "chosen": [{"role": "assistant", "content": 5}]}).encode(), "pairs",
     r"int\.jsonl:1: field 'chosen': message 1: 'content' is int; expected a string"),
    ("neg.jsonl", b'{"prompt": "a", "answer": "b"}\n', "negatives", r"neg\.jsonl:1: field 'response': missing"),
])
def test_bad_bytes_and_chat_contents_are_named_rows_not_tracebacks(tmp_path, name, content, kind, says):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(D.BadRowError, match=says):
        D.check_source(str(path), kind)


def test_a_parquet_file_without_pyarrow_is_a_named_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    # pyarrow comes with `datasets` (allo[data]), not with allo: a base install reading Parquet
    import sys

    (tmp_path / "pairs.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # (import then raises ImportError)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(D.DataError, match=r"pairs\.parquet: reading Parquet needs pyarrow: `pip install pyarrow`"):
        D.read_rows(str(tmp_path / "pairs.parquet"))
    assert _exit_code(["--train_file", str(tmp_path / "pairs.parquet"), "--output_dir", str(tmp_path / "out")]) == 2
    assert "--train_file" in capsys.readouterr().err


def test_a_byte_order_mark_is_read_and_a_folder_named_like_a_data_file_is_said_to_be_one(tmp_path):
    row = {"prompt": "a", "chosen": "b", "rejected": "c"}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([row]).encode())
    for name in ("bom.jsonl", "bom.json"):
        assert D.read_rows(str(tmp_path / name))[0][1] == row
    (tmp_path / "x.jsonl").mkdir()
    with pytest.raises(D.DataError, match=r"x\.jsonl: is a directory; expected a \.jsonl, \.json or \.parquet file"):
        D.check_source(str(tmp_path / "x.jsonl"), "pairs")
    # a line that is not UTF-8 is a bad row like any other: --skip_bad_rows skips and counts it
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(json.dumps(row).encode() + b'\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    assert D.check_source(str(mixed), "pairs", skip_bad_rows=True).skipped == 1


@pytest.mark.parametrize("case, says", [
    # a row eval would fail to tokenize: found before the first stage, not after all the training
    ("eval_too_long", "--eval_file {path}:2: field 'chosen': nothing of the response is left after truncating to "
                      "max_length=64"),
    # fewer pairs than one batch: before the warm-up's reference pass, with both numbers and the options
    ("five_pairs", "warmup: the training pairs of --train_file: 5 examples are fewer than one global batch of 16 "
                   "(--per_device_train_batch_size 16 x --gradient_accumulation_steps 1 x 1 process)"),
])
def test_rows_are_tokenized_and_counted_before_any_stage_runs(tiny, tmp_path, capsys, case, says):  # noqa: F811
    rows = (tiny / "train.jsonl").read_text().splitlines()
    path = tmp_path / "data.jsonl"
    train, evalf, extra = tiny / "train.jsonl", tiny / "eval.jsonl", ["--max_length", "64"]
    if case == "eval_too_long":
        path.write_text(rows[0] + "\n" + json.dumps({"prompt": "x" * 100, "chosen": "a", "rejected": "b"}) + "\n")
        evalf = path
    else:
        path.write_text("\n".join(rows[:5]) + "\n")
        train, extra = path, ["warmup"]
    out = tmp_path / "out"
    assert _exit_code(["--model_name_or_path", str(tiny / "sft"), "--train_file", str(train), "--eval_file",
                       str(evalf), "--output_dir", str(out), "--disable_tqdm", "--report_to", "none", *extra]) == 2
    err = capsys.readouterr().err
    assert says.format(path=path) in err and "Traceback" not in err, err
    assert not out.exists()


def test_auto_token_weights_are_decided_from_the_rows_the_loader_keeps(tmp_path):
    from allo.train.config import TrainConfig
    from allo.train.stages.common import negatives_weight_field

    negs = tmp_path / "negs.jsonl"
    # the first row is bad (no prompt): with --skip_bad_rows its lack of token_weights must not decide
    negs.write_text(json.dumps({"response": "a"}) + "\n"
                    + json.dumps({"prompt": "q", "response": "a", "token_weights": [1.0]}) + "\n")
    assert negatives_weight_field(TrainConfig(negatives_file=str(negs), skip_bad_rows=True)) == "token_weights"
    negs.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    assert negatives_weight_field(TrainConfig(negatives_file=str(negs))) is None
    assert negatives_weight_field(TrainConfig(negatives_file=str(negs), token_weight_source="data")) == "token_weights"


def test_every_loader_gets_the_runs_row_limits():
    from allo.train.stages.common import row_limits

    cfg = TrainConfig(max_length=17, max_prompt_length=5, max_completion_length=9, skip_bad_rows=True)
    assert row_limits(cfg) == dict(max_length=17, max_prompt_length=5, max_completion_length=9, skip_bad_rows=True)
    assert row_limits(TrainConfig())["skip_bad_rows"] is False


def test_auto_token_weights_when_any_usable_row_carries_them(tmp_path):
    from allo.train.stages.common import negatives_weight_field

    negs = tmp_path / "negs.jsonl"
    negs.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n"
                    + json.dumps({"prompt": "q", "response": "b", "token_weights": [1.0]}) + "\n")
    assert negatives_weight_field(TrainConfig(negatives_file=str(negs))) == "token_weights"
    assert negatives_weight_field(TrainConfig(negatives_file=str(negs), token_weight_source="implicit_reward")) is None
    assert negatives_weight_field(TrainConfig(negatives_file=str(negs), token_weight_source="reward_model_probs")) \
        == "keep_probs"
    assert negatives_weight_field(TrainConfig()) is None  # no file: the warm-up model's implicit weights
    # a bad row's token_weights decide nothing (with --skip_bad_rows it is skipped, its weights with it)
    negs.write_text(json.dumps({"response": "a", "token_weights": [1.0]}) + "\n"
                    + json.dumps({"prompt": "q", "response": "b"}) + "\n")
    assert negatives_weight_field(TrainConfig(negatives_file=str(negs), skip_bad_rows=True)) is None


def test_a_stage_that_cannot_run_with_these_options_says_so_before_it_starts(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    base = ["--model_name_or_path", str(tiny / "sft"), "--train_file", str(tiny / "train.jsonl"), "--output_dir",
            str(out), "--disable_tqdm", "--report_to", "none", "--per_device_train_batch_size", "4"]
    assert _exit_code(["prepare", *base]) == 2
    err = capsys.readouterr().err
    assert "allo-train: error: `prepare` with --model_name_or_path needs --problems_file" in err
    assert "Traceback" not in err and not out.exists()
    # the masks of a 'top' selection, then forget asked to train a 'random' one
    (out / "select").mkdir(parents=True)
    (out / "select" / "DONE").write_text(json.dumps({"selection": "top"}))
    assert _exit_code(["forget", *base, "--selection", "random"]) == 2
    err = capsys.readouterr().err
    assert "holds a 'top' selection but --selection is 'random'; run `allo-train select`" in err
    assert "Traceback" not in err and not (out / "forget").exists()
    # a forget stage skipped by an earlier run, then improve asked to start from its (missing) model
    (out / "select" / "DONE").write_text(json.dumps({"selection": "random"}))
    (out / "forget" / "model").mkdir(parents=True)
    (out / "forget" / "DONE").write_text(json.dumps({"skipped": True}))
    assert _exit_code(["improve", *base, "--selection", "random"]) == 2
    err = capsys.readouterr().err
    assert "was skipped (--skip_forget) but --skip_forget is not set now: run `allo-train forget` first" in err, err
    assert "Traceback" not in err and not (out / "improve" / "DONE").exists()


def test_a_tokenizer_without_an_end_of_sequence_token_is_refused_when_loaded(tiny, tmp_path, capsys):  # noqa: F811
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny / "sft", folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.eos_token = None
    tok.pad_token = "<pad>"
    tok.save_pretrained(folder)
    out = tmp_path / "out"
    assert _exit_code(["warmup", "--model_name_or_path", str(folder), "--train_file", str(tiny / "train.jsonl"),
                       "--output_dir", str(out), "--disable_tqdm", "--report_to", "none"]) == 2
    err = capsys.readouterr().err
    assert f"--model_name_or_path {folder}: its tokenizer has no end-of-sequence token" in err, err
    assert "Traceback" not in err and not out.exists()
