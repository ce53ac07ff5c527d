"""The ALLO stages. Each writes into ``<output_dir>/<stage>/`` and finishes by writing ``DONE``
(atomically, last), so ``run`` can skip completed stages and a killed run resumes where it stopped.

    prepare  built-in task: SFT the tiny model; sample responses, judge them by the final answer,
             pair every correct with every wrong one (<= max_pairs_per_problem), negatives
    warmup   full-parameter DPO from the SFT model (reference: the SFT model)
    select   importance scores (|theta_warmup - theta_0| or gradient) -> forget and improve masks
    forget   token-weighted NPO on the negatives, forget mask only (reference: the SFT model)
    improve  DPO on key tokens, improve mask only, from the forget model (reference: itself)
             (warmup, select, forget and improve under FSDP2: only the main process loads a model
             whole, one at a time, on its CPU, and broadcasts it into the shards; every rank computes
             the reference on its share of the examples with the sharded model, scores and selects
             its own rows, and holds only the selected indices in its rows)
    eval     held-out reward accuracy / margins (reference: the SFT model) and answer accuracy
             after every stage; the report table and plots
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass

import torch

from allo.optim.sharding import flat_range, row_block

from . import data as D
from .config import EVAL_MODELS, TrainConfig
from .logps import TokenLogprobs, compute_logps, load_cache, save_cache
from .fsdp import fsdp2_shards, load_weights, masked_stage_shards, sharded_logps, sharded_scorer
from .loop import StageData, prepare_trainable, train_stage
from .model import build_tiny_model, generate, load_model, load_tokenizer, save_model, sft_train

DONE = "DONE"
EVALUATED = EVAL_MODELS  # models the eval stage scores, in pipeline order


@dataclass
class Context:
    cfg: TrainConfig
    accelerator: object
    tokenizer: object

    def dir(self, stage: str) -> str:
        return os.path.join(self.cfg.output_dir, stage)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def progress(self) -> bool:
        return not self.cfg.disable_tqdm and self.accelerator.is_local_main_process

    def log(self, msg: str):
        if self.main:
            print(f"[allo-train] {msg}", flush=True)


def is_done(stage_dir: str) -> bool:
    return os.path.exists(os.path.join(stage_dir, DONE))


def mark_done(ctx: Context, stage_dir: str, info: dict) -> None:
    ctx.accelerator.wait_for_everyone()
    if ctx.main:
        tmp = os.path.join(stage_dir, DONE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}, f, indent=1, default=str)
        os.replace(tmp, os.path.join(stage_dir, DONE))
    ctx.accelerator.wait_for_everyone()


def _done_info(stage_dir: str) -> dict:
    with open(os.path.join(stage_dir, DONE)) as f:
        return json.load(f)


# -------------------------------------------------------------------------------- inputs of stages
def uses_builtin_data(cfg: TrainConfig) -> bool:
    return not (cfg.train_file or cfg.dataset_name)


def sft_model_path(ctx: Context) -> str:
    """The starting model theta_0: the built-in model after `prepare`'s SFT, or --model_name_or_path."""
    if ctx.cfg.model_name_or_path is None:
        return _require(ctx, "prepare", "model")
    return ctx.cfg.model_name_or_path


def _pairs_source(ctx: Context, split: str) -> str | None:
    cfg = ctx.cfg
    if split == "train":
        if cfg.train_file:
            return cfg.train_file
        if cfg.dataset_name:
            return cfg.dataset_name
        return _require(ctx, "prepare", "train_pairs.jsonl")
    if cfg.eval_file:
        return cfg.eval_file
    if cfg.dataset_name:
        return cfg.dataset_name
    if uses_builtin_data(cfg):
        return _require(ctx, "prepare", "eval_pairs.jsonl")
    return None


def _require(ctx: Context, stage: str, name: str) -> str:
    path = os.path.join(ctx.dir(stage), name)
    if not is_done(ctx.dir(stage)):
        raise FileNotFoundError(f"{path} is missing: run the `{stage}` stage first (allo-train {stage} "
                                f"--output_dir {ctx.cfg.output_dir}), or `allo-train run`")
    return path


