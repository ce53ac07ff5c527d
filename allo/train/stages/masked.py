"""Where a masked stage (forget, improve) starts: its model, its sharded module under FSDP2, and the
masks (or, sharded, this rank's selected indices) read from the select stage's file."""

from __future__ import annotations

import os

from allo._dtensor import flat_range

from .. import model as models
from ..config import RunError, TrainConfig
from ..fsdp import masked_stage_shards, sharded_scorer
from ..loop import prepare_trainable
from .common import Context, done_info, is_done, require


def selection_problem(cfg: TrainConfig) -> str | None:
    """Why the masks of ``cfg.output_dir``'s select stage cannot serve ``cfg`` (another --selection), or None
    (also where there is no complete select stage: the stage says to run it when it needs it)."""
    sdir = os.path.join(cfg.output_dir, "select")
    if cfg.selection == "none" or not is_done(sdir):
        return None
    held = done_info(sdir).get("selection")
    if held != cfg.selection:
        return (f"{sdir} holds a '{held}' selection but --selection is '{cfg.selection}'; run `allo-train select` "
                f"with --selection {cfg.selection} first, use another --output_dir, or delete that folder")
    return None


def _mask_file(ctx: Context, stage: str) -> str | None:
    if ctx.cfg.selection == "none":
        return None
    path = require(ctx, "select", f"{stage}_mask.safetensors")
    problem = selection_problem(ctx.cfg)
    if problem:
        raise RunError(problem)
    return path


def masked_stage_start(ctx: Context, stage: str, path: str, desc: str):
    """The starting point of a masked stage: (model, scorer, masks, mask file).

    One process or DDP: the model loaded whole, no scorer (``train_stage`` wraps the model), the
    selection's sorted flat indices (MaskedAdamW's index sets as stored: no bool mask of the model's
    size, one byte per parameter, is built). FSDP2: only the main process reads the weights (its model
    stays on the CPU, for saving); the others build the model on the meta device from its config
    (names and shapes, no memory) and never use it. The scorer is the stage's sharded module (holding the
    weights, every rank its shards; the reference pass and the training run through it) and
    ``masks`` this rank's part of the selection: the global flat indices of the selected elements in
    its own rows of each trained parameter, read from the file without building a mask."""
    from allo.select import Selection

    # asked on every rank: FSDP1 / DeepSpeed stop all of them here with the same error
    sharded = masked_stage_shards(ctx.accelerator, desc)
    model = models.load_model(path, dtype=ctx.weights_dtype, empty=sharded and not ctx.main, options=ctx.load_options)
    mask_file = _mask_file(ctx, stage)
    if not sharded:
        return model, None, None if mask_file is None else Selection.load(mask_file, model).indices, mask_file
    # which parameters train must agree on every rank (FSDP2's collectives): the whole selection's counts
    counts = None if mask_file is None else Selection.load_counts(mask_file, model)
    trainable = None if counts is None else {n: c > 0 for n, c in counts.items()}
    scorer = sharded_scorer(ctx.accelerator, model, prepare=lambda m: prepare_trainable(m, trainable, ctx.cfg))
    masks = None
    if mask_file is not None:
        rows = {n: flat_range(p) for n, p in scorer.model.named_parameters() if p.requires_grad}
        masks = Selection.load_indices(mask_file, rows)
    return model, scorer, masks, mask_file
