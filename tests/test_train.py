"""allo-train: data, CLI, every stage on tiny models, resume equality, 2 processes == 1 process.

Everything runs on the CPU with a ~30k-parameter Llama; the expensive fixture (a tiny model and
preference files) is built once per module.
"""

import contextlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from allo.train import TrainConfig, pipeline
from allo.train import data as D
from allo.train import model as models
from allo.train.cli import build_parser, parse
from allo.train.config import STAGES
from allo.train.stages import build_pairs
from allo.train.tasks import ANSWER_PREFIX, answer_pattern_problem, extract_answer, is_correct, make_problems
from allo.train.tokenizer import ASSET, build_tokenizer, load_builtin_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _weights(run_dir, stage):
    return load_file(os.path.join(run_dir, stage, "model", "model.safetensors"))


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _wrong(p, rng):
    bad = p.answer + rng.choice([-3, -2, -1, 1, 2, 10])
    return p.solution.replace(f"{ANSWER_PREFIX} {p.answer}.", f"{ANSWER_PREFIX} {bad}.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama saved in HF format, plus pair / negatives / problem files from the
    arithmetic task (chosen: the gold solution, rejected: a wrong final answer)."""
    from allo.train.model import build_tiny_model, save_model

    root = tmp_path_factory.mktemp("tiny")
    tok = load_builtin_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=0)
    save_model(model, tok, str(root / "sft"))
    rng = random.Random(0)
    train = make_problems("arithmetic", 24, 0)
    held = make_problems("arithmetic", 8, 1, exclude={p.prompt for p in train})
    _write_jsonl(root / "train.jsonl", [{"prompt": p.prompt, "chosen": p.solution, "rejected": _wrong(p, rng)} for p in train])
    _write_jsonl(root / "eval.jsonl", [{"prompt": p.prompt, "chosen": p.solution, "rejected": _wrong(p, rng)} for p in held])
    _write_jsonl(root / "eval_problems.jsonl", [{"prompt": p.prompt, "answer": p.answer} for p in held])
    return root


def _cfg(tiny, out, **kw):
    base = dict(model_name_or_path=str(tiny / "sft"), train_file=str(tiny / "train.jsonl"),
                eval_file=str(tiny / "eval.jsonl"), eval_problems_file=str(tiny / "eval_problems.jsonl"),
                output_dir=str(out), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                learning_rate=1e-2, forget_learning_rate=1e-2, improve_learning_rate=1e-2, max_new_tokens=8,
                disable_tqdm=True, report_to="jsonl", seed=3)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------ pieces
def test_tokenizer_asset_is_what_build_tokenizer_makes():
    with open(ASSET) as f:
        shipped = json.load(f)
    assert shipped == json.loads(build_tokenizer().to_str())
    tok = load_builtin_tokenizer()
    text = "Q: Ann has 12 pens.\nA: 12+7=19. The answer is 19."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) == "Q: hi\nA: "


@pytest.mark.parametrize("task", ["arithmetic", "compare"])
def test_tasks_have_checkable_answers(task):
    probs = make_problems(task, 50, 7)
    assert len({p.prompt for p in probs}) == 50
    for p in probs:
        assert is_correct(p.solution, p.answer)
        assert not is_correct(p.solution.replace(str(p.answer) + ".", str(p.answer + 1) + "."), p.answer)
    assert extract_answer("no answer here") is None
    assert extract_answer("The answer is 3. The answer is -12.") == -12
    held = make_problems(task, 10, 8, exclude={p.prompt for p in probs})
    assert not {p.prompt for p in held} & {p.prompt for p in probs}


def test_build_pairs_pairs_correct_with_wrong_capped_per_problem():
    probs = [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2}, {"prompt": "c", "answer": 3}]
    ok = lambda n: f"x. The answer is {n}."  # noqa: E731
    samples = [[ok(1), ok(1) + " ", ok(5), ok(6), ok(7), ok(7)],   # 2 right x 3 distinct wrong = 6 -> 5
               [ok(2), ok(9)],                                     # 1 pair
               [ok(3), ok(3)]]                                     # no wrong: no pair
    pairs, negs, stats = build_pairs(probs, samples, max_pairs=5, seed=0)
    assert [p["prompt"] for p in pairs].count("a") == 5 and [p["prompt"] for p in pairs].count("b") == 1
    assert all(is_correct(p["chosen"], {"a": 1, "b": 2}[p["prompt"]]) for p in pairs)
    assert all(not is_correct(p["rejected"], {"a": 1, "b": 2}[p["prompt"]]) for p in pairs)
    assert sorted(n["response"] for n in negs if n["prompt"] == "a") == [ok(5), ok(6), ok(7)]
    assert stats["pairs"] == 6 and stats["negatives"] == 4 and stats["problems_with_pairs"] == 2


def test_answer_pattern_judges_other_answer_formats(tmp_path, tiny, monkeypatch):
    """--answer_pattern: GSM8K's "#### N" (numbers compare as numbers), multiple-choice letters (text,
    case ignored); problems files may hold text answers; prepare's pairs and eval's accuracy use it."""
    from allo.train import tasks

    gsm, letter = r"#### (\S+)", r"answer is \(?([A-E])"
    assert is_correct("48 / 2 = 24\n#### 1,024", 1024, gsm) and not is_correct("#### 1024", 1025, gsm)
    assert is_correct("#### 2.50", "2.5", gsm) and not is_correct("no marker", 0, gsm)
    assert is_correct("the answer is (B), not (C).", "b", letter) and not is_correct("the answer is (C).", "B", letter)
    assert extract_answer("#### 3 then #### 4.", gsm) == "4."  # the last match; its final period is ignored
    assert is_correct("#### 3 then #### 4.", 4, gsm) and extract_answer("The answer is 7.") == 7
    probs = [{"prompt": "a", "answer": "B"}]
    pairs, _, _ = build_pairs(probs, [["answer is (B)", "answer is (C)"]], max_pairs=5, seed=0, pattern=letter)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("answer is (B)", "answer is (C)")]

    f = tmp_path / "problems.jsonl"
    _write_jsonl(f, [{"prompt": "Q: 1?", "answer": "B"}, {"prompt": "Q: 2?", "answer": 7},
                     {"prompt": "Q: 3?", "answer": "12"}, {"prompt": "Q: 4?", "answer": True}])
    rows, rep = D.load_problems(str(f), skip_bad_rows=True)
    assert [r["answer"] for r in rows] == ["B", 7, 12] and rep.skipped == 1 and "problems.jsonl:4" in rep.reasons[0]

    seen, judge = [], tasks.is_correct
    monkeypatch.setattr(tasks, "is_correct", lambda r, a, *p: seen.append(p) or judge(r, a, *p))
    pipeline.run(_cfg(tiny, tmp_path / "run", stages="eval", eval_models="sft", answer_pattern=gsm,
                      eval_file=None).validate())
    assert seen and set(seen) == {(gsm,)}
    with pytest.raises(ValueError, match=r"--answer_pattern '####' has 0 groups; expected exactly one"):
        TrainConfig(answer_pattern="####").validate()


def test_bad_rows_name_file_line_and_field_or_are_counted(tmp_path):
    tok = load_builtin_tokenizer()
    good = {"prompt": "Q: 1?\nA: ", "chosen": "The answer is 1.", "rejected": "The answer is 2."}
    path = tmp_path / "pairs.jsonl"
    _write_jsonl(path, [good, {"prompt": "Q: 2?\nA: ", "chosen": "x"}, good, "{not json", {**good, "chosen": 5}])
    with pytest.raises(D.BadRowError) as e:
        D.load_pairs(str(path), tok)
    msg = str(e.value)
    assert f"{path}:2" in msg and "'rejected'" in msg and "missing" in msg and "--skip_bad_rows" in msg
    pairs, rep = D.load_pairs(str(path), tok, skip_bad_rows=True)
    assert len(pairs) == 2 and rep.skipped == 3 and rep.rows == 2
    assert any(f"{path}:4" in r and "not valid JSON" in r for r in rep.reasons)
    assert any(f"{path}:5" in r and "'chosen'" in r for r in rep.reasons)
    # per-token weights must have one value per response token
    negs = tmp_path / "negs.jsonl"
    _write_jsonl(negs, [{"prompt": "Q: 1?\nA: ", "response": "ab", "token_weights": [1, 0, 1]}])
    with pytest.raises(D.BadRowError, match=r"negs.jsonl:1: field 'token_weights': has 3 values .* 2 tokens"):
        D.load_negatives(str(negs), tok, weight_field="token_weights")
    # truncation: the prompt keeps its end, the response its start
    ex = D.encode_text_pair(tok, "Q: 12345\nA: ", "The answer is 1.", max_length=20, max_prompt_length=6)
    assert tok.decode(ex["prompt_ids"]) == "45\nA: " and len(ex["prompt_ids"]) + len(ex["response_ids"]) == 20
    with pytest.raises(D.BadRowError, match="max_length"):
        D.encode_text_pair(tok, "Q: 12345\nA: ", "x", max_length=5, where="f.jsonl:1")


def test_the_load_report_says_what_truncation_cut(tmp_path):
    """Responses cut at --max_length, prompts cut to --max_prompt_length, and pairs that truncation
    made identical (a wrong final answer past the cut) are counted and said; a skipped row's are not."""
    tok = load_builtin_tokenizer()
    long_prompt = "Q: " + "7" * 30 + "?\nA: "  # 36 characters = tokens (the built-in tokenizer)
    solution = "First add the numbers, then carry. The answer is "
    rows = [{"prompt": "Q: 1?\nA: ", "chosen": solution + "12.", "rejected": solution + "13."},  # same first 40
            {"prompt": "Q: 1?\nA: ", "chosen": "The answer is 1.", "rejected": "It is 2."},  # nothing cut
            {"prompt": long_prompt, "chosen": "The answer is 1.", "rejected": "The answer is 2."},  # prompt cut
            {"prompt": long_prompt, "chosen": solution * 2, "rejected": 5}]  # skipped: no count from it
    path = tmp_path / "pairs.jsonl"
    _write_jsonl(path, rows)
    pairs, rep = D.load_pairs(str(path), tok, max_length=48, max_prompt_length=24, skip_bad_rows=True)
    assert (rep.rows, rep.skipped, rep.cut_responses, rep.cut_prompts, rep.identical_pairs) == (3, 1, 2, 1, 1)
    assert pairs[0]["chosen_ids"] == pairs[0]["rejected_ids"] and pairs[1]["chosen_ids"] != pairs[1]["rejected_ids"]
    assert str(rep) == (f"{path}: 3 rows, 1 skipped (--skip_bad_rows); first: {rep.reasons[0]}; 2 responses cut at "
                        "--max_length 48; 1 prompts cut to their last --max_prompt_length 24 tokens; 1 pairs with "
                        "chosen == rejected after truncation (no preference left: raise --max_length)")
    _, rep = D.load_pairs(str(path), tok, skip_bad_rows=True)
    assert str(rep) == f"{path}: 3 rows, 1 skipped (--skip_bad_rows); first: {rep.reasons[0]}"
    negs = tmp_path / "negs.jsonl"
    _write_jsonl(negs, [{"prompt": long_prompt, "response": solution}, {"prompt": "Q: 1?\nA: ", "response": "2."}])
    _, rep = D.load_negatives(str(negs), tok, max_length=48, max_prompt_length=24)
    assert (rep.rows, rep.cut_responses, rep.cut_prompts) == (2, 1, 1)


