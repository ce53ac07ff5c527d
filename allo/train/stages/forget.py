"""forget: token-weighted NPO on the negatives with the forget mask only (reference: the SFT model)."""

from __future__ import annotations

import os

import torch

from .. import loop
from .. import model as models
from ..fsdp import load_weights, sharded_logps
from ..logps import TokenLogprobs, compute_logps, load_cache, save_cache
from ..loop import StageData
from ..model import save_model
from .common import (Context, cache_is_current, cached_reference, check_batches, checkpoint_inputs, inputs_key,
                     load_negatives, main_decides, mark_done, negatives_weight_field, parked_on_cpu, scorer_batch,
                     seed_all, sft_model_path, warmup_model_path)
from .masked import masked_stage_start


def _eos_free_mask(ctx: Context, examples, lengths) -> torch.Tensor:
    """[B, T] mask of response tokens, the final end-of-sequence token left out (never forgotten)."""
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, (e, n) in enumerate(zip(examples, lengths)):
        mask[i, :n] = True
        if n > 1 and e["response_ids"][-1] == ctx.tokenizer.eos_token_id:
            mask[i, n - 1] = False
    return mask


def _weight_source(cfg, negs) -> str:
    """Where the forgetting weights come from: --token_weight_source, auto resolved."""
    if cfg.token_weight_source == "auto":
        return "data" if negs and "weights" in negs[0] else "implicit_reward"
    return cfg.token_weight_source


def _token_weights(ctx: Context, sdir: str, negs, ref, model=None, scorer=None) -> list[torch.Tensor]:
    """Per-token forgetting weights of every negative (see --token_weight_source). ``scorer``: FSDP2,
    the stage's sharded module holding the weights of ``model`` (the main process's whole model)."""
    from torch.nn.utils.rnn import pad_sequence

    from allo.losses.token_weights import token_weights_from_implicit_reward, token_weights_from_probs

    cfg = ctx.cfg
    source = _weight_source(cfg, negs)
    lengths = [len(e["response_ids"]) for e in negs]
    mask = _eos_free_mask(ctx, negs, lengths)
    if source in ("data", "reward_model_probs"):
        w = pad_sequence([torch.tensor(e["weights"], dtype=torch.float32) for e in negs], batch_first=True)
        if source == "reward_model_probs":
            w = token_weights_from_probs(w, mask, mode="raw" if cfg.raw_reward_probs else "threshold")
        w = w.masked_fill(~mask, 0.0)
        return [w[i, :n] for i, n in enumerate(lengths)]
    # the warm-up model's implicit token reward; computed once and cached, like the reference
    path = os.path.join(sdir, "token_weights.safetensors")
    key = inputs_key(ctx, models=[warmup_model_path(ctx), sft_model_path(ctx)], examples=[negs],
                     fraction=cfg.implicit_token_fraction) if ctx.main else None
    todo = ctx.main and not cache_is_current(ctx, path, key)  # main only: see cached_reference
    if scorer is not None:
        todo = main_decides(todo)
    if todo:
        kw = dict(pad_id=ctx.tokenizer.pad_token_id, batch_size=scorer_batch(ctx), device=ctx.accelerator.device,
                  autocast=ctx.accelerator.autocast)
        if scorer is None:
            # the stage's model waits on the CPU while the warm-up model scores: one model on the device
            with parked_on_cpu(model):
                warm = models.load_model(warmup_model_path(ctx), dtype=ctx.weights_dtype, options=ctx.load_options)
                warm = warm.to(ctx.accelerator.device)
                lp_warm = compute_logps(TokenLogprobs(warm), negs, **kw)
                del warm
        else:
            # FSDP2: the stage's sharded module scores with the warm-up weights (the main process loads
            # them whole, on its CPU only), then gets the stage's own back: no second model anywhere
            warm_path = warmup_model_path(ctx)  # on every rank: all fail alike, none waits
            load_weights(scorer, models.load_model(warm_path, dtype=ctx.weights_dtype, options=ctx.load_options)
                         if ctx.main else None)
            lp_warm = sharded_logps(scorer, negs, **kw)
            load_weights(scorer, model)
        if ctx.main:
            w = token_weights_from_implicit_reward(pad_sequence(lp_warm, batch_first=True),
                                                   pad_sequence(ref["response"], batch_first=True), mask,
                                                   fraction=cfg.implicit_token_fraction)
            save_cache(path, {"weights": [w[i, :n].contiguous() for i, n in enumerate(lengths)]}, key=key)
    ctx.accelerator.wait_for_everyone()
    return load_cache(path)["weights"]


def stage_forget(ctx: Context, *, on_step_end=None) -> dict:
    cfg, sdir = ctx.cfg, ctx.dir("forget")
    os.makedirs(sdir, exist_ok=True)
    if cfg.skip_forget:
        mark_done(ctx, sdir, {"skipped": True})
        return {}
    seed_all(cfg.seed)
    negs = load_negatives(ctx, negatives_weight_field(cfg))
    check_batches(ctx, "forget", len(negs))
    desc = "forget (token-weighted NPO)"
    model, scorer, masks, mask_file = masked_stage_start(ctx, "forget", sft_model_path(ctx), desc)
    ref = cached_reference(ctx, sdir, model, {"response": negs}, scorer=scorer, model_path=sft_model_path(ctx))
    weights = _token_weights(ctx, sdir, negs, ref, model=model, scorer=scorer)
    # what a checkpoint of this stage was trained from: the reference, and the token weights when they are
    # computed here (from the warm-up model); weights from the data file are covered by the reference's key
    caches = ["reference_logps"] + (["token_weights"] if _weight_source(cfg, negs) == "implicit_reward" else [])
    last = loop.train_stage(accelerator=ctx.accelerator, cfg=cfg, stage_dir=sdir, model=model, tokenizer=ctx.tokenizer,
                       data=StageData("forget", negs, ref, weights), lr=cfg.forget_learning_rate, masks=masks,
                       dense=False, masks_file=mask_file, desc=desc, scorer=scorer, on_step_end=on_step_end,
                       inputs=checkpoint_inputs(sdir, *caches))
    if ctx.main:
        save_model(model, ctx.tokenizer, os.path.join(sdir, "model"))
    mark_done(ctx, sdir, {"last_metrics": last})
    return last
