"""Python API: the pipeline without the CLI (benchmarks and ablations call this).

    from allo.train import TrainConfig, pipeline
    metrics = pipeline.run(TrainConfig(output_dir="runs/allo", seed=1))
    # {"sft": {"eval_answer_accuracy": ..., "eval_rewards/accuracies": ...}, "warmup": {...}, "forget": ..., "improve": ...}
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time

from .config import STAGES, RunError, TrainConfig
from .stages import STAGE_FUNCS, Context, finished_at, is_done
from .stages.common import DONE
from .stages.prepare import PREPARE_NEEDS_PROBLEMS


def _config(config) -> TrainConfig:
    if isinstance(config, dict):
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; see `allo-train --help`")
        config = TrainConfig(**config)
    return config.validate()


def _set_cpu_threads() -> None:
    # Tiny models gain little from intra-op threads, and on a shared CPU torch's default (one per
    # core) oversubscribes it: OpenMP threads spin-wait on each other and a step gets many times
    # slower. Use half the cores unless the user chose (OMP_NUM_THREADS) or a GPU does the work.
    import torch

    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


_DATA_KINDS = {"train_file": "pairs", "eval_file": "pairs", "negatives_file": "negatives", "problems_file": "problems",
               "eval_problems_file": "problems"}


def check_data_files(cfg: TrainConfig) -> None:
    """Every data file given is read and its rows checked (fields, not tokens) before any stage runs: a
    missing or malformed file is found now, not when its stage starts after minutes of training."""
    from .data import check_source

    for name, kind in _DATA_KINDS.items():
        path = getattr(cfg, name)
        if path is None:
            continue
        with _naming(name, path):
            check_source(path, kind, skip_bad_rows=cfg.skip_bad_rows)


@contextlib.contextmanager
def _naming(option: str, path: str):
    """A data error re-raised as the same error, saying which option gave the file."""
    from .data import DataError

    try:
        yield
    except (DataError, FileNotFoundError) as e:
        msg = str(e)
        raise type(e)(f"--{option} {msg}" if msg.startswith(path) else f"--{option} {path}: {msg}") from None


def check_tokenized_data(ctx: Context, stages) -> None:
    """The data files' rows tokenized as the stages will (once the tokenizer is there, before any stage
    runs): a row that truncation leaves without a response, or token_weights of the wrong length, stop
    the run now, not in its stage (eval's after all the training). Then the pairs and negatives of the
    trained ``stages`` must fill a global batch (loop.check_global_batch). Local files only: a dataset
    (and the built-in task's data, made by prepare) is checked by each stage before its reference pass."""
    from . import data as D
    from .loop import check_global_batch
    from .stages.common import negatives_weight_field, row_limits, tokenized, trained_stages

    cfg = ctx.cfg
    limits = row_limits(cfg)
    counts = {}
    for name in ("train_file", "eval_file"):
        path = getattr(cfg, name)
        if path is not None:
            with _naming(name, path):
                pairs, _ = tokenized(ctx, D.load_pairs, path, **limits)  # (the stages reuse it)
            if name == "train_file":
                counts["training pairs"] = ("train_file", len(pairs))
                # the negatives by default (stages.common.load_negatives)
                counts["negatives"] = ("train_file", len(D.rejected_negatives(pairs)))
    if cfg.negatives_file is not None:
        with _naming("negatives_file", cfg.negatives_file):
            negs, _ = tokenized(ctx, D.load_negatives, cfg.negatives_file, weight_field=negatives_weight_field(cfg),
                                **limits)
        counts["negatives"] = ("negatives_file", len(negs))
    for stage in trained_stages(cfg, stages):
        what = "negatives" if stage == "forget" else "training pairs"
        if what in counts:
            option, n = counts[what]
            check_global_batch(n, cfg, ctx.accelerator.num_processes, f"{stage}: the {what} of --{option}")


def _load_tokenizer(cfg: TrainConfig):
    from .model import load_tokenizer

    try:
        return load_tokenizer(cfg.model_name_or_path, cfg.load_options())
    except OSError as e:
        name = cfg.model_name_or_path
        if name is None or os.path.isdir(os.path.expanduser(name)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"--model_name_or_path {name}: not a local folder, and transformers could not load it as a "
                       f"Hugging Face Hub model ({first}); give a local model folder (with config.json and tokenizer "
                       "files) or a hub name that exists (offline, HF_HUB_OFFLINE=1: one already in the Hugging Face "
                       "cache)") from None


def _prepare_output_dir(ctx: Context, stage: str | None) -> None:
    """The saved options of an earlier run compared with these (run_config), --overwrite_output_dir, the
    folder created and this run's options saved in it when it has none. Every process compares (reading
    only) before the main process changes anything."""
    from . import run_config

    cfg = ctx.cfg
    # stages a run will make again from the start (stale) are not reused: what they were made with is moot
    stale = set() if stage is not None else {s for s, what, _ in stage_plan(cfg) if what == "stale"}
    saved, inputs = run_config.check(cfg, explicit_stage=stage, log=ctx.log, remade=stale)
    ctx.inputs = inputs
    ctx.accelerator.wait_for_everyone()
    if ctx.main:
        try:
            if cfg.overwrite_output_dir:
                run_config.remove_outputs(cfg.output_dir, log=ctx.log, from_stage=stage)
            os.makedirs(cfg.output_dir, exist_ok=True)
            if saved is None:
                run_config.write(cfg, inputs)
        except OSError as e:
            raise RunError(f"--output_dir {cfg.output_dir}: cannot write there ({e.strerror or e}"
                           f"{': ' + e.filename if e.filename else ''}); give a folder you can write to") from None
    ctx.accelerator.wait_for_everyone()


def make_context(config, accelerator=None, *, stage: str | None = None) -> Context:
    """The run's context: options checked, data files checked, the output folder prepared (see
    _prepare_output_dir; ``stage``: one stage run on purpose, which other options do not stop), the
    tokenizer loaded."""
    from accelerate import Accelerator

    cfg = _config(config)
    check_data_files(cfg)
    _set_cpu_threads()
    if cfg.disable_tqdm:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    if accelerator is None:
        accelerator = Accelerator(cpu=cfg.use_cpu, mixed_precision="bf16" if cfg.bf16 else "no")
    tokenizer = _load_tokenizer(cfg)
    ctx = Context(cfg, accelerator, tokenizer)
    check_tokenized_data(ctx, cfg.stage_list() if stage is None else [stage])
    _prepare_output_dir(ctx, stage)
    return ctx


def _link_reused(ctx: Context) -> None:
    cfg = ctx.cfg
    if not cfg.reuse_from or not ctx.main:
        return
    for stage in [s.strip() for s in cfg.reuse_stages.split(",") if s.strip()]:
        src, dst = os.path.join(cfg.reuse_from, stage), ctx.dir(stage)
        if not is_done(src):
            raise FileNotFoundError(f"--reuse_from {cfg.reuse_from}: stage {stage} is not complete there")
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(src), dst)


def _checkpoint_owner(cfg: TrainConfig) -> str | None:
    """The stage whose checkpoint ``--resume_from_checkpoint`` names (None: 'true', not set, or a
    checkpoint that does not say)."""
    from .loop import checkpoint_stage, resume_mode

    mode = resume_mode(cfg.resume_from_checkpoint)
    return None if mode in (None, "latest") else checkpoint_stage(mode)


def run_stage(stage: str, config, *, accelerator=None, on_step_end=None, context: Context | None = None):
    """Run one stage (even if it was completed before; its folder is reused). Returns its output."""
    if stage not in STAGE_FUNCS:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if context is None:
        config = _config(config)
        _stage_problem(stage, config)  # before the output folder is touched (--overwrite_output_dir)
    ctx = context or make_context(config, accelerator, stage=stage)
    fn = STAGE_FUNCS[stage]
    # the stage's old DONE goes before anything in its folder is rewritten: a kill while its model or
    # caches are replaced must not leave them under a DONE that says they are complete (a later run
    # would skip the stage, or keep the later stages made from its old outputs)
    if ctx.main:
        if os.path.islink(ctx.dir(stage)):
            # linked from --reuse_from: that run's folder is left as it is, this run's stage gets its own
            # (it runs here because it was asked for by name or is stale: an earlier stage finished after it)
            ctx.log(f"{stage}: linked from {os.readlink(ctx.dir(stage))}; running it here, in a folder of its own "
                    "(the linked run's is left as it is)")
            os.unlink(ctx.dir(stage))
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(ctx.dir(stage), DONE))
    ctx.accelerator.wait_for_everyone()
    t = time.time()
    if stage in ("warmup", "forget", "improve"):
        out = fn(ctx, on_step_end=None if on_step_end is None else (lambda step: on_step_end(stage, step)))
    else:
        out = fn(ctx)
    ctx.log(f"{stage}: done in {time.time() - t:.1f} s")
    return out