def test_max_completion_length_keeps_a_responses_start(tmp_path):
    """--max_completion_length (TRL's): each response keeps its first N tokens, its per-token weights with
    it, before --max_length cuts prompt + response; counted in the load report."""
    tok = load_builtin_tokenizer()
    ex = D.encode_text_pair(tok, "Q: 1?\nA: ", "The answer is 1.", max_completion_length=6)
    assert tok.decode(ex["response_ids"]) == "The an" and tok.decode(ex["prompt_ids"]) == "Q: 1?\nA: "
    # both limits: the tighter one wins
    ex = D.encode_text_pair(tok, "Q: 1?\nA: ", "The answer is 1.", max_completion_length=12, max_length=15)
    assert len(ex["prompt_ids"]) + len(ex["response_ids"]) == 15 and len(ex["response_ids"]) == 6
    ex = D.encode_text_pair(tok, "Q: 1?\nA: ", "ab", weights=[0.5, 0.25], max_completion_length=1)
    assert ex["weights"] == [0.5] and len(ex["response_ids"]) == 1
    path = tmp_path / "pairs.jsonl"
    _write_jsonl(path, [{"prompt": "Q: 1?\nA: ", "chosen": "The answer is 12.", "rejected": "The answer is 13."},
                        {"prompt": "Q: 1?\nA: ", "chosen": "1.", "rejected": "2."}])
    pairs, rep = D.load_pairs(str(path), tok, max_completion_length=14)
    assert (rep.cut_responses, rep.identical_pairs) == (2, 1) and pairs[0]["chosen_ids"] == pairs[0]["rejected_ids"]
    assert "; 2 responses cut at --max_completion_length 14;" in str(rep)
    with pytest.raises(ValueError, match=r"--max_completion_length is 0; expected a positive number of tokens"):
        TrainConfig(max_completion_length=0).validate()


