"""select: importance scores (|theta_warmup - theta_0|, or gradient magnitudes) and, from them, the
exact forget and improve masks (allo.select), written as selection files."""

from __future__ import annotations

import math
import os

import torch

from allo._dtensor import row_block

from .. import data as D
from .. import model as models
from ..config import RunError, TrainConfig
from ..fsdp import fsdp2_shards, sharded_scorer
from ..logps import TokenLogprobs
from .common import Context, load_pairs, mark_done, sft_model_path, warmup_model_path


def _scores(ctx: Context):
    """(scores, parameter shapes) in one process: the whole model(s) on this process."""
    from allo.select import weight_delta_scores

    sft_path = sft_model_path(ctx)
    if ctx.cfg.score_source == "weight_delta":
        warm_path = warmup_model_path(ctx)
        # the two models' weights read from their files' memory maps, not loaded: names and shapes from the
        # architecture alone (meta device); a hub model's files are its snapshot in the Hugging Face cache.
        # Weights that are not such files: both models loaded whole
        base = models.load_model(sft_path, empty=True, options=ctx.load_options)
        sft, warm = ((models.mapped_weights(folder, base) if folder else None)
                     for folder in (models.local_folder(sft_path), models.local_folder(warm_path)))
        if sft is None or warm is None:
            ctx.log("select: the models' weights are not safetensors files under their parameter names; "
                    "loading both models whole for the weight deltas")
            base = models.load_model(sft_path, options=ctx.load_options)
            sft, warm = base, models.load_model(warm_path, options=ctx.load_options)
        scores = weight_delta_scores(warm, sft)
    else:
        base = models.load_model(sft_path, dtype=ctx.weights_dtype, options=ctx.load_options)
        scores = _gradient_scores(ctx, TokenLogprobs(base.to(ctx.accelerator.device)), base, sharded=False)
    return scores, {n: tuple(p.shape) for n, p in base.named_parameters()}


