"""eval: held-out reward accuracy and margins (reference: the SFT model) and answer accuracy of every
stage's model; the report table and plots."""

from __future__ import annotations

import json
import os

import torch

from .. import data as D
from .. import model as models
from ..fsdp import fsdp2_shards, load_weights, sharded_generate, sharded_logps, sharded_scorer
from ..logps import TokenLogprobs, compute_logps
from ..model import generate
from .common import (EVALUATED, Context, cache_is_current, cached_reference, from_main, inputs_key, is_done,
                     load_pairs, mark_done, pair_views, scorer_batch, sft_model_path, uses_builtin_data,
                     warmup_model_path)



NOTHING_HELD_OUT = ("no held-out pairs: pass --eval_file to evaluate (held-out preference pairs: reward accuracy and "
                    "margins; --eval_problems_file: answer accuracy); nothing was evaluated")


def _model_of(ctx: Context, name: str) -> str | None:
    if name == "sft":
        return sft_model_path(ctx)
    if name == "warmup" and ctx.cfg.warmup_model_path is not None:
        return warmup_model_path(ctx)
    d = ctx.dir(name)
    if is_done(d) and os.path.isdir(os.path.join(d, "model")):
        return os.path.join(d, "model")
    return None


def _load_for_eval(ctx: Context, path: str):
    return models.load_model(path, dtype=ctx.weights_dtype, options=ctx.load_options).to(ctx.accelerator.device).eval()


def _load_problems(ctx: Context):
    cfg = ctx.cfg
    prob_src = cfg.eval_problems_file or (os.path.join(ctx.dir("prepare"), "eval_problems.jsonl")
                                          if uses_builtin_data(cfg) or cfg.problems_file else None)
    if prob_src and os.path.exists(prob_src):
        problems, _ = D.load_problems(prob_src, skip_bad_rows=cfg.skip_bad_rows)
        return problems
    return None


def _reward_metrics(ctx: Context, pol: dict, ref: dict) -> dict:
    """TRL's eval_ reward metrics from the policy's and the reference's log-probs of the pairs."""
    from allo.losses import dpo_loss

    from torch.nn.utils.rnn import pad_sequence

    pc, pr = pad_sequence(pol["chosen"], True), pad_sequence(pol["rejected"], True)
    rc, rr = pad_sequence(ref["chosen"], True), pad_sequence(ref["rejected"], True)
    cm = pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in pol["chosen"]], True)
    rm = pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in pol["rejected"]], True)
    loss, metrics = dpo_loss(pc, pr, rc, rr, cm, rm, beta=ctx.cfg.beta)
    return {"eval_loss": float(loss), **{f"eval_{k}": float(v) for k, v in metrics.items()}}


def _answer_accuracy(texts, problems, pattern) -> float:
    from ..tasks import is_correct

    return sum(is_correct(t[0], p["answer"], pattern) for t, p in zip(texts, problems)) / len(problems)


@torch.no_grad()
def _evaluate(ctx: Context, pairs, ref, problems, *, logps, answers) -> dict | None:
    """What both paths measure. ``logps(examples)``: the evaluated model's per-token log-probs (None off
    the main process); ``answers(prompts, **kw)``: its greedy responses (likewise). The main process
    gets the metrics, the other ranks (FSDP2) None."""
    out = {}
    if pairs:
        pol = {k: logps(v) for k, v in pair_views(pairs).items()}
        if ctx.main:
            out.update(_reward_metrics(ctx, pol, ref))
    if problems:
        texts = answers([p["prompt"] for p in problems], batch_size=ctx.cfg.generation_batch_size,
                        max_new_tokens=ctx.cfg.max_new_tokens, progress=ctx.progress, desc="eval: greedy answers")
        if ctx.main:
            out["eval_answer_accuracy"] = _answer_accuracy(texts, problems, ctx.cfg.answer_pattern)
    return out if ctx.main else None


def _logps_kwargs(ctx: Context) -> dict:
    return dict(pad_id=ctx.tokenizer.pad_token_id, batch_size=scorer_batch(ctx), device=ctx.accelerator.device,
                autocast=ctx.accelerator.autocast)


def evaluate_model(ctx: Context, model, pairs, ref, problems) -> dict:
    """Held-out reward metrics against the SFT model (TRL's eval_ names) and answer accuracy."""
    scorer = TokenLogprobs(model)
    return _evaluate(ctx, pairs, ref, problems,
                     logps=lambda examples: compute_logps(scorer, examples, **_logps_kwargs(ctx)),
                     answers=lambda prompts, **kw: generate(model, ctx.tokenizer, prompts, **kw))


def evaluate_sharded(ctx: Context, scorer, pairs, ref, problems) -> dict | None:
    """``evaluate_model`` with the FSDP2 module ``scorer`` (holding the evaluated model's weights):
    every rank scores its share of the pairs and generates for its share of the problems; the main
    process gets the metrics, the other ranks None."""
    return _evaluate(ctx, pairs, ref, problems,
                     logps=lambda examples: sharded_logps(scorer, examples, **_logps_kwargs(ctx)),
                     answers=lambda prompts, **kw: sharded_generate(scorer, ctx.tokenizer, prompts, **kw))