def test_chat_messages_use_the_chat_template(tmp_path):
    tok = load_builtin_tokenizer()
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"chosen": [{"role": "user", "content": "1?"}, {"role": "assistant", "content": "1."}],
                                 "rejected": [{"role": "user", "content": "1?"}, {"role": "assistant", "content": "2."}]}]))
    (p,), _ = D.load_pairs(str(path), tok)
    assert tok.decode(p["prompt_ids"]) == "Q: 1?\nA: "
    assert p["chosen_ids"] == tok("1.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_truncation_limits_met_exactly_cut_nothing_and_a_prompt_that_fills_max_length_is_refused(tmp_path):
    """A prompt of exactly --max_prompt_length tokens, a prompt + response of exactly --max_length and a
    response of exactly --max_completion_length tokens lose nothing and are not counted as cut; a prompt
    that leaves no room for one response token (exactly --max_length long) is a bad row, not a row trained
    with an empty response."""
    tok = load_builtin_tokenizer()  # one token per character
    prompt, response = "Q: 4321?\nA: ", "It is 1."
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    P, R = len(p_ids), len(r_ids)
    cuts = set()
    ex = D.encode_text_pair(tok, prompt, response, max_length=P + R, max_prompt_length=P, max_completion_length=R,
                            weights=[0.5] * (R - 1), cuts=cuts)
    assert (ex["prompt_ids"], ex["response_ids"], ex["weights"], cuts) == (p_ids, r_ids, [0.5] * (R - 1) + [0.0], set())
    # one token fewer of each limit: the prompt loses its first token, the response its last
    cuts = set()
    ex = D.encode_text_pair(tok, prompt, response, max_prompt_length=P - 1, max_completion_length=R - 1, cuts=cuts)
    assert (ex["prompt_ids"], ex["response_ids"], cuts) == (p_ids[1:], r_ids[:-1], {"prompt", "response"})
    ex = D.encode_text_pair(tok, prompt, response, max_length=P + 1)
    assert (ex["prompt_ids"], ex["response_ids"]) == (p_ids, r_ids[:1])
    with pytest.raises(D.BadRowError, match=r"f.jsonl:3: field 'chosen': nothing of the response is left .*"
                                            rf"max_length={P} \(the prompt alone has {P} tokens\)"):
        D.encode_text_pair(tok, prompt, response, max_length=P, where="f.jsonl:3", fld="chosen")
    path = tmp_path / "pairs.jsonl"
    _write_jsonl(path, [{"prompt": prompt, "chosen": response, "rejected": "No."}])
    _, rep = D.load_pairs(str(path), tok, max_length=P + R, max_prompt_length=P, max_completion_length=R)
    assert (rep.rows, rep.cut_prompts, rep.cut_responses) == (1, 0, 0) and str(rep) == f"{path}: 1 rows"


def test_a_source_without_a_usable_row_is_an_error_not_an_empty_run(tmp_path):
    tok = load_builtin_tokenizer()
    empty, bad = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("\n\n")
    _write_jsonl(bad, [{"prompt": "Q: 1?\nA: ", "chosen": "1."}, "[1, 2]"])
    with pytest.raises(D.BadRowError, match=r"empty.jsonl: no usable rows"):
        D.load_pairs(str(empty), tok)
    with pytest.raises(D.BadRowError, match=r"bad.jsonl: no usable rows \(.*2 skipped"):
        D.load_pairs(str(bad), tok, skip_bad_rows=True)
    with pytest.raises(D.BadRowError, match=r"empty.jsonl: no usable rows"):
        D.load_negatives(str(empty), tok)
    with pytest.raises(D.BadRowError, match=r"empty.jsonl: no usable rows"):
        D.check_source(str(empty), "problems")


@pytest.mark.parametrize("row, says", [
    ({"prompt": "Q: 1?\nA: ", "chosen": "", "rejected": "2."}, r"field 'chosen': empty string"),
    ({"prompt": [{"role": "user", "content": "1?"}], "chosen": [], "rejected": [{"role": "assistant", "content": "2."}]},
     r"field 'chosen': expected a string or a list of \{role, content\} messages, got list"),
    # TRL's implicit prompt needs a conversation longer than its last message
    ({"chosen": [{"role": "assistant", "content": "1."}], "rejected": [{"role": "assistant", "content": "2."}]},
     r"field 'prompt': missing"),
    (5, r"expected an object with named fields, got int"),
    ([{"prompt": "Q: 1?\nA: ", "chosen": "1.", "rejected": "2."}], r"expected an object with named fields, got list"),
])
def test_rows_that_would_train_on_nothing_are_bad_rows(tmp_path, row, says):
    """An empty response or message list, a one-message conversation without a prompt, a row that is no
    object: each is a bad row named by file and line (counted with --skip_bad_rows), never a pair with an
    empty side, nor a traceback."""
    tok = load_builtin_tokenizer()
    good = {"prompt": "Q: 1?\nA: ", "chosen": "1.", "rejected": "2."}
    path = tmp_path / "pairs.jsonl"
    _write_jsonl(path, [good, row])
    with pytest.raises(D.BadRowError, match=r"pairs.jsonl:2: " + says):
        D.load_pairs(str(path), tok)
    with pytest.raises(D.BadRowError, match=r"pairs.jsonl:2: " + says):
        D.check_source(str(path), "pairs")
    pairs, rep = D.load_pairs(str(path), tok, skip_bad_rows=True)
    assert len(pairs) == 1 and (rep.rows, rep.skipped) == (1, 1)


def test_a_chat_template_that_renders_the_prompt_otherwise_in_the_conversation_is_a_bad_row(tmp_path):
    tok = load_builtin_tokenizer()
    # the generation prompt says "A: ", the conversation "Answer: ": the response would start mid-prompt
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
                         "{% else %}Answer: {{ m['content'] }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}A: {% endif %}")
    path = tmp_path / "chat.jsonl"
    user = [{"role": "user", "content": "1?"}]
    _write_jsonl(path, [{"prompt": user, "chosen": [{"role": "assistant", "content": "1."}],
                         "rejected": [{"role": "assistant", "content": "2."}]}])
    with pytest.raises(D.BadRowError, match=r"chat.jsonl:1: field 'chosen': the chat template renders the prompt "
                                            "differently"):
        D.load_pairs(str(path), tok)


