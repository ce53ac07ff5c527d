"""The options a run was made with, saved in ``<output_dir>/allo_config.json`` (as TRL saves its
training arguments), so that a later run into the same folder cannot silently reuse results made with
other options or other data.

``allo_config.json`` holds every option (``options``) and the identity of every data file and local
starting model (``inputs``: path, size, modification time and, for data files, a SHA-256 of the
content). A run that finds one compares it with its own options: any difference in an option that
changes results (every option but those in :data:`NOT_COMPARED`) or in a data file's content is refused,
naming each difference (old -> new); ``--overwrite_output_dir`` removes the earlier run's outputs first.
Only differences that a completed stage of this run (``--stages``) was made with are refused (USED_BY:
``--eval_file`` changes eval, ``--improve_ratio`` select and after, the built-in task's options nothing
when the pairs come from a file): when no completed stage was made with an old value, the new options
replace the saved ones; when only stages outside ``--stages`` were, the run goes on and says so.

``allo-train <stage>`` (one stage, run on purpose, e.g. again with other options) is not refused: it
writes the file only if there is none, and says in the log which of its options differ from the saved
ones. What a stage was made with is what it recorded in its DONE (``made_with``: the options and
inputs of the run that completed it), else the saved ones: so a later ``allo-train run`` that would
reuse a stage made by such a one-stage run with other options is refused too, naming the stage.
"""

from __future__ import annotations

import hashlib
import json
import os

from allo._atomic import atomic_path

from . import folders
from .config import STAGES, RunError, TrainConfig

CONFIG_FILE = "allo_config.json"
# options that change where, how fast or how verbosely a run goes, or which stages it goes through,
# not what its stages compute: a run may change them and still use the completed stages
# (generation_batch_size is compared: prepare's sampled responses depend on how the prompts are batched,
# each generate call drawing its batch's random numbers together)
NOT_COMPARED = ("output_dir", "overwrite_output_dir", "report_to", "run_name", "disable_tqdm", "logging_steps",
                "save_steps", "save_total_limit", "resume_from_checkpoint", "stages", "per_device_eval_batch_size", "gradient_checkpointing", "use_cpu", "attn_implementation",
                "trust_remote_code")
# the stages that use an option (any other option: every stage). A difference matters to the stages
# from the first of them on (they take its output), and not at all when none of them runs (the built-in
# task's options when the pairs come from --train_file, say)
_BUILTIN = ("sft_steps", "sft_learning_rate", "model_hidden_size", "model_num_layers", "num_sft_problems",
            "num_train_problems", "num_eval_problems", "num_samples", "max_pairs_per_problem", "temperature",
            "top_p", "task", "problems_file", "generation_batch_size")
USED_BY = {**dict.fromkeys(("eval_file", "eval_problems_file", "dataset_test_split", "eval_models"), ("eval",)),
           **dict.fromkeys(("max_new_tokens", "answer_pattern"), ("prepare", "eval")),
           **dict.fromkeys(_BUILTIN, ("prepare",)),
           **dict.fromkeys(("improve_learning_rate", "key_tokens", "eps"), ("improve",)),
           **dict.fromkeys(("forget_learning_rate", "negatives_file", "token_weight_source", "raw_reward_probs",
                            "implicit_token_fraction"), ("forget",)),
           "skip_forget": ("forget", "improve"),
           **dict.fromkeys(("score_source", "score_batches", "selection", "forget_ratio", "improve_ratio",
                            "exclude_ratio"), ("select",)),
           **dict.fromkeys(("learning_rate", "warmup_model_path"), ("warmup",)),
           **dict.fromkeys(("beta", "loss_type", "label_smoothing"), ("warmup", "select", "forget", "improve", "eval"))}
DATA_FILES = ("train_file", "eval_file", "negatives_file", "problems_file", "eval_problems_file")
MODEL_PATHS = ("model_name_or_path",)
# what allo-train writes directly in --output_dir (what --overwrite_output_dir removes)
OUTPUTS = STAGES + ("report.md", "training_curves.png", "eval_metrics.png")


def _file_identity(path: str) -> dict:
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def _model_identity(path: str) -> dict | str:
    """A local model folder by its weight files (name, size, modification time); a hub name by itself."""
    local = os.path.expanduser(path)
    if not os.path.isdir(local):
        return path
    return {"path": os.path.abspath(local),
            "weights": sorted([f, st.st_size, st.st_mtime_ns] for f in os.listdir(local)
                              if f.endswith((".safetensors", ".bin")) for st in [os.stat(os.path.join(local, f))])}