def _result_key(ctx: Context, path: str, pairs, problems) -> str:
    """What a model's eval result is computed from (see inputs_key): its weights, the reference's,
    the held-out pairs and problems, and the options that change the numbers."""
    return inputs_key(ctx, models=[path, sft_model_path(ctx)], examples=pair_views(pairs).values() if pairs else (),
                      problems=problems, beta=ctx.cfg.beta, max_new_tokens=ctx.cfg.max_new_tokens,
                      answer_pattern=ctx.cfg.answer_pattern)


def _saved_result(ctx: Context, out_path: str, key: str) -> dict | None:
    """The result an earlier (interrupted) eval saved for these inputs, or None. A model trained again,
    or other eval data, is evaluated again: `allo-train eval` must not report the old model's numbers."""
    if not cache_is_current(ctx, out_path, key, stored_key=_stored_key):
        return None
    with open(out_path) as f:
        return json.load(f)


def _stored_key(out_path: str) -> str | None:
    try:
        with open(out_path + ".inputs") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _save_result(out_path: str, result: dict, key: str) -> None:
    D.write_json(out_path, result)
    # after the result: a kill between the two leaves a result that is not reused
    D.write_text(out_path + ".inputs", key)


def _eval_sharded(ctx: Context, sdir: str) -> dict | None:
    """FSDP2: one sharded module; rank 0 loads each evaluated model whole on its CPU only (the other
    ranks on the meta device) and broadcasts its weights into the shards, which every rank then
    scores and generates with. The main process decides what is evaluated and writes the results.
    None (on every rank): no held-out pairs or problems, nothing to evaluate."""
    pairs = load_pairs(ctx, "eval")  # every rank scores its share of them
    # on every rank (the SFT model's path may be missing): all fail alike, none waits
    todo = [(name, _model_of(ctx, name)) for name in EVALUATED if name in ctx.cfg.eval_model_list()]
    plan = None
    if ctx.main:
        problems = _load_problems(ctx)
        plan = (problems, [(n, p, _result_key(ctx, p, pairs, problems)) for n, p in todo if p])
    problems, todo = from_main(plan)
    results, scorer, holds, ref = {}, None, None, None
    if not pairs and not problems:
        return None

    def hold(name: str, path: str):
        nonlocal scorer, holds
        if holds != name:
            model = models.load_model(path, dtype=ctx.weights_dtype, empty=not ctx.main, options=ctx.load_options)
            if scorer is None:
                scorer = sharded_scorer(ctx.accelerator, model)
            else:
                load_weights(scorer, model)
            holds = name  # rank 0's whole copy is dropped here: the shards hold the weights

    for name, path, key in todo:
        out_path = os.path.join(sdir, f"{name}.json")
        saved = _saved_result(ctx, out_path, key) if ctx.main else None
        if from_main(saved is not None):
            if ctx.main:
                results[name] = saved
            continue
        if ref is None and pairs:
            hold("sft", sft_model_path(ctx))
            ref = cached_reference(ctx, sdir, None, pair_views(pairs), name="sft_reference_logps", scorer=scorer,
                                   model_path=sft_model_path(ctx))
        hold(name, path)
        result = evaluate_sharded(ctx, scorer, pairs, ref, problems)
        if ctx.main:
            results[name] = result
            _save_result(out_path, result, key)
    return results


def stage_eval(ctx: Context) -> dict:
    from ..report import write_report
    from ..reporting import report_results

    cfg, sdir = ctx.cfg, ctx.dir("eval")
    os.makedirs(sdir, exist_ok=True)
    results = {}
    if fsdp2_shards(ctx.accelerator):
        results = _eval_sharded(ctx, sdir)
        note = NOTHING_HELD_OUT if results is None else None  # (every rank agrees: None on all of them)
        results = results or {}
        if ctx.main:
            if note:
                ctx.log(f"eval: {note}")
            write_report(ctx.cfg.output_dir, results, note=note)
            report_results(sdir, cfg.report_to, results, config=cfg.to_dict())
    elif ctx.main:
        pairs = load_pairs(ctx, "eval")
        problems = _load_problems(ctx)
        ref = None
        note = None if pairs or problems else NOTHING_HELD_OUT
        wanted = [] if note else cfg.eval_model_list()
        if note:
            ctx.log(f"eval: {note}")
        for name in EVALUATED:
            if name not in wanted:
                continue
            path = _model_of(ctx, name)
            if path is None:
                continue
            out_path = os.path.join(sdir, f"{name}.json")
            key = _result_key(ctx, path, pairs, problems)
            saved = _saved_result(ctx, out_path, key)
            if saved is not None:
                results[name] = saved
                continue
            # one model on the device at a time (a 7B model is 28 GB in fp32): the last one is dropped before
            # the next loads, and the SFT model is loaded for the reference only when its cache is not current
            model = None
            if name == "sft":
                model = _load_for_eval(ctx, path)
            if ref is None and pairs:
                ref = cached_reference(ctx, sdir, model, pair_views(pairs), name="sft_reference_logps", sync=False,
                                       model_path=sft_model_path(ctx),
                                       load=lambda: _load_for_eval(ctx, sft_model_path(ctx)))
            if model is None:
                model = _load_for_eval(ctx, path)
            results[name] = evaluate_model(ctx, model, pairs, ref, problems)
            _save_result(out_path, results[name], key)
        write_report(ctx.cfg.output_dir, results, note=note)
        report_results(sdir, cfg.report_to, results, config=cfg.to_dict())
    mark_done(ctx, sdir, {"results": results})
    return results