def test_negatives_read_response_over_rejected_and_refuse_boolean_weights(tmp_path):
    tok = load_builtin_tokenizer()
    path = tmp_path / "negs.jsonl"
    _write_jsonl(path, [{"prompt": "Q: 1?\nA: ", "response": "3.", "rejected": "no, 4."},
                        {"prompt": "Q: 2?\nA: ", "rejected": "5."}])
    negs, _ = D.load_negatives(str(path), tok)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # noqa: E731
    assert [n["response_ids"] for n in negs] == [ids("3."), ids("5.")]
    # true/false are no weights (JSON booleans are Python ints: they would pass as 1 and 0)
    _write_jsonl(path, [{"prompt": "Q: 1?\nA: ", "response": "ab", "token_weights": [True, 0.5]}])
    with pytest.raises(D.BadRowError, match=r"negs.jsonl:1: field 'token_weights': expected a list of numbers"):
        D.load_negatives(str(path), tok, weight_field="token_weights")


def test_rejected_negatives_are_the_distinct_prompt_and_rejected_pairs_in_order():
    a, b, c = [1, 2], [3], [4, 5, 6]
    pairs = [{"prompt_ids": a, "chosen_ids": [7], "rejected_ids": c},
             {"prompt_ids": b, "chosen_ids": [8], "rejected_ids": c},   # the same wrong response to another prompt
             {"prompt_ids": a, "chosen_ids": [9], "rejected_ids": c},   # a repeat: once
             {"prompt_ids": a, "chosen_ids": [7], "rejected_ids": b}]
    assert D.rejected_negatives(pairs) == [{"prompt_ids": a, "response_ids": c}, {"prompt_ids": b, "response_ids": c},
                                           {"prompt_ids": a, "response_ids": b}]


def test_a_json_file_may_hold_its_rows_under_data(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"data": rows, "version": 1}))
    assert D.read_rows(str(path)) == [(f"{path}: row 1", rows[0]), (f"{path}: row 2", rows[1])]
    path.write_text(json.dumps({"rows": rows}))
    with pytest.raises(D.BadRowError, match=r"expected a JSON list of objects .* got dict"):
        D.read_rows(str(path))


def test_text_answers_ignore_a_final_period_and_a_response_without_an_answer_is_wrong():
    said = r"[Aa]nswer: (.+)"
    assert is_correct("So the answer: Paris.", "paris", said) and is_correct("answer: yes", "Yes.", said)
    assert not is_correct("answer: Paris.", "Rome", said)
    # no match is never correct, whatever the problem's answer reads like
    for answer in ("None", "none", "nan"):
        assert extract_answer("no marker here", said) is None and not is_correct("no marker here", answer, said)
    assert answer_pattern_problem(r"(\d+) and (\d+)") and answer_pattern_problem("(") and not answer_pattern_problem(said)


def test_problems_are_drawn_distinct_until_the_task_has_none_left(monkeypatch):
    from allo.train import tasks

    # a task of 5 problems: 5 distinct ones are found among the repeats; a 6th does not exist
    monkeypatch.setitem(tasks.TASKS, "five", lambda rng: tasks.Problem(f"Q: {rng.randint(1, 5)}?\nA: ", 0, "0."))
    got = make_problems("five", 5, 0)
    assert sorted(p.prompt for p in got) == [f"Q: {i}?\nA: " for i in range(1, 6)]
    assert {p.prompt for p in make_problems("five", 3, 0, exclude={"Q: 1?\nA: ", "Q: 2?\nA: "})} == \
        {f"Q: {i}?\nA: " for i in (3, 4, 5)}
    with pytest.raises(ValueError, match="fewer than 6 distinct problems"):
        make_problems("five", 6, 0)


def test_cli_help_documents_every_flag_and_yaml_config(tmp_path):
    text = build_parser().format_help()
    for f in TrainConfig.__dataclass_fields__:
        assert f"--{f}" in text, f
    for stage in ("run",) + STAGES:
        assert stage in text
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("beta: 0.3\nlearning_rate: 0.5\nbf16: true\n")
    cmd, cfg = parse(["warmup", "--config", str(cfg_file), "--learning_rate", "0.25"])
    assert cmd == "warmup" and cfg.beta == 0.3 and cfg.learning_rate == 0.25 and cfg.bf16 is True
    assert parse([])[0] == "run"
    cfg_file.write_text("betta: 1\n")
    with pytest.raises(SystemExit):
        parse(["--config", str(cfg_file)])