def load_pairs(ctx: Context, split: str):
    src = _pairs_source(ctx, split)
    if src is None:
        return None
    ds_split = ctx.cfg.dataset_train_split if split == "train" else ctx.cfg.dataset_test_split
    pairs, rep = D.load_pairs(src, ctx.tokenizer, max_length=ctx.cfg.max_length, max_prompt_length=ctx.cfg.max_prompt_length,
                              skip_bad_rows=ctx.cfg.skip_bad_rows, split=ds_split)
    ctx.log(str(rep))
    return pairs


def _load_negatives(ctx: Context, weight_field):
    cfg = ctx.cfg
    src = cfg.negatives_file
    if src is None and uses_builtin_data(cfg):
        src = _require(ctx, "prepare", "negatives.jsonl")
    if src is None:
        # every distinct rejected response of the training pairs
        pairs = load_pairs(ctx, "train")
        seen, out = set(), []
        for p in pairs:
            key = (tuple(p["prompt_ids"]), tuple(p["rejected_ids"]))
            if key not in seen:
                seen.add(key)
                out.append({"prompt_ids": p["prompt_ids"], "response_ids": p["rejected_ids"]})
        if weight_field is not None:
            raise ValueError(f"--token_weight_source needs {weight_field} in a --negatives_file")
        return out
    negs, rep = D.load_negatives(src, ctx.tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                                 skip_bad_rows=cfg.skip_bad_rows, weight_field=weight_field)
    ctx.log(str(rep))
    return negs


def _negatives_have(ctx: Context, field: str) -> bool:
    src = ctx.cfg.negatives_file
    if src is None:
        return False
    rows = D.read_rows(src)
    return bool(rows) and isinstance(rows[0][1], dict) and field in rows[0][1]


def _scorer_batch(ctx):
    return max(1, ctx.cfg.per_device_eval_batch_size)


def cached_reference(ctx: Context, stage_dir: str, model, named_examples: dict, name="reference_logps", *,
                     sync: bool = True, scorer=None) -> dict:
    """Reference log-probs of the stage's starting ``model`` on every example, computed once and
    cached in ``stage_dir`` (written by the main process); a resumed stage reads the cache. One
    process or DDP: the main process computes them with ``model``. ``scorer``: FSDP2, the stage's
    sharded module holding ``model``'s weights: every rank scores its share of the examples through
    it (``model`` is not used) and the main process gathers them and writes the same cache."""
    path = os.path.join(stage_dir, f"{name}.safetensors")
    # only the main process looks at the file: another rank could see it appear and skip the barrier
    todo = ctx.main and not os.path.exists(path)
    if scorer is not None:  # FSDP2: every rank takes part in every forward, as the main process decides
        todo = _main_decides(todo)
    if todo:
        from tqdm.auto import tqdm

        if scorer is None:
            scorer, score = TokenLogprobs(model.to(ctx.accelerator.device)), compute_logps
        else:
            score = sharded_logps
        total = sum(len(v) for v in named_examples.values())
        with tqdm(total=total, desc=f"{os.path.basename(stage_dir)}: {name}", disable=not ctx.progress, leave=False) as bar:
            out = {k: score(scorer, v, pad_id=ctx.tokenizer.pad_token_id, batch_size=_scorer_batch(ctx),
                            device=ctx.accelerator.device, autocast=ctx.accelerator.autocast, progress=bar)
                   for k, v in named_examples.items()}
        if ctx.main:
            save_cache(path, out)
    if sync or scorer is not None:
        ctx.accelerator.wait_for_everyone()
    return load_cache(path)


def _main_decides(flag: bool) -> bool:
    """The main process's ``flag``, on every rank (collective: every rank calls it)."""
    import torch.distributed as dist

    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _pair_views(pairs):
    return {"chosen": [{"prompt_ids": p["prompt_ids"], "response_ids": p["chosen_ids"]} for p in pairs],
            "rejected": [{"prompt_ids": p["prompt_ids"], "response_ids": p["rejected_ids"]} for p in pairs]}


