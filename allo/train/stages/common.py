"""What every stage shares: the run context, DONE markers, the stages' inputs (pairs, negatives,
the SFT model's path) and the on-disk cache of reference log-probs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field

import torch

from .. import data as D
from ..config import EVAL_MODELS, TrainConfig
from ..fsdp import sharded_logps
from ..logps import TokenLogprobs, cache_key, compute_logps, load_cache, save_cache


DONE = "DONE"
EVALUATED = EVAL_MODELS  # models the eval stage scores, in pipeline order


@dataclass
class Context:
    cfg: TrainConfig
    accelerator: object
    tokenizer: object
    # the data tokenized so far in this run (see tokenized): every stage reads the same files
    loaded: dict = field(default_factory=dict, repr=False)
    # this run's data files and starting model by content (run_config.input_identities): each stage's
    # DONE records them with the options, what later runs compare with
    inputs: dict = field(default_factory=dict, repr=False)

    def dir(self, stage: str) -> str:
        return os.path.join(self.cfg.output_dir, stage)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def progress(self) -> bool:
        return not self.cfg.disable_tqdm and self.accelerator.is_local_main_process

    @property
    def weights_dtype(self):
        """What the stages load the models they train, score with and evaluate in (``--dtype``)."""
        import torch

        return "auto" if self.cfg.dtype == "auto" else getattr(torch, self.cfg.dtype)

    @property
    def load_options(self):
        """How the stages read models and tokenizers (--attn_implementation, --trust_remote_code)."""
        return self.cfg.load_options()

    def log(self, msg: str):
        if self.main:
            print(f"[allo-train] {msg}", flush=True)


def is_done(stage_dir: str) -> bool:
    return finished_at(stage_dir) is not None


def finished_at(stage_dir: str) -> float | None:
    """When the stage last completed (its DONE marker's modification time), None if it has not."""
    try:
        return os.path.getmtime(os.path.join(stage_dir, DONE))
    except FileNotFoundError:
        return None


def mark_done(ctx: Context, stage_dir: str, info: dict) -> None:
    ctx.accelerator.wait_for_everyone()
    if ctx.main:
        from ..run_config import made_with

        D.write_json(os.path.join(stage_dir, DONE), {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info,
                                                     "made_with": made_with(ctx.cfg, ctx.inputs)})
    ctx.accelerator.wait_for_everyone()


def done_info(stage_dir: str) -> dict:
    with open(os.path.join(stage_dir, DONE)) as f:
        return json.load(f)


# -------------------------------------------------------------------------------- inputs of stages
def uses_builtin_data(cfg: TrainConfig) -> bool:
    return not (cfg.train_file or cfg.dataset_name)


def sft_model_path(ctx: Context) -> str:
    """The starting model theta_0: the built-in model after `prepare`'s SFT, or --model_name_or_path."""
    if ctx.cfg.model_name_or_path is None:
        return require(ctx, "prepare", "model")
    return ctx.cfg.model_name_or_path


def warmup_model_path(ctx: Context) -> str:
    """The warm-up model: --warmup_model_path (trained elsewhere), else the warmup stage's."""
    path = ctx.cfg.warmup_model_path
    return os.path.expanduser(path) if path is not None else require(ctx, "warmup", "model")


def _pairs_source(ctx: Context, split: str) -> str | None:
    cfg = ctx.cfg
    if split == "train":
        if cfg.train_file:
            return cfg.train_file
        if cfg.dataset_name:
            return cfg.dataset_name
        return require(ctx, "prepare", "train_pairs.jsonl")
    if cfg.eval_file:
        return cfg.eval_file
    if cfg.dataset_name:  # "none": a dataset without held-out pairs (eval then scores answers only, if any)
        return None if cfg.dataset_test_split.strip().lower() in ("", "none") else cfg.dataset_name
    if uses_builtin_data(cfg):
        return require(ctx, "prepare", "eval_pairs.jsonl")
    return None


def require(ctx: Context, stage: str, name: str) -> str:
    path = os.path.join(ctx.dir(stage), name)
    if not is_done(ctx.dir(stage)):
        raise FileNotFoundError(f"{path} is missing: run the `{stage}` stage first (allo-train {stage} "
                                f"--output_dir {ctx.cfg.output_dir}), or `allo-train run`")
    return path


def row_limits(cfg: TrainConfig) -> dict:
    """The options every loader of pairs or negatives tokenizes and filters rows with (allo.train.data)."""
    return dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                max_completion_length=cfg.max_completion_length, skip_bad_rows=cfg.skip_bad_rows)