# ------------------------------------------------------------------------------------------ stages
class _SpyModels:
    """Stands in for allo.train.model in one stage module (monkeypatch its ``models``): everything is the
    real module's, and each load_model call is recorded as (path, keyword arguments, how many models of
    earlier calls were still alive, ``context()`` at the call); ``mapped = False`` makes mapped_weights
    answer None (the weights are then loaded whole)."""

    def __init__(self, context=lambda: None):
        import weakref

        self.calls, self.mapped, self._loaded, self._context = [], True, weakref.WeakSet(), context

    def __getattr__(self, name):
        return getattr(models, name)

    def load_model(self, path, **kw):
        import gc

        gc.collect()
        self.calls.append((path, kw, len(self._loaded), self._context()))
        model = models.load_model(path, **kw)
        self._loaded.add(model)
        return model

    def mapped_weights(self, path, model):
        return models.mapped_weights(path, model) if self.mapped else None


def test_every_stage_on_a_tiny_model(tiny, tmp_path, monkeypatch):
    from allo.train.stages import forget as forget_stage

    # forget's implicit token weights score with the warm-up model while the stage's model waits on the CPU
    parked = []
    real_parked = forget_stage.parked_on_cpu

    @contextlib.contextmanager
    def spy_parked(model):
        with real_parked(model):
            parked.append(model)
            yield model
            parked.pop()

    spy = _SpyModels(context=lambda: len(parked))
    monkeypatch.setattr(forget_stage, "parked_on_cpu", spy_parked)
    monkeypatch.setattr(forget_stage, "models", spy)
    # each data file is tokenized once in a run: the up-front check and warmup, select, forget, improve and
    # eval share it (stages.common.tokenized)
    import allo.train.data as D

    tokenized = []
    real_load_pairs = D.load_pairs

    def counted_load_pairs(src, *a, **kw):
        tokenized.append(os.path.basename(src))
        return real_load_pairs(src, *a, **kw)

    monkeypatch.setattr(D, "load_pairs", counted_load_pairs)
    res = pipeline.run(_cfg(tiny, tmp_path / "run"))
    out = tmp_path / "run"
    assert sorted(tokenized) == ["eval.jsonl", "train.jsonl"], tokenized
    loads = [(os.path.basename(os.path.dirname(path)), depth) for path, _, _, depth in spy.calls]
    assert (out / "forget" / "token_weights.safetensors").exists() and ("warmup", 1) in loads, loads
    for stage in ("warmup", "select", "forget", "improve", "eval"):
        assert (out / stage / "DONE").exists(), stage
    assert set(res) == {"sft", "warmup", "forget", "improve"}
    assert res["sft"]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # the reference itself
    for stage in ("warmup", "forget", "improve"):
        assert 0.0 <= res[stage]["eval_answer_accuracy"] <= 1.0
        rows = [json.loads(l) for l in open(out / stage / "metrics.jsonl")]
        assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("learning_rate" in r for r in rows)
    assert "rewards/accuracies" in rows[0] and "loss" in rows[0]
    assert (out / "training_curves.png").exists() and (out / "report.md").exists()

    # masked stages change exactly the selected elements (and something changed)
    from allo.select import Selection

    sft = load_file(str(tiny / "sft" / "model.safetensors"))
    for stage, start in (("forget", sft), ("improve", _weights(out, "forget"))):
        masks = Selection.load(str(out / "select" / f"{stage}_mask.safetensors")).masks
        after = _weights(out, stage)
        changed = 0
        for name, w in after.items():
            diff = w != start[name]
            assert not (diff & ~masks[name]).any(), (stage, name)
            changed += int(diff.sum())
        assert changed > 0, stage
    # forget and improve masks hold the configured fractions
    sel = json.load(open(out / "select" / "DONE"))
    assert sel["improve_selected"] == round(0.1 * sel["total_elements"])
    # what a later run compares with (run_config.check): the options and inputs the stage was made with
    assert sel["made_with"]["options"]["improve_ratio"] == 0.1 and sel["made_with"]["inputs"]["train_file"]["sha256"]
    assert sel["forget_selected"] == round(0.03 * sel["total_elements"])

    # run again: every stage is complete and skipped, same results
    assert pipeline.run(_cfg(tiny, out)) == res

    # a masked stage starts from the selection's flat indices, not from bool masks of the model's size
    from allo.train.pipeline import make_context
    from allo.train.stages.masked import masked_stage_start

    ctx = make_context(_cfg(tiny, out))
    model, scorer, start_masks, mask_file = masked_stage_start(ctx, "improve", str(out / "forget" / "model"), "improve")
    saved = Selection.load(mask_file).indices
    assert scorer is None and start_masks.keys() == saved.keys()
    assert all(m.dtype == torch.int64 and torch.equal(m, saved[n]) for n, m in start_masks.items())