def _gradient_scores(ctx: Context, scorer, model, *, sharded: bool) -> dict:
    """|accumulated DPO gradient| at theta_0 over ``score_batches`` global batches of the training
    pairs. One process: ``scorer`` wraps the whole ``model``. FSDP2 (``sharded``): ``scorer`` is the
    sharded module (``model`` its ``.model``); each rank runs its part of every global batch, FSDP2
    averages the parts' gradients into each rank's rows, whose scores this rank gets."""
    from allo.losses import dpo_loss
    from allo.select import GradientScoreAccumulator

    cfg = ctx.cfg
    pairs = load_pairs(ctx, "train")
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(pairs), generator=gen).tolist()
    # the global batch: 2 processes x B must select what 1 x 2B does
    per, world = cfg.per_device_train_batch_size, ctx.accelerator.num_processes
    bs = per * world
    model.train()
    with GradientScoreAccumulator(model) as acc:
        if not sharded:  # the output layer's gradient folded into its score block by block: no [V, H] gradient
            scorer.route_head_grads(acc)
        for b in range(cfg.score_batches):
            idx = order[(b * bs) % len(pairs):][:bs]
            scale = 1.0
            if sharded:
                mine = idx[ctx.accelerator.process_index * per:][:per]
                # the mean over the global batch, after FSDP2 averages the ranks: 1.0 for equal parts.
                # A rank with no part (a short last batch) still runs a backward (collectives), worth 0
                scale = len(mine) * world / len(idx)
                idx = mine or idx[:1]
            batch = D.collate(D.pair_examples([pairs[i] for i in idx]), ctx.tokenizer.pad_token_id,
                              ctx.accelerator.device)
            mask = batch["labels"][:, 1:] != D.IGNORE_INDEX
            with ctx.accelerator.autocast():
                lp = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
            n = len(idx)
            # at theta_0 the reference is the policy itself: d_t = 0, the gradient is not
            loss, _ = dpo_loss(lp[:n], lp[n:], lp[:n].detach(), lp[n:].detach(), mask[:n], mask[n:], beta=cfg.beta,
                              loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
            (loss * scale if sharded else loss).backward()
        scores = acc.scores(in_place=True)  # no second copy of the scores beside the model
    if not sharded:
        scorer.route_head_grads(None)
    model.zero_grad(set_to_none=True)
    return scores


def _sharded_scores(ctx: Context):
    """FSDP2: (this rank's scores, of its rows of every parameter; the whole parameters' shapes;
    each parameter's (first row, rows) here). Only the main process reads weights, one model at a
    time, and broadcasts them into the shards (``sharded_scorer``), then drops its whole copy: for
    weight_delta, |warm-up shard - SFT shard| of two sharded modules; for gradient, backward passes
    through the sharded SFT model."""
    from allo.select import weight_delta_scores

    acc = ctx.accelerator
    if ctx.cfg.score_source == "weight_delta":
        warm_path = warmup_model_path(ctx)  # on every rank: all fail alike, none waits
        model = models.load_model(sft_model_path(ctx), empty=not ctx.main, options=ctx.load_options)
        base = sharded_scorer(acc, model)
        del model
        model = models.load_model(warm_path, empty=not ctx.main, options=ctx.load_options)
        warm = sharded_scorer(acc, model)
        del model
        scores = weight_delta_scores(warm.model, base.model)
    else:
        model = models.load_model(sft_model_path(ctx), dtype=ctx.weights_dtype, empty=not ctx.main, options=ctx.load_options)
        base = sharded_scorer(acc, model)
        del model
        scores = _gradient_scores(ctx, base, base.model, sharded=True)
    params = dict(base.model.named_parameters())
    return scores, {n: tuple(p.shape) for n, p in params.items()}, {n: row_block(p) for n, p in params.items()}


def _main_process_group(ctx: Context):
    """A process group of the main process alone, under torch.distributed (else None). ``select``
    combines its counts over the default group, taking each rank's scores as a part of the model;
    here the main process scores the whole model and selects alone, and every rank then loads the
    same saved masks. Every rank must call this (creating a group is collective)."""
    import torch.distributed as dist

    if ctx.accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
        return dist.new_group([0])
    return None


def _ranked(cfg: TrainConfig, scores: dict, shapes: dict, blocks: dict | None) -> dict:
    """The scores --selection ranks: top (as they are), bottom (negated) or random (seeded uniform;
    ``blocks``: FSDP2, each parameter's (first row, rows) on this rank, cut from the same draws)."""
    if cfg.selection == "bottom":
        return {n: -(s.materialize() if hasattr(s, "materialize") else s).float() for n, s in scores.items()}
    if cfg.selection == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        if blocks is None:
            return {n: torch.rand(shape, generator=g) for n, shape in shapes.items()}
        # one tensor drawn whole at a time (the same stream as one process), its rows kept
        return {n: torch.rand(shape, generator=g).narrow(0, *blocks[n]).clone() for n, shape in shapes.items()}
    return scores


def stage_select(ctx: Context) -> dict:
    """Scores -> the forget and improve selections. One process or DDP: the main process alone, with
    the whole model(s). FSDP2: every rank, with its shards, scores and selects its rows
    (``select_shards``: exactly the one-process selection); the main process writes the files."""
    from allo.select import select
    from allo.select.selection import select_shards

    cfg, sdir = ctx.cfg, ctx.dir("select")
    os.makedirs(sdir, exist_ok=True)
    info = {"selection": cfg.selection, "score_source": cfg.score_source}
    sharded = cfg.selection != "none" and fsdp2_shards(ctx.accelerator)
    group = None if sharded else _main_process_group(ctx)
    if cfg.selection != "none" and (sharded or ctx.main):
        if sharded:
            scores, shapes, blocks = _sharded_scores(ctx)
        else:
            (scores, shapes), blocks = _scores(ctx), None
        scores = _ranked(cfg, scores, shapes, blocks)
        _check_band(cfg, shapes)
        for stage, ratio in (("forget", cfg.forget_ratio), ("improve", cfg.improve_ratio)):
            kw = dict(exclude_ratio=cfg.exclude_ratio, metadata={"stage": stage, "selection": cfg.selection},
                      score_source=cfg.score_source)
            if sharded:
                sel = select_shards(scores, ratio, shapes=shapes, **kw)
            else:
                sel = select(scores, ratio, group=group, **kw)
            if ctx.main:
                _write_selection(ctx, sdir, stage, sel, info)
        ctx.log(f"select: {info}")
    mark_done(ctx, sdir, info)
    return info


def _check_band(cfg: TrainConfig, shapes: dict) -> None:
    """A stage that trains must select an element: round(ratio*N) - round(exclude_ratio*N) can be 0 for a
    small model even where validate() saw ratio > exclude_ratio, and the stage's optimizer would then fail
    on an empty parameter list after this stage (every rank finds the same: the shapes are the whole model's)."""
    from allo.select.topk import band_count

    n = sum(math.prod(shape) for shape in shapes.values())
    for stage, ratio in (("forget", cfg.forget_ratio), ("improve", cfg.improve_ratio)):
        if stage == "forget" and cfg.skip_forget:
            continue
        if band_count(ratio, n) - band_count(cfg.exclude_ratio, n) <= 0:
            raise RunError(f"select: --{stage}_ratio {ratio} with --exclude_ratio {cfg.exclude_ratio} selects no "
                           f"element of the model's {n} (round(ratio x {n}) - round(exclude_ratio x {n}) is 0), so "
                           f"the {stage} stage would train nothing; raise --{stage}_ratio or lower --exclude_ratio")


def _write_selection(ctx: Context, sdir: str, stage: str, sel, info: dict) -> None:
    sel.save(os.path.join(sdir, f"{stage}_mask.safetensors"))
    D.write_text(os.path.join(sdir, f"{stage}_mask_summary.txt"), sel.summary())
    try:
        sel.plot(os.path.join(sdir, f"{stage}_mask.png"))
    except Exception as e:  # a plot is a nicety; the masks are what matter
        ctx.log(f"select: could not plot the {stage} mask ({e})")
    info[f"{stage}_selected"] = sel.num_selected()
    info["total_elements"] = sel.num_total()
