"""allo-train's plumbing pinned exactly where the end-to-end tests could not fail (mutation testing):
which tokens are scored (the response mask and the label shift), chat-template rendering of the
prompt / response boundary, the per-token log-probs against a float64 recomputation in example order,
the training loop's loss and metric normalisation under gradient accumulation, ``logging_steps``
windows, the data order across epochs, an exact resume with a random-number-consuming model, a failed
checkpoint save, checkpoint rotation, and an atomic text write that fails mid-way.

Everything runs on the CPU on tiny Llamas (``use_cpu=True``) with the built-in character tokenizer;
``train_stage`` is called directly with a hand-made ``StageData``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import pytest
import torch

from allo.train import TrainConfig
from allo.train import data as D
from allo.train import loop as L
from allo.train.logps import TokenLogprobs, compute_logps, response_mask
from allo.train.model import build_tiny_model
from allo.train.tokenizer import load_builtin_tokenizer

BETA = 0.1


@pytest.fixture(scope="module")
def tok():
    return load_builtin_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _f64_token_logps(model, examples):
    """Per-example float64 log-probs of each response token (prompt never scored), one sequence at a
    time (no padding at all), from a float64 copy of ``model``."""
    import copy

    m = copy.deepcopy(model).double().eval()
    out = []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["prompt_ids"] + e["response_ids"]])
            logits = m(input_ids=ids).logits[0].double()
            lsm = torch.log_softmax(logits, -1)
            p = len(e["prompt_ids"])
            out.append(torch.stack([lsm[t - 1, ids[0, t]] for t in range(p, ids.shape[1])]))
    return out


# ------------------------------------------------------------------------ the response mask
def test_collate_scores_exactly_the_response_tokens_eos_included(tok):
    """labels hold the response's ids (the end-of-sequence token too) at the response's positions and
    IGNORE everywhere else; the mask over labels[:, 1:] counts each response token once, at the
    position that predicts it; per-token weights line up with that mask; right padding."""
    a = D.encode_text_pair(tok, "Q: 12?\nA: ", "The answer is 3.")
    b = D.encode_text_pair(tok, "Q: 7?\nA: ", "No.", weights=[1.0, 0.5, 0.25])
    assert a["response_ids"][-1] == tok.eos_token_id and a["response_ids"][:-1] == _ids(tok, "The answer is 3.")
    assert b["weights"] == [1.0, 0.5, 0.25, 0.0]  # the end-of-sequence token is never forgotten
    batch = D.collate([a, b], pad_id=tok.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "weights"}
    T = len(a["prompt_ids"]) + len(a["response_ids"])
    assert batch["input_ids"].shape == (2, T)
    for row, e in enumerate((a, b)):
        p, r = len(e["prompt_ids"]), len(e["response_ids"])
        ids = e["prompt_ids"] + e["response_ids"]
        assert batch["input_ids"][row, :p + r].tolist() == ids
        assert batch["input_ids"][row, p + r:].eq(tok.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * (p + r) + [0] * (T - p - r)
        assert batch["labels"][row].tolist() == [D.IGNORE_INDEX] * p + e["response_ids"] + [D.IGNORE_INDEX] * (T - p - r)
        mask = response_mask(batch)[row]
        assert mask.tolist() == [False] * (p - 1) + [True] * r + [False] * (T - p - r)
        # position t predicts input t + 1: the masked positions predict exactly the response
        assert batch["input_ids"][row, 1:][mask].tolist() == e["response_ids"]
    w = batch["weights"][1]
    pb = len(b["prompt_ids"])
    assert w[pb - 1:pb - 1 + 4].tolist() == [1.0, 0.5, 0.25, 0.0] and w.sum() == 1.75


def test_compute_logps_are_the_response_tokens_log_probs_in_example_order(tok):
    """compute_logps: one 1-D tensor per example, in the order given (batches are formed by length),
    holding log p(response token | everything before it) for every response token, end-of-sequence
    included: a float64 recomputation without padding."""
    model = build_tiny_model(tok, hidden_size=16, num_layers=1, seed=1)
    texts = [("Q: 1+22?\nA: ", "The answer is 23."), ("Q: 5?\nA: ", "5."), ("Q: 123456?\nA: ", "No"),
             ("Q: 9?\nA: ", "The answer is 9, I think."), ("Q: 44?\nA: ", "It is 44.")]
    examples = [D.encode_text_pair(tok, p, r) for p, r in texts]
    got = compute_logps(TokenLogprobs(model), examples, pad_id=tok.pad_token_id, batch_size=2,
                        device=torch.device("cpu"), autocast=contextlib.nullcontext)
    want = _f64_token_logps(model, examples)
    assert [g.numel() for g in got] == [len(e["response_ids"]) for e in examples]
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_scoring_leaves_the_model_in_the_mode_it_was_in(tok, training):
    """The output-layer check on the first forward runs in eval mode, compute_logps scores in eval mode:
    both give the mode back (a model left in eval trains without dropout; one switched to train scores
    the reference with dropout). kills: either restore dropped or forced"""
    model = build_tiny_model(tok, hidden_size=16, num_layers=1, seed=1)
    scorer = TokenLogprobs(model).train(training)
    ids = torch.tensor([_ids(tok, "Q: 2?\nA: 2.")])
    scorer(ids, torch.ones_like(ids), ids)
    assert model.training == training and scorer._head_checked
    examples = [D.encode_text_pair(tok, "Q: 3?\nA: ", "3.")]
    compute_logps(scorer, examples, pad_id=tok.pad_token_id, batch_size=1, device=torch.device("cpu"),
                  autocast=contextlib.nullcontext)
    assert scorer.training == training and model.training == training


# --------------------------------------------------------------------------------- chat messages
# a template whose assistant turn has a suffix before the end-of-sequence token, and whose prompt
# part (the generation prompt) is written only when asked for
_GEN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}A: {{ m['content'] }};</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def test_chat_pairs_split_at_the_generation_prompt_and_keep_the_templates_suffix(tmp_path):
    """Chat rows: the prompt is the template's rendering with the generation prompt, the response the
    rest of the whole conversation's rendering (the assistant turn's suffix included, the generation
    prompt not repeated); with the prompt left out (TRL's implicit prompt) each side keeps its own last
    message."""
    tok = load_builtin_tokenizer()
    tok.chat_template = _GEN_TEMPLATE
    user = [{"role": "user", "content": "1?"}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": "1."}],
             "rejected": [{"role": "assistant", "content": "2."}]},
            {"chosen": user + [{"role": "assistant", "content": "1."}],
             "rejected": user + [{"role": "assistant", "content": "2."}]}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))
    pairs, _ = D.load_pairs(str(path), tok)
    for p in pairs:
        assert tok.decode(p["prompt_ids"]) == "Q: 1?\nA: "
        assert p["chosen_ids"] == _ids(tok, "1.;") + [tok.eos_token_id]
        assert p["rejected_ids"] == _ids(tok, "2.;") + [tok.eos_token_id]
    negs = tmp_path / "negs.json"
    negs.write_text(json.dumps([{"prompt": user, "response": [{"role": "assistant", "content": "3."}]}]))
    (n,), _ = D.load_negatives(str(negs), tok)
    assert tok.decode(n["prompt_ids"]) == "Q: 1?\nA: " and n["response_ids"] == _ids(tok, "3.;") + [tok.eos_token_id]


# ------------------------------------------------------------------------------ the training loop
@pytest.mark.parametrize("form", ["string", "string ending with </s>", "chat"])
def test_token_weights_count_the_response_tokens_before_end_of_sequence(tok, tmp_path, form):
    """One value per response token, end-of-sequence excluded, whether the loader appends it or the response
    already ends with it (a chat template renders "</s>" after the assistant's message): chat negatives were
    asked for one value more, and their end-of-sequence then took a user weight."""
    prompt = [{"role": "user", "content": "1?"}] if form == "chat" else "Q: 1?\nA: "
    response = {"string": "3.", "string ending with </s>": "3.</s>",
                "chat": [{"role": "assistant", "content": "3."}]}[form]
    path = tmp_path / "negatives.json"
    path.write_text(json.dumps([{"prompt": prompt, "response": response, "token_weights": [0.25, 1.0]}]))
    (neg,), _ = D.load_negatives(str(path), tok, weight_field="token_weights")
    assert neg["response_ids"][-1] == tok.eos_token_id and len(neg["response_ids"]) == 3
    assert neg["weights"] == [0.25, 1.0, 0.0]
    path.write_text(json.dumps([{"prompt": prompt, "response": response, "token_weights": [0.25, 1.0, 1.0]}]))
    with pytest.raises(D.BadRowError, match="has 3 values but the response has 2 tokens"):
        D.load_negatives(str(path), tok, weight_field="token_weights")


@pytest.fixture(scope="module")
def init_state(tok):
    """The starting weights every loop test trains from (a fresh model per run: train_stage trains in place)."""
    return build_tiny_model(tok, hidden_size=16, num_layers=1, seed=0).state_dict()


def _model(tok, init_state, *, dropout=0.0):
    model = build_tiny_model(tok, hidden_size=16, num_layers=1, seed=0)
    model.load_state_dict(init_state)
    if dropout:  # a model whose training forward draws random numbers (resume must restore the RNG)
        for m in model.modules():
            if hasattr(m, "attention_dropout"):
                m.attention_dropout = dropout
    return model


def _cfg(out, **kw):
    base = dict(output_dir=str(out), use_cpu=True, per_device_train_batch_size=2, max_steps=1, logging_steps=1,
                disable_tqdm=True, report_to="jsonl", seed=7, lr_scheduler_type="constant", warmup_ratio=0.0,
                max_grad_norm=1e6)  # (no clipping; grad_norm is logged)
    base.update(kw)
    return TrainConfig(**base)


def _train(tok, init_state, stage_dir, data, cfg, *, dense, lr=1e-2, dropout=0.0, on_step_end=None, seed=0):
    from accelerate import Accelerator

    os.makedirs(stage_dir, exist_ok=True)
    model = _model(tok, init_state, dropout=dropout)
    torch.manual_seed(seed)  # (after building the model, which seeds)
    last = L.train_stage(accelerator=Accelerator(cpu=True), cfg=cfg, stage_dir=str(stage_dir), model=model,
                         tokenizer=tok, data=data, lr=lr, masks=None, dense=dense, on_step_end=on_step_end)
    return model, last


def _rows(stage_dir):
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


_TEXTS = [("Q: 1+22?\nA: ", "The answer is 23."), ("Q: 5?\nA: ", "5."), ("Q: 123456?\nA: ", "No"),
          ("Q: 9?\nA: ", "The answer is 9, I think."), ("Q: 44?\nA: ", "It is 44."), ("Q: 3*3?\nA: ", "9"),
          ("Q: 8-1?\nA: ", "Seven."), ("Q: 2?\nA: ", "The answer is 2.")]


@pytest.fixture(scope="module")
def pairs(tok, init_state):
    """8 preference pairs with the starting model's own log-probs as the reference (a DPO stage's)."""
    out = []
    for i, (p, r) in enumerate(_TEXTS):
        c = D.encode_text_pair(tok, p, r)
        j = D.encode_text_pair(tok, p, _TEXTS[(i + 3) % len(_TEXTS)][1])
        out.append({"prompt_ids": c["prompt_ids"], "chosen_ids": c["response_ids"], "rejected_ids": j["response_ids"]})
    scorer = TokenLogprobs(_model(tok, init_state))
    ref = {side: compute_logps(scorer, [{"prompt_ids": p["prompt_ids"], "response_ids": p[f"{side}_ids"]} for p in out],
                               pad_id=tok.pad_token_id, batch_size=8, device=torch.device("cpu"),
                               autocast=contextlib.nullcontext) for side in ("chosen", "rejected")}
    return L.StageData("dpo", out, ref)


def test_forget_loss_and_grad_norm_are_the_global_batchs_whatever_the_accumulation(tok, init_state, tmp_path):
    """The forget loss averages over the weighted tokens of the whole global batch: with the batch split
    into micro-batches holding 1, 16, 3 and 8 weighted tokens, the logged loss, log-ratio and gradient
    norm are the float64 values of one batch of all four, for 1, 2 and 4 micro-batches."""
    examples = [D.encode_text_pair(tok, p, r) for p, r in _TEXTS[:4]]
    lens = [len(e["response_ids"]) for e in examples]
    weights = []
    for i, n in enumerate(lens):  # 1, all, 3 and 8 non-zero weights, not all 1
        keep = [1, n, 3, 8][i]
        weights.append(torch.tensor([(0.5 if t % 2 else 1.0) if t < keep else 0.0 for t in range(n)]))
    assert [int((w != 0).sum()) for w in weights] == [1, lens[1], 3, 8]
    base = _model(tok, init_state)
    f64 = _f64_token_logps(base, examples)
    offsets = [torch.tensor([0.3 * math.sin(1.7 * t + i) for t in range(n)], dtype=torch.float64)
               for i, n in enumerate(lens)]
    ref = [(lp + c).float() for lp, c in zip(f64, offsets)]  # d_t = lp - ref = -offset (up to fp32 rounding)
    data = L.StageData("forget", examples, {"response": ref}, weights=weights)

    # float64 expectation: loss, mean log-ratio on weighted tokens, gradient norm of the loss
    import copy

    m64 = copy.deepcopy(base).double().train()
    num, cnt, dsum = 0.0, 0, 0.0
    for e, w, r in zip(examples, weights, ref):
        ids = torch.tensor([e["prompt_ids"] + e["response_ids"]])
        lsm = torch.log_softmax(m64(input_ids=ids).logits[0], -1)
        p = len(e["prompt_ids"])
        lp = torch.stack([lsm[t - 1, ids[0, t]] for t in range(p, ids.shape[1])])
        d = lp - r.double()
        on = w != 0
        num = num - (w.double()[on] * torch.nn.functional.logsigmoid(-BETA * d[on])).sum()
        cnt += int(on.sum())
        dsum += float(d[on].detach().sum())
    loss64 = num / cnt
    loss64.backward()
    gnorm64 = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in m64.parameters() if p.grad is not None))

    for bs, accum in ((4, 1), (2, 2), (1, 4)):
        sdir = tmp_path / f"b{bs}"
        _train(tok, init_state, sdir, data, _cfg(tmp_path, per_device_train_batch_size=bs,
                                                 gradient_accumulation_steps=accum, beta=BETA), dense=False)
        (row,) = _rows(sdir)
        assert row["step"] == 1 and row["epoch"] == 1.0
        assert row["loss"] == pytest.approx(float(loss64.detach()), rel=1e-5), (bs, accum)
        assert row["forget/log_ratio"] == pytest.approx(dsum / cnt, rel=1e-4, abs=1e-6), (bs, accum)
        assert row["grad_norm"] == pytest.approx(gnorm64, rel=1e-4), (bs, accum)


def test_logging_steps_rows_average_the_steps_of_their_window(tok, init_state, pairs, tmp_path):
    """logging_steps=2 over 5 steps: rows at steps 2, 4 and 5 (the last, partial window), each the mean
    of the per-step values that logging_steps=1 logs for its steps (grad_norm too); TRL's metric
    names; step, epoch and the learning rate after the row's last step."""
    kw = dict(max_steps=5, per_device_train_batch_size=2, lr_scheduler_type="linear")
    _train(tok, init_state, tmp_path / "every", pairs, _cfg(tmp_path, logging_steps=1, **kw), dense=True)
    _train(tok, init_state, tmp_path / "two", pairs, _cfg(tmp_path, logging_steps=2, **kw), dense=True)
    every, two = _rows(tmp_path / "every"), _rows(tmp_path / "two")
    assert [r["step"] for r in every] == [1, 2, 3, 4, 5] and [r["step"] for r in two] == [2, 4, 5]
    metrics = {"loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected"}
    assert metrics <= set(two[0]) and set(two[0]) - metrics <= {"step", "epoch", "learning_rate", "elapsed_s",
                                                                "logits/chosen", "logits/rejected"}
    for row, window in zip(two, ([0, 1], [2, 3], [4])):
        for k in metrics:
            want = sum(every[i][k] for i in window) / len(window)
            assert row[k] == pytest.approx(want, rel=1e-6, abs=1e-9), (row["step"], k)
        last = every[window[-1]]
        assert row["epoch"] == last["epoch"] == round(row["step"] / 4, 4)  # 8 pairs, 2 a step
        assert row["learning_rate"] == pytest.approx(last["learning_rate"])
    assert every[-1]["learning_rate"] == 0.0 and every[0]["learning_rate"] == pytest.approx(1e-2 * 4 / 5)
    # step 1: the policy is the reference (its own cached log-probs, chosen with chosen, rejected with
    # rejected): every reward is 0 and the loss log 2
    assert every[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert every[0][k] == pytest.approx(0.0, abs=1e-6), k
    assert every[0]["rewards/accuracies"] == 0.0


def test_each_epoch_takes_the_global_batches_of_its_own_permutation(tok, init_state, pairs, tmp_path, monkeypatch):
    """Step s of epoch e takes slice s of randperm(n) drawn from seed + e (a new order every epoch,
    every example once an epoch), cut into micro-batches in order."""
    seen = []
    real = L._forward_loss

    def spy(kind, scorer, examples, data, idx, *a, **kw):
        seen.append(list(idx))
        return real(kind, scorer, examples, data, idx, *a, **kw)

    monkeypatch.setattr(L, "_forward_loss", spy)
    cfg = _cfg(tmp_path, max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2, seed=11)
    _train(tok, init_state, tmp_path / "order", pairs, cfg, dense=True)
    perms = [torch.randperm(8, generator=torch.Generator().manual_seed(11 + e)).tolist() for e in range(3)]
    assert perms[0] != perms[1] != perms[2]
    want = [perms[e][k * 4 + m * 2:k * 4 + m * 2 + 2] for e in range(3) for k in range(2) for m in range(2)]
    assert seen == want
    rows = _rows(tmp_path / "order")
    assert [r["epoch"] for r in rows] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]


class _Stop(Exception):
    pass


def test_resume_is_exact_with_a_model_that_draws_random_numbers(tok, init_state, pairs, tmp_path):
    """Interrupted after step 3 (checkpoints every step, the last 2 kept), then resumed in a process
    whose RNG was moved on: the weights, every metric row and the learning rates are those of an
    uninterrupted run. The model has attention dropout, so the RNG state (restored from the
    checkpoint) decides the result, and a linear schedule, so the scheduler's does."""
    kw = dict(max_steps=5, save_steps=1, save_total_limit=2, lr_scheduler_type="linear")
    full, _ = _train(tok, init_state, tmp_path / "full" / "warmup", pairs, _cfg(tmp_path / "full", **kw),
                     dense=True, dropout=0.3)

    def stop(step):
        if step == 3:
            raise _Stop

    cut = tmp_path / "cut" / "warmup"
    with pytest.raises(_Stop):
        _train(tok, init_state, cut, pairs, _cfg(tmp_path / "cut", **kw), dense=True, dropout=0.3, on_step_end=stop)
    assert sorted(os.listdir(cut / "checkpoints")) == ["checkpoint-2", "checkpoint-3"]
    assert L.latest_checkpoint(str(cut)) == str(cut / "checkpoints" / "checkpoint-3")
    resumed, _ = _train(tok, init_state, cut, pairs, _cfg(tmp_path / "cut", resume_from_checkpoint="true", **kw),
                        dense=True, dropout=0.3, seed=12345)
    a, b = full.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(_rows(cut)) == strip(_rows(tmp_path / "full" / "warmup"))
    # and dropout really draws: another RNG state trains other weights
    other, _ = _train(tok, init_state, tmp_path / "other" / "warmup", pairs, _cfg(tmp_path / "other", **kw),
                      dense=True, dropout=0.3, seed=1)
    assert any(not torch.equal(other.state_dict()[k], a[k]) for k in a)


def test_a_failure_while_saving_a_checkpoint_leaves_the_previous_one_latest(tok, init_state, pairs, tmp_path,
                                                                            monkeypatch):
    """A checkpoint that fails half-way (here: writing its scheduler state) leaves no checkpoint-4
    folder, half or whole; checkpoint-2 stays the latest and a resume from it ends where an
    uninterrupted run ends."""
    kw = dict(max_steps=6, save_steps=2, save_total_limit=0, lr_scheduler_type="linear")
    full, _ = _train(tok, init_state, tmp_path / "full" / "warmup", pairs, _cfg(tmp_path / "full", **kw), dense=True)
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        if "checkpoint-4" in str(path) and str(path).endswith("scheduler.pt"):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)

    cut = tmp_path / "cut" / "warmup"
    with monkeypatch.context() as mp:
        mp.setattr(torch, "save", failing_save)
        with pytest.raises(OSError, match="simulated"):
            _train(tok, init_state, cut, pairs, _cfg(tmp_path / "cut", **kw), dense=True)
    names = os.listdir(cut / "checkpoints")
    assert "checkpoint-2" in names and "checkpoint-4" not in names, names
    assert L.latest_checkpoint(str(cut)) == str(cut / "checkpoints" / "checkpoint-2")
    resumed, _ = _train(tok, init_state, cut, pairs, _cfg(tmp_path / "cut", resume_from_checkpoint="true", **kw),
                        dense=True, seed=99)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    assert sorted(os.listdir(cut / "checkpoints")) == ["checkpoint-2", "checkpoint-4"]  # (0 keeps every one)