def tokenized(ctx: Context, loader, src: str, **kw):
    """``loader(src, ctx.tokenizer, **kw)`` (``D.load_pairs`` or ``D.load_negatives``) once per run: the
    up-front check and the stages that read a file (warmup, select, forget, improve: the training pairs)
    share one tokenization (about a millisecond a row, per read). The run's own data files (--train_file,
    ...) are what they were at its first read for the whole run, as the stages' DONE records them
    (run_config); a file the run writes (prepare's pairs of the built-in task) is read again when it
    changed (inode, size or modification time). Returns a new list of the same example dicts, which
    nothing modifies."""
    from ..run_config import DATA_FILES

    stamp, kw_key = None, kw
    if os.path.isfile(src):
        kw_key = {k: v for k, v in kw.items() if k not in ("split", "config")}  # (a file has neither)
        if src not in {getattr(ctx.cfg, name) for name in DATA_FILES}:
            st = os.stat(src)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)  # (a file replaced by another: a new inode)
    key = (loader.__name__, src, stamp, tuple(sorted(kw_key.items())))
    hit = ctx.loaded.get(key)
    if hit is None:
        hit = ctx.loaded[key] = loader(src, ctx.tokenizer, **kw)
    examples, rep = hit
    return list(examples), rep


def load_pairs(ctx: Context, split: str):
    src = _pairs_source(ctx, split)
    if src is None:
        return None
    ds_split = ctx.cfg.dataset_train_split if split == "train" else ctx.cfg.dataset_test_split
    pairs, rep = tokenized(ctx, D.load_pairs, src, **row_limits(ctx.cfg), split=ds_split,
                           config=ctx.cfg.dataset_config if src == ctx.cfg.dataset_name else None)
    ctx.log(str(rep))
    return pairs


def load_negatives(ctx: Context, weight_field):
    cfg = ctx.cfg
    src = cfg.negatives_file
    if src is None and uses_builtin_data(cfg):
        src = require(ctx, "prepare", "negatives.jsonl")
    if src is None:
        out = D.rejected_negatives(load_pairs(ctx, "train"))
        if weight_field is not None:
            raise ValueError(f"--token_weight_source needs {weight_field} in a --negatives_file")
        return out
    negs, rep = tokenized(ctx, D.load_negatives, src, **row_limits(cfg), weight_field=weight_field)
    ctx.log(str(rep))
    return negs


def negatives_weight_field(cfg: TrainConfig) -> str | None:
    """The per-token field the forget stage reads from --negatives_file (see --token_weight_source):
    auto takes token_weights when a usable row carries them. Usable: a row the loader keeps (fields
    checked), not the file's first row, which --skip_bad_rows may skip (then every row's weights were
    ignored, silently)."""
    source = cfg.token_weight_source
    if source == "data":
        return "token_weights"
    if source == "reward_model_probs":
        return "keep_probs"
    if source != "auto" or cfg.negatives_file is None:
        return None
    for where, row in D.read_rows(cfg.negatives_file):
        if not isinstance(row, dict):
            continue
        try:
            D.check_row(row, where, "negatives")
        except D.BadRowError:
            continue
        if "token_weights" in row:
            return "token_weights"
    return None


# the stages that train, with what they train on
_TRAINED_ON = {"warmup": "training pairs", "improve": "training pairs", "forget": "negatives"}


def trained_stages(cfg: TrainConfig, stages) -> list[str]:
    """Of ``stages``, those that train (a stage given --warmup_model_path or --skip_forget does not)."""
    return [s for s in stages if s in _TRAINED_ON and not (s == "warmup" and cfg.warmup_model_path is not None)
            and not (s == "forget" and cfg.skip_forget)]


def check_batches(ctx: Context, stage: str, n: int) -> None:
    """The stage's examples fill a global batch (see loop.check_global_batch): said before its reference pass."""
    from ..loop import check_global_batch

    check_global_batch(n, ctx.cfg, ctx.accelerator.num_processes, f"{stage}: the {_TRAINED_ON[stage]}")


def scorer_batch(ctx):
    return max(1, ctx.cfg.per_device_eval_batch_size)


def _model_key(path: str | None):
    """A local model folder by its weight files (name, size, modification time: saving a model again
    changes them); a hub name by itself."""
    if path is None or not os.path.isdir(path):
        return path
    return [os.path.abspath(path)] + sorted(
        (f, st.st_size, st.st_mtime_ns) for f in os.listdir(path) if f.endswith((".safetensors", ".bin"))
        for st in [os.stat(os.path.join(path, f))])


