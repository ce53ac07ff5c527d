"""eval: held-out reward accuracy and margins (reference: the SFT model) and answer accuracy of every
stage's model; the report table and plots."""

from __future__ import annotations

import json
import os

import torch

from .. import data as D
from .. import model as models
from ..logps import TokenLogprobs, compute_logps
from ..model import generate
from .common import (EVALUATED, Context, cached_reference, is_done, load_pairs, mark_done, pair_views, scorer_batch,
                     sft_model_path, uses_builtin_data)


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

    from ..tasks import is_correct

    out = {}
    if pairs:
        views = pair_views(pairs)
        scorer = TokenLogprobs(model)
        kw = dict(pad_id=ctx.tokenizer.pad_token_id, batch_size=scorer_batch(ctx), device=ctx.accelerator.device,
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
    from ..report import write_report

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
            model = models.load_model(path).to(ctx.accelerator.device).eval()
            if ref is None and pairs:
                sft = model if name == "sft" else models.load_model(sft_model_path(ctx)).to(ctx.accelerator.device)
                ref = cached_reference(ctx, sdir, sft, pair_views(pairs), name="sft_reference_logps", sync=False)
            results[name] = evaluate_model(ctx, model, pairs, ref, problems)
            tmp = out_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(results[name], f, indent=1)
            os.replace(tmp, out_path)
        write_report(ctx.cfg.output_dir, results)
    mark_done(ctx, sdir, {"results": results})
    return results
