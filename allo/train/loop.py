"""The training loop every trained stage (warm-up, forget, improve) runs: accelerate underneath.

One optimizer step sees a global batch of ``per_device_train_batch_size x gradient_accumulation_steps
x world_size`` examples: step ``s`` of epoch ``e`` takes slice ``s`` of a permutation drawn from
``seed + e`` (the last incomplete global batch of an epoch is dropped), and rank ``r`` takes the
``r``-th contiguous part of it. The data position is therefore just the step number, and a resumed
run sees exactly the batches an uninterrupted one would.

Losses are normalised over the GLOBAL batch (pairs for DPO, weighted tokens for forgetting), so
2 processes x batch B give the same update as 1 process x batch 2B.

Gradient synchronisation:
* dense stage (warm-up, full-parameter DPO, ``torch.optim.AdamW``), one process, DDP, FSDP1 or
  DeepSpeed: the model is prepared by accelerate (per ``accelerate config``), with ``no_sync`` on
  all but the last micro-batch of a step;
* dense stage under FSDP2 (accelerate configured with ``fsdp_version: 2``, several processes): the
  stage's sharded module (see below and :mod:`allo.train.fsdp`) trains with ``torch.optim.AdamW``
  on its DTensor parameters (each rank the state of its rows); FSDP2 reduce-scatters (averages) the
  gradients in every backward, clipping uses the global norm (``clip_grad_norm_`` on DTensors);
* masked stages (forget, improve, ``MaskedAdamW`` in compact-gradient mode), one process or DDP:
  the model is NOT wrapped; each backward leaves only the selected gradient elements (the full
  gradient is freed by the optimizer's hook), and ``opt.all_reduce_grads()`` averages those compact
  gradients once per step: the all-reduce moves ``ratio`` of the bytes DDP would;
* masked stages under FSDP2 (accelerate configured with ``fsdp_version: 2``, several processes)
  (and the dense stage, with every parameter trained): the model is sharded with ``fully_shard``
  (one unit per decoder layer, the root holding embeddings, final norm and output layer; see
  :mod:`allo.train.fsdp`), by the stage before its reference pass
  (every rank scores its share of the examples through it). Only the main process holds ``model``
  whole (on the CPU, never on the accelerator); the other processes get it on the meta device and
  receive their shards from the main process. FSDP2 reduce-scatters (averages) the gradients in
  every backward; the optimizer's hooks keep the selected elements of each rank's rows, and
  ``MaskedAdamW`` updates those rows: each rank holds only the selected indices inside its rows
  (read from the selection file, no mask), and clipping combines the ranks' norms. Checkpoints
  hold the full HF model (the trained weights gathered into the main process's ``model``, one
  parameter at a time) and one optimizer file per rank; at the end the trained weights are
  gathered into it the same way. In the masked stages FSDP version 1 and DeepSpeed are refused with
  an error saying how to switch to FSDP2.
"""

from __future__ import annotations

import filecmp
import glob
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import folders
from .data import collate, pair_examples
from .fsdp import fsdp2_shards, gather_into, load_weights, masked_stage_shards
from .logps import TokenLogprobs, pad_like, response_mask
from .reporting import MetricsSink


@dataclass
class StageData:
    """What a stage trains on. ``kind``: "dpo" | "improve" (pairs) or "forget" (single responses);
    ``reference``: cached reference log-probs per example ({"chosen", "rejected"} or {"response"});
    ``weights``: per-example token weights for forgetting."""

    kind: str
    examples: list
    reference: dict
    weights: list | None = None


# logged metrics that are means over the stage's loss units (weighted tokens for the forgetting stage);
# the others (forget/weighted_tokens, rewards/*, logps/*, improve/*) are means over responses or pairs
_PER_LOSS_UNIT = frozenset({"loss", "forget/log_ratio"})


def _loss_units(kind, examples, weights, idx):
    """What the stage's loss averages over, for these examples: pairs, or weighted tokens."""
    if kind == "forget":
        return sum(int((weights[i] != 0).sum()) for i in idx)
    return len(idx)