def input_identities(cfg: TrainConfig) -> dict:
    """The data files by their content, the starting model by its weight files (a hub or dataset name,
    or None, by itself): compared in place of the options' values, so that the same data at another
    path is the same run, and other data at the same path is not."""
    out = {}
    for name in DATA_FILES:
        path = getattr(cfg, name)
        out[name] = _file_identity(path) if path is not None and os.path.isfile(path) else path
    for name in MODEL_PATHS:
        path = getattr(cfg, name)
        out[name] = None if path is None else _model_identity(path)
    return out


def _same_input(old, new) -> bool:
    if isinstance(old, dict) and isinstance(new, dict) and "sha256" in old and "sha256" in new:
        return old["size"] == new["size"] and old["sha256"] == new["sha256"]  # moved or touched: the same data
    return old == new


def _describe(v) -> str:
    if isinstance(v, dict) and "sha256" in v:
        return f"{v['path']} ({v['size']} bytes, sha256 {v['sha256'][:12]})"
    if isinstance(v, dict):
        return f"{v.get('path')} (weights {v.get('weights')})"
    return repr(v)


def differences(saved: dict, cfg: TrainConfig, inputs: dict) -> dict[str, str]:
    """{option: "--option: old -> new"} for every compared option and input that differs from ``saved``."""
    # (this run's values as the JSON file holds them: a Python-API value such as numpy's int64 or a
    # pathlib.Path is saved as its string, and must compare equal to itself on a rerun)
    old_opts, new_opts = saved.get("options", {}), json.loads(json.dumps(cfg.to_dict(), default=str))
    diff = {k: f"--{k}: {old_opts.get(k)!r} -> {new_opts[k]!r}" for k in new_opts
            if k not in NOT_COMPARED + DATA_FILES + MODEL_PATHS and k in old_opts and old_opts[k] != new_opts[k]}
    old_inputs = saved.get("inputs", {})
    for k in sorted(set(old_inputs) & set(inputs)):
        if not _same_input(old_inputs[k], inputs[k]):
            diff[k] = f"--{k}: {_describe(old_inputs[k])} -> {_describe(inputs[k])}"
    return diff


def read_saved(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: cannot be read ({e}); pass --overwrite_output_dir to start over in {output_dir}, "
                       "or use another --output_dir") from None
    return saved if isinstance(saved, dict) else {}


def check(cfg: TrainConfig, *, explicit_stage: str | None = None, log=print,
          remade=frozenset()) -> tuple[dict | None, dict]:
    """(the saved record or None, this run's input identities). Raises RunError when ``cfg`` differs from
    the saved options in anything that changes results (``run``, not ``--overwrite_output_dir``).
    ``remade``: completed stages this run makes again from the start (stale ones, see
    ``pipeline.stage_plan``): what they were made with does not matter. Reads only: every process may call it."""
    inputs = input_identities(cfg)
    if cfg.overwrite_output_dir and explicit_stage is None:  # (one stage keeps the stages before it: see remove_outputs)
        return None, inputs
    saved = read_saved(cfg.output_dir)
    if saved is None:
        return None, inputs
    diff = differences(saved, cfg, inputs)
    holding = stages_holding_results(cfg.output_dir)
    # completed stages made with another value than this run's, per option: by the options and inputs each
    # stage recorded in its DONE (a stage run on purpose with other options, or a run whose options
    # replaced none of the saved ones), else the saved ones
    made_with_old, texts = {}, dict(diff)
    for stage in holding - set(remade):
        made = _made_with(cfg.output_dir, stage)
        for k, text in (diff if made is None else differences(made, cfg, inputs)).items():
            if stage in _affected(cfg, k):
                made_with_old.setdefault(k, set()).add(stage)
                texts[k] = texts.get(k, text)
    this_run = set(cfg.stage_list()) if explicit_stage is None else set()
    refused = [f"{texts[k]} (made with another value: {', '.join(s for s in STAGES if s in stages)})"
               for k, stages in made_with_old.items() if stages & this_run]
    if diff and not any(made_with_old.values()):
        log(f"{CONFIG_FILE}: this run's options differ from the saved ones only where no completed stage used them "
            "(" + "; ".join(diff.values()) + "): they replace the saved ones")
        return None, inputs
    if refused:
        raise RunError(f"--output_dir {cfg.output_dir} holds a run made with other options or data "
                       f"({os.path.join(cfg.output_dir, CONFIG_FILE)}); its completed stages would be reused as they "
                       "are. Differences (made with -> now): " + "; ".join(refused) + ". Pass --overwrite_output_dir to "
                       "start over in that folder (`allo-train STAGE --overwrite_output_dir`: from that stage on, "
                       "the stages before it kept), or use another --output_dir")
    if diff:
        who = explicit_stage or f"stages {','.join(cfg.stage_list())}"
        log(f"{who}: runs with options that differ from the run saved in {CONFIG_FILE} ("
            + "; ".join(diff.values()) + "), which completed stages outside this run were made with; "
            "its stages record what they are made with, and a later `allo-train run` that would reuse them "
            "compares with that")
    return saved, inputs


