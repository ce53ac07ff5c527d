"""prepare: the built-in task's SFT model, then sampled responses judged by their final answer and
paired (correct vs wrong), plus the negatives set (METHOD.md, stage 0). Under FSDP2 the sampling runs on
the shards, every rank sampling its share of the problems (see ``_prepare_sharded``)."""

from __future__ import annotations

import os
import random
import time

from .. import data as D
from ..config import RunError
from .. import model as models
from ..fsdp import fsdp2_shards, sharded_generate, sharded_scorer
from ..model import build_tiny_model, generate, save_model, sft_train
from ..tasks import ANSWER_PATTERN, is_correct
from .common import Context, from_main, mark_done, seed_all


PREPARE_NEEDS_PROBLEMS = ("`prepare` with --model_name_or_path needs --problems_file (prompt, answer rows) to sample "
                          "and judge, or give preference pairs directly with --train_file (then `allo-train run` "
                          "skips prepare)")


def build_pairs(problems: list[dict], samples: list[list[str]], *, max_pairs: int, seed: int,
                pattern: str = ANSWER_PATTERN):
    """Judge samples by their final answer (``pattern``: see --answer_pattern); pair every correct with
    every wrong response (distinct ones), keep at most ``max_pairs`` per problem (a seeded random
    choice); negatives are the distinct wrong responses. Returns (pairs, negatives, stats)."""
    rng = random.Random(seed)
    pairs, negatives, n_correct, n_total = [], [], 0, 0
    for prob, outs in zip(problems, samples):
        judged = [(o, is_correct(o, prob["answer"], pattern)) for o in outs]
        right = list(dict.fromkeys(o for o, ok in judged if ok))
        wrong = list(dict.fromkeys(o for o, ok in judged if not ok))
        n_correct += sum(ok for _, ok in judged)
        n_total += len(outs)
        combos = [(c, w) for c in right for w in wrong]
        rng.shuffle(combos)
        pairs += [{"prompt": prob["prompt"], "chosen": c, "rejected": w} for c, w in combos[:max_pairs]]
        negatives += [{"prompt": prob["prompt"], "response": w} for w in wrong]
    stats = {"sample_accuracy": n_correct / max(n_total, 1), "pairs": len(pairs), "negatives": len(negatives),
             "problems_with_pairs": len({p["prompt"] for p in pairs}), "problems": len(problems)}
    return pairs, negatives, stats