def _forward_loss(kind, scorer, examples, data: StageData, idx, cfg, device, pad_id, policy_is_reference=False):
    from allo.losses import dpo_loss, forget_loss, improve_loss

    if kind == "forget":
        batch = collate([examples[i] for i in idx], pad_id, device)
        mask = response_mask(batch)
        lp = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
        ref = pad_like([data.reference["response"][i] for i in idx], mask)
        w = pad_like([data.weights[i] for i in idx], mask)
        return forget_loss(lp, ref, w, beta=cfg.beta)
    pairs = [examples[i] for i in idx]
    batch = collate(pair_examples(pairs), pad_id, device)
    mask = response_mask(batch)
    lp = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
    n = len(idx)
    ref = pad_like([data.reference["chosen"][i] for i in idx] + [data.reference["rejected"][i] for i in idx], mask)
    args = (lp[:n], lp[n:], ref[:n], ref[n:], mask[:n], mask[n:])
    if kind == "improve":
        # (before the stage's first optimizer step the policy is the reference: see improve_loss)
        return improve_loss(*args, beta=cfg.beta, eps=cfg.eps, policy_is_reference=policy_is_reference)
    return dpo_loss(*args, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)


def _rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def latest_checkpoint(stage_dir) -> str | None:
    found = sorted(glob.glob(os.path.join(stage_dir, "checkpoints", "checkpoint-*")),
                   key=lambda p: int(p.rsplit("-", 1)[1]) if p.rsplit("-", 1)[1].isdigit() else -1)
    found = [p for p in found if p.rsplit("-", 1)[1].isdigit() and os.path.exists(os.path.join(p, "trainer_state.json"))]
    return found[-1] if found else None


def _incomplete(ckpt: str) -> list[str]:
    """The files a checkpoint folder lacks (its trainer_state.json is there): empty when complete."""
    names = os.listdir(ckpt)
    wanted = {"model.safetensors": lambda n: n.startswith("model") and n.endswith(".safetensors"),
              "optimizer.pt": lambda n: n.startswith("optimizer") and n.endswith(".pt"),
              "scheduler.pt": lambda n: n == "scheduler.pt",
              "rng_state_<rank>.pth": lambda n: n.startswith("rng_state_") and n.endswith(".pth")}
    return [w for w, ok in wanted.items() if not any(ok(n) for n in names)]


def checkpoint_stage(ckpt: str) -> str | None:
    """The stage that wrote checkpoint folder ``ckpt`` (its trainer_state.json says; checkpoints
    written before it did are named by the folder they sit in: ``<stage>/checkpoints/checkpoint-N``),
    or None where neither tells. Raises FileNotFoundError, saying what to give, if ``ckpt`` is no
    complete checkpoint."""
    state_file = os.path.join(ckpt, "trainer_state.json")
    if not os.path.isfile(state_file):
        what = "no such folder" if not os.path.exists(ckpt) else "not a complete checkpoint (no trainer_state.json)"
        raise FileNotFoundError(f"--resume_from_checkpoint {ckpt}: {what}; give a checkpoint-N folder under "
                                "<output_dir>/<stage>/checkpoints, or 'true' for each stage's latest")
    with open(state_file) as f:
        stage = json.load(f).get("stage")
    parent = os.path.dirname(os.path.normpath(os.path.abspath(ckpt)))
    if stage is None and os.path.basename(parent) == "checkpoints":
        stage = os.path.basename(os.path.dirname(parent))
    return stage


def resume_mode(resume) -> str | None:
    """``--resume_from_checkpoint`` read: None (start fresh), "latest", or a checkpoint folder."""
    if resume is None or resume is False or str(resume).lower() in ("false", "0", "none", ""):
        return None
    if resume is True or str(resume).lower() in ("true", "1", "yes"):
        return "latest"
    return str(resume)


def _stage_name(stage_dir: str) -> str:
    """A stage's name is its folder's (``<output_dir>/<stage>``)."""
    return os.path.basename(os.path.normpath(stage_dir))


def _optimizer_file(accelerator, sharded: bool) -> str:
    # FSDP2: each rank's optimizer state covers its own rows of every parameter
    return f"optimizer_{accelerator.process_index}.pt" if sharded else "optimizer.pt"