def _stage_problem(stage: str, cfg: TrainConfig) -> None:
    """A RunError when ``stage``, run on its own, cannot run with these options (found before it starts)."""
    from .stages.masked import selection_problem

    if stage == "prepare" and cfg.model_name_or_path is not None and not cfg.problems_file:
        raise RunError(PREPARE_NEEDS_PROBLEMS)
    if stage in ("forget", "improve"):
        problem = selection_problem(cfg)
        if problem:
            raise RunError(problem)


def _latest_change(folder: str) -> float:
    """The latest modification time of the files directly in ``folder`` (a model folder)."""
    return max((e.stat().st_mtime for e in os.scandir(folder) if e.is_file()), default=0.0)


def stage_plan(cfg: TrainConfig) -> list[tuple[str, str, str | None]]:
    """What :func:`run` does with each stage of ``--stages``, in order, decided from the output folder
    before anything runs: ``(stage, what, why)``, ``what`` one of ``"not needed"`` (prepare, when the pairs
    are given), ``"external"`` (warmup from ``--warmup_model_path``), ``"reuse"`` (complete, and nothing
    before it finished after it), ``"stale"`` (complete, but ``why`` finished after it, or runs before it
    in this run: it runs again from the start, as make would) or ``"run"`` (not complete). A stage that
    ``--reuse_from`` links counts with the linked run's folder."""
    from .stages import uses_builtin_data

    reused = {s.strip() for s in cfg.reuse_stages.split(",") if s.strip()} if cfg.reuse_from else set()
    plan, upstream = [], None  # (finish time, what): the latest-finished stage before this one
    for stage in cfg.stage_list():
        if stage == "prepare" and not uses_builtin_data(cfg) and not cfg.problems_file:
            plan.append((stage, "not needed", None))
            continue
        if stage == "warmup" and cfg.warmup_model_path is not None:
            # trained elsewhere: it counts as finished when its files last changed, so the stages after it
            # run again (as make would) when it is replaced by a newer model
            changed = _latest_change(os.path.expanduser(cfg.warmup_model_path))
            if upstream is None or changed > upstream[0]:
                upstream = (changed, "the model of --warmup_model_path")
            plan.append((stage, "external", None))
            continue
        folder = os.path.join(cfg.output_dir, stage)
        if stage in reused and not os.path.lexists(folder):
            folder = os.path.join(cfg.reuse_from, stage)  # (linked when the run starts)
        finished = finished_at(folder)
        if finished is None:
            plan.append((stage, "run", None))
        elif upstream is not None and upstream[0] > finished:
            plan.append((stage, "stale", upstream[1]))
        else:
            plan.append((stage, "reuse", None))
            if upstream is None or finished > upstream[0]:
                upstream = (finished, stage)
            continue
        upstream = (math.inf, stage)  # it runs here: it will finish after every stage before it
    return plan