def inputs_key(ctx: Context, *, models=(), examples=(), **values) -> str:
    """A digest of what a cached result is computed from: ``models`` (paths, see _model_key), lists of
    tokenized ``examples`` (their token ids) and other JSON ``values``; --bf16 and --dtype (what the models
    are loaded in) change every number, --attn_implementation and the batch sizes only how fast they come.
    Caches written under another key are computed again: a stage run again after its inputs changed
    (another data file, a retrained starting model) must not reuse them."""
    h = hashlib.sha256(json.dumps([[_model_key(m) for m in models], values, ctx.cfg.bf16, ctx.cfg.dtype],
                                  sort_keys=True, default=str).encode())
    for group in examples:
        for e in group:
            for k in sorted(e):
                v = e[k]
                h.update(f"{k}:{len(v)}:".encode())
                h.update(torch.as_tensor(v, dtype=torch.float64 if k == "weights" else torch.int64).numpy().tobytes())
    return h.hexdigest()


def cache_is_current(ctx: Context, path: str, key: str, stored_key=cache_key) -> bool:
    """``path`` exists and was computed from the inputs ``key`` stands for (else it is logged as stale).
    ``stored_key(path)``: the key it was saved with (default: a safetensors cache's metadata)."""
    if not os.path.exists(path):
        return False
    if stored_key(path) == key:
        return True
    ctx.log(f"{path}: computed from other inputs (data, model or options changed since); computing it again")
    return False


def cached_reference(ctx: Context, stage_dir: str, model, named_examples: dict, name="reference_logps", *,
                     sync: bool = True, scorer=None, model_path: str | None = None, load=None) -> dict:
    """Reference log-probs of the stage's starting ``model`` (loaded from ``model_path``) on every
    example, computed once and cached in ``stage_dir`` (written by the main process); a resumed stage
    reads the cache, a stage whose model or examples changed computes it again. One process or DDP:
    the main process computes them with ``model``, or with ``load()`` when ``model`` is None (a model
    loaded only if the cache must be computed, and dropped after). ``scorer``: FSDP2, the stage's
    sharded module holding ``model``'s weights: every rank scores its share of the examples through it
    (``model`` is not used) and the main process gathers them and writes the same cache."""
    path = os.path.join(stage_dir, f"{name}.safetensors")
    key = inputs_key(ctx, models=[model_path], examples=named_examples.values(), names=list(named_examples)) \
        if ctx.main else None
    # only the main process looks at the file: another rank could see it appear and skip the barrier
    todo = ctx.main and not cache_is_current(ctx, path, key)
    if scorer is not None:  # FSDP2: every rank takes part in every forward, as the main process decides
        todo = main_decides(todo)
    if todo:
        from tqdm.auto import tqdm

        if scorer is None:
            if model is None:
                model = load()
            scorer, score = TokenLogprobs(model.to(ctx.accelerator.device)), compute_logps
        else:
            score = sharded_logps
        total = sum(len(v) for v in named_examples.values())
        with tqdm(total=total, desc=f"{os.path.basename(stage_dir)}: {name}", disable=not ctx.progress, leave=False) as bar:
            out = {k: score(scorer, v, pad_id=ctx.tokenizer.pad_token_id, batch_size=scorer_batch(ctx),
                            device=ctx.accelerator.device, autocast=ctx.accelerator.autocast, progress=bar)
                   for k, v in named_examples.items()}
        if ctx.main:
            save_cache(path, out, key=key)
    if sync or scorer is not None:
        ctx.accelerator.wait_for_everyone()
    return load_cache(path)


def checkpoint_inputs(stage_dir: str, *names: str) -> dict:
    """{cache: key} of the caches a stage trains from (``<name>.safetensors`` in ``stage_dir``, written by
    then): their keys cover the starting model, the examples and the options they depend on, so a
    checkpoint recording them tells a resume whether it was trained from the same inputs."""
    return {n: cache_key(os.path.join(stage_dir, f"{n}.safetensors")) for n in names}


@contextlib.contextmanager
def parked_on_cpu(model):
    """``model`` moved to the CPU for the duration, back to its device after (the same parameter
    objects): a second model can then use the device without two models' weights on it at once."""
    device = next(model.parameters()).device
    model.to("cpu")
    try:
        yield model
    finally:
        model.to(device)


def main_decides(flag: bool) -> bool:
    """The main process's ``flag``, on every rank (collective: every rank calls it)."""
    return from_main(flag)


def from_main(value):
    """The main process's ``value`` (any picklable object), on every rank (collective: every rank calls it)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def pair_views(pairs):
    return {"chosen": [{"prompt_ids": p["prompt_ids"], "response_ids": p["chosen_ids"]} for p in pairs],
            "rejected": [{"prompt_ids": p["prompt_ids"], "response_ids": p["rejected_ids"]} for p in pairs]}


def seed_all(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