def _save_checkpoint(accelerator, stage_dir, step, model, tokenizer, opt, sched, masks_file, total_limit,
                     whole_model=None, inputs: dict | None = None, window: dict | None = None):
    """checkpoint-<step>/: HF model (safetensors), optimizer (compact state), scheduler, masks, RNG
    of every rank, trainer_state.json (data position = step). Built under a temporary name and
    renamed, so a kill mid-save never leaves a half checkpoint. ``whole_model``: FSDP2, the main
    process's whole HF model, into which the trained shards are gathered and which is saved (the other
    ranks pass their meta-device model); optimizer state: one file per rank. ``inputs``: the keys of
    what the stage trains from (see train_stage), recorded so that a resume can tell they changed.
    ``window``: the sums of the logging window not yet logged (each rank's own, saved with its RNG state),
    so that a resumed run logs the same rows when --logging_steps does not divide ``step``."""
    root = os.path.join(stage_dir, "checkpoints")
    final = os.path.join(root, f"checkpoint-{step}")
    tmp = final + ".tmp"
    sharded = whole_model is not None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    torch.save({**_rng_state(), "logging_window": dict(window or {})},
               os.path.join(tmp, f"rng_state_{accelerator.process_index}.pth"))
    if sharded:
        gather_into(whole_model, model)  # every rank takes part; the main process's model gets the weights
        torch.save(opt.state_dict(), os.path.join(tmp, _optimizer_file(accelerator, sharded)))
    if accelerator.is_main_process:
        if sharded:
            whole_model.save_pretrained(tmp, safe_serialization=True)
        else:
            accelerator.unwrap_model(model).model.save_pretrained(tmp, safe_serialization=True)
            torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(sched.state_dict(), os.path.join(tmp, "scheduler.pt"))
        if masks_file:
            shutil.copy(masks_file, os.path.join(tmp, "masks.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"global_step": step, "world_size": accelerator.num_processes,
                       "stage": _stage_name(stage_dir), "inputs": inputs}, f)
        folders.remove_leftovers(root)
        folders.replace(tmp, final)  # (a checkpoint-<step> there was left by an abandoned run)
        old = sorted(glob.glob(os.path.join(root, "checkpoint-*[0-9]")), key=lambda p: int(p.rsplit("-", 1)[1]))
        for p in old[:-total_limit] if total_limit > 0 else []:
            folders.remove(p)
    accelerator.wait_for_everyone()


def _checkpoint_to_resume(accelerator, cfg, stage_dir: str, masks_file: str | None,
                          inputs: dict | None = None) -> str | None:
    """The checkpoint this stage resumes from (None: it starts fresh). A checkpoint folder given by
    name must be this stage's, and one of a masked stage must hold the selection it trains now
    (MaskedAdamW's state carries its masks: a changed selection would be replaced by the old one).
    Starting fresh removes the checkpoints an abandoned run left here: a later 'true' would resume
    from them, mixing two runs. A checkpoint whose recorded ``inputs`` (see train_stage) differ from
    this run's is refused for the same reason: it was trained from another starting model or data (an
    earlier stage ran again since)."""
    stage = _stage_name(stage_dir)
    mode = resume_mode(cfg.resume_from_checkpoint)
    ckpt = latest_checkpoint(stage_dir) if mode == "latest" else mode
    if ckpt is None:
        if mode == "latest" and accelerator.is_main_process:
            print(f"[allo-train] {stage}: --resume_from_checkpoint true, but no checkpoint here yet: starting fresh",
                  flush=True)
        old = os.path.join(stage_dir, "checkpoints")
        if accelerator.is_main_process and os.path.isdir(old) and os.listdir(old):
            print(f"[allo-train] {stage}: starting fresh; removing the checkpoints of an earlier run in {old} "
                  "(--resume_from_checkpoint true continues from them instead)", flush=True)
            folders.remove(old)
        if accelerator.is_main_process:
            folders.remove_leftovers(stage_dir)
        accelerator.wait_for_everyone()
        return None
    owner = checkpoint_stage(ckpt)
    missing = _incomplete(ckpt)
    if missing:
        from .config import RunError

        raise RunError(f"--resume_from_checkpoint {ckpt}: an incomplete checkpoint (no {', '.join(missing)}; "
                       "left by a kill while it was deleted?); delete that folder to resume from the one before "
                       "it, or start the stage without --resume_from_checkpoint")
    if owner is not None and owner != stage:
        raise ValueError(f"--resume_from_checkpoint {ckpt} is a checkpoint of the `{owner}` stage, not of `{stage}`; "
                         f"give one under {os.path.join(stage_dir, 'checkpoints')}, or 'true' for its latest")
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        saved = json.load(f).get("inputs")
    changed = [k for k in (inputs or {}) if isinstance(saved, dict) and saved.get(k) != inputs[k]]
    if changed:  # (a checkpoint written before they were recorded cannot tell: it is taken as it is)
        from .config import RunError

        raise RunError(f"--resume_from_checkpoint {ckpt}: trained from other inputs than this run's `{stage}` "
                       f"({', '.join(changed)} changed since: its starting model or data differ, say after an "
                       "earlier stage ran again); resuming would mix two runs. Run the stage without "
                       "--resume_from_checkpoint (it starts afresh and removes these checkpoints)")
    saved_masks = os.path.join(ckpt, "masks.safetensors")
    if masks_file and os.path.exists(saved_masks) and not filecmp.cmp(saved_masks, masks_file, shallow=False):
        raise ValueError(f"--resume_from_checkpoint {ckpt}: its selection differs from {masks_file} (the select stage "
                         "ran again since); start the stage fresh, or restore the selection it was trained with")
    return ckpt