def _seed_all(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------------- prepare
def build_pairs(problems: list[dict], samples: list[list[str]], *, max_pairs: int, seed: int):
    """Judge samples by their final answer; pair every correct with every wrong response (distinct
    ones), keep at most ``max_pairs`` per problem (a seeded random choice); negatives are the
    distinct wrong responses. Returns (pairs, negatives, stats)."""
    from .tasks import is_correct

    rng = random.Random(seed)
    pairs, negatives, n_correct, n_total = [], [], 0, 0
    for prob, outs in zip(problems, samples):
        right = list(dict.fromkeys(o for o in outs if is_correct(o, prob["answer"])))
        wrong = list(dict.fromkeys(o for o in outs if not is_correct(o, prob["answer"])))
        n_correct += sum(is_correct(o, prob["answer"]) for o in outs)
        n_total += len(outs)
        combos = [(c, w) for c in right for w in wrong]
        rng.shuffle(combos)
        pairs += [{"prompt": prob["prompt"], "chosen": c, "rejected": w} for c, w in combos[:max_pairs]]
        negatives += [{"prompt": prob["prompt"], "response": w} for w in wrong]
    stats = {"sample_accuracy": n_correct / max(n_total, 1), "pairs": len(pairs), "negatives": len(negatives),
             "problems_with_pairs": len({p["prompt"] for p in pairs}), "problems": len(problems)}
    return pairs, negatives, stats


def stage_prepare(ctx: Context) -> dict:
    from .tasks import make_problems

    cfg, sdir = ctx.cfg, ctx.dir("prepare")
    info = {}
    if ctx.main:
        os.makedirs(sdir, exist_ok=True)
        _seed_all(cfg.seed)
        if cfg.model_name_or_path is None:
            evalp = make_problems(cfg.task, cfg.num_eval_problems, cfg.seed + 1)
            held = {p.prompt for p in evalp}
            trainp = make_problems(cfg.task, cfg.num_train_problems, cfg.seed + 2, exclude=held)
            sftp = make_problems(cfg.task, cfg.num_sft_problems, cfg.seed + 3, exclude=held)
            model = build_tiny_model(ctx.tokenizer, hidden_size=cfg.model_hidden_size, num_layers=cfg.model_num_layers,
                                     seed=cfg.seed).to(ctx.accelerator.device)
            t = time.time()
            sft_train(model, ctx.tokenizer, sftp, steps=cfg.sft_steps, lr=cfg.sft_learning_rate,
                      batch_size=32, seed=cfg.seed, progress=ctx.progress)
            info["sft_seconds"] = round(time.time() - t, 1)
            save_model(model, ctx.tokenizer, os.path.join(sdir, "model"))
            train_rows = [{"prompt": p.prompt, "answer": p.answer} for p in trainp]
            eval_rows = [{"prompt": p.prompt, "answer": p.answer} for p in evalp]
        else:
            if not cfg.problems_file:
                raise ValueError("`prepare` with --model_name_or_path needs --problems_file (prompt, answer rows), "
                                 "or give preference pairs directly with --train_file")
            model = load_model(cfg.model_name_or_path).to(ctx.accelerator.device)
            train_rows, rep = D.load_problems(cfg.problems_file, skip_bad_rows=cfg.skip_bad_rows)
            ctx.log(str(rep))
            if cfg.eval_problems_file:
                eval_rows, rep = D.load_problems(cfg.eval_problems_file, skip_bad_rows=cfg.skip_bad_rows)
            else:
                cut = max(1, len(train_rows) // 10)
                train_rows, eval_rows = train_rows[cut:], train_rows[:cut]
        outputs = {}
        for split, rows in (("train", train_rows), ("eval", eval_rows)):
            samples = generate(model, ctx.tokenizer, [r["prompt"] for r in rows], num_return_sequences=cfg.num_samples,
                               do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                               max_new_tokens=cfg.max_new_tokens, batch_size=256, seed=cfg.seed + (split == "eval"),
                               progress=ctx.progress, desc=f"prepare: sampling {split}")
            pairs, negs, stats = build_pairs(rows, samples, max_pairs=cfg.max_pairs_per_problem, seed=cfg.seed)
            outputs[split] = (pairs, negs)
            info[split] = stats
        D.write_jsonl(os.path.join(sdir, "train_pairs.jsonl"), outputs["train"][0])
        D.write_jsonl(os.path.join(sdir, "negatives.jsonl"), outputs["train"][1])
        D.write_jsonl(os.path.join(sdir, "eval_pairs.jsonl"), outputs["eval"][0])
        D.write_jsonl(os.path.join(sdir, "eval_problems.jsonl"), eval_rows)
        if not outputs["train"][0]:
            raise ValueError("prepare: no problem had both a correct and a wrong sample, so there are no pairs; "
                             "sample more (--num_samples) or start from a better / worse model")
        ctx.log(f"prepare: {info}")
    mark_done(ctx, sdir, info)
    return info


# -------------------------------------------------------------------------------- warm-up
def stage_warmup(ctx: Context, *, on_step_end=None) -> dict:
    cfg, sdir = ctx.cfg, ctx.dir("warmup")
    os.makedirs(sdir, exist_ok=True)
    _seed_all(cfg.seed)
    pairs = load_pairs(ctx, "train")
    # FSDP2: only the main process reads the weights (its model stays whole on its CPU, for saving);
    # the sharded module computes the reference and trains. Elsewhere accelerate wraps the model
    sharded = fsdp2_shards(ctx.accelerator)
    model = load_model(sft_model_path(ctx), empty=sharded and not ctx.main)
    scorer = None
    if sharded:
        scorer = sharded_scorer(ctx.accelerator, model, prepare=lambda m: prepare_trainable(m, None, cfg))
    ref = cached_reference(ctx, sdir, model, _pair_views(pairs), scorer=scorer)
    last = train_stage(accelerator=ctx.accelerator, cfg=cfg, stage_dir=sdir, model=model, tokenizer=ctx.tokenizer,
                       data=StageData("dpo", pairs, ref), lr=cfg.learning_rate, masks=None, dense=True,
                       desc="warmup (DPO, all parameters)", scorer=scorer, on_step_end=on_step_end)
    if ctx.main:
        save_model(model, ctx.tokenizer, os.path.join(sdir, "model"))
    mark_done(ctx, sdir, {"last_metrics": last})
    return last


# -------------------------------------------------------------------------------- select
def _scores(ctx: Context, base):
    from allo.select import weight_delta_scores

    if ctx.cfg.score_source == "weight_delta":
        warm = load_model(os.path.join(_require(ctx, "warmup", "model")))
        return weight_delta_scores(warm, base)
    return _gradient_scores(ctx, TokenLogprobs(base.to(ctx.accelerator.device)), base, sharded=False)


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
        for b in range(cfg.score_batches):
            idx = order[(b * bs) % len(pairs):][:bs]
            scale = 1.0
            if sharded:
                mine = idx[ctx.accelerator.process_index * per:][:per]
                # the mean over the global batch, after FSDP2 averages the ranks: 1.0 for equal parts.
                # A rank with no part (a short last batch) still runs a backward (collectives), worth 0
                scale = len(mine) * world / len(idx)
                idx = mine or idx[:1]
            batch = D.collate(D.pair_examples([pairs[i] for i in idx]), ctx.tokenizer.pad_token_id)
            mask = batch["labels"][:, 1:] != D.IGNORE_INDEX
            with ctx.accelerator.autocast():
                lp = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
            n = len(idx)
            # at theta_0 the reference is the policy itself: d_t = 0, the gradient is not
            loss, _ = dpo_loss(lp[:n], lp[n:], lp[:n].detach(), lp[n:].detach(), mask[:n], mask[n:], beta=cfg.beta)
            (loss * scale if sharded else loss).backward()
        scores = acc.scores()
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
        warm_path = _require(ctx, "warmup", "model")  # on every rank: all fail alike, none waits
        model = load_model(sft_model_path(ctx), empty=not ctx.main)
        base = sharded_scorer(acc, model)
        del model
        model = load_model(warm_path, empty=not ctx.main)
        warm = sharded_scorer(acc, model)
        del model
        scores = weight_delta_scores(warm.model, base.model)
    else:
        model = load_model(sft_model_path(ctx), empty=not ctx.main)
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
            base = load_model(sft_model_path(ctx))
            scores, blocks = _scores(ctx, base), None
            shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
        scores = _ranked(cfg, scores, shapes, blocks)
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


def _write_selection(ctx: Context, sdir: str, stage: str, sel, info: dict) -> None:
    sel.save(os.path.join(sdir, f"{stage}_mask.safetensors"))
    with open(os.path.join(sdir, f"{stage}_mask_summary.txt"), "w") as f:
        f.write(sel.summary())
    try:
        sel.plot(os.path.join(sdir, f"{stage}_mask.png"))
    except Exception as e:  # a plot is a nicety; the masks are what matter
        ctx.log(f"select: could not plot the {stage} mask ({e})")
    info[f"{stage}_selected"] = sel.num_selected()
    info["total_elements"] = sel.num_total()


def _mask_file(ctx: Context, stage: str) -> str | None:
    if ctx.cfg.selection == "none":
        return None
    path = _require(ctx, "select", f"{stage}_mask.safetensors")
    info = _done_info(ctx.dir("select"))
    if info.get("selection") != ctx.cfg.selection:
        raise ValueError(f"{ctx.dir('select')} holds a '{info.get('selection')}' selection but --selection is "
                         f"'{ctx.cfg.selection}'; use another --output_dir or delete that folder")
    return path


def _masked_stage_start(ctx: Context, stage: str, path: str, desc: str):
    """The starting point of a masked stage: (model, scorer, masks, mask file).

    One process or DDP: the model loaded whole, no scorer (``train_stage`` wraps the model), the
    selection's bool masks. FSDP2: only the main process reads the weights (its model stays on the
    CPU, for saving); the others build the model on the meta device from its config (names and
    shapes, no memory) and never use it. The scorer is the stage's sharded module (holding the
    weights, every rank its shards; the reference pass and the training run through it) and
    ``masks`` this rank's part of the selection: the global flat indices of the selected elements in
    its own rows of each trained parameter, read from the file without building a mask."""
    from allo.select import Selection

    # asked on every rank: FSDP1 / DeepSpeed stop all of them here with the same error
    sharded = masked_stage_shards(ctx.accelerator, desc)
    model = load_model(path, empty=sharded and not ctx.main)
    mask_file = _mask_file(ctx, stage)
    if not sharded:
        return model, None, None if mask_file is None else Selection.load(mask_file, model).masks, mask_file
    # which parameters train must agree on every rank (FSDP2's collectives): the whole selection's counts
    counts = None if mask_file is None else Selection.load_counts(mask_file, model)
    trainable = None if counts is None else {n: c > 0 for n, c in counts.items()}
    scorer = sharded_scorer(ctx.accelerator, model, prepare=lambda m: prepare_trainable(m, trainable, ctx.cfg))
    masks = None
    if mask_file is not None:
        rows = {n: flat_range(p) for n, p in scorer.model.named_parameters() if p.requires_grad}
        masks = Selection.load_indices(mask_file, rows)
    return model, scorer, masks, mask_file


# -------------------------------------------------------------------------------- forget
def _eos_free_mask(ctx: Context, examples, lengths) -> torch.Tensor:
    """[B, T] mask of response tokens, the final end-of-sequence token left out (never forgotten)."""
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, (e, n) in enumerate(zip(examples, lengths)):
        mask[i, :n] = True
        if n > 1 and e["response_ids"][-1] == ctx.tokenizer.eos_token_id:
            mask[i, n - 1] = False
    return mask


def _token_weights(ctx: Context, sdir: str, negs, ref, model=None, scorer=None) -> list[torch.Tensor]:
    """Per-token forgetting weights of every negative (see --token_weight_source). ``scorer``: FSDP2,
    the stage's sharded module holding the weights of ``model`` (the main process's whole model)."""
    from torch.nn.utils.rnn import pad_sequence

    from allo.losses.token_weights import token_weights_from_implicit_reward, token_weights_from_probs

    cfg = ctx.cfg
    source = cfg.token_weight_source
    if source == "auto":
        source = "data" if negs and "weights" in negs[0] else "implicit_reward"
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
    todo = ctx.main and not os.path.exists(path)  # main only: see cached_reference
    if scorer is not None:
        todo = _main_decides(todo)
    if todo:
        kw = dict(pad_id=ctx.tokenizer.pad_token_id, batch_size=_scorer_batch(ctx), device=ctx.accelerator.device,
                  autocast=ctx.accelerator.autocast)
        if scorer is None:
            warm = load_model(_require(ctx, "warmup", "model")).to(ctx.accelerator.device)
            lp_warm = compute_logps(TokenLogprobs(warm), negs, **kw)
        else:
            # FSDP2: the stage's sharded module scores with the warm-up weights (the main process loads
            # them whole, on its CPU only), then gets the stage's own back: no second model anywhere
            warm_path = _require(ctx, "warmup", "model")  # on every rank: all fail alike, none waits
            load_weights(scorer, load_model(warm_path) if ctx.main else None)
            lp_warm = sharded_logps(scorer, negs, **kw)
            load_weights(scorer, model)
        if ctx.main:
            w = token_weights_from_implicit_reward(pad_sequence(lp_warm, batch_first=True),
                                                   pad_sequence(ref["response"], batch_first=True), mask,
                                                   fraction=cfg.implicit_token_fraction)
            save_cache(path, {"weights": [w[i, :n].contiguous() for i, n in enumerate(lengths)]})
    ctx.accelerator.wait_for_everyone()
    return load_cache(path)["weights"]


def stage_forget(ctx: Context, *, on_step_end=None) -> dict:
    cfg, sdir = ctx.cfg, ctx.dir("forget")
    os.makedirs(sdir, exist_ok=True)
    if cfg.skip_forget:
        mark_done(ctx, sdir, {"skipped": True})
        return {}
    _seed_all(cfg.seed)
    field = None
    if cfg.token_weight_source == "data" or (cfg.token_weight_source == "auto" and _negatives_have(ctx, "token_weights")):
        field = "token_weights"
    elif cfg.token_weight_source == "reward_model_probs":
        field = "keep_probs"
    negs = _load_negatives(ctx, field)
    desc = "forget (token-weighted NPO)"
    model, scorer, masks, mask_file = _masked_stage_start(ctx, "forget", sft_model_path(ctx), desc)
    ref = cached_reference(ctx, sdir, model, {"response": negs}, scorer=scorer)
    weights = _token_weights(ctx, sdir, negs, ref, model=model, scorer=scorer)
    last = train_stage(accelerator=ctx.accelerator, cfg=cfg, stage_dir=sdir, model=model, tokenizer=ctx.tokenizer,
                       data=StageData("forget", negs, ref, weights), lr=cfg.forget_learning_rate, masks=masks,
                       dense=False, masks_file=mask_file, desc=desc, scorer=scorer, on_step_end=on_step_end)
    if ctx.main:
        save_model(model, ctx.tokenizer, os.path.join(sdir, "model"))
    mark_done(ctx, sdir, {"last_metrics": last})
    return last


# -------------------------------------------------------------------------------- improve
def stage_improve(ctx: Context, *, on_step_end=None) -> dict:
    cfg, sdir = ctx.cfg, ctx.dir("improve")
    os.makedirs(sdir, exist_ok=True)
    _seed_all(cfg.seed)
    pairs = load_pairs(ctx, "train")
    fdir = ctx.dir("forget")
    if cfg.skip_forget:
        start = sft_model_path(ctx)
    else:
        start = _require(ctx, "forget", "model")
        if _done_info(fdir).get("skipped"):
            raise ValueError(f"{fdir} was skipped (--skip_forget) but --skip_forget is not set now; use another "
                             "--output_dir or delete that folder")
    desc = f"improve ({'key tokens' if cfg.key_tokens else 'DPO'})"
    model, scorer, masks, mask_file = _masked_stage_start(ctx, "improve", start, desc)
    ref = cached_reference(ctx, sdir, model, _pair_views(pairs), scorer=scorer)
    kind = "improve" if cfg.key_tokens else "dpo"
    last = train_stage(accelerator=ctx.accelerator, cfg=cfg, stage_dir=sdir, model=model, tokenizer=ctx.tokenizer,
                       data=StageData(kind, pairs, ref), lr=cfg.improve_learning_rate, masks=masks, dense=False,
                       masks_file=mask_file, desc=desc, scorer=scorer, on_step_end=on_step_end)
    if ctx.main:
        save_model(model, ctx.tokenizer, os.path.join(sdir, "model"))
    mark_done(ctx, sdir, {"last_metrics": last, "started_from": start})
    return last


# -------------------------------------------------------------------------------- eval
def _model_of(ctx: Context, name: str) -> str | None:
    if name == "sft":
        return sft_model_path(ctx)
    d = ctx.dir(name)
    if is_done(d) and os.path.isdir(os.path.join(d, "model")):
        return os.path.join(d, "model")
    return None


@torch.no_grad()
def evaluate_model(ctx: Context, model, pairs, ref, problems) -> dict:
    """Held-out reward metrics against the SFT model (TRL's eval_ names) and answer accuracy."""
    from allo.losses import dpo_loss

    from .tasks import is_correct

    out = {}
    if pairs:
        views = _pair_views(pairs)
        scorer = TokenLogprobs(model)
        kw = dict(pad_id=ctx.tokenizer.pad_token_id, batch_size=_scorer_batch(ctx), device=ctx.accelerator.device,
                  autocast=ctx.accelerator.autocast)
        pol = {k: compute_logps(scorer, v, **kw) for k, v in views.items()}
        pc, pr = torch.nn.utils.rnn.pad_sequence(pol["chosen"], True), torch.nn.utils.rnn.pad_sequence(pol["rejected"], True)
        rc, rr = torch.nn.utils.rnn.pad_sequence(ref["chosen"], True), torch.nn.utils.rnn.pad_sequence(ref["rejected"], True)
        cm = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in pol["chosen"]], True)
        rm = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in pol["rejected"]], True)
        loss, metrics = dpo_loss(pc, pr, rc, rr, cm, rm, beta=ctx.cfg.beta)
        out["eval_loss"] = float(loss)
        out.update({f"eval_{k}": float(v) for k, v in metrics.items()})
    if problems:
        texts = generate(model, ctx.tokenizer, [p["prompt"] for p in problems], max_new_tokens=ctx.cfg.max_new_tokens,
                         batch_size=256, progress=ctx.progress, desc="eval: greedy answers")
        out["eval_answer_accuracy"] = sum(is_correct(t[0], p["answer"]) for t, p in zip(texts, problems)) / len(problems)
    return out


