"""Reading and tokenizing preference data, negatives and problems; batching.

Files: ``.jsonl`` (one object a line), ``.json`` (a list of objects, or ``{"data": [...]}``),
``.parquet``; anything else is taken as a ``datasets`` name (``datasets`` is imported only then).

Rows:
* pairs:     ``prompt``, ``chosen``, ``rejected``: strings, or chat messages (lists of
             ``{"role", "content"}``) rendered with the tokenizer's chat template (TRL's
             conversational format; ``prompt`` may be left out when ``chosen``/``rejected`` hold
             the whole conversation);
* negatives: ``prompt`` and ``response`` (or ``rejected``), optionally ``token_weights`` (one number
             per response token, as the model's tokenizer splits it, without the end-of-sequence
             token, also where the response ends with one, as a chat template renders it) or
             ``keep_probs`` (a token-level reward model's probability of keeping each token);
* problems:  ``prompt`` and ``answer`` (for ``prepare`` on your own model).

Truncation policy (TRL's): the prompt keeps its LAST ``max_prompt_length`` tokens (the question usually
sits at its end), the response its FIRST ``max_completion_length``; then prompt + response keeps its
FIRST ``max_length`` tokens (the response loses its end). A row with no response token left is malformed.

A malformed row raises :class:`BadRowError` naming the file, line and field; with
``skip_bad_rows=True`` it is skipped and counted instead. Rows are numbered from 1 everywhere: a
``.jsonl`` file's line (``file.jsonl:5``), the n-th item of a ``.json`` list or row of a ``.parquet``
file or dataset (``file.json: row 5``). :func:`check_source` checks a file's rows without a tokenizer,
so a run finds a bad file before its first stage.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from allo._atomic import atomic_path

IGNORE_INDEX = -100


class DataError(ValueError):
    """A data source that cannot be read (no such file, not JSON, a dataset or split that is not there)."""


class BadRowError(DataError):
    pass


DATA_FILE_TYPES = (".jsonl", ".json", ".parquet")


@dataclass
class LoadReport:
    """What loading a source did: rows kept and skipped, and what truncation cut (said in the log, so
    that a --max_length too small for the data shows before training: pairs that differ only past it,
    as math solutions with a wrong final answer do, become identical and teach nothing)."""

    source: str
    rows: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    cut_responses: int = 0  # responses that lost their end to --max_completion_length or --max_length
    cut_prompts: int = 0  # prompts that lost their start to --max_prompt_length
    identical_pairs: int = 0  # pairs whose chosen and rejected tokens are the same after truncation
    max_length: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None

    def __str__(self):
        s = f"{self.source}: {self.rows} rows"
        if self.skipped:
            s += f", {self.skipped} skipped (--skip_bad_rows); first: {self.reasons[0]}"
        if self.cut_responses:
            limits = [f"--{name} {v}" for name, v in (("max_length", self.max_length),
                                                       ("max_completion_length", self.max_completion_length))
                      if v is not None]
            s += f"; {self.cut_responses} responses cut at {' or '.join(limits)}"
        if self.cut_prompts:
            s += f"; {self.cut_prompts} prompts cut to their last --max_prompt_length {self.max_prompt_length} tokens"
        if self.identical_pairs:
            s += (f"; {self.identical_pairs} pairs with chosen == rejected after truncation (no preference left: "
                  "raise --max_length)")
        return s


def read_rows(source: str, *, split: str = "train", config: str | None = None) -> list[tuple[str, dict]]:
    """``[(where, row)]`` with ``where`` like ``file.jsonl:12`` (1-based line) for error messages.
    ``config``: the `datasets` configuration of a dataset name or folder (not used for files)."""
    if os.path.isfile(source):
        low = source.lower()
        if low.endswith(".jsonl"):
            rows = []
            with open(source, "rb") as f:
                # line by line from bytes: a line that is not UTF-8 is named like one that is not JSON; a
                # byte-order mark (some Windows editors write one) is not part of the first line
                for n, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                    except UnicodeDecodeError as e:
                        rows.append((f"{source}:{n}", _Unparsable(_not_utf8(e))))
                        continue
                    if not line.strip():
                        continue
                    try:
                        rows.append((f"{source}:{n}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        rows.append((f"{source}:{n}", _Unparsable(f"not valid JSON ({e})")))
            return rows
        if low.endswith(".json"):
            with open(source, "rb") as f:
                content = f.read()
            try:
                text = content.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                line = content[:e.start].count(b"\n") + 1
                line_start = content.rfind(b"\n", 0, e.start) + 1
                raise BadRowError(f"{source}:{line}: {_not_utf8(e, line_start)}") from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise BadRowError(f"{source}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
            if isinstance(obj, dict) and isinstance(obj.get("data"), list):
                obj = obj["data"]
            if not isinstance(obj, list):
                raise BadRowError(f"{source}: expected a JSON list of objects (or {{\"data\": [...]}}), got {type(obj).__name__}")
            return [(f"{source}: row {i}", r) for i, r in enumerate(obj, 1)]
        if low.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq  # lazily: comes with `datasets` (allo[data]), not with allo itself
            except ImportError as e:
                raise DataError(f"{source}: reading Parquet needs pyarrow: `pip install pyarrow` (or allo[data]), "
                                "or give a .jsonl/.json file") from e
            return [(f"{source}: row {i}", r) for i, r in enumerate(pq.read_table(source).to_pylist(), 1)]
        raise BadRowError(f"{source}: unknown file type; use .jsonl, .json or .parquet")
    if _names_a_file(source):
        if os.path.isdir(source):  # (a folder named like a data file: "no such file" would mislead)
            raise DataError(f"{source}: is a directory; expected a .jsonl, .json or .parquet file")
        # a path, not a dataset name: asking the hub for it would only say it cannot be reached
        raise FileNotFoundError(f"{source}: no such file")
    try:
        import datasets  # lazily: optional, and absent on some training machines
    except ImportError as e:
        what = "a dataset folder" if os.path.isdir(source) else "not a file, and reading it as a hub dataset"
        raise DataError(f"{source!r} is {what}: that needs `pip install datasets` (or give a .jsonl/.json/.parquet "
                        "file)") from e
    try:
        ds = datasets.load_dataset(source, config, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with what was asked for and how to choose otherwise
        of = f"split {split!r}" + (f" of configuration {config!r}" if config else "")
        raise DataError(f"{source!r}: could not load {of} as a `datasets` dataset ({type(e).__name__}: {e}). "
                        "Give a local file (.jsonl/.json/.parquet), a dataset folder or hub name, and the split with "
                        "--dataset_train_split / --dataset_test_split (held-out pairs: or --eval_file, or "
                        "--dataset_test_split none for none), the configuration with --dataset_config") from e
    name = f"{source}:{config}" if config else source
    return [(f"{name}[{split}] row {i}", r) for i, r in enumerate(ds, 1)]


def _not_utf8(e: UnicodeDecodeError, line_start: int = 0) -> str:
    return (f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at column {e.start - line_start + 1}; save the file "
            "as UTF-8")


class _Unparsable:
    def __init__(self, why):
        self.why = why


def _bad(where, fld, why):
    return BadRowError(f"{where}: field '{fld}': {why}")


def _is_messages(v):
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in v)


def _text_field(row, where, fld, *, messages_ok=True):
    if fld not in row or row[fld] is None:
        raise _bad(where, fld, "missing")
    v = row[fld]
    if isinstance(v, str):
        if not v:
            raise _bad(where, fld, "empty string")
        return v
    if messages_ok and _is_messages(v) and v:
        for i, m in enumerate(v, 1):
            # the chat template would render null as nothing (an empty response trained) and 5 as "5"
            if not isinstance(m["content"], str):
                got = "null" if m["content"] is None else type(m["content"]).__name__
                raise _bad(where, fld, f"message {i}: 'content' is {got}; expected a string")
        return v
    raise _bad(where, fld, f"expected a string{' or a list of {role, content} messages' if messages_ok else ''}, got {type(v).__name__}")


def _render(tokenizer, prompt, response, where, fld):
    """(prompt text, response text) with chat messages put through the chat template."""
    if isinstance(prompt, str) and isinstance(response, str):
        return prompt, response
    if isinstance(prompt, str) or isinstance(response, str):
        raise _bad(where, fld, "prompt and response must both be strings or both be chat messages")
    if not getattr(tokenizer, "chat_template", None):
        raise _bad(where, fld, "chat messages need a tokenizer with a chat template")
    p = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    if not full.startswith(p):
        raise _bad(where, fld, "the chat template renders the prompt differently inside the whole conversation")
    return p, full[len(p):]


def encode_text_pair(tokenizer, prompt: str, response: str, *, max_length: int | None = None,
                     max_prompt_length: int | None = None, max_completion_length: int | None = None,
                     weights=None, where="", fld="response", cuts: set | None = None):
    """Token ids of prompt and response (+ end-of-sequence unless the text already ends with it),
    truncated by the module's policy; per-token ``weights`` follow the response's truncation.
    ``cuts``: gets "prompt" and/or "response" when they were truncated."""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    # a response may end with end-of-sequence already (a chat template's suffix, or the text itself):
    # the weights never count it, as for a response it is appended to
    ends_with_eos = bool(r_ids) and r_ids[-1] == eos
    counted = len(r_ids) - ends_with_eos
    if weights is not None and len(weights) != counted:
        raise _bad(where, "token_weights" if fld != "keep_probs" else fld,
                   f"has {len(weights)} values but the response has {counted} tokens (one value per token, "
                   "end-of-sequence excluded)")
    if not ends_with_eos:
        r_ids = r_ids + [eos]
    if weights is not None:
        weights = list(weights) + [0.0]  # the end-of-sequence token is never forgotten
    if max_prompt_length is not None and len(p_ids) > max_prompt_length:
        p_ids = p_ids[len(p_ids) - max_prompt_length:]
        if cuts is not None:
            cuts.add("prompt")
    # the response keeps its first `keep` tokens: at most max_completion_length, and what max_length leaves
    keep = len(r_ids) if max_completion_length is None else min(len(r_ids), max_completion_length)
    if max_length is not None and len(p_ids) + keep > max_length:
        keep = max_length - len(p_ids)
        if keep <= 0:
            raise _bad(where, fld, f"nothing of the response is left after truncating to max_length={max_length} "
                       f"(the prompt alone has {len(p_ids)} tokens); raise --max_length or set --max_prompt_length")
    if keep < len(r_ids):
        r_ids = r_ids[:keep]
        weights = None if weights is None else weights[:keep]
        if cuts is not None:
            cuts.add("response")
    ex = {"prompt_ids": p_ids, "response_ids": r_ids}
    if weights is not None:
        ex["weights"] = [float(w) for w in weights]
    return ex


def _load(source, parse, *, skip_bad_rows, split="train", config=None, rep=None):
    rep, out = rep or LoadReport(source), []
    for where, row in read_rows(source, split=split, config=config):
        try:
            if isinstance(row, _Unparsable):
                raise BadRowError(f"{where}: {row.why}")
            if not isinstance(row, dict):
                raise BadRowError(f"{where}: expected an object with named fields, got {type(row).__name__}")
            out.append(parse(row, where, rep))
            rep.rows += 1
        except BadRowError as e:
            if not skip_bad_rows:
                raise BadRowError(f"{e}. Fix the row, or pass --skip_bad_rows to skip and count such rows") from None
            rep.skipped += 1
            rep.reasons.append(str(e))
    if not out:
        raise BadRowError(f"{source}: no usable rows ({rep})")
    return out, rep


def load_pairs(source, tokenizer, *, max_length=None, max_prompt_length=None, max_completion_length=None,
               skip_bad_rows=False, split="train", config=None):
    """Tokenized preference pairs: dicts with prompt_ids, chosen_ids, rejected_ids."""
    limits = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                  max_completion_length=max_completion_length)

    def parse(row, where, rep):
        prompt, chosen, rejected = _pair_texts(row, where)
        kw = dict(limits, where=where)
        c_cuts, r_cuts = set(), set()
        c = encode_text_pair(tokenizer, *_render(tokenizer, prompt, chosen, where, "chosen"), fld="chosen",
                             cuts=c_cuts, **kw)
        r = encode_text_pair(tokenizer, *_render(tokenizer, prompt, rejected, where, "rejected"), fld="rejected",
                             cuts=r_cuts, **kw)
        # (counted once the row is known to be good: a skipped row's cuts do not count)
        rep.cut_prompts += "prompt" in c_cuts | r_cuts
        rep.cut_responses += ("response" in c_cuts) + ("response" in r_cuts)
        rep.identical_pairs += c["prompt_ids"] == r["prompt_ids"] and c["response_ids"] == r["response_ids"]
        return {"prompt_ids": c["prompt_ids"], "chosen_ids": c["response_ids"], "rejected_ids": r["response_ids"]}
    return _load(source, parse, skip_bad_rows=skip_bad_rows, split=split, config=config,
                 rep=LoadReport(source, **limits))


def _pair_texts(row, where):
    """A pair row's (prompt, chosen, rejected): strings or chat messages."""
    chosen = _text_field(row, where, "chosen")
    rejected = _text_field(row, where, "rejected")
    if "prompt" in row and row["prompt"] is not None:
        prompt = _text_field(row, where, "prompt")
    elif _is_messages(chosen) and _is_messages(rejected) and len(chosen) > 1:
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]  # implicit prompt (TRL)
    else:
        raise _bad(where, "prompt", "missing")
    return prompt, chosen, rejected