def _load_checkpoint_weights(accelerator, ckpt, model, *, load: bool = True) -> int:
    """Load the checkpoint's weights into the plain HF ``model`` (before it is wrapped or sharded);
    returns the step to resume from. ``load=False``: only the step (FSDP2, not the main process:
    its shards come from the main process's model)."""
    from .model import load_full_weights, read_folder_weights

    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        state = json.load(f)
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(f"{ckpt} was written by {state['world_size']} processes; resume with the same number "
                         f"(now {accelerator.num_processes}) so the data order is the same")
    if load:
        weights, source = read_folder_weights(ckpt)  # (sharded when save_pretrained split a large model)
        load_full_weights(model, weights, source=source)
    return state["global_step"]


def _load_checkpoint_state(accelerator, ckpt, opt, sched, sharded: bool) -> dict:
    """Optimizer, scheduler and RNG state restored; returns this rank's unlogged logging window (empty
    for a checkpoint written before it was saved)."""
    path = os.path.join(ckpt, _optimizer_file(accelerator, sharded))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {ckpt} was written {'without' if sharded else 'with'} FSDP2 "
                                "sharding; resume with the distributed setup that wrote it")
    # onto the CPU: saved tensors would otherwise return to the GPU that saved them (every DDP rank loading
    # the main process's optimizer.pt onto cuda:0; a machine without it cannot load it at all). The
    # optimizers move their state to each parameter's device; RNG states are CPU tensors anyway
    opt.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
    sched.load_state_dict(torch.load(os.path.join(ckpt, "scheduler.pt"), map_location="cpu", weights_only=False))
    rng = torch.load(os.path.join(ckpt, f"rng_state_{accelerator.process_index}.pth"), map_location="cpu",
                     weights_only=False)
    _set_rng_state(rng)
    return dict(rng.get("logging_window") or {})


def check_global_batch(n: int, cfg, world: int, what: str) -> None:
    """A RunError unless ``n`` examples fill one global batch. Every step takes a whole global batch
    (an epoch's incomplete last one is dropped, so that the data position is the step number and the
    loss is a mean over the same number of examples at every step): fewer examples make no step. The
    stages call it after loading their data, before their reference pass."""
    from .config import RunError

    bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    if n < bs * accum * world:
        raise RunError(f"{what}: {n} examples are fewer than one global batch of {bs * accum * world} "
                       f"(--per_device_train_batch_size {bs} x --gradient_accumulation_steps {accum} x {world} "
                       f"process{'es' if world > 1 else ''}); lower them so that the product is at most {n}")