def made_with(cfg: TrainConfig, inputs: dict) -> dict:
    """What a stage records in its DONE: the options and inputs it was made with (see :func:`check`)."""
    return {"options": cfg.to_dict(), "inputs": inputs}


def _made_with(output_dir: str, stage: str) -> dict | None:
    """The options and inputs ``stage``'s DONE recorded, or None (an older DONE, a checkpoint, or a DONE
    that cannot be read: then the saved options stand for them)."""
    from .stages.common import done_info

    try:
        record = done_info(os.path.join(output_dir, stage)).get("made_with")
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


def _affected(cfg: TrainConfig, option: str) -> set[str]:
    """The stages whose results ``option`` changes: from the first stage that uses it on (prepare only
    runs for the built-in task or a --problems_file; a stage linked from --reuse_from was made by that
    run, with its options)."""
    reused = {s.strip() for s in cfg.reuse_stages.split(",")} if cfg.reuse_from else set()
    users = [s for s in USED_BY.get(option, STAGES)
             if (s != "prepare" or not (cfg.train_file or cfg.dataset_name) or cfg.problems_file) and s not in reused]
    return set(STAGES[min(STAGES.index(s) for s in users):]) if users else set()


def stages_holding_results(output_dir: str) -> set[str]:
    """The stages in ``output_dir`` that completed (DONE) or saved a complete checkpoint: what a run would
    reuse (a checkpoint-N.tmp that a kill cut short, or a checkpoint being deleted, is no result)."""
    from .loop import latest_checkpoint

    out = set()
    for stage in STAGES:
        d = os.path.join(output_dir, stage)
        if os.path.exists(os.path.join(d, "DONE")) or latest_checkpoint(d) is not None:
            out.add(stage)
    return out


def write(cfg: TrainConfig, inputs: dict) -> None:
    from .. import __version__ as version

    record = {"allo_version": version, **made_with(cfg, inputs), "not_compared": list(NOT_COMPARED)}
    with atomic_path(os.path.join(cfg.output_dir, CONFIG_FILE), what="allo-train") as tmp, \
            open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=str)


def remove_outputs(output_dir: str, log=print, *, from_stage: str | None = None) -> None:
    """Remove what allo-train wrote in ``output_dir`` (the stage folders, reports, plots and
    allo_config.json; other files are left). ``from_stage`` (one stage run on purpose): only that stage's
    folder, the later stages' and the reports; the earlier stages it starts from stay, and so does
    allo_config.json, the options they were made with. Each is first moved aside under a trash name
    (:mod:`.folders`; a rename is atomic), allo_config.json last: a crash part-way leaves the saved
    options with what is left, so a later run still compares against them (and a run with the new
    options is still refused) and never takes the rest for a complete run of other options. What was
    moved aside is deleted last (and what a crash left, on the next overwrite)."""
    if not os.path.isdir(output_dir):
        return
    names = OUTPUTS + (CONFIG_FILE,) if from_stage is None else STAGES[STAGES.index(from_stage):] + OUTPUTS[len(STAGES):]
    present = [n for n in names if os.path.lexists(os.path.join(output_dir, n))]
    for name in present:  # CONFIG_FILE is last in OUTPUTS + (CONFIG_FILE,)
        folders.move_aside(os.path.join(output_dir, name))
    if present:
        kept = "" if from_stage is None else f"; the stages before `{from_stage}` and {CONFIG_FILE} are kept"
        log(f"--overwrite_output_dir: removed the earlier run's outputs in {output_dir} ({', '.join(present)}{kept})")
    folders.remove_leftovers(output_dir)  # (a stage linked from --reuse_from: the link, not the other run's folder)