def run(config, *, accelerator=None, on_step_end=None) -> dict:
    """Every stage of ``config.stages`` in order, skipping those already complete (their folder has
    DONE) unless an earlier stage completed after them (then they run again, from the start); returns
    the eval stage's metrics per evaluated model: {"sft"|"warmup"|"forget"|"improve": {...}}.
    ``on_step_end(stage, step)`` is called after every optimizer step."""
    ctx = make_context(config, accelerator)
    _link_reused(ctx)
    ctx.accelerator.wait_for_everyone()
    cfg = ctx.cfg
    from .stages import done_info

    t0 = time.time()
    results = {}
    owner = _checkpoint_owner(cfg)
    for stage, what, why in stage_plan(cfg):
        if what == "not needed":
            continue  # preference pairs are given: nothing to prepare
        if what == "external":
            ctx.log(f"warmup: --warmup_model_path {cfg.warmup_model_path} is the warm-up model: not trained here")
            continue
        if what == "stale":
            # an earlier stage was run again after this one (e.g. `allo-train warmup` with other
            # options): this stage's outputs come from the old inputs, so it runs again, as make
            # would, from the start (its checkpoints are the old run's too)
            ctx.log(f"{stage}: complete, but {why} finished after it: running it again")
        if what == "reuse":
            ctx.log(f"{stage}: already complete, skipped"
                    + (f" (--resume_from_checkpoint {cfg.resume_from_checkpoint} is its checkpoint: not used)"
                       if owner == stage else ""))
            if stage == "eval":
                results = done_info(ctx.dir(stage)).get("results", {})
        else:
            # a checkpoint folder given by name resumes its own stage; the others start as without it
            stage_ctx = ctx if owner in (None, stage) and what != "stale" else \
                dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, resume_from_checkpoint=None))
            out = run_stage(stage, cfg, context=stage_ctx, on_step_end=on_step_end)
            if stage == "eval":
                results = out
    ctx.log(f"finished in {time.time() - t0:.1f} s; outputs in {cfg.output_dir}")
    return results