def stage_eval(ctx: Context) -> dict:
    from .report import write_report

    cfg, sdir = ctx.cfg, ctx.dir("eval")
    os.makedirs(sdir, exist_ok=True)
    results = {}
    if ctx.main:
        pairs = load_pairs(ctx, "eval")
        problems = None
        prob_src = cfg.eval_problems_file or (os.path.join(ctx.dir("prepare"), "eval_problems.jsonl")
                                              if uses_builtin_data(cfg) or cfg.problems_file else None)
        if prob_src and os.path.exists(prob_src):
            problems, _ = D.load_problems(prob_src, skip_bad_rows=cfg.skip_bad_rows)
        ref = None
        wanted = cfg.eval_model_list()
        for name in EVALUATED:
            if name not in wanted:
                continue
            path = _model_of(ctx, name)
            if path is None:
                continue
            out_path = os.path.join(sdir, f"{name}.json")
            if os.path.exists(out_path):
                with open(out_path) as f:
                    results[name] = json.load(f)
                continue
            model = load_model(path).to(ctx.accelerator.device).eval()
            if ref is None and pairs:
                sft = model if name == "sft" else load_model(sft_model_path(ctx)).to(ctx.accelerator.device)
                ref = cached_reference(ctx, sdir, sft, _pair_views(pairs), name="sft_reference_logps", sync=False)
            results[name] = evaluate_model(ctx, model, pairs, ref, problems)
            tmp = out_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(results[name], f, indent=1)
            os.replace(tmp, out_path)
        write_report(ctx.cfg.output_dir, results)
    mark_done(ctx, sdir, {"results": results})
    return results


STAGE_FUNCS = {"prepare": stage_prepare, "warmup": stage_warmup, "select": stage_select, "forget": stage_forget,
               "improve": stage_improve, "eval": stage_eval}
