"""improve: DPO on the rejected responses' key tokens with the improve mask only, from the forget
model (reference: the model it starts from)."""

from __future__ import annotations

import os

from .. import loop
from ..config import RunError
from ..loop import StageData
from ..model import save_model
from .common import (Context, cached_reference, check_batches, checkpoint_inputs, done_info, load_pairs, mark_done,
                     pair_views, require, seed_all, sft_model_path)
from .masked import masked_stage_start


def stage_improve(ctx: Context, *, on_step_end=None) -> dict:
    cfg, sdir = ctx.cfg, ctx.dir("improve")
    os.makedirs(sdir, exist_ok=True)
    seed_all(cfg.seed)
    pairs = load_pairs(ctx, "train")
    check_batches(ctx, "improve", len(pairs))
    fdir = ctx.dir("forget")
    if cfg.skip_forget:
        start = sft_model_path(ctx)
    else:
        start = require(ctx, "forget", "model")
        if done_info(fdir).get("skipped"):
            raise RunError(f"{fdir} was skipped (--skip_forget) but --skip_forget is not set now: run `allo-train "
                           "forget` first, pass --skip_forget, or use another --output_dir")
    desc = f"improve ({'key tokens' if cfg.key_tokens else 'DPO'})"
    model, scorer, masks, mask_file = masked_stage_start(ctx, "improve", start, desc)
    ref = cached_reference(ctx, sdir, model, pair_views(pairs), scorer=scorer, model_path=start)
    kind = "improve" if cfg.key_tokens else "dpo"
    last = loop.train_stage(accelerator=ctx.accelerator, cfg=cfg, stage_dir=sdir, model=model, tokenizer=ctx.tokenizer,
                       data=StageData(kind, pairs, ref), lr=cfg.improve_learning_rate, masks=masks, dense=False,
                       masks_file=mask_file, desc=desc, scorer=scorer, on_step_end=on_step_end,
                       inputs=checkpoint_inputs(sdir, "reference_logps"))
    if ctx.main:
        save_model(model, ctx.tokenizer, os.path.join(sdir, "model"))
    mark_done(ctx, sdir, {"last_metrics": last, "started_from": start})
    return last