def test_forget_per_response_metrics_do_not_depend_on_the_accumulation(tok, init_state, tmp_path):
    """forget/weighted_tokens, rewards/rejected and logps/rejected are means over responses: they were
    weighted across micro-batches by weighted-token shares, so they changed with the accumulation."""
    texts = [("Q: 1?\nA: ", "a"), ("Q: 2?\nA: ", "b" * 11), ("Q: 3?\nA: ", "ccc"), ("Q: 4?\nA: ", "d" * 19)]
    examples = [D.encode_text_pair(tok, p, r) for p, r in texts]
    data = L.StageData("forget", examples, {"response": [torch.full((len(e["response_ids"]),), -3.0) for e in examples]},
                       weights=[torch.ones(len(e["response_ids"])) for e in examples])
    rows = []
    for bs, accum in ((4, 1), (2, 2)):
        _train(tok, init_state, tmp_path / f"b{bs}", data, _cfg(tmp_path, per_device_train_batch_size=bs,
                                                                gradient_accumulation_steps=accum), dense=False)
        rows.append(_rows(tmp_path / f"b{bs}")[0])
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-6)
    assert rows[0]["forget/weighted_tokens"] == (2 + 12 + 4 + 20) / 4
    for k in ("forget/weighted_tokens", "rewards/rejected", "logps/rejected"):
        assert rows[1][k] == pytest.approx(rows[0][k], rel=1e-6), k