def test_a_file_the_run_writes_is_tokenized_again_when_it_changed_and_its_data_files_are_read_once(tiny, tmp_path):
    # (prepare writes the built-in task's pairs again when it runs again; a user may edit a --train_file
    # during the run: the stages still read what the first read found, which their DONE records)
    import allo.train.data as D
    from allo.train.pipeline import make_context
    from allo.train.stages.common import tokenized

    path = tmp_path / "pairs.jsonl"
    _write_jsonl(path, [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    ctx = make_context(_cfg(tiny, tmp_path / "out"))
    first, _ = tokenized(ctx, D.load_pairs, str(path), max_length=64)
    again, _ = tokenized(ctx, D.load_pairs, str(path), max_length=64)
    assert again == first and again is not first and again[0] is first[0]  # from the run's cache, a new list
    shorter, _ = tokenized(ctx, D.load_pairs, str(path), max_length=64, max_completion_length=1)
    assert len(shorter[0]["chosen_ids"]) == 1 != len(first[0]["chosen_ids"])  # other options: tokenized again
    _write_jsonl(path, [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4",
                                                                            "rejected": "5"}])
    changed, _ = tokenized(ctx, D.load_pairs, str(path), max_length=64)
    assert len(changed) == 2
    train = ctx.cfg.train_file
    first, _ = tokenized(ctx, D.load_pairs, train, max_length=64)
    with open(train, "a") as f:  # (restored below: the module's fixture)
        f.write('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n')
    try:
        again, _ = tokenized(ctx, D.load_pairs, train, max_length=64)
    finally:
        with open(train, "r+") as f:
            f.truncate(f.read().rindex('{"prompt": "1+1="'))
    assert again == first


def test_ablation_switches_and_gradient_scores(tiny, tmp_path):
    base = tmp_path / "base"
    pipeline.run(_cfg(tiny, base, stages="warmup"))
    res = pipeline.run(_cfg(tiny, tmp_path / "abl", selection="random", skip_forget=True, key_tokens=False,
                            score_source="gradient", score_batches=2, reuse_from=str(base), reuse_stages="warmup"))
    assert set(res) == {"sft", "warmup", "improve"}
    assert json.load(open(tmp_path / "abl" / "forget" / "DONE"))["skipped"] is True
    assert os.path.islink(tmp_path / "abl" / "warmup")
    res = pipeline.run(_cfg(tiny, tmp_path / "none", selection="none", stages="warmup,select,forget,improve"))
    assert res == {}  # no eval stage asked for


@pytest.mark.parametrize("variant", ["fp32", "bf16_tied"])
def test_select_reads_weight_deltas_from_the_files_and_selects_what_loaded_models_select(tiny, tmp_path, monkeypatch,
                                                                                         variant):
    # the select stage maps the two models' safetensors files instead of loading both models whole (fp32:
    # 8 bytes of memory per parameter); the masks must be the same. bf16_tied: an SFT model stored in bf16
    # (the warm-up model is saved in fp32: mixed operands) with tied embeddings (one tensor in the file)
    from allo.select import Selection
    from allo.train.model import save_model, tiny_llama_config
    from allo.train.stages import select as select_stage

    sft = str(tiny / "sft")
    if variant == "bf16_tied":
        from transformers import LlamaForCausalLM

        tok = load_builtin_tokenizer()
        config = tiny_llama_config(len(tok), hidden_size=32, num_layers=1)
        config.tie_word_embeddings = True
        torch.manual_seed(1)
        sft = str(tmp_path / "sft_bf16_tied")
        save_model(LlamaForCausalLM(config).to(torch.bfloat16), tok, sft)
    spy = _SpyModels()
    monkeypatch.setattr(select_stage, "models", spy)
    a, b = tmp_path / "mapped", tmp_path / "loaded"
    pipeline.run(_cfg(tiny, a, model_name_or_path=sft, stages="warmup,select"))
    loads = [kw.get("empty", False) for _, kw, _, _ in spy.calls]
    assert loads == [True], loads  # the architecture only (meta device): no model loaded whole
    spy.mapped = False
    pipeline.run(_cfg(tiny, b, model_name_or_path=sft, stages="warmup,select", reuse_from=str(a),
                      reuse_stages="warmup"))
    loads = [kw.get("empty", False) for _, kw, _, _ in spy.calls]
    assert loads == [True, True, False, False], loads  # then both models loaded whole
    for stage in ("forget", "improve"):
        ma = Selection.load(str(a / "select" / f"{stage}_mask.safetensors")).masks
        mb = Selection.load(str(b / "select" / f"{stage}_mask.safetensors")).masks
        assert ma.keys() == mb.keys() and all(torch.equal(ma[n], mb[n]) for n in ma), stage
        assert sum(int(m.sum()) for m in ma.values()) > 0


def test_a_hub_models_weights_are_mapped_from_its_snapshot_in_the_cache(tiny, tmp_path, monkeypatch):
    """--model_name_or_path org/name: select maps the snapshot that loading the model put in the Hugging
    Face cache (else it would load the model whole: 4 bytes a parameter); nothing is downloaded."""
    import shutil

    import huggingface_hub.constants as hub

    from allo.train.model import empty_model, local_folder, mapped_weights

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--allo-test--tiny-sft"
    shutil.copytree(tiny / "sft", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = local_folder("allo-test/tiny-sft")
    assert folder == str(repo / "snapshots" / commit)
    base = empty_model(models.load_model(str(tiny / "sft")).config)
    weights = mapped_weights(folder, base)
    assert weights is not None and weights.keys() == dict(base.named_parameters()).keys()
    assert local_folder(str(tiny / "sft")) == str(tiny / "sft")
    assert local_folder("allo-test/not-downloaded") is None and local_folder("not a/repo//id") is None


def test_mapped_weights_of_sharded_files_and_what_they_refuse(tiny, tmp_path):
    from allo.train.model import empty_model, mapped_weights, tiny_llama_config

    sft = models.load_model(str(tiny / "sft"))
    meta = models.load_model(str(tiny / "sft"), empty=True)
    shards = tmp_path / "shards"
    sft.save_pretrained(shards, max_shard_size="20KB")  # several files and an index
    assert (shards / "model.safetensors.index.json").exists() and len(list(shards.glob("*.safetensors"))) > 1
    for folder in (tiny / "sft", shards):
        w = mapped_weights(str(folder), meta)
        assert w.keys() == dict(sft.named_parameters()).keys()
        assert all(torch.equal(w[n], p) for n, p in sft.named_parameters())
    # not the model's names (a second layer) or shapes (wider), or no safetensors: None (the caller then
    # loads the model whole)
    vocab = meta.config.vocab_size
    for other in (tiny_llama_config(vocab, hidden_size=32, num_layers=2), tiny_llama_config(vocab, hidden_size=48,
                                                                                              num_layers=1)):
        assert mapped_weights(str(tiny / "sft"), empty_model(other)) is None
    assert mapped_weights(str(tmp_path), meta) is None


def test_every_stage_with_bfloat16_weights(tiny, tmp_path):
    # --dtype bfloat16 (TRL's --dtype / --torch_dtype): the models are loaded, trained and saved in bf16;
    # MaskedAdamW keeps fp32 master copies of the selected elements, so the masked stages still change
    # only selected elements, and do change some
    from allo.select import Selection

    out = tmp_path / "run"
    res = pipeline.run(_cfg(tiny, out, dtype="bfloat16"))
    assert set(res) == {"sft", "warmup", "forget", "improve"}
    for stage in ("warmup", "forget", "improve"):
        assert {t.dtype for t in _weights(out, stage).values()} == {torch.bfloat16}, stage
    sft = {n: t.to(torch.bfloat16) for n, t in load_file(str(tiny / "sft" / "model.safetensors")).items()}
    for stage, start in (("forget", sft), ("improve", _weights(out, "forget"))):
        masks = Selection.load(str(out / "select" / f"{stage}_mask.safetensors")).masks
        after = _weights(out, stage)
        diff = {n: after[n] != start[n] for n in after}
        assert not any((d & ~masks[n]).any() for n, d in diff.items()), stage
        assert sum(int(d.sum()) for d in diff.values()) > 0, stage
    assert parse(["--torch_dtype", "bfloat16"])[1].dtype == "bfloat16"  # TRL's older spelling


def test_generation_batch_size_sets_the_generate_calls(tiny, tmp_path, monkeypatch):
    # --generation_batch_size bounds every generate call (eval's greedy answers here): the KV cache of 256
    # sequences of a 7B model is tens of GB, so users must be able to lower it
    from allo.train.stages import eval as eval_stage

    sizes = []
    real = eval_stage.generate

    def spy(model, tokenizer, prompts, **kw):
        sizes.append(kw["batch_size"])
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(eval_stage, "generate", spy)
    pipeline.run(_cfg(tiny, tmp_path / "run", selection="none", skip_forget=True, key_tokens=False, stages="eval",
                      eval_models="sft", generation_batch_size=3))
    assert sizes == [3], sizes


def test_generate_with_a_tokenizer_that_returns_token_type_ids():
    # some tokenizers (Falcon's; the slow ones of transformers 4.x) return token_type_ids, which a causal LM's
    # generate refuses as an unused argument: only the ids and their attention mask go to the model
    from allo.train.model import build_tiny_model, generate

    tok = load_builtin_tokenizer()
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    assert "token_type_ids" in tok(["Q: 1?\nA: "], add_special_tokens=False)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, seed=0)
    (answers,) = generate(model, tok, ["Q: 1?\nA: "], max_new_tokens=3, progress=False)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_dense_warmup_adamw_is_fused_on_one_cpu_or_cuda_device(tiny, tmp_path, monkeypatch):
    # fused: no temporary of the weights' size per step (torch's foreach AdamW makes one: _foreach_sqrt)
    from _allocations import Allocations

    from allo.train.loop import dense_adamw_kind

    assert dense_adamw_kind([torch.zeros(3)]) == {"fused": True} and dense_adamw_kind([]) == {}
    assert dense_adamw_kind([torch.zeros(3, device="meta")]) == {}
    p = torch.nn.Parameter(torch.randn(30, 20))
    p.grad = torch.randn(30, 20)
    for kind, temporaries in (({"foreach": True}, 1), ({"fused": True}, 0)):
        opt = torch.optim.AdamW([p], lr=1e-3, **kind)
        opt.step()
        with Allocations() as made:
            opt.step()
        full = [op for op, shape, _ in made.made if shape == (30, 20) and not op.split(".")[0].endswith("_")]
        assert len(full) == temporaries, (kind, full)
    if torch.cuda.is_available():
        q = [torch.nn.Parameter(torch.zeros(4, device="cuda"))]
        assert dense_adamw_kind(q) == {"fused": True} and dense_adamw_kind(q + [torch.nn.Parameter(torch.zeros(2))]) == {}
    # and the warm-up builds its AdamW so
    built = []

    class Spy(torch.optim.AdamW):
        def __init__(self, params, **kw):
            built.append(kw.get("fused"))
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    pipeline.run(_cfg(tiny, tmp_path, stages="warmup", max_steps=1))
    assert built == [True]


def test_eval_models_scores_only_the_models_asked_for(tiny, tmp_path, monkeypatch):
    from allo.train.stages import eval as eval_stage

    base = tmp_path / "base"
    pipeline.run(_cfg(tiny, base, stages="warmup"))
    out = tmp_path / "run"
    res = pipeline.run(_cfg(tiny, out, selection="none", skip_forget=True, key_tokens=False, eval_models="improve",
                            reuse_from=str(base), reuse_stages="warmup"))
    assert set(res) == {"improve"} and 0.0 <= res["improve"]["eval_answer_accuracy"] <= 1.0
    assert sorted(p.name for p in (out / "eval").glob("*.json")) == ["improve.json"]
    # the same models, scored in one run with every model, give the same numbers; the eval stage holds one
    # model at a time (the SFT model for the reference, then each evaluated model: a 7B model is 28 GB)
    live = _SpyModels()
    monkeypatch.setattr(eval_stage, "models", live)
    full = pipeline.run(_cfg(tiny, tmp_path / "full", selection="none", skip_forget=True, key_tokens=False,
                             reuse_from=str(base), reuse_stages="warmup"))
    assert set(full) == {"sft", "warmup", "improve"} and full["improve"] == res["improve"]
    alive_at_load = [alive for _, _, alive, _ in live.calls]
    assert alive_at_load == [0, 0, 0], alive_at_load  # sft (reference and eval), warmup, improve
    with pytest.raises(ValueError, match="--eval_models names unknown model"):
        TrainConfig(eval_models="sft,final").validate()


def test_gradient_checkpointing_matches_and_bf16_runs(tiny, tmp_path):
    pipeline.run(_cfg(tiny, tmp_path / "gc", gradient_checkpointing=True, stages="warmup"))
    pipeline.run(_cfg(tiny, tmp_path / "plain", stages="warmup"))
    a, b = _weights(tmp_path / "gc", "warmup"), _weights(tmp_path / "plain", "warmup")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # bf16 autocast (fp32 master weights) through every trained stage, in a fresh process
    # (accelerate keeps one mixed-precision setting per process)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "bf16"
    r = subprocess.run([sys.executable, "-m", "allo.train.cli", "run", "--bf16", "--output_dir", str(out),
                        "--model_name_or_path", str(tiny / "sft"), "--train_file", str(tiny / "train.jsonl"),
                        "--per_device_train_batch_size", "4", "--max_steps", "2", "--disable_tqdm",
                        "--stages", "warmup,select,forget,improve"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w = _weights(out, "improve")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in w.values())


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("stage", ["warmup", "forget", "improve"])
def test_resume_after_interruption_matches_uninterrupted_run(tiny, tmp_path, stage):
    prior = {"warmup": "", "forget": "warmup,select", "improve": "warmup,select,forget"}[stage]
    shared = tmp_path / "shared"
    if prior:
        pipeline.run(_cfg(tiny, shared, stages=prior, max_steps=2))
    kw = dict(stages=stage, max_steps=6, save_steps=2, reuse_from=str(shared) if prior else None,
              reuse_stages=prior or "prepare,warmup")
    pipeline.run(_cfg(tiny, tmp_path / "full", **kw))

    def boom(st, step):
        if step == 5:  # after the checkpoint at step 4
            raise _Interrupt

    with pytest.raises(_Interrupt):
        pipeline.run(_cfg(tiny, tmp_path / "cut", **kw), on_step_end=boom)
    assert not (tmp_path / "cut" / stage / "DONE").exists()
    assert (tmp_path / "cut" / stage / "checkpoints" / "checkpoint-4" / "model.safetensors").exists()
    pipeline.run(_cfg(tiny, tmp_path / "cut", resume_from_checkpoint="true", **kw))
    a, b = _weights(tmp_path / "full", stage), _weights(tmp_path / "cut", stage)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=lambda m: f"{stage}/{k}: {m}")
    full = [json.loads(l) for l in open(tmp_path / "full" / stage / "metrics.jsonl")]
    cut = [json.loads(l) for l in open(tmp_path / "cut" / stage / "metrics.jsonl")]
    assert [r["step"] for r in cut] == [r["step"] for r in full]
    assert cut[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-6)


def test_resume_after_sigkill_matches_uninterrupted_run(tiny, tmp_path):
    """The real thing: `allo-train` killed with SIGKILL (no cleanup, possibly mid-save) as soon as its
    first checkpoint exists, then resumed, ends bit-for-bit where an uninterrupted run ends."""
    import signal
    import time

    shared = tmp_path / "shared"
    pipeline.run(_cfg(tiny, shared, stages="warmup,select,forget", max_steps=2))
    kw = dict(stages="improve", max_steps=16, save_steps=2, reuse_from=str(shared),
              reuse_stages="warmup,select,forget")
    pipeline.run(_cfg(tiny, tmp_path / "full", **kw))

    cut = tmp_path / "cut"
    argv = [sys.executable, "-m", "allo.train.cli", "run", "--output_dir", str(cut),
            "--model_name_or_path", str(tiny / "sft"), "--train_file", str(tiny / "train.jsonl"),
            "--eval_file", str(tiny / "eval.jsonl"), "--eval_problems_file", str(tiny / "eval_problems.jsonl"),
            "--per_device_train_batch_size", "4", "--max_steps", "16", "--save_steps", "2", "--logging_steps", "1",
            "--improve_learning_rate", "1e-2", "--seed", "3", "--disable_tqdm", "--report_to", "jsonl",
            "--stages", "improve", "--reuse_from", str(shared), "--reuse_stages", "warmup,select,forget"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    ckpts = cut / "improve" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts.exists() and any(p.name[len("checkpoint-"):].isdigit() for p in ckpts.iterdir())):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("allo-train ended or stalled before its first checkpoint:\n"
                        + proc.stdout.read().decode(errors="replace")[-3000:])
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "improve" / "DONE").exists(), "the run finished before it could be killed"

    pipeline.run(_cfg(tiny, cut, resume_from_checkpoint="true", **kw))
    a, b = _weights(tmp_path / "full", "improve"), _weights(cut, "improve")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=lambda m: f"improve/{k}: {m}")
    full = [json.loads(l) for l in open(tmp_path / "full" / "improve" / "metrics.jsonl")]
    resumed = [json.loads(l) for l in open(cut / "improve" / "metrics.jsonl")]
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-6)