def _negative_texts(row, where):
    """A negative row's (prompt, the response's field name, response)."""
    prompt = _text_field(row, where, "prompt")
    # `response` is the negatives' field (`rejected` is read where it is missing): a row with neither is
    # missing `response`, the name the user is told to give
    fld = "rejected" if "response" not in row and "rejected" in row else "response"
    return prompt, fld, _text_field(row, where, fld)


def load_negatives(source, tokenizer, *, max_length=None, max_prompt_length=None, max_completion_length=None,
                   skip_bad_rows=False, weight_field=None, split="train"):
    """Tokenized wrong responses: dicts with prompt_ids, response_ids and, when ``weight_field``
    ("token_weights" or "keep_probs") is given, that field's per-token values as ``weights``."""
    limits = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                  max_completion_length=max_completion_length)

    def parse(row, where, rep):
        prompt, fld, response = _negative_texts(row, where)
        weights = None
        if weight_field is not None:
            weights = row.get(weight_field)
            if not isinstance(weights, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
                raise _bad(where, weight_field, "expected a list of numbers, one per response token")
            if not all(math.isfinite(w) for w in weights):
                raise _bad(where, weight_field, "has a value that is not a finite number (NaN or infinity)")
            if weight_field == "keep_probs" and not all(0.0 <= w <= 1.0 for w in weights):
                raise _bad(where, weight_field, "has a value outside [0, 1] (probabilities of keeping each token)")
        p, r = _render(tokenizer, prompt, response, where, fld)
        cuts = set()
        ex = encode_text_pair(tokenizer, p, r, **limits, weights=weights, where=where, fld=weight_field or fld,
                              cuts=cuts)
        rep.cut_prompts += "prompt" in cuts
        rep.cut_responses += "response" in cuts
        return ex
    return _load(source, parse, skip_bad_rows=skip_bad_rows, split=split, rep=LoadReport(source, **limits))


def rejected_negatives(pairs) -> list[dict]:
    """The forgetting stage's negatives when no --negatives_file is given: every distinct (prompt,
    rejected response) of the training pairs, in order."""
    seen, out = set(), []
    for p in pairs:
        key = (tuple(p["prompt_ids"]), tuple(p["rejected_ids"]))
        if key not in seen:
            seen.add(key)
            out.append({"prompt_ids": p["prompt_ids"], "response_ids": p["rejected_ids"]})
    return out


def load_problems(source, *, skip_bad_rows=False, split="train"):
    """Problems with checkable answers: dicts with prompt (str) and answer (an int when it is a whole
    number, else the text, e.g. "B" or "yes"; see --answer_pattern for how responses are judged)."""
    return _load(source, lambda row, where, rep: _problem(row, where), skip_bad_rows=skip_bad_rows, split=split)


def _problem(row, where) -> dict:
    prompt = _text_field(row, where, "prompt", messages_ok=False)
    ans = row.get("answer")
    if isinstance(ans, bool) or not isinstance(ans, (int, float, str)) or not str(ans).strip():
        raise _bad(where, "answer", f"expected a number or a non-empty string, got {ans!r}")
    try:
        ans = int(str(ans).strip())
    except ValueError:
        ans = ans if isinstance(ans, float) else str(ans).strip()
    return {"prompt": prompt, "answer": ans}


def _names_a_file(source: str) -> bool:
    """Whether ``source`` is written as a file path (a data file's suffix, or a path that is not a folder),
    not a dataset name or folder."""
    return source.lower().endswith(DATA_FILE_TYPES) or source.startswith((".", "/", "~")) and not os.path.isdir(source)


_ROW_CHECKS = {"pairs": _pair_texts, "negatives": _negative_texts, "problems": _problem}


def check_row(row: dict, where: str, kind: str) -> None:
    """A row's fields checked as its loader will (``kind``: pairs, negatives or problems); raises BadRowError."""
    _ROW_CHECKS[kind](row, where)


def check_source(source: str, kind: str, *, skip_bad_rows: bool = False) -> LoadReport | None:
    """Read a local data file whole and check every row's fields as its loader will (``kind``: pairs,
    negatives or problems), without tokenizing: the errors the stage would raise, before any stage
    runs. A dataset name or folder is not checked here (None): loading it is the dataset's work."""
    if not os.path.isfile(source) and not _names_a_file(source):
        return None  # a dataset folder or hub name (read_rows says "no such file" for a missing path)
    check = _ROW_CHECKS[kind]
    return _load(source, lambda row, where, rep: check(row, where), skip_bad_rows=skip_bad_rows)[1]


def write_text(path: str, text: str) -> None:
    """``text`` written atomically (a temporary file renamed over ``path``)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON, written atomically (see :func:`write_text`)."""
    write_text(path, json.dumps(obj, indent=1, default=str))


def write_jsonl(path: str, rows) -> None:
    """One JSON object per line, written atomically (see :func:`write_text`)."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def collate(examples, pad_id: int, device=None) -> dict:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (IGNORE_INDEX outside responses)
    and, when the examples carry per-token weights, ``weights`` aligned with ``labels[:, 1:]``; on
    ``device`` (built on the CPU, then moved; default: left there). Every batch goes through here, so a
    model on a GPU never meets a CPU batch."""
    length = max(len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples)
    b = len(examples)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    attn = torch.zeros((b, length), dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros((b, length - 1)) if any("weights" in e for e in examples) else None
    for i, e in enumerate(examples):
        p, r = e["prompt_ids"], e["response_ids"]
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        attn[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(r)
        if weights is not None and "weights" in e:
            weights[i, len(p) - 1:n - 1] = torch.tensor(e["weights"])  # label t+1 is predicted at position t
    out = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    if weights is not None:
        out["weights"] = weights
    return out if device is None else {k: v.to(device) for k, v in out.items()}


def pair_examples(pairs):
    """Chosen responses first, then rejected ones: one forward pass scores both (TRL's concatenated forward)."""
    return ([{"prompt_ids": p["prompt_ids"], "response_ids": p["chosen_ids"]} for p in pairs]
            + [{"prompt_ids": p["prompt_ids"], "response_ids": p["rejected_ids"]} for p in pairs])
