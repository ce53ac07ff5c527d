"""warmup: full-parameter DPO from the SFT model (reference: the SFT model); its weights feed the
weight-delta scores of the select stage."""

from __future__ import annotations

import os

from .. import loop
from .. import model as models
from ..fsdp import fsdp2_shards, sharded_scorer
from ..loop import StageData, prepare_trainable
from ..model import save_model
from .common import (Context, cached_reference, check_batches, checkpoint_inputs, load_pairs, mark_done, pair_views,
                     seed_all, sft_model_path)


def stage_warmup(ctx: Context, *, on_step_end=None) -> dict:
    cfg, sdir = ctx.cfg, ctx.dir("warmup")
    os.makedirs(sdir, exist_ok=True)
    seed_all(cfg.seed)
    pairs = load_pairs(ctx, "train")
    check_batches(ctx, "warmup", len(pairs))
    # FSDP2: only the main process reads the weights (its model stays whole on its CPU, for saving);
    # the sharded module computes the reference and trains. Elsewhere accelerate wraps the model
    sharded = fsdp2_shards(ctx.accelerator)
    model = models.load_model(sft_model_path(ctx), dtype=ctx.weights_dtype, empty=sharded and not ctx.main,
                              options=ctx.load_options)
    scorer = None
    if sharded:
        scorer = sharded_scorer(ctx.accelerator, model, prepare=lambda m: prepare_trainable(m, None, cfg))
    ref = cached_reference(ctx, sdir, model, pair_views(pairs), scorer=scorer, model_path=sft_model_path(ctx))
    last = loop.train_stage(accelerator=ctx.accelerator, cfg=cfg, stage_dir=sdir, model=model, tokenizer=ctx.tokenizer,
                       data=StageData("dpo", pairs, ref), lr=cfg.learning_rate, masks=None, dense=True,
                       desc="warmup (DPO, all parameters)", scorer=scorer, on_step_end=on_step_end,
                       inputs=checkpoint_inputs(sdir, "reference_logps"))
    if ctx.main:
        save_model(model, ctx.tokenizer, os.path.join(sdir, "model"))
    mark_done(ctx, sdir, {"last_metrics": last})
    return last