def train_stage(*, accelerator, cfg, stage_dir: str, model, tokenizer, data: StageData, lr: float,
                masks: dict | None, dense: bool, masks_file: str | None = None, desc: str = "train",
                scorer=None, on_step_end: Callable[[int], None] | None = None, inputs: dict | None = None) -> dict:
    """Train ``model`` in place; returns the last logged metrics. ``dense``: full-parameter torch
    AdamW; else MaskedAdamW with ``masks`` (None: every element) in compact-gradient mode.
    ``scorer``: under FSDP2 (``fsdp2_shards`` for the dense stage, ``masked_stage_shards`` for the
    masked ones), and only there, the stage's sharded module (``sharded_scorer(accelerator, model,
    prepare=...)`` with ``prepare_trainable``), holding ``model``'s weights (``model`` itself is
    whole on the main process, on its CPU, and on the meta device elsewhere); ``masks`` may then be
    each rank's part of the selection (the global flat indices of the selected elements in its
    rows, ``Selection.load_indices``), for every parameter that requires grad.
    ``on_step_end(step)`` is called after each optimizer step (tests use it to interrupt a run).
    ``inputs``: {name: key} of what the stage trains from (its reference and token-weight caches' keys,
    which cover its starting model and examples), written into each checkpoint and compared on resume.
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    world, rank = accelerator.num_processes, accelerator.process_index
    bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    global_bs = bs * accum * world
    n = len(data.examples)
    check_global_batch(n, cfg, world, desc)
    steps_per_epoch = n // global_bs
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))

    device = accelerator.device
    sharded = fsdp2_shards(accelerator) if dense else masked_stage_shards(accelerator, desc)
    if sharded != (scorer is not None):
        raise ValueError(f"{desc}: under FSDP2 train_stage needs the stage's sharded module, scorer=sharded_scorer("
                         "accelerator, model, prepare=...)" if sharded else
                         f"{desc}: scorer= is the FSDP2 sharded module; other setups train `model` itself")
    start = 0
    ckpt = _checkpoint_to_resume(accelerator, cfg, stage_dir, masks_file, inputs)
    if ckpt is not None:  # weights first: into the plain model, before DDP or FSDP2 take it over
        start = _load_checkpoint_weights(accelerator, ckpt, model, load=not sharded or accelerator.is_main_process)
        if accelerator.is_main_process:
            print(f"[allo-train] resuming {_stage_name(stage_dir)} from {os.path.basename(os.path.normpath(ckpt))} "
                  f"(step {start} of {total}; {ckpt})", flush=True)
    if not sharded:
        model.to(device)
        prepare_trainable(model, None if dense or masks is None else {nm: _any_selected(m) for nm, m in masks.items()},
                          cfg)
    else:
        if accelerator.is_main_process:
            # FSDP2: the whole model stays on the CPU (the stage saves it); only each rank's shards of
            # the sharded module are on the device. Elsewhere `model` is on the meta device
            model.to("cpu")
        if ckpt is not None:  # the shards hold the stage's starting weights: the checkpoint's replace them
            load_weights(scorer, model)
    routed = None  # the input embedding's gradient hook (masked stages), removed when the stage ends
    if dense and sharded:  # FSDP2: torch's AdamW on the DTensor parameters, the state of this rank's rows
        opt = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
    elif dense:
        scorer = TokenLogprobs(model)
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon,
                                **dense_adamw_kind(params))
        scorer, opt = accelerator.prepare(scorer, opt)
    else:
        from allo.optim import MaskedAdamW

        # FSDP2: the sharded module trains; the optimizer cuts the masks to each rank's rows
        if not sharded:
            scorer = TokenLogprobs(model)
        named = [(nm, p) for nm, p in scorer.model.named_parameters() if p.requires_grad]
        if masks is not None:  # left where they are: the optimizer moves one at a time (and cuts it, sharded)
            masks = {nm: masks[nm] for nm, _ in named}
        opt = MaskedAdamW(named, lr=lr, weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon, masks=masks,
                          compact_grads=True)
        if not sharded:  # the embedding's and the output layer's gradients go straight to compact form
            routed = _route_embedding_grads(scorer.model, opt)
            scorer.route_head_grads(opt)
    sched = get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=cfg.num_warmup_steps(total),
                          num_training_steps=total)
    window = {}
    if ckpt is not None:
        window = _load_checkpoint_state(accelerator, ckpt, opt, sched, sharded)
    sink = MetricsSink(stage_dir, cfg.report_to, enabled=accelerator.is_main_process,
                       resume_step=start if ckpt is not None else None, config=cfg.to_dict())

    bar = tqdm(total=total, initial=start, desc=desc, disable=cfg.disable_tqdm or not accelerator.is_local_main_process,
               dynamic_ncols=True)
    last, t0, acc_metrics = {}, time.time(), window
    try:
        for step in range(start, total):
            epoch, k = divmod(step, steps_per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
            gidx = perm[k * global_bs:(k + 1) * global_bs].tolist()
            units_total = _loss_units(data.kind, data.examples, data.weights, gidx)
            mine = gidx[rank * bs * accum:(rank + 1) * bs * accum]
            sums: dict[str, float] = {}
            for micro in range(accum):
                idx = mine[micro * bs:(micro + 1) * bs]
                units = _loss_units(data.kind, data.examples, data.weights, idx)
                # mean over the global batch: this micro-batch's share, times world (ranks get averaged)
                scale = units / max(units_total, 1) * world
                # FSDP2 reduce-scatters every micro-batch (the sharded gradients accumulate)
                sync_ctx = accelerator.no_sync(scorer) if dense and not sharded and micro < accum - 1 else _null()
                with sync_ctx, accelerator.autocast():
                    loss, metrics = _forward_loss(data.kind, scorer, data.examples, data, idx, cfg, device,
                                                  tokenizer.pad_token_id, policy_is_reference=step == 0)
                    if units == 0:  # nothing to forget here: keep the graph, add nothing
                        loss = loss.nan_to_num(0.0) * 0.0
                    (loss * scale).backward()
                # each logged value is the global batch's: the loss-unit means weighted by this micro-batch's
                # units, the per-response means by its responses (the same thing for pairs)
                rows = len(idx) / max(len(gidx), 1) * world
                for key, v in {"loss": loss.detach(), **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + float(v) * (scale if key in _PER_LOSS_UNIT else rows)
            if dense and sharded:  # the global norm: clip_grad_norm_ combines the DTensor shards' norms
                grad_norm = _full(torch.nn.utils.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm)) \
                    if cfg.max_grad_norm > 0 else None
            elif dense:
                grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            else:
                if world > 1:
                    opt.all_reduce_grads()
                grad_norm = opt.clip_grad_norm_(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            for key, v in sums.items():
                acc_metrics[key] = acc_metrics.get(key, 0.0) + v
            acc_metrics["_n"] = acc_metrics.get("_n", 0) + 1
            if grad_norm is not None:
                acc_metrics["grad_norm"] = acc_metrics.get("grad_norm", 0.0) + float(grad_norm)
            done = step + 1
            if done % cfg.logging_steps == 0 or done == total:
                cnt = acc_metrics.pop("_n")
                row = {k: v / cnt for k, v in acc_metrics.items()}
                if world > 1:
                    vals = torch.tensor(list(row.values()), dtype=torch.float64, device=device)
                    vals = accelerator.reduce(vals, reduction="mean")
                    row = dict(zip(row, vals.tolist()))
                row.update(step=done, epoch=round(done / steps_per_epoch, 4), learning_rate=sched.get_last_lr()[0],
                           elapsed_s=round(time.time() - t0, 2))
                sink.log(row)
                last = row
                acc_metrics = {}
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            bar.update(1)
            if cfg.save_steps > 0 and done % cfg.save_steps == 0 and done < total:
                _save_checkpoint(accelerator, stage_dir, done, scorer, tokenizer, opt, sched, masks_file,
                                 cfg.save_total_limit, whole_model=model if sharded else None, inputs=inputs,
                                 window=acc_metrics)
            if on_step_end is not None:
                on_step_end(done)
    finally:
        bar.close()
        sink.close()
        if routed is not None:
            routed.remove()
    if sharded:
        if not dense:
            opt.remove_hooks()
        gather_into(model, scorer)  # the trained weights, whole, in the main process's model
    if cfg.gradient_checkpointing and not sharded:
        model.gradient_checkpointing_disable()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return last


def _route_embedding_grads(model, opt):
    """The input embedding's selected gradient elements go straight into the compact gradients (no
    dense [V, H] gradient; see allo.optim.compact_embedding_grads) when it is a plain nn.Embedding
    the optimizer trains; returns the hook's handle, or None where there is nothing to route."""
    from allo.optim import compact_embedding_grads

    emb = model.get_input_embeddings()
    if type(emb) is not torch.nn.Embedding or not emb.weight.requires_grad:
        return None  # e.g. a scaled embedding subclass (the optimizer's hook handles it), or a frozen one
    return compact_embedding_grads(emb, opt)


def prepare_trainable(model, trainable: dict[str, bool] | None, cfg) -> None:
    """Gradient checkpointing, train mode and, for a masked stage, ``requires_grad``: ``trainable``
    says which parameters have a selected element (None: all); the others get no gradient at all
    (less backward work). Under FSDP2 this must be the same on every rank (the whole selection's
    counts, not a rank's part of it) and set before sharding."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    if trainable is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(bool(trainable.get(name, False)))


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a replicated norm), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def dense_adamw_kind(params) -> dict:
    """torch AdamW's implementation for the full-parameter warm-up (one process or DDP): fused when every
    parameter is on one CUDA device or on the CPU: one pass, where the foreach implementation makes a
    temporary the size of the weights at every step (14 GB for a 7B model in bf16). On this 2-core CPU
    the fused step over 50M fp32 parameters took 28 ms against 161 ms for foreach (2026-11-27). Other
    devices (or a mix): torch's default."""
    devices = {p.device for p in params}
    return {"fused": True} if len(devices) == 1 and next(iter(devices)).type in ("cuda", "cpu") else {}


def _any_selected(mask: torch.Tensor) -> bool:
    return bool(mask.any()) if mask.dtype == torch.bool else mask.numel() > 0  # flat indices: any at all


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