# ---------------------------------------------------------------------------- files and the report
def test_write_text_that_fails_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    """write_text (metrics, reports, JSON results) writes a temporary file and renames it: a write that
    fails half-way leaves the old content and no temporary file."""
    path = tmp_path / "report.md"
    path.write_text("old\n")
    real_open = open

    class Half:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError("no space left (simulated)")

    monkeypatch.setattr(D, "open", lambda *a, **k: Half(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError, match="simulated"):
        D.write_text(str(path), "new content, long enough to be cut\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["report.md"]


def test_report_table_columns_hold_their_own_metric():
    """Each column's header names its metric, in the documented order; a column is shown when any
    stage has its metric (others: "-")."""
    from allo.train.report import format_table

    results = {"sft": {"eval_rewards/chosen": 0.125, "eval_rewards/rejected": -0.25, "eval_loss": 0.5},
               "improve": {"eval_answer_accuracy": 0.75, "eval_rewards/accuracies": 1.0,
                           "eval_rewards/margins": 0.375, "eval_rewards/chosen": 0.5, "eval_rewards/rejected": 0.125,
                           "eval_loss": 0.25},
               "warmup": {"eval_answer_accuracy": 0.5}}
    assert format_table(results).splitlines() == [
        "| stage | answer acc | reward acc | reward margin | reward chosen | reward rejected | DPO loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| sft | - | - | - | 0.1250 | -0.2500 | 0.5000 |",
        "| improve | 0.7500 | 1.0000 | 0.3750 | 0.5000 | 0.1250 | 0.2500 |",
        "| warmup | 0.5000 | - | - | - | - | - |",
    ]


def test_options_that_change_results_are_compared_on_a_rerun():
    """A rerun into an output folder compares every option that changes what a stage makes with the saved
    ones (allo/train/run_config.py): one left out of the comparison (the seed, say) would reuse stages
    made with another value, silently."""
    from allo.train import run_config

    cfg = TrainConfig(use_cpu=True)
    current = cfg.to_dict()
    changing = ("seed", "beta", "learning_rate", "forget_learning_rate", "improve_learning_rate", "forget_ratio",
                "improve_ratio", "exclude_ratio", "eps", "per_device_train_batch_size", "gradient_accumulation_steps",
                "max_steps", "num_train_epochs", "warmup_ratio", "warmup_steps", "lr_scheduler_type", "max_length")
    for name in changing:
        assert name in current, name
        old = current[name]
        other = (not old) if isinstance(old, bool) else ("linear" if old == "cosine" else
                                                         "cosine" if isinstance(old, str) else old + 1)
        diff = run_config.differences({"options": {**current, name: other}}, cfg, {})
        assert list(diff) == [name], (name, diff)


def test_resume_logs_the_same_rows_when_logging_steps_does_not_divide_the_checkpoint(tok, init_state, pairs,
                                                                                      tmp_path):
    """Checkpoint at step 2, a row every 3 steps: the row at step 3 averages steps 1-3 in a resumed run
    too (the unlogged window is saved with the checkpoint), not step 3 alone."""
    kw = dict(max_steps=6, save_steps=2, logging_steps=3)
    _train(tok, init_state, tmp_path / "full" / "warmup", pairs, _cfg(tmp_path / "full", **kw), dense=True)

    def stop(step):
        if step == 2:
            raise _Stop

    cut = tmp_path / "cut" / "warmup"
    with pytest.raises(_Stop):
        _train(tok, init_state, cut, pairs, _cfg(tmp_path / "cut", **kw), dense=True, on_step_end=stop)
    _train(tok, init_state, cut, pairs, _cfg(tmp_path / "cut", resume_from_checkpoint="true", **kw), dense=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert [r["step"] for r in _rows(cut)] == [3, 6]
    assert strip(_rows(cut)) == strip(_rows(tmp_path / "full" / "warmup"))