def test_two_processes_match_one_process_with_double_batch(tiny, tmp_path):
    """2 CPU processes (gloo; Accelerator in MULTI_CPU mode), batch 2 per process == 1 process, batch 4.
    Covers the dense stage (DDP) and both masked stages (compact grads + all_reduce_grads).
    Launched with torchrun: `accelerate launch --cpu` starts a single process unless MPI is set up."""
    import socket
    shared = tmp_path / "shared"
    pipeline.run(_cfg(tiny, shared, stages="warmup,select", max_steps=2))
    common = ["--model_name_or_path", str(tiny / "sft"), "--train_file", str(tiny / "train.jsonl"),
              "--learning_rate", "1e-2", "--forget_learning_rate", "1e-2", "--improve_learning_rate", "1e-2",
              "--max_steps", "3", "--disable_tqdm", "--report_to", "jsonl", "--seed", "3",
              "--reuse_from", str(shared), "--reuse_stages", "select", "--stages", "warmup,forget,improve"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1"}
    # forget's implicit token weights need a warm-up model: both runs train their own, identically
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "allo.train.cli", "run", "--output_dir", str(tmp_path / "two"),
                          "--per_device_train_batch_size", "2", *common],
                         env=env, capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert '"epoch": 0.5' in open(tmp_path / "two" / "warmup" / "metrics.jsonl").read()  # 2 x 2 of 24 rows per step
    pipeline.run(_cfg(tiny, tmp_path / "one", stages="warmup,forget,improve", max_steps=3,
                      per_device_train_batch_size=4, reuse_from=str(shared), reuse_stages="select"))
    for stage in ("warmup", "forget", "improve"):
        a, b = _weights(tmp_path / "one", stage), _weights(tmp_path / "two", stage)
        for k in a:
            # Adam divides by sqrt(v): a near-zero gradient summed in another order can move an element by
            # up to lr x (tiny); 1e-4 is 1% of one lr=1e-2 step
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{stage}/{k}: {m}")
