"""prepare: the built-in task's SFT model, then sampled responses judged by their final answer and
paired (correct vs wrong), plus the negatives set (METHOD.md, stage 0)."""

from __future__ import annotations

import os
import random
import time

from .. import data as D
from .. import model as models
from ..model import build_tiny_model, generate, save_model, sft_train
from .common import Context, mark_done, seed_all


def build_pairs(problems: list[dict], samples: list[list[str]], *, max_pairs: int, seed: int):
    """Judge samples by their final answer; pair every correct with every wrong response (distinct
    ones), keep at most ``max_pairs`` per problem (a seeded random choice); negatives are the
    distinct wrong responses. Returns (pairs, negatives, stats)."""
    from ..tasks import is_correct

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
    from ..tasks import make_problems

    cfg, sdir = ctx.cfg, ctx.dir("prepare")
    info = {}
    if ctx.main:
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
            save_model(model, ctx.tokenizer, os.path.join(sdir, "model"))
            train_rows = [{"prompt": p.prompt, "answer": p.answer} for p in trainp]
            eval_rows = [{"prompt": p.prompt, "answer": p.answer} for p in evalp]
        else:
            if not cfg.problems_file:
                raise ValueError("`prepare` with --model_name_or_path needs --problems_file (prompt, answer rows), "
                                 "or give preference pairs directly with --train_file")
            model = models.load_model(cfg.model_name_or_path).to(ctx.accelerator.device)
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
