"""allo-train's stage semantics (METHOD.md), pinned where the end-to-end tests could not fail: which
model each stage's reference is, which responses the forgetting stage trains on and with which token
weights, which pair of models the masks come from and with which ratio, each stage's own learning
rate, the improve stage's eps, gradient accumulation, epochs and the learning-rate warm-up, skipping
completed stages, and that eval scores the held-out pairs.

One pipeline run on a ~10k-parameter Llama (a module fixture) records what every trained stage hands
to the training loop; the tests read that record and the stages' files.
"""

import contextlib
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from allo.train import TrainConfig, pipeline
from allo.train import loop as train_loop
from allo.train import model as models
from allo.train.logps import TokenLogprobs, compute_logps, load_cache
from allo.train.tasks import ANSWER_PREFIX, make_problems
from allo.train.tokenizer import load_builtin_tokenizer

LRS = dict(learning_rate=1e-2, forget_learning_rate=3e-2, improve_learning_rate=2e-2)
RATIOS = dict(forget_ratio=0.02, improve_ratio=0.07)
EPS = 0.3


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _wrong(p, delta):
    return p.solution.replace(f"{ANSWER_PREFIX} {p.answer}.", f"{ANSWER_PREFIX} {p.answer + delta}.")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny random Llama and arithmetic pairs: every prompt has two different wrong responses, and
    its first pair is repeated (12 prompts, 36 pairs, 24 distinct wrong responses); 4 held-out pairs."""
    root = tmp_path_factory.mktemp("semantics")
    tok = load_builtin_tokenizer()
    models.save_model(models.build_tiny_model(tok, hidden_size=16, num_layers=1, seed=0), tok, str(root / "sft"))
    train = make_problems("arithmetic", 12, 0)
    held = make_problems("arithmetic", 4, 1, exclude={p.prompt for p in train})
    rows = []
    for p in train:
        a, b = ({"prompt": p.prompt, "chosen": p.solution, "rejected": _wrong(p, d)} for d in (1, -2))
        rows += [a, b, a]
    _write_jsonl(root / "train.jsonl", rows)
    _write_jsonl(root / "eval.jsonl", [{"prompt": p.prompt, "chosen": p.solution, "rejected": _wrong(p, 3)}
                                       for p in held])
    return root


def _cfg(data, out, **kw):
    base = dict(model_name_or_path=str(data / "sft"), train_file=str(data / "train.jsonl"),
                eval_file=str(data / "eval.jsonl"), output_dir=str(out), per_device_train_batch_size=4, max_steps=2,
                logging_steps=1, disable_tqdm=True, report_to="jsonl", seed=5, eps=EPS, **LRS, **RATIOS,
                use_cpu=True)  # the data flow is the point: on a GPU machine too, compared with CPU recomputations
    base.update(kw)
    return TrainConfig(**base)


class _Spy:
    """Records what each trained stage hands to ``loop.train_stage`` and every eps ``improve_loss`` gets."""

    def __init__(self, mp):
        import allo.losses

        self.calls, self.eps = {}, []
        real_train, real_improve = train_loop.train_stage, allo.losses.improve_loss

        def train_stage(**kw):
            self.calls[os.path.basename(kw["stage_dir"])] = kw
            return real_train(**kw)

        def improve_loss(*a, **kw):
            self.eps.append(kw.get("eps"))
            return real_improve(*a, **kw)

        mp.setattr(train_loop, "train_stage", train_stage)
        mp.setattr(allo.losses, "improve_loss", improve_loss)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = _cfg(data, out, stages="warmup,select,forget,improve,eval")
    with pytest.MonkeyPatch.context() as mp:
        spy = _Spy(mp)
        res = pipeline.run(cfg)
    with pytest.MonkeyPatch.context() as mp:
        again = _Spy(mp)
        res_again = pipeline.run(cfg)
    return dict(out=out, cfg=cfg, spy=spy, res=res, again=again, res_again=res_again)


def _logps(path, examples):
    model = models.load_model(str(path))
    tok = load_builtin_tokenizer()
    return compute_logps(TokenLogprobs(model), examples, pad_id=tok.pad_token_id, batch_size=64,
                         device=torch.device("cpu"), autocast=contextlib.nullcontext)


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _views(pairs, side):
    return [{"prompt_ids": p["prompt_ids"], "response_ids": p[f"{side}_ids"]} for p in pairs]


# ------------------------------------------------------------------------------------ references
def test_forget_reference_is_the_sft_model(run, data):
    d = run["spy"].calls["forget"]["data"]
    ref = d.reference["response"]
    sft = _logps(data / "sft", d.examples)
    warm = _logps(run["out"] / "warmup" / "model", d.examples)
    assert _max_diff(ref, sft) < 1e-6
    assert _max_diff(ref, warm) > 1e-4  # (the two candidates are distinguishable)


def test_improve_reference_is_the_forget_stages_model(run, data):
    d = run["spy"].calls["improve"]["data"]
    forget = run["out"] / "forget" / "model"
    for side in ("chosen", "rejected"):
        ref = d.reference[side]
        assert _max_diff(ref, _logps(forget, _views(d.examples, side))) < 1e-6, side
        assert _max_diff(ref, _logps(data / "sft", _views(d.examples, side))) > 1e-4, side
    assert json.load(open(run["out"] / "improve" / "DONE"))["started_from"] == str(forget)


# -------------------------------------------------------------------------- forgetting's inputs
def test_forget_trains_on_every_distinct_wrong_response_and_no_chosen_one(run):
    calls = run["spy"].calls
    pairs = calls["warmup"]["data"].examples
    negs = calls["forget"]["data"].examples
    got = [(tuple(e["prompt_ids"]), tuple(e["response_ids"])) for e in negs]
    want = {(tuple(p["prompt_ids"]), tuple(p["rejected_ids"])) for p in pairs}
    assert len(pairs) == 36 and len(want) == 24
    assert len(got) == len(set(got)) and set(got) == want
    chosen = {(tuple(p["prompt_ids"]), tuple(p["chosen_ids"])) for p in pairs}
    assert not set(got) & chosen


def test_default_token_weights_mark_what_the_warmup_pushed_down(run, data):
    """--token_weight_source auto with no weights in the data: the implicit reward of the warm-up model,
    r_t = log pi_warm - log pi_0, weights 1 on the most negative fraction of each response (r_t < 0 only)."""
    from torch.nn.utils.rnn import pad_sequence

    from allo.losses.token_weights import token_weights_from_implicit_reward

    d = run["spy"].calls["forget"]["data"]
    warm = _logps(run["out"] / "warmup" / "model", d.examples)
    sft = _logps(data / "sft", d.examples)
    eos = load_builtin_tokenizer().eos_token_id
    lengths = [len(e["response_ids"]) for e in d.examples]
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, (e, n) in enumerate(zip(d.examples, lengths)):
        mask[i, :n] = True
        mask[i, n - 1] = e["response_ids"][-1] != eos
    want = token_weights_from_implicit_reward(pad_sequence(warm, batch_first=True), pad_sequence(sft, batch_first=True),
                                              mask, fraction=run["cfg"].implicit_token_fraction)
    total = 0
    for i, w in enumerate(d.weights):
        torch.testing.assert_close(w, want[i, :lengths[i]], rtol=0, atol=0)
        r = warm[i] - sft[i]
        assert bool((r[w != 0] < 0).all()), i  # only tokens the warm-up pushed down
        total += int((w != 0).sum())
    assert total > 0


@pytest.mark.parametrize("raw", [False, True])
def test_reward_model_keep_probs_become_weights_1_below_one_half(data, tmp_path, raw):
    from allo.train.pipeline import make_context
    from allo.train.stages.common import load_negatives
    from allo.train.stages.forget import _token_weights

    tok = load_builtin_tokenizer()
    rng = random.Random(0)
    rows, probs = [], []
    for p in make_problems("arithmetic", 3, 0):
        resp = _wrong(p, 1)
        n = len(tok(resp, add_special_tokens=False)["input_ids"])
        ps = [rng.choice([0.0, 0.2, 0.49, 0.5, 0.51, 0.9, 1.0]) for _ in range(n)]
        rows.append({"prompt": p.prompt, "response": resp, "keep_probs": ps})
        probs.append(ps)
    _write_jsonl(tmp_path / "negs.jsonl", rows)
    ctx = make_context(_cfg(data, tmp_path / "out", negatives_file=str(tmp_path / "negs.jsonl"),
                            token_weight_source="reward_model_probs", raw_reward_probs=raw, stages="forget",
                            per_device_train_batch_size=3))  # (3 negatives: a forget stage needs a batch of them)
    negs = load_negatives(ctx, "keep_probs")
    weights = _token_weights(ctx, str(tmp_path / "out" / "forget"), negs, None)
    for w, ps in zip(weights, probs):
        want = torch.tensor([p if raw else float(p < 0.5) for p in ps] + [0.0])  # + the end of sequence: never
        torch.testing.assert_close(w, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- the masks
def test_masks_are_the_top_ratios_of_warmup_minus_sft_each_stage_its_own(run, data):
    from allo.select import Selection, select, weight_delta_scores

    out = run["out"]
    sft, warm = models.load_model(str(data / "sft")), models.load_model(str(out / "warmup" / "model"))
    scores = weight_delta_scores(warm, sft)
    total = sum(p.numel() for p in sft.parameters())
    for stage in ("forget", "improve"):
        ratio = RATIOS[f"{stage}_ratio"]
        saved = Selection.load(str(out / "select" / f"{stage}_mask.safetensors")).indices
        want = select(scores, ratio).indices
        assert saved.keys() == want.keys()
        for name in want:
            assert torch.equal(saved[name].sort().values, want[name].sort().values), (stage, name)
        assert sum(v.numel() for v in saved.values()) == round(ratio * total), stage
        # the stage trains with its own mask
        call = run["spy"].calls[stage]
        assert os.path.basename(call["masks_file"]) == f"{stage}_mask.safetensors"
        assert sum(v.numel() for v in call["masks"].values()) == round(ratio * total), stage
    # the scores are not all-zero (|theta_warm - theta_warm|, or a selection before the warm-up, would be)
    assert any(float(s.materialize().max() if hasattr(s, "materialize") else s.max()) > 0 for s in scores.values())


def test_masked_stages_leave_every_other_element_bit_identical(run, data):
    from allo.select import Selection

    out = run["out"]
    before = {"forget": load_file(str(data / "sft" / "model.safetensors")),
              "improve": load_file(str(out / "forget" / "model" / "model.safetensors"))}
    for stage in ("forget", "improve"):
        masks = Selection.load(str(out / "select" / f"{stage}_mask.safetensors")).masks
        after = load_file(str(out / stage / "model" / "model.safetensors"))
        changed = 0
        for name, w in after.items():
            diff = w != before[stage][name]
            assert not (diff & ~masks[name]).any(), (stage, name)
            changed += int(diff.sum())
        assert changed > 0, stage


# ------------------------------------------------------------------------------ stage options
def test_each_stage_trains_with_its_own_learning_rate(run):
    calls = run["spy"].calls
    assert calls["warmup"]["lr"] == LRS["learning_rate"]
    assert calls["forget"]["lr"] == LRS["forget_learning_rate"]
    assert calls["improve"]["lr"] == LRS["improve_learning_rate"]
    for stage, opt in (("warmup", "learning_rate"), ("forget", "forget_learning_rate"),
                       ("improve", "improve_learning_rate")):
        rows = [json.loads(l) for l in open(run["out"] / stage / "metrics.jsonl")]
        # 2 steps, no warm-up step (int(0.1 * 2) = 0), cosine: half the stage's rate after step 1
        assert rows[0]["learning_rate"] == pytest.approx(LRS[opt] * 0.5), stage


def test_improve_uses_eps_and_key_tokens_with_eps_default_0_1(run):
    assert TrainConfig().eps == 0.1
    assert run["spy"].calls["improve"]["data"].kind == "improve"
    assert run["spy"].eps and set(run["spy"].eps) == {EPS}
    rows = [json.loads(l) for l in open(run["out"] / "improve" / "metrics.jsonl")]
    assert all("improve/key_tokens" in r for r in rows)


def test_gradient_accumulation_steps_make_one_larger_batch(data, tmp_path):
    def warm(name, **kw):
        pipeline.run(_cfg(data, tmp_path / name, stages="warmup", **kw))
        return load_file(str(tmp_path / name / "warmup" / "model" / "model.safetensors"))

    big = warm("big", per_device_train_batch_size=4)
    accum = warm("accum", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    small = warm("small", per_device_train_batch_size=2)
    for k in big:
        torch.testing.assert_close(accum[k], big[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert max(float((small[k] - big[k]).abs().max()) for k in big) > 1e-3  # (a batch of 2 is another update)


def test_num_train_epochs_and_warmup_ratio_set_the_steps_and_the_schedule(data, tmp_path):
    # 36 pairs / 12 a step: 3 steps an epoch; 1.5 epochs: ceil(4.5) = 5 steps; warm-up: int(0.5 * 5) = 2 steps
    lr = LRS["learning_rate"]
    pipeline.run(_cfg(data, tmp_path / "out", stages="warmup", max_steps=-1, num_train_epochs=1.5,
                      per_device_train_batch_size=12, warmup_ratio=0.5, lr_scheduler_type="cosine"))
    rows = [json.loads(l) for l in open(tmp_path / "out" / "warmup" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["epoch"] == pytest.approx(5 / 3, abs=1e-3)
    assert rows[0]["learning_rate"] == pytest.approx(lr / 2)  # linear warm-up: step 1 of 2
    assert rows[1]["learning_rate"] == pytest.approx(lr)  # its end: the peak, where the cosine starts
    assert rows[2]["learning_rate"] < lr


# --------------------------------------------------------------------------------- the pipeline
def test_a_second_run_skips_every_completed_stage(run):
    assert run["again"].calls == {}
    assert run["res_again"] == run["res"]


def test_eval_scores_the_held_out_pairs_not_the_training_ones(run, data):
    cache = load_cache(str(run["out"] / "eval" / "sft_reference_logps.safetensors"))
    assert len(cache["chosen"]) == 4 and len(cache["rejected"]) == 4  # eval.jsonl, not the 36 training pairs
    assert set(run["res"]) == {"sft", "warmup", "forget", "improve"}
    assert run["res"]["sft"]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-5)