def _sampling_plan(ctx: Context, sdir: str, info: dict, *, load: bool):
    """Main process: the SFT model (the built-in task: SFT-trained and saved here) and the problems of
    each split. Returns (model, model_path, train_rows, eval_rows): ``model`` whole on the accelerator
    (the built-in one as trained; --model_name_or_path loaded only with ``load``, else None) and the
    folder it is saved in, from which the FSDP2 path loads it."""
    from ..tasks import make_problems

    cfg = ctx.cfg
    os.makedirs(sdir, exist_ok=True)
    seed_all(cfg.seed)
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
        path = os.path.join(sdir, "model")
        save_model(model, ctx.tokenizer, path)
        train_rows = [{"prompt": p.prompt, "answer": p.answer} for p in trainp]
        eval_rows = [{"prompt": p.prompt, "answer": p.answer} for p in evalp]
        return model, path, train_rows, eval_rows
    if not cfg.problems_file:
        raise RunError(PREPARE_NEEDS_PROBLEMS)
    model = None
    if load:
        model = models.load_model(cfg.model_name_or_path, dtype=ctx.weights_dtype,
                                  options=ctx.load_options).to(ctx.accelerator.device)
    train_rows, rep = D.load_problems(cfg.problems_file, skip_bad_rows=cfg.skip_bad_rows)
    ctx.log(str(rep))
    if cfg.eval_problems_file:
        eval_rows, rep = D.load_problems(cfg.eval_problems_file, skip_bad_rows=cfg.skip_bad_rows)
    else:
        cut = max(1, len(train_rows) // 10)
        train_rows, eval_rows = train_rows[cut:], train_rows[:cut]
    return model, cfg.model_name_or_path, train_rows, eval_rows


def _sample_kwargs(ctx: Context, split: str) -> dict:
    cfg = ctx.cfg
    return dict(num_return_sequences=cfg.num_samples, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size, seed=cfg.seed + (split == "eval"),
                progress=ctx.progress, desc=f"prepare: sampling {split}")


def _judge_and_write(ctx: Context, sdir: str, info: dict, rows: dict, samples: dict) -> None:
    """Main process: judge every split's samples, pair them, write the stage's files."""
    cfg, outputs = ctx.cfg, {}
    for split in ("train", "eval"):
        pairs, negs, stats = build_pairs(rows[split], samples[split], max_pairs=cfg.max_pairs_per_problem,
                                         seed=cfg.seed, pattern=cfg.answer_pattern)
        outputs[split] = (pairs, negs)
        info[split] = stats
    D.write_jsonl(os.path.join(sdir, "train_pairs.jsonl"), outputs["train"][0])
    D.write_jsonl(os.path.join(sdir, "negatives.jsonl"), outputs["train"][1])
    D.write_jsonl(os.path.join(sdir, "eval_pairs.jsonl"), outputs["eval"][0])
    D.write_jsonl(os.path.join(sdir, "eval_problems.jsonl"), rows["eval"])
    if not outputs["train"][0]:
        raise RunError(_no_pairs_message(ctx.cfg, info["train"]))
    ctx.log(f"prepare: {info}")


def _no_pairs_message(cfg, stats: dict) -> str:
    acc = stats.get("sample_accuracy")
    seen = f" (sample accuracy {acc:.2f})" if isinstance(acc, (int, float)) else ""
    if cfg.model_name_or_path is None:
        fix = (f"the built-in model was SFT-trained for --sft_steps {cfg.sft_steps}: raise --sft_steps (default "
               f"{type(cfg).sft_steps}) if its samples are all wrong, or --num_samples (now {cfg.num_samples}) for "
               "more samples a problem")
    else:
        fix = (f"sample more (--num_samples, now {cfg.num_samples}) or start from a model that solves some but not "
               "all of the problems")
    return (f"prepare: no problem had both a correct and a wrong sample{seen}, so there are no preference pairs; "
            + fix)


def _prepare_sharded(ctx: Context, sdir: str, info: dict) -> None:
    """FSDP2: the main process builds the plan (the built-in task's SFT model trained and saved there,
    as without FSDP) and every rank samples its share of each split's problems with the sharded model
    (``sharded_generate``): rank 0 loads the SFT model whole on its CPU only, the other ranks on the
    meta device, and rank 0 broadcasts the weights into the shards. The main process judges, pairs
    and writes the same files as one process. Each rank samples with its own seed per batch (derived
    from --seed): the samples are reproducible for a given seed and number of processes, and differ
    from one process's (other random streams), as they would with any other number of processes."""
    def plan():
        model, path, train_rows, eval_rows = _sampling_plan(ctx, sdir, info, load=False)
        del model  # the built-in model as trained: the sampling loads it from `path` on the CPU, like every stage
        return path, {"train": train_rows, "eval": eval_rows}

    path, rows = _on_main(ctx, plan)
    model = models.load_model(path, dtype=ctx.weights_dtype, empty=not ctx.main, options=ctx.load_options)
    scorer = sharded_scorer(ctx.accelerator, model)
    del model  # rank 0's whole copy: the shards hold the weights now
    samples = {}
    for split in ("train", "eval"):
        samples[split] = sharded_generate(scorer, ctx.tokenizer, [r["prompt"] for r in rows[split]],
                                          **_sample_kwargs(ctx, split))
    _on_main(ctx, lambda: _judge_and_write(ctx, sdir, info, rows, samples))


def _on_main(ctx: Context, fn):
    """``fn()`` run by the main process, its result on every rank (collective). Should it fail, every
    rank raises (the main process its error) instead of the others waiting for it at the next collective."""
    out, error = None, None
    if ctx.main:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = e
    ok, out = from_main((error is None, out))
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError("prepare: the main process failed (its error is in its log); this rank stops too")
    return out


def stage_prepare(ctx: Context) -> dict:
    sdir = ctx.dir("prepare")
    info = {}
    if fsdp2_shards(ctx.accelerator):
        _prepare_sharded(ctx, sdir, info)
    elif ctx.main:
        model, _, train_rows, eval_rows = _sampling_plan(ctx, sdir, info, load=True)
        rows = {"train": train_rows, "eval": eval_rows}
        samples = {split: generate(model, ctx.tokenizer, [r["prompt"] for r in rows[split]],
                                   **_sample_kwargs(ctx, split))
                   for split in ("train", "eval")}
        _judge_and_write(ctx, sdir, info, rows, samples)
    mark_done(ctx, sdir, info)
    return info
